//! JMAP Email objects (RFC 8621 §4): Email/get, /query, /changes, /set, /import, /copy and
//! /parse, over the mail service.
//!
//! What is served and what is not, so the capability object and the README can say it:
//! - Email/get: id, blobId, threadId, mailboxIds, keywords, size, receivedAt, subject, sentAt,
//!   from, to, cc, bcc, replyTo, sender, messageId, inReplyTo, references, hasAttachment,
//!   preview, headers, the body properties (bodyStructure, textBody, htmlBody, attachments and
//!   bodyValues, with bodyProperties, fetchTextBodyValues, fetchHTMLBodyValues,
//!   fetchAllBodyValues and maxBodyValueBytes) and `header:Name` in every form of RFC 8621
//!   §4.1.2 (asRaw, asText, asAddresses, asGroupedAddresses, asMessageIds, asDate, asURLs, with
//!   `:all`), shaped in [`super::body`]. The list properties come from the service's listing;
//!   the others parse the message, so they cost a read of its bytes.
//! - threadId is computed from the email's own References, In-Reply-To, Message-ID and subject
//!   ([`crate::service::threads`]), so it is the same on every node; Thread/get and
//!   Thread/changes are in [`super::thread`].
//! - Email/query: the filter conditions inMailbox, inMailboxOtherThan, text, from, to, cc, bcc,
//!   subject, body, header, before, after, minSize, maxSize, hasAttachment, hasKeyword and
//!   notKeyword under AND, OR and NOT; sorts by receivedAt, sentAt, size, from, subject (one of
//!   them alone is the store's sort index), to, hasKeyword, allInThreadHaveKeyword and
//!   someInThreadHaveKeyword, several comparators in order (sorted here, [`sort_here`]);
//!   collapseThreads ([`collapse`], on the node's thread index); position (negative too),
//!   `anchor` with `anchorOffset`, limit and calculateTotal. Collations get `unsupportedSort`.
//!   `inMailbox` is answered near the data by the service and only at the
//!   filter's top level (or directly under a top-level AND); so is `text` there, through the
//!   full-text index. Every other condition is checked here on each listed email, at most
//!   [`MAX_FILTER_SCAN`] emails per query: from and subject as the listing holds them; to, cc,
//!   bcc, body, header, hasAttachment and a `text` deeper in the tree by reading the message
//!   (substrings, without regard to case; text looks in From, To, Cc, Bcc, Subject and the body
//!   text). Without `inMailbox` every mailbox's window is merged here. An anchor in an
//!   `inMailbox` query without other conditions is placed by the service in O(log n); otherwise
//!   it is looked for in the results (the first [`MAX_ANCHOR_SCAN`] of an unfiltered one).
//! - Email/queryChanges ([`query_changes`]) for an `inMailbox` query without text
//!   (`canCalculateChanges` says which queries), from the portable change feed; other queries get
//!   cannotCalculateChanges. `upToId` is checked and ignored, as RFC 8620 §5.6 says for a filter
//!   on a mutable property (inMailbox).
//! - Email/changes reads the account's portable change feed: its states are accepted by every
//!   node of the cluster.
//! - Email/set: keywords (whole or as patches), mailboxIds (a move: an email is in exactly one
//!   mailbox), destroy, and create from properties ([`super::create`] writes the message);
//!   Email/import stores an uploaded blob.
//! - Email/copy ([`copy`]) answers the errors RFC 8620 §5.4 gives when there is no second
//!   account to copy from; Email/parse ([`parse`]) reads uploaded blobs into Email objects.
//!
//! Keywords map to IMAP flags: `$seen` is `\Seen`, `$answered` `\Answered`, `$flagged`
//! `\Flagged`, `$draft` `\Draft`; `\Deleted` is not shown (JMAP destroys instead); other
//! keywords are IMAP keywords, compared without regard to case as JMAP requires.

use std::collections::BTreeSet;

use serde_json::{json, Map, Value};

use crate::model::{Flag, MailboxId, MessageId};
use crate::service::{Delivery, Email, MailService, Query, ServiceError, SortKey};

use super::blobs;
use super::mailbox;
use super::{
    check_in_state, check_set_size, file_update, flag_argument, ids_argument, max_changes_argument, method_error,
    object_argument, optional_count, parse_filter, properties_argument, query_changes_response, query_window,
    required_string, service_error, set_error, FilterTree, Jmap, MethodResult, QueryWindow, SetOutcome,
    MAX_OBJECTS_IN_GET, MAX_OBJECTS_IN_SET,
};

/// The sorts Email/query serves, as advertised in `emailQuerySortOptions`.
pub const SORT_OPTIONS: [&str; 9] = [
    "receivedAt",
    "sentAt",
    "size",
    "from",
    "subject",
    "to",
    "hasKeyword",
    "allInThreadHaveKeyword",
    "someInThreadHaveKeyword",
];
/// The most comparators one Email/query may give.
const MAX_COMPARATORS: usize = 8;
/// The most ids one Email/query returns; a larger `limit` is cut to it (and said so).
pub const MAX_QUERY_LIMIT: usize = MAX_OBJECTS_IN_GET;
/// The most changes one Email/changes lists when the client sets no `maxChanges`.
pub const DEFAULT_MAX_CHANGES: usize = 500;
/// The characters of `preview`.
const PREVIEW_CHARACTERS: usize = 256;

const PROPERTIES: &[&str] = &[
    "id",
    "blobId",
    "threadId",
    "mailboxIds",
    "keywords",
    "size",
    "receivedAt",
    "messageId",
    "inReplyTo",
    "references",
    "sender",
    "from",
    "to",
    "cc",
    "bcc",
    "replyTo",
    "subject",
    "sentAt",
    "hasAttachment",
    "preview",
    "headers",
    "bodyStructure",
    "textBody",
    "htmlBody",
    "attachments",
    "bodyValues",
];

/// Properties answered from the listing alone, without reading the message's bytes.
const LISTING_PROPERTIES: &[&str] = &[
    "id",
    "blobId",
    "mailboxIds",
    "keywords",
    "size",
    "receivedAt",
    "subject",
    "sentAt",
];

/// A UTCDate (RFC 8620 §1.4): RFC 3339 in UTC, fractional seconds only when not zero.
pub fn utc_date(millis: u64) -> String {
    crate::api::rfc3339(millis).replace(".000Z", "Z")
}

/// An email id from outside, if it is one.
pub fn parse_email_id(id: &str) -> Option<MessageId> {
    if id.len() != 26 {
        return None;
    }
    id.parse().ok()
}

/// The JMAP keyword of an IMAP flag; `\Deleted` has none.
pub fn keyword_of(flag: &Flag) -> Option<String> {
    Some(match flag {
        Flag::Seen => "$seen".to_owned(),
        Flag::Answered => "$answered".to_owned(),
        Flag::Flagged => "$flagged".to_owned(),
        Flag::Draft => "$draft".to_owned(),
        Flag::Deleted => return None,
        Flag::Keyword(keyword) => keyword.to_ascii_lowercase(),
    })
}

/// The IMAP flag a JMAP keyword is stored as.
pub fn flag_of(keyword: &str) -> Result<Flag, ServiceError> {
    Ok(match keyword.to_ascii_lowercase().as_str() {
        "$seen" => Flag::Seen,
        "$answered" => Flag::Answered,
        "$flagged" => Flag::Flagged,
        "$draft" => Flag::Draft,
        _ if keyword.starts_with('\\') => {
            return Err(ServiceError::Invalid(format!("{keyword} is not a JMAP keyword")));
        }
        lower => lower.parse::<Flag>()?,
    })
}

fn keywords_object(flags: &[Flag]) -> Value {
    let mut keywords = Map::new();
    for keyword in flags.iter().filter_map(keyword_of) {
        keywords.insert(keyword, Value::Bool(true));
    }
    Value::Object(keywords)
}

fn email_blob_id(id: MessageId) -> String {
    format!("{}{id}", blobs::EMAIL_BLOB_PREFIX)
}

/// The part of an email object answered from the listing.
fn listing_value(email: &Email, property: &str) -> Result<Value, ServiceError> {
    Ok(match property {
        "id" => json!(email.id.to_string()),
        "blobId" => json!(email_blob_id(email.id)),
        "mailboxIds" => json!({ email.mailbox.to_string(): true }),
        "keywords" => keywords_object(&email.flags),
        "size" => json!(email.size),
        "receivedAt" => json!(utc_date(email.received_millis)),
        "subject" => json!(email.subject),
        "sentAt" => email
            .date_millis
            .map(utc_date)
            .map(Value::String)
            .unwrap_or(Value::Null),
        _ => Value::Null,
    })
}

fn text_list(value: &mail_parser::HeaderValue<'_>) -> Value {
    match value.as_text_list() {
        Some(items) if !items.is_empty() => json!(items.iter().map(|item| item.as_ref()).collect::<Vec<&str>>()),
        _ => Value::Null,
    }
}

use super::body::addresses;
pub use super::body::{parse_header_property, HeaderProperty};

/// The part of an email object that needs the parsed message; `blob_of` is the blobId of the
/// message's bytes (the parts' blobIds are made from it).
pub(crate) fn message_value(
    message: &mail_parser::Message<'_>,
    property: &str,
    blob_of: &str,
    options: &super::body::BodyOptions,
) -> Value {
    match property {
        "from" => addresses(message.from()),
        "to" => addresses(message.to()),
        "cc" => addresses(message.cc()),
        "bcc" => addresses(message.bcc()),
        "replyTo" => addresses(message.reply_to()),
        "sender" => addresses(message.sender()),
        "messageId" => message.message_id().map(|id| json!([id])).unwrap_or(Value::Null),
        "inReplyTo" => text_list(message.in_reply_to()),
        "references" => text_list(message.references()),
        "hasAttachment" => json!(message.attachment_count() > 0),
        "headers" => super::body::message_headers(message),
        // White space runs (line breaks too) shown as one space, as a preview line wants.
        "preview" => json!(message
            .body_preview(PREVIEW_CHARACTERS)
            .map(|preview| preview.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()),
        "subject" => message
            .subject()
            .map(|subject| json!(subject.trim()))
            .unwrap_or(Value::Null),
        "sentAt" => message
            .date()
            .filter(|date| date.is_valid())
            .map(|date| json!(date.to_rfc3339()))
            .unwrap_or(Value::Null),
        body if super::body::BODY_EMAIL_PROPERTIES.contains(&body) => {
            super::body::body_property(message, blob_of, body, options)
        }
        _ => match parse_header_property(property) {
            Ok(header) => super::body::header_value(message, &header),
            Err(_) => Value::Null,
        },
    }
}

/// The properties Email/get serves when the client names none (RFC 8621 §4.2's default: all
/// but headers and bodyStructure).
fn default_properties() -> Vec<String> {
    PROPERTIES
        .iter()
        .filter(|name| !matches!(**name, "headers" | "bodyStructure"))
        .map(|name| (*name).to_owned())
        .collect()
}

/// Email/get (RFC 8620 §5.1, RFC 8621 §4.2).
pub fn get(service: &MailService, account: &str, arguments: &Map<String, Value>) -> MethodResult {
    let Some(ids) = ids_argument(arguments)? else {
        return Err(method_error(
            "requestTooLarge",
            "Email/get needs ids: find them with Email/query",
        ));
    };
    let mut properties = properties_argument(arguments, PROPERTIES)?.unwrap_or_else(default_properties);
    for property in properties.iter().filter(|property| property.starts_with("header:")) {
        parse_header_property(property)?;
    }
    if !properties.iter().any(|property| property == "id") {
        properties.insert(0, "id".to_owned());
    }
    let options = super::body::body_options(arguments)?;
    let state = service.account_state(account).map_err(service_error)?;
    // Everything but the body parts is in the header, so a request for no body property parses
    // the header alone.
    let needs_body = properties.iter().any(|property| {
        matches!(property.as_str(), "hasAttachment" | "preview")
            || super::body::BODY_EMAIL_PROPERTIES.contains(&property.as_str())
    });
    let parser = mail_parser::MessageParser::default();
    let parsed: Vec<Option<MessageId>> = ids.iter().map(|text| parse_email_id(text)).collect();
    let wanted: Vec<MessageId> = parsed.iter().flatten().copied().collect();
    let mut found = service
        .find_emails(account, &wanted)
        .map_err(service_error)?
        .into_iter();
    let mut list = Vec::with_capacity(ids.len());
    let mut not_found = Vec::new();
    for (text, id) in ids.into_iter().zip(parsed) {
        let found = match id {
            Some(_) => found.next().flatten(),
            None => None,
        };
        let Some((_, email)) = found else {
            not_found.push(Value::String(text));
            continue;
        };
        // `from` is in the listings this build keeps; an older one's needs the message.
        let from_kept = email.from_addresses != crate::mail::KeptAddresses::Unknown;
        let needs_message = properties
            .iter()
            .any(|property| !(LISTING_PROPERTIES.contains(&property.as_str()) || (property == "from" && from_kept)));
        let raw = if needs_message {
            match service.raw(account, email.id) {
                Ok(raw) => Some(raw),
                // Replicated here without its bytes yet: the header properties are null for now.
                Err(ServiceError::BodyNotYetHere) => None,
                Err(ServiceError::NoSuchMessage(_)) => {
                    not_found.push(Value::String(text));
                    continue;
                }
                Err(other) => return Err(service_error(other)),
            }
        } else {
            None
        };
        let message = raw.as_deref().and_then(|raw| {
            if needs_body {
                parser.parse(raw)
            } else {
                parser.parse_headers(raw)
            }
        });
        let mut object = Map::new();
        for property in &properties {
            let kept_from = if property == "from" {
                super::body::kept_addresses(&email.from_addresses)
            } else {
                None
            };
            let value = if let Some(from) = kept_from {
                from
            } else if LISTING_PROPERTIES.contains(&property.as_str()) {
                listing_value(&email, property).map_err(service_error)?
            } else if property == "threadId" {
                // From the email's own headers: the same on every node (see service::threads).
                raw.as_deref()
                    .map(|raw| json!(crate::service::threads::thread_id(raw, email.id)))
                    .unwrap_or(Value::Null)
            } else {
                match &message {
                    Some(message) => message_value(message, property, &email_blob_id(email.id), &options),
                    None => Value::Null,
                }
            };
            object.insert(property.clone(), value);
        }
        list.push(Value::Object(object));
    }
    Ok(super::get_response(account, Some(state), list, not_found))
}

/// What an Email/query asks for, once checked.
pub struct QueryRequest {
    /// The JMAP id of the `inMailbox` condition.
    mailbox_id: Option<String>,
    /// Its name, once looked up.
    mailbox: Option<String>,
    text: Option<String>,
    /// The filter's other conditions, checked on each listed email.
    rest: Option<EmailFilter>,
    /// The order the service lists in: the first comparator when the store indexes it, else
    /// receivedAt, newest first.
    sort: SortKey,
    descending: bool,
    /// Every comparator, each with whether it is descending.
    comparators: Vec<(Comparator, bool)>,
    collapse_threads: bool,
    window: QueryWindow,
}

/// One Email/query sort comparator (RFC 8621 §4.4.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Comparator {
    /// A property the store keeps a sort index of.
    Indexed(SortKey),
    /// The first To address's name, else its email (read from the message).
    To,
    /// A keyword (lower case) on the email: without it first.
    HasKeyword(String),
    /// A keyword on every email of the email's thread.
    AllInThreadHaveKeyword(String),
    /// A keyword on some email of the email's thread.
    SomeInThreadHaveKeyword(String),
}

/// Reads the `sort` argument.
fn read_comparators(sort: Option<&Value>) -> Result<Vec<(Comparator, bool)>, Value> {
    let comparators = match sort {
        None | Some(Value::Null) => return Ok(vec![(Comparator::Indexed(SortKey::Received), true)]),
        Some(Value::Array(comparators)) if comparators.is_empty() => {
            return Ok(vec![(Comparator::Indexed(SortKey::Received), true)])
        }
        Some(Value::Array(comparators)) => comparators,
        Some(_) => return Err(method_error("invalidArguments", "sort is not an array")),
    };
    if comparators.len() > MAX_COMPARATORS {
        return Err(method_error(
            "unsupportedSort",
            format!("at most {MAX_COMPARATORS} sort comparators"),
        ));
    }
    let mut read = Vec::with_capacity(comparators.len());
    for comparator in comparators {
        let comparator = comparator
            .as_object()
            .ok_or_else(|| method_error("invalidArguments", "a sort comparator is not an object"))?;
        let property = required_string(comparator, "property")?;
        let keyword = || -> Result<String, Value> {
            let keyword = required_string(comparator, "keyword")?;
            flag_of(keyword).map_err(|error| method_error("invalidArguments", error.to_string()))?;
            Ok(keyword.to_ascii_lowercase())
        };
        let kind = match property {
            "receivedAt" => Comparator::Indexed(SortKey::Received),
            "sentAt" => Comparator::Indexed(SortKey::Date),
            "size" => Comparator::Indexed(SortKey::Size),
            "from" => Comparator::Indexed(SortKey::From),
            "subject" => Comparator::Indexed(SortKey::Subject),
            "to" => Comparator::To,
            "hasKeyword" => Comparator::HasKeyword(keyword()?),
            "allInThreadHaveKeyword" => Comparator::AllInThreadHaveKeyword(keyword()?),
            "someInThreadHaveKeyword" => Comparator::SomeInThreadHaveKeyword(keyword()?),
            _ => {
                return Err(method_error(
                    "unsupportedSort",
                    format!("sorting by {property} is not served (these are: {SORT_OPTIONS:?})"),
                ))
            }
        };
        if comparator
            .get("collation")
            .is_some_and(|collation| !collation.is_null())
        {
            return Err(method_error("unsupportedSort", "no collation algorithms are served"));
        }
        let ascending = match comparator.get("isAscending") {
            None | Some(Value::Null) => true,
            Some(Value::Bool(ascending)) => *ascending,
            Some(_) => return Err(method_error("invalidArguments", "isAscending is not a boolean")),
        };
        read.push((kind, !ascending));
    }
    Ok(read)
}

/// Reads Email/query's arguments (no service needed: the fuzz target runs it on any input).
pub fn query_request(arguments: &Map<String, Value>) -> Result<QueryRequest, Value> {
    let (mailbox_id, text, rest) = split_filter(parse_filter(arguments.get("filter"), &mut read_condition)?)?;
    let comparators = read_comparators(arguments.get("sort"))?;
    let (sort, descending) = match comparators.first() {
        Some((Comparator::Indexed(sort), descending)) => (*sort, *descending),
        _ => (SortKey::Received, true),
    };
    Ok(QueryRequest {
        mailbox_id,
        mailbox: None,
        text,
        rest,
        sort,
        descending,
        comparators,
        collapse_threads: flag_argument(arguments, "collapseThreads")?,
        window: query_window(arguments)?,
    })
}

/// One condition of an Email/query filter (RFC 8621 §4.4.1) that the listing answers.
#[derive(Clone, Debug, PartialEq)]
pub enum EmailCondition {
    InMailbox(String),
    InMailboxOtherThan(Vec<String>),
    Text(String),
    /// Lower case, looked for in the From header as listed.
    From(String),
    Subject(String),
    Before(u64),
    After(u64),
    MinSize(u64),
    MaxSize(u64),
    HasKeyword(String),
    NotKeyword(String),
    /// Lower case, looked for in the To, Cc or Bcc header (names and addresses).
    To(String),
    Cc(String),
    Bcc(String),
    /// Lower case, looked for in the text of the body parts.
    Body(String),
    /// A header by name (lower case), and text its value must contain (lower case), if any.
    Header(String, Option<String>),
    HasAttachment(bool),
}

/// A filter condition object: every condition it names must hold.
fn read_condition(object: &Map<String, Value>) -> Result<Vec<EmailCondition>, Value> {
    let mut conditions = Vec::with_capacity(object.len());
    for (property, value) in object {
        let text = || {
            value
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| method_error("invalidArguments", format!("{property} is not a string")))
        };
        let size = || {
            value
                .as_u64()
                .ok_or_else(|| method_error("invalidArguments", format!("{property} is not a size")))
        };
        let date = || -> Result<u64, Value> {
            let invalid = || method_error("invalidArguments", format!("{property} is not a UTCDate"));
            let parsed = value
                .as_str()
                .and_then(mail_parser::DateTime::parse_rfc3339)
                .ok_or_else(invalid)?;
            Ok(u64::try_from(parsed.to_timestamp()).unwrap_or(0).saturating_mul(1000))
        };
        conditions.push(match property.as_str() {
            "inMailbox" => EmailCondition::InMailbox(text()?),
            "inMailboxOtherThan" => EmailCondition::InMailboxOtherThan(
                value
                    .as_array()
                    .and_then(|ids| ids.iter().map(|id| id.as_str().map(str::to_owned)).collect())
                    .ok_or_else(|| method_error("invalidArguments", "inMailboxOtherThan is not a list of ids"))?,
            ),
            "text" => EmailCondition::Text(text()?),
            "from" => EmailCondition::From(text()?.to_lowercase()),
            "subject" => EmailCondition::Subject(text()?.to_lowercase()),
            "before" => EmailCondition::Before(date()?),
            "after" => EmailCondition::After(date()?),
            "minSize" => EmailCondition::MinSize(size()?),
            "maxSize" => EmailCondition::MaxSize(size()?),
            "hasKeyword" => EmailCondition::HasKeyword(text()?.to_ascii_lowercase()),
            "notKeyword" => EmailCondition::NotKeyword(text()?.to_ascii_lowercase()),
            "to" => EmailCondition::To(text()?.to_lowercase()),
            "cc" => EmailCondition::Cc(text()?.to_lowercase()),
            "bcc" => EmailCondition::Bcc(text()?.to_lowercase()),
            "body" => EmailCondition::Body(text()?.to_lowercase()),
            "hasAttachment" => EmailCondition::HasAttachment(
                value
                    .as_bool()
                    .ok_or_else(|| method_error("invalidArguments", "hasAttachment is not a boolean"))?,
            ),
            "header" => {
                let invalid = || method_error("invalidArguments", "header is [name] or [name, text]");
                let items = value.as_array().ok_or_else(invalid)?;
                let strings: Vec<&str> = items
                    .iter()
                    .map(Value::as_str)
                    .collect::<Option<_>>()
                    .ok_or_else(invalid)?;
                match strings.as_slice() {
                    [name] if !name.is_empty() => EmailCondition::Header(name.to_ascii_lowercase(), None),
                    [name, text] if !name.is_empty() => {
                        EmailCondition::Header(name.to_ascii_lowercase(), Some(text.to_lowercase()))
                    }
                    _ => return Err(invalid()),
                }
            }
            _ => {
                return Err(method_error(
                    "unsupportedFilter",
                    format!(
                        "the filter condition {property} is not served (inMailbox, inMailboxOtherThan, text, from, \
                         to, cc, bcc, subject, body, header, before, after, minSize, maxSize, hasAttachment, \
                         hasKeyword and notKeyword are)"
                    ),
                ))
            }
        });
    }
    Ok(conditions)
}

type EmailFilter = FilterTree<Vec<EmailCondition>>;

/// Takes `inMailbox` and `text` out of the filter's top level (a condition object, or the objects
/// directly under a top-level AND), where the service answers them near the data; what is left is
/// checked here on each listed email. Elsewhere in the tree they are refused.
fn split_filter(filter: Option<EmailFilter>) -> Result<(Option<String>, Option<String>, Option<EmailFilter>), Value> {
    let Some(filter) = filter else {
        return Ok((None, None, None));
    };
    let mut mailbox = None;
    let mut text = None;
    let mut take = |conditions: Vec<EmailCondition>| -> Result<Vec<EmailCondition>, Value> {
        let mut kept = Vec::new();
        for condition in conditions {
            let slot = match &condition {
                EmailCondition::InMailbox(id) => Some((&mut mailbox, id.clone())),
                EmailCondition::Text(words) => Some((&mut text, words.clone())),
                _ => None,
            };
            match slot {
                Some((slot, value)) => {
                    if slot.as_ref().is_some_and(|held: &String| *held != value) {
                        return Err(method_error(
                            "unsupportedFilter",
                            "one inMailbox and one text condition at most",
                        ));
                    }
                    *slot = Some(value);
                }
                None => kept.push(condition),
            }
        }
        Ok(kept)
    };
    let rest = match filter {
        FilterTree::Condition(conditions) => {
            let kept = take(conditions)?;
            (!kept.is_empty()).then_some(FilterTree::Condition(kept))
        }
        FilterTree::All(parts) => {
            let mut kept_parts = Vec::with_capacity(parts.len());
            for part in parts {
                match part {
                    FilterTree::Condition(conditions) => {
                        let kept = take(conditions)?;
                        if !kept.is_empty() {
                            kept_parts.push(FilterTree::Condition(kept));
                        }
                    }
                    other => kept_parts.push(other),
                }
            }
            (!kept_parts.is_empty()).then_some(FilterTree::All(kept_parts))
        }
        other => Some(other),
    };
    let nested = rest.as_ref().is_some_and(|rest| {
        rest.conditions().iter().any(|conditions| {
            conditions
                .iter()
                .any(|condition| matches!(condition, EmailCondition::InMailbox(_)))
        })
    });
    if nested {
        return Err(method_error(
            "unsupportedFilter",
            "inMailbox is served at the filter's top level or directly under a top-level AND",
        ));
    }
    Ok((mailbox, text, rest))
}

/// What the conditions that look inside a message need of it, read once per email.
#[derive(Default)]
struct MessageFacts {
    from: String,
    to: String,
    cc: String,
    bcc: String,
    subject: String,
    body: String,
    /// Each header's name (lower case) and value (unfolded, lower case).
    headers: Vec<(String, String)>,
    has_attachment: bool,
}

fn address_words(address: Option<&mail_parser::Address<'_>>) -> String {
    let Some(address) = address else {
        return String::new();
    };
    let list: Vec<&mail_parser::Addr<'_>> = match address {
        mail_parser::Address::List(list) => list.iter().collect(),
        mail_parser::Address::Group(groups) => groups.iter().flat_map(|group| group.addresses.iter()).collect(),
    };
    list.iter()
        .map(|addr| {
            format!(
                "{} <{}>",
                addr.name().unwrap_or_default(),
                addr.address().unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
        .to_lowercase()
}

impl MessageFacts {
    fn of(raw: &[u8]) -> MessageFacts {
        let searched = crate::mail::search_text(raw);
        let Some(message) = mail_parser::MessageParser::default().parse(raw) else {
            return MessageFacts {
                body: searched.body.to_lowercase(),
                ..MessageFacts::default()
            };
        };
        MessageFacts {
            from: address_words(message.from()),
            to: address_words(message.to()),
            cc: address_words(message.cc()),
            bcc: address_words(message.bcc()),
            subject: message.subject().unwrap_or_default().to_lowercase(),
            body: searched.body.to_lowercase(),
            headers: message
                .headers_raw()
                .map(|(name, value)| {
                    let unfolded: String = value.replace(['\r', '\n'], "");
                    (name.to_ascii_lowercase(), unfolded.trim().to_lowercase())
                })
                .collect(),
            has_attachment: message.attachment_count() > 0,
        }
    }
}

/// Whether a condition needs the message's bytes, not just its listing.
fn needs_message(condition: &EmailCondition) -> bool {
    matches!(
        condition,
        EmailCondition::Text(_)
            | EmailCondition::To(_)
            | EmailCondition::Cc(_)
            | EmailCondition::Bcc(_)
            | EmailCondition::Body(_)
            | EmailCondition::Header(..)
            | EmailCondition::HasAttachment(_)
    )
}

/// Whether an email passes a condition; `facts` reads the message when a condition needs it
/// (`None`: its bytes are not here, and such a condition does not hold).
fn holds(
    condition: &EmailCondition,
    email: &Email,
    facts: &mut impl FnMut() -> Option<std::rc::Rc<MessageFacts>>,
) -> bool {
    let has_keyword = |keyword: &str| email.flags.iter().filter_map(keyword_of).any(|held| held == keyword);
    if needs_message(condition) {
        let Some(facts) = facts() else {
            return false;
        };
        return match condition {
            // A text condition left in the tree (not at its top, where the index answers it).
            EmailCondition::Text(words) => {
                let words = words.to_lowercase();
                [
                    &facts.from,
                    &facts.to,
                    &facts.cc,
                    &facts.bcc,
                    &facts.subject,
                    &facts.body,
                ]
                .iter()
                .any(|field| field.contains(words.as_str()))
            }
            EmailCondition::To(words) => facts.to.contains(words.as_str()),
            EmailCondition::Cc(words) => facts.cc.contains(words.as_str()),
            EmailCondition::Bcc(words) => facts.bcc.contains(words.as_str()),
            EmailCondition::Body(words) => facts.body.contains(words.as_str()),
            EmailCondition::Header(name, words) => facts
                .headers
                .iter()
                .any(|(held, value)| held == name && words.as_ref().is_none_or(|words| value.contains(words.as_str()))),
            EmailCondition::HasAttachment(wanted) => facts.has_attachment == *wanted,
            _ => false,
        };
    }
    match condition {
        EmailCondition::InMailbox(id) => email.mailbox.to_string() == *id,
        EmailCondition::InMailboxOtherThan(ids) => !ids.contains(&email.mailbox.to_string()),
        EmailCondition::From(words) => email.from.to_lowercase().contains(words.as_str()),
        EmailCondition::Subject(words) => email.subject.to_lowercase().contains(words.as_str()),
        EmailCondition::Before(millis) => email.received_millis < *millis,
        EmailCondition::After(millis) => email.received_millis >= *millis,
        EmailCondition::MinSize(size) => email.size >= *size,
        EmailCondition::MaxSize(size) => email.size < *size,
        EmailCondition::HasKeyword(keyword) => has_keyword(keyword),
        EmailCondition::NotKeyword(keyword) => !has_keyword(keyword),
        _ => false,
    }
}

/// The most emails a filter beyond inMailbox and text is checked on, one by one: past it the
/// query is refused rather than answered from part of the mailbox.
pub const MAX_FILTER_SCAN: usize = 200_000;

/// The emails of one page of the listing that pass the rest of the filter, in order.
fn filter_page(
    service: &MailService,
    account: &str,
    rest: &EmailFilter,
    emails: Vec<Email>,
) -> Result<Vec<Email>, Value> {
    let mut passing = Vec::with_capacity(emails.len());
    for email in emails {
        let mut read: Option<Option<std::rc::Rc<MessageFacts>>> = None;
        let mut failure = None;
        let mut facts = || {
            read.get_or_insert_with(|| match service.raw(account, email.id) {
                Ok(raw) => Some(std::rc::Rc::new(MessageFacts::of(&raw))),
                Err(ServiceError::BodyNotYetHere | ServiceError::NoSuchMessage(_)) => None,
                Err(other) => {
                    failure = Some(other);
                    None
                }
            })
            .clone()
        };
        let passes = rest.matches(&mut |conditions: &Vec<EmailCondition>| {
            conditions.iter().all(|condition| holds(condition, &email, &mut facts))
        });
        if let Some(error) = failure {
            return Err(service_error(error));
        }
        if passes {
            passing.push(email);
        }
    }
    Ok(passing)
}

/// The query's results worked out here rather than by the service's listing alone: the rest of
/// the filter checked email by email, comparators the store has no index for, collapseThreads.
/// The listing is read page by page in its order; with `wanted`, and when that order is the
/// results' order, reading stops once that many results are found. Otherwise the whole listing
/// is read, at most [`MAX_FILTER_SCAN`] emails.
async fn results(
    jmap: &Jmap,
    account: &str,
    request: &QueryRequest,
    wanted: Option<usize>,
) -> Result<Vec<Email>, Value> {
    let service = &jmap.service;
    let early = wanted.filter(|_| !request.sorted_here());
    let mut kept = Vec::new();
    let mut threads_seen = std::collections::HashSet::new();
    let mut start = 0;
    loop {
        let (emails, total) = base_window(service, account, request, start, MAX_QUERY_LIMIT)
            .await
            .map_err(service_error)?;
        if total > MAX_FILTER_SCAN && early.is_none() {
            return Err(method_error(
                "unsupportedFilter",
                format!(
                    "this filter or sort is worked out email by email, on at most {MAX_FILTER_SCAN} emails: narrow it \
                     with inMailbox or text"
                ),
            ));
        }
        let count = emails.len();
        let passing = match &request.rest {
            Some(rest) => filter_page(service, account, rest, emails)?,
            None => emails,
        };
        if request.collapse_threads && !request.sorted_here() {
            collapse(jmap, account, passing, &mut threads_seen, &mut kept)?;
        } else {
            kept.extend(passing);
        }
        if count < MAX_QUERY_LIMIT || early.is_some_and(|wanted| kept.len() >= wanted) {
            break;
        }
        start += count;
    }
    if request.sorted_here() {
        sort_here(jmap, account, &request.comparators, &mut kept)?;
        if request.collapse_threads {
            let sorted = std::mem::take(&mut kept);
            collapse(jmap, account, sorted, &mut threads_seen, &mut kept)?;
        }
    }
    Ok(kept)
}

/// Keeps, of `emails` in order, the first of each thread not seen before.
fn collapse(
    jmap: &Jmap,
    account: &str,
    emails: Vec<Email>,
    seen: &mut std::collections::HashSet<String>,
    kept: &mut Vec<Email>,
) -> Result<(), Value> {
    let ids: Vec<MessageId> = emails.iter().map(|email| email.id).collect();
    let threads = jmap
        .threads
        .threads_of(&jmap.service, account, &ids)
        .map_err(service_error)?;
    for (email, thread) in emails.into_iter().zip(threads) {
        // An email whose bytes are not here yet has no known thread: it stands alone.
        let thread = thread.unwrap_or_else(|| email.id.to_string());
        if seen.insert(thread) {
            kept.push(email);
        }
    }
    Ok(())
}

/// The bytes an email sorts by under one comparator, ascending.
fn comparator_key(
    jmap: &Jmap,
    account: &str,
    comparator: &Comparator,
    email: &Email,
    threads: &mut ThreadKeywords,
) -> Result<Vec<u8>, Value> {
    let has = |flags: &[Flag], keyword: &str| flags.iter().filter_map(keyword_of).any(|held| held == keyword);
    Ok(match comparator {
        Comparator::Indexed(sort) => sort_bytes(email, *sort),
        Comparator::To => {
            let raw = match jmap.service.raw(account, email.id) {
                Ok(raw) => raw,
                Err(ServiceError::BodyNotYetHere | ServiceError::NoSuchMessage(_)) => Vec::new(),
                Err(other) => return Err(service_error(other)),
            };
            let first = mail_parser::MessageParser::default()
                .parse_headers(&raw)
                .and_then(|message| {
                    message.to().and_then(|to| to.first()).map(|address| {
                        address
                            .name()
                            .filter(|name| !name.trim().is_empty())
                            .or(address.address())
                            .unwrap_or_default()
                            .trim()
                            .to_owned()
                    })
                })
                .unwrap_or_default();
            crate::mail::text_sort_key(&first)
        }
        Comparator::HasKeyword(keyword) => vec![u8::from(has(&email.flags, keyword))],
        Comparator::AllInThreadHaveKeyword(keyword) => {
            let (all, _) = threads.of(jmap, account, email, keyword)?;
            vec![u8::from(all)]
        }
        Comparator::SomeInThreadHaveKeyword(keyword) => {
            let (_, some) = threads.of(jmap, account, email, keyword)?;
            vec![u8::from(some)]
        }
    })
}

/// Whether all and whether some emails of a thread have a keyword, worked out once per thread
/// and keyword in a query.
#[derive(Default)]
struct ThreadKeywords {
    answers: std::collections::HashMap<(String, String), (bool, bool)>,
}

impl ThreadKeywords {
    fn of(&mut self, jmap: &Jmap, account: &str, email: &Email, keyword: &str) -> Result<(bool, bool), Value> {
        let service = &jmap.service;
        let thread = jmap
            .threads
            .threads_of(service, account, &[email.id])
            .map_err(service_error)?
            .pop()
            .flatten();
        let has = |flags: &[Flag]| flags.iter().filter_map(keyword_of).any(|held| held == keyword);
        let Some(thread) = thread else {
            let own = has(&email.flags);
            return Ok((own, own));
        };
        if let Some(answer) = self.answers.get(&(thread.clone(), keyword.to_owned())) {
            return Ok(*answer);
        }
        let members = jmap
            .threads
            .threads(service, account, std::slice::from_ref(&thread))
            .map_err(service_error)?
            .pop()
            .flatten()
            .map(|thread| thread.emails)
            .unwrap_or_else(|| vec![email.id]);
        let (mut all, mut some) = (true, false);
        for member in members {
            let flags = if member == email.id {
                email.flags.clone()
            } else {
                match service.email(account, member) {
                    Ok(found) => found.flags,
                    Err(ServiceError::NoSuchMessage(_)) => continue,
                    Err(other) => return Err(service_error(other)),
                }
            };
            let held = has(&flags);
            all &= held;
            some |= held;
        }
        self.answers.insert((thread, keyword.to_owned()), (all, some));
        Ok((all, some))
    }
}

/// Sorts the results by every comparator, in order; ties keep the listing's order.
fn sort_here(
    jmap: &Jmap,
    account: &str,
    comparators: &[(Comparator, bool)],
    emails: &mut Vec<Email>,
) -> Result<(), Value> {
    let mut threads = ThreadKeywords::default();
    let mut keyed = Vec::with_capacity(emails.len());
    for email in emails.drain(..) {
        let mut keys = Vec::with_capacity(comparators.len());
        for (comparator, _) in comparators {
            keys.push(comparator_key(jmap, account, comparator, &email, &mut threads)?);
        }
        keyed.push((keys, email));
    }
    keyed.sort_by(|(left, _), (right, _)| {
        for ((left, right), (_, descending)) in left.iter().zip(right).zip(comparators) {
            let order = if *descending { right.cmp(left) } else { left.cmp(right) };
            if order != std::cmp::Ordering::Equal {
                return order;
            }
        }
        std::cmp::Ordering::Equal
    });
    emails.extend(keyed.into_iter().map(|(_, email)| email));
    Ok(())
}

impl QueryRequest {
    /// Whether Email/queryChanges can answer for this query: one mailbox, no search, the
    /// listing's own order (the service knows where an email stands in a mailbox's listing,
    /// not in a search's hits or an order worked out here).
    fn can_calculate_changes(&self) -> bool {
        self.mailbox_id.is_some()
            && self.text.is_none()
            && self.rest.is_none()
            && !self.sorted_here()
            && !self.collapse_threads
    }

    /// Whether the results are sorted here, not in the listing's order: several comparators, or
    /// one the store has no index for.
    fn sorted_here(&self) -> bool {
        !matches!(self.comparators.as_slice(), [(Comparator::Indexed(_), _)])
    }

    /// Whether the service's listing answers the query alone, window and total.
    fn listed_by_service(&self) -> bool {
        self.rest.is_none() && !self.sorted_here() && !self.collapse_threads
    }
}

/// The bytes an email sorts by under `sort`, as the store's sort indexes order them.
fn sort_bytes(email: &Email, sort: SortKey) -> Vec<u8> {
    match sort {
        SortKey::Received => email.received_millis.to_be_bytes().to_vec(),
        SortKey::Date => email
            .date_millis
            .unwrap_or(email.received_millis)
            .to_be_bytes()
            .to_vec(),
        SortKey::From => crate::mail::text_sort_key(&email.from),
        SortKey::Subject => crate::mail::subject_sort_key(&email.subject),
        SortKey::Size => email.size.to_be_bytes().to_vec(),
    }
}

/// The IDs of one window of the query's results, and their count (exact when `whole`, else at
/// least the window's end).
async fn window(
    jmap: &Jmap,
    account: &str,
    request: &QueryRequest,
    position: usize,
    limit: usize,
    whole: bool,
) -> Result<(Vec<MessageId>, usize), Value> {
    if !request.listed_by_service() {
        let wanted = (!whole).then(|| position.saturating_add(limit));
        let found = results(jmap, account, request, wanted).await?;
        let total = found.len();
        return Ok((
            found
                .into_iter()
                .skip(position)
                .take(limit)
                .map(|email| email.id)
                .collect(),
            total,
        ));
    }
    if let Some(name) = &request.mailbox {
        // One mailbox: the service answers with IDs alone, reading no email.
        let service = &jmap.service;
        let mailbox = service.find_mailbox(account, name).map_err(service_error)?;
        return service
            .query_ids(account, mailbox, base_query(request, position, limit))
            .await
            .map_err(service_error);
    }
    let (emails, total) = base_window(&jmap.service, account, request, position, limit)
        .await
        .map_err(service_error)?;
    Ok((emails.iter().map(|email| email.id).collect(), total))
}

/// The service query for one window of the request's listing.
fn base_query(request: &QueryRequest, position: usize, limit: usize) -> Query {
    Query {
        search: request.text.clone(),
        sort: request.sort,
        descending: request.descending,
        position,
        limit,
    }
}

/// One window of the account's emails (of one mailbox, or merged over all of them), searched for
/// the text condition, before the rest of the filter.
async fn base_window(
    service: &MailService,
    account: &str,
    request: &QueryRequest,
    position: usize,
    limit: usize,
) -> Result<(Vec<Email>, usize), ServiceError> {
    let query = |position: usize, limit: usize| base_query(request, position, limit);
    if let Some(name) = &request.mailbox {
        let mailbox = service.find_mailbox(account, name)?;
        let result = service.query(account, mailbox, query(position, limit)).await?;
        return Ok((result.emails, result.total));
    }
    let mut merged = Vec::new();
    let mut total = 0;
    for mailbox in service.mailboxes(account)? {
        let result = service
            .query(account, mailbox.id, query(0, position.saturating_add(limit)))
            .await?;
        total += result.total;
        merged.extend(result.emails);
    }
    merged.sort_by_cached_key(|email| (sort_bytes(email, request.sort), email.id));
    if request.descending {
        merged.reverse();
    }
    Ok((merged.into_iter().skip(position).take(limit).collect(), total))
}

/// Email/query (RFC 8620 §5.5, RFC 8621 §4.4).
pub(crate) async fn query(jmap: &Jmap, account: &str, arguments: &Map<String, Value>) -> MethodResult {
    let service = &jmap.service;
    let mut request = query_request(arguments)?;
    let mut mailbox_missing = false;
    if let Some(id) = &request.mailbox_id {
        request.mailbox = mailbox::name_of(service, account, id).map_err(service_error)?;
        mailbox_missing = request.mailbox.is_none();
    }
    if mailbox_missing && request.window.anchor.is_some() {
        return Err(method_error("anchorNotFound", "the anchor is not in the results"));
    }
    let state = service.account_state(account).map_err(service_error)?;
    let (position, ids, total) = if mailbox_missing {
        (0, Vec::new(), 0)
    } else {
        let needs_total = request.window.position < 0 || request.window.anchor.is_some();
        let whole = needs_total || request.window.calculate_total;
        let total = if needs_total {
            Some(window(jmap, account, &request, 0, 0, true).await?.1)
        } else {
            None
        };
        let anchor = match &request.window.anchor {
            Some(anchor) => anchor_index(jmap, account, &request, anchor, total.unwrap_or(0)).await?,
            None => None,
        };
        let position = request.window.start(total.unwrap_or(0), anchor)?;
        let (found, total) = window(jmap, account, &request, position, request.window.limit, whole).await?;
        let ids: Vec<String> = found.iter().map(|id| id.to_string()).collect();
        (position, ids, total)
    };
    let mut response = json!({
        "accountId": account,
        "queryState": state,
        "canCalculateChanges": request.can_calculate_changes(),
        "position": position,
        "ids": ids,
    });
    if request.window.calculate_total {
        response["total"] = json!(total);
    }
    if request.window.limit_cut {
        response["limit"] = json!(request.window.limit);
    }
    Ok(response)
}

/// The most results an anchor is looked for in when the service cannot place it directly (a
/// search, or every mailbox at once): past it the anchor is not found.
const MAX_ANCHOR_SCAN: usize = 100_000;

/// The index of the anchor in the query's results, if it is there.
async fn anchor_index(
    jmap: &Jmap,
    account: &str,
    request: &QueryRequest,
    anchor: &str,
    total: usize,
) -> Result<Option<usize>, Value> {
    let service = &jmap.service;
    let Some(id) = parse_email_id(anchor) else {
        return Ok(None);
    };
    if request.can_calculate_changes() {
        if let Some(name) = &request.mailbox {
            let mailbox = service.find_mailbox(account, name).map_err(service_error)?;
            let positions = service
                .positions_in_listing(account, mailbox, request.sort, request.descending, &[id])
                .map_err(service_error)?;
            return Ok(positions.first().copied().flatten());
        }
    }
    if !request.listed_by_service() {
        let found = results(jmap, account, request, None).await?;
        return Ok(found.iter().position(|email| email.id == id));
    }
    // Page through the results.
    let page = MAX_QUERY_LIMIT;
    let mut start = 0;
    while start < total.min(MAX_ANCHOR_SCAN) {
        let (found, _) = window(jmap, account, request, start, page, false).await?;
        if let Some(offset) = found.iter().position(|found| *found == id) {
            return Ok(Some(start + offset));
        }
        if found.len() < page {
            break;
        }
        start += page;
    }
    Ok(None)
}

/// Email/queryChanges (RFC 8620 §5.6) for a query of one mailbox without search, from the
/// account's change feed: every email changed since the query state is removed, and added again
/// at its index when it is in the mailbox now. The sorts are on properties an email never changes
/// (receivedAt, sentAt, size, from, subject), so the emails that did not change keep their order
/// and the client that applies the answer holds the new results exactly. `upToId` is ignored:
/// membership of a mailbox changes with moves, so RFC 8620 lets the server ignore it.
///
/// Refused with cannotCalculateChanges: other queries, a state from before the tombstone horizon,
/// more than [`super::mailbox::MAX_QUERY_CHANGES_FEED`] feed entries, and a state across which a
/// mailbox was deleted or merged with a same-named one (emails then change mailbox without a
/// change of their own).
pub fn query_changes(service: &MailService, account: &str, arguments: &Map<String, Value>) -> MethodResult {
    let since = required_string(arguments, "sinceQueryState")?;
    let max_changes = max_changes_argument(arguments)?;
    if !matches!(
        arguments.get("upToId"),
        None | Some(Value::Null) | Some(Value::String(_))
    ) {
        return Err(method_error("invalidArguments", "upToId is not an id"));
    }
    let request = query_request(arguments)?;
    if !request.can_calculate_changes() {
        return Err(method_error(
            "cannotCalculateChanges",
            "query changes are calculated for an inMailbox query without text, sorted by one indexed property, \
             threads not collapsed: query again",
        ));
    }
    let calculate_total = request.window.calculate_total;
    let Some(mailbox_id) = request.mailbox_id.as_deref() else {
        return Err(method_error("cannotCalculateChanges", "no inMailbox"));
    };
    let mailbox = mailbox_id
        .parse::<MailboxId>()
        .ok()
        .and_then(|id| service.mailbox(account, id).ok())
        .ok_or_else(|| method_error("cannotCalculateChanges", "the mailbox is gone: query again"))?;
    let mut state = since.to_owned();
    let mut changed: BTreeSet<MessageId> = BTreeSet::new();
    let mut shown_here: BTreeSet<MessageId> = BTreeSet::new();
    let mut changed_mailboxes = BTreeSet::new();
    loop {
        let page = service
            .account_changes(account, Some(&state), DEFAULT_MAX_CHANGES)
            .map_err(service_error)?;
        for email in page.created.iter().chain(&page.updated) {
            changed.insert(email.id);
            if email.mailbox == Some(mailbox.id) {
                shown_here.insert(email.id);
            } else {
                shown_here.remove(&email.id);
            }
        }
        for id in &page.destroyed {
            changed.insert(*id);
            shown_here.remove(id);
        }
        changed_mailboxes.extend(page.mailboxes.iter().copied());
        state = page.new_state;
        if max_changes.is_some_and(|max| changed.len() > max) {
            return Err(method_error(
                "tooManyChanges",
                format!("more than {} changes", max_changes.unwrap_or_default()),
            ));
        }
        if !page.has_more {
            break;
        }
        if changed.len() > super::mailbox::MAX_QUERY_CHANGES_FEED {
            return Err(method_error(
                "cannotCalculateChanges",
                "too much changed since this state: query again",
            ));
        }
    }
    if !changed_mailboxes.is_empty() {
        let visible: BTreeSet<MailboxId> = service
            .mailboxes(account)
            .map_err(service_error)?
            .into_iter()
            .map(|summary| summary.id)
            .collect();
        if changed_mailboxes.iter().any(|id| !visible.contains(id)) {
            return Err(method_error(
                "cannotCalculateChanges",
                "a mailbox was deleted or merged since this state: query again",
            ));
        }
    }
    let candidates: Vec<MessageId> = shown_here.into_iter().collect();
    let positions = service
        .positions_in_listing(account, mailbox.id, request.sort, request.descending, &candidates)
        .map_err(service_error)?;
    let mut added: Vec<(usize, MessageId)> = candidates
        .iter()
        .zip(positions)
        .filter_map(|(id, position)| position.map(|index| (index, *id)))
        .collect();
    added.sort();
    query_changes_response(
        account,
        since,
        &state,
        changed.iter().map(MessageId::to_string).collect(),
        added.into_iter().map(|(index, id)| (id.to_string(), index)).collect(),
        max_changes,
        calculate_total.then_some(mailbox.total as usize),
    )
}

/// Email/changes (RFC 8620 §5.2) on the account's portable change feed.
pub fn changes(service: &MailService, account: &str, arguments: &Map<String, Value>) -> MethodResult {
    let since = required_string(arguments, "sinceState")?;
    let max = match optional_count(arguments, "maxChanges")? {
        Some(0) => return Err(method_error("invalidArguments", "maxChanges must be positive")),
        Some(max) => (max as usize).min(MAX_OBJECTS_IN_GET),
        None => DEFAULT_MAX_CHANGES,
    };
    let changes = service
        .account_changes(account, Some(since), max)
        .map_err(service_error)?;
    let ids = |items: &[crate::service::ChangedEmail]| -> Vec<String> {
        items.iter().map(|item| item.id.to_string()).collect()
    };
    Ok(json!({
        "accountId": account,
        "oldState": since,
        "newState": changes.new_state,
        "hasMoreChanges": changes.has_more,
        "created": ids(&changes.created),
        "updated": ids(&changes.updated),
        "destroyed": changes.destroyed.iter().map(MessageId::to_string).collect::<Vec<_>>(),
    }))
}

/// The keywords and the one mailbox an Email/set patch leaves an email with (`mailbox_id` is the
/// mailbox it is in now; an email is in exactly one, `maxMailboxesPerEmail` is 1).
pub fn patched_keywords(
    current: &BTreeSet<String>,
    patch: &Map<String, Value>,
    mailbox_id: &str,
) -> Result<(BTreeSet<String>, String), Value> {
    let mut keywords = current.clone();
    let mut mailboxes = BTreeSet::from([mailbox_id.to_owned()]);
    let invalid = |property: &str, description: String| {
        let mut error = set_error("invalidProperties", description);
        error["properties"] = json!([property]);
        error
    };
    for (path, value) in patch {
        if path == "keywords" {
            let Some(map) = value.as_object() else {
                return Err(invalid(path, "keywords is not an object".into()));
            };
            keywords.clear();
            for (keyword, set) in map {
                if set != &Value::Bool(true) {
                    return Err(invalid(path, format!("keyword {keyword} is not true")));
                }
                keywords.insert(keyword.to_ascii_lowercase());
            }
        } else if let Some(keyword) = path.strip_prefix("keywords/") {
            let keyword = keyword.replace("~1", "/").replace("~0", "~").to_ascii_lowercase();
            match value {
                Value::Bool(true) => {
                    keywords.insert(keyword);
                }
                Value::Null => {
                    keywords.remove(&keyword);
                }
                _ => return Err(invalid(path, format!("{path} is neither true nor null"))),
            }
        } else if path == "mailboxIds" {
            let map = value
                .as_object()
                .ok_or_else(|| invalid(path, "mailboxIds is not an object".into()))?;
            mailboxes.clear();
            for (id, present) in map {
                if *present != Value::Bool(true) {
                    return Err(invalid(path, "a mailboxIds value must be true".into()));
                }
                mailboxes.insert(id.clone());
            }
        } else if let Some(id) = path.strip_prefix("mailboxIds/") {
            match value {
                Value::Bool(true) => {
                    mailboxes.insert(id.to_owned());
                }
                Value::Null => {
                    mailboxes.remove(id);
                }
                _ => return Err(invalid(path, format!("{path} is neither true nor null"))),
            }
        } else {
            return Err(invalid(path, format!("{path} cannot be changed")));
        }
    }
    let mut only = mailboxes.into_iter();
    match (only.next(), only.next()) {
        (Some(mailbox), None) => Ok((keywords, mailbox)),
        _ => Err(invalid(
            "mailboxIds",
            "an email is in exactly one mailbox here (maxMailboxesPerEmail is 1)".into(),
        )),
    }
}

async fn update_one(service: &MailService, account: &str, text: &str, patch: &Value) -> Result<(), Value> {
    let not_found = || set_error("notFound", format!("no email {text}"));
    let id = parse_email_id(text).ok_or_else(not_found)?;
    let (_, email) = service
        .find_email(account, id)
        .map_err(service_error)?
        .ok_or_else(not_found)?;
    let patch = patch
        .as_object()
        .ok_or_else(|| set_error("invalidPatch", "the patch is not an object"))?;
    let mailbox_id = email.mailbox.to_string();
    let current: BTreeSet<String> = email.flags.iter().filter_map(keyword_of).collect();
    let (wanted, destination) = patched_keywords(&current, patch, &mailbox_id)?;
    if destination != mailbox_id {
        let to = destination
            .parse::<MailboxId>()
            .ok()
            .ok_or_else(|| set_error("invalidProperties", format!("no mailbox {destination}")))?;
        match service.move_email(account, id, to).await {
            Ok(_) => {}
            Err(ServiceError::NoSuchMailbox(_)) => {
                let mut error = set_error("invalidProperties", format!("no mailbox {destination}"));
                error["properties"] = json!(["mailboxIds"]);
                return Err(error);
            }
            Err(ServiceError::NoSuchMessage(_)) => return Err(not_found()),
            Err(other) => return Err(service_error(other)),
        }
    }
    let mut add = Vec::new();
    for keyword in wanted.difference(&current) {
        add.push(flag_of(keyword).map_err(|error| {
            let mut error = set_error("invalidProperties", error.to_string());
            error["properties"] = json!(["keywords"]);
            error
        })?);
    }
    let remove: Vec<Flag> = email
        .flags
        .iter()
        .filter(|flag| keyword_of(flag).is_some_and(|keyword| !wanted.contains(&keyword)))
        .cloned()
        .collect();
    if add.is_empty() && remove.is_empty() {
        return Ok(());
    }
    match service.set_flags(account, id, add, remove).await {
        Ok(_) => Ok(()),
        Err(ServiceError::NoSuchMessage(_)) => Err(not_found()),
        Err(other) => Err(service_error(other)),
    }
}

/// Email/set (RFC 8620 §5.3, RFC 8621 §4.6): create (see [`super::create`]), keyword changes,
/// moves and destroy.
pub(crate) async fn set(
    jmap: &Jmap,
    account: &str,
    arguments: &Map<String, Value>,
    created_ids: &mut super::CreatedIds,
) -> MethodResult {
    let service = &jmap.service;
    check_set_size(arguments)?;
    let old_state = check_in_state(service, account, arguments)?;
    let mut created = Map::new();
    let mut not_created = Map::new();
    if let Some(create) = object_argument(arguments, "create")? {
        for (creation, object) in create {
            match create_one(jmap, account, object, created_ids).await {
                Ok(email) => {
                    if let Some(id) = email["id"].as_str() {
                        created_ids.insert(creation.clone(), id.to_owned());
                    }
                    created.insert(creation.clone(), email);
                }
                Err(error) => {
                    not_created.insert(creation.clone(), error);
                }
            }
        }
    }
    let mut updated = Map::new();
    let mut not_updated = Map::new();
    if let Some(update) = object_argument(arguments, "update")? {
        for (id, patch) in update {
            file_update(
                update_one(service, account, id, patch).await,
                id,
                &mut updated,
                &mut not_updated,
            );
        }
    }
    let mut destroyed = Vec::new();
    let mut not_destroyed = Map::new();
    match arguments.get("destroy") {
        None | Some(Value::Null) => {}
        Some(Value::Array(ids)) => {
            for item in ids {
                let Some(text) = item.as_str() else {
                    return Err(method_error("invalidArguments", "destroy holds a non-string"));
                };
                let found = match parse_email_id(text) {
                    Some(id) => service.find_email(account, id).map_err(service_error)?,
                    None => None,
                };
                let outcome = match found {
                    Some((_, email)) => service.destroy(account, email.id).await,
                    None => Err(ServiceError::NoSuchMessage(MessageId(0))),
                };
                match outcome {
                    Ok(()) => destroyed.push(json!(text)),
                    Err(ServiceError::NoSuchMessage(_)) => {
                        not_destroyed.insert(text.to_owned(), set_error("notFound", format!("no email {text}")));
                    }
                    Err(other) => {
                        not_destroyed.insert(text.to_owned(), service_error(other));
                    }
                }
            }
        }
        Some(_) => return Err(method_error("invalidArguments", "destroy is not an array")),
    }
    SetOutcome {
        created,
        not_created,
        updated,
        not_updated,
        destroyed,
        not_destroyed,
    }
    .respond(service, account, old_state)
}

/// One Email/set creation: the message written from its properties, then stored like an
/// import; `Err` is the SetError.
async fn create_one(
    jmap: &Jmap,
    account: &str,
    object: &Value,
    created_ids: &super::CreatedIds,
) -> Result<Value, Value> {
    let service = &jmap.service;
    let mut lookup = |blob_id: &str| -> Result<Option<Vec<u8>>, Value> {
        blobs::bytes(jmap, account, blob_id).map_err(service_error)
    };
    let draft = super::create::build(object, &mut lookup)?;
    let invalid_mailbox = || {
        let mut error = set_error("invalidProperties", format!("no mailbox {}", draft.mailbox));
        error["properties"] = json!(["mailboxIds"]);
        error
    };
    let mailbox_id = match draft.mailbox.strip_prefix('#') {
        Some(creation) => created_ids.get(creation).cloned().ok_or_else(invalid_mailbox)?,
        None => draft.mailbox.clone(),
    };
    let mailbox_name = mailbox::name_of(service, account, &mailbox_id)
        .map_err(service_error)?
        .ok_or_else(invalid_mailbox)?;
    let mut flags = Vec::with_capacity(draft.keywords.len());
    for keyword in &draft.keywords {
        flags.push(flag_of(keyword).map_err(|error| {
            let mut error = set_error("invalidProperties", error.to_string());
            error["properties"] = json!(["keywords"]);
            error
        })?);
    }
    store_message(
        service,
        account,
        mailbox_name,
        draft.raw,
        flags,
        draft.received_millis,
        "invalidProperties",
    )
    .await
}

/// Stores a message for Email/set create or Email/import and answers the created object (id,
/// blobId, threadId, size); a message the store refuses as invalid gets the SetError
/// `invalid_kind`.
async fn store_message(
    service: &MailService,
    account: &str,
    mailbox_name: String,
    raw: Vec<u8>,
    flags: Vec<Flag>,
    received_millis: Option<u64>,
    invalid_kind: &str,
) -> Result<Value, Value> {
    let thread_key = crate::service::threads::ThreadKey::of(&raw);
    let delivered = service
        .deliver(Delivery {
            account: account.to_owned(),
            mailbox: crate::service::MailboxTarget::Path(mailbox_name),
            raw,
            flags,
            received_millis,
            skip_duplicate: false,
        })
        .await
        .map_err(|error| match error {
            ServiceError::TooLarge { .. } => set_error("tooLarge", error.to_string()),
            ServiceError::Invalid(_) => set_error(invalid_kind, error.to_string()),
            other => service_error(other),
        })?;
    Ok(json!({
        "id": delivered.id.to_string(),
        "blobId": email_blob_id(delivered.id),
        "threadId": thread_key.thread_id(delivered.id),
        "size": delivered.size,
    }))
}

/// What one Email/import entry asks for, checked; `Err` is the SetError.
async fn import_one(jmap: &Jmap, account: &str, entry: &Value) -> Result<Value, Value> {
    let service = &jmap.service;
    let entry = entry
        .as_object()
        .ok_or_else(|| set_error("invalidProperties", "an import is not an object"))?;
    let invalid = |property: &str, description: &str| {
        let mut error = set_error("invalidProperties", description);
        error["properties"] = json!([property]);
        error
    };
    let blob_id = entry
        .get("blobId")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("blobId", "blobId is missing"))?;
    let mailbox_ids: Vec<&String> = match entry.get("mailboxIds") {
        Some(Value::Object(map)) => map
            .iter()
            .filter(|(_, value)| **value == Value::Bool(true))
            .map(|(id, _)| id)
            .collect(),
        _ => return Err(invalid("mailboxIds", "mailboxIds is missing")),
    };
    let [mailbox_id] = mailbox_ids.as_slice() else {
        return Err(invalid(
            "mailboxIds",
            "an email is in exactly one mailbox here (maxMailboxesPerEmail)",
        ));
    };
    let mailbox_name = mailbox::name_of(service, account, mailbox_id)
        .map_err(service_error)?
        .ok_or_else(|| invalid("mailboxIds", "no such mailbox"))?;
    let mut flags = Vec::new();
    match entry.get("keywords") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for (keyword, value) in map {
                if *value != Value::Bool(true) {
                    return Err(invalid("keywords", "a keyword's value must be true"));
                }
                flags.push(flag_of(keyword).map_err(|error| invalid("keywords", &error.to_string()))?);
            }
        }
        Some(_) => return Err(invalid("keywords", "keywords is not an object")),
    }
    let received_millis = match entry.get("receivedAt") {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => {
            let date =
                mail_parser::DateTime::parse_rfc3339(text).ok_or_else(|| invalid("receivedAt", "not a UTCDate"))?;
            Some(
                u64::try_from(date.to_timestamp())
                    .map_err(|_| invalid("receivedAt", "before 1970"))?
                    .saturating_mul(1000),
            )
        }
        Some(_) => return Err(invalid("receivedAt", "receivedAt is not a string")),
    };
    let raw = blobs::bytes(jmap, account, blob_id)
        .map_err(service_error)?
        .ok_or_else(|| set_error("blobNotFound", format!("no blob {blob_id}")))?;
    store_message(
        service,
        account,
        mailbox_name,
        raw,
        flags,
        received_millis,
        "invalidEmail",
    )
    .await
}

/// Email/import (RFC 8621 §4.8): stores uploaded blobs as emails.
pub(crate) async fn import(jmap: &Jmap, account: &str, arguments: &Map<String, Value>) -> MethodResult {
    let service = &jmap.service;
    let emails =
        object_argument(arguments, "emails")?.ok_or_else(|| method_error("invalidArguments", "emails is missing"))?;
    if emails.len() > MAX_OBJECTS_IN_SET {
        return Err(method_error(
            "requestTooLarge",
            format!("at most {MAX_OBJECTS_IN_SET} emails in one Email/import (maxObjectsInSet)"),
        ));
    }
    let old_state = check_in_state(service, account, arguments)?;
    let mut created = Map::new();
    let mut not_created = Map::new();
    for (creation, entry) in emails {
        match import_one(jmap, account, entry).await {
            Ok(object) => {
                created.insert(creation.clone(), object);
            }
            Err(error) => {
                not_created.insert(creation.clone(), error);
            }
        }
    }
    let new_state = service.account_state(account).map_err(service_error)?;
    Ok(json!({
        "accountId": account,
        "oldState": old_state,
        "newState": new_state,
        "created": created,
        "notCreated": not_created,
    }))
}

/// Email/copy (RFC 8620 §5.4, RFC 8621 §4.7). A copy goes between two different accounts
/// (`fromAccountId` MUST differ from `accountId`; within one account Email/set's mailboxIds is
/// the way), and a login here reaches one account: its own. So a copy naming the login's
/// account twice gets invalidArguments, one from any other account fromAccountNotFound, and one
/// into another account accountNotFound (checked for every method before it runs).
pub fn copy(account: &str, arguments: &Map<String, Value>) -> MethodResult {
    let from = required_string(arguments, "fromAccountId")?;
    let to = required_string(arguments, "accountId")?;
    if from == to {
        return Err(method_error(
            "invalidArguments",
            "fromAccountId must differ from accountId (RFC 8620 §5.4): within one account, change mailboxIds with \
             Email/set",
        ));
    }
    Err(method_error(
        "fromAccountNotFound",
        format!("{from} is not an account this login can read (it reaches only {account})"),
    ))
}

/// Whether bytes open with a header field: a field name of printable ASCII other than the
/// colon, then a colon.
fn starts_with_header_field(raw: &[u8]) -> bool {
    let name_length = raw
        .iter()
        .take_while(|byte| (33..=126).contains(*byte) && **byte != b':')
        .count();
    name_length > 0 && raw.get(name_length) == Some(&b':')
}

/// The properties Email/parse gives when the client names none (RFC 8621 §4.9): Email/get's
/// default, less what only a stored email has and the blob's id and size.
fn parse_default_properties() -> Vec<String> {
    default_properties()
        .into_iter()
        .filter(|name| {
            !matches!(
                name.as_str(),
                "id" | "blobId" | "threadId" | "mailboxIds" | "keywords" | "size" | "receivedAt"
            )
        })
        .collect()
}

/// Email/parse (RFC 8621 §4.9): uploaded blobs (or emails' blobs) of message/rfc822 read into
/// Email objects without storing them. Properties only a stored email has (id, mailboxIds,
/// keywords, receivedAt, threadId) are null; a blob with no header at all is notParsable.
pub(crate) fn parse(jmap: &Jmap, account: &str, arguments: &Map<String, Value>) -> MethodResult {
    let blob_ids = match arguments.get("blobIds") {
        Some(Value::Array(ids)) => ids,
        _ => return Err(method_error("invalidArguments", "blobIds is missing or not an array")),
    };
    if blob_ids.len() > MAX_OBJECTS_IN_GET {
        return Err(method_error(
            "requestTooLarge",
            format!("at most {MAX_OBJECTS_IN_GET} blobIds in one Email/parse (maxObjectsInGet)"),
        ));
    }
    let properties = properties_argument(arguments, PROPERTIES)?.unwrap_or_else(parse_default_properties);
    for property in properties.iter().filter(|property| property.starts_with("header:")) {
        parse_header_property(property)?;
    }
    let options = super::body::body_options(arguments)?;
    let mut parsed = Map::new();
    let mut not_parsable = Vec::new();
    let mut not_found = Vec::new();
    for blob_id in blob_ids {
        let Some(blob_id) = blob_id.as_str() else {
            return Err(method_error("invalidArguments", "blobIds holds a non-string"));
        };
        let Some(raw) = blobs::bytes(jmap, account, blob_id).map_err(service_error)? else {
            not_found.push(json!(blob_id));
            continue;
        };
        // mail-parser reads anything as a message: bytes that do not start with a header field
        // (RFC 5322 §2.2: a name of printable ASCII, then a colon) are not one.
        let message = starts_with_header_field(&raw)
            .then(|| mail_parser::MessageParser::default().parse(&raw))
            .flatten();
        let Some(message) = message else {
            not_parsable.push(json!(blob_id));
            continue;
        };
        let mut object = Map::new();
        for property in &properties {
            let value = match property.as_str() {
                "id" | "mailboxIds" | "keywords" | "receivedAt" | "threadId" => Value::Null,
                "blobId" => json!(blob_id),
                "size" => json!(raw.len()),
                other => message_value(&message, other, blob_id, &options),
            };
            object.insert(property.clone(), value);
        }
        parsed.insert(blob_id.to_owned(), Value::Object(object));
    }
    let or_null = |list: Vec<Value>| {
        if list.is_empty() {
            Value::Null
        } else {
            Value::Array(list)
        }
    };
    Ok(json!({
        "accountId": account,
        "parsed": if parsed.is_empty() { Value::Null } else { Value::Object(parsed) },
        "notParsable": or_null(not_parsable),
        "notFound": or_null(not_found),
    }))
}
