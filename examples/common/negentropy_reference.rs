//! Reference driver for the `negentropy` crate (0.5.3), used by benchmarks to
//! compare mailmesh's own range reconciliation against negentropy on the same
//! two sets, in the same process, with no network in between.
//!
//! Include from an example with
//! `#[path = "common/negentropy_reference.rs"] mod negentropy_reference;`.
//!
//! Mapping of mailmesh IDs onto negentropy items:
//! * timestamp = the big-endian millisecond timestamp in the ID's first 6 bytes
//!   (ULID layout), so negentropy's (timestamp, id) order equals the byte order
//!   of our IDs;
//! * 32-byte negentropy id = the 16 ID bytes followed by 16 zero bytes.
//!
//! Settings: `NegentropyStorageVector`, frame size limit 0 (= unlimited; the
//! crate accepts 0 or a value >= 4096, and 0 is what its own examples use), so
//! every message carries a whole protocol round and the round-trip count is the
//! protocol's intrinsic one rather than an artefact of frame splitting.

use std::time::Instant;

use negentropy::{Id, Negentropy, NegentropyStorageVector};

/// Figures of one negentropy reconciliation.
// Not every benchmark reads every figure; don't warn about unread fields.
#[allow(dead_code)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NegentropyFigures {
    /// Total bytes of all messages in both directions (client -> server
    /// messages including the initial one, plus every server reply). Pure
    /// negentropy payload; no transport framing.
    pub bytes: u64,
    /// Number of client -> server messages that received a server reply.
    ///
    /// Counted as follows: the client's `initiate()` message is sent and the
    /// counter is incremented once the server's `reconcile()` has produced its
    /// reply; the client then processes the reply with `reconcile_with_ids()`.
    /// If that returns `Some(msg)`, `msg` is sent, answered and counted the
    /// same way; when it returns `None` the client has nothing more to send and
    /// the exchange ends (nothing is sent, nothing counted). So the count is
    /// exactly the number of request/reply pairs, and equals the number of
    /// client messages. Every negentropy exchange has at least one; identical
    /// sets cost exactly one (the server's reply then matches every range and
    /// the client stops).
    pub round_trips: u64,
    /// Wall time of building: inserting into and sealing both storages, and
    /// creating both protocol instances.
    pub build_ms: f64,
    /// Wall time of the exchange: all message processing on both sides. The
    /// correctness check afterwards is in neither figure.
    pub exchange_ms: f64,
    /// Size of the client's final `have` list (IDs the client has and the
    /// server lacks).
    pub have: usize,
    /// Size of the client's final `need` list (IDs the server has and the
    /// client lacks).
    pub need: usize,
}

/// Millisecond timestamp held big-endian in the first 6 bytes of a ULID-style ID.
fn timestamp_ms(id: &[u8; 16]) -> u64 {
    id[..6].iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
}

/// The 32-byte negentropy id for a 16-byte ID: the ID then 16 zero bytes.
fn to_negentropy_id(id: &[u8; 16]) -> Id {
    let mut wide = [0u8; 32];
    wide[..16].copy_from_slice(id);
    Id::from_byte_array(wide)
}

/// Back from a negentropy id; fails if the padding is not all zero.
fn from_negentropy_id(id: &Id) -> Result<[u8; 16], String> {
    let bytes = id.as_bytes();
    if bytes[16..].iter().any(|&b| b != 0) {
        return Err(format!(
            "negentropy returned an id with non-zero padding: {:02x?}",
            bytes
        ));
    }
    let mut narrow = [0u8; 16];
    narrow.copy_from_slice(&bytes[..16]);
    Ok(narrow)
}

fn build_storage(items: &[[u8; 16]]) -> Result<NegentropyStorageVector, String> {
    let mut storage = NegentropyStorageVector::with_capacity(items.len());
    for id in items {
        storage
            .insert(timestamp_ms(id), to_negentropy_id(id))
            .map_err(|e| format!("negentropy insert: {e}"))?;
    }
    storage.seal().map_err(|e| format!("negentropy seal: {e}"))?;
    Ok(storage)
}

fn check_strictly_sorted(name: &str, items: &[[u8; 16]]) -> Result<(), String> {
    match items.windows(2).position(|w| w[0] >= w[1]) {
        Some(i) => Err(format!(
            "{name} items are not sorted and deduplicated at index {}",
            i + 1
        )),
        None => Ok(()),
    }
}

/// Reconcile `client_items` (initiator) against `server_items` with negentropy
/// and return the figures.
///
/// `items`: sorted, deduplicated 16-byte IDs, time-ordered (the first 6 bytes
/// are a big-endian millisecond timestamp, as in ULID). Unsorted input is
/// rejected with `Err`.
///
/// The result is verified before returning: have ∪ need must equal the
/// symmetric difference of the two sets, and additionally each list must hold
/// only IDs from the correct side (have ⊆ client \ server,
/// need ⊆ server \ client) with no duplicates; otherwise `Err`.
pub fn reconcile(client_items: &[[u8; 16]], server_items: &[[u8; 16]]) -> Result<NegentropyFigures, String> {
    check_strictly_sorted("client", client_items)?;
    check_strictly_sorted("server", server_items)?;

    let started = Instant::now();

    let client_storage = build_storage(client_items)?;
    let server_storage = build_storage(server_items)?;
    let mut client = Negentropy::owned(client_storage, 0).map_err(|e| format!("negentropy client: {e}"))?;
    let mut server = Negentropy::owned(server_storage, 0).map_err(|e| format!("negentropy server: {e}"))?;
    let build_ms = started.elapsed().as_secs_f64() * 1000.0;
    let exchanging = Instant::now();

    let mut have_ids: Vec<Id> = Vec::new();
    let mut need_ids: Vec<Id> = Vec::new();
    let mut bytes: u64 = 0;
    let mut round_trips: u64 = 0;

    let mut outgoing: Vec<u8> = client.initiate().map_err(|e| format!("negentropy initiate: {e}"))?;
    loop {
        bytes += outgoing.len() as u64;
        let reply = server
            .reconcile(&outgoing)
            .map_err(|e| format!("negentropy server reconcile (round {}): {e}", round_trips + 1))?;
        bytes += reply.len() as u64;
        round_trips += 1;
        // `reconcile_with_ids` appends to the two lists on every call.
        match client
            .reconcile_with_ids(&reply, &mut have_ids, &mut need_ids)
            .map_err(|e| format!("negentropy client reconcile (round {round_trips}): {e}"))?
        {
            Some(next) => outgoing = next,
            None => break,
        }
    }

    let exchange_ms = exchanging.elapsed().as_secs_f64() * 1000.0;

    verify(client_items, server_items, &have_ids, &need_ids)?;

    Ok(NegentropyFigures {
        bytes,
        round_trips,
        build_ms,
        exchange_ms,
        have: have_ids.len(),
        need: need_ids.len(),
    })
}

fn verify(
    client_items: &[[u8; 16]],
    server_items: &[[u8; 16]],
    have_ids: &[Id],
    need_ids: &[Id],
) -> Result<(), String> {
    // Expected client-only and server-only IDs, by a merge of the sorted inputs.
    let mut client_only: Vec<[u8; 16]> = Vec::new();
    let mut server_only: Vec<[u8; 16]> = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < client_items.len() && j < server_items.len() {
        match client_items[i].cmp(&server_items[j]) {
            std::cmp::Ordering::Less => {
                client_only.push(client_items[i]);
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                server_only.push(server_items[j]);
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                i += 1;
                j += 1;
            }
        }
    }
    client_only.extend_from_slice(&client_items[i..]);
    server_only.extend_from_slice(&server_items[j..]);

    let decode = |ids: &[Id]| -> Result<Vec<[u8; 16]>, String> {
        let mut out = ids.iter().map(from_negentropy_id).collect::<Result<Vec<_>, _>>()?;
        out.sort_unstable();
        Ok(out)
    };
    let have = decode(have_ids)?;
    let need = decode(need_ids)?;

    // The required check: have ∪ need == symmetric difference (as sets).
    let mut union: Vec<[u8; 16]> = have.iter().chain(need.iter()).copied().collect();
    union.sort_unstable();
    union.dedup();
    let mut sym_diff: Vec<[u8; 16]> = client_only.iter().chain(server_only.iter()).copied().collect();
    sym_diff.sort_unstable();
    if union != sym_diff {
        return Err(format!(
            "negentropy result wrong: |have ∪ need| = {}, |symmetric difference| = {} \
             (client-only {}, server-only {})",
            union.len(),
            sym_diff.len(),
            client_only.len(),
            server_only.len()
        ));
    }
    // Direction and duplicates: have must be exactly client \ server, need exactly server \ client.
    if have != client_only {
        return Err(format!(
            "negentropy have list wrong: {} IDs reported, {} expected (client \\ server)",
            have.len(),
            client_only.len()
        ));
    }
    if need != server_only {
        return Err(format!(
            "negentropy need list wrong: {} IDs reported, {} expected (server \\ client)",
            need.len(),
            server_only.len()
        ));
    }
    Ok(())
}
