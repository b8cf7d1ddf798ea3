//! The Merkle structure each node keeps per mailbox, and once more over all its mailboxes.
//!
//! # Shape
//! A fixed-shape 16-way trie over 128-bit keys (message IDs in a mailbox; mailbox IDs in the node's
//! directory). A node of the trie is a [`Prefix`]: the first `depth` nibbles of a key. Its
//! [`Aggregate`] is the count of leaves below it and the sum, modulo 2^256, of their 32-byte leaf
//! hashes. A leaf hash covers the whole record state (see [`crate::crdt::state_hash`]), so equal
//! aggregates mean equal IDs *and* equal flags and tombstones.
//!
//! Because the shape depends only on the keys and the sum is commutative, the aggregate of every
//! node — the root included — is a pure function of the contents: replicas holding the same records
//! hold the same tree whatever the order of arrival (history independence). A change to one leaf
//! changes its ancestors only, by adding `new - old`: O(depth) work, never O(n). Stores keep
//! aggregates for depths up to a fixed [`StoredDepth`] and compute deeper (small) nodes by scanning
//! their few leaves, so any node's fingerprint comes from disk without loading the mailbox.
//!
//! # What goes on the wire
//! Raw sums are forgeable (a generalized-birthday attack finds a set of hashes with a chosen sum),
//! so they never leave the node: a [`Summary`] carries the count and an 8-byte [`Fingerprint`],
//! blake3 of the sum and the count. The full 32-byte hash of the root aggregate is the mailbox's
//! `root` shown to users; the node's digest is the root of the directory trie, whose leaves are
//! `(mailbox ID, hash of the mailbox root)`. Two nodes compare one digest to confirm that all their
//! mailboxes agree, and descend the directory trie to find the differing mailboxes in O(log m).

use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// How many nibbles a 128-bit key has: the deepest prefix.
pub const KEY_NIBBLES: u8 = 32;

/// Depths above this are computed by scanning leaves rather than stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoredDepth(pub u8);

impl StoredDepth {
    /// Mailboxes: 12 nibbles cover the 48-bit millisecond part of message IDs, so a node deeper
    /// than that holds only the messages of one millisecond.
    pub const MAILBOX: StoredDepth = StoredDepth(12);
    /// The directory: mailbox IDs are uniform hashes, 6 levels spread a million mailboxes thin.
    pub const DIRECTORY: StoredDepth = StoredDepth(6);
}

/// A node of the trie: the first `depth` nibbles of a 128-bit key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix {
    depth: u8,
    bits: u128,
}

impl Prefix {
    /// The root: every key.
    pub const ROOT: Prefix = Prefix { depth: 0, bits: 0 };

    /// The prefix of `key` with `depth` nibbles (depth is capped at 32).
    pub fn of(key: u128, depth: u8) -> Self {
        let depth = depth.min(KEY_NIBBLES);
        Prefix {
            depth,
            bits: key & Self::mask(depth),
        }
    }

    /// A prefix from its depth and bits, refusing bits below the depth.
    pub fn new(depth: u8, bits: u128) -> Option<Self> {
        (depth <= KEY_NIBBLES && bits & !Self::mask(depth) == 0).then_some(Prefix { depth, bits })
    }

    fn mask(depth: u8) -> u128 {
        if depth == 0 {
            0
        } else {
            u128::MAX << (128 - 4 * u32::from(depth))
        }
    }

    /// How many nibbles are fixed.
    pub fn depth(&self) -> u8 {
        self.depth
    }

    /// The fixed nibbles, in the high bits; zero below.
    pub fn bits(&self) -> u128 {
        self.bits
    }

    /// Whether the prefix holds a key.
    pub fn contains(&self, key: u128) -> bool {
        key & Self::mask(self.depth) == self.bits
    }

    /// The nibble of `key` just below this prefix: the index of the child holding it (when the
    /// prefix contains it); `None` at full depth.
    pub fn child_index(&self, key: u128) -> Option<usize> {
        if self.depth >= KEY_NIBBLES {
            return None;
        }
        let shift = 128 - 4 * (u32::from(self.depth) + 1);
        Some(((key >> shift) & 0xf) as usize)
    }

    /// The child with nibble `index` (0..16) next; `None` at full depth.
    pub fn child(&self, index: u8) -> Option<Prefix> {
        if self.depth >= KEY_NIBBLES || index >= 16 {
            return None;
        }
        let shift = 128 - 4 * (u32::from(self.depth) + 1);
        Some(Prefix {
            depth: self.depth + 1,
            bits: self.bits | (u128::from(index) << shift),
        })
    }

    /// The parent; `None` for the root.
    pub fn parent(&self) -> Option<Prefix> {
        (self.depth > 0).then(|| Prefix::of(self.bits, self.depth - 1))
    }

    /// The lowest and highest key inside the prefix (inclusive).
    pub fn bounds(&self) -> (u128, u128) {
        (self.bits, self.bits | !Self::mask(self.depth))
    }

    /// The prefix as bytes: `ceil(depth / 2)` big-endian bytes (the wire form, with the depth).
    pub fn packed_bits(&self) -> Vec<u8> {
        let length = usize::from(self.depth).div_ceil(2);
        self.bits.to_be_bytes()[..length].to_vec()
    }

    /// The inverse of [`Prefix::packed_bits`]; refuses bytes that do not fit the depth.
    pub fn from_packed(depth: u8, packed: &[u8]) -> Option<Self> {
        if depth > KEY_NIBBLES || packed.len() != usize::from(depth).div_ceil(2) {
            return None;
        }
        let mut bytes = [0u8; 16];
        bytes[..packed.len()].copy_from_slice(packed);
        Prefix::new(depth, u128::from_be_bytes(bytes))
    }

    /// The prefixes of `key` at depths `0..=stored.0`, root first.
    pub fn ancestors(key: u128, stored: StoredDepth) -> impl Iterator<Item = Prefix> {
        (0..=stored.0.min(KEY_NIBBLES)).map(move |depth| Prefix::of(key, depth))
    }
}

impl fmt::Debug for Prefix {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex = format!("{:032x}", self.bits);
        write!(formatter, "Prefix({}*)", &hex[..usize::from(self.depth)])
    }
}

/// A 256-bit sum of leaf hashes, as four little-endian 64-bit limbs.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Debug)]
pub struct Sum256(pub [u64; 4]);

impl Sum256 {
    fn from_hash(hash: &[u8; 32]) -> Self {
        let mut limbs = [0u64; 4];
        for (index, limb) in limbs.iter_mut().enumerate() {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&hash[index * 8..index * 8 + 8]);
            *limb = u64::from_le_bytes(bytes);
        }
        Sum256(limbs)
    }

    /// Adds modulo 2^256.
    pub fn wrapping_add(self, other: Sum256) -> Sum256 {
        let mut result = [0u64; 4];
        let mut carry = false;
        for index in 0..4 {
            let (partial, overflow_one) = self.0[index].overflowing_add(other.0[index]);
            let (total, overflow_two) = partial.overflowing_add(u64::from(carry));
            result[index] = total;
            carry = overflow_one || overflow_two;
        }
        Sum256(result)
    }

    /// Subtracts modulo 2^256.
    pub fn wrapping_sub(self, other: Sum256) -> Sum256 {
        let mut result = [0u64; 4];
        let mut borrow = false;
        for index in 0..4 {
            let (partial, underflow_one) = self.0[index].overflowing_sub(other.0[index]);
            let (total, underflow_two) = partial.overflowing_sub(u64::from(borrow));
            result[index] = total;
            borrow = underflow_one || underflow_two;
        }
        Sum256(result)
    }

    /// 32 little-endian bytes.
    pub fn to_bytes(self) -> [u8; 32] {
        let mut bytes = [0u8; 32];
        for (index, limb) in self.0.iter().enumerate() {
            bytes[index * 8..index * 8 + 8].copy_from_slice(&limb.to_le_bytes());
        }
        bytes
    }

    /// From 32 little-endian bytes.
    pub fn from_bytes(bytes: &[u8; 32]) -> Self {
        Self::from_hash(bytes)
    }
}

/// What a trie node knows of the leaves below it: how many, and the sum of their hashes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Debug)]
pub struct Aggregate {
    pub count: u64,
    pub sum: Sum256,
}

/// An 8-byte hash of an aggregate: what peers compare.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Debug)]
pub struct Fingerprint(pub [u8; 8]);

/// A trie node as seen on the wire: count and fingerprint.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Debug)]
pub struct Summary {
    pub count: u64,
    pub fingerprint: Fingerprint,
}

impl Aggregate {
    /// The aggregate of a single leaf.
    pub fn leaf(hash: &[u8; 32]) -> Self {
        Aggregate {
            count: 1,
            sum: Sum256::from_hash(hash),
        }
    }

    /// Whether no leaf is below.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Adds another aggregate (disjoint leaves).
    pub fn add(&mut self, other: &Aggregate) {
        self.count = self.count.wrapping_add(other.count);
        self.sum = self.sum.wrapping_add(other.sum);
    }

    /// A signed change in aggregate form (the count wrapping), so that adding it applies it.
    pub fn from_delta(delta: &AggregateDelta) -> Aggregate {
        Aggregate {
            count: delta.count as u64,
            sum: delta.sum,
        }
    }

    /// Applies a signed change.
    pub fn apply(&mut self, delta: &AggregateDelta) {
        self.count = self.count.wrapping_add_signed(delta.count);
        self.sum = self.sum.wrapping_add(delta.sum);
    }

    /// The full 32-byte hash: the "root" shown to users and put into the directory trie.
    pub fn root_hash(&self) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"mailmesh aggregate v1\0");
        hasher.update(&self.count.to_be_bytes());
        hasher.update(&self.sum.to_bytes());
        *hasher.finalize().as_bytes()
    }

    /// The 8-byte fingerprint sent to peers (a prefix of [`Aggregate::root_hash`]).
    pub fn fingerprint(&self) -> Fingerprint {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&self.root_hash()[..8]);
        Fingerprint(bytes)
    }

    /// Count and fingerprint.
    pub fn summary(&self) -> Summary {
        Summary {
            count: self.count,
            fingerprint: self.fingerprint(),
        }
    }

    /// 40 bytes for storage: count (big-endian) then the sum.
    pub fn to_bytes(&self) -> [u8; 40] {
        let mut bytes = [0u8; 40];
        bytes[..8].copy_from_slice(&self.count.to_be_bytes());
        bytes[8..].copy_from_slice(&self.sum.to_bytes());
        bytes
    }

    /// The inverse of [`Aggregate::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != 40 {
            return None;
        }
        let count = u64::from_be_bytes(bytes[..8].try_into().ok()?);
        let sum = Sum256::from_bytes(bytes[8..].try_into().ok()?);
        Some(Aggregate { count, sum })
    }
}

/// A signed change to an aggregate: leaves added minus leaves removed.
#[derive(Clone, Copy, PartialEq, Eq, Default, Debug)]
pub struct AggregateDelta {
    pub count: i64,
    pub sum: Sum256,
}

impl AggregateDelta {
    /// The change of replacing leaf `old` by leaf `new` (either may be absent).
    pub fn replace(old: Option<&[u8; 32]>, new: Option<&[u8; 32]>) -> Self {
        let mut delta = AggregateDelta::default();
        if let Some(old) = old {
            delta.count -= 1;
            delta.sum = delta.sum.wrapping_sub(Sum256::from_hash(old));
        }
        if let Some(new) = new {
            delta.count += 1;
            delta.sum = delta.sum.wrapping_add(Sum256::from_hash(new));
        }
        delta
    }

    /// Combines two changes.
    pub fn add(&mut self, other: &AggregateDelta) {
        self.count += other.count;
        self.sum = self.sum.wrapping_add(other.sum);
    }

    /// Whether the change does nothing.
    pub fn is_zero(&self) -> bool {
        self.count == 0 && self.sum == Sum256::default()
    }
}

/// Read access to one trie: what reconciliation needs from a store.
pub trait TreeView {
    /// The error a failed read gives.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The aggregate of a prefix.
    fn aggregate(&self, prefix: Prefix) -> Result<Aggregate, Self::Error>;

    /// The aggregates of a prefix's 16 children.
    fn child_aggregates(&self, prefix: Prefix) -> Result<[Aggregate; 16], Self::Error> {
        let mut children = [Aggregate::default(); 16];
        for (index, child) in children.iter_mut().enumerate() {
            if let Some(prefix) = prefix.child(index as u8) {
                *child = self.aggregate(prefix)?;
            }
        }
        Ok(children)
    }

    /// Up to `limit` leaves `(key, leaf hash)` inside a prefix, in key order.
    fn leaves(&self, prefix: Prefix, limit: usize) -> Result<Vec<(u128, [u8; 32])>, Self::Error>;
}

/// The prefixes whose stored aggregates change, and by how much, when leaf `key` goes from `old`
/// to `new`. Callers add these into their stored aggregates (one atomic write).
pub fn aggregate_changes(
    key: u128,
    old: Option<&[u8; 32]>,
    new: Option<&[u8; 32]>,
    stored: StoredDepth,
) -> impl Iterator<Item = (Prefix, AggregateDelta)> {
    let delta = AggregateDelta::replace(old, new);
    let nothing = delta.is_zero();
    Prefix::ancestors(key, stored)
        .filter(move |_| !nothing)
        .map(move |prefix| (prefix, delta))
}

/// An in-memory trie: used by tests, simulations and benchmarks, and as the model the RocksDB store
/// must agree with.
#[derive(Clone, Debug)]
pub struct MemoryTree {
    stored: StoredDepth,
    leaves: BTreeMap<u128, [u8; 32]>,
    aggregates: HashMap<Prefix, Aggregate>,
}

/// A memory tree never fails to read.
#[derive(Debug, thiserror::Error)]
#[error("unreachable")]
pub enum Infallible {}

impl MemoryTree {
    /// An empty tree keeping aggregates down to `stored`.
    pub fn new(stored: StoredDepth) -> Self {
        MemoryTree {
            stored,
            leaves: BTreeMap::new(),
            aggregates: HashMap::new(),
        }
    }

    /// Sets (or replaces) a leaf.
    pub fn insert(&mut self, key: u128, hash: [u8; 32]) {
        let old = self.leaves.insert(key, hash);
        self.fold(key, old.as_ref(), Some(&hash));
    }

    /// Removes a leaf.
    pub fn remove(&mut self, key: u128) {
        if let Some(old) = self.leaves.remove(&key) {
            self.fold(key, Some(&old), None);
        }
    }

    fn fold(&mut self, key: u128, old: Option<&[u8; 32]>, new: Option<&[u8; 32]>) {
        for (prefix, delta) in aggregate_changes(key, old, new, self.stored) {
            let aggregate = self.aggregates.entry(prefix).or_default();
            aggregate.apply(&delta);
            if aggregate.is_empty() {
                self.aggregates.remove(&prefix);
            }
        }
    }

    /// The leaf hash of a key.
    pub fn get(&self, key: u128) -> Option<&[u8; 32]> {
        self.leaves.get(&key)
    }

    /// The number of leaves.
    pub fn len(&self) -> usize {
        self.leaves.len()
    }

    /// Whether the tree has no leaves.
    pub fn is_empty(&self) -> bool {
        self.leaves.is_empty()
    }

    /// All leaves in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&u128, &[u8; 32])> {
        self.leaves.iter()
    }

    /// The root aggregate.
    pub fn root(&self) -> Aggregate {
        self.aggregates.get(&Prefix::ROOT).copied().unwrap_or_default()
    }
}

impl TreeView for MemoryTree {
    type Error = Infallible;

    fn aggregate(&self, prefix: Prefix) -> Result<Aggregate, Infallible> {
        if prefix.depth() <= self.stored.0 {
            return Ok(self.aggregates.get(&prefix).copied().unwrap_or_default());
        }
        let (low, high) = prefix.bounds();
        let mut aggregate = Aggregate::default();
        for (_, hash) in self.leaves.range(low..=high) {
            aggregate.add(&Aggregate::leaf(hash));
        }
        Ok(aggregate)
    }

    fn leaves(&self, prefix: Prefix, limit: usize) -> Result<Vec<(u128, [u8; 32])>, Infallible> {
        let (low, high) = prefix.bounds();
        Ok(self
            .leaves
            .range(low..=high)
            .take(limit)
            .map(|(key, hash)| (*key, *hash))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hash(value: u64) -> [u8; 32] {
        *blake3::hash(&value.to_be_bytes()).as_bytes()
    }

    #[test]
    fn prefixes_nest_and_pack() {
        let key = 0x0123_4567_89ab_cdef_0011_2233_4455_6677u128;
        let prefix = Prefix::of(key, 3);
        assert!(prefix.contains(key));
        assert_eq!(prefix.packed_bits(), vec![0x01, 0x20]);
        assert_eq!(Prefix::from_packed(3, &[0x01, 0x20]), Some(prefix));
        assert_eq!(
            Prefix::from_packed(3, &[0x01, 0x21]),
            None,
            "bits below the depth are refused"
        );
        assert_eq!(prefix.child(3).unwrap(), Prefix::of(key, 4));
        assert_eq!(prefix.child_index(key), Some(3));
        assert_eq!(Prefix::of(key, 32).child_index(key), None);
        assert_eq!(Prefix::of(key, 4).parent(), Some(prefix));
        assert_eq!(Prefix::of(key, 32).child(0), None);
        assert_eq!(Prefix::ROOT.bounds(), (0, u128::MAX));
    }

    #[test]
    fn sums_wrap_and_invert() {
        let a = Sum256([u64::MAX, u64::MAX, 0, 5]);
        let b = Sum256([1, 0, 0, 0]);
        let total = a.wrapping_add(b);
        assert_eq!(total, Sum256([0, 0, 1, 5]));
        assert_eq!(total.wrapping_sub(b), a);
    }

    proptest! {
        #[test]
        fn root_is_independent_of_history(
            keys in proptest::collection::vec(any::<u128>(), 0..60),
            removals in proptest::collection::vec(any::<prop::sample::Index>(), 0..10),
            seed in any::<u64>(),
        ) {
            let mut forward = MemoryTree::new(StoredDepth(4));
            for (index, key) in keys.iter().enumerate() {
                forward.insert(*key, hash(index as u64 ^ seed));
                forward.insert(*key, hash(index as u64));
            }
            let mut removed = Vec::new();
            for index in &removals {
                if !keys.is_empty() {
                    let key = keys[index.index(keys.len())];
                    forward.remove(key);
                    removed.push(key);
                }
            }
            // The same final contents, built in reverse order without the overwrites.
            let mut backward = MemoryTree::new(StoredDepth(4));
            for (index, key) in keys.iter().enumerate().rev() {
                if !removed.contains(key) && backward.get(*key).is_none() {
                    backward.insert(*key, hash(index as u64));
                }
            }
            prop_assert_eq!(forward.root(), backward.root());
            prop_assert_eq!(forward.root().count as usize, forward.len());
            // Stored and computed aggregates agree at every depth.
            for key in keys.iter().take(5) {
                for depth in 0..=8u8 {
                    let prefix = Prefix::of(*key, depth);
                    let stored = forward.aggregate(prefix).unwrap();
                    let mut scanned = Aggregate::default();
                    for (_, leaf) in forward.leaves(prefix, usize::MAX).unwrap() {
                        scanned.add(&Aggregate::leaf(&leaf));
                    }
                    prop_assert_eq!(stored, scanned);
                }
            }
        }
    }
}
