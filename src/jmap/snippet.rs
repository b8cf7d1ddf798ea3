//! SearchSnippet/get (RFC 8621 §5): an email's subject and a piece of its body with the words a
//! search filter looked for marked, for a result list to show why an email matched.
//!
//! The words are cut exactly as the full-text index cuts them ([`crate::search::words`]), so what
//! is marked is what the index matched on: the filter's `text` words are marked in the subject
//! and the body, `subject` words in the subject, `body` words in the body. Other conditions do
//! not mark anything. Everything outside the `<mark>` tags is HTML-escaped, and the preview is
//! at most [`PREVIEW_CHARACTERS`] characters of body text (white space runs as one space) around
//! the first match. An email with no match in its subject (or body) gets null for it.

use std::collections::HashSet;

use serde_json::{json, Map, Value};

use crate::service::ServiceError;

use super::email::parse_email_id;
use super::{method_error, service_error, Jmap, MethodResult, MAX_OBJECTS_IN_GET};

/// The most characters of body text a preview shows.
pub const PREVIEW_CHARACTERS: usize = 200;
/// How many characters of context a preview shows before its first match.
const CONTEXT_BEFORE: usize = 50;

/// The words each part of an email is marked with.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MarkedWords {
    pub subject: HashSet<String>,
    pub body: HashSet<String>,
}

/// Collects the words of a filter's text, subject and body conditions, at any depth (a filter is
/// checked for shape: operators over conditions, strings where strings belong).
pub fn marked_words(filter: Option<&Value>) -> Result<MarkedWords, Value> {
    let mut words = MarkedWords::default();
    super::parse_filter(filter, &mut |condition: &Map<String, Value>| {
        for (name, value) in condition {
            let targets: &[bool] = match name.as_str() {
                "text" => &[true, true],
                "subject" => &[true, false],
                "body" => &[false, true],
                _ => continue,
            };
            let text = value
                .as_str()
                .ok_or_else(|| method_error("invalidArguments", format!("{name} is not a string")))?;
            for (_, word) in crate::search::words(text) {
                if targets[0] {
                    words.subject.insert(word.clone());
                }
                if targets[1] {
                    words.body.insert(word);
                }
            }
        }
        Ok(())
    })?;
    Ok(words)
}

/// Escapes text for HTML.
pub fn escape_html(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for character in text.chars() {
        match character {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            other => escaped.push(other),
        }
    }
    escaped
}

fn collapse(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_space = false;
    for character in text.chars() {
        if character.is_whitespace() {
            if !in_space {
                out.push(' ');
            }
            in_space = true;
        } else {
            out.push(character);
            in_space = false;
        }
    }
    out
}

/// `text` with every word in `words` in `<mark>`, HTML-escaped and with white space runs as one
/// space; `None` when no word matches.
pub fn mark(text: &str, words: &HashSet<String>) -> Option<String> {
    let found: Vec<std::ops::Range<usize>> = crate::search::words(text)
        .into_iter()
        .filter(|(_, word)| words.contains(word))
        .map(|(range, _)| range)
        .collect();
    if found.is_empty() {
        return None;
    }
    let mut out = String::new();
    let mut at = 0;
    for range in found {
        out.push_str(&escape_html(&collapse(&text[at..range.start])));
        out.push_str("<mark>");
        out.push_str(&escape_html(&text[range.clone()]));
        out.push_str("</mark>");
        at = range.end;
    }
    out.push_str(&escape_html(&collapse(&text[at..])));
    Some(out.trim().to_owned())
}

/// A piece of `body` around its first match, marked; `None` when nothing matches.
pub fn preview(body: &str, words: &HashSet<String>) -> Option<String> {
    let first = crate::search::words(body)
        .into_iter()
        .find(|(_, word)| words.contains(word))?
        .0;
    // Up to CONTEXT_BEFORE characters before the match, from a word's start where one is near.
    let mut start = body[..first.start]
        .char_indices()
        .rev()
        .nth(CONTEXT_BEFORE.saturating_sub(1))
        .map_or(0, |(index, _)| index);
    if start > 0 {
        if let Some(space) = body[start..first.start].find(char::is_whitespace) {
            start += space;
        }
    }
    let end = body[start..]
        .char_indices()
        .nth(PREVIEW_CHARACTERS)
        .map_or(body.len(), |(index, _)| start + index);
    mark(&body[start..end], words)
}

/// SearchSnippet/get (RFC 8621 §5.1).
pub(crate) fn get(jmap: &Jmap, account: &str, arguments: &Map<String, Value>) -> MethodResult {
    let service = &jmap.service;
    let ids = match arguments.get("emailIds") {
        Some(Value::Array(ids)) => ids,
        _ => return Err(method_error("invalidArguments", "emailIds is missing or not an array")),
    };
    if ids.len() > MAX_OBJECTS_IN_GET {
        return Err(method_error(
            "requestTooLarge",
            format!("at most {MAX_OBJECTS_IN_GET} emailIds (maxObjectsInGet)"),
        ));
    }
    let words = marked_words(arguments.get("filter"))?;
    let mut list = Vec::with_capacity(ids.len());
    let mut not_found = Vec::new();
    for id in ids {
        let Some(text) = id.as_str() else {
            return Err(method_error("invalidArguments", "emailIds holds a non-string"));
        };
        let found = match parse_email_id(text) {
            Some(id) => service.find_email(account, id).map_err(service_error)?,
            None => None,
        };
        let Some((_, email)) = found else {
            not_found.push(json!(text));
            continue;
        };
        let raw = match service.raw(account, email.id) {
            Ok(raw) => Some(raw),
            Err(ServiceError::BodyNotYetHere) => None,
            Err(ServiceError::NoSuchMessage(_)) => {
                not_found.push(json!(text));
                continue;
            }
            Err(other) => return Err(service_error(other)),
        };
        let (subject, preview) = match raw {
            Some(raw) => {
                let searched = crate::mail::search_text(&raw);
                (
                    mark(&searched.subject, &words.subject),
                    preview(&searched.body, &words.body),
                )
            }
            // The bytes are not here yet: the subject as listed can still be marked.
            None => (mark(&email.subject, &words.subject), None),
        };
        list.push(json!({ "emailId": text, "subject": subject, "preview": preview }));
    }
    Ok(super::get_response(account, None, list, not_found))
}

#[cfg(test)]
mod tests {
    use super::{mark, preview};
    use std::collections::HashSet;

    #[test]
    fn marks_words_as_the_index_cuts_them_and_escapes_the_rest() {
        let words: HashSet<String> = ["plan".to_owned(), "café".to_owned()].into();
        assert_eq!(
            mark("The <big> PLAN & the Café", &words).as_deref(),
            Some("The &lt;big&gt; <mark>PLAN</mark> &amp; the <mark>Café</mark>")
        );
        assert_eq!(mark("nothing here", &words), None);
        let body = format!("{} the plan\n\n is {}", "filler ".repeat(40), "more ".repeat(100));
        let shown = preview(&body, &words).unwrap();
        assert!(shown.contains("<mark>plan</mark> is more"), "{shown}");
        assert!(shown.starts_with("filler"), "{shown}");
        assert!(shown.chars().count() < 260, "{shown}");
        assert_eq!(preview("no match", &words), None);
    }
}
