//! Set-reconciliation benchmark: mailmesh's trie protocol and its sketch session against
//! negentropy on the same two sets.
//!
//! `cargo run --release --example reconcile_bench -- --n 1000000 --diff 100 --layout random --json`
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
//! initiator messages (each gets a reply). `ms` is both sides' processing time for the exchange;
//! the tries themselves are maintained incrementally by the store, so building them is not counted.
//! `sketch_*` run the session of `mailmesh_core::sketch_session` (rateless sketches, or trie
//! descent where that is cheaper) between the same two replicas, counted the same way; the
//! sketch cells are maintained by the store like the tries, so building them is not in
//! `sketch_ms` (`sketch_build_ms` shows what building both from scratch costs).
//! `sketch_path` says how the session went: `settled` (decoded from the opening cells),
//! `sketch` (streamed cells) or `trie` (trie descent).
//! `negentropy_*` run the negentropy crate (client = the same initiating side) on the same sets;
//! `negentropy_ms` includes sealing its storage, as its API requires. Each side's result is checked
//! against the true difference before anything is printed.

use std::collections::BTreeSet;
use std::time::Instant;

use mailmesh::merkle::{MemoryTree, StoredDepth, TreeView};
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
fn learned(needs: &mut Outcome, source: &MemoryTree, bytes: &mut u64) -> BTreeSet<u128> {
    needs.normalize();
    let mut keys: BTreeSet<u128> = needs.need_keys.iter().copied().collect();
    for prefix in &needs.need_prefixes {
        let pulled = source.leaves(*prefix, usize::MAX).unwrap_or_default();
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

struct SketchFigures {
    bytes: u64,
    messages: u64,
    milliseconds: f64,
    build_ms: f64,
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
        milliseconds: 0.0,
        build_ms: 0.0,
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
    figures.milliseconds = started.elapsed().as_secs_f64() * 1000.0;
    figures
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

    let mut client = MemoryTree::new(StoredDepth::MAILBOX);
    for key in &client_keys {
        client.insert(*key, leaf_hash(*key));
    }
    let mut server = MemoryTree::new(StoredDepth::MAILBOX);
    for key in &server_keys {
        server.insert(*key, leaf_hash(*key));
    }

    let limits = SyncLimits {
        leaf_threshold: arguments.leaf_threshold,
        ..SyncLimits::default()
    };
    let started = Instant::now();
    let mut bytes: u64 = 0;
    let mut messages = 0u64;
    let (mut client_needs, mut server_needs) = (Outcome::default(), Outcome::default());
    let mut outgoing = sync::initial(&client, &limits).expect("initial message");
    let mut client_turn = false;
    while !outgoing.is_empty() {
        let encoded = sync::encode(&outgoing);
        bytes += encoded.len() as u64;
        messages += 1;
        let incoming = sync::decode(&encoded, &limits).expect("own messages decode");
        let (view, needs) = if client_turn {
            (&client, &mut client_needs)
        } else {
            (&server, &mut server_needs)
        };
        let (reply, outcome) = sync::respond(view, &incoming, &limits).expect("respond");
        needs.extend(outcome);
        outgoing = reply;
        client_turn = !client_turn;
    }
    let round_trips = messages.div_ceil(2);
    let client_learned = learned(&mut client_needs, &server, &mut bytes);
    let server_learned = learned(&mut server_needs, &client, &mut bytes);
    let milliseconds = started.elapsed().as_secs_f64() * 1000.0;
    check(
        "trie",
        &client_learned,
        &missing_on_client,
        &server_learned,
        &missing_on_server,
    );

    let sketch = (!arguments.skip_sketch).then(|| {
        let key = SketchKey::derive(b"reconcile bench", b"one mailbox");
        let built = Instant::now();
        let client_sketch = SketchCells::from_leaves(key, SketchCells::length_for(client.len() as u64), client.iter());
        let server_sketch = SketchCells::from_leaves(key, SketchCells::length_for(server.len() as u64), server.iter());
        let build_ms = built.elapsed().as_secs_f64() * 1000.0;
        let session_limits = SessionLimits {
            sync: limits,
            ..SessionLimits::default()
        };
        let mut figures = sketch_session_figures(&client, &client_sketch, &server, &server_sketch, &session_limits);
        figures.build_ms = build_ms;
        let client_learned = learned(&mut figures.client_needs, &server, &mut figures.bytes);
        let server_learned = learned(&mut figures.server_needs, &client, &mut figures.bytes);
        check(
            "sketch",
            &client_learned,
            &missing_on_client,
            &server_learned,
            &missing_on_server,
        );
        figures
    });

    let (negentropy_bytes, negentropy_round_trips, negentropy_ms) = if arguments.skip_negentropy {
        (None, None, None)
    } else {
        let to_bytes = |keys: &[u128]| keys.iter().map(|key| key.to_be_bytes()).collect::<Vec<[u8; 16]>>();
        match negentropy_reference::reconcile(&to_bytes(&client_keys), &to_bytes(&server_keys)) {
            Ok(figures) => (
                Some(figures.bytes),
                Some(figures.round_trips),
                Some(figures.milliseconds),
            ),
            Err(message) => {
                eprintln!("reconcile_bench: negentropy failed: {message}");
                std::process::exit(1);
            }
        }
    };
    let naive_bytes = 16 * arguments.n as u64;
    let minimum_bytes = 16 * arguments.diff as u64;
    let json = serde_json::json!({
        "n": arguments.n,
        "diff": arguments.diff,
        "layout": arguments.layout,
        "bytes": bytes,
        "round_trips": round_trips,
        "ms": (milliseconds * 10.0).round() / 10.0,
        "sketch_bytes": sketch.as_ref().map(|figures| figures.bytes),
        "sketch_round_trips": sketch.as_ref().map(|figures| figures.messages.div_ceil(2)),
        "sketch_ms": sketch.as_ref().map(|figures| (figures.milliseconds * 10.0).round() / 10.0),
        "sketch_path": sketch.as_ref().map(|figures| figures.path),
        "sketch_cells": sketch.as_ref().map(|figures| figures.cells),
        "sketch_build_ms": sketch.as_ref().map(|figures| figures.build_ms.round()),
        "negentropy_bytes": negentropy_bytes,
        "negentropy_round_trips": negentropy_round_trips,
        "negentropy_ms": negentropy_ms.map(|ms| (ms * 10.0).round() / 10.0),
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
