//! The replication engine: where the store, the network and the reconciliation core meet.
//!
//! It makes no local writes of its own: the mail service ([`crate::service`]) writes through the
//! store's group commit, and the engine follows the store's commit feed. Each local change that
//! became durable is pushed once to every connected peer (small blobs inline), so peers see it
//! within about one network round trip. Pushes are not forwarded; a push lost (a slow feed
//! reader, a peer away) is repaired by anti-entropy. The composition root ([`crate::server`])
//! wires the engine, the service and the HTTP server together.
//! - The node publishes its digest (the directory trie's root) on gossipsub when it changes, and
//!   as a heartbeat every 30 gossip intervals. A peer whose digest has differed for two intervals
//!   gets a reconciliation session: first over the directory trie to find the differing
//!   mailboxes, then over each of those mailboxes' tries (128 at a time, each mailbox in one
//!   session at a time) to find the differing messages. Both sides learn what they lack; each
//!   pulls its own records, then the blobs, and checks every blob against its blake3 hash.
//! - A newly connected peer gets a session at once (started by the lower peer ID), so an empty
//!   node joining later fills up.
//! - In a closed cluster the members' digest reports also move the acknowledged tombstone cut
//!   (see `advance_acknowledged_cut`).
//!
//! Responding is stateless (see [`crate::sync`]); what a responder learns it lacks starts a pull
//! task toward the requester. Requests of one peer are bounded by a token bucket and an in-flight
//! limit; a peer that breaks the protocol is blocked.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use libp2p::{identity, Multiaddr, PeerId};
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tracing::Instrument;

use crate::crdt;
use crate::environment::Environment;
use crate::merkle::{Prefix, TreeView};
use crate::metrics::{DirectionLabel, GossipLabel, NodeMetrics, OutcomeLabel};
use crate::model::{BlobHash, MailboxId, MailboxKey, MessageId, MessageRecord};
use crate::net::{self, NetworkClient, NetworkConfig, NetworkEvent, Topic};
use crate::store::{lock, CommitQueue, Committed, Operation, Origin, Space, Store, StoreError};
use crate::sync::{self, ByteString, Element, Outcome, RecordState, SyncLimits};
use crate::wire::{self, Gossip, MailboxReply, Request, Response, WireError, WireSpace};

mod sketch_reconcile;

/// Everything a node needs to start.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub name: String,
    pub data_dir: PathBuf,
    pub listen: Vec<Multiaddr>,
    pub http: SocketAddr,
    pub peers: Vec<Multiaddr>,
    /// Addresses peers should dial this node at, when the listen addresses are not reachable
    /// from them (`announce`, `--announce`); when set, only these are told to peers.
    pub announce: Vec<Multiaddr>,
    pub cluster: String,
    pub gossip_interval: Duration,
    pub max_message_bytes: u64,
    /// Blobs up to this size travel inside the operation gossip.
    pub inline_blob_bytes: usize,
    pub clock_bound_millis: u64,
    /// Inbound requests a peer may make per second on average, and in a burst.
    pub peer_requests_per_second: f64,
    pub peer_request_burst: f64,
    /// When set, every HTTP request except /healthz and /readyz needs `Authorization: Bearer <token>`.
    pub http_token: Option<String>,
    /// When set, the routes under `/v1/mailboxes/{account}/` take HTTP Basic against this
    /// accounts file (see `accounts`).
    pub accounts_file: Option<PathBuf>,
    /// PEM certificate chain and private key: with both, the HTTP address speaks HTTPS only.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// Accept credentials (Basic, bearer token) over plain HTTP from other hosts than loopback,
    /// e.g. behind a proxy that terminates TLS. Off by default.
    pub allow_plaintext_auth: bool,
    /// Tombstones older than this are collected; a replica out of contact longer is refused.
    pub tombstone_horizon_millis: u64,
    /// Writes are refused with 507 while fewer bytes than this would stay free on the data disk.
    pub min_free_bytes: u64,
    /// When set, only these peers may connect (after noise authentication).
    pub allowed_peers: Option<std::collections::HashSet<PeerId>>,
    /// A libp2p private-network key: only nodes holding it can connect (TCP only).
    pub cluster_key: Option<[u8; 32]>,
    pub max_connections: u32,
    pub max_connections_per_peer: u32,
    /// How long a misbehaving peer stays blocked.
    pub block_duration: Duration,
    /// Frame size limits: requests, responses and gossip messages.
    pub max_request_bytes: usize,
    pub max_response_bytes: usize,
    pub max_gossip_bytes: usize,
    /// The most elements one reconciliation message may carry.
    pub max_sync_elements: usize,
    /// The most records this node sends in one answer (at most the protocol's 2,000); a peer
    /// asking for more gets them in pages.
    pub max_records_per_response: usize,
    /// The most message IDs this node accepts in one fetch (at most the protocol's 4,000), and
    /// the most it asks for at once.
    pub max_ids_per_request: usize,
    /// The largest blob chunk this node sends or asks for (at most the protocol's 4 MiB).
    pub blob_chunk_bytes: u32,
    /// Requests from one peer being answered at once (pulls they cause included); more are
    /// declined until some finish.
    pub max_requests_in_flight_per_peer: usize,
    /// How often the full-text index commits what it was fed (searches commit first anyway).
    pub search_commit_interval: Duration,
    /// Where the LMTP server listens (`lmtp_listen`, `--lmtp`); none when unset.
    pub lmtp_listen: Option<crate::lmtp::ListenAddress>,
    /// LMTP sessions at once (`lmtp_max_connections`); more are answered 421.
    pub lmtp_max_connections: usize,
    /// Recipients in one LMTP transaction (`lmtp_max_recipients`); more get 452.
    pub lmtp_max_recipients: usize,
    /// How long an LMTP read waits for the client (`lmtp_idle_timeout_seconds`).
    pub lmtp_idle_timeout: Duration,
    /// How long one LMTP connection may last in all (`lmtp_session_timeout_seconds`).
    pub lmtp_session_deadline: Duration,
    /// Where the IMAP server listens in the clear, with STARTTLS when TLS is configured
    /// (`imap_listen`, `--imap`), and with implicit TLS (`imaps_listen`); none when unset.
    pub imap_listen: Option<SocketAddr>,
    pub imaps_listen: Option<SocketAddr>,
    /// Accept IMAP logins without TLS from hosts other than loopback (`imap_allow_plaintext`).
    pub imap_allow_plaintext: bool,
    /// IMAP sessions at once, per address and per account (`imap_max_connections...`).
    pub imap_connections: crate::imap::ConnectionLimits,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            name: "mailmesh".into(),
            data_dir: PathBuf::from("data"),
            listen: vec!["/ip4/0.0.0.0/tcp/4801".parse().expect("valid multiaddr")],
            http: SocketAddr::from(([127, 0, 0, 1], 4800)),
            peers: Vec::new(),
            announce: Vec::new(),
            cluster: "default".into(),
            gossip_interval: Duration::from_millis(1000),
            max_message_bytes: 25 * 1024 * 1024,
            inline_blob_bytes: 64 * 1024,
            clock_bound_millis: 2 * 60 * 60 * 1000,
            peer_requests_per_second: 2000.0,
            peer_request_burst: 10000.0,
            http_token: None,
            accounts_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            allow_plaintext_auth: false,
            tombstone_horizon_millis: crate::store::DEFAULT_TOMBSTONE_HORIZON_MILLIS,
            min_free_bytes: 256 * 1024 * 1024,
            allowed_peers: None,
            cluster_key: None,
            max_connections: 256,
            max_connections_per_peer: 2,
            block_duration: Duration::from_secs(600),
            max_request_bytes: 1024 * 1024,
            max_response_bytes: 8 * 1024 * 1024,
            max_gossip_bytes: 256 * 1024,
            max_sync_elements: 50_000,
            max_records_per_response: wire::MAX_RECORDS_PER_RESPONSE,
            max_ids_per_request: wire::MAX_IDS_PER_REQUEST,
            blob_chunk_bytes: wire::MAX_BLOB_CHUNK,
            max_requests_in_flight_per_peer: 256,
            search_commit_interval: Duration::from_secs(5),
            lmtp_listen: None,
            lmtp_max_connections: crate::lmtp::ServerLimits::default().max_connections,
            lmtp_max_recipients: crate::lmtp::ServerLimits::default().session.max_recipients,
            lmtp_idle_timeout: crate::lmtp::ServerLimits::default().idle_timeout,
            lmtp_session_deadline: crate::lmtp::ServerLimits::default().session_deadline,
            imap_listen: None,
            imaps_listen: None,
            imap_allow_plaintext: false,
            imap_connections: crate::imap::ConnectionLimits::default(),
        }
    }
}

/// Why a node operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("network: {0}")]
    Network(#[from] net::NetworkError),
    #[error("peer {peer} answered badly: {reason}")]
    Peer { peer: PeerId, reason: String },
    /// The peer answered within the protocol but declined (rate limit, its own failure, stale).
    #[error("peer {peer} declined: {message}")]
    Refused { peer: PeerId, message: String },
    /// The peer speaks another version of the node-to-node protocol: not its fault, but no sync.
    #[error(
        "peer {peer} speaks protocol version {theirs}, this node speaks {}: run the same mailmesh release on both",
        wire::WIRE_VERSION
    )]
    ProtocolVersion { peer: PeerId, theirs: u8 },
    #[error("identity file {path}: {reason}")]
    Identity { path: PathBuf, reason: String },
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Search(#[from] crate::search::SearchError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// What the node knows of a connected peer.
#[derive(Clone, Debug)]
pub struct PeerState {
    pub connected_since: SystemTime,
    pub name: Option<String>,
    pub last_digest: Option<[u8; 32]>,
    pub last_digest_seen: Option<SystemTime>,
    /// Since when this peer's digest has differed from ours (None while equal).
    pub differs_since: Option<SystemTime>,
    /// The peer says it was away longer than the tombstone horizon.
    pub stale: bool,
    /// The other protocol version the peer was found speaking: refused until it reconnects.
    pub protocol_version: Option<u8>,
}

/// A snapshot of one peer for status pages.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PeerStatus {
    pub peer_id: String,
    pub name: Option<String>,
    pub addresses: Vec<String>,
    pub connected_seconds: u64,
    pub last_digest: Option<String>,
    pub agrees: bool,
    pub differs_seconds: Option<u64>,
    /// The address this peer sees this node at (identify's observed address).
    pub observed_address: Option<String>,
}

/// Whether an `announce` address looks right, judged by the addresses connected peers see
/// this node at: a wrong announce (a typo, a stale NAT address) is seen by no peer.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AnnounceStatus {
    pub address: String,
    /// Connected peers that see this node at the announced host.
    pub seen_by_peers: usize,
    /// `confirmed`, `unconfirmed` (no connected peer sees this node there: check it),
    /// `no peers` (nothing to judge by yet) or `not comparable` (a DNS name).
    pub verdict: &'static str,
}

struct NodeInner {
    config: NodeConfig,
    peer_id: PeerId,
    store: Arc<Store>,
    queue: CommitQueue,
    environment: Arc<dyn Environment>,
    network: NetworkClient,
    metrics: NodeMetrics,
    registry: Mutex<Registry>,
    peers: Mutex<HashMap<PeerId, PeerState>>,
    syncing: Mutex<HashSet<PeerId>>,
    /// Mailboxes being reconciled or pulled right now, with any peer.
    mailboxes_in_sync: Arc<Mutex<HashSet<MailboxId>>>,
    sequence: AtomicU64,
    limits: SyncLimits,
    listen: Mutex<Vec<Multiaddr>>,
    dial_attempts: Mutex<HashMap<PeerId, Instant>>,
    buckets: Mutex<HashMap<PeerId, TokenBucket>>,
    /// Requests (and the pulls they caused) being answered, per peer.
    in_flight: Arc<Mutex<HashMap<PeerId, usize>>>,
    ticks: AtomicU64,
    session_slots: tokio::sync::Semaphore,
    /// Mailboxes found to differ from a peer and not yet reconciled, with the peer and since when.
    divergent: Mutex<HashMap<MailboxKey, (PeerId, SystemTime)>>,
    announce: std::sync::atomic::AtomicBool,
    last_published: Mutex<Option<[u8; 32]>>,
    /// The last digest and clock each member of a closed cluster reported.
    member_reports: Mutex<HashMap<PeerId, ([u8; 32], u64)>>,
    /// This replica was out of contact longer than the tombstone horizon: it must not sync.
    stale: std::sync::atomic::AtomicBool,
    last_contact_written: Mutex<Option<Instant>>,
    /// Sketch cells this node built to answer peers' sketch sessions (bounded, timed out).
    sketch_cache: Mutex<sketch_reconcile::SketchCache>,
    /// Sketch sessions this node may run as the asker at once.
    sketch_slots: tokio::sync::Semaphore,
}

/// A handle on a running node: what the HTTP API and the demo use.
#[derive(Clone)]
pub struct Node {
    inner: Arc<NodeInner>,
}

pub use crate::environment::now_millis;

/// What one reconciliation (of the directory or of one mailbox) cost, for its tracing span.
#[derive(Default, Debug)]
pub struct SessionStats {
    rounds: AtomicU64,
    bytes: AtomicU64,
    records: AtomicU64,
    blobs: AtomicU64,
}

impl SessionStats {
    fn add(counter: &AtomicU64, amount: u64) {
        counter.fetch_add(amount, Ordering::Relaxed);
    }

    fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Mailboxes one session reconciles concurrently.
const MAILBOXES_AT_ONCE: usize = 128;
/// Mailboxes whose first reconciliation round shares one request.
const MAILBOXES_PER_BATCH: usize = 32;
/// A first message longer than this goes alone (it is a large mailbox's top levels).
const BATCHED_MESSAGE_BYTES: usize = 4096;

/// How a node declines a request for load; askers retry these after a pause.
const BUSY_PREFIX: &str = "busy:";
const BUSY_MESSAGE: &str = "busy: too many of your requests in flight; retry later";
const RATE_LIMITED_PREFIX: &str = "rate limited:";
const RATE_LIMITED_MESSAGE: &str = "rate limited: slow down";

/// A mailbox being reconciled; released when this drops.
struct MailboxClaim {
    mailbox: MailboxId,
    claimed: Arc<Mutex<HashSet<MailboxId>>>,
}

impl Drop for MailboxClaim {
    fn drop(&mut self) {
        lock(&self.claimed).remove(&self.mailbox);
    }
}

/// One request of a peer in flight; the count drops when this does.
struct InFlightSlot {
    peer: PeerId,
    counts: Arc<Mutex<HashMap<PeerId, usize>>>,
}

impl Drop for InFlightSlot {
    fn drop(&mut self) {
        let mut counts = lock(&self.counts);
        if let Some(count) = counts.get_mut(&self.peer) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.peer);
            }
        }
    }
}

/// A token bucket: `rate` tokens a second up to `burst`.
#[derive(Clone, Debug)]
struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn take(&mut self, rate: f64, burst: f64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Lower-case hex of some bytes (digests, fingerprints).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Loads the node's ed25519 identity from `path`, creating it on first start.
pub fn load_or_create_identity(path: &Path) -> Result<identity::Keypair, NodeError> {
    let error = |reason: String| NodeError::Identity {
        path: path.to_owned(),
        reason,
    };
    match std::fs::read(path) {
        Ok(bytes) => identity::Keypair::from_protobuf_encoding(&bytes).map_err(|e| error(e.to_string())),
        Err(missing) if missing.kind() == std::io::ErrorKind::NotFound => {
            let keypair = identity::Keypair::generate_ed25519();
            let bytes = keypair.to_protobuf_encoding().map_err(|e| error(e.to_string()))?;
            let temporary = path.with_extension("tmp");
            std::fs::write(&temporary, bytes)?;
            std::fs::rename(&temporary, path)?;
            Ok(keypair)
        }
        Err(other) => Err(error(other.to_string())),
    }
}

/// What the engine is built from (the composition root, [`crate::server`], passes them in).
pub struct EngineParts {
    pub config: NodeConfig,
    pub keypair: identity::Keypair,
    pub store: Arc<Store>,
    pub queue: CommitQueue,
    pub metrics: NodeMetrics,
    /// The registry `metrics` were registered in; the network adds its own.
    pub registry: Registry,
    pub environment: Arc<dyn Environment>,
}

impl Node {
    /// Starts the network, the gossip timer, the tombstone collector and the commit-feed
    /// follower, over a store the composition root opened.
    pub async fn start(parts: EngineParts, stop: watch::Receiver<bool>) -> Result<Node, NodeError> {
        let EngineParts {
            config,
            keypair,
            store,
            queue,
            metrics,
            mut registry,
            environment,
        } = parts;
        let peer_id = keypair.public().to_peer_id();
        let feed = queue.feed();
        let mut network_config = NetworkConfig::new(keypair, config.cluster.clone());
        network_config.listen = config.listen.clone();
        network_config.bootstrap = config.peers.clone();
        network_config.announce = config.announce.clone();
        network_config.peer_book = Some(config.data_dir.join("peers"));
        network_config.max_gossip_bytes = config.max_gossip_bytes.max(config.inline_blob_bytes + 64 * 1024);
        network_config.max_request_bytes = config.max_request_bytes.max(config.inline_blob_bytes + 64 * 1024);
        network_config.max_response_bytes = config.max_response_bytes.max(wire::MAX_BLOB_CHUNK as usize + 64 * 1024);
        // libp2p drops inbound streams past this; our own in-flight limit answers "busy" instead.
        network_config.max_concurrent_streams = config.max_requests_in_flight_per_peer.max(100) * 2;
        network_config.allowed_peers = config.allowed_peers.clone();
        network_config.pre_shared_key = config.cluster_key;
        network_config.max_connections = config.max_connections;
        network_config.max_connections_per_peer = config.max_connections_per_peer;
        let (network, mut events, event_loop) = net::new(network_config, &mut registry)?;
        let mut loop_stop = stop.clone();
        tokio::spawn(event_loop.run(async move {
            stopped(&mut loop_stop).await;
        }));
        let node = Node {
            inner: Arc::new(NodeInner {
                config: config.clone(),
                peer_id,
                store,
                queue,
                environment,
                network,
                metrics,
                registry: Mutex::new(registry),
                peers: Mutex::new(HashMap::new()),
                syncing: Mutex::new(HashSet::new()),
                mailboxes_in_sync: Arc::new(Mutex::new(HashSet::new())),
                sequence: AtomicU64::new(0),
                limits: SyncLimits {
                    max_elements: config.max_sync_elements,
                    ..SyncLimits::default()
                },
                listen: Mutex::new(Vec::new()),
                dial_attempts: Mutex::new(HashMap::new()),
                buckets: Mutex::new(HashMap::new()),
                in_flight: Arc::new(Mutex::new(HashMap::new())),
                ticks: AtomicU64::new(0),
                session_slots: tokio::sync::Semaphore::new(2),
                divergent: Mutex::new(HashMap::new()),
                announce: std::sync::atomic::AtomicBool::new(true),
                last_published: Mutex::new(None),
                member_reports: Mutex::new(HashMap::new()),
                stale: std::sync::atomic::AtomicBool::new(false),
                last_contact_written: Mutex::new(None),
                sketch_cache: Mutex::new(sketch_reconcile::SketchCache::default()),
                sketch_slots: tokio::sync::Semaphore::new(sketch_reconcile::SKETCH_SESSIONS_AT_ONCE),
            }),
        };
        tracing::info!(peer_id = %peer_id, name = %config.name, "node started");
        node.check_staleness()?;

        // Network events.
        let handler = node.clone();
        let mut events_stop = stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    event = events.recv() => match event {
                        Some(event) => handler.on_network_event(event),
                        None => break,
                    },
                    _ = stopped(&mut events_stop) => break,
                }
            }
        });

        // Digest gossip and periodic catch-up.
        let gossiper = node.clone();
        let mut gossip_stop = stop.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(gossiper.inner.config.gossip_interval);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = interval.tick() => gossiper.on_gossip_tick().await,
                    _ = stopped(&mut gossip_stop) => break,
                }
            }
        });

        // Tombstones past the horizon are collected now and then.
        let collector = node.clone();
        let mut collector_stop = stop.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(Duration::from_secs(600));
            loop {
                tokio::select! {
                    _ = interval.tick() => {
                        let store = collector.inner.store.clone();
                        let now = collector.inner.environment.now_millis();
                        let purged = tokio::task::spawn_blocking(move || collect_all_tombstones(&store, now)).await;
                        match purged {
                            Ok(Ok(0)) | Err(_) => {}
                            Ok(Ok(count)) => tracing::info!(count, "collected tombstones past the horizon or the acknowledged cut"),
                            Ok(Err(error)) => tracing::warn!("tombstone collection failed: {error}"),
                        }
                    }
                    _ = stopped(&mut collector_stop) => break,
                }
            }
        });

        // Local writes are pushed to peers once they are durable.
        let pusher = node.clone();
        let mut pusher_stop = stop.clone();
        tokio::spawn(async move {
            let mut feed = feed;
            loop {
                tokio::select! {
                    change = feed.recv() => match change {
                        Ok(change) => pusher.push_committed(change).await,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                            tracing::debug!(missed, "the push follower fell behind; anti-entropy repairs it");
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                    },
                    _ = stopped(&mut pusher_stop) => break,
                }
            }
        });
        Ok(node)
    }

    /// This node's peer ID.
    pub fn peer_id(&self) -> PeerId {
        self.inner.peer_id
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.inner.config.name
    }

    /// The directory trie's root aggregate: its count is the number of mailboxes held here.
    pub fn directory(&self) -> Result<crate::merkle::Aggregate, StoreError> {
        self.inner.store.digest()
    }

    /// Tombstones expunged before this time (ms) are held by every member and may go.
    pub fn acknowledged_before(&self) -> u64 {
        self.inner.store.acknowledged_before()
    }

    /// Whether a reconciliation session is running (background work waits for it).
    pub fn is_reconciling(&self) -> bool {
        !lock(&self.inner.syncing).is_empty()
    }

    /// Whether this replica refuses to sync because it was away longer than the tombstone horizon.
    pub fn is_stale(&self) -> bool {
        self.inner.stale.load(Ordering::Relaxed)
    }

    fn stale_message(&self) -> String {
        let days = self.inner.config.tombstone_horizon_millis / 86_400_000;
        format!(
            "this replica was last in contact with the cluster longer ago than the tombstone horizon ({days} days): \
             it refuses to resynchronise, so mail deleted meanwhile cannot come back. Stop the node, empty its data \
             directory's store (keep identity.key) and start it again to rejoin empty"
        )
    }

    /// Marks the replica stale when its last contact is older than the horizon and it holds data.
    fn check_staleness(&self) -> Result<(), NodeError> {
        let last = self.inner.store.last_contact()?;
        let holds_data = self.inner.store.digest()?.count > 0;
        let age = self.inner.environment.now_millis().saturating_sub(last);
        if last > 0 && holds_data && age > self.inner.config.tombstone_horizon_millis {
            self.inner.stale.store(true, Ordering::Relaxed);
            tracing::error!("{}", self.stale_message());
        }
        Ok(())
    }

    fn record_contact(&self) {
        let Ok(mut written) = self.inner.last_contact_written.lock() else {
            return;
        };
        if written.is_some_and(|at| at.elapsed() < Duration::from_secs(10)) {
            return;
        }
        *written = Some(Instant::now());
        if let Err(error) = self.inner.store.set_last_contact(self.inner.environment.now_millis()) {
            tracing::warn!("could not record the last contact time: {error}");
        }
    }

    /// The configuration.
    pub fn config(&self) -> &NodeConfig {
        &self.inner.config
    }

    /// The metrics.
    pub fn metrics(&self) -> &NodeMetrics {
        &self.inner.metrics
    }

    /// Prometheus text for every registered metric.
    pub fn encode_metrics(&self) -> String {
        if let Ok(work) = self.inner.store.background_work() {
            let metrics = &self.inner.metrics;
            metrics.store_background_jobs.set(work.jobs_running as i64);
            metrics
                .store_pending_compaction_bytes
                .set(work.pending_compaction_bytes.min(i64::MAX as u64) as i64);
        }
        if let Ok(backlog) = self.inner.store.search_backlog() {
            self.inner
                .metrics
                .search_backlog
                .set(backlog.min(i64::MAX as u64) as i64);
        }
        let mut text = String::new();
        if let Ok(registry) = self.inner.registry.lock() {
            let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
        }
        text
    }

    /// The node digest as hex.
    pub fn digest_hex(&self) -> Result<String, StoreError> {
        Ok(hex(&self.inner.store.digest()?.root_hash()))
    }

    /// Listen addresses with the `/p2p/` suffix.
    pub async fn listen_addresses(&self) -> Vec<Multiaddr> {
        let mut addresses = self.inner.network.listen_addresses().await.unwrap_or_default();
        if addresses.is_empty() {
            addresses = self.inner.listen.lock().map(|list| list.clone()).unwrap_or_default();
        }
        addresses
            .into_iter()
            .map(|address| address.with(libp2p::multiaddr::Protocol::P2p(self.inner.peer_id)))
            .collect()
    }

    /// Mailboxes that differ from some peer and are not reconciled yet: key, peer, since when.
    pub fn divergent_mailboxes(&self) -> Vec<(MailboxKey, PeerId, Duration)> {
        let now = SystemTime::now();
        self.inner
            .divergent
            .lock()
            .map(|divergent| {
                divergent
                    .iter()
                    .map(|(key, (peer, since))| (key.clone(), *peer, now.duration_since(*since).unwrap_or_default()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Peers blocked for misbehaving, with the time left.
    pub async fn blocked_peers(&self) -> Vec<(PeerId, Duration)> {
        self.inner.network.blocked_peers().await.unwrap_or_default()
    }

    /// The connected peers and whether each agrees with us.
    /// Each `announce` address with what the connected peers say about it.
    pub fn announce_statuses(&self, peers: &[PeerStatus]) -> Vec<AnnounceStatus> {
        announce_statuses(&self.inner.config.announce, peers)
    }

    pub async fn peer_statuses(&self) -> Vec<PeerStatus> {
        let my_digest = self.inner.store.digest().map(|aggregate| aggregate.root_hash()).ok();
        let infos = self.inner.network.peers().await.unwrap_or_default();
        let states = self.inner.peers.lock().map(|peers| peers.clone()).unwrap_or_default();
        let now = SystemTime::now();
        infos
            .into_iter()
            .map(|info| {
                let state = states.get(&info.peer_id);
                let last_digest = state.and_then(|state| state.last_digest);
                PeerStatus {
                    peer_id: info.peer_id.to_string(),
                    name: state.and_then(|state| state.name.clone()),
                    addresses: info.addresses.iter().map(|address| address.to_string()).collect(),
                    connected_seconds: now
                        .duration_since(info.connected_since)
                        .map(|d| d.as_secs())
                        .unwrap_or(0),
                    last_digest: last_digest.map(|digest| hex(&digest)),
                    agrees: last_digest.is_some() && last_digest == my_digest,
                    differs_seconds: state
                        .and_then(|state| state.differs_since)
                        .and_then(|since| now.duration_since(since).ok())
                        .map(|d| d.as_secs()),
                    observed_address: info.observed_address.as_ref().map(|address| address.to_string()),
                }
            })
            .collect()
    }

    // -----------------------------------------------------------------------------------------
    // Local writes
    // -----------------------------------------------------------------------------------------

    /// Pushes a local change that became durable to every connected peer once, with the
    /// message's bytes inline when it is new and small. Pushes are not forwarded (a gossipsub
    /// mesh delivered each operation to each node several times over); peers that are not
    /// connected to the writer get it through anti-entropy.
    async fn push_committed(&self, change: Committed) {
        if change.origin != Origin::Local {
            return;
        }
        let Committed {
            mailbox,
            record,
            appended,
            ..
        } = change;
        let blob = if appended && record.size <= self.inner.config.inline_blob_bytes as u64 {
            self.inner.store.blob(&record.blob).ok().flatten().map(ByteString)
        } else {
            None
        };
        self.publish_operation(&mailbox, &record, blob).await;
    }

    async fn publish_operation(&self, mailbox: &MailboxKey, record: &MessageRecord, blob: Option<ByteString>) {
        let data = wire::encode(&Request::Push {
            mailbox: mailbox.clone(),
            record: record.clone(),
            blob,
        });
        let peers: Vec<PeerId> = match self.inner.peers.lock() {
            Ok(peers) => peers
                .iter()
                .filter(|(_, state)| !state.stale)
                .map(|(peer, _)| *peer)
                .collect(),
            Err(_) => return,
        };
        let label = GossipLabel {
            kind: "operation",
            direction: "out",
        };
        for peer in peers {
            self.inner.metrics.gossip_messages.get_or_create(&label).inc();
            self.inner
                .metrics
                .gossip_bytes
                .get_or_create(&label)
                .inc_by(data.len() as u64);
            let network = self.inner.network.clone();
            let data = data.clone();
            tokio::spawn(async move {
                match network.request(peer, data).await {
                    Ok(answer) => {
                        if let Ok(Response::Error { message }) = wire::decode::<Response>(&answer) {
                            tracing::debug!(%peer, "peer declined a push: {message}");
                        }
                    }
                    Err(error) => tracing::debug!(%peer, "push failed: {error}"),
                }
            });
        }
    }

    // -----------------------------------------------------------------------------------------
    // Network events
    // -----------------------------------------------------------------------------------------

    fn on_network_event(&self, event: NetworkEvent) {
        match event {
            NetworkEvent::Gossip {
                topic,
                message_id,
                propagation_source,
                author,
                data,
            } => {
                let node = self.clone();
                tokio::spawn(async move {
                    let valid = node.on_gossip(topic, propagation_source, author, &data).await;
                    let _ = node
                        .inner
                        .network
                        .report_validation(message_id, propagation_source, valid)
                        .await;
                });
            }
            NetworkEvent::Request { peer, data, channel } => {
                let slot = if self.admit_request(peer) {
                    self.take_in_flight_slot(peer).ok_or(BUSY_MESSAGE)
                } else {
                    Err(RATE_LIMITED_MESSAGE)
                };
                let slot = match slot {
                    Ok(slot) => slot,
                    Err(message) => {
                        let node = self.clone();
                        tokio::spawn(async move {
                            let refusal = Response::Error {
                                message: message.into(),
                            };
                            let _ = node.inner.network.respond(channel, wire::encode(&refusal)).await;
                        });
                        return;
                    }
                };
                let node = self.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    node.inner
                        .metrics
                        .sync_bytes
                        .get_or_create(&DirectionLabel { direction: "in" })
                        .inc_by(data.len() as u64);
                    let response = node.on_request(peer, &data).await;
                    let encoded = wire::encode(&response);
                    node.inner
                        .metrics
                        .sync_bytes
                        .get_or_create(&DirectionLabel { direction: "out" })
                        .inc_by(encoded.len() as u64);
                    if let Err(error) = node.inner.network.respond(channel, encoded).await {
                        tracing::warn!(%peer, "could not answer a request: {error}");
                    }
                });
            }
            NetworkEvent::PeerConnected(peer) => {
                self.inner.announce.store(true, Ordering::Relaxed);
                if let Ok(mut peers) = self.inner.peers.lock() {
                    peers.entry(peer).or_insert(PeerState {
                        connected_since: SystemTime::now(),
                        name: None,
                        last_digest: None,
                        last_digest_seen: None,
                        differs_since: None,
                        stale: false,
                        protocol_version: None,
                    });
                }
                // A session is two-way (the responder pulls what it learns it lacks), so one side
                // starting it is enough: the one with the lower peer ID. Digests catch the rest.
                if self.inner.peer_id < peer {
                    self.spawn_session(peer);
                }
            }
            NetworkEvent::PeerDisconnected(peer) => {
                if let Ok(mut peers) = self.inner.peers.lock() {
                    peers.remove(&peer);
                }
            }
            NetworkEvent::Listening(address) => {
                if let Ok(mut listen) = self.inner.listen.lock() {
                    listen.push(address);
                }
            }
        }
    }

    /// Whether the peer was found speaking another protocol version (on this connection).
    fn peer_is_incompatible(&self, peer: PeerId) -> bool {
        lock(&self.inner.peers)
            .get(&peer)
            .is_some_and(|state| state.protocol_version.is_some())
    }

    /// Refuses a peer that speaks another protocol version: logged and counted once per
    /// connection, never blamed (it is an operator's upgrade in progress, not an attack), and
    /// not synced with until it reconnects, presumably upgraded.
    fn refuse_protocol_version(&self, peer: PeerId, theirs: u8) {
        let first = match lock(&self.inner.peers).get_mut(&peer) {
            Some(state) => state.protocol_version.replace(theirs) != Some(theirs),
            None => true,
        };
        if first {
            self.inner
                .metrics
                .peers_refused
                .get_or_create(&crate::metrics::ReasonLabel {
                    reason: "protocol_version",
                })
                .inc();
            tracing::warn!(
                %peer,
                theirs,
                ours = wire::WIRE_VERSION,
                "refusing to sync with a peer that speaks another protocol version; run the same mailmesh release on both"
            );
        }
    }

    fn peer_is_stale(&self, peer: PeerId) -> bool {
        self.inner
            .peers
            .lock()
            .map(|peers| peers.get(&peer).is_some_and(|state| state.stale))
            .unwrap_or(false)
    }

    /// Takes a token from the peer's bucket; false (and counted) when it is empty.
    fn admit_request(&self, peer: PeerId) -> bool {
        let (rate, burst) = (
            self.inner.config.peer_requests_per_second,
            self.inner.config.peer_request_burst,
        );
        let now = Instant::now();
        let admitted = match self.inner.buckets.lock() {
            Ok(mut buckets) => buckets
                .entry(peer)
                .or_insert(TokenBucket {
                    tokens: burst,
                    last: now,
                })
                .take(rate, burst, now),
            Err(_) => true,
        };
        if !admitted {
            self.limit_hit("peer_request_rate");
            tracing::debug!(%peer, "request refused: the peer exceeds its request rate");
        }
        admitted
    }

    /// Counts one more request of the peer in flight, or None (counted) when it has too many.
    fn take_in_flight_slot(&self, peer: PeerId) -> Option<InFlightSlot> {
        let limit = self.inner.config.max_requests_in_flight_per_peer;
        let mut in_flight = lock(&self.inner.in_flight);
        let count = in_flight.entry(peer).or_insert(0);
        if *count >= limit {
            drop(in_flight);
            self.limit_hit("peer_requests_in_flight");
            tracing::debug!(%peer, "request declined: the peer has {limit} requests in flight");
            return None;
        }
        *count += 1;
        Some(InFlightSlot {
            peer,
            counts: self.inner.in_flight.clone(),
        })
    }

    /// Marks a mailbox as being reconciled; None when another session already is.
    fn claim_mailbox(&self, mailbox: MailboxId) -> Option<MailboxClaim> {
        let mut claimed = lock(&self.inner.mailboxes_in_sync);
        claimed.insert(mailbox).then(|| MailboxClaim {
            mailbox,
            claimed: self.inner.mailboxes_in_sync.clone(),
        })
    }

    fn limit_hit(&self, limit: &'static str) {
        self.inner
            .metrics
            .limits_hit
            .get_or_create(&crate::metrics::LimitLabel { limit })
            .inc();
    }

    /// Handles one gossip message; `source` forwarded it, `author` signed it. Returns whether it
    /// is valid (and so forwarded on).
    async fn on_gossip(&self, topic: Topic, source: PeerId, author: Option<PeerId>, data: &[u8]) -> bool {
        let gossip: Gossip = match wire::decode(data) {
            Ok(gossip) => gossip,
            Err(WireError::UnsupportedVersion(theirs)) => {
                self.refuse_protocol_version(source, theirs);
                return false;
            }
            Err(error) => {
                tracing::warn!(%source, "refused a gossip message: {error}");
                return false;
            }
        };
        let kind = match gossip {
            Gossip::Operation { .. } => "operation",
            Gossip::Digest { .. } => "digest",
        };
        let label = GossipLabel { kind, direction: "in" };
        self.inner.metrics.gossip_messages.get_or_create(&label).inc();
        self.inner
            .metrics
            .gossip_bytes
            .get_or_create(&label)
            .inc_by(data.len() as u64);
        match (topic, gossip) {
            (Topic::Operations, Gossip::Operation { mailbox, record, blob }) => {
                match self.on_operation(source, mailbox, record, blob).await {
                    Ok(()) => true,
                    Err(error) => {
                        tracing::warn!(%source, "refused an operation: {error}");
                        // Relays validate before forwarding, so bad data came from this peer.
                        if matches!(
                            &error,
                            NodeError::Peer { .. }
                                | NodeError::Store(
                                    StoreError::Clock(_) | StoreError::Merge(_) | StoreError::BlobMismatch { .. }
                                )
                        ) {
                            self.on_peer_failure(source, "gossip", error).await;
                        }
                        false
                    }
                }
            }
            (
                Topic::Digests,
                Gossip::Digest {
                    peer,
                    name,
                    digest,
                    addresses,
                    stale,
                    clock,
                    acknowledged_before,
                    frontier,
                    ..
                },
            ) => {
                let Ok(peer) = peer.parse::<PeerId>() else { return false };
                // A digest speaks for its signer only: a member that could report for another
                // could move the acknowledged tombstone cut in that member's name.
                if author != Some(peer) {
                    if let Some(author) = author {
                        let detail = format!("signed a digest in the name of {peer}");
                        self.penalise(author, "digest_for_another_peer", &detail).await;
                    }
                    return false;
                }
                let Ok(digest) = <[u8; 32]>::try_from(digest.0.as_slice()) else {
                    return false;
                };
                if addresses.len() > 16 || name.len() > 255 {
                    return false;
                }
                let member = self
                    .inner
                    .config
                    .allowed_peers
                    .as_ref()
                    .is_some_and(|members| members.contains(&peer) && peer != self.inner.peer_id);
                if member && clock > 0 {
                    lock(&self.inner.member_reports).insert(peer, (digest, clock));
                    // A member's cut is valid for every member: it is at most every member's
                    // clock, ours included, so one past our clock is refused.
                    if acknowledged_before > self.inner.store.acknowledged_before() {
                        if acknowledged_before <= crdt::millis_of(self.inner.store.clock()) {
                            self.move_acknowledged_cut(acknowledged_before, "a member moved its cut");
                        } else {
                            tracing::warn!(%peer, acknowledged_before, "ignored a tombstone cut ahead of this node's clock");
                        }
                    }
                }
                if let Ok(mut peers) = self.inner.peers.lock() {
                    if let Some(state) = peers.get_mut(&peer) {
                        if stale && !state.stale {
                            tracing::warn!(%peer, "peer reports it is a stale replica (away longer than the tombstone horizon); not syncing with it");
                        }
                        state.stale = stale;
                    }
                }
                if frontier.len() > crate::changes::MAX_TOKEN_ORIGINS {
                    return false;
                }
                let connected = self.on_digest(peer, name, digest, frontier);
                if !connected {
                    self.discover(peer, &addresses);
                }
                true
            }
            _ => false,
        }
    }

    async fn on_operation(
        &self,
        source: PeerId,
        mailbox: MailboxKey,
        record: MessageRecord,
        blob: Option<ByteString>,
    ) -> Result<(), NodeError> {
        if self.is_stale() || self.peer_is_stale(source) {
            return Err(NodeError::Refused {
                peer: source,
                message: "stale replica".into(),
            });
        }
        mailbox.validate().map_err(peer_fault(source))?;
        wire::validate_record(&record).map_err(peer_fault(source))?;
        if let Some(existing) = self.inner.store.record(mailbox.id(), record.id)? {
            if crdt::merge(&existing, &record)
                .map(|merged| merged == existing)
                .unwrap_or(false)
            {
                return Ok(()); // nothing new
            }
        }
        let mut operations = Vec::new();
        if !self.inner.store.has_blob(&record.blob)? {
            let bytes = match blob {
                // Checked here, not only by the store: the store applies each operation on its
                // own, and the record would be merged without the blob it names.
                Some(bytes) => self.check_inline_blob(source, &record, bytes.0)?,
                None => match self.fetch_blob(source, record.blob, &SessionStats::default()).await? {
                    Some(bytes) => bytes,
                    None => return Ok(()), // anti-entropy will bring it with its record later
                },
            };
            operations.push(Operation::PutBlob {
                expected: record.blob,
                bytes,
            });
        }
        self.observe_lag(&record);
        operations.push(Operation::Merge {
            mailbox,
            record,
            now_millis: self.inner.environment.now_millis(),
        });
        self.apply_all(operations).await
    }

    /// The bytes a peer sent inline for `record`, if they are its blob and within the size limit.
    fn check_inline_blob(&self, peer: PeerId, record: &MessageRecord, bytes: Vec<u8>) -> Result<Vec<u8>, NodeError> {
        if BlobHash::of(&bytes) != record.blob {
            self.inner.metrics.blobs_rejected.inc();
            return Err(NodeError::Store(StoreError::BlobMismatch { expected: record.blob }));
        }
        let limit = self.inner.config.max_message_bytes;
        if bytes.len() as u64 > limit {
            return Err(NodeError::Peer {
                peer,
                reason: format!(
                    "blob {} of {} bytes, over the limit of {limit}",
                    record.blob,
                    bytes.len()
                ),
            });
        }
        Ok(bytes)
    }

    fn observe_lag(&self, record: &MessageRecord) {
        let origin_millis = record
            .latest_stamp()
            .map(|stamp| crdt::millis_of(stamp.time))
            .unwrap_or(record.received_millis);
        let lag = self.inner.environment.now_millis().saturating_sub(origin_millis) as f64 / 1000.0;
        self.inner.metrics.replication_lag_seconds.observe(lag);
    }

    async fn apply_all(&self, operations: Vec<Operation>) -> Result<(), NodeError> {
        let submissions: Vec<_> = operations
            .into_iter()
            .map(|operation| self.inner.queue.submit(operation))
            .collect();
        for result in futures::future::join_all(submissions).await {
            result?;
        }
        Ok(())
    }

    /// Dials a peer learned from gossip (at most once every 10 s).
    fn discover(&self, peer: PeerId, addresses: &[String]) {
        if peer == self.inner.peer_id {
            return;
        }
        {
            let Ok(mut attempts) = self.inner.dial_attempts.lock() else {
                return;
            };
            let now = Instant::now();
            if attempts
                .get(&peer)
                .is_some_and(|last| now.duration_since(*last) < Duration::from_secs(10))
            {
                return;
            }
            attempts.insert(peer, now);
        }
        let addresses: Vec<Multiaddr> = addresses
            .iter()
            .filter_map(|text| text.parse::<Multiaddr>().ok())
            .filter(|address| {
                address
                    .iter()
                    .any(|part| matches!(part, libp2p::multiaddr::Protocol::P2p(id) if id == peer))
            })
            .collect();
        let network = self.inner.network.clone();
        tokio::spawn(async move {
            for address in addresses {
                match network.dial(address.clone()).await {
                    Ok(()) => {
                        tracing::info!(%peer, %address, "connected to a peer learned from gossip");
                        return;
                    }
                    Err(error) => tracing::debug!(%peer, %address, "dial failed: {error}"),
                }
            }
        });
    }

    /// Records a peer's digest; returns whether the peer is connected.
    fn on_digest(&self, peer: PeerId, name: String, digest: [u8; 32], frontier: Vec<(u64, u64)>) -> bool {
        if peer == self.inner.peer_id {
            return true;
        }
        let mine = self.inner.store.digest().map(|aggregate| aggregate.root_hash()).ok();
        let differs = Some(digest) != mine;
        let connected = {
            let Ok(mut peers) = self.inner.peers.lock() else {
                return false;
            };
            match peers.get_mut(&peer) {
                Some(state) => {
                    state.name = Some(name);
                    state.last_digest = Some(digest);
                    state.last_digest_seen = Some(SystemTime::now());
                    if differs {
                        state.differs_since.get_or_insert(SystemTime::now());
                    } else {
                        state.differs_since = None;
                    }
                    true
                }
                None => false,
            }
        };
        // Agreeing with a connected peer is contact with the cluster, as is a completed session.
        if !differs && connected && !self.is_stale() {
            self.record_contact();
        }
        // Equal digests: this node holds every change the peer held when it read its frontier,
        // so the change feed may adopt it (see `crate::changes`). Peers are trusted members here
        // as they are for the records they send; no entry goes past this node's clock.
        if !differs && connected && !frontier.is_empty() {
            let frontier = crate::changes::Frontier(
                frontier
                    .into_iter()
                    .map(|(origin, time)| (crate::model::NodeId(origin), time))
                    .collect(),
            );
            if let Err(error) = self.inner.store.adopt_frontier(&frontier) {
                tracing::warn!("could not adopt a peer's change-feed frontier: {error}");
            }
        }
        // A write reaches peers by push within a round trip; only a difference that outlives two
        // gossip intervals is worth a reconciliation session.
        if differs && connected && self.differs_long_enough(peer) {
            self.spawn_session(peer);
        }
        connected
    }

    fn differs_long_enough(&self, peer: PeerId) -> bool {
        let patience = self.inner.config.gossip_interval * 2;
        self.inner
            .peers
            .lock()
            .map(|peers| {
                peers
                    .get(&peer)
                    .and_then(|state| state.differs_since)
                    .and_then(|since| SystemTime::now().duration_since(since).ok())
                    .is_some_and(|elapsed| elapsed >= patience)
            })
            .unwrap_or(false)
    }

    async fn on_gossip_tick(&self) {
        let Ok(digest) = self.inner.store.digest() else { return };
        // Publish when the digest changed, and as a heartbeat every thirtieth tick while idle
        // (gossipsub forwards each digest through the mesh, so idle digests cost N x D sends).
        let tick = self.inner.ticks.fetch_add(1, Ordering::Relaxed);
        let root = digest.root_hash();
        let changed = self
            .inner
            .last_published
            .lock()
            .map(|last| *last != Some(root))
            .unwrap_or(true);
        // New connections get a full announcement (with addresses) at once, for discovery.
        let heartbeat = tick % 30 == 0 || tick < 5 || self.inner.announce.swap(false, Ordering::Relaxed);
        if !changed && !heartbeat {
            self.refresh_agreement(root);
            return;
        }
        // Members of a closed cluster report a clock value taken before the digest is read, so
        // every stamp below it is in the digest they send (see `advance_acknowledged_cut`).
        // The change-feed frontier is read before the digest, so a peer whose digest equals the
        // one sent holds every change the frontier covers.
        let frontier: Vec<(u64, u64)> = match self.inner.store.frontier() {
            Ok(frontier) => frontier.0.iter().map(|(origin, time)| (origin.0, *time)).collect(),
            Err(_) => Vec::new(),
        };
        let clock = match self.inner.config.allowed_peers {
            Some(_) => self
                .inner
                .store
                .clock_report(self.inner.environment.now_millis())
                .unwrap_or(0),
            None => 0,
        };
        let Ok(digest) = self.inner.store.digest() else { return };
        let root = digest.root_hash();
        if let Ok(mut last) = self.inner.last_published.lock() {
            *last = Some(root);
        }
        let gossip = Gossip::Digest {
            peer: self.inner.peer_id.to_string(),
            name: self.inner.config.name.clone(),
            sequence: self.inner.sequence.fetch_add(1, Ordering::Relaxed),
            digest: ByteString(digest.root_hash().to_vec()),
            mailboxes: digest.count,
            // Addresses (for discovery) ride on heartbeats and the first few announcements only.
            addresses: if heartbeat {
                self.listen_addresses()
                    .await
                    .iter()
                    .map(|address| address.to_string())
                    .collect()
            } else {
                Vec::new()
            },
            stale: self.is_stale(),
            clock,
            acknowledged_before: self.inner.store.acknowledged_before(),
            frontier,
        };
        if self.is_stale() && self.inner.sequence.load(Ordering::Relaxed) % 30 == 1 {
            tracing::error!("{}", self.stale_message());
        }
        let data = wire::encode(&gossip);
        let size = data.len() as u64;
        if self.inner.network.publish(Topic::Digests, data).await.is_ok() {
            let label = GossipLabel {
                kind: "digest",
                direction: "out",
            };
            self.inner.metrics.gossip_messages.get_or_create(&label).inc();
            self.inner.metrics.gossip_bytes.get_or_create(&label).inc_by(size);
        }
        self.refresh_agreement(root);
        self.advance_acknowledged_cut(root);
    }

    /// In a closed cluster (an allow list), once every member has reported the digest this node
    /// holds, every tombstone expunged before the smallest clock among those reports and this
    /// node's own is held by every member: no member can still make a stamp below that. The cut
    /// moves there and those tombstones are collected without waiting for the horizon.
    fn advance_acknowledged_cut(&self, mine: [u8; 32]) {
        let Some(members) = &self.inner.config.allowed_peers else {
            return;
        };
        let mut cut = u64::MAX;
        {
            let reports = lock(&self.inner.member_reports);
            for member in members.iter().filter(|member| **member != self.inner.peer_id) {
                match reports.get(member) {
                    Some((digest, clock)) if *digest == mine => cut = cut.min(*clock),
                    _ => return,
                }
            }
        }
        if cut == u64::MAX || crdt::millis_of(cut) <= self.inner.store.acknowledged_before() {
            return; // no other member, or nothing new to acknowledge
        }
        // This node's own report: a clock value no later stamp of ours can go below, taken
        // before the digest is read again, so every stamp below it is in that digest.
        let Ok(own) = self.inner.store.clock_report(self.inner.environment.now_millis()) else {
            return;
        };
        if self.inner.store.digest().map(|digest| digest.root_hash()).ok() != Some(mine) {
            return; // something changed meanwhile; try again next tick
        }
        let cut = cut.min(own);
        self.move_acknowledged_cut(crdt::millis_of(cut), "every member reported the same digest");
    }

    /// Moves the acknowledged cut forward and collects what it covers, in the background.
    fn move_acknowledged_cut(&self, millis: u64, why: &'static str) {
        let store = self.inner.store.clone();
        if millis <= store.acknowledged_before() {
            return;
        }
        let now = self.inner.environment.now_millis();
        tokio::task::spawn_blocking(move || {
            match store.acknowledge_tombstones_before(millis) {
                Ok(true) => {}
                Ok(false) => return,
                Err(error) => {
                    tracing::warn!("could not record the acknowledged tombstone cut: {error}");
                    return;
                }
            }
            match collect_all_tombstones(&store, now) {
                Ok(0) => tracing::debug!(millis, why, "acknowledged tombstone cut moved"),
                Ok(count) => tracing::info!(count, millis, why, "collected tombstones every member holds"),
                Err(error) => tracing::warn!("tombstone collection failed: {error}"),
            }
        });
    }

    /// Keeps agreement figures fresh, and retries peers that stayed divergent.
    fn refresh_agreement(&self, mine: [u8; 32]) {
        let mut agreeing = 0;
        let mut retry = Vec::new();
        if let Ok(mut peers) = self.inner.peers.lock() {
            for (peer, state) in peers.iter_mut() {
                match state.last_digest {
                    Some(theirs) if theirs == mine => {
                        agreeing += 1;
                        state.differs_since = None;
                    }
                    Some(_) => {
                        let since = *state.differs_since.get_or_insert(SystemTime::now());
                        let stale = SystemTime::now().duration_since(since).unwrap_or_default();
                        if stale > self.inner.config.gossip_interval * 5 && stale.as_secs() % 30 == 0 {
                            tracing::warn!(%peer, seconds = stale.as_secs(), "peer still divergent after several gossip intervals");
                        }
                        if stale >= self.inner.config.gossip_interval * 2 {
                            retry.push(*peer);
                        }
                    }
                    None => {}
                }
            }
        }
        self.inner.metrics.peers_agreeing.set(agreeing);
        for peer in retry {
            self.spawn_session(peer);
        }
    }

    // -----------------------------------------------------------------------------------------
    // Answering requests
    // -----------------------------------------------------------------------------------------

    async fn on_request(&self, peer: PeerId, data: &[u8]) -> Response {
        let request: Request = match wire::decode(data) {
            Ok(request) => request,
            Err(WireError::UnsupportedVersion(theirs)) => {
                self.refuse_protocol_version(peer, theirs);
                return Response::Error {
                    message: NodeError::ProtocolVersion { peer, theirs }.to_string(),
                };
            }
            Err(error) => {
                return Response::Error {
                    message: error.to_string(),
                }
            }
        };
        if let Err(error) = wire::validate_request(&request) {
            return Response::Error {
                message: error.to_string(),
            };
        }
        if self.is_stale() {
            return Response::Error {
                message: format!("stale replica: {}", self.stale_message()),
            };
        }
        if self.peer_is_stale(peer) {
            return Response::Error {
                message: "stale replica: you were out of contact longer than the tombstone horizon; rejoin empty"
                    .into(),
            };
        }
        match self.answer(peer, request).await {
            Ok(response) => response,
            Err(error) => Response::Error {
                message: error.to_string(),
            },
        }
    }

    async fn answer(&self, peer: PeerId, request: Request) -> Result<Response, NodeError> {
        let store = &self.inner.store;
        match request {
            Request::Reconcile {
                space: WireSpace::Directory,
                message,
                ..
            } => {
                let incoming = sync::decode(&message.0, &self.inner.limits).map_err(peer_fault(peer))?;
                let (reply, _) = sync::respond(&store.tree(Space::Directory), &incoming, &self.inner.limits)
                    .map_err(peer_fault(peer))?;
                if !self.is_stale() {
                    self.record_contact(); // answering a session is contact with the cluster too
                }
                Ok(Response::Reconcile {
                    message: ByteString(sync::encode(&split_you_lack(reply))),
                    records: Vec::new(),
                    blobs: Vec::new(),
                    states: ByteString::default(),
                    returned: ByteString::default(),
                })
            }
            Request::Reconcile {
                space: WireSpace::Mailbox(key),
                message,
                states,
                returned,
            } => {
                let mut budget = self.inline_budget();
                let reply = self
                    .answer_mailbox(peer, &key, &message.0, &states.0, &returned.0, &mut budget)
                    .await?;
                Ok(Response::Reconcile {
                    message: reply.message,
                    records: reply.records,
                    blobs: reply.blobs,
                    states: reply.states,
                    returned: reply.returned,
                })
            }
            Request::ReconcileMailboxes { mailboxes } => {
                // One inline budget for the whole answer.
                let mut budget = self.inline_budget();
                let mut replies = Vec::with_capacity(mailboxes.len());
                for entry in mailboxes {
                    replies.push(
                        self.answer_mailbox(peer, &entry.mailbox, &entry.message.0, &[], &[], &mut budget)
                            .await?,
                    );
                }
                Ok(Response::ReconciledMailboxes { replies })
            }
            Request::Push { mailbox, record, blob } => {
                let label = GossipLabel {
                    kind: "operation",
                    direction: "in",
                };
                self.inner.metrics.gossip_messages.get_or_create(&label).inc();
                match self.on_operation(peer, mailbox, record, blob).await {
                    Ok(()) => Ok(Response::Ack),
                    // As for gossip: bad data in a push, or in the answer to the blob fetch it
                    // caused, is the pusher's fault.
                    Err(error)
                        if matches!(
                            error,
                            NodeError::Peer { .. }
                                | NodeError::Store(
                                    StoreError::Clock(_) | StoreError::Merge(_) | StoreError::BlobMismatch { .. }
                                )
                        ) =>
                    {
                        let message = error.to_string();
                        self.on_peer_failure(peer, "push", error).await;
                        Ok(Response::Error { message })
                    }
                    Err(error) => Ok(Response::Error {
                        message: error.to_string(),
                    }),
                }
            }
            Request::FetchRecords { mailbox, ids, held } => {
                let config = &self.inner.config;
                let asked = ids.len() + held.len();
                if asked > config.max_ids_per_request {
                    self.limit_hit("ids_per_request");
                    return Ok(Response::Error {
                        message: format!(
                            "too many ids: {asked} in one fetch, this node takes at most {}",
                            config.max_ids_per_request
                        ),
                    });
                }
                let mut records = Vec::with_capacity(asked.min(config.max_records_per_response));
                let mut more = false;
                // First the records the asker lacks entirely, which bring their blobs; then those
                // it holds in another state, which do not.
                let mut with_blobs = 0;
                let wanted = ids
                    .iter()
                    .map(|id| (*id, true))
                    .chain(held.iter().map(|id| (*id, false)));
                for (id, lacking) in wanted {
                    if records.len() >= config.max_records_per_response {
                        self.limit_hit("records_per_response");
                        more = true;
                        break;
                    }
                    if let Some(record) = store.record(mailbox.id(), id)? {
                        records.push(record);
                        with_blobs += usize::from(lacking);
                    }
                }
                let blobs = self.inline_blobs(&records[..with_blobs], self.inline_budget())?;
                Ok(Response::Records { records, more, blobs })
            }
            Request::FetchRange {
                mailbox,
                depth,
                bits,
                after,
                limit,
            } => {
                let prefix = Prefix::from_packed(depth, &bits.0).ok_or_else(|| NodeError::Peer {
                    peer,
                    reason: "bad prefix".into(),
                })?;
                let (low, high) = prefix.bounds();
                let start = match after {
                    Some(after) if after.0 >= high => {
                        return Ok(Response::Records {
                            records: vec![],
                            more: false,
                            blobs: vec![],
                        })
                    }
                    Some(after) => after.0.max(low.saturating_sub(1)) + 1,
                    None => low,
                };
                let mut limit = limit as usize;
                if limit > self.inner.config.max_records_per_response {
                    self.limit_hit("records_per_response");
                    limit = self.inner.config.max_records_per_response;
                }
                let mut records = store.records_in_range(mailbox.id(), MessageId(start), MessageId(high), limit + 1)?;
                let more = records.len() > limit;
                records.truncate(limit);
                let blobs = self.inline_blobs(&records, self.inline_budget())?;
                Ok(Response::Records { records, more, blobs })
            }
            Request::FetchBlob { hash, offset, length } => match store.blob(&hash)? {
                Some(bytes) => {
                    let total = bytes.len() as u64;
                    let length = length.min(self.inner.config.blob_chunk_bytes);
                    let start = offset.min(total) as usize;
                    let end = (offset.saturating_add(u64::from(length))).min(total) as usize;
                    Ok(Response::Blob {
                        bytes: Some(ByteString(bytes[start..end].to_vec())),
                        total,
                    })
                }
                None => Ok(Response::Blob { bytes: None, total: 0 }),
            },
            Request::Sketch { mailbox, salt, message } => self.answer_sketch(peer, &mailbox, &salt.0, &message.0).await,
            Request::SketchSettle {
                mailbox,
                send,
                states,
                you_lack,
            } => {
                self.answer_sketch_settle(peer, &mailbox, send, &states.0, you_lack)
                    .await
            }
            Request::ResolveMailboxes { ids, depth, bits } => {
                let mut keys = Vec::new();
                let mut wanted: Vec<MailboxId> = ids
                    .iter()
                    .filter_map(|id| <[u8; 16]>::try_from(id.0.as_slice()).ok())
                    .map(|bytes| MailboxId(u128::from_be_bytes(bytes)))
                    .collect();
                if ids.is_empty() {
                    if let Some(prefix) = Prefix::from_packed(depth, &bits.0) {
                        let leaves = store.tree(Space::Directory).leaves(prefix, wire::MAX_IDS_PER_REQUEST)?;
                        wanted.extend(leaves.into_iter().map(|(id, _)| MailboxId(id)));
                    }
                }
                for id in wanted {
                    if let Some(entry) = store.mailbox_entry(id)? {
                        keys.push(entry.key);
                    }
                }
                Ok(Response::Mailboxes { keys })
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Sessions and pulls
    // -----------------------------------------------------------------------------------------

    /// Sorts a failed exchange: a peer that broke the protocol or sent bad data is disconnected
    /// and blocked for a while; a network failure is only logged (the next round retries).
    async fn on_peer_failure(&self, peer: PeerId, during: &str, error: NodeError) {
        let reason = match &error {
            NodeError::Peer { .. } => "protocol_violation",
            NodeError::Store(StoreError::Clock(_)) => "stamp_too_far_ahead",
            NodeError::Store(StoreError::Merge(_)) => "conflicting_record",
            NodeError::Store(StoreError::BlobMismatch { .. }) => "blob_hash_mismatch",
            _ => {
                tracing::info!(%peer, "{during} failed: {error}");
                return;
            }
        };
        self.penalise(peer, reason, &error.to_string()).await;
    }

    /// Disconnects a misbehaving peer and keeps it out for the configured time.
    pub async fn penalise(&self, peer: PeerId, reason: &'static str, detail: &str) {
        self.inner
            .metrics
            .peers_penalised
            .get_or_create(&crate::metrics::ReasonLabel { reason })
            .inc();
        let seconds = self.inner.config.block_duration.as_secs();
        tracing::warn!(%peer, reason, seconds, "disconnecting and blocking a misbehaving peer: {detail}");
        if let Err(error) = self
            .inner
            .network
            .block(peer, self.inner.config.block_duration, format!("{reason}: {detail}"))
            .await
        {
            tracing::warn!(%peer, "could not block the peer: {error}");
            let _ = self.inner.network.disconnect(peer).await;
        }
    }

    fn spawn_session(&self, peer: PeerId) {
        if self.is_stale() || self.peer_is_stale(peer) || self.peer_is_incompatible(peer) {
            return;
        }
        {
            let Ok(mut syncing) = self.inner.syncing.lock() else {
                return;
            };
            if !syncing.insert(peer) {
                return; // one session per peer at a time
            }
        }
        let node = self.clone();
        tokio::spawn(async move {
            // Two sessions at a time: a node back from a partition would otherwise pull the same
            // records from every peer at once; the first session brings most, later ones little.
            let _permit = node.inner.session_slots.acquire().await;
            let started = Instant::now();
            let result = node.session(peer).await;
            node.inner
                .metrics
                .reconcile_seconds
                .observe(started.elapsed().as_secs_f64());
            let outcome = match &result {
                Ok(_) => "ok",
                Err(_) => "failed",
            };
            node.inner
                .metrics
                .sessions
                .get_or_create(&OutcomeLabel { outcome })
                .inc();
            match result {
                Ok(mailboxes) => {
                    node.record_contact();
                    tracing::debug!(%peer, mailboxes, ms = started.elapsed().as_millis() as u64, "reconciled")
                }
                Err(error) => node.on_peer_failure(peer, "reconciliation", error).await,
            }
            if let Ok(mut syncing) = node.inner.syncing.lock() {
                syncing.remove(&peer);
            }
        });
    }

    /// Sends a request; an answer declining for load (busy, rate limited) is retried a few
    /// times with growing pauses, so a peer with tighter limits slows a session but never stalls it.
    async fn request(&self, peer: PeerId, request: &Request, stats: &SessionStats) -> Result<Response, NodeError> {
        let mut pause = Duration::from_millis(20);
        for _ in 0..8 {
            match self.request_once(peer, request, stats).await {
                Err(NodeError::Refused { message, .. })
                    if message.starts_with(BUSY_PREFIX) || message.starts_with(RATE_LIMITED_PREFIX) =>
                {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
                other => return other,
            }
        }
        self.request_once(peer, request, stats).await
    }

    async fn request_once(&self, peer: PeerId, request: &Request, stats: &SessionStats) -> Result<Response, NodeError> {
        let data = wire::encode(request);
        self.inner
            .metrics
            .sync_bytes
            .get_or_create(&DirectionLabel { direction: "out" })
            .inc_by(data.len() as u64);
        SessionStats::add(&stats.bytes, data.len() as u64);
        let answer = self.inner.network.request(peer, data).await?;
        self.inner
            .metrics
            .sync_bytes
            .get_or_create(&DirectionLabel { direction: "in" })
            .inc_by(answer.len() as u64);
        SessionStats::add(&stats.bytes, answer.len() as u64);
        match wire::decode::<Response>(&answer) {
            Ok(Response::Error { message }) => Err(NodeError::Refused { peer, message }),
            Ok(response) => Ok(response),
            Err(WireError::UnsupportedVersion(theirs)) => {
                self.refuse_protocol_version(peer, theirs);
                Err(NodeError::ProtocolVersion { peer, theirs })
            }
            Err(error) => Err(NodeError::Peer {
                peer,
                reason: error.to_string(),
            }),
        }
    }

    /// Runs reconciliation of one space with a peer; returns this side's outcome and the
    /// elements it told the peer about (what the peer lacks).
    async fn reconcile<V: TreeView>(
        &self,
        peer: PeerId,
        space: WireSpace,
        view: &V,
        stats: &SessionStats,
    ) -> Result<Reconciled, NodeError> {
        let outgoing = sync::initial(view, &self.inner.limits).map_err(peer_fault(peer))?;
        let next = NextMessage {
            elements: outgoing,
            ..NextMessage::default()
        };
        self.reconcile_from(peer, space, view, next, Reconciled::default(), stats)
            .await
    }

    /// Goes on with a reconciliation from this side's next message.
    async fn reconcile_from<V: TreeView>(
        &self,
        peer: PeerId,
        space: WireSpace,
        view: &V,
        mut next: NextMessage,
        mut done: Reconciled,
        stats: &SessionStats,
    ) -> Result<Reconciled, NodeError> {
        let limits = self.inner.limits;
        let sync_error = peer_fault::<sync::SyncError>(peer);
        for _round in 0..80 {
            if next.elements.is_empty() && next.returned.is_empty() {
                return Ok(done);
            }
            for element in &next.elements {
                match element {
                    Element::YouLack { keys } => done.told.need_keys.extend(keys.iter().copied()),
                    Element::YouLackAll { prefix } => done.told.need_prefixes.push(*prefix),
                    _ => {}
                }
            }
            let mut chunks = chunk_elements(split_you_lack(std::mem::take(&mut next.elements)));
            if chunks.is_empty() {
                chunks.push(Vec::new()); // only merged states to send back
            }
            let mut states = std::mem::take(&mut next.states).into_iter();
            let mut state_keys = std::mem::take(&mut next.state_keys).into_iter();
            let mut returned = std::mem::take(&mut next.returned);
            let mut incoming = Vec::new();
            let mut incoming_states = Vec::new();
            for chunk in chunks {
                self.inner.metrics.session_rounds.inc();
                SessionStats::add(&stats.rounds, 1);
                let bits = differ_bits(&chunk);
                let chunk_states: Vec<RecordState> = states.by_ref().take(bits).collect();
                let chunk_keys: Vec<u128> = state_keys.by_ref().take(bits).collect();
                let request = Request::Reconcile {
                    space: space.clone(),
                    message: ByteString(sync::encode(&chunk)),
                    states: packed_states(&chunk_states),
                    returned: packed_keyed_states(&std::mem::take(&mut returned)),
                };
                match self.request(peer, &request, stats).await? {
                    Response::Reconcile {
                        message,
                        records,
                        blobs,
                        states,
                        returned,
                    } => {
                        let elements = sync::decode(&message.0, &limits).map_err(sync_error)?;
                        accept_delivered(peer, &space, &elements, records, blobs, &mut done)?;
                        if let WireSpace::Mailbox(key) = &space {
                            incoming_states.extend(sync::decode_states(&states.0, &limits).map_err(sync_error)?);
                            // Merged states for ours, by their position among those we sent.
                            let returned = sync::decode_indexed_states(&returned.0, &limits).map_err(sync_error)?;
                            let mut keyed = Vec::with_capacity(returned.len());
                            for (index, state) in returned {
                                let id = usize::try_from(index).ok().and_then(|index| chunk_keys.get(index));
                                let Some(id) = id else {
                                    return Err(NodeError::Peer {
                                        peer,
                                        reason: format!("sent back state {index} of {} sent", chunk_keys.len()),
                                    });
                                };
                                keyed.push((*id, state));
                            }
                            self.merge_states(key, self.returned_states(key, keyed)?, stats).await?;
                        }
                        incoming.extend(elements);
                    }
                    _ => {
                        return Err(NodeError::Peer {
                            peer,
                            reason: "unexpected answer to reconcile".into(),
                        })
                    }
                }
            }
            let (reply, outcome) = sync::respond(view, &incoming, &self.asking_limits()).map_err(sync_error)?;
            next = self
                .after_reply(peer, &space, reply, &outcome, incoming_states, &mut done, stats)
                .await?;
            done.mine.extend(outcome);
        }
        Err(NodeError::Peer {
            peer,
            reason: "reconciliation did not end within 80 rounds".into(),
        })
    }

    /// What follows this side's answer to a message: merges the states that came with it (for its
    /// `Differ` bits), and makes the next message: the reply, this side's states for the reply's
    /// own `Differ` bits, and the merged states that hold more than what came.
    #[allow(clippy::too_many_arguments)]
    async fn after_reply(
        &self,
        peer: PeerId,
        space: &WireSpace,
        reply: Vec<Element>,
        outcome: &Outcome,
        incoming_states: Vec<RecordState>,
        done: &mut Reconciled,
        stats: &SessionStats,
    ) -> Result<NextMessage, NodeError> {
        let WireSpace::Mailbox(key) = space else {
            return Ok(NextMessage {
                elements: reply,
                ..NextMessage::default()
            });
        };
        let (merges, returned) = self.differing_states(peer, key, &outcome.told_differing, incoming_states)?;
        self.merge_states(key, merges, stats).await?;
        done.by_state.extend(
            outcome
                .differing
                .iter()
                .copied()
                .chain(outcome.told_differing.iter().flatten().copied()),
        );
        Ok(NextMessage {
            elements: reply,
            states: self.own_states(key, &outcome.differing)?,
            state_keys: outcome.differing.clone(),
            returned: returned.into_iter().map(|(_, id, state)| (id, state)).collect(),
        })
    }

    /// The limits for this side's own session, where it asks: it finds the differing states
    /// itself where it can, so merged states come back to it by position.
    fn asking_limits(&self) -> SyncLimits {
        SyncLimits {
            asks: true,
            ..self.inner.limits
        }
    }

    /// This side's states of records, for `Differ` bits (a record gone since counts as empty).
    fn own_states(&self, key: &MailboxKey, ids: &[u128]) -> Result<Vec<RecordState>, NodeError> {
        let store = &self.inner.store;
        ids.iter()
            .map(|id| {
                Ok(store
                    .record(key.id(), MessageId(*id))?
                    .map(|record| RecordState::of(&record))
                    .unwrap_or_default())
            })
            .collect()
    }

    /// Pairs the peer's states with the records its `Differ` bits named (`told`, one per bit):
    /// returns the records to merge and, with their positions and IDs, the merged states that hold
    /// more than the peer sent (to send back). A bit whose key is unknown here is skipped; a count that does not
    /// match the bits is the peer's fault.
    #[allow(clippy::type_complexity)]
    fn differing_states(
        &self,
        peer: PeerId,
        key: &MailboxKey,
        told: &[Option<u128>],
        states: Vec<RecordState>,
    ) -> Result<(Vec<MessageRecord>, Vec<(u64, u128, RecordState)>), NodeError> {
        if told.len() != states.len() {
            return Err(NodeError::Peer {
                peer,
                reason: format!(
                    "sent {} record states for {} differing leaves",
                    states.len(),
                    told.len()
                ),
            });
        }
        let mut merges = Vec::new();
        let mut returned = Vec::new();
        for (index, (id, state)) in told.iter().zip(states).enumerate() {
            let Some(id) = id else { continue };
            let Some(mine) = self.inner.store.record(key.id(), MessageId(*id))? else {
                continue;
            };
            let (merged, back) = sync::merge_state(&mine, &state);
            if merged != mine {
                merges.push(state.applied_to(&mine));
            }
            if let Some(back) = back {
                returned.push((index as u64, *id, back));
            }
        }
        Ok((merges, returned))
    }

    /// The records to merge for states a peer sent back (states of records this side does not
    /// hold are ignored: they name nothing it sent).
    fn returned_states(
        &self,
        key: &MailboxKey,
        returned: Vec<(u128, RecordState)>,
    ) -> Result<Vec<MessageRecord>, NodeError> {
        let mut merges = Vec::new();
        for (id, state) in returned {
            if let Some(mine) = self.inner.store.record(key.id(), MessageId(id))? {
                if sync::merge_state(&mine, &state).0 != mine {
                    merges.push(state.applied_to(&mine));
                }
            }
        }
        Ok(merges)
    }

    /// Merges records built from a peer's states (their messages' bytes are already here).
    async fn merge_states(
        &self,
        key: &MailboxKey,
        records: Vec<MessageRecord>,
        stats: &SessionStats,
    ) -> Result<(), NodeError> {
        if records.is_empty() {
            return Ok(());
        }
        let count = records.len() as u64;
        let operations = records
            .into_iter()
            .map(|record| {
                self.observe_lag(&record);
                Operation::Merge {
                    mailbox: key.clone(),
                    record,
                    now_millis: self.inner.environment.now_millis(),
                }
            })
            .collect();
        self.apply_all(operations).await?;
        self.inner.metrics.records_pulled.inc_by(count);
        SessionStats::add(&stats.records, count);
        Ok(())
    }

    /// Directory first, then each differing mailbox. Returns how many mailboxes differed.
    async fn session(&self, peer: PeerId) -> Result<usize, NodeError> {
        let store = self.inner.store.clone();
        let stats = &SessionStats::default();
        let started = Instant::now();
        let Reconciled { mut mine, mut told, .. } = self
            .reconcile(peer, WireSpace::Directory, &store.tree(Space::Directory), stats)
            .await?;
        tracing::debug!(
            %peer,
            ms = started.elapsed().as_millis() as u64,
            rounds = SessionStats::get(&stats.rounds),
            bytes = SessionStats::get(&stats.bytes),
            "directory reconciled"
        );
        mine.normalize();
        told.normalize();
        let mut keys: BTreeSet<MailboxKey> = BTreeSet::new();
        let mut unknown: Vec<ByteString> = Vec::new();
        for id in mine.need_keys.iter().chain(&told.need_keys) {
            match store.mailbox_entry(MailboxId(*id))? {
                Some(entry) => {
                    keys.insert(entry.key);
                }
                None => unknown.push(ByteString(id.to_be_bytes().to_vec())),
            }
        }
        // The peer names the mailboxes this side does not know: listed IDs, and whole subtrees
        // this side lacks, 64 requests at a time. One after the other they cost a round trip
        // each, which came to 15 s over a 100 ms link after a partition.
        use futures::stream::StreamExt;
        let by_id = unknown
            .chunks(wire::MAX_IDS_PER_REQUEST)
            .map(|chunk| Request::ResolveMailboxes {
                ids: chunk.to_vec(),
                depth: 0,
                bits: ByteString(vec![]),
            });
        let by_prefix = mine.need_prefixes.iter().map(|prefix| Request::ResolveMailboxes {
            ids: vec![],
            depth: prefix.depth(),
            bits: ByteString(prefix.packed_bits()),
        });
        let requests: Vec<Request> = by_id.chain(by_prefix).collect();
        let mut queue = requests.iter();
        let mut resolutions = futures::stream::FuturesUnordered::new();
        for request in queue.by_ref().take(64) {
            resolutions.push(self.request(peer, request, stats));
        }
        while let Some(answer) = resolutions.next().await {
            if let Response::Mailboxes { keys: resolved } = answer? {
                keys.extend(resolved.into_iter().filter(|key| key.validate().is_ok()));
            }
            if let Some(request) = queue.next() {
                resolutions.push(self.request(peer, request, stats));
            }
        }
        for prefix in &told.need_prefixes {
            for (id, _) in store.tree(Space::Directory).leaves(*prefix, usize::MAX)? {
                if let Some(entry) = store.mailbox_entry(MailboxId(id))? {
                    keys.insert(entry.key);
                }
            }
        }
        tracing::debug!(%peer, ms = started.elapsed().as_millis() as u64, mailboxes = keys.len(), "differing mailboxes named");
        self.inner.metrics.mailboxes_divergent.inc_by(keys.len() as u64);
        if let Ok(mut divergent) = self.inner.divergent.lock() {
            for key in &keys {
                divergent.entry(key.clone()).or_insert((peer, SystemTime::now()));
            }
        }
        // Mailboxes are reconciled 128 at a time: each takes a few round trips (four over a
        // 100 ms link), and after a partition hundreds or thousands may differ.
        // Their first rounds go in batches.
        let batches: Vec<Vec<MailboxKey>> = keys
            .iter()
            .cloned()
            .collect::<Vec<_>>()
            .chunks(wire::MAX_MAILBOXES_PER_BATCH.min(MAILBOXES_PER_BATCH))
            .map(|chunk| chunk.to_vec())
            .collect();
        let mut pending = futures::stream::FuturesUnordered::new();
        let mut remaining = batches.into_iter();
        for batch in remaining.by_ref().take(MAILBOXES_AT_ONCE / MAILBOXES_PER_BATCH) {
            pending.push(self.sync_mailboxes(peer, batch));
        }
        while let Some(result) = pending.next().await {
            result?;
            if let Some(batch) = remaining.next() {
                pending.push(self.sync_mailboxes(peer, batch));
            }
        }
        Ok(keys.len())
    }

    /// Reconciles one mailbox with a peer and pulls what this side lacks.
    async fn sync_mailbox(&self, peer: PeerId, key: MailboxKey) -> Result<(), NodeError> {
        // A node back from a partition is in sessions with several peers at once, each naming
        // the same differing mailboxes; one at a time per mailbox, or they all pull the same
        // records. A skipped mailbox still differs afterwards if the other peer lacked something,
        // and the next session takes it.
        let Some(_claim) = self.claim_mailbox(key.id()) else {
            tracing::debug!(%peer, mailbox = key.mailbox(), "skipped: another session is reconciling this mailbox");
            return Ok(());
        };
        self.reconcile_mailbox(peer, &key, None).await
    }

    /// Reconciles small mailboxes with a peer, their first round in one request: after a
    /// partition thousands differ, most settled by that one reply. Larger first messages go
    /// one mailbox at a time.
    async fn sync_mailboxes(&self, peer: PeerId, keys: Vec<MailboxKey>) -> Result<(), NodeError> {
        let store = &self.inner.store;
        let limits = self.inner.limits;
        let mut batch = Vec::new();
        let mut alone = Vec::new();
        for key in keys {
            // Named as differing by this session, and reconciled by another one since: after a
            // partition the peers of one side hold the same, so once is enough. If this peer
            // holds more, the digests still differ and a later session takes the mailbox.
            if !lock(&self.inner.divergent).contains_key(&key) {
                continue;
            }
            let Some(claim) = self.claim_mailbox(key.id()) else {
                tracing::debug!(%peer, mailbox = key.mailbox(), "skipped: another session is reconciling this mailbox");
                continue;
            };
            let first = sync::initial(&store.tree(Space::Mailbox(key.id())), &limits).map_err(peer_fault(peer))?;
            let message = sync::encode(&first);
            // A large mailbox opens alone, with a sketch session when its size suits one.
            if message.len() > BATCHED_MESSAGE_BYTES || self.opens_with_sketch(&key)? {
                drop(claim);
                alone.push(key);
                continue;
            }
            batch.push((key, claim, message));
        }
        let stats = SessionStats::default();
        let replies = if batch.is_empty() {
            Vec::new()
        } else {
            self.inner.metrics.session_rounds.inc();
            let request = Request::ReconcileMailboxes {
                mailboxes: batch
                    .iter()
                    .map(|(key, _, message)| wire::MailboxMessage {
                        mailbox: key.clone(),
                        message: ByteString(message.clone()),
                    })
                    .collect(),
            };
            match self.request(peer, &request, &stats).await? {
                Response::ReconciledMailboxes { replies } if replies.len() == batch.len() => replies,
                _ => {
                    return Err(NodeError::Peer {
                        peer,
                        reason: "unexpected answer to a batch of mailboxes".into(),
                    })
                }
            }
        };
        let mut answered = Vec::with_capacity(batch.len());
        for ((key, claim, _), reply) in batch.into_iter().zip(replies) {
            let elements = sync::decode(&reply.message.0, &limits).map_err(peer_fault(peer))?;
            let states = sync::decode_states(&reply.states.0, &limits).map_err(peer_fault(peer))?;
            let mut done = Reconciled::default();
            let space = WireSpace::Mailbox(key.clone());
            accept_delivered(peer, &space, &elements, reply.records, reply.blobs, &mut done)?;
            answered.push((key, claim, FirstReply { elements, states, done }));
        }
        let finishing = answered.into_iter().map(|(key, claim, first)| async move {
            let _claim = claim;
            self.reconcile_mailbox(peer, &key, Some(first)).await
        });
        for result in futures::future::join_all(finishing).await {
            result?;
        }
        for key in alone {
            self.sync_mailbox(peer, key).await?;
        }
        Ok(())
    }

    /// Reconciles a claimed mailbox (from its peer's first reply, when a batch brought it),
    /// then merges what came with the replies and pulls the rest.
    async fn reconcile_mailbox(
        &self,
        peer: PeerId,
        key: &MailboxKey,
        first_reply: Option<FirstReply>,
    ) -> Result<(), NodeError> {
        let span = tracing::info_span!(
            "reconcile",
            %peer,
            account = key.account(),
            mailbox = key.mailbox(),
            rounds = tracing::field::Empty,
            bytes = tracing::field::Empty,
            records = tracing::field::Empty,
            blobs = tracing::field::Empty,
        );
        let started = Instant::now();
        let stats = SessionStats::default();
        let result = async {
            let view = self.inner.store.tree(Space::Mailbox(key.id()));
            let space = WireSpace::Mailbox(key.clone());
            let done = match first_reply {
                None if self.opens_with_sketch(key)? => self.reconcile_by_sketch(peer, key, &view, &stats).await?,
                None => self.reconcile(peer, space, &view, &stats).await?,
                Some(first) => self.continue_first_reply(peer, space, &view, first, &stats).await?,
            };
            self.finish_mailbox(peer, key, done, &stats).await
        }
        .instrument(span.clone())
        .await;
        span.record("rounds", SessionStats::get(&stats.rounds));
        span.record("bytes", SessionStats::get(&stats.bytes));
        span.record("records", SessionStats::get(&stats.records));
        span.record("blobs", SessionStats::get(&stats.blobs));
        let _entered = span.enter();
        match &result {
            Ok(()) => {
                if let Ok(mut divergent) = self.inner.divergent.lock() {
                    divergent.remove(key);
                }
                tracing::debug!(ms = started.elapsed().as_millis() as u64, "mailbox reconciled")
            }
            Err(error) => tracing::info!("mailbox reconciliation failed: {error}"),
        }
        result
    }

    /// Goes on with a mailbox's reconciliation from the peer's reply to its first message.
    async fn continue_first_reply<V: TreeView>(
        &self,
        peer: PeerId,
        space: WireSpace,
        view: &V,
        first: FirstReply,
        stats: &SessionStats,
    ) -> Result<Reconciled, NodeError> {
        let FirstReply {
            elements,
            states,
            mut done,
        } = first;
        let (reply, outcome) = sync::respond(view, &elements, &self.asking_limits()).map_err(peer_fault(peer))?;
        let next = self
            .after_reply(peer, &space, reply, &outcome, states, &mut done, stats)
            .await?;
        done.mine.extend(outcome);
        self.reconcile_from(peer, space, view, next, done, stats).await
    }

    /// Merges the records that came with the replies, then pulls what is still lacking.
    async fn finish_mailbox(
        &self,
        peer: PeerId,
        key: &MailboxKey,
        done: Reconciled,
        stats: &SessionStats,
    ) -> Result<(), NodeError> {
        let mut outcome = done.mine;
        // Records held on both sides in different states were settled by their states.
        outcome.need_keys.retain(|id| !done.by_state.contains(id));
        if !done.delivered.is_empty() {
            let sent: HashSet<u128> = done.delivered.iter().map(|record| record.id.0).collect();
            outcome.need_keys.retain(|id| !sent.contains(id));
            self.merge_pulled(peer, key, done.delivered, done.delivered_blobs, stats)
                .await?;
        }
        self.pull(peer, key, outcome, stats).await
    }

    /// Pulls the records (and then the blobs) this side lacks from a peer, and merges them.
    async fn pull(
        &self,
        peer: PeerId,
        mailbox: &MailboxKey,
        mut outcome: Outcome,
        stats: &SessionStats,
    ) -> Result<(), NodeError> {
        outcome.normalize();
        let per_fetch = self.inner.config.max_ids_per_request.min(1000);
        for chunk in outcome.need_keys.chunks(per_fetch) {
            let mut wanted: Vec<u128> = chunk.to_vec();
            while !wanted.is_empty() {
                // Records this side holds in another state come without their blobs.
                let (mut ids, mut held) = (Vec::new(), Vec::new());
                for key in &wanted {
                    let holds = self.inner.store.record(mailbox.id(), MessageId(*key))?.is_some();
                    if holds { &mut held } else { &mut ids }.push(MessageId(*key));
                }
                let request = Request::FetchRecords {
                    mailbox: mailbox.clone(),
                    ids,
                    held,
                };
                let Response::Records {
                    records: fetched,
                    blobs,
                    more,
                } = self.request(peer, &request, stats).await?
                else {
                    break;
                };
                let asked: HashSet<u128> = wanted.iter().copied().collect();
                if fetched.len() > wanted.len() || fetched.iter().any(|record| !asked.contains(&record.id.0)) {
                    return Err(NodeError::Peer {
                        peer,
                        reason: "sent records that were not asked for".into(),
                    });
                }
                if more && fetched.is_empty() {
                    return Err(NodeError::Peer {
                        peer,
                        reason: "said more records follow but sent none".into(),
                    });
                }
                // A peer capping its answers says `more`: ask again for what it has not sent.
                let sent: HashSet<u128> = fetched.iter().map(|record| record.id.0).collect();
                wanted.retain(|key| !sent.contains(key));
                self.merge_pulled(peer, mailbox, fetched, blobs, stats).await?;
                if !more {
                    break;
                }
            }
        }
        for prefix in &outcome.need_prefixes {
            let mut after: Option<MessageId> = None;
            loop {
                let request = Request::FetchRange {
                    mailbox: mailbox.clone(),
                    depth: prefix.depth(),
                    bits: ByteString(prefix.packed_bits()),
                    after,
                    limit: 1000,
                };
                let Response::Records {
                    records: fetched,
                    more,
                    blobs,
                } = self.request(peer, &request, stats).await?
                else {
                    return Err(NodeError::Peer {
                        peer,
                        reason: "unexpected answer to a range fetch".into(),
                    });
                };
                let last = fetched.last().map(|record| record.id);
                let sorted = fetched.windows(2).all(|pair| pair[0].id < pair[1].id);
                if fetched.len() > 1000
                    || !sorted
                    || fetched
                        .iter()
                        .any(|record| !prefix.contains(record.id.0) || Some(record.id) <= after)
                {
                    return Err(NodeError::Peer {
                        peer,
                        reason: "range fetch returned too many, unsorted or out-of-range records".into(),
                    });
                }
                self.merge_pulled(peer, mailbox, fetched, blobs, stats).await?;
                match (more, last) {
                    (true, Some(last)) => after = Some(last),
                    _ => break,
                }
            }
        }
        Ok(())
    }

    /// Fetches missing blobs for `records`, then merges blobs and records in one go.
    async fn merge_pulled(
        &self,
        peer: PeerId,
        mailbox: &MailboxKey,
        records: Vec<MessageRecord>,
        inline: Vec<ByteString>,
        stats: &SessionStats,
    ) -> Result<(), NodeError> {
        let store = &self.inner.store;
        let mut operations = Vec::new();
        // Inline blobs are keyed by their own hash: one that no record names is simply unused.
        let mut inline: HashMap<BlobHash, Vec<u8>> = inline
            .into_iter()
            .map(|bytes| (BlobHash::of(&bytes.0), bytes.0))
            .collect();
        // A responder sends only the blobs of the records it sends: bytes that none of them
        // names are wrong bytes.
        let named: HashSet<BlobHash> = records.iter().map(|record| record.blob).collect();
        if inline.keys().any(|hash| !named.contains(hash)) {
            self.inner.metrics.blobs_rejected.inc();
            return Err(NodeError::Peer {
                peer,
                reason: "sent a blob that none of its records names: its bytes do not match their hash".into(),
            });
        }
        let mut fetched_blobs: HashSet<BlobHash> = HashSet::new();
        let mut blob_fetches = Vec::new();
        let mut merged_count = 0u64;
        for record in &records {
            wire::validate_record(record).map_err(peer_fault(peer))?;
            if !store.has_blob(&record.blob)? && fetched_blobs.insert(record.blob) {
                match inline.remove(&record.blob) {
                    Some(bytes) => {
                        operations.push(Operation::PutBlob {
                            expected: record.blob,
                            bytes: self.check_inline_blob(peer, record, bytes)?,
                        });
                        self.inner.metrics.blobs_pulled.inc();
                        SessionStats::add(&stats.blobs, 1);
                    }
                    None => blob_fetches.push(record.blob),
                }
            }
        }
        let mut unavailable: HashSet<BlobHash> = HashSet::new();
        for chunk in blob_fetches.chunks(16) {
            let answers = futures::future::join_all(chunk.iter().map(|hash| self.fetch_blob(peer, *hash, stats))).await;
            for (hash, answer) in chunk.iter().zip(answers) {
                match answer? {
                    Some(bytes) => {
                        operations.push(Operation::PutBlob { expected: *hash, bytes });
                        self.inner.metrics.blobs_pulled.inc();
                        SessionStats::add(&stats.blobs, 1);
                    }
                    None => {
                        unavailable.insert(*hash);
                    }
                }
            }
        }
        // A record is merged only with its blob, so no listed message lacks its bytes; one whose
        // blob the peer could not give stays different and is retried by a later session.
        for record in records.into_iter().filter(|record| !unavailable.contains(&record.blob)) {
            self.observe_lag(&record);
            merged_count += 1;
            operations.push(Operation::Merge {
                mailbox: mailbox.clone(),
                record,
                now_millis: self.inner.environment.now_millis(),
            });
        }
        self.apply_all(operations).await?;
        self.inner.metrics.records_pulled.inc_by(merged_count);
        SessionStats::add(&stats.records, merged_count);
        Ok(())
    }

    /// Answers one mailbox's reconciliation message. The reply carries the records it says the
    /// asker lacks (at most 256, their small blobs within `budget`, which it reduces), so most
    /// differing mailboxes need no fetch after it; records both sides hold in different states go
    /// as states only, both ways (the asker's came with the message and are merged here first);
    /// what the asker holds and this side lacks is pulled in the background.
    async fn answer_mailbox(
        &self,
        peer: PeerId,
        key: &MailboxKey,
        message: &[u8],
        states: &[u8],
        returned: &[u8],
        budget: &mut u64,
    ) -> Result<MailboxReply, NodeError> {
        let store = &self.inner.store;
        let limits = &self.inner.limits;
        let peer_error = peer_fault::<sync::SyncError>(peer);
        let incoming = sync::decode(message, limits).map_err(peer_error)?;
        let incoming_states = sync::decode_states(states, limits).map_err(peer_error)?;
        let returned = sync::decode_keyed_states(returned, limits).map_err(peer_error)?;
        let (reply, mut outcome) =
            sync::respond(&store.tree(Space::Mailbox(key.id())), &incoming, limits).map_err(peer_error)?;
        if !self.is_stale() {
            self.record_contact(); // answering a session is contact with the cluster too
        }
        let stats = SessionStats::default();
        let mut merges = self.returned_states(key, returned)?;
        let (differing, back) = self.differing_states(peer, key, &outcome.told_differing, incoming_states)?;
        merges.extend(differing);
        self.merge_states(key, merges, &stats).await?;
        let reply_states = self.own_states(key, &outcome.differing)?;
        let by_state: HashSet<u128> = outcome
            .differing
            .iter()
            .copied()
            .chain(outcome.told_differing.iter().flatten().copied())
            .collect();
        outcome.need_keys.retain(|id| !by_state.contains(id));
        let reply = split_you_lack(reply);
        let message = sync::encode(&reply);
        *budget = budget.saturating_sub(message.len() as u64);
        let mut records = Vec::new();
        let mut blobs = Vec::new();
        if *budget >= 64 * 1024 {
            let limit = self.inner.config.max_records_per_response.min(256);
            // `YouLack` names only records the asker does not hold at all: they bring their bytes.
            let keys = reply.iter().flat_map(|element| match element {
                Element::YouLack { keys } => keys.as_slice(),
                _ => &[],
            });
            for id in keys.take(limit) {
                if let Some(record) = store.record(key.id(), MessageId(*id))? {
                    records.push(record);
                }
            }
            blobs = self.inline_blobs(&records, *budget)?;
            *budget = budget.saturating_sub(blobs.iter().map(|blob| blob.0.len() as u64).sum::<u64>());
        }
        self.spawn_pull(peer, key, outcome);
        Ok(MailboxReply {
            message: ByteString(message),
            records,
            blobs,
            states: packed_states(&reply_states),
            returned: packed_indexed_states(&back),
        })
    }

    /// Pulls in the background what a responder learned it lacks from the asker, within the
    /// peer's in-flight allowance and unless another session is on this mailbox (a pull skipped
    /// now is found again by the next session).
    fn spawn_pull(&self, peer: PeerId, key: &MailboxKey, outcome: Outcome) {
        if outcome.is_empty() {
            return;
        }
        if let (Some(slot), Some(claim)) = (self.take_in_flight_slot(peer), self.claim_mailbox(key.id())) {
            let node = self.clone();
            let key = key.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let _claim = claim;
                if let Err(error) = node.pull(peer, &key, outcome, &SessionStats::default()).await {
                    node.on_peer_failure(peer, "pull", error).await;
                }
            });
        }
    }

    /// Bytes of blobs one answer may carry inline: 4 MiB, or half the answer limit if smaller.
    fn inline_budget(&self) -> u64 {
        (self.inner.config.max_response_bytes as u64 / 2).min(4 * 1024 * 1024)
    }

    /// The blobs of small live records, up to `budget` bytes in all, to travel with them. Only
    /// for records the asker lacks entirely: one it holds in another state needs no bytes.
    fn inline_blobs<'a>(
        &self,
        records: impl IntoIterator<Item = &'a MessageRecord>,
        mut budget: u64,
    ) -> Result<Vec<ByteString>, NodeError> {
        let mut blobs = Vec::new();
        let limit = self.inner.config.inline_blob_bytes as u64;
        for record in records {
            if !record.is_live() || record.size > limit || record.size > budget {
                continue;
            }
            if let Some(bytes) = self.inner.store.blob(&record.blob)? {
                budget -= bytes.len() as u64;
                blobs.push(ByteString(bytes));
            }
        }
        Ok(blobs)
    }

    /// Fetches one blob (in chunks when large) and checks its hash; a peer that sends wrong
    /// bytes is disconnected.
    async fn fetch_blob(
        &self,
        peer: PeerId,
        hash: BlobHash,
        stats: &SessionStats,
    ) -> Result<Option<Vec<u8>>, NodeError> {
        let mut bytes: Vec<u8> = Vec::new();
        loop {
            let request = Request::FetchBlob {
                hash,
                offset: bytes.len() as u64,
                length: self.inner.config.blob_chunk_bytes,
            };
            match self.request(peer, &request, stats).await? {
                Response::Blob {
                    bytes: Some(chunk),
                    total,
                } => {
                    if total > self.inner.config.max_message_bytes {
                        return Err(NodeError::Peer {
                            peer,
                            reason: format!("blob {hash} claims {total} bytes, over the limit"),
                        });
                    }
                    if chunk.0.is_empty() && (bytes.len() as u64) < total {
                        return Err(NodeError::Peer {
                            peer,
                            reason: format!("blob {hash} stopped short"),
                        });
                    }
                    bytes.extend_from_slice(&chunk.0);
                    if bytes.len() as u64 >= total {
                        break;
                    }
                }
                Response::Blob { bytes: None, .. } => return Ok(None),
                _ => {
                    return Err(NodeError::Peer {
                        peer,
                        reason: "unexpected answer to a blob fetch".into(),
                    })
                }
            }
        }
        if BlobHash::of(&bytes) != hash {
            self.inner.metrics.blobs_rejected.inc();
            return Err(NodeError::Store(StoreError::BlobMismatch { expected: hash }));
        }
        Ok(Some(bytes))
    }
}

/// Purges every tombstone before the store's cutoff (horizon or acknowledged cut), in batches.
fn collect_all_tombstones(store: &Store, now_millis: u64) -> Result<usize, StoreError> {
    let mut total = 0;
    loop {
        match store.collect_tombstones(now_millis, 10_000)? {
            0 => return Ok(total),
            count => total += count,
        }
    }
}

/// Resolves once the stop flag is set (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

/// Turns an error in what `peer` sent into a failure blamed on it.
fn peer_fault<E: std::fmt::Display>(peer: PeerId) -> impl Fn(E) -> NodeError + Copy {
    move |error| NodeError::Peer {
        peer,
        reason: error.to_string(),
    }
}

/// Takes the records a peer sent with a reconciliation reply into `done`, after checking they
/// are in a mailbox and among the keys that reply names as lacking here.
fn accept_delivered(
    peer: PeerId,
    space: &WireSpace,
    elements: &[Element],
    records: Vec<MessageRecord>,
    blobs: Vec<ByteString>,
    done: &mut Reconciled,
) -> Result<(), NodeError> {
    if records.is_empty() {
        return Ok(());
    }
    let lacked: HashSet<u128> = elements
        .iter()
        .flat_map(|element| match element {
            Element::YouLack { keys } => keys.as_slice(),
            _ => &[],
        })
        .copied()
        .collect();
    let named = records.iter().all(|record| lacked.contains(&record.id.0));
    if !named || !matches!(space, WireSpace::Mailbox(_)) {
        return Err(NodeError::Peer {
            peer,
            reason: "sent records with a reconciliation reply that were not lacking".into(),
        });
    }
    done.delivered.extend(records);
    done.delivered_blobs.extend(blobs);
    Ok(())
}

/// What one reconciliation with a peer found.
#[derive(Default)]
struct Reconciled {
    /// What this side lacks.
    mine: Outcome,
    /// What this side told the peer it lacks.
    told: Outcome,
    /// Records the peer sent with its replies (some of `mine`), and their small blobs.
    delivered: Vec<MessageRecord>,
    delivered_blobs: Vec<ByteString>,
    /// Records both sides hold in different states, settled by exchanging states: not pulled.
    by_state: HashSet<u128>,
}

/// This side's next reconciliation message: elements, its record states for the elements'
/// `Differ` bits, and merged states to send back.
#[derive(Default)]
struct NextMessage {
    elements: Vec<Element>,
    states: Vec<RecordState>,
    /// The keys of `states`, in order (a reply sends merged states back by position).
    state_keys: Vec<u128>,
    returned: Vec<(u128, RecordState)>,
}

/// A peer's first reply to a batched mailbox, with the states for its `Differ` bits.
struct FirstReply {
    elements: Vec<Element>,
    states: Vec<RecordState>,
    done: Reconciled,
}

/// How many `Differ` bits (states to go with them) some elements carry.
fn differ_bits(elements: &[Element]) -> usize {
    elements
        .iter()
        .map(|element| match element {
            Element::Differ { bits, .. } => sync::set_bits(bits).count(),
            _ => 0,
        })
        .sum()
}

fn packed_states(states: &[RecordState]) -> ByteString {
    ByteString(if states.is_empty() {
        Vec::new()
    } else {
        sync::encode_states(states)
    })
}

fn packed_indexed_states(states: &[(u64, u128, RecordState)]) -> ByteString {
    let indexed: Vec<(u64, RecordState)> = states.iter().map(|(index, _, state)| (*index, state.clone())).collect();
    ByteString(if indexed.is_empty() {
        Vec::new()
    } else {
        sync::encode_indexed_states(&indexed)
    })
}

fn packed_keyed_states(states: &[(u128, RecordState)]) -> ByteString {
    ByteString(if states.is_empty() {
        Vec::new()
    } else {
        sync::encode_keyed_states(states)
    })
}

/// Splits long `YouLack` lists so no element exceeds the wire limit.
fn split_you_lack(elements: Vec<Element>) -> Vec<Element> {
    let mut out = Vec::with_capacity(elements.len());
    for element in elements {
        match element {
            Element::YouLack { keys } if keys.len() > 4096 => {
                for chunk in keys.chunks(4096) {
                    out.push(Element::YouLack { keys: chunk.to_vec() });
                }
            }
            other => out.push(other),
        }
    }
    out
}

/// Groups elements into requests of at most about 512 KiB each.
fn chunk_elements(elements: Vec<Element>) -> Vec<Vec<Element>> {
    const BUDGET: usize = 512 * 1024;
    let estimate = |element: &Element| match element {
        Element::Children { children, .. } => 24 + children.len() * 19,
        Element::Leaves { leaves, .. } => 24 + leaves.len() * 24,
        Element::Tags { tags, .. } => 32 + tags.len() * 8,
        Element::YouLack { keys } => 8 + keys.len() * 16,
        // With the states that travel with it, about 40 bytes each.
        Element::Differ { bits, .. } => 32 + sync::set_bits(bits).count() * 40,
        _ => 24,
    };
    let mut chunks = Vec::new();
    let mut current = Vec::new();
    let mut size = 0;
    for element in elements {
        let element_size = estimate(&element);
        if size + element_size > BUDGET && !current.is_empty() {
            chunks.push(std::mem::take(&mut current));
            size = 0;
        }
        size += element_size;
        current.push(element);
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks
}

/// The host part (IP address) of a multiaddr, if it has one.
fn host_of(address: &Multiaddr) -> Option<std::net::IpAddr> {
    address.iter().find_map(|protocol| match protocol {
        libp2p::multiaddr::Protocol::Ip4(ip) => Some(std::net::IpAddr::V4(ip)),
        libp2p::multiaddr::Protocol::Ip6(ip) => Some(std::net::IpAddr::V6(ip)),
        _ => None,
    })
}

/// Judges each announced address by the hosts connected peers observe this node at.
pub fn announce_statuses(announce: &[Multiaddr], peers: &[PeerStatus]) -> Vec<AnnounceStatus> {
    let observed: Vec<std::net::IpAddr> = peers
        .iter()
        .filter_map(|peer| peer.observed_address.as_deref()?.parse::<Multiaddr>().ok())
        .filter_map(|address| host_of(&address))
        .collect();
    announce
        .iter()
        .map(|address| {
            let host = host_of(address);
            let seen_by_peers = host.map_or(0, |host| observed.iter().filter(|seen| **seen == host).count());
            let verdict = match host {
                None => "not comparable",
                Some(_) if observed.is_empty() => "no peers",
                Some(_) if seen_by_peers > 0 => "confirmed",
                Some(_) => "unconfirmed",
            };
            AnnounceStatus {
                address: address.to_string(),
                seen_by_peers,
                verdict,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen_at(observed: &str) -> PeerStatus {
        PeerStatus {
            peer_id: "peer".into(),
            name: None,
            addresses: Vec::new(),
            connected_seconds: 1,
            last_digest: None,
            agrees: true,
            differs_seconds: None,
            observed_address: Some(observed.into()),
        }
    }

    #[test]
    fn an_announce_no_peer_sees_is_unconfirmed_and_a_right_one_confirmed() {
        let announce: Vec<Multiaddr> = vec![
            "/ip4/10.88.0.2/tcp/4801".parse().unwrap(),
            "/ip4/10.88.0.99/tcp/4801".parse().unwrap(),
            "/dns4/mail.example.org/tcp/4801".parse().unwrap(),
        ];
        let peers = [seen_at("/ip4/10.88.0.2/tcp/53412"), seen_at("/ip4/10.88.0.2/tcp/53999")];
        let verdicts: Vec<(&str, usize)> = announce_statuses(&announce, &peers)
            .iter()
            .map(|status| (status.verdict, status.seen_by_peers))
            .collect();
        assert_eq!(
            verdicts,
            vec![("confirmed", 2), ("unconfirmed", 0), ("not comparable", 0)]
        );
        let alone = announce_statuses(&announce[..1], &[]);
        assert_eq!(alone[0].verdict, "no peers");
    }
}
