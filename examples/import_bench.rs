//! Throughput and memory of `mailmesh import` into one real node process (issue 13 item 3).
//!
//! `cargo run --release --example import_bench -- [--messages N] [--gigabytes G] [--workers 1,8,16] [--dir DIR]`
//!
//! Needs the node binary built (`cargo build --release`); it is found beside the examples
//! directory, or given with `--binary`. Everything is generated under `--dir` (default
//! `/var/tmp/mailmesh-import-bench`, on disk, not in a tmpfs) and removed afterwards.
//!
//! Phases, each into a mailbox of its own on one node (the node appends durably, indexes for
//! search, exactly as `mailmesh node` does):
//! - `throughput_mbox`: an mbox of `--messages` small messages (log-normal sizes, median about
//!   4 KiB) imported once per `--workers` value, to show what several appends in flight buy;
//! - `throughput_maildir`: the same number of messages as Maildir files with flags in their names;
//! - `rerun`: the first mbox again into the same mailbox: every message is skipped as present,
//!   which is what a resumed import does with the part it had done;
//! - `streaming` (skipped with `--gigabytes 0`): an mbox of `--gigabytes` GB (messages of 8 KiB to 1 MiB, some with base64
//!   attachments) imported with the default workers. `import_peak_rss_mib` is this process's
//!   VmHWM, reset (`/proc/self/clear_refs`) just before the import starts, so it is the import's
//!   own peak: it must stay flat whatever the source size.
//!
//! The import runs in this process through `mailmesh::import`, the same code `mailmesh import`
//! runs. Prints one JSON document on stdout.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use mailmesh::harness::LocalNode;
use mailmesh::import::{import, ImportOptions, ImportSummary};
use serde_json::{json, Value};

const ACCOUNT: &str = "bench@example.org";

struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound.max(1)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Log-normal with the given median and sigma (Box-Muller).
    fn log_normal(&mut self, median: f64, sigma: f64) -> f64 {
        let (first, second) = (self.unit().max(1e-12), self.unit());
        let normal = (-2.0 * first.ln()).sqrt() * (2.0 * std::f64::consts::PI * second).cos();
        median * (sigma * normal).exp()
    }
}

const WORDS: [&str; 32] = [
    "replication",
    "mailbox",
    "meeting",
    "tomorrow",
    "quarterly",
    "report",
    "attached",
    "please",
    "review",
    "thanks",
    "regards",
    "schedule",
    "project",
    "update",
    "invoice",
    "customer",
    "deadline",
    "budget",
    "release",
    "server",
    "question",
    "answer",
    "draft",
    "final",
    "version",
    "notes",
    "minutes",
    "agenda",
    "travel",
    "holiday",
    "office",
    "weekly",
];

/// One RFC 5322 message of about `size` bytes, unique by `number`; with `attachment`, most of it
/// is a base64 part of random bytes (incompressible, as real attachments are).
fn message(random: &mut Random, number: u64, size: usize, attachment: bool) -> Vec<u8> {
    use base64::Engine;
    let mut out = format!(
        "From: Sender {sender} <sender{sender}@example.org>\nTo: bench@example.org\nSubject: {subject} {number}\nDate: Tue, 03 Mar 2026 10:{minute:02}:00 +0000\nMessage-ID: <{number}.{seed}@bench.example.org>\nMIME-Version: 1.0\n",
        sender = random.below(500),
        subject = WORDS[random.below(32) as usize],
        minute = number % 60,
        seed = random.next(),
    )
    .into_bytes();
    let text_size = if attachment { size / 10 } else { size };
    if attachment {
        out.extend_from_slice(b"Content-Type: multipart/mixed; boundary=\"b\"\n\n--b\nContent-Type: text/plain\n\n");
    } else {
        out.extend_from_slice(b"Content-Type: text/plain; charset=utf-8\n\n");
    }
    let mut line = 0;
    while out.len() < text_size {
        let word = WORDS[random.below(32) as usize];
        out.extend_from_slice(word.as_bytes());
        line += word.len() + 1;
        if line > 70 {
            out.push(b'\n');
            line = 0;
        } else {
            out.push(b' ');
        }
    }
    out.push(b'\n');
    if attachment {
        out.extend_from_slice(
            b"--b\nContent-Type: application/octet-stream\nContent-Transfer-Encoding: base64\nContent-Disposition: attachment; filename=\"data.bin\"\n\n",
        );
        let binary: Vec<u8> = (0..(size.saturating_sub(out.len()) * 3 / 4) / 8)
            .flat_map(|_| random.next().to_le_bytes())
            .collect();
        let encoded = base64::engine::general_purpose::STANDARD.encode(binary);
        for chunk in encoded.as_bytes().chunks(76) {
            out.extend_from_slice(chunk);
            out.push(b'\n');
        }
        out.extend_from_slice(b"--b--\n");
    }
    out
}

fn from_line(number: u64) -> String {
    format!(
        "From sender@example.org Tue Mar  3 {:02}:{:02}:{:02} 2026\n",
        (number / 3600) % 24,
        (number / 60) % 60,
        number % 60
    )
}

/// Writes an mbox of small messages; returns its size in bytes.
fn write_small_mbox(path: &Path, messages: u64, seed: u64) -> u64 {
    let mut random = Random(seed);
    let mut writer = BufWriter::with_capacity(1 << 20, std::fs::File::create(path).unwrap());
    for number in 0..messages {
        let size = random.log_normal(4096.0, 1.0).clamp(300.0, 256.0 * 1024.0) as usize;
        let raw = message(&mut random, number, size, false);
        writer.write_all(from_line(number).as_bytes()).unwrap();
        if number % 3 == 0 {
            writer.write_all(b"Status: RO\n").unwrap();
        }
        writer.write_all(&raw).unwrap();
        writer.write_all(b"\n").unwrap();
    }
    writer.flush().unwrap();
    std::fs::metadata(path).unwrap().len()
}

/// Writes a Maildir of small messages with flags in their names; returns the bytes written.
fn write_maildir(path: &Path, messages: u64, seed: u64) -> u64 {
    let mut random = Random(seed);
    for sub in ["cur", "new", "tmp"] {
        std::fs::create_dir_all(path.join(sub)).unwrap();
    }
    let mut bytes = 0;
    for number in 0..messages {
        let size = random.log_normal(4096.0, 1.0).clamp(300.0, 256.0 * 1024.0) as usize;
        let raw = message(&mut random, number, size, false);
        let info = ["S", "RS", "FS", ""][number as usize % 4];
        let name = format!("{}.M{number}P1.bench,S={}:2,{info}", 1_772_532_000 + number, raw.len());
        std::fs::write(path.join("cur").join(name), &raw).unwrap();
        bytes += raw.len() as u64;
    }
    bytes
}

/// Writes an mbox of about `target` bytes of larger messages; returns (messages, bytes).
fn write_large_mbox(path: &Path, target: u64, seed: u64) -> (u64, u64) {
    let mut random = Random(seed);
    let mut writer = BufWriter::with_capacity(1 << 20, std::fs::File::create(path).unwrap());
    let (mut number, mut written) = (0u64, 0u64);
    while written < target {
        let attachment = random.below(10) == 0;
        let size = if attachment {
            random
                .log_normal(256.0 * 1024.0, 0.8)
                .clamp(32.0 * 1024.0, 1024.0 * 1024.0)
        } else {
            random
                .log_normal(24.0 * 1024.0, 0.8)
                .clamp(8.0 * 1024.0, 256.0 * 1024.0)
        } as usize;
        let raw = message(&mut random, number, size, attachment);
        let from = from_line(number);
        writer.write_all(from.as_bytes()).unwrap();
        writer.write_all(&raw).unwrap();
        writer.write_all(b"\n").unwrap();
        written += (from.len() + raw.len() + 1) as u64;
        number += 1;
    }
    writer.flush().unwrap();
    (number, written)
}

fn status_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find(|line| line.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn peak_rss_mib(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/status"),
        None => "/proc/self/status".to_owned(),
    };
    let status = std::fs::read_to_string(path).ok()?;
    status_kib(&status, "VmHWM:").map(|kib| kib as f64 / 1024.0)
}

/// CPU seconds (user and system) a process has used, from /proc/PID/stat.
fn cpu_seconds(pid: Option<u32>) -> f64 {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or_default();
    let fields: Vec<u64> = after_name
        .split_whitespace()
        .map(|field| field.parse().unwrap_or(0))
        .collect();
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0)) as f64 / ticks
}

/// Resets this process's VmHWM to its current RSS (Linux: "5" to clear_refs).
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// One import's result, its wall time and the CPU seconds the importer and the node used.
struct Run {
    summary: ImportSummary,
    seconds: f64,
    import_cpu_seconds: f64,
    node_cpu_seconds: f64,
}

fn run_import(node: &LocalNode, mailbox: &str, path: &Path, workers: usize) -> Run {
    let mut options = ImportOptions::new(&node.http, ACCOUNT);
    options.mailbox = mailbox.to_owned();
    options.workers = workers;
    let (own_before, node_before) = (cpu_seconds(None), cpu_seconds(node.pid()));
    let started = Instant::now();
    let summary = import(&options, path).unwrap_or_else(|error| panic!("import of {}: {error}", path.display()));
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(summary.failed, 0, "{:?}", summary.failures);
    Run {
        summary,
        seconds,
        import_cpu_seconds: cpu_seconds(None) - own_before,
        node_cpu_seconds: cpu_seconds(node.pid()) - node_before,
    }
}

fn phase_json(run: &Run, source_bytes: u64) -> Value {
    let (summary, seconds) = (&run.summary, run.seconds);
    let round = |value: f64| (value * 100.0).round() / 100.0;
    json!({
        "import_cpu_seconds": round(run.import_cpu_seconds),
        "node_cpu_seconds": round(run.node_cpu_seconds),
        "messages_read": summary.read,
        "imported": summary.imported,
        "already_present": summary.duplicates,
        "source_bytes": source_bytes,
        "seconds": round(seconds),
        "messages_per_second": (summary.read as f64 / seconds).round(),
        "megabytes_per_second": ((source_bytes as f64 / 1e6 / seconds) * 10.0).round() / 10.0,
    })
}

fn argument(arguments: &[String], name: &str) -> Option<String> {
    arguments
        .iter()
        .position(|argument| argument == name)
        .and_then(|index| arguments.get(index + 1).cloned())
}

/// Imports a generated mbox of `gigabytes` GB and reports the import's own peak RSS.
fn streaming_phase(node: &LocalNode, directory: &Path, gigabytes: f64, workers: usize) -> Value {
    eprintln!("generating a {gigabytes} GB mbox");
    let large_mbox = directory.join("large.mbox");
    let generated = Instant::now();
    let (large_messages, large_bytes) = write_large_mbox(&large_mbox, (gigabytes * 1e9) as u64, 0xb16);
    let generate_seconds = generated.elapsed().as_secs_f64();
    let before = peak_rss_mib(None);
    let reset = reset_peak_rss();
    eprintln!("importing the large mbox ({large_messages} messages)");
    let run = run_import(node, "Large", &large_mbox, workers);
    assert_eq!(run.summary.imported, large_messages);
    let mut streaming = phase_json(&run, large_bytes);
    streaming["workers"] = json!(workers);
    streaming["generate_seconds"] = json!((generate_seconds * 10.0).round() / 10.0);
    streaming["import_peak_rss_mib"] = json!(peak_rss_mib(None));
    streaming["peak_rss_reset_before_import"] = json!(reset);
    streaming["process_peak_rss_mib_before_import"] = json!(before);
    streaming["node_peak_rss_mib"] = json!(peak_rss_mib(node.pid()));

    std::fs::remove_file(&large_mbox).unwrap();
    streaming
}

fn main() {
    let arguments: Vec<String> = std::env::args().collect();
    let messages: u64 = argument(&arguments, "--messages").map_or(20_000, |value| value.parse().unwrap());
    let gigabytes: f64 = argument(&arguments, "--gigabytes").map_or(3.0, |value| value.parse().unwrap());
    let workers: Vec<usize> = argument(&arguments, "--workers")
        .unwrap_or_else(|| "1,8,16".into())
        .split(',')
        .map(|value| value.parse().unwrap())
        .collect();
    let default_workers = ImportOptions::new("", "").workers;
    let directory =
        PathBuf::from(argument(&arguments, "--dir").unwrap_or_else(|| "/var/tmp/mailmesh-import-bench".into()));
    let binary = argument(&arguments, "--binary").map(PathBuf::from).unwrap_or_else(|| {
        let examples = std::env::current_exe().unwrap();
        examples.parent().unwrap().parent().unwrap().join("mailmesh")
    });
    // The machine as it was, not a fixed label: other builds on 2 cores halve the figures.
    let cores = std::thread::available_parallelism().map_or(0, |count| count.get());
    let load_at_start = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into());
    let _ = std::fs::remove_dir_all(&directory);
    std::fs::create_dir_all(&directory).unwrap();
    let node = LocalNode::spawn(
        &binary,
        "bench",
        &directory.join("node"),
        "import-bench",
        &[],
        1000,
        &[],
    )
    .unwrap();

    eprintln!("generating {messages} small messages");
    let small_mbox = directory.join("small.mbox");
    let small_bytes = write_small_mbox(&small_mbox, messages, 0x5eed);
    let mut throughput = Vec::new();
    for &count in &workers {
        eprintln!("importing the small mbox with {count} workers");
        let run = run_import(&node, &format!("Small-{count}"), &small_mbox, count);
        assert_eq!(run.summary.imported, messages);
        let mut phase = phase_json(&run, small_bytes);
        phase["workers"] = json!(count);
        throughput.push(phase);
    }
    eprintln!("importing the small mbox again (all present)");
    let rerun_mailbox = format!("Small-{}", workers[0]);
    let run = run_import(&node, &rerun_mailbox, &small_mbox, default_workers);
    assert_eq!(run.summary.duplicates, messages);
    let rerun = phase_json(&run, small_bytes);

    let maildir = directory.join("Maildir");
    let maildir_bytes = write_maildir(&maildir, messages, 0xd1d);
    eprintln!("importing the Maildir");
    let run = run_import(&node, "Maildir", &maildir, default_workers);
    assert_eq!(run.summary.imported, messages);
    let mut maildir_phase = phase_json(&run, maildir_bytes);
    maildir_phase["workers"] = json!(default_workers);
    std::fs::remove_dir_all(&maildir).unwrap();

    let streaming = (gigabytes > 0.0).then(|| streaming_phase(&node, &directory, gigabytes, default_workers));

    let report = json!({
        "benchmark": "import_bench",
        "machine": format!("{} cores, load average {} when the run began", cores, load_at_start),
        "node": "one mailmesh node process on 127.0.0.1, durable appends, search indexing",
        "throughput_mbox": throughput,
        "throughput_maildir": maildir_phase,
        "rerun_all_present": rerun,
        "streaming": streaming,
    });
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
    drop(node);
    let _ = std::fs::remove_dir_all(&directory);
}
