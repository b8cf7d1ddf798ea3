//! What Email/get and Email/parse read out of a parsed message (RFC 8621 §4.1): the header
//! properties in each of their forms, the body parts (bodyStructure, textBody, htmlBody,
//! attachments) and their values. The MIME work is mail-parser's: it splits the parts, decodes
//! transfer encodings and charsets (a text part's value is UTF-8, whatever its charset was), and
//! picks textBody, htmlBody and attachments the way RFC 8621 §4.1.4 describes; this module only
//! shapes what it found into JMAP objects.
//!
//! A part's blobId is `P`, the blobId of the message it is in, `-` and the part's index in the
//! message (the `partId`), so a download can find the message again and cut the part out of it:
//! its bytes are the part's decoded content.

use serde_json::{json, Map, Value};

use mail_parser::{Address, HeaderValue, Message, MessagePart, MimeHeaders, PartType};

use super::method_error;

/// The blobId prefix of a body part.
pub const PART_BLOB_PREFIX: &str = "P";

/// The EmailBodyPart properties served.
pub const BODY_PROPERTIES: &[&str] = &[
    "partId",
    "blobId",
    "size",
    "headers",
    "name",
    "type",
    "charset",
    "disposition",
    "cid",
    "language",
    "location",
    "subParts",
];

/// The Email properties this module answers.
pub const BODY_EMAIL_PROPERTIES: &[&str] = &["bodyStructure", "textBody", "htmlBody", "attachments", "bodyValues"];

/// How a header property is asked for (RFC 8621 §4.1.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderForm {
    Raw,
    Text,
    Addresses,
    GroupedAddresses,
    MessageIds,
    Date,
    Urls,
}

/// A `header:Name[:asForm][:all]` property, split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderProperty<'a> {
    pub name: &'a str,
    pub form: HeaderForm,
    pub all: bool,
}

/// The forms RFC 8621 §4.1.3 allows for a header it knows; `None` for any other header (every
/// form is allowed then).
fn allowed_forms(name: &str) -> Option<&'static [HeaderForm]> {
    use HeaderForm::*;
    let lower = name.to_ascii_lowercase();
    Some(match lower.as_str() {
        "subject" | "comments" | "keywords" | "list-id" => &[Raw, Text],
        "from" | "sender" | "reply-to" | "to" | "cc" | "bcc" | "resent-from" | "resent-sender" | "resent-reply-to"
        | "resent-to" | "resent-cc" | "resent-bcc" => &[Raw, Addresses, GroupedAddresses],
        "date" | "resent-date" => &[Raw, Date],
        "message-id" | "in-reply-to" | "references" | "resent-message-id" => &[Raw, MessageIds],
        "list-help" | "list-unsubscribe" | "list-subscribe" | "list-post" | "list-owner" | "list-archive" => {
            &[Raw, Urls]
        }
        _ => return None,
    })
}

/// Reads a `header:` property; refused (invalidArguments) when it names no header, a form that
/// does not exist, or a form RFC 8621 does not allow for that header.
pub fn parse_header_property(property: &str) -> Result<HeaderProperty<'_>, Value> {
    let invalid = |why: &str| method_error("invalidArguments", format!("{property}: {why}"));
    let rest = property
        .strip_prefix("header:")
        .ok_or_else(|| invalid("not a header property"))?;
    let mut parts = rest.split(':');
    let name = parts.next().unwrap_or_default();
    if name.is_empty() || !name.bytes().all(|byte| byte.is_ascii_graphic() && byte != b':') {
        return Err(invalid("names no header"));
    }
    let mut form = None;
    let mut all = false;
    for part in parts {
        if all {
            return Err(invalid(":all comes last"));
        }
        let asked = match part {
            "all" => {
                all = true;
                continue;
            }
            "asRaw" => HeaderForm::Raw,
            "asText" => HeaderForm::Text,
            "asAddresses" => HeaderForm::Addresses,
            "asGroupedAddresses" => HeaderForm::GroupedAddresses,
            "asMessageIds" => HeaderForm::MessageIds,
            "asDate" => HeaderForm::Date,
            "asURLs" => HeaderForm::Urls,
            _ => {
                return Err(invalid(
                    "unknown form (asRaw, asText, asAddresses, asGroupedAddresses, asMessageIds, asDate, asURLs)",
                ))
            }
        };
        if form.replace(asked).is_some() {
            return Err(invalid("one form at most"));
        }
    }
    let form = form.unwrap_or(HeaderForm::Raw);
    if allowed_forms(name).is_some_and(|allowed| !allowed.contains(&form)) {
        return Err(invalid("RFC 8621 does not allow this form for this header"));
    }
    Ok(HeaderProperty { name, form, all })
}

fn address_object(address: &mail_parser::Addr<'_>) -> Value {
    listed_address_object(&crate::mail::ListedAddress::of(address))
}

fn listed_address_object(address: &crate::mail::ListedAddress) -> Value {
    json!({ "name": address.name, "email": address.email })
}

/// EmailAddress objects, groups flattened; null when there is no address header.
pub fn addresses(address: Option<&Address<'_>>) -> Value {
    kept_addresses(&crate::mail::addresses_of(address)).unwrap_or(Value::Null)
}

/// The EmailAddress objects of addresses a listing kept; `None` when it kept none.
pub fn kept_addresses(kept: &crate::mail::KeptAddresses) -> Option<Value> {
    match kept {
        crate::mail::KeptAddresses::Unknown => None,
        crate::mail::KeptAddresses::Absent => Some(Value::Null),
        crate::mail::KeptAddresses::List(list) => Some(Value::Array(list.iter().map(listed_address_object).collect())),
    }
}

fn grouped_addresses(address: Option<&Address<'_>>) -> Value {
    match address {
        None => Value::Null,
        Some(Address::List(list)) => {
            json!([{ "name": null, "addresses": list.iter().map(address_object).collect::<Vec<_>>() }])
        }
        Some(Address::Group(groups)) => Value::Array(
            groups
                .iter()
                .map(|group| {
                    json!({
                        "name": group.name.as_deref(),
                        "addresses": group.addresses.iter().map(address_object).collect::<Vec<_>>(),
                    })
                })
                .collect(),
        ),
    }
}

fn message_ids(value: &HeaderValue<'_>) -> Value {
    let ids: Vec<&str> = match value {
        HeaderValue::Text(text) => vec![text.as_ref()],
        HeaderValue::TextList(list) => list.iter().map(|item| item.as_ref()).collect(),
        _ => Vec::new(),
    };
    if ids.is_empty() {
        Value::Null
    } else {
        json!(ids)
    }
}

fn urls(value: &HeaderValue<'_>) -> Value {
    match value {
        HeaderValue::Address(address) => {
            let list: Vec<&str> = match address {
                Address::List(list) => list.iter().filter_map(|addr| addr.address()).collect(),
                Address::Group(groups) => groups
                    .iter()
                    .flat_map(|group| group.addresses.iter())
                    .filter_map(|addr| addr.address())
                    .collect(),
            };
            json!(list)
        }
        _ => Value::Null,
    }
}

/// One header value, in a form, from its raw bytes (what follows the colon, up to and with the
/// line end: mail-parser's field parsers stop there).
fn header_form(raw: &[u8], form: HeaderForm) -> Value {
    use mail_parser::parsers::MessageStream;
    match form {
        HeaderForm::Raw => json!(String::from_utf8_lossy(without_line_end(raw))),
        HeaderForm::Text => match MessageStream::new(raw).parse_unstructured() {
            HeaderValue::Text(text) => json!(text.trim()),
            _ => json!(""),
        },
        HeaderForm::Addresses => match MessageStream::new(raw).parse_address() {
            HeaderValue::Address(address) => addresses(Some(&address)),
            _ => json!([]),
        },
        HeaderForm::GroupedAddresses => match MessageStream::new(raw).parse_address() {
            HeaderValue::Address(address) => grouped_addresses(Some(&address)),
            _ => json!([]),
        },
        HeaderForm::MessageIds => message_ids(&MessageStream::new(raw).parse_id()),
        HeaderForm::Date => match MessageStream::new(raw).parse_date() {
            HeaderValue::DateTime(date) if date.is_valid() => json!(date.to_rfc3339()),
            _ => Value::Null,
        },
        HeaderForm::Urls => urls(&MessageStream::new(raw).parse_address()),
    }
}

/// A header's value bytes as stored, less the CRLF that ends the field (RFC 8621 §4.1.2.1).
fn without_line_end(raw: &[u8]) -> &[u8] {
    raw.strip_suffix(b"\r\n")
        .or_else(|| raw.strip_suffix(b"\n"))
        .unwrap_or(raw)
}

/// The raw value bytes of each header of a part named `name` (any case), in order.
fn raw_values<'m>(message: &'m Message<'_>, part: &MessagePart<'_>, name: &str) -> Vec<&'m [u8]> {
    part.headers
        .iter()
        .filter(|header| header.name.as_str().eq_ignore_ascii_case(name))
        .filter_map(|header| {
            message
                .raw_message
                .get(header.offset_start as usize..header.offset_end as usize)
        })
        .collect()
}

/// A `header:` property of a part (the message's own headers for part 0).
fn header_property_of(message: &Message<'_>, part: &MessagePart<'_>, header: &HeaderProperty<'_>) -> Value {
    let values = raw_values(message, part, header.name);
    if header.all {
        Value::Array(values.into_iter().map(|raw| header_form(raw, header.form)).collect())
    } else {
        values
            .last()
            .map(|raw| header_form(raw, header.form))
            .unwrap_or(Value::Null)
    }
}

/// A `header:` property of the message.
pub fn header_value(message: &Message<'_>, header: &HeaderProperty<'_>) -> Value {
    match message.parts.first() {
        Some(root) => header_property_of(message, root, header),
        None => Value::Null,
    }
}

/// Every header of a part as EmailHeader objects (name as written, raw value).
fn headers_of(message: &Message<'_>, part: &MessagePart<'_>) -> Value {
    Value::Array(
        part.headers
            .iter()
            .map(|header| {
                let value = message
                    .raw_message
                    .get(header.offset_start as usize..header.offset_end as usize)
                    .map(|raw| String::from_utf8_lossy(without_line_end(raw)))
                    .unwrap_or_default();
                json!({ "name": header.name.as_str(), "value": value })
            })
            .collect(),
    )
}

/// The `headers` property of the message.
pub fn message_headers(message: &Message<'_>) -> Value {
    match message.parts.first() {
        Some(root) => headers_of(message, root),
        None => json!([]),
    }
}

/// What Email/get and Email/parse were asked about bodies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BodyOptions {
    pub properties: Vec<String>,
    pub fetch_text: bool,
    pub fetch_html: bool,
    pub fetch_all: bool,
    /// 0: no limit.
    pub max_bytes: usize,
}

/// Reads bodyProperties, fetchTextBodyValues, fetchHTMLBodyValues, fetchAllBodyValues and
/// maxBodyValueBytes.
pub fn body_options(arguments: &Map<String, Value>) -> Result<BodyOptions, Value> {
    let properties = match arguments.get("bodyProperties") {
        // RFC 8621 §4.2's default: all but headers and subParts.
        None | Some(Value::Null) => BODY_PROPERTIES
            .iter()
            .filter(|name| !matches!(**name, "headers" | "subParts"))
            .map(|name| (*name).to_owned())
            .collect(),
        Some(Value::Array(items)) => {
            let mut properties = Vec::with_capacity(items.len());
            for item in items {
                let name = item
                    .as_str()
                    .ok_or_else(|| method_error("invalidArguments", "bodyProperties holds a non-string"))?;
                if name.starts_with("header:") {
                    parse_header_property(name)?;
                } else if !BODY_PROPERTIES.contains(&name) {
                    return Err(method_error(
                        "invalidArguments",
                        format!("unknown body property {name}"),
                    ));
                }
                properties.push(name.to_owned());
            }
            properties
        }
        Some(_) => return Err(method_error("invalidArguments", "bodyProperties is not an array")),
    };
    Ok(BodyOptions {
        properties,
        fetch_text: super::flag_argument(arguments, "fetchTextBodyValues")?,
        fetch_html: super::flag_argument(arguments, "fetchHTMLBodyValues")?,
        fetch_all: super::flag_argument(arguments, "fetchAllBodyValues")?,
        max_bytes: super::optional_count(arguments, "maxBodyValueBytes")?.unwrap_or(0) as usize,
    })
}

fn part_type(part: &MessagePart<'_>) -> String {
    match part.content_type() {
        Some(content_type) => match content_type.subtype() {
            Some(subtype) => format!("{}/{}", content_type.ctype(), subtype).to_ascii_lowercase(),
            None => content_type.ctype().to_ascii_lowercase(),
        },
        None => match part.body {
            PartType::Message(_) => "message/rfc822".to_owned(),
            PartType::Multipart(_) => "multipart/mixed".to_owned(),
            PartType::Html(_) => "text/html".to_owned(),
            _ => "text/plain".to_owned(),
        },
    }
}

/// A part's decoded content: UTF-8 text for text parts, the bytes for others, the message's
/// bytes for an attached message.
fn part_contents<'p>(part: &'p MessagePart<'_>) -> &'p [u8] {
    match &part.body {
        PartType::Text(text) | PartType::Html(text) => text.as_bytes(),
        PartType::Binary(bytes) | PartType::InlineBinary(bytes) => bytes,
        PartType::Message(message) => &message.raw_message,
        PartType::Multipart(_) => &[],
    }
}

/// The most levels of multiparts bodyStructure follows.
const MAX_PART_DEPTH: usize = 32;

/// One EmailBodyPart object.
fn body_part(
    message: &Message<'_>,
    blob_of: &str,
    index: usize,
    properties: &[String],
    with_sub_parts: bool,
    depth: usize,
) -> Value {
    let Some(part) = message.parts.get(index) else {
        return Value::Null;
    };
    let multipart = matches!(part.body, PartType::Multipart(_));
    let mut object = Map::new();
    for property in properties {
        let value = match property.as_str() {
            "partId" if multipart => Value::Null,
            "partId" => json!(index.to_string()),
            "blobId" if multipart => Value::Null,
            "blobId" => json!(format!("{PART_BLOB_PREFIX}{blob_of}-{index}")),
            "size" => json!(if multipart { 0 } else { part_contents(part).len() }),
            "headers" => headers_of(message, part),
            "name" => part.attachment_name().map(Value::from).unwrap_or(Value::Null),
            "type" => json!(part_type(part)),
            "charset" => match part
                .content_type()
                .and_then(|content_type| content_type.attribute("charset"))
            {
                Some(charset) => json!(charset),
                None if part_type(part).starts_with("text/") => json!("us-ascii"),
                None => Value::Null,
            },
            "disposition" => part
                .content_disposition()
                .map(|disposition| json!(disposition.ctype().to_ascii_lowercase()))
                .unwrap_or(Value::Null),
            "cid" => part
                .content_id()
                .map(|cid| json!(cid.trim().trim_start_matches('<').trim_end_matches('>')))
                .unwrap_or(Value::Null),
            "language" => match part.content_language() {
                HeaderValue::Text(text) => json!([text]),
                HeaderValue::TextList(list) => json!(list),
                _ => Value::Null,
            },
            "location" => part.content_location().map(Value::from).unwrap_or(Value::Null),
            "subParts" => {
                if !with_sub_parts {
                    continue;
                }
                match &part.body {
                    PartType::Multipart(children) if depth < MAX_PART_DEPTH => Value::Array(
                        children
                            .iter()
                            .map(|child| body_part(message, blob_of, *child as usize, properties, true, depth + 1))
                            .collect(),
                    ),
                    PartType::Multipart(_) => json!([]),
                    _ => Value::Null,
                }
            }
            header if header.starts_with("header:") => match parse_header_property(header) {
                Ok(header) => header_property_of(message, part, &header),
                Err(_) => Value::Null,
            },
            _ => continue,
        };
        object.insert(property.clone(), value);
    }
    // RFC 8621: subParts is there for every multipart of bodyStructure.
    if with_sub_parts && multipart && !object.contains_key("subParts") {
        let mut with = properties.to_vec();
        with.push("subParts".to_owned());
        return body_part(message, blob_of, index, &with, true, depth);
    }
    Value::Object(object)
}

fn part_list(message: &Message<'_>, blob_of: &str, indexes: &[u32], properties: &[String]) -> Value {
    Value::Array(
        indexes
            .iter()
            .map(|index| body_part(message, blob_of, *index as usize, properties, false, 0))
            .collect(),
    )
}

/// A text part's value, cut to `max_bytes` (0: whole) on a character boundary.
fn body_value(part: &MessagePart<'_>, max_bytes: usize) -> Option<Value> {
    let text = match &part.body {
        PartType::Text(text) | PartType::Html(text) => text.as_ref(),
        _ => return None,
    };
    let mut end = text.len();
    if max_bytes > 0 && end > max_bytes {
        end = max_bytes;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
    }
    Some(json!({
        "value": &text[..end],
        "isEncodingProblem": part.is_encoding_problem,
        "isTruncated": end < text.len(),
    }))
}

/// One of bodyStructure, textBody, htmlBody, attachments and bodyValues; `blob_of` is the blobId
/// of the message the parts are in.
pub fn body_property(message: &Message<'_>, blob_of: &str, property: &str, options: &BodyOptions) -> Value {
    match property {
        "bodyStructure" => body_part(message, blob_of, 0, &options.properties, true, 0),
        "textBody" => part_list(message, blob_of, &message.text_body, &options.properties),
        "htmlBody" => part_list(message, blob_of, &message.html_body, &options.properties),
        "attachments" => part_list(message, blob_of, &message.attachments, &options.properties),
        "bodyValues" => {
            let mut wanted: Vec<u32> = Vec::new();
            if options.fetch_all {
                wanted.extend((0..message.parts.len() as u32).filter(|index| {
                    matches!(
                        message.parts[*index as usize].body,
                        PartType::Text(_) | PartType::Html(_)
                    )
                }));
            }
            if options.fetch_text {
                wanted.extend(&message.text_body);
            }
            if options.fetch_html {
                wanted.extend(&message.html_body);
            }
            let mut values = Map::new();
            for index in wanted {
                if let Some(value) = message
                    .parts
                    .get(index as usize)
                    .and_then(|part| body_value(part, options.max_bytes))
                {
                    values.insert(index.to_string(), value);
                }
            }
            Value::Object(values)
        }
        _ => Value::Null,
    }
}

/// The decoded content and type of part `index` of a message.
pub fn part_blob(raw: &[u8], index: usize) -> Option<(Vec<u8>, String)> {
    let message = mail_parser::MessageParser::default().parse(raw)?;
    let part = message.parts.get(index)?;
    if matches!(part.body, PartType::Multipart(_)) {
        return None;
    }
    Some((part_contents(part).to_vec(), part_type(part)))
}

/// Splits a part's blobId into the blobId of its message and the part's index.
pub fn split_part_blob_id(blob_id: &str) -> Option<(&str, usize)> {
    let (message, index) = blob_id.strip_prefix(PART_BLOB_PREFIX)?.rsplit_once('-')?;
    if message.is_empty() || index.is_empty() || index.len() > 6 || (index.len() > 1 && index.starts_with('0')) {
        return None;
    }
    Some((message, index.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::{body_options, body_property, header_value, parse_header_property, split_part_blob_id, HeaderForm};
    use serde_json::json;

    const MIXED: &[u8] = b"From: Carol <carol@example.net>\r\nTo: \"A\" <a@example.org>, b@example.org\r\nSubject: =?utf-8?q?Caf=C3=A9?= plan\r\nDate: Mon, 1 Jun 2026 10:00:00 +0200\r\nMessage-ID: <m1@example.net>\r\nList-Unsubscribe: <mailto:u@example.net>, <https://example.net/u>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n--b1\r\nContent-Type: multipart/alternative; boundary=\"b2\"\r\n\r\n--b2\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHello plain\r\n--b2\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>Hello html</p>\r\n--b2--\r\n--b1\r\nContent-Type: application/pdf; name=\"plan.pdf\"\r\nContent-Disposition: attachment; filename=\"plan.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\nJVBERi0=\r\n--b1--\r\n";

    #[test]
    fn header_forms_parse_what_rfc_8621_allows() {
        let message = mail_parser::MessageParser::default().parse(MIXED).unwrap();
        let value = |property: &str| header_value(&message, &parse_header_property(property).unwrap());
        assert_eq!(value("header:Subject:asText"), json!("Café plan"));
        assert_eq!(
            value("header:to:asAddresses"),
            json!([{"name": "A", "email": "a@example.org"}, {"name": null, "email": "b@example.org"}])
        );
        assert_eq!(value("header:Message-ID:asMessageIds"), json!(["m1@example.net"]));
        assert_eq!(value("header:Date:asDate"), json!("2026-06-01T10:00:00+02:00"));
        assert_eq!(
            value("header:List-Unsubscribe:asURLs"),
            json!(["mailto:u@example.net", "https://example.net/u"])
        );
        assert_eq!(value("header:X-None:all"), json!([]));
        assert_eq!(value("header:From:asAddresses:all").as_array().unwrap().len(), 1);
        assert_eq!(
            parse_header_property("header:X-Any:asDate").unwrap().form,
            HeaderForm::Date
        );
        for refused in [
            "header:From:asDate",
            "header:Subject:asAddresses",
            "header:",
            "header:X:asNothing",
            "header:X:all:asRaw",
            "header:X:asRaw:asText",
        ] {
            assert!(parse_header_property(refused).is_err(), "{refused}");
        }
    }

    #[test]
    fn body_parts_values_and_part_blobs() {
        let message = mail_parser::MessageParser::default().parse(MIXED).unwrap();
        let options = body_options(
            json!({"fetchTextBodyValues": true, "fetchHTMLBodyValues": true, "maxBodyValueBytes": 5})
                .as_object()
                .unwrap(),
        )
        .unwrap();
        let structure = body_property(&message, "Mx", "bodyStructure", &options);
        assert_eq!(structure["type"], "multipart/mixed");
        assert_eq!(structure["partId"], json!(null));
        assert_eq!(structure["subParts"][0]["type"], "multipart/alternative");
        assert_eq!(structure["subParts"][1]["name"], "plan.pdf");
        assert_eq!(structure["subParts"][1]["disposition"], "attachment");
        let text = body_property(&message, "Mx", "textBody", &options);
        assert_eq!(text[0]["type"], "text/plain");
        let html = body_property(&message, "Mx", "htmlBody", &options);
        assert_eq!(html[0]["type"], "text/html");
        let attachments = body_property(&message, "Mx", "attachments", &options);
        assert_eq!(attachments[0]["size"], 5, "decoded %PDF-");
        let part = attachments[0]["blobId"].as_str().unwrap();
        let (of, index) = split_part_blob_id(part).unwrap();
        assert_eq!(of, "Mx");
        assert_eq!(
            super::part_blob(MIXED, index).unwrap(),
            (b"%PDF-".to_vec(), "application/pdf".to_owned())
        );
        let values = body_property(&message, "Mx", "bodyValues", &options);
        let text_id = text[0]["partId"].as_str().unwrap();
        assert_eq!(
            values[text_id],
            json!({"value": "Hello", "isEncodingProblem": false, "isTruncated": true})
        );
        assert_eq!(values.as_object().unwrap().len(), 2);
        for bad in ["P", "PMx", "PMx-", "PMx-01", "Mx-1"] {
            assert!(split_part_blob_id(bad).is_none(), "{bad}");
        }
    }
}
