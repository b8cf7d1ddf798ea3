//! Query benchmark: one mailbox of N synthetic but realistic messages, queried from the node's
//! local indexes the way the HTTP API does.
//!
//! `cargo run --release --example query_bench -- --messages 1000000 --json`
//!
//! Prints one JSON object: p50 and p99 latency (ms) of a top-100 page for each sort (newest or
//! first 100, reading the records and listings as the API does), of the unread count, of searches
//! (rare word, common word, sender), of pages at positions spread over the whole mailbox, and the
//! size of the local indexes on disk. The mailbox is filled through the store's normal append
//! path in batches of 1,000 with WAL sync turned off for the fill only (the fill is not what is
//! measured).

use std::time::Instant;

use mailmesh::model::MailboxKey;
use mailmesh::search::SearchIndex;
use mailmesh::store::{Operation, SortKey, Store, StoreOptions};

struct Arguments {
    messages: usize,
    json: bool,
    repeats: usize,
    keep: bool,
}

fn parse_arguments() -> Result<Arguments, String> {
    let mut arguments = Arguments {
        messages: 100_000,
        json: false,
        repeats: 200,
        keep: false,
    };
    let mut iterator = std::env::args().skip(1);
    while let Some(flag) = iterator.next() {
        match flag.as_str() {
            "--messages" => {
                arguments.messages = iterator
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--messages takes a number")?
            }
            "--repeats" => {
                arguments.repeats = iterator
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--repeats takes a number")?
            }
            "--json" => arguments.json = true,
            "--keep" => arguments.keep = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(arguments)
}

struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 17
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[(self.next() as usize) % items.len()]
    }
}

const FIRST: [&str; 12] = [
    "Anna", "Bruno", "Chloé", "Dmitri", "Eva", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemal", "Lea",
];
const LAST: [&str; 10] = [
    "Smith", "Müller", "Rossi", "Dubois", "Tanaka", "Nowak", "Silva", "Okafor", "Larsen", "Kim",
];
const TOPICS: [&str; 14] = [
    "quarterly report",
    "team lunch",
    "server migration",
    "invoice",
    "holiday plans",
    "contract draft",
    "release notes",
    "budget review",
    "meeting notes",
    "travel booking",
    "password reset",
    "newsletter",
    "design review",
    "customer feedback",
];
const WORDS: [&str; 24] = [
    "please", "find", "attached", "the", "latest", "version", "regards", "thanks", "schedule", "review", "project",
    "deadline", "update", "question", "answer", "tomorrow", "office", "payment", "delivery", "account", "meeting",
    "agenda", "summary", "details",
];

fn message(random: &mut Random, index: usize) -> Vec<u8> {
    let first = random.pick(&FIRST);
    let last = random.pick(&LAST);
    let topic = random.pick(&TOPICS);
    let prefix = ["", "", "Re: ", "Fwd: ", "RE: "][(random.next() % 5) as usize];
    let day = 1 + random.next() % 28;
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][(random.next() % 12) as usize];
    let words = 40 + (random.next() % 600) as usize; // sizes spread around a 4 KiB median with headers
    let mut body = String::with_capacity(words * 7);
    for word in 0..words {
        body.push_str(random.pick(&WORDS));
        body.push(if word % 12 == 11 { '\n' } else { ' ' });
    }
    if index % 997 == 0 {
        body.push_str(" zanzibar");
    }
    format!(
        "From: {first} {last} <{}.{}@example.org>\r\nTo: team@example.org\r\nSubject: {prefix}{topic} {index}\r\nDate: {day:02} {month} 2026 {:02}:{:02}:00 +0000\r\nMessage-ID: <{index}@bench.example.org>\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n",
        first.to_lowercase(),
        last.to_lowercase(),
        random.next() % 24,
        random.next() % 60
    )
    .into_bytes()
}

fn percentile(samples: &mut [f64], fraction: f64) -> f64 {
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let index = ((samples.len() as f64 - 1.0) * fraction).round() as usize;
    (samples[index] * 1000.0).round() / 1000.0
}

fn measure(repeats: usize, mut run: impl FnMut(usize)) -> serde_json::Value {
    let mut samples = Vec::with_capacity(repeats);
    for repeat in 0..repeats {
        let started = Instant::now();
        run(repeat);
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    serde_json::json!({ "p50_ms": percentile(&mut samples, 0.5), "p99_ms": percentile(&mut samples, 0.99) })
}

fn directory_size(path: &std::path::Path) -> u64 {
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|entry| match entry.metadata() {
                    Ok(metadata) if metadata.is_dir() => directory_size(&entry.path()),
                    Ok(metadata) => metadata.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

fn main() {
    let arguments = match parse_arguments() {
        Ok(arguments) => arguments,
        Err(message) => {
            eprintln!("query_bench: {message}");
            std::process::exit(2);
        }
    };
    let root = std::env::temp_dir().join(format!("mailmesh-query-bench-{}", std::process::id()));
    let store = Store::open(
        &root.join("store"),
        mailmesh::model::NodeId(1),
        StoreOptions {
            sync_writes: false,
            ..StoreOptions::default()
        },
    )
    .expect("open store");
    let search = SearchIndex::open(&root.join("search")).expect("open search index");
    let mailbox = MailboxKey::new("bench@example.org", "INBOX").expect("key");
    let mut random = Random(42);
    let fill_started = Instant::now();
    let mut appended = 0;
    let start_millis: u64 = 1_767_225_600_000;
    while appended < arguments.messages {
        let batch = (arguments.messages - appended).min(1000);
        let operations: Vec<Operation> = (appended..appended + batch)
            .map(|index| Operation::Append {
                mailbox: mailbox.clone(),
                raw: message(&mut random, index),
                flags: if index % 3 == 0 {
                    vec![]
                } else {
                    vec![mailmesh::model::Flag::Seen]
                },
                now_millis: start_millis + index as u64 * 30_000,
                random: u128::from(random.next()) << 40 | u128::from(random.next()),
            })
            .collect();
        for result in store.apply(operations) {
            result.expect("append");
        }
        appended += batch;
        if appended % 100_000 == 0 {
            search.catch_up(&store).expect("index");
            eprintln!("query_bench: {appended} messages stored and indexed");
        }
    }
    search.catch_up(&store).expect("index");
    let fill_seconds = fill_started.elapsed().as_secs_f64();
    let id = mailbox.id();
    let repeats = arguments.repeats;

    let mut sorts = serde_json::Map::new();
    for sort in SortKey::ALL {
        let name = format!("{sort:?}").to_lowercase();
        sorts.insert(
            format!("top100_{name}_desc"),
            measure(repeats, |_| {
                let page = store.list(id, sort, true, 0, 100).expect("list");
                assert_eq!(page.len(), 100.min(arguments.messages));
            }),
        );
    }
    sorts.insert(
        "page100_received_desc_position_1000".into(),
        measure(repeats, |_| {
            store.list(id, SortKey::Received, true, 1000, 100).expect("list");
        }),
    );
    // Deep pages: the first one counts the index into the position cache, later ones find
    // their block in O(log n) and step over at most two blocks of keys.
    let messages = arguments.messages;
    let deep_started = Instant::now();
    store.list(id, SortKey::From, false, messages / 2, 100).expect("list");
    let first_deep_ms = deep_started.elapsed().as_secs_f64() * 1000.0;
    for (name, sort, descending) in [
        ("page100_from_asc_anywhere", SortKey::From, false),
        ("page100_received_desc_anywhere", SortKey::Received, true),
    ] {
        sorts.insert(
            name.into(),
            measure(repeats, |round| {
                let position = (round * 7_919_993 + 12_345) % messages.saturating_sub(100).max(1);
                let page = store.list(id, sort, descending, position, 100).expect("list");
                assert_eq!(page.len(), 100.min(messages - position));
            }),
        );
    }
    let count = measure(repeats * 5, |_| {
        let entry = store.mailbox_entry(id).expect("entry").expect("mailbox");
        assert!(entry.unseen <= entry.live);
    });
    let rare = measure(repeats, |_| {
        search
            .search(&store, id, "zanzibar", SortKey::Received, true, 0, 100)
            .expect("search");
    });
    let common = measure(repeats, |_| {
        search
            .search(&store, id, "invoice", SortKey::Received, true, 0, 100)
            .expect("search");
    });
    let sender = measure(repeats, |_| {
        search
            .search(
                &store,
                id,
                "from:tanaka AND subject:budget",
                SortKey::Subject,
                false,
                0,
                100,
            )
            .expect("search");
    });
    let hits = search
        .search(&store, id, "invoice", SortKey::Received, true, 0, 1)
        .expect("search")
        .total;
    let index_bytes = store.local_index_bytes().unwrap_or(0) + directory_size(&root.join("search"));
    let json = serde_json::json!({
        "messages": arguments.messages,
        "fill_seconds": (fill_seconds * 10.0).round() / 10.0,
        "sorts": sorts,
        "first_deep_page_ms_building_the_position_cache": (first_deep_ms * 100.0).round() / 100.0,
        "count_unseen": count,
        "search_rare_word": rare,
        "search_common_word": common,
        "common_word_hits": hits,
        "search_sender_and_subject": sender,
        "index_bytes_on_disk": index_bytes,
        "machine": format!("{} cores", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)),
    });
    drop(search);
    drop(store);
    if !arguments.keep {
        let _ = std::fs::remove_dir_all(&root);
    }
    if arguments.json {
        println!("{json}");
    } else {
        println!("{}", serde_json::to_string_pretty(&json).unwrap_or_default());
    }
}
