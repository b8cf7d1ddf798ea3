//! Query benchmark: one mailbox of N synthetic but realistic messages, queried from the node's
//! local indexes the way the HTTP API does.
//!
//! `cargo run --release --example query_bench -- --messages 1000000 --json`
//!
//! Prints one JSON object: latency (ms) of a top-100 page for each sort and direction (reading
//! the records and listings as the API does), of the unread count, of searches (rare words,
//! common words, sender and subject), of pages at positions spread over the whole mailbox, and the
//! size of the local indexes on disk. The mailbox is filled through the store's normal append
//! path in batches of 1,000 with WAL sync turned off for the fill only (the fill is not what is
//! measured).
//!
//! Every figure has a `cold` and a `warm` part. After the fill, the store and the search index
//! are closed and reopened, so RocksDB's block cache, the position cache and tantivy's readers
//! start empty (the operating system's page cache is not dropped: that would need root and would
//! slow every other process on the machine). `cold` is the first run of each distinct query
//! after the reopen, all kinds run before any is repeated; `warm` is `--repeats` further runs
//! cycling through the same queries. Queries vary: several rare words, several common words,
//! sender and subject pairs, both directions of every sort, and 200 page positions.
//!
//! Every search's hit count is checked against the count known from generating the mail; the
//! benchmark exits with an error naming the query when they differ, so a search that silently
//! finds nothing cannot look fast.

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

/// What a generated message contains, for the expected hit counts.
struct Generated {
    raw: Vec<u8>,
    last: &'static str,
    topic: &'static str,
}

/// Rare words and how often they occur: a message with index `i` carries each word whose modulus
/// divides `i`.
const RARE: [(&str, usize); 4] = [
    ("zanzibar", 997),
    ("kumquat", 1009),
    ("quokka", 4_001),
    ("marzipan", 15_013),
];

fn message(random: &mut Random, index: usize) -> Generated {
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
    for (word, modulus) in RARE {
        if index % modulus == 0 {
            body.push(' ');
            body.push_str(word);
        }
    }
    let raw = format!(
        "From: {first} {last} <{}.{}@example.org>\r\nTo: team@example.org\r\nSubject: {prefix}{topic} {index}\r\nDate: {day:02} {month} 2026 {:02}:{:02}:00 +0000\r\nMessage-ID: <{index}@bench.example.org>\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n",
        first.to_lowercase(),
        last.to_lowercase(),
        random.next() % 24,
        random.next() % 60
    )
    .into_bytes();
    Generated { raw, last, topic }
}

fn percentile(samples: &mut [f64], fraction: f64) -> f64 {
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let index = ((samples.len() as f64 - 1.0) * fraction).round() as usize;
    (samples[index] * 1000.0).round() / 1000.0
}

fn summary(mut samples: Vec<f64>) -> serde_json::Value {
    if samples.is_empty() {
        return serde_json::Value::Null;
    }
    let count = samples.len();
    serde_json::json!({
        "runs": count,
        "p50_ms": percentile(&mut samples, 0.5),
        "p99_ms": percentile(&mut samples, 0.99),
        "max_ms": percentile(&mut samples, 1.0),
    })
}

/// One kind of query: its distinct variants, timed once each cold and then `repeats` times warm.
struct Kind<'a> {
    name: String,
    variants: usize,
    run: Box<dyn FnMut(usize) + 'a>,
    cold: Vec<f64>,
}

impl<'a> Kind<'a> {
    fn new(name: impl Into<String>, variants: usize, run: impl FnMut(usize) + 'a) -> Self {
        Kind {
            name: name.into(),
            variants: variants.max(1),
            run: Box::new(run),
            cold: Vec::new(),
        }
    }

    fn time(&mut self, variant: usize) -> f64 {
        let started = Instant::now();
        (self.run)(variant % self.variants);
        started.elapsed().as_secs_f64() * 1000.0
    }
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
    let options = StoreOptions {
        sync_writes: false,
        ..StoreOptions::default()
    };
    let store = Store::open(&root.join("store"), mailmesh::model::NodeId(1), options.clone()).expect("open store");
    let search = SearchIndex::open(&root.join("search")).expect("open search index");
    let mailbox = MailboxKey::new("bench@example.org", "INBOX").expect("key");
    let mut random = Random(42);
    let fill_started = Instant::now();
    let mut appended = 0;
    let start_millis: u64 = 1_767_225_600_000;
    // (last name, topic) -> messages, for the expected hit counts.
    let mut generated: std::collections::HashMap<(&str, &str), usize> = std::collections::HashMap::new();
    while appended < arguments.messages {
        let batch = (arguments.messages - appended).min(1000);
        let operations: Vec<Operation> = (appended..appended + batch)
            .map(|index| {
                let message = message(&mut random, index);
                *generated.entry((message.last, message.topic)).or_insert(0) += 1;
                Operation::Append {
                    location: None,
                    unless_held_in: Vec::new(),
                    mailbox: mailbox.clone(),
                    raw: message.raw,
                    flags: if index % 3 == 0 {
                        vec![]
                    } else {
                        vec![mailmesh::model::Flag::Seen]
                    },
                    received_millis: None,
                    now_millis: start_millis + index as u64 * 30_000,
                    random: u128::from(random.next()) << 40 | u128::from(random.next()),
                }
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
    // Reopen, so that what follows starts with empty caches in this process.
    drop(search);
    drop(store);
    let store = Store::open(&root.join("store"), mailmesh::model::NodeId(1), options).expect("reopen store");
    let search = SearchIndex::open(&root.join("search")).expect("reopen search index");
    let id = mailbox.id();
    let messages = arguments.messages;

    // Expected hits, from what was generated. Search matches words in from, to, subject and body.
    let rare_expected: Vec<(String, usize)> = RARE
        .iter()
        .map(|(word, modulus)| (word.to_string(), (messages + modulus - 1) / modulus))
        .collect();
    // Topic words that appear in no other field of any message.
    let common_words = [
        "invoice",
        "budget",
        "migration",
        "holiday",
        "newsletter",
        "password",
        "lunch",
        "customer",
    ];
    let with_word = |word: &str, last: Option<&str>| -> usize {
        generated
            .iter()
            .filter(|((generated_last, topic), _)| {
                topic.split(' ').any(|part| part == word) && last.is_none_or(|last| last == *generated_last)
            })
            .map(|(_, count)| count)
            .sum()
    };
    let common_expected: Vec<(String, usize)> = common_words
        .iter()
        .map(|word| (word.to_string(), with_word(word, None)))
        .collect();
    let senders = ["tanaka", "smith", "rossi", "nowak", "silva", "okafor", "larsen", "kim"];
    let sender_expected: Vec<(String, usize)> = senders
        .iter()
        .zip(common_words.iter().cycle().skip(1))
        .map(|(last, word)| {
            let capitalised = format!("{}{}", last[..1].to_uppercase(), &last[1..]);
            (
                format!("from:{last} AND subject:{word}"),
                with_word(word, Some(&capitalised)),
            )
        })
        .collect();
    let positions: Vec<usize> = (0..200)
        .map(|round| (round * 7_919_993 + 12_345) % messages.saturating_sub(100).max(1))
        .collect();

    let search_kind = |name: &str, queries: Vec<(String, usize)>, sort: SortKey, descending: bool| {
        let (store, search) = (&store, &search);
        Kind::new(name, queries.len(), move |variant| {
            let (query, expected) = &queries[variant];
            let hits = search
                .search(store, id, query, sort, descending, 0, 100)
                .unwrap_or_else(|error| panic!("search {query:?} failed: {error}"));
            if hits.total != *expected || hits.ids.len() != (*expected).min(100) {
                eprintln!(
                    "query_bench: WRONG SEARCH RESULT for {query:?}: {} hits ({} returned), {expected} expected",
                    hits.total,
                    hits.ids.len()
                );
                std::process::exit(1);
            }
        })
    };
    let mut kinds: Vec<Kind> = Vec::new();
    for sort in SortKey::ALL {
        for descending in [true, false] {
            let name = format!(
                "top100_{}_{}",
                format!("{sort:?}").to_lowercase(),
                if descending { "desc" } else { "asc" }
            );
            let store = &store;
            kinds.push(Kind::new(name, 1, move |_| {
                let page = store.list(id, sort, descending, 0, 100).expect("list");
                assert_eq!(page.len(), 100.min(messages));
            }));
        }
    }
    {
        let store = &store;
        kinds.push(Kind::new("page100_received_desc_position_1000", 1, move |_| {
            let page = store.list(id, SortKey::Received, true, 1000, 100).expect("list");
            assert_eq!(page.len(), 100.min(messages.saturating_sub(1000)));
        }));
    }
    // Deep pages: the first of an order counts the index into the position cache (a cold run);
    // later ones find their block in O(log n) and step over at most two blocks of keys.
    for (name, sort, descending) in [
        ("page100_from_asc_anywhere", SortKey::From, false),
        ("page100_received_desc_anywhere", SortKey::Received, true),
    ] {
        let (store, positions) = (&store, &positions);
        kinds.push(Kind::new(name, positions.len(), move |variant| {
            let position = positions[variant];
            let page = store.list(id, sort, descending, position, 100).expect("list");
            assert_eq!(page.len(), 100.min(messages - position));
        }));
    }
    {
        let store = &store;
        kinds.push(Kind::new("count_unseen", 1, move |_| {
            let entry = store.mailbox_entry(id).expect("entry").expect("mailbox");
            assert_eq!(entry.live as usize, messages);
            assert!(entry.unseen <= entry.live);
        }));
    }
    kinds.push(search_kind(
        "search_rare_word",
        rare_expected.clone(),
        SortKey::Received,
        true,
    ));
    kinds.push(search_kind(
        "search_common_word",
        common_expected.clone(),
        SortKey::Received,
        true,
    ));
    kinds.push(search_kind(
        "search_sender_and_subject",
        sender_expected.clone(),
        SortKey::Subject,
        false,
    ));

    // Cold: every distinct variant of every kind once, before anything repeats.
    for kind in &mut kinds {
        for variant in 0..kind.variants {
            let milliseconds = kind.time(variant);
            kind.cold.push(milliseconds);
        }
    }
    // Warm: `repeats` more runs of each kind, cycling through its variants.
    let repeats = arguments.repeats;
    let mut figures = serde_json::Map::new();
    for mut kind in kinds {
        let runs = if kind.name == "count_unseen" {
            repeats * 5
        } else {
            repeats
        };
        let warm: Vec<f64> = (0..runs).map(|round| kind.time(round)).collect();
        figures.insert(
            kind.name.clone(),
            serde_json::json!({
                "variants": kind.variants,
                "cold": summary(std::mem::take(&mut kind.cold)),
                "warm": summary(warm),
            }),
        );
    }
    let expected_hits = serde_json::json!({
        "rare": rare_expected,
        "common": common_expected,
        "sender_and_subject": sender_expected,
    });
    let index_bytes = store.local_index_bytes().unwrap_or(0) + directory_size(&root.join("search"));
    let json = serde_json::json!({
        "messages": arguments.messages,
        "fill_seconds": (fill_seconds * 10.0).round() / 10.0,
        "cold_means": "first run of each distinct query after reopening the store and index (OS page cache kept)",
        "queries": figures,
        "search_hits_checked": expected_hits,
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
