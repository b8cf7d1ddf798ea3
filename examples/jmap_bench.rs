//! JMAP benchmark: a node started in this process with one account, spoken to over HTTP the way
//! a webmail does, end to end (request, login check, method, JSON answer).
//!
//! `cargo run --release --example jmap_bench -- --emails 100000 --mailboxes 1000 --repeats 200`
//!
//! Prints one JSON object with, in milliseconds (p50, p99, max over `--repeats` runs; each time
//! from sending a request to the last byte of its answer, this client's parsing left out):
//! - for each of receivedAt (newest first), from and subject: Email/query of the top 100 of
//!   INBOX followed by Email/get of their list properties, as two requests in a row
//!   (`query_then_get`, and each of the two alone: `query_alone`, `get_alone`), and as one
//!   request with a result reference (`batched`); once with the properties answered from the
//!   listing (id, subject, receivedAt, keywords, size, mailboxIds, sentAt) and once adding
//!   `from` (kept in the listing too since de15505; older listings read the message);
//! - Mailbox/get with counts for an account with `--mailboxes` mailboxes;
//! - the size in bytes of the Email/changes answer after 100 flag changes;
//! - and, under `while_measuring`, what else ran meanwhile: load average, the hypervisor's
//!   steal and the CPU seconds of the node's background threads (compactions, index merges).
//!
//! After the fill it waits until the store's compactions and the full-text indexing are done
//! (`--no-settle` measures at once, while they run). The fill goes through the mail service's delivery path (the same as LMTP's), 256 at a time;
//! it is not what is measured. Issue 14's targets: p99 ≤ 5 ms for the query + get on 1,000,000
//! emails, ≤ 10 KB for the changes, ≤ 20 ms for Mailbox/get with 1,000 mailboxes.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};

use mailmesh::node::NodeConfig;
use mailmesh::service::Delivery;

const ACCOUNT: &str = "alice@example.org";
/// Made with `doveadm pw -s SHA512-CRYPT -p secret` (Dovecot 2.3.19).
const SECRET_HASH: &str = "{SHA512-CRYPT}$6$3d1jxbtsSUvkdMJd$BaSpHPEbL9a6Kr7aotyzcanEM22vEvv6JW1FUXXS9/OoWz/Q.Tvq/MR1BhXbNBe2D5X7YGGGLka2prNYroVB8.";
/// base64("alice@example.org:secret")
const BASIC: &str = "YWxpY2VAZXhhbXBsZS5vcmc6c2VjcmV0";
const OPERATOR_TOKEN: &str = "jmap-bench-operator-token";
/// 2026-06-01T00:00:00Z.
const JUNE: u64 = 1_780_272_000_000;

struct Arguments {
    emails: usize,
    mailboxes: usize,
    repeats: usize,
    /// Whether to wait, after the fill, until the store's compactions are done.
    settle: bool,
}

fn parse_arguments() -> Result<Arguments, String> {
    let mut arguments = Arguments {
        emails: 100_000,
        mailboxes: 1000,
        repeats: 200,
        settle: true,
    };
    let mut iterator = std::env::args().skip(1);
    while let Some(flag) = iterator.next() {
        let mut number = || -> Result<usize, String> {
            iterator
                .next()
                .and_then(|value| value.parse().ok())
                .ok_or(format!("{flag} takes a number"))
        };
        match flag.as_str() {
            "--emails" => arguments.emails = number()?,
            "--mailboxes" => arguments.mailboxes = number()?,
            "--repeats" => arguments.repeats = number()?.max(1),
            "--json" => {}
            "--no-settle" => arguments.settle = false,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(arguments)
}

const FIRST_NAMES: [&str; 12] = [
    "Ada", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Mallory", "Niaj",
];
const TOPICS: [&str; 10] = [
    "quarterly report",
    "lunch",
    "invoice",
    "release notes",
    "meeting notes",
    "travel plans",
    "build failure",
    "contract draft",
    "holiday",
    "weekly update",
];

fn message(index: usize) -> Vec<u8> {
    let name = FIRST_NAMES[index % FIRST_NAMES.len()];
    let topic = TOPICS[(index / 7) % TOPICS.len()];
    format!(
        "From: {name} <{}@example.net>\r\nTo: Alice <alice@example.org>\r\nSubject: {topic} {index}\r\nMessage-ID: <{index}@bench.example.net>\r\nDate: Mon, 1 Jun 2026 10:00:00 +0000\r\n\r\nHello Alice,\r\n\r\nabout the {topic}: number {index}.\r\n",
        name.to_lowercase()
    )
    .into_bytes()
}

struct Client {
    agent: ureq::Agent,
    url: String,
}

impl Client {
    /// One API request; returns the answer and its size in bytes.
    fn call(&self, calls: Value) -> (Value, usize) {
        let (value, size, _) = self.timed_call(calls);
        (value, size)
    }

    /// The same, with the time from sending the request to the last byte of the answer: the
    /// node's latency as a client sees it, without this client's own JSON parsing of the
    /// answer (a `serde_json::Value` of 1,000 mailboxes takes this client longer to build than
    /// a typed client would).
    fn timed_call(&self, calls: Value) -> (Value, usize, Duration) {
        let body = json!({
            "using": ["urn:ietf:params:jmap:core", "urn:ietf:params:jmap:mail"],
            "methodCalls": calls,
        })
        .to_string();
        let started = Instant::now();
        let mut response = self
            .agent
            .post(&self.url)
            .header("Authorization", &format!("Basic {BASIC}"))
            .header("Content-Type", "application/json")
            .send(body.as_bytes())
            .expect("the node answers");
        let text = response.body_mut().read_to_string().expect("a JSON answer");
        let elapsed = started.elapsed();
        let value: Value = serde_json::from_str(&text).expect("JSON");
        for answer in value["methodResponses"].as_array().into_iter().flatten() {
            assert_ne!(answer[0], "error", "{answer}");
        }
        (value, text.len(), elapsed)
    }
}

/// Waits until the node's store has had no compaction or flush running, no compaction pending
/// and no message waiting for the full-text index for two seconds in a row (read from its
/// metrics), at most ten minutes; returns the seconds waited. A fill of a million emails in a
/// minute leaves minutes of compactions and indexing behind, which a mailbox that grew over
/// years would not have.
fn settle(metrics_url: &str) -> f64 {
    let started = Instant::now();
    let agent = ureq::Agent::new_with_defaults();
    let mut quiet_since: Option<Instant> = None;
    while started.elapsed() < Duration::from_secs(600) {
        let text = agent
            .get(metrics_url)
            .header("Authorization", &format!("Bearer {OPERATOR_TOKEN}"))
            .call()
            .and_then(|mut response| response.body_mut().read_to_string())
            .expect("the node's metrics");
        let busy = mailmesh::api_client::metric_sum(&text, "mailmesh_store_background_jobs")
            + mailmesh::api_client::metric_sum(&text, "mailmesh_store_pending_compaction_bytes")
            + mailmesh::api_client::metric_sum(&text, "mailmesh_search_backlog");
        if busy > 0.0 {
            quiet_since = None;
        } else if quiet_since.get_or_insert_with(Instant::now).elapsed() >= Duration::from_secs(2) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    started.elapsed().as_secs_f64()
}

/// What else the machine and this process did while the latencies were measured, so that a
/// run's tails can be told apart from a busy neighbour or a background merge: the load average
/// at the start, the share of CPU time the hypervisor gave to others (steal), and the CPU time
/// of this process's threads other than the client and the node's request workers (RocksDB
/// compactions, full-text index merges, the commit writer).
struct MachineSample {
    started: Instant,
    load_average: f64,
    steal_and_total: (u64, u64),
    background_ticks: u64,
}

impl MachineSample {
    fn now() -> MachineSample {
        MachineSample {
            started: Instant::now(),
            load_average: std::fs::read_to_string("/proc/loadavg")
                .ok()
                .and_then(|text| text.split_whitespace().next()?.parse().ok())
                .unwrap_or(f64::NAN),
            steal_and_total: steal_and_total(),
            background_ticks: background_ticks(),
        }
    }

    fn until_now(&self) -> Value {
        let (steal, total) = steal_and_total();
        let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let round = |value: f64| (value * 10.0).round() / 10.0;
        json!({
            "seconds": round(self.started.elapsed().as_secs_f64()),
            "cores": std::thread::available_parallelism().map_or(0, |cores| cores.get()),
            "load_average_at_start": self.load_average,
            "cpu_steal_percent": round(
                100.0 * steal.saturating_sub(self.steal_and_total.0) as f64
                    / total.saturating_sub(self.steal_and_total.1).max(1) as f64
            ),
            "background_cpu_seconds": round(
                background_ticks().saturating_sub(self.background_ticks) as f64 / ticks_per_second
            ),
        })
    }
}

/// The machine's steal and total CPU time so far, in clock ticks (the first line of /proc/stat).
fn steal_and_total() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = text
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|field| field.parse().ok())
        .collect();
    (fields.get(7).copied().unwrap_or(0), fields.iter().sum())
}

/// The CPU time, in clock ticks, of this process's threads other than the main thread (the
/// client) and the tokio workers (the node's request handling).
fn background_ticks() -> u64 {
    let main = std::process::id().to_string();
    let Ok(threads) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    threads
        .flatten()
        .filter(|thread| thread.file_name().to_string_lossy() != main)
        .filter_map(|thread| std::fs::read_to_string(thread.path().join("stat")).ok())
        .filter_map(|stat| {
            let name = &stat[stat.find('(')? + 1..stat.rfind(')')?];
            if name.starts_with("tokio-runtime") || name.starts_with("tokio-rt") {
                return None;
            }
            let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .sum()
}

fn milliseconds(samples: &mut [Duration]) -> Value {
    samples.sort();
    let at = |fraction: f64| {
        let index = ((samples.len() as f64 * fraction).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[index].as_secs_f64() * 1000.0
    };
    let round = |value: f64| (value * 1000.0).round() / 1000.0;
    json!({ "p50": round(at(0.50)), "p99": round(at(0.99)), "max": round(at(1.0)) })
}

fn main() {
    let arguments = match parse_arguments() {
        Ok(arguments) => arguments,
        Err(error) => {
            eprintln!("{error}");
            std::process::exit(2);
        }
    };
    let directory = tempfile::tempdir().expect("a scratch directory");
    let accounts = directory.path().join("accounts");
    std::fs::write(&accounts, format!("{ACCOUNT}:{SECRET_HASH}\n")).expect("the accounts file");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let config = NodeConfig {
        name: "jmap-bench".into(),
        data_dir: directory.path().join("node"),
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        http: "127.0.0.1:0".parse().unwrap(),
        cluster: "jmap-bench".into(),
        accounts_file: Some(accounts),
        // The operator's token, for the metrics read while the store settles.
        http_token: Some(OPERATOR_TOKEN.into()),
        ..NodeConfig::default()
    };
    let (_stop_sender, stop) = tokio::sync::watch::channel(false);
    let running = runtime
        .block_on(mailmesh::server::start(config, mailmesh::environment::system(), stop))
        .expect("the node starts");

    // Fill: the emails in INBOX, and one email in each further mailbox.
    let fill_started = Instant::now();
    let service = running.service.clone();
    let deliveries = (0..arguments.emails)
        .map(|index| ("INBOX".to_owned(), index))
        .chain((0..arguments.mailboxes.saturating_sub(1)).map(|index| (format!("Folder {index:04}"), index)));
    runtime.block_on(
        futures::stream::iter(deliveries)
            .map(|(mailbox, index)| {
                let service = service.clone();
                async move {
                    service
                        .deliver(Delivery {
                            account: ACCOUNT.into(),
                            mailbox: mailmesh::service::MailboxTarget::PathOrCreate(mailbox),
                            raw: message(index),
                            flags: Vec::new(),
                            received_millis: Some(JUNE + index as u64 * 1000),
                            skip_duplicate: false,
                        })
                        .await
                        .expect("a delivery")
                }
            })
            .buffer_unordered(256)
            .for_each(|_| async {}),
    );
    let fill_seconds = fill_started.elapsed().as_secs_f64();
    let settle_seconds = if arguments.settle {
        settle(&format!("http://{}/metrics", running.http))
    } else {
        0.0
    };

    let client = Client {
        agent: ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .new_agent(),
        url: format!("http://{}/jmap/api", running.http),
    };
    let (mailboxes, _) = client.call(json!([["Mailbox/get", {"properties": ["id", "name"]}, "m"]]));
    let inbox = mailboxes["methodResponses"][0][1]["list"]
        .as_array()
        .unwrap()
        .iter()
        .find(|mailbox| mailbox["name"] == "INBOX")
        .expect("INBOX")["id"]
        .clone();

    let listing = json!([
        "id",
        "subject",
        "receivedAt",
        "keywords",
        "size",
        "mailboxIds",
        "sentAt"
    ]);
    let with_from = json!([
        "id",
        "subject",
        "receivedAt",
        "keywords",
        "size",
        "mailboxIds",
        "sentAt",
        "from"
    ]);
    let machine_before = MachineSample::now();
    let mut figures = serde_json::Map::new();
    for (name, sort) in [
        ("receivedAt", json!([{"property": "receivedAt", "isAscending": false}])),
        ("from", json!([{"property": "from"}])),
        ("subject", json!([{"property": "subject"}])),
    ] {
        let query = json!(["Email/query", {"filter": {"inMailbox": inbox}, "sort": sort, "limit": 100}, "q"]);
        let mut sort_figures = serde_json::Map::new();
        for (variant, properties) in [("listing", &listing), ("with_from", &with_from)] {
            let mut two_requests = Vec::with_capacity(arguments.repeats);
            let mut queries = Vec::with_capacity(arguments.repeats);
            let mut gets = Vec::with_capacity(arguments.repeats);
            let mut batched = Vec::with_capacity(arguments.repeats);
            for _ in 0..arguments.repeats {
                let (answer, _, query_took) = client.timed_call(json!([query]));
                let ids = answer["methodResponses"][0][1]["ids"].clone();
                assert_eq!(ids.as_array().map(Vec::len), Some(100.min(arguments.emails)));
                let (answer, _, get_took) =
                    client.timed_call(json!([["Email/get", {"ids": ids, "properties": properties}, "g"]]));
                assert_eq!(
                    answer["methodResponses"][0][1]["list"].as_array().map(Vec::len),
                    Some(100.min(arguments.emails))
                );
                two_requests.push(query_took + get_took);
                queries.push(query_took);
                gets.push(get_took);
                let (answer, _, took) = client.timed_call(json!([
                    query,
                    ["Email/get", {"#ids": {"resultOf": "q", "name": "Email/query", "path": "/ids"}, "properties": properties}, "g"]
                ]));
                assert_eq!(
                    answer["methodResponses"][1][1]["list"].as_array().map(Vec::len),
                    Some(100.min(arguments.emails))
                );
                batched.push(took);
            }
            sort_figures.insert(
                variant.into(),
                json!({
                    "query_then_get_ms": milliseconds(&mut two_requests),
                    "query_alone_ms": milliseconds(&mut queries),
                    "get_alone_ms": milliseconds(&mut gets),
                    "batched_ms": milliseconds(&mut batched),
                }),
            );
        }
        figures.insert(name.into(), Value::Object(sort_figures));
    }

    let mut mailbox_get = Vec::with_capacity(arguments.repeats);
    let mut mailbox_count = 0;
    for _ in 0..arguments.repeats {
        let (answer, _, took) = client.timed_call(json!([["Mailbox/get", {}, "m"]]));
        mailbox_get.push(took);
        mailbox_count = answer["methodResponses"][0][1]["list"].as_array().map_or(0, Vec::len);
    }
    let machine = machine_before.until_now();

    // Email/changes after 100 flag changes made over JMAP.
    let (answer, _) = client.call(json!([
        ["Email/query", {"filter": {"inMailbox": inbox}, "limit": 100}, "q"],
        ["Email/get", {"#ids": {"resultOf": "q", "name": "Email/query", "path": "/ids"}, "properties": ["id"]}, "g"]
    ]));
    let state = answer["methodResponses"][1][1]["state"].clone();
    let ids: Vec<String> = answer["methodResponses"][0][1]["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_str().unwrap().to_owned())
        .collect();
    let update: serde_json::Map<String, Value> = ids
        .iter()
        .map(|id| (id.clone(), json!({"keywords/$seen": true})))
        .collect();
    client.call(json!([["Email/set", {"update": update}, "s"]]));
    let (changes, changes_bytes) = client.call(json!([["Email/changes", {"sinceState": state}, "c"]]));
    let changed = changes["methodResponses"][0][1]["updated"]
        .as_array()
        .map_or(0, Vec::len);

    let report = json!({
        "benchmark": "jmap",
        "emails": arguments.emails,
        "mailboxes": mailbox_count,
        "repeats": arguments.repeats,
        "fill_seconds": (fill_seconds * 10.0).round() / 10.0,
        "settled": arguments.settle,
        "settle_seconds": (settle_seconds * 10.0).round() / 10.0,
        "top_100_query_and_get": figures,
        "mailbox_get_ms": milliseconds(&mut mailbox_get),
        "while_measuring": machine,
        "email_changes_after_100_flag_changes": { "updated": changed, "response_bytes": changes_bytes },
        "note": "end to end over HTTP on 127.0.0.1, one client, keep-alive; each time runs from sending the request to the last byte of the answer; when settled, measured once the store had no compaction or flush running or pending and the full-text index had taken every message (a mailbox grows over years, not in one bulk fill)",
    });
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
}
