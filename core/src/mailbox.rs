//! Mailboxes as replicated objects, and where each email lives.
//!
//! A mailbox is a record with a stable 128-bit ID that never changes, so a rename rewrites one
//! register instead of every message, trie and index key. Its mutable state is a set of
//! last-writer-wins registers, each carrying the [`Stamp`] of the decision:
//!
//! - `placement`: the parent mailbox (or none, for the top level) and the name within it, as one
//!   register, so a rename that also moves the mailbox is one atomic decision;
//! - `role` (RFC 8621 / RFC 6154: inbox, archive, drafts, junk, sent, trash), `subscribed` and
//!   `sort_order`;
//! - `deleted`: a sticky tombstone, like an expunge.
//!
//! An email lives in exactly one mailbox, named by its [`Location`] register: a move rewrites the
//! register and keeps the email's ID. (JMAP advertises `maxMailboxesPerEmail: 1`; IMAP COPY makes a
//! new email that shares the blob.) Concurrent moves to different mailboxes converge to the one with
//! the higher stamp on every node.
//!
//! # Merge laws
//! [`merge`] on two versions of one mailbox is commutative, associative and idempotent (each
//! register is a join: the higher `(stamp, value)` wins; `deleted` keeps the higher stamp; the
//! immutable `created` stamp must agree). [`join_location`] is the same join for locations. The
//! property tests below check each law.
//!
//! # Resolving a set of records into a tree
//! Replicas that hold the same set of records must show the same tree, so [`resolve`] is a pure
//! function of that set (not of the order it arrived in) and it always yields a tree:
//!
//! 1. **INBOX exists everywhere without coordination.** Its ID is derived from the account name
//!    ([`inbox_id`]), so every node makes the same one; with no record it is the default INBOX. It
//!    cannot be deleted, and its placement is always the top level, named `INBOX`.
//! 2. **Orphans go to the top level.** A mailbox whose parent is deleted or unknown here is shown at
//!    the top level (a child created on one site while its parent was deleted on another).
//! 3. **Cycles are cut at the latest move.** Concurrent moves can make A a child of B while B
//!    becomes a child of A. Within each cycle the mailbox whose placement has the highest stamp is
//!    shown at the top level; every other placement is kept.
//! 4. **Same name, one mailbox.** Live siblings with the same name (two sites that each created
//!    "Work" while apart) are one mailbox: the one created first (lowest `(created, id)`) is the
//!    canonical one and the others are its aliases. An email located in an alias is shown in the
//!    canonical mailbox, and children of aliases are children of the canonical mailbox, so both
//!    sites' messages and sub-folders appear together. A top-level mailbox named `INBOX` in any case
//!    is an alias of the INBOX. Operations on the canonical mailbox apply to every alias (see
//!    [`MailboxTree::members`]), so the group stays together until sites decide otherwise.
//! 5. **One holder per role.** When two mailboxes claim one role, the claim with the higher role
//!    stamp keeps it and the other shows no role. The INBOX always holds `inbox`.
//! 6. **Deleting a mailbox destroys the emails it held; a concurrent delivery survives.** The
//!    deleting node destroys (expunges) each email it knows in the mailbox and then writes the
//!    tombstone. An email located in a deleted mailbox that was not destroyed, because it arrived
//!    or moved there on another site concurrently with the delete, is shown in the INBOX
//!    ([`Placement::Rescued`]), never lost.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::model::{MailboxId, ModelError, Stamp, MAX_NAME_BYTES};

/// The hierarchy separator in mailbox paths shown to clients.
pub const SEPARATOR: char = '/';
/// The name of the inbox, the one mailbox every account has.
pub const INBOX_NAME: &str = "INBOX";
/// The most levels a mailbox path may have; the service refuses deeper creates and moves.
pub const MAX_DEPTH: usize = 32;

/// A special-use role (RFC 8621 section 2, RFC 6154).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub enum Role {
    Inbox,
    Archive,
    Drafts,
    Junk,
    Sent,
    Trash,
}

impl Role {
    /// The role's JMAP spelling (lower case); IMAP's SPECIAL-USE attribute is `\` + capitalised.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Inbox => "inbox",
            Role::Archive => "archive",
            Role::Drafts => "drafts",
            Role::Junk => "junk",
            Role::Sent => "sent",
            Role::Trash => "trash",
        }
    }
}

impl FromStr for Role {
    type Err = ModelError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim_start_matches('\\').to_ascii_lowercase().as_str() {
            "inbox" => Ok(Role::Inbox),
            "archive" => Ok(Role::Archive),
            "drafts" => Ok(Role::Drafts),
            "junk" => Ok(Role::Junk),
            "sent" => Ok(Role::Sent),
            "trash" => Ok(Role::Trash),
            _ => Err(ModelError::InvalidMailboxKey {
                field: "role",
                reason: "must be one of inbox, archive, drafts, junk, sent, trash",
            }),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// A last-writer-wins register: a value and the stamp of the decision that set it.
#[derive(Clone, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub struct Register<T> {
    pub value: T,
    pub stamp: Stamp,
}

impl<T: Ord + Clone> Register<T> {
    /// A register holding `value`, decided at `stamp`.
    pub fn new(value: T, stamp: Stamp) -> Self {
        Register { value, stamp }
    }

    /// The winner of two registers: the higher stamp; for the impossible case of one stamp with
    /// two values, the greater value, so the join stays total.
    pub fn join(&self, other: &Self) -> Self {
        if (other.stamp, &other.value) > (self.stamp, &self.value) {
            other.clone()
        } else {
            self.clone()
        }
    }

    /// Writes `value` at `stamp` if that decision wins; returns whether the register changed.
    pub fn propose(&mut self, value: T, stamp: Stamp) -> bool {
        let joined = self.join(&Register::new(value, stamp));
        let changed = joined != *self;
        *self = joined;
        changed
    }
}

/// Where a mailbox sits: its parent (none for the top level) and its name within the parent.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct Position {
    pub parent: Option<MailboxId>,
    pub name: String,
}

/// One mailbox's replicated state. See the module doc for the laws.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct MailboxRecord {
    pub id: MailboxId,
    /// The stamp of the create: immutable, it decides which of two same-named mailboxes is canonical.
    pub created: Stamp,
    pub placement: Register<Position>,
    pub role: Register<Option<Role>>,
    pub subscribed: Register<bool>,
    pub sort_order: Register<u32>,
    /// Set once the mailbox is deleted; the stamp of the delete. Never cleared.
    pub deleted: Option<Stamp>,
}

/// Why two mailbox records could not be merged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MailboxMergeError {
    #[error("mailbox records have different ids")]
    DifferentIds,
    #[error("mailbox {0:?} has two different creation stamps")]
    CreatedConflict(MailboxId),
}

impl MailboxRecord {
    /// A new mailbox named `name` under `parent`, created at `stamp`.
    pub fn new(id: MailboxId, parent: Option<MailboxId>, name: &str, role: Option<Role>, stamp: Stamp) -> Self {
        MailboxRecord {
            id,
            created: stamp,
            placement: Register::new(
                Position {
                    parent,
                    name: name.to_owned(),
                },
                stamp,
            ),
            role: Register::new(role, stamp),
            subscribed: Register::new(true, stamp),
            sort_order: Register::new(0, stamp),
            deleted: None,
        }
    }

    /// The INBOX as every node knows it before anyone changes it: stamped at time zero, so any
    /// real decision wins against it.
    pub fn default_inbox(account: &str) -> Self {
        MailboxRecord::new(inbox_id(account), None, INBOX_NAME, Some(Role::Inbox), Stamp::default())
    }

    /// Whether the mailbox has not been deleted.
    pub fn is_live(&self) -> bool {
        self.deleted.is_none()
    }

    /// The latest stamp anywhere in the record.
    pub fn latest_stamp(&self) -> Stamp {
        [
            self.created,
            self.placement.stamp,
            self.role.stamp,
            self.subscribed.stamp,
            self.sort_order.stamp,
        ]
        .into_iter()
        .chain(self.deleted)
        .max()
        .unwrap_or_default()
    }

    /// The highest stamp each node contributed to this record, for the change feed.
    pub fn stamps_by_origin(&self) -> BTreeMap<crate::model::NodeId, u64> {
        let mut origins = BTreeMap::new();
        let stamps = [
            self.created,
            self.placement.stamp,
            self.role.stamp,
            self.subscribed.stamp,
            self.sort_order.stamp,
        ];
        for stamp in stamps.into_iter().chain(self.deleted) {
            let entry = origins.entry(stamp.node).or_insert(0);
            *entry = (*entry).max(stamp.time);
        }
        origins
    }
}

/// Joins two versions of one mailbox.
pub fn merge(left: &MailboxRecord, right: &MailboxRecord) -> Result<MailboxRecord, MailboxMergeError> {
    if left.id != right.id {
        return Err(MailboxMergeError::DifferentIds);
    }
    if left.created != right.created {
        return Err(MailboxMergeError::CreatedConflict(left.id));
    }
    Ok(MailboxRecord {
        id: left.id,
        created: left.created,
        placement: left.placement.join(&right.placement),
        role: left.role.join(&right.role),
        subscribed: left.subscribed.join(&right.subscribed),
        sort_order: left.sort_order.join(&right.sort_order),
        deleted: left.deleted.max(right.deleted),
    })
}

/// The 32-byte hash of a mailbox record's whole state, for Merkle leaves.
pub fn state_hash(record: &MailboxRecord) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"mailmesh mailbox v1\0");
    hasher.update(&record.id.to_bytes());
    let stamp = |hasher: &mut blake3::Hasher, stamp: Stamp| {
        hasher.update(&stamp.time.to_be_bytes());
        hasher.update(&stamp.node.0.to_be_bytes());
    };
    stamp(&mut hasher, record.created);
    let position = &record.placement.value;
    match position.parent {
        None => hasher.update(&[0]),
        Some(parent) => hasher.update(&[1]).update(&parent.to_bytes()),
    };
    hasher.update(&(position.name.len() as u64).to_be_bytes());
    hasher.update(position.name.as_bytes());
    stamp(&mut hasher, record.placement.stamp);
    hasher.update(&[record.role.value.map_or(0, |role| role as u8 + 1)]);
    stamp(&mut hasher, record.role.stamp);
    hasher.update(&[u8::from(record.subscribed.value)]);
    stamp(&mut hasher, record.subscribed.stamp);
    hasher.update(&record.sort_order.value.to_be_bytes());
    stamp(&mut hasher, record.sort_order.stamp);
    match record.deleted {
        None => hasher.update(&[0]),
        Some(deleted) => {
            hasher.update(&[1]);
            stamp(&mut hasher, deleted);
            &mut hasher
        }
    };
    *hasher.finalize().as_bytes()
}

/// The INBOX's ID for an account: derived from the name, so every node makes the same one.
pub fn inbox_id(account: &str) -> MailboxId {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"mailmesh inbox\0");
    hasher.update(account.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
    MailboxId(u128::from_be_bytes(bytes))
}

/// Checks one level of a mailbox name: non-empty, at most 255 bytes, no separator, no control
/// characters, no leading or trailing white space.
pub fn validate_name(name: &str) -> Result<(), ModelError> {
    let invalid = |reason| ModelError::InvalidMailboxKey {
        field: "mailbox",
        reason,
    };
    if name.is_empty() {
        return Err(invalid("must not be empty"));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(invalid("must be at most 255 bytes"));
    }
    if name.contains(SEPARATOR) {
        return Err(invalid("a level must not contain the separator '/'"));
    }
    if name.chars().any(char::is_control) {
        return Err(invalid("must not contain control characters"));
    }
    if name.trim() != name {
        return Err(invalid("must not start or end with white space"));
    }
    Ok(())
}

/// The location register of one email: the mailbox it is in, decided at `stamp`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct Location {
    pub mailbox: MailboxId,
    pub stamp: Stamp,
}

/// The winner of two locations: the higher stamp, then the higher mailbox ID (a total join).
pub fn join_location(left: Location, right: Location) -> Location {
    if (right.stamp, right.mailbox) > (left.stamp, left.mailbox) {
        right
    } else {
        left
    }
}

/// One mailbox as clients see it.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ResolvedMailbox {
    pub id: MailboxId,
    /// The canonical parent, or none at the top level.
    pub parent: Option<MailboxId>,
    pub name: String,
    /// The full path from the top level, levels joined by [`SEPARATOR`].
    pub path: String,
    pub role: Option<Role>,
    pub subscribed: bool,
    pub sort_order: u32,
}

/// Where an email is shown.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Placement {
    /// In this (canonical) mailbox.
    In(MailboxId),
    /// In the INBOX, because the mailbox it was located in is deleted but the email was not
    /// destroyed with it (it arrived there concurrently with the delete).
    Rescued(MailboxId),
}

impl Placement {
    /// The mailbox the email is shown in.
    pub fn mailbox(self) -> MailboxId {
        match self {
            Placement::In(mailbox) | Placement::Rescued(mailbox) => mailbox,
        }
    }
}

/// An account's mailboxes resolved into one tree: what every replica holding the same records shows.
#[derive(Clone, Debug)]
pub struct MailboxTree {
    inbox: MailboxId,
    mailboxes: BTreeMap<MailboxId, ResolvedMailbox>,
    /// Every live record's canonical mailbox (itself when canonical).
    canonical: HashMap<MailboxId, MailboxId>,
    /// Deleted records, so locations pointing at them are rescued.
    deleted: BTreeSet<MailboxId>,
}

impl MailboxTree {
    /// The visible mailboxes, by ID.
    pub fn mailboxes(&self) -> &BTreeMap<MailboxId, ResolvedMailbox> {
        &self.mailboxes
    }

    /// One visible mailbox.
    pub fn get(&self, id: MailboxId) -> Option<&ResolvedMailbox> {
        self.mailboxes.get(&id)
    }

    /// The deleted mailboxes: an email still located in one (it arrived there concurrently with
    /// the delete) is shown in the INBOX.
    pub fn deleted(&self) -> &BTreeSet<MailboxId> {
        &self.deleted
    }

    /// The account's INBOX.
    pub fn inbox(&self) -> MailboxId {
        self.inbox
    }

    /// The canonical mailbox a live record is shown as, or None when the record is deleted or
    /// unknown.
    pub fn canonical(&self, id: MailboxId) -> Option<MailboxId> {
        self.canonical.get(&id).copied()
    }

    /// The records that make up a visible mailbox (itself and its aliases), sorted. A rename or a
    /// delete of the mailbox is written to each of them.
    pub fn members(&self, id: MailboxId) -> Vec<MailboxId> {
        let mut members: Vec<MailboxId> = self
            .canonical
            .iter()
            .filter(|(_, canonical)| **canonical == id)
            .map(|(member, _)| *member)
            .collect();
        members.sort();
        members
    }

    /// The visible mailbox with this full path (`INBOX` matched in any case), if any.
    pub fn find(&self, path: &str) -> Option<MailboxId> {
        if path.eq_ignore_ascii_case(INBOX_NAME) {
            return Some(self.inbox);
        }
        self.mailboxes
            .values()
            .find(|mailbox| mailbox.path == path)
            .map(|mailbox| mailbox.id)
    }

    /// The visible children of a mailbox (or of the top level), sorted by sort order then name.
    pub fn children(&self, parent: Option<MailboxId>) -> Vec<&ResolvedMailbox> {
        let mut children: Vec<&ResolvedMailbox> = self
            .mailboxes
            .values()
            .filter(|mailbox| mailbox.parent == parent)
            .collect();
        children.sort_by(|a, b| (a.sort_order, &a.name, a.id).cmp(&(b.sort_order, &b.name, b.id)));
        children
    }

    /// Where an email with this location is shown, or None when its mailbox was never known here
    /// (its mailbox record has not arrived yet; the email is held back until it does).
    pub fn place(&self, location: MailboxId) -> Option<Placement> {
        if let Some(canonical) = self.canonical.get(&location) {
            return Some(Placement::In(*canonical));
        }
        if self.deleted.contains(&location) {
            return Some(Placement::Rescued(self.inbox));
        }
        None
    }
}

/// Resolves an account's mailbox records into one tree. See the module doc for the rules; the
/// result depends only on the set of records, never on their order.
pub fn resolve<'a>(account: &str, records: impl IntoIterator<Item = &'a MailboxRecord>) -> MailboxTree {
    let inbox = inbox_id(account);
    let mut live: BTreeMap<MailboxId, MailboxRecord> = BTreeMap::new();
    let mut deleted = BTreeSet::new();
    for record in records {
        if record.id == inbox {
            // The INBOX is never deleted and never moved: only its flags of display are kept.
            let mut record = record.clone();
            record.deleted = None;
            record.placement = Register::new(
                Position {
                    parent: None,
                    name: INBOX_NAME.to_owned(),
                },
                Stamp::default(),
            );
            record.role = Register::new(Some(Role::Inbox), Stamp::default());
            live.insert(inbox, record);
        } else if record.is_live() {
            live.insert(record.id, record.clone());
        } else {
            deleted.insert(record.id);
        }
    }
    live.entry(inbox)
        .or_insert_with(|| MailboxRecord::default_inbox(account));

    // Rules 2 and 3: each live record's parent, with orphans and cycle cuts at the top level.
    let mut parent: BTreeMap<MailboxId, Option<MailboxId>> = live
        .values()
        .map(|record| {
            let wanted = record
                .placement
                .value
                .parent
                .filter(|parent| live.contains_key(parent) && *parent != record.id);
            (record.id, if record.id == inbox { None } else { wanted })
        })
        .collect();
    cut_cycles(&live, &mut parent);

    // Rule 4, level by level from the top: the canonical parent first, then same-named siblings.
    let mut children: BTreeMap<Option<MailboxId>, Vec<MailboxId>> = BTreeMap::new();
    for (id, parent) in &parent {
        children.entry(*parent).or_default().push(*id);
    }
    let mut canonical: HashMap<MailboxId, MailboxId> = HashMap::new();
    let mut resolved: BTreeMap<MailboxId, ResolvedMailbox> = BTreeMap::new();
    // A queue of (canonical parent, records whose stored parent is a member of it).
    let mut level: Vec<(Option<MailboxId>, Vec<MailboxId>)> =
        vec![(None, children.get(&None).cloned().unwrap_or_default())];
    while !level.is_empty() {
        let mut next = Vec::new();
        for (canonical_parent, members) in level {
            // Group the siblings by name; the top-level "INBOX" in any case joins the INBOX.
            let mut groups: BTreeMap<String, Vec<&MailboxRecord>> = BTreeMap::new();
            for id in members {
                let record = &live[&id];
                let name = &record.placement.value.name;
                let key = if canonical_parent.is_none() && name.eq_ignore_ascii_case(INBOX_NAME) {
                    INBOX_NAME.to_owned()
                } else {
                    name.clone()
                };
                groups.entry(key).or_default().push(record);
            }
            for (name, mut group) in groups {
                group.sort_by_key(|record| (record.id != inbox, record.created, record.id));
                let head = group[0];
                let path = match canonical_parent.and_then(|parent| resolved.get(&parent)) {
                    Some(parent) => format!("{}{SEPARATOR}{name}", parent.path),
                    None => name.clone(),
                };
                let subscribed = group.iter().any(|record| record.subscribed.value);
                resolved.insert(
                    head.id,
                    ResolvedMailbox {
                        id: head.id,
                        parent: canonical_parent,
                        name,
                        path,
                        role: None,
                        subscribed,
                        sort_order: head.sort_order.value,
                    },
                );
                let mut grandchildren = Vec::new();
                for record in &group {
                    canonical.insert(record.id, head.id);
                    grandchildren.extend(children.get(&Some(record.id)).into_iter().flatten().copied());
                }
                if !grandchildren.is_empty() {
                    next.push((Some(head.id), grandchildren));
                }
            }
        }
        level = next;
    }

    // Rule 5: one holder per role, the highest role stamp; the INBOX always holds inbox.
    let mut holders: BTreeMap<Role, (Stamp, MailboxId)> = BTreeMap::new();
    for record in live.values() {
        let (Some(role), Some(&shown)) = (record.role.value, canonical.get(&record.id)) else {
            continue;
        };
        let claim = if record.id == inbox {
            (
                Stamp {
                    time: u64::MAX,
                    node: crate::model::NodeId(u64::MAX),
                },
                shown,
            )
        } else {
            (record.role.stamp, shown)
        };
        if role == Role::Inbox && record.id != inbox {
            continue;
        }
        let entry = holders.entry(role).or_insert(claim);
        if claim > *entry {
            *entry = claim;
        }
    }
    for (role, (_, holder)) in holders {
        if let Some(mailbox) = resolved.get_mut(&holder) {
            if mailbox.role.is_none() {
                mailbox.role = Some(role);
            }
        }
    }
    MailboxTree {
        inbox,
        mailboxes: resolved,
        canonical,
        deleted,
    }
}

/// Rule 3: within each cycle of parent links, the member whose placement has the highest stamp
/// goes to the top level.
fn cut_cycles(live: &BTreeMap<MailboxId, MailboxRecord>, parent: &mut BTreeMap<MailboxId, Option<MailboxId>>) {
    // 0 = not visited, 1 = on the current walk, 2 = done.
    let mut state: HashMap<MailboxId, u8> = HashMap::new();
    let ids: Vec<MailboxId> = parent.keys().copied().collect();
    for start in ids {
        if state.get(&start).copied().unwrap_or(0) != 0 {
            continue;
        }
        let mut walk = Vec::new();
        let mut current = Some(start);
        while let Some(id) = current {
            match state.get(&id).copied().unwrap_or(0) {
                2 => break,
                1 => {
                    // A cycle: the walk from `id` onwards.
                    let from = walk.iter().position(|member| *member == id).unwrap_or(0);
                    let cycle = &walk[from..];
                    if let Some(cut) = cycle
                        .iter()
                        .max_by_key(|member| (live[*member].placement.stamp, **member))
                        .copied()
                    {
                        parent.insert(cut, None);
                    }
                    break;
                }
                _ => {
                    state.insert(id, 1);
                    walk.push(id);
                    current = parent.get(&id).copied().flatten();
                }
            }
        }
        for id in walk {
            state.insert(id, 2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::NodeId;
    use proptest::prelude::*;

    const ACCOUNT: &str = "alice@example.org";

    fn stamp(time: u64, node: u64) -> Stamp {
        Stamp {
            time,
            node: NodeId(node),
        }
    }

    fn mailbox(id: u128, parent: Option<u128>, name: &str, created: u64) -> MailboxRecord {
        MailboxRecord::new(MailboxId(id), parent.map(MailboxId), name, None, stamp(created, 1))
    }

    #[test]
    fn every_account_has_an_inbox_with_no_record_at_all() {
        let tree = resolve(ACCOUNT, []);
        let inbox = tree.get(inbox_id(ACCOUNT)).unwrap();
        assert_eq!((inbox.path.as_str(), inbox.role), ("INBOX", Some(Role::Inbox)));
        assert_eq!(tree.find("inbox"), Some(inbox_id(ACCOUNT)));
        assert_ne!(inbox_id(ACCOUNT), inbox_id("bob@example.org"));
    }

    #[test]
    fn a_rename_keeps_the_id_and_moves_the_children() {
        let mut work = mailbox(10, None, "Work", 5);
        let child = mailbox(11, Some(10), "2026", 6);
        work.placement.propose(
            Position {
                parent: None,
                name: "Old work".into(),
            },
            stamp(7, 2),
        );
        let tree = resolve(ACCOUNT, [&work, &child]);
        assert_eq!(tree.get(MailboxId(10)).unwrap().path, "Old work");
        assert_eq!(tree.get(MailboxId(11)).unwrap().path, "Old work/2026");
    }

    #[test]
    fn concurrent_creates_of_one_name_become_one_mailbox_with_both_sites_children() {
        let site_a = mailbox(20, None, "Work", 5);
        let site_b = MailboxRecord::new(MailboxId(21), None, "Work", None, stamp(5, 2));
        let child_of_b = mailbox(22, Some(21), "Plans", 6);
        let tree = resolve(ACCOUNT, [&site_b, &child_of_b, &site_a]);
        let work = tree.find("Work").unwrap();
        assert_eq!(
            work,
            MailboxId(20),
            "the earlier create (node 1 breaks the tie) is canonical"
        );
        assert_eq!(tree.canonical(MailboxId(21)), Some(work));
        assert_eq!(tree.place(MailboxId(21)), Some(Placement::In(work)));
        assert_eq!(tree.get(MailboxId(22)).unwrap().path, "Work/Plans");
        assert_eq!(tree.members(work), vec![MailboxId(20), MailboxId(21)]);
        assert_eq!(tree.mailboxes().len(), 3, "INBOX, Work, Work/Plans");
    }

    #[test]
    fn a_top_level_inbox_in_any_case_joins_the_inbox() {
        let other = mailbox(30, None, "inbox", 5);
        let tree = resolve(ACCOUNT, [&other]);
        assert_eq!(tree.canonical(MailboxId(30)), Some(inbox_id(ACCOUNT)));
        assert_eq!(tree.mailboxes().len(), 1);
    }

    #[test]
    fn crossed_renames_end_without_a_loop_and_the_later_move_goes_to_the_top() {
        let mut a = mailbox(40, None, "A", 1);
        let mut b = mailbox(41, None, "B", 1);
        a.placement.propose(
            Position {
                parent: Some(MailboxId(41)),
                name: "A".into(),
            },
            stamp(5, 1),
        );
        b.placement.propose(
            Position {
                parent: Some(MailboxId(40)),
                name: "B".into(),
            },
            stamp(6, 2),
        );
        let tree = resolve(ACCOUNT, [&a, &b]);
        assert_eq!(
            tree.get(MailboxId(41)).unwrap().path,
            "B",
            "B moved last: cut to the top"
        );
        assert_eq!(tree.get(MailboxId(40)).unwrap().path, "B/A");
    }

    #[test]
    fn an_orphan_goes_to_the_top_level_and_a_concurrent_delivery_to_a_deleted_mailbox_is_rescued() {
        let mut parent = mailbox(50, None, "Projects", 1);
        let child = mailbox(51, Some(50), "Late", 3);
        parent.deleted = Some(stamp(4, 2));
        let tree = resolve(ACCOUNT, [&parent, &child]);
        assert_eq!(tree.get(MailboxId(51)).unwrap().path, "Late");
        assert!(tree.get(MailboxId(50)).is_none());
        assert_eq!(tree.place(MailboxId(50)), Some(Placement::Rescued(inbox_id(ACCOUNT))));
        assert_eq!(
            tree.place(MailboxId(99)),
            None,
            "an unknown mailbox holds its email back"
        );
    }

    #[test]
    fn the_inbox_cannot_be_deleted_or_moved() {
        let mut inbox = MailboxRecord::default_inbox(ACCOUNT);
        inbox.deleted = Some(stamp(9, 1));
        inbox.placement.propose(
            Position {
                parent: Some(MailboxId(1)),
                name: "Elsewhere".into(),
            },
            stamp(9, 1),
        );
        inbox.subscribed.propose(false, stamp(9, 1));
        let tree = resolve(ACCOUNT, [&inbox, &mailbox(1, None, "Other", 1)]);
        let shown = tree.get(inbox_id(ACCOUNT)).unwrap();
        assert_eq!((shown.path.as_str(), shown.subscribed), ("INBOX", false));
    }

    #[test]
    fn two_claims_to_one_role_leave_one_holder() {
        let mut first = mailbox(60, None, "Sent", 1);
        let mut second = mailbox(61, None, "Sent Items", 1);
        first.role.propose(Some(Role::Sent), stamp(3, 1));
        second.role.propose(Some(Role::Sent), stamp(4, 2));
        let tree = resolve(ACCOUNT, [&first, &second]);
        assert_eq!(tree.get(MailboxId(61)).unwrap().role, Some(Role::Sent));
        assert_eq!(tree.get(MailboxId(60)).unwrap().role, None);
    }

    #[test]
    fn moves_converge_to_the_higher_stamp() {
        let to_archive = Location {
            mailbox: MailboxId(1),
            stamp: stamp(10, 1),
        };
        let to_trash = Location {
            mailbox: MailboxId(2),
            stamp: stamp(10, 2),
        };
        assert_eq!(join_location(to_archive, to_trash), to_trash);
        assert_eq!(join_location(to_trash, to_archive), to_trash);
    }

    #[test]
    fn names_are_checked_level_by_level() {
        assert!(validate_name("Archive").is_ok());
        for bad in ["", "a/b", " lead", "tab\t", &"x".repeat(256)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!("\\Sent".parse::<Role>().unwrap(), Role::Sent);
        assert!("outbox".parse::<Role>().is_err());
    }

    // ---- property tests ----------------------------------------------------------------------

    /// Versions of a few mailboxes: every version of one ID shares its creation stamp.
    fn versions_strategy() -> impl Strategy<Value = Vec<MailboxRecord>> {
        // Few IDs, so crossed moves (cycles), same-name siblings and role clashes are common.
        let change = (
            0u128..5,
            proptest::option::of(0u128..5),
            prop_oneof![Just("A"), Just("B"), Just("inbox"), Just("Work")],
            proptest::option::of(prop_oneof![Just(Role::Sent), Just(Role::Trash), Just(Role::Inbox)]),
            any::<bool>(),
            1u64..20,
            0u64..3,
            proptest::option::weighted(0.2, (1u64..20, 0u64..3)),
        );
        proptest::collection::vec(change, 0..14).prop_map(|changes| {
            changes
                .into_iter()
                .map(|(id, parent, name, role, subscribed, time, node, deleted)| {
                    // The INBOX sometimes appears as id 0.
                    let id = if id == 0 { inbox_id(ACCOUNT) } else { MailboxId(id) };
                    let created = stamp(u64::from(id.0 as u8 % 3), 0);
                    let mut record = MailboxRecord::new(id, None, "X", None, created);
                    let decided = stamp(time, node);
                    record.placement.propose(
                        Position {
                            parent: parent.map(MailboxId),
                            name: name.into(),
                        },
                        decided,
                    );
                    record.role.propose(role, decided);
                    record.subscribed.propose(subscribed, decided);
                    record.deleted = deleted.map(|(time, node)| stamp(time, node));
                    record
                })
                .collect()
        })
    }

    /// What a replica holds after receiving these versions in this order.
    fn replica(versions: &[MailboxRecord]) -> BTreeMap<MailboxId, MailboxRecord> {
        let mut held: BTreeMap<MailboxId, MailboxRecord> = BTreeMap::new();
        for version in versions {
            let joined = match held.get(&version.id) {
                Some(current) => merge(current, version).unwrap(),
                None => version.clone(),
            };
            held.insert(version.id, joined);
        }
        held
    }

    fn shown(tree: &MailboxTree) -> Vec<(MailboxId, Option<MailboxId>, String, Option<Role>)> {
        tree.mailboxes()
            .values()
            .map(|mailbox| (mailbox.id, mailbox.parent, mailbox.path.clone(), mailbox.role))
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        #[test]
        fn merge_is_commutative_associative_and_idempotent(versions in versions_strategy()) {
            for a in &versions {
                for b in versions.iter().filter(|b| b.id == a.id) {
                    prop_assert_eq!(merge(a, b).unwrap(), merge(b, a).unwrap());
                    prop_assert_eq!(merge(a, a).unwrap(), a.clone());
                    for c in versions.iter().filter(|c| c.id == a.id) {
                        let left = merge(&merge(a, b).unwrap(), c).unwrap();
                        let right = merge(a, &merge(b, c).unwrap()).unwrap();
                        prop_assert_eq!(state_hash(&left), state_hash(&right));
                        prop_assert_eq!(left, right);
                    }
                }
            }
        }

        #[test]
        fn replicas_that_received_the_same_versions_in_any_order_show_the_same_tree(
            versions in versions_strategy(),
            seed in any::<u64>(),
        ) {
            let mut shuffled = versions.clone();
            // A deterministic shuffle from the seed.
            let mut state = seed | 1;
            for index in (1..shuffled.len()).rev() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                shuffled.swap(index, (state % (index as u64 + 1)) as usize);
            }
            let first = replica(&versions);
            let second = replica(&shuffled);
            prop_assert_eq!(&first, &second);
            let left = resolve(ACCOUNT, first.values());
            let right = resolve(ACCOUNT, second.values());
            prop_assert_eq!(shown(&left), shown(&right));
        }

        #[test]
        fn every_resolution_is_a_tree_with_one_inbox_unique_paths_and_unique_roles(versions in versions_strategy()) {
            let held = replica(&versions);
            let tree = resolve(ACCOUNT, held.values());
            // The INBOX is always there, at the top, holding the inbox role.
            let inbox = tree.get(inbox_id(ACCOUNT)).unwrap();
            prop_assert_eq!((inbox.parent, inbox.path.as_str(), inbox.role), (None, "INBOX", Some(Role::Inbox)));
            let mut paths = BTreeSet::new();
            let mut roles = BTreeSet::new();
            for mailbox in tree.mailboxes().values() {
                // Walking up always reaches the top level within the number of mailboxes.
                let mut current = mailbox.parent;
                let mut steps = 0;
                while let Some(parent) = current {
                    prop_assert!(tree.get(parent).is_some(), "a parent is visible");
                    current = tree.get(parent).unwrap().parent;
                    steps += 1;
                    prop_assert!(steps <= tree.mailboxes().len(), "no loop");
                }
                prop_assert!(paths.insert(mailbox.path.clone()), "two mailboxes share the path {}", mailbox.path);
                if let Some(role) = mailbox.role {
                    prop_assert!(roles.insert(role), "two mailboxes hold {:?}", role);
                }
            }
            // Every live record is shown as a visible mailbox; every deleted one rescues to INBOX.
            for record in held.values() {
                match tree.place(record.id) {
                    Some(Placement::In(shown)) => prop_assert!(tree.get(shown).is_some()),
                    Some(Placement::Rescued(inbox)) => {
                        prop_assert!(!record.is_live());
                        prop_assert_eq!(inbox, inbox_id(ACCOUNT));
                    }
                    None => prop_assert!(false, "a held record has no placement"),
                }
            }
        }
    }
}
