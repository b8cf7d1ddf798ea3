//! Range reconciliation over the Merkle trie: a pure, stateless state machine.
//!
//! Two replicas of one trie (a mailbox, or the node's directory of mailboxes) find exactly which
//! keys differ and each learns what it lacks. No leader: either side may start, and both run the
//! same [`respond`] function; a responder keeps no state between messages, so a request can be
//! answered by whichever worker receives it and a hostile peer cannot pin memory on the other side.
//!
//! # Protocol
//! A message is a list of independent [`Element`]s about trie nodes ([`Prefix`]es):
//!
//! - `Children(P, summaries)`: "here are my counts and fingerprints for the non-empty children of
//!   P". The receiver compares each child with its own: equal children are done; a child only the
//!   sender has is pulled whole (it becomes a `need_prefix`); a child only the receiver has is
//!   announced with `YouLackAll`; a differing child is descended into — the receiver lists its
//!   leaves if it has few (at most `leaf_threshold`), asks the sender for its list if the sender
//!   has few (`ListRequest`), and otherwise sends the child's own `Children`.
//! - `Leaves(P, keys and 8-byte leaf tags)`: "these are all my leaves in P". The receiver computes
//!   the exact difference (keys it lacks or holds in another state become `need_keys`; keys the
//!   sender lacks go back in one `YouLack`).
//! - `ListRequest(P)`: "send me your leaves in P".
//! - `Tags(P, check, tags)`: "my leaves in P are keys whose [`list_check`] is `check`, and these
//!   are their 8-byte tags in key order". Sent instead of `Leaves` where the receiver's summary
//!   counts as many leaves as the sender's: after a flag heal both sides hold the same keys, and a
//!   list of tags alone is a third of the bytes. The receiver compares by position when its own
//!   keys have the same check (answering with a `Differ`), and sends its own `Leaves` otherwise, so
//!   equal counts over different keys cost one more message, never a wrong answer.
//! - `TagRequest(P)`: "send me your `Tags` in P"; a `ListRequest` where the counts are equal.
//! - `YouLack(keys)` and `YouLackAll(P)`: what the receiver should pull from the sender: keys and
//!   prefixes it does not hold at all (so their records travel with their message bytes).
//! - `Differ(P, check, bits)`: "of the leaves you listed in P, those whose bit is set are held here
//!   in another state". Both sides hold those messages, so only their [`RecordState`]s travel: the
//!   sender of `Differ` sends its states with the same message (in bit order), the receiver merges
//!   them and sends back only the merged states that hold more than what it got ([`merge_state`]):
//!   by position when it answers the message that brought them, with their IDs otherwise. `check` (8 bytes of a hash of the listed keys) lets the receiver refuse to
//!   map the bits onto a list that has changed since it sent it.
//!
//! A side expanding a node whose leaves all sit in one child expands that child too in the same
//! message, so the constant high nibbles of time-ordered IDs cost bytes, not round trips. A trie
//! of at most `initial_list_threshold` leaves opens with its whole list instead: a small mailbox
//! settles in one round trip and one range read.
//! Each exchange descends at least one level, so a session ends within about 2 x 32 messages; in
//! practice log16(n) + 2 round trips. An empty reply ends the session.
//!
//! Bytes: a differing subtree costs 16 summaries (about 10 bytes each) per level and, at the
//! bottom, a leaf list of at most `leaf_threshold` entries of 24 bytes; subtrees present on one side
//! only cost one prefix. Fingerprints are hashes of the aggregates, never raw sums.
//!
//! # Wire form
//! A [`SyncMessage`] is CBOR: `[version, [element...]]`, each element a one-letter tagged array whose
//! bulk (summaries, leaves, keys) is a packed byte string. Decoding checks every length before
//! using it and refuses unknown versions, unsorted or out-of-prefix keys, and oversized lists.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::crdt;
use crate::merkle::{Fingerprint, Prefix, Summary, TreeView, KEY_NIBBLES};
use crate::model::{Flag, FlagRegister, MessageRecord, NodeId, Stamp};

/// The protocol version this build speaks. Version 2: `Differ` elements, and leaf lists that
/// leave out the key bytes their prefix fixes. Version 3: `Tags` and `TagRequest`.
pub const SYNC_VERSION: u8 = 3;

/// Tuning and safety limits for one side of reconciliation.
#[derive(Clone, Copy, Debug)]
pub struct SyncLimits {
    /// A differing node with at most this many leaves is listed instead of split.
    pub leaf_threshold: u64,
    /// A node of at most this many leaves whose differing children would each go by position
    /// (`Tags`: equal counts on both sides, as after a flag heal) goes as one `Tags` element
    /// over the whole node when that is fewer bytes than one element per child. Capped by
    /// `exact_threshold`.
    pub tag_threshold: u64,
    /// A received leaf list is compared directly when this side holds at most this many leaves
    /// in the same prefix; above it, this side splits the prefix instead.
    pub exact_threshold: u64,
    /// A session's first message lists every leaf when the whole trie holds at most this many
    /// (at most `exact_threshold`): one range read and one round trip for a small mailbox,
    /// instead of a walk down the levels its time-ordered IDs share.
    pub initial_list_threshold: u64,
    /// The most elements a received message may carry.
    pub max_elements: usize,
    /// The most keys one received element may carry.
    pub max_keys_per_element: usize,
    /// This side asks the questions (it sends requests, the other side only answers): where both
    /// could list a small differing child, it asks for the other side's list instead of sending
    /// its own, so it is the one that finds differing states. The answering side keeps nothing
    /// between messages; the asking side remembers the states it sent, so merged states can come
    /// back by position instead of by key.
    pub asks: bool,
}

impl Default for SyncLimits {
    fn default() -> Self {
        SyncLimits {
            leaf_threshold: 12,
            tag_threshold: 128,
            exact_threshold: 256,
            initial_list_threshold: 48,
            max_elements: 50_000,
            max_keys_per_element: 65_536,
            asks: false,
        }
    }
}

/// Why a message could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("malformed sync message: {0}")]
    Malformed(String),
    #[error("sync message version {0} is not supported (this node speaks {SYNC_VERSION})")]
    UnsupportedVersion(u8),
    #[error("sync message exceeds a limit: {0}")]
    LimitExceeded(String),
    #[error("reading the local tree failed: {0}")]
    Store(#[source] Box<dyn std::error::Error + Send + Sync>),
}

fn store_error<E: std::error::Error + Send + Sync + 'static>(error: E) -> SyncError {
    SyncError::Store(Box::new(error))
}

/// One leaf as listed on the wire: key and the first 8 bytes of its leaf hash.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct LeafTag {
    pub key: u128,
    pub tag: [u8; 8],
}

impl LeafTag {
    fn of(key: u128, hash: &[u8; 32]) -> Self {
        let mut tag = [0u8; 8];
        tag.copy_from_slice(&hash[..8]);
        LeafTag { key, tag }
    }
}

/// One statement about the trie. See the module doc.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Element {
    Children {
        prefix: Prefix,
        children: Vec<(u8, Summary)>,
    },
    Leaves {
        prefix: Prefix,
        leaves: Vec<LeafTag>,
    },
    ListRequest {
        prefix: Prefix,
    },
    /// The sender's leaves of `prefix` by position: [`list_check`] of their keys, and their tags.
    Tags {
        prefix: Prefix,
        check: [u8; 8],
        tags: Vec<[u8; 8]>,
    },
    TagRequest {
        prefix: Prefix,
    },
    YouLack {
        keys: Vec<u128>,
    },
    YouLackAll {
        prefix: Prefix,
    },
    Differ {
        prefix: Prefix,
        /// [`list_check`] of the keys of the list the bits refer to.
        check: [u8; 8],
        /// Bit `i` (byte `i / 8`, least significant bit first) marks the `i`-th listed leaf.
        bits: Vec<u8>,
    },
}

/// What one side learned it must pull from the other.
#[derive(Clone, Default, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Keys the other side holds and this side lacks or holds in another state.
    pub need_keys: Vec<u128>,
    /// Prefixes in which this side holds nothing and the other side holds something.
    pub need_prefixes: Vec<Prefix>,
    /// Keys both sides hold in different states, found here in the other side's leaf list and
    /// named by a `Differ` of this side's reply, in bit order: this side's [`RecordState`]s of them
    /// go with that reply, in this order. Also in `need_keys`.
    pub differing: Vec<u128>,
    /// One entry per bit set in the other side's `Differ` elements, in order: the key, or `None`
    /// when this side's leaves in that prefix are no longer the list the bits refer to. The other
    /// side's states came with its message in this order. Known keys are also in `need_keys`.
    pub told_differing: Vec<Option<u128>>,
}

impl Outcome {
    /// Adds another outcome.
    pub fn extend(&mut self, other: Outcome) {
        self.need_keys.extend(other.need_keys);
        self.need_prefixes.extend(other.need_prefixes);
        self.differing.extend(other.differing);
        self.told_differing.extend(other.told_differing);
    }

    /// Whether nothing needs pulling.
    pub fn is_empty(&self) -> bool {
        self.need_keys.is_empty() && self.need_prefixes.is_empty()
    }

    /// Sorts and removes duplicates, and keys already covered by a needed prefix.
    pub fn normalize(&mut self) {
        self.need_prefixes.sort();
        self.need_prefixes.dedup();
        let prefixes = self.need_prefixes.clone();
        self.need_keys.sort_unstable();
        self.need_keys.dedup();
        self.need_keys
            .retain(|key| !prefixes.iter().any(|prefix| prefix.contains(*key)));
    }
}

/// The first message of a session: the whole trie as seen from this side.
pub fn initial<V: TreeView>(view: &V, limits: &SyncLimits) -> Result<Vec<Element>, SyncError> {
    let root = view.aggregate(Prefix::ROOT).map_err(store_error)?;
    let mut out = Vec::new();
    let list_threshold = limits
        .initial_list_threshold
        .min(limits.exact_threshold)
        .max(limits.leaf_threshold);
    if root.count <= list_threshold {
        out.push(leaves_element(view, Prefix::ROOT, list_threshold)?);
    } else {
        expand(view, Prefix::ROOT, limits, &mut out)?;
    }
    Ok(out)
}

/// Handles a received message: returns the reply (empty when this side has nothing more to say)
/// and what this side must pull.
pub fn respond<V: TreeView>(
    view: &V,
    incoming: &[Element],
    limits: &SyncLimits,
) -> Result<(Vec<Element>, Outcome), SyncError> {
    if incoming.len() > limits.max_elements {
        return Err(SyncError::LimitExceeded(format!(
            "{} elements, at most {} allowed",
            incoming.len(),
            limits.max_elements
        )));
    }
    let expanded: HashSet<Prefix> = incoming
        .iter()
        .filter_map(|element| match element {
            Element::Children { prefix, .. } => Some(*prefix),
            _ => None,
        })
        .collect();
    let mut reply = Vec::new();
    let mut outcome = Outcome::default();
    let mut you_lack = Vec::new();
    for element in incoming {
        match element {
            Element::Children { prefix, children } => {
                on_children(view, *prefix, children, &expanded, limits, &mut reply, &mut outcome)?
            }
            Element::Leaves { prefix, leaves } => {
                on_leaves(view, *prefix, leaves, limits, &mut reply, &mut outcome, &mut you_lack)?
            }
            Element::ListRequest { prefix } | Element::TagRequest { prefix } => {
                let mine = view.aggregate(*prefix).map_err(store_error)?;
                if mine.count > limits.exact_threshold {
                    expand(view, *prefix, limits, &mut reply)?;
                } else if matches!(element, Element::TagRequest { .. }) {
                    reply.push(tags_element(view, *prefix, limits.exact_threshold)?);
                } else {
                    reply.push(leaves_element(view, *prefix, limits.exact_threshold)?);
                }
            }
            Element::Tags { prefix, check, tags } => {
                on_tags(view, *prefix, check, tags, limits, &mut reply, &mut outcome)?
            }
            Element::YouLack { keys } => outcome.need_keys.extend(keys.iter().copied()),
            Element::YouLackAll { prefix } => outcome.need_prefixes.push(*prefix),
            Element::Differ { prefix, check, bits } => on_differ(view, *prefix, check, bits, limits, &mut outcome)?,
        }
    }
    if !you_lack.is_empty() {
        reply.push(Element::YouLack { keys: you_lack });
    }
    Ok((reply, outcome))
}

fn on_children<V: TreeView>(
    view: &V,
    prefix: Prefix,
    theirs: &[(u8, Summary)],
    expanded: &HashSet<Prefix>,
    limits: &SyncLimits,
    reply: &mut Vec<Element>,
    outcome: &mut Outcome,
) -> Result<(), SyncError> {
    let mut their_children: [Option<Summary>; 16] = [None; 16];
    for (index, summary) in theirs {
        their_children[usize::from(*index & 15)] = Some(*summary);
    }
    let mine = view.child_aggregates(prefix).map_err(store_error)?;
    // Children that go by position (`Tags`, or a `TagRequest` when asking), with their counts,
    // and whether every child either agrees or goes that way (then all of `prefix` may go as one
    // element instead, see below).
    let mut by_position: Vec<(Prefix, u64)> = Vec::new();
    let mut only_by_position = true;
    let mut total = 0u64;
    let start = reply.len();
    for index in 0..16u8 {
        let Some(child) = prefix.child(index) else { continue };
        let my_aggregate = mine[usize::from(index)];
        total = total.saturating_add(my_aggregate.count);
        if expanded.contains(&child) {
            only_by_position = false;
            continue; // the sender described this child in the same message
        }
        match their_children[usize::from(index)] {
            None if my_aggregate.is_empty() => {}
            None => {
                only_by_position = false;
                reply.push(Element::YouLackAll { prefix: child })
            }
            Some(summary) if summary.count == 0 && my_aggregate.is_empty() => {}
            Some(summary) if summary == my_aggregate.summary() => {}
            Some(_) if my_aggregate.is_empty() => {
                only_by_position = false;
                outcome.need_prefixes.push(child)
            }
            Some(summary) => {
                let they_list = summary.count <= limits.leaf_threshold && my_aggregate.count <= limits.exact_threshold;
                // Equal counts: most likely the same keys in other states (a flag heal), so the
                // list goes by position.
                let same_count = summary.count == my_aggregate.count;
                if same_count && my_aggregate.count <= limits.leaf_threshold {
                    by_position.push((child, my_aggregate.count));
                } else {
                    only_by_position = false;
                }
                if my_aggregate.count <= limits.leaf_threshold && !(limits.asks && they_list) {
                    reply.push(if same_count {
                        tags_element(view, child, limits.leaf_threshold)?
                    } else {
                        leaves_element(view, child, limits.leaf_threshold)?
                    });
                } else if they_list {
                    reply.push(if same_count {
                        Element::TagRequest { prefix: child }
                    } else {
                        Element::ListRequest { prefix: child }
                    });
                } else {
                    expand(view, child, limits, reply)?;
                }
            }
        }
    }
    // Where differences are dense (a clustered flag heal: the newest messages, read), most
    // children differ and each would go as its own small element, about 25 bytes of prefix,
    // check and framing beside 8 bytes a leaf. One element over the whole prefix (its agreeing
    // children's tags included) is sent instead when that costs fewer bytes. Both sides count as
    // many leaves in `prefix`, since every child either agrees or has equal counts.
    const ELEMENT_BYTES: u64 = 25;
    let separate: u64 = by_position.iter().map(|(_, count)| count * 8 + ELEMENT_BYTES).sum();
    let whole = total * 8 + ELEMENT_BYTES;
    if only_by_position
        && by_position.len() > 1
        && total <= limits.tag_threshold.min(limits.exact_threshold)
        && whole < separate
    {
        reply.truncate(start);
        // An asking side requests the lists it would have requested child by child.
        reply.push(if limits.asks {
            Element::TagRequest { prefix }
        } else {
            tags_element(view, prefix, limits.tag_threshold.min(limits.exact_threshold))?
        });
    }
    Ok(())
}

fn on_leaves<V: TreeView>(
    view: &V,
    prefix: Prefix,
    theirs: &[LeafTag],
    limits: &SyncLimits,
    reply: &mut Vec<Element>,
    outcome: &mut Outcome,
    you_lack: &mut Vec<u128>,
) -> Result<(), SyncError> {
    let Some(mine) = leaves_to_compare(view, prefix, limits, reply)? else {
        return Ok(());
    };
    let (mut mine_index, mut their_index) = (0, 0);
    let mut differ_bits: Vec<u8> = Vec::new();
    while mine_index < mine.len() || their_index < theirs.len() {
        match (mine.get(mine_index), theirs.get(their_index)) {
            (Some(my_leaf), Some(their_leaf)) if my_leaf.key == their_leaf.key => {
                if my_leaf.tag != their_leaf.tag {
                    outcome.need_keys.push(my_leaf.key);
                    outcome.differing.push(my_leaf.key);
                    if differ_bits.is_empty() {
                        differ_bits = vec![0u8; theirs.len().div_ceil(8)];
                    }
                    differ_bits[their_index / 8] |= 1 << (their_index % 8);
                }
                mine_index += 1;
                their_index += 1;
            }
            (Some(my_leaf), Some(their_leaf)) if my_leaf.key < their_leaf.key => {
                you_lack.push(my_leaf.key);
                mine_index += 1;
            }
            (Some(my_leaf), None) => {
                you_lack.push(my_leaf.key);
                mine_index += 1;
            }
            (_, Some(their_leaf)) => {
                outcome.need_keys.push(their_leaf.key);
                their_index += 1;
            }
            (None, None) => break,
        }
    }
    if !differ_bits.is_empty() {
        reply.push(Element::Differ {
            prefix,
            check: list_check(theirs.iter().map(|leaf| leaf.key)),
            bits: differ_bits,
        });
    }
    Ok(())
}

/// This side's leaves of `prefix`, to compare with a list the other side sent; `None` when this
/// side holds too many to compare directly and has split the prefix into `reply` instead.
fn leaves_to_compare<V: TreeView>(
    view: &V,
    prefix: Prefix,
    limits: &SyncLimits,
    reply: &mut Vec<Element>,
) -> Result<Option<Vec<LeafTag>>, SyncError> {
    let mine_aggregate = view.aggregate(prefix).map_err(store_error)?;
    if mine_aggregate.count > limits.exact_threshold {
        expand(view, prefix, limits, reply)?;
        return Ok(None);
    }
    let limit = usize::try_from(limits.exact_threshold).unwrap_or(usize::MAX);
    Ok(Some(
        view.leaves(prefix, limit)
            .map_err(store_error)?
            .iter()
            .map(|(key, hash)| LeafTag::of(*key, hash))
            .collect(),
    ))
}

/// Compares the other side's leaves of `prefix`, sent by position, with this side's: with the same
/// keys, the positions whose tags differ go back in a `Differ`; with other keys (equal counts over
/// different sets), this side sends its own list and the other side finds the difference.
fn on_tags<V: TreeView>(
    view: &V,
    prefix: Prefix,
    check: &[u8; 8],
    theirs: &[[u8; 8]],
    limits: &SyncLimits,
    reply: &mut Vec<Element>,
    outcome: &mut Outcome,
) -> Result<(), SyncError> {
    let Some(mine) = leaves_to_compare(view, prefix, limits, reply)? else {
        return Ok(());
    };
    if mine.len() != theirs.len() || list_check(mine.iter().map(|leaf| leaf.key)) != *check {
        reply.push(Element::Leaves { prefix, leaves: mine });
        return Ok(());
    }
    let mut bits: Vec<u8> = Vec::new();
    for (position, (my_leaf, their_tag)) in mine.iter().zip(theirs).enumerate() {
        if my_leaf.tag != *their_tag {
            outcome.need_keys.push(my_leaf.key);
            outcome.differing.push(my_leaf.key);
            if bits.is_empty() {
                bits = vec![0u8; theirs.len().div_ceil(8)];
            }
            bits[position / 8] |= 1 << (position % 8);
        }
    }
    if !bits.is_empty() {
        reply.push(Element::Differ {
            prefix,
            check: *check,
            bits,
        });
    }
    Ok(())
}

/// 8 bytes of a hash of a list of keys: what a `Differ` element's bits refer to.
pub fn list_check(keys: impl IntoIterator<Item = u128>) -> [u8; 8] {
    let mut hasher = blake3::Hasher::new();
    for key in keys {
        hasher.update(&key.to_be_bytes());
    }
    let mut check = [0u8; 8];
    check.copy_from_slice(&hasher.finalize().as_bytes()[..8]);
    check
}

/// The positions of the set bits of a `Differ` bitmap, in order.
pub fn set_bits(bits: &[u8]) -> impl Iterator<Item = usize> + '_ {
    bits.iter().enumerate().flat_map(|(byte_index, byte)| {
        (0..8)
            .filter(move |bit| byte & (1 << bit) != 0)
            .map(move |bit| byte_index * 8 + bit)
    })
}

/// Maps a received `Differ` onto this side's own leaves of `prefix` (the list it sent).
fn on_differ<V: TreeView>(
    view: &V,
    prefix: Prefix,
    check: &[u8; 8],
    bits: &[u8],
    limits: &SyncLimits,
    outcome: &mut Outcome,
) -> Result<(), SyncError> {
    // This side lists at most this many leaves; a longer list was never sent.
    let longest = limits
        .exact_threshold
        .max(limits.leaf_threshold)
        .max(limits.initial_list_threshold);
    let longest = usize::try_from(longest).unwrap_or(usize::MAX);
    let keys: Vec<u128> = view
        .leaves(prefix, longest.saturating_add(1))
        .map_err(store_error)?
        .iter()
        .map(|(key, _)| *key)
        .collect();
    let usable = keys.len() <= longest && list_check(keys.iter().copied()) == *check;
    for position in set_bits(bits) {
        let key = if usable { keys.get(position).copied() } else { None };
        if let Some(key) = key {
            outcome.need_keys.push(key);
        }
        outcome.told_differing.push(key);
    }
    Ok(())
}

fn leaves_element<V: TreeView>(view: &V, prefix: Prefix, limit: u64) -> Result<Element, SyncError> {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let leaves = view
        .leaves(prefix, limit)
        .map_err(store_error)?
        .iter()
        .map(|(key, hash)| LeafTag::of(*key, hash))
        .collect();
    Ok(Element::Leaves { prefix, leaves })
}

fn tags_element<V: TreeView>(view: &V, prefix: Prefix, limit: u64) -> Result<Element, SyncError> {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let leaves = view.leaves(prefix, limit).map_err(store_error)?;
    Ok(Element::Tags {
        prefix,
        check: list_check(leaves.iter().map(|(key, _)| *key)),
        tags: leaves.iter().map(|(key, hash)| LeafTag::of(*key, hash).tag).collect(),
    })
}

/// Sends the children of `prefix`; while this side's leaves all sit in one child that is still
/// too big to list, that child is expanded too, in the same message.
fn expand<V: TreeView>(view: &V, prefix: Prefix, limits: &SyncLimits, out: &mut Vec<Element>) -> Result<(), SyncError> {
    let mut current = prefix;
    loop {
        let children = view.child_aggregates(current).map_err(store_error)?;
        let present: Vec<(u8, Summary)> = children
            .iter()
            .enumerate()
            .filter(|(_, aggregate)| !aggregate.is_empty())
            .map(|(index, aggregate)| (index as u8, aggregate.summary()))
            .collect();
        let only_child = match present.as_slice() {
            [(index, summary)] if summary.count > limits.leaf_threshold && current.depth() + 1 < KEY_NIBBLES => {
                current.child(*index)
            }
            _ => None,
        };
        out.push(Element::Children {
            prefix: current,
            children: present,
        });
        match only_child {
            Some(child) => current = child,
            None => return Ok(()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Wire form
// ---------------------------------------------------------------------------------------------

/// A CBOR byte string.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct ByteString(pub Vec<u8>);

impl Serialize for ByteString {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for ByteString {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ByteString;
            fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                formatter.write_str("a byte string")
            }
            fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<ByteString, E> {
                Ok(ByteString(bytes.to_vec()))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, bytes: Vec<u8>) -> Result<ByteString, E> {
                Ok(ByteString(bytes))
            }
        }
        deserializer.deserialize_bytes(Visitor)
    }
}

#[derive(Serialize, Deserialize)]
enum WireElement {
    #[serde(rename = "c")]
    Children(u8, ByteString, ByteString),
    #[serde(rename = "l")]
    Leaves(u8, ByteString, ByteString),
    #[serde(rename = "r")]
    ListRequest(u8, ByteString),
    /// Prefix, then 8 check bytes followed by the tags.
    #[serde(rename = "t")]
    Tags(u8, ByteString, ByteString),
    #[serde(rename = "q")]
    TagRequest(u8, ByteString),
    #[serde(rename = "y")]
    YouLack(ByteString),
    #[serde(rename = "a")]
    YouLackAll(u8, ByteString),
    /// Prefix, then 8 check bytes followed by the bitmap.
    #[serde(rename = "d")]
    Differ(u8, ByteString, ByteString),
}

/// A reconciliation message as it travels: version and elements.
#[derive(Serialize, Deserialize)]
pub struct SyncMessage(u8, Vec<WireElement>);

fn put_varint(out: &mut Vec<u8>, value: u64) {
    crate::varint::put(out, value);
}

fn take_varint(bytes: &[u8], position: &mut usize) -> Result<u64, SyncError> {
    crate::varint::take(bytes, position).map_err(|error| match error {
        crate::varint::VarintError::Truncated => SyncError::Malformed("truncated count".into()),
        crate::varint::VarintError::TooLong => SyncError::Malformed("count longer than 64 bits".into()),
    })
}

/// The leading key bytes every key in `prefix` shares (whole bytes of its nibbles), which a leaf
/// list leaves out.
fn shared_key_bytes(prefix: Prefix) -> usize {
    (usize::from(prefix.depth()) / 2).min(16)
}

fn prefix_from_wire(depth: u8, bits: &ByteString) -> Result<Prefix, SyncError> {
    Prefix::from_packed(depth, &bits.0)
        .ok_or_else(|| SyncError::Malformed(format!("bad prefix: depth {depth} with {} bytes", bits.0.len())))
}

/// Checks that `bytes` is a whole number of `width`-byte entries, and not more than one element
/// may carry.
fn check_entries(bytes: &[u8], width: usize, what: &str, limits: &SyncLimits) -> Result<(), SyncError> {
    if bytes.len() % width != 0 {
        return Err(SyncError::Malformed(format!(
            "{what} list is not a whole number of {width}-byte {what}s"
        )));
    }
    if bytes.len() / width > limits.max_keys_per_element {
        return Err(SyncError::LimitExceeded(format!(
            "{} {what}s in one element",
            bytes.len() / width
        )));
    }
    Ok(())
}

fn keys_from_wire(bytes: &[u8], limits: &SyncLimits) -> Result<Vec<u128>, SyncError> {
    check_entries(bytes, 16, "key", limits)?;
    Ok(bytes
        .chunks_exact(16)
        .map(|chunk| u128::from_be_bytes(chunk.try_into().unwrap_or([0; 16])))
        .collect())
}

/// Encodes elements as one CBOR message.
pub fn encode(elements: &[Element]) -> Vec<u8> {
    let wire: Vec<WireElement> = elements.iter().map(to_wire).collect();
    cbor4ii::serde::to_vec(Vec::new(), &SyncMessage(SYNC_VERSION, wire)).unwrap_or_default()
}

fn to_wire(element: &Element) -> WireElement {
    match element {
        Element::Children { prefix, children } => {
            let mut packed = Vec::with_capacity(2 + children.len() * 10);
            let bitmap: u16 = children.iter().fold(0, |bits, (index, _)| bits | (1 << (index & 15)));
            packed.extend_from_slice(&bitmap.to_be_bytes());
            let mut sorted = children.clone();
            sorted.sort_by_key(|(index, _)| *index);
            sorted.dedup_by_key(|(index, _)| *index);
            for (_, summary) in sorted {
                put_varint(&mut packed, summary.count);
                packed.extend_from_slice(&summary.fingerprint.0);
            }
            WireElement::Children(prefix.depth(), ByteString(prefix.packed_bits()), ByteString(packed))
        }
        Element::Leaves { prefix, leaves } => {
            let shared = shared_key_bytes(*prefix);
            let mut packed = Vec::with_capacity(leaves.len() * (24 - shared));
            for leaf in leaves {
                packed.extend_from_slice(&leaf.key.to_be_bytes()[shared..]);
                packed.extend_from_slice(&leaf.tag);
            }
            WireElement::Leaves(prefix.depth(), ByteString(prefix.packed_bits()), ByteString(packed))
        }
        Element::ListRequest { prefix } => WireElement::ListRequest(prefix.depth(), ByteString(prefix.packed_bits())),
        Element::Tags { prefix, check, tags } => {
            let mut packed = Vec::with_capacity(8 + tags.len() * 8);
            packed.extend_from_slice(check);
            for tag in tags {
                packed.extend_from_slice(tag);
            }
            WireElement::Tags(prefix.depth(), ByteString(prefix.packed_bits()), ByteString(packed))
        }
        Element::TagRequest { prefix } => WireElement::TagRequest(prefix.depth(), ByteString(prefix.packed_bits())),
        Element::YouLack { keys } => {
            WireElement::YouLack(ByteString(keys.iter().flat_map(|key| key.to_be_bytes()).collect()))
        }
        Element::YouLackAll { prefix } => WireElement::YouLackAll(prefix.depth(), ByteString(prefix.packed_bits())),
        Element::Differ { prefix, check, bits } => {
            let mut packed = Vec::with_capacity(8 + bits.len());
            packed.extend_from_slice(check);
            packed.extend_from_slice(bits);
            WireElement::Differ(prefix.depth(), ByteString(prefix.packed_bits()), ByteString(packed))
        }
    }
}

/// Decodes and validates one CBOR message.
pub fn decode(bytes: &[u8], limits: &SyncLimits) -> Result<Vec<Element>, SyncError> {
    let SyncMessage(version, wire) =
        cbor4ii::serde::from_slice(bytes).map_err(|error| SyncError::Malformed(error.to_string()))?;
    if version != SYNC_VERSION {
        return Err(SyncError::UnsupportedVersion(version));
    }
    if wire.len() > limits.max_elements {
        return Err(SyncError::LimitExceeded(format!("{} elements", wire.len())));
    }
    wire.into_iter().map(|element| from_wire(element, limits)).collect()
}

fn from_wire(element: WireElement, limits: &SyncLimits) -> Result<Element, SyncError> {
    Ok(match element {
        WireElement::Children(depth, bits, packed) => {
            let prefix = prefix_from_wire(depth, &bits)?;
            if prefix.depth() >= KEY_NIBBLES {
                return Err(SyncError::Malformed("children of a full-depth prefix".into()));
            }
            let bytes = &packed.0;
            if bytes.len() < 2 {
                return Err(SyncError::Malformed("children without a bitmap".into()));
            }
            let bitmap = u16::from_be_bytes([bytes[0], bytes[1]]);
            let mut position = 2;
            let mut children = Vec::with_capacity(bitmap.count_ones() as usize);
            for index in 0..16u8 {
                if bitmap & (1 << index) == 0 {
                    continue;
                }
                let count = take_varint(bytes, &mut position)?;
                let fingerprint: [u8; 8] = bytes
                    .get(position..position + 8)
                    .and_then(|slice| slice.try_into().ok())
                    .ok_or_else(|| SyncError::Malformed("truncated fingerprint".into()))?;
                position += 8;
                children.push((
                    index,
                    Summary {
                        count,
                        fingerprint: Fingerprint(fingerprint),
                    },
                ));
            }
            if position != bytes.len() {
                return Err(SyncError::Malformed("trailing bytes after children".into()));
            }
            Element::Children { prefix, children }
        }
        WireElement::Leaves(depth, bits, packed) => {
            let prefix = prefix_from_wire(depth, &bits)?;
            let shared = shared_key_bytes(prefix);
            let entry = 24 - shared;
            if packed.0.len() % entry != 0 {
                return Err(SyncError::Malformed(format!(
                    "leaf list is not a whole number of {entry}-byte entries"
                )));
            }
            if packed.0.len() / entry > limits.max_keys_per_element {
                return Err(SyncError::LimitExceeded(format!(
                    "{} leaves in one element",
                    packed.0.len() / entry
                )));
            }
            let fixed = prefix.bounds().0.to_be_bytes();
            let mut leaves = Vec::with_capacity(packed.0.len() / entry);
            for chunk in packed.0.chunks_exact(entry) {
                let mut key_bytes = fixed;
                key_bytes[shared..].copy_from_slice(&chunk[..16 - shared]);
                let key = u128::from_be_bytes(key_bytes);
                let tag: [u8; 8] = chunk[16 - shared..].try_into().unwrap_or([0; 8]);
                if !prefix.contains(key) {
                    return Err(SyncError::Malformed("leaf outside its prefix".into()));
                }
                if leaves.last().is_some_and(|last: &LeafTag| last.key >= key) {
                    return Err(SyncError::Malformed("leaves not in strictly ascending order".into()));
                }
                leaves.push(LeafTag { key, tag });
            }
            Element::Leaves { prefix, leaves }
        }
        WireElement::ListRequest(depth, bits) => Element::ListRequest {
            prefix: prefix_from_wire(depth, &bits)?,
        },
        WireElement::Tags(depth, prefix_bits, packed) => {
            let prefix = prefix_from_wire(depth, &prefix_bits)?;
            let (check, tags) = packed
                .0
                .split_first_chunk::<8>()
                .ok_or_else(|| SyncError::Malformed("tags without their check".into()))?;
            check_entries(tags, 8, "tag", limits)?;
            Element::Tags {
                prefix,
                check: *check,
                tags: tags
                    .chunks_exact(8)
                    .map(|tag| tag.try_into().unwrap_or([0; 8]))
                    .collect(),
            }
        }
        WireElement::TagRequest(depth, bits) => Element::TagRequest {
            prefix: prefix_from_wire(depth, &bits)?,
        },
        WireElement::YouLack(packed) => Element::YouLack {
            keys: keys_from_wire(&packed.0, limits)?,
        },
        WireElement::YouLackAll(depth, bits) => Element::YouLackAll {
            prefix: prefix_from_wire(depth, &bits)?,
        },
        WireElement::Differ(depth, prefix_bits, packed) => {
            let prefix = prefix_from_wire(depth, &prefix_bits)?;
            let (check, bits) = packed
                .0
                .split_first_chunk::<8>()
                .ok_or_else(|| SyncError::Malformed("differ without its check".into()))?;
            if bits.len() * 8 > limits.max_keys_per_element {
                return Err(SyncError::LimitExceeded(format!(
                    "a differ bitmap of {} bytes",
                    bits.len()
                )));
            }
            Element::Differ {
                prefix,
                check: *check,
                bits: bits.to_vec(),
            }
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Record states
// ---------------------------------------------------------------------------------------------

/// The mutable part of a record: all two replicas that both hold a message can differ in. What a
/// `Differ` sends instead of the record and its bytes.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RecordState {
    pub expunged: Option<Stamp>,
    pub flags: BTreeMap<Flag, FlagRegister>,
    /// The location once the email was moved. Until then it is the one set at creation, which
    /// both sides of a `Differ` hold already, so it does not travel (16 bytes saved per state).
    pub moved: Option<crate::mailbox::Location>,
}

impl RecordState {
    /// The state of a record.
    pub fn of(record: &MessageRecord) -> Self {
        RecordState {
            expunged: record.expunged,
            flags: record.flags.clone(),
            moved: record.was_moved().then_some(record.location),
        }
    }

    /// `record`'s immutable part with this state (a state that was never moved keeps `record`'s
    /// location, so apply it only to a version of the same record).
    pub fn applied_to(&self, record: &MessageRecord) -> MessageRecord {
        MessageRecord {
            expunged: self.expunged,
            flags: self.flags.clone(),
            location: self.moved.unwrap_or(record.location),
            ..record.clone()
        }
    }
}

/// Merges a peer's state of a record this side holds: returns the merged record (what this side
/// stores) and, when the merge holds more than the peer sent (this side knew something the peer
/// did not), the merged state to send back. Once the peer merges that in, both hold the same.
pub fn merge_state(mine: &MessageRecord, theirs: &RecordState) -> (MessageRecord, Option<RecordState>) {
    // Same immutable part on both sides of the merge, so it cannot conflict.
    let merged = crdt::merge(mine, &theirs.applied_to(mine)).unwrap_or_else(|_| mine.clone());
    let state = RecordState::of(&merged);
    let back = (state != *theirs).then_some(state);
    (merged, back)
}

/// The most flags one state may carry (as for a whole record on the wire).
pub const MAX_FLAGS_PER_STATE: usize = 256;
/// The most distinct nodes the stamps of one block of states may name.
const MAX_NODES_PER_BLOCK: u64 = 4096;

const FLAG_SET: u8 = 0x80;
const FLAG_KEYWORD: u8 = 5;

/// How the states of one block name their records.
enum BlockKeys<'a> {
    /// In the order of the `Differ` bits they answer.
    Implied,
    /// By key, each stored as the count of leading bytes it shares with the previous key and
    /// the rest.
    Keys(&'a [u128]),
    /// By position among the states the request brought.
    Positions(&'a [u64]),
}

/// The stamps of one block of states: the nodes that made them, 8 bytes each and once, and the
/// earliest time; a stamp is then a node position and a time offset (varints, about 5 bytes
/// instead of 16, as a block's stamps come from few nodes within a short span).
struct StampTable {
    nodes: Vec<NodeId>,
    base: u64,
}

impl StampTable {
    fn of<'a>(states: impl Iterator<Item = &'a RecordState>) -> Self {
        let mut nodes = Vec::new();
        let mut base = u64::MAX;
        for state in states {
            for stamp in state
                .expunged
                .iter()
                .chain(state.flags.values().map(|register| &register.stamp))
                .chain(state.moved.iter().map(|location| &location.stamp))
            {
                nodes.push(stamp.node);
                base = base.min(stamp.time);
            }
        }
        nodes.sort_unstable();
        nodes.dedup();
        StampTable {
            nodes,
            base: if base == u64::MAX { 0 } else { base },
        }
    }

    fn put(&self, out: &mut Vec<u8>) {
        put_varint(out, self.nodes.len() as u64);
        for node in &self.nodes {
            out.extend_from_slice(&node.0.to_be_bytes());
        }
        put_varint(out, self.base);
    }

    fn take(bytes: &[u8], position: &mut usize) -> Result<Self, SyncError> {
        let count = take_varint(bytes, position)?;
        if count > MAX_NODES_PER_BLOCK || count * 8 > bytes.len() as u64 {
            return Err(SyncError::LimitExceeded(format!(
                "{count} nodes in one block of states"
            )));
        }
        let mut nodes = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let slice = bytes
                .get(*position..*position + 8)
                .ok_or_else(|| SyncError::Malformed("truncated node of a state block".into()))?;
            *position += 8;
            nodes.push(NodeId(u64::from_be_bytes(slice.try_into().unwrap_or([0; 8]))));
        }
        let base = take_varint(bytes, position)?;
        Ok(StampTable { nodes, base })
    }

    fn put_stamp(&self, out: &mut Vec<u8>, stamp: &Stamp) {
        put_varint(out, self.nodes.binary_search(&stamp.node).unwrap_or(0) as u64);
        put_varint(out, stamp.time.saturating_sub(self.base));
    }

    fn take_stamp(&self, bytes: &[u8], position: &mut usize) -> Result<Stamp, SyncError> {
        let index = take_varint(bytes, position)?;
        let node = usize::try_from(index)
            .ok()
            .and_then(|index| self.nodes.get(index))
            .ok_or_else(|| SyncError::Malformed(format!("stamp names node {index} of {}", self.nodes.len())))?;
        let time = self
            .base
            .checked_add(take_varint(bytes, position)?)
            .ok_or_else(|| SyncError::Malformed("stamp time overflows".into()))?;
        Ok(Stamp { time, node: *node })
    }
}

/// Header bits of one state.
const STATE_EXPUNGED: u8 = 1;
const STATE_MOVED: u8 = 2;

fn put_state(out: &mut Vec<u8>, table: &StampTable, state: &RecordState) {
    let mut header = 0;
    if state.expunged.is_some() {
        header |= STATE_EXPUNGED;
    }
    if state.moved.is_some() {
        header |= STATE_MOVED;
    }
    out.push(header);
    if let Some(stamp) = &state.expunged {
        table.put_stamp(out, stamp);
    }
    if let Some(location) = &state.moved {
        out.extend_from_slice(&location.mailbox.to_bytes());
        table.put_stamp(out, &location.stamp);
    }
    put_varint(out, state.flags.len() as u64);
    for (flag, register) in &state.flags {
        let set = if register.set { FLAG_SET } else { 0 };
        match flag {
            Flag::Seen => out.push(set),
            Flag::Answered => out.push(set | 1),
            Flag::Flagged => out.push(set | 2),
            Flag::Deleted => out.push(set | 3),
            Flag::Draft => out.push(set | 4),
            Flag::Keyword(keyword) => {
                out.push(set | FLAG_KEYWORD);
                put_varint(out, keyword.len() as u64);
                out.extend_from_slice(keyword.as_bytes());
            }
        }
        table.put_stamp(out, &register.stamp);
    }
}

fn take_state(bytes: &[u8], position: &mut usize, table: &StampTable) -> Result<RecordState, SyncError> {
    let malformed = |what: &str| SyncError::Malformed(format!("record state: {what}"));
    let header = *bytes.get(*position).ok_or_else(|| malformed("truncated"))?;
    *position += 1;
    if header & !(STATE_EXPUNGED | STATE_MOVED) != 0 {
        return Err(malformed("unknown header"));
    }
    let expunged = match header & STATE_EXPUNGED {
        0 => None,
        _ => Some(table.take_stamp(bytes, position)?),
    };
    let moved = match header & STATE_MOVED {
        0 => None,
        _ => {
            let mailbox = bytes
                .get(*position..position.saturating_add(16))
                .and_then(|slice| <[u8; 16]>::try_from(slice).ok())
                .map(|bytes| crate::model::MailboxId(u128::from_be_bytes(bytes)))
                .ok_or_else(|| malformed("truncated location"))?;
            *position += 16;
            Some(crate::mailbox::Location {
                mailbox,
                stamp: table.take_stamp(bytes, position)?,
            })
        }
    };
    let count = take_varint(bytes, position)?;
    if count > MAX_FLAGS_PER_STATE as u64 {
        return Err(SyncError::LimitExceeded(format!("{count} flags in one record state")));
    }
    let mut flags = BTreeMap::new();
    for _ in 0..count {
        let code = *bytes.get(*position).ok_or_else(|| malformed("truncated flag"))?;
        *position += 1;
        let flag = match code & !FLAG_SET {
            0 => Flag::Seen,
            1 => Flag::Answered,
            2 => Flag::Flagged,
            3 => Flag::Deleted,
            4 => Flag::Draft,
            FLAG_KEYWORD => {
                let length = usize::try_from(take_varint(bytes, position)?).map_err(|_| malformed("keyword length"))?;
                let text = bytes
                    .get(*position..position.saturating_add(length))
                    .ok_or_else(|| malformed("truncated keyword"))?;
                *position += length;
                let text = std::str::from_utf8(text).map_err(|_| malformed("keyword is not UTF-8"))?;
                match text.parse::<Flag>() {
                    Ok(keyword @ Flag::Keyword(_)) => keyword,
                    _ => return Err(malformed("invalid keyword")),
                }
            }
            _ => return Err(malformed("unknown flag code")),
        };
        let stamp = table.take_stamp(bytes, position)?;
        let register = FlagRegister {
            set: code & FLAG_SET != 0,
            stamp,
        };
        if flags.insert(flag, register).is_some() {
            return Err(malformed("a flag twice"));
        }
    }
    Ok(RecordState { expunged, flags, moved })
}

/// One block: the count, the stamp table, then each state after its key (if any).
fn encode_block(states: &[&RecordState], keys: BlockKeys) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + states.len() * 12);
    put_varint(&mut out, states.len() as u64);
    let table = StampTable::of(states.iter().copied());
    table.put(&mut out);
    let mut previous = [0u8; 16];
    for (index, state) in states.iter().enumerate() {
        match &keys {
            BlockKeys::Implied => {}
            BlockKeys::Keys(keys) => {
                let key = keys.get(index).copied().unwrap_or_default().to_be_bytes();
                let shared = key
                    .iter()
                    .zip(&previous)
                    .take_while(|(one, other)| one == other)
                    .count()
                    .min(15);
                out.push(shared as u8);
                out.extend_from_slice(&key[shared..]);
                previous = key;
            }
            BlockKeys::Positions(positions) => put_varint(&mut out, positions.get(index).copied().unwrap_or_default()),
        }
        put_state(&mut out, &table, state);
    }
    out
}

/// Unpacks one block: the states and, per `keyed`, their keys or positions (as u128).
fn decode_block(bytes: &[u8], limits: &SyncLimits, keyed: u8) -> Result<Vec<(u128, RecordState)>, SyncError> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    let mut position = 0;
    let count = take_varint(bytes, &mut position)?;
    if count > limits.max_keys_per_element as u64 || count > bytes.len() as u64 {
        return Err(SyncError::LimitExceeded(format!("{count} record states")));
    }
    let table = StampTable::take(bytes, &mut position)?;
    let mut states = Vec::with_capacity(count as usize);
    let mut previous = [0u8; 16];
    for _ in 0..count {
        let key = match keyed {
            KEYS => {
                let shared = usize::from(
                    *bytes
                        .get(position)
                        .ok_or_else(|| SyncError::Malformed("truncated key".into()))?,
                );
                if shared > 15 {
                    return Err(SyncError::Malformed("a key sharing more than 15 bytes".into()));
                }
                let rest = bytes
                    .get(position + 1..position + 1 + 16 - shared)
                    .ok_or_else(|| SyncError::Malformed("truncated key of a record state".into()))?;
                position += 1 + 16 - shared;
                previous[shared..].copy_from_slice(rest);
                u128::from_be_bytes(previous)
            }
            POSITIONS => u128::from(take_varint(bytes, &mut position)?),
            _ => 0,
        };
        states.push((key, take_state(bytes, &mut position, &table)?));
    }
    if position != bytes.len() {
        return Err(SyncError::Malformed("trailing bytes after record states".into()));
    }
    Ok(states)
}

const IMPLIED: u8 = 0;
const KEYS: u8 = 1;
const POSITIONS: u8 = 2;

/// Packs states that go with a `Differ`, in bit order (their keys are implied): a count, the
/// block's stamp table, then each state (about 7 bytes for one flag).
pub fn encode_states(states: &[RecordState]) -> Vec<u8> {
    encode_block(&states.iter().collect::<Vec<_>>(), BlockKeys::Implied)
}

/// Unpacks [`encode_states`], refusing more than `limits.max_keys_per_element` states.
pub fn decode_states(bytes: &[u8], limits: &SyncLimits) -> Result<Vec<RecordState>, SyncError> {
    Ok(decode_block(bytes, limits, IMPLIED)?
        .into_iter()
        .map(|(_, state)| state)
        .collect())
}

/// Packs merged states sent back in a request, each after its key (the leading bytes it shares
/// with the previous key are counted, not repeated).
pub fn encode_keyed_states(states: &[(u128, RecordState)]) -> Vec<u8> {
    let keys: Vec<u128> = states.iter().map(|(key, _)| *key).collect();
    encode_block(
        &states.iter().map(|(_, state)| state).collect::<Vec<_>>(),
        BlockKeys::Keys(&keys),
    )
}

/// Unpacks [`encode_keyed_states`], refusing more than `limits.max_keys_per_element` states.
pub fn decode_keyed_states(bytes: &[u8], limits: &SyncLimits) -> Result<Vec<(u128, RecordState)>, SyncError> {
    decode_block(bytes, limits, KEYS)
}

/// Packs merged states sent back in a reply, each after the position of the state it answers
/// among those the request brought: the asker knows which keys those were.
pub fn encode_indexed_states(states: &[(u64, RecordState)]) -> Vec<u8> {
    let positions: Vec<u64> = states.iter().map(|(position, _)| *position).collect();
    encode_block(
        &states.iter().map(|(_, state)| state).collect::<Vec<_>>(),
        BlockKeys::Positions(&positions),
    )
}

/// Unpacks [`encode_indexed_states`], refusing more than `limits.max_keys_per_element` states.
pub fn decode_indexed_states(bytes: &[u8], limits: &SyncLimits) -> Result<Vec<(u64, RecordState)>, SyncError> {
    decode_block(bytes, limits, POSITIONS)?
        .into_iter()
        .map(|(position, state)| {
            u64::try_from(position)
                .map(|position| (position, state))
                .map_err(|_| SyncError::Malformed("position out of range".into()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merkle::{MemoryTree, StoredDepth};
    use proptest::prelude::*;

    fn leaf(key: u128, state: u8) -> [u8; 32] {
        let mut input = key.to_be_bytes().to_vec();
        input.push(state);
        *blake3::hash(&input).as_bytes()
    }

    /// Runs a whole session between two trees, through the wire encoding, and returns
    /// (what a needs, what b needs, messages).
    fn run(a: &MemoryTree, b: &MemoryTree, limits: &SyncLimits) -> (Outcome, Outcome, usize) {
        let (a_needs, b_needs, messages, _) = run_telling(a, b, limits);
        (a_needs, b_needs, messages)
    }

    /// As [`run`], and also the `YouLack` keys each side sent: (a's, b's).
    fn run_telling(a: &MemoryTree, b: &MemoryTree, limits: &SyncLimits) -> (Outcome, Outcome, usize, [Vec<u128>; 2]) {
        let mut outgoing = initial(a, limits).unwrap();
        let (mut a_needs, mut b_needs) = (Outcome::default(), Outcome::default());
        let mut told: [Vec<u128>; 2] = [Vec::new(), Vec::new()];
        let mut messages = 0;
        let mut a_turn = false;
        while !outgoing.is_empty() {
            messages += 1;
            assert!(messages < 80, "session did not end");
            let decoded = decode(&encode(&outgoing), limits).unwrap();
            assert_eq!(decoded, outgoing);
            let (view, needs) = if a_turn { (a, &mut a_needs) } else { (b, &mut b_needs) };
            // Only `a` may ask (it sent the first message); `b` answers.
            let side_limits = SyncLimits {
                asks: limits.asks && a_turn,
                ..*limits
            };
            let (reply, outcome) = respond(view, &decoded, &side_limits).unwrap();
            for element in &reply {
                if let Element::YouLack { keys } = element {
                    told[usize::from(!a_turn)].extend(keys.iter().copied());
                }
            }
            needs.extend(outcome);
            outgoing = reply;
            a_turn = !a_turn;
        }
        a_needs.normalize();
        b_needs.normalize();
        (a_needs, b_needs, messages, told)
    }

    /// Applies what `needer` learned by copying from `source`.
    fn pull(needer: &mut MemoryTree, source: &MemoryTree, needs: &Outcome) {
        for key in &needs.need_keys {
            if let Some(hash) = source.get(*key) {
                needer.insert(*key, *hash);
            }
        }
        for prefix in &needs.need_prefixes {
            for (key, hash) in source.leaves(*prefix, usize::MAX).unwrap() {
                needer.insert(key, hash);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn two_random_trees_learn_their_exact_differences(
            shared in proptest::collection::btree_set(any::<u64>(), 0..400),
            only_a in proptest::collection::btree_set(any::<u64>(), 0..60),
            only_b in proptest::collection::btree_set(any::<u64>(), 0..60),
            changed in proptest::collection::btree_set(any::<u64>(), 0..20),
            time_ordered in any::<bool>(),
            a_asks in any::<bool>(),
        ) {
            let key_of = |value: u64| if time_ordered {
                (u128::from(1_767_000_000_000u64 + value % 10_000_000) << 80) | u128::from(value)
            } else {
                // Odd, so a bijection modulo 2^128: distinct values stay distinct keys.
                u128::from(value).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835u128)
            };
            let mut a = MemoryTree::new(StoredDepth::MAILBOX);
            let mut b = MemoryTree::new(StoredDepth::MAILBOX);
            for value in &shared {
                let state = u8::from(changed.contains(value));
                a.insert(key_of(*value), leaf(key_of(*value), 0));
                b.insert(key_of(*value), leaf(key_of(*value), state));
            }
            for value in &only_a { a.insert(key_of(*value), leaf(key_of(*value), 0)); }
            for value in &only_b { b.insert(key_of(*value), leaf(key_of(*value), 0)); }
            let limits = SyncLimits { leaf_threshold: 4, exact_threshold: 16, asks: a_asks, ..SyncLimits::default() };
            let (a_needs, b_needs, messages, told) = run_telling(&a, &b, &limits);
            prop_assert!(messages <= 2 * 33);
            let mut a_synced = a.clone();
            let mut b_synced = b.clone();
            pull(&mut a_synced, &b, &a_needs);
            pull(&mut b_synced, &a, &b_needs);
            // Every key now present on both; states that differed are pulled both ways (the node
            // merges them; here we check both sides asked for each other's version).
            let a_keys: Vec<u128> = a_synced.iter().map(|(key, _)| *key).collect();
            let b_keys: Vec<u128> = b_synced.iter().map(|(key, _)| *key).collect();
            prop_assert_eq!(a_keys, b_keys);
            for value in changed.intersection(&shared) {
                let key = key_of(*value);
                let asked = |needs: &Outcome| needs.need_keys.contains(&key) || needs.need_prefixes.iter().any(|p| p.contains(key));
                prop_assert!(asked(&a_needs) && asked(&b_needs));
            }
            // Nothing is pulled that is already equal.
            for key in &a_needs.need_keys {
                prop_assert!(a.get(*key) != b.get(*key));
            }
            // `YouLack` names only keys the other side does not hold; keys both hold in
            // different states go by `Differ`, and the receiver maps every bit back to its key.
            for (sender, receiver, told) in [(&a, &b, &told[0]), (&b, &a, &told[1])] {
                for key in told {
                    prop_assert!(sender.get(*key).is_some() && receiver.get(*key).is_none(), "key {:x}", key);
                }
            }
            for (needs, other) in [(&a_needs, &b_needs), (&b_needs, &a_needs)] {
                for key in &needs.differing {
                    prop_assert!(a.get(*key).is_some() && b.get(*key).is_some() && a.get(*key) != b.get(*key));
                }
                let told: Vec<u128> = other.told_differing.iter().map(|key| key.expect("lists unchanged")).collect();
                prop_assert_eq!(&told, &needs.differing, "told in the order found");
            }
            let mut found: Vec<u128> = a_needs.differing.iter().chain(&b_needs.differing).copied().collect();
            found.sort_unstable();
            let mut expected: Vec<u128> = changed.intersection(&shared).map(|value| key_of(*value)).collect();
            expected.sort_unstable();
            prop_assert_eq!(found, expected, "every differing state is found once");
        }
    }

    #[test]
    fn equal_trees_end_after_one_reply() {
        let mut a = MemoryTree::new(StoredDepth::MAILBOX);
        for value in 0..1000u128 {
            a.insert(value << 80 | value, leaf(value, 0));
        }
        let (a_needs, b_needs, messages) = run(&a, &a.clone(), &SyncLimits::default());
        assert!(a_needs.is_empty() && b_needs.is_empty());
        assert_eq!(messages, 1);
    }

    #[test]
    fn a_small_mailbox_opens_with_its_whole_leaf_list_and_settles_in_one_reply() {
        let limits = SyncLimits::default();
        // Time-ordered IDs a few seconds apart share their top nibbles.
        let key = |value: u128| ((1_767_225_600_000u128 + value * 3_000) << 80) | value;
        let mut a = MemoryTree::new(StoredDepth::MAILBOX);
        for value in 0..limits.initial_list_threshold as u128 {
            a.insert(key(value), leaf(value, 0));
        }
        let first = initial(&a, &limits).unwrap();
        assert!(
            matches!(first.as_slice(), [Element::Leaves { prefix, leaves }] if *prefix == Prefix::ROOT && leaves.len() == 48),
            "{first:?}"
        );
        // b lacks three of them and holds another state of a fourth: one reply says it all.
        let mut b = MemoryTree::new(StoredDepth::MAILBOX);
        for value in 3..limits.initial_list_threshold as u128 {
            b.insert(key(value), leaf(value, u8::from(value == 10)));
        }
        let (b_needs, a_needs, messages) = run(&b, &a, &limits);
        assert_eq!(messages, 2, "b's list, then a's reply");
        assert_eq!(b_needs.need_keys, vec![key(0), key(1), key(2), key(10)]);
        assert_eq!(a_needs.need_keys, vec![key(10)]);
        // One more leaf and the first message walks the trie instead.
        a.insert(key(1000), leaf(1000, 0));
        assert!(!matches!(
            initial(&a, &limits).unwrap().as_slice(),
            [Element::Leaves { .. }]
        ));
    }

    #[test]
    fn an_empty_side_pulls_whole_prefixes() {
        let mut a = MemoryTree::new(StoredDepth::MAILBOX);
        for value in 0..5000u128 {
            a.insert((value * 7919) << 80 | value, leaf(value, 0));
        }
        let empty = MemoryTree::new(StoredDepth::MAILBOX);
        let (empty_needs, a_needs, _) = run(&empty, &a, &SyncLimits::default());
        assert!(a_needs.is_empty());
        let mut pulled = empty.clone();
        pull(&mut pulled, &a, &empty_needs);
        assert_eq!(pulled.root(), a.root());
    }

    #[test]
    fn hostile_messages_are_refused_without_panicking() {
        let limits = SyncLimits::default();
        let samples: Vec<Vec<u8>> = vec![
            vec![],
            vec![0xff; 64],
            cbor4ii::serde::to_vec(Vec::new(), &(SYNC_VERSION + 1, Vec::<u8>::new())).unwrap(),
            // children with a bitmap claiming 16 children and no data
            encode(&[]).into_iter().take(2).collect(),
            cbor4ii::serde::to_vec(
                Vec::new(),
                &SyncMessage(
                    SYNC_VERSION,
                    vec![WireElement::Children(
                        40,
                        ByteString(vec![0; 20]),
                        ByteString(vec![0xff, 0xff]),
                    )],
                ),
            )
            .unwrap(),
            cbor4ii::serde::to_vec(
                Vec::new(),
                &SyncMessage(
                    SYNC_VERSION,
                    vec![WireElement::Children(
                        1,
                        ByteString(vec![0x10]),
                        ByteString(vec![0xff, 0xff, 0x80, 0x80]),
                    )],
                ),
            )
            .unwrap(),
            cbor4ii::serde::to_vec(
                Vec::new(),
                &SyncMessage(
                    SYNC_VERSION,
                    vec![WireElement::Leaves(1, ByteString(vec![0x10]), ByteString(vec![0; 25]))],
                ),
            )
            .unwrap(),
            cbor4ii::serde::to_vec(
                Vec::new(),
                &SyncMessage(
                    SYNC_VERSION,
                    vec![WireElement::Leaves(1, ByteString(vec![0x10]), ByteString(vec![0; 24]))],
                ),
            )
            .unwrap(),
            cbor4ii::serde::to_vec(
                Vec::new(),
                &SyncMessage(SYNC_VERSION, vec![WireElement::YouLack(ByteString(vec![1; 17]))]),
            )
            .unwrap(),
        ];
        for sample in samples {
            assert!(decode(&sample, &limits).is_err(), "{sample:?} should be refused");
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes, &SyncLimits::default());
            let _ = decode_states(&bytes, &SyncLimits::default());
            let _ = decode_keyed_states(&bytes, &SyncLimits::default());
            let _ = decode_indexed_states(&bytes, &SyncLimits::default());
        }
    }

    fn arbitrary_state() -> impl Strategy<Value = RecordState> {
        let stamp = (0u64..1 << 60, 0u64..4).prop_map(|(time, node)| Stamp {
            time,
            node: NodeId(node),
        });
        let flag = prop_oneof![
            Just(Flag::Seen),
            Just(Flag::Answered),
            Just(Flag::Flagged),
            Just(Flag::Deleted),
            Just(Flag::Draft),
            "[a-z$]{1,12}".prop_map(|text| text.parse::<Flag>().unwrap()),
        ];
        (
            proptest::option::of(stamp.clone()),
            proptest::collection::btree_map(
                flag,
                (any::<bool>(), stamp.clone()).prop_map(|(set, stamp)| FlagRegister { set, stamp }),
                0..6,
            ),
            proptest::option::of((any::<u128>(), stamp)),
        )
            .prop_map(|(expunged, flags, moved)| RecordState {
                expunged,
                flags,
                moved: moved.map(|(mailbox, stamp)| crate::mailbox::Location {
                    mailbox: crate::model::MailboxId(mailbox),
                    stamp,
                }),
            })
    }

    proptest! {
        #[test]
        fn record_states_round_trip_through_their_packing(states in proptest::collection::vec(arbitrary_state(), 0..20)) {
            let limits = SyncLimits::default();
            prop_assert_eq!(&decode_states(&encode_states(&states), &limits).unwrap(), &states);
            let keyed: Vec<(u128, RecordState)> = states.iter().cloned().enumerate().map(|(index, state)| (index as u128 * 0x1234_5678_9abc, state)).collect();
            prop_assert_eq!(decode_keyed_states(&encode_keyed_states(&keyed), &limits).unwrap(), keyed);
            let indexed: Vec<(u64, RecordState)> = states.iter().cloned().enumerate().map(|(index, state)| (index as u64 * 300, state)).collect();
            prop_assert_eq!(decode_indexed_states(&encode_indexed_states(&indexed), &limits).unwrap(), indexed);
        }

        /// Two replicas of one message in any states: one sends its state, the other merges and
        /// sends back only what the first lacked; then both hold the merge of the two, and
        /// nothing goes back when the first already held everything.
        #[test]
        fn one_state_each_way_at_most_makes_both_replicas_equal(first in arbitrary_state(), second in arbitrary_state()) {
            let base = MessageRecord::new(crate::model::MessageId(7), crate::model::BlobHash::of(b"raw"), 3, 4, NodeId(1));
            let (mine, theirs) = (first.applied_to(&base), second.applied_to(&base));
            let expected = crdt::merge(&mine, &theirs).unwrap();
            // `mine` found the difference and sends its state; `theirs` merges it.
            let (theirs_merged, back) = merge_state(&theirs, &RecordState::of(&mine));
            prop_assert_eq!(&theirs_merged, &expected);
            let mine_merged = match &back {
                Some(state) => merge_state(&mine, state).0,
                None => mine.clone(),
            };
            prop_assert_eq!(&mine_merged, &expected);
            prop_assert_eq!(back.is_none(), RecordState::of(&expected) == first);
        }
    }

    #[test]
    fn a_differ_onto_a_list_that_changed_since_is_not_mapped() {
        let limits = SyncLimits::default();
        let mut a = MemoryTree::new(StoredDepth::MAILBOX);
        let mut b = MemoryTree::new(StoredDepth::MAILBOX);
        for value in 0..10u128 {
            a.insert(value << 100, leaf(value, 0));
            b.insert(value << 100, leaf(value, u8::from(value % 3 == 0)));
        }
        let first = initial(&a, &limits).unwrap();
        let (reply, b_outcome) = respond(&b, &first, &limits).unwrap();
        assert_eq!(b_outcome.differing, vec![0, 3 << 100, 6 << 100, 9 << 100]);
        assert!(matches!(reply.as_slice(), [Element::Differ { .. }]), "{reply:?}");
        let (_, a_outcome) = respond(&a, &reply, &limits).unwrap();
        assert_eq!(
            a_outcome.told_differing,
            b_outcome.differing.iter().map(|key| Some(*key)).collect::<Vec<_>>()
        );
        // A new message in that prefix since a's list went out: the bits no longer say which.
        a.insert(11 << 100, leaf(11, 0));
        let (_, a_outcome) = respond(&a, &reply, &limits).unwrap();
        assert_eq!(a_outcome.told_differing, vec![None; 4]);
        assert!(a_outcome.need_keys.is_empty());
    }

    /// Every message of a session between `a` (which asks when `asks`) and `b`, in order.
    fn session_messages(a: &MemoryTree, b: &MemoryTree, limits: SyncLimits) -> (Vec<Vec<Element>>, Outcome, Outcome) {
        let asks = limits.asks;
        let mut outgoing = initial(a, &limits).unwrap();
        let (mut a_needs, mut b_needs) = (Outcome::default(), Outcome::default());
        let mut messages = Vec::new();
        let mut a_turn = false;
        while !outgoing.is_empty() {
            assert!(messages.len() < 80, "session did not end");
            messages.push(outgoing.clone());
            let (view, needs) = if a_turn { (a, &mut a_needs) } else { (b, &mut b_needs) };
            let side_limits = SyncLimits {
                asks: asks && a_turn,
                ..limits
            };
            let decoded = decode(&encode(&outgoing), &limits).unwrap();
            let (reply, outcome) = respond(view, &decoded, &side_limits).unwrap();
            needs.extend(outcome);
            outgoing = reply;
            a_turn = !a_turn;
        }
        a_needs.normalize();
        b_needs.normalize();
        (messages, a_needs, b_needs)
    }

    #[test]
    fn a_flag_heal_lists_tags_by_position_and_no_keys() {
        // 2,000 time-ordered messages on both sides, the newest 100 in another state on one side:
        // the same keys, so no leaf list should carry a key.
        let key_of = |value: u64| (u128::from(1_767_000_000_000u64 + value) << 80) | u128::from(value * 7919);
        let mut a = MemoryTree::new(StoredDepth::MAILBOX);
        let mut b = MemoryTree::new(StoredDepth::MAILBOX);
        for value in 0..2_000u64 {
            a.insert(key_of(value), leaf(key_of(value), 0));
            b.insert(key_of(value), leaf(key_of(value), u8::from(value >= 1_900)));
        }
        let changed: Vec<u128> = (1_900..2_000u64).map(key_of).collect();
        for asks in [false, true] {
            let limits = SyncLimits {
                asks,
                ..SyncLimits::default()
            };
            let (messages, a_needs, b_needs) = session_messages(&a, &b, limits);
            let elements = || messages.iter().flatten();
            assert!(
                !elements().any(|element| matches!(element, Element::Leaves { .. } | Element::ListRequest { .. })),
                "asks {asks}: a list with keys was sent: {messages:?}"
            );
            assert!(elements().any(|element| matches!(element, Element::Tags { .. })));
            assert_eq!(a_needs.need_keys, changed, "asks {asks}");
            assert_eq!(b_needs.need_keys, changed, "asks {asks}");
            assert!(a_needs.need_prefixes.is_empty() && b_needs.need_prefixes.is_empty());
        }
    }

    /// The bytes of a flag heal of the newest `changed` of `total` time-ordered IDs (IDs made as
    /// the store makes them: the millisecond, then 80 random bits), for each layout seed.
    fn flag_heal_bytes(
        total: u64,
        changed: u64,
        scattered: bool,
        per_millisecond: u64,
        seed: u64,
        limits: SyncLimits,
    ) -> usize {
        let mut random = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = move || {
            random ^= random << 13;
            random ^= random >> 7;
            random ^= random << 17;
            random
        };
        let mut a = MemoryTree::new(StoredDepth::MAILBOX);
        let mut b = MemoryTree::new(StoredDepth::MAILBOX);
        for value in 0..total {
            let millis = 1_767_000_000_000u64 + value / per_millisecond;
            let key = (u128::from(millis) << 80) | (u128::from(next()) << 16) | u128::from(next() & 0xffff);
            a.insert(key, leaf(key, 0));
            let differs = if scattered {
                (value * 2_654_435_761) % total < changed
            } else {
                value >= total - changed
            };
            b.insert(key, leaf(key, u8::from(differs)));
        }
        let (messages, a_needs, b_needs) = session_messages(&a, &b, limits);
        assert_eq!(a_needs.need_keys.len() as u64, changed);
        assert_eq!(b_needs.need_keys.len() as u64, changed);
        messages.iter().map(|message| encode(message).len()).sum()
    }

    /// Found measuring the two-node heal: with the newest 100 of a large mailbox read, how many
    /// bytes the trie walk took depended on where those IDs fell on nibble boundaries (up to 6.8
    /// KB at 100,000 records), mostly for one small `Tags` element per child of a dense node.
    /// Whole-node `Tags` must bring every layout down, and never cost more where differences
    /// are scattered.
    #[test]
    fn a_dense_flag_heal_lists_whole_nodes_and_costs_the_same_in_every_layout() {
        let single = |limits: SyncLimits| SyncLimits {
            tag_threshold: 0,
            ..limits
        };
        for asks in [false, true] {
            let limits = SyncLimits {
                asks,
                ..SyncLimits::default()
            };
            let mut worst = 0;
            for rate in [1u64, 2, 5, 20, 60] {
                let merged = flag_heal_bytes(20_000, 100, false, rate, 3, limits);
                let apart = flag_heal_bytes(20_000, 100, false, rate, 3, single(limits));
                println!("asks {asks}, {rate} IDs/ms: {merged} B with whole-node tags, {apart} B without");
                assert!(merged <= apart, "asks {asks}, {rate}/ms: {merged} > {apart}");
                worst = worst.max(merged);
            }
            assert!(worst <= 3_200, "asks {asks}: a layout took {worst} B");
            for (total, changed) in [(2_000u64, 5u64), (2_000, 50), (4_000, 40)] {
                assert_eq!(
                    flag_heal_bytes(total, changed, true, 2, 3, limits),
                    flag_heal_bytes(total, changed, true, 2, 3, single(limits)),
                    "scattered {changed} of {total}"
                );
            }
        }
    }

    #[test]
    fn equal_counts_over_different_keys_fall_back_to_a_full_list() {
        // Ten leaves in one prefix on each side, one key different: the counts agree, so `Tags`
        // go first; the check differs, so the receiver sends its keys and both learn the truth.
        let mut a = MemoryTree::new(StoredDepth::MAILBOX);
        let mut b = MemoryTree::new(StoredDepth::MAILBOX);
        // All under one top nibble, so the root's one child holds all ten.
        let key_of = |value: u128| (1 << 124) | (value << 60);
        for value in 0..9u128 {
            a.insert(key_of(value), leaf(value, 0));
            b.insert(key_of(value), leaf(value, u8::from(value == 4)));
        }
        a.insert(key_of(10), leaf(10, 0));
        b.insert(key_of(11), leaf(11, 0));
        // Equal leaves under another nibble, so the session does not open with a whole list.
        for value in 0..20u128 {
            a.insert((2 << 124) | value, leaf(value, 0));
            b.insert((2 << 124) | value, leaf(value, 0));
        }
        let limits = SyncLimits {
            initial_list_threshold: 4,
            ..SyncLimits::default()
        };
        let first = initial(&a, &limits).unwrap();
        assert!(matches!(first.as_slice(), [Element::Children { .. }, ..]), "{first:?}");
        let (messages, a_needs, b_needs) = session_messages(&a, &b, limits);
        let elements = || messages.iter().flatten();
        assert!(
            elements().any(|element| matches!(element, Element::Tags { .. })),
            "{messages:?}"
        );
        assert!(
            elements().any(|element| matches!(element, Element::Leaves { .. })),
            "{messages:?}"
        );
        assert_eq!(a_needs.need_keys, vec![key_of(4), key_of(11)]);
        assert_eq!(b_needs.need_keys, vec![key_of(4), key_of(10)]);
    }

    #[test]
    fn hostile_tag_lists_are_refused() {
        let limits = SyncLimits::default();
        let prefix = Prefix::ROOT;
        let wire = |packed: Vec<u8>| {
            cbor4ii::serde::to_vec(
                Vec::new(),
                &SyncMessage(
                    SYNC_VERSION,
                    vec![WireElement::Tags(
                        prefix.depth(),
                        ByteString(prefix.packed_bits()),
                        ByteString(packed),
                    )],
                ),
            )
            .unwrap()
        };
        assert!(decode(&wire(vec![1, 2, 3]), &limits).is_err(), "no check");
        assert!(decode(&wire(vec![0; 8 + 5]), &limits).is_err(), "a partial tag");
        let too_many = vec![0; 8 + 8 * (limits.max_keys_per_element + 1)];
        assert!(matches!(
            decode(&wire(too_many), &limits),
            Err(SyncError::LimitExceeded(_))
        ));
        let fine = decode(&wire(vec![0; 8 + 16]), &limits).unwrap();
        assert!(matches!(fine.as_slice(), [Element::Tags { tags, .. }] if tags.len() == 2));
    }

    #[test]
    fn hostile_record_states_are_refused() {
        let limits = SyncLimits::default();
        let one = encode_states(&[RecordState::default()]);
        // One state, a stamp table of one node (0) and base time 0, then the state.
        let table = |rest: &[u8]| [vec![1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0], rest.to_vec()].concat();
        let samples: Vec<Vec<u8>> = vec![
            vec![5],                                // five states announced, none there
            vec![1, 200, 1],                        // 200 nodes announced, none there
            table(&[2]),                            // unknown header
            table(&[1]),                            // truncated tombstone stamp
            table(&[1, 5, 0, 0]),                   // a stamp naming node 5 of 1
            table(&[0, 1, 9]),                      // unknown flag code
            table(&[0, 1, 5, 200, 1]),              // keyword longer than the bytes
            table(&[0, 1, 5, 1, b'\\']),            // a system flag's spelling as a keyword
            table(&[0, 2, 0x80, 0, 0, 0x80, 0, 0]), // a flag twice
            // base time u64::MAX, then a stamp one past it
            [
                vec![1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
                vec![0xff; 9],
                vec![0x01, 0, 1, 0x80, 0, 1],
            ]
            .concat(),
            [one.clone(), vec![0]].concat(), // trailing bytes
        ];
        for sample in samples {
            assert!(decode_states(&sample, &limits).is_err(), "{sample:?} should be refused");
        }
        assert_eq!(decode_states(&one, &limits).unwrap(), vec![RecordState::default()]);
    }
}
