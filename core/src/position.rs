//! Counted blocks over one sorted key space, so that a page at position P of a sort index is found
//! in O(log n) instead of by skipping P keys.
//!
//! A sort index is a run of sorted keys in RocksDB, which cannot say how many keys lie before a
//! given key. This structure cuts the key space into blocks, each named by its first key and
//! holding the number of keys in it, with a Fenwick tree over the counts. Finding rank r is a
//! Fenwick search (O(log blocks)) giving a block and an offset inside it; the caller seeks to the
//! block's first key and steps over at most one block's worth of keys. Inserts and removals
//! change one count (O(log blocks)). A block that has grown past twice the target size is split
//! by the caller, which reads its keys from the index and hands back the new boundaries.
//!
//! Pure and in memory: it is a cache of the index, built from it on demand and kept up to date by
//! the store's writer, never persisted or replicated.

/// Counted blocks over a sorted set of byte keys.
#[derive(Clone, Debug)]
pub struct CountedBlocks {
    /// First key of each block, strictly increasing; the first block starts at the empty key, so
    /// every key falls in exactly one block.
    firsts: Vec<Vec<u8>>,
    counts: Vec<u64>,
    /// Fenwick tree over `counts`, one-based.
    fenwick: Vec<u64>,
    target: usize,
}

/// Where a rank lies: the block's first key and how many keys of the block come before it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located {
    pub block: usize,
    pub first: Vec<u8>,
    pub offset: u64,
}

impl CountedBlocks {
    /// Blocks of about `target` keys over keys given in ascending order.
    pub fn from_sorted<I: IntoIterator<Item = Vec<u8>>>(keys: I, target: usize) -> CountedBlocks {
        let target = target.max(1);
        let mut firsts = vec![Vec::new()];
        let mut counts = vec![0u64];
        for key in keys {
            let last = counts.len() - 1;
            if counts[last] as usize >= target {
                firsts.push(key);
                counts.push(1);
            } else {
                counts[last] += 1;
            }
        }
        let mut blocks = CountedBlocks {
            firsts,
            counts,
            fenwick: Vec::new(),
            target,
        };
        blocks.rebuild_fenwick();
        blocks
    }

    fn rebuild_fenwick(&mut self) {
        let size = self.counts.len();
        self.fenwick = vec![0; size + 1];
        for index in 0..size {
            let slot = index + 1;
            self.fenwick[slot] += self.counts[index];
            let parent = slot + (slot & slot.wrapping_neg());
            if parent <= size {
                let carried = self.fenwick[slot];
                self.fenwick[parent] += carried;
            }
        }
    }

    fn fenwick_add(&mut self, index: usize, delta: i64) {
        let mut slot = index + 1;
        while slot < self.fenwick.len() {
            self.fenwick[slot] = self.fenwick[slot].wrapping_add_signed(delta);
            slot += slot & slot.wrapping_neg();
        }
    }

    /// The block a key falls in.
    fn block_of(&self, key: &[u8]) -> usize {
        self.firsts
            .partition_point(|first| first.as_slice() <= key)
            .saturating_sub(1)
    }

    /// Counts a key added to the index.
    pub fn insert(&mut self, key: &[u8]) {
        let block = self.block_of(key);
        self.counts[block] += 1;
        self.fenwick_add(block, 1);
    }

    /// Counts a key removed from the index. Returns false when its block was already empty,
    /// which means this structure no longer matches the index and must be rebuilt.
    pub fn remove(&mut self, key: &[u8]) -> bool {
        let block = self.block_of(key);
        if self.counts[block] == 0 {
            return false;
        }
        self.counts[block] -= 1;
        self.fenwick_add(block, -1);
        true
    }

    /// Number of keys counted.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Number of blocks.
    pub fn blocks(&self) -> usize {
        self.counts.len()
    }

    /// The block holding the key of ascending rank `rank` (zero-based), or None past the end.
    pub fn locate(&self, rank: u64) -> Option<Located> {
        // Fenwick descent: the largest prefix of blocks holding at most `rank` keys.
        let size = self.counts.len();
        let mut slot = 0usize;
        let mut before = 0u64;
        let mut step = if size == 0 {
            0
        } else {
            1usize << (usize::BITS - 1 - size.leading_zeros())
        };
        while step > 0 {
            let next = slot + step;
            if next <= size && before + self.fenwick[next] <= rank {
                slot = next;
                before += self.fenwick[next];
            }
            step >>= 1;
        }
        // `slot` blocks hold `before` <= rank keys; the rank lies in block `slot`.
        if slot >= size {
            return None;
        }
        Some(Located {
            block: slot,
            first: self.firsts[slot].clone(),
            offset: rank - before,
        })
    }

    /// Whether a block has grown enough that the caller should split it.
    pub fn needs_split(&self, block: usize) -> bool {
        self.counts
            .get(block)
            .is_some_and(|count| *count as usize > 2 * self.target)
    }

    /// The first key of a block.
    pub fn first_of(&self, block: usize) -> Option<&[u8]> {
        self.firsts.get(block).map(Vec::as_slice)
    }

    /// The first key after a block, if another block follows.
    pub fn end_of(&self, block: usize) -> Option<&[u8]> {
        self.firsts.get(block + 1).map(Vec::as_slice)
    }

    /// The target number of keys per block.
    pub fn target(&self) -> usize {
        self.target
    }

    /// Replaces a block by the blocks the caller read from the index: each (first key, count),
    /// the first of them starting where the block did. Empty blocks after the first are dropped.
    pub fn split(&mut self, block: usize, parts: Vec<(Vec<u8>, u64)>) {
        if block >= self.counts.len() || parts.is_empty() {
            return;
        }
        let mut firsts = Vec::with_capacity(parts.len());
        let mut counts = Vec::with_capacity(parts.len());
        for (index, (first, count)) in parts.into_iter().enumerate() {
            if index == 0 {
                firsts.push(self.firsts[block].clone());
                counts.push(count);
            } else if count > 0 {
                firsts.push(first);
                counts.push(count);
            }
        }
        self.firsts.splice(block..=block, firsts);
        self.counts.splice(block..=block, counts);
        self.rebuild_fenwick();
    }

    /// Cuts a block's keys (read in ascending order) into parts of the target size.
    pub fn parts_of<I: IntoIterator<Item = Vec<u8>>>(&self, keys: I) -> Vec<(Vec<u8>, u64)> {
        let mut parts: Vec<(Vec<u8>, u64)> = vec![(Vec::new(), 0)];
        for key in keys {
            let last = parts.len() - 1;
            if parts[last].1 as usize >= self.target {
                parts.push((key, 1));
            } else {
                parts[last].1 += 1;
            }
        }
        parts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(value: u32) -> Vec<u8> {
        value.to_be_bytes().to_vec()
    }

    /// Splits every oversized block the way the store does, reading keys from the naive set.
    fn split_all(blocks: &mut CountedBlocks, naive: &std::collections::BTreeSet<Vec<u8>>) {
        let mut block = 0;
        while block < blocks.blocks() {
            if blocks.needs_split(block) {
                let start = blocks.firsts[block].clone();
                let end = blocks.end_of(block).map(<[u8]>::to_vec);
                let keys = naive
                    .range(start..)
                    .take_while(|candidate| end.as_ref().is_none_or(|end| *candidate < end))
                    .cloned()
                    .collect::<Vec<_>>();
                let parts = blocks.parts_of(keys);
                blocks.split(block, parts);
            }
            block += 1;
        }
    }

    fn rank_of(blocks: &CountedBlocks, naive: &std::collections::BTreeSet<Vec<u8>>, rank: u64) -> Option<Vec<u8>> {
        let located = blocks.locate(rank)?;
        naive.range(located.first..).nth(located.offset as usize).cloned()
    }

    #[test]
    fn ranks_land_on_the_right_key_across_blocks() {
        let keys: Vec<Vec<u8>> = (0..1000u32).map(|value| key(value * 3)).collect();
        let naive: std::collections::BTreeSet<Vec<u8>> = keys.iter().cloned().collect();
        let blocks = CountedBlocks::from_sorted(keys.clone(), 16);
        assert_eq!(blocks.total(), 1000);
        assert_eq!(blocks.blocks(), 63);
        for rank in [0u64, 1, 15, 16, 17, 500, 998, 999] {
            assert_eq!(
                rank_of(&blocks, &naive, rank),
                Some(keys[rank as usize].clone()),
                "rank {rank}"
            );
        }
        assert_eq!(blocks.locate(1000), None);
        assert_eq!(CountedBlocks::from_sorted(Vec::new(), 4).locate(0), None);
    }

    #[test]
    fn removing_from_an_empty_block_reports_a_mismatch() {
        let mut blocks = CountedBlocks::from_sorted(vec![key(1)], 4);
        assert!(blocks.remove(&key(1)));
        assert!(!blocks.remove(&key(1)));
    }

    proptest! {
        #[test]
        fn every_rank_matches_a_naive_sorted_set(
            initial in proptest::collection::btree_set(0u32..5000, 0..300),
            changes in proptest::collection::vec((any::<bool>(), 0u32..5000), 0..400),
            target in 1usize..12,
        ) {
            let mut naive: std::collections::BTreeSet<Vec<u8>> = initial.iter().map(|value| key(*value)).collect();
            let mut blocks = CountedBlocks::from_sorted(naive.iter().cloned(), target);
            for (index, (add, value)) in changes.into_iter().enumerate() {
                let entry = key(value);
                if add {
                    if naive.insert(entry.clone()) {
                        blocks.insert(&entry);
                    }
                } else if naive.remove(&entry) {
                    prop_assert!(blocks.remove(&entry));
                }
                if index % 7 == 0 {
                    split_all(&mut blocks, &naive);
                }
            }
            prop_assert_eq!(blocks.total(), naive.len() as u64);
            let sorted: Vec<Vec<u8>> = naive.iter().cloned().collect();
            for rank in 0..sorted.len() as u64 {
                prop_assert_eq!(rank_of(&blocks, &naive, rank), Some(sorted[rank as usize].clone()));
            }
            prop_assert_eq!(blocks.locate(sorted.len() as u64), None);
        }
    }
}
