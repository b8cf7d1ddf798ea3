//! The durable store: RocksDB column families, one atomic write batch per group of operations.
//!
//! Column families:
//! - `records`: `mailbox id (16) | message id (16)` -> CBOR [`MessageRecord`];
//! - `blobs`: `blake3 (32)` -> raw message bytes (RocksDB blob files keep large values out of the LSM);
//! - `tree`: `space (17) | depth (1) | prefix bits (16)` -> [`Aggregate`] (40 bytes), for the trie of
//!   every mailbox and for the directory trie over all mailboxes;
//! - `mailboxes`: `mailbox id (16)` -> CBOR [`MailboxEntry`] (key, counters, root);
//! - `meta`: the clock, the last message ID issued, the node ID.
//!
//! Every operation — append, flag change, expunge, merge of a peer's record, blob put — is applied
//! together with the trie aggregates, the mailbox counters, the directory trie and the clock in one
//! `WriteBatch`, written with a synced WAL before anyone is told it succeeded. Concurrent writers
//! are grouped: [`CommitQueue`] drains whatever is waiting into one batch and one fsync (group
//! commit), and each operation still succeeds or fails on its own.
//!
//! The store owns the node's clock and ID generator (both restored from `meta` on open), so a
//! stamp or an ID is never issued twice, even after a crash.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use rocksdb::{ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB};
use serde::{Deserialize, Serialize};

use crate::crdt::{self, Clock, ClockError, MergeError};
use crate::merkle::{aggregate_changes, Aggregate, AggregateDelta, Prefix, StoredDepth, TreeView};
use crate::model::{BlobHash, Flag, MailboxId, MailboxKey, MessageId, MessageIdGenerator, MessageRecord, NodeId, Stamp};

const RECORDS: &str = "records";
const BLOBS: &str = "blobs";
const TREE: &str = "tree";
const MAILBOXES: &str = "mailboxes";
const META: &str = "meta";

const META_CLOCK: &[u8] = b"clock";
const META_LAST_ID: &[u8] = b"last_id";

/// Why a store operation failed. Each variant says what the caller can do about it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage failure: {0}")]
    Database(#[from] rocksdb::Error),
    #[error("message {id} not found in {mailbox:?}")]
    NotFound { mailbox: MailboxKey, id: MessageId },
    #[error("message {0} is expunged")]
    Expunged(MessageId),
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: u64, limit: u64 },
    #[error("blob bytes do not match their hash {expected}")]
    BlobMismatch { expected: BlobHash },
    #[error("refused a record from a peer: {0}")]
    Clock(#[from] ClockError),
    #[error("refused a record from a peer: {0}")]
    Merge(#[from] MergeError),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("the store's writer has stopped")]
    Closed,
}

/// Settings of a store.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Largest accepted message in bytes.
    pub max_message_bytes: u64,
    /// How far ahead of the local clock a peer's stamp may be, in milliseconds.
    pub clock_bound_millis: u64,
    /// Sync the WAL before acknowledging (turn off only in benchmarks that say so).
    pub sync_writes: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions { max_message_bytes: 50 * 1024 * 1024, clock_bound_millis: 5 * 60 * 1000, sync_writes: true }
    }
}

/// One write. Time and randomness come from the caller.
#[derive(Clone, Debug)]
pub enum Operation {
    /// Stores a new message; the store issues its ID and stamps its initial flags.
    Append { mailbox: MailboxKey, raw: Vec<u8>, flags: Vec<Flag>, now_millis: u64, random: u128 },
    /// Sets and clears flags of a live message.
    SetFlags { mailbox: MailboxKey, id: MessageId, add: Vec<Flag>, remove: Vec<Flag>, now_millis: u64 },
    /// Expunges a message (idempotent).
    Expunge { mailbox: MailboxKey, id: MessageId, now_millis: u64 },
    /// Merges a record received from a peer.
    Merge { mailbox: MailboxKey, record: MessageRecord, now_millis: u64 },
    /// Stores a blob received from a peer, after checking its hash.
    PutBlob { expected: BlobHash, bytes: Vec<u8> },
}

/// What an operation did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// A new message and its ID.
    Appended { id: MessageId, blob: BlobHash, size: u64, record: MessageRecord },
    /// The record as it now stands, and whether this operation changed it.
    Record { record: MessageRecord, changed: bool },
    /// A blob was stored (or was already there).
    Blob { hash: BlobHash, new: bool },
}

/// A mailbox's entry in the directory: its key, counters and current root.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailboxEntry {
    pub key: MailboxKey,
    /// Records including tombstones.
    pub records: u64,
    /// Live (not expunged) messages.
    pub live: u64,
    /// Live messages without \Seen.
    pub unseen: u64,
    /// blake3 of the mailbox's root aggregate.
    pub root: crate::model::FixedBytes<32>,
}

/// Which trie: the directory of mailboxes or one mailbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Space {
    Directory,
    Mailbox(MailboxId),
}

impl Space {
    fn key_prefix(&self) -> [u8; 17] {
        let mut bytes = [0u8; 17];
        if let Space::Mailbox(id) = self {
            bytes[0] = 1;
            bytes[1..].copy_from_slice(&id.to_bytes());
        }
        bytes
    }

    fn stored_depth(&self) -> StoredDepth {
        match self {
            Space::Directory => StoredDepth::DIRECTORY,
            Space::Mailbox(_) => StoredDepth::MAILBOX,
        }
    }
}

fn tree_key(space: Space, prefix: Prefix) -> [u8; 34] {
    let mut key = [0u8; 34];
    key[..17].copy_from_slice(&space.key_prefix());
    key[17] = prefix.depth();
    key[18..].copy_from_slice(&prefix.bits().to_be_bytes());
    key
}

fn record_key(mailbox: MailboxId, id: MessageId) -> [u8; 32] {
    let mut key = [0u8; 32];
    key[..16].copy_from_slice(&mailbox.to_bytes());
    key[16..].copy_from_slice(&id.to_bytes());
    key
}

/// The directory leaf of a mailbox: its ID bound to its root.
pub fn directory_leaf(mailbox: MailboxId, root: &[u8; 32]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"mailmesh directory leaf v1\0");
    hasher.update(&mailbox.to_bytes());
    hasher.update(root);
    *hasher.finalize().as_bytes()
}

fn encode_cbor<T: Serialize>(value: &T) -> Vec<u8> {
    cbor4ii::serde::to_vec(Vec::new(), value).unwrap_or_default()
}

fn decode_cbor<T: for<'de> Deserialize<'de>>(bytes: &[u8], what: &str) -> Result<T, StoreError> {
    cbor4ii::serde::from_slice(bytes).map_err(|error| StoreError::Corrupt(format!("{what}: {error}")))
}

struct WriterState {
    clock: Clock,
    ids: MessageIdGenerator,
}

/// The node's RocksDB store.
pub struct Store {
    db: DB,
    options: StoreOptions,
    node: NodeId,
    writer: Mutex<WriterState>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Store").field("path", &self.db.path()).field("node", &self.node).finish()
    }
}

impl Store {
    /// Opens (or creates) the store in `path` for the node `node`.
    pub fn open(path: &Path, node: NodeId, options: StoreOptions) -> Result<Store, StoreError> {
        let mut db_options = Options::default();
        db_options.create_if_missing(true);
        db_options.create_missing_column_families(true);
        db_options.set_compression_type(rocksdb::DBCompressionType::Lz4);
        db_options.set_max_background_jobs(2);
        let mut blob_options = Options::default();
        blob_options.set_enable_blob_files(true);
        blob_options.set_min_blob_size(4096);
        blob_options.set_compression_type(rocksdb::DBCompressionType::Lz4);
        let families = vec![
            ColumnFamilyDescriptor::new(RECORDS, Options::default()),
            ColumnFamilyDescriptor::new(BLOBS, blob_options),
            ColumnFamilyDescriptor::new(TREE, Options::default()),
            ColumnFamilyDescriptor::new(MAILBOXES, Options::default()),
            ColumnFamilyDescriptor::new(META, Options::default()),
        ];
        let db = DB::open_cf_descriptors(&db_options, path, families)?;
        let meta = db.cf_handle(META).ok_or_else(|| StoreError::Corrupt("missing meta family".into()))?;
        let clock_value = match db.get_cf(&meta, META_CLOCK)? {
            Some(bytes) => u64::from_be_bytes(
                bytes.as_slice().try_into().map_err(|_| StoreError::Corrupt("clock value".into()))?,
            ),
            None => 0,
        };
        let last_id = match db.get_cf(&meta, META_LAST_ID)? {
            Some(bytes) => MessageId::from_slice(&bytes).ok_or_else(|| StoreError::Corrupt("last id value".into()))?,
            None => MessageId::default(),
        };
        let writer = WriterState {
            clock: Clock::resume(clock_value, options.clock_bound_millis),
            ids: MessageIdGenerator::after(last_id),
        };
        Ok(Store { db, options, node, writer: Mutex::new(writer) })
    }

    fn family(&self, name: &str) -> Result<&rocksdb::ColumnFamily, StoreError> {
        self.db.cf_handle(name).ok_or_else(|| StoreError::Corrupt(format!("missing column family {name}")))
    }

    /// The node whose store this is.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// The store's settings.
    pub fn options(&self) -> &StoreOptions {
        &self.options
    }

    /// The clock's current value.
    pub fn clock(&self) -> u64 {
        self.writer.lock().map(|state| state.clock.current()).unwrap_or(0)
    }

    /// Applies operations in one atomic, durable batch. Each operation gets its own result; one
    /// failing leaves the others untouched.
    pub fn apply(&self, operations: Vec<Operation>) -> Vec<Result<Applied, StoreError>> {
        let mut state = match self.writer.lock() {
            Ok(state) => state,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut staging = Staging::default();
        let mut results: Vec<Result<Applied, StoreError>> =
            operations.into_iter().map(|operation| self.stage(&mut state, &mut staging, operation)).collect();
        if let Err(error) = self.commit(&state, staging) {
            let message = error.to_string();
            for result in &mut results {
                if result.is_ok() {
                    *result = Err(StoreError::Corrupt(format!("batch not written: {message}")));
                }
            }
            // The in-memory clock and generator may have moved ahead; that only skips values.
        }
        results
    }

    /// Applies one operation durably.
    pub fn apply_one(&self, operation: Operation) -> Result<Applied, StoreError> {
        self.apply(vec![operation]).pop().unwrap_or(Err(StoreError::Closed))
    }

    fn load(&self, staging: &Staging, mailbox: MailboxId, id: MessageId) -> Result<Option<MessageRecord>, StoreError> {
        if let Some(change) = staging.records.get(&(mailbox, id)) {
            return Ok(Some(change.new.clone()));
        }
        self.record(mailbox, id)
    }

    fn stage(&self, state: &mut WriterState, staging: &mut Staging, operation: Operation) -> Result<Applied, StoreError> {
        match operation {
            Operation::Append { mailbox, raw, flags, now_millis, random } => {
                let size = raw.len() as u64;
                if size > self.options.max_message_bytes {
                    return Err(StoreError::TooLarge { size, limit: self.options.max_message_bytes });
                }
                let blob = BlobHash::of(&raw);
                let id = state.ids.next(now_millis, random);
                let mut record = MessageRecord::new(id, blob, size, now_millis, self.node);
                if !flags.is_empty() {
                    let stamp = Stamp { time: state.clock.tick(now_millis), node: self.node };
                    for flag in flags {
                        crdt::apply_flag(&mut record, flag, true, stamp);
                    }
                }
                staging.last_id = Some(id);
                staging.blobs.insert(blob, raw);
                staging.change(mailbox, None, record.clone());
                Ok(Applied::Appended { id, blob, size, record })
            }
            Operation::SetFlags { mailbox, id, add, remove, now_millis } => {
                let mailbox_id = mailbox.id();
                let old = self
                    .load(staging, mailbox_id, id)?
                    .ok_or_else(|| StoreError::NotFound { mailbox: mailbox.clone(), id })?;
                if !old.is_live() {
                    return Err(StoreError::Expunged(id));
                }
                let stamp = Stamp { time: state.clock.tick(now_millis), node: self.node };
                let mut record = old.clone();
                let mut changed = false;
                for flag in add {
                    changed |= crdt::apply_flag(&mut record, flag, true, stamp);
                }
                for flag in remove {
                    changed |= crdt::apply_flag(&mut record, flag, false, stamp);
                }
                if changed {
                    staging.change(mailbox, Some(old), record.clone());
                }
                Ok(Applied::Record { record, changed })
            }
            Operation::Expunge { mailbox, id, now_millis } => {
                let mailbox_id = mailbox.id();
                let old = self
                    .load(staging, mailbox_id, id)?
                    .ok_or_else(|| StoreError::NotFound { mailbox: mailbox.clone(), id })?;
                if !old.is_live() {
                    return Ok(Applied::Record { record: old, changed: false });
                }
                let mut record = old.clone();
                record.expunged = Some(Stamp { time: state.clock.tick(now_millis), node: self.node });
                staging.change(mailbox, Some(old), record.clone());
                Ok(Applied::Record { record, changed: true })
            }
            Operation::Merge { mailbox, record, now_millis } => {
                if let Some(latest) = record.latest_stamp() {
                    state.clock.check(latest.time, now_millis)?;
                }
                let old = self.load(staging, mailbox.id(), record.id)?;
                let merged = match &old {
                    Some(existing) => crdt::merge(existing, &record)?,
                    None => record.clone(),
                };
                if let Some(latest) = record.latest_stamp() {
                    state.clock.observe(latest.time, now_millis)?;
                }
                let changed = old.as_ref() != Some(&merged);
                if changed {
                    staging.change(mailbox, old, merged.clone());
                }
                Ok(Applied::Record { record: merged, changed })
            }
            Operation::PutBlob { expected, bytes } => {
                if bytes.len() as u64 > self.options.max_message_bytes {
                    return Err(StoreError::TooLarge { size: bytes.len() as u64, limit: self.options.max_message_bytes });
                }
                if BlobHash::of(&bytes) != expected {
                    return Err(StoreError::BlobMismatch { expected });
                }
                let new = !staging.blobs.contains_key(&expected) && !self.has_blob(&expected)?;
                if new {
                    staging.blobs.insert(expected, bytes);
                }
                Ok(Applied::Blob { hash: expected, new })
            }
        }
    }

    fn commit(&self, state: &WriterState, staging: Staging) -> Result<(), StoreError> {
        let records = self.family(RECORDS)?;
        let blobs = self.family(BLOBS)?;
        let tree = self.family(TREE)?;
        let mailboxes = self.family(MAILBOXES)?;
        let meta = self.family(META)?;
        let mut batch = WriteBatch::default();
        for (hash, bytes) in &staging.blobs {
            batch.put_cf(blobs, hash.as_bytes(), bytes);
        }
        // Fold record changes into counters and trie deltas, per mailbox.
        let mut deltas: HashMap<(Space, Prefix), AggregateDelta> = HashMap::new();
        let mut counters: HashMap<MailboxId, (MailboxKey, i64, i64, i64)> = HashMap::new();
        for ((mailbox_id, id), change) in &staging.records {
            batch.put_cf(records, record_key(*mailbox_id, *id), encode_cbor(&change.new));
            let old_hash = change.old.as_ref().map(crdt::state_hash);
            let new_hash = crdt::state_hash(&change.new);
            let space = Space::Mailbox(*mailbox_id);
            for (prefix, delta) in aggregate_changes(id.0, old_hash.as_ref(), Some(&new_hash), space.stored_depth()) {
                deltas.entry((space, prefix)).or_default().add(&delta);
            }
            let entry = counters.entry(*mailbox_id).or_insert_with(|| (change.mailbox.clone(), 0, 0, 0));
            let (old_records, old_live, old_unseen) = change.old.as_ref().map(counts).unwrap_or((0, 0, 0));
            let (new_records, new_live, new_unseen) = counts(&change.new);
            entry.1 += new_records - old_records;
            entry.2 += new_live - old_live;
            entry.3 += new_unseen - old_unseen;
        }
        let mut roots: HashMap<MailboxId, Aggregate> = HashMap::new();
        for ((space, prefix), delta) in &deltas {
            let key = tree_key(*space, *prefix);
            let mut aggregate = self.stored_aggregate(&key)?;
            aggregate.apply(delta);
            if aggregate.is_empty() {
                batch.delete_cf(tree, key);
            } else {
                batch.put_cf(tree, key, aggregate.to_bytes());
            }
            if let (Space::Mailbox(mailbox), 0) = (space, prefix.depth()) {
                roots.insert(*mailbox, aggregate);
            }
        }
        // Mailbox entries and the directory trie.
        let mut directory_deltas: HashMap<Prefix, AggregateDelta> = HashMap::new();
        for (mailbox_id, (key, records_delta, live_delta, unseen_delta)) in counters {
            let existing = self.mailbox_entry(mailbox_id)?;
            let old_root = existing.as_ref().map(|entry| entry.root.0);
            let mut entry = existing.unwrap_or(MailboxEntry {
                key,
                records: 0,
                live: 0,
                unseen: 0,
                root: crate::model::FixedBytes([0; 32]),
            });
            entry.records = entry.records.wrapping_add_signed(records_delta);
            entry.live = entry.live.wrapping_add_signed(live_delta);
            entry.unseen = entry.unseen.wrapping_add_signed(unseen_delta);
            let root = match roots.get(&mailbox_id) {
                Some(aggregate) => *aggregate,
                None => self.mailbox_root(mailbox_id)?,
            };
            entry.root = crate::model::FixedBytes(root.root_hash());
            let old_leaf = old_root.map(|root| directory_leaf(mailbox_id, &root));
            let new_leaf = directory_leaf(mailbox_id, &entry.root.0);
            for (prefix, delta) in aggregate_changes(mailbox_id.0, old_leaf.as_ref(), Some(&new_leaf), StoredDepth::DIRECTORY) {
                directory_deltas.entry(prefix).or_default().add(&delta);
            }
            batch.put_cf(mailboxes, mailbox_id.to_bytes(), encode_cbor(&entry));
        }
        for (prefix, delta) in directory_deltas {
            let key = tree_key(Space::Directory, prefix);
            let mut aggregate = self.stored_aggregate(&key)?;
            aggregate.apply(&delta);
            if aggregate.is_empty() {
                batch.delete_cf(tree, key);
            } else {
                batch.put_cf(tree, key, aggregate.to_bytes());
            }
        }
        batch.put_cf(meta, META_CLOCK, state.clock.current().to_be_bytes());
        if let Some(id) = staging.last_id {
            batch.put_cf(meta, META_LAST_ID, id.to_bytes());
        }
        let mut write_options = WriteOptions::default();
        write_options.set_sync(self.options.sync_writes);
        self.db.write_opt(batch, &write_options)?;
        Ok(())
    }

    fn stored_aggregate(&self, key: &[u8]) -> Result<Aggregate, StoreError> {
        match self.db.get_pinned_cf(self.family(TREE)?, key)? {
            Some(bytes) => Aggregate::from_bytes(&bytes).ok_or_else(|| StoreError::Corrupt("aggregate value".into())),
            None => Ok(Aggregate::default()),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Reads
    // -----------------------------------------------------------------------------------------

    /// One record.
    pub fn record(&self, mailbox: MailboxId, id: MessageId) -> Result<Option<MessageRecord>, StoreError> {
        match self.db.get_pinned_cf(self.family(RECORDS)?, record_key(mailbox, id))? {
            Some(bytes) => Ok(Some(decode_cbor(&bytes, "record")?)),
            None => Ok(None),
        }
    }

    /// Whether a blob is stored.
    pub fn has_blob(&self, hash: &BlobHash) -> Result<bool, StoreError> {
        Ok(self.db.get_pinned_cf(self.family(BLOBS)?, hash.as_bytes())?.is_some())
    }

    /// A blob's bytes.
    pub fn blob(&self, hash: &BlobHash) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get_cf(self.family(BLOBS)?, hash.as_bytes())?)
    }

    /// A mailbox's directory entry.
    pub fn mailbox_entry(&self, mailbox: MailboxId) -> Result<Option<MailboxEntry>, StoreError> {
        match self.db.get_pinned_cf(self.family(MAILBOXES)?, mailbox.to_bytes())? {
            Some(bytes) => Ok(Some(decode_cbor(&bytes, "mailbox entry")?)),
            None => Ok(None),
        }
    }

    /// Every mailbox, in mailbox-ID order.
    pub fn mailboxes(&self) -> Result<Vec<MailboxEntry>, StoreError> {
        let mut entries = Vec::new();
        for item in self.db.iterator_cf(self.family(MAILBOXES)?, IteratorMode::Start) {
            let (_, value) = item?;
            entries.push(decode_cbor(&value, "mailbox entry")?);
        }
        Ok(entries)
    }

    /// Records of a mailbox with IDs in `low..=high`, in ID order, at most `limit`.
    pub fn records_in_range(
        &self,
        mailbox: MailboxId,
        low: MessageId,
        high: MessageId,
        limit: usize,
    ) -> Result<Vec<MessageRecord>, StoreError> {
        let start = record_key(mailbox, low);
        let end = record_key(mailbox, high);
        let mut records = Vec::new();
        for item in self.db.iterator_cf(self.family(RECORDS)?, IteratorMode::From(&start, Direction::Forward)) {
            let (key, value) = item?;
            if key.as_ref() > end.as_slice() || records.len() >= limit {
                break;
            }
            records.push(decode_cbor(&value, "record")?);
        }
        Ok(records)
    }

    /// Visits the records of a mailbox in ID order (newest first when `descending`) until `visit`
    /// returns false.
    pub fn records_ordered(
        &self,
        mailbox: MailboxId,
        descending: bool,
        mut visit: impl FnMut(MessageRecord) -> bool,
    ) -> Result<(), StoreError> {
        let start = record_key(mailbox, MessageId(0));
        let end = record_key(mailbox, MessageId(u128::MAX));
        let mode = if descending {
            IteratorMode::From(&end, Direction::Reverse)
        } else {
            IteratorMode::From(&start, Direction::Forward)
        };
        for item in self.db.iterator_cf(self.family(RECORDS)?, mode) {
            let (key, value) = item?;
            if key.as_ref() < start.as_slice() || key.as_ref() > end.as_slice() {
                break;
            }
            if !visit(decode_cbor(&value, "record")?) {
                break;
            }
        }
        Ok(())
    }

    /// The trie of a space, for reconciliation.
    pub fn tree(&self, space: Space) -> StoreTree<'_> {
        StoreTree { store: self, space }
    }

    /// The node digest: the directory trie's root aggregate.
    pub fn digest(&self) -> Result<Aggregate, StoreError> {
        self.stored_aggregate(&tree_key(Space::Directory, Prefix::ROOT))
    }

    /// A mailbox's root aggregate.
    pub fn mailbox_root(&self, mailbox: MailboxId) -> Result<Aggregate, StoreError> {
        self.stored_aggregate(&tree_key(Space::Mailbox(mailbox), Prefix::ROOT))
    }
}

fn counts(record: &MessageRecord) -> (i64, i64, i64) {
    let live = i64::from(record.is_live());
    let unseen = i64::from(record.is_live() && !record.has_flag(&Flag::Seen));
    (1, live, unseen)
}

struct RecordChange {
    mailbox: MailboxKey,
    old: Option<MessageRecord>,
    new: MessageRecord,
}

#[derive(Default)]
struct Staging {
    records: BTreeMap<(MailboxId, MessageId), RecordChange>,
    blobs: BTreeMap<BlobHash, Vec<u8>>,
    last_id: Option<MessageId>,
}

impl Staging {
    /// Records a change; a record changed twice in one batch keeps its first `old`.
    fn change(&mut self, mailbox: MailboxKey, old: Option<MessageRecord>, new: MessageRecord) {
        let key = (mailbox.id(), new.id);
        match self.records.get_mut(&key) {
            Some(existing) => existing.new = new,
            None => {
                self.records.insert(key, RecordChange { mailbox, old, new });
            }
        }
    }
}

/// One trie of the store, read straight from RocksDB.
pub struct StoreTree<'a> {
    store: &'a Store,
    space: Space,
}

impl TreeView for StoreTree<'_> {
    type Error = StoreError;

    fn aggregate(&self, prefix: Prefix) -> Result<Aggregate, StoreError> {
        if prefix.depth() <= self.space.stored_depth().0 {
            return self.store.stored_aggregate(&tree_key(self.space, prefix));
        }
        let mut aggregate = Aggregate::default();
        for (_, hash) in self.leaves(prefix, usize::MAX)? {
            aggregate.add(&Aggregate::leaf(&hash));
        }
        Ok(aggregate)
    }

    fn leaves(&self, prefix: Prefix, limit: usize) -> Result<Vec<(u128, [u8; 32])>, StoreError> {
        let (low, high) = prefix.bounds();
        let mut leaves = Vec::new();
        match self.space {
            Space::Mailbox(mailbox) => {
                for record in self.store.records_in_range(mailbox, MessageId(low), MessageId(high), limit)? {
                    leaves.push((record.id.0, crdt::state_hash(&record)));
                }
            }
            Space::Directory => {
                let family = self.store.family(MAILBOXES)?;
                let start = low.to_be_bytes();
                for item in self.store.db.iterator_cf(family, IteratorMode::From(&start, Direction::Forward)) {
                    let (key, value) = item?;
                    let id = u128::from_be_bytes(
                        key.as_ref().try_into().map_err(|_| StoreError::Corrupt("mailbox key".into()))?,
                    );
                    if id > high || leaves.len() >= limit {
                        break;
                    }
                    let entry: MailboxEntry = decode_cbor(&value, "mailbox entry")?;
                    leaves.push((id, directory_leaf(MailboxId(id), &entry.root.0)));
                }
            }
        }
        Ok(leaves)
    }
}

// ---------------------------------------------------------------------------------------------
// Group commit
// ---------------------------------------------------------------------------------------------

type Reply = tokio::sync::oneshot::Sender<Result<Applied, StoreError>>;

/// Durable group commit: operations from any number of threads or tasks are gathered into one
/// batch and one WAL sync by a dedicated writer thread.
#[derive(Clone)]
pub struct CommitQueue {
    sender: std::sync::mpsc::Sender<(Operation, Reply)>,
}

impl CommitQueue {
    /// Starts the writer thread for `store`. It stops when every queue handle is dropped.
    pub fn start(store: Arc<Store>, max_batch: usize) -> CommitQueue {
        let (sender, receiver) = std::sync::mpsc::channel::<(Operation, Reply)>();
        std::thread::Builder::new()
            .name("mailmesh-commit".into())
            .spawn(move || {
                while let Ok(first) = receiver.recv() {
                    let mut pending = vec![first];
                    while pending.len() < max_batch {
                        match receiver.try_recv() {
                            Ok(next) => pending.push(next),
                            Err(_) => break,
                        }
                    }
                    let (operations, replies): (Vec<Operation>, Vec<Reply>) = pending.into_iter().unzip();
                    let results = store.apply(operations);
                    for (reply, result) in replies.into_iter().zip(results) {
                        let _ = reply.send(result);
                    }
                }
            })
            .map(|_| ())
            .unwrap_or_else(|error| tracing::error!("cannot start the commit thread: {error}"));
        CommitQueue { sender }
    }

    /// Submits an operation and waits until it is durable (or failed).
    pub async fn submit(&self, operation: Operation) -> Result<Applied, StoreError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.sender.send((operation, reply)).map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// The same, for threads outside the async runtime.
    pub fn submit_blocking(&self, operation: Operation) -> Result<Applied, StoreError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.sender.send((operation, reply)).map_err(|_| StoreError::Closed)?;
        answer.blocking_recv().map_err(|_| StoreError::Closed)?
    }
}
