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
//! - `YouLack(keys)` and `YouLackAll(P)`: what the receiver should pull from the sender.
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

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::merkle::{Fingerprint, Prefix, Summary, TreeView, KEY_NIBBLES};

/// The protocol version this build speaks.
pub const SYNC_VERSION: u8 = 1;

/// Tuning and safety limits for one side of reconciliation.
#[derive(Clone, Copy, Debug)]
pub struct SyncLimits {
    /// A differing node with at most this many leaves is listed instead of split.
    pub leaf_threshold: u64,
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
}

impl Default for SyncLimits {
    fn default() -> Self {
        SyncLimits {
            leaf_threshold: 12,
            exact_threshold: 256,
            initial_list_threshold: 48,
            max_elements: 50_000,
            max_keys_per_element: 65_536,
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
    YouLack {
        keys: Vec<u128>,
    },
    YouLackAll {
        prefix: Prefix,
    },
}

/// What one side learned it must pull from the other.
#[derive(Clone, Default, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Keys the other side holds and this side lacks or holds in another state.
    pub need_keys: Vec<u128>,
    /// Prefixes in which this side holds nothing and the other side holds something.
    pub need_prefixes: Vec<Prefix>,
}

impl Outcome {
    /// Adds another outcome.
    pub fn extend(&mut self, other: Outcome) {
        self.need_keys.extend(other.need_keys);
        self.need_prefixes.extend(other.need_prefixes);
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
            Element::ListRequest { prefix } => {
                let mine = view.aggregate(*prefix).map_err(store_error)?;
                if mine.count <= limits.exact_threshold {
                    reply.push(leaves_element(view, *prefix, limits.exact_threshold)?);
                } else {
                    expand(view, *prefix, limits, &mut reply)?;
                }
            }
            Element::YouLack { keys } => outcome.need_keys.extend(keys.iter().copied()),
            Element::YouLackAll { prefix } => outcome.need_prefixes.push(*prefix),
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
    for index in 0..16u8 {
        let Some(child) = prefix.child(index) else { continue };
        if expanded.contains(&child) {
            continue; // the sender described this child in the same message
        }
        let my_aggregate = mine[usize::from(index)];
        match their_children[usize::from(index)] {
            None if my_aggregate.is_empty() => {}
            None => reply.push(Element::YouLackAll { prefix: child }),
            Some(summary) if summary.count == 0 && my_aggregate.is_empty() => {}
            Some(summary) if summary == my_aggregate.summary() => {}
            Some(_) if my_aggregate.is_empty() => outcome.need_prefixes.push(child),
            Some(summary) => {
                if my_aggregate.count <= limits.leaf_threshold {
                    reply.push(leaves_element(view, child, limits.leaf_threshold)?);
                } else if summary.count <= limits.leaf_threshold && my_aggregate.count <= limits.exact_threshold {
                    reply.push(Element::ListRequest { prefix: child });
                } else {
                    expand(view, child, limits, reply)?;
                }
            }
        }
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
    let mine_aggregate = view.aggregate(prefix).map_err(store_error)?;
    if mine_aggregate.count > limits.exact_threshold {
        expand(view, prefix, limits, reply)?;
        return Ok(());
    }
    let limit = usize::try_from(limits.exact_threshold).unwrap_or(usize::MAX);
    let mine: Vec<LeafTag> = view
        .leaves(prefix, limit)
        .map_err(store_error)?
        .iter()
        .map(|(key, hash)| LeafTag::of(*key, hash))
        .collect();
    let (mut mine_index, mut their_index) = (0, 0);
    while mine_index < mine.len() || their_index < theirs.len() {
        match (mine.get(mine_index), theirs.get(their_index)) {
            (Some(my_leaf), Some(their_leaf)) if my_leaf.key == their_leaf.key => {
                if my_leaf.tag != their_leaf.tag {
                    outcome.need_keys.push(my_leaf.key);
                    you_lack.push(my_leaf.key);
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
    #[serde(rename = "y")]
    YouLack(ByteString),
    #[serde(rename = "a")]
    YouLackAll(u8, ByteString),
}

/// A reconciliation message as it travels: version and elements.
#[derive(Serialize, Deserialize)]
pub struct SyncMessage(u8, Vec<WireElement>);

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn take_varint(bytes: &[u8], position: &mut usize) -> Result<u64, SyncError> {
    let mut value: u64 = 0;
    for shift in (0..64).step_by(7) {
        let byte = *bytes
            .get(*position)
            .ok_or_else(|| SyncError::Malformed("truncated count".into()))?;
        *position += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(SyncError::Malformed("count longer than 64 bits".into()))
}

fn prefix_from_wire(depth: u8, bits: &ByteString) -> Result<Prefix, SyncError> {
    Prefix::from_packed(depth, &bits.0)
        .ok_or_else(|| SyncError::Malformed(format!("bad prefix: depth {depth} with {} bytes", bits.0.len())))
}

fn keys_from_wire(bytes: &[u8], limits: &SyncLimits) -> Result<Vec<u128>, SyncError> {
    if bytes.len() % 16 != 0 {
        return Err(SyncError::Malformed(
            "key list is not a whole number of 16-byte keys".into(),
        ));
    }
    if bytes.len() / 16 > limits.max_keys_per_element {
        return Err(SyncError::LimitExceeded(format!(
            "{} keys in one element",
            bytes.len() / 16
        )));
    }
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
            let mut packed = Vec::with_capacity(leaves.len() * 24);
            for leaf in leaves {
                packed.extend_from_slice(&leaf.key.to_be_bytes());
                packed.extend_from_slice(&leaf.tag);
            }
            WireElement::Leaves(prefix.depth(), ByteString(prefix.packed_bits()), ByteString(packed))
        }
        Element::ListRequest { prefix } => WireElement::ListRequest(prefix.depth(), ByteString(prefix.packed_bits())),
        Element::YouLack { keys } => {
            WireElement::YouLack(ByteString(keys.iter().flat_map(|key| key.to_be_bytes()).collect()))
        }
        Element::YouLackAll { prefix } => WireElement::YouLackAll(prefix.depth(), ByteString(prefix.packed_bits())),
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
            if packed.0.len() % 24 != 0 {
                return Err(SyncError::Malformed(
                    "leaf list is not a whole number of 24-byte entries".into(),
                ));
            }
            if packed.0.len() / 24 > limits.max_keys_per_element {
                return Err(SyncError::LimitExceeded(format!(
                    "{} leaves in one element",
                    packed.0.len() / 24
                )));
            }
            let mut leaves = Vec::with_capacity(packed.0.len() / 24);
            for chunk in packed.0.chunks_exact(24) {
                let key = u128::from_be_bytes(chunk[..16].try_into().unwrap_or([0; 16]));
                let tag: [u8; 8] = chunk[16..].try_into().unwrap_or([0; 8]);
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
        WireElement::YouLack(packed) => Element::YouLack {
            keys: keys_from_wire(&packed.0, limits)?,
        },
        WireElement::YouLackAll(depth, bits) => Element::YouLackAll {
            prefix: prefix_from_wire(depth, &bits)?,
        },
    })
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
        let mut outgoing = initial(a, limits).unwrap();
        let (mut a_needs, mut b_needs) = (Outcome::default(), Outcome::default());
        let mut messages = 0;
        let mut a_turn = false;
        while !outgoing.is_empty() {
            messages += 1;
            assert!(messages < 80, "session did not end");
            let decoded = decode(&encode(&outgoing), limits).unwrap();
            assert_eq!(decoded, outgoing);
            let (view, needs) = if a_turn { (a, &mut a_needs) } else { (b, &mut b_needs) };
            let (reply, outcome) = respond(view, &decoded, limits).unwrap();
            needs.extend(outcome);
            outgoing = reply;
            a_turn = !a_turn;
        }
        a_needs.normalize();
        b_needs.normalize();
        (a_needs, b_needs, messages)
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
        ) {
            let key_of = |value: u64| if time_ordered {
                (u128::from(1_767_000_000_000u64 + value % 10_000_000) << 80) | u128::from(value)
            } else {
                u128::from(value) * 0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835u128
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
            let limits = SyncLimits { leaf_threshold: 4, exact_threshold: 16, ..SyncLimits::default() };
            let (a_needs, b_needs, messages) = run(&a, &b, &limits);
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
            cbor4ii::serde::to_vec(Vec::new(), &(2u8, Vec::<u8>::new())).unwrap(),
            // children with a bitmap claiming 16 children and no data
            encode(&[]).into_iter().take(2).collect(),
            cbor4ii::serde::to_vec(
                Vec::new(),
                &SyncMessage(
                    1,
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
                    1,
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
                    1,
                    vec![WireElement::Leaves(1, ByteString(vec![0x10]), ByteString(vec![0; 25]))],
                ),
            )
            .unwrap(),
            cbor4ii::serde::to_vec(
                Vec::new(),
                &SyncMessage(
                    1,
                    vec![WireElement::Leaves(1, ByteString(vec![0x10]), ByteString(vec![0; 24]))],
                ),
            )
            .unwrap(),
            cbor4ii::serde::to_vec(
                Vec::new(),
                &SyncMessage(1, vec![WireElement::YouLack(ByteString(vec![1; 17]))]),
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
        }
    }
}
