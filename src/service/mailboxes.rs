//! Mailboxes as replicated objects, on the store's replicated containers.
//!
//! Every account has two containers in the store, each replicated like any other (one trie, the
//! directory digest, pushes, reconciliation and the hostile-peer limits):
//!
//! - `(account, #emails)` holds the account's emails; each record's location register names the
//!   mailbox it is in, so a move is a register change inside one trie and keeps the email's ID;
//! - `(account, #mailboxes)` holds the account's mailbox records as immutable snapshots: each
//!   write to a mailbox (create, rename, delete, role, subscription, sort order) appends one small
//!   record whose bytes are the mailbox's whole state with the new decision stamped in.
//!
//! Reading the tree folds the snapshots with [`mailbox::merge`] (a join: commutative,
//! associative and idempotent, so any arrival order gives the same records) and resolves them with
//! [`mailbox::resolve`], whose laws (one INBOX everywhere, same-name creates become one mailbox,
//! cycles cut, a delivery into a concurrently deleted mailbox rescued into the INBOX) are stated and
//! property-tested in the pure core. The folded tree is cached per account and recomputed when the
//! container's root changes.
//!
//! Snapshots are collected as they are superseded: a mailbox write folds every snapshot of that
//! mailbox this node holds into the new one, so the new snapshot is at least the join of them all
//! (merge is a join), and the node then expunges the ones it folded. Any node that holds the new
//! snapshot folds the same record without them; a node that receives an expunge before the
//! snapshot that superseded it folds without both until the snapshot arrives (the same wait as for
//! any record still in transit). Concurrent writes on two sites each collect only what they
//! folded, so two snapshots that neither dominates both stay live. Expunged snapshots are skipped
//! by the fold, and their tombstones go the way of every tombstone (the horizon, then the cut).
//!
//! A mailbox as clients see it may be the union of several records (same-named creates from two
//! sites; the INBOX also shows emails rescued from deleted mailboxes): its listing is the union of
//! those records' listings ([`MailService::views`]), merged by sort key, and its counters are sums.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use crate::mailbox::{self, MailboxRecord, MailboxTree, Position, Role, SEPARATOR};
use crate::model::{FixedBytes, MailboxId, MailboxKey, MessageId, Stamp};
use crate::store::{Applied, Operation, SortKey};

use super::{MailService, MailboxSummary, ServiceError};

/// The most snapshot records one account's fold reads; past it the account's mailbox writes are
/// refused (a protection against a peer flooding the container, far above real use).
pub const MAX_MAILBOX_WRITES: usize = 200_000;

/// An account's mailboxes, folded and resolved.
#[derive(Debug)]
pub struct AccountMailboxes {
    pub tree: MailboxTree,
    /// Each mailbox record, merged over its snapshots.
    pub records: BTreeMap<MailboxId, MailboxRecord>,
    /// The listings each visible mailbox shows ([`views_of`]), worked out once per fold: asking
    /// the tree for one mailbox's members walks every record, so a listing of 1,000 mailboxes
    /// would walk a million.
    views: HashMap<MailboxId, Vec<MailboxId>>,
    /// The live snapshot records each mailbox record was merged from: what a new snapshot of
    /// that mailbox supersedes.
    pub sources: BTreeMap<MailboxId, Vec<MessageId>>,
}

impl AccountMailboxes {
    fn new(
        tree: MailboxTree,
        records: BTreeMap<MailboxId, MailboxRecord>,
        sources: BTreeMap<MailboxId, Vec<MessageId>>,
    ) -> AccountMailboxes {
        // Every record the tree may name as a member: the folded ones and the INBOX, which the
        // tree holds even before its record exists. In ID order, so each list comes out sorted
        // as the tree's members are.
        let candidates: std::collections::BTreeSet<MailboxId> =
            records.keys().copied().chain(std::iter::once(tree.inbox())).collect();
        let mut views: HashMap<MailboxId, Vec<MailboxId>> = HashMap::new();
        for member in candidates {
            if let Some(canonical) = tree.canonical(member) {
                views.entry(canonical).or_default().push(member);
            }
        }
        let mut folded = AccountMailboxes {
            tree,
            records,
            views: HashMap::new(),
            sources,
        };
        for id in folded.tree.mailboxes().keys() {
            let members = views.remove(id).unwrap_or_default();
            let listing = views_from_members(&folded, *id, members);
            folded.views.insert(*id, listing);
        }
        folded
    }
}

/// The per-account cache of folded trees, keyed by the mailboxes container's root.
#[derive(Default)]
pub(crate) struct TreeCache {
    entries: Mutex<HashMap<String, ([u8; 32], Arc<AccountMailboxes>)>>,
    /// Mailbox writes on this node go one at a time, so two local deliveries into a new "Work"
    /// make one mailbox, not two records that the tree then shows as one (what two sites apart
    /// do, and what the fold resolves; here it would only waste records).
    writes: tokio::sync::Mutex<()>,
}

/// What every mailbox summary of an account says about its emails container.
struct ContainerFacts {
    tombstones: u64,
    root: String,
}

impl ContainerFacts {
    fn read(service: &MailService, account: &str) -> Result<ContainerFacts, ServiceError> {
        let entry = service
            .inner
            .store
            .mailbox_entry(MailService::emails_container(account)?.id())?;
        Ok(ContainerFacts {
            tombstones: entry
                .as_ref()
                .map(|entry| entry.records.saturating_sub(entry.live))
                .unwrap_or(0),
            root: format!(
                "{:?}",
                entry
                    .map(|entry| entry.root)
                    .unwrap_or(FixedBytes(crate::merkle::Aggregate::default().root_hash()))
            ),
        })
    }
}

/// What a mailbox update changes (absent fields stay as they are).
#[derive(Clone, Debug, Default)]
pub struct MailboxUpdate {
    /// `Some(None)` clears the role.
    pub role: Option<Option<Role>>,
    pub subscribed: Option<bool>,
    pub sort_order: Option<u32>,
}

fn invalid(message: impl Into<String>) -> ServiceError {
    ServiceError::Invalid(message.into())
}

/// Reads one snapshot's bytes; `None` for bytes that are not a valid mailbox record (a hostile or
/// broken peer's): they are ignored, the same way on every node.
pub fn decode_snapshot(bytes: &[u8]) -> Option<MailboxRecord> {
    let record: MailboxRecord = cbor4ii::serde::from_slice(bytes).ok()?;
    mailbox::validate_name(&record.placement.value.name).ok()?;
    Some(record)
}

fn encode_snapshot(record: &MailboxRecord) -> Vec<u8> {
    cbor4ii::serde::to_vec(Vec::new(), record).unwrap_or_default()
}

/// Folds snapshots into one record per mailbox. Snapshots of one ID that disagree on the
/// immutable creation stamp cannot come from honest nodes; the earliest creation wins and the
/// others are ignored, so every node folds the same set the same way.
pub fn fold(snapshots: impl IntoIterator<Item = MailboxRecord>) -> BTreeMap<MailboxId, MailboxRecord> {
    let mut grouped: BTreeMap<MailboxId, Vec<MailboxRecord>> = BTreeMap::new();
    for snapshot in snapshots {
        grouped.entry(snapshot.id).or_default().push(snapshot);
    }
    let mut folded = BTreeMap::new();
    for (id, group) in grouped {
        let Some(created) = group.iter().map(|record| record.created).min() else {
            continue;
        };
        let mut merged: Option<MailboxRecord> = None;
        for record in group.into_iter().filter(|record| record.created == created) {
            merged = Some(match merged {
                None => record,
                Some(current) => mailbox::merge(&current, &record).unwrap_or(current),
            });
        }
        if let Some(record) = merged {
            folded.insert(id, record);
        }
    }
    folded
}

/// The listings (store views) a visible mailbox shows: its records and, for the INBOX, the
/// deleted mailboxes whose emails were rescued.
pub(crate) fn views_of(mailboxes: &AccountMailboxes, id: MailboxId) -> Vec<MailboxId> {
    match mailboxes.views.get(&id) {
        Some(views) => views.clone(),
        None => views_from_members(mailboxes, id, mailboxes.tree.members(id)),
    }
}

/// [`views_of`] from a mailbox's members.
fn views_from_members(mailboxes: &AccountMailboxes, id: MailboxId, mut views: Vec<MailboxId>) -> Vec<MailboxId> {
    if id == mailboxes.tree.inbox() {
        views.extend(mailboxes.tree.deleted().iter().copied());
    }
    if views.is_empty() {
        views.push(id);
    }
    views
}

impl MailService {
    fn emails_container(account: &str) -> Result<MailboxKey, ServiceError> {
        Ok(MailboxKey::emails(account)?)
    }

    /// The account's mailboxes, folded from the replicated snapshots (cached).
    pub fn account_mailboxes(&self, account: &str) -> Result<Arc<AccountMailboxes>, ServiceError> {
        let container = MailboxKey::mailboxes(account)?;
        let store = &self.inner.store;
        let root = store
            .mailbox_entry(container.id())?
            .map(|entry| entry.root.0)
            .unwrap_or([0; 32]);
        if let Some((cached_root, cached)) = crate::store::lock(&self.trees.entries).get(account) {
            if *cached_root == root {
                return Ok(cached.clone());
            }
        }
        let records = store.records_in_range(
            container.id(),
            MessageId(0),
            MessageId(u128::MAX),
            MAX_MAILBOX_WRITES + 1,
        )?;
        let mut complete = true;
        let mut snapshots = Vec::with_capacity(records.len());
        for record in records.iter().filter(|record| record.expunged.is_none()) {
            match store.blob(&record.blob)? {
                Some(bytes) => {
                    if let Some(snapshot) = decode_snapshot(&bytes) {
                        snapshots.push((record.id, snapshot));
                    }
                }
                // Replicated here but its bytes are still on the way: fold without it for now.
                None => complete = false,
            }
        }
        let records = fold(snapshots.iter().map(|(_, snapshot)| snapshot.clone()));
        let mut sources: BTreeMap<MailboxId, Vec<MessageId>> = BTreeMap::new();
        for (source, snapshot) in &snapshots {
            if records
                .get(&snapshot.id)
                .is_some_and(|folded| folded.created == snapshot.created)
            {
                sources.entry(snapshot.id).or_default().push(*source);
            }
        }
        let tree = mailbox::resolve(account, records.values());
        let folded = Arc::new(AccountMailboxes::new(tree, records, sources));
        if complete {
            crate::store::lock(&self.trees.entries).insert(account.to_owned(), (root, folded.clone()));
        }
        Ok(folded)
    }

    /// The visible mailbox at `path` (levels joined by `/`; `INBOX` in any case).
    pub fn find_mailbox(&self, account: &str, path: &str) -> Result<MailboxId, ServiceError> {
        self.check_account(account)?;
        self.account_mailboxes(account)?
            .tree
            .find(path)
            .ok_or_else(|| ServiceError::NoSuchMailbox(path.to_owned()))
    }

    /// The visible mailbox at `path`, with its counters (protocols that address mailboxes by
    /// path, as IMAP does).
    pub fn mailbox_at(&self, account: &str, path: &str) -> Result<MailboxSummary, ServiceError> {
        let id = self.find_mailbox(account, path)?;
        self.mailbox(account, id)
    }

    pub(super) fn check_account(&self, account: &str) -> Result<(), ServiceError> {
        MailboxKey::emails(account)?;
        if self.account_exists(account)? {
            Ok(())
        } else {
            Err(ServiceError::NoSuchAccount(account.to_owned()))
        }
    }

    fn summary(
        &self,
        account: &str,
        mailboxes: &AccountMailboxes,
        id: MailboxId,
    ) -> Result<MailboxSummary, ServiceError> {
        let container = ContainerFacts::read(self, account)?;
        self.summary_in(account, mailboxes, id, &container)
    }

    /// [`Self::summary`] with the account's container facts read once for many mailboxes.
    fn summary_in(
        &self,
        account: &str,
        mailboxes: &AccountMailboxes,
        id: MailboxId,
        container: &ContainerFacts,
    ) -> Result<MailboxSummary, ServiceError> {
        let shown = mailboxes
            .tree
            .get(id)
            .ok_or_else(|| ServiceError::NoSuchMailbox(id.to_string()))?;
        let (mut total, mut unseen) = (0, 0);
        for view in views_of(mailboxes, id) {
            if let Some(entry) = self.inner.store.view_entry(view)? {
                total += entry.live;
                unseen += entry.unseen;
            }
        }
        Ok(MailboxSummary {
            account: account.to_owned(),
            id,
            name: shown.path.clone(),
            parent: shown.parent,
            role: shown.role,
            subscribed: shown.subscribed,
            sort_order: shown.sort_order,
            total,
            unseen,
            tombstones: container.tombstones,
            root: container.root.clone(),
        })
    }

    /// The account's mailboxes, INBOX first, then by path. Every account has its INBOX, on every
    /// node, before anything was written.
    pub fn mailboxes(&self, account: &str) -> Result<Vec<MailboxSummary>, ServiceError> {
        self.check_account(account)?;
        let mailboxes = self.account_mailboxes(account)?;
        let container = ContainerFacts::read(self, account)?;
        let mut summaries = mailboxes
            .tree
            .mailboxes()
            .keys()
            .map(|id| self.summary_in(account, &mailboxes, *id, &container))
            .collect::<Result<Vec<_>, _>>()?;
        let inbox = mailboxes.tree.inbox();
        summaries.sort_by(|left, right| (left.id != inbox, &left.name).cmp(&(right.id != inbox, &right.name)));
        Ok(summaries)
    }

    /// One visible mailbox.
    pub fn mailbox(&self, account: &str, id: MailboxId) -> Result<MailboxSummary, ServiceError> {
        self.check_account(account)?;
        let mailboxes = self.account_mailboxes(account)?;
        self.summary(account, &mailboxes, id)
    }

    /// Every account that has anything stored here (the operator's view).
    pub fn accounts(&self) -> Result<Vec<String>, ServiceError> {
        let mut accounts: Vec<String> = self
            .inner
            .store
            .mailboxes()?
            .into_iter()
            .map(|entry| entry.key.account().to_owned())
            .collect();
        accounts.sort();
        accounts.dedup();
        Ok(accounts)
    }

    /// Every mailbox of every account held here (the operator's view).
    pub fn all_mailboxes(&self) -> Result<Vec<MailboxSummary>, ServiceError> {
        let mut all = Vec::new();
        for account in self.accounts()? {
            let mailboxes = self.account_mailboxes(&account)?;
            let container = ContainerFacts::read(self, &account)?;
            for id in mailboxes.tree.mailboxes().keys() {
                all.push(self.summary_in(&account, &mailboxes, *id, &container)?);
            }
        }
        Ok(all)
    }

    /// Writes one snapshot of a mailbox record, then expunges the snapshots it supersedes (the
    /// ones `record` was folded from, so it is at least their join; see the module doc).
    async fn write_snapshot(
        &self,
        account: &str,
        record: &MailboxRecord,
        supersedes: &[MessageId],
    ) -> Result<(), ServiceError> {
        let container = MailboxKey::mailboxes(account)?;
        let count = self
            .inner
            .store
            .mailbox_entry(container.id())?
            .map(|entry| entry.records)
            .unwrap_or(0);
        if count as usize >= MAX_MAILBOX_WRITES {
            return Err(invalid(format!(
                "the account has had {count} mailbox changes, the most this version folds"
            )));
        }
        let applied = self
            .inner
            .queue
            .submit(Operation::Append {
                mailbox: container.clone(),
                location: None,
                unless_held_in: Vec::new(),
                raw: encode_snapshot(record),
                flags: Vec::new(),
                received_millis: None,
                now_millis: self.inner.environment.now_millis(),
                random: self.inner.environment.random(),
            })
            .await?;
        if !matches!(applied, Applied::Appended { .. }) {
            return Err(ServiceError::Unavailable(
                "the store answered a mailbox write with no record".into(),
            ));
        }
        // Only once the new snapshot is durable: a failure here leaves an extra snapshot, never
        // a lost decision.
        let now_millis = self.inner.environment.now_millis();
        let collections = supersedes.iter().map(|id| {
            self.inner.queue.submit(Operation::Expunge {
                mailbox: container.clone(),
                id: *id,
                now_millis,
            })
        });
        for result in futures::future::join_all(collections).await {
            result?;
        }
        Ok(())
    }

    fn stamp(&self) -> Stamp {
        self.inner.store.stamp(self.inner.environment.now_millis())
    }

    /// The parent a new path goes under, creating missing levels; returns (parent, last level).
    async fn parent_of_path(&self, account: &str, path: &str) -> Result<(Option<MailboxId>, String), ServiceError> {
        let levels: Vec<&str> = path.split(SEPARATOR).collect();
        if levels.len() > mailbox::MAX_DEPTH {
            return Err(invalid(format!(
                "a mailbox path has at most {} levels",
                mailbox::MAX_DEPTH
            )));
        }
        for level in &levels {
            mailbox::validate_name(level)?;
        }
        let (last, parents) = levels.split_last().ok_or_else(|| invalid("empty mailbox path"))?;
        let mut parent: Option<MailboxId> = None;
        let mut walked = String::new();
        for level in parents {
            if !walked.is_empty() {
                walked.push(SEPARATOR);
            }
            walked.push_str(level);
            let tree = self.account_mailboxes(account)?;
            parent = Some(match tree.tree.find(&walked) {
                Some(id) => id,
                None => self.create_record(account, parent, level, None).await?,
            });
        }
        Ok((parent, (*last).to_owned()))
    }

    async fn create_record(
        &self,
        account: &str,
        parent: Option<MailboxId>,
        name: &str,
        role: Option<Role>,
    ) -> Result<MailboxId, ServiceError> {
        let now = self.inner.environment.now_millis();
        let id = MailboxId::from_parts(now, self.inner.environment.random());
        let record = MailboxRecord::new(id, parent, name, role, self.stamp());
        self.write_snapshot(account, &record, &[]).await?;
        Ok(id)
    }

    /// Creates a mailbox at `path`, with the levels above it that are missing. A role already
    /// held by another mailbox moves to the new one.
    pub async fn create_mailbox(
        &self,
        account: &str,
        path: &str,
        role: Option<Role>,
    ) -> Result<MailboxSummary, ServiceError> {
        self.check_account(account)?;
        if role == Some(Role::Inbox) {
            return Err(invalid("only the INBOX has the inbox role"));
        }
        let _one_at_a_time = self.trees.writes.lock().await;
        if self.account_mailboxes(account)?.tree.find(path).is_some() {
            return Err(ServiceError::MailboxExists(path.to_owned()));
        }
        let (parent, name) = self.parent_of_path(account, path).await?;
        let id = self.create_record(account, parent, &name, role).await?;
        // A same-named mailbox that replicated in meanwhile makes this one its alias.
        let shown = self.account_mailboxes(account)?.tree.canonical(id).unwrap_or(id);
        self.mailbox(account, shown)
    }

    /// Rewrites a register on every record the visible mailbox is made of.
    async fn write_members(
        &self,
        account: &str,
        id: MailboxId,
        mut change: impl FnMut(&mut MailboxRecord, Stamp),
    ) -> Result<(), ServiceError> {
        let mailboxes = self.account_mailboxes(account)?;
        if mailboxes.tree.get(id).is_none() {
            return Err(ServiceError::NoSuchMailbox(id.to_string()));
        }
        let stamp = self.stamp();
        for member in mailboxes.tree.members(id) {
            let mut record = mailboxes
                .records
                .get(&member)
                .cloned()
                .unwrap_or_else(|| MailboxRecord::default_inbox(account));
            change(&mut record, stamp);
            let supersedes = mailboxes.sources.get(&member).map(Vec::as_slice).unwrap_or(&[]);
            self.write_snapshot(account, &record, supersedes).await?;
        }
        Ok(())
    }

    /// Renames (and perhaps re-parents) a mailbox; its ID, its emails and its children stay.
    pub async fn rename_mailbox(
        &self,
        account: &str,
        id: MailboxId,
        path: &str,
    ) -> Result<MailboxSummary, ServiceError> {
        self.check_account(account)?;
        let _one_at_a_time = self.trees.writes.lock().await;
        let mailboxes = self.account_mailboxes(account)?;
        if id == mailboxes.tree.inbox() {
            return Err(invalid("the INBOX cannot be renamed"));
        }
        let current = mailboxes
            .tree
            .get(id)
            .ok_or_else(|| ServiceError::NoSuchMailbox(id.to_string()))?;
        if current.path == path {
            return self.mailbox(account, id);
        }
        if mailboxes.tree.find(path).is_some() {
            return Err(ServiceError::MailboxExists(path.to_owned()));
        }
        let inside = format!("{}{SEPARATOR}", current.path);
        if path.starts_with(&inside) {
            return Err(invalid("a mailbox cannot move under itself"));
        }
        let (parent, name) = self.parent_of_path(account, path).await?;
        self.write_members(account, id, |record, stamp| {
            record.placement.propose(
                Position {
                    parent,
                    name: name.clone(),
                },
                stamp,
            );
        })
        .await?;
        self.mailbox(account, id)
    }

    /// Changes a mailbox's role, subscription or sort order.
    pub async fn update_mailbox(
        &self,
        account: &str,
        id: MailboxId,
        update: MailboxUpdate,
    ) -> Result<MailboxSummary, ServiceError> {
        self.check_account(account)?;
        let _one_at_a_time = self.trees.writes.lock().await;
        if update.role.is_some() && id == self.account_mailboxes(account)?.tree.inbox() {
            return Err(invalid("the INBOX keeps the inbox role"));
        }
        if update.role == Some(Some(Role::Inbox)) {
            return Err(invalid("only the INBOX has the inbox role"));
        }
        self.write_members(account, id, |record, stamp| {
            if let Some(role) = update.role {
                record.role.propose(role, stamp);
            }
            if let Some(subscribed) = update.subscribed {
                record.subscribed.propose(subscribed, stamp);
            }
            if let Some(sort_order) = update.sort_order {
                record.sort_order.propose(sort_order, stamp);
            }
        })
        .await?;
        self.mailbox(account, id)
    }

    /// Deletes a mailbox with no children: destroys every email it shows here, then writes the
    /// tombstone. An email delivered into it on another site concurrently is not destroyed and
    /// is shown in the INBOX once both writes meet ([`mailbox::Placement::Rescued`]). Returns how
    /// many emails were destroyed.
    pub async fn delete_mailbox(&self, account: &str, id: MailboxId) -> Result<u64, ServiceError> {
        self.check_account(account)?;
        let _one_at_a_time = self.trees.writes.lock().await;
        let mailboxes = self.account_mailboxes(account)?;
        if id == mailboxes.tree.inbox() {
            return Err(invalid("the INBOX cannot be deleted"));
        }
        let shown = mailboxes
            .tree
            .get(id)
            .ok_or_else(|| ServiceError::NoSuchMailbox(id.to_string()))?;
        if !mailboxes.tree.children(Some(id)).is_empty() {
            return Err(ServiceError::MailboxHasChildren(shown.path.clone()));
        }
        let container = Self::emails_container(account)?;
        let mut destroyed = 0;
        for view in mailboxes.tree.members(id) {
            let mut last_round = None;
            loop {
                let ids = self.inner.store.list_ids(view, SortKey::Received, false, 0, 256)?;
                if ids.is_empty() || last_round.as_ref() == Some(&ids) {
                    break;
                }
                last_round = Some(ids.clone());
                let now = self.inner.environment.now_millis();
                let writes = ids.into_iter().map(|email| {
                    self.inner.queue.submit(Operation::Expunge {
                        mailbox: container.clone(),
                        id: email,
                        now_millis: now,
                    })
                });
                for result in futures::future::join_all(writes).await {
                    if let Applied::Record { changed: true, .. } = result? {
                        destroyed += 1;
                    }
                }
            }
        }
        self.write_members(account, id, |record, stamp| {
            record.deleted = Some(record.deleted.map_or(stamp, |deleted| deleted.max(stamp)));
        })
        .await?;
        if destroyed > 0 {
            self.count_write("expunge");
        }
        Ok(destroyed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::NodeId;

    fn stamp(time: u64, node: u64) -> Stamp {
        Stamp {
            time,
            node: NodeId(node),
        }
    }

    fn arbitrary_snapshot() -> impl proptest::strategy::Strategy<Value = MailboxRecord> {
        use proptest::prelude::*;
        (
            0u128..4,
            0u64..3,
            proptest::option::of(0u128..4),
            "[A-C]",
            proptest::option::of(prop_oneof![Just(Role::Archive), Just(Role::Sent), Just(Role::Trash)]),
            (1u64..9, 0u64..3),
            any::<bool>(),
            proptest::option::of((1u64..9, 0u64..3)),
        )
            .prop_map(|(id, created, parent, name, role, (time, node), subscribed, deleted)| {
                // One creation stamp per ID (as honest nodes make), sometimes a forged second one.
                let created_stamp = stamp(id as u64 * 10 + created / 2, 0);
                let mut record = MailboxRecord::new(
                    MailboxId(id + 1),
                    parent.map(|parent| MailboxId(parent + 1)),
                    &name,
                    None,
                    created_stamp,
                );
                let decision = stamp(time + 100, node);
                record.role.propose(role, decision);
                record.subscribed.propose(subscribed, decision);
                record.deleted = deleted.map(|(time, node)| stamp(time + 100, node));
                record
            })
    }

    use proptest::prelude::{Just, Strategy};

    proptest::proptest! {
        /// Every node holds the same set of snapshots in its own order, with repeats (a snapshot
        /// that arrived twice): the fold, and so the tree every client sees, is the same.
        #[test]
        fn any_order_and_any_repeats_of_the_snapshots_fold_to_the_same_tree(
            (snapshots, shuffled) in proptest::collection::vec(arbitrary_snapshot(), 0..12).prop_flat_map(|snapshots| {
                // The same set in another order, with a few snapshots arriving twice.
                let mut arrived = snapshots.clone();
                arrived.extend(snapshots.iter().take(3).cloned());
                (Just(snapshots), Just(arrived).prop_shuffle())
            }),
        ) {
            let one = fold(snapshots);
            let other = fold(shuffled);
            proptest::prop_assert_eq!(&one, &other);
            let left = mailbox::resolve("alice@example.org", one.values());
            let right = mailbox::resolve("alice@example.org", other.values());
            proptest::prop_assert_eq!(left.mailboxes(), right.mailboxes());
            // The listings worked out once per fold are the ones the tree gives mailbox by mailbox.
            let folded = AccountMailboxes::new(left.clone(), one.clone(), BTreeMap::new());
            for id in left.mailboxes().keys() {
                let from_tree = views_from_members(&folded, *id, left.members(*id));
                proptest::prop_assert_eq!(views_of(&folded, *id), from_tree);
            }
        }
    }

    #[test]
    fn snapshots_fold_to_the_same_records_in_any_order() {
        let id = MailboxId(42);
        let created = MailboxRecord::new(id, None, "Work", None, stamp(1, 1));
        let mut renamed = created.clone();
        renamed.placement.propose(
            Position {
                parent: None,
                name: "Jobs".into(),
            },
            stamp(5, 2),
        );
        let mut subscribed = created.clone();
        subscribed.subscribed.propose(false, stamp(4, 1));
        let forward = fold(vec![created.clone(), renamed.clone(), subscribed.clone()]);
        let backward = fold(vec![subscribed, renamed, created]);
        assert_eq!(forward, backward);
        let record = &forward[&id];
        assert_eq!(record.placement.value.name, "Jobs");
        assert!(!record.subscribed.value);
    }

    #[test]
    fn a_forged_snapshot_with_another_creation_is_ignored_the_same_way_everywhere() {
        let id = MailboxId(7);
        let honest = MailboxRecord::new(id, None, "Work", None, stamp(1, 1));
        let forged = MailboxRecord::new(id, None, "Stolen", None, stamp(9, 3));
        let one = fold(vec![honest.clone(), forged.clone()]);
        let other = fold(vec![forged, honest]);
        assert_eq!(one, other);
        assert_eq!(one[&id].placement.value.name, "Work");
    }

    #[test]
    fn snapshot_bytes_that_are_not_a_mailbox_record_are_refused() {
        assert!(decode_snapshot(b"not cbor at all").is_none());
        let mut record = MailboxRecord::new(MailboxId(1), None, "ok", None, stamp(1, 1));
        record.placement.value.name = "a/b".into();
        assert!(
            decode_snapshot(&encode_snapshot(&record)).is_none(),
            "a separator in a level"
        );
        let good = MailboxRecord::new(MailboxId(1), None, "Work", None, stamp(1, 1));
        assert_eq!(decode_snapshot(&encode_snapshot(&good)), Some(good));
    }
}
