//! Durable append throughput of one node's store, sequential and with concurrent writers through
//! the group commit.
//!
//! A store benchmark, not a node benchmark: it measures [`Store`] and [`CommitQueue`] alone. No
//! HTTP, no search indexing, no pushes to peers are on the path, so its figures are an upper bound
//! of what `POST /messages` on a node can sustain (the JSON says so in `scope`, and its target
//! fields are named `store_target_*`).
//!
//! `cargo run --release --example append_bench -- --json [--messages N] [--writers W]`
//!
//! Two phases, each on a fresh [`Store`] in its own directory under `std::env::temp_dir()` (or
//! `--dir`), removed afterwards:
//! - `sequential`: one writer submits appends one after another through a [`CommitQueue`], so
//!   every append is its own batch and its own WAL sync;
//! - `concurrent`: `W` writer threads submit appends at the same time through one
//!   [`CommitQueue`] (batches of at most `--max-batch`, 512 like the node), so one WAL sync
//!   covers many appends.
//!
//! Every append is durable (`StoreOptions::sync_writes`, a synced WAL) before its writer is told
//! it succeeded, exactly as in `mailmesh node`. Messages are RFC 5322 text with a log-normal size
//! spread (median `--median-bytes`, 4 KiB by default; sigma `--sigma`, 1.0), pre-generated
//! before the clock starts, spread over `--mailboxes` mailboxes.
//!
//! `peak_rss_mib` is the process's VmHWM (messages are pre-generated in memory, about `--messages`
//! times the mean size, so subtract that to see RocksDB's share).
//!
//! Syncs are counted where they happen: this binary defines `fdatasync` and `fsync`, which the
//! statically linked RocksDB calls instead of libc's; each counts the call, tells WAL files
//! (`*.log`) from the rest (SST, blob, MANIFEST, directories) by the descriptor's path, and makes
//! the system call itself. One WAL sync per commit batch is what group commit promises, so
//! `appends_per_wal_sync` is the mean batch size. Where this interposition is not compiled in (not
//! Linux on x86_64 or aarch64), the counts are reported as null.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mailmesh::model::{MailboxKey, NodeId};
use mailmesh::store::{Applied, CommitQueue, Operation, Store, StoreOptions};
use serde_json::{json, Value};

#[cfg(all(target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64")))]
mod sync_counter {
    //! `fdatasync` and `fsync` for this binary: count, classify, then make the system call.
    use std::ffi::{c_int, c_long};
    use std::sync::atomic::{AtomicU64, Ordering};

    static WAL_SYNCS: AtomicU64 = AtomicU64::new(0);
    static OTHER_SYNCS: AtomicU64 = AtomicU64::new(0);

    #[cfg(target_arch = "x86_64")]
    const SYS_FSYNC: c_long = 74;
    #[cfg(target_arch = "x86_64")]
    const SYS_FDATASYNC: c_long = 75;
    #[cfg(target_arch = "aarch64")]
    const SYS_FSYNC: c_long = 82;
    #[cfg(target_arch = "aarch64")]
    const SYS_FDATASYNC: c_long = 83;

    extern "C" {
        fn syscall(number: c_long, ...) -> c_long;
    }

    fn count(fd: c_int) {
        let is_wal = std::fs::read_link(format!("/proc/self/fd/{fd}"))
            .map(|path| path.extension().is_some_and(|extension| extension == "log"))
            .unwrap_or(false);
        if is_wal { &WAL_SYNCS } else { &OTHER_SYNCS }.fetch_add(1, Ordering::Relaxed);
    }

    /// Replaces libc's `fdatasync` for everything linked into this binary (RocksDB included).
    #[no_mangle]
    pub extern "C" fn fdatasync(fd: c_int) -> c_int {
        count(fd);
        // SAFETY: the raw system call with one integer argument; errors come back as -1/errno,
        // as libc's wrapper returns them.
        unsafe { syscall(SYS_FDATASYNC, fd as c_long) as c_int }
    }

    /// Replaces libc's `fsync` the same way.
    #[no_mangle]
    pub extern "C" fn fsync(fd: c_int) -> c_int {
        count(fd);
        // SAFETY: as above.
        unsafe { syscall(SYS_FSYNC, fd as c_long) as c_int }
    }

    /// (WAL syncs, other syncs) so far.
    pub fn read() -> Option<(u64, u64)> {
        Some((WAL_SYNCS.load(Ordering::Relaxed), OTHER_SYNCS.load(Ordering::Relaxed)))
    }
}

#[cfg(not(all(target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64"))))]
mod sync_counter {
    pub fn read() -> Option<(u64, u64)> {
        None
    }
}

struct Arguments {
    messages: usize,
    sequential_messages: usize,
    writers: usize,
    mailboxes: usize,
    median_bytes: f64,
    sigma: f64,
    max_bytes: usize,
    max_batch: usize,
    seed: u64,
    dir: Option<PathBuf>,
    json: bool,
}

fn parse_arguments() -> Result<Arguments, String> {
    let mut arguments = Arguments {
        messages: 50_000,
        sequential_messages: 2_000,
        writers: 64,
        mailboxes: 100,
        median_bytes: 4096.0,
        sigma: 1.0,
        max_bytes: 1024 * 1024,
        max_batch: 512,
        seed: 1,
        dir: None,
        json: false,
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
            "--sequential-messages" => arguments.sequential_messages = number(value()?)?,
            "--writers" => arguments.writers = number(value()?)?,
            "--mailboxes" => arguments.mailboxes = number(value()?)?,
            "--median-bytes" => arguments.median_bytes = number(value()?)? as f64,
            "--sigma" => arguments.sigma = value()?.parse().map_err(|_| "--sigma takes a number")?,
            "--max-bytes" => arguments.max_bytes = number(value()?)?,
            "--max-batch" => arguments.max_batch = number(value()?)?,
            "--seed" => arguments.seed = number(value()?)? as u64,
            "--dir" => arguments.dir = Some(PathBuf::from(value()?)),
            "--json" => arguments.json = true,
            "--help" | "-h" => {
                println!(
                    "append_bench [--messages N (50000)] [--sequential-messages N (2000)] [--writers W (64)] \
                     [--mailboxes M (100)] [--median-bytes B (4096)] [--sigma S (1.0)] [--max-bytes B (1048576)] \
                     [--max-batch B (512)] [--seed S] [--dir DIR (temp dir)] [--json]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if arguments.writers == 0 || arguments.mailboxes == 0 || arguments.max_batch == 0 {
        return Err("--writers, --mailboxes and --max-batch must be positive".into());
    }
    if arguments.median_bytes < 512.0 {
        return Err("--median-bytes must be at least 512".into());
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

    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn normal(&mut self) -> f64 {
        (-2.0 * self.unit().ln()).sqrt() * (2.0 * std::f64::consts::PI * self.unit()).cos()
    }
}

const WORDS: [&str; 32] = [
    "the",
    "meeting",
    "invoice",
    "attached",
    "please",
    "review",
    "quarterly",
    "report",
    "thanks",
    "regards",
    "schedule",
    "project",
    "update",
    "deadline",
    "customer",
    "shipment",
    "contract",
    "draft",
    "budget",
    "team",
    "tomorrow",
    "agenda",
    "minutes",
    "question",
    "answer",
    "server",
    "release",
    "notes",
    "before",
    "after",
    "we",
    "will",
];

/// One RFC 5322 message of about `size` bytes: headers, then lines of text.
fn make_message(random: &mut SplitMix, index: usize, size: usize) -> Vec<u8> {
    let mut text = format!(
        "From: sender{}@example.org\r\nTo: user{}@example.net\r\nSubject: benchmark message {index}\r\n\
         Date: Sun, 29 Nov 2026 08:00:00 +0000\r\nMessage-ID: <{:016x}.{index}@example.org>\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n",
        random.next() % 1000,
        random.next() % 1000,
        random.next()
    );
    let mut line_length = 0;
    while text.len() + 2 < size {
        let bits = random.next();
        for shift in (0..60).step_by(5) {
            let word = WORDS[((bits >> shift) & 31) as usize];
            text.push_str(word);
            line_length += word.len();
            if line_length >= 72 {
                text.push_str("\r\n");
                line_length = 0;
            } else {
                text.push(' ');
                line_length += 1;
            }
            if text.len() + 2 >= size {
                break;
            }
        }
    }
    text.push_str("\r\n");
    text.into_bytes()
}

fn make_messages(arguments: &Arguments, count: usize, random: &mut SplitMix) -> Vec<(usize, Vec<u8>)> {
    let mu = arguments.median_bytes.ln();
    (0..count)
        .map(|index| {
            let size = (mu + arguments.sigma * random.normal())
                .exp()
                .clamp(300.0, arguments.max_bytes as f64) as usize;
            let mailbox = (random.next() % arguments.mailboxes as u64) as usize;
            (mailbox, make_message(random, index, size))
        })
        .collect()
}

fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or(0)
}

/// The file system type of the mount holding `path` (from /proc/mounts), to tell a real disk from
/// tmpfs, where a sync costs nothing.
fn filesystem_of(path: &Path) -> Option<String> {
    let path = path.canonicalize().ok()?;
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, mount, kind) = (fields.next()?, fields.next()?, fields.next()?);
            path.starts_with(mount).then(|| (mount.len(), kind.to_owned()))
        })
        .max_by_key(|(length, _)| *length)
        .map(|(_, kind)| kind)
}

/// This process's peak resident set (VmHWM), in MiB: RocksDB's memtables and caches for a store
/// holding everything appended so far.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(round(kib / 1024.0, 1))
}

/// CPU seconds (user + system) used so far by this process's threads named `name`.
fn thread_cpu_seconds(name: &str) -> Option<f64> {
    let ticks_per_second = 100.0; // USER_HZ, 100 on Linux
    let mut total = 0.0;
    let mut found = false;
    for entry in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let user: f64 = fields.get(11)?.parse().ok()?;
        let system: f64 = fields.get(12)?.parse().ok()?;
        total += (user + system) / ticks_per_second;
        found = true;
    }
    found.then_some(total)
}

/// Removes a directory when dropped, also when a phase panics.
struct TemporaryDirectory(PathBuf);

impl Drop for TemporaryDirectory {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs one phase: `writers` threads append `messages` through one commit queue on a fresh store.
fn run_phase(
    name: &str,
    directory: &Path,
    messages: Vec<(usize, Vec<u8>)>,
    writers: usize,
    arguments: &Arguments,
    seed: u64,
) -> Result<Value, String> {
    let path = directory.join(name);
    let options = StoreOptions {
        sync_writes: true,
        ..StoreOptions::default()
    };
    let store =
        Arc::new(Store::open(&path, NodeId(seed), options).map_err(|error| format!("opening the store: {error}"))?);
    let queue = CommitQueue::start(store.clone(), arguments.max_batch);
    let mailboxes: Vec<MailboxKey> = (0..arguments.mailboxes)
        .map(|index| MailboxKey::new(&format!("user{index}@example.net"), "INBOX").expect("valid mailbox key"))
        .collect();
    let count = messages.len();
    let pool: Vec<Mutex<Option<(usize, Vec<u8>)>>> =
        messages.into_iter().map(|message| Mutex::new(Some(message))).collect();
    let next = AtomicUsize::new(0);
    let failures = AtomicUsize::new(0);
    // Bytes of appends that succeeded: a failed append moved nothing durable.
    let succeeded_bytes = std::sync::atomic::AtomicU64::new(0);
    let syncs_before = sync_counter::read();
    let started = Instant::now();
    let latencies: Vec<Duration> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..writers)
            .map(|writer| {
                let (queue, pool, next, failures, mailboxes, succeeded_bytes) =
                    (&queue, &pool, &next, &failures, &mailboxes, &succeeded_bytes);
                scope.spawn(move || {
                    let mut random = SplitMix(seed ^ ((writer as u64 + 1) << 32));
                    let mut latencies = Vec::new();
                    loop {
                        let index = next.fetch_add(1, Ordering::Relaxed);
                        let Some(slot) = pool.get(index) else { break };
                        let Some((mailbox, raw)) = slot.lock().ok().and_then(|mut slot| slot.take()) else {
                            break;
                        };
                        let size = raw.len() as u64;
                        let submitted = Instant::now();
                        let result = queue.submit_blocking(Operation::Append {
                            location: None,
                            unless_held_in: Vec::new(),
                            mailbox: mailboxes[mailbox].clone(),
                            raw,
                            flags: vec![],
                            received_millis: None,
                            now_millis: now_millis(),
                            random: (u128::from(random.next()) << 64) | u128::from(random.next()),
                        });
                        latencies.push(submitted.elapsed());
                        if matches!(result, Ok(Applied::Appended { .. })) {
                            succeeded_bytes.fetch_add(size, Ordering::Relaxed);
                        } else {
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    latencies
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|handle| handle.join().unwrap_or_default())
            .collect()
    });
    let seconds = started.elapsed().as_secs_f64();
    let syncs_after = sync_counter::read();
    // The commit thread is started by this phase's queue, so its CPU time is this phase's.
    let commit_cpu = thread_cpu_seconds("mailmesh-commit");
    // The commit thread holds the store until it sees its queue gone: wait for it to exit, so
    // the database is closed before its directory is removed and before the next phase counts
    // the commit thread's CPU.
    drop(queue);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Arc::strong_count(&store) > 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(store);
    std::thread::sleep(Duration::from_millis(50));
    let failures = failures.load(Ordering::Relaxed);
    let succeeded = count - failures;
    let bytes = succeeded_bytes.load(Ordering::Relaxed);
    let mut milliseconds: Vec<f64> = latencies.iter().map(|latency| latency.as_secs_f64() * 1000.0).collect();
    milliseconds.sort_by(f64::total_cmp);
    let (wal_syncs, other_syncs) = match (syncs_before, syncs_after) {
        (Some(before), Some(after)) => (Some(after.0 - before.0), Some(after.1 - before.1)),
        _ => (None, None),
    };
    Ok(json!({
        "writers": writers,
        "appends": succeeded,
        "failed": failures,
        "seconds": round(seconds, 3),
        "appends_per_second": round(succeeded as f64 / seconds, 1),
        "succeeded_bytes": bytes,
        "megabytes_per_second": round(bytes as f64 / seconds / 1e6, 2),
        "latency_ms": {
            "p50": round(percentile(&milliseconds, 0.50), 3),
            "p99": round(percentile(&milliseconds, 0.99), 3),
            "max": round(percentile(&milliseconds, 1.0), 3),
        },
        "commit_thread_cpu_seconds": commit_cpu.map(|cpu| round(cpu, 2)),
        "commit_thread_busy": commit_cpu.map(|cpu| round(cpu / seconds, 2)),
        "wal_syncs": wal_syncs,
        "other_syncs": other_syncs,
        "appends_per_wal_sync": wal_syncs.filter(|syncs| *syncs > 0).map(|syncs| round(succeeded as f64 / syncs as f64, 2)),
    }))
}

fn round(value: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (value * scale).round() / scale
}

fn main() {
    let arguments = match parse_arguments() {
        Ok(arguments) => arguments,
        Err(message) => {
            eprintln!("append_bench: {message}");
            std::process::exit(2);
        }
    };
    let unique = format!(
        "mailmesh-append-bench-{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|elapsed| elapsed.as_nanos())
            .unwrap_or(0)
    );
    let directory = arguments.dir.clone().unwrap_or_else(std::env::temp_dir).join(unique);
    if let Err(error) = std::fs::create_dir_all(&directory) {
        eprintln!("append_bench: cannot create {}: {error}", directory.display());
        std::process::exit(1);
    }
    let guard = TemporaryDirectory(directory.clone());
    let mut random = SplitMix(arguments.seed);
    let sequential_messages = make_messages(&arguments, arguments.sequential_messages, &mut random);
    let concurrent_messages = make_messages(&arguments, arguments.messages, &mut random);
    let mut sizes: Vec<f64> = concurrent_messages.iter().map(|(_, raw)| raw.len() as f64).collect();
    sizes.sort_by(f64::total_cmp);
    let mean = sizes.iter().sum::<f64>() / sizes.len().max(1) as f64;

    let sequential = run_phase(
        "sequential",
        &directory,
        sequential_messages,
        1,
        &arguments,
        arguments.seed,
    );
    let concurrent = run_phase(
        "concurrent",
        &directory,
        concurrent_messages,
        arguments.writers,
        &arguments,
        arguments.seed + 1,
    );
    let (sequential, concurrent) = match (sequential, concurrent) {
        (Ok(sequential), Ok(concurrent)) => (sequential, concurrent),
        (Err(error), _) | (_, Err(error)) => {
            eprintln!("append_bench: {error}");
            std::process::exit(1);
        }
    };
    let target = 10_000.0;
    let concurrent_rate = concurrent["appends_per_second"].as_f64().unwrap_or(0.0);
    let report = json!({
        "benchmark": "store_append",
        "scope": "Store and CommitQueue only: no HTTP, no search indexing, no pushes to peers",
        "dir": directory.display().to_string(),
        "filesystem": filesystem_of(&directory),
        "cores": std::thread::available_parallelism().map(|cores| cores.get()).unwrap_or(1),
        "durable": true,
        "max_batch": arguments.max_batch,
        "mailboxes": arguments.mailboxes,
        "message_bytes": {
            "median": percentile(&sizes, 0.5),
            "mean": round(mean, 0),
            "p99": percentile(&sizes, 0.99),
            "max": percentile(&sizes, 1.0),
        },
        "sync_counting": if sync_counter::read().is_some() { "interposed fdatasync/fsync" } else { "unavailable" },
        "sequential": sequential,
        "concurrent": concurrent,
        "peak_rss_mib": peak_rss_mib(),
        "pregenerated_message_mib": round((sizes.iter().sum::<f64>() + mean * arguments.sequential_messages as f64) / 1048576.0, 1),
        "store_target_appends_per_second": target,
        "store_target_met": concurrent_rate >= target,
    });
    drop(guard);
    if arguments.json {
        println!("{report}");
    } else {
        println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
    }
}
