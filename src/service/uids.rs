//! IMAP UIDs: a node-local index over the replicated store, like the sort indexes.
//!
//! IMAP wants 32-bit UIDs that ascend in the order messages arrive in a mailbox. Sites cannot
//! agree on such an order without coordination, so the UIDs are not replicated: each node numbers
//! the messages of a mailbox in the order they arrived *here* (local deliveries and replicated
//! arrivals alike), taking them from the node-local modseq log ([`MailService::changes`]).
//! Numbers are handed out lazily, when an IMAP session looks at the mailbox, and kept in a small
//! RocksDB database of their own (`uids/` under the data dir), so they survive a restart.
//!
//! When a numbered message leaves the mailbox its UID is kept as a vanished entry under the
//! modseq the numbering pass reached (never below the expunge's own modseq), with the time it was
//! seen to leave, so QRESYNC can say which UIDs vanished since a client's modseq (RFC 7162
//! VANISHED (EARLIER)); it may name a few that vanished just before, which the RFC allows.
//! Entries older than the store's tombstone horizon are pruned (the store forgets those expunges
//! too), and the mailbox remembers the highest modseq pruned: a client whose modseq is older is
//! told every UID below UIDNEXT that is not in the mailbox, the answer RFC 7162 4.1 allows a
//! server that keeps no expunged UIDs at all (its client then resyncs the message list).
//!
//! Each mailbox has a UIDVALIDITY (seconds since the epoch when its numbering began, shifted by an
//! offset of up to 18 hours fixed per node, so two nodes' numberings of one mailbox differ). If the map
//! is lost, or the store's log for the mailbox was rebuilt so that this map can no longer follow
//! it, the mailbox is numbered afresh under a new, larger UIDVALIDITY, and clients resync.
//!
//! Mailboxes are addressed by (account, name) through [`mailbox_key`] alone, so that moving to
//! the store's stable mailbox IDs is a change to that one function.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Mutex;

use rocksdb::{Direction, IteratorMode, WriteBatch, DB};

use super::{MailService, ServiceError};
use crate::model::MessageId;

/// Key prefixes: the mailbox's numbering, UID -> message, message -> UID, and (modseq, UID) of
/// the UIDs that vanished.
const META: u8 = b'm';
const BY_UID: u8 = b'u';
const BY_MESSAGE: u8 = b'i';
const VANISHED: u8 = b'x';
/// The highest modseq of the mailbox's pruned vanished entries.
const PRUNED: u8 = b'p';
/// Vanished entries one numbering pass prunes at most (the rest wait for the next pass).
const PRUNE_BATCH: usize = 10_000;

/// Why the UID map could not be opened or used.
#[derive(Debug, thiserror::Error)]
pub enum UidError {
    #[error("cannot open the IMAP UID map at {path}: {reason} (remove the directory to renumber every mailbox)")]
    Open { path: String, reason: String },
    #[error("the IMAP UID map failed: {0}")]
    Database(#[from] rocksdb::Error),
    #[error("the IMAP UID map holds a corrupt entry: {0}")]
    Corrupt(&'static str),
}

impl From<UidError> for ServiceError {
    fn from(error: UidError) -> Self {
        ServiceError::Unavailable(error.to_string())
    }
}

/// The numbering of one mailbox as it stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UidState {
    pub uid_validity: u32,
    /// The UID the next arrival gets.
    pub uid_next: u32,
    /// How far the mailbox's modseq log has been numbered.
    pub modseq: u64,
}

/// A mailbox's live messages by ascending UID, with the numbering they belong to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UidSnapshot {
    pub state: UidState,
    pub messages: Vec<(u32, MessageId)>,
}

/// The persistent UID map of one node.
pub struct UidIndex {
    db: DB,
    /// Numbering is read-modify-write: one mailbox scan at a time, so two sessions never hand out
    /// the same UID.
    lock: Mutex<()>,
}

impl UidIndex {
    /// Opens (or creates) the map at `path`.
    pub fn open(path: &Path) -> Result<UidIndex, UidError> {
        let mut options = rocksdb::Options::default();
        options.create_if_missing(true);
        let db = DB::open(&options, path).map_err(|error| UidError::Open {
            path: path.display().to_string(),
            reason: error.to_string(),
        })?;
        Ok(UidIndex {
            db,
            lock: Mutex::new(()),
        })
    }

    fn meta(&self, mailbox: &[u8; 16]) -> Result<Option<UidState>, UidError> {
        let Some(value) = self.db.get(key(META, mailbox, &[]))? else {
            return Ok(None);
        };
        if value.len() != 16 {
            return Err(UidError::Corrupt("mailbox numbering"));
        }
        Ok(Some(UidState {
            uid_validity: u32::from_be_bytes(value[0..4].try_into().expect("4 bytes")),
            uid_next: u32::from_be_bytes(value[4..8].try_into().expect("4 bytes")),
            modseq: u64::from_be_bytes(value[8..16].try_into().expect("8 bytes")),
        }))
    }

    fn uid_of(&self, mailbox: &[u8; 16], id: MessageId) -> Result<Option<u32>, UidError> {
        match self.db.get(key(BY_MESSAGE, mailbox, &id.0.to_be_bytes()))? {
            Some(value) => Ok(Some(u32::from_be_bytes(
                value
                    .as_slice()
                    .try_into()
                    .map_err(|_| UidError::Corrupt("message UID"))?,
            ))),
            None => Ok(None),
        }
    }

    /// The live messages of a mailbox with a UID above `after`, ascending.
    fn list_after(&self, mailbox: &[u8; 16], after: u32) -> Result<Vec<(u32, MessageId)>, UidError> {
        let start = key(BY_UID, mailbox, &after.saturating_add(1).to_be_bytes());
        let end = key(BY_UID, mailbox, &[0xff; 5]);
        let mut options = rocksdb::ReadOptions::default();
        options.set_iterate_upper_bound(end);
        let mut messages = Vec::new();
        if after == u32::MAX {
            return Ok(messages);
        }
        for item in self
            .db
            .iterator_opt(IteratorMode::From(&start, Direction::Forward), options)
        {
            let (key, value) = item?;
            let uid = u32::from_be_bytes(key[17..21].try_into().map_err(|_| UidError::Corrupt("UID key"))?);
            let id = u128::from_be_bytes(value.as_ref().try_into().map_err(|_| UidError::Corrupt("UID value"))?);
            messages.push((uid, MessageId(id)));
        }
        Ok(messages)
    }

    /// The UIDs that vanished from a mailbox at a modseq above `since`, ascending, with the
    /// keys they are kept under.
    fn vanished_after(&self, mailbox: &[u8; 16], since: u64) -> Result<Vec<(u32, Vec<u8>)>, UidError> {
        let start = key(VANISHED, mailbox, &since.saturating_add(1).to_be_bytes());
        let end = key(VANISHED, mailbox, &[0xff; 13]);
        let mut options = rocksdb::ReadOptions::default();
        options.set_iterate_upper_bound(end);
        let mut vanished = Vec::new();
        if since == u64::MAX {
            return Ok(vanished);
        }
        for item in self
            .db
            .iterator_opt(IteratorMode::From(&start, Direction::Forward), options)
        {
            let (key, _) = item?;
            let uid = key
                .get(25..29)
                .and_then(|bytes| bytes.try_into().ok())
                .map(u32::from_be_bytes)
                .ok_or(UidError::Corrupt("vanished key"))?;
            vanished.push((uid, key.to_vec()));
        }
        vanished.sort_unstable();
        Ok(vanished)
    }

    /// The highest modseq whose vanished entries may have been pruned (0: none).
    fn pruned(&self, mailbox: &[u8; 16]) -> Result<u64, UidError> {
        match self.db.get(key(PRUNED, mailbox, &[]))? {
            Some(value) => Ok(u64::from_be_bytes(
                value
                    .as_slice()
                    .try_into()
                    .map_err(|_| UidError::Corrupt("pruned modseq"))?,
            )),
            None => Ok(0),
        }
    }

    /// Deletes the oldest vanished entries seen to leave before `cutoff_millis` (in modseq order,
    /// so the first one kept ends the scan) and raises the mailbox's pruned modseq past them.
    /// Entries from before times were kept get `now_millis`, to be pruned a horizon from now.
    fn prune(
        &self,
        mailbox: &[u8; 16],
        cutoff_millis: u64,
        now_millis: u64,
        batch: &mut WriteBatch,
    ) -> Result<(), UidError> {
        let start = key(VANISHED, mailbox, &[]);
        let end = key(VANISHED, mailbox, &[0xff; 13]);
        let mut options = rocksdb::ReadOptions::default();
        options.set_iterate_upper_bound(end);
        let mut pruned = None;
        for item in self
            .db
            .iterator_opt(IteratorMode::From(&start, Direction::Forward), options)
            .take(PRUNE_BATCH)
        {
            let (key, value) = item?;
            let modseq = key
                .get(17..25)
                .and_then(|bytes| bytes.try_into().ok())
                .map(u64::from_be_bytes)
                .ok_or(UidError::Corrupt("vanished key"))?;
            match <[u8; 8]>::try_from(value.as_ref()) {
                Ok(seen) if u64::from_be_bytes(seen) < cutoff_millis => {
                    batch.delete(&key);
                    pruned = Some(modseq);
                }
                Ok(_) => break,
                Err(_) => batch.put(&key, now_millis.to_be_bytes()),
            }
        }
        if let Some(modseq) = pruned {
            let floor = self.pruned(mailbox)?.max(modseq);
            batch.put(self::key(PRUNED, mailbox, &[]), floor.to_be_bytes());
        }
        Ok(())
    }

    /// Forgets a mailbox's numbering (every UID, and the numbering itself).
    fn forget(&self, mailbox: &[u8; 16], batch: &mut WriteBatch) -> Result<(), UidError> {
        for (uid, id) in self.list_after(mailbox, 0)? {
            batch.delete(key(BY_UID, mailbox, &uid.to_be_bytes()));
            batch.delete(key(BY_MESSAGE, mailbox, &id.0.to_be_bytes()));
        }
        for (_, key) in self.vanished_after(mailbox, 0)? {
            batch.delete(key);
        }
        batch.delete(key(PRUNED, mailbox, &[]));
        Ok(())
    }
}

fn key(kind: u8, mailbox: &[u8; 16], rest: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(17 + rest.len());
    key.push(kind);
    key.extend_from_slice(mailbox);
    key.extend_from_slice(rest);
    key
}

/// The map's name for a mailbox. The only place that says how mailboxes are addressed here.
pub fn mailbox_key(account: &str, mailbox: crate::model::MailboxId) -> [u8; 16] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"mailmesh imap uid map v2\0");
    hasher.update(account.as_bytes());
    hasher.update(b"\0");
    hasher.update(&mailbox.to_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
    bytes
}

/// Changes a mailbox's log may list in one numbering pass (a fresh 100,000-message mailbox fits).
const NUMBERING_PAGE: usize = 10_000_000;

/// Lets a message's UID go: its two map entries are deleted and the UID is recorded as vanished
/// at the modseq the numbering reached (for QRESYNC's VANISHED).
fn let_go(batch: &mut WriteBatch, name: &[u8; 16], uid: u32, id: MessageId, reached: u64, now_millis: u64) {
    batch.delete(key(BY_UID, name, &uid.to_be_bytes()));
    batch.delete(key(BY_MESSAGE, name, &id.0.to_be_bytes()));
    let mut vanished = reached.to_be_bytes().to_vec();
    vanished.extend_from_slice(&uid.to_be_bytes());
    batch.put(key(VANISHED, name, &vanished), now_millis.to_be_bytes());
}

/// The clock UIDVALIDITY values are read from: seconds since the epoch, shifted by up to 18 hours
/// by an offset fixed per node. Every node numbers a replicated mailbox on its own, and they all
/// do it within the same second when mail arrives; with the bare clock their UIDVALIDITYs would
/// match, and a client moved to another node would keep UIDs that name other messages there.
/// With the offset two nodes share a value only if their offsets collide (1 in 65,536), while on
/// one node the values still only grow, as a renumbering needs.
fn validity_clock(now_millis: u64, node: u64) -> u32 {
    let offset = blake3::hash(&node.to_be_bytes()).as_bytes()[..2]
        .iter()
        .fold(0u64, |value, byte| value << 8 | u64::from(*byte));
    (now_millis / 1000 + offset).clamp(1, u64::from(u32::MAX)) as u32
}

impl MailService {
    /// Numbers every message of the mailbox that has no UID yet and returns the numbering.
    pub fn uid_sync(&self, uids: &UidIndex, account: &str, mailbox: &str) -> Result<UidState, ServiceError> {
        Ok(self.uid_snapshot_after(uids, account, mailbox, u32::MAX)?.state)
    }

    /// Numbers new arrivals, then lists the live messages whose UID is above `after`, ascending
    /// (`0`: all of them), with the numbering they belong to. Both are read under one lock, so
    /// the list holds exactly the messages numbered up to `state.modseq`.
    pub fn uid_snapshot_after(
        &self,
        uids: &UidIndex,
        account: &str,
        mailbox: &str,
        after: u32,
    ) -> Result<UidSnapshot, ServiceError> {
        // Keyed by the mailbox's stable ID: a rename keeps its UIDs and UIDVALIDITY.
        let mailbox_id = self.find_mailbox(account, mailbox)?;
        let name = mailbox_key(account, mailbox_id);
        let _guard = uids.lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let now_millis = self.inner.environment.now_millis();
        let now_seconds = validity_clock(now_millis, self.inner.store.node().0);
        let mut batch = WriteBatch::default();
        let stored = uids.meta(&name)?;
        let mut state = stored.unwrap_or(UidState {
            uid_validity: now_seconds,
            uid_next: 1,
            modseq: 0,
        });
        let mut renumbered = false;
        let mut changes = self.changes(account, mailbox_id, state.modseq, NUMBERING_PAGE)?;
        // Tombstones purged since the map last followed the log took their expunges with them:
        // what was created or changed is still listed, and the map is compared with what the
        // mailbox holds (renumbering would needlessly make every client download it again).
        let sweep = changes.cannot_calculate && changes.expunges_purged;
        if changes.cannot_calculate && !sweep {
            // The log was rebuilt (or this map is from another store): number afresh.
            tracing::info!(
                account,
                mailbox,
                "the IMAP UID map cannot follow the mailbox's log; renumbering"
            );
            uids.forget(&name, &mut batch)?;
            state = UidState {
                uid_validity: now_seconds.max(state.uid_validity.saturating_add(1)),
                uid_next: 1,
                modseq: 0,
            };
            renumbered = true;
            changes = self.changes(account, mailbox_id, 0, NUMBERING_PAGE)?;
            if changes.cannot_calculate {
                return Err(ServiceError::Unavailable(
                    "the mailbox's change log is too long to number in one pass".into(),
                ));
            }
        }
        // The pass reaches the log's modseq, which is at or above every expunge it lists.
        let reached = changes.modseq.max(state.modseq);
        for id in changes.expunged {
            if renumbered {
                break; // the old numbering is gone whole
            }
            if let Some(uid) = uids.uid_of(&name, id)? {
                let_go(&mut batch, &name, uid, id, reached, now_millis);
            }
        }
        for id in changes.created.into_iter().chain(changes.updated) {
            if !renumbered && uids.uid_of(&name, id)?.is_some() {
                continue;
            }
            if state.uid_next == u32::MAX {
                return Err(ServiceError::Unavailable("the mailbox ran out of IMAP UIDs".into()));
            }
            batch.put(key(BY_UID, &name, &state.uid_next.to_be_bytes()), id.0.to_be_bytes());
            batch.put(
                key(BY_MESSAGE, &name, &id.0.to_be_bytes()),
                state.uid_next.to_be_bytes(),
            );
            state.uid_next += 1;
        }
        if sweep {
            let everything = self.changes(account, mailbox_id, 0, NUMBERING_PAGE)?;
            if everything.cannot_calculate {
                return Err(ServiceError::Unavailable(
                    "the mailbox's change log is too long to compare in one pass".into(),
                ));
            }
            let live: HashSet<MessageId> = everything.created.into_iter().collect();
            for (uid, id) in uids.list_after(&name, 0)? {
                if !live.contains(&id) {
                    let_go(&mut batch, &name, uid, id, reached, now_millis);
                }
            }
        }
        state.modseq = reached;
        if !renumbered {
            uids.prune(
                &name,
                self.inner.store.tombstone_cutoff(now_millis),
                now_millis,
                &mut batch,
            )?;
        }
        if stored != Some(state) {
            let mut meta = Vec::with_capacity(16);
            meta.extend_from_slice(&state.uid_validity.to_be_bytes());
            meta.extend_from_slice(&state.uid_next.to_be_bytes());
            meta.extend_from_slice(&state.modseq.to_be_bytes());
            batch.put(key(META, &name, &[]), meta);
        }
        if !batch.is_empty() {
            uids.db.write(batch).map_err(UidError::from)?;
        }
        let messages = if after == u32::MAX {
            Vec::new()
        } else {
            uids.list_after(&name, after)?
        };
        Ok(UidSnapshot { state, messages })
    }

    /// The UIDs that left the mailbox since `since` (a modseq of this node), ascending, after
    /// numbering what is new; may include some that left a little before. For a `since` older
    /// than the pruned entries: every UID below UIDNEXT that is not in the mailbox now.
    pub fn vanished_since(
        &self,
        uids: &UidIndex,
        account: &str,
        mailbox: &str,
        since: u64,
    ) -> Result<Vec<u32>, ServiceError> {
        let state = self.uid_sync(uids, account, mailbox)?;
        let mailbox_id = self.find_mailbox(account, mailbox)?;
        let name = mailbox_key(account, mailbox_id);
        let _guard = uids.lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if since < uids.pruned(&name)? {
            let live = uids.list_after(&name, 0)?;
            let mut live = live.iter().map(|(uid, _)| *uid).peekable();
            let mut gone = Vec::new();
            for uid in 1..state.uid_next {
                if live.next_if_eq(&uid).is_none() {
                    gone.push(uid);
                }
            }
            return Ok(gone);
        }
        let mut vanished: Vec<u32> = uids
            .vanished_after(&name, since)?
            .into_iter()
            .map(|(uid, _)| uid)
            .collect();
        vanished.dedup();
        Ok(vanished)
    }

    /// The UID of a live message, once numbered.
    pub fn uid_of(
        &self,
        uids: &UidIndex,
        account: &str,
        mailbox: &str,
        id: MessageId,
    ) -> Result<Option<u32>, ServiceError> {
        let mailbox_id = self.find_mailbox(account, mailbox)?;
        Ok(uids.uid_of(&mailbox_key(account, mailbox_id), id)?)
    }
}

#[cfg(test)]
mod tests {
    use super::validity_clock;

    #[test]
    fn nodes_numbering_in_the_same_second_get_their_own_uidvalidity_and_each_only_grows() {
        let now = 1_780_000_000_123;
        let validities: std::collections::BTreeSet<u32> = (1..=64u64).map(|node| validity_clock(now, node)).collect();
        assert_eq!(validities.len(), 64, "two of 64 nodes share a UIDVALIDITY");
        for node in [1, 77, u64::MAX] {
            assert!(validity_clock(now + 1_000, node) > validity_clock(now, node));
            let shift = u64::from(validity_clock(now, node)) - now / 1000;
            assert!(shift < 65_536);
        }
    }
}
