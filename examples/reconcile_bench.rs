//! Set-reconciliation benchmark: mailmesh's trie protocol and its sketch session against
//! negentropy on the same two sets.
//!
//! `cargo run --release --example reconcile_bench -- --n 1000000 --diff 100 --layout random --json [--store]`
//!
//! Two replicas of one mailbox hold `n` time-ordered IDs (spread over a year, as a busy mailbox's
//! would be) and differ by `diff`:
//! - `clustered`: the `diff` newest IDs are missing on the initiating side;
//! - `random`: `diff` IDs chosen uniformly are missing on the initiating side;
//! - `two-sided`: `diff / 2` random IDs missing on each side.
//!
//! `bytes` counts every reconciliation message both sides send, CBOR-encoded exactly as on the
//! wire, plus 16 bytes for each ID a side learns only from the records it pulls by prefix (a
//! subtree the other side lacks entirely is pulled whole instead of listed). `round_trips` counts
//! initiator messages (each gets a reply).
//!
//! Every protocol is timed the same way, in two parts reported apart (issue 18: the trie's time
//! once left out building while negentropy's included it):
//! - `*_build_ms`: building both sides' structures from the sorted IDs, in memory: the two tries
//!   (`trie_build_ms`); the two tries and the two sketch cell arrays the sketch session reads
//!   (`sketch_build_ms`, of which `sketch_cells_build_ms` is the cells; the store does not keep
//!   sketch cells, so a node would build them too);
//!   negentropy's two storages, inserted and sealed, and its two protocol instances
//!   (`negentropy_build_ms`).
//! - `*_exchange_ms`: both sides' processing of the exchange, encoding and decoding every message
//!   and resolving whole-prefix pulls to IDs. The correctness check is in neither.
//!
//! `--store` adds the trie protocol over two real RocksDB stores (`mailmesh::store`, WAL syncs
//! off, in a temporary directory): `store_build_ms` is merging every record into both stores
//! through `Store::apply`, which writes the records, their local indexes and the trie aggregates
//! (so it bounds the trie's share from above); `store_exchange_ms` is the same exchange read
//! straight from RocksDB. Loading a million records into two stores takes minutes on a small
//! machine, so the store path is usually run with a smaller `--n` (the JSON's `n` says which).
//!
//! `sketch_path` says how the session went: `settled` (decoded from the opening cells),
//! `sketch` (streamed cells) or `trie` (trie descent). Each side's result is checked against the
//! true difference before anything is printed.

use std::collections::BTreeSet;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use mailmesh::merkle::{MemoryTree, StoredDepth, TreeView};
use mailmesh::model::{BlobHash, MailboxKey, MessageId, MessageRecord, NodeId};
use mailmesh::store::{Operation, Space, Store, StoreOptions};
use mailmesh::sync::{self, Outcome, SyncLimits};
use mailmesh_core::sketch::{SketchCells, SketchKey};
use mailmesh_core::sketch_session::{self, Asker, Message, SessionLimits, Step};

#[path = "common/negentropy_reference.rs"]
mod negentropy_reference;

struct Arguments {
    n: usize,
    diff: usize,
    layout: String,
    json: bool,
    seed: u64,
    leaf_threshold: u64,
    skip_negentropy: bool,
    skip_sketch: bool,
    store: bool,
}

fn parse_arguments() -> Result<Arguments, String> {
    let mut arguments = Arguments {
        n: 1_000_000,
        diff: 100,
        layout: "random".into(),
        json: false,
        seed: 1,
        leaf_threshold: SyncLimits::default().leaf_threshold,
        skip_negentropy: false,
        skip_sketch: false,
        store: false,
    };
    let mut iterator = std::env::args().skip(1);
    while let Some(flag) = iterator.next() {
        let mut value = || iterator.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--n" => arguments.n = value()?.parse().map_err(|_| "--n takes a number")?,
            "--diff" => arguments.diff = value()?.parse().map_err(|_| "--diff takes a number")?,
            "--layout" => arguments.layout = value()?,
            "--seed" => arguments.seed = value()?.parse().map_err(|_| "--seed takes a number")?,
            "--leaf-threshold" => {
                arguments.leaf_threshold = value()?.parse().map_err(|_| "--leaf-threshold takes a number")?
            }
            "--json" => arguments.json = true,
            "--skip-negentropy" => arguments.skip_negentropy = true,
            "--skip-sketch" => arguments.skip_sketch = true,
            "--store" => arguments.store = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if !matches!(arguments.layout.as_str(), "clustered" | "random" | "two-sided") {
        return Err("--layout is clustered, random or two-sided".into());
    }
    if arguments.diff > arguments.n {
        return Err("--diff must not exceed --n".into());
    }
    Ok(arguments)
}

/// A small deterministic generator (splitmix64) so runs are repeatable.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

fn make_ids(n: usize, random: &mut SplitMix) -> Vec<u128> {
    let start_millis: u64 = 1_735_689_600_000; // 2025-01-01
    let year_millis: u64 = 365 * 24 * 3600 * 1000;
    let mut ids = BTreeSet::new();
    while ids.len() < n {
        let millis = start_millis + random.next() % year_millis;
        let low = (u128::from(random.next()) << 16 | u128::from(random.next() & 0xffff)) & ((1u128 << 80) - 1);
        ids.insert(u128::from(millis) << 80 | low);
    }
    ids.into_iter().collect()
}

fn leaf_hash(key: u128) -> [u8; 32] {
    *blake3::hash(&key.to_be_bytes()).as_bytes()
}

/// The IDs a side learned; IDs learned only through whole-prefix pulls travel with the pulled
/// records, so they are counted into `bytes` at 16 each.
fn learned<V: TreeView>(needs: &mut Outcome, source: &V, bytes: &mut u64) -> BTreeSet<u128> {
    needs.normalize();
    let mut keys: BTreeSet<u128> = needs.need_keys.iter().copied().collect();
    for prefix in &needs.need_prefixes {
        let pulled = source
            .leaves(*prefix, usize::MAX)
            .expect("the source's leaves are readable");
        *bytes += 16 * pulled.len() as u64;
        keys.extend(pulled.into_iter().map(|(key, _)| key));
    }
    keys
}

/// Exits when a protocol's result is not the true difference.
fn check(
    protocol: &str,
    client_learned: &BTreeSet<u128>,
    missing_on_client: &BTreeSet<u128>,
    server_learned: &BTreeSet<u128>,
    missing_on_server: &BTreeSet<u128>,
) {
    if client_learned != missing_on_client || server_learned != missing_on_server {
        eprintln!(
            "reconcile_bench: WRONG RESULT ({protocol}): client learned {} of {} missing, server {} of {}",
            client_learned.len(),
            missing_on_client.len(),
            server_learned.len(),
            missing_on_server.len()
        );
        std::process::exit(1);
    }
}

/// What one trie exchange cost, and what each side learned.
struct TrieFigures {
    bytes: u64,
    round_trips: u64,
    exchange_ms: f64,
    client_learned: BTreeSet<u128>,
    server_learned: BTreeSet<u128>,
}

/// One trie exchange, client first, every message encoded and decoded as on the wire, over any
/// tree (in memory or in a store); whole-prefix pulls are resolved to IDs inside the timing.
fn trie_exchange<V: TreeView>(client: &V, server: &V, limits: &SyncLimits) -> TrieFigures {
    let started = Instant::now();
    let mut bytes: u64 = 0;
    let mut messages = 0u64;
    let (mut client_needs, mut server_needs) = (Outcome::default(), Outcome::default());
    let mut outgoing = sync::initial(client, limits).expect("initial message");
    let mut client_turn = false;
    while !outgoing.is_empty() {
        let encoded = sync::encode(&outgoing);
        bytes += encoded.len() as u64;
        messages += 1;
        let incoming = sync::decode(&encoded, limits).expect("own messages decode");
        let (view, needs) = if client_turn {
            (client, &mut client_needs)
        } else {
            (server, &mut server_needs)
        };
        let (reply, outcome) = sync::respond(view, &incoming, limits).expect("respond");
        needs.extend(outcome);
        outgoing = reply;
        client_turn = !client_turn;
    }
    let client_learned = learned(&mut client_needs, server, &mut bytes);
    let server_learned = learned(&mut server_needs, client, &mut bytes);
    TrieFigures {
        bytes,
        round_trips: messages.div_ceil(2),
        exchange_ms: started.elapsed().as_secs_f64() * 1000.0,
        client_learned,
        server_learned,
    }
}

struct SketchFigures {
    bytes: u64,
    messages: u64,
    exchange_ms: f64,
    build_ms: f64,
    cells_build_ms: f64,
    path: &'static str,
    cells: u64,
    client_needs: Outcome,
    server_needs: Outcome,
}

/// One sketch session, client asking, every message encoded and decoded as on the wire.
fn sketch_session_figures(
    client: &MemoryTree,
    client_sketch: &SketchCells,
    server: &MemoryTree,
    server_sketch: &SketchCells,
    limits: &SessionLimits,
) -> SketchFigures {
    let started = Instant::now();
    let mut figures = SketchFigures {
        bytes: 0,
        messages: 0,
        exchange_ms: 0.0,
        build_ms: 0.0,
        cells_build_ms: 0.0,
        path: "settled",
        cells: 0,
        client_needs: Outcome::default(),
        server_needs: Outcome::default(),
    };
    let travel = |message: &Message, figures: &mut SketchFigures| -> Message {
        let encoded = sketch_session::encode(message);
        figures.bytes += encoded.len() as u64;
        figures.messages += 1;
        let decoded = sketch_session::decode(&encoded, limits).expect("own messages decode");
        match &decoded {
            Message::Cells { cells, .. } => {
                figures.cells += cells.len() as u64;
                figures.path = "sketch";
            }
            Message::Trie(_) => figures.path = "trie",
            _ => {}
        }
        decoded
    };
    let now = 0;
    let (mut asker, open) = Asker::open(client, client_sketch, limits, now).expect("open");
    let mut outgoing = open;
    loop {
        let incoming = travel(&outgoing, &mut figures);
        let (reply, outcome) = sketch_session::respond(server, server_sketch, &incoming, limits).expect("respond");
        figures.server_needs.extend(outcome);
        let reply = reply.map(|reply| travel(&reply, &mut figures));
        match asker.on_reply(client, client_sketch, reply, now).expect("asker") {
            Step::Send(message) => outgoing = message,
            Step::Finished { last } => {
                if let Some(last) = last {
                    let incoming = travel(&last, &mut figures);
                    let (_, outcome) =
                        sketch_session::respond(server, server_sketch, &incoming, limits).expect("respond");
                    figures.server_needs.extend(outcome);
                }
                break;
            }
        }
    }
    figures.client_needs = asker.outcome();
    figures.exchange_ms = started.elapsed().as_secs_f64() * 1000.0;
    figures
}

fn tree_of(keys: &[u128]) -> MemoryTree {
    let mut tree = MemoryTree::new(StoredDepth::MAILBOX);
    for key in keys {
        tree.insert(*key, leaf_hash(*key));
    }
    tree
}

struct StoreFigures {
    build_ms: f64,
    trie: TrieFigures,
}

/// A record for an ID: its timestamp is the ID's, its blob a hash of the ID (blobs are not
/// reconciled here, so none is stored).
fn record_of(key: u128) -> MessageRecord {
    let millis = (key >> 80) as u64;
    MessageRecord::new(
        MessageId(key),
        BlobHash::of(&key.to_be_bytes()),
        4096,
        millis,
        NodeId(1),
    )
}

/// Removes the benchmark's store directories however the run ends.
struct TemporaryDirectory(std::path::PathBuf);

impl Drop for TemporaryDirectory {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Loads both sides into their own RocksDB store (one mailbox each), then runs the trie exchange
/// on the stores' tries.
fn store_figures(client_keys: &[u128], server_keys: &[u128], limits: &SyncLimits) -> Result<StoreFigures, String> {
    let directory = TemporaryDirectory(std::env::temp_dir().join(format!(
        "mailmesh-reconcile-bench-{}-{}",
        std::process::id(),
        SystemTime::now().duration_since(UNIX_EPOCH).map(|elapsed| elapsed.as_nanos()).unwrap_or(0)
    )));
    let mailbox = MailboxKey::new("bench@example.org", "INBOX").map_err(|error| error.to_string())?;
    let options = StoreOptions {
        sync_writes: false,
        min_free_bytes: 0,
        ..StoreOptions::default()
    };
    let now_millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or(0);
    let open = |name: &str, node: u64| {
        Store::open(&directory.0.join(name), NodeId(node), options.clone())
            .map_err(|error| format!("opening {name}: {error}"))
    };
    let (client_store, server_store) = (open("client", 11)?, open("server", 12)?);
    let built = Instant::now();
    for (store, keys) in [(&client_store, client_keys), (&server_store, server_keys)] {
        for chunk in keys.chunks(512) {
            let operations = chunk
                .iter()
                .map(|key| Operation::Merge {
                    mailbox: mailbox.clone(),
                    record: record_of(*key),
                    now_millis,
                })
                .collect();
            for result in store.apply(operations) {
                result.map_err(|error| format!("merging a record: {error}"))?;
            }
        }
    }
    let build_ms = built.elapsed().as_secs_f64() * 1000.0;
    let space = Space::Mailbox(mailbox.id());
    let trie = trie_exchange(&client_store.tree(space), &server_store.tree(space), limits);
    Ok(StoreFigures { build_ms, trie })
}

fn main() {
    let arguments = match parse_arguments() {
        Ok(arguments) => arguments,
        Err(message) => {
            eprintln!("reconcile_bench: {message}");
            std::process::exit(2);
        }
    };
    let mut random = SplitMix(arguments.seed);
    let all = make_ids(arguments.n, &mut random);
    let (mut missing_on_client, mut missing_on_server) = (BTreeSet::new(), BTreeSet::new());
    match arguments.layout.as_str() {
        "clustered" => missing_on_client.extend(all[all.len() - arguments.diff..].iter().copied()),
        "random" => {
            while missing_on_client.len() < arguments.diff {
                missing_on_client.insert(all[(random.next() % all.len() as u64) as usize]);
            }
        }
        _ => {
            while missing_on_client.len() < arguments.diff / 2 {
                missing_on_client.insert(all[(random.next() % all.len() as u64) as usize]);
            }
            while missing_on_server.len() < arguments.diff - arguments.diff / 2 {
                let key = all[(random.next() % all.len() as u64) as usize];
                if !missing_on_client.contains(&key) {
                    missing_on_server.insert(key);
                }
            }
        }
    }
    let client_keys: Vec<u128> = all
        .iter()
        .copied()
        .filter(|key| !missing_on_client.contains(key))
        .collect();
    let server_keys: Vec<u128> = all
        .iter()
        .copied()
        .filter(|key| !missing_on_server.contains(key))
        .collect();

    let built = Instant::now();
    let client = tree_of(&client_keys);
    let server = tree_of(&server_keys);
    let trie_build_ms = built.elapsed().as_secs_f64() * 1000.0;

    let limits = SyncLimits {
        leaf_threshold: arguments.leaf_threshold,
        ..SyncLimits::default()
    };
    let trie = trie_exchange(&client, &server, &limits);
    check(
        "trie",
        &trie.client_learned,
        &missing_on_client,
        &trie.server_learned,
        &missing_on_server,
    );

    let sketch = (!arguments.skip_sketch).then(|| {
        let key = SketchKey::derive(b"reconcile bench", b"one mailbox");
        // The session reads both the tries and the cells: build both, as the trie path does.
        let built = Instant::now();
        let client = tree_of(&client_keys);
        let server = tree_of(&server_keys);
        let cells_built = Instant::now();
        let client_sketch = SketchCells::from_leaves(key, SketchCells::length_for(client.len() as u64), client.iter());
        let server_sketch = SketchCells::from_leaves(key, SketchCells::length_for(server.len() as u64), server.iter());
        let build_ms = built.elapsed().as_secs_f64() * 1000.0;
        let cells_build_ms = cells_built.elapsed().as_secs_f64() * 1000.0;
        let session_limits = SessionLimits {
            sync: limits,
            ..SessionLimits::default()
        };
        let mut figures = sketch_session_figures(&client, &client_sketch, &server, &server_sketch, &session_limits);
        figures.build_ms = build_ms;
        figures.cells_build_ms = cells_build_ms;
        let resolving = Instant::now();
        let client_learned = learned(&mut figures.client_needs, &server, &mut figures.bytes);
        let server_learned = learned(&mut figures.server_needs, &client, &mut figures.bytes);
        figures.exchange_ms += resolving.elapsed().as_secs_f64() * 1000.0;
        check(
            "sketch",
            &client_learned,
            &missing_on_client,
            &server_learned,
            &missing_on_server,
        );
        figures
    });

    let negentropy = if arguments.skip_negentropy {
        None
    } else {
        let to_bytes = |keys: &[u128]| keys.iter().map(|key| key.to_be_bytes()).collect::<Vec<[u8; 16]>>();
        match negentropy_reference::reconcile(&to_bytes(&client_keys), &to_bytes(&server_keys)) {
            Ok(figures) => Some(figures),
            Err(message) => {
                eprintln!("reconcile_bench: negentropy failed: {message}");
                std::process::exit(1);
            }
        }
    };
    let store = arguments.store.then(|| {
        store_figures(&client_keys, &server_keys, &limits).unwrap_or_else(|message| {
            eprintln!("reconcile_bench: store path failed: {message}");
            std::process::exit(1);
        })
    });
    if let Some(store) = &store {
        check(
            "store trie",
            &store.trie.client_learned,
            &missing_on_client,
            &store.trie.server_learned,
            &missing_on_server,
        );
    }

    let round = |ms: f64| (ms * 10.0).round() / 10.0;
    let naive_bytes = 16 * arguments.n as u64;
    let minimum_bytes = 16 * arguments.diff as u64;
    let json = serde_json::json!({
        "n": arguments.n,
        "diff": arguments.diff,
        "layout": arguments.layout,
        "bytes": trie.bytes,
        "round_trips": trie.round_trips,
        "trie_build_ms": round(trie_build_ms),
        "trie_exchange_ms": round(trie.exchange_ms),
        "sketch_bytes": sketch.as_ref().map(|figures| figures.bytes),
        "sketch_round_trips": sketch.as_ref().map(|figures| figures.messages.div_ceil(2)),
        "sketch_build_ms": sketch.as_ref().map(|figures| round(figures.build_ms)),
        "sketch_cells_build_ms": sketch.as_ref().map(|figures| round(figures.cells_build_ms)),
        "sketch_exchange_ms": sketch.as_ref().map(|figures| round(figures.exchange_ms)),
        "sketch_path": sketch.as_ref().map(|figures| figures.path),
        "sketch_cells": sketch.as_ref().map(|figures| figures.cells),
        "negentropy_bytes": negentropy.map(|figures| figures.bytes),
        "negentropy_round_trips": negentropy.map(|figures| figures.round_trips),
        "negentropy_build_ms": negentropy.map(|figures| round(figures.build_ms)),
        "negentropy_exchange_ms": negentropy.map(|figures| round(figures.exchange_ms)),
        "store_bytes": store.as_ref().map(|figures| figures.trie.bytes),
        "store_round_trips": store.as_ref().map(|figures| figures.trie.round_trips),
        "store_build_ms": store.as_ref().map(|figures| round(figures.build_ms)),
        "store_exchange_ms": store.as_ref().map(|figures| round(figures.trie.exchange_ms)),
        "store_sync_writes": store.as_ref().map(|_| false),
        "naive_bytes": naive_bytes,
        "minimum_bytes": minimum_bytes,
        "leaf_threshold": arguments.leaf_threshold,
        "machine": format!("{} cores", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)),
    });
    if arguments.json {
        println!("{json}");
    } else {
        println!("{}", serde_json::to_string_pretty(&json).unwrap_or_default());
    }
}
