//! The `mailmesh` command: run a node, or a local demo cluster.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use mailmesh::config::{self, ConfigFile};

#[derive(Parser)]
#[command(name = "mailmesh", version, about = "Peer-to-peer replication node for mail stores")]
struct Cli {
    #[command(subcommand)]
    command: CommandLine,
}

#[derive(Subcommand)]
enum CommandLine {
    /// Run a node (with no flags: a working node with its store under ./data).
    Node(NodeArguments),
    /// Show a running node, its peers and whether they agree; exits 1 when some peer disagrees.
    Status {
        /// The node's HTTP address: host:port, or https://host:port for a node with TLS.
        #[arg(long, default_value = "127.0.0.1:4800")]
        http: String,
        /// A PEM file of the certificates to trust for https:// (the node's self-signed
        /// certificate, or its CA); without it, the system's roots.
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// Print the status document as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Import a Maildir++ tree, a Maildir, an mbox file or a directory of mbox files into a running
    /// node, keeping flags and received dates. A re-run adds only what is missing.
    Import {
        /// The node's HTTP address: host:port, or https://host:port for a node with TLS.
        #[arg(long, default_value = "127.0.0.1:4800")]
        http: String,
        /// A PEM file of the certificates to trust for https://; without it, the system's roots.
        #[arg(long)]
        ca_file: Option<PathBuf>,
        #[arg(long)]
        account: String,
        /// The mailbox of an mbox file or of a Maildir's root; Maildir++ folders (.Sent,
        /// .Archive.2026) and the files of an mbox directory keep their own names (Sent, Archive/2026).
        #[arg(long, default_value = "INBOX")]
        mailbox: String,
        /// A file whose first line is the node's bearer token.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Appends in flight at once.
        #[arg(long, default_value_t = 16)]
        workers: usize,
        /// Where a Maildir message's received date comes from first: `name` (the leading unix
        /// seconds of the file name) or `mtime` (the file's modification time, which Dovecot sets).
        #[arg(long, default_value = "name", value_parser = ["name", "mtime"])]
        maildir_date: String,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
        /// An mbox file, a Maildir (with cur/ and new/), or a directory of mbox files.
        path: PathBuf,
    },
    /// Rebuild every local index (sorts, counters, change log, full-text) from the store.
    /// Run it with the node stopped.
    Reindex {
        #[arg(long, default_value = "data")]
        data_dir: PathBuf,
    },
    /// Read a password on stdin (one line) and print it hashed for the accounts file, as
    /// `doveadm pw -s ARGON2ID` does.
    Passwd {
        /// Print a whole accounts-file line, `NAME:{ARGON2ID}...`.
        #[arg(long)]
        user: Option<String>,
    },
    /// Start three nodes on 127.0.0.1, exercise them, print how fast they converge.
    Demo {
        /// Keep the demo's data directories instead of deleting them.
        #[arg(long)]
        keep: bool,
    },
}

#[derive(clap::Args)]
struct NodeArguments {
    /// TOML configuration file; flags override its keys.
    #[arg(long, env = "MAILMESH_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long)]
    name: Option<String>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Multiaddr to listen on (repeatable), e.g. /ip4/0.0.0.0/tcp/4801.
    #[arg(long)]
    listen: Vec<String>,
    /// HTTP API address, e.g. 127.0.0.1:4800.
    #[arg(long)]
    http: Option<String>,
    /// Peer multiaddr to bootstrap from (repeatable), with or without /p2p/<peer id>.
    #[arg(long)]
    peer: Vec<String>,
    /// Multiaddr peers should dial this node at (repeatable), when the listen address is not
    /// reachable from them: behind NAT, in a container or another namespace.
    #[arg(long)]
    announce: Vec<String>,
    #[arg(long)]
    cluster: Option<String>,
    #[arg(long)]
    gossip_interval_ms: Option<u64>,
    /// A file whose first line is the bearer token every HTTP client must send.
    #[arg(long)]
    http_token_file: Option<PathBuf>,
    /// A Dovecot passwd-file (`user:{SCHEME}hash`) of accounts that may log in with HTTP Basic;
    /// reloaded when it changes.
    #[arg(long)]
    accounts_file: Option<PathBuf>,
    /// PEM certificate chain for HTTPS (with --tls-key-file).
    #[arg(long)]
    tls_cert_file: Option<PathBuf>,
    /// PEM private key for HTTPS (with --tls-cert-file).
    #[arg(long)]
    tls_key_file: Option<PathBuf>,
    /// Accept credentials over plain HTTP from hosts other than loopback.
    #[arg(long)]
    allow_plaintext_auth: bool,
    /// Admit only this peer ID (repeatable); other peers are refused after authentication.
    #[arg(long)]
    allow_peer: Vec<String>,
    /// A file of peer IDs to admit, one per line.
    #[arg(long)]
    allow_peers_file: Option<PathBuf>,
    /// A pre-shared key file (swarm.key format or 64 hex characters): a private network.
    #[arg(long)]
    cluster_key: Option<PathBuf>,
    /// Serve LMTP for an MTA on ADDR: HOST:PORT, or a unix socket path (`/path` or `unix:path`).
    #[arg(long, value_name = "ADDR")]
    lmtp: Option<String>,
    /// Serve IMAP on ADDR (HOST:PORT), with STARTTLS when TLS is configured.
    #[arg(long, value_name = "ADDR")]
    imap: Option<String>,
}

/// glibc gives a thread that finds the allocator busy an arena of its own, up to eight per core,
/// and freed memory stays in those arenas. With the node's tokio, RocksDB and tantivy threads,
/// that raised peak RSS well past what the node holds (the 8-node benchmark at 100,000 messages).
/// Two arenas keep it close. Runs before any thread starts.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn limit_allocator_arenas() {
    // SAFETY: mallopt only sets an allocator parameter; no other thread exists yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_allocator_arenas() {}

fn main() -> anyhow::Result<()> {
    limit_allocator_arenas();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,libp2p_gossipsub=warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.command {
        CommandLine::Node(arguments) => run_node(arguments),
        CommandLine::Status { http, ca_file, json } => status(&http, trust(ca_file.as_deref())?, json),
        CommandLine::Import {
            http,
            ca_file,
            account,
            mailbox,
            token_file,
            workers,
            maildir_date,
            quiet,
            path,
        } => {
            let mut options = mailmesh::import::ImportOptions::new(&http, &account);
            options.trust = trust(ca_file.as_deref())?;
            options.mailbox = mailbox;
            options.workers = workers;
            options.show_progress = !quiet && std::io::IsTerminal::is_terminal(&std::io::stderr());
            if maildir_date == "mtime" {
                options.maildir_date = mailmesh::import::MaildirDate::ModificationTime;
            }
            if let Some(path) = token_file {
                options.token = Some(config::read_token(&path)?);
            }
            // The first Ctrl-C stops reading and lets the appends in flight finish; a second one
            // exits at once (the order of registration matters: the exit is checked first).
            for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                signal_hook::flag::register_conditional_shutdown(signal, 130, options.interrupt.clone())?;
                signal_hook::flag::register(signal, options.interrupt.clone())?;
            }
            import(&options, &path)
        }
        CommandLine::Reindex { data_dir } => reindex(&data_dir),
        CommandLine::Passwd { user } => passwd(user.as_deref()),
        CommandLine::Demo { keep } => {
            let binary = std::env::current_exe().context("locating the mailmesh binary")?;
            mailmesh::demo::run(&binary, keep)
        }
    }
}

fn import(options: &mailmesh::import::ImportOptions, path: &std::path::Path) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let summary = mailmesh::import::import(options, path)?;
    let seconds = started.elapsed().as_secs_f64();
    for mailbox in &summary.mailboxes {
        println!(
            "  {}: {} read, {} new, {} already there, {} failed",
            mailbox.mailbox, mailbox.read, mailbox.imported, mailbox.duplicates, mailbox.failed
        );
    }
    for failure in &summary.failures {
        eprintln!("failed: {failure}");
    }
    if summary.interrupted {
        eprintln!(
            "interrupted: {} messages read were not sent; run the same command again to import the rest",
            summary.unsent
        );
    }
    if summary.keywords_dropped > 0 {
        eprintln!(
            "{} keywords were not valid IMAP keywords and were left off their messages",
            summary.keywords_dropped
        );
    }
    println!(
        "imported {} new messages ({} bytes) into {} mailboxes; {} were already there, {} failed, {} read in {:.1} s ({:.0} messages/s)",
        summary.imported,
        summary.bytes,
        summary.mailboxes.len(),
        summary.duplicates,
        summary.failed,
        summary.read,
        seconds,
        summary.read as f64 / seconds.max(0.001)
    );
    if summary.interrupted {
        std::process::exit(130);
    }
    if summary.failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}

fn trust(ca_file: Option<&std::path::Path>) -> anyhow::Result<mailmesh::api_client::Trust> {
    Ok(match ca_file {
        Some(path) => mailmesh::api_client::Trust::from_ca_file(path)?,
        None => mailmesh::api_client::Trust::default(),
    })
}

fn status(http: &str, trust: mailmesh::api_client::Trust, json: bool) -> anyhow::Result<()> {
    let agent = mailmesh::api_client::agent_trusting(&trust);
    let response = mailmesh::api_client::request(&agent, http, "GET", "/v1/status", &[], None)?;
    if response.status != 200 {
        anyhow::bail!(
            "{http} answered {}: {}",
            response.status,
            String::from_utf8_lossy(&response.body)
        );
    }
    let status = response.json();
    // Rates: two samples of the node's counters one second apart.
    let sample = || -> std::collections::HashMap<&'static str, f64> {
        let text = mailmesh::api_client::request(&agent, http, "GET", "/metrics", &[], None)
            .map(|response| String::from_utf8_lossy(&response.body).into_owned())
            .unwrap_or_default();
        let sum = |name: &str| mailmesh::api_client::metric_sum(&text, name);
        [
            ("gossip_bytes", sum("mailmesh_gossip_bytes_total")),
            ("sync_bytes", sum("mailmesh_sync_bytes_total")),
            ("records_pulled", sum("mailmesh_records_pulled_total")),
            ("sessions", sum("mailmesh_reconcile_sessions_total")),
        ]
        .into_iter()
        .collect()
    };
    let before = sample();
    std::thread::sleep(Duration::from_secs(1));
    let after = sample();
    let rate = |name: &str| (after.get(name).unwrap_or(&0.0) - before.get(name).unwrap_or(&0.0)).max(0.0);
    let mut status = status;
    status["rates_per_second"] = serde_json::json!({
        "gossip_bytes": rate("gossip_bytes"),
        "sync_bytes": rate("sync_bytes"),
        "records_pulled": rate("records_pulled"),
        "sessions": rate("sessions"),
    });
    let peers = status["peers"].as_array().cloned().unwrap_or_default();
    let all_agree = peers.iter().all(|peer| peer["agrees"].as_bool().unwrap_or(false));
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        println!(
            "node     {} ({})",
            status["name"].as_str().unwrap_or("?"),
            status["peer_id"].as_str().unwrap_or("?")
        );
        println!(
            "digest   {}  ({} mailboxes)",
            status["digest"].as_str().unwrap_or("?"),
            status["mailboxes"]
        );
        let rates = &status["rates_per_second"];
        println!(
            "rates    gossip {} B/s, sync {} B/s, {} records pulled/s, {} sessions/s",
            rates["gossip_bytes"], rates["sync_bytes"], rates["records_pulled"], rates["sessions"]
        );
        let divergent = status["divergent"].as_array().cloned().unwrap_or_default();
        if divergent.is_empty() {
            println!("mailboxes: none known to differ from a peer");
        } else {
            println!("mailboxes differing from a peer: {}", divergent.len());
            for entry in divergent.iter().take(50) {
                println!(
                    "  {}/{}  from {}  for {} s",
                    entry["account"].as_str().unwrap_or("?"),
                    entry["mailbox"].as_str().unwrap_or("?"),
                    entry["peer_id"].as_str().unwrap_or("?"),
                    entry["seconds"]
                );
            }
        }
        for announce in status["announce"].as_array().cloned().unwrap_or_default() {
            let verdict = announce["verdict"].as_str().unwrap_or("?");
            let note = match verdict {
                "unconfirmed" => " <- WARNING: no connected peer sees this node at this host; is the announce right?",
                _ => "",
            };
            println!(
                "announce {}  {} ({} peers see this host){note}",
                announce["address"].as_str().unwrap_or("?"),
                verdict,
                announce["seen_by_peers"]
            );
        }
        println!("peers    {}", peers.len());
        for peer in &peers {
            let verdict = if peer["agrees"].as_bool().unwrap_or(false) {
                "agrees".to_owned()
            } else {
                match peer["differs_seconds"].as_u64() {
                    Some(seconds) => format!("DIFFERS for {seconds} s"),
                    None => "DIFFERS (no digest seen yet)".to_owned(),
                }
            };
            println!(
                "  {:<10} {}  connected {:>6} s  {}  last digest {}  {}",
                peer["name"].as_str().unwrap_or("?"),
                peer["peer_id"].as_str().unwrap_or("?"),
                peer["connected_seconds"],
                peer["addresses"]
                    .as_array()
                    .and_then(|list| list.first())
                    .and_then(|a| a.as_str())
                    .unwrap_or("-"),
                peer["last_digest"]
                    .as_str()
                    .map(|digest| &digest[..digest.len().min(16)])
                    .unwrap_or("none yet"),
                verdict
            );
        }
    }
    if !all_agree {
        std::process::exit(1);
    }
    Ok(())
}

fn passwd(user: Option<&str>) -> anyhow::Result<()> {
    if let Some(user) = user {
        if user.is_empty() || user.contains(':') || user.chars().any(|c| c.is_whitespace() || c.is_control()) {
            anyhow::bail!("--user must be non-empty, without ':', whitespace or control characters");
        }
    }
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("reading the password from stdin")?;
    let password = line.strip_suffix('\n').unwrap_or(&line);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        anyhow::bail!("empty password: give it on stdin, e.g. `read -rs p; printf '%s\\n' \"$p\" | mailmesh passwd`");
    }
    let hash = mailmesh::accounts::hash_password(password).map_err(anyhow::Error::msg)?;
    match user {
        Some(user) => println!("{user}:{hash}"),
        None => println!("{hash}"),
    }
    Ok(())
}

fn reindex(data_dir: &std::path::Path) -> anyhow::Result<()> {
    let identity = mailmesh::node::load_or_create_identity(&data_dir.join("identity.key"))?;
    let node = mailmesh::model::NodeId::from_identity(&identity.public().to_peer_id().to_bytes());
    let store_path = data_dir.join("store");
    if !store_path.exists() {
        anyhow::bail!("no store at {}", store_path.display());
    }
    let store = mailmesh::store::Store::open(&store_path, node, Default::default())
        .with_context(|| format!("opening {} (is the node still running?)", store_path.display()))?;
    let started = std::time::Instant::now();
    let records = store.rebuild_local_indexes()?;
    let search = mailmesh::search::SearchIndex::open(&data_dir.join("search"))?;
    search.clear()?;
    let indexed = search.catch_up(&store)?;
    println!(
        "reindexed {records} records ({indexed} live messages in the full-text index) in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn run_node(arguments: NodeArguments) -> anyhow::Result<()> {
    let file = match &arguments.config {
        Some(path) => ConfigFile::load(path)?,
        None => ConfigFile::default(),
    };
    let mut node_config = file.into_node_config()?;
    if let Some(name) = arguments.name {
        node_config.name = name;
    }
    if let Some(data_dir) = arguments.data_dir {
        node_config.data_dir = data_dir;
    }
    if !arguments.listen.is_empty() {
        node_config.listen = config::parse_addresses("listen", &arguments.listen)?;
    }
    if let Some(http) = arguments.http {
        node_config.http = http.parse().with_context(|| format!("--http {http:?}"))?;
    }
    if !arguments.peer.is_empty() {
        node_config
            .peers
            .extend(config::parse_addresses("peer", &arguments.peer)?);
    }
    if !arguments.announce.is_empty() {
        node_config.announce = config::parse_addresses("announce", &arguments.announce)?;
    }
    if let Some(cluster) = arguments.cluster {
        node_config.cluster = cluster;
    }
    if let Some(milliseconds) = arguments.gossip_interval_ms {
        node_config.gossip_interval = Duration::from_millis(milliseconds.max(10));
    }
    if let Some(path) = arguments.http_token_file {
        node_config.http_token = Some(config::read_token(&path)?);
    }
    if let Some(path) = arguments.accounts_file {
        node_config.accounts_file = Some(config::check_accounts_file(&path)?);
    }
    if arguments.tls_cert_file.is_some() {
        node_config.tls_cert_file = arguments.tls_cert_file;
    }
    if arguments.tls_key_file.is_some() {
        node_config.tls_key_file = arguments.tls_key_file;
    }
    if arguments.allow_plaintext_auth {
        node_config.allow_plaintext_auth = true;
    }
    if !arguments.allow_peer.is_empty() {
        config::add_allowed_peers(&mut node_config, &arguments.allow_peer)?;
    }
    if let Some(path) = arguments.allow_peers_file {
        config::add_allowed_peers(&mut node_config, &config::read_peer_list(&path)?)?;
    }
    if let Some(path) = arguments.cluster_key {
        node_config.cluster_key = Some(config::read_cluster_key(&path)?);
    }
    if let Some(address) = arguments.lmtp {
        node_config.lmtp_listen = Some(config::parse_lmtp_address(&address)?);
    }
    if let Some(address) = arguments.imap {
        node_config.imap_listen = Some(config::parse_socket_address("imap_listen", &address)?);
    }
    config::validate(&node_config)?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        let shutdown = async {
            let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("installing the SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
        };
        mailmesh::server::run(node_config, shutdown).await
    })?;
    Ok(())
}
