//! The network layer of mailmesh: it moves opaque byte frames between nodes and nothing else.
//!
//! Why this module exists: replication needs three things from the network — broadcast
//! (operations and range digests, through gossipsub), point-to-point exchange (range
//! reconciliation and record transfer, through request-response), and a set of peers that
//! stays connected across restarts and outages. libp2p provides the pieces but leaves the
//! traps (unbounded frame lengths, unvalidated gossip being forwarded, 10 s idle timeouts,
//! addresses forgotten after one failed dial, an event loop that must never block) to its
//! user. This module deals with those once, behind a small command/event interface in the
//! style of rust-libp2p's `examples/file-sharing`:
//!
//! * [`new`] builds the swarm and returns a cloneable [`NetworkClient`] (commands with
//!   one-shot replies), a receiver of [`NetworkEvent`]s, and the [`EventLoop`] to spawn.
//! * Gossip arrives as [`NetworkEvent::Gossip`] and is only forwarded to other peers once the
//!   caller has judged it with [`NetworkClient::report_validation`].
//! * Requests arrive as [`NetworkEvent::Request`] and are answered with
//!   [`NetworkClient::respond`].
//!
//! * Discovery: peers learn each other through the cluster (Kademlia, fed with the addresses
//!   identify reports), so a node that knew only one bootstrap peer ends up connected to all of
//!   them and stays so when that peer goes away; the peers it was connected to are kept on disk
//!   ([`peer_book`]) for the next start. `announce` addresses replace the listen addresses in
//!   what the node tells its peers (behind NAT, in a container or another namespace).
//! * Access control sits below all protocols: an optional allow list of peer ids, a block
//!   list with expiry ([`NetworkClient::block`]), connection limits, and an optional
//!   pre-shared key (libp2p pnet over TCP) that keeps nodes of other clusters from even
//!   completing a handshake.
//!
//! The module knows nothing about mail, records or CRDTs: payloads are `Vec<u8>`, and the
//! wire format of the request-response protocol `/mailmesh/sync/1` is a 4-byte big-endian
//! length followed by that many bytes, checked against a configured limit before a single
//! byte of payload is buffered.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::allow_block_list::{self, AllowedPeers, BlockedPeers};
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::Boxed;
use libp2p::core::upgrade::Version;
use libp2p::core::{ConnectedPoint, Transport};
use libp2p::gossipsub::{
    self, IdentTopic, IdentityTransform, MessageAcceptance, MessageAuthenticity, PublishError, TopicHash,
    ValidationMode, WhitelistSubscriptionFilter,
};
use libp2p::metrics::Recorder;
use libp2p::multiaddr::Protocol;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::request_response::{self, OutboundFailure, OutboundRequestId, ProtocolSupport};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionDenied, ConnectionId, DialError, ListenError, NetworkBehaviour, SwarmEvent};
use libp2p::{
    connection_limits, identify, identity, kad, noise, ping, tcp, yamux, StreamProtocol, Swarm, SwarmBuilder,
};

mod peer_book;
use peer_book::PeerBook;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, oneshot};
use tokio::time::MissedTickBehavior;

pub use libp2p::gossipsub::MessageId;
pub use libp2p::{Multiaddr, PeerId};

/// Protocol name of the request-response exchange.
pub const SYNC_PROTOCOL: &str = "/mailmesh/sync/1";
/// Protocol version announced through identify.
pub const IDENTIFY_PROTOCOL_VERSION: &str = "/mailmesh/5.0.0";

/// Room for the gossipsub envelope (source, sequence number, topic, signature, protobuf
/// framing) on top of `max_gossip_bytes` of payload, so that a payload at the limit still
/// fits in one RPC on the receiving side.
const GOSSIP_ENVELOPE_ALLOWANCE: usize = 4 * 1024;
/// Gossipsub message ids are the first bytes of a blake3 hash of topic and payload.
const MESSAGE_ID_BYTES: usize = 20;
/// A small cluster repairs its mesh every second; the first heartbeat comes quickly so that
/// a fresh node joins the mesh without waiting the default 5 s.
const GOSSIP_HEARTBEAT: Duration = Duration::from_secs(1);
const GOSSIP_HEARTBEAT_INITIAL_DELAY: Duration = Duration::from_millis(200);
/// Heartbeats a received message stays in the cache: the caller has this many heartbeats to
/// call `report_validation` before the message can no longer be forwarded.
const GOSSIP_HISTORY_LENGTH: usize = 10;
const GOSSIP_HISTORY_GOSSIP: usize = 3;

/// Redials start after 1 s and grow by half each time up to 10 s: a healed link is used within
/// seconds (one connection attempt per lost peer every 10 s costs little), where doubling to 30 s
/// had added up to half a minute to every partition heal.
const INITIAL_REDIAL_DELAY: Duration = Duration::from_secs(1);
const MAX_REDIAL_DELAY: Duration = Duration::from_secs(10);
/// A connection that lived at least this long resets the redial backoff when it drops; a
/// connection that flaps faster keeps growing the delay instead of redialing every second.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);
const REDIAL_TICK: Duration = Duration::from_millis(250);
/// How often Kademlia asks the cluster for its members. It also asks at the first peer, and
/// whenever its table gains a peer while it holds fewer than 20, so a new member is found at
/// once; the periodic query only finds what those missed. Each query walks the table's buckets
/// and asks every member: at 60 s it was most of an idle 8-node cluster's traffic (1,195 bytes/s
/// per node, 659 of them gossip heartbeats), so it runs at libp2p's default of 5 minutes.
const DISCOVERY_INTERVAL: Duration = Duration::from_secs(300);
/// The peer book is written at most this often.
const PEER_BOOK_SAVE_INTERVAL: Duration = Duration::from_secs(5);

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}
const MAX_ADDRESSES_PER_PEER: usize = 16;
/// Longer blocks are cut to this (and `Instant` arithmetic cannot overflow).
const MAX_BLOCK_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// Length in bytes of a pre-shared key (libp2p pnet, XSalsa20).
pub const PRE_SHARED_KEY_BYTES: usize = 32;
const SWARM_KEY_HEADER: &str = "/key/swarm/psk/1.0.0/";
const SWARM_KEY_BASE16: &str = "/base16/";

const COMMAND_QUEUE: usize = 256;
const EVENT_QUEUE: usize = 1024;
/// Gossip and requests that the caller has not picked up yet, beyond the event channel.
/// Past this, new ones are dropped (gossip is ignored, requests go unanswered) and counted,
/// instead of stalling the swarm.
const EVENT_BACKLOG_LIMIT: usize = 4096;
/// Never reserve more than this up front for an incoming frame; the buffer grows as bytes
/// actually arrive.
const INITIAL_READ_CAPACITY: usize = 64 * 1024;

// ---------------------------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------------------------

/// Everything the network layer needs to start.
#[derive(Clone)]
pub struct NetworkConfig {
    pub keypair: identity::Keypair,
    /// Addresses to listen on, e.g. `/ip4/127.0.0.1/tcp/0`.
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start and to keep redialing; with or without `/p2p/<peer id>`.
    pub bootstrap: Vec<Multiaddr>,
    /// The addresses peers should dial this node at, when the listen addresses are not (NAT, a
    /// container, another namespace). When set, only these are told to peers.
    pub announce: Vec<Multiaddr>,
    /// Where the peers this node was connected to are kept between runs; none: not kept.
    pub peer_book: Option<PathBuf>,
    /// Topics are `mailmesh/<cluster>/operations` and `mailmesh/<cluster>/digests`.
    pub cluster: String,
    pub max_request_bytes: usize,
    pub max_response_bytes: usize,
    pub max_gossip_bytes: usize,
    pub request_timeout: Duration,
    /// How long a connection without any open stream stays up; long enough that peers are not
    /// dropped between gossip rounds.
    pub idle_connection_timeout: Duration,
    /// When set, only these peers may hold a connection, inbound or outbound. Others are
    /// refused as soon as their peer id is known: before dialing when the address names it,
    /// otherwise right after the noise handshake authenticated them (an inbound peer id is
    /// not known earlier; the refused side may see its connection open and close at once).
    /// Bootstrap entries naming an unlisted peer are not dialed. `None`: any peer.
    pub allowed_peers: Option<HashSet<PeerId>>,
    /// When set, TCP connections run libp2p's private-network protocol (pnet: XSalsa20 with
    /// this key) beneath noise; nodes without the same key cannot complete a handshake.
    /// See [`parse_pre_shared_key`]. Never printed: `Debug` shows its fingerprint.
    pub pre_shared_key: Option<[u8; PRE_SHARED_KEY_BYTES]>,
    /// Established connections in total, both directions (at least 1).
    pub max_connections: u32,
    /// Established connections to one peer (at least 1).
    pub max_connections_per_peer: u32,
    /// Request streams open at once on one connection, each way; more inbound ones are dropped
    /// by libp2p ("at capacity"), so this must cover what a peer may have in flight.
    pub max_concurrent_streams: usize,
}

impl fmt::Debug for NetworkConfig {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key_fingerprint = self
            .pre_shared_key
            .map(|key| PreSharedKey::new(key).fingerprint().to_string());
        formatter
            .debug_struct("NetworkConfig")
            .field("keypair", &self.keypair)
            .field("listen", &self.listen)
            .field("bootstrap", &self.bootstrap)
            .field("announce", &self.announce)
            .field("peer_book", &self.peer_book)
            .field("cluster", &self.cluster)
            .field("max_request_bytes", &self.max_request_bytes)
            .field("max_response_bytes", &self.max_response_bytes)
            .field("max_gossip_bytes", &self.max_gossip_bytes)
            .field("request_timeout", &self.request_timeout)
            .field("idle_connection_timeout", &self.idle_connection_timeout)
            .field("max_concurrent_streams", &self.max_concurrent_streams)
            .field("allowed_peers", &self.allowed_peers)
            .field("pre_shared_key_fingerprint", &key_fingerprint)
            .field("max_connections", &self.max_connections)
            .field("max_connections_per_peer", &self.max_connections_per_peer)
            .finish()
    }
}

/// Parses a pre-shared key: either the go-ipfs `swarm.key` format
/// (`/key/swarm/psk/1.0.0/`, `/base16/`, then 64 hex digits, one per line) or just the 64 hex
/// digits. Surrounding whitespace and CRLF line ends are accepted. Errors never quote the
/// key.
pub fn parse_pre_shared_key(text: &str) -> Result<[u8; PRE_SHARED_KEY_BYTES], NetworkError> {
    let invalid = |reason: String| NetworkError::InvalidConfiguration(format!("pre-shared key: {reason}"));
    let text = text.trim();
    let hex = if text.starts_with('/') {
        let mut lines = text.lines().map(str::trim);
        if lines.next() != Some(SWARM_KEY_HEADER) {
            return Err(invalid(format!(
                "unknown key type; a swarm key file starts with {SWARM_KEY_HEADER}"
            )));
        }
        match lines.next() {
            Some(SWARM_KEY_BASE16) => {}
            Some(encoding) => {
                return Err(invalid(format!(
                    "unsupported encoding {encoding:?}; only {SWARM_KEY_BASE16} is supported"
                )))
            }
            None => return Err(invalid("the encoding line is missing".into())),
        }
        let key = lines.next().ok_or_else(|| invalid("the key line is missing".into()))?;
        if lines.any(|line| !line.is_empty()) {
            return Err(invalid("unexpected text after the key line".into()));
        }
        key
    } else {
        text
    };
    if hex.len() != 2 * PRE_SHARED_KEY_BYTES {
        return Err(invalid(format!(
            "expected {} hex digits, found {} characters",
            2 * PRE_SHARED_KEY_BYTES,
            hex.chars().count()
        )));
    }
    let digits = hex.as_bytes();
    let mut key = [0u8; PRE_SHARED_KEY_BYTES];
    for (index, byte) in key.iter_mut().enumerate() {
        let pair = std::str::from_utf8(&digits[2 * index..2 * index + 2]).ok();
        *byte = pair
            .filter(|pair| pair.bytes().all(|digit| digit.is_ascii_hexdigit()))
            .and_then(|pair| u8::from_str_radix(pair, 16).ok())
            .ok_or_else(|| invalid("the key contains a character that is not a hex digit".into()))?;
    }
    Ok(key)
}

impl NetworkConfig {
    /// A configuration with the default limits and timeouts, no listen address and no
    /// bootstrap peer.
    pub fn new(keypair: identity::Keypair, cluster: impl Into<String>) -> Self {
        Self {
            keypair,
            listen: Vec::new(),
            bootstrap: Vec::new(),
            announce: Vec::new(),
            peer_book: None,
            cluster: cluster.into(),
            max_request_bytes: 1024 * 1024,
            max_response_bytes: 8 * 1024 * 1024,
            max_gossip_bytes: 256 * 1024,
            request_timeout: Duration::from_secs(30),
            idle_connection_timeout: Duration::from_secs(60 * 60),
            allowed_peers: None,
            pre_shared_key: None,
            max_connections: 256,
            max_connections_per_peer: 2,
            max_concurrent_streams: 512,
        }
    }
}

/// The two gossip topics of a cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Topic {
    Operations,
    Digests,
}

impl Topic {
    pub const ALL: [Topic; 2] = [Topic::Operations, Topic::Digests];

    /// The last segment of the topic name, also used as metric label.
    pub fn name(self) -> &'static str {
        match self {
            Topic::Operations => "operations",
            Topic::Digests => "digests",
        }
    }

    /// The full gossipsub topic name for a cluster.
    pub fn topic_name(self, cluster: &str) -> String {
        format!("mailmesh/{cluster}/{}", self.name())
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

/// Where an inbound request is answered; hand it back to [`NetworkClient::respond`].
/// Dropping it without answering closes the remote's stream.
#[derive(Debug)]
pub struct ResponseHandle {
    peer: PeerId,
    channel: request_response::ResponseChannel<Vec<u8>>,
}

impl ResponseHandle {
    /// The peer that sent the request.
    pub fn peer(&self) -> PeerId {
        self.peer
    }
}

/// What the network tells its owner.
#[derive(Debug)]
pub enum NetworkEvent {
    /// A gossip message on one of the cluster's topics. The receiver MUST call
    /// [`NetworkClient::report_validation`] with `message_id` and `propagation_source`:
    /// only accepted messages are forwarded to other peers.
    Gossip {
        topic: Topic,
        message_id: MessageId,
        propagation_source: PeerId,
        /// Who wrote and signed the message (gossipsub checks the signature before this event):
        /// not the neighbour that forwarded it, which is `propagation_source`.
        author: Option<PeerId>,
        data: Vec<u8>,
    },
    /// A request from a peer; answer it with [`NetworkClient::respond`] within the request
    /// timeout.
    Request {
        peer: PeerId,
        data: Vec<u8>,
        channel: ResponseHandle,
    },
    /// The first connection to a peer is up.
    PeerConnected(PeerId),
    /// The last connection to a peer is gone.
    PeerDisconnected(PeerId),
    /// A new local listen address.
    Listening(Multiaddr),
}

/// A connected peer as the network layer sees it.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub peer_id: PeerId,
    /// Addresses the peer can be dialed at (bootstrap, dialed, or announced through identify).
    pub addresses: Vec<Multiaddr>,
    /// When the first of the current connections was established.
    pub connected_since: SystemTime,
    /// Number of open connections to the peer.
    pub connections: u32,
    /// From identify, once the peer has answered it.
    pub agent_version: Option<String>,
    pub protocol_version: Option<String>,
    /// The address this peer says it sees this node at (identify's observed address).
    pub observed_address: Option<Multiaddr>,
}

/// Everything that can go wrong in the network layer.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("the network event loop has stopped")]
    Stopped,
    #[error("invalid network configuration: {0}")]
    InvalidConfiguration(String),
    #[error("could not set up the transport: {0}")]
    Transport(String),
    #[error("could not listen on {address}: {reason}")]
    Listen { address: Multiaddr, reason: String },
    #[error("could not dial {address}: {reason}")]
    Dial { address: Multiaddr, reason: String },
    #[error("not connected to {0}")]
    NotConnected(PeerId),
    #[error("request of {size} bytes exceeds the limit of {limit} bytes")]
    RequestTooLarge { size: usize, limit: usize },
    #[error("response of {size} bytes exceeds the limit of {limit} bytes")]
    ResponseTooLarge { size: usize, limit: usize },
    #[error("{peer} sent a response of {size} bytes, over the limit of {limit} bytes")]
    OversizedResponse { peer: PeerId, size: u64, limit: u64 },
    #[error("gossip message of {size} bytes exceeds the limit of {limit} bytes")]
    GossipTooLarge { size: usize, limit: usize },
    #[error("could not publish on {topic}: {reason}")]
    Publish { topic: Topic, reason: String },
    #[error("request to {peer} timed out")]
    RequestTimeout { peer: PeerId },
    #[error("connection to {peer} closed before the response arrived")]
    ConnectionClosed { peer: PeerId },
    #[error("could not reach {peer} to send the request")]
    PeerUnreachable { peer: PeerId },
    #[error("{peer} does not support {SYNC_PROTOCOL}")]
    UnsupportedProtocol { peer: PeerId },
    #[error("request stream to {peer} failed (the remote may have refused the frame): {source}")]
    Stream {
        peer: PeerId,
        #[source]
        source: io::Error,
    },
    #[error("the request from {peer} can no longer be answered (timed out or connection closed)")]
    ResponseChannelClosed { peer: PeerId },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl NetworkError {
    /// Whether trying the same request again later (or with another peer) may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            NetworkError::RequestTimeout { .. }
                | NetworkError::ConnectionClosed { .. }
                | NetworkError::PeerUnreachable { .. }
                | NetworkError::Stream { .. }
                | NetworkError::NotConnected(_)
                | NetworkError::Dial { .. }
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct Limits {
    max_request_bytes: usize,
    max_response_bytes: usize,
    max_gossip_bytes: usize,
}

type Reply<T> = oneshot::Sender<Result<T, NetworkError>>;

enum Command {
    Publish {
        topic: Topic,
        data: Vec<u8>,
        reply: Reply<()>,
    },
    Request {
        peer: PeerId,
        data: Vec<u8>,
        reply: Reply<Vec<u8>>,
    },
    Respond {
        channel: ResponseHandle,
        data: Vec<u8>,
        reply: Reply<()>,
    },
    ReportValidation {
        message_id: MessageId,
        source: PeerId,
        valid: bool,
        reply: Reply<()>,
    },
    Dial {
        address: Multiaddr,
        reply: Reply<()>,
    },
    Disconnect {
        peer: PeerId,
        reply: Reply<()>,
    },
    ListenAddresses {
        reply: Reply<Vec<Multiaddr>>,
    },
    Peers {
        reply: Reply<Vec<PeerInfo>>,
    },
    Block {
        peer: PeerId,
        duration: Duration,
        reason: String,
        reply: Reply<()>,
    },
    Unblock {
        peer: PeerId,
        reply: Reply<bool>,
    },
    BlockedPeers {
        reply: Reply<Vec<(PeerId, Duration)>>,
    },
}

/// Handle to the running [`EventLoop`]; cheap to clone.
#[derive(Clone, Debug)]
pub struct NetworkClient {
    commands: mpsc::Sender<Command>,
    local_peer_id: PeerId,
    limits: Limits,
}

impl NetworkClient {
    pub fn local_peer_id(&self) -> PeerId {
        self.local_peer_id
    }

    async fn call<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Result<T, NetworkError> {
        let (reply, receiver) = oneshot::channel();
        self.commands
            .send(command(reply))
            .await
            .map_err(|_| NetworkError::Stopped)?;
        receiver.await.map_err(|_| NetworkError::Stopped)?
    }

    /// Publishes on a topic. Having no peer subscribed yet, or having published the same
    /// bytes within the duplicate window, is not an error: it returns `Ok` and is counted in
    /// `mailmesh_net_gossip_publish_skipped_total`.
    pub async fn publish(&self, topic: Topic, data: Vec<u8>) -> Result<(), NetworkError> {
        let limit = self.limits.max_gossip_bytes;
        if data.len() > limit {
            return Err(NetworkError::GossipTooLarge {
                size: data.len(),
                limit,
            });
        }
        self.call(|reply| Command::Publish { topic, data, reply }).await
    }

    /// Sends a request to a peer (dialing it if needed) and waits for its response.
    pub async fn request(&self, peer: PeerId, data: Vec<u8>) -> Result<Vec<u8>, NetworkError> {
        let limit = self.limits.max_request_bytes;
        if data.len() > limit {
            return Err(NetworkError::RequestTooLarge {
                size: data.len(),
                limit,
            });
        }
        self.call(|reply| Command::Request { peer, data, reply }).await
    }

    /// Answers a request received as [`NetworkEvent::Request`].
    pub async fn respond(&self, channel: ResponseHandle, data: Vec<u8>) -> Result<(), NetworkError> {
        let limit = self.limits.max_response_bytes;
        if data.len() > limit {
            return Err(NetworkError::ResponseTooLarge {
                size: data.len(),
                limit,
            });
        }
        self.call(|reply| Command::Respond { channel, data, reply }).await
    }

    /// Judges a gossip message: valid ones are forwarded to the mesh, invalid ones are dropped
    /// and count against the peer that sent them.
    pub async fn report_validation(
        &self,
        message_id: MessageId,
        source: PeerId,
        valid: bool,
    ) -> Result<(), NetworkError> {
        self.call(|reply| Command::ReportValidation {
            message_id,
            source,
            valid,
            reply,
        })
        .await
    }

    /// Dials an address (with or without `/p2p/<peer id>`) and returns once the connection is
    /// up or the dial failed. A peer reached this way is redialed if the connection drops.
    pub async fn dial(&self, address: Multiaddr) -> Result<(), NetworkError> {
        self.call(|reply| Command::Dial { address, reply }).await
    }

    /// Closes all connections to a peer and stops redialing it. The peer may still dial back.
    pub async fn disconnect(&self, peer: PeerId) -> Result<(), NetworkError> {
        self.call(|reply| Command::Disconnect { peer, reply }).await
    }

    pub async fn listen_addresses(&self) -> Result<Vec<Multiaddr>, NetworkError> {
        self.call(|reply| Command::ListenAddresses { reply }).await
    }

    /// The peers currently connected.
    pub async fn peers(&self) -> Result<Vec<PeerInfo>, NetworkError> {
        self.call(|reply| Command::Peers { reply }).await
    }

    /// Blocks a misbehaving peer for `duration`: closes its connections now, refuses its
    /// connections in both directions and does not redial it until the block ends, then
    /// lifts the block by itself (within a quarter second) and resumes redialing it if it
    /// was a peer to keep connected. Blocking a blocked peer again keeps the later end.
    /// Durations over ten years are cut to ten years; a zero duration or this node's own id
    /// is an [`NetworkError::InvalidArgument`].
    pub async fn block(&self, peer: PeerId, duration: Duration, reason: String) -> Result<(), NetworkError> {
        self.call(|reply| Command::Block {
            peer,
            duration,
            reason,
            reply,
        })
        .await
    }

    /// Lifts a block before it ends; returns whether the peer was blocked.
    pub async fn unblock(&self, peer: PeerId) -> Result<bool, NetworkError> {
        self.call(|reply| Command::Unblock { peer, reply }).await
    }

    /// The blocked peers with the time left on each block, shortest first.
    pub async fn blocked_peers(&self) -> Result<Vec<(PeerId, Duration)>, NetworkError> {
        self.call(|reply| Command::BlockedPeers { reply }).await
    }
}

// ---------------------------------------------------------------------------------------------
// Wire codec for /mailmesh/sync/1
// ---------------------------------------------------------------------------------------------

/// The error inside the `io::Error` a codec returns for a frame over its limit; the event
/// loop recognises it to count the rejection and to report it precisely.
#[derive(Debug, thiserror::Error)]
#[error("{kind} frame of {length} bytes exceeds the limit of {limit} bytes")]
struct FrameTooLarge {
    kind: FrameKind,
    length: u64,
    limit: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FrameKind {
    Request,
    Response,
}

impl fmt::Display for FrameKind {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            FrameKind::Request => "request",
            FrameKind::Response => "response",
        })
    }
}

fn frame_too_large(error: &io::Error) -> Option<&FrameTooLarge> {
    error.get_ref()?.downcast_ref::<FrameTooLarge>()
}

/// Raw bytes behind a u32 big-endian length prefix.
///
/// It counts its own refusals: request-response reports no failure at all when reading an
/// inbound request fails (it only logs at debug level), so the event loop never sees those.
#[derive(Clone, Debug)]
struct FrameCodec {
    max_request_bytes: usize,
    max_response_bytes: usize,
    requests: Family<RequestLabels, Counter>,
    frames_rejected: Family<ReasonLabels, Counter>,
}

impl FrameCodec {
    fn count_refusal(&self, kind: FrameKind, error: &io::Error) {
        let too_large = frame_too_large(error).is_some();
        if too_large {
            self.frames_rejected
                .get_or_create(&ReasonLabels {
                    reason: match kind {
                        FrameKind::Request => "request_too_large",
                        FrameKind::Response => "response_too_large",
                    },
                })
                .inc();
        }
        if kind == FrameKind::Request {
            // Outbound failures are counted by the event loop, which does see them.
            self.requests
                .get_or_create(&RequestLabels {
                    direction: INBOUND,
                    outcome: if too_large { "too_large" } else { "read_error" },
                })
                .inc();
            tracing::warn!(%error, "refused an inbound request frame");
        }
    }
}

async fn read_frame<T>(io: &mut T, kind: FrameKind, limit: usize) -> io::Result<Vec<u8>>
where
    T: AsyncRead + Unpin + Send,
{
    let mut prefix = [0u8; 4];
    io.read_exact(&mut prefix).await?;
    let length = u64::from(u32::from_be_bytes(prefix));
    let limit = limit as u64;
    if length > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            FrameTooLarge { kind, length, limit },
        ));
    }
    // `length <= limit`, and `limit` came from a `usize`.
    let expected = length as usize;
    let mut data = Vec::with_capacity(expected.min(INITIAL_READ_CAPACITY));
    (&mut *io).take(length).read_to_end(&mut data).await?;
    if data.len() != expected {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("{kind} frame ended after {} of {expected} bytes", data.len()),
        ));
    }
    Ok(data)
}

async fn write_frame<T>(io: &mut T, kind: FrameKind, limit: usize, data: &[u8]) -> io::Result<()>
where
    T: AsyncWrite + Unpin + Send,
{
    let length = u32::try_from(data.len())
        .ok()
        .filter(|_| data.len() <= limit)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                FrameTooLarge {
                    kind,
                    length: data.len() as u64,
                    limit: limit as u64,
                },
            )
        })?;
    io.write_all(&length.to_be_bytes()).await?;
    io.write_all(data).await?;
    io.flush().await
}

impl request_response::Codec for FrameCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        let result = read_frame(io, FrameKind::Request, self.max_request_bytes).await;
        if let Err(error) = &result {
            self.count_refusal(FrameKind::Request, error);
        }
        result
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        let result = read_frame(io, FrameKind::Response, self.max_response_bytes).await;
        if let Err(error) = &result {
            self.count_refusal(FrameKind::Response, error);
        }
        result
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, request: Vec<u8>) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, FrameKind::Request, self.max_request_bytes, &request).await
    }

    async fn write_response<T>(&mut self, _: &StreamProtocol, io: &mut T, response: Vec<u8>) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, FrameKind::Response, self.max_response_bytes, &response).await
    }
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

const INBOUND: &str = "inbound";
const OUTBOUND: &str = "outbound";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    direction: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GossipLabels {
    topic: &'static str,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SkipLabels {
    topic: &'static str,
    reason: &'static str,
}

struct NetworkMetrics {
    libp2p: libp2p::metrics::Metrics,
    requests: Family<RequestLabels, Counter>,
    request_bytes: Family<DirectionLabels, Counter>,
    response_bytes: Family<DirectionLabels, Counter>,
    gossip_messages: Family<GossipLabels, Counter>,
    gossip_bytes: Family<GossipLabels, Counter>,
    publish_skipped: Family<SkipLabels, Counter>,
    connected_peers: Gauge,
    frames_rejected: Family<ReasonLabels, Counter>,
    peers_refused: Family<ReasonLabels, Counter>,
    peers_blocked: Counter,
    blocked_peers: Gauge,
    inbound_handshake_failures: Counter,
}

impl NetworkMetrics {
    fn new(registry: &mut Registry) -> Self {
        let metrics = Self {
            libp2p: libp2p::metrics::Metrics::new(registry),
            requests: Family::default(),
            request_bytes: Family::default(),
            response_bytes: Family::default(),
            gossip_messages: Family::default(),
            gossip_bytes: Family::default(),
            publish_skipped: Family::default(),
            connected_peers: Gauge::default(),
            frames_rejected: Family::default(),
            peers_refused: Family::default(),
            peers_blocked: Counter::default(),
            blocked_peers: Gauge::default(),
            inbound_handshake_failures: Counter::default(),
        };
        // Counters get their `_total` suffix from prometheus-client.
        registry.register(
            "mailmesh_net_requests",
            "Requests of /mailmesh/sync/1 by direction and outcome",
            metrics.requests.clone(),
        );
        registry.register(
            "mailmesh_net_request_bytes",
            "Payload bytes of requests by direction",
            metrics.request_bytes.clone(),
        );
        registry.register(
            "mailmesh_net_response_bytes",
            "Payload bytes of responses by direction",
            metrics.response_bytes.clone(),
        );
        registry.register(
            "mailmesh_net_gossip_messages",
            "Gossip messages published (outbound) or delivered to the caller (inbound)",
            metrics.gossip_messages.clone(),
        );
        registry.register(
            "mailmesh_net_gossip_bytes",
            "Payload bytes of gossip messages by topic and direction",
            metrics.gossip_bytes.clone(),
        );
        registry.register(
            "mailmesh_net_gossip_publish_skipped",
            "Publications that reached no peer: no subscriber yet, or a duplicate",
            metrics.publish_skipped.clone(),
        );
        registry.register(
            "mailmesh_net_connected_peers",
            "Peers with at least one open connection",
            metrics.connected_peers.clone(),
        );
        registry.register(
            "mailmesh_net_frames_rejected",
            "Frames and messages refused or dropped, by reason",
            metrics.frames_rejected.clone(),
        );
        registry.register(
            "mailmesh_net_peers_refused",
            "Connections refused once the peer was known, by reason: not_allowed, blocked, \
             connection_limit",
            metrics.peers_refused.clone(),
        );
        registry.register(
            "mailmesh_net_peers_blocked",
            "Blocks imposed on misbehaving peers",
            metrics.peers_blocked.clone(),
        );
        registry.register(
            "mailmesh_net_blocked_peers",
            "Peers currently blocked",
            metrics.blocked_peers.clone(),
        );
        registry.register(
            "mailmesh_net_inbound_handshake_failures",
            "Inbound connections that failed before the peer was authenticated: a different or \
             missing pre-shared key, noise or multiplexer failure, or the 10 s upgrade timeout",
            metrics.inbound_handshake_failures.clone(),
        );
        metrics
    }

    fn reject(&self, reason: &'static str) {
        self.frames_rejected.get_or_create(&ReasonLabels { reason }).inc();
    }

    fn request_outcome(&self, direction: &'static str, outcome: &'static str) {
        self.requests.get_or_create(&RequestLabels { direction, outcome }).inc();
    }

    fn gossip(&self, topic: Topic, direction: &'static str, bytes: usize) {
        let labels = GossipLabels {
            topic: topic.name(),
            direction,
        };
        self.gossip_messages.get_or_create(&labels).inc();
        self.gossip_bytes.get_or_create(&labels).inc_by(bytes as u64);
    }
}

// ---------------------------------------------------------------------------------------------
// Behaviour and construction
// ---------------------------------------------------------------------------------------------

type GossipBehaviour = gossipsub::Behaviour<IdentityTransform, WhitelistSubscriptionFilter>;

/// Access control comes first: the swarm asks the behaviours in field order, so a refused
/// connection is turned away before any protocol sets up a handler for it.
#[derive(NetworkBehaviour)]
struct Behaviour {
    allowed: Toggle<allow_block_list::Behaviour<AllowedPeers>>,
    blocked: allow_block_list::Behaviour<BlockedPeers>,
    limits: connection_limits::Behaviour,
    gossipsub: GossipBehaviour,
    sync: request_response::Behaviour<FrameCodec>,
    identify: identify::Behaviour,
    kademlia: kad::Behaviour<kad::store::MemoryStore>,
    ping: ping::Behaviour,
}

struct Topics {
    operations: IdentTopic,
    digests: IdentTopic,
}

impl Topics {
    fn new(cluster: &str) -> Self {
        Self {
            operations: IdentTopic::new(Topic::Operations.topic_name(cluster)),
            digests: IdentTopic::new(Topic::Digests.topic_name(cluster)),
        }
    }

    fn get(&self, topic: Topic) -> &IdentTopic {
        match topic {
            Topic::Operations => &self.operations,
            Topic::Digests => &self.digests,
        }
    }

    fn lookup(&self, hash: &TopicHash) -> Option<Topic> {
        Topic::ALL.into_iter().find(|topic| self.get(*topic).hash() == *hash)
    }
}

/// Content-addressed message id: blake3 over topic and payload, so that identical bytes on
/// the two topics are not taken for duplicates of each other.
fn content_message_id(message: &gossipsub::Message) -> MessageId {
    let mut hasher = blake3::Hasher::new();
    hasher.update(message.topic.as_str().as_bytes());
    hasher.update(&[0]);
    hasher.update(&message.data);
    MessageId::new(&hasher.finalize().as_bytes()[..MESSAGE_ID_BYTES])
}

fn validate_config(config: &NetworkConfig) -> Result<(), NetworkError> {
    let invalid = |reason: String| Err(NetworkError::InvalidConfiguration(reason));
    if config.cluster.is_empty() {
        return invalid("the cluster name is empty".into());
    }
    let frame_limit = u32::MAX as usize;
    for (name, value) in [
        ("max_request_bytes", config.max_request_bytes),
        ("max_response_bytes", config.max_response_bytes),
    ] {
        if value == 0 || value > frame_limit {
            return invalid(format!("{name} must be between 1 and {frame_limit}"));
        }
    }
    if config.max_gossip_bytes == 0 {
        return invalid("max_gossip_bytes must be positive".into());
    }
    if config.request_timeout.is_zero() {
        return invalid("request_timeout must be positive".into());
    }
    if config.max_connections == 0 {
        return invalid("max_connections must be at least 1".into());
    }
    if config.max_connections_per_peer == 0 {
        return invalid("max_connections_per_peer must be at least 1".into());
    }
    Ok(())
}

/// TCP, then pnet when a pre-shared key is set, then noise and yamux; what
/// `SwarmBuilder::with_tcp` builds, with the private-network layer slotted in beneath noise.
fn build_transport(
    keypair: &identity::Keypair,
    pre_shared_key: Option<[u8; PRE_SHARED_KEY_BYTES]>,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, Box<dyn std::error::Error + Send + Sync>> {
    let noise = noise::Config::new(keypair)?;
    let tcp = tcp::tokio::Transport::new(tcp::Config::default());
    let transport = match pre_shared_key {
        Some(key) => {
            let key = PreSharedKey::new(key);
            tcp.and_then(move |socket, _| PnetConfig::new(key).handshake(socket))
                .upgrade(Version::V1Lazy)
                .authenticate(noise)
                .multiplex(yamux::Config::default())
                .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
                .boxed()
        }
        None => tcp
            .upgrade(Version::V1Lazy)
            .authenticate(noise)
            .multiplex(yamux::Config::default())
            .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
            .boxed(),
    };
    Ok(transport)
}

fn build_gossipsub(
    config: &NetworkConfig,
    topics: &Topics,
    registry: &mut Registry,
) -> Result<GossipBehaviour, NetworkError> {
    let invalid = |reason: String| NetworkError::InvalidConfiguration(format!("gossipsub: {reason}"));
    let gossip_config = gossipsub::ConfigBuilder::default()
        .validation_mode(ValidationMode::Strict)
        .validate_messages()
        .message_id_fn(content_message_id)
        .max_transmit_size(config.max_gossip_bytes.saturating_add(GOSSIP_ENVELOPE_ALLOWANCE))
        .heartbeat_interval(GOSSIP_HEARTBEAT)
        .heartbeat_initial_delay(GOSSIP_HEARTBEAT_INITIAL_DELAY)
        .history_length(GOSSIP_HISTORY_LENGTH)
        .history_gossip(GOSSIP_HISTORY_GOSSIP)
        .build()
        .map_err(|error| invalid(error.to_string()))?;
    let filter = WhitelistSubscriptionFilter(Topic::ALL.into_iter().map(|topic| topics.get(topic).hash()).collect());
    let mut gossipsub: GossipBehaviour = gossipsub::Behaviour::new_with_subscription_filter(
        MessageAuthenticity::Signed(config.keypair.clone()),
        gossip_config,
        filter,
    )
    .map_err(|reason| invalid(reason.to_string()))?
    .with_metrics(registry.sub_registry_with_prefix("gossipsub"), Default::default());
    for topic in Topic::ALL {
        gossipsub
            .subscribe(topics.get(topic))
            .map_err(|error| invalid(format!("subscribing to {topic}: {error}")))?;
    }
    Ok(gossipsub)
}

/// Builds the swarm, starts listening, and returns the client, the event receiver and the
/// event loop (to be spawned with [`EventLoop::run`]). Bootstrap peers are dialed when the
/// loop starts.
pub fn new(
    config: NetworkConfig,
    registry: &mut Registry,
) -> Result<(NetworkClient, mpsc::Receiver<NetworkEvent>, EventLoop), NetworkError> {
    validate_config(&config)?;
    let local_peer_id = config.keypair.public().to_peer_id();
    let topics = Topics::new(&config.cluster);
    let metrics = NetworkMetrics::new(registry);
    let gossipsub = build_gossipsub(&config, &topics, registry)?;

    let sync = request_response::Behaviour::with_codec(
        FrameCodec {
            max_request_bytes: config.max_request_bytes,
            max_response_bytes: config.max_response_bytes,
            requests: metrics.requests.clone(),
            frames_rejected: metrics.frames_rejected.clone(),
        },
        [(StreamProtocol::new(SYNC_PROTOCOL), ProtocolSupport::Full)],
        request_response::Config::default()
            .with_request_timeout(config.request_timeout)
            .with_max_concurrent_streams(config.max_concurrent_streams.max(1)),
    );
    let identify = identify::Behaviour::new(
        identify::Config::new(IDENTIFY_PROTOCOL_VERSION.to_string(), config.keypair.public())
            .with_agent_version(format!("mailmesh/{}", env!("CARGO_PKG_VERSION")))
            .with_hide_listen_addrs(!config.announce.is_empty()),
    );
    // Kademlia only to find the cluster's members: no records are stored or served. Its protocol
    // name carries the cluster, so nodes of two clusters never fill each other's tables.
    let kademlia_protocol = StreamProtocol::try_from_owned(format!("/mailmesh/{}/kad/1.0.0", config.cluster))
        .map_err(|error| NetworkError::InvalidConfiguration(format!("cluster name: {error}")))?;
    let mut kademlia_config = kad::Config::new(kademlia_protocol);
    kademlia_config.set_periodic_bootstrap_interval(Some(DISCOVERY_INTERVAL));
    let mut kademlia = kad::Behaviour::with_config(
        local_peer_id,
        kad::store::MemoryStore::new(local_peer_id),
        kademlia_config,
    );
    kademlia.set_mode(Some(kad::Mode::Server));
    let allowed = config.allowed_peers.as_ref().map(|peers| {
        let mut allowed = allow_block_list::Behaviour::<AllowedPeers>::default();
        for peer in peers {
            allowed.allow_peer(*peer);
        }
        allowed
    });
    let limits = connection_limits::Behaviour::new(
        connection_limits::ConnectionLimits::default()
            .with_max_established(Some(config.max_connections))
            .with_max_established_per_peer(Some(config.max_connections_per_peer)),
    );
    let behaviour = Behaviour {
        allowed: Toggle::from(allowed),
        blocked: allow_block_list::Behaviour::default(),
        limits,
        gossipsub,
        sync,
        identify,
        kademlia,
        ping: ping::Behaviour::new(ping::Config::new()),
    };

    let idle_connection_timeout = config.idle_connection_timeout;
    let pre_shared_key = config.pre_shared_key;
    if let Some(key) = pre_shared_key {
        tracing::info!(
            fingerprint = %PreSharedKey::new(key).fingerprint(),
            "private network: connections need the pre-shared key"
        );
    }
    if let Some(peers) = &config.allowed_peers {
        tracing::info!(peers = peers.len(), "only peers on the allow list may connect");
        if peers.is_empty() {
            tracing::warn!("the allow list is empty: every connection will be refused");
        }
    }
    let mut swarm = SwarmBuilder::with_existing_identity(config.keypair.clone())
        .with_tokio()
        .with_other_transport(|keypair| build_transport(keypair, pre_shared_key))
        .map_err(|error| NetworkError::Transport(error.to_string()))?
        .with_dns()
        .map_err(|error| NetworkError::Transport(error.to_string()))?
        .with_behaviour(move |_| behaviour)
        .map_err(|never| match never {})?
        .with_swarm_config(|swarm_config| swarm_config.with_idle_connection_timeout(idle_connection_timeout))
        .build();

    for address in &config.listen {
        swarm.listen_on(address.clone()).map_err(|error| NetworkError::Listen {
            address: address.clone(),
            reason: error.to_string(),
        })?;
    }
    for address in &config.announce {
        tracing::info!(%address, "announcing this address to peers");
        swarm.add_external_address(address.clone());
    }

    let limits = Limits {
        max_request_bytes: config.max_request_bytes,
        max_response_bytes: config.max_response_bytes,
        max_gossip_bytes: config.max_gossip_bytes,
    };
    let (command_sender, command_receiver) = mpsc::channel(COMMAND_QUEUE);
    let (event_sender, event_receiver) = mpsc::channel(EVENT_QUEUE);

    let mut event_loop = EventLoop {
        swarm,
        commands: command_receiver,
        commands_closed: false,
        events: event_sender,
        events_closed: false,
        outbox: VecDeque::new(),
        topics,
        limits,
        pending_requests: HashMap::new(),
        dials: HashMap::new(),
        peers: HashMap::new(),
        address_targets: Vec::new(),
        metrics,
        allowed: config.allowed_peers.clone(),
        blocks: HashMap::new(),
        private_network: config.pre_shared_key.is_some(),
        book: PeerBook::default(),
        book_path: config.peer_book.clone(),
        book_changed: false,
        book_saved_at: Instant::now(),
    };
    for address in config.bootstrap {
        event_loop.add_bootstrap(address);
    }
    if let Some(path) = &config.peer_book {
        event_loop.book = PeerBook::load(path, unix_seconds());
        if !event_loop.book.is_empty() {
            tracing::info!(peers = event_loop.book.len(), "dialing the peers of the last run too");
        }
        for address in event_loop.book.addresses() {
            // A bootstrap address is dialed already: dialing the peer the book found there as
            // well would open two connections to it at every start (found measuring a heal:
            // two noise, identify and gossipsub handshakes through one relay).
            let (plain, _) = split_peer_id(&address);
            if event_loop.address_targets.iter().any(|target| target.address == plain) {
                continue;
            }
            event_loop.add_bootstrap(address);
        }
    }

    let client = NetworkClient {
        commands: command_sender,
        local_peer_id,
        limits,
    };
    Ok((client, event_receiver, event_loop))
}

// ---------------------------------------------------------------------------------------------
// Redial bookkeeping
// ---------------------------------------------------------------------------------------------

/// Exponential redial delay: 1 s, growing by half up to 10 s.
#[derive(Debug)]
struct Backoff {
    delay: Duration,
    next_attempt: Option<Instant>,
}

impl Backoff {
    fn new() -> Self {
        Self {
            delay: INITIAL_REDIAL_DELAY,
            next_attempt: None,
        }
    }

    fn due_now(&mut self) {
        self.next_attempt = Some(Instant::now());
    }

    /// Schedules the next attempt after the current delay, grows the delay, and returns the
    /// wait that was scheduled.
    fn schedule(&mut self, now: Instant) -> Duration {
        let wait = self.delay;
        self.next_attempt = Some(now + wait);
        self.delay = (self.delay * 3 / 2).min(MAX_REDIAL_DELAY);
        wait
    }

    fn reset(&mut self) {
        self.delay = INITIAL_REDIAL_DELAY;
    }

    fn cancel(&mut self) {
        self.next_attempt = None;
    }

    fn is_due(&self, now: Instant) -> bool {
        self.next_attempt.is_some_and(|at| at <= now)
    }
}

#[derive(Debug)]
struct PeerRecord {
    addresses: Vec<Multiaddr>,
    connections: u32,
    connected_at: Option<(Instant, SystemTime)>,
    agent_version: Option<String>,
    protocol_version: Option<String>,
    observed_address: Option<Multiaddr>,
    /// Bootstrap, discovered or previously connected: keep it connected.
    redial: bool,
    dialing: Option<ConnectionId>,
    backoff: Backoff,
}

impl PeerRecord {
    fn new() -> Self {
        Self {
            addresses: Vec::new(),
            connections: 0,
            connected_at: None,
            agent_version: None,
            protocol_version: None,
            observed_address: None,
            redial: false,
            dialing: None,
            backoff: Backoff::new(),
        }
    }

    fn add_address(&mut self, address: Multiaddr) {
        if !self.addresses.contains(&address) && self.addresses.len() < MAX_ADDRESSES_PER_PEER {
            self.addresses.push(address);
        }
    }
}

/// A bootstrap address given without a peer id: dialed by address until it answers, and
/// again whenever the peer found there is gone.
#[derive(Debug)]
struct AddressTarget {
    address: Multiaddr,
    peer: Option<PeerId>,
    enabled: bool,
    dialing: Option<ConnectionId>,
    backoff: Backoff,
}

enum DialPurpose {
    Peer(PeerId),
    Address(usize),
    Command(Multiaddr, Reply<()>),
}

/// Splits a trailing `/p2p/<peer id>` off an address.
fn split_peer_id(address: &Multiaddr) -> (Multiaddr, Option<PeerId>) {
    let mut plain = address.clone();
    match plain.pop() {
        Some(Protocol::P2p(peer)) => (plain, Some(peer)),
        _ => (address.clone(), None),
    }
}

fn is_dialable(address: &Multiaddr) -> bool {
    address.iter().any(|protocol| matches!(protocol, Protocol::Tcp(_)))
        && !address.iter().any(|protocol| matches!(protocol, Protocol::P2pCircuit))
}

fn describe_dial_error(error: &DialError) -> String {
    match error {
        DialError::Denied { cause } => format!("refused: {}", classify_denial(cause).1),
        _ => error.to_string(),
    }
}

/// The text of a denial's cause (`ConnectionDenied` itself only says "connection denied").
fn denial_text(cause: &ConnectionDenied) -> String {
    std::error::Error::source(cause)
        .map(|source| source.to_string())
        .unwrap_or_else(|| cause.to_string())
}

/// The metric label and log text of a connection refused by an access-control behaviour.
fn classify_denial(cause: &ConnectionDenied) -> (&'static str, String) {
    if cause.downcast_ref::<allow_block_list::NotAllowed>().is_some() {
        ("not_allowed", "not on the allow list".into())
    } else if cause.downcast_ref::<allow_block_list::Blocked>().is_some() {
        ("blocked", "blocked".into())
    } else if let Some(exceeded) = cause.downcast_ref::<connection_limits::Exceeded>() {
        ("connection_limit", exceeded.to_string())
    } else {
        ("other", denial_text(cause))
    }
}

/// Counts and logs a refused connection. A free function so that the redial loop can call it
/// while it holds the peer table.
fn record_refusal(
    metrics: &NetworkMetrics,
    blocks: &HashMap<PeerId, Instant>,
    peer: Option<PeerId>,
    direction: &'static str,
    cause: &ConnectionDenied,
) {
    let (reason, mut detail) = classify_denial(cause);
    if reason == "blocked" {
        if let Some(until) = peer.and_then(|peer| blocks.get(&peer)) {
            let left = until.saturating_duration_since(Instant::now());
            detail = format!("blocked for another {} s", seconds(left));
        }
    }
    metrics.peers_refused.get_or_create(&ReasonLabels { reason }).inc();
    match peer {
        Some(peer) => tracing::warn!(direction, "refused peer {peer}: {detail}"),
        None => tracing::warn!(direction, "refused a connection: {detail}"),
    }
}

/// Whether the redial loop may dial a peer: on the allow list (if any) and not blocked.
fn may_dial(allowed: &Option<HashSet<PeerId>>, blocks: &HashMap<PeerId, Instant>, peer: &PeerId) -> bool {
    allowed.as_ref().is_none_or(|allowed| allowed.contains(peer)) && !blocks.contains_key(peer)
}

/// Seconds for log lines: whole numbers as such, otherwise to a tenth.
fn seconds(duration: Duration) -> String {
    if duration.subsec_nanos() == 0 {
        duration.as_secs().to_string()
    } else {
        format!("{:.1}", duration.as_secs_f64())
    }
}

// ---------------------------------------------------------------------------------------------
// Event loop
// ---------------------------------------------------------------------------------------------

/// Owns the swarm; run it with [`EventLoop::run`] on its own task.
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    commands_closed: bool,
    events: mpsc::Sender<NetworkEvent>,
    events_closed: bool,
    /// Events waiting for room in the event channel.
    outbox: VecDeque<NetworkEvent>,
    topics: Topics,
    limits: Limits,
    /// Replies owed to `request` callers.
    pending_requests: HashMap<OutboundRequestId, Reply<Vec<u8>>>,
    dials: HashMap<ConnectionId, DialPurpose>,
    peers: HashMap<PeerId, PeerRecord>,
    address_targets: Vec<AddressTarget>,
    metrics: NetworkMetrics,
    /// The allow list, if any (the `allowed` behaviour enforces it; this copy decides what
    /// not to dial).
    allowed: Option<HashSet<PeerId>>,
    /// Blocked peers and when each block ends (the `blocked` behaviour enforces them).
    blocks: HashMap<PeerId, Instant>,
    private_network: bool,
    /// The peers connected to, with an address to dial them at, saved to `book_path` at most
    /// every [`PEER_BOOK_SAVE_INTERVAL`] when it changed, and when the loop stops.
    book: PeerBook,
    book_path: Option<PathBuf>,
    book_changed: bool,
    book_saved_at: Instant,
}

impl EventLoop {
    /// Drives the network until `shutdown` completes; then drops every connection and
    /// listener. Callers still waiting get [`NetworkError::Stopped`].
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut redial_tick = tokio::time::interval(REDIAL_TICK);
        redial_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // A second handle on the event channel, so that a reserved slot does not borrow `self`.
        let events = self.events.clone();
        self.redial_due();
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                event = self.swarm.select_next_some() => self.handle_swarm_event(event),
                command = self.commands.recv(), if !self.commands_closed => match command {
                    Some(command) => self.handle_command(command),
                    None => self.commands_closed = true,
                },
                permit = events.reserve(), if !self.outbox.is_empty() && !self.events_closed => {
                    match permit {
                        Ok(permit) => {
                            if let Some(event) = self.outbox.pop_front() {
                                permit.send(event);
                            }
                        }
                        Err(_) => self.close_events(),
                    }
                }
                _ = redial_tick.tick() => {
                    self.expire_blocks();
                    self.redial_due();
                    if self.book_saved_at.elapsed() >= PEER_BOOK_SAVE_INTERVAL {
                        self.save_peer_book();
                    }
                }
            }
        }
        // Peers still connected were seen now, however old their entries are.
        let connected: Vec<(PeerId, Multiaddr)> = self
            .peers
            .iter()
            .filter(|(_, record)| record.connections > 0)
            .filter_map(|(peer, record)| Some((*peer, record.addresses.first()?.clone())))
            .collect();
        for (peer, address) in connected {
            self.note_in_book(peer, &address);
        }
        self.save_peer_book();
        tracing::info!(peer = %self.swarm.local_peer_id(), "network event loop stopped");
    }

    fn save_peer_book(&mut self) {
        self.book_saved_at = Instant::now();
        let Some(path) = &self.book_path else { return };
        if !self.book_changed {
            return;
        }
        match self.book.save(path, unix_seconds()) {
            Ok(()) => self.book_changed = false,
            Err(error) => tracing::warn!(path = %path.display(), %error, "could not save the peer book"),
        }
    }

    fn note_in_book(&mut self, peer: PeerId, address: &Multiaddr) {
        if is_dialable(address) && peer != *self.swarm.local_peer_id() {
            self.book.note(peer, address.clone(), unix_seconds());
            self.book_changed = true;
        }
    }

    /// A member of the cluster that discovery found: keep it connected, like a bootstrap peer.
    fn learn_peer(&mut self, peer: PeerId, addresses: Vec<Multiaddr>) {
        if peer == *self.swarm.local_peer_id()
            || self.allowed.as_ref().is_some_and(|allowed| !allowed.contains(&peer))
            || self.blocks.contains_key(&peer)
        {
            return;
        }
        let addresses: Vec<Multiaddr> = addresses
            .into_iter()
            .map(|address| split_peer_id(&address).0)
            .filter(is_dialable)
            .collect();
        if addresses.is_empty() {
            return;
        }
        let record = self.peers.entry(peer).or_insert_with(PeerRecord::new);
        for address in addresses {
            record.add_address(address);
        }
        if !record.redial {
            tracing::info!(%peer, "discovered a cluster member");
            record.redial = true;
            record.backoff.due_now();
        }
    }

    fn add_bootstrap(&mut self, address: Multiaddr) {
        let (plain, peer) = split_peer_id(&address);
        match peer {
            Some(peer) if peer == *self.swarm.local_peer_id() => {
                tracing::warn!(%address, "bootstrap address is this node itself; skipped");
            }
            Some(peer) if self.allowed.as_ref().is_some_and(|allowed| !allowed.contains(&peer)) => {
                tracing::warn!(%address, "bootstrap peer {peer} is not on the allow list; not dialing it");
            }
            Some(peer) => {
                self.swarm.add_peer_address(peer, plain.clone());
                let record = self.peers.entry(peer).or_insert_with(PeerRecord::new);
                record.add_address(plain);
                record.redial = true;
                record.backoff.due_now();
            }
            None => {
                let mut backoff = Backoff::new();
                backoff.due_now();
                self.address_targets.push(AddressTarget {
                    address: plain,
                    peer: None,
                    enabled: true,
                    dialing: None,
                    backoff,
                });
            }
        }
    }

    // -- events to the caller ------------------------------------------------------------------

    fn queue_event(&mut self, event: NetworkEvent) {
        if self.events_closed {
            self.discard_event(event);
            return;
        }
        let mut event = event;
        if self.outbox.is_empty() {
            match self.events.try_send(event) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(returned)) => event = returned,
                Err(mpsc::error::TrySendError::Closed(returned)) => {
                    self.close_events();
                    self.discard_event(returned);
                    return;
                }
            }
        }
        let droppable = matches!(event, NetworkEvent::Gossip { .. } | NetworkEvent::Request { .. });
        if droppable && self.outbox.len() >= EVENT_BACKLOG_LIMIT {
            self.metrics.reject("event_backlog");
            tracing::warn!("event backlog full: dropping an incoming message");
            self.discard_event(event);
            return;
        }
        self.outbox.push_back(event);
    }

    fn close_events(&mut self) {
        if !self.events_closed {
            tracing::warn!("network event receiver dropped: incoming gossip and requests are ignored");
        }
        self.events_closed = true;
        for event in std::mem::take(&mut self.outbox) {
            self.discard_event(event);
        }
    }

    /// An event nobody will see: gossip is released without forwarding, a request goes
    /// unanswered (the remote sees its stream closed).
    fn discard_event(&mut self, event: NetworkEvent) {
        if let NetworkEvent::Gossip {
            message_id,
            propagation_source,
            ..
        } = event
        {
            self.swarm.behaviour_mut().gossipsub.report_message_validation_result(
                &message_id,
                &propagation_source,
                MessageAcceptance::Ignore,
            );
        }
    }

    // -- commands ------------------------------------------------------------------------------

    fn handle_command(&mut self, command: Command) {
        match command {
            Command::Publish { topic, data, reply } => {
                let _ = reply.send(self.publish(topic, data));
            }
            Command::Request { peer, data, reply } => {
                if data.len() > self.limits.max_request_bytes {
                    self.metrics.request_outcome(OUTBOUND, "too_large");
                    let _ = reply.send(Err(NetworkError::RequestTooLarge {
                        size: data.len(),
                        limit: self.limits.max_request_bytes,
                    }));
                    return;
                }
                self.metrics
                    .request_bytes
                    .get_or_create(&DirectionLabels { direction: OUTBOUND })
                    .inc_by(data.len() as u64);
                let request_id = self.swarm.behaviour_mut().sync.send_request(&peer, data);
                self.pending_requests.insert(request_id, reply);
            }
            Command::Respond { channel, data, reply } => {
                let peer = channel.peer;
                let size = data.len();
                let result = if size > self.limits.max_response_bytes {
                    Err(NetworkError::ResponseTooLarge {
                        size,
                        limit: self.limits.max_response_bytes,
                    })
                } else {
                    match self.swarm.behaviour_mut().sync.send_response(channel.channel, data) {
                        Ok(()) => {
                            self.metrics
                                .response_bytes
                                .get_or_create(&DirectionLabels { direction: OUTBOUND })
                                .inc_by(size as u64);
                            Ok(())
                        }
                        Err(_) => Err(NetworkError::ResponseChannelClosed { peer }),
                    }
                };
                let _ = reply.send(result);
            }
            Command::ReportValidation {
                message_id,
                source,
                valid,
                reply,
            } => {
                let acceptance = if valid {
                    MessageAcceptance::Accept
                } else {
                    MessageAcceptance::Reject
                };
                let known = self.swarm.behaviour_mut().gossipsub.report_message_validation_result(
                    &message_id,
                    &source,
                    acceptance,
                );
                if !known {
                    tracing::debug!(%message_id, "validation reported for a message no longer cached");
                }
                let _ = reply.send(Ok(()));
            }
            Command::Dial { address, reply } => self.dial_command(address, reply),
            Command::Disconnect { peer, reply } => {
                if let Some(record) = self.peers.get_mut(&peer) {
                    record.redial = false;
                    record.backoff.cancel();
                }
                for target in &mut self.address_targets {
                    if target.peer == Some(peer) {
                        target.enabled = false;
                        target.backoff.cancel();
                    }
                }
                let result = self
                    .swarm
                    .disconnect_peer_id(peer)
                    .map_err(|()| NetworkError::NotConnected(peer));
                let _ = reply.send(result);
            }
            Command::ListenAddresses { reply } => {
                let _ = reply.send(Ok(self.swarm.listeners().cloned().collect()));
            }
            Command::Peers { reply } => {
                let peers = self
                    .peers
                    .iter()
                    .filter_map(|(peer_id, record)| {
                        let (_, since) = record.connected_at?;
                        Some(PeerInfo {
                            peer_id: *peer_id,
                            addresses: record.addresses.clone(),
                            connected_since: since,
                            connections: record.connections,
                            agent_version: record.agent_version.clone(),
                            protocol_version: record.protocol_version.clone(),
                            observed_address: record.observed_address.clone(),
                        })
                    })
                    .collect();
                let _ = reply.send(Ok(peers));
            }
            Command::Block {
                peer,
                duration,
                reason,
                reply,
            } => {
                let _ = reply.send(self.block(peer, duration, &reason));
            }
            Command::Unblock { peer, reply } => {
                let was_blocked = self.lift_block(peer);
                if was_blocked {
                    tracing::info!(%peer, "block lifted on request");
                }
                let _ = reply.send(Ok(was_blocked));
            }
            Command::BlockedPeers { reply } => {
                let now = Instant::now();
                let mut blocked: Vec<(PeerId, Duration)> = self
                    .blocks
                    .iter()
                    .map(|(peer, until)| (*peer, until.saturating_duration_since(now)))
                    .filter(|(_, left)| !left.is_zero())
                    .collect();
                blocked.sort_by_key(|(_, left)| *left);
                let _ = reply.send(Ok(blocked));
            }
        }
    }

    // -- blocking ------------------------------------------------------------------------------

    fn block(&mut self, peer: PeerId, duration: Duration, reason: &str) -> Result<(), NetworkError> {
        if peer == *self.swarm.local_peer_id() {
            return Err(NetworkError::InvalidArgument(
                "a node cannot block its own peer id".into(),
            ));
        }
        if duration.is_zero() {
            return Err(NetworkError::InvalidArgument(
                "the block duration must be positive".into(),
            ));
        }
        let duration = duration.min(MAX_BLOCK_DURATION);
        let until = Instant::now() + duration;
        let end = self.blocks.entry(peer).or_insert(until);
        *end = (*end).max(until);
        // Closes the peer's connections when newly blocked; closing again does no harm.
        self.swarm.behaviour_mut().blocked.block_peer(peer);
        let _ = self.swarm.disconnect_peer_id(peer);
        self.metrics.peers_blocked.inc();
        self.metrics.blocked_peers.set(self.blocks.len() as i64);
        tracing::warn!("blocked peer {peer} for {} s: {reason}", seconds(duration));
        Ok(())
    }

    /// Ends a block; the peer is redialed at once if it is one to keep connected.
    fn lift_block(&mut self, peer: PeerId) -> bool {
        self.swarm.behaviour_mut().blocked.unblock_peer(peer);
        if self.blocks.remove(&peer).is_none() {
            return false;
        }
        self.metrics.blocked_peers.set(self.blocks.len() as i64);
        if let Some(record) = self.peers.get_mut(&peer) {
            if record.redial && record.connections == 0 && record.dialing.is_none() {
                record.backoff.reset();
                record.backoff.due_now();
            }
        }
        for target in &mut self.address_targets {
            if target.enabled && target.peer == Some(peer) && target.dialing.is_none() {
                target.backoff.reset();
                target.backoff.due_now();
            }
        }
        true
    }

    fn expire_blocks(&mut self) {
        if self.blocks.is_empty() {
            return;
        }
        let now = Instant::now();
        let expired: Vec<PeerId> = self
            .blocks
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(peer, _)| *peer)
            .collect();
        for peer in expired {
            self.lift_block(peer);
            tracing::info!(%peer, "block expired");
        }
    }

    fn publish(&mut self, topic: Topic, data: Vec<u8>) -> Result<(), NetworkError> {
        let size = data.len();
        if size > self.limits.max_gossip_bytes {
            return Err(NetworkError::GossipTooLarge {
                size,
                limit: self.limits.max_gossip_bytes,
            });
        }
        let hash = self.topics.get(topic).hash();
        let skipped = |reason| SkipLabels {
            topic: topic.name(),
            reason,
        };
        match self.swarm.behaviour_mut().gossipsub.publish(hash, data) {
            Ok(_) => {
                self.metrics.gossip(topic, OUTBOUND, size);
                Ok(())
            }
            Err(PublishError::NoPeersSubscribedToTopic) => {
                tracing::debug!(%topic, "published with no subscribed peer yet");
                self.metrics.publish_skipped.get_or_create(&skipped("no_peers")).inc();
                Ok(())
            }
            Err(PublishError::Duplicate) => {
                tracing::debug!(%topic, "publication is a duplicate of a recent one");
                self.metrics.publish_skipped.get_or_create(&skipped("duplicate")).inc();
                Ok(())
            }
            Err(PublishError::MessageTooLarge) => Err(NetworkError::GossipTooLarge {
                size,
                limit: self.limits.max_gossip_bytes,
            }),
            Err(error) => {
                tracing::warn!(%topic, %error, "publish failed");
                Err(NetworkError::Publish {
                    topic,
                    reason: error.to_string(),
                })
            }
        }
    }

    fn dial_command(&mut self, address: Multiaddr, reply: Reply<()>) {
        let (plain, peer) = split_peer_id(&address);
        let options = match peer {
            Some(peer) => {
                if self.swarm.is_connected(&peer) {
                    let _ = reply.send(Ok(()));
                    return;
                }
                self.swarm.add_peer_address(peer, plain.clone());
                DialOpts::peer_id(peer).addresses(vec![plain]).build()
            }
            None => DialOpts::unknown_peer_id().address(plain).build(),
        };
        let connection_id = options.connection_id();
        match self.swarm.dial(options) {
            Ok(()) => {
                self.dials.insert(connection_id, DialPurpose::Command(address, reply));
            }
            // Already being dialed by someone else: the peer will be connected shortly.
            Err(DialError::DialPeerConditionFalse(_)) => {
                let _ = reply.send(Ok(()));
            }
            Err(error) => {
                if let DialError::Denied { cause } = &error {
                    record_refusal(&self.metrics, &self.blocks, peer, OUTBOUND, cause);
                } else {
                    tracing::warn!(%address, %error, "dial failed");
                }
                let _ = reply.send(Err(NetworkError::Dial {
                    address,
                    reason: describe_dial_error(&error),
                }));
            }
        }
    }

    // -- redial --------------------------------------------------------------------------------

    fn redial_due(&mut self) {
        let now = Instant::now();

        for index in 0..self.address_targets.len() {
            let target = &mut self.address_targets[index];
            if !target.enabled || target.dialing.is_some() || !target.backoff.is_due(now) {
                continue;
            }
            if target.peer.is_some_and(|peer| self.swarm.is_connected(&peer)) {
                target.backoff.cancel();
                continue;
            }
            // Stays due: dialed as soon as the block ends.
            if target
                .peer
                .is_some_and(|peer| !may_dial(&self.allowed, &self.blocks, &peer))
            {
                continue;
            }
            let options = DialOpts::unknown_peer_id().address(target.address.clone()).build();
            let connection_id = options.connection_id();
            target.backoff.cancel();
            match self.swarm.dial(options) {
                Ok(()) => {
                    target.dialing = Some(connection_id);
                    self.dials.insert(connection_id, DialPurpose::Address(index));
                }
                Err(error) => {
                    let wait = target.backoff.schedule(now);
                    if let DialError::Denied { cause } = &error {
                        record_refusal(&self.metrics, &self.blocks, target.peer, OUTBOUND, cause);
                    }
                    tracing::warn!(address = %target.address, %error, ?wait, "could not dial bootstrap address");
                }
            }
        }

        let covered: HashSet<PeerId> = self
            .address_targets
            .iter()
            .filter(|target| target.enabled)
            .filter_map(|target| target.peer)
            .collect();
        for (peer, record) in &mut self.peers {
            if !record.redial || record.dialing.is_some() || record.connections > 0 || !record.backoff.is_due(now) {
                continue;
            }
            // Stays due: redialed as soon as the block ends.
            if !may_dial(&self.allowed, &self.blocks, peer) {
                continue;
            }
            record.backoff.cancel();
            if covered.contains(peer) {
                continue;
            }
            if record.addresses.is_empty() {
                tracing::debug!(%peer, "no known address to redial");
                continue;
            }
            let options = DialOpts::peer_id(*peer)
                .addresses(record.addresses.clone())
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build();
            let connection_id = options.connection_id();
            match self.swarm.dial(options) {
                Ok(()) => {
                    tracing::debug!(%peer, "redialing");
                    record.dialing = Some(connection_id);
                    self.dials.insert(connection_id, DialPurpose::Peer(*peer));
                }
                Err(DialError::DialPeerConditionFalse(_)) => {
                    // Connected or being dialed already; the outcome of that reschedules us.
                }
                Err(error) => {
                    let wait = record.backoff.schedule(now);
                    if let DialError::Denied { cause } = &error {
                        record_refusal(&self.metrics, &self.blocks, Some(*peer), OUTBOUND, cause);
                    }
                    tracing::warn!(%peer, %error, ?wait, "could not redial peer");
                }
            }
        }
    }

    // -- swarm events --------------------------------------------------------------------------

    fn handle_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        self.metrics.libp2p.record(&event);
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(event)) => {
                self.metrics.libp2p.record(&event);
                self.handle_gossip_event(event);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Sync(event)) => self.handle_sync_event(event),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(event)) => {
                self.metrics.libp2p.record(&event);
                self.handle_identify_event(event);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kademlia(event)) => {
                self.metrics.libp2p.record(&event);
                if let kad::Event::RoutingUpdated { peer, addresses, .. } = event {
                    self.learn_peer(peer, addresses.into_vec());
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(event)) => {
                self.metrics.libp2p.record(&event);
                if let Err(error) = &event.result {
                    tracing::debug!(peer = %event.peer, %error, "ping failed");
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => self.on_connection_established(peer_id, connection_id, &endpoint, num_established.get()),
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                cause,
                ..
            } => {
                if num_established == 0 {
                    match &cause {
                        Some(cause) => tracing::info!(peer = %peer_id, %cause, "disconnected"),
                        None => tracing::info!(peer = %peer_id, "disconnected"),
                    }
                }
                self.on_connection_closed(peer_id, num_established);
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => {
                if let DialError::Denied { cause } = &error {
                    record_refusal(&self.metrics, &self.blocks, peer_id, OUTBOUND, cause);
                }
                self.on_dial_failure(connection_id, peer_id, error)
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                peer_id,
                ..
            } => match &error {
                ListenError::Denied { cause } => {
                    record_refusal(&self.metrics, &self.blocks, peer_id, INBOUND, cause);
                }
                ListenError::Transport(_) => {
                    self.metrics.inbound_handshake_failures.inc();
                    if self.private_network {
                        tracing::warn!(from = %send_back_addr, %error, "incoming connection failed before authentication (a peer without this pre-shared key?)");
                    } else {
                        tracing::warn!(from = %send_back_addr, %error, "incoming connection failed before authentication");
                    }
                }
                _ => {
                    tracing::warn!(from = %send_back_addr, %error, "incoming connection failed");
                }
            },
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, peer = %self.swarm.local_peer_id(), "listening");
                self.queue_event(NetworkEvent::Listening(address));
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                tracing::info!(%address, "listen address expired");
            }
            SwarmEvent::ListenerClosed {
                addresses,
                reason: Err(error),
                ..
            } => {
                tracing::warn!(?addresses, %error, "listener closed");
            }
            SwarmEvent::ListenerError { error, .. } => {
                tracing::warn!(%error, "listener error");
            }
            _ => {}
        }
    }

    fn on_connection_established(
        &mut self,
        peer: PeerId,
        connection_id: ConnectionId,
        endpoint: &ConnectedPoint,
        num_established: u32,
    ) {
        match self.dials.remove(&connection_id) {
            Some(DialPurpose::Address(index)) => {
                if let Some(target) = self.address_targets.get_mut(index) {
                    target.dialing = None;
                    target.peer = Some(peer);
                    target.backoff.cancel();
                }
            }
            Some(DialPurpose::Command(_, reply)) => {
                let _ = reply.send(Ok(()));
            }
            Some(DialPurpose::Peer(_)) | None => {}
        }
        for target in &mut self.address_targets {
            if target.peer == Some(peer) {
                target.enabled = true;
                target.backoff.cancel();
            }
        }

        let record = self.peers.entry(peer).or_insert_with(PeerRecord::new);
        if record.dialing == Some(connection_id) {
            record.dialing = None;
        }
        record.connections = num_established;
        record.redial = true;
        record.backoff.cancel();
        if let ConnectedPoint::Dialer { address, .. } = endpoint {
            let (plain, _) = split_peer_id(address);
            record.add_address(plain.clone());
            self.note_in_book(peer, &plain);
        }
        let record = self.peers.entry(peer).or_insert_with(PeerRecord::new);
        if num_established == 1 {
            record.connected_at = Some((Instant::now(), SystemTime::now()));
            tracing::info!(%peer, address = %endpoint.get_remote_address(), "connected");
            self.queue_event(NetworkEvent::PeerConnected(peer));
        }
        self.update_connected_gauge();
    }

    fn on_connection_closed(&mut self, peer: PeerId, num_established: u32) {
        let now = Instant::now();
        if let Some(record) = self.peers.get_mut(&peer) {
            record.connections = num_established;
            if num_established == 0 {
                let lived = record
                    .connected_at
                    .take()
                    .map(|(since, _)| now.saturating_duration_since(since));
                if record.redial && record.dialing.is_none() {
                    if lived.is_some_and(|lived| lived >= STABLE_CONNECTION) {
                        record.backoff.reset();
                    }
                    let wait = record.backoff.schedule(now);
                    tracing::debug!(%peer, ?wait, "will redial");
                }
            }
        }
        if num_established == 0 {
            for target in &mut self.address_targets {
                if target.enabled && target.peer == Some(peer) && target.dialing.is_none() {
                    target.backoff.schedule(now);
                }
            }
            self.queue_event(NetworkEvent::PeerDisconnected(peer));
        }
        self.update_connected_gauge();
    }

    fn on_dial_failure(&mut self, connection_id: ConnectionId, peer: Option<PeerId>, error: DialError) {
        let now = Instant::now();
        match self.dials.remove(&connection_id) {
            Some(DialPurpose::Address(index)) => {
                if let Some(target) = self.address_targets.get_mut(index) {
                    target.dialing = None;
                    if let DialError::LocalPeerId { .. } = error {
                        tracing::warn!(address = %target.address, "bootstrap address is this node itself; not redialing");
                        target.enabled = false;
                    } else {
                        let wait = target.backoff.schedule(now);
                        tracing::warn!(address = %target.address, %error, ?wait, "bootstrap dial failed");
                    }
                }
            }
            Some(DialPurpose::Peer(peer)) => {
                if let Some(record) = self.peers.get_mut(&peer) {
                    if record.dialing == Some(connection_id) {
                        record.dialing = None;
                    }
                    if let DialError::WrongPeerId { address, obtained } = &error {
                        let (plain, _) = split_peer_id(address);
                        record.addresses.retain(|known| *known != plain);
                        tracing::warn!(%peer, %address, %obtained, "another peer answers at this address; forgetting it");
                    }
                    if record.connections == 0 && record.redial {
                        let wait = record.backoff.schedule(now);
                        tracing::warn!(%peer, %error, ?wait, "redial failed");
                    }
                }
            }
            Some(DialPurpose::Command(address, reply)) => {
                tracing::warn!(%address, %error, "dial failed");
                let _ = reply.send(Err(NetworkError::Dial {
                    address,
                    reason: describe_dial_error(&error),
                }));
            }
            None => match peer {
                Some(peer) => tracing::warn!(%peer, %error, "outgoing connection failed"),
                None => tracing::warn!(%error, "outgoing connection failed"),
            },
        }
    }

    fn update_connected_gauge(&mut self) {
        let connected = self.swarm.connected_peers().count();
        self.metrics.connected_peers.set(connected as i64);
    }

    fn handle_identify_event(&mut self, event: identify::Event) {
        match event {
            identify::Event::Received { peer_id, info, .. } => {
                let mut announced = Vec::new();
                for address in info.listen_addrs {
                    let (plain, claimed) = split_peer_id(&address);
                    if claimed.is_some_and(|claimed| claimed != peer_id) || !is_dialable(&plain) {
                        continue;
                    }
                    announced.push(plain);
                }
                for address in &announced {
                    self.swarm.add_peer_address(peer_id, address.clone());
                    self.swarm
                        .behaviour_mut()
                        .kademlia
                        .add_address(&peer_id, address.clone());
                }
                if let Some(first) = announced.first() {
                    self.note_in_book(peer_id, first);
                }
                let record = self.peers.entry(peer_id).or_insert_with(PeerRecord::new);
                for address in announced {
                    record.add_address(address);
                }
                record.agent_version = Some(info.agent_version);
                record.protocol_version = Some(info.protocol_version);
                record.observed_address = Some(info.observed_addr);
            }
            identify::Event::Error { peer_id, error, .. } => {
                tracing::debug!(peer = %peer_id, %error, "identify failed");
            }
            _ => {}
        }
    }

    fn handle_gossip_event(&mut self, event: gossipsub::Event) {
        match event {
            gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            } => {
                let Some(topic) = self.topics.lookup(&message.topic) else {
                    self.metrics.reject("foreign_topic");
                    tracing::debug!(topic = %message.topic, "ignoring gossip of another cluster");
                    self.swarm.behaviour_mut().gossipsub.report_message_validation_result(
                        &message_id,
                        &propagation_source,
                        MessageAcceptance::Ignore,
                    );
                    return;
                };
                if message.data.len() > self.limits.max_gossip_bytes {
                    self.metrics.reject("gossip_too_large");
                    tracing::warn!(peer = %propagation_source, size = message.data.len(), "rejecting oversized gossip");
                    self.swarm.behaviour_mut().gossipsub.report_message_validation_result(
                        &message_id,
                        &propagation_source,
                        MessageAcceptance::Reject,
                    );
                    return;
                }
                self.metrics.gossip(topic, INBOUND, message.data.len());
                self.queue_event(NetworkEvent::Gossip {
                    topic,
                    message_id,
                    propagation_source,
                    author: message.source,
                    data: message.data,
                });
            }
            gossipsub::Event::Subscribed { peer_id, topic, .. } => {
                tracing::debug!(peer = %peer_id, %topic, "peer subscribed");
            }
            gossipsub::Event::Unsubscribed { peer_id, topic } => {
                tracing::debug!(peer = %peer_id, %topic, "peer unsubscribed");
            }
            gossipsub::Event::GossipsubNotSupported { peer_id } => {
                tracing::warn!(peer = %peer_id, "peer does not support gossipsub");
            }
            gossipsub::Event::SlowPeer {
                peer_id,
                failed_messages,
            } => {
                tracing::warn!(peer = %peer_id, ?failed_messages, "peer is too slow for gossip");
            }
            #[allow(unreachable_patterns)]
            _ => {}
        }
    }

    fn handle_sync_event(&mut self, event: request_response::Event<Vec<u8>, Vec<u8>>) {
        match event {
            request_response::Event::Message {
                peer,
                message: request_response::Message::Request { request, channel, .. },
                ..
            } => {
                self.metrics
                    .request_bytes
                    .get_or_create(&DirectionLabels { direction: INBOUND })
                    .inc_by(request.len() as u64);
                self.queue_event(NetworkEvent::Request {
                    peer,
                    data: request,
                    channel: ResponseHandle { peer, channel },
                });
            }
            request_response::Event::Message {
                message: request_response::Message::Response { request_id, response },
                ..
            } => {
                self.metrics
                    .response_bytes
                    .get_or_create(&DirectionLabels { direction: INBOUND })
                    .inc_by(response.len() as u64);
                self.metrics.request_outcome(OUTBOUND, "success");
                if let Some(reply) = self.pending_requests.remove(&request_id) {
                    let _ = reply.send(Ok(response));
                }
            }
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                let (outcome, failure) = match error {
                    OutboundFailure::DialFailure => ("dial_failure", NetworkError::PeerUnreachable { peer }),
                    OutboundFailure::Timeout => ("timeout", NetworkError::RequestTimeout { peer }),
                    OutboundFailure::ConnectionClosed => ("connection_closed", NetworkError::ConnectionClosed { peer }),
                    OutboundFailure::UnsupportedProtocols => {
                        ("unsupported_protocol", NetworkError::UnsupportedProtocol { peer })
                    }
                    OutboundFailure::Io(source) => match frame_too_large(&source) {
                        Some(FrameTooLarge {
                            kind: FrameKind::Response,
                            length,
                            limit,
                        }) => (
                            "response_too_large",
                            NetworkError::OversizedResponse {
                                peer,
                                size: *length,
                                limit: *limit,
                            },
                        ),
                        _ => ("stream_error", NetworkError::Stream { peer, source }),
                    },
                };
                self.metrics.request_outcome(OUTBOUND, outcome);
                tracing::warn!(%peer, error = %failure, "request failed");
                if let Some(reply) = self.pending_requests.remove(&request_id) {
                    let _ = reply.send(Err(failure));
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                let outcome = match &error {
                    request_response::InboundFailure::Timeout => "timeout",
                    request_response::InboundFailure::ConnectionClosed => "connection_closed",
                    request_response::InboundFailure::UnsupportedProtocols => "unsupported_protocol",
                    request_response::InboundFailure::ResponseOmission => "no_response",
                    // Failures to read the request never get here (see `FrameCodec`).
                    request_response::InboundFailure::Io(_) => "stream_error",
                };
                self.metrics.request_outcome(INBOUND, outcome);
                tracing::warn!(%peer, %error, "inbound request failed");
            }
            request_response::Event::ResponseSent { .. } => {
                self.metrics.request_outcome(INBOUND, "success");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tests: real TCP on 127.0.0.1
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;
    use tokio::task::JoinHandle;

    const DEADLINE: Duration = Duration::from_secs(20);

    fn init_tracing() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }

    fn loopback() -> Multiaddr {
        "/ip4/127.0.0.1/tcp/0".parse().expect("valid multiaddr")
    }

    fn config(keypair: &identity::Keypair, bootstrap: Vec<Multiaddr>) -> NetworkConfig {
        let mut config = NetworkConfig::new(keypair.clone(), "test");
        config.listen = vec![loopback()];
        config.bootstrap = bootstrap;
        config
    }

    struct Node {
        client: NetworkClient,
        events: mpsc::Receiver<NetworkEvent>,
        address: Multiaddr,
        registry: Registry,
        shutdown: Option<oneshot::Sender<()>>,
        task: JoinHandle<()>,
    }

    impl Node {
        async fn start(config: NetworkConfig) -> Node {
            let mut registry = Registry::default();
            let (client, mut events, event_loop) = new(config, &mut registry).expect("the network should start");
            let (shutdown, stop) = oneshot::channel::<()>();
            let task = tokio::spawn(event_loop.run(async move {
                let _ = stop.await;
            }));
            let address = wait_for(&mut events, "a listen address", |event| match event {
                NetworkEvent::Listening(address) => Some(address),
                _ => None,
            })
            .await;
            Node {
                client,
                events,
                address,
                registry,
                shutdown: Some(shutdown),
                task,
            }
        }

        fn peer_id(&self) -> PeerId {
            self.client.local_peer_id()
        }

        fn address_with_peer_id(&self) -> Multiaddr {
            self.address.clone().with(Protocol::P2p(self.peer_id()))
        }

        async fn stop(mut self) {
            if let Some(shutdown) = self.shutdown.take() {
                let _ = shutdown.send(());
            }
            tokio::time::timeout(DEADLINE, self.task)
                .await
                .expect("the event loop should stop on shutdown")
                .expect("the event loop task should not panic");
        }

        fn metrics(&self) -> String {
            let mut text = String::new();
            encode(&mut text, &self.registry).expect("metrics encode");
            text
        }

        async fn wait_connected(&mut self, peer: PeerId) {
            wait_for(
                &mut self.events,
                &format!("a connection to {peer}"),
                |event| match event {
                    NetworkEvent::PeerConnected(connected) if connected == peer => Some(()),
                    _ => None,
                },
            )
            .await
        }
    }

    /// Consumes events until `matcher` picks one, failing the test after [`DEADLINE`].
    async fn wait_for<T>(
        events: &mut mpsc::Receiver<NetworkEvent>,
        what: &str,
        mut matcher: impl FnMut(NetworkEvent) -> Option<T>,
    ) -> T {
        let outcome = tokio::time::timeout(DEADLINE, async {
            while let Some(event) = events.recv().await {
                if let Some(found) = matcher(event) {
                    return Some(found);
                }
            }
            None
        })
        .await;
        match outcome {
            Ok(Some(found)) => found,
            Ok(None) => panic!("event channel closed while waiting for {what}"),
            Err(_) => panic!("timed out after {DEADLINE:?} waiting for {what}"),
        }
    }

    /// Answers every request with `response(request)` and accepts every gossip message,
    /// passing gossip on to the returned channel.
    fn serve(
        client: NetworkClient,
        mut events: mpsc::Receiver<NetworkEvent>,
        response: impl Fn(&[u8]) -> Vec<u8> + Send + 'static,
    ) -> mpsc::UnboundedReceiver<(Topic, PeerId, Vec<u8>)> {
        let (gossip_sender, gossip_receiver) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                match event {
                    NetworkEvent::Request { data, channel, .. } => {
                        let answer = response(&data);
                        if let Err(error) = client.respond(channel, answer).await {
                            tracing::warn!(%error, "test responder could not answer");
                        }
                    }
                    NetworkEvent::Gossip {
                        topic,
                        message_id,
                        propagation_source,
                        data,
                        ..
                    } => {
                        client
                            .report_validation(message_id, propagation_source, true)
                            .await
                            .expect("report_validation while running");
                        let _ = gossip_sender.send((topic, propagation_source, data));
                    }
                    _ => {}
                }
            }
        });
        gossip_receiver
    }

    fn big_payload() -> Vec<u8> {
        (0..2 * 1024 * 1024).map(|index: usize| (index % 251) as u8).collect()
    }

    fn answer(request: &[u8]) -> Vec<u8> {
        if request == b"big" {
            big_payload()
        } else {
            format!("got {} bytes", request.len()).into_bytes()
        }
    }

    #[tokio::test]
    async fn request_response_round_trip_and_size_limits() {
        init_tracing();
        let a_key = identity::Keypair::generate_ed25519();
        let a = Node::start(config(&a_key, Vec::new())).await;
        // B may send larger requests than A accepts, so that A's limit is exercised on the wire.
        let b_key = identity::Keypair::generate_ed25519();
        let mut b_config = config(&b_key, vec![a.address_with_peer_id()]);
        b_config.max_request_bytes = 4 * 1024 * 1024;
        let mut b = Node::start(b_config).await;
        b.wait_connected(a.peer_id()).await;
        let a_peer = a.peer_id();
        let Node {
            client: a_client,
            events: a_events,
            ..
        } = a;
        let _gossip = serve(a_client.clone(), a_events, answer);

        let response = b
            .client
            .request(a_peer, b"big".to_vec())
            .await
            .expect("a 2 MiB response fits the 8 MiB limit");
        assert_eq!(response.len(), 2 * 1024 * 1024);
        assert!(response == big_payload(), "response bytes arrive intact");

        // Over A's 1 MiB request limit: A refuses the frame by its length prefix.
        let oversized = vec![0u8; 1024 * 1024 + 1];
        let error = b
            .client
            .request(a_peer, oversized.clone())
            .await
            .expect_err("A must refuse a request over its limit");
        assert!(
            matches!(error, NetworkError::Stream { peer, .. } if peer == a_peer),
            "expected a stream failure, got: {error}"
        );
        let a_metrics = {
            let mut text = String::new();
            encode(&mut text, &a.registry).expect("metrics encode");
            text
        };
        assert!(
            a_metrics.contains(r#"mailmesh_net_frames_rejected_total{reason="request_too_large"} 1"#)
                && a_metrics.contains(r#"mailmesh_net_requests_total{direction="inbound",outcome="too_large"} 1"#),
            "A counted the refused frame:\n{a_metrics}"
        );
        // Locally, a request over our own limit never leaves the node.
        let error = a_client
            .request(b.peer_id(), oversized)
            .await
            .expect_err("a request over the local limit must fail");
        assert!(
            matches!(error, NetworkError::RequestTooLarge { size, limit } if size == 1024 * 1024 + 1 && limit == 1024 * 1024),
            "expected RequestTooLarge, got: {error}"
        );

        // The connection still works, for a request right at the limit.
        let response = b
            .client
            .request(a_peer, vec![1u8; 1024 * 1024])
            .await
            .expect("a request at the limit after a refused one");
        assert_eq!(response, b"got 1048576 bytes");

        let peers = b.client.peers().await.expect("peers");
        let a_info = peers
            .iter()
            .find(|info| info.peer_id == a_peer)
            .expect("A is still connected to B");
        assert!(a_info.connections >= 1);
        assert!(!a_info.addresses.is_empty(), "B knows an address of A");
        assert!(
            a_info
                .agent_version
                .as_deref()
                .is_some_and(|agent| agent.starts_with("mailmesh/")),
            "identify reported A's agent: {a_info:?}"
        );

        let metrics = b.metrics();
        assert!(
            metrics.contains(r#"mailmesh_net_requests_total{direction="outbound",outcome="success"} 2"#),
            "outbound successes counted:\n{metrics}"
        );
        assert!(metrics.contains(r#"mailmesh_net_connected_peers 1"#), "{metrics}");
        assert!(
            metrics.contains("libp2p_swarm_connections_established_total"),
            "{metrics}"
        );
        b.stop().await;
    }

    #[tokio::test]
    async fn gossip_reaches_a_peer_two_hops_away() {
        init_tracing();
        // A and C allow only B: discovery would otherwise connect them directly (B tells each
        // of the other), and then the gossip would not need two hops.
        let b_key = identity::Keypair::generate_ed25519();
        let only_b = || {
            let mut allowed = HashSet::new();
            allowed.insert(b_key.public().to_peer_id());
            Some(allowed)
        };
        let mut a_config = config(&identity::Keypair::generate_ed25519(), Vec::new());
        a_config.allowed_peers = only_b();
        let a = Node::start(a_config).await;
        let mut b = Node::start(config(&b_key, vec![a.address_with_peer_id()])).await;
        let mut c_config = config(&identity::Keypair::generate_ed25519(), vec![b.address_with_peer_id()]);
        c_config.allowed_peers = only_b();
        let c = Node::start(c_config).await;
        b.wait_connected(a.peer_id()).await;
        b.wait_connected(c.peer_id()).await;
        let (a_peer, b_peer, c_peer) = (a.peer_id(), b.peer_id(), c.peer_id());
        let a_client = a.client.clone();
        let c_registry = c.registry;
        let _a_gossip = serve(a.client, a.events, answer);
        let _b_gossip = serve(b.client, b.events, answer);
        let mut c_gossip = serve(c.client.clone(), c.events, answer);

        let deadline = Instant::now() + DEADLINE;
        let mut attempt = 0u32;
        let (topic, source, data) = loop {
            assert!(
                Instant::now() < deadline,
                "timed out after {DEADLINE:?} waiting for A's gossip to reach C through B"
            );
            attempt += 1;
            // Each attempt differs: content ids would turn a repeat into a duplicate.
            a_client
                .publish(Topic::Operations, format!("operation {attempt}").into_bytes())
                .await
                .expect("publishing never fails for lack of peers");
            if let Ok(Some(received)) = tokio::time::timeout(Duration::from_millis(500), c_gossip.recv()).await {
                break received;
            }
        };
        assert_eq!(topic, Topic::Operations);
        assert_eq!(source, b_peer, "C only hears from B");
        assert!(data.starts_with(b"operation "), "payload intact");

        let peers = c.client.peers().await.expect("peers");
        assert!(
            peers.iter().all(|info| info.peer_id != a_peer),
            "C is not connected to A directly"
        );
        let mut metrics = String::new();
        encode(&mut metrics, &c_registry).expect("metrics encode");
        assert!(
            metrics.contains(r#"mailmesh_net_gossip_messages_total{topic="operations",direction="inbound"}"#),
            "inbound gossip counted on C:\n{metrics}"
        );
        assert!(metrics.contains("gossipsub_"), "gossipsub's own metrics registered");
        let _ = c_peer;
    }

    /// B is connected to A; A shuts down; a new A with the same keypair and port comes back;
    /// B reconnects by itself (redial with backoff).
    async fn restart_and_reconnect(bootstrap_with_peer_id: bool) {
        init_tracing();
        let a_key = identity::Keypair::generate_ed25519();
        let a = Node::start(config(&a_key, Vec::new())).await;
        let a_peer = a.peer_id();
        let a_address = a.address.clone();
        let bootstrap = if bootstrap_with_peer_id {
            a.address_with_peer_id()
        } else {
            a.address.clone()
        };
        let mut b = Node::start(config(&identity::Keypair::generate_ed25519(), vec![bootstrap])).await;
        b.wait_connected(a_peer).await;

        let failed_dials = family_sum(&b.metrics(), OUTGOING_CONNECTION_ERRORS);
        a.stop().await;
        wait_for(&mut b.events, "B to notice A is gone", |event| match event {
            NetworkEvent::PeerDisconnected(peer) if peer == a_peer => Some(()),
            _ => None,
        })
        .await;
        // At least one redial fails before A is back, so that the backoff is exercised.
        wait_for_family(&b, OUTGOING_CONNECTION_ERRORS, failed_dials + 1).await;

        let mut restarted_config = config(&a_key, Vec::new());
        restarted_config.listen = vec![a_address];
        let restarted = Node::start(restarted_config).await;
        b.wait_connected(a_peer).await;
        let _gossip = serve(restarted.client, restarted.events, answer);
        let response = b
            .client
            .request(a_peer, b"hello".to_vec())
            .await
            .expect("a request to the restarted A");
        assert_eq!(response, b"got 5 bytes");
    }

    /// Found measuring a heal through a counting relay: a node whose peer book named the peer
    /// found at its bootstrap address dialed that address twice at start, for two connections
    /// and two sets of handshakes.
    #[tokio::test]
    async fn a_peer_book_entry_at_a_bootstrap_address_is_not_dialed_twice() {
        init_tracing();
        let a = Node::start(config(&identity::Keypair::generate_ed25519(), Vec::new())).await;
        let a_peer = a.peer_id();
        let directory = tempfile::tempdir().expect("a temporary directory");
        let path = directory.path().join("peers");
        let b_key = identity::Keypair::generate_ed25519();
        let b_config = || {
            let mut config = config(&b_key, vec![a.address.clone()]);
            config.peer_book = Some(path.clone());
            config
        };
        let mut b = Node::start(b_config()).await;
        b.wait_connected(a_peer).await;
        b.stop().await;
        assert!(path.exists(), "the peer book was written at stop");
        let mut b = Node::start(b_config()).await;
        b.wait_connected(a_peer).await;
        // Two dials would have started together; watch long enough for a second one to land.
        let watch_until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < watch_until {
            let peers = b.client.peers().await.expect("peers");
            let connections = peers
                .iter()
                .find(|peer| peer.peer_id == a_peer)
                .map(|peer| peer.connections)
                .unwrap_or(0);
            assert!(connections <= 1, "{connections} connections to the bootstrap peer");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn peer_reconnects_after_restart() {
        restart_and_reconnect(true).await;
    }

    #[tokio::test]
    async fn bootstrap_address_without_peer_id_reconnects_after_restart() {
        restart_and_reconnect(false).await;
    }

    #[tokio::test]
    async fn bootstrap_without_peer_id_connects() {
        init_tracing();
        let a = Node::start(config(&identity::Keypair::generate_ed25519(), Vec::new())).await;
        assert!(
            !a.address.iter().any(|protocol| matches!(protocol, Protocol::P2p(_))),
            "the listen address carries no peer id"
        );
        let mut b = Node::start(config(&identity::Keypair::generate_ed25519(), vec![a.address.clone()])).await;
        b.wait_connected(a.peer_id()).await;
        let listen = b.client.listen_addresses().await.expect("listen addresses");
        assert_eq!(listen, vec![b.address.clone()]);
    }

    #[tokio::test]
    async fn nodes_listing_each_other_do_not_spin() {
        init_tracing();
        // Each dials the other at once: B has A as a bootstrap peer, and A dials B as soon as B
        // listens. Both listen on port 0 and report their address (no port is reserved by binding
        // and releasing it, which another process could take in between).
        let mut a = Node::start(config(&new_key(), Vec::new())).await;
        let b = Node::start(config(&new_key(), vec![a.address_with_peer_id()])).await;
        // B's own dial may have connected first; either way A now holds B as a peer to redial.
        let _ = a.client.dial(b.address_with_peer_id()).await;
        a.wait_connected(b.peer_id()).await;
        // Four gossip heartbeats (one a second) of A's event loop, which runs its redial ticks
        // (every 250 ms) too: a link that flapped would have been redialed several times by then.
        let heartbeats = metric(&a.metrics(), GOSSIP_HEARTBEATS);
        wait_for_metric(&a, GOSSIP_HEARTBEATS, heartbeats + 4).await;

        let metrics = a.metrics();
        let established = family_sum(&metrics, "libp2p_swarm_connections_established_total");
        assert!(
            (1..=2).contains(&established),
            "A established {established} connections over four heartbeats; expected 1 or 2:\n{metrics}"
        );
        while let Ok(event) = a.events.try_recv() {
            assert!(
                !matches!(event, NetworkEvent::PeerDisconnected(_)),
                "A lost B while both were up"
            );
        }
    }

    fn registry_text(registry: &Registry) -> String {
        let mut text = String::new();
        encode(&mut text, registry).expect("metrics encode");
        text
    }

    #[tokio::test]
    async fn an_oversized_response_is_refused_counted_and_the_connection_still_serves() {
        init_tracing();
        // A reads responses of at most 1 MiB; B lets itself write 4 MiB and answers "big" with 2.
        let mut a_config = config(&new_key(), Vec::new());
        a_config.max_response_bytes = 1024 * 1024;
        let mut a = Node::start(a_config).await;
        let mut b_config = config(&new_key(), vec![a.address_with_peer_id()]);
        b_config.max_response_bytes = 4 * 1024 * 1024;
        let b = Node::start(b_config).await;
        let b_peer = b.peer_id();
        a.wait_connected(b_peer).await;
        let _b_gossip = serve(b.client, b.events, answer);

        let error = a
            .client
            .request(b_peer, b"big".to_vec())
            .await
            .expect_err("a response over A's limit must be refused");
        assert!(
            matches!(error, NetworkError::OversizedResponse { peer, size, limit }
                if peer == b_peer && size == 2 * 1024 * 1024 && limit == 1024 * 1024),
            "expected OversizedResponse, got: {error}"
        );
        let metrics = a.metrics();
        assert_eq!(
            metric(
                &metrics,
                r#"mailmesh_net_frames_rejected_total{reason="response_too_large"}"#
            ),
            1,
            "{metrics}"
        );
        assert_eq!(
            metric(
                &metrics,
                r#"mailmesh_net_requests_total{direction="outbound",outcome="response_too_large"}"#
            ),
            1,
            "{metrics}"
        );
        // The same connection still carries requests and their answers.
        let response = a
            .client
            .request(b_peer, b"small".to_vec())
            .await
            .expect("a request after a refused response");
        assert_eq!(response, b"got 5 bytes");
    }

    #[tokio::test]
    async fn oversized_gossip_is_refused_counted_and_gossip_still_flows() {
        init_tracing();
        // A takes gossip of at most 1 KiB; B lets itself publish 4 KiB.
        let limit = 1024;
        let mut a_config = config(&new_key(), Vec::new());
        a_config.max_gossip_bytes = limit;
        let mut a = Node::start(a_config).await;
        let mut b_config = config(&new_key(), vec![a.address_with_peer_id()]);
        b_config.max_gossip_bytes = 4 * limit;
        let b = Node::start(b_config).await;
        a.wait_connected(b.peer_id()).await;
        let b_client = b.client.clone();
        let _b_gossip = serve(b.client, b.events, answer);
        let Node {
            client: a_client,
            events: a_events,
            registry: a_registry,
            ..
        } = a;
        let mut a_gossip = serve(a_client, a_events, answer);
        let too_large = r#"mailmesh_net_frames_rejected_total{reason="gossip_too_large"}"#;

        // One byte over, until A has refused one (the first may go out before the mesh forms);
        // then exactly at the limit, until one arrives. Each payload differs: ids are content
        // hashes.
        let deadline = Instant::now() + DEADLINE;
        let mut attempt = 0u64;
        for size in [limit + 1, limit] {
            loop {
                assert!(
                    Instant::now() < deadline,
                    "timed out after {DEADLINE:?} publishing gossip of {size} bytes"
                );
                attempt += 1;
                let mut payload = vec![0u8; size];
                payload[..8].copy_from_slice(&attempt.to_be_bytes());
                b_client
                    .publish(Topic::Operations, payload)
                    .await
                    .expect("B may publish it");
                let delivered = tokio::time::timeout(Duration::from_millis(200), a_gossip.recv()).await;
                if let Ok(Some((_, _, data))) = &delivered {
                    assert!(data.len() <= limit, "A delivered gossip of {} bytes", data.len());
                }
                let done = if size > limit {
                    metric(&registry_text(&a_registry), too_large) >= 1
                } else {
                    matches!(delivered, Ok(Some((_, _, data))) if data.len() == limit)
                };
                if done {
                    break;
                }
            }
        }
        let metrics = registry_text(&a_registry);
        assert!(
            metric(
                &metrics,
                r#"mailmesh_net_gossip_messages_total{topic="operations",direction="inbound"}"#
            ) >= 1,
            "{metrics}"
        );
    }

    #[tokio::test]
    async fn codec_refuses_an_oversized_length_before_reading() {
        let mut wire = futures::io::Cursor::new(u32::MAX.to_be_bytes().to_vec());
        let error = read_frame(&mut wire, FrameKind::Request, 1024)
            .await
            .expect_err("a length over the limit is refused");
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert!(frame_too_large(&error).is_some(), "{error}");

        let mut truncated = 10u32.to_be_bytes().to_vec();
        truncated.extend_from_slice(b"short");
        let mut wire = futures::io::Cursor::new(truncated);
        let error = read_frame(&mut wire, FrameKind::Response, 1024)
            .await
            .expect_err("a truncated frame is refused");
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);

        let mut buffer = futures::io::Cursor::new(Vec::new());
        write_frame(&mut buffer, FrameKind::Request, 1024, b"payload")
            .await
            .expect("write");
        buffer.set_position(0);
        let data = read_frame(&mut buffer, FrameKind::Request, 1024)
            .await
            .expect("read back");
        assert_eq!(data, b"payload");
        let mut sink = futures::io::Cursor::new(Vec::new());
        assert!(write_frame(&mut sink, FrameKind::Request, 4, b"payload").await.is_err());
    }

    // -- access control ------------------------------------------------------------------------

    /// The value of one series in the metrics text (0 when absent).
    fn metric(text: &str, series: &str) -> u64 {
        text.lines()
            .filter_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .filter_map(|value| value.trim().parse::<f64>().ok())
            .map(|value| value as u64)
            .sum()
    }

    /// The sum of every series of a metric family, whatever its labels (0 when absent).
    fn family_sum(text: &str, family: &str) -> u64 {
        text.lines()
            .filter(|line| {
                line.strip_prefix(family)
                    .is_some_and(|rest| rest.starts_with(['{', ' ']))
            })
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|value| value as u64)
            .sum()
    }

    async fn wait_for_family(node: &Node, family: &str, at_least: u64) {
        wait_for_reading(node, family, at_least, family_sum).await
    }

    const OUTGOING_CONNECTION_ERRORS: &str = "libp2p_swarm_outgoing_connection_error_total";
    /// Gossipsub's heartbeat histogram counts the heartbeats the event loop has run.
    const GOSSIP_HEARTBEATS: &str = "gossipsub_heartbeat_duration_count";

    async fn wait_for_metric(node: &Node, series: &str, at_least: u64) {
        wait_for_reading(node, series, at_least, metric).await
    }

    /// Polls the metrics until `read(text, name)` reaches `at_least`, failing after [`DEADLINE`].
    async fn wait_for_reading(node: &Node, series: &str, at_least: u64, read: fn(&str, &str) -> u64) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let text = node.metrics();
            if read(&text, series) >= at_least {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {DEADLINE:?} waiting for {series} >= {at_least}:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Watches events for `period`, failing if any of `refused` connects.
    async fn assert_never_connected(
        events: &mut mpsc::Receiver<NetworkEvent>,
        refused: Vec<PeerId>,
        period: Duration,
        who: &str,
    ) {
        let until = tokio::time::Instant::now() + period;
        loop {
            match tokio::time::timeout_at(until, events.recv()).await {
                Err(_) => return,
                Ok(None) => panic!("{who}: event channel closed"),
                Ok(Some(NetworkEvent::PeerConnected(peer))) if refused.contains(&peer) => {
                    panic!("{who} connected to {peer}, which must be refused")
                }
                Ok(Some(_)) => {}
            }
        }
    }

    /// Waits for `peer` to connect, failing if any other peer connects first.
    async fn wait_connected_only(node: &mut Node, peer: PeerId) {
        wait_for(
            &mut node.events,
            &format!("a connection to {peer} (and no other)"),
            |event| match event {
                NetworkEvent::PeerConnected(connected) if connected == peer => Some(()),
                NetworkEvent::PeerConnected(other) => panic!("unexpected connection to {other}"),
                _ => None,
            },
        )
        .await
    }

    fn new_key() -> identity::Keypair {
        identity::Keypair::generate_ed25519()
    }

    const REFUSED_NOT_ALLOWED: &str = r#"mailmesh_net_peers_refused_total{reason="not_allowed"}"#;
    const REFUSED_BLOCKED: &str = r#"mailmesh_net_peers_refused_total{reason="blocked"}"#;
    const REFUSED_LIMIT: &str = r#"mailmesh_net_peers_refused_total{reason="connection_limit"}"#;
    const HANDSHAKE_FAILURES: &str = "mailmesh_net_inbound_handshake_failures_total";

    #[tokio::test]
    async fn allow_list_admits_listed_peers_and_refuses_others() {
        init_tracing();
        let (a_key, b_key) = (new_key(), new_key());
        // D is open but not on A's list: A has it as a bootstrap peer and must not dial it.
        let mut d = Node::start(config(&new_key(), Vec::new())).await;
        let mut a_config = config(&a_key, vec![d.address_with_peer_id()]);
        a_config.allowed_peers = Some(HashSet::from([b_key.public().to_peer_id()]));
        let mut a = Node::start(a_config).await;
        let b = Node::start(config(&b_key, vec![a.address_with_peer_id()])).await;
        // C is not on the list and keeps redialing A (backoff 1 s, 2 s, ...).
        let c = Node::start(config(&new_key(), vec![a.address_with_peer_id()])).await;
        let (a_peer, b_peer, c_peer, d_peer) = (a.peer_id(), b.peer_id(), c.peer_id(), d.peer_id());

        wait_connected_only(&mut a, b_peer).await;
        wait_for_metric(&a, REFUSED_NOT_ALLOWED, 1).await;
        // Long enough for C's second attempt; D must never hear from A.
        tokio::join!(
            assert_never_connected(&mut a.events, vec![c_peer, d_peer], Duration::from_secs(3), "A"),
            assert_never_connected(&mut d.events, vec![a_peer], Duration::from_secs(3), "D"),
        );
        let refused = metric(&a.metrics(), REFUSED_NOT_ALLOWED);
        assert!(refused >= 2, "C's redials were refused too: {refused}");

        let peers = a.client.peers().await.expect("peers");
        let connected: Vec<PeerId> = peers.iter().map(|info| info.peer_id).collect();
        assert_eq!(connected, vec![b_peer], "only B is connected to A");

        // An explicit dial of an unlisted peer is refused before any packet leaves.
        let error = a
            .client
            .dial(c.address_with_peer_id())
            .await
            .expect_err("dialing an unlisted peer must fail");
        assert!(
            matches!(&error, NetworkError::Dial { reason, .. } if reason.contains("allow list")),
            "{error}"
        );
        assert_eq!(
            metric(&d.metrics(), "mailmesh_net_connected_peers"),
            0,
            "D never had A connected"
        );
    }

    #[tokio::test]
    async fn pre_shared_key_separates_private_networks() {
        init_tracing();
        let key_one = [0x5au8; PRE_SHARED_KEY_BYTES];
        let mut key_two = key_one;
        key_two[31] ^= 1;
        let private = |bootstrap: Vec<Multiaddr>, key: Option<[u8; PRE_SHARED_KEY_BYTES]>| {
            let mut config = config(&new_key(), bootstrap);
            config.pre_shared_key = key;
            config
        };
        let mut a = Node::start(private(Vec::new(), Some(key_one))).await;
        let mut open = Node::start(private(Vec::new(), None)).await;
        let mut same = Node::start(private(vec![a.address_with_peer_id()], Some(key_one))).await;
        let mut other = Node::start(private(vec![a.address_with_peer_id()], Some(key_two))).await;
        let mut without = Node::start(private(vec![a.address_with_peer_id()], None)).await;
        let mut keyed = Node::start(private(vec![open.address_with_peer_id()], Some(key_one))).await;
        let (a_peer, open_peer) = (a.peer_id(), open.peer_id());
        let (other_peer, without_peer, keyed_peer) = (other.peer_id(), without.peer_id(), keyed.peer_id());

        wait_connected_only(&mut a, same.peer_id()).await;
        same.wait_connected(a_peer).await;
        let period = Duration::from_secs(4);
        tokio::join!(
            assert_never_connected(&mut a.events, vec![other_peer, without_peer], period, "A"),
            assert_never_connected(&mut other.events, vec![a_peer], period, "other key"),
            assert_never_connected(&mut without.events, vec![a_peer], period, "no key"),
            assert_never_connected(&mut open.events, vec![keyed_peer], period, "open node"),
            assert_never_connected(&mut keyed.events, vec![open_peer], period, "key vs open"),
        );
        // The failed handshakes are visible on the listening side.
        wait_for_metric(&a, HANDSHAKE_FAILURES, 1).await;
        wait_for_metric(&open, HANDSHAKE_FAILURES, 1).await;

        // Requests travel over the private network intact.
        let _gossip = serve(a.client.clone(), a.events, answer);
        let response = same
            .client
            .request(a_peer, b"big".to_vec())
            .await
            .expect("a request between nodes with the same key");
        assert!(response == big_payload(), "response bytes arrive intact");
    }

    #[tokio::test]
    async fn blocked_peer_is_refused_until_the_block_ends() {
        init_tracing();
        let mut a = Node::start(config(&new_key(), Vec::new())).await;
        let mut b = Node::start(config(&new_key(), vec![a.address_with_peer_id()])).await;
        let (a_peer, b_peer) = (a.peer_id(), b.peer_id());
        wait_connected_only(&mut a, b_peer).await;
        b.wait_connected(a_peer).await;

        let block = Duration::from_secs(2);
        let started = Instant::now();
        a.client
            .block(b_peer, block, "test: sent garbage".into())
            .await
            .expect("block");
        let blocked = a.client.blocked_peers().await.expect("blocked peers");
        assert_eq!(blocked.len(), 1, "{blocked:?}");
        assert_eq!(blocked[0].0, b_peer);
        // Time left, never more than the block (no lower bound: a slow machine may take a while
        // between the block and this question, and a duration threshold would make it flaky).
        assert!(blocked[0].1 <= block && blocked[0].1 > Duration::ZERO, "{blocked:?}");
        assert!(matches!(
            a.client.block(a_peer, block, "self".into()).await,
            Err(NetworkError::InvalidArgument(_))
        ));
        assert!(matches!(
            a.client.block(b_peer, Duration::ZERO, "zero".into()).await,
            Err(NetworkError::InvalidArgument(_))
        ));
        // A does not dial a blocked peer either (refused before any packet leaves).
        let error = a
            .client
            .dial(b.address_with_peer_id())
            .await
            .expect_err("dialing a blocked peer must fail");
        assert!(
            matches!(&error, NetworkError::Dial { reason, .. } if reason.contains("blocked")),
            "{error}"
        );
        assert_eq!(metric(&a.metrics(), REFUSED_BLOCKED), 1, "A's own dial counted");

        wait_for(&mut b.events, "B to lose A", |event| match event {
            NetworkEvent::PeerDisconnected(peer) if peer == a_peer => Some(()),
            _ => None,
        })
        .await;
        // B redials after its 1 s backoff and is refused.
        wait_for_metric(&a, REFUSED_BLOCKED, 2).await;
        wait_for(&mut a.events, "B to come back after the block", |event| match event {
            NetworkEvent::PeerConnected(peer) if peer == b_peer => Some(()),
            _ => None,
        })
        .await;
        let elapsed = started.elapsed();
        assert!(elapsed >= block, "B reconnected after {elapsed:?}, inside the block");
        assert!(a.client.blocked_peers().await.expect("blocked peers").is_empty());
        let metrics = a.metrics();
        assert_eq!(metric(&metrics, "mailmesh_net_peers_blocked_total"), 1, "{metrics}");
        assert_eq!(metric(&metrics, "mailmesh_net_blocked_peers"), 0, "{metrics}");
    }

    #[tokio::test]
    async fn connection_limits_hold() {
        init_tracing();
        // A takes one connection per peer; B dials it a second time by address alone.
        let mut a_config = config(&new_key(), Vec::new());
        a_config.max_connections_per_peer = 1;
        let mut a = Node::start(a_config).await;
        let mut b = Node::start(config(&new_key(), vec![a.address_with_peer_id()])).await;
        let b_peer = b.peer_id();
        wait_connected_only(&mut a, b_peer).await;
        b.wait_connected(a.peer_id()).await;
        // B may see the second connection open before A drops it: the result does not matter.
        let _ = b.client.dial(a.address.clone()).await;
        wait_for_metric(&a, REFUSED_LIMIT, 1).await;
        let peers = a.client.peers().await.expect("peers");
        let b_info = peers
            .iter()
            .find(|info| info.peer_id == b_peer)
            .expect("B stays connected");
        assert_eq!(b_info.connections, 1, "{b_info:?}");

        // C enforces the same limit on its own dials.
        let mut c_config = config(&new_key(), vec![a.address_with_peer_id()]);
        c_config.max_connections_per_peer = 1;
        let mut c = Node::start(c_config).await;
        c.wait_connected(a.peer_id()).await;
        let error = c
            .client
            .dial(a.address.clone())
            .await
            .expect_err("a second connection over C's own limit");
        assert!(
            matches!(&error, NetworkError::Dial { reason, .. } if reason.contains("connection limit")),
            "{error}"
        );
        wait_for_metric(&c, REFUSED_LIMIT, 1).await;

        // D takes one connection in all: E gets it, F is refused.
        let mut d_config = config(&new_key(), Vec::new());
        d_config.max_connections = 1;
        let mut d = Node::start(d_config).await;
        let e = Node::start(config(&new_key(), vec![d.address_with_peer_id()])).await;
        wait_connected_only(&mut d, e.peer_id()).await;
        let f = Node::start(config(&new_key(), vec![d.address_with_peer_id()])).await;
        wait_for_metric(&d, REFUSED_LIMIT, 1).await;
        assert_never_connected(&mut d.events, vec![f.peer_id()], Duration::from_millis(500), "D").await;
        assert_eq!(d.client.peers().await.expect("peers").len(), 1);
    }

    #[test]
    fn invalid_limits_are_refused() {
        let mut registry = Registry::default();
        let mut zero = NetworkConfig::new(new_key(), "test");
        zero.max_connections_per_peer = 0;
        assert!(matches!(
            new(zero, &mut registry),
            Err(NetworkError::InvalidConfiguration(_))
        ));
        let open = NetworkConfig::new(new_key(), "test");
        assert!(open.allowed_peers.is_none() && open.pre_shared_key.is_none());
        assert_eq!((open.max_connections, open.max_connections_per_peer), (256, 2));
    }

    #[test]
    fn parse_pre_shared_key_accepts_swarm_key_files_and_hex() {
        let hex = "00112233445566778899aabbccddeeff00112233445566778899AABBCCDDEEFF";
        let expected: [u8; 32] = std::array::from_fn(|index| {
            let byte = (index % 16) as u8;
            byte << 4 | byte
        });
        assert_eq!(parse_pre_shared_key(hex).expect("plain hex"), expected);
        assert_eq!(parse_pre_shared_key(&format!("  {hex}\n")).expect("padded"), expected);
        let file = format!("/key/swarm/psk/1.0.0/\n/base16/\n{hex}\n");
        assert_eq!(parse_pre_shared_key(&file).expect("swarm.key"), expected);
        let crlf = file.replace('\n', "\r\n");
        assert_eq!(parse_pre_shared_key(&crlf).expect("CRLF swarm.key"), expected);
        // The same key as libp2p's own parser reads it.
        let theirs: PreSharedKey = file.parse().expect("libp2p parses it");
        assert!(theirs.fingerprint() == PreSharedKey::new(expected).fingerprint());

        let bad = [
            ("", "empty"),
            (&hex[..63], "63 digits"),
            (&format!("{hex}0"), "65 digits"),
            (&format!("{}g", &hex[..63]), "not hex"),
            (&format!("{}é", &hex[..62]), "non-ASCII"),
            (&format!("/key/swarm/psk/2.0.0/\n/base16/\n{hex}"), "key type"),
            (&format!("/key/swarm/psk/1.0.0/\n/base64/\n{hex}"), "encoding"),
            ("/key/swarm/psk/1.0.0/\n/base16/", "no key line"),
            (&format!("{}\nextra", file.trim_end()), "trailing text"),
        ];
        for (text, what) in bad {
            match parse_pre_shared_key(text) {
                Err(NetworkError::InvalidConfiguration(message)) => {
                    assert!(!message.contains(&hex[..16]), "{what}: the key leaks: {message}");
                }
                other => panic!("{what}: expected an error, got {other:?}"),
            }
        }

        let mut config = NetworkConfig::new(new_key(), "test");
        config.pre_shared_key = Some(expected);
        let debug = format!("{config:?}");
        // Neither the bytes nor the hex of the key (the keypair's own output is random).
        assert!(
            !debug.contains("0, 17, 34, 51, 68, 85") && !debug.to_lowercase().contains(&hex[..32].to_lowercase()),
            "{debug}"
        );
        assert!(debug.contains("pre_shared_key_fingerprint"), "{debug}");
    }

    #[test]
    fn backoff_grows_by_half_up_to_ten_seconds() {
        let mut backoff = Backoff::new();
        let now = Instant::now();
        let waits: Vec<u128> = (0..9).map(|_| backoff.schedule(now).as_millis()).collect();
        assert_eq!(waits, vec![1000, 1500, 2250, 3375, 5062, 7593, 10000, 10000, 10000]);
        assert!(!backoff.is_due(now));
        assert!(backoff.is_due(now + Duration::from_secs(10)));
        backoff.reset();
        assert_eq!(backoff.schedule(now), Duration::from_secs(1));
    }
}
