//! The durable store: RocksDB column families, one atomic write batch per group of operations.
//!
//! Column families:
//! - `records`: `mailbox id (16) | message id (16)` -> CBOR [`MessageRecord`];
//! - `blobs`: `blake3 (32)` -> raw message bytes (RocksDB blob files keep large values out of the LSM);
//! - `tree`: `space (17) | depth (1) | prefix bits (16)` -> [`Aggregate`] (40 bytes), for the trie of
//!   every mailbox and for the directory trie over all mailboxes;
//! - `mailboxes`: `mailbox id (16)` -> CBOR [`MailboxEntry`] (key, counters, root);
//! - `meta`: the store format, the clock, the last message ID issued, the search queue's sequence.
//!
//! # Format
//! `meta` holds the store's format ([`STORE_FORMAT`]), written when the store is created and
//! checked at every open: a store of another format is refused with [`StoreError::Format`], which
//! says what to do, instead of being misread. Format 1 is every store written before the marker
//! existed (it holds data and no marker).
//!
//! Node-local caches, never replicated and rebuildable from the records and blobs at any time
//! ([`Store::rebuild_local_indexes`]), written in the same batch as the records they describe so
//! they are never stale after an acknowledged write, including merges from peers:
//! - `local`: `mailbox id | message id` -> [`LocalState`] (the record's listing and modseqs);
//! - `index`: `mailbox id | sort | sort key | message id` -> empty, one entry per sort and live message;
//! - `changes`: `mailbox id | modseq` -> message ID, the last change of each record (CONDSTORE-like);
//! - `search_queue`: `sequence` -> a record to add to or drop from the full-text index;
//! - `tombstones`: `expunge millisecond | mailbox id | message id` -> empty, for collection;
//! - `account_log`: the account's change feed ([`crate::changes`]):
//!   `account (16) | 0 | origin (8) | time (8) | message id (16)` -> mailbox id, creation stamp and
//!   whether expunged, one entry per origin that changed the record (at the latest time it did),
//!   and `account | 1 | message id` -> the mailbox that holds it.
//!
//! `meta` also keeps what the change feed needs beside the log: the frontier adopted from peers
//! ([`Store::adopt_frontier`]) and, per origin, the newest expunge whose tombstone was purged.
//!
//! # Tombstones
//! An expunged record stays as a tombstone so the expunge reaches every replica. Tombstones older
//! than the horizon (`tombstone_horizon_millis`, 30 days by default) are purged from the records
//! and the tries, and a peer's record expunged before the horizon is not taken in unless this
//! node holds the message live (then the expunge still applies). A replica out of contact for
//! longer than the horizon could resurrect purged mail, so the node refuses to resynchronise it
//! (see [`Store::last_contact`] and the node).
//!
//! Tombstones can also go sooner, once every member holds them: the node sets an acknowledged
//! cut (see [`Store::acknowledge_tombstones_before`]) when every member of a closed cluster has
//! reported the same digest, and tombstones expunged before the cut are then treated exactly like
//! those past the horizon.
//!
//! Every operation — append, flag change, expunge, merge of a peer's record, blob put — is applied
//! together with the trie aggregates, the mailbox counters, the directory trie and the clock in one
//! `WriteBatch`, written with a synced WAL before anyone is told it succeeded. Concurrent writers
//! are grouped: [`CommitQueue`] drains whatever is waiting into one batch and one fsync (group
//! commit), and each operation still succeeds or fails on its own.
//!
//! The store owns the node's clock and ID generator (both restored from `meta` on open), so a
//! stamp or an ID is never issued twice, even after a crash.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use rocksdb::{ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB};
use serde::{Deserialize, Serialize};

use crate::changes::{ChangeEntry, ChangeLog, ChangesError, Frontier, LogPosition};
use crate::crdt::{self, Clock, ClockError, MergeError};
use crate::mail::{self, Listing};
use crate::merkle::{aggregate_changes, Aggregate, AggregateDelta, Prefix, StoredDepth, TreeView};
use crate::model::{
    BlobHash, Flag, MailboxId, MailboxKey, MessageId, MessageIdGenerator, MessageRecord, NodeId, Stamp,
};
use crate::position::CountedBlocks;

const RECORDS: &str = "records";
const BLOBS: &str = "blobs";
const TREE: &str = "tree";
const MAILBOXES: &str = "mailboxes";
const META: &str = "meta";
const LOCAL: &str = "local";
const INDEX: &str = "index";
const CHANGES: &str = "changes";
const SEARCH_QUEUE: &str = "search_queue";
const TOMBSTONES: &str = "tombstones";
const ACCOUNT_LOG: &str = "account_log";
const VIEWS: &str = "views";
const LOCAL_FAMILIES: [&str; 7] = [LOCAL, INDEX, CHANGES, SEARCH_QUEUE, TOMBSTONES, ACCOUNT_LOG, VIEWS];
/// The replicated families, then the node-local ones.
const FAMILIES: [&str; 12] = [
    RECORDS,
    BLOBS,
    TREE,
    MAILBOXES,
    META,
    LOCAL,
    INDEX,
    CHANGES,
    SEARCH_QUEUE,
    TOMBSTONES,
    ACCOUNT_LOG,
    VIEWS,
];
const META_FRONTIER: &[u8] = b"frontier";
const META_PURGED: &[u8] = b"purged_by_origin";
const META_LAST_CONTACT: &[u8] = b"last_contact";
const META_ACKNOWLEDGED: &[u8] = b"tombstones_acknowledged_before";
const META_SEARCH_SEQUENCE: &[u8] = b"search_sequence";

const META_CLOCK: &[u8] = b"clock";
const META_FORMAT: &[u8] = b"format";

/// The format of the stores this build writes and reads.
pub const STORE_FORMAT: u64 = 4;
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
    #[error("not enough disk space: {free} bytes free, {needed} needed (including the reserve of min_free_bytes); nothing was written, and writes resume once space is freed")]
    DiskFull { free: u64, needed: u64 },
    /// The store on disk was written by a build with another format.
    #[error("store at {path} has format {found}, this build reads format {expected}: {advice}", advice = format_advice(*found, *expected))]
    Format { path: String, found: u64, expected: u64 },
}

/// What an operator can do about a store of another format.
fn format_advice(found: u64, expected: u64) -> &'static str {
    if found < expected {
        "it was written by an older mailmesh; run that release to read it, or move the directory away and start \
         this node with an empty one (keep identity.key): it refills from its peers"
    } else {
        "it was written by a newer mailmesh; run that release (or a newer one) on this directory"
    }
}

impl StoreError {
    /// Whether the error is the disk running out of space (also when RocksDB itself hit ENOSPC).
    pub fn is_disk_full(&self) -> bool {
        match self {
            StoreError::DiskFull { .. } => true,
            StoreError::Database(error) => error.to_string().contains("No space left on device"),
            StoreError::Corrupt(message) => message.contains("No space left on device"),
            _ => false,
        }
    }
}

/// Free bytes for an unprivileged writer on the file system holding `path`.
pub fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let text = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `text` is a valid NUL-terminated path and `stats` a writable statvfs.
    let result = unsafe { libc::statvfs(text.as_ptr(), &mut stats) };
    (result == 0).then(|| u64::from(stats.f_bavail) * u64::from(stats.f_frsize))
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
    /// Tombstones expunged longer ago than this are collected.
    pub tombstone_horizon_millis: u64,
    /// Writes are refused (nothing written) while fewer bytes than this would stay free.
    pub min_free_bytes: u64,
    /// Keys per block of the in-memory position cache that finds deep pages in O(log n); pages
    /// closer to either end than twice this are found by skipping keys.
    pub position_block: usize,
}

/// Thirty days.
pub const DEFAULT_TOMBSTONE_HORIZON_MILLIS: u64 = 30 * 24 * 60 * 60 * 1000;

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            max_message_bytes: 50 * 1024 * 1024,
            clock_bound_millis: 2 * 60 * 60 * 1000,
            sync_writes: true,
            tombstone_horizon_millis: DEFAULT_TOMBSTONE_HORIZON_MILLIS,
            min_free_bytes: 256 * 1024 * 1024,
            position_block: 1024,
        }
    }
}

/// One write. Time and randomness come from the caller.
#[derive(Clone, Debug)]
pub enum Operation {
    /// Stores a new message; the store issues its ID and stamps its initial flags.
    Append {
        mailbox: MailboxKey,
        /// The mailbox the email is placed in, for an account's emails container
        /// ([`crate::model::EMAILS_CONTAINER`]); any other container is its own one listing.
        location: Option<MailboxId>,
        /// Listings (see [`view_of`]) in which a live message with the same bytes makes this
        /// append store nothing: it answers [`Applied::Record`] with that message, `changed`
        /// false. Checked by the single writer against the store and the batch it is in, so two
        /// concurrent deliveries of one message (a resumed import racing itself) store one copy.
        /// Empty: always append.
        unless_held_in: Vec<MailboxId>,
        raw: Vec<u8>,
        flags: Vec<Flag>,
        /// When the message was received, if not now (an import keeps the original date).
        received_millis: Option<u64>,
        now_millis: u64,
        random: u128,
    },
    /// Sets and clears flags of a live message.
    SetFlags {
        mailbox: MailboxKey,
        id: MessageId,
        add: Vec<Flag>,
        remove: Vec<Flag>,
        /// A node-local modseq: if the message changed here after it (its [`LocalState::modseq`]
        /// is above, or this batch changed it already), nothing is written and the answer is
        /// [`Applied::ChangedSince`]. Checked by the single writer, so no write can come between
        /// the check and the change (IMAP's `STORE (UNCHANGEDSINCE n)`, RFC 7162 3.1.3). `None`:
        /// always write.
        unless_changed_since: Option<u64>,
        now_millis: u64,
    },
    /// Moves a live email to another mailbox of its account, keeping its ID (idempotent).
    Move {
        mailbox: MailboxKey,
        id: MessageId,
        to: MailboxId,
        now_millis: u64,
    },
    /// Expunges a message (idempotent).
    Expunge {
        mailbox: MailboxKey,
        id: MessageId,
        now_millis: u64,
    },
    /// Merges a record received from a peer.
    Merge {
        mailbox: MailboxKey,
        record: MessageRecord,
        now_millis: u64,
    },
    /// Stores a blob received from a peer, after checking its hash.
    PutBlob { expected: BlobHash, bytes: Vec<u8> },
    /// Removes a tombstone older than the horizon (see [`Store::collect_tombstones`]).
    Purge {
        mailbox: MailboxId,
        id: MessageId,
        now_millis: u64,
    },
}

/// What an operation did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// A new message and its ID.
    Appended {
        id: MessageId,
        blob: BlobHash,
        size: u64,
        record: MessageRecord,
    },
    /// The record as it now stands, and whether this operation changed it.
    Record { record: MessageRecord, changed: bool },
    /// A blob was stored (or was already there).
    Blob { hash: BlobHash, new: bool },
    /// A tombstone was purged (false when it was not one to purge).
    Purged(bool),
    /// A conditional flag change wrote nothing: the message changed after the modseq it named.
    /// `modseq` is its modseq now (`u64::MAX` when the same batch changed it first).
    ChangedSince { record: MessageRecord, modseq: u64 },
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
    /// The node-local modification sequence: bumped by every change to a record of the mailbox.
    #[serde(default)]
    pub modseq: u64,
    /// The modseq at which the local indexes were last rebuilt (`mailmesh reindex`): the rebuild
    /// renumbers every record above it, so a client state issued before it cannot be calculated.
    #[serde(default)]
    pub rebuilt_at: u64,
    /// The highest modseq whose change-log entry a tombstone purge deleted: a client state
    /// below it may miss that expunge, so its changes cannot be calculated exactly.
    #[serde(default)]
    pub purged_through: u64,
}

/// What the node keeps locally about one record: its listing while live, and its modseqs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalState {
    /// The modseq at which this node first stored the record.
    pub created: u64,
    /// The modseq of the record's last change here.
    pub modseq: u64,
    /// Headers for listings and sorts; `None` once expunged.
    pub listing: Option<Listing>,
    /// The listing the record is in (see [`view_of`]).
    pub view: u128,
}

/// The counters of one listing (a mailbox, see [`view_of`]): node-local, like the sort indexes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewEntry {
    /// The container whose records the listing shows.
    pub container: u128,
    /// Live messages.
    pub live: u64,
    /// Live messages without \Seen.
    pub unseen: u64,
}

/// The listing a record is shown in: in an account's emails container, the mailbox of its
/// location register; in any other container, the container itself.
pub fn view_of(container: &MailboxKey, record: &MessageRecord) -> MailboxId {
    if container.mailbox() == crate::model::EMAILS_CONTAINER {
        record.location.mailbox
    } else {
        container.id()
    }
}

/// The orders a mailbox can be listed in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SortKey {
    Received = 0,
    Date = 1,
    From = 2,
    Subject = 3,
    Size = 4,
}

impl SortKey {
    /// Every sort.
    pub const ALL: [SortKey; 5] = [
        SortKey::Received,
        SortKey::Date,
        SortKey::From,
        SortKey::Subject,
        SortKey::Size,
    ];

    /// The sort named in a query string.
    pub fn parse(name: &str) -> Option<SortKey> {
        Some(match name {
            "received" => SortKey::Received,
            "date" => SortKey::Date,
            "from" => SortKey::From,
            "subject" => SortKey::Subject,
            "size" => SortKey::Size,
            _ => return None,
        })
    }

    /// The sort key bytes of a record under this order.
    pub fn key(self, record: &MessageRecord, listing: &Listing) -> Vec<u8> {
        match self {
            SortKey::Received => record.received_millis.to_be_bytes().to_vec(),
            SortKey::Date => listing
                .date_millis
                .unwrap_or(record.received_millis)
                .to_be_bytes()
                .to_vec(),
            SortKey::From => mail::text_sort_key(&listing.from),
            SortKey::Subject => mail::subject_sort_key(&listing.subject),
            SortKey::Size => record.size.to_be_bytes().to_vec(),
        }
    }
}

/// The bounds of one sort index of one mailbox.
fn index_bounds(mailbox: MailboxId, sort: SortKey) -> (Vec<u8>, Vec<u8>) {
    let mut lower = mailbox.to_bytes().to_vec();
    lower.push(sort as u8);
    let mut upper = mailbox.to_bytes().to_vec();
    upper.push(sort as u8 + 1);
    (lower, upper)
}

/// Checks the store's format marker, writing it into a store that holds nothing yet. A store with
/// data and no marker is format 1, from before the marker.
fn check_format(db: &DB, path: &Path) -> Result<(), StoreError> {
    let meta = db
        .cf_handle(META)
        .ok_or_else(|| StoreError::Corrupt("missing meta family".into()))?;
    let found = match db.get_cf(&meta, META_FORMAT)? {
        Some(bytes) => u64::from_be_bytes(
            bytes
                .as_slice()
                .try_into()
                .map_err(|_| StoreError::Corrupt("format marker in the meta family".into()))?,
        ),
        None => {
            let holds_data = [META, RECORDS, MAILBOXES, BLOBS].iter().any(|name| {
                db.cf_handle(name)
                    .is_some_and(|family| db.iterator_cf(&family, IteratorMode::Start).next().is_some())
            });
            if holds_data {
                1
            } else {
                db.put_cf(&meta, META_FORMAT, STORE_FORMAT.to_be_bytes())?;
                db.flush_cf(&meta)?;
                STORE_FORMAT
            }
        }
    };
    if found != STORE_FORMAT {
        return Err(StoreError::Format {
            path: path.display().to_string(),
            found,
            expected: STORE_FORMAT,
        });
    }
    Ok(())
}

/// A big-endian u64 kept in the meta family (0 when absent).
fn meta_u64(db: &DB, meta: &rocksdb::ColumnFamily, key: &[u8], what: &str) -> Result<u64, StoreError> {
    match db.get_cf(meta, key)? {
        Some(bytes) => {
            Ok(u64::from_be_bytes(bytes.as_slice().try_into().map_err(|_| {
                StoreError::Corrupt(format!("{what} in the meta family"))
            })?))
        }
        None => Ok(0),
    }
}

/// RocksDB merge operator of the tree family: aggregates and deltas (in aggregate form, counts
/// wrapping) add up. None (a corruption error on read) for a value of the wrong size.
fn add_aggregates(_key: &[u8], existing: Option<&[u8]>, operands: &rocksdb::MergeOperands) -> Option<Vec<u8>> {
    let mut total = match existing {
        Some(bytes) => Aggregate::from_bytes(bytes)?,
        None => Aggregate::default(),
    };
    for operand in operands {
        total.add(&Aggregate::from_bytes(operand)?);
    }
    Some(total.to_bytes().to_vec())
}

/// A stored trie aggregate.
fn decode_aggregate(bytes: &[u8]) -> Result<Aggregate, StoreError> {
    Aggregate::from_bytes(bytes).ok_or_else(|| StoreError::Corrupt("aggregate value".into()))
}

/// Locks a mutex, taking the data of a poisoned one (every holder leaves it consistent).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn index_key(mailbox: MailboxId, sort: SortKey, key: &[u8], id: MessageId) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(16 + 1 + key.len() + 1 + 16);
    bytes.extend_from_slice(&mailbox.to_bytes());
    bytes.push(sort as u8);
    bytes.extend_from_slice(key);
    if matches!(sort, SortKey::From | SortKey::Subject) {
        bytes.push(0); // terminator: "ab" sorts before "abc"
    }
    bytes.extend_from_slice(&id.to_bytes());
    bytes
}

/// The sort byte under which the index also maps blobs to the live messages holding them.
const BLOB_INDEX: u8 = 0xb0;

fn blob_key(mailbox: MailboxId, blob: &BlobHash, id: MessageId) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(16 + 1 + 32 + 16);
    bytes.extend_from_slice(&mailbox.to_bytes());
    bytes.push(BLOB_INDEX);
    bytes.extend_from_slice(blob.as_bytes());
    bytes.extend_from_slice(&id.to_bytes());
    bytes
}

/// A full-text index task, queued in the same batch as the record change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SearchTask {
    /// Index this live record (its blob is in the store).
    Add {
        /// The listing (see [`view_of`]) the record is in.
        mailbox: u128,
        /// The container that holds the record.
        container: u128,
        id: MessageId,
        blob: BlobHash,
    },
    /// Drop this record from the index.
    Remove { id: MessageId },
}

/// What changed in a mailbox since a modseq.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub created: Vec<MessageId>,
    pub updated: Vec<MessageId>,
    pub expunged: Vec<MessageId>,
    /// The mailbox's current modseq (the state to ask from next time).
    pub modseq: u64,
    /// True when the node cannot say exactly (the modseq is not one this node issued).
    pub cannot_calculate: bool,
    /// With `cannot_calculate`: only because tombstones expunged since `since` were purged and
    /// took their change-log entries with them. `created` and `updated` are then complete, but
    /// `expunged` may lack those: compare what the caller holds with what is live instead.
    pub expunges_purged: bool,
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

/// See [`Store::background_work`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackgroundWork {
    pub jobs_running: u64,
    pub pending_compaction_bytes: u64,
}

struct WriterState {
    clock: Clock,
    ids: MessageIdGenerator,
    search_sequence: u64,
}

/// The node's RocksDB store.
pub struct Store {
    db: DB,
    options: StoreOptions,
    node: NodeId,
    writer: Mutex<WriterState>,
    /// Counted blocks over the sort indexes that deep pages were asked of (a cache; see
    /// [`crate::position`]). Lock order: `writer`, then `positions`.
    positions: Mutex<PositionCache>,
    /// Tombstones expunged before this millisecond are held by every member (0: none known).
    acknowledged_before: std::sync::atomic::AtomicU64,
    /// Held by nothing else, and declared after `db` so it drops after it: once no strong
    /// reference is left, RocksDB has closed (see [`Store::closed_marker`]).
    closed_marker: Arc<()>,
}

/// The position cache: at most [`POSITION_CACHE_ENTRIES`] (mailbox, sort) pairs, least recently
/// used dropped first.
#[derive(Default)]
struct PositionCache {
    entries: HashMap<(MailboxId, u8), PositionEntry>,
    uses: u64,
}

const POSITION_CACHE_ENTRIES: usize = 64;

enum PositionEntry {
    /// A reader is counting the index from a snapshot; index changes written after the snapshot
    /// wait here (key suffix, inserted) until it is done.
    Building(Vec<(Vec<u8>, bool)>),
    Ready {
        blocks: CountedBlocks,
        last_use: u64,
    },
}

/// An index key added (true) or removed (false) by a commit, for the position cache.
type IndexEvent = (MailboxId, u8, Vec<u8>, bool);

/// Length of the (mailbox, sort) prefix of an index key.
const INDEX_PREFIX: usize = 17;

/// Where a deep page starts: seek to `first` (an index key suffix), step over `offset` keys.
enum PageStart {
    At { first: Vec<u8>, offset: u64 },
    PastTheEnd,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Store")
            .field("path", &self.db.path())
            .field("node", &self.node)
            .finish()
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
        // Bound memory: one budget for every column family's write buffers, and one block cache.
        db_options.set_db_write_buffer_size(64 * 1024 * 1024);
        let cache = rocksdb::Cache::new_lru_cache(32 * 1024 * 1024);
        let family_options = || {
            let mut options = Options::default();
            options.set_write_buffer_size(16 * 1024 * 1024);
            let mut table = rocksdb::BlockBasedOptions::default();
            table.set_block_cache(&cache);
            table.set_cache_index_and_filter_blocks(true);
            // Partitioned index and filters with their top level pinned: a point read loads one
            // small partition. Whole filter blocks of large tables used to be evicted from the
            // small cache and read back (and checksummed) on nearly every lookup once a store
            // held 100,000 messages.
            table.set_index_type(rocksdb::BlockBasedIndexType::TwoLevelIndexSearch);
            table.set_partition_filters(true);
            table.set_metadata_block_size(4096);
            table.set_pin_top_level_index_and_filter(true);
            table.set_pin_l0_filter_and_index_blocks_in_cache(true);
            table.set_cache_index_and_filter_blocks_with_high_priority(true);
            // Most point reads on the write path miss (new records have no old state): bloom
            // filters answer those without touching the data blocks.
            table.set_bloom_filter(10.0, false);
            options.set_block_based_table_factory(&table);
            options
        };
        let mut blob_options = family_options();
        blob_options.set_enable_blob_files(true);
        blob_options.set_min_blob_size(4096);
        blob_options.set_compression_type(rocksdb::DBCompressionType::Lz4);
        // Trie aggregates below the root are changed by merge operands (additions), so the
        // writer never reads them back: that saved a dozen point reads per append.
        let mut tree_options = family_options();
        tree_options.set_merge_operator_associative("mailmesh.aggregate_add", add_aggregates);
        let families = vec![
            ColumnFamilyDescriptor::new(RECORDS, family_options()),
            ColumnFamilyDescriptor::new(BLOBS, blob_options),
            ColumnFamilyDescriptor::new(TREE, tree_options),
            ColumnFamilyDescriptor::new(MAILBOXES, family_options()),
            ColumnFamilyDescriptor::new(META, family_options()),
            ColumnFamilyDescriptor::new(LOCAL, family_options()),
            ColumnFamilyDescriptor::new(INDEX, family_options()),
            ColumnFamilyDescriptor::new(CHANGES, family_options()),
            ColumnFamilyDescriptor::new(SEARCH_QUEUE, family_options()),
            ColumnFamilyDescriptor::new(TOMBSTONES, family_options()),
            ColumnFamilyDescriptor::new(ACCOUNT_LOG, family_options()),
            ColumnFamilyDescriptor::new(VIEWS, family_options()),
        ];
        let db = DB::open_cf_descriptors(&db_options, path, families)?;
        let meta = db
            .cf_handle(META)
            .ok_or_else(|| StoreError::Corrupt("missing meta family".into()))?;
        check_format(&db, path)?;
        let clock_value = meta_u64(&db, &meta, META_CLOCK, "clock value")?;
        let last_id = match db.get_cf(&meta, META_LAST_ID)? {
            Some(bytes) => MessageId::from_slice(&bytes).ok_or_else(|| StoreError::Corrupt("last id value".into()))?,
            None => MessageId::default(),
        };
        let search_sequence = meta_u64(&db, &meta, META_SEARCH_SEQUENCE, "search sequence value")?;
        let acknowledged_before = meta_u64(&db, &meta, META_ACKNOWLEDGED, "acknowledged tombstone cut")?;
        let writer = WriterState {
            clock: Clock::resume(clock_value, options.clock_bound_millis),
            ids: MessageIdGenerator::after(last_id),
            search_sequence,
        };
        Ok(Store {
            db,
            options,
            node,
            writer: Mutex::new(writer),
            positions: Mutex::new(PositionCache::default()),
            acknowledged_before: std::sync::atomic::AtomicU64::new(acknowledged_before),
            closed_marker: Arc::new(()),
        })
    }

    /// A weak reference that loses its target only once this store has been dropped and
    /// RocksDB has closed (the last `Arc<Store>` may drop on any thread; a process that exits
    /// while RocksDB is still closing can abort).
    pub fn closed_marker(&self) -> std::sync::Weak<()> {
        Arc::downgrade(&self.closed_marker)
    }

    fn family(&self, name: &str) -> Result<&rocksdb::ColumnFamily, StoreError> {
        self.db
            .cf_handle(name)
            .ok_or_else(|| StoreError::Corrupt(format!("missing column family {name}")))
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

    /// A fresh stamp of this node's clock, for a decision the caller writes in its next
    /// operation (a mailbox snapshot carries stamps inside its bytes). The clock is persisted by
    /// the commit that follows; a stamp lost in a crash before it was used changes nothing.
    pub fn stamp(&self, now_millis: u64) -> Stamp {
        let mut state = lock(&self.writer);
        Stamp {
            time: state.clock.tick(now_millis),
            node: self.node,
        }
    }

    /// Applies operations in one atomic, durable batch. Each operation gets its own result; one
    /// failing leaves the others untouched.
    pub fn apply(&self, operations: Vec<Operation>) -> Vec<Result<Applied, StoreError>> {
        self.apply_prepared(operations, HashMap::new())
    }

    /// The same, with listings already read from the blobs the operations bring (by the callers'
    /// threads, see [`CommitQueue`]), so the single writer does not parse mail.
    pub fn apply_prepared(
        &self,
        operations: Vec<Operation>,
        listings: HashMap<BlobHash, Listing>,
    ) -> Vec<Result<Applied, StoreError>> {
        // Refuse the whole batch up front when the disk is nearly full: a write that fails
        // half-way inside RocksDB would leave the database read-only until it is reopened.
        let incoming: u64 = operations
            .iter()
            .map(|operation| match operation {
                Operation::Append { raw, .. } => raw.len() as u64 + 4096,
                Operation::PutBlob { bytes, .. } => bytes.len() as u64,
                _ => 1024,
            })
            .sum();
        if let Some(free) = free_bytes(self.db.path()) {
            let needed = self.options.min_free_bytes.saturating_add(incoming);
            if free < needed {
                return operations
                    .iter()
                    .map(|_| Err(StoreError::DiskFull { free, needed }))
                    .collect();
            }
        }
        let mut state = match self.writer.lock() {
            Ok(state) => state,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut staging = Staging {
            listings,
            ..Staging::default()
        };
        let mut results: Vec<Result<Applied, StoreError>> = operations
            .into_iter()
            .map(|operation| self.stage(&mut state, &mut staging, operation))
            .collect();
        if let Err(error) = self.commit(&mut state, staging) {
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

    /// A live message of `container` with these bytes in one of `views`, as this batch leaves it.
    fn live_copy(
        &self,
        staging: &Staging,
        container: &MailboxKey,
        blob: &BlobHash,
        views: &[MailboxId],
    ) -> Result<Option<MessageRecord>, StoreError> {
        let held = |record: &MessageRecord| {
            record.blob == *blob && record.is_live() && views.contains(&view_of(container, record))
        };
        if staging.blobs.contains_key(blob) {
            let staged = staging
                .records
                .range((container.id(), MessageId(0))..=(container.id(), MessageId(u128::MAX)))
                .map(|(_, change)| &change.new)
                .find(|record| held(record));
            if let Some(record) = staged {
                return Ok(Some(record.clone()));
            }
        }
        for view in views {
            if let Some(id) = self.live_message_with_blob(*view, blob)? {
                if let Some(record) = self.load(staging, container.id(), id)?.filter(|record| held(record)) {
                    return Ok(Some(record));
                }
            }
        }
        Ok(None)
    }

    fn stage(
        &self,
        state: &mut WriterState,
        staging: &mut Staging,
        operation: Operation,
    ) -> Result<Applied, StoreError> {
        match operation {
            Operation::Append {
                mailbox,
                location,
                unless_held_in,
                raw,
                flags,
                received_millis,
                now_millis,
                random,
            } => {
                let size = raw.len() as u64;
                if size > self.options.max_message_bytes {
                    return Err(StoreError::TooLarge {
                        size,
                        limit: self.options.max_message_bytes,
                    });
                }
                let blob = BlobHash::of(&raw);
                if !unless_held_in.is_empty() {
                    if let Some(record) = self.live_copy(staging, &mailbox, &blob, &unless_held_in)? {
                        return Ok(Applied::Record { record, changed: false });
                    }
                }
                let id = state.ids.next(now_millis, random);
                let received = received_millis.unwrap_or(now_millis);
                let mut record = MessageRecord::new(id, blob, size, received, self.node);
                record.created = state.clock.tick(now_millis);
                record.place_in(location.unwrap_or_else(|| mailbox.id()));
                if !flags.is_empty() {
                    let stamp = Stamp {
                        time: state.clock.tick(now_millis),
                        node: self.node,
                    };
                    for flag in flags {
                        crdt::apply_flag(&mut record, flag, true, stamp);
                    }
                }
                staging.last_id = Some(id);
                staging.blobs.insert(blob, raw);
                staging.change(mailbox, None, record.clone());
                Ok(Applied::Appended { id, blob, size, record })
            }
            Operation::SetFlags {
                mailbox,
                id,
                add,
                remove,
                unless_changed_since,
                now_millis,
            } => {
                let mailbox_id = mailbox.id();
                let old = self
                    .load(staging, mailbox_id, id)?
                    .ok_or_else(|| StoreError::NotFound {
                        mailbox: mailbox.clone(),
                        id,
                    })?;
                if !old.is_live() {
                    return Err(StoreError::Expunged(id));
                }
                if let Some(limit) = unless_changed_since {
                    let modseq = if staging.records.contains_key(&(mailbox_id, id)) {
                        u64::MAX
                    } else {
                        self.local_state(mailbox_id, id)?.map(|state| state.modseq).unwrap_or(0)
                    };
                    if modseq > limit {
                        return Ok(Applied::ChangedSince { record: old, modseq });
                    }
                }
                let stamp = Stamp {
                    time: state.clock.tick(now_millis),
                    node: self.node,
                };
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
            Operation::Move {
                mailbox,
                id,
                to,
                now_millis,
            } => {
                let old = self
                    .load(staging, mailbox.id(), id)?
                    .ok_or_else(|| StoreError::NotFound {
                        mailbox: mailbox.clone(),
                        id,
                    })?;
                if !old.is_live() {
                    return Err(StoreError::Expunged(id));
                }
                if old.location.mailbox == to {
                    return Ok(Applied::Record {
                        record: old,
                        changed: false,
                    });
                }
                let mut record = old.clone();
                record.location = crate::mailbox::Location {
                    mailbox: to,
                    stamp: Stamp {
                        time: state.clock.tick(now_millis),
                        node: self.node,
                    },
                };
                staging.change(mailbox, Some(old), record.clone());
                Ok(Applied::Record { record, changed: true })
            }
            Operation::Expunge {
                mailbox,
                id,
                now_millis,
            } => {
                let mailbox_id = mailbox.id();
                let old = self
                    .load(staging, mailbox_id, id)?
                    .ok_or_else(|| StoreError::NotFound {
                        mailbox: mailbox.clone(),
                        id,
                    })?;
                if !old.is_live() {
                    return Ok(Applied::Record {
                        record: old,
                        changed: false,
                    });
                }
                let mut record = old.clone();
                record.expunged = Some(Stamp {
                    time: state.clock.tick(now_millis),
                    node: self.node,
                });
                staging.change(mailbox, Some(old), record.clone());
                Ok(Applied::Record { record, changed: true })
            }
            Operation::Merge {
                mailbox,
                record,
                now_millis,
            } => {
                if let Some(latest) = record.latest_stamp() {
                    state.clock.check(latest.time, now_millis)?;
                }
                let old = self.load(staging, mailbox.id(), record.id)?;
                let cutoff = self.tombstone_cutoff(now_millis);
                let expunged_before_horizon = record
                    .expunged
                    .is_some_and(|stamp| crdt::millis_of(stamp.time) < cutoff);
                if old.is_none() && expunged_before_horizon {
                    // Collected here already, or never seen: taking it in would only bring it back.
                    return Ok(Applied::Record { record, changed: false });
                }
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
                Ok(Applied::Record {
                    record: merged,
                    changed,
                })
            }
            Operation::Purge {
                mailbox,
                id,
                now_millis,
            } => {
                if staging.records.contains_key(&(mailbox, id))
                    || staging.purges.iter().any(|(m, r)| *m == mailbox && r.id == id)
                {
                    return Ok(Applied::Purged(false));
                }
                let Some(record) = self.record(mailbox, id)? else {
                    return Ok(Applied::Purged(false));
                };
                let cutoff = self.tombstone_cutoff(now_millis);
                match record.expunged {
                    Some(stamp) if crdt::millis_of(stamp.time) < cutoff => {
                        staging.purges.push((mailbox, record));
                        Ok(Applied::Purged(true))
                    }
                    _ => Ok(Applied::Purged(false)),
                }
            }
            Operation::PutBlob { expected, bytes } => {
                if bytes.len() as u64 > self.options.max_message_bytes {
                    return Err(StoreError::TooLarge {
                        size: bytes.len() as u64,
                        limit: self.options.max_message_bytes,
                    });
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

    fn commit(&self, state: &mut WriterState, staging: Staging) -> Result<(), StoreError> {
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
        let mut modseqs: HashMap<MailboxId, u64> = HashMap::new();
        // Per view: its container and the change to its live and unseen counts.
        let mut view_counters: HashMap<MailboxId, (MailboxId, i64, i64)> = HashMap::new();
        let local = self.family(LOCAL)?;
        let index = self.family(INDEX)?;
        let changes = self.family(CHANGES)?;
        let search_queue = self.family(SEARCH_QUEUE)?;
        let tombstones = self.family(TOMBSTONES)?;
        let account_log = self.family(ACCOUNT_LOG)?;
        let mut purged_by_origin: Option<BTreeMap<NodeId, u64>> = None;
        // Per container: the highest modseq of a change-log entry deleted with its tombstone.
        let mut purged_through: HashMap<MailboxId, u64> = HashMap::new();
        // Index changes of mailboxes whose positions are cached, applied once the batch is written.
        let tracked: HashSet<MailboxId> = lock(&self.positions)
            .entries
            .keys()
            .map(|(mailbox, _)| *mailbox)
            .collect();
        let mut index_events: Vec<IndexEvent> = Vec::new();
        for (mailbox_id, record) in &staging.purges {
            batch.delete_cf(records, record_key(*mailbox_id, record.id));
            let old_hash = crdt::state_hash(record);
            let space = Space::Mailbox(*mailbox_id);
            for (prefix, delta) in aggregate_changes(record.id.0, Some(&old_hash), None, space.stored_depth()) {
                deltas.entry((space, prefix)).or_default().add(&delta);
            }
            if let Some(local_state) = self.local_state(*mailbox_id, record.id)? {
                batch.delete_cf(changes, change_key(MailboxId(local_state.view), local_state.modseq));
                let through = purged_through.entry(*mailbox_id).or_insert(0);
                *through = (*through).max(local_state.modseq);
            }
            batch.delete_cf(local, record_key(*mailbox_id, record.id));
            if let Some(stamp) = record.expunged {
                batch.delete_cf(
                    tombstones,
                    tombstone_key(crdt::millis_of(stamp.time), *mailbox_id, record.id),
                );
            }
            let key = self.mailbox_entry(*mailbox_id)?.map(|entry| entry.key);
            if let Some(key) = key {
                let account = account_key(key.account());
                for (origin, time) in record.stamps_by_origin() {
                    batch.delete_cf(account_log, log_key(&account, origin, time, record.id));
                }
                batch.delete_cf(account_log, where_key(&account, record.id));
                counters.entry(*mailbox_id).or_insert_with(|| (key, 0, 0, 0)).1 -= 1;
            }
            if let Some(stamp) = record.expunged {
                let purged = match &mut purged_by_origin {
                    Some(purged) => purged,
                    None => purged_by_origin.insert(self.purged_by_origin()?),
                };
                let entry = purged.entry(stamp.node).or_insert(0);
                *entry = (*entry).max(stamp.time);
            }
        }
        if let Some(purged) = &purged_by_origin {
            batch.put_cf(
                meta,
                META_PURGED,
                encode_cbor(&purged.iter().map(|(node, time)| (node.0, *time)).collect::<Vec<_>>()),
            );
        }
        for ((mailbox_id, id), change) in &staging.records {
            batch.put_cf(records, record_key(*mailbox_id, *id), encode_cbor(&change.new));
            // The account's change feed: one entry per origin, at the latest time it changed the
            // record; every entry says whether the record is expunged now.
            let account = account_key(change.mailbox.account());
            if let Some(old) = &change.old {
                for (origin, time) in old.stamps_by_origin() {
                    batch.delete_cf(account_log, log_key(&account, origin, time, *id));
                }
            }
            let value = log_value(*mailbox_id, &change.new);
            for (origin, time) in change.new.stamps_by_origin() {
                batch.put_cf(account_log, log_key(&account, origin, time, *id), value);
            }
            batch.put_cf(account_log, where_key(&account, *id), mailbox_id.to_bytes());
            // Node-local state: modseq, change log, listing, sort indexes, search queue. The
            // modseq counts per container; the listing a record is in is its view (see
            // [`view_of`]), which a move changes.
            let modseq = match modseqs.get_mut(mailbox_id) {
                Some(modseq) => modseq,
                None => {
                    let current = self.mailbox_entry(*mailbox_id)?.map(|entry| entry.modseq).unwrap_or(0);
                    modseqs.entry(*mailbox_id).or_insert(current)
                }
            };
            *modseq += 1;
            let modseq = *modseq;
            let old_local = self.local_state(*mailbox_id, *id)?;
            let new_view = view_of(&change.mailbox, &change.new);
            let old_view = match (&old_local, &change.old) {
                (Some(old), _) => MailboxId(old.view),
                (None, Some(old)) => view_of(&change.mailbox, old),
                (None, None) => new_view,
            };
            if let Some(old) = &old_local {
                batch.delete_cf(changes, change_key(old_view, old.modseq));
            }
            batch.put_cf(changes, change_key(new_view, modseq), id.to_bytes());
            let old_listing = old_local.as_ref().and_then(|old| old.listing.clone());
            if old_view != new_view && old_listing.is_some() {
                // The listing it left records the departure, so its change log reports the email
                // as gone (see `changes_since`).
                batch.put_cf(changes, change_key(old_view, modseq), id.to_bytes());
            }
            let new_listing = if change.new.is_live() {
                match &old_listing {
                    Some(listing) => Some(listing.clone()),
                    None if change.mailbox.holds_mailboxes() => Some(Listing::default()),
                    None => Some(
                        match (
                            staging.listings.get(&change.new.blob),
                            staging.blobs.get(&change.new.blob),
                        ) {
                            (Some(listing), _) => listing.clone(),
                            (None, Some(raw)) => mail::listing(raw),
                            (None, None) => self
                                .blob(&change.new.blob)?
                                .map(|raw| mail::listing(&raw))
                                .unwrap_or_default(),
                        },
                    ),
                }
            } else {
                None
            };
            let old_record = change.old.as_ref().unwrap_or(&change.new);
            let stays = old_view == new_view && old_listing.is_some() && new_listing.is_some();
            if !stays {
                if let Some(listing) = &old_listing {
                    if let Some(stamp) = change.new.expunged {
                        batch.put_cf(
                            tombstones,
                            tombstone_key(crdt::millis_of(stamp.time), *mailbox_id, *id),
                            [],
                        );
                    }
                    for sort in SortKey::ALL {
                        let key = index_key(old_view, sort, &sort.key(old_record, listing), *id);
                        if tracked.contains(&old_view) {
                            index_events.push((old_view, sort as u8, key[INDEX_PREFIX..].to_vec(), false));
                        }
                        batch.delete_cf(index, key);
                    }
                    batch.delete_cf(index, blob_key(old_view, &old_record.blob, *id));
                    state.search_sequence += 1;
                    batch.put_cf(
                        search_queue,
                        state.search_sequence.to_be_bytes(),
                        encode_cbor(&SearchTask::Remove { id: *id }),
                    );
                }
                if let Some(listing) = &new_listing {
                    for sort in SortKey::ALL {
                        let key = index_key(new_view, sort, &sort.key(&change.new, listing), *id);
                        if tracked.contains(&new_view) {
                            index_events.push((new_view, sort as u8, key[INDEX_PREFIX..].to_vec(), true));
                        }
                        batch.put_cf(index, key, []);
                    }
                    batch.put_cf(index, blob_key(new_view, &change.new.blob, *id), []);
                    if !change.mailbox.holds_mailboxes() {
                        state.search_sequence += 1;
                        let task = SearchTask::Add {
                            mailbox: new_view.0,
                            container: mailbox_id.0,
                            id: *id,
                            blob: change.new.blob,
                        };
                        batch.put_cf(search_queue, state.search_sequence.to_be_bytes(), encode_cbor(&task));
                    }
                }
            }
            let local_state = LocalState {
                created: match &old_local {
                    Some(old) if old_view == new_view => old.created,
                    _ => modseq,
                },
                modseq,
                listing: new_listing,
                view: new_view.0,
            };
            batch.put_cf(local, record_key(*mailbox_id, *id), encode_cbor(&local_state));
            let old_hash = change.old.as_ref().map(crdt::state_hash);
            let new_hash = crdt::state_hash(&change.new);
            let space = Space::Mailbox(*mailbox_id);
            for (prefix, delta) in aggregate_changes(id.0, old_hash.as_ref(), Some(&new_hash), space.stored_depth()) {
                deltas.entry((space, prefix)).or_default().add(&delta);
            }
            let entry = counters
                .entry(*mailbox_id)
                .or_insert_with(|| (change.mailbox.clone(), 0, 0, 0));
            let (old_records, old_live, old_unseen) = change.old.as_ref().map(counts).unwrap_or((0, 0, 0));
            let (new_records, new_live, new_unseen) = counts(&change.new);
            entry.1 += new_records - old_records;
            entry.2 += new_live - old_live;
            entry.3 += new_unseen - old_unseen;
            let view_delta = view_counters.entry(old_view).or_insert((*mailbox_id, 0, 0));
            view_delta.1 -= old_live;
            view_delta.2 -= old_unseen;
            let view_delta = view_counters.entry(new_view).or_insert((*mailbox_id, 0, 0));
            view_delta.1 += new_live;
            view_delta.2 += new_unseen;
        }
        let mut roots: HashMap<MailboxId, Aggregate> = HashMap::new();
        for ((space, prefix), delta) in &deltas {
            match (space, prefix.depth()) {
                // A mailbox root is read and rewritten: its hash goes into the directory.
                (Space::Mailbox(mailbox), 0) => {
                    let aggregate = self.fold_aggregate(&mut batch, tree, *space, *prefix, delta)?;
                    roots.insert(*mailbox, aggregate);
                }
                _ => batch.merge_cf(tree, tree_key(*space, *prefix), Aggregate::from_delta(delta).to_bytes()),
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
                modseq: 0,
                rebuilt_at: 0,
                purged_through: 0,
            });
            if let Some(modseq) = modseqs.get(&mailbox_id) {
                entry.modseq = *modseq;
            }
            if let Some(through) = purged_through.get(&mailbox_id) {
                entry.purged_through = entry.purged_through.max(*through);
            }
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
            for (prefix, delta) in
                aggregate_changes(mailbox_id.0, old_leaf.as_ref(), Some(&new_leaf), StoredDepth::DIRECTORY)
            {
                directory_deltas.entry(prefix).or_default().add(&delta);
            }
            batch.put_cf(mailboxes, mailbox_id.to_bytes(), encode_cbor(&entry));
        }
        let views = self.family(VIEWS)?;
        for (view, (container, live_delta, unseen_delta)) in view_counters {
            if live_delta == 0 && unseen_delta == 0 {
                continue;
            }
            let mut entry = self.view_entry(view)?.unwrap_or(ViewEntry {
                container: container.0,
                ..ViewEntry::default()
            });
            entry.live = entry.live.saturating_add_signed(live_delta);
            entry.unseen = entry.unseen.saturating_add_signed(unseen_delta);
            batch.put_cf(views, view.to_bytes(), encode_cbor(&entry));
        }
        for (prefix, delta) in directory_deltas {
            batch.merge_cf(
                tree,
                tree_key(Space::Directory, prefix),
                Aggregate::from_delta(&delta).to_bytes(),
            );
        }
        batch.put_cf(meta, META_CLOCK, state.clock.current().to_be_bytes());
        batch.put_cf(meta, META_SEARCH_SEQUENCE, state.search_sequence.to_be_bytes());
        if let Some(id) = staging.last_id {
            batch.put_cf(meta, META_LAST_ID, id.to_bytes());
        }
        let mut write_options = WriteOptions::default();
        write_options.set_sync(self.options.sync_writes);
        self.db.write_opt(batch, &write_options)?;
        if !index_events.is_empty() {
            let mut positions = lock(&self.positions);
            for (mailbox, sort, suffix, inserted) in index_events {
                let Some(entry) = positions.entries.get_mut(&(mailbox, sort)) else {
                    continue;
                };
                match entry {
                    PositionEntry::Building(pending) => pending.push((suffix, inserted)),
                    PositionEntry::Ready { blocks, .. } => {
                        let consistent = if inserted {
                            blocks.insert(&suffix);
                            true
                        } else {
                            blocks.remove(&suffix)
                        };
                        if !consistent {
                            positions.entries.remove(&(mailbox, sort));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Adds a change to a stored aggregate in `batch` (deleting it when it empties); returns the
    /// new aggregate.
    fn fold_aggregate(
        &self,
        batch: &mut WriteBatch,
        tree: &rocksdb::ColumnFamily,
        space: Space,
        prefix: Prefix,
        delta: &AggregateDelta,
    ) -> Result<Aggregate, StoreError> {
        let key = tree_key(space, prefix);
        let mut aggregate = self.stored_aggregate(&key)?;
        aggregate.apply(delta);
        if aggregate.is_empty() {
            batch.delete_cf(tree, key);
        } else {
            batch.put_cf(tree, key, aggregate.to_bytes());
        }
        Ok(aggregate)
    }

    /// A stored aggregate; absent and emptied nodes (merges can leave a zero value) read as empty.
    fn stored_aggregate(&self, key: &[u8]) -> Result<Aggregate, StoreError> {
        match self.db.get_pinned_cf(self.family(TREE)?, key)? {
            Some(bytes) => decode_aggregate(&bytes),
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

    /// The counters of a listing (see [`view_of`]); `None` before anything was listed in it.
    pub fn view_entry(&self, view: MailboxId) -> Result<Option<ViewEntry>, StoreError> {
        match self.db.get_pinned_cf(self.family(VIEWS)?, view.to_bytes())? {
            Some(bytes) => Ok(Some(decode_cbor(&bytes, "view entry")?)),
            None => Ok(None),
        }
    }

    /// The container whose records a listing shows (the listing itself for a container that is
    /// its own listing, and for one that never held anything).
    pub fn container_of(&self, view: MailboxId) -> Result<MailboxId, StoreError> {
        Ok(self
            .view_entry(view)?
            .map(|entry| MailboxId(entry.container))
            .unwrap_or(view))
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
        for item in self
            .db
            .iterator_cf(self.family(RECORDS)?, IteratorMode::From(&start, Direction::Forward))
        {
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

    /// Records of a mailbox by ID, in the order asked (`None` where there is none), read in one
    /// batch: an Email/get of a page of 100 costs one multi-get, not 100 lookups.
    pub fn records_by_id(
        &self,
        mailbox: MailboxId,
        ids: &[MessageId],
    ) -> Result<Vec<Option<MessageRecord>>, StoreError> {
        self.many(RECORDS, mailbox, ids, "record")
    }

    /// The node-local states of records, as [`Self::records_by_id`] reads records.
    pub fn local_states_by_id(
        &self,
        mailbox: MailboxId,
        ids: &[MessageId],
    ) -> Result<Vec<Option<LocalState>>, StoreError> {
        self.many(LOCAL, mailbox, ids, "local state")
    }

    fn many<T: for<'de> Deserialize<'de>>(
        &self,
        family: &str,
        mailbox: MailboxId,
        ids: &[MessageId],
        what: &str,
    ) -> Result<Vec<Option<T>>, StoreError> {
        let keys: Vec<[u8; 32]> = ids.iter().map(|id| record_key(mailbox, *id)).collect();
        self.db
            .batched_multi_get_cf(self.family(family)?, &keys, false)
            .into_iter()
            .map(|found| match found? {
                Some(bytes) => Ok(Some(decode_cbor(&bytes, what)?)),
                None => Ok(None),
            })
            .collect()
    }

    /// The node-local state of a record.
    pub fn local_state(&self, mailbox: MailboxId, id: MessageId) -> Result<Option<LocalState>, StoreError> {
        match self.db.get_pinned_cf(self.family(LOCAL)?, record_key(mailbox, id))? {
            Some(bytes) => Ok(Some(decode_cbor(&bytes, "local state")?)),
            None => Ok(None),
        }
    }

    /// A page of live messages in a sort order, from the sort index: `position` entries are
    /// skipped (reading keys only), then `limit` records and listings are read.
    pub fn list(
        &self,
        mailbox: MailboxId,
        sort: SortKey,
        descending: bool,
        position: usize,
        limit: usize,
    ) -> Result<Vec<(MessageRecord, Listing)>, StoreError> {
        let ids = self.list_ids(mailbox, sort, descending, position, limit)?;
        let container = self.container_of(mailbox)?;
        let mut page = Vec::with_capacity(ids.len());
        for id in ids {
            let record = self
                .record(container, id)?
                .ok_or_else(|| StoreError::Corrupt(format!("index names missing record {id}")))?;
            let listing = self
                .local_state(container, id)?
                .and_then(|state| state.listing)
                .unwrap_or_default();
            page.push((record, listing));
        }
        Ok(page)
    }

    /// The IDs of a page of live messages in a sort order.
    ///
    /// Pages within two blocks of the start of the order, and pages of small mailboxes, skip
    /// keys; deeper pages start from the position cache, which finds the block holding the
    /// page's first key in O(log n) and steps over at most two blocks of keys.
    pub fn list_ids(
        &self,
        mailbox: MailboxId,
        sort: SortKey,
        descending: bool,
        position: usize,
        limit: usize,
    ) -> Result<Vec<MessageId>, StoreError> {
        let near_start = position <= 2 * self.options.position_block;
        if limit == 0 || near_start {
            return self.list_ids_by_skipping(mailbox, sort, descending, position, limit);
        }
        let live = self.view_entry(mailbox)?.map(|entry| entry.live).unwrap_or(0) as usize;
        if live <= 4 * self.options.position_block {
            return self.list_ids_by_skipping(mailbox, sort, descending, position, limit);
        }
        let start = match self.page_start(mailbox, sort, descending, position as u64)? {
            Some(PageStart::At { first, offset }) => (first, offset),
            Some(PageStart::PastTheEnd) => return Ok(Vec::new()),
            None => return self.list_ids_by_skipping(mailbox, sort, descending, position, limit),
        };
        let (lower, upper) = index_bounds(mailbox, sort);
        let mut options = rocksdb::ReadOptions::default();
        options.set_iterate_lower_bound(lower.clone());
        options.set_iterate_upper_bound(upper);
        let mut iterator = self.db.raw_iterator_cf_opt(self.family(INDEX)?, options);
        let mut seek = lower;
        seek.extend_from_slice(&start.0);
        iterator.seek(&seek);
        for _ in 0..start.1 {
            if !iterator.valid() {
                break;
            }
            iterator.next();
        }
        let mut ids = Vec::with_capacity(limit.min(1024));
        while ids.len() < limit {
            let Some(key) = iterator.key() else {
                break;
            };
            let id = key.get(key.len().saturating_sub(16)..).and_then(MessageId::from_slice);
            ids.push(id.ok_or_else(|| StoreError::Corrupt("index key".into()))?);
            if descending {
                iterator.prev();
            } else {
                iterator.next();
            }
        }
        iterator.status()?;
        Ok(ids)
    }

    /// Where the page at `position` starts, from the position cache (built or split first when
    /// needed). None when another reader is building the cache for this index.
    fn page_start(
        &self,
        mailbox: MailboxId,
        sort: SortKey,
        descending: bool,
        position: u64,
    ) -> Result<Option<PageStart>, StoreError> {
        for _ in 0..4 {
            let split = {
                let mut positions = lock(&self.positions);
                positions.uses += 1;
                let now = positions.uses;
                match positions.entries.get_mut(&(mailbox, sort as u8)) {
                    None => None,
                    Some(PositionEntry::Building(_)) => return Ok(None),
                    Some(PositionEntry::Ready { blocks, last_use }) => {
                        *last_use = now;
                        let total = blocks.total();
                        if position >= total {
                            return Ok(Some(PageStart::PastTheEnd));
                        }
                        let rank = if descending { total - 1 - position } else { position };
                        let Some(located) = blocks.locate(rank) else {
                            return Ok(Some(PageStart::PastTheEnd));
                        };
                        if !blocks.needs_split(located.block) {
                            return Ok(Some(PageStart::At {
                                first: located.first,
                                offset: located.offset,
                            }));
                        }
                        Some(located.block)
                    }
                }
            };
            match split {
                None => self.build_positions(mailbox, sort)?,
                Some(block) => self.split_position_block(mailbox, sort, block)?,
            }
        }
        Ok(None)
    }

    /// Counts a sort index into the position cache, from a snapshot taken while no commit runs;
    /// commits made meanwhile are queued in the entry and applied at the end.
    fn build_positions(&self, mailbox: MailboxId, sort: SortKey) -> Result<(), StoreError> {
        let snapshot = {
            let _writer = lock(&self.writer);
            let mut positions = lock(&self.positions);
            if positions.entries.contains_key(&(mailbox, sort as u8)) {
                return Ok(());
            }
            while positions.entries.len() >= POSITION_CACHE_ENTRIES {
                let oldest = positions
                    .entries
                    .iter()
                    .min_by_key(|(_, entry)| match entry {
                        PositionEntry::Building(_) => u64::MAX,
                        PositionEntry::Ready { last_use, .. } => *last_use,
                    })
                    .map(|(key, _)| *key);
                match oldest {
                    Some(key) => positions.entries.remove(&key),
                    None => break,
                };
            }
            positions
                .entries
                .insert((mailbox, sort as u8), PositionEntry::Building(Vec::new()));
            self.db.snapshot()
        };
        let (lower, upper) = index_bounds(mailbox, sort);
        let mut options = rocksdb::ReadOptions::default();
        options.set_snapshot(&snapshot);
        options.set_iterate_lower_bound(lower);
        options.set_iterate_upper_bound(upper);
        let mut failure = None;
        let keys = self
            .db
            .iterator_cf_opt(self.family(INDEX)?, options, IteratorMode::Start)
            .map_while(|item| match item {
                Ok((key, _)) => Some(key.get(INDEX_PREFIX..).unwrap_or_default().to_vec()),
                Err(error) => {
                    failure = Some(error);
                    None
                }
            });
        let mut blocks = CountedBlocks::from_sorted(keys, self.options.position_block);
        let mut positions = lock(&self.positions);
        if let Some(error) = failure {
            positions.entries.remove(&(mailbox, sort as u8));
            return Err(error.into());
        }
        positions.uses += 1;
        let now = positions.uses;
        if let Some(entry) = positions.entries.get_mut(&(mailbox, sort as u8)) {
            if let PositionEntry::Building(pending) = entry {
                let mut consistent = true;
                for (suffix, inserted) in pending.drain(..) {
                    if inserted {
                        blocks.insert(&suffix);
                    } else {
                        consistent &= blocks.remove(&suffix);
                    }
                }
                if consistent {
                    *entry = PositionEntry::Ready { blocks, last_use: now };
                } else {
                    positions.entries.remove(&(mailbox, sort as u8));
                }
            }
        }
        Ok(())
    }

    /// Splits an oversized block of the position cache by reading its keys, with commits held
    /// off so the counts stay exact.
    fn split_position_block(&self, mailbox: MailboxId, sort: SortKey, block: usize) -> Result<(), StoreError> {
        let _writer = lock(&self.writer);
        let mut positions = lock(&self.positions);
        let Some(PositionEntry::Ready { blocks, .. }) = positions.entries.get_mut(&(mailbox, sort as u8)) else {
            return Ok(());
        };
        if !blocks.needs_split(block) {
            return Ok(());
        }
        let (lower, upper) = index_bounds(mailbox, sort);
        let mut start = lower.clone();
        start.extend_from_slice(blocks.first_of(block).unwrap_or_default());
        let end = match blocks.end_of(block) {
            Some(end) => {
                let mut key = lower;
                key.extend_from_slice(end);
                key
            }
            None => upper,
        };
        let mut options = rocksdb::ReadOptions::default();
        options.set_iterate_lower_bound(start);
        options.set_iterate_upper_bound(end);
        let mut keys = Vec::new();
        for item in self
            .db
            .iterator_cf_opt(self.family(INDEX)?, options, IteratorMode::Start)
        {
            let (key, _) = item?;
            keys.push(key.get(INDEX_PREFIX..).unwrap_or_default().to_vec());
        }
        let parts = blocks.parts_of(keys);
        blocks.split(block, parts);
        Ok(())
    }

    /// The IDs of a page found by skipping `position` index keys.
    fn list_ids_by_skipping(
        &self,
        mailbox: MailboxId,
        sort: SortKey,
        descending: bool,
        position: usize,
        limit: usize,
    ) -> Result<Vec<MessageId>, StoreError> {
        let (lower, upper) = index_bounds(mailbox, sort);
        let mut options = rocksdb::ReadOptions::default();
        options.set_iterate_lower_bound(lower);
        options.set_iterate_upper_bound(upper);
        let mode = if descending {
            IteratorMode::End
        } else {
            IteratorMode::Start
        };
        let mut ids = Vec::with_capacity(limit.min(1024));
        for (skipped, item) in self.db.iterator_cf_opt(self.family(INDEX)?, options, mode).enumerate() {
            let (key, _) = item?;
            if skipped < position {
                continue;
            }
            if ids.len() >= limit {
                break;
            }
            let id = key.get(key.len().saturating_sub(16)..).and_then(MessageId::from_slice);
            ids.push(id.ok_or_else(|| StoreError::Corrupt("index key".into()))?);
        }
        Ok(ids)
    }

    /// A live message of the mailbox whose bytes are this blob, if any.
    pub fn live_message_with_blob(&self, mailbox: MailboxId, blob: &BlobHash) -> Result<Option<MessageId>, StoreError> {
        let start = blob_key(mailbox, blob, MessageId(0));
        let end = blob_key(mailbox, blob, MessageId(u128::MAX));
        let mut iterator = self
            .db
            .iterator_cf(self.family(INDEX)?, IteratorMode::From(&start, Direction::Forward));
        match iterator.next() {
            Some(item) => {
                let (key, _) = item?;
                if key.as_ref() > end.as_slice() {
                    return Ok(None);
                }
                Ok(key.get(key.len() - 16..).and_then(MessageId::from_slice))
            }
            None => Ok(None),
        }
    }

    /// Records created, updated and expunged in a mailbox since a node-local modseq.
    ///
    /// `mailbox` is a listing (see [`view_of`]); its modseqs are those of its container, so the
    /// listings of one account share one sequence. An email moved out since `since` is reported
    /// expunged; one moved in, created.
    pub fn changes_since(&self, mailbox: MailboxId, since: u64, limit: usize) -> Result<Changes, StoreError> {
        self.changes_since_in(self.container_of(mailbox)?, mailbox, since, limit)
    }

    /// [`Store::changes_since`] for a listing of a known container: a listing that never held
    /// anything has no entry to name its container, and its modseq is still the container's.
    pub fn changes_since_in(
        &self,
        container: MailboxId,
        mailbox: MailboxId,
        since: u64,
        limit: usize,
    ) -> Result<Changes, StoreError> {
        let entry = self.mailbox_entry(container)?;
        let current = entry.as_ref().map(|entry| entry.modseq).unwrap_or(0);
        let mut result = Changes {
            modseq: current,
            ..Changes::default()
        };
        let rebuilt_at = entry.as_ref().map(|entry| entry.rebuilt_at).unwrap_or(0);
        if since > current || (since > 0 && since <= rebuilt_at) {
            // Not issued here, or issued before a rebuild renumbered the log: listing from it
            // would silently miss changes, so the client must resync.
            result.cannot_calculate = true;
            return Ok(result);
        }
        let purged_through = entry.as_ref().map(|entry| entry.purged_through).unwrap_or(0);
        if since > 0 && since < purged_through {
            // An expunge issued after `since` may have left the log with its purged tombstone.
            result.cannot_calculate = true;
            result.expunges_purged = true;
        }
        let mut options = rocksdb::ReadOptions::default();
        options.set_iterate_upper_bound(change_key(mailbox, u64::MAX).to_vec());
        let start = change_key(mailbox, since.saturating_add(1));
        let mut seen = 0;
        let mut listed = HashSet::new();
        for item in self.db.iterator_cf_opt(
            self.family(CHANGES)?,
            options,
            IteratorMode::From(&start, Direction::Forward),
        ) {
            let (key, value) = item?;
            if !key.starts_with(&mailbox.to_bytes()) {
                break;
            }
            seen += 1;
            if seen > limit {
                result.cannot_calculate = true;
                result.expunges_purged = false;
                break;
            }
            let id = MessageId::from_slice(&value).ok_or_else(|| StoreError::Corrupt("change value".into()))?;
            if !listed.insert(id) {
                continue;
            }
            let mut state = self.local_state(container, id)?.unwrap_or_default();
            if state.view != mailbox.0 {
                // Moved out of this listing.
                state.listing = None;
                state.created = 0;
            }
            match (state.created > since, state.listing.is_some()) {
                (true, true) => result.created.push(id),
                (true, false) => {} // created and expunged since: nothing to tell
                (false, true) => result.updated.push(id),
                (false, false) => result.expunged.push(id),
            }
        }
        Ok(result)
    }

    /// This node's frontier for the change feed: per origin, a time up to which this node holds
    /// every change of that origin. Its own entry is its clock, read under the writer's lock, so
    /// every stamp it issued up to it is committed; the others were adopted from peers. Read it
    /// before the log it describes.
    pub fn frontier(&self) -> Result<Frontier, StoreError> {
        let own = lock(&self.writer).clock.current();
        let mut frontier = self.adopted_frontier()?;
        frontier.advance(self.node, own);
        Ok(frontier)
    }

    fn adopted_frontier(&self) -> Result<Frontier, StoreError> {
        let stored: Vec<(u64, u64)> = match self.db.get_cf(self.family(META)?, META_FRONTIER)? {
            Some(bytes) => decode_cbor(&bytes, "adopted frontier")?,
            None => Vec::new(),
        };
        Ok(Frontier(
            stored
                .into_iter()
                .map(|(origin, time)| (NodeId(origin), time))
                .collect(),
        ))
    }

    /// Takes in a peer's frontier, sent before it read a digest equal to this node's: this node
    /// then holds every change the peer held. This node's own entry is never taken from outside,
    /// and no entry goes past this node's clock (lower bounds are always sound). Returns whether
    /// anything moved.
    pub fn adopt_frontier(&self, peer: &Frontier) -> Result<bool, StoreError> {
        let state = lock(&self.writer);
        let ceiling = state.clock.current();
        let mut frontier = self.adopted_frontier()?;
        let before = frontier.clone();
        for (origin, time) in &peer.0 {
            if *origin != self.node {
                frontier.advance(*origin, (*time).min(ceiling));
            }
        }
        if frontier == before {
            return Ok(false);
        }
        let stored: Vec<(u64, u64)> = frontier.0.iter().map(|(origin, time)| (origin.0, *time)).collect();
        let mut batch = WriteBatch::default();
        batch.put_cf(self.family(META)?, META_FRONTIER, encode_cbor(&stored));
        self.db.write(batch)?;
        drop(state);
        Ok(true)
    }

    /// Per origin, the newest expunge whose tombstone this node purged: a change state below it
    /// may have missed that expunge.
    pub fn purged_by_origin(&self) -> Result<BTreeMap<NodeId, u64>, StoreError> {
        let stored: Vec<(u64, u64)> = match self.db.get_cf(self.family(META)?, META_PURGED)? {
            Some(bytes) => decode_cbor(&bytes, "purged tombstones by origin")?,
            None => Vec::new(),
        };
        Ok(stored
            .into_iter()
            .map(|(origin, time)| (NodeId(origin), time))
            .collect())
    }

    /// The change log of one account's emails, for [`crate::changes::changes_since`].
    pub fn account_log(&self, account: &str) -> AccountLog<'_> {
        AccountLog {
            store: self,
            account: account_key(account),
        }
    }

    /// The mailbox that holds an email of the account, if this node has it.
    pub fn email_mailbox(&self, account: &str, id: MessageId) -> Result<Option<MailboxId>, StoreError> {
        let bytes = self
            .db
            .get_cf(self.family(ACCOUNT_LOG)?, where_key(&account_key(account), id))?;
        Ok(bytes
            .and_then(|bytes| <[u8; 16]>::try_from(bytes.as_slice()).ok())
            .map(|bytes| MailboxId(u128::from_be_bytes(bytes))))
    }

    /// The live emails located in `view`, ordered by `(received time, ID)`, after `after`, at
    /// most `limit`: what the account's change feed lists when the mailbox they are shown in
    /// changes while their own records do not (the mailbox became an alias, or was deleted and
    /// they are rescued). The order is the same on every node, so a position carries over.
    pub fn view_emails_after(
        &self,
        view: MailboxId,
        after: Option<(u64, MessageId)>,
        limit: usize,
    ) -> Result<Vec<(u64, MessageId)>, StoreError> {
        let (lower, upper) = index_bounds(view, SortKey::Received);
        let start = match after {
            Some((received, id)) => index_key(view, SortKey::Received, &received.to_be_bytes(), id),
            None => lower.clone(),
        };
        let mut options = rocksdb::ReadOptions::default();
        options.set_iterate_lower_bound(lower);
        options.set_iterate_upper_bound(upper);
        let mut emails = Vec::new();
        let mode = IteratorMode::From(&start, Direction::Forward);
        for item in self.db.iterator_cf_opt(self.family(INDEX)?, options, mode) {
            if emails.len() >= limit {
                break;
            }
            let (key, _) = item?;
            if after.is_some() && key.as_ref() == start.as_slice() {
                continue;
            }
            let (Some(received), Some(id)) = (key.get(17..25), key.get(25..41)) else {
                return Err(StoreError::Corrupt(
                    "a received-time index key of the wrong length".into(),
                ));
            };
            let received = u64::from_be_bytes(received.try_into().unwrap_or_default());
            let id = MessageId(u128::from_be_bytes(id.try_into().unwrap_or_default()));
            emails.push((received, id));
        }
        Ok(emails)
    }

    /// Takes one value from the clock and persists it: every stamp this store makes afterwards,
    /// even after a restart or a wall clock stepping back, is greater. Members report it with
    /// their digest so that a cut below every report is final.
    pub fn clock_report(&self, now_millis: u64) -> Result<u64, StoreError> {
        let mut state = lock(&self.writer);
        let value = state.clock.tick(now_millis);
        let mut options = WriteOptions::default();
        options.set_sync(self.options.sync_writes);
        let mut batch = WriteBatch::default();
        batch.put_cf(self.family(META)?, META_CLOCK, value.to_be_bytes());
        self.db.write_opt(batch, &options)?;
        Ok(value)
    }

    /// Tombstones expunged before this millisecond are collected, and a peer's record expunged
    /// before it is not taken in unless held live: the later of the horizon and the acknowledged cut.
    pub fn tombstone_cutoff(&self, now_millis: u64) -> u64 {
        now_millis
            .saturating_sub(self.options.tombstone_horizon_millis)
            .max(self.acknowledged_before())
    }

    /// The acknowledged cut: every member holds every tombstone expunged before this millisecond.
    pub fn acknowledged_before(&self) -> u64 {
        self.acknowledged_before.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Moves the acknowledged cut forward (never back) and persists it; returns whether it moved.
    /// Run [`Store::collect_tombstones`] afterwards to purge what it covers.
    pub fn acknowledge_tombstones_before(&self, millis: u64) -> Result<bool, StoreError> {
        let _writer = lock(&self.writer);
        if millis <= self.acknowledged_before() {
            return Ok(false);
        }
        let mut options = WriteOptions::default();
        options.set_sync(self.options.sync_writes);
        let mut batch = WriteBatch::default();
        batch.put_cf(self.family(META)?, META_ACKNOWLEDGED, millis.to_be_bytes());
        self.db.write_opt(batch, &options)?;
        self.acknowledged_before
            .store(millis, std::sync::atomic::Ordering::Release);
        Ok(true)
    }

    /// Purges up to `limit` tombstones expunged before the cutoff (the horizon or the
    /// acknowledged cut, whichever is later); returns how many.
    pub fn collect_tombstones(&self, now_millis: u64, limit: usize) -> Result<usize, StoreError> {
        let cutoff = self.tombstone_cutoff(now_millis);
        let mut options = rocksdb::ReadOptions::default();
        options.set_iterate_upper_bound(cutoff.to_be_bytes().to_vec());
        let mut operations = Vec::new();
        for item in self
            .db
            .iterator_cf_opt(self.family(TOMBSTONES)?, options, IteratorMode::Start)
            .take(limit)
        {
            let (key, _) = item?;
            let mailbox = key
                .get(8..24)
                .and_then(|bytes| <[u8; 16]>::try_from(bytes).ok())
                .map(u128::from_be_bytes);
            let id = key.get(24..40).and_then(MessageId::from_slice);
            let (Some(mailbox), Some(id)) = (mailbox, id) else {
                return Err(StoreError::Corrupt("tombstone key".into()));
            };
            operations.push(Operation::Purge {
                mailbox: MailboxId(mailbox),
                id,
                now_millis,
            });
        }
        let mut purged = 0;
        for result in self.apply(operations) {
            if let Applied::Purged(true) = result? {
                purged += 1;
            }
        }
        Ok(purged)
    }

    /// When this replica last completed a reconciliation with a peer (0: never).
    pub fn last_contact(&self) -> Result<u64, StoreError> {
        meta_u64(&self.db, self.family(META)?, META_LAST_CONTACT, "last contact")
    }

    /// Records a completed reconciliation with a peer.
    pub fn set_last_contact(&self, now_millis: u64) -> Result<(), StoreError> {
        self.db
            .put_cf(self.family(META)?, META_LAST_CONTACT, now_millis.to_be_bytes())?;
        Ok(())
    }

    /// Up to `limit` queued full-text index tasks with a sequence above `after`, oldest first.
    pub fn search_tasks(&self, after: u64, limit: usize) -> Result<Vec<(u64, SearchTask)>, StoreError> {
        let mut tasks = Vec::new();
        let mut options = rocksdb::ReadOptions::default();
        // Start past the handled tasks: their deletions would otherwise be skipped one by one.
        options.set_iterate_lower_bound(after.saturating_add(1).to_be_bytes().to_vec());
        for item in self
            .db
            .iterator_cf_opt(self.family(SEARCH_QUEUE)?, options, IteratorMode::Start)
            .take(limit)
        {
            let (key, value) = item?;
            let sequence = u64::from_be_bytes(
                key.as_ref()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("queue key".into()))?,
            );
            tasks.push((sequence, decode_cbor(&value, "search task")?));
        }
        Ok(tasks)
    }

    /// How many queued full-text index tasks are not handled yet: the newest sequence written
    /// less the oldest still queued (they are numbered without gaps).
    pub fn search_backlog(&self) -> Result<u64, StoreError> {
        let newest = self.writer.lock().map_err(|_| StoreError::Closed)?.search_sequence;
        let oldest = match self
            .db
            .iterator_cf(self.family(SEARCH_QUEUE)?, IteratorMode::Start)
            .next()
        {
            None => return Ok(0),
            Some(item) => {
                let (key, _) = item?;
                u64::from_be_bytes(
                    key.as_ref()
                        .try_into()
                        .map_err(|_| StoreError::Corrupt("queue key".into()))?,
                )
            }
        };
        Ok(newest.saturating_sub(oldest) + 1)
    }

    /// Removes handled tasks (every sequence up to and including `last`) from the search queue,
    /// with one range deletion.
    pub fn finish_search_tasks(&self, last: u64) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            self.family(SEARCH_QUEUE)?,
            0u64.to_be_bytes(),
            last.saturating_add(1).to_be_bytes(),
        );
        self.db.write(batch)?;
        Ok(())
    }

    /// Drops and rebuilds every node-local index (listings, sort indexes, change log, search
    /// queue and mailbox counters) from the records and blobs. Returns the records visited.
    /// Run with the node stopped; the full-text index is then refilled from the queue.
    pub fn rebuild_local_indexes(&self) -> Result<u64, StoreError> {
        let _writer = self.writer.lock().map_err(|_| StoreError::Closed)?;
        lock(&self.positions).entries.clear();
        for name in LOCAL_FAMILIES {
            let family = self.family(name)?;
            let mut batch = WriteBatch::default();
            batch.delete_range_cf(family, [0u8; 0].as_slice(), [0xffu8; 64].as_slice());
            self.db.write(batch)?;
        }
        let mut visited = 0u64;
        let mut sequence = 0u64;
        let mut view_counts: HashMap<MailboxId, ViewEntry> = HashMap::new();
        for entry in self.mailboxes()? {
            let mailbox_id = entry.key.id();
            let mut batch = WriteBatch::default();
            // Number the rebuilt log above every modseq issued before, so no old client state
            // can be mistaken for a position in the new one (see `changes_since`).
            let rebuilt_at = entry.modseq;
            let (mut live, mut unseen, mut modseq) = (0u64, 0u64, rebuilt_at);
            let mut failure = None;
            self.records_ordered(mailbox_id, false, |record| {
                visited += 1;
                modseq += 1;
                let id = record.id;
                let view = view_of(&entry.key, &record);
                let listing = if record.is_live() {
                    live += 1;
                    let counts = view_counts.entry(view).or_insert_with(|| ViewEntry {
                        container: mailbox_id.0,
                        ..ViewEntry::default()
                    });
                    counts.live += 1;
                    if !record.has_flag(&Flag::Seen) {
                        unseen += 1;
                        counts.unseen += 1;
                    }
                    if entry.key.holds_mailboxes() {
                        Some(Listing::default())
                    } else {
                        match self.blob(&record.blob) {
                            Ok(raw) => Some(raw.map(|raw| mail::listing(&raw)).unwrap_or_default()),
                            Err(error) => {
                                failure = Some(error);
                                return false;
                            }
                        }
                    }
                } else {
                    None
                };
                let families = (
                    self.family(LOCAL),
                    self.family(INDEX),
                    self.family(CHANGES),
                    self.family(SEARCH_QUEUE),
                );
                let (Ok(local), Ok(index), Ok(changes), Ok(queue)) = families else {
                    return false;
                };
                if let Ok(account_log) = self.family(ACCOUNT_LOG) {
                    let account = account_key(entry.key.account());
                    let value = log_value(mailbox_id, &record);
                    for (origin, time) in record.stamps_by_origin() {
                        batch.put_cf(account_log, log_key(&account, origin, time, id), value);
                    }
                    batch.put_cf(account_log, where_key(&account, id), mailbox_id.to_bytes());
                }
                if let (Some(stamp), Ok(tombstones)) = (record.expunged, self.family(TOMBSTONES)) {
                    batch.put_cf(
                        tombstones,
                        tombstone_key(crdt::millis_of(stamp.time), mailbox_id, id),
                        [],
                    );
                }
                if let Some(listing) = &listing {
                    for sort in SortKey::ALL {
                        batch.put_cf(index, index_key(view, sort, &sort.key(&record, listing), id), []);
                    }
                    batch.put_cf(index, blob_key(view, &record.blob, id), []);
                    if !entry.key.holds_mailboxes() {
                        sequence += 1;
                        let task = SearchTask::Add {
                            mailbox: view.0,
                            container: mailbox_id.0,
                            id,
                            blob: record.blob,
                        };
                        batch.put_cf(queue, sequence.to_be_bytes(), encode_cbor(&task));
                    }
                }
                batch.put_cf(changes, change_key(view, modseq), id.to_bytes());
                batch.put_cf(
                    local,
                    record_key(mailbox_id, id),
                    encode_cbor(&LocalState {
                        created: modseq,
                        modseq,
                        listing,
                        view: view.0,
                    }),
                );
                true
            })?;
            if let Some(error) = failure {
                return Err(error);
            }
            let mut entry = entry;
            entry.live = live;
            entry.unseen = unseen;
            entry.modseq = modseq;
            entry.rebuilt_at = rebuilt_at;
            batch.put_cf(self.family(MAILBOXES)?, mailbox_id.to_bytes(), encode_cbor(&entry));
            self.db.write(batch)?;
        }
        let mut batch = WriteBatch::default();
        let views = self.family(VIEWS)?;
        for (view, counts) in &view_counts {
            batch.put_cf(views, view.to_bytes(), encode_cbor(counts));
        }
        batch.put_cf(self.family(META)?, META_SEARCH_SEQUENCE, sequence.to_be_bytes());
        self.db.write(batch)?;
        Ok(visited)
    }

    /// What RocksDB is doing in the background: compactions and flushes running, and the bytes
    /// its compactions still have to rewrite, over every column family.
    pub fn background_work(&self) -> Result<BackgroundWork, StoreError> {
        let mut work = BackgroundWork {
            jobs_running: self
                .db
                .property_int_value("rocksdb.num-running-compactions")?
                .unwrap_or(0)
                + self.db.property_int_value("rocksdb.num-running-flushes")?.unwrap_or(0),
            pending_compaction_bytes: 0,
        };
        for name in FAMILIES {
            work.pending_compaction_bytes += self
                .db
                .property_int_value_cf(self.family(name)?, "rocksdb.estimate-pending-compaction-bytes")?
                .unwrap_or(0);
        }
        Ok(work)
    }

    /// Bytes on disk of the node-local index column families (estimated by RocksDB).
    pub fn local_index_bytes(&self) -> Result<u64, StoreError> {
        let mut total = 0;
        for name in LOCAL_FAMILIES {
            total += self
                .db
                .property_int_value_cf(self.family(name)?, "rocksdb.total-sst-files-size")?
                .unwrap_or(0);
            total += self
                .db
                .property_int_value_cf(self.family(name)?, "rocksdb.cur-size-all-mem-tables")?
                .unwrap_or(0);
        }
        Ok(total)
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

fn tombstone_key(expunged_millis: u64, mailbox: MailboxId, id: MessageId) -> [u8; 40] {
    let mut key = [0u8; 40];
    key[..8].copy_from_slice(&expunged_millis.to_be_bytes());
    key[8..24].copy_from_slice(&mailbox.to_bytes());
    key[24..].copy_from_slice(&id.to_bytes());
    key
}

fn change_key(mailbox: MailboxId, modseq: u64) -> [u8; 24] {
    let mut key = [0u8; 24];
    key[..16].copy_from_slice(&mailbox.to_bytes());
    key[16..].copy_from_slice(&modseq.to_be_bytes());
    key
}

/// The 16 bytes that name an account in the change log's keys.
fn account_key(account: &str) -> [u8; 16] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"mailmesh account\0");
    hasher.update(account.as_bytes());
    let mut key = [0u8; 16];
    key.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
    key
}

const LOG_ENTRY: u8 = 0;
const LOG_WHERE: u8 = 1;

fn log_key(account: &[u8; 16], origin: NodeId, time: u64, id: MessageId) -> [u8; 49] {
    let mut key = [0u8; 49];
    key[..16].copy_from_slice(account);
    key[16] = LOG_ENTRY;
    key[17..25].copy_from_slice(&origin.0.to_be_bytes());
    key[25..33].copy_from_slice(&time.to_be_bytes());
    key[33..].copy_from_slice(&id.to_bytes());
    key
}

fn where_key(account: &[u8; 16], id: MessageId) -> [u8; 33] {
    let mut key = [0u8; 33];
    key[..16].copy_from_slice(account);
    key[16] = LOG_WHERE;
    key[17..].copy_from_slice(&id.to_bytes());
    key
}

/// The mailbox, the creation stamp and whether the record is expunged.
fn log_value(mailbox: MailboxId, record: &MessageRecord) -> [u8; 33] {
    let mut value = [0u8; 33];
    value[..16].copy_from_slice(&mailbox.to_bytes());
    value[16..24].copy_from_slice(&record.created.to_be_bytes());
    value[24..32].copy_from_slice(&record.origin.0.to_be_bytes());
    value[32] = u8::from(!record.is_live());
    value
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
    purges: Vec<(MailboxId, MessageRecord)>,
    /// Listings read ahead of the batch, by blob.
    listings: HashMap<BlobHash, Listing>,
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

    /// One range scan instead of sixteen lookups: the children of a stored node are adjacent
    /// keys of the tree family, and those of a deeper node come from one scan of its leaves. A
    /// lookup of an absent child still probed every memtable and level, and reconciling after a
    /// partition spent a third of a node's CPU in such probes.
    fn child_aggregates(&self, prefix: Prefix) -> Result<[Aggregate; 16], StoreError> {
        let mut children = [Aggregate::default(); 16];
        let (Some(first), Some(last)) = (prefix.child(0), prefix.child(15)) else {
            return Ok(children);
        };
        let child_of = |key: u128| prefix.child_index(key).unwrap_or(0);
        if first.depth() > self.space.stored_depth().0 {
            for (key, hash) in self.leaves(prefix, usize::MAX)? {
                children[child_of(key)].add(&Aggregate::leaf(&hash));
            }
            return Ok(children);
        }
        let end = tree_key(self.space, last);
        let mut options = rocksdb::ReadOptions::default();
        let mut upper = end.to_vec();
        upper.push(0); // the smallest key after `end`
        options.set_iterate_upper_bound(upper);
        let start = tree_key(self.space, first);
        let iterator = self.store.db.iterator_cf_opt(
            self.store.family(TREE)?,
            options,
            IteratorMode::From(&start, Direction::Forward),
        );
        for item in iterator {
            let (key, value) = item?;
            let bits = key
                .get(18..34)
                .and_then(|bytes| <[u8; 16]>::try_from(bytes).ok())
                .map(u128::from_be_bytes)
                .ok_or_else(|| StoreError::Corrupt("tree key".into()))?;
            children[child_of(bits)] = decode_aggregate(&value)?;
        }
        Ok(children)
    }

    fn leaves(&self, prefix: Prefix, limit: usize) -> Result<Vec<(u128, [u8; 32])>, StoreError> {
        let (low, high) = prefix.bounds();
        let mut leaves = Vec::new();
        match self.space {
            Space::Mailbox(mailbox) => {
                for record in self
                    .store
                    .records_in_range(mailbox, MessageId(low), MessageId(high), limit)?
                {
                    leaves.push((record.id.0, crdt::state_hash(&record)));
                }
            }
            Space::Directory => {
                let family = self.store.family(MAILBOXES)?;
                let start = low.to_be_bytes();
                for item in self
                    .store
                    .db
                    .iterator_cf(family, IteratorMode::From(&start, Direction::Forward))
                {
                    let (key, value) = item?;
                    let id = u128::from_be_bytes(
                        key.as_ref()
                            .try_into()
                            .map_err(|_| StoreError::Corrupt("mailbox key".into()))?,
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
type Submission = (Operation, Option<(BlobHash, Listing)>, Reply);

/// Reads, in the caller's thread, what the writer would otherwise parse: the listing of a
/// message that an append or a blob put brings.
fn prepare(operation: &Operation) -> Option<(BlobHash, Listing)> {
    match operation {
        Operation::Append { raw, .. } => Some((BlobHash::of(raw), mail::listing(raw))),
        Operation::PutBlob { expected, bytes } => Some((*expected, mail::listing(bytes))),
        _ => None,
    }
}

/// One account's email change log, read straight from RocksDB ([`Store::account_log`]).
pub struct AccountLog<'a> {
    store: &'a Store,
    account: [u8; 16],
}

impl AccountLog<'_> {
    fn origin_prefix(&self, origin: NodeId) -> [u8; 25] {
        let mut prefix = [0u8; 25];
        prefix[..16].copy_from_slice(&self.account);
        prefix[16] = LOG_ENTRY;
        prefix[17..].copy_from_slice(&origin.0.to_be_bytes());
        prefix
    }
}

fn log_error(error: StoreError) -> ChangesError {
    ChangesError::Log(error.to_string())
}

impl ChangeLog for AccountLog<'_> {
    fn entries_after(
        &self,
        origin: NodeId,
        after: LogPosition,
        limit: usize,
    ) -> Result<Vec<ChangeEntry>, ChangesError> {
        let family = self.store.family(ACCOUNT_LOG).map_err(log_error)?;
        let prefix = self.origin_prefix(origin);
        let start = log_key(&self.account, origin, after.time, MessageId(after.item));
        let mut entries = Vec::new();
        for item in self
            .store
            .db
            .iterator_cf(family, IteratorMode::From(&start, Direction::Forward))
        {
            let (key, value) = item.map_err(|error| ChangesError::Log(error.to_string()))?;
            if !key.starts_with(&prefix) || entries.len() >= limit {
                break;
            }
            if key.len() != 49 || value.len() != 33 {
                return Err(ChangesError::Log("a change log entry of the wrong size".into()));
            }
            let time = u64::from_be_bytes(key[25..33].try_into().unwrap_or_default());
            let item = u128::from_be_bytes(key[33..49].try_into().unwrap_or_default());
            if (time, item) <= (after.time, after.item) {
                continue;
            }
            entries.push(ChangeEntry {
                time,
                item,
                created: Stamp {
                    time: u64::from_be_bytes(value[16..24].try_into().unwrap_or_default()),
                    node: NodeId(u64::from_be_bytes(value[24..32].try_into().unwrap_or_default())),
                },
                destroyed: value[32] != 0,
            });
        }
        Ok(entries)
    }

    fn latest_by_origin(&self) -> Result<BTreeMap<NodeId, u64>, ChangesError> {
        let family = self.store.family(ACCOUNT_LOG).map_err(log_error)?;
        let mut latest = BTreeMap::new();
        let mut next = Some(0u64);
        while let Some(origin) = next {
            // The first entry at or after this origin names the next origin that has any.
            let start = self.origin_prefix(NodeId(origin));
            let mut forward = self
                .store
                .db
                .iterator_cf(family, IteratorMode::From(&start, Direction::Forward));
            let Some(first) = forward.next() else { break };
            let (key, _) = first.map_err(|error| ChangesError::Log(error.to_string()))?;
            if key.len() != 49 || key[..16] != self.account || key[16] != LOG_ENTRY {
                break;
            }
            let found = NodeId(u64::from_be_bytes(key[17..25].try_into().unwrap_or_default()));
            // Its last entry is its latest time.
            let end = log_key(&self.account, found, u64::MAX, MessageId(u128::MAX));
            let mut backward = self
                .store
                .db
                .iterator_cf(family, IteratorMode::From(&end, Direction::Reverse));
            if let Some(last) = backward.next() {
                let (key, _) = last.map_err(|error| ChangesError::Log(error.to_string()))?;
                if key.len() == 49 && key[..25] == self.origin_prefix(found) {
                    latest.insert(found, u64::from_be_bytes(key[25..33].try_into().unwrap_or_default()));
                }
            }
            next = found.0.checked_add(1);
        }
        Ok(latest)
    }
}

/// The origin and mailbox a change to announce would have, for the operations that change records.
fn feed_source(operation: &Operation) -> Option<(Origin, MailboxKey)> {
    match operation {
        Operation::Append { mailbox, .. }
        | Operation::SetFlags { mailbox, .. }
        | Operation::Move { mailbox, .. }
        | Operation::Expunge { mailbox, .. } => Some((Origin::Local, mailbox.clone())),
        Operation::Merge { mailbox, .. } => Some((Origin::Peer, mailbox.clone())),
        Operation::PutBlob { .. } | Operation::Purge { .. } => None,
    }
}

/// Where a committed change came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A write made on this node (append, flag change, expunge).
    Local,
    /// A peer's record merged here.
    Peer,
}

/// One change the store has made durable: what the commit feed carries.
#[derive(Clone, Debug)]
pub struct Committed {
    pub origin: Origin,
    pub mailbox: MailboxKey,
    /// The record as it now stands.
    pub record: MessageRecord,
    /// True for a message appended here (its bytes are new too); false for any other change.
    pub appended: bool,
}

/// How many committed changes the feed keeps for a slow reader before it skips ahead (a reader
/// that lags is told how many it missed, see [`tokio::sync::broadcast`]).
pub const FEED_CAPACITY: usize = 8192;

/// Durable group commit: operations from any number of threads or tasks are gathered into one
/// batch and one WAL sync by a dedicated writer thread.
///
/// Every change that became durable is then announced on the commit feed ([`CommitQueue::feed`]),
/// after the writers were answered: the replication engine pushes local writes to peers from it,
/// and the mail service tells its subscribers (IMAP IDLE, JMAP push) from it.
#[derive(Clone)]
pub struct CommitQueue {
    sender: std::sync::mpsc::Sender<Submission>,
    feed: tokio::sync::broadcast::Sender<Committed>,
}

impl CommitQueue {
    /// Starts the writer thread for `store`. It stops when every queue handle is dropped; once
    /// every other holder has dropped the store, what is submitted is answered
    /// [`StoreError::Closed`].
    ///
    /// The thread holds the store only while it writes a batch: otherwise the last reference
    /// to the store would often be this thread's, and the process could exit while RocksDB
    /// closes here (its background threads then abort the process at exit). The owner dropping
    /// the store closes it on the owner's thread.
    pub fn start(store: Arc<Store>, max_batch: usize) -> CommitQueue {
        let (sender, receiver) = std::sync::mpsc::channel::<Submission>();
        let (feed, _) = tokio::sync::broadcast::channel(FEED_CAPACITY);
        let announcer = feed.clone();
        let store = Arc::downgrade(&store);
        std::thread::Builder::new()
            .name("mailmesh-commit".into())
            .spawn(move || {
                while let Ok(first) = receiver.recv() {
                    let Some(store) = store.upgrade() else {
                        let _ = first.2.send(Err(StoreError::Closed));
                        while let Ok((_, _, reply)) = receiver.try_recv() {
                            let _ = reply.send(Err(StoreError::Closed));
                        }
                        continue;
                    };
                    let mut pending = vec![first];
                    while pending.len() < max_batch {
                        match receiver.try_recv() {
                            Ok(next) => pending.push(next),
                            Err(_) => break,
                        }
                    }
                    let mut operations = Vec::with_capacity(pending.len());
                    let mut replies = Vec::with_capacity(pending.len());
                    let mut sources = Vec::with_capacity(pending.len());
                    let mut listings = HashMap::new();
                    for (operation, prepared, reply) in pending {
                        if let Some((blob, listing)) = prepared {
                            listings.insert(blob, listing);
                        }
                        sources.push(feed_source(&operation));
                        operations.push(operation);
                        replies.push(reply);
                    }
                    let results = store.apply_prepared(operations, listings);
                    let mut committed = Vec::new();
                    for ((reply, result), source) in replies.into_iter().zip(results).zip(sources) {
                        if let (Some((origin, mailbox)), Ok(applied)) = (source, &result) {
                            let change = match applied {
                                Applied::Appended { record, .. } => Some((record.clone(), true)),
                                Applied::Record { record, changed: true } => Some((record.clone(), false)),
                                _ => None,
                            };
                            if let Some((record, appended)) = change {
                                committed.push(Committed {
                                    origin,
                                    mailbox,
                                    record,
                                    appended,
                                });
                            }
                        }
                        let _ = reply.send(result);
                    }
                    if announcer.receiver_count() > 0 {
                        for change in committed {
                            let _ = announcer.send(change);
                        }
                    }
                }
            })
            .map(|_| ())
            .unwrap_or_else(|error| tracing::error!("cannot start the commit thread: {error}"));
        CommitQueue { sender, feed }
    }

    /// A receiver of every change committed from now on.
    pub fn feed(&self) -> tokio::sync::broadcast::Receiver<Committed> {
        self.feed.subscribe()
    }

    /// Submits an operation and waits until it is durable (or failed).
    pub async fn submit(&self, operation: Operation) -> Result<Applied, StoreError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let prepared = prepare(&operation);
        self.sender
            .send((operation, prepared, reply))
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// The same, for threads outside the async runtime.
    pub fn submit_blocking(&self, operation: Operation) -> Result<Applied, StoreError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let prepared = prepare(&operation);
        self.sender
            .send((operation, prepared, reply))
            .map_err(|_| StoreError::Closed)?;
        answer.blocking_recv().map_err(|_| StoreError::Closed)?
    }
}
