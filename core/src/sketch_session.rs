//! Reconciliation that chooses, per session, between rateless sketches ([`crate::sketch`]) and
//! trie descent ([`crate::sync`]), by what the first exchange shows to be cheaper.
//!
//! Sketches cost 35 to 40 bytes per difference wherever the differences are; trie descent costs
//! little more than the floor when the differences sit together (the newest messages, a subtree
//! one side lacks entirely) and a few hundred bytes per difference when they are scattered. The
//! first message carries enough for the responder to see which case it is in.
//!
//! # Protocol
//! The asker (the side that starts) sends [`Message::Open`]: its first `opening_cells` sketch
//! cells (one by default), how many cells it keeps, and the last element of its first trie
//! message ([`crate::sync::initial`]) — the children of the first node where its keys branch; the
//! single-child nodes above it follow from its prefix ([`opening_chain`]). That costs less than
//! the trie's own first message. The responder, which keeps no state between messages:
//! 1. answers the trie message as [`crate::sync::respond`] would; if that answer is empty the
//!    replicas are equal and it answers nothing (the trie stays the judge of equality);
//! 2. subtracts its own cells and peels: a single difference (a missing record, or a state on one
//!    side only) decodes from cell 0, and it replies [`Message::Settled`] with the IDs the asker
//!    lacks, keeping what it lacks itself in its [`Outcome`] — one round trip;
//! 3. otherwise looks at the children of the asker's branching node: if only one or at most
//!    `clustered_sixteenths` sixteenths of them differ, the difference is clustered and its trie
//!    answer is the reply ([`Message::Trie`]): the session goes on as trie descent. It does the
//!    same when the asker's set is small enough to have been listed, and when the difference
//!    (at least the difference of the counts) is too large for the cells either side keeps;
//! 4. otherwise sends its own cells `0..k` ([`Message::Cells`]), `k` from the estimated
//!    difference ([`crate::sketch::cells_for`]: enough nine times in ten).
//!
//! The asker decodes the responder's cells against its own. When it is done it knows both
//! directions: it pulls what it lacks and tells the responder what the responder lacks in a last
//! [`Message::YouLack`] that needs no answer. When it is not, it estimates what is left
//! ([`Decoder::estimate_remaining`]) and asks for more cells ([`Message::More`]), at least a
//! quarter more each time; when the cells either side keeps would not be enough, it starts trie
//! descent instead. Trie descent is also where a session goes when a decoded difference is empty
//! although the trie says the replicas differ (two states whose 32-bit tags collide).
//!
//! Round trips: one for a single difference; one, sometimes two, for a scattered difference
//! whose size the counts give away (one side lacks what the other holds); two or three when they
//! do not (equal counts); as many as trie descent alone for a clustered one.
//!
//! # State and limits
//! The responder is stateless: every message says which cells it wants. The asker holds one
//! [`Decoder`], bounded by [`DecoderLimits`], and a deadline: every call takes the current time
//! in milliseconds and a session past its deadline ends with [`SessionError::TimedOut`]. Neither
//! side reads the clock, allocates by a count the peer claims, or loops on what a peer sends.
//!
//! # Wire form
//! CBOR, `[SESSION_VERSION, message]` (4); cells are one packed byte string ([`crate::sketch::encode_cells`]), key
//! lists 16 bytes per key. Trie messages are the bytes of [`crate::sync::encode`] unchanged,
//! told apart by their version ([`crate::sync::SYNC_VERSION`], 3).

use serde::{Deserialize, Serialize};

use crate::merkle::{Fingerprint, Prefix, Summary, TreeView};
use crate::sketch::{self, Cell, Decoder, DecoderLimits, Element, Side, SketchCells, SketchError};
use crate::sync::{self, ByteString, Outcome, SyncError, SyncLimits};

/// The session protocol version this build speaks.
/// Above the trie protocol's [`sync::SYNC_VERSION`], which its messages start with.
/// Version 4 since the trie protocol took 3; the two must never be equal.
pub const SESSION_VERSION: u8 = 4;
const _: () = assert!(SESSION_VERSION != sync::SYNC_VERSION);

/// Tuning and safety limits for one side of a session.
#[derive(Clone, Copy, Debug)]
pub struct SessionLimits {
    /// Limits of the trie messages inside the session.
    pub sync: SyncLimits,
    /// Bounds on the asker's decoder (and on the cells a message may carry).
    pub decoder: DecoderLimits,
    /// Cells in the opening message: one decodes a single difference (each more costs 25 bytes
    /// and settles two differences in one round trip about half the time).
    pub opening_cells: u64,
    /// The fewest cells a responder sends in its first batch when it cannot tell the size of
    /// the difference (equal counts on both sides).
    pub first_batch_minimum: u64,
    /// The most cells one reply carries.
    pub max_batch: u64,
    /// A difference is taken as clustered when at most this many in 16 of the children of the
    /// asker's first branching trie node differ (and at least four children exist), or when only
    /// one of them differs.
    pub clustered_sixteenths: u64,
    /// How long the asker keeps a session, in milliseconds.
    pub timeout_millis: u64,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            sync: SyncLimits::default(),
            decoder: DecoderLimits::default(),
            opening_cells: 1,
            first_batch_minimum: 24,
            max_batch: 16_384,
            clustered_sixteenths: 4,
            timeout_millis: 60_000,
        }
    }
}

/// Why a session could not go on.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("malformed session message: {0}")]
    Malformed(String),
    #[error("session message version {0} is not supported (this node speaks {SESSION_VERSION})")]
    UnsupportedVersion(u8),
    #[error("session message exceeds a limit: {0}")]
    LimitExceeded(String),
    #[error("a {0} message is not expected here: the peer does not follow the protocol")]
    Unexpected(&'static str),
    #[error("the session passed its deadline; start a new one")]
    TimedOut,
    #[error(transparent)]
    Sync(#[from] SyncError),
    #[error(transparent)]
    Sketch(#[from] SketchError),
    #[error("reading the local tree failed: {0}")]
    Store(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// One message of a session. See the module doc.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Message {
    Open {
        /// How many cells the asker keeps.
        length: u64,
        cells: Vec<Cell>,
        /// The last element of the asker's first trie message ([`sync::initial`]): the children of
        /// the first node where its keys branch, or its whole leaf list. The single-child nodes
        /// above it are implied (see [`opening_chain`]).
        trie: sync::Element,
    },
    Settled {
        you_lack: Vec<u128>,
    },
    Cells {
        /// How many cells the responder keeps.
        length: u64,
        start: u64,
        cells: Vec<Cell>,
    },
    More {
        start: u64,
        end: u64,
    },
    Trie(Vec<sync::Element>),
    YouLack(Vec<u128>),
}

impl Message {
    fn kind(&self) -> &'static str {
        match self {
            Message::Open { .. } => "open",
            Message::Settled { .. } => "settled",
            Message::Cells { .. } => "cells",
            Message::More { .. } => "more",
            Message::Trie(_) => "trie",
            Message::YouLack(_) => "you-lack",
        }
    }
}

/// What the asker does next.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Step {
    /// Send this and wait for the reply.
    Send(Message),
    /// The session is over; send `last` (if any) without waiting for a reply.
    Finished { last: Option<Message> },
}

fn store_error<E: std::error::Error + Send + Sync + 'static>(error: E) -> SessionError {
    SessionError::Store(Box::new(error))
}

/// Whether a recovered element is consistent with this side's records: one on this side must be
/// held here in that state, one on the other side must not.
fn vet<V: TreeView>(view: &V, sketch: &SketchCells, element: &Element, side: Side) -> Result<bool, SessionError> {
    let held = view
        .leaves(Prefix::of(element.id, crate::merkle::KEY_NIBBLES), 1)
        .map_err(store_error)?
        .first()
        .map(|(_, hash)| sketch.key().tag(element.id, hash));
    Ok((held == Some(element.tag)) == (side == Side::Mine))
}

/// Peels with every recovered element vetted against this side's records.
fn peel<V: TreeView>(decoder: &mut Decoder, view: &V, sketch: &SketchCells) -> Result<(), SessionError> {
    let mut failure = None;
    decoder.peel(|element, side| match vet(view, sketch, element, side) {
        Ok(accepted) => accepted,
        Err(error) => {
            failure.get_or_insert(error);
            false
        }
    });
    failure.map_or(Ok(()), Err)
}

/// The IDs of the recovered elements on one side, sorted, without repeats.
fn recovered_ids(decoder: &Decoder, wanted: Side) -> Vec<u128> {
    let mut ids: Vec<u128> = decoder
        .recovered()
        .filter(|(_, side)| *side == wanted)
        .map(|(element, _)| element.id)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The asker's side of a session.
#[derive(Debug)]
pub struct Asker {
    limits: SessionLimits,
    deadline_millis: u64,
    decoder: Decoder,
    /// Whether the session has gone to trie descent (cells are then out of place).
    descending: bool,
    outcome: Outcome,
}

impl Asker {
    /// Starts a session at time `now_millis`: the asker and its opening message.
    pub fn open<V: TreeView>(
        view: &V,
        sketch: &SketchCells,
        limits: &SessionLimits,
        now_millis: u64,
    ) -> Result<(Asker, Message), SessionError> {
        let initial = sync::initial(view, &limits.sync)?;
        let trie = initial.last().cloned().unwrap_or(sync::Element::Leaves {
            prefix: Prefix::ROOT,
            leaves: Vec::new(),
        });
        let message = Message::Open {
            length: sketch.length(),
            cells: wire_cells(sketch, 0, limits.opening_cells),
            trie,
        };
        let asker = Asker {
            limits: *limits,
            deadline_millis: now_millis.saturating_add(limits.timeout_millis),
            decoder: Decoder::new(*sketch.key(), limits.decoder),
            descending: false,
            outcome: Outcome::default(),
        };
        Ok((asker, message))
    }

    /// What the asker learned it must pull (normalized).
    pub fn outcome(&self) -> Outcome {
        let mut outcome = self.outcome.clone();
        outcome.normalize();
        outcome
    }

    /// Handles the responder's reply (`None`: it had nothing to say).
    pub fn on_reply<V: TreeView>(
        &mut self,
        view: &V,
        sketch: &SketchCells,
        reply: Option<Message>,
        now_millis: u64,
    ) -> Result<Step, SessionError> {
        if now_millis > self.deadline_millis {
            return Err(SessionError::TimedOut);
        }
        let Some(reply) = reply else {
            return Ok(Step::Finished { last: None });
        };
        match reply {
            Message::Settled { you_lack } => {
                self.outcome.need_keys.extend(you_lack);
                Ok(Step::Finished { last: None })
            }
            Message::Trie(elements) => {
                let (reply, outcome) = sync::respond(view, &elements, &self.limits.sync)?;
                self.outcome.extend(outcome);
                Ok(if reply.is_empty() {
                    Step::Finished { last: None }
                } else {
                    Step::Send(Message::Trie(reply))
                })
            }
            Message::Cells { length, start, cells } if !self.descending => {
                self.on_cells(view, sketch, length, start, &cells)
            }
            other => Err(SessionError::Unexpected(other.kind())),
        }
    }

    fn on_cells<V: TreeView>(
        &mut self,
        view: &V,
        sketch: &SketchCells,
        their_length: u64,
        start: u64,
        cells: &[Cell],
    ) -> Result<Step, SessionError> {
        let end = start.saturating_add(cells.len() as u64);
        if end > sketch.length() {
            return self.descend(view); // cells this side does not keep: nothing to subtract
        }
        self.decoder.add_cells(start, cells, sketch.cells(start, end))?;
        peel(&mut self.decoder, view, sketch)?;
        if self.decoder.is_complete() {
            if self.decoder.recovered().next().is_none() {
                return self.descend(view); // the trie saw a difference the cells do not: tags collided
            }
            self.outcome
                .need_keys
                .extend(recovered_ids(&self.decoder, Side::Theirs));
            let they_lack = recovered_ids(&self.decoder, Side::Mine);
            let last = (!they_lack.is_empty()).then_some(Message::YouLack(they_lack));
            return Ok(Step::Finished { last });
        }
        let received = self.decoder.received();
        let kept = sketch.length().min(their_length).min(self.limits.decoder.max_cells);
        let recovered = self.decoder.recovered().count() as u64;
        let wanted = sketch::cells_for(recovered + self.decoder.estimate_remaining());
        if cells.is_empty() || received >= kept || wanted > kept {
            return self.descend(view);
        }
        let next = wanted
            .max(received + (received / 4).max(8))
            .min(received + self.limits.max_batch)
            .min(kept);
        Ok(Step::Send(Message::More {
            start: received,
            end: next,
        }))
    }

    /// Gives up on sketches for this session: trie descent from the root.
    fn descend<V: TreeView>(&mut self, view: &V) -> Result<Step, SessionError> {
        self.decoder = Decoder::new(*self.decoder_key(), self.limits.decoder);
        self.descending = true;
        Ok(Step::Send(Message::Trie(sync::initial(view, &self.limits.sync)?)))
    }

    fn decoder_key(&self) -> &sketch::SketchKey {
        self.decoder.key()
    }
}

/// The responder's side: answers one message from its records and sketch alone. Returns the
/// reply (`None`: nothing to say, the session is over) and what this side must pull.
pub fn respond<V: TreeView>(
    view: &V,
    sketch: &SketchCells,
    incoming: &Message,
    limits: &SessionLimits,
) -> Result<(Option<Message>, Outcome), SessionError> {
    match incoming {
        Message::Open { length, cells, trie } => on_open(view, sketch, *length, cells, trie, limits),
        Message::More { start, end } => {
            let end = (*end).min(start.saturating_add(limits.max_batch));
            let cells = wire_cells(sketch, *start, end);
            let reply = Message::Cells {
                length: sketch.length(),
                start: *start,
                cells,
            };
            Ok((Some(reply), Outcome::default()))
        }
        Message::Trie(elements) => {
            let (reply, outcome) = sync::respond(view, elements, &limits.sync)?;
            Ok(((!reply.is_empty()).then_some(Message::Trie(reply)), outcome))
        }
        Message::YouLack(keys) => Ok((
            None,
            Outcome {
                need_keys: keys.clone(),
                ..Outcome::default()
            },
        )),
        other => Err(SessionError::Unexpected(other.kind())),
    }
}

/// The asker's whole first trie message, from its last element: [`sync::initial`] walks down
/// single-child nodes before the node it lists, and the receiver never compares the summaries of
/// children the same message describes, so the nodes above are fully known from the prefix and
/// the count below it.
pub fn opening_chain(last: &sync::Element) -> Vec<sync::Element> {
    let sync::Element::Children { prefix, children } = last else {
        return vec![last.clone()];
    };
    let count = children
        .iter()
        .fold(0u64, |total, (_, summary)| total.saturating_add(summary.count));
    let mut chain: Vec<sync::Element> = (0..prefix.depth())
        .filter_map(|depth| {
            let ancestor = Prefix::of(prefix.bits(), depth);
            let index = ancestor.child_index(prefix.bits())? as u8;
            Some(sync::Element::Children {
                prefix: ancestor,
                children: vec![(
                    index,
                    Summary {
                        count,
                        fingerprint: Fingerprint::default(),
                    },
                )],
            })
        })
        .collect();
    chain.push(last.clone());
    chain
}

fn on_open<V: TreeView>(
    view: &V,
    sketch: &SketchCells,
    their_length: u64,
    their_cells: &[Cell],
    last: &sync::Element,
    limits: &SessionLimits,
) -> Result<(Option<Message>, Outcome), SessionError> {
    // The trie's answer first: it says whether the replicas are equal, and it is the reply
    // whenever trie descent is the cheaper way on.
    let trie = opening_chain(last);
    let (trie_reply, trie_outcome) = sync::respond(view, &trie, &limits.sync)?;
    if trie_reply.is_empty() && trie_outcome.is_empty() {
        return Ok((None, Outcome::default()));
    }
    let descend = || {
        Ok((
            (!trie_reply.is_empty()).then(|| Message::Trie(trie_reply.clone())),
            trie_outcome.clone(),
        ))
    };
    let root = view.aggregate(Prefix::ROOT).map_err(store_error)?;
    let their_count = match last {
        sync::Element::Children { children, .. } => children
            .iter()
            .fold(0u64, |total, (_, summary)| total.saturating_add(summary.count)),
        sync::Element::Leaves { leaves, .. } => leaves.len() as u64,
        _ => 0,
    };
    let opening = (their_cells.len() as u64).min(sketch.length());
    let mut decoder = Decoder::new(*sketch.key(), limits.decoder);
    decoder.add_cells(0, &their_cells[..opening as usize], sketch.cells(0, opening))?;
    peel(&mut decoder, view, sketch)?;
    if decoder.is_complete() {
        if decoder.recovered().next().is_none() {
            return descend();
        }
        let outcome = Outcome {
            need_keys: recovered_ids(&decoder, Side::Theirs),
            ..Outcome::default()
        };
        let reply = Message::Settled {
            you_lack: recovered_ids(&decoder, Side::Mine),
        };
        return Ok((Some(reply), outcome));
    }
    let kept = sketch.length().min(their_length).min(limits.decoder.max_cells);
    let probe = probe(view, last, limits)?;
    let estimate = root
        .count
        .abs_diff(their_count)
        .max(probe.count_gap)
        .max(decoder.estimate_remaining().min(kept));
    let wanted = sketch::cells_for(estimate);
    let small = !matches!(last, sync::Element::Children { .. });
    if small || wanted > kept || probe.clustered {
        return descend();
    }
    let batch = wanted.max(limits.first_batch_minimum).min(limits.max_batch).min(kept);
    let reply = Message::Cells {
        length: sketch.length(),
        start: 0,
        cells: wire_cells(sketch, 0, batch),
    };
    Ok((Some(reply), Outcome::default()))
}

/// Cells `start..end` of this side's sketch as they travel (see [`Cell::truncated`]).
fn wire_cells(sketch: &SketchCells, start: u64, end: u64) -> Vec<Cell> {
    let cells = sketch.cells(start, end);
    let first = start.min(sketch.length());
    cells
        .iter()
        .enumerate()
        .map(|(offset, cell)| cell.truncated(first + offset as u64))
        .collect()
}

/// What the children of the asker's first branching trie node tell about the difference.
struct Probe {
    /// Few of them differ: the difference sits together, trie descent finds it cheaply.
    clustered: bool,
    /// The sum over the children of the differences of their counts: at least the size of the
    /// difference (all of it when one side lacks what the other holds).
    count_gap: u64,
}

fn probe<V: TreeView>(view: &V, last: &sync::Element, limits: &SessionLimits) -> Result<Probe, SessionError> {
    let sync::Element::Children {
        prefix,
        children: theirs,
    } = last
    else {
        return Ok(Probe {
            clustered: false,
            count_gap: 0,
        });
    };
    let mine = view.child_aggregates(*prefix).map_err(store_error)?;
    let mut their_children: [Option<Summary>; 16] = [None; 16];
    for (index, summary) in theirs {
        their_children[usize::from(*index & 15)] = Some(*summary);
    }
    let (mut present, mut differing, mut count_gap) = (0u64, 0u64, 0u64);
    for index in 0..16 {
        let my_summary = (!mine[index].is_empty()).then(|| mine[index].summary());
        if my_summary.is_none() && their_children[index].is_none() {
            continue;
        }
        present += 1;
        if my_summary != their_children[index] {
            differing += 1;
        }
        let their_count = their_children[index].map_or(0, |summary| summary.count);
        count_gap = count_gap.saturating_add(mine[index].count.abs_diff(their_count));
    }
    Ok(Probe {
        // One differing child is clustered however few children there are: a time-ordered
        // mailbox written within a minute or so branches into two or three children only, and
        // its newest messages sit in one of them.
        clustered: differing <= 1 || (present >= 4 && differing * 16 <= present * limits.clustered_sixteenths),
        count_gap,
    })
}

// ---------------------------------------------------------------------------------------------
// Wire form
// ---------------------------------------------------------------------------------------------

#[derive(Serialize, Deserialize)]
enum WireMessage {
    #[serde(rename = "o")]
    Open(u64, ByteString, ByteString),
    #[serde(rename = "s")]
    Settled(ByteString),
    #[serde(rename = "c")]
    Cells(u64, ByteString),
    #[serde(rename = "m")]
    More(u64, u64),
    #[serde(rename = "y")]
    YouLack(ByteString),
}

#[derive(Serialize, Deserialize)]
struct SessionWire(u8, WireMessage);

fn keys_to_wire(keys: &[u128]) -> ByteString {
    ByteString(keys.iter().flat_map(|key| key.to_be_bytes()).collect())
}

fn keys_from_wire(bytes: &[u8], limits: &SessionLimits) -> Result<Vec<u128>, SessionError> {
    if !bytes.len().is_multiple_of(16) {
        return Err(SessionError::Malformed(
            "key list is not a whole number of 16-byte keys".into(),
        ));
    }
    if bytes.len() / 16 > limits.sync.max_keys_per_element {
        return Err(SessionError::LimitExceeded(format!("{} keys", bytes.len() / 16)));
    }
    Ok(bytes
        .chunks_exact(16)
        .map(|chunk| u128::from_be_bytes(chunk.try_into().unwrap_or([0; 16])))
        .collect())
}

/// Encodes one message. A trie message travels as the bytes of [`sync::encode`] unchanged (they
/// start with the trie protocol's version, `sync::SYNC_VERSION`); every other message is `[SESSION_VERSION, message]`.
pub fn encode(message: &Message) -> Vec<u8> {
    let wire = match message {
        Message::Trie(elements) => return sync::encode(elements),
        Message::Open { length, cells, trie } => WireMessage::Open(
            *length,
            ByteString(sketch::encode_cells(0, cells)),
            ByteString(sync::encode(std::slice::from_ref(trie))),
        ),
        Message::Settled { you_lack } => WireMessage::Settled(keys_to_wire(you_lack)),
        Message::Cells { length, start, cells } => {
            WireMessage::Cells(*length, ByteString(sketch::encode_cells(*start, cells)))
        }
        Message::More { start, end } => WireMessage::More(*start, *end),
        Message::YouLack(keys) => WireMessage::YouLack(keys_to_wire(keys)),
    };
    cbor4ii::serde::to_vec(Vec::new(), &SessionWire(SESSION_VERSION, wire)).unwrap_or_default()
}

/// Decodes and validates one message.
pub fn decode(bytes: &[u8], limits: &SessionLimits) -> Result<Message, SessionError> {
    // A CBOR array of two whose first item is the trie protocol's version.
    if bytes.starts_with(&[0x82, sync::SYNC_VERSION]) {
        return Ok(Message::Trie(sync::decode(bytes, &limits.sync)?));
    }
    let SessionWire(version, wire) =
        cbor4ii::serde::from_slice(bytes).map_err(|error| SessionError::Malformed(error.to_string()))?;
    if version != SESSION_VERSION {
        return Err(SessionError::UnsupportedVersion(version));
    }
    let max_cells = limits.decoder.max_cells;
    Ok(match wire {
        WireMessage::Open(length, cells, trie) => {
            let (start, cells) = sketch::decode_cells(&cells.0, limits.opening_cells.min(max_cells))?;
            if start != 0 {
                return Err(SessionError::Malformed("opening cells must start at cell 0".into()));
            }
            let trie = match <[sync::Element; 1]>::try_from(sync::decode(&trie.0, &limits.sync)?) {
                Ok([element @ (sync::Element::Children { .. } | sync::Element::Leaves { .. })]) => element,
                _ => {
                    return Err(SessionError::Malformed(
                        "an opening carries one trie element, children or leaves".into(),
                    ))
                }
            };
            Message::Open { length, cells, trie }
        }
        WireMessage::Settled(keys) => Message::Settled {
            you_lack: keys_from_wire(&keys.0, limits)?,
        },
        WireMessage::Cells(length, cells) => {
            let (start, cells) = sketch::decode_cells(&cells.0, max_cells)?;
            if cells.len() as u64 > limits.max_batch {
                return Err(SessionError::LimitExceeded(format!(
                    "{} cells in one message",
                    cells.len()
                )));
            }
            Message::Cells { length, start, cells }
        }
        WireMessage::More(start, end) => {
            if start >= end || end > max_cells {
                return Err(SessionError::Malformed(format!("asks for cells {start}..{end}")));
            }
            Message::More { start, end }
        }
        WireMessage::YouLack(keys) => Message::YouLack(keys_from_wire(&keys.0, limits)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merkle::{MemoryTree, StoredDepth};
    use crate::sketch::SketchKey;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn state(key: u128, version: u8) -> [u8; 32] {
        let mut input = key.to_be_bytes().to_vec();
        input.push(version);
        *blake3::hash(&input).as_bytes()
    }

    fn sketch_key() -> SketchKey {
        SketchKey::derive(b"mesh secret", b"mailbox 7 epoch 1")
    }

    /// A replica: its trie and its maintained sketch.
    #[derive(Clone)]
    struct Replica {
        tree: MemoryTree,
        sketch: SketchCells,
    }

    impl Replica {
        fn new(length: u64) -> Self {
            Replica {
                tree: MemoryTree::new(StoredDepth::MAILBOX),
                sketch: SketchCells::new(sketch_key(), length),
            }
        }

        fn set(&mut self, key: u128, hash: [u8; 32]) {
            let old = self.tree.get(key).copied();
            self.sketch.replace(key, old.as_ref(), Some(&hash));
            self.tree.insert(key, hash);
        }

        /// Copies what `needs` names from `source` (the other side's version wins here; the node
        /// would merge the two records instead).
        fn pull(&mut self, source: &Replica, needs: &Outcome) {
            for key in &needs.need_keys {
                if let Some(hash) = source.tree.get(*key) {
                    self.set(*key, *hash);
                }
            }
            for prefix in &needs.need_prefixes {
                for (key, hash) in source.tree.leaves(*prefix, usize::MAX).unwrap() {
                    self.set(key, hash);
                }
            }
        }
    }

    struct Run {
        asker_needs: Outcome,
        responder_needs: Outcome,
        messages: usize,
        bytes: usize,
        used_trie: bool,
    }

    /// A whole session through the wire form.
    fn run(asker: &Replica, responder: &Replica, limits: &SessionLimits) -> Run {
        let (mut session, open) = Asker::open(&asker.tree, &asker.sketch, limits, 1_000).unwrap();
        let mut responder_needs = Outcome::default();
        let (mut messages, mut bytes, mut used_trie) = (0, 0, false);
        let mut outgoing = open;
        loop {
            messages += 1;
            assert!(messages < 100, "session did not end");
            let encoded = encode(&outgoing);
            bytes += encoded.len();
            let incoming = decode(&encoded, limits).unwrap();
            assert_eq!(incoming, outgoing);
            used_trie |= matches!(incoming, Message::Trie(_));
            let (reply, outcome) = respond(&responder.tree, &responder.sketch, &incoming, limits).unwrap();
            responder_needs.extend(outcome);
            let reply = reply.map(|reply| {
                messages += 1;
                let encoded = encode(&reply);
                bytes += encoded.len();
                let decoded = decode(&encoded, limits).unwrap();
                assert_eq!(decoded, reply);
                used_trie |= matches!(decoded, Message::Trie(_));
                decoded
            });
            match session.on_reply(&asker.tree, &asker.sketch, reply, 2_000).unwrap() {
                Step::Send(message) => outgoing = message,
                Step::Finished { last } => {
                    if let Some(last) = last {
                        messages += 1;
                        let encoded = encode(&last);
                        bytes += encoded.len();
                        let incoming = decode(&encoded, limits).unwrap();
                        let (reply, outcome) = respond(&responder.tree, &responder.sketch, &incoming, limits).unwrap();
                        assert!(reply.is_none());
                        responder_needs.extend(outcome);
                    }
                    break;
                }
            }
        }
        responder_needs.normalize();
        Run {
            asker_needs: session.outcome(),
            responder_needs,
            messages,
            bytes,
            used_trie,
        }
    }

    /// Every key on which the replicas differ (missing on one side or in another state).
    fn difference(one: &Replica, other: &Replica) -> BTreeSet<u128> {
        let mut keys = BTreeSet::new();
        for (key, hash) in one.tree.iter() {
            if other.tree.get(*key) != Some(hash) {
                keys.insert(*key);
            }
        }
        for (key, hash) in other.tree.iter() {
            if one.tree.get(*key) != Some(hash) {
                keys.insert(*key);
            }
        }
        keys
    }

    /// Checks that each side learned exactly the keys it must pull, and that pulling converges.
    fn assert_exact(asker: &Replica, responder: &Replica, run: &Run) {
        let covered = |needs: &Outcome, key: u128| {
            needs.need_keys.contains(&key) || needs.need_prefixes.iter().any(|prefix| prefix.contains(key))
        };
        for key in difference(asker, responder) {
            if responder.tree.get(key).is_some() {
                assert!(covered(&run.asker_needs, key), "asker missed {key:x}");
            }
            if asker.tree.get(key).is_some() {
                assert!(covered(&run.responder_needs, key), "responder missed {key:x}");
            }
        }
        for key in &run.asker_needs.need_keys {
            assert_ne!(
                asker.tree.get(*key),
                responder.tree.get(*key),
                "asker pulls an equal key"
            );
        }
        for key in &run.responder_needs.need_keys {
            assert_ne!(
                asker.tree.get(*key),
                responder.tree.get(*key),
                "responder pulls an equal key"
            );
        }
        let (mut asker_after, mut responder_after) = (asker.clone(), responder.clone());
        asker_after.pull(responder, &run.asker_needs);
        responder_after.pull(asker, &run.responder_needs);
        let keys = |replica: &Replica| replica.tree.iter().map(|(key, _)| *key).collect::<Vec<_>>();
        assert_eq!(keys(&asker_after), keys(&responder_after));
    }

    fn time_ordered(value: u64) -> u128 {
        (u128::from(1_767_000_000_000u64 + value % 10_000_000_000) << 80) | u128::from(value)
    }

    #[derive(Clone, Copy, Debug)]
    enum Layout {
        Random,
        Clustered,
        Empty,
        Identical,
    }

    fn replicas(
        layout: Layout,
        shared: &BTreeSet<u64>,
        only_a: &BTreeSet<u64>,
        only_b: &BTreeSet<u64>,
        changed: &BTreeSet<u64>,
    ) -> (Replica, Replica) {
        let length = SketchCells::length_for(shared.len() as u64).max(256);
        let (mut a, mut b) = (Replica::new(length), Replica::new(length));
        match layout {
            Layout::Identical => {
                for value in shared {
                    a.set(time_ordered(*value), state(time_ordered(*value), 0));
                    b.set(time_ordered(*value), state(time_ordered(*value), 0));
                }
            }
            Layout::Empty => {
                for value in shared.iter().chain(only_b) {
                    b.set(time_ordered(*value), state(time_ordered(*value), 0));
                }
            }
            Layout::Random => {
                for value in shared {
                    let key = time_ordered(*value);
                    a.set(key, state(key, 0));
                    b.set(key, state(key, u8::from(changed.contains(value))));
                }
                for value in only_a {
                    a.set(time_ordered(*value), state(time_ordered(*value), 0));
                }
                for value in only_b {
                    b.set(time_ordered(*value), state(time_ordered(*value), 0));
                }
            }
            Layout::Clustered => {
                for value in shared {
                    a.set(
                        time_ordered(*value % 1_000_000_000),
                        state(time_ordered(*value % 1_000_000_000), 0),
                    );
                    b.set(
                        time_ordered(*value % 1_000_000_000),
                        state(time_ordered(*value % 1_000_000_000), 0),
                    );
                }
                // The newest records, on one side only.
                for value in only_b {
                    let key = time_ordered(9_000_000_000 + *value % 1_000_000);
                    b.set(key, state(key, 0));
                }
            }
        }
        (a, b)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn two_random_replicas_learn_exactly_their_difference(
            shared in proptest::collection::btree_set(any::<u64>(), 0..600),
            only_a in proptest::collection::btree_set(any::<u64>(), 0..40),
            only_b in proptest::collection::btree_set(any::<u64>(), 0..40),
            changed in proptest::collection::btree_set(any::<u64>(), 0..20),
            layout in prop_oneof![Just(Layout::Random), Just(Layout::Clustered), Just(Layout::Empty), Just(Layout::Identical)],
            swap in any::<bool>(),
        ) {
            let changed: BTreeSet<u64> = changed.into_iter().chain(shared.iter().take(changed_count(&shared)).copied()).collect();
            let (a, b) = replicas(layout, &shared, &only_a, &only_b, &changed);
            let (asker, responder) = if swap { (&b, &a) } else { (&a, &b) };
            let limits = SessionLimits {
                sync: SyncLimits { leaf_threshold: 4, exact_threshold: 16, ..SyncLimits::default() },
                ..SessionLimits::default()
            };
            let outcome = run(asker, responder, &limits);
            assert_exact(asker, responder, &outcome);
            if matches!(layout, Layout::Identical) {
                prop_assert_eq!(outcome.messages, 1);
            }
        }
    }

    fn changed_count(shared: &BTreeSet<u64>) -> usize {
        shared.len() % 7
    }

    /// The `value`th of `count` IDs spread evenly over a year, oldest first.
    fn spread_over_a_year(value: u64, count: u64) -> u128 {
        let millis = 1_735_689_600_000 + value * (31_536_000_000 / count);
        (u128::from(millis) << 80) | u128::from(value)
    }

    fn big_pair(count: u64, difference: u64, scattered: bool) -> (Replica, Replica) {
        let length = SketchCells::length_for(count);
        let (mut a, mut b) = (Replica::new(length), Replica::new(length));
        for value in 0..count {
            let key = spread_over_a_year(value, count);
            let hash = state(key, 0);
            b.set(key, hash);
            let missing = if scattered {
                value % (count / difference) == 3 && value / (count / difference) < difference
            } else {
                value >= count - difference
            };
            if !missing {
                a.set(key, hash);
            }
        }
        (a, b)
    }

    #[test]
    fn one_difference_settles_in_one_round_trip() {
        for scattered in [true, false] {
            let (a, b) = big_pair(20_000, 1, scattered);
            let run = run(&a, &b, &SessionLimits::default());
            assert_exact(&a, &b, &run);
            assert_eq!(run.messages, 2);
            assert!(!run.used_trie);
            assert!(run.bytes < 300, "{} bytes", run.bytes);
        }
    }

    #[test]
    fn a_state_change_on_each_side_settles_in_one_round_trip() {
        let (mut a, b) = big_pair(5_000, 1, false);
        let key = spread_over_a_year(17, 5_000);
        a.set(key, state(key, 9));
        let run = run(&a, &b, &SessionLimits::default());
        assert_exact(&a, &b, &run);
        assert!(run.asker_needs.need_keys.contains(&key) && run.responder_needs.need_keys.contains(&key));
    }

    #[test]
    fn scattered_differences_use_sketches_and_clustered_ones_the_trie() {
        let (a, b) = big_pair(50_000, 200, true);
        let scattered = run(&a, &b, &SessionLimits::default());
        assert_exact(&a, &b, &scattered);
        assert!(!scattered.used_trie);
        assert!(scattered.messages <= 4);
        assert!(scattered.bytes < 200 * 48, "{} bytes", scattered.bytes);
        let (a, b) = big_pair(50_000, 200, false);
        let clustered = run(&a, &b, &SessionLimits::default());
        assert_exact(&a, &b, &clustered);
        assert!(clustered.used_trie);
    }

    /// `count` IDs written over 20 seconds across a 65,536 ms boundary, as a bulk load may make
    /// them: the trie's first branching node has two children only.
    fn loaded_in_seconds(value: u64, count: u64) -> u128 {
        let millis = 1_767_225_612_528 + value * 20_000 / count;
        (u128::from(millis) << 80) | u128::from(value.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    #[test]
    fn newest_states_of_a_quick_load_go_to_the_trie() {
        let count = 20_000;
        let length = SketchCells::length_for(count);
        let (mut a, mut b) = (Replica::new(length), Replica::new(length));
        for value in 0..count {
            let key = loaded_in_seconds(value, count);
            a.set(key, state(key, 0));
            b.set(key, state(key, u8::from(value >= count - 100)));
        }
        let run = run(&a, &b, &SessionLimits::default());
        assert_exact(&a, &b, &run);
        assert!(run.used_trie, "one differing child among few is a clustered difference");
    }

    #[test]
    fn an_opening_without_cells_still_streams_cells_for_scattered_differences() {
        let limits = SessionLimits {
            opening_cells: 0,
            ..SessionLimits::default()
        };
        let (a, mut b) = big_pair(30_000, 1, true);
        for value in (0..30_000).step_by(300) {
            let key = spread_over_a_year(value, 30_000);
            b.set(key, state(key, 5));
        }
        let scattered = run(&a, &b, &limits);
        assert_exact(&a, &b, &scattered);
        assert!(!scattered.used_trie);
        let (a, b) = big_pair(30_000, 100, false);
        let clustered = run(&a, &b, &limits);
        assert_exact(&a, &b, &clustered);
        assert!(clustered.used_trie);
    }

    #[test]
    fn a_difference_too_large_for_the_cells_goes_to_the_trie() {
        let (a, b) = big_pair(4_000, 1_000, true);
        let run = run(&a, &b, &SessionLimits::default());
        assert_exact(&a, &b, &run);
        assert!(run.used_trie);
    }

    #[test]
    fn colliding_tags_are_caught_by_the_summaries() {
        // Same IDs, one state differs, but the sketches were built as if the states were equal:
        // the decoder sees no difference and the summaries send the session to the trie.
        let (a, mut b) = big_pair(3_000, 0, false);
        let key = spread_over_a_year(5, 3_000);
        b.tree.insert(key, state(key, 4)); // the trie changes, the sketch does not
        let run = run(&a, &b, &SessionLimits::default());
        assert!(run.used_trie);
        assert!(run.asker_needs.need_keys.contains(&key));
    }

    #[test]
    fn a_late_reply_times_out() {
        let (a, b) = big_pair(1_000, 10, true);
        let limits = SessionLimits::default();
        let (mut session, open) = Asker::open(&a.tree, &a.sketch, &limits, 0).unwrap();
        let (reply, _) = respond(&b.tree, &b.sketch, &open, &limits).unwrap();
        assert!(matches!(
            session.on_reply(&a.tree, &a.sketch, reply, limits.timeout_millis + 1),
            Err(SessionError::TimedOut)
        ));
    }

    #[test]
    fn hostile_messages_are_refused_or_bounded() {
        let limits = SessionLimits::default();
        let (a, b) = big_pair(2_000, 20, true);
        // A responder that answers with garbage cells: the asker asks for more within its
        // bounds, then descends; it never loops or panics.
        let (mut session, _) = Asker::open(&a.tree, &a.sketch, &limits, 0).unwrap();
        let garbage: Vec<Cell> = (0..64u128)
            .map(|value| Cell {
                id_sum: value * 0x1234_5678_9abc_def1,
                checksum_sum: value as u64,
                tag_sum: value as u32,
                count: 1,
            })
            .collect();
        let step = session
            .on_reply(
                &a.tree,
                &a.sketch,
                Some(Message::Cells {
                    length: u64::MAX,
                    start: 0,
                    cells: garbage.clone(),
                }),
                1,
            )
            .unwrap();
        assert!(
            matches!(step, Step::Send(Message::More { .. } | Message::Trie(_))),
            "{step:?}"
        );
        assert!(session
            .on_reply(
                &a.tree,
                &a.sketch,
                Some(Message::Cells {
                    length: 64,
                    start: 7,
                    cells: garbage
                }),
                1
            )
            .is_err());
        // Replies out of place are refused.
        assert!(matches!(
            session.on_reply(&a.tree, &a.sketch, Some(Message::More { start: 0, end: 1 }), 1),
            Err(SessionError::Unexpected(_))
        ));
        assert!(matches!(
            respond(&b.tree, &b.sketch, &Message::Settled { you_lack: vec![] }, &limits),
            Err(SessionError::Unexpected(_))
        ));
        // A responder asked for far more than a batch sends at most a batch.
        let (reply, _) = respond(
            &b.tree,
            &b.sketch,
            &Message::More {
                start: 0,
                end: u64::MAX,
            },
            &limits,
        )
        .unwrap();
        assert!(matches!(reply, Some(Message::Cells { cells, .. }) if cells.len() as u64 <= limits.max_batch));
        // Wire: bad versions, lengths and ranges.
        let wire = |version: u8, message: WireMessage| {
            cbor4ii::serde::to_vec(Vec::new(), &SessionWire(version, message)).unwrap()
        };
        let samples = [
            wire(SESSION_VERSION + 1, WireMessage::More(0, 1)),
            wire(SESSION_VERSION, WireMessage::More(5, 5)),
            wire(SESSION_VERSION, WireMessage::More(0, u64::MAX)),
            wire(SESSION_VERSION, WireMessage::YouLack(ByteString(vec![0; 17]))),
            wire(SESSION_VERSION, WireMessage::Cells(1, ByteString(vec![1, 0, 0]))),
            wire(
                SESSION_VERSION,
                WireMessage::Open(1, ByteString(vec![0]), ByteString(sync::encode(&[]))),
            ),
            wire(
                SESSION_VERSION,
                WireMessage::Open(1, ByteString(vec![0; 2]), ByteString(sync::encode(&[]))),
            ),
            vec![0x82, sync::SYNC_VERSION, 0xff],
            vec![0xff; 40],
            vec![],
        ];
        for sample in samples {
            assert!(decode(&sample, &limits).is_err(), "{sample:?} should be refused");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// A responder that answers every request with cells of its choosing (random sums and
        /// counts, or forged pure cells of elements the asker does not hold): the asker stays
        /// within its caps and ends the sketch part of the session in a bounded number of steps.
        #[test]
        fn hostile_cell_streams_end_within_the_caps(
            seed in any::<u64>(),
            forged in any::<bool>(),
            claimed_length in any::<u64>(),
            max_cells in 64u64..4096,
        ) {
            let (a, _) = big_pair(3_000, 0, false);
            let limits = SessionLimits {
                decoder: DecoderLimits { max_cells },
                ..SessionLimits::default()
            };
            let (mut session, _) = Asker::open(&a.tree, &a.sketch, &limits, 0).unwrap();
            let mut random = seed | 1;
            let mut next = move || {
                random ^= random << 13;
                random ^= random >> 7;
                random ^= random << 17;
                random
            };
            let key = *a.sketch.key();
            let mut reply = Message::Cells { length: claimed_length, start: 0, cells: Vec::new() };
            let mut ended = false;
            for step in 0..64 {
                if let Message::Cells { start, .. } = reply {
                    let count = 1 + next() % 300;
                    let cells = (start..start + count)
                        .map(|index| {
                            let mut cell = a.sketch.cells(index, index + 1).first().copied().unwrap_or_default();
                            if forged {
                                let element = Element { id: u128::from(next()), tag: next() as u32 };
                                let mut lone = SketchCells::new(key, index + 1);
                                lone.insert(element.id, &[index as u8; 32]);
                                let added = lone.cells(index, index + 1)[0];
                                cell.id_sum ^= added.id_sum;
                                cell.tag_sum ^= added.tag_sum;
                                cell.checksum_sum ^= added.checksum_sum;
                                cell.count += added.count;
                            } else {
                                cell.id_sum ^= u128::from(next());
                                cell.count = cell.count.wrapping_add((next() % 5) as i64 - 2);
                                cell.checksum_sum ^= next();
                            }
                            cell.truncated(index)
                        })
                        .collect();
                    reply = Message::Cells { length: claimed_length, start, cells };
                }
                match session.on_reply(&a.tree, &a.sketch, Some(reply.clone()), 0) {
                    Ok(Step::Send(Message::More { start, end })) => {
                        prop_assert!(end <= max_cells.min(a.sketch.length()));
                        prop_assert!(start < end);
                        reply = Message::Cells { length: claimed_length, start, cells: Vec::new() };
                    }
                    Ok(Step::Send(Message::Trie(_))) | Ok(Step::Finished { .. }) | Err(_) => {
                        ended = true;
                        break;
                    }
                    Ok(other) => prop_assert!(false, "step {}: {:?}", step, other),
                }
            }
            prop_assert!(ended, "the asker kept asking for cells");
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
            let limits = SessionLimits::default();
            if let Ok(message) = decode(&bytes, &limits) {
                let replica = Replica::new(64);
                let _ = respond(&replica.tree, &replica.sketch, &message, &limits);
                let (mut session, _) = Asker::open(&replica.tree, &replica.sketch, &limits, 0).unwrap();
                let _ = session.on_reply(&replica.tree, &replica.sketch, Some(message), 0);
            }
        }
    }
}
