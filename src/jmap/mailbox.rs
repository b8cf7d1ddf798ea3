//! JMAP Mailbox objects (RFC 8621 §2): Mailbox/get, /changes, /set, /query and /queryChanges
//! over the service's replicated mailboxes.
//!
//! A mailbox's JMAP id is its stable service ID printed in Crockford base32 ([`jmap_id`]); it
//! survives renames and moves. The JMAP `name` is the last level of the service's path and
//! `parentId` the level above, so Mailbox/set's name and parentId changes are one service rename
//! (a move in the tree). The INBOX cannot be renamed, moved, given another role or destroyed
//! (its `myRights` say so); every other mailbox can.
//!
//! Mailbox/set's SetErrors follow RFC 8621 §2.5: a name a sibling already has, a parent that
//! does not exist, a move under itself or the inbox role are `invalidProperties` naming the
//! property; changing the INBOX is `forbidden`; destroying a mailbox with children is
//! `mailboxHasChild`, and one with emails `mailboxHasEmail` unless `onDestroyRemoveEmails` is
//! true (then its emails are destroyed: an email is in exactly one mailbox here). An email
//! delivered into the mailbox between that check and the delete is destroyed with it.
//!
//! Mailbox/query filters (parentId, name, role, hasAnyRole, isSubscribed, under AND/OR/NOT) and
//! sorts (name, sortOrder) in memory: an account has few mailboxes. `sortAsTree` and
//! `filterAsTree` are served. Mailbox/queryChanges is computed, not refused: every mailbox whose
//! record changed since the query state (and, for the tree forms, every mailbox below one) is
//! listed as removed, and those of them in the results now are added at their index. The other
//! mailboxes kept their properties, so their order is unchanged, and the client that applies the
//! answer holds the new results exactly. `upToId` is ignored (names and parents can change).
//!
//! A mailbox's counts change with its emails, so Mailbox/changes is read off the account's email
//! change feed: every mailbox that holds (or held) a changed email is reported as updated, and
//! the state is the same portable token as Email's.

use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap};

use serde_json::{json, Map, Value};

use crate::mailbox::{Role, SEPARATOR};
use crate::model::MailboxId;
use crate::service::{MailService, MailboxSummary, MailboxUpdate, ServiceError};

use super::{
    check_in_state, check_set_size, file_update, flag_argument, ids_argument, invalid_property, max_changes_argument,
    method_error, object_argument, optional_count, parse_filter, properties_argument, query_changes_response,
    query_window, required_string, service_error, set_error, CreatedIds, FilterTree, MethodResult, SetOutcome,
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

/// The last level of a mailbox's path: its JMAP name.
fn leaf(summary: &MailboxSummary) -> &str {
    summary.name.rsplit(SEPARATOR).next().unwrap_or(&summary.name)
}

/// What the account's owner may do with a mailbox: everything, but rename, move or delete the
/// INBOX.
fn rights(summary: &MailboxSummary) -> Value {
    let not_inbox = summary.role != Some(Role::Inbox);
    let mut rights = Map::with_capacity(9);
    for (name, allowed) in [
        ("mayReadItems", true),
        ("mayAddItems", true),
        ("mayRemoveItems", true),
        ("maySetSeen", true),
        ("maySetKeywords", true),
        ("mayCreateChild", true),
        ("mayRename", not_inbox),
        ("mayDelete", not_inbox),
        ("maySubmit", false),
    ] {
        rights.insert(name.into(), Value::Bool(allowed));
    }
    Value::Object(rights)
}

/// One property of a mailbox object, `None` for a name that is not one.
fn property(summary: &MailboxSummary, name: &str) -> Option<Value> {
    Some(match name {
        "id" => Value::String(jmap_id(summary.id)),
        "name" => Value::String(leaf(summary).to_owned()),
        "parentId" => summary
            .parent
            .map_or(Value::Null, |parent| Value::String(jmap_id(parent))),
        "role" => summary
            .role
            .map_or(Value::Null, |role| Value::String(role.as_str().to_owned())),
        "sortOrder" => Value::from(summary.sort_order),
        "totalEmails" => Value::from(summary.total),
        "unreadEmails" => Value::from(summary.unseen),
        // Every email is its own thread until threads are computed.
        "totalThreads" => Value::from(summary.total),
        "unreadThreads" => Value::from(summary.unseen),
        "myRights" => rights(summary),
        "isSubscribed" => Value::Bool(summary.subscribed),
        _ => return None,
    })
}

/// A mailbox object with the asked properties (all when `None`), built property by property:
/// a Mailbox/get of 1,000 mailboxes builds 1,000 of these.
fn object(summary: &MailboxSummary, properties: &Option<Vec<String>>) -> Value {
    let mut object = Map::new();
    object.insert("id".into(), Value::String(jmap_id(summary.id)));
    let names: &mut dyn Iterator<Item = &str> = match properties {
        None => &mut PROPERTIES.iter().copied(),
        Some(names) => &mut names.iter().map(String::as_str),
    };
    for name in names {
        if name != "id" {
            if let Some(value) = property(summary, name) {
                object.insert(name.to_owned(), value);
            }
        }
    }
    Value::Object(object)
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
                list.push(object(mailbox, &properties));
            }
        }
        Some(ids) => {
            let mut by_id = std::collections::HashMap::with_capacity(mailboxes.len());
            for mailbox in &mailboxes {
                by_id.insert(jmap_id(mailbox.id), mailbox);
            }
            for id in ids {
                match by_id.get(&id) {
                    Some(mailbox) => list.push(object(mailbox, &properties)),
                    None => not_found.push(Value::String(id)),
                }
            }
        }
    }
    Ok(super::get_response(account, Some(state), list, not_found))
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

/// The mailbox properties a client may set, as one /set object or patch gives them.
#[derive(Default)]
struct Fields {
    name: Option<String>,
    /// `Some(None)`: top level; the text may be a creation reference (`#x`).
    parent: Option<Option<String>>,
    role: Option<Option<Role>>,
    sort_order: Option<u32>,
    subscribed: Option<bool>,
}

const SERVER_SET: &[&str] = &[
    "id",
    "totalEmails",
    "unreadEmails",
    "totalThreads",
    "unreadThreads",
    "myRights",
];

/// Reads a Mailbox/set create object or update patch; `Err` is the SetError.
fn read_fields(object: &Map<String, Value>) -> Result<Fields, Value> {
    let mut fields = Fields::default();
    for (property, value) in object {
        match (property.as_str(), value) {
            ("name", Value::String(name)) => {
                if name.chars().count() > 255 {
                    return Err(invalid_property("name", "a name has at most 255 characters"));
                }
                crate::mailbox::validate_name(name)
                    .map_err(|error| invalid_property("name", format!("{name:?}: {error}")))?;
                fields.name = Some(name.clone());
            }
            ("parentId", Value::Null) => fields.parent = Some(None),
            ("parentId", Value::String(parent)) => fields.parent = Some(Some(parent.clone())),
            ("role", Value::Null) => fields.role = Some(None),
            ("role", Value::String(role)) => {
                let role = role
                    .parse::<Role>()
                    .ok()
                    .filter(|role| *role != Role::Inbox)
                    .ok_or_else(|| {
                        invalid_property("role", "the role is one of archive, drafts, junk, sent and trash")
                    })?;
                fields.role = Some(Some(role));
            }
            ("sortOrder", value) => {
                let order = value
                    .as_u64()
                    .and_then(|order| u32::try_from(order).ok())
                    .ok_or_else(|| invalid_property("sortOrder", "sortOrder is an unsigned 32-bit integer"))?;
                fields.sort_order = Some(order);
            }
            ("isSubscribed", Value::Bool(subscribed)) => fields.subscribed = Some(*subscribed),
            (name, _) if SERVER_SET.contains(&name) => {
                return Err(invalid_property(name, format!("{name} is set by the server")));
            }
            ("name" | "parentId" | "role" | "isSubscribed", _) => {
                return Err(invalid_property(property, format!("{property} has the wrong type")));
            }
            _ => return Err(invalid_property(property, format!("no property {property}"))),
        }
    }
    Ok(fields)
}

/// A mailbox id from a /set, which may name a creation of this request (`#x`).
fn resolve_id(text: &str, created_ids: &CreatedIds) -> Option<MailboxId> {
    let text = match text.strip_prefix('#') {
        Some(creation) => created_ids.get(creation)?,
        None => text,
    };
    text.parse().ok()
}

/// The mailbox a parentId names, or the SetError.
fn parent_summary(
    service: &MailService,
    account: &str,
    text: &str,
    created_ids: &CreatedIds,
) -> Result<MailboxSummary, Value> {
    let missing = || invalid_property("parentId", format!("no mailbox {text}"));
    let id = resolve_id(text, created_ids).ok_or_else(missing)?;
    match service.mailbox(account, id) {
        Ok(summary) => Ok(summary),
        Err(ServiceError::NoSuchMailbox(_)) => Err(missing()),
        Err(other) => Err(service_error(other)),
    }
}

fn path_under(parent: Option<&MailboxSummary>, name: &str) -> String {
    match parent {
        Some(parent) => format!("{}{SEPARATOR}{name}", parent.name),
        None => name.to_owned(),
    }
}

/// The SetError a refused mailbox write gets.
fn write_error(error: ServiceError) -> Value {
    match error {
        ServiceError::MailboxExists(path) => invalid_property("name", format!("a sibling is named {path:?} already")),
        ServiceError::Invalid(reason) => invalid_property("name", reason),
        ServiceError::NoSuchMailbox(id) => set_error("notFound", format!("no mailbox {id}")),
        ServiceError::MailboxHasChildren(path) => set_error("mailboxHasChild", format!("{path:?} has children")),
        other => service_error(other),
    }
}

async fn create_one(
    service: &MailService,
    account: &str,
    object: &Value,
    created_ids: &CreatedIds,
) -> Result<MailboxSummary, Value> {
    let object = object
        .as_object()
        .ok_or_else(|| set_error("invalidProperties", "a mailbox to create is not an object"))?;
    let fields = read_fields(object)?;
    let name = fields
        .name
        .as_deref()
        .ok_or_else(|| invalid_property("name", "a new mailbox needs a name"))?;
    let parent = match fields.parent.clone().flatten() {
        Some(text) => Some(parent_summary(service, account, &text, created_ids)?),
        None => None,
    };
    let path = path_under(parent.as_ref(), name);
    let created = service
        .create_mailbox(account, &path, fields.role.flatten())
        .await
        .map_err(write_error)?;
    if fields.sort_order.is_none() && fields.subscribed.is_none() {
        return Ok(created);
    }
    let update = MailboxUpdate {
        role: None,
        subscribed: fields.subscribed,
        sort_order: fields.sort_order,
    };
    service
        .update_mailbox(account, created.id, update)
        .await
        .map_err(write_error)
}

async fn update_one(
    service: &MailService,
    account: &str,
    id: MailboxId,
    patch: &Value,
    created_ids: &CreatedIds,
) -> Result<(), Value> {
    let current = match service.mailbox(account, id) {
        Ok(summary) => summary,
        Err(ServiceError::NoSuchMailbox(_)) => return Err(set_error("notFound", format!("no mailbox {id}"))),
        Err(other) => return Err(service_error(other)),
    };
    let patch = patch
        .as_object()
        .ok_or_else(|| set_error("invalidPatch", "the patch is not an object"))?;
    let fields = read_fields(patch)?;
    let is_inbox = current.role == Some(Role::Inbox);
    let new_name = fields.name.clone().unwrap_or_else(|| leaf(&current).to_owned());
    let new_parent = match &fields.parent {
        None => match current.parent {
            Some(parent) => Some(service.mailbox(account, parent).map_err(service_error)?),
            None => None,
        },
        Some(None) => None,
        Some(Some(text)) => Some(parent_summary(service, account, text, created_ids)?),
    };
    let path = path_under(new_parent.as_ref(), &new_name);
    if path != current.name {
        if is_inbox {
            return Err(set_error("forbidden", "the INBOX cannot be renamed or moved"));
        }
        let inside = format!("{}{SEPARATOR}", current.name);
        if new_parent
            .as_ref()
            .is_some_and(|parent| parent.id == id || parent.name.starts_with(&inside))
        {
            return Err(invalid_property("parentId", "a mailbox cannot move under itself"));
        }
        service.rename_mailbox(account, id, &path).await.map_err(write_error)?;
    }
    let role = match fields.role {
        Some(role) if role != current.role => {
            if is_inbox {
                return Err(set_error("forbidden", "the INBOX keeps the inbox role"));
            }
            Some(role)
        }
        _ => None,
    };
    if role.is_some() || fields.sort_order.is_some() || fields.subscribed.is_some() {
        let update = MailboxUpdate {
            role,
            subscribed: fields.subscribed,
            sort_order: fields.sort_order,
        };
        service.update_mailbox(account, id, update).await.map_err(write_error)?;
    }
    Ok(())
}

async fn destroy_one(
    service: &MailService,
    account: &str,
    summary: &MailboxSummary,
    remove_emails: bool,
) -> Result<(), Value> {
    if summary.role == Some(Role::Inbox) {
        return Err(set_error("forbidden", "the INBOX cannot be destroyed"));
    }
    let mailboxes = service.mailboxes(account).map_err(service_error)?;
    if mailboxes.iter().any(|mailbox| mailbox.parent == Some(summary.id)) {
        return Err(set_error(
            "mailboxHasChild",
            "destroy or move its child mailboxes first",
        ));
    }
    let now = mailboxes.iter().find(|mailbox| mailbox.id == summary.id);
    let Some(now) = now else {
        return Err(set_error("notFound", format!("no mailbox {}", jmap_id(summary.id))));
    };
    if now.total > 0 && !remove_emails {
        return Err(set_error(
            "mailboxHasEmail",
            format!(
                "the mailbox holds {} emails: move them, or set onDestroyRemoveEmails",
                now.total
            ),
        ));
    }
    service
        .delete_mailbox(account, summary.id)
        .await
        .map(|_| ())
        .map_err(write_error)
}

/// Mailbox/set (RFC 8620 §5.3, RFC 8621 §2.5).
pub async fn set(
    service: &MailService,
    account: &str,
    arguments: &Map<String, Value>,
    created_ids: &mut CreatedIds,
) -> MethodResult {
    check_set_size(arguments)?;
    let remove_emails = flag_argument(arguments, "onDestroyRemoveEmails")?;
    let old_state = check_in_state(service, account, arguments)?;

    // Creations in an order where a parent named by a creation id comes before its children.
    let mut created = Map::new();
    let mut not_created = Map::new();
    if let Some(create) = object_argument(arguments, "create")? {
        let mut pending: Vec<(&String, &Value)> = create.iter().collect();
        while !pending.is_empty() {
            let waits_for_sibling = |object: &Value| {
                object
                    .get("parentId")
                    .and_then(Value::as_str)
                    .and_then(|parent| parent.strip_prefix('#'))
                    .is_some_and(|parent| !created_ids.contains_key(parent) && create.contains_key(parent))
                    && !not_created_any(&not_created, object)
            };
            let (ready, waiting): (Vec<_>, Vec<_>) =
                pending.into_iter().partition(|(_, object)| !waits_for_sibling(object));
            if ready.is_empty() {
                for (creation, _) in waiting {
                    not_created.insert(
                        creation.clone(),
                        invalid_property("parentId", "the parents named by creation ids form a cycle"),
                    );
                }
                break;
            }
            for (creation, object) in ready {
                match create_one(service, account, object, created_ids).await {
                    Ok(summary) => {
                        let id = jmap_id(summary.id);
                        created_ids.insert(creation.clone(), id.clone());
                        created.insert(
                            creation.clone(),
                            json!({
                                "id": id,
                                "role": summary.role.map(|role| role.as_str()),
                                "sortOrder": summary.sort_order,
                                "isSubscribed": summary.subscribed,
                                "totalEmails": summary.total,
                                "unreadEmails": summary.unseen,
                                "totalThreads": summary.total,
                                "unreadThreads": summary.unseen,
                                "myRights": rights(&summary),
                            }),
                        );
                    }
                    Err(error) => {
                        not_created.insert(creation.clone(), error);
                    }
                }
            }
            pending = waiting;
        }
    }

    let mut updated = Map::new();
    let mut not_updated = Map::new();
    if let Some(update) = object_argument(arguments, "update")? {
        for (text, patch) in update {
            let outcome = match resolve_id(text, created_ids) {
                Some(id) => update_one(service, account, id, patch, created_ids).await,
                None => Err(set_error("notFound", format!("no mailbox {text}"))),
            };
            file_update(outcome, text, &mut updated, &mut not_updated);
        }
    }

    let mut destroyed = Vec::new();
    let mut not_destroyed = Map::new();
    match arguments.get("destroy") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            let mut targets = Vec::new();
            for item in items {
                let Some(text) = item.as_str() else {
                    return Err(method_error("invalidArguments", "destroy holds a non-string"));
                };
                let summary = match resolve_id(text, created_ids).map(|id| service.mailbox(account, id)) {
                    Some(Ok(summary)) => summary,
                    Some(Err(ServiceError::NoSuchMailbox(_))) | None => {
                        not_destroyed.insert(text.to_owned(), set_error("notFound", format!("no mailbox {text}")));
                        continue;
                    }
                    Some(Err(other)) => return Err(service_error(other)),
                };
                targets.push((text.to_owned(), summary));
            }
            // Children before their parents, so a subtree destroyed in one call goes.
            targets.sort_by_key(|(_, summary)| std::cmp::Reverse(summary.name.matches(SEPARATOR).count()));
            for (text, summary) in targets {
                match destroy_one(service, account, &summary, remove_emails).await {
                    Ok(()) => destroyed.push(Value::String(text)),
                    Err(error) => {
                        not_destroyed.insert(text, error);
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

/// Whether the creation a parentId names (`#x`) has already failed: its children then fail too,
/// with a parentId error, instead of waiting for it.
fn not_created_any(not_created: &Map<String, Value>, object: &Value) -> bool {
    object
        .get("parentId")
        .and_then(Value::as_str)
        .and_then(|parent| parent.strip_prefix('#'))
        .is_some_and(|parent| not_created.contains_key(parent))
}

/// One Mailbox/query filter condition (RFC 8621 §2.3); every property given must hold.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MailboxCondition {
    /// `Some(None)`: top-level mailboxes.
    parent: Option<Option<String>>,
    name: Option<String>,
    /// `Some(None)`: mailboxes without a role.
    role: Option<Option<String>>,
    has_any_role: Option<bool>,
    subscribed: Option<bool>,
}

fn read_condition(object: &Map<String, Value>) -> Result<MailboxCondition, Value> {
    let mut condition = MailboxCondition::default();
    for (property, value) in object {
        match (property.as_str(), value) {
            ("parentId", Value::Null) => condition.parent = Some(None),
            ("parentId", Value::String(parent)) => condition.parent = Some(Some(parent.clone())),
            ("name", Value::String(name)) => condition.name = Some(name.to_lowercase()),
            ("role", Value::Null) => condition.role = Some(None),
            ("role", Value::String(role)) => condition.role = Some(Some(role.clone())),
            ("hasAnyRole", Value::Bool(any)) => condition.has_any_role = Some(*any),
            ("isSubscribed", Value::Bool(subscribed)) => condition.subscribed = Some(*subscribed),
            ("parentId" | "name" | "role" | "hasAnyRole" | "isSubscribed", _) => {
                return Err(method_error(
                    "invalidArguments",
                    format!("{property} has the wrong type"),
                ))
            }
            _ => {
                return Err(method_error(
                    "unsupportedFilter",
                    format!("no mailbox filter condition {property}"),
                ))
            }
        }
    }
    Ok(condition)
}

impl MailboxCondition {
    fn holds(&self, mailbox: &MailboxSummary) -> bool {
        let role = mailbox.role.map(Role::as_str);
        self.parent
            .as_ref()
            .is_none_or(|parent| parent.as_deref() == mailbox.parent.map(jmap_id).as_deref())
            && self
                .name
                .as_ref()
                .is_none_or(|name| leaf(mailbox).to_lowercase().contains(name.as_str()))
            && self.role.as_ref().is_none_or(|wanted| wanted.as_deref() == role)
            && self.has_any_role.is_none_or(|any| any == role.is_some())
            && self
                .subscribed
                .is_none_or(|subscribed| subscribed == mailbox.subscribed)
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum MailboxSort {
    Name,
    SortOrder,
    Parent,
}

/// What a Mailbox/query or /queryChanges asks the results to be.
pub struct MailboxQuery {
    filter: Option<FilterTree<MailboxCondition>>,
    sort: Vec<(MailboxSort, bool)>,
    sort_as_tree: bool,
    filter_as_tree: bool,
}

/// Reads the filter, sort, sortAsTree and filterAsTree of a Mailbox/query (no service needed).
pub fn mailbox_query(arguments: &Map<String, Value>) -> Result<MailboxQuery, Value> {
    let filter = parse_filter(arguments.get("filter"), &mut read_condition)?;
    let mut sort = Vec::new();
    match arguments.get("sort") {
        None | Some(Value::Null) => {}
        Some(Value::Array(comparators)) => {
            for comparator in comparators {
                let comparator = comparator
                    .as_object()
                    .ok_or_else(|| method_error("invalidArguments", "a sort comparator is not an object"))?;
                let property = match required_string(comparator, "property")? {
                    "name" => MailboxSort::Name,
                    "sortOrder" => MailboxSort::SortOrder,
                    "parentId" => MailboxSort::Parent,
                    other => {
                        return Err(method_error(
                            "unsupportedSort",
                            format!("mailboxes sort by name, sortOrder or parentId, not {other}"),
                        ))
                    }
                };
                if comparator.get("collation").is_some_and(|value| !value.is_null()) {
                    return Err(method_error("unsupportedSort", "no collation algorithms are served"));
                }
                let ascending = match comparator.get("isAscending") {
                    None | Some(Value::Null) => true,
                    Some(Value::Bool(ascending)) => *ascending,
                    Some(_) => return Err(method_error("invalidArguments", "isAscending is not a boolean")),
                };
                sort.push((property, ascending));
            }
        }
        Some(_) => return Err(method_error("invalidArguments", "sort is not an array")),
    }
    if sort.is_empty() {
        // No order asked: the one mail clients show, by sortOrder then name.
        sort = vec![(MailboxSort::SortOrder, true), (MailboxSort::Name, true)];
    }
    Ok(MailboxQuery {
        filter,
        sort,
        sort_as_tree: flag_argument(arguments, "sortAsTree")?,
        filter_as_tree: flag_argument(arguments, "filterAsTree")?,
    })
}

impl MailboxQuery {
    fn compare(&self, left: &MailboxSummary, right: &MailboxSummary) -> Ordering {
        for (property, ascending) in &self.sort {
            let order = match property {
                MailboxSort::Name => leaf(left)
                    .to_lowercase()
                    .cmp(&leaf(right).to_lowercase())
                    .then_with(|| leaf(left).cmp(leaf(right))),
                MailboxSort::SortOrder => left.sort_order.cmp(&right.sort_order),
                MailboxSort::Parent => left.parent.map(jmap_id).cmp(&right.parent.map(jmap_id)),
            };
            let order = if *ascending { order } else { order.reverse() };
            if order != Ordering::Equal {
                return order;
            }
        }
        left.id.cmp(&right.id)
    }

    fn passes(&self, mailbox: &MailboxSummary) -> bool {
        self.filter
            .as_ref()
            .is_none_or(|filter| filter.matches(&mut |condition| condition.holds(mailbox)))
    }

    /// The ids of the results, in order.
    fn results(&self, mailboxes: &[MailboxSummary]) -> Vec<MailboxId> {
        let by_id: HashMap<MailboxId, &MailboxSummary> =
            mailboxes.iter().map(|mailbox| (mailbox.id, mailbox)).collect();
        let mut kept: Vec<&MailboxSummary> = mailboxes.iter().filter(|mailbox| self.passes(mailbox)).collect();
        if self.filter_as_tree {
            let passing: BTreeSet<MailboxId> = kept.iter().map(|mailbox| mailbox.id).collect();
            kept.retain(|mailbox| {
                let mut parent = mailbox.parent;
                let mut steps = 0;
                while let Some(id) = parent {
                    if !passing.contains(&id) || steps > mailboxes.len() {
                        return false;
                    }
                    parent = by_id.get(&id).and_then(|summary| summary.parent);
                    steps += 1;
                }
                true
            });
        }
        if !self.sort_as_tree {
            kept.sort_by(|left, right| self.compare(left, right));
            return kept.into_iter().map(|mailbox| mailbox.id).collect();
        }
        // Depth first over the whole tree, siblings in the sort's order; the results keep that order.
        let mut children: HashMap<Option<MailboxId>, Vec<&MailboxSummary>> = HashMap::new();
        for mailbox in mailboxes {
            let parent = mailbox.parent.filter(|parent| by_id.contains_key(parent));
            children.entry(parent).or_default().push(mailbox);
        }
        for siblings in children.values_mut() {
            siblings.sort_by(|left, right| self.compare(left, right));
        }
        let mut rank = HashMap::new();
        let mut stack: Vec<&MailboxSummary> = children.get(&None).into_iter().flatten().rev().copied().collect();
        while let Some(mailbox) = stack.pop() {
            if rank.contains_key(&mailbox.id) {
                continue;
            }
            rank.insert(mailbox.id, rank.len());
            if let Some(below) = children.get(&Some(mailbox.id)) {
                stack.extend(below.iter().rev().copied());
            }
        }
        kept.sort_by_key(|mailbox| rank.get(&mailbox.id).copied().unwrap_or(usize::MAX));
        kept.into_iter().map(|mailbox| mailbox.id).collect()
    }

    /// Mailboxes whose place in the results may depend on `id`'s properties: itself and, for
    /// the tree forms, every mailbox below it.
    fn dependents(&self, id: MailboxId, mailboxes: &[MailboxSummary], into: &mut BTreeSet<MailboxId>) {
        into.insert(id);
        if !(self.sort_as_tree || self.filter_as_tree) {
            return;
        }
        let mut frontier = vec![id];
        while let Some(parent) = frontier.pop() {
            for child in mailboxes.iter().filter(|mailbox| mailbox.parent == Some(parent)) {
                if into.insert(child.id) {
                    frontier.push(child.id);
                }
            }
        }
    }
}

/// Mailbox/query (RFC 8620 §5.5, RFC 8621 §2.3).
pub fn query(service: &MailService, account: &str, arguments: &Map<String, Value>) -> MethodResult {
    let request = mailbox_query(arguments)?;
    let window = query_window(arguments)?;
    let state = service.account_state(account).map_err(service_error)?;
    let mailboxes = service.mailboxes(account).map_err(service_error)?;
    let ids: Vec<String> = request.results(&mailboxes).into_iter().map(jmap_id).collect();
    let anchor = window
        .anchor
        .as_ref()
        .and_then(|anchor| ids.iter().position(|id| id == anchor));
    let start = window.start(ids.len(), anchor)?;
    let page: Vec<&String> = ids.iter().skip(start).take(window.limit).collect();
    let mut response = json!({
        "accountId": account,
        "queryState": state,
        "canCalculateChanges": true,
        "position": start.min(ids.len()),
        "ids": page,
    });
    if window.calculate_total {
        response["total"] = json!(ids.len());
    }
    if window.limit_cut && ids.len() > window.limit {
        response["limit"] = json!(window.limit);
    }
    Ok(response)
}

/// The most feed entries one /queryChanges reads before it gives up with cannotCalculateChanges.
pub(crate) const MAX_QUERY_CHANGES_FEED: usize = 20_000;

/// Mailbox/queryChanges (RFC 8620 §5.6): every mailbox changed since the state is removed, and
/// added again at its index when it is in the results now.
pub fn query_changes(service: &MailService, account: &str, arguments: &Map<String, Value>) -> MethodResult {
    let since = required_string(arguments, "sinceQueryState")?;
    let max_changes = max_changes_argument(arguments)?;
    let request = mailbox_query(arguments)?;
    let calculate_total = flag_argument(arguments, "calculateTotal")?;
    let mut state = since.to_owned();
    let mut changed_records = BTreeSet::new();
    let mut read = 0;
    loop {
        let changes = service
            .account_changes(account, Some(&state), MAX_FEED_CHANGES)
            .map_err(service_error)?;
        read += changes.created.len() + changes.updated.len() + changes.destroyed.len() + changes.mailboxes.len();
        changed_records.extend(changes.mailboxes.iter().copied());
        state = changes.new_state;
        if !changes.has_more {
            break;
        }
        if read > MAX_QUERY_CHANGES_FEED {
            return Err(method_error(
                "cannotCalculateChanges",
                "too much changed since this state: query again",
            ));
        }
    }
    let mailboxes = service.mailboxes(account).map_err(service_error)?;
    let mut changed = BTreeSet::new();
    for id in &changed_records {
        request.dependents(*id, &mailboxes, &mut changed);
    }
    let results = request.results(&mailboxes);
    let added: Vec<(String, usize)> = results
        .iter()
        .enumerate()
        .filter(|(_, id)| changed.contains(id))
        .map(|(index, id)| (jmap_id(*id), index))
        .collect();
    query_changes_response(
        account,
        since,
        &state,
        changed.iter().map(|id| jmap_id(*id)).collect(),
        added,
        max_changes,
        calculate_total.then_some(results.len()),
    )
}
