//! Email/set create (RFC 8621 §4.6): an Email object given by its properties made into a real
//! RFC 5322 message, which is then stored through the service like any delivery.
//!
//! The message is written by the `mail-builder` crate (headers encoded as RFC 2047 words where
//! they need it, bodies in quoted-printable or base64 as their bytes need, boundaries made for
//! each multipart). What a creation may give:
//! - `mailboxIds` (exactly one mailbox here, which may be a creation of the same request, `#id`),
//!   `keywords` and `receivedAt`;
//! - the header properties `from`, `sender`, `replyTo`, `to`, `cc`, `bcc`, `subject`, `sentAt`,
//!   `messageId`, `inReplyTo` and `references`, `headers` (raw values), and `header:Name` in the
//!   forms asRaw, asText, asAddresses, asGroupedAddresses, asMessageIds, asDate and asURLs, with
//!   `:all` for a list of values. A header given twice (`from` and `header:From`) is refused, and so
//!   is any `Content-*` header: the body properties say what those headers say;
//! - the body, either as `bodyStructure` (a tree of parts with `subParts`) or as `textBody` (one
//!   text/plain part), `htmlBody` (one text/html part) and `attachments`, laid out as RFC 8621
//!   §4.6 says (alternative text and HTML, mixed with the attachments). A part names its content
//!   by `partId`, a key of `bodyValues`, or by `blobId`, an uploaded blob or an email's blob
//!   (or part of one); it may set `type`, `charset`, `disposition`, `name`, `cid`, `language`,
//!   `location` and `headers`.
//!
//! Properties the server sets (`id`, `blobId`, `threadId`, `size`, `preview`, `hasAttachment`) are
//! refused, as are `isTruncated` or `isEncodingProblem` set in a body value. Every refusal is an
//! `invalidProperties` SetError naming the property; a blob that is not there is `blobNotFound`
//! with its id. Header values may not hold line breaks (a raw value may be folded: a break followed
//! by white space), so a creation cannot smuggle in a header of its own.

use std::borrow::Cow;

use mail_builder::headers::address::Address;
use mail_builder::headers::content_type::ContentType;
use mail_builder::headers::date::Date;
use mail_builder::headers::message_id::MessageId as MessageIdHeader;
use mail_builder::headers::raw::Raw;
use mail_builder::headers::text::Text;
use mail_builder::headers::url::URL;
use mail_builder::headers::HeaderType;
use mail_builder::mime::{BodyPart, MimePart};
use mail_builder::MessageBuilder;
use serde_json::{json, Map, Value};

use super::body::{parse_header_property, HeaderForm};
use super::invalid_property;

/// The properties of a creation the server sets itself.
const SERVER_SET: &[&str] = &["id", "blobId", "threadId", "size", "preview", "hasAttachment"];

/// The deepest a `bodyStructure` may nest.
const MAX_PART_DEPTH: usize = 16;
/// The most parts one creation may have.
const MAX_PARTS: usize = 256;

/// A creation read and written out: the message's bytes and where and how to store them.
#[derive(Debug)]
pub struct Draft {
    pub raw: Vec<u8>,
    /// The JMAP id of the one mailbox, as given (`#creation` not yet resolved).
    pub mailbox: String,
    /// JMAP keywords, as given.
    pub keywords: Vec<String>,
    pub received_millis: Option<u64>,
}

/// What a creation refers to outside itself: the bytes of a blob by its id (`None`: no such blob).
pub type BlobLookup<'a> = dyn FnMut(&str) -> Result<Option<Vec<u8>>, Value> + 'a;

/// An `invalidProperties` SetError.
fn invalid(property: &str, description: impl Into<String>) -> Value {
    invalid_property(property, description)
}

/// A header value given as text: one line.
fn one_line<'a>(property: &str, value: &'a Value) -> Result<&'a str, Value> {
    let text = value
        .as_str()
        .ok_or_else(|| invalid(property, format!("{property} is not a string")))?;
    if text.contains(['\r', '\n']) {
        return Err(invalid(property, format!("{property} holds a line break")));
    }
    Ok(text)
}

/// A raw header value: line breaks only as folding (followed by a space or a tab).
fn raw_value(property: &str, value: &Value) -> Result<String, Value> {
    let text = value
        .as_str()
        .ok_or_else(|| invalid(property, format!("{property} is not a string")))?;
    let bytes = text.as_bytes();
    for (index, byte) in bytes.iter().enumerate() {
        let folded = match byte {
            b'\r' => bytes.get(index + 1) == Some(&b'\n') && matches!(bytes.get(index + 2), Some(b' ' | b'\t')),
            b'\n' => index > 0 && bytes[index - 1] == b'\r' && matches!(bytes.get(index + 1), Some(b' ' | b'\t')),
            _ => true,
        };
        if !folded {
            return Err(invalid(
                property,
                format!("{property} holds a line break that is not folding"),
            ));
        }
    }
    // JMAP's raw form keeps the space after the colon; the writer puts its own.
    Ok(text.strip_prefix(' ').unwrap_or(text).to_owned())
}

fn email_address(property: &str, value: &Value) -> Result<Address<'static>, Value> {
    let object = value
        .as_object()
        .ok_or_else(|| invalid(property, "an EmailAddress is an object"))?;
    let email = object
        .get("email")
        .map(|email| one_line(property, email))
        .transpose()?
        .ok_or_else(|| invalid(property, "an EmailAddress has an email"))?;
    let name = match object.get("name") {
        None | Some(Value::Null) => None,
        Some(name) => Some(one_line(property, name)?.to_owned()).filter(|name| !name.is_empty()),
    };
    Ok(Address::new_address(name, email.to_owned()))
}

fn address_list(property: &str, value: &Value) -> Result<Address<'static>, Value> {
    let items = value
        .as_array()
        .ok_or_else(|| invalid(property, format!("{property} is a list of EmailAddress")))?;
    Ok(Address::new_list(
        items
            .iter()
            .map(|item| email_address(property, item))
            .collect::<Result<_, _>>()?,
    ))
}

fn grouped_addresses(property: &str, value: &Value) -> Result<Address<'static>, Value> {
    let groups = value
        .as_array()
        .ok_or_else(|| invalid(property, format!("{property} is a list of EmailAddressGroup")))?;
    let mut list = Vec::with_capacity(groups.len());
    for group in groups {
        let object = group
            .as_object()
            .ok_or_else(|| invalid(property, "an EmailAddressGroup is an object"))?;
        let addresses = object
            .get("addresses")
            .ok_or_else(|| invalid(property, "an EmailAddressGroup has addresses"))?;
        let Address::List(members) = address_list(property, addresses)? else {
            return Err(invalid(property, "an EmailAddressGroup has addresses"));
        };
        match object.get("name") {
            None | Some(Value::Null) => list.extend(members),
            Some(name) => list.push(Address::new_group(Some(one_line(property, name)?.to_owned()), members)),
        }
    }
    Ok(Address::new_list(list))
}

fn message_ids(property: &str, value: &Value) -> Result<MessageIdHeader<'static>, Value> {
    let items = value
        .as_array()
        .ok_or_else(|| invalid(property, format!("{property} is a list of message ids")))?;
    let ids: Vec<String> = items
        .iter()
        .map(|item| {
            let id = one_line(property, item)?;
            if id.is_empty() || id.contains(['<', '>', ' ']) {
                return Err(invalid(
                    property,
                    format!("{id:?} is not a message id (no angle brackets)"),
                ));
            }
            Ok(id.to_owned())
        })
        .collect::<Result<_, _>>()?;
    if ids.is_empty() {
        return Err(invalid(property, format!("{property} is empty")));
    }
    Ok(MessageIdHeader::new_list(ids.into_iter()))
}

fn date(property: &str, value: &Value) -> Result<Date, Value> {
    let text = one_line(property, value)?;
    let parsed = mail_parser::DateTime::parse_rfc3339(text)
        .ok_or_else(|| invalid(property, format!("{property} is not a Date (RFC 3339)")))?;
    Ok(Date::new(parsed.to_timestamp()))
}

fn urls(property: &str, value: &Value) -> Result<URL<'static>, Value> {
    let items = value
        .as_array()
        .ok_or_else(|| invalid(property, format!("{property} is a list of URLs")))?;
    let list: Vec<String> = items
        .iter()
        .map(|item| one_line(property, item).map(str::to_owned))
        .collect::<Result<_, _>>()?;
    Ok(URL::new_list(list.into_iter()))
}

/// A header value in one of RFC 8621 §4.1.2's forms.
fn header_value(property: &str, form: HeaderForm, value: &Value) -> Result<HeaderType<'static>, Value> {
    Ok(match form {
        HeaderForm::Raw => Raw::new(raw_value(property, value)?).into(),
        HeaderForm::Text => Text::new(one_line(property, value)?.to_owned()).into(),
        HeaderForm::Addresses => address_list(property, value)?.into(),
        HeaderForm::GroupedAddresses => grouped_addresses(property, value)?.into(),
        HeaderForm::MessageIds => message_ids(property, value)?.into(),
        HeaderForm::Date => date(property, value)?.into(),
        HeaderForm::Urls => urls(property, value)?.into(),
    })
}

/// A header's name as the writer looks for it (it adds Message-ID, Date and MIME-Version when
/// it sees none by those exact names), else as given.
fn canonical_name(name: &str) -> String {
    for known in ["Message-ID", "Date", "MIME-Version"] {
        if name.eq_ignore_ascii_case(known) {
            return known.to_owned();
        }
    }
    name.to_owned()
}

/// The headers a creation or a body part gives, in order, with the names written as given.
#[derive(Default)]
struct Headers {
    list: Vec<(String, HeaderType<'static>)>,
}

impl Headers {
    /// Refuses a `Content-*` header and one already given.
    fn check_new(&self, property: &str, name: &str) -> Result<(), Value> {
        if name.to_ascii_lowercase().starts_with("content-") {
            return Err(invalid(
                property,
                format!("{name} is set by the body properties (type, charset, disposition, ...)"),
            ));
        }
        if self.list.iter().any(|(held, _)| held.eq_ignore_ascii_case(name)) {
            return Err(invalid(property, format!("the {name} header is given twice")));
        }
        Ok(())
    }

    fn add(&mut self, property: &str, name: &str, value: HeaderType<'static>) -> Result<(), Value> {
        self.check_new(property, name)?;
        self.list.push((canonical_name(name), value));
        Ok(())
    }

    /// A `headers` property: a list of `{name, value}` in raw form (a name may repeat there).
    fn add_raw_list(&mut self, property: &str, value: &Value) -> Result<(), Value> {
        let items = value
            .as_array()
            .ok_or_else(|| invalid(property, "headers is a list of EmailHeader"))?;
        let mut given: Vec<(String, HeaderType<'static>)> = Vec::with_capacity(items.len());
        for item in items {
            let object = item
                .as_object()
                .ok_or_else(|| invalid(property, "an EmailHeader is an object"))?;
            let name = object
                .get("name")
                .and_then(Value::as_str)
                .filter(|name| !name.is_empty() && name.bytes().all(|byte| byte.is_ascii_graphic() && byte != b':'))
                .ok_or_else(|| invalid(property, "an EmailHeader has a field name"))?;
            let value = raw_value(property, object.get("value").unwrap_or(&Value::Null))?;
            self.check_new(property, name)?;
            given.push((canonical_name(name), Raw::new(value).into()));
        }
        self.list.extend(given);
        Ok(())
    }

    /// A `header:Name[:asForm][:all]` property.
    fn add_property(&mut self, property: &str, value: &Value) -> Result<(), Value> {
        let header = parse_header_property(property)
            .map_err(|_| invalid(property, format!("{property} is not a header property")))?;
        if header.all {
            let items = value
                .as_array()
                .ok_or_else(|| invalid(property, format!("{property} is a list of values")))?;
            self.check_new(property, header.name)?;
            for item in items {
                let value = header_value(property, header.form, item)?;
                self.list.push((canonical_name(header.name), value));
            }
            return Ok(());
        }
        let value = header_value(property, header.form, value)?;
        self.add(property, header.name, value)
    }
}

/// The body of a creation as its properties give it, before it is written.
struct BodyReader<'a, 'b> {
    values: Option<&'a Map<String, Value>>,
    blobs: &'a mut BlobLookup<'b>,
    parts: usize,
}

impl BodyReader<'_, '_> {
    fn text_of(&self, property: &str, part_id: &str) -> Result<String, Value> {
        let value = self
            .values
            .and_then(|values| values.get(part_id))
            .ok_or_else(|| invalid(property, format!("partId {part_id} is not in bodyValues")))?;
        let object = value
            .as_object()
            .ok_or_else(|| invalid("bodyValues", "an EmailBodyValue is an object"))?;
        for flag in ["isTruncated", "isEncodingProblem"] {
            if object.get(flag).is_some_and(|set| *set != Value::Bool(false)) {
                return Err(invalid("bodyValues", format!("{flag} cannot be set on a creation")));
            }
        }
        object
            .get("value")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| invalid("bodyValues", "an EmailBodyValue has a value string"))
    }

    /// One EmailBodyPart (and its sub-parts) as a MIME part.
    fn part(&mut self, property: &str, value: &Value, depth: usize) -> Result<MimePart<'static>, Value> {
        self.parts += 1;
        if self.parts > MAX_PARTS || depth > MAX_PART_DEPTH {
            return Err(invalid(
                property,
                format!("at most {MAX_PARTS} parts, {MAX_PART_DEPTH} deep"),
            ));
        }
        let object = value
            .as_object()
            .ok_or_else(|| invalid(property, "an EmailBodyPart is an object"))?;
        let text = |name: &str| -> Result<Option<String>, Value> {
            match object.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(value) => Ok(Some(one_line(property, value)?.to_owned())),
            }
        };
        let mut kind = text("type")?.map(|kind| kind.to_ascii_lowercase());
        let charset = text("charset")?;
        let disposition = text("disposition")?;
        let name = text("name")?;
        let cid = text("cid")?;
        let location = text("location")?;
        let language: Option<Vec<String>> = match object.get("language") {
            None | Some(Value::Null) => None,
            Some(Value::Array(items)) => Some(
                items
                    .iter()
                    .map(|item| one_line(property, item).map(str::to_owned))
                    .collect::<Result<_, _>>()?,
            ),
            Some(_) => return Err(invalid(property, "language is a list of strings")),
        };
        for known in object.keys() {
            if !matches!(
                known.as_str(),
                "partId"
                    | "blobId"
                    | "type"
                    | "charset"
                    | "disposition"
                    | "name"
                    | "cid"
                    | "language"
                    | "location"
                    | "headers"
                    | "subParts"
                    | "size"
            ) && !known.starts_with("header:")
            {
                return Err(invalid(property, format!("an EmailBodyPart has no property {known}")));
            }
        }
        let mut headers = Headers::default();
        for (key, value) in object {
            if key == "headers" {
                headers.add_raw_list(property, value)?;
            } else if key.starts_with("header:") {
                headers.add_property(key, value)?;
            }
        }
        let contents: BodyPart<'static> = match (object.get("partId"), object.get("blobId"), object.get("subParts")) {
            (Some(part_id), None, None) => {
                let part_id = part_id
                    .as_str()
                    .ok_or_else(|| invalid(property, "partId is a string"))?;
                let kind = kind.get_or_insert_with(|| "text/plain".to_owned());
                if !kind.starts_with("text/") {
                    return Err(invalid(property, "a part with a partId is text/*"));
                }
                if charset
                    .as_deref()
                    .is_some_and(|charset| !charset.eq_ignore_ascii_case("utf-8"))
                {
                    return Err(invalid(property, "a part with a partId is UTF-8"));
                }
                BodyPart::Text(Cow::Owned(self.text_of(property, part_id)?))
            }
            (None, Some(blob_id), None) => {
                let blob_id = blob_id
                    .as_str()
                    .ok_or_else(|| invalid(property, "blobId is a string"))?;
                let bytes = (self.blobs)(blob_id)?.ok_or_else(|| {
                    let mut error = super::set_error("blobNotFound", format!("no blob {blob_id}"));
                    error["notFound"] = json!([blob_id]);
                    error
                })?;
                kind.get_or_insert_with(|| "application/octet-stream".to_owned());
                BodyPart::Binary(Cow::Owned(bytes))
            }
            (None, None, Some(sub_parts)) => {
                let sub_parts = sub_parts
                    .as_array()
                    .ok_or_else(|| invalid(property, "subParts is a list of EmailBodyPart"))?;
                let kind = kind.get_or_insert_with(|| "multipart/mixed".to_owned());
                if !kind.starts_with("multipart/") {
                    return Err(invalid(property, "a part with subParts is multipart/*"));
                }
                let mut parts = Vec::with_capacity(sub_parts.len());
                for sub_part in sub_parts {
                    parts.push(self.part(property, sub_part, depth + 1)?);
                }
                BodyPart::Multipart(parts)
            }
            _ => {
                return Err(invalid(
                    property,
                    "an EmailBodyPart has one of partId, blobId and subParts",
                ))
            }
        };
        let kind = kind.unwrap_or_default();
        if kind.starts_with("multipart/") != matches!(contents, BodyPart::Multipart(_)) {
            return Err(invalid(property, "only a part with subParts is multipart/*"));
        }
        if !kind.contains('/') || kind.contains([';', ' ', '"']) {
            return Err(invalid(property, format!("{kind:?} is not a media type")));
        }
        let mut content_type = ContentType::new(kind.clone());
        match (&contents, &charset) {
            (BodyPart::Text(_), _) => content_type = content_type.attribute("charset", "utf-8"),
            (_, Some(charset)) => content_type = content_type.attribute("charset", charset.clone()),
            _ => {}
        }
        if let (Some(name), false) = (&name, disposition.is_some()) {
            content_type = content_type.attribute("name", name.clone());
        }
        let mut part = MimePart {
            headers: vec![("Content-Type".into(), content_type.into())],
            contents,
        };
        if let Some(disposition) = disposition {
            let mut value = ContentType::new(disposition.to_ascii_lowercase());
            if let Some(name) = name {
                value = value.attribute("filename", name);
            }
            part.headers.push(("Content-Disposition".into(), value.into()));
        }
        if let Some(cid) = cid {
            part = part.cid(cid.trim_start_matches('<').trim_end_matches('>').to_owned());
        }
        if let Some(language) = language.filter(|language| !language.is_empty()) {
            part = part.language(language.join(", "));
        }
        if let Some(location) = location {
            part = part.location(location);
        }
        for (name, value) in headers.list {
            part.headers.push((name.into(), value));
        }
        Ok(part)
    }

    /// `textBody` or `htmlBody`: at most one part, of the given type.
    fn single(
        &mut self,
        object: &Map<String, Value>,
        property: &str,
        kind: &str,
    ) -> Result<Option<MimePart<'static>>, Value> {
        let parts = match object.get(property) {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Array(parts)) => parts,
            Some(_) => return Err(invalid(property, format!("{property} is a list of EmailBodyPart"))),
        };
        match parts.as_slice() {
            [] => Ok(None),
            [part] => {
                let given = part.get("type").and_then(Value::as_str).unwrap_or(kind);
                if !given.eq_ignore_ascii_case(kind) {
                    return Err(invalid(property, format!("the part of {property} is {kind}")));
                }
                let mut part = part.clone();
                if let Some(object) = part.as_object_mut() {
                    object.insert("type".into(), json!(kind));
                }
                Ok(Some(self.part(property, &part, 1)?))
            }
            _ => Err(invalid(property, format!("{property} has at most one part"))),
        }
    }
}

/// Reads one Email/set creation and writes its message; `Err` is the SetError.
pub fn build(object: &Value, blobs: &mut BlobLookup<'_>) -> Result<Draft, Value> {
    let object = object
        .as_object()
        .ok_or_else(|| super::set_error("invalidProperties", "a creation is an object"))?;
    let mut mailbox = None;
    let mut keywords = Vec::new();
    let mut received_millis = None;
    let mut headers = Headers::default();
    for (property, value) in object {
        match property.as_str() {
            "mailboxIds" => {
                let map = value
                    .as_object()
                    .ok_or_else(|| invalid(property, "mailboxIds is an object"))?;
                let mut chosen = Vec::new();
                for (id, present) in map {
                    if *present != Value::Bool(true) {
                        return Err(invalid(property, "a mailboxIds value is true"));
                    }
                    chosen.push(id.clone());
                }
                let [one] = <[String; 1]>::try_from(chosen).map_err(|_| {
                    invalid(
                        property,
                        "an email is in exactly one mailbox here (maxMailboxesPerEmail is 1)",
                    )
                })?;
                mailbox = Some(one);
            }
            "keywords" => {
                let map = value
                    .as_object()
                    .ok_or_else(|| invalid(property, "keywords is an object"))?;
                for (keyword, set) in map {
                    if *set != Value::Bool(true) {
                        return Err(invalid(property, format!("keyword {keyword} is not true")));
                    }
                    keywords.push(keyword.clone());
                }
            }
            "receivedAt" => {
                let text = one_line(property, value)?;
                let parsed = mail_parser::DateTime::parse_rfc3339(text)
                    .ok_or_else(|| invalid(property, "receivedAt is not a UTCDate"))?;
                received_millis = Some(
                    u64::try_from(parsed.to_timestamp())
                        .map_err(|_| invalid(property, "receivedAt is before 1970"))?
                        .saturating_mul(1000),
                );
            }
            "from" | "sender" | "replyTo" | "to" | "cc" | "bcc" => {
                let name = match property.as_str() {
                    "from" => "From",
                    "sender" => "Sender",
                    "replyTo" => "Reply-To",
                    "to" => "To",
                    "cc" => "Cc",
                    _ => "Bcc",
                };
                // Null or an empty list: no such header.
                if value.as_array().is_none_or(|list| !list.is_empty()) && !value.is_null() {
                    headers.add(property, name, address_list(property, value)?.into())?;
                }
            }
            "subject" => {
                if !value.is_null() {
                    headers.add(
                        property,
                        "Subject",
                        Text::new(one_line(property, value)?.to_owned()).into(),
                    )?;
                }
            }
            "sentAt" => {
                if !value.is_null() {
                    headers.add(property, "Date", date(property, value)?.into())?;
                }
            }
            "messageId" | "inReplyTo" | "references" => {
                let name = match property.as_str() {
                    "messageId" => "Message-ID",
                    "inReplyTo" => "In-Reply-To",
                    _ => "References",
                };
                if !value.is_null() {
                    headers.add(property, name, message_ids(property, value)?.into())?;
                }
            }
            "headers" => headers.add_raw_list(property, value)?,
            "bodyStructure" | "textBody" | "htmlBody" | "attachments" | "bodyValues" => {}
            other if other.starts_with("header:") => headers.add_property(other, value)?,
            other if SERVER_SET.contains(&other) => {
                return Err(invalid(other, format!("{other} is set by the server")));
            }
            other => return Err(invalid(other, format!("an Email has no property {other} to create"))),
        }
    }
    let mailbox = mailbox.ok_or_else(|| invalid("mailboxIds", "mailboxIds is missing"))?;
    let values = match object.get("bodyValues") {
        None | Some(Value::Null) => None,
        Some(Value::Object(values)) => Some(values),
        Some(_) => return Err(invalid("bodyValues", "bodyValues is an object")),
    };
    let mut reader = BodyReader {
        values,
        blobs,
        parts: 0,
    };
    let structure = object.get("bodyStructure").filter(|value| !value.is_null());
    let body = match structure {
        Some(structure) => {
            if ["textBody", "htmlBody", "attachments"]
                .iter()
                .any(|name| object.get(*name).is_some_and(|value| !value.is_null()))
            {
                return Err(invalid(
                    "bodyStructure",
                    "bodyStructure or textBody/htmlBody/attachments, not both",
                ));
            }
            reader.part("bodyStructure", structure, 1)?
        }
        None => {
            let text = reader.single(object, "textBody", "text/plain")?;
            let html = reader.single(object, "htmlBody", "text/html")?;
            let attachments = match object.get("attachments") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .map(|part| reader.part("attachments", part, 1))
                    .collect::<Result<_, _>>()?,
                Some(_) => return Err(invalid("attachments", "attachments is a list of EmailBodyPart")),
            };
            let main = match (text, html) {
                (Some(text), Some(html)) => Some(MimePart::new("multipart/alternative", vec![text, html])),
                (Some(one), None) | (None, Some(one)) => Some(one),
                (None, None) => None,
            };
            match (main, attachments.is_empty()) {
                (Some(main), true) => main,
                (Some(main), false) => {
                    let mut parts = vec![main];
                    parts.extend(attachments);
                    MimePart::new("multipart/mixed", parts)
                }
                (None, false) => MimePart::new("multipart/mixed", attachments),
                (None, true) => MimePart::new("text/plain", String::new()),
            }
        }
    };
    let mut builder = MessageBuilder::new();
    for (name, value) in headers.list {
        builder = builder.header(name, value);
    }
    let raw = builder.body(body).write_to_vec().map_err(|error| {
        super::set_error(
            "invalidProperties",
            format!("the message could not be written: {error}"),
        )
    })?;
    Ok(Draft {
        raw,
        mailbox,
        keywords,
        received_millis,
    })
}
