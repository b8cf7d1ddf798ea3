//! Rateless set sketches: a mailbox's records as an endless stream of coded cells, so that two
//! replicas differing by `d` records find exactly which in about `1.35 d` to `1.7 d` cells of 25
//! bytes, whatever the layout of the difference and without knowing `d` in advance.
//!
//! # Why
//! Range reconciliation over the trie ([`crate::sync`]) is close to the floor when differences are
//! clustered (the newest messages), but a difference scattered over a whole mailbox (flag changes,
//! expunges, deliveries to a replica cut off for a while) makes every level of the trie differ, and
//! each differing leaf range ships a dozen leaves. A sketch costs the same per difference wherever
//! the differences are.
//!
//! # Construction (after Eppstein et al., "What's the difference?", SIGCOMM 2011, for the
//! invertible Bloom lookup table, and Yang, Gilad and Alizadeh, "Practical Rateless Set
//! Reconciliation", SIGCOMM 2024, for the rateless mapping)
//! - An **element** is a record as the trie sees it: its message ID and a 32-bit tag of its state
//!   hash ([`crate::crdt::state_hash`]), so a flag change or a tombstone is a difference exactly as
//!   a missing message is: the old and the new state are two distinct elements.
//! - A **cell** (coded symbol) holds the XOR of the IDs and tags of the elements mapped to it, the
//!   XOR of their keyed checksums and their count. Cells are linear: the cells of `A` minus the
//!   cells of `B` (XOR the sums, subtract the counts) are the cells of the symmetric difference,
//!   common elements cancelling whatever their number.
//! - **Mapping**: element `x` belongs to cell `i` with probability `rho(i) = 1 / (1 + i / 2)`
//!   (so every element is in cell 0). Rather than testing every cell, an element walks its own
//!   index sequence: from index `i`, the probability that its next index is beyond `j` is the
//!   telescoping product `prod_{k=i+1..=j} (1 - rho(k)) = (i + 1)(i + 2) / ((j + 1)(j + 2))`, so one
//!   uniform draw `u` gives the next index in closed form, `min j > i with (j + 1)(j + 2) >
//!   (i + 1)(i + 2) / u`. An element thus touches about `1 + 2 ln(m / 2)` of the first `m` cells,
//!   and the draws come from a small generator seeded by the element's keyed hash.
//! - **Decoding** (peeling): a difference cell whose count is +1 or -1 and whose checksum equals
//!   the checksum of the element it would hold is *pure*; that element is recovered (on the other
//!   side for +1, on this side for -1), removed from every cell it maps to, which may make other
//!   cells pure, and so on. Decoding is complete when every received cell is zero.
//!
//! # Maintained, not rebuilt
//! [`SketchCells`] keeps the first `length` cells of a set's stream and is updated in
//! O(log length) per changed record, exactly like the trie's aggregates: a session then reads
//! cells instead of hashing a million records. The length is chosen from the set's size
//! ([`SketchCells::length_for`]); a difference too large for it falls back to trie descent.
//!
//! # Keys and the security argument
//! Every hash is SipHash-2-4 under a [`SketchKey`] that both sides share and outsiders do not know
//! (derive it from the mesh secret, the mailbox and an epoch; rotating the epoch rebuilds the
//! sketches). The element's tag, its checksum and its index walk all depend on the key, so
//! someone who can choose records (a mail sender, a user setting keywords) cannot predict which
//! cells they land in nor craft a set whose cells look pure.
//! - **Checksums are 32 bits in cells 1.. and 64 bits in cell 0.** A cell that holds several
//!   elements passes the purity test by chance with probability 2^-32 per test; a session at
//!   d = 10,000 makes on the order of 10^5 tests, so about one session in 40,000 meets a false
//!   pure cell. That costs at most efficiency, never correctness: a recovered element on this side
//!   must be in this side's set with the same tag and one on the other side must not be
//!   ([`Decoder::peel`] takes that check), and completion is certified by cell 0, which holds every
//!   element of the difference with a 64-bit checksum, the 128-bit XOR of the IDs and the exact
//!   count — a wrong or missing element leaves it non-zero except with probability about 2^-64.
//! - **Tags are 32 bits**: two states of one record collide with probability 2^-32 per change and
//!   then cancel in this session's sketch; the root summaries still differ, so a session that
//!   decodes no difference under differing summaries goes to trie descent, and the next epoch's
//!   key separates them anyway.
//! - **Counts are 8 bits in cells 1..** (the exact count in cell 0): the purity test reads the
//!   count modulo 256, and the checksum rejects the cells whose true count is 255 or 257.
//! - A hostile *peer* can send any cells it likes; it can lie about its records anyway. What it
//!   cannot do is make this side work or allocate without bound: a [`Decoder`] holds at most
//!   [`DecoderLimits::max_cells`] cells and recovers at most one element per cell it holds,
//!   refuses a recovered element twice, and the wire decoder sizes everything from the bytes it
//!   was given, never from a claimed count.

use std::collections::HashSet;

use siphasher::sip128::SipHasher24;

/// How many bytes one cell other than cell 0 takes on the wire: ID sum (16), tag sum (4),
/// checksum (4), count modulo 256 (1).
pub const CELL_WIRE_BYTES: usize = 25;

/// The cell count below which [`SketchCells::length_for`] never goes.
pub const MINIMUM_LENGTH: u64 = 64;

/// The cell count above which [`SketchCells::length_for`] never goes: 32,768 cells decode about
/// 23,000 differences and keep 1.5 MB in memory.
pub const MAXIMUM_LENGTH: u64 = 32_768;

/// The key every hash of a sketch is computed under; both sides of a session use the same one.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SketchKey([u8; 16]);

impl std::fmt::Debug for SketchKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("SketchKey(..)")
    }
}

impl SketchKey {
    /// A key from 16 bytes.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        SketchKey(bytes)
    }

    /// A key derived from a shared secret and a context (for instance the mailbox ID and an epoch
    /// number), so that each mailbox and epoch gets its own.
    pub fn derive(secret: &[u8], context: &[u8]) -> Self {
        let mut hasher = blake3::Hasher::new_derive_key("mailmesh sketch key v1");
        hasher.update(&(secret.len() as u64).to_be_bytes());
        hasher.update(secret);
        hasher.update(context);
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
        SketchKey(bytes)
    }

    fn hasher(&self) -> SipHasher24 {
        SipHasher24::new_with_key(&self.0)
    }

    /// The 32-bit tag of a record state, the second half of its element.
    pub fn tag(&self, id: u128, state_hash: &[u8; 32]) -> u32 {
        let mut input = [0u8; 49];
        input[0] = b't';
        input[1..17].copy_from_slice(&id.to_be_bytes());
        input[17..].copy_from_slice(state_hash);
        self.hasher().hash(&input).h1 as u32
    }

    /// The element a record is, under this key.
    pub fn element(&self, id: u128, state_hash: &[u8; 32]) -> Element {
        Element {
            id,
            tag: self.tag(id, state_hash),
        }
    }

    /// The checksum and the index-walk seed of an element.
    fn element_hash(&self, element: &Element) -> (u64, u64) {
        let mut input = [0u8; 21];
        input[0] = b'e';
        input[1..17].copy_from_slice(&element.id.to_be_bytes());
        input[17..].copy_from_slice(&element.tag.to_be_bytes());
        let hash = self.hasher().hash(&input);
        (hash.h1, hash.h2)
    }
}

/// One record as a sketch sees it: message ID and a keyed 32-bit tag of its state hash.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Element {
    pub id: u128,
    pub tag: u32,
}

/// The indices of the cells an element maps to, in increasing order, without end.
#[derive(Clone, Copy, Debug)]
struct IndexWalk {
    next: u64,
    state: u64,
}

impl IndexWalk {
    fn new(seed: u64) -> Self {
        IndexWalk { next: 0, state: seed }
    }

    /// The current index, then moves to the next one.
    fn advance(&mut self) -> u64 {
        let current = self.next;
        // splitmix64 step: a uniform draw in (0, 1].
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut mixed = self.state;
        mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        mixed ^= mixed >> 31;
        let uniform = ((mixed >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64);
        // The smallest j > i with (j + 1)(j + 2) > (i + 1)(i + 2) / u; (j + 1.5)^2 - 1/4 is the
        // left side. IEEE arithmetic is exact-rounded, so both sides compute the same indices.
        let index = current as f64;
        let threshold = (index + 1.0) * (index + 2.0) / uniform;
        let root = (threshold + 0.25).sqrt() - 1.5;
        let mut next = if root >= 4.0e15 {
            u64::MAX // far beyond any cell anyone keeps
        } else {
            let mut next = root.floor() as u64 + 1;
            // Rounding may land one off; step to the exact smallest j (a step or two at most).
            while next > current + 1 && product(next - 1) > threshold {
                next -= 1;
            }
            while product(next) <= threshold {
                next += 1;
            }
            next
        };
        next = next.max(current + 1);
        self.next = next;
        current
    }
}

fn product(j: u64) -> f64 {
    (j as f64 + 1.0) * (j as f64 + 2.0)
}

/// One coded symbol: sums over the elements mapped to it.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct Cell {
    /// XOR of the elements' IDs.
    pub id_sum: u128,
    /// XOR of the elements' keyed checksums (only the low 32 bits travel, except in cell 0).
    pub checksum_sum: u64,
    /// XOR of the elements' tags.
    pub tag_sum: u32,
    /// How many elements (only the low 8 bits travel, except in cell 0).
    pub count: i64,
}

impl Cell {
    fn toggle(&mut self, element: &Element, checksum: u64, sign: i64) {
        self.id_sum ^= element.id;
        self.tag_sum ^= element.tag;
        self.checksum_sum ^= checksum;
        self.count = self.count.wrapping_add(sign);
    }

    /// `self - other`: the cell of the difference of two sets.
    pub fn subtract(&self, other: &Cell) -> Cell {
        Cell {
            id_sum: self.id_sum ^ other.id_sum,
            checksum_sum: self.checksum_sum ^ other.checksum_sum,
            tag_sum: self.tag_sum ^ other.tag_sum,
            count: self.count.wrapping_sub(other.count),
        }
    }

    /// Drops what cell `index` does not carry on the wire (the high checksum and count bits of
    /// cells other than cell 0).
    pub fn truncated(mut self, index: u64) -> Cell {
        if index > 0 {
            self.checksum_sum &= 0xffff_ffff;
            self.count &= 0xff;
        }
        self
    }

    fn is_zero(&self, index: u64) -> bool {
        let cell = self.truncated(index);
        cell.id_sum == 0 && cell.tag_sum == 0 && cell.checksum_sum == 0 && cell.count == 0
    }
}

/// The first `length` cells of a set's stream, kept up to date as records change.
#[derive(Clone, Debug)]
pub struct SketchCells {
    key: SketchKey,
    cells: Vec<Cell>,
}

impl SketchCells {
    /// No elements, `length` cells (at most four times [`MAXIMUM_LENGTH`], so that a mistaken
    /// length cannot allocate without bound).
    pub fn new(key: SketchKey, length: u64) -> Self {
        let length = length.min(4 * MAXIMUM_LENGTH) as usize;
        SketchCells {
            key,
            cells: vec![Cell::default(); length],
        }
    }

    /// The length worth keeping for a set of `count` records: one cell for every 32 records,
    /// a power of two between [`MINIMUM_LENGTH`] and [`MAXIMUM_LENGTH`]. Larger differences than
    /// about `length / 1.4` go to trie descent, which is cheap per difference when they are that
    /// dense.
    pub fn length_for(count: u64) -> u64 {
        (count / 32).clamp(MINIMUM_LENGTH, MAXIMUM_LENGTH).next_power_of_two()
    }

    /// Builds the cells of a whole set from its leaves (message ID, state hash): O(n log length).
    pub fn from_leaves<'a>(
        key: SketchKey,
        length: u64,
        leaves: impl IntoIterator<Item = (&'a u128, &'a [u8; 32])>,
    ) -> Self {
        let mut cells = SketchCells::new(key, length);
        for (id, state_hash) in leaves {
            cells.insert(*id, state_hash);
        }
        cells
    }

    /// The key the cells are computed under.
    pub fn key(&self) -> &SketchKey {
        &self.key
    }

    /// How many cells are kept.
    pub fn length(&self) -> u64 {
        self.cells.len() as u64
    }

    /// Adds a record.
    pub fn insert(&mut self, id: u128, state_hash: &[u8; 32]) {
        let element = self.key.element(id, state_hash);
        self.toggle(&element, 1);
    }

    /// Removes a record (it must have been inserted with this state).
    pub fn remove(&mut self, id: u128, state_hash: &[u8; 32]) {
        let element = self.key.element(id, state_hash);
        self.toggle(&element, -1);
    }

    /// Replaces record `id`'s state `old` by `new` (either may be absent), as
    /// [`crate::merkle::aggregate_changes`] does for the trie.
    pub fn replace(&mut self, id: u128, old: Option<&[u8; 32]>, new: Option<&[u8; 32]>) {
        if old == new {
            return;
        }
        if let Some(old) = old {
            self.remove(id, old);
        }
        if let Some(new) = new {
            self.insert(id, new);
        }
    }

    fn toggle(&mut self, element: &Element, sign: i64) {
        let (checksum, seed) = self.key.element_hash(element);
        let mut walk = IndexWalk::new(seed);
        let length = self.cells.len() as u64;
        loop {
            let index = walk.advance();
            if index >= length {
                return;
            }
            self.cells[index as usize].toggle(element, checksum, sign);
        }
    }

    /// Cells `start..end` (clipped to the kept length).
    pub fn cells(&self, start: u64, end: u64) -> &[Cell] {
        let length = self.cells.len() as u64;
        let (start, end) = (start.min(length) as usize, end.min(length) as usize);
        &self.cells[start..end.max(start)]
    }
}

/// Which side of a session a recovered element is on.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub enum Side {
    /// Held by the side that sent the cells, not by this one.
    Theirs,
    /// Held by this side, not by the side that sent the cells.
    Mine,
}

/// Bounds on what one decoder holds.
#[derive(Clone, Copy, Debug)]
pub struct DecoderLimits {
    /// The most cells a decoder accepts in total; more are refused.
    pub max_cells: u64,
}

impl Default for DecoderLimits {
    fn default() -> Self {
        DecoderLimits {
            max_cells: MAXIMUM_LENGTH,
        }
    }
}

/// Why a sketch could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SketchError {
    #[error("malformed sketch cells: {0}")]
    Malformed(String),
    #[error("sketch cells exceed a limit: {0} (the session should fall back to trie descent)")]
    LimitExceeded(String),
    #[error("sketch cells arrived out of order: expected cell {expected}, got {got}")]
    OutOfOrder { expected: u64, got: u64 },
    #[error("this side keeps only {kept} cells, {wanted} were needed")]
    BeyondLength { kept: u64, wanted: u64 },
}

#[derive(Clone, Copy, Debug)]
struct Recovered {
    element: Element,
    checksum: u64,
    sign: i64,
    walk: IndexWalk,
}

/// A peeling decoder: difference cells in, the elements of the difference out.
#[derive(Clone, Debug)]
pub struct Decoder {
    key: SketchKey,
    limits: DecoderLimits,
    cells: Vec<Cell>,
    recovered: Vec<Recovered>,
    recovered_set: HashSet<Element>,
    candidates: Vec<u64>,
    nonzero: usize,
    rejected: u64,
}

impl Decoder {
    /// An empty decoder for cells computed under `key`.
    pub fn new(key: SketchKey, limits: DecoderLimits) -> Self {
        Decoder {
            key,
            limits,
            cells: Vec::new(),
            recovered: Vec::new(),
            recovered_set: HashSet::new(),
            candidates: Vec::new(),
            nonzero: 0,
            rejected: 0,
        }
    }

    /// The key the decoder checks cells under.
    pub fn key(&self) -> &SketchKey {
        &self.key
    }

    /// How many cells have been received.
    pub fn received(&self) -> u64 {
        self.cells.len() as u64
    }

    /// Adds the other side's cells `start..start + theirs.len()` (which must continue the cells
    /// already received), with this side's own cells for the same indices.
    pub fn add_cells(&mut self, start: u64, theirs: &[Cell], mine: &[Cell]) -> Result<(), SketchError> {
        if start != self.received() {
            return Err(SketchError::OutOfOrder {
                expected: self.received(),
                got: start,
            });
        }
        let end = start.saturating_add(theirs.len() as u64);
        if end > self.limits.max_cells {
            return Err(SketchError::LimitExceeded(format!(
                "{end} cells, at most {} allowed",
                self.limits.max_cells
            )));
        }
        if mine.len() < theirs.len() {
            return Err(SketchError::BeyondLength {
                kept: start + mine.len() as u64,
                wanted: end,
            });
        }
        self.cells.reserve(theirs.len());
        for (offset, (their_cell, my_cell)) in theirs.iter().zip(mine).enumerate() {
            let index = start + offset as u64;
            self.cells.push(their_cell.subtract(my_cell).truncated(index));
        }
        // Elements already recovered reach into the new cells too.
        for recovered in &mut self.recovered {
            while recovered.walk.next < end {
                let index = recovered.walk.advance();
                self.cells[index as usize].toggle(&recovered.element, recovered.checksum, -recovered.sign);
            }
        }
        for index in start..end {
            let cell = self.cells[index as usize].truncated(index);
            self.cells[index as usize] = cell;
            if !cell.is_zero(index) {
                self.nonzero += 1;
                self.candidates.push(index);
            }
        }
        Ok(())
    }

    /// Peels every pure cell. `accept(element, side)` vets each recovered element before it is
    /// taken (on this side: held here with that tag; on theirs: not held here with that tag); a
    /// refused element stays in its cells. Work is bounded by the cells held: at most one element
    /// is recovered per cell and each touches O(log cells) cells.
    pub fn peel(&mut self, mut accept: impl FnMut(&Element, Side) -> bool) {
        while let Some(index) = self.candidates.pop() {
            let cell = self.cells[index as usize];
            let sign = match cell.truncated(index).count {
                1 => 1,
                -1 | 0xff => -1,
                _ => continue,
            };
            let element = Element {
                id: cell.id_sum,
                tag: cell.tag_sum,
            };
            let (checksum, seed) = self.key.element_hash(&element);
            let expected = if index == 0 { checksum } else { checksum & 0xffff_ffff };
            if cell.checksum_sum != expected {
                continue;
            }
            if self.recovered.len() as u64 >= self.received()
                || self.recovered_set.contains(&element)
                || !accept(&element, if sign > 0 { Side::Theirs } else { Side::Mine })
            {
                self.rejected += 1;
                continue;
            }
            let mut walk = IndexWalk::new(seed);
            let end = self.received();
            while walk.next < end {
                let touched = walk.advance();
                let slot = &mut self.cells[touched as usize];
                let was_zero = slot.is_zero(touched);
                slot.toggle(&element, checksum, -sign);
                *slot = slot.truncated(touched);
                match (was_zero, slot.is_zero(touched)) {
                    (true, false) => self.nonzero += 1,
                    (false, true) => self.nonzero -= 1,
                    _ => {}
                }
                if !slot.is_zero(touched) {
                    self.candidates.push(touched);
                }
            }
            self.recovered_set.insert(element);
            self.recovered.push(Recovered {
                element,
                checksum,
                sign,
                walk,
            });
        }
    }

    /// Whether every received cell is zero: the difference is known (cell 0 certifies it).
    pub fn is_complete(&self) -> bool {
        !self.cells.is_empty() && self.nonzero == 0
    }

    /// The elements recovered so far, with their side.
    pub fn recovered(&self) -> impl Iterator<Item = (Element, Side)> + '_ {
        self.recovered.iter().map(|recovered| {
            let side = if recovered.sign > 0 { Side::Theirs } else { Side::Mine };
            (recovered.element, side)
        })
    }

    /// How many recovered elements were refused (by the caller's check or as repeats).
    pub fn rejected(&self) -> u64 {
        self.rejected
    }

    /// How many cells are still non-zero.
    pub fn nonzero_cells(&self) -> usize {
        self.nonzero
    }

    /// An estimate of how many elements of the difference are not recovered yet: at least the
    /// exact count left in cell 0, and otherwise read from the spread of the counts left in the
    /// upper half of the cells. Cell `i` holds each element left with probability `rho(i)`, so its
    /// count is `rho` times the net count (cell 0's) plus a deviation of variance `rho (1 - rho)`
    /// per element; the deviations are small enough to read from the 8 bits a cell carries.
    pub fn estimate_remaining(&self) -> u64 {
        let Some(first) = self.cells.first() else { return 0 };
        let net = first.count as f64;
        let length = self.cells.len();
        let (mut squares, mut weight) = (0.0, 0.0);
        for (index, cell) in self.cells.iter().enumerate().skip((length / 2).max(1)) {
            let rho = mapping_probability(index as u64);
            let expected = (rho * net).round() as i64;
            let deviation = f64::from(cell.count.wrapping_sub(expected) as u8 as i8);
            squares += deviation * deviation;
            weight += rho * (1.0 - rho);
        }
        let spread = if weight > 0.0 { squares / weight } else { 0.0 };
        net.abs().max(spread).ceil() as u64
    }
}

/// The probability that an element maps to cell `index`.
pub fn mapping_probability(index: u64) -> f64 {
    2.0 / (index as f64 + 2.0)
}

/// About how many cells decode a difference of `difference` elements nine times in ten. Measured
/// with this module's decoder (cells needed per difference, mean and 90th percentile): d = 10:
/// 1.75, 23 cells; d = 30: 1.58, 56; d = 100: 1.45, 158; d = 300: 1.40, 441; d = 1,000: 1.38,
/// 1,410; d = 10,000: 1.37, 13,700 — the averages the rateless paper reports.
pub fn cells_for(difference: u64) -> u64 {
    if difference == 0 {
        return 1;
    }
    let overhead = if difference <= 4 {
        3.0
    } else if difference <= 16 {
        2.2
    } else if difference <= 64 {
        1.8
    } else if difference <= 256 {
        1.55
    } else if difference <= 2048 {
        1.45
    } else {
        1.38
    };
    (difference as f64 * overhead).ceil() as u64 + 2
}

// ---------------------------------------------------------------------------------------------
// Wire form
// ---------------------------------------------------------------------------------------------

/// Encodes cells `start..start + cells.len()` of a stream: varint start, then cell 0 (if the
/// batch starts there) as ID sum (16 bytes), tag sum (4), 64-bit checksum (8) and the exact
/// count as a varint, then every other cell in [`CELL_WIRE_BYTES`] bytes. All big-endian.
pub fn encode_cells(start: u64, cells: &[Cell]) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + cells.len() * CELL_WIRE_BYTES + 12);
    put_varint(&mut out, start);
    for (offset, cell) in cells.iter().enumerate() {
        let index = start + offset as u64;
        out.extend_from_slice(&cell.id_sum.to_be_bytes());
        out.extend_from_slice(&cell.tag_sum.to_be_bytes());
        if index == 0 {
            out.extend_from_slice(&cell.checksum_sum.to_be_bytes());
            put_varint(&mut out, cell.count as u64);
        } else {
            out.extend_from_slice(&(cell.checksum_sum as u32).to_be_bytes());
            out.push(cell.count as u8);
        }
    }
    out
}

/// Decodes what [`encode_cells`] wrote, refusing more than `max_cells` cells or cells beyond
/// index `max_cells`. The number of cells comes from the byte length, never from a claim.
pub fn decode_cells(bytes: &[u8], max_cells: u64) -> Result<(u64, Vec<Cell>), SketchError> {
    let mut position = 0;
    let start = take_varint(bytes, &mut position)?;
    let mut cells = Vec::new();
    if start == 0 && position < bytes.len() {
        let fixed = bytes
            .get(position..position + 28)
            .ok_or_else(|| SketchError::Malformed("truncated cell 0".into()))?;
        position += 28;
        let count = take_varint(bytes, &mut position)?;
        if count > i64::MAX as u64 {
            return Err(SketchError::Malformed("cell 0 count out of range".into()));
        }
        cells.push(Cell {
            id_sum: u128::from_be_bytes(fixed[..16].try_into().unwrap_or_default()),
            tag_sum: u32::from_be_bytes(fixed[16..20].try_into().unwrap_or_default()),
            checksum_sum: u64::from_be_bytes(fixed[20..28].try_into().unwrap_or_default()),
            count: count as i64,
        });
    }
    let rest = &bytes[position..];
    if !rest.len().is_multiple_of(CELL_WIRE_BYTES) {
        return Err(SketchError::Malformed(format!(
            "{} bytes of cells is not a whole number of {CELL_WIRE_BYTES}-byte cells",
            rest.len()
        )));
    }
    let total = cells.len() as u64 + (rest.len() / CELL_WIRE_BYTES) as u64;
    if total > max_cells || start.saturating_add(total) > max_cells {
        return Err(SketchError::LimitExceeded(format!(
            "cells {start}..{} with at most {max_cells} allowed",
            start.saturating_add(total)
        )));
    }
    cells.reserve(rest.len() / CELL_WIRE_BYTES);
    for chunk in rest.chunks_exact(CELL_WIRE_BYTES) {
        cells.push(Cell {
            id_sum: u128::from_be_bytes(chunk[..16].try_into().unwrap_or_default()),
            tag_sum: u32::from_be_bytes(chunk[16..20].try_into().unwrap_or_default()),
            checksum_sum: u64::from(u32::from_be_bytes(chunk[20..24].try_into().unwrap_or_default())),
            count: i64::from(chunk[24]),
        });
    }
    Ok((start, cells))
}

pub(crate) fn put_varint(out: &mut Vec<u8>, value: u64) {
    crate::varint::put(out, value);
}

pub(crate) fn take_varint(bytes: &[u8], position: &mut usize) -> Result<u64, SketchError> {
    crate::varint::take(bytes, position).map_err(|error| match error {
        crate::varint::VarintError::Truncated => SketchError::Malformed("truncated varint".into()),
        crate::varint::VarintError::TooLong => SketchError::Malformed("varint longer than 64 bits".into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn key() -> SketchKey {
        SketchKey::derive(b"test secret", b"mailbox 1")
    }

    fn state(id: u128, version: u8) -> [u8; 32] {
        let mut input = id.to_be_bytes().to_vec();
        input.push(version);
        *blake3::hash(&input).as_bytes()
    }

    /// Decodes `theirs - mine` from the first `length` cells; returns the recovered elements.
    fn decode(
        mine: &BTreeMap<u128, [u8; 32]>,
        theirs: &BTreeMap<u128, [u8; 32]>,
        length: u64,
    ) -> (Decoder, Vec<(Element, Side)>) {
        let my_cells = SketchCells::from_leaves(key(), length, mine);
        let their_cells = SketchCells::from_leaves(key(), length, theirs);
        let mut decoder = Decoder::new(key(), DecoderLimits::default());
        decoder
            .add_cells(0, their_cells.cells(0, length), my_cells.cells(0, length))
            .unwrap();
        decoder.peel(|element, side| {
            let held = mine.get(&element.id).map(|hash| key().tag(element.id, hash)) == Some(element.tag);
            held == (side == Side::Mine)
        });
        let recovered = decoder.recovered().collect();
        (decoder, recovered)
    }

    #[test]
    fn index_walks_follow_the_mapping_probability() {
        let trials = 20_000u64;
        let mut hits = [0u64; 40];
        for seed in 0..trials {
            let mut walk = IndexWalk::new(seed.wrapping_mul(0x2545_f491_4f6c_dd1d));
            loop {
                let index = walk.advance();
                if index >= 40 {
                    break;
                }
                hits[index as usize] += 1;
            }
        }
        assert_eq!(hits[0], trials, "every element is in cell 0");
        for (index, count) in hits.iter().enumerate() {
            let expected = mapping_probability(index as u64) * trials as f64;
            let deviation = (*count as f64 - expected).abs();
            assert!(
                deviation < 5.0 * expected.sqrt() + 5.0,
                "cell {index}: {count} hits, {expected} expected"
            );
        }
    }

    #[test]
    fn maintained_cells_equal_rebuilt_cells() {
        let mut leaves = BTreeMap::new();
        let mut cells = SketchCells::new(key(), 256);
        for id in 0..500u128 {
            leaves.insert(id, state(id, 0));
            cells.insert(id, &state(id, 0));
        }
        for id in (0..500u128).step_by(7) {
            cells.replace(id, Some(&state(id, 0)), Some(&state(id, 1)));
            leaves.insert(id, state(id, 1));
        }
        for id in (0..500u128).step_by(11) {
            cells.replace(id, leaves.get(&id), None);
            leaves.remove(&id);
        }
        let rebuilt = SketchCells::from_leaves(key(), 256, &leaves);
        assert_eq!(cells.cells(0, 256), rebuilt.cells(0, 256));
        assert_eq!(cells.cells(0, 1)[0].count, leaves.len() as i64);
    }

    #[test]
    fn one_difference_decodes_from_cell_zero() {
        let mine: BTreeMap<u128, [u8; 32]> = (0..1000u128).map(|id| (id, state(id, 0))).collect();
        let mut theirs = mine.clone();
        theirs.insert(5000, state(5000, 0));
        let (decoder, recovered) = decode(&mine, &theirs, 1);
        assert!(decoder.is_complete());
        assert_eq!(recovered, vec![(key().element(5000, &state(5000, 0)), Side::Theirs)]);
    }

    #[test]
    fn a_state_change_is_two_elements() {
        let mine: BTreeMap<u128, [u8; 32]> = (0..1000u128).map(|id| (id, state(id, 0))).collect();
        let mut theirs = mine.clone();
        theirs.insert(17, state(17, 1));
        let (decoder, mut recovered) = decode(&mine, &theirs, 8);
        assert!(decoder.is_complete());
        recovered.sort_by_key(|(_, side)| *side == Side::Mine);
        assert_eq!(
            recovered,
            vec![
                (key().element(17, &state(17, 1)), Side::Theirs),
                (key().element(17, &state(17, 0)), Side::Mine)
            ]
        );
    }

    #[test]
    fn different_keys_give_different_cells() {
        let leaves: BTreeMap<u128, [u8; 32]> = (0..100u128).map(|id| (id, state(id, 0))).collect();
        let one = SketchCells::from_leaves(key(), 16, &leaves);
        let other = SketchCells::from_leaves(SketchKey::derive(b"test secret", b"mailbox 2"), 16, &leaves);
        assert_ne!(one.cells(0, 16), other.cells(0, 16));
    }

    /// How many cells decoding needs, over many trials, for the overheads in [`cells_for`].
    fn cells_needed(difference: u64, seed: u64) -> u64 {
        let mine: BTreeMap<u128, [u8; 32]> = (0..200u128).map(|id| (id, state(id, 0))).collect();
        let mut theirs = mine.clone();
        for value in 0..difference {
            let id = 1_000_000 + u128::from(seed) * 100_000 + u128::from(value);
            theirs.insert(id, state(id, 0));
        }
        let length = 4 * difference + 16;
        let my_cells = SketchCells::from_leaves(key(), length, &mine);
        let their_cells = SketchCells::from_leaves(key(), length, &theirs);
        let mut decoder = Decoder::new(key(), DecoderLimits::default());
        for index in 0..length {
            decoder
                .add_cells(
                    index,
                    their_cells.cells(index, index + 1),
                    my_cells.cells(index, index + 1),
                )
                .unwrap();
            decoder.peel(|_, _| true);
            if decoder.is_complete() {
                return index + 1;
            }
        }
        length + 1
    }

    #[test]
    fn overheads_are_near_the_papers() {
        for (difference, trials) in [(10u64, 200u64), (100, 60), (1000, 8)] {
            let needed: Vec<u64> = (0..trials).map(|seed| cells_needed(difference, seed)).collect();
            let mean = needed.iter().sum::<u64>() as f64 / trials as f64 / difference as f64;
            assert!(mean < 2.0, "d = {difference}: {mean} cells per difference");
            let covered = needed.iter().filter(|cells| **cells <= cells_for(difference)).count();
            assert!(
                covered as f64 >= 0.7 * trials as f64,
                "d = {difference}: cells_for covers {covered} of {trials}"
            );
        }
    }

    #[test]
    fn hostile_cells_are_bounded() {
        let mine: BTreeMap<u128, [u8; 32]> = (0..50u128).map(|id| (id, state(id, 0))).collect();
        let my_cells = SketchCells::from_leaves(key(), 64, &mine);
        let limits = DecoderLimits { max_cells: 64 };
        // Cells that each claim one forged element, all the same: recovered at most once.
        let element = Element { id: 99, tag: 7 };
        let (checksum, _) = key().element_hash(&element);
        let mut theirs: Vec<Cell> = my_cells.cells(0, 64).to_vec();
        for (index, cell) in theirs.iter_mut().enumerate() {
            cell.toggle(&element, checksum, 1);
            cell.toggle(&element, checksum, 1);
            cell.toggle(&element, checksum, 1);
            *cell = cell.truncated(index as u64);
        }
        let mut decoder = Decoder::new(key(), limits);
        decoder.add_cells(0, &theirs, my_cells.cells(0, 64)).unwrap();
        decoder.peel(|_, _| true);
        assert!(decoder.recovered().count() <= 1);
        assert!(decoder
            .add_cells(64, &theirs[..1], my_cells.cells(0, 1))
            .is_err_and(|error| matches!(error, SketchError::LimitExceeded(_))));
        assert!(matches!(
            decoder.add_cells(3, &theirs[..1], my_cells.cells(0, 1)),
            Err(SketchError::OutOfOrder { .. })
        ));
    }

    #[test]
    fn wire_form_round_trips_and_refuses_bad_lengths() {
        let leaves: BTreeMap<u128, [u8; 32]> = (0..300u128).map(|id| (id << 90 | id, state(id, 0))).collect();
        let cells = SketchCells::from_leaves(key(), 32, &leaves);
        for start in [0u64, 1, 5] {
            let bytes = encode_cells(start, cells.cells(start, 32));
            let (decoded_start, decoded) = decode_cells(&bytes, 1000).unwrap();
            assert_eq!(decoded_start, start);
            let expected: Vec<Cell> = cells
                .cells(start, 32)
                .iter()
                .enumerate()
                .map(|(offset, cell)| cell.truncated(start + offset as u64))
                .collect();
            assert_eq!(decoded, expected);
        }
        let bytes = encode_cells(1, cells.cells(1, 4));
        assert_eq!(bytes.len(), 1 + 3 * CELL_WIRE_BYTES);
        assert!(decode_cells(&bytes[..bytes.len() - 1], 1000).is_err());
        assert!(decode_cells(&bytes, 2).is_err(), "more cells than allowed");
        assert!(decode_cells(&[0xff; 11], 1000).is_err());
        assert!(decode_cells(&[], 1000).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn random_sets_decode_to_their_exact_difference(
            shared in proptest::collection::btree_set(any::<u64>(), 0..300),
            only_mine in proptest::collection::btree_set(any::<u64>(), 0..40),
            only_theirs in proptest::collection::btree_set(any::<u64>(), 0..40),
            changed in proptest::collection::vec(any::<prop::sample::Index>(), 0..10),
        ) {
            let shared: Vec<u128> = shared.into_iter().map(u128::from).collect();
            let mut mine: BTreeMap<u128, [u8; 32]> = shared.iter().map(|id| (*id, state(*id, 0))).collect();
            let mut theirs = mine.clone();
            for value in &only_mine { let id = u128::from(*value) << 64 | 1; mine.insert(id, state(id, 0)); }
            for value in &only_theirs { let id = u128::from(*value) << 64 | 2; theirs.insert(id, state(id, 0)); }
            for index in &changed {
                if !shared.is_empty() {
                    let id = shared[index.index(shared.len())];
                    theirs.insert(id, state(id, 1));
                }
            }
            let mut expected: Vec<(Element, Side)> = Vec::new();
            for (id, hash) in &theirs {
                if mine.get(id) != Some(hash) { expected.push((key().element(*id, hash), Side::Theirs)); }
            }
            for (id, hash) in &mine {
                if theirs.get(id) != Some(hash) { expected.push((key().element(*id, hash), Side::Mine)); }
            }
            let length = 8 * expected.len() as u64 + 16;
            let (decoder, mut recovered) = decode(&mine, &theirs, length);
            prop_assert!(decoder.is_complete());
            expected.sort();
            recovered.sort();
            prop_assert_eq!(recovered, expected);
        }

        #[test]
        fn arbitrary_cells_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok((start, cells)) = decode_cells(&bytes, 64) {
                let mine = SketchCells::new(key(), 64);
                let mut decoder = Decoder::new(key(), DecoderLimits { max_cells: 64 });
                if decoder.add_cells(start, &cells, mine.cells(start, start + cells.len() as u64)).is_ok() {
                    decoder.peel(|_, _| true);
                    prop_assert!(decoder.recovered().count() as u64 <= decoder.received());
                    let _ = decoder.estimate_remaining();
                }
            }
        }
    }
}
