//! What a stopped replica's heal costs on the wire: two real `mailmesh node` processes on
//! 127.0.0.1, one mailbox of `--messages` messages (2-8 KB each), every byte between them counted.
//!
//! `cargo run --release --example resync_bench -- [--messages 100000] [--changes 100] [--binary PATH]
//! [--workdir DIR] [--keep] [--only CASE]` prints one JSON object.
//!
//! Loading: the first node's store is written directly through a [`CommitQueue`] (the fastest
//! path; no network), and copied to the second node's data directory while no node runs, so both
//! start as replicas that agree. Each case then starts from a fresh copy of that pair.
//!
//! Each case: start both nodes, the second reaching the first only through a counting TCP relay
//! in this process (the first is given no peers, the second only the relay's address); wait until
//! their digests agree; stop one node (SIGTERM); make the change on the other over HTTP; restart
//! the stopped node; count every byte the relay forwards in both directions until the digests
//! agree again (`bytes`), and again 3 s later (`bytes_settled`, which adds the trailing digest
//! gossip). The heal window starts when the stopped node is started again, so the libp2p
//! handshakes (noise, yamux, identify, gossipsub subscriptions) are in the figure.
//!
//! The relay is the only path the nodes are told about; during every heal `ss -tnp` is read every
//! 200 ms and a TCP connection straight between the two node processes is reported as
//! `bypassed: true` (the bytes of such a connection would be missing from the figure).
//!
//! With `TRACE_RELAY` set in the environment, the relay prints every read it forwards to stderr
//! (`relay > bytes millis` towards the first node, `<` back): where a heal's bytes go.
//!
//! Cases: `nothing_changed`; `flags_newest` (`\Seen` set on the `--changes` newest messages, as
//! reading new mail does); `flags_random` (on messages drawn uniformly from the whole mailbox);
//! `new_messages` (`--changes` new messages of 2-8 KB; `bytes_beyond_bodies` is the figure minus
//! the sum of their sizes). The flag cases run twice, stopping either node, because which side
//! opens the session (the lower peer ID) changes the exchange.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mailmesh::harness::{digests_agree, wait_until, LocalNode};
use mailmesh::model::{MailboxKey, MessageId, NodeId};
use mailmesh::store::{Applied, CommitQueue, Operation, Store, StoreOptions};
use serde_json::{json, Value};

const ACCOUNT: &str = "reader@example.org";
const MAILBOX: &str = "INBOX";
const CLUSTER: &str = "resync-bench";

struct Arguments {
    messages: usize,
    changes: usize,
    binary: PathBuf,
    workdir: Option<PathBuf>,
    keep: bool,
    seed: u64,
    only: Option<String>,
}

fn parse_arguments() -> Result<Arguments, String> {
    let default_binary = std::env::current_exe()
        .ok()
        .and_then(|path| Some(path.parent()?.parent()?.join("mailmesh")))
        .unwrap_or_else(|| PathBuf::from("target/release/mailmesh"));
    let mut arguments = Arguments {
        messages: 100_000,
        changes: 100,
        binary: default_binary,
        workdir: None,
        keep: false,
        seed: 7,
        only: None,
    };
    let mut iterator = std::env::args().skip(1);
    while let Some(flag) = iterator.next() {
        let mut value = || iterator.next().ok_or(format!("{flag} needs a value"));
        let number = |text: String| {
            text.parse::<usize>()
                .map_err(|_| format!("{flag} takes a whole number"))
        };
        match flag.as_str() {
            "--messages" => arguments.messages = number(value()?)?,
            "--changes" => arguments.changes = number(value()?)?,
            "--binary" => arguments.binary = PathBuf::from(value()?),
            "--workdir" => arguments.workdir = Some(PathBuf::from(value()?)),
            "--seed" => arguments.seed = number(value()?)? as u64,
            "--keep" => arguments.keep = true,
            "--only" => arguments.only = Some(value()?),
            "--json" => {}
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if arguments.changes > arguments.messages {
        return Err("--changes must not exceed --messages".into());
    }
    Ok(arguments)
}

/// A small deterministic generator (SplitMix64), so runs draw the same sizes and messages.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut value = self.0;
        value = (value ^ (value >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        value = (value ^ (value >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        value ^ (value >> 31)
    }

    fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound as u64) as usize
    }
}

/// An RFC 5322 message of 2,048-8,192 bytes.
fn message(random: &mut SplitMix, index: usize) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "meeting",
        "invoice",
        "attached",
        "please",
        "review",
        "quarterly",
        "report",
        "thanks",
        "schedule",
        "project",
        "update",
        "deadline",
        "customer",
        "shipment",
        "contract",
        "draft",
        "budget",
        "tomorrow",
        "agenda",
        "minutes",
    ];
    let size = 2048 + random.below(8192 - 2048 + 1);
    let mut text = format!(
        "From: sender{}@example.net\r\nTo: {ACCOUNT}\r\nSubject: message {index}\r\nMessage-ID: <{index}.{}@example.net>\r\n\
         Date: Tue, 01 Dec 2026 08:00:00 +0000\r\n\r\n",
        random.below(500),
        random.next()
    );
    while text.len() < size {
        text.push_str(WORDS[random.below(WORDS.len())]);
        text.push(if random.below(12) == 0 { '\n' } else { ' ' });
    }
    text.truncate(size);
    text.into_bytes()
}

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or(0)
}

/// Writes the first node's identity and store, then copies the store to the second node.
/// Returns the IDs of the loaded messages in ascending (time) order.
fn load(template: &Path, arguments: &Arguments) -> Result<Vec<MessageId>, String> {
    let first = template.join("a");
    let second = template.join("b");
    for directory in [&first, &second] {
        std::fs::create_dir_all(directory).map_err(|error| error.to_string())?;
    }
    let keypair = mailmesh::node::load_or_create_identity(&first.join("identity.key")).map_err(|e| e.to_string())?;
    mailmesh::node::load_or_create_identity(&second.join("identity.key")).map_err(|e| e.to_string())?;
    let node_id = NodeId::from_identity(&keypair.public().to_peer_id().to_bytes());
    let store = Arc::new(
        Store::open(
            &first.join("store"),
            node_id,
            StoreOptions {
                sync_writes: false,
                ..StoreOptions::default()
            },
        )
        .map_err(|error| format!("opening the store: {error}"))?,
    );
    let queue = CommitQueue::start(store.clone(), 512);
    // Mail lives in the account's emails container, placed in its INBOX, as a delivery puts it.
    let mailbox = MailboxKey::emails(ACCOUNT).map_err(|error| error.to_string())?;
    let inbox = mailmesh::mailbox::inbox_id(ACCOUNT);
    let next = AtomicUsize::new(0);
    let ids = Mutex::new(Vec::with_capacity(arguments.messages));
    std::thread::scope(|scope| {
        for writer in 0..8u64 {
            let (queue, next, ids, mailbox) = (&queue, &next, &ids, &mailbox);
            scope.spawn(move || {
                let mut random = SplitMix(arguments.seed ^ ((writer + 1) << 40));
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    if index >= arguments.messages {
                        return;
                    }
                    let raw = message(&mut random, index);
                    let result = queue.submit_blocking(Operation::Append {
                        location: Some(inbox),
                        unless_held_in: Vec::new(),
                        mailbox: mailbox.clone(),
                        raw,
                        flags: vec![],
                        received_millis: None,
                        now_millis: now_millis(),
                        random: (u128::from(random.next()) << 64) | u128::from(random.next()),
                    });
                    if let Ok(Applied::Appended { id, .. }) = result {
                        if let Ok(mut ids) = ids.lock() {
                            ids.push(id);
                        }
                    }
                }
            });
        }
    });
    // The store must be closed (no background compaction deleting files) before it is copied:
    // wait for the commit thread to let go of it.
    drop(queue);
    let mut store = store;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match Arc::try_unwrap(store) {
            Ok(store) => {
                drop(store);
                break;
            }
            Err(shared) if Instant::now() < deadline => {
                store = shared;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(_) => return Err("the commit thread kept the store open".into()),
        }
    }
    let mut ids = ids.into_inner().map_err(|error| error.to_string())?;
    if ids.len() != arguments.messages {
        return Err(format!("loaded {} of {} messages", ids.len(), arguments.messages));
    }
    ids.sort();
    copy_directory(&first.join("store"), &second.join("store"))?;
    Ok(ids)
}

fn copy_directory(from: &Path, to: &Path) -> Result<(), String> {
    let status = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .map_err(|error| format!("cp: {error}"))?;
    if !status.success() {
        return Err(format!("cp -a {} {} failed", from.display(), to.display()));
    }
    Ok(())
}

/// A TCP relay that forwards to a target port (which may change) and counts every byte.
struct Relay {
    port: u16,
    target: Arc<AtomicU16>,
    forward: Arc<AtomicU64>,
    back: Arc<AtomicU64>,
    connections: Arc<AtomicU64>,
}

impl Relay {
    fn start(target: u16) -> Result<Relay, String> {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|error| error.to_string())?;
        let port = listener.local_addr().map_err(|error| error.to_string())?.port();
        let relay = Relay {
            port,
            target: Arc::new(AtomicU16::new(target)),
            forward: Arc::new(AtomicU64::new(0)),
            back: Arc::new(AtomicU64::new(0)),
            connections: Arc::new(AtomicU64::new(0)),
        };
        let (target, forward, back, connections) = (
            relay.target.clone(),
            relay.forward.clone(),
            relay.back.clone(),
            relay.connections.clone(),
        );
        std::thread::spawn(move || {
            for incoming in listener.incoming() {
                let Ok(client) = incoming else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", target.load(Ordering::SeqCst))) else {
                    continue;
                };
                connections.fetch_add(1, Ordering::Relaxed);
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                for (from, to, counter, arrow) in [
                    (client.try_clone(), server.try_clone(), forward.clone(), ">"),
                    (server.try_clone(), client.try_clone(), back.clone(), "<"),
                ] {
                    let (Ok(mut from), Ok(mut to)) = (from, to) else {
                        continue;
                    };
                    std::thread::spawn(move || {
                        let mut buffer = vec![0u8; 64 * 1024];
                        loop {
                            match from.read(&mut buffer) {
                                Ok(0) | Err(_) => break,
                                Ok(count) => {
                                    counter.fetch_add(count as u64, Ordering::Relaxed);
                                    if std::env::var_os("TRACE_RELAY").is_some() {
                                        eprintln!(
                                            "relay {arrow} {count} {:?}",
                                            SystemTime::now()
                                                .duration_since(UNIX_EPOCH)
                                                .unwrap_or_default()
                                                .as_millis()
                                        );
                                    }
                                    if to.write_all(&buffer[..count]).is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Ok(relay)
    }

    fn bytes(&self) -> (u64, u64) {
        (self.forward.load(Ordering::Relaxed), self.back.load(Ordering::Relaxed))
    }
}

/// The TCP port of a node's 127.0.0.1 listen address.
fn listen_port(node: &LocalNode) -> Result<u16, String> {
    let address = node.listen_address().map_err(|error| error.to_string())?;
    address
        .split('/')
        .skip_while(|part| *part != "tcp")
        .nth(1)
        .and_then(|port| port.parse().ok())
        .ok_or_else(|| format!("no tcp port in {address}"))
}

/// The process ID of a node, read from `ss`'s view of its listen port.
fn socket_pairs() -> Vec<(String, String, String)> {
    let Ok(output) = Command::new("ss").args(["-tnpH", "state", "established"]).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // Recv-Q Send-Q Local Peer [Process]
            if fields.len() < 5 {
                return None;
            }
            Some((fields[2].to_owned(), fields[3].to_owned(), fields[4..].join(" ")))
        })
        .collect()
}

/// Whether some TCP connection runs straight between the two processes.
fn direct_connection(first_pid: u32, second_pid: u32) -> bool {
    let pairs = socket_pairs();
    let owner = |endpoint: &str| {
        pairs
            .iter()
            .find(|(local, _, _)| local == endpoint)
            .map(|(_, _, process)| process.clone())
            .unwrap_or_default()
    };
    let tag = |pid: u32| format!("pid={pid},");
    pairs.iter().any(|(_, peer, process)| {
        let other = owner(peer);
        (process.contains(&tag(first_pid)) && other.contains(&tag(second_pid)))
            || (process.contains(&tag(second_pid)) && other.contains(&tag(first_pid)))
    })
}

#[derive(Clone, Copy, PartialEq)]
enum Change {
    Nothing,
    FlagsNewest,
    FlagsRandom,
    NewMessages,
}

impl Change {
    fn name(self) -> &'static str {
        match self {
            Change::Nothing => "nothing_changed",
            Change::FlagsNewest => "flags_newest",
            Change::FlagsRandom => "flags_random",
            Change::NewMessages => "new_messages",
        }
    }
}

fn pid_of(node: &LocalNode) -> Option<u32> {
    let text = std::fs::read_to_string(node.data_dir.join("node.pid")).ok();
    text.and_then(|text| text.trim().parse().ok()).or_else(|| {
        // Fall back to the process listening on the node's HTTP port.
        let port = node.http.rsplit(':').next()?.to_owned();
        let output = Command::new("ss").args(["-tlnpH"]).output().ok()?;
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let line = text.lines().find(|line| line.contains(&format!("127.0.0.1:{port} ")))?;
        let start = line.find("pid=")? + 4;
        line[start..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
    })
}

fn metric(node: &LocalNode, name: &str) -> f64 {
    node.metric_sum(name).unwrap_or(0.0)
}

#[allow(clippy::too_many_arguments)]
fn run_case(
    template: &Path,
    work: &Path,
    arguments: &Arguments,
    ids: &[MessageId],
    change: Change,
    stop_first: bool,
    random: &mut SplitMix,
) -> Result<Value, String> {
    let label = format!("{}{}", change.name(), if stop_first { "_stop_a" } else { "_stop_b" });
    let case = work.join(&label);
    let _ = std::fs::remove_dir_all(&case);
    std::fs::create_dir_all(&case).map_err(|error| error.to_string())?;
    for side in ["a", "b"] {
        copy_directory(&template.join(side), &case.join(side))?;
    }
    let error = |error: mailmesh::harness::HarnessError| error.to_string();
    // Each node announces only an address that goes through the relay (the first) or that no
    // one listens on (the second), so neither learns the other's real listen address from
    // identify, discovery or its peer book and dials it straight, past the relay.
    let relay = Relay::start(0)?;
    let relay_address = format!("/ip4/127.0.0.1/tcp/{}", relay.port);
    let announce = |address: &str| vec!["--announce".to_string(), address.to_string()];
    let mut first = LocalNode::spawn(
        &arguments.binary,
        "a",
        &case.join("a"),
        CLUSTER,
        &[],
        1000,
        &announce(&relay_address),
    )
    .map_err(error)?;
    relay.target.store(listen_port(&first)?, Ordering::SeqCst);
    let mut second = LocalNode::spawn(
        &arguments.binary,
        "b",
        &case.join("b"),
        CLUSTER,
        std::slice::from_ref(&relay_address),
        1000,
        &announce("/ip4/127.0.0.1/tcp/1"),
    )
    .map_err(error)?;
    let connected = |node: &LocalNode| {
        node.status()
            .ok()
            .and_then(|status| status["peers"].as_array().map(|peers| !peers.is_empty()))
            .unwrap_or(false)
    };
    wait_until(Duration::from_secs(120), || {
        connected(&first) && connected(&second) && digests_agree(&[&first, &second])
    })
    .ok_or("the two copies never agreed before the case")?;
    // Stop one, change the other.
    let (stopped, running) = if stop_first {
        (&mut first, &mut second)
    } else {
        (&mut second, &mut first)
    };
    stopped.terminate();
    let mailbox_path = LocalNode::mailbox_path(ACCOUNT, MAILBOX);
    let mut body_bytes = 0u64;
    let chosen: Vec<MessageId> = match change {
        Change::FlagsNewest => ids[ids.len() - arguments.changes..].to_vec(),
        Change::FlagsRandom => {
            let mut picked = std::collections::BTreeSet::new();
            while picked.len() < arguments.changes {
                picked.insert(ids[random.below(ids.len())]);
            }
            picked.into_iter().collect()
        }
        _ => Vec::new(),
    };
    for id in &chosen {
        let path = format!("{mailbox_path}/messages/{id}/flags");
        let response = running.send("POST", &path, br#"{"add":["\\Seen"]}"#).map_err(error)?;
        if response.status != 200 {
            return Err(format!("setting flags answered {}", response.status));
        }
    }
    if change == Change::NewMessages {
        for index in 0..arguments.changes {
            let raw = message(random, arguments.messages + index);
            body_bytes += raw.len() as u64;
            running.append(ACCOUNT, MAILBOX, &raw).map_err(error)?;
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let running_pid = pid_of(running);
    let (forward_before, back_before) = relay.bytes();
    let connections_before = relay.connections.load(Ordering::Relaxed);
    let started = Instant::now();
    stopped.restart().map_err(error)?;
    if stop_first {
        // The first node listens on a new port after its restart.
        relay.target.store(listen_port(stopped)?, Ordering::SeqCst);
    }
    let stopped_pid = pid_of(stopped);
    let bypassed = Arc::new(AtomicBool::new(false));
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let (bypassed, watching) = (bypassed.clone(), watching.clone());
        std::thread::spawn(move || {
            while watching.load(Ordering::Relaxed) {
                if let (Some(one), Some(other)) = (running_pid, stopped_pid) {
                    if direct_connection(one, other) {
                        bypassed.store(true, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    let healed = wait_until(Duration::from_secs(300), || digests_agree(&[&*stopped, &*running]));
    let seconds = started.elapsed().as_secs_f64();
    let (forward, back) = relay.bytes();
    let bytes = forward + back - forward_before - back_before;
    std::thread::sleep(Duration::from_secs(3));
    let (forward_settled, back_settled) = relay.bytes();
    watching.store(false, Ordering::Relaxed);
    let _ = watcher.join();
    let blobs_pulled = metric(stopped, "mailmesh_blobs_pulled_total") + metric(running, "mailmesh_blobs_pulled_total");
    let records_pulled =
        metric(stopped, "mailmesh_records_pulled_total") + metric(running, "mailmesh_records_pulled_total");
    let mut result = json!({
        "case": change.name(),
        "stopped": if stop_first { "a" } else { "b" },
        "session_opened_by_restarted_node": stopped_pid.is_some() && first_opens(stop_first, &case),
        "healed": healed.is_some(),
        "heal_seconds": (seconds * 1000.0).round() / 1000.0,
        "bytes": bytes,
        "bytes_to_restarted": if stop_first { back - back_before } else { forward - forward_before },
        "bytes_settled": forward_settled + back_settled - forward_before - back_before,
        "relay_connections": relay.connections.load(Ordering::Relaxed) - connections_before,
        "bypassed": bypassed.load(Ordering::Relaxed) || running_pid.is_none() || stopped_pid.is_none(),
        "records_pulled": records_pulled,
        "blobs_pulled": blobs_pulled,
    });
    if change == Change::NewMessages {
        result["body_bytes"] = json!(body_bytes);
        result["bytes_beyond_bodies"] = json!(bytes as i64 - body_bytes as i64);
    }
    first.terminate();
    second.terminate();
    if !arguments.keep {
        let _ = std::fs::remove_dir_all(&case);
    }
    Ok(result)
}

/// Whether the node with the lower peer ID (the one that opens a session on connect) is the
/// restarted one. Peer IDs are read from the identity files.
fn first_opens(stop_first: bool, case: &Path) -> bool {
    let peer = |side: &str| {
        mailmesh::node::load_or_create_identity(&case.join(side).join("identity.key"))
            .map(|keypair| keypair.public().to_peer_id())
            .ok()
    };
    match (peer("a"), peer("b")) {
        (Some(a), Some(b)) => (a < b) == stop_first,
        _ => false,
    }
}

fn main() {
    let arguments = match parse_arguments() {
        Ok(arguments) => arguments,
        Err(message) => {
            eprintln!("resync_bench: {message}");
            std::process::exit(2);
        }
    };
    if !arguments.binary.exists() {
        eprintln!(
            "resync_bench: no mailmesh binary at {} (build it with cargo build --release, or pass --binary)",
            arguments.binary.display()
        );
        std::process::exit(2);
    }
    let temporary;
    let work = match &arguments.workdir {
        Some(directory) => directory.clone(),
        None => {
            temporary = tempfile::tempdir().expect("a temporary directory");
            temporary.path().to_owned()
        }
    };
    let template = work.join("template");
    let _ = std::fs::remove_dir_all(&template);
    let load_started = Instant::now();
    let ids = match load(&template, &arguments) {
        Ok(ids) => ids,
        Err(message) => {
            eprintln!("resync_bench: loading failed: {message}");
            std::process::exit(1);
        }
    };
    let load_seconds = load_started.elapsed().as_secs_f64();
    eprintln!("loaded {} messages in {load_seconds:.1} s", ids.len());
    let mut random = SplitMix(arguments.seed.wrapping_mul(31));
    let plan = [
        (Change::Nothing, false),
        (Change::FlagsNewest, false),
        (Change::FlagsNewest, true),
        (Change::FlagsRandom, false),
        (Change::NewMessages, false),
        (Change::NewMessages, true),
    ];
    let mut cases = Vec::new();
    for (change, stop_first) in plan {
        if arguments.only.as_deref().is_some_and(|only| only != change.name()) {
            continue;
        }
        match run_case(&template, &work, &arguments, &ids, change, stop_first, &mut random) {
            Ok(result) => {
                eprintln!("{result}");
                cases.push(result);
            }
            Err(message) => {
                eprintln!("resync_bench: case {} failed: {message}", change.name());
                cases.push(json!({"case": change.name(), "error": message}));
            }
        }
    }
    if !arguments.keep {
        let _ = std::fs::remove_dir_all(&template);
    }
    let report = json!({
        "benchmark": "resync",
        "messages": arguments.messages,
        "changes": arguments.changes,
        "message_bytes": "2048-8192, uniform",
        "load_seconds": (load_seconds * 10.0).round() / 10.0,
        "cases": cases,
    });
    println!("{report}");
}
