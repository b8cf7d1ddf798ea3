//! JMAP Thread objects (RFC 8621 §3): Thread/get and Thread/changes, over the node's thread
//! index ([`crate::service::threads`]), whose thread ids every node computes alike from the
//! emails' own headers. Their states are the account's portable change-feed states, like every
//! other state here.

use serde_json::{json, Map, Value};

use super::{ids_argument, method_error, optional_count, required_string, service_error, Jmap, MethodResult};

/// The most threads one Thread/changes lists when the client sets no `maxChanges`.
pub const DEFAULT_MAX_CHANGES: usize = 500;

/// Thread/get (RFC 8620 §5.1, RFC 8621 §3.1).
pub(crate) fn get(jmap: &Jmap, account: &str, arguments: &Map<String, Value>) -> MethodResult {
    let service = &jmap.service;
    let Some(ids) = ids_argument(arguments)? else {
        return Err(method_error(
            "requestTooLarge",
            "Thread/get needs ids: read them from Email/get's threadId",
        ));
    };
    if let Some(properties) = arguments.get("properties").filter(|value| !value.is_null()) {
        let known = properties.as_array().is_some_and(|items| {
            items
                .iter()
                .all(|item| matches!(item.as_str(), Some("id" | "emailIds")))
        });
        if !known {
            return Err(method_error(
                "invalidArguments",
                "a Thread has the properties id and emailIds",
            ));
        }
    }
    // The state first: the threads read after it hold at least what it says.
    let state = service.account_state(account).map_err(service_error)?;
    let threads = jmap.threads.threads(service, account, &ids).map_err(service_error)?;
    let mut list = Vec::new();
    let mut not_found = Vec::new();
    for (id, thread) in ids.iter().zip(threads) {
        match thread {
            Some(thread) => list.push(json!({
                "id": thread.id,
                "emailIds": thread.emails.iter().map(ToString::to_string).collect::<Vec<_>>(),
            })),
            None => not_found.push(json!(id)),
        }
    }
    Ok(super::get_response(account, Some(state), list, not_found))
}

/// Thread/changes (RFC 8620 §5.2) on the account's portable change feed.
pub(crate) fn changes(jmap: &Jmap, account: &str, arguments: &Map<String, Value>) -> MethodResult {
    let since = required_string(arguments, "sinceState")?;
    let max = match optional_count(arguments, "maxChanges")? {
        Some(0) => return Err(method_error("invalidArguments", "maxChanges must be positive")),
        Some(max) => (max as usize).min(super::MAX_OBJECTS_IN_GET),
        None => DEFAULT_MAX_CHANGES,
    };
    let changes = jmap
        .threads
        .changes(&jmap.service, account, since, max)
        .map_err(service_error)?;
    Ok(json!({
        "accountId": account,
        "oldState": since,
        "newState": changes.new_state,
        "hasMoreChanges": changes.has_more,
        "created": changes.created,
        "updated": changes.updated,
        "destroyed": changes.destroyed,
    }))
}
