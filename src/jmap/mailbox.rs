//! JMAP Mailbox objects (RFC 8621 §2): Mailbox/get and Mailbox/changes over the service's
//! mailboxes.
//!
//! Mailboxes are still addressed by name in the service; their JMAP id is the mailbox key's
//! fixed 128-bit handle printed in Crockford base32 ([`jmap_id`]), and [`name_of`] goes back.
//! These two functions are the only places that know it, so they are what changes when the
//! service gives mailboxes stable IDs. Names are flat (no `parentId` yet), only INBOX has a role,
//! and a mailbox cannot be created, renamed or destroyed over JMAP yet (its rights say so).
//!
//! A mailbox's counts change with its emails, so Mailbox/changes is read off the account's email
//! change feed: every mailbox that holds (or held) a changed email is reported as updated, and
//! the state is the same portable token as Email's.

use serde_json::{json, Map, Value};

use crate::model::MailboxId;
use crate::service::{MailService, MailboxSummary, ServiceError};

use super::{
    ids_argument, method_error, optional_count, properties_argument, required_string, service_error, MethodResult,
};

const PROPERTIES: &[&str] = &[
    "id",
    "name",
    "parentId",
    "role",
    "sortOrder",
    "totalEmails",
    "unreadEmails",
    "totalThreads",
    "unreadThreads",
    "myRights",
    "isSubscribed",
];

/// The most changes one Mailbox/changes reads from the email feed before it answers
/// `hasMoreChanges`.
const MAX_FEED_CHANGES: usize = 5000;

/// A mailbox's JMAP id: its key's handle, 26 Crockford base32 characters.
pub fn jmap_id(id: MailboxId) -> String {
    id.to_string()
}

/// The name of the account's mailbox with this JMAP id, if there is one.
pub fn name_of(service: &MailService, account: &str, id: &str) -> Result<Option<String>, ServiceError> {
    let Ok(handle) = id.parse::<MailboxId>() else {
        return Ok(None);
    };
    service.mailbox_name_by_id(account, handle)
}

fn object(summary: &MailboxSummary, properties: &Option<Vec<String>>) -> Result<Value, ServiceError> {
    let id = jmap_id(summary.id);
    let role = summary.role.map(|role| role.as_str());
    let leaf = summary
        .name
        .rsplit(crate::mailbox::SEPARATOR)
        .next()
        .unwrap_or(&summary.name);
    let full = json!({
        "id": id,
        "name": leaf,
        "parentId": summary.parent.map(jmap_id),
        "role": role,
        "sortOrder": summary.sort_order,
        "totalEmails": summary.total,
        "unreadEmails": summary.unseen,
        // Every email is its own thread until threads are computed.
        "totalThreads": summary.total,
        "unreadThreads": summary.unseen,
        "myRights": {
            "mayReadItems": true,
            "mayAddItems": true,
            "mayRemoveItems": true,
            "maySetSeen": true,
            "maySetKeywords": true,
            "mayCreateChild": false,
            "mayRename": false,
            "mayDelete": false,
            "maySubmit": false,
        },
        "isSubscribed": summary.subscribed,
    });
    Ok(match properties {
        None => full,
        Some(names) => {
            let mut picked = Map::new();
            picked.insert("id".into(), full["id"].clone());
            for name in names {
                if let Some(value) = full.get(name.as_str()) {
                    picked.insert(name.clone(), value.clone());
                }
            }
            Value::Object(picked)
        }
    })
}

/// Mailbox/get (RFC 8620 §5.1).
pub fn get(service: &MailService, account: &str, arguments: &Map<String, Value>) -> MethodResult {
    let ids = ids_argument(arguments)?;
    let properties = properties_argument(arguments, PROPERTIES)?;
    let state = service.account_state(account).map_err(service_error)?;
    let mailboxes = service.mailboxes(account).map_err(service_error)?;
    let mut list = Vec::new();
    let mut not_found = Vec::new();
    match ids {
        None => {
            for mailbox in &mailboxes {
                list.push(object(mailbox, &properties).map_err(service_error)?);
            }
        }
        Some(ids) => {
            let mut by_id = std::collections::HashMap::with_capacity(mailboxes.len());
            for mailbox in &mailboxes {
                by_id.insert(jmap_id(mailbox.id), mailbox);
            }
            for id in ids {
                match by_id.get(&id) {
                    Some(mailbox) => list.push(object(mailbox, &properties).map_err(service_error)?),
                    None => not_found.push(Value::String(id)),
                }
            }
        }
    }
    Ok(json!({ "accountId": account, "state": state, "list": list, "notFound": not_found }))
}

/// Mailbox/changes (RFC 8620 §5.2), read off the email change feed.
pub fn changes(service: &MailService, account: &str, arguments: &Map<String, Value>) -> MethodResult {
    let since = required_string(arguments, "sinceState")?;
    if optional_count(arguments, "maxChanges")? == Some(0) {
        return Err(method_error("invalidArguments", "maxChanges must be positive"));
    }
    let changes = service
        .account_changes(account, Some(since), MAX_FEED_CHANGES)
        .map_err(service_error)?;
    // Mailboxes whose records changed, and those an email moved into, out of or within.
    let mut touched: std::collections::BTreeSet<MailboxId> = changes.mailboxes.iter().copied().collect();
    for changed in changes.created.iter().chain(&changes.updated) {
        touched.extend(changed.mailbox);
    }
    let existing: std::collections::BTreeSet<MailboxId> = service
        .mailboxes(account)
        .map_err(service_error)?
        .into_iter()
        .map(|mailbox| mailbox.id)
        .collect();
    let updated: Vec<String> = touched
        .iter()
        .filter(|id| existing.contains(id))
        .map(|id| jmap_id(*id))
        .collect();
    let destroyed: Vec<String> = changes
        .mailboxes
        .iter()
        .filter(|id| !existing.contains(id))
        .map(|id| jmap_id(*id))
        .collect();
    Ok(json!({
        "accountId": account,
        "oldState": since,
        "newState": changes.new_state,
        "hasMoreChanges": changes.has_more,
        // Whether a changed mailbox was created since the state is not known here, so every
        // live one is listed as updated (clients fetch an id they do not know); a deleted one as
        // destroyed.
        "created": [],
        "updated": updated,
        "destroyed": destroyed,
        "updatedProperties": null,
    }))
}
