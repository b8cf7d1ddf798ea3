//! Sketch sessions in the node: a large mailbox is reconciled with rateless sketch cells when its
//! differences are scattered, and by trie descent when they sit together.
//!
//! The pure protocol is [`crate::sketch_session`]; this module runs it over the wire
//! ([`Request::Sketch`], [`Request::SketchSettle`]) against the store. Trie descent costs a few
//! hundred bytes per difference once differences are spread over a mailbox (flags set all over
//! it, expunges, deliveries to a site that was cut off), because every level of the trie then
//! differs; sketch cells cost about 35 bytes per difference wherever it is. The asker opens with
//! one cell and the trie node where its IDs branch; the responder, from its own trie, answers
//! either with cells (scattered) or with its trie reply (clustered, or too large for cells), so
//! the choice costs nothing in the clustered case.
//!
//! - **Elements** are (message ID, keyed tag of the record's state hash), so flag and tombstone
//!   differences are found like missing messages: a record both hold in different states is two
//!   elements, one on each side. After decoding, those records exchange states only (as trie
//!   descent's `Differ` does), records one side lacks entirely travel whole with their small
//!   blobs.
//! - **Keys**: the asker draws a 16-byte salt per session; both sides hash under the key derived
//!   from it and the mailbox ID, so no one who can choose records can aim them at cells.
//! - **Cells are built per session** from the store's leaves (O(n) reads, in bounded pages): the
//!   store does not maintain them yet. So only mailboxes between [`SKETCH_MINIMUM_RECORDS`] and
//!   [`SKETCH_MAXIMUM_RECORDS`] use sketches.
//! - **Bounds**: the responder keeps no session state, only a cache of the cells it built
//!   (at most [`CACHE_ENTRIES`], [`CACHE_ENTRIES_PER_PEER`] per peer, dropped after
//!   [`CACHE_SECONDS`]), so a `More` does not rebuild them. A peer may make it build at most
//!   [`BUILDS_PER_PEER`] cell sets per [`CACHE_SECONDS`] (a fresh salt per message would
//!   otherwise cost an O(n) read each): past that budget its openings are answered by trie
//!   descent and its requests for more cells are refused. An asker runs at most
//!   [`SKETCH_SESSIONS_AT_ONCE`] sketch sessions; its decoder is bounded by [`SessionLimits`],
//!   its session by a deadline and [`MAX_SKETCH_ROUNDS`]; every decoded element is checked
//!   against the store before it is believed, and every count on the wire is checked against
//!   what it was sent for. A peer that refuses sketch messages (another release) gets trie
//!   descent.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::PeerId;

use super::{
    accept_delivered, packed_indexed_states, packed_keyed_states, peer_fault, FirstReply, Node, NodeError, Reconciled,
    SessionStats,
};
use crate::crdt;
use crate::merkle::{Prefix, Summary, TreeView};
use crate::model::{MailboxId, MailboxKey, MessageId, MessageRecord};
use crate::sketch::{SketchCells, SketchKey};
use crate::sketch_session::{self, Asker, Message, SessionLimits, Step};
use crate::store::{lock, Space, Store, StoreError};
use crate::sync::{self, ByteString, Outcome, RecordState};
use crate::wire::{Request, Response, WireSpace};

/// Mailboxes with fewer records go by trie descent alone: their trie walk is short, and a first
/// message batched with other mailboxes is cheaper than a sketch opening of their own.
pub(super) const SKETCH_MINIMUM_RECORDS: u64 = 4_096;
/// Mailboxes with more records go by trie descent alone: building their cells per session would
/// read more than a million records (cells the store maintains would lift this).
pub(super) const SKETCH_MAXIMUM_RECORDS: u64 = 1 << 20;
/// Cell sets a responder keeps between the messages of sessions (about 1.3 MB each at most).
pub(super) const CACHE_ENTRIES: usize = 8;
/// Cell sets a responder keeps for one peer: a session reconciles several mailboxes at once.
pub(super) const CACHE_ENTRIES_PER_PEER: usize = 4;
/// Sketch sessions this node runs as the asker at once (each holds its cells and a decoder).
pub(super) const SKETCH_SESSIONS_AT_ONCE: usize = 4;
/// Cell sets one peer may make a responder build per [`CACHE_SECONDS`]: a session reconciles at
/// most a few mailboxes at once and reuses its cells, so honest peers stay far below it.
pub(super) const BUILDS_PER_PEER: usize = 8;
/// How long a responder keeps a cell set it built.
pub(super) const CACHE_SECONDS: u64 = 60;
/// The most sketch messages one session sends before it gives up on sketches.
pub(super) const MAX_SKETCH_ROUNDS: usize = 32;
/// The most entries (IDs and states) one settlement request carries.
const SETTLE_ENTRIES_PER_REQUEST: usize = 1_000;

/// Cells a responder built for a peer's session, kept for the session's next messages.
pub(super) struct CachedCells {
    peer: PeerId,
    mailbox: MailboxId,
    salt: [u8; 16],
    /// The mailbox root when the cells were built: a write since makes them stale.
    root: Summary,
    built: Instant,
    cells: Arc<SketchCells>,
}

/// The responder's cache of built cell sets.
#[derive(Default)]
pub(super) struct SketchCache {
    entries: Vec<CachedCells>,
    budget: BuildBudget,
}

/// When each peer last made this responder build cells: at most [`BUILDS_PER_PEER`] builds in
/// any window of [`CACHE_SECONDS`].
#[derive(Default)]
pub(super) struct BuildBudget {
    builds: Vec<(PeerId, Instant)>,
}

impl BuildBudget {
    /// Whether `peer` may have one more cell set built at `now`; counts it if so.
    fn take(&mut self, peer: PeerId, now: Instant) -> bool {
        let window = Duration::from_secs(CACHE_SECONDS);
        self.builds
            .retain(|(_, at)| now.checked_duration_since(*at).is_some_and(|age| age < window));
        if self.builds.iter().filter(|(builder, _)| *builder == peer).count() >= BUILDS_PER_PEER {
            return false;
        }
        self.builds.push((peer, now));
        true
    }
}

/// What a responder has for a peer's sketch message.
enum ResponderCells {
    Ready(Arc<SketchCells>),
    /// Cells of this session were sent before the mailbox changed: the cells that follow would
    /// not continue them.
    Stale,
    /// The peer used up its build budget.
    OverBudget,
}

/// The key both sides of a session hash under.
fn session_key(salt: &[u8; 16], mailbox: MailboxId) -> SketchKey {
    SketchKey::derive(salt, &mailbox.0.to_be_bytes())
}

/// Builds a mailbox's cells from its records, read once in ID order (the trie's leaf hashes
/// are their state hashes): O(n) reads and O(n log length) cell updates, no list held.
fn build_cells(store: &Store, mailbox: MailboxId, key: SketchKey) -> Result<SketchCells, StoreError> {
    let count = store.tree(Space::Mailbox(mailbox)).aggregate(Prefix::ROOT)?.count;
    let mut cells = SketchCells::new(key, SketchCells::length_for(count));
    store.records_ordered(mailbox, false, |record| {
        cells.insert(record.id.0, &crdt::state_hash(&record));
        true
    })?;
    Ok(cells)
}

/// Sorts a session error: the store's and the deadline's are this side's, the rest the peer's.
fn session_error(peer: PeerId, error: sketch_session::SessionError) -> NodeError {
    match error {
        sketch_session::SessionError::Store(_) | sketch_session::SessionError::TimedOut => {
            NodeError::Io(std::io::Error::other(format!("sketch session: {error}")))
        }
        error => NodeError::Peer {
            peer,
            reason: format!("sketch session: {error}"),
        },
    }
}

/// Whether a mailbox of `count` records is reconciled by a sketch session.
pub(super) fn uses_sketches(count: u64) -> bool {
    (SKETCH_MINIMUM_RECORDS..=SKETCH_MAXIMUM_RECORDS).contains(&count)
}

/// How one sketch session ended.
enum Attempt {
    Done(Reconciled),
    /// Cells changed while they streamed: the session must open again.
    Stale,
}

/// How a decoded difference splits by record.
#[derive(Debug, Default, PartialEq, Eq)]
struct Split {
    /// Records only the other side holds: they come whole.
    lacking: Vec<u128>,
    /// Records both hold in different states: states cross.
    both: Vec<u128>,
    /// Records only this side holds: the other side pulls them.
    they_lack: Vec<u128>,
}

/// Splits the IDs of the elements recovered on the other side (`theirs`) and on this side
/// (`mine`): an ID on both is a record held in two states.
fn split(theirs: &[u128], mine: &[u128]) -> Split {
    let theirs_set: HashSet<u128> = theirs.iter().copied().collect();
    let mine_set: HashSet<u128> = mine.iter().copied().collect();
    let mut split = Split {
        lacking: theirs.iter().copied().filter(|id| !mine_set.contains(id)).collect(),
        both: theirs.iter().copied().filter(|id| mine_set.contains(id)).collect(),
        they_lack: mine.iter().copied().filter(|id| !theirs_set.contains(id)).collect(),
    };
    split.lacking.sort_unstable();
    split.lacking.dedup();
    split.both.sort_unstable();
    split.both.dedup();
    split.they_lack.sort_unstable();
    split.they_lack.dedup();
    split
}

impl Node {
    /// The limits of this node's sketch sessions (its trie limits inside).
    fn session_limits(&self) -> SessionLimits {
        SessionLimits {
            sync: self.inner.limits,
            // No cell in the opening: cell 0 would settle a single difference in one round trip,
            // but it costs both sides a pass over every record even when the trie is the way on
            // (clustered differences, the usual heal); the trie finds one difference in a few
            // hundred bytes anyway. Cells are built only once the responder chose them.
            opening_cells: 0,
            ..SessionLimits::default()
        }
    }

    /// Whether this side opens a mailbox's reconciliation with a sketch session.
    pub(super) fn opens_with_sketch(&self, key: &MailboxKey) -> Result<bool, NodeError> {
        let count = self
            .inner
            .store
            .tree(Space::Mailbox(key.id()))
            .aggregate(Prefix::ROOT)?
            .count;
        Ok(uses_sketches(count))
    }

    /// Reconciles a claimed mailbox by a sketch session, going over to trie descent where the
    /// responder or the decoder says so. Returns what the session found, for `finish_mailbox`.
    /// A session whose cells went stale (either side's mailbox changed while cells streamed, as
    /// when both sides run a session at once and the other one settles first) opens once more
    /// with a new salt: the new opening usually finds the replicas equal.
    pub(super) async fn reconcile_by_sketch<V: TreeView>(
        &self,
        peer: PeerId,
        key: &MailboxKey,
        view: &V,
        stats: &SessionStats,
    ) -> Result<Reconciled, NodeError>
    where
        NodeError: From<V::Error>,
    {
        let _slot = self.inner.sketch_slots.acquire().await;
        for _attempt in 0..2 {
            match self.sketch_attempt(peer, key, view, stats).await? {
                Attempt::Done(done) => return Ok(done),
                Attempt::Stale => {
                    tracing::debug!(%peer, mailbox = key.mailbox(), "sketch cells went stale: opening again")
                }
            }
        }
        self.reconcile(peer, WireSpace::Mailbox(key.clone()), view, stats).await
    }

    fn count_sketch(&self, outcome: &'static str) {
        self.inner
            .metrics
            .sketch_sessions
            .get_or_create(&crate::metrics::OutcomeLabel { outcome })
            .inc();
    }

    /// One sketch session, from its opening.
    async fn sketch_attempt<V: TreeView>(
        &self,
        peer: PeerId,
        key: &MailboxKey,
        view: &V,
        stats: &SessionStats,
    ) -> Result<Attempt, NodeError>
    where
        NodeError: From<V::Error>,
    {
        let limits = self.session_limits();
        let salt = self.inner.environment.random().to_be_bytes();
        let sketch_key = session_key(&salt, key.id());
        let count = view.aggregate(Prefix::ROOT)?.count;
        // Empty cells of the right length until the responder sends cells: the opening carries
        // none (see `session_limits`).
        let mut cells = SketchCells::new(sketch_key, SketchCells::length_for(count));
        // This side's mailbox root when its cells were built.
        let mut built: Option<Summary> = None;
        let (mut asker, mut outgoing) = Asker::open(view, &cells, &limits, self.inner.environment.now_millis())
            .map_err(|error| session_error(peer, error))?;
        let space = WireSpace::Mailbox(key.clone());
        for _round in 0..MAX_SKETCH_ROUNDS {
            self.inner.metrics.session_rounds.inc();
            SessionStats::add(&stats.rounds, 1);
            let request = Request::Sketch {
                mailbox: key.clone(),
                salt: ByteString(salt.to_vec()),
                message: ByteString(sketch_session::encode(&outgoing)),
            };
            let answer = match self.request(peer, &request, stats).await {
                Err(NodeError::Refused { message, .. }) if matches!(outgoing, Message::More { .. }) => {
                    // The responder's cells changed under this session (or it has none now).
                    tracing::debug!(%peer, mailbox = key.mailbox(), "more cells refused ({message})");
                    self.count_sketch("stale");
                    return Ok(Attempt::Stale);
                }
                Err(NodeError::Refused { message, .. }) => {
                    // A peer of another release, or one whose mailbox is out of the sketch range
                    // now: trie descent does without.
                    tracing::debug!(%peer, mailbox = key.mailbox(), "sketch message refused ({message}): trie descent");
                    self.count_sketch("refused");
                    return self.reconcile(peer, space, view, stats).await.map(Attempt::Done);
                }
                other => other?,
            };
            match answer {
                Response::Sketch {
                    message,
                    records,
                    blobs,
                } => {
                    let reply = if message.0.is_empty() {
                        None
                    } else {
                        Some(sketch_session::decode(&message.0, &limits).map_err(peer_fault(peer))?)
                    };
                    let settled: HashSet<u128> = match &reply {
                        Some(Message::Settled { you_lack }) => you_lack.iter().copied().collect(),
                        Some(Message::Cells { .. }) | None => HashSet::new(),
                        Some(_) => {
                            return Err(NodeError::Peer {
                                peer,
                                reason: "answered a sketch message with a message only an asker sends".into(),
                            })
                        }
                    };
                    if records.iter().any(|record| !settled.contains(&record.id.0)) {
                        return Err(NodeError::Peer {
                            peer,
                            reason: "sent records with a sketch reply that were not lacking".into(),
                        });
                    }
                    let root = view.aggregate(Prefix::ROOT)?.summary();
                    if built.is_some_and(|at_build| at_build != root) {
                        self.count_sketch("stale");
                        return Ok(Attempt::Stale);
                    }
                    if matches!(reply, Some(Message::Cells { .. })) && built.is_none() {
                        let started = Instant::now();
                        cells = build_cells(&self.inner.store, key.id(), sketch_key)?;
                        built = Some(root);
                        tracing::debug!(%peer, mailbox = key.mailbox(), cells = cells.length(), ms = started.elapsed().as_millis() as u64, "sketch cells built");
                    }
                    let now = self.inner.environment.now_millis();
                    match asker
                        .on_reply(view, &cells, reply, now)
                        .map_err(|error| session_error(peer, error))?
                    {
                        Step::Send(Message::Trie(_)) => {
                            // The cells did not settle it within their bounds: trie descent.
                            tracing::debug!(%peer, mailbox = key.mailbox(), "sketch session goes to trie descent");
                            self.count_sketch("trie_after_cells");
                            return self.reconcile(peer, space, view, stats).await.map(Attempt::Done);
                        }
                        Step::Send(message) => outgoing = message,
                        Step::Finished { last } => {
                            let theirs = asker.outcome().need_keys;
                            let mine = match last {
                                Some(Message::YouLack(keys)) => keys,
                                _ => Vec::new(),
                            };
                            let split = split(&theirs, &mine);
                            tracing::debug!(
                                %peer,
                                mailbox = key.mailbox(),
                                lacking = split.lacking.len(),
                                both = split.both.len(),
                                they_lack = split.they_lack.len(),
                                "sketch session decoded"
                            );
                            self.count_sketch("decoded");
                            let mut done = Reconciled::default();
                            done.delivered.extend(records);
                            done.delivered_blobs.extend(blobs);
                            self.settle_by_sketch(peer, key, split, &mut done, stats).await?;
                            return Ok(Attempt::Done(done));
                        }
                    }
                }
                Response::Reconcile {
                    message,
                    records,
                    blobs,
                    states,
                    ..
                } => {
                    tracing::debug!(%peer, mailbox = key.mailbox(), "sketch opening answered by trie descent");
                    self.count_sketch("trie_by_responder");
                    // The responder took trie descent: this is its reply to the opening's trie
                    // element, as a batched first reply would be.
                    let sync_limits = &self.inner.limits;
                    let elements = sync::decode(&message.0, sync_limits).map_err(peer_fault(peer))?;
                    let states = sync::decode_states(&states.0, sync_limits).map_err(peer_fault(peer))?;
                    let mut done = Reconciled::default();
                    accept_delivered(peer, &space, &elements, records, blobs, &mut done)?;
                    return self
                        .continue_first_reply(peer, space, view, FirstReply { elements, states, done }, stats)
                        .await
                        .map(Attempt::Done);
                }
                _ => {
                    return Err(NodeError::Peer {
                        peer,
                        reason: "unexpected answer to a sketch message".into(),
                    })
                }
            }
        }
        tracing::debug!(%peer, mailbox = key.mailbox(), "sketch session used its rounds: trie descent");
        self.count_sketch("rounds_exhausted");
        self.reconcile(peer, space, view, stats).await.map(Attempt::Done)
    }

    /// Ends a decoded session: states for the records both hold differently, the records this
    /// side lacks (some come with the answer, `finish_mailbox` pulls the rest), and the IDs the
    /// peer lacks (it pulls them).
    async fn settle_by_sketch(
        &self,
        peer: PeerId,
        key: &MailboxKey,
        split: Split,
        done: &mut Reconciled,
        stats: &SessionStats,
    ) -> Result<(), NodeError> {
        let store = &self.inner.store;
        done.mine.need_keys.extend(split.lacking.iter().copied());
        // Records a settled reply brought need no asking again.
        let delivered: HashSet<u128> = done.delivered.iter().map(|record| record.id.0).collect();
        done.mine.need_keys.extend(split.both.iter().copied());
        done.by_state.extend(split.both.iter().copied());
        done.told.need_keys.extend(split.they_lack.iter().copied());
        let mut both = split.both.iter().copied();
        let mut lacking = split.lacking.iter().copied().filter(|id| !delivered.contains(id));
        let mut they_lack = split.they_lack.iter().copied();
        loop {
            let keyed: Vec<(u128, RecordState)> = both
                .by_ref()
                .take(SETTLE_ENTRIES_PER_REQUEST)
                .filter_map(|id| match store.record(key.id(), MessageId(id)) {
                    Ok(record) => record.map(|record| Ok((id, RecordState::of(&record)))),
                    Err(error) => Some(Err(error)),
                })
                .collect::<Result<_, _>>()?;
            let room = SETTLE_ENTRIES_PER_REQUEST.saturating_sub(keyed.len());
            let send: Vec<MessageId> = lacking.by_ref().take(room).map(MessageId).collect();
            let room = room.saturating_sub(send.len());
            let you_lack: Vec<MessageId> = they_lack.by_ref().take(room).map(MessageId).collect();
            if keyed.is_empty() && send.is_empty() && you_lack.is_empty() {
                return Ok(());
            }
            self.inner.metrics.session_rounds.inc();
            SessionStats::add(&stats.rounds, 1);
            let request = Request::SketchSettle {
                mailbox: key.clone(),
                send: send.clone(),
                states: packed_keyed_states(&keyed),
                you_lack,
            };
            let Response::SketchSettled {
                records,
                blobs,
                returned,
            } = self.request(peer, &request, stats).await?
            else {
                return Err(NodeError::Peer {
                    peer,
                    reason: "unexpected answer to a sketch settlement".into(),
                });
            };
            let asked: HashSet<u128> = send.iter().map(|id| id.0).collect();
            if records.iter().any(|record| !asked.contains(&record.id.0)) {
                return Err(NodeError::Peer {
                    peer,
                    reason: "sent records with a sketch settlement that were not asked for".into(),
                });
            }
            done.delivered.extend(records);
            done.delivered_blobs.extend(blobs);
            let returned = sync::decode_indexed_states(&returned.0, &self.inner.limits).map_err(peer_fault(peer))?;
            let mut merged = Vec::with_capacity(returned.len());
            for (index, state) in returned {
                let Some((id, _)) = usize::try_from(index).ok().and_then(|index| keyed.get(index)) else {
                    return Err(NodeError::Peer {
                        peer,
                        reason: format!("sent back state {index} of {} sent", keyed.len()),
                    });
                };
                merged.push((*id, state));
            }
            self.merge_states(key, self.returned_states(key, merged)?, stats)
                .await?;
        }
    }

    /// The cells this responder computes for a peer's session: from the cache while the mailbox
    /// is unchanged, else built within the peer's budget (and cached, replacing the peer's
    /// oldest set or the oldest).
    fn responder_cells<V: TreeView>(
        &self,
        peer: PeerId,
        mailbox: MailboxId,
        salt: [u8; 16],
        view: &V,
    ) -> Result<ResponderCells, NodeError>
    where
        NodeError: From<V::Error>,
    {
        let root = view.aggregate(Prefix::ROOT)?.summary();
        let lifetime = Duration::from_secs(CACHE_SECONDS);
        {
            let mut cache = lock(&self.inner.sketch_cache);
            cache.entries.retain(|entry| entry.built.elapsed() < lifetime);
            let session = cache
                .entries
                .iter()
                .find(|entry| entry.peer == peer && entry.mailbox == mailbox && entry.salt == salt);
            match session {
                Some(entry) if entry.root == root => return Ok(ResponderCells::Ready(entry.cells.clone())),
                Some(_) => return Ok(ResponderCells::Stale),
                None => {}
            }
            if !cache.budget.take(peer, Instant::now()) {
                tracing::debug!(%peer, "a peer asked for more sketch cell builds than its budget");
                return Ok(ResponderCells::OverBudget);
            }
        }
        let started = Instant::now();
        let cells = Arc::new(build_cells(&self.inner.store, mailbox, session_key(&salt, mailbox))?);
        tracing::debug!(%peer, cells = cells.length(), ms = started.elapsed().as_millis() as u64, "sketch cells built to answer");
        let mut cache = lock(&self.inner.sketch_cache);
        // Entries are in the order they were built: the first of the peer's, or of all, is the oldest.
        cache
            .entries
            .retain(|entry| !(entry.peer == peer && entry.mailbox == mailbox && entry.salt == salt));
        if cache.entries.iter().filter(|entry| entry.peer == peer).count() >= CACHE_ENTRIES_PER_PEER {
            if let Some(oldest) = cache.entries.iter().position(|entry| entry.peer == peer) {
                cache.entries.remove(oldest);
            }
        }
        if cache.entries.len() >= CACHE_ENTRIES {
            cache.entries.remove(0);
        }
        cache.entries.push(CachedCells {
            peer,
            mailbox,
            salt,
            root,
            built: Instant::now(),
            cells: cells.clone(),
        });
        Ok(ResponderCells::Ready(cells))
    }

    /// Answers one sketch message from a peer.
    pub(super) async fn answer_sketch(
        &self,
        peer: PeerId,
        key: &MailboxKey,
        salt: &[u8],
        message: &[u8],
    ) -> Result<Response, NodeError> {
        let limits = self.session_limits();
        let incoming = sketch_session::decode(message, &limits).map_err(peer_fault(peer))?;
        let salt: [u8; 16] = salt.try_into().map_err(|_| NodeError::Peer {
            peer,
            reason: "a sketch salt of the wrong length".into(),
        })?;
        let view = self.inner.store.tree(Space::Mailbox(key.id()));
        let count = view.aggregate(Prefix::ROOT)?.count;
        let trie_answer = |trie: &sync::Element| sync::encode(&sketch_session::opening_chain(trie));
        let opening = match &incoming {
            Message::Open { trie, .. } => Some(trie.clone()),
            Message::More { .. } => None,
            _ => {
                return Err(NodeError::Peer {
                    peer,
                    reason: "sent a sketch message only a responder sends".into(),
                })
            }
        };
        if !uses_sketches(count) {
            // Too large (or too small) for cells here: an opening is answered by the trie, and
            // a request for more cells is refused (the asker goes to trie descent).
            return match opening {
                Some(trie) => self.answer_sketch_by_trie(peer, key, &trie_answer(&trie)).await,
                None => Ok(Response::Error {
                    message: format!("this mailbox holds {count} records: no sketch cells for it"),
                }),
            };
        }
        let respond =
            |cells: &SketchCells| sketch_session::respond(&view, cells, &incoming, &limits).map_err(peer_fault(peer));
        let stale = || Response::Error {
            message: "the mailbox changed while this sketch session streamed cells: open a new session".into(),
        };
        let (reply, outcome) = match &incoming {
            Message::Open { cells, .. } if cells.is_empty() => {
                // Whether cells are the way on follows from the trie alone: build them only then.
                let empty = SketchCells::new(session_key(&salt, key.id()), SketchCells::length_for(count));
                match respond(&empty)? {
                    (Some(Message::Cells { .. }), _) => match self.responder_cells(peer, key.id(), salt, &view)? {
                        ResponderCells::Ready(cells) => respond(&cells)?,
                        ResponderCells::Stale => return Ok(stale()),
                        ResponderCells::OverBudget => {
                            return self.answer_over_budget(peer, key, opening.as_ref()).await
                        }
                    },
                    answer => answer,
                }
            }
            _ => match self.responder_cells(peer, key.id(), salt, &view)? {
                ResponderCells::Ready(cells) => respond(&cells)?,
                ResponderCells::Stale => return Ok(stale()),
                ResponderCells::OverBudget => return self.answer_over_budget(peer, key, opening.as_ref()).await,
            },
        };
        if !self.is_stale() {
            self.record_contact(); // answering a session is contact with the cluster too
        }
        let path = match &reply {
            None => "equal",
            Some(Message::Trie(_)) => "trie",
            Some(Message::Settled { .. }) => "settled",
            Some(Message::Cells { cells, .. }) => {
                tracing::debug!(%peer, mailbox = key.mailbox(), cells = cells.len(), "sketch cells sent");
                "cells"
            }
            Some(_) => "other",
        };
        tracing::debug!(%peer, mailbox = key.mailbox(), path, "sketch message answered");
        match reply {
            None => {
                // Nothing to tell the asker, but perhaps something to pull from it: its opening
                // may name a subtree this side lacks entirely.
                self.spawn_pull(peer, key, outcome);
                Ok(Response::Sketch {
                    message: ByteString::default(),
                    records: Vec::new(),
                    blobs: Vec::new(),
                })
            }
            Some(Message::Trie(_)) => match opening {
                Some(trie) => self.answer_sketch_by_trie(peer, key, &trie_answer(&trie)).await,
                None => Err(NodeError::Peer {
                    peer,
                    reason: "a sketch request led to trie descent outside an opening".into(),
                }),
            },
            Some(Message::Settled { you_lack }) => {
                let records = self.inline_records(key, you_lack.iter().copied())?;
                let blobs = self.inline_blobs(&records, self.inline_budget())?;
                self.spawn_pull(peer, key, outcome);
                Ok(Response::Sketch {
                    message: ByteString(sketch_session::encode(&Message::Settled { you_lack })),
                    records,
                    blobs,
                })
            }
            Some(reply) => Ok(Response::Sketch {
                message: ByteString(sketch_session::encode(&reply)),
                records: Vec::new(),
                blobs: Vec::new(),
            }),
        }
    }

    /// Answers a peer past its build budget: an opening goes on by trie descent (at no cost to
    /// the asker, since the opening carries its trie message); a request for more cells is
    /// refused.
    async fn answer_over_budget(
        &self,
        peer: PeerId,
        key: &MailboxKey,
        opening: Option<&sync::Element>,
    ) -> Result<Response, NodeError> {
        self.count_sketch("over_budget");
        match opening {
            Some(trie) => {
                let message = sync::encode(&sketch_session::opening_chain(trie));
                self.answer_sketch_by_trie(peer, key, &message).await
            }
            None => Ok(Response::Error {
                message: "too many sketch cell builds asked of this node: go on by trie descent".into(),
            }),
        }
    }

    /// Answers a sketch opening as the trie message it carries: the session goes on by trie
    /// descent.
    async fn answer_sketch_by_trie(
        &self,
        peer: PeerId,
        key: &MailboxKey,
        message: &[u8],
    ) -> Result<Response, NodeError> {
        let mut budget = self.inline_budget();
        let reply = self.answer_mailbox(peer, key, message, &[], &[], &mut budget).await?;
        Ok(Response::Reconcile {
            message: reply.message,
            records: reply.records,
            blobs: reply.blobs,
            states: reply.states,
            returned: reply.returned,
        })
    }

    /// Answers the end of a peer's decoded session: merges its states, sends back those that
    /// hold more, sends the records it lacks (within the limits of one answer), and pulls what
    /// this side lacks.
    pub(super) async fn answer_sketch_settle(
        &self,
        peer: PeerId,
        key: &MailboxKey,
        send: Vec<MessageId>,
        states: &[u8],
        you_lack: Vec<MessageId>,
    ) -> Result<Response, NodeError> {
        let keyed = sync::decode_keyed_states(states, &self.inner.limits).map_err(peer_fault(peer))?;
        let mut merges = Vec::new();
        let mut back = Vec::new();
        for (index, (id, state)) in keyed.into_iter().enumerate() {
            let Some(mine) = self.inner.store.record(key.id(), MessageId(id))? else {
                continue; // nothing here to merge into: the peer's claim names nothing we hold
            };
            let (merged, more) = sync::merge_state(&mine, &state);
            if merged != mine {
                merges.push(state.applied_to(&mine));
            }
            if let Some(more) = more {
                back.push((index as u64, id, more));
            }
        }
        self.merge_states(key, merges, &SessionStats::default()).await?;
        let records = self.inline_records(key, send.iter().map(|id| id.0))?;
        let blobs = self.inline_blobs(&records, self.inline_budget())?;
        self.spawn_pull(
            peer,
            key,
            Outcome {
                need_keys: you_lack.iter().map(|id| id.0).collect(),
                ..Outcome::default()
            },
        );
        Ok(Response::SketchSettled {
            records,
            blobs,
            returned: packed_indexed_states(&back),
        })
    }

    /// The records held here among `ids`, at most as many as one answer carries inline.
    fn inline_records(
        &self,
        key: &MailboxKey,
        ids: impl Iterator<Item = u128>,
    ) -> Result<Vec<MessageRecord>, NodeError> {
        let limit = self.inner.config.max_records_per_response.min(256);
        let mut records = Vec::new();
        for id in ids.take(limit) {
            if let Some(record) = self.inner.store.record(key.id(), MessageId(id))? {
                records.push(record);
            }
        }
        Ok(records)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_on_both_sides_is_a_state_difference() {
        assert_eq!(
            split(&[5, 1, 9], &[9, 3]),
            Split {
                lacking: vec![1, 5],
                both: vec![9],
                they_lack: vec![3],
            }
        );
    }

    #[test]
    fn salts_and_mailboxes_give_their_own_keys() {
        assert_ne!(session_key(&[1; 16], MailboxId(1)), session_key(&[2; 16], MailboxId(1)));
        assert_ne!(session_key(&[1; 16], MailboxId(1)), session_key(&[1; 16], MailboxId(2)));
    }

    #[test]
    fn a_peer_gets_a_bounded_number_of_cell_builds_per_window() {
        let mut budget = BuildBudget::default();
        let (greedy, other) = (PeerId::random(), PeerId::random());
        let start = Instant::now();
        for build in 0..BUILDS_PER_PEER {
            assert!(budget.take(greedy, start), "build {build} is within the budget");
        }
        assert!(!budget.take(greedy, start), "one more is refused");
        assert!(budget.take(other, start), "another peer has its own budget");
        let almost = start + Duration::from_secs(CACHE_SECONDS) - Duration::from_millis(1);
        assert!(!budget.take(greedy, almost), "still inside the window");
        assert!(
            budget.take(greedy, start + Duration::from_secs(CACHE_SECONDS)),
            "the window moved on"
        );
    }

    #[test]
    fn only_mid_sized_mailboxes_use_sketches() {
        assert!(!uses_sketches(100));
        assert!(uses_sketches(100_000));
        assert!(!uses_sketches(5_000_000));
    }
}
