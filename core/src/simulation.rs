//! A deterministic simulation of the replication engine: 3 to 7 nodes on one thread, one seeded
//! random source, one simulated clock.
//!
//! The real node runs the pure protocols of this crate over libp2p against RocksDB; that cannot
//! be replayed from a seed. Here the same state machines ([`crate::sync`] trie descent,
//! [`crate::sketch_session`] sessions, [`crate::crdt`] merges and clocks, [`crate::mailbox`]
//! resolution) run between nodes whose store is two in-memory containers (the account's emails
//! and its mailbox snapshots, each a [`MemoryTree`] over its records), over a network that drops,
//! duplicates, delays and reorders every message and can be partitioned. Every message carries
//! the protocols' wire bytes, so the decoders are in the loop too. Nodes crash and restart with
//! their store kept and their sessions lost, their clocks are skewed within the bound, and a
//! hostile peer now and then sends stamps beyond it, which must be refused.
//!
//! Clients write on every node as the mail service does: appends, flag changes, moves, expunges,
//! mailbox creates, renames and deletes (a delete destroys the emails it shows, then writes the
//! tombstone). The history of every acknowledged write is kept. At the end every fault heals,
//! sessions run until the nodes hold the same records within a bounded number of rounds, and the
//! checker compares every node with the history: nothing acknowledged lost, nothing expunged
//! live again, every flag, location and expunge equal to the winner its stamps say, every
//! mailbox record equal to the fold of every snapshot written, no email whose mailbox does not
//! resolve, and a further round that finds nothing to pull.
//!
//! Everything follows from the seed ([`run`]): a failing schedule replays exactly, and with
//! `trace` set it returns the events that touched what went wrong. The random source is
//! SplitMix64, seeded by the caller: nothing here reads the clock or the operating system.

use std::collections::{BTreeMap, BTreeSet};

use crate::crdt::{self, Clock};
use crate::mailbox::{self, Location, MailboxRecord, Position};
use crate::merkle::{Aggregate, MemoryTree, Prefix, StoredDepth, Summary, TreeView};
use crate::model::{
    BlobHash, Flag, FlagRegister, MailboxId, MailboxKey, MessageId, MessageIdGenerator, MessageRecord, NodeId, Stamp,
};
use crate::sketch::{SketchCells, SketchKey};
use crate::sketch_session::{self, Asker, Message, SessionLimits, Step};
use crate::sync::{self, RecordState, SyncLimits};

/// The account every simulated client writes to.
pub const ACCOUNT: &str = "alice@example.org";
/// The clock bound of every node (the real default: two hours).
pub const CLOCK_BOUND_MILLIS: u64 = 2 * 60 * 60 * 1000;
/// The most rounds of sessions (every node with one peer) the heal may take to converge.
pub const MAX_CONVERGE_ROUNDS: u64 = 40;
/// The most messages one trie session exchanges before a side stops answering.
const MAX_TRIE_ROUNDS: u32 = 80;
/// The most messages one sketch session sends (as the node's `MAX_SKETCH_ROUNDS`).
const MAX_SKETCH_ROUNDS: u32 = 32;
/// The most deliveries one drain of the network may take before the heal counts as stuck.
const MAX_DRAIN_DELIVERIES: u64 = 2_000_000;
/// Wall-clock start of every schedule (2026-01-01).
const START_MILLIS: u64 = 1_767_225_600_000;
/// The keyword a hostile peer's too-far-ahead stamps carry, so the checker can find them.
const FORGED_KEYWORD: &str = "$Forged";
const NAMES: [&str; 5] = ["Work", "Home", "Archive", "Lists", "Trips"];

/// SplitMix64 (Steele, Lea and Flood, 2014): a tiny seeded generator, all a schedule needs.
#[derive(Clone, Debug)]
pub struct SeededRandom(u64);

impl SeededRandom {
    /// A generator that starts from `seed`.
    pub fn new(seed: u64) -> Self {
        SeededRandom(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut mixed = self.0;
        mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        mixed ^ (mixed >> 31)
    }

    fn next_u128(&mut self) -> u128 {
        (u128::from(self.next_u64()) << 64) | u128::from(self.next_u64())
    }

    /// A number in `0..bound` (0 when `bound` is 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        if bound == 0 {
            0
        } else {
            self.next_u64() % bound
        }
    }

    fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.below(high - low + 1)
    }

    fn per_mille(&mut self, chance: u64) -> bool {
        self.below(1000) < chance
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> Option<T> {
        (!items.is_empty()).then(|| items[self.below(items.len() as u64) as usize])
    }
}

/// The seed of schedule `index` in a run that starts from `seed`.
pub fn schedule_seed(seed: u64, index: u64) -> u64 {
    SeededRandom::new(seed ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03)).next_u64()
}

/// What one schedule did and what the checker found.
#[derive(Clone, Debug, Default)]
pub struct ScheduleReport {
    pub seed: u64,
    pub nodes: usize,
    /// Client writes of every kind that the node acknowledged.
    pub operations: u64,
    /// Acknowledged appends.
    pub acknowledged: u64,
    pub flag_changes: u64,
    pub moves: u64,
    pub expunges: u64,
    pub mailbox_writes: u64,
    /// Acknowledged appends missing on some node, or expunged there with no expunge written.
    pub lost: u64,
    /// Expunged emails live again on some node.
    pub resurrected: u64,
    /// Records (emails or mailbox snapshots) that differ between nodes at the end, plus mailbox
    /// trees that resolve differently, and paths shown twice, hidden parents or cycles.
    pub divergent: u64,
    /// Flags, locations, expunges or mailbox records that converged to something other than the
    /// winner the history's stamps say.
    pub wrong_winners: u64,
    /// Live emails whose mailbox does not resolve on some node.
    pub orphans: u64,
    /// Stamps beyond the clock bound a hostile peer sent, and how many of them some node took.
    pub forged_sent: u64,
    pub forged_accepted: u64,
    /// Merges refused by the clock check: of forged records, and of honest ones (a clock that
    /// refuses an honest peer's stamps within the bound would keep the cluster apart).
    pub refused_stamps: u64,
    pub refused_honest: u64,
    /// Messages sent, dropped (by chance, a partition or a node that is down), duplicated.
    pub messages: u64,
    pub dropped: u64,
    pub duplicated: u64,
    pub restarts: u64,
    pub partitions: u64,
    pub trie_sessions: u64,
    pub sketch_sessions: u64,
    /// Sketch sessions that ended early (stale cells, a decoder error, the deadline).
    pub sketch_abandoned: u64,
    /// Sketch sessions whose cells decoded the difference (the rest went by trie descent).
    pub sketch_decoded: u64,
    /// Records merged from pulls (whole records) and from states (a `Differ`, a settlement).
    pub records_merged: u64,
    pub states_merged: u64,
    /// Messages a receiver could not decode or that broke the protocol (none from honest nodes).
    pub protocol_errors: u64,
    /// Rounds of sessions the heal took until every node held the same records.
    pub rounds_to_converge: u64,
    pub converged: bool,
    /// Pulls a further round after convergence asked for (a quiescent cluster asks for none).
    pub unquiet_pulls: u64,
    /// What went wrong, one line each.
    pub problems: Vec<String>,
    /// With tracing: the events that touched what went wrong (every fault, and each write,
    /// merge and refusal of a record named in `problems`).
    pub trace: Vec<String>,
}

impl ScheduleReport {
    /// Whether the checker found anything wrong.
    pub fn failed(&self) -> bool {
        !self.problems.is_empty()
    }
}

/// What a schedule's seed decides before it starts.
#[derive(Clone, Debug)]
struct Settings {
    nodes: usize,
    steps: u64,
    drop_per_mille: u64,
    duplicate_per_mille: u64,
    max_delay_millis: u64,
    /// Containers with at least this many records open with a sketch session (the node's
    /// threshold, 4,096, scaled to the simulation's few hundred records).
    sketch_minimum: u64,
    session: SessionLimits,
}

impl Settings {
    fn draw(random: &mut SeededRandom) -> Self {
        let leaf_threshold = random.between(1, 12);
        let exact_threshold = random.between(leaf_threshold, 256);
        let sync = SyncLimits {
            leaf_threshold,
            exact_threshold,
            initial_list_threshold: random.between(0, 48),
            ..SyncLimits::default()
        };
        Settings {
            nodes: random.between(3, 7) as usize,
            steps: random.between(200, 700),
            drop_per_mille: random.between(0, 300),
            duplicate_per_mille: random.between(0, 150),
            max_delay_millis: random.between(1, 400),
            sketch_minimum: random.between(2, 40),
            session: SessionLimits {
                sync,
                opening_cells: random.below(2),
                ..SessionLimits::default()
            },
        }
    }
}

/// One replicated container of the account: its records and their trie.
#[derive(Clone, Debug)]
struct Container {
    records: BTreeMap<MessageId, MessageRecord>,
    tree: MemoryTree,
}

impl Container {
    fn new() -> Self {
        Container {
            records: BTreeMap::new(),
            tree: MemoryTree::new(StoredDepth::MAILBOX),
        }
    }

    fn put(&mut self, record: MessageRecord) {
        self.tree.insert(record.id.0, crdt::state_hash(&record));
        self.records.insert(record.id, record);
    }

    fn root(&self) -> Aggregate {
        self.tree.root()
    }
}

/// The two containers a session reconciles.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Space {
    Emails,
    Mailboxes,
}

impl Space {
    const BOTH: [Space; 2] = [Space::Emails, Space::Mailboxes];

    fn container_id(self) -> MailboxId {
        match self {
            Space::Emails => MailboxKey::emails(ACCOUNT).map(|key| key.id()).unwrap_or(MailboxId(0)),
            Space::Mailboxes => MailboxKey::mailboxes(ACCOUNT)
                .map(|key| key.id())
                .unwrap_or(MailboxId(0)),
        }
    }
}

/// What a node keeps across a restart.
#[derive(Clone, Debug)]
struct Store {
    emails: Container,
    mailboxes: Container,
    blobs: BTreeMap<BlobHash, Vec<u8>>,
    /// The clock value persisted with the last write.
    clock: u64,
    last_id: MessageId,
}

/// The sketch session a node runs as the asker.
struct AskerSession {
    peer: usize,
    space: Space,
    salt: [u8; 16],
    asker: Asker,
    cells: SketchCells,
    /// The container root when this side's cells were built.
    built: Option<Summary>,
    rounds: u32,
    /// This node's clock when the session opened.
    opened_at: u64,
}

/// What a node loses when it restarts.
struct Volatile {
    clock: Clock,
    ids: MessageIdGenerator,
    askers: BTreeMap<u64, AskerSession>,
    /// Per (asker, session): the root this responder built the cells it sent from.
    responder_roots: BTreeMap<(usize, u64), Aggregate>,
}

impl Volatile {
    fn resume(store: &Store) -> Self {
        Volatile {
            clock: Clock::resume(store.clock, CLOCK_BOUND_MILLIS),
            ids: MessageIdGenerator::after(store.last_id),
            askers: BTreeMap::new(),
            responder_roots: BTreeMap::new(),
        }
    }
}

struct SimulatedNode {
    id: NodeId,
    /// Milliseconds this node's wall clock is off the true time.
    skew: i64,
    up: bool,
    down_until: u64,
    store: Store,
    volatile: Volatile,
}

impl SimulatedNode {
    fn container(&self, space: Space) -> &Container {
        match space {
            Space::Emails => &self.store.emails,
            Space::Mailboxes => &self.store.mailboxes,
        }
    }

    fn container_mut(&mut self, space: Space) -> &mut Container {
        match space {
            Space::Emails => &mut self.store.emails,
            Space::Mailboxes => &mut self.store.mailboxes,
        }
    }

    /// Stores a record and persists the clock with it, as the store's write batch does.
    fn write(&mut self, space: Space, record: MessageRecord) {
        self.container_mut(space).put(record);
        self.store.clock = self.volatile.clock.current();
    }

    fn stamp(&mut self, now: u64) -> Stamp {
        Stamp {
            time: self.volatile.clock.tick(now),
            node: self.id,
        }
    }

    /// The account's mailbox records, folded from the snapshots held here.
    fn mailbox_records(&self) -> BTreeMap<MailboxId, MailboxRecord> {
        fold_snapshots(self.store.mailboxes.records.values().filter_map(|record| {
            let bytes = self.store.blobs.get(&record.blob)?;
            cbor4ii::serde::from_slice::<MailboxRecord>(bytes).ok()
        }))
    }
}

/// Folds snapshots into one record per mailbox. Every snapshot here comes from an honest node,
/// so snapshots of one ID agree on its creation and each merge succeeds.
fn fold_snapshots(snapshots: impl Iterator<Item = MailboxRecord>) -> BTreeMap<MailboxId, MailboxRecord> {
    let mut folded: BTreeMap<MailboxId, MailboxRecord> = BTreeMap::new();
    for snapshot in snapshots {
        let merged = match folded.get(&snapshot.id) {
            Some(current) => mailbox::merge(current, &snapshot).unwrap_or_else(|_| current.clone()),
            None => snapshot,
        };
        folded.insert(merged.id, merged);
    }
    folded
}

/// One message in flight, with the protocols' wire bytes inside.
#[derive(Clone, Debug)]
enum Payload {
    /// A trie-descent message of a session (a side stops answering past `MAX_TRIE_ROUNDS`), with
    /// the sender's states of the records its `Differ` elements name.
    Trie {
        session: u64,
        space: Space,
        round: u32,
        elements: Vec<u8>,
        states: Vec<u8>,
    },
    /// Asker to responder in a sketch session.
    Sketch {
        session: u64,
        space: Space,
        salt: [u8; 16],
        message: Vec<u8>,
    },
    /// Responder to asker; empty bytes for "nothing to say"; `refused` when the responder's
    /// cells changed under the session.
    SketchReply {
        session: u64,
        refused: bool,
        message: Vec<u8>,
    },
    /// "Send me these records."
    Pull {
        space: Space,
        keys: Vec<u128>,
        prefixes: Vec<Prefix>,
    },
    /// Whole records (CBOR), with the blobs of mailbox snapshots.
    Records {
        space: Space,
        records: Vec<Vec<u8>>,
        blobs: Vec<(BlobHash, Vec<u8>)>,
    },
    /// Keyed record states; with `answer`, the receiver sends back the merged states that hold
    /// more than it got.
    States {
        space: Space,
        states: Vec<u8>,
        answer: bool,
    },
}

#[derive(Clone, Debug)]
struct Envelope {
    from: usize,
    to: usize,
    deliver_at: u64,
    payload: Payload,
}

/// What every acknowledged write said should win.
#[derive(Default)]
struct History {
    appended: BTreeMap<MessageId, usize>,
    expunged: BTreeMap<MessageId, Stamp>,
    flags: BTreeMap<(MessageId, Flag), FlagRegister>,
    locations: BTreeMap<MessageId, Location>,
    snapshots: Vec<MailboxRecord>,
}

struct World {
    settings: Settings,
    random: SeededRandom,
    now: u64,
    nodes: Vec<SimulatedNode>,
    in_flight: Vec<Envelope>,
    /// Partition group of each node; nodes in different groups cannot talk, except the bridge.
    groups: Vec<u8>,
    bridge: Option<usize>,
    faults: bool,
    next_session: u64,
    history: History,
    report: ScheduleReport,
    /// With tracing: every event, each with the IDs it touched.
    trace: Option<Vec<(Vec<String>, String)>>,
    /// Pulls sent since the counter was last reset (the quiescence check).
    pulls: u64,
}

/// A clock offset within half the bound (less five minutes) either way, or none (three in ten),
/// so any two nodes are within the bound of each other.
fn draw_skew(random: &mut SeededRandom) -> i64 {
    let half = (CLOCK_BOUND_MILLIS / 2 - 5 * 60 * 1000) as i64;
    if random.per_mille(300) {
        0
    } else {
        random.below(2 * half as u64 + 1) as i64 - half
    }
}

/// Runs one schedule from its seed; with `trace`, the report carries the events behind any
/// problem found. The same seed always gives the same report.
pub fn run(seed: u64, trace: bool) -> ScheduleReport {
    let mut random = SeededRandom::new(seed);
    let settings = Settings::draw(&mut random);
    let nodes = (0..settings.nodes)
        .map(|index| {
            let skew = draw_skew(&mut random);
            let store = Store {
                emails: Container::new(),
                mailboxes: Container::new(),
                blobs: BTreeMap::new(),
                clock: 0,
                last_id: MessageId(0),
            };
            SimulatedNode {
                id: NodeId(index as u64 + 1),
                skew,
                up: true,
                down_until: 0,
                volatile: Volatile::resume(&store),
                store,
            }
        })
        .collect();
    let mut world = World {
        report: ScheduleReport {
            seed,
            nodes: settings.nodes,
            ..ScheduleReport::default()
        },
        groups: vec![0; settings.nodes],
        settings,
        random,
        now: START_MILLIS,
        nodes,
        in_flight: Vec::new(),
        bridge: None,
        faults: true,
        next_session: 0,
        history: History::default(),
        trace: trace.then(Vec::new),
        pulls: 0,
    };
    world.play();
    world.heal_and_converge();
    world.check();
    world.finish_trace();
    world.report
}

impl World {
    fn note(&mut self, ids: &[String], event: impl FnOnce() -> String) {
        if let Some(trace) = &mut self.trace {
            trace.push((ids.to_vec(), format!("t+{}ms {}", self.now - START_MILLIS, event())));
        }
    }

    fn node_now(&self, node: usize) -> u64 {
        (self.now as i64 + self.nodes[node].skew) as u64
    }

    fn reachable(&self, from: usize, to: usize) -> bool {
        self.groups[from] == self.groups[to] || self.bridge == Some(from) || self.bridge == Some(to)
    }

    /// Sends an asker's sketch-session message in its wire bytes.
    fn send_sketch(&mut self, from: usize, to: usize, session: u64, space: Space, salt: [u8; 16], message: &Message) {
        let message = sketch_session::encode(message);
        self.send(
            from,
            to,
            Payload::Sketch {
                session,
                space,
                salt,
                message,
            },
        );
    }

    fn send(&mut self, from: usize, to: usize, payload: Payload) {
        self.report.messages += 1;
        if matches!(payload, Payload::Pull { .. }) {
            self.pulls += 1;
        }
        if !self.reachable(from, to) || !self.nodes[to].up {
            self.report.dropped += 1;
            return;
        }
        if self.faults && self.random.per_mille(self.settings.drop_per_mille) {
            self.report.dropped += 1;
            return;
        }
        let copies = if self.faults && self.random.per_mille(self.settings.duplicate_per_mille) {
            self.report.duplicated += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = 1 + self.random.below(self.settings.max_delay_millis);
            self.in_flight.push(Envelope {
                from,
                to,
                deliver_at: self.now + delay,
                payload: payload.clone(),
            });
        }
    }

    /// Delivers every message due by now, in a random order among themselves.
    fn deliver_due(&mut self) {
        let mut due = Vec::new();
        let mut index = 0;
        while index < self.in_flight.len() {
            if self.in_flight[index].deliver_at <= self.now {
                due.push(self.in_flight.swap_remove(index));
            } else {
                index += 1;
            }
        }
        // Reorder: a shuffle by the seeded source (Fisher-Yates).
        for index in (1..due.len()).rev() {
            let other = self.random.below(index as u64 + 1) as usize;
            due.swap(index, other);
        }
        for envelope in due {
            if !self.reachable(envelope.from, envelope.to) || !self.nodes[envelope.to].up {
                self.report.dropped += 1;
                continue;
            }
            self.handle(envelope.from, envelope.to, envelope.payload);
        }
    }

    // -----------------------------------------------------------------------------------------
    // The schedule
    // -----------------------------------------------------------------------------------------

    fn play(&mut self) {
        for _ in 0..self.settings.steps {
            self.now += 1 + self.random.below(25);
            self.wake_nodes();
            self.deliver_due();
            self.expire_sessions();
            let roll = self.random.below(1000);
            let node = self.random.below(self.settings.nodes as u64) as usize;
            if !self.nodes[node].up {
                continue;
            }
            match roll {
                0..=399 => self.client_write(node),
                400..=599 => {
                    let peer = self.random_peer(node);
                    self.start_sessions(node, peer);
                }
                600..=619 => self.partition(),
                620..=634 => self.heal_partition(),
                635..=649 => self.crash(node),
                650..=659 => self.forge(node),
                _ => {}
            }
        }
    }

    fn random_peer(&mut self, node: usize) -> usize {
        let offset = 1 + self.random.below(self.settings.nodes as u64 - 1) as usize;
        (node + offset) % self.settings.nodes
    }

    fn wake_nodes(&mut self) {
        for index in 0..self.nodes.len() {
            if !self.nodes[index].up && self.nodes[index].down_until <= self.now {
                let node = &mut self.nodes[index];
                node.up = true;
                node.volatile = Volatile::resume(&node.store);
                self.note(&[], || format!("node {} restarts", index + 1));
            }
        }
    }

    fn expire_sessions(&mut self) {
        let timeout = self.settings.session.timeout_millis;
        for index in 0..self.nodes.len() {
            let now = self.node_now(index);
            let node = &mut self.nodes[index];
            let before = node.volatile.askers.len();
            // An asker whose reply never came (dropped) gives up at its deadline.
            node.volatile
                .askers
                .retain(|_, running| now.saturating_sub(running.opened_at) <= timeout);
            self.report.sketch_abandoned += (before - node.volatile.askers.len()) as u64;
        }
    }

    fn crash(&mut self, node: usize) {
        let down = self.random.below(3_000);
        // Half the restarts come back with another clock offset (as an operator's
        // `MAILMESH_CLOCK_OFFSET_MS` or an NTP step would), backwards too.
        if self.random.below(2) == 0 {
            self.nodes[node].skew = self.draw_skew();
        }
        self.report.restarts += 1;
        let target = &mut self.nodes[node];
        target.up = false;
        target.down_until = self.now + down;
        target.volatile.askers.clear();
        self.note(&[], || format!("node {} crashes for {down} ms", node + 1));
    }

    /// A clock offset within half the bound either way, so any two nodes are within the bound.
    fn draw_skew(&mut self) -> i64 {
        draw_skew(&mut self.random)
    }

    fn partition(&mut self) {
        let count = self.settings.nodes;
        self.report.partitions += 1;
        self.bridge = None;
        let kind = self.random.below(3);
        match kind {
            0 => {
                let alone = self.random.below(count as u64) as usize;
                self.groups = (0..count).map(|index| u8::from(index == alone)).collect();
            }
            _ => {
                // Halves of a random order; a bridge-shaped split keeps one node in both.
                let mut order: Vec<usize> = (0..count).collect();
                for index in (1..count).rev() {
                    let other = self.random.below(index as u64 + 1) as usize;
                    order.swap(index, other);
                }
                self.groups = vec![0; count];
                for node in &order[..count / 2] {
                    self.groups[*node] = 1;
                }
                if kind == 2 {
                    self.bridge = Some(order[count - 1]);
                }
            }
        }
        let (groups, bridge) = (self.groups.clone(), self.bridge);
        self.note(&[], || format!("partition groups {groups:?} bridge {bridge:?}"));
    }

    fn heal_partition(&mut self) {
        self.groups = vec![0; self.settings.nodes];
        self.bridge = None;
        self.note(&[], || "partition heals".to_owned());
    }

    /// A hostile peer sends a copy of a record with a flag stamped past the clock bound.
    fn forge(&mut self, from: usize) {
        let to = self.random_peer(from);
        let Some(mut record) = self.nodes[from].store.emails.records.values().next_back().cloned() else {
            return;
        };
        // An hour past the bound over every clock in the cluster: the receiver's clock may move
        // up to the fastest node's before the message arrives, and must still refuse it.
        let local = (0..self.nodes.len())
            .map(|node| {
                let clock = self.nodes[node].volatile.clock.current();
                clock.max(crdt::physical_time(
                    self.node_now(node) + self.settings.max_delay_millis,
                ))
            })
            .max()
            .unwrap_or(0);
        let stamp = Stamp {
            time: local + ((CLOCK_BOUND_MILLIS + 60 * 60 * 1000) << crdt::COUNTER_BITS),
            node: self.nodes[from].id,
        };
        crdt::apply_flag(&mut record, Flag::Keyword(FORGED_KEYWORD.into()), true, stamp);
        self.report.forged_sent += 1;
        let id = record.id.to_string();
        self.note(&[id], || {
            format!(
                "node {} forges a stamp an hour past the bound to node {}",
                from + 1,
                to + 1
            )
        });
        let bytes = cbor4ii::serde::to_vec(Vec::new(), &record).unwrap_or_default();
        self.send(
            from,
            to,
            Payload::Records {
                space: Space::Emails,
                records: vec![bytes],
                blobs: Vec::new(),
            },
        );
    }

    // -----------------------------------------------------------------------------------------
    // Client writes, as the mail service makes them
    // -----------------------------------------------------------------------------------------

    fn client_write(&mut self, node: usize) {
        match self.random.below(100) {
            0..=34 => self.append(node),
            35..=59 => self.set_flag(node),
            60..=69 => self.move_email(node),
            70..=79 => self.expunge(node),
            80..=89 => self.create_mailbox(node),
            90..=95 => self.rename_mailbox(node),
            _ => self.delete_mailbox(node),
        }
    }

    /// The visible mailboxes and their tree, as the service resolves them on `node`.
    fn tree_of(&self, node: usize) -> (mailbox::MailboxTree, BTreeMap<MailboxId, MailboxRecord>) {
        let records = self.nodes[node].mailbox_records();
        (mailbox::resolve(ACCOUNT, records.values()), records)
    }

    /// Live emails on `node` that the service would show (their mailbox resolves).
    fn shown_emails(&self, node: usize) -> Vec<MessageId> {
        let (tree, _) = self.tree_of(node);
        self.nodes[node]
            .store
            .emails
            .records
            .values()
            .filter(|record| record.is_live() && tree.place(record.location.mailbox).is_some())
            .map(|record| record.id)
            .collect()
    }

    fn random_mailbox(&mut self, node: usize) -> MailboxId {
        let (tree, _) = self.tree_of(node);
        let visible: Vec<MailboxId> = tree.mailboxes().keys().copied().collect();
        self.random.pick(&visible).unwrap_or(tree.inbox())
    }

    fn append(&mut self, node: usize) {
        let target = self.random_mailbox(node);
        let now = self.node_now(node);
        let random = self.random.next_u128();
        let simulated = &mut self.nodes[node];
        let id = simulated.volatile.ids.next(now, random);
        let raw = format!("Subject: {id}\r\n\r\nfrom node {}\r\n", node + 1);
        let mut record = MessageRecord::new(id, BlobHash::of(raw.as_bytes()), raw.len() as u64, now, simulated.id);
        record.created = simulated.volatile.clock.tick(now);
        record.place_in(target);
        simulated.store.last_id = id;
        simulated.write(Space::Emails, record.clone());
        self.history.appended.insert(id, node);
        self.history.locations.insert(id, record.location);
        self.report.acknowledged += 1;
        self.report.operations += 1;
        let ids = [id.to_string()];
        self.note(&ids, || {
            format!("node {} appends {id} into {:x}", node + 1, target.0 >> 96)
        });
    }

    fn set_flag(&mut self, node: usize) {
        let Some(id) = self.random.pick(&self.shown_emails(node)) else {
            return;
        };
        let flag = match self.random.below(4) {
            0 => Flag::Seen,
            1 => Flag::Flagged,
            2 => Flag::Deleted,
            _ => Flag::Keyword("$Important".into()),
        };
        let set = self.random.below(2) == 0;
        let now = self.node_now(node);
        let simulated = &mut self.nodes[node];
        let stamp = simulated.stamp(now);
        let mut record = simulated.store.emails.records[&id].clone();
        crdt::apply_flag(&mut record, flag.clone(), set, stamp);
        simulated.write(Space::Emails, record);
        let proposed = FlagRegister { set, stamp };
        let entry = self.history.flags.entry((id, flag.clone())).or_insert(proposed);
        *entry = crdt::join_register(*entry, proposed);
        self.report.flag_changes += 1;
        self.report.operations += 1;
        let ids = [id.to_string()];
        self.note(&ids, || {
            format!("node {} sets {flag}={set} on {id} at {stamp:?}", node + 1)
        });
    }

    fn move_email(&mut self, node: usize) {
        let Some(id) = self.random.pick(&self.shown_emails(node)) else {
            return;
        };
        let target = self.random_mailbox(node);
        let now = self.node_now(node);
        let simulated = &mut self.nodes[node];
        let mut record = simulated.store.emails.records[&id].clone();
        if record.location.mailbox == target {
            return;
        }
        record.location = Location {
            mailbox: target,
            stamp: simulated.stamp(now),
        };
        let location = record.location;
        simulated.write(Space::Emails, record);
        let entry = self.history.locations.entry(id).or_insert(location);
        *entry = mailbox::join_location(*entry, location);
        self.report.moves += 1;
        self.report.operations += 1;
        let ids = [id.to_string()];
        self.note(&ids, || {
            format!(
                "node {} moves {id} to {:x} at {:?}",
                node + 1,
                target.0 >> 96,
                location.stamp
            )
        });
    }

    fn expunge_one(&mut self, node: usize, id: MessageId) {
        let now = self.node_now(node);
        let simulated = &mut self.nodes[node];
        let mut record = simulated.store.emails.records[&id].clone();
        if !record.is_live() {
            return;
        }
        let stamp = simulated.stamp(now);
        record.expunged = Some(stamp);
        simulated.write(Space::Emails, record);
        let entry = self.history.expunged.entry(id).or_insert(stamp);
        *entry = (*entry).max(stamp);
        self.report.expunges += 1;
        self.report.operations += 1;
        let ids = [id.to_string()];
        self.note(&ids, || format!("node {} expunges {id} at {stamp:?}", node + 1));
    }

    fn expunge(&mut self, node: usize) {
        if let Some(id) = self.random.pick(&self.shown_emails(node)) {
            self.expunge_one(node, id);
        }
    }

    /// Writes one snapshot of a mailbox record into the mailboxes container.
    fn write_snapshot(&mut self, node: usize, snapshot: &MailboxRecord) {
        let now = self.node_now(node);
        let random = self.random.next_u128();
        let bytes = cbor4ii::serde::to_vec(Vec::new(), snapshot).unwrap_or_default();
        let blob = BlobHash::of(&bytes);
        let simulated = &mut self.nodes[node];
        let id = simulated.volatile.ids.next(now, random);
        let mut record = MessageRecord::new(id, blob, bytes.len() as u64, now, simulated.id);
        record.created = simulated.volatile.clock.tick(now);
        record.place_in(Space::Mailboxes.container_id());
        simulated.store.last_id = id;
        simulated.store.blobs.insert(blob, bytes);
        simulated.write(Space::Mailboxes, record);
        self.history.snapshots.push(snapshot.clone());
        self.report.mailbox_writes += 1;
        self.report.operations += 1;
        let ids = [format!("{:x}", snapshot.id.0 >> 96)];
        self.note(&ids, || format!("node {} writes mailbox {snapshot:?}", node + 1));
    }

    fn create_mailbox(&mut self, node: usize) {
        let (tree, _) = self.tree_of(node);
        let parent = if self.random.below(3) == 0 {
            Some(self.random_mailbox(node))
        } else {
            None
        };
        let name = NAMES[self.random.below(NAMES.len() as u64) as usize];
        if tree.children(parent).iter().any(|child| child.name == name) {
            return; // MailboxExists
        }
        let now = self.node_now(node);
        let id = MailboxId::from_parts(now, self.random.next_u128());
        let stamp = self.nodes[node].stamp(now);
        let record = MailboxRecord::new(id, parent, name, None, stamp);
        self.write_snapshot(node, &record);
    }

    /// Writes a change to every record the visible mailbox is made of (its aliases too).
    fn write_members(&mut self, node: usize, id: MailboxId, change: impl Fn(&mut MailboxRecord, Stamp)) {
        let (tree, records) = self.tree_of(node);
        let now = self.node_now(node);
        let stamp = self.nodes[node].stamp(now);
        for member in tree.members(id) {
            let Some(mut record) = records.get(&member).cloned() else {
                continue;
            };
            change(&mut record, stamp);
            self.write_snapshot(node, &record);
        }
    }

    /// A random visible mailbox other than the INBOX that `wanted` accepts.
    fn pick_mailbox(&mut self, tree: &mailbox::MailboxTree, wanted: impl Fn(MailboxId) -> bool) -> Option<MailboxId> {
        let candidates: Vec<MailboxId> = tree
            .mailboxes()
            .keys()
            .copied()
            .filter(|id| *id != tree.inbox() && wanted(*id))
            .collect();
        self.random.pick(&candidates)
    }

    fn rename_mailbox(&mut self, node: usize) {
        let (tree, _) = self.tree_of(node);
        let Some(id) = self.pick_mailbox(&tree, |_| true) else {
            return;
        };
        let current = tree.mailboxes()[&id].path.clone();
        let inside = format!("{current}{}", mailbox::SEPARATOR);
        let parents: Vec<Option<MailboxId>> = std::iter::once(None)
            .chain(
                tree.mailboxes()
                    .values()
                    .filter(|mailbox| mailbox.id != id && !mailbox.path.starts_with(&inside))
                    .map(|mailbox| Some(mailbox.id)),
            )
            .collect();
        let parent = parents[self.random.below(parents.len() as u64) as usize];
        let name = NAMES[self.random.below(NAMES.len() as u64) as usize].to_owned();
        if tree.children(parent).iter().any(|child| child.name == name) {
            return; // MailboxExists (or the same path)
        }
        self.write_members(node, id, |record, stamp| {
            record.placement.propose(
                Position {
                    parent,
                    name: name.clone(),
                },
                stamp,
            );
        });
    }

    fn delete_mailbox(&mut self, node: usize) {
        let (tree, _) = self.tree_of(node);
        let Some(id) = self.pick_mailbox(&tree, |id| tree.children(Some(id)).is_empty()) else {
            return;
        };
        // Destroy every email the mailbox's records hold here, then write the tombstone.
        for member in tree.members(id) {
            let held: Vec<MessageId> = self.nodes[node]
                .store
                .emails
                .records
                .values()
                .filter(|record| record.is_live() && record.location.mailbox == member)
                .map(|record| record.id)
                .collect();
            for email in held {
                self.expunge_one(node, email);
            }
        }
        self.write_members(node, id, |record, stamp| {
            record.deleted = Some(record.deleted.map_or(stamp, |deleted| deleted.max(stamp)));
        });
    }

    // -----------------------------------------------------------------------------------------
    // Sessions
    // -----------------------------------------------------------------------------------------

    /// Starts one session per container from `node` to `peer`: a sketch session for a container
    /// at or above the sketch threshold, trie descent below it.
    fn start_sessions(&mut self, node: usize, peer: usize) {
        for space in Space::BOTH {
            let count = self.nodes[node].container(space).root().count;
            self.next_session += 1;
            let session = self.next_session;
            if count >= self.settings.sketch_minimum {
                self.open_sketch(node, peer, space, session);
            } else {
                self.report.trie_sessions += 1;
                let limits = self.settings.session.sync;
                let Ok(elements) = sync::initial(&self.nodes[node].container(space).tree, &limits) else {
                    continue;
                };
                self.send(
                    node,
                    peer,
                    Payload::Trie {
                        session,
                        space,
                        round: 0,
                        elements: sync::encode(&elements),
                        states: Vec::new(),
                    },
                );
            }
        }
    }

    fn session_key(salt: &[u8; 16], space: Space) -> SketchKey {
        SketchKey::derive(salt, &space.container_id().0.to_be_bytes())
    }

    fn cells_of(container: &Container, key: SketchKey) -> SketchCells {
        SketchCells::from_leaves(
            key,
            SketchCells::length_for(container.root().count),
            container.tree.iter(),
        )
    }

    fn open_sketch(&mut self, node: usize, peer: usize, space: Space, session: u64) {
        self.report.sketch_sessions += 1;
        let salt = self.random.next_u128().to_be_bytes();
        let key = Self::session_key(&salt, space);
        let limits = self.settings.session;
        let now = self.node_now(node);
        let container = self.nodes[node].container(space);
        // As the node does: empty cells until the responder sends some, unless the opening
        // carries cells of its own.
        let (cells, built) = if limits.opening_cells > 0 {
            (Self::cells_of(container, key), Some(container.root().summary()))
        } else {
            (
                SketchCells::new(key, SketchCells::length_for(container.root().count)),
                None,
            )
        };
        let Ok((asker, message)) = Asker::open(&container.tree, &cells, &limits, now) else {
            self.report.protocol_errors += 1;
            return;
        };
        self.nodes[node].volatile.askers.insert(
            session,
            AskerSession {
                peer,
                space,
                salt,
                asker,
                cells,
                built,
                rounds: 1,
                opened_at: now,
            },
        );
        self.send_sketch(node, peer, session, space, salt, &message);
    }

    fn handle(&mut self, from: usize, to: usize, payload: Payload) {
        match payload {
            Payload::Trie {
                session,
                space,
                round,
                elements,
                states,
            } => self.on_trie(from, to, session, space, round, &elements, &states),
            Payload::Sketch {
                session,
                space,
                salt,
                message,
            } => self.on_sketch(from, to, session, space, &salt, &message),
            Payload::SketchReply {
                session,
                refused,
                message,
            } => self.on_sketch_reply(from, to, session, refused, &message),
            Payload::Pull { space, keys, prefixes } => self.on_pull(from, to, space, &keys, &prefixes),
            Payload::Records { space, records, blobs } => self.on_records(to, space, records, blobs),
            Payload::States { space, states, answer } => self.on_states(from, to, space, &states, answer),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_trie(&mut self, from: usize, to: usize, session: u64, space: Space, round: u32, bytes: &[u8], states: &[u8]) {
        let limits = self.settings.session.sync;
        let (Ok(incoming), Ok(their_states)) = (sync::decode(bytes, &limits), sync::decode_states(states, &limits))
        else {
            self.report.protocol_errors += 1;
            return;
        };
        let Ok((reply, mut outcome)) = sync::respond(&self.nodes[to].container(space).tree, &incoming, &limits) else {
            self.report.protocol_errors += 1;
            return;
        };
        // The states that came with the sender's `Differ` elements, in bit order.
        if outcome.told_differing.len() != their_states.len() {
            self.report.protocol_errors += 1;
        }
        let told: Vec<(u128, RecordState)> = outcome
            .told_differing
            .iter()
            .zip(their_states)
            .filter_map(|(key, state)| key.map(|key| (key, state)))
            .collect();
        let merged_keys: BTreeSet<u128> = told.iter().map(|(key, _)| *key).collect();
        self.merge_states(from, to, space, told, true);
        // This side's states of the records its `Differ` names go with the reply; the merged
        // ones come back, so those records need no pulling.
        let differing: BTreeSet<u128> = outcome.differing.iter().copied().collect();
        if !reply.is_empty() && round < MAX_TRIE_ROUNDS {
            let container = self.nodes[to].container(space);
            let mine: Vec<RecordState> = outcome
                .differing
                .iter()
                .filter_map(|key| container.records.get(&MessageId(*key)).map(RecordState::of))
                .collect();
            self.send(
                to,
                from,
                Payload::Trie {
                    session,
                    space,
                    round: round + 1,
                    elements: sync::encode(&reply),
                    states: sync::encode_states(&mine),
                },
            );
        }
        outcome
            .need_keys
            .retain(|key| !merged_keys.contains(key) && !differing.contains(key));
        self.pull(to, from, space, outcome);
    }

    /// Asks `source` for what `outcome` says `node` lacks.
    fn pull(&mut self, node: usize, source: usize, space: Space, mut outcome: sync::Outcome) {
        outcome.normalize();
        if outcome.is_empty() {
            return;
        }
        self.send(
            node,
            source,
            Payload::Pull {
                space,
                keys: outcome.need_keys,
                prefixes: outcome.need_prefixes,
            },
        );
    }

    fn on_sketch(&mut self, from: usize, to: usize, session: u64, space: Space, salt: &[u8; 16], bytes: &[u8]) {
        let limits = self.settings.session;
        let Ok(message) = sketch_session::decode(bytes, &limits) else {
            self.report.protocol_errors += 1;
            return;
        };
        let root = self.nodes[to].container(space).root();
        let is_more = matches!(message, Message::More { .. });
        let is_last = matches!(message, Message::YouLack(_));
        if is_more
            && self.nodes[to]
                .volatile
                .responder_roots
                .get(&(from, session))
                .is_some_and(|built| *built != root)
        {
            // The cells sent before would not continue: the asker must open again.
            self.send(
                to,
                from,
                Payload::SketchReply {
                    session,
                    refused: true,
                    message: Vec::new(),
                },
            );
            return;
        }
        let container = self.nodes[to].container(space);
        let cells = Self::cells_of(container, Self::session_key(salt, space));
        let (reply, outcome) = match sketch_session::respond(&container.tree, &cells, &message, &limits) {
            Ok(answer) => answer,
            Err(_) => {
                self.report.protocol_errors += 1;
                return;
            }
        };
        if matches!(reply, Some(Message::Cells { .. })) {
            self.nodes[to].volatile.responder_roots.insert((from, session), root);
        }
        if !is_last {
            self.send(
                to,
                from,
                Payload::SketchReply {
                    session,
                    refused: false,
                    message: reply.as_ref().map(sketch_session::encode).unwrap_or_default(),
                },
            );
        }
        self.pull(to, from, space, outcome);
    }

    fn on_sketch_reply(&mut self, from: usize, to: usize, session: u64, refused: bool, bytes: &[u8]) {
        let limits = self.settings.session;
        let now = self.node_now(to);
        // A reply to a session this node no longer runs (it restarted, or a duplicate after the
        // end) is ignored.
        let Some(mut running) = self.nodes[to].volatile.askers.remove(&session) else {
            return;
        };
        if running.peer != from {
            self.report.protocol_errors += 1;
            return;
        }
        let space = running.space;
        if refused {
            self.report.sketch_abandoned += 1;
            return;
        }
        let reply = if bytes.is_empty() {
            None
        } else {
            match sketch_session::decode(bytes, &limits) {
                Ok(message) => Some(message),
                Err(_) => {
                    self.report.protocol_errors += 1;
                    return;
                }
            }
        };
        let container = self.nodes[to].container(space);
        let root = container.root().summary();
        if running.built.is_some_and(|built| built != root) {
            self.report.sketch_abandoned += 1; // stale: this side's records changed under its cells
            return;
        }
        if matches!(reply, Some(Message::Cells { .. })) && running.built.is_none() {
            running.cells = Self::cells_of(container, Self::session_key(&running.salt, space));
            running.built = Some(root);
        }
        let by_cells = matches!(reply, Some(Message::Cells { .. } | Message::Settled { .. }));
        let step = match running.asker.on_reply(&container.tree, &running.cells, reply, now) {
            Ok(step) => step,
            Err(_) => {
                self.report.sketch_abandoned += 1;
                return;
            }
        };
        match step {
            Step::Send(message) => {
                if running.rounds >= MAX_SKETCH_ROUNDS {
                    self.report.sketch_abandoned += 1;
                    return;
                }
                running.rounds += 1;
                let salt = running.salt;
                self.nodes[to].volatile.askers.insert(session, running);
                self.send_sketch(to, from, session, space, salt, &message);
            }
            Step::Finished { last } => {
                if by_cells {
                    self.report.sketch_decoded += 1;
                }
                let outcome = running.asker.outcome();
                let they_lack: BTreeSet<u128> = match &last {
                    Some(Message::YouLack(keys)) => keys.iter().copied().collect(),
                    _ => BTreeSet::new(),
                };
                // Records both hold in different states exchange states; the rest travel whole.
                let both: Vec<u128> = outcome
                    .need_keys
                    .iter()
                    .copied()
                    .filter(|key| they_lack.contains(key))
                    .collect();
                let lacking = sync::Outcome {
                    need_keys: outcome
                        .need_keys
                        .iter()
                        .copied()
                        .filter(|key| !they_lack.contains(key))
                        .collect(),
                    need_prefixes: outcome.need_prefixes.clone(),
                    ..sync::Outcome::default()
                };
                self.pull(to, from, space, lacking);
                let container = self.nodes[to].container(space);
                let mine: Vec<(u128, RecordState)> = both
                    .iter()
                    .filter_map(|key| {
                        container
                            .records
                            .get(&MessageId(*key))
                            .map(|record| (*key, RecordState::of(record)))
                    })
                    .collect();
                if !mine.is_empty() {
                    self.send(
                        to,
                        from,
                        Payload::States {
                            space,
                            states: sync::encode_keyed_states(&mine),
                            answer: true,
                        },
                    );
                }
                let only_mine: Vec<u128> = they_lack.iter().copied().filter(|key| !both.contains(key)).collect();
                if !only_mine.is_empty() {
                    self.send_sketch(to, from, session, space, running.salt, &Message::YouLack(only_mine));
                }
            }
        }
    }

    fn on_pull(&mut self, from: usize, to: usize, space: Space, keys: &[u128], prefixes: &[Prefix]) {
        let source = &self.nodes[to];
        let container = source.container(space);
        let mut records: Vec<&MessageRecord> = keys
            .iter()
            .filter_map(|key| container.records.get(&MessageId(*key)))
            .collect();
        for prefix in prefixes {
            let Ok(leaves) = container.tree.leaves(*prefix, usize::MAX);
            records.extend(
                leaves
                    .iter()
                    .filter_map(|(key, _)| container.records.get(&MessageId(*key))),
            );
        }
        if records.is_empty() {
            return;
        }
        let blobs = records
            .iter()
            .filter(|_| space == Space::Mailboxes)
            .filter_map(|record| {
                source
                    .store
                    .blobs
                    .get(&record.blob)
                    .map(|bytes| (record.blob, bytes.clone()))
            })
            .collect();
        let records = records
            .iter()
            .map(|record| cbor4ii::serde::to_vec(Vec::new(), *record).unwrap_or_default())
            .collect();
        self.send(to, from, Payload::Records { space, records, blobs });
    }

    fn on_records(&mut self, to: usize, space: Space, records: Vec<Vec<u8>>, blobs: Vec<(BlobHash, Vec<u8>)>) {
        for (hash, bytes) in blobs {
            if BlobHash::of(&bytes) == hash {
                self.nodes[to].store.blobs.insert(hash, bytes);
            } else {
                self.report.protocol_errors += 1;
            }
        }
        for bytes in records {
            match cbor4ii::serde::from_slice::<MessageRecord>(&bytes) {
                Ok(record) => {
                    if self.merge_record(to, space, record) {
                        self.report.records_merged += 1;
                    }
                }
                Err(_) => self.report.protocol_errors += 1,
            }
        }
    }

    /// Merges a record from a peer as the store's `Merge` does: the clock check first (a stamp
    /// too far ahead refuses the whole record), then the join, then the clock observes.
    fn merge_record(&mut self, node: usize, space: Space, record: MessageRecord) -> bool {
        let now = self.node_now(node);
        let simulated = &mut self.nodes[node];
        let latest = record.latest_stamp();
        if let Some(latest) = latest {
            if simulated.volatile.clock.check(latest.time, now).is_err() {
                self.report.refused_stamps += 1;
                if !record.flags.keys().any(|flag| flag.as_str() == FORGED_KEYWORD) {
                    self.report.refused_honest += 1;
                }
                let ids = [record.id.to_string()];
                self.note(&ids, || {
                    format!("node {} refuses {} stamped {latest:?}", node + 1, record.id)
                });
                return false;
            }
        }
        let merged = match simulated.container(space).records.get(&record.id) {
            Some(existing) => match crdt::merge(existing, &record) {
                Ok(merged) => merged,
                Err(_) => {
                    self.report.protocol_errors += 1;
                    return false;
                }
            },
            None => record.clone(),
        };
        if let Some(latest) = latest {
            let _ = simulated.volatile.clock.observe(latest.time, now);
        }
        let changed = simulated.container(space).records.get(&record.id) != Some(&merged);
        if changed {
            simulated.write(space, merged);
            let ids = [record.id.to_string()];
            self.note(&ids, || format!("node {} merges {}", node + 1, record.id));
        }
        changed
    }

    /// Merges a peer's state of a record held here; returns the merged state when it holds more
    /// than the peer sent (it goes back).
    fn merge_state(&mut self, node: usize, space: Space, key: u128, state: &RecordState) -> Option<RecordState> {
        let mine = self.nodes[node].container(space).records.get(&MessageId(key))?.clone();
        let (_, back) = sync::merge_state(&mine, state);
        if self.merge_record(node, space, state.applied_to(&mine)) {
            self.report.states_merged += 1;
        }
        back
    }

    fn on_states(&mut self, from: usize, to: usize, space: Space, bytes: &[u8], answer: bool) {
        let Ok(states) = sync::decode_keyed_states(bytes, &self.settings.session.sync) else {
            self.report.protocol_errors += 1;
            return;
        };
        self.merge_states(from, to, space, states, answer);
    }

    /// Merges states from `from`; with `answer`, sends back the merged states that hold more.
    fn merge_states(&mut self, from: usize, to: usize, space: Space, states: Vec<(u128, RecordState)>, answer: bool) {
        let mut back = Vec::new();
        for (key, state) in states {
            if let Some(returned) = self.merge_state(to, space, key, &state) {
                back.push((key, returned));
            }
        }
        if answer && !back.is_empty() {
            self.send(
                to,
                from,
                Payload::States {
                    space,
                    states: sync::encode_keyed_states(&back),
                    answer: false,
                },
            );
        }
    }

    // -----------------------------------------------------------------------------------------
    // The heal and the checker
    // -----------------------------------------------------------------------------------------

    /// Delivers until nothing is in flight, moving the clock to each next delivery.
    fn drain(&mut self) -> bool {
        let mut deliveries = 0;
        while let Some(next) = self.in_flight.iter().map(|envelope| envelope.deliver_at).min() {
            self.now = self.now.max(next);
            deliveries += self
                .in_flight
                .iter()
                .filter(|envelope| envelope.deliver_at <= self.now)
                .count() as u64;
            self.deliver_due();
            if deliveries > MAX_DRAIN_DELIVERIES {
                return false;
            }
        }
        true
    }

    fn converged(&self) -> bool {
        let first = &self.nodes[0].store;
        self.nodes.iter().all(|node| {
            node.store.emails.records == first.emails.records && node.store.mailboxes.records == first.mailboxes.records
        })
    }

    /// One round: every node runs a session with one random peer; then the network drains.
    fn round(&mut self) -> bool {
        for node in 0..self.settings.nodes {
            let peer = self.random_peer(node);
            self.start_sessions(node, peer);
        }
        self.drain()
    }

    fn heal_and_converge(&mut self) {
        self.faults = false;
        self.heal_partition();
        for node in &mut self.nodes {
            node.down_until = 0;
        }
        self.wake_nodes();
        if !self.drain() {
            self.report
                .problems
                .push("the network did not drain after the heal".into());
        }
        for round in 1..=MAX_CONVERGE_ROUNDS {
            self.now += 1_000;
            if !self.round() {
                self.report.problems.push(format!("round {round} did not drain"));
                break;
            }
            if self.converged() {
                self.report.converged = true;
                self.report.rounds_to_converge = round;
                break;
            }
        }
        if !self.report.converged {
            self.report.problems.push(format!(
                "the nodes did not converge within {MAX_CONVERGE_ROUNDS} rounds of sessions"
            ));
            return;
        }
        // Quiescence: a further round between equal nodes asks for nothing.
        self.pulls = 0;
        self.now += 1_000;
        self.round();
        self.report.unquiet_pulls = self.pulls;
        if self.pulls > 0 {
            self.report
                .problems
                .push(format!("{} pulls in a round after convergence", self.pulls));
        }
    }

    fn problem(&mut self, text: String) {
        // Keep the report short: the first few problems name the records to trace.
        if self.report.problems.len() < 20 {
            self.report.problems.push(text);
        }
    }

    fn check(&mut self) {
        let node_count = self.nodes.len();
        // Divergence: every node against the first, record by record.
        let mut divergent: BTreeSet<String> = BTreeSet::new();
        for index in 1..node_count {
            for space in Space::BOTH {
                let first = &self.nodes[0].container(space).records;
                let other = &self.nodes[index].container(space).records;
                for id in first.keys().chain(other.keys()) {
                    if first.get(id) != other.get(id) {
                        divergent.insert(id.to_string());
                    }
                }
            }
        }
        let trees: Vec<_> = (0..node_count).map(|node| self.tree_of(node)).collect();
        let tree_divergence = trees
            .iter()
            .filter(|(tree, _)| tree.mailboxes() != trees[0].0.mailboxes())
            .count();
        self.report.divergent = (divergent.len() + tree_divergence) as u64;
        for id in &divergent {
            self.problem(format!("record {id} differs between nodes"));
        }
        if tree_divergence > 0 {
            self.problem(format!("{tree_divergence} nodes resolve another mailbox tree"));
        }
        // The tree every node shows: one mailbox per path, every parent visible, no cycle.
        let (tree, _) = &trees[0];
        let mut paths = BTreeSet::new();
        let mut malformed = Vec::new();
        for shown in tree.mailboxes().values() {
            if !paths.insert(shown.path.clone()) {
                malformed.push(format!("two visible mailboxes at {:?}", shown.path));
            }
            let mut parent = shown.parent;
            let mut depth = 0;
            while let Some(id) = parent {
                depth += 1;
                match tree.get(id) {
                    Some(up) if depth <= tree.mailboxes().len() => parent = up.parent,
                    Some(_) => {
                        malformed.push(format!("{:?} sits in a cycle", shown.path));
                        break;
                    }
                    None => {
                        malformed.push(format!("{:?} has a parent that is not shown", shown.path));
                        break;
                    }
                }
            }
        }
        self.report.divergent += malformed.len() as u64;
        for text in malformed {
            self.problem(text);
        }

        // Every node against the history.
        let history = std::mem::take(&mut self.history);
        let mut lost = BTreeSet::new();
        let mut resurrected = BTreeSet::new();
        let mut wrong = BTreeSet::new();
        let mut orphans = BTreeSet::new();
        let mut forged = 0;
        for (index, node) in self.nodes.iter().enumerate() {
            let records = &node.store.emails.records;
            for id in history.appended.keys() {
                let Some(record) = records.get(id) else {
                    lost.insert((*id, format!("acknowledged append {id} missing on node {}", index + 1)));
                    continue;
                };
                let expected_expunge = history.expunged.get(id).copied();
                match (record.expunged, expected_expunge) {
                    (None, Some(_)) => {
                        resurrected.insert((*id, format!("expunged {id} live on node {}", index + 1)));
                    }
                    (Some(_), None) => {
                        lost.insert((
                            *id,
                            format!("{id} expunged on node {} with no expunge written", index + 1),
                        ));
                    }
                    (found, wanted) if found != wanted => {
                        wrong.insert((*id, format!("{id} tombstone {found:?}, the history says {wanted:?}")));
                    }
                    _ => {}
                }
                let expected_flags: BTreeMap<Flag, FlagRegister> = history
                    .flags
                    .range((*id, Flag::Seen)..)
                    .take_while(|((flag_id, _), _)| flag_id == id)
                    .map(|((_, flag), register)| (flag.clone(), *register))
                    .collect();
                if record.flags.keys().any(|flag| flag.as_str() == FORGED_KEYWORD) {
                    forged += 1;
                }
                if record.flags != expected_flags {
                    wrong.insert((
                        *id,
                        format!("{id} flags {:?}, the history says {expected_flags:?}", record.flags),
                    ));
                }
                if history.locations.get(id) != Some(&record.location) {
                    wrong.insert((
                        *id,
                        format!(
                            "{id} location {:?}, the history says {:?}",
                            record.location,
                            history.locations.get(id)
                        ),
                    ));
                }
                if record.is_live() && trees[index].0.place(record.location.mailbox).is_none() {
                    orphans.insert((
                        *id,
                        format!("{id} on node {} is in no mailbox that resolves", index + 1),
                    ));
                }
            }
            for id in records.keys() {
                if !history.appended.contains_key(id) {
                    wrong.insert((*id, format!("node {} holds {id}, which no client appended", index + 1)));
                }
            }
            // Mailbox records: the fold of every snapshot written anywhere.
            let expected = fold_snapshots(history.snapshots.iter().cloned());
            if trees[index].1 != expected {
                wrong.insert((
                    MessageId(0),
                    format!("node {} folds other mailbox records than the history", index + 1),
                ));
            }
        }
        self.report.lost = lost.iter().map(|(id, _)| *id).collect::<BTreeSet<_>>().len() as u64;
        self.report.resurrected = resurrected.iter().map(|(id, _)| *id).collect::<BTreeSet<_>>().len() as u64;
        self.report.wrong_winners = wrong.iter().map(|(id, _)| *id).collect::<BTreeSet<_>>().len() as u64;
        self.report.orphans = orphans.iter().map(|(id, _)| *id).collect::<BTreeSet<_>>().len() as u64;
        self.report.forged_accepted = forged;
        if self.report.protocol_errors > 0 {
            let errors = self.report.protocol_errors;
            self.problem(format!("{errors} messages between honest nodes broke the protocol"));
        }
        if forged > 0 {
            self.problem(format!("{forged} records hold a stamp past the clock bound"));
        }
        for (_, text) in lost.into_iter().chain(resurrected).chain(wrong).chain(orphans) {
            self.problem(text);
        }
        self.history = history;
    }

    /// Keeps the trace lines that matter for the problems found: faults, and events of the
    /// records the problems name.
    fn finish_trace(&mut self) {
        let Some(trace) = self.trace.take() else {
            return;
        };
        if self.report.problems.is_empty() {
            return;
        }
        let named: Vec<&str> = self
            .report
            .problems
            .iter()
            .flat_map(|problem| problem.split(|c: char| !c.is_ascii_alphanumeric()))
            .filter(|word| word.len() == 26 || word.len() == 8)
            .collect();
        self.report.trace = trace
            .into_iter()
            .filter(|(ids, _)| ids.is_empty() || ids.iter().any(|id| named.contains(&id.as_str())))
            .map(|(_, line)| line)
            .collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schedule_replays_exactly_from_its_seed() {
        let first = run(7, false);
        let second = run(7, true);
        assert_eq!(first.operations, second.operations);
        assert_eq!(first.messages, second.messages);
        assert_eq!(first.dropped, second.dropped);
        assert_eq!(first.rounds_to_converge, second.rounds_to_converge);
        assert_eq!(first.problems, second.problems);
    }

    #[test]
    fn twenty_seeded_schedules_lose_nothing_and_converge() {
        for index in 0..20 {
            let report = run(schedule_seed(1, index), true);
            assert!(
                !report.failed(),
                "schedule seed {} failed: {:#?}\ntrace:\n{}",
                report.seed,
                report.problems,
                report.trace.join("\n")
            );
            assert!(report.converged && report.acknowledged > 0);
        }
    }
}
