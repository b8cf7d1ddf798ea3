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
//! The module knows nothing about mail, records or CRDTs: payloads are `Vec<u8>`, and the
//! wire format of the request-response protocol `/mailmesh/sync/1` is a 4-byte big-endian
//! length followed by that many bytes, checked against a configured limit before a single
//! byte of payload is buffered.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::io;
use std::time::{Duration, Instant, SystemTime};

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::core::ConnectedPoint;
use libp2p::gossipsub::{
    self, IdentTopic, IdentityTransform, MessageAcceptance, MessageAuthenticity, PublishError,
    TopicHash, ValidationMode, WhitelistSubscriptionFilter,
};
use libp2p::metrics::Recorder;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundFailure, OutboundRequestId, ProtocolSupport};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, DialError, NetworkBehaviour, SwarmEvent};
use libp2p::{identify, identity, noise, ping, tcp, yamux, StreamProtocol, Swarm, SwarmBuilder};
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
pub const IDENTIFY_PROTOCOL_VERSION: &str = "/mailmesh/1.0.0";

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

const INITIAL_REDIAL_DELAY: Duration = Duration::from_secs(1);
const MAX_REDIAL_DELAY: Duration = Duration::from_secs(30);
/// A connection that lived at least this long resets the redial backoff when it drops; a
/// connection that flaps faster keeps doubling the delay instead of redialing every second.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);
const REDIAL_TICK: Duration = Duration::from_millis(250);
const MAX_ADDRESSES_PER_PEER: usize = 16;

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
#[derive(Clone, Debug)]
pub struct NetworkConfig {
    pub keypair: identity::Keypair,
    /// Addresses to listen on, e.g. `/ip4/127.0.0.1/tcp/0`.
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start and to keep redialing; with or without `/p2p/<peer id>`.
    pub bootstrap: Vec<Multiaddr>,
    /// Topics are `mailmesh/<cluster>/operations` and `mailmesh/<cluster>/digests`.
    pub cluster: String,
    pub max_request_bytes: usize,
    pub max_response_bytes: usize,
    pub max_gossip_bytes: usize,
    pub request_timeout: Duration,
    /// How long a connection without any open stream stays up; long enough that peers are not
    /// dropped between gossip rounds.
    pub idle_connection_timeout: Duration,
}

impl NetworkConfig {
    /// A configuration with the default limits and timeouts, no listen address and no
    /// bootstrap peer.
    pub fn new(keypair: identity::Keypair, cluster: impl Into<String>) -> Self {
        Self {
            keypair,
            listen: Vec::new(),
            bootstrap: Vec::new(),
            cluster: cluster.into(),
            max_request_bytes: 1024 * 1024,
            max_response_bytes: 8 * 1024 * 1024,
            max_gossip_bytes: 256 * 1024,
            request_timeout: Duration::from_secs(30),
            idle_connection_timeout: Duration::from_secs(60 * 60),
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
        self.call(|reply| Command::Publish { topic, data, reply })
            .await
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
        self.call(|reply| Command::Request { peer, data, reply })
            .await
    }

    /// Answers a request received as [`NetworkEvent::Request`].
    pub async fn respond(
        &self,
        channel: ResponseHandle,
        data: Vec<u8>,
    ) -> Result<(), NetworkError> {
        let limit = self.limits.max_response_bytes;
        if data.len() > limit {
            return Err(NetworkError::ResponseTooLarge {
                size: data.len(),
                limit,
            });
        }
        self.call(|reply| Command::Respond {
            channel,
            data,
            reply,
        })
        .await
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
            FrameTooLarge {
                kind,
                length,
                limit,
            },
        ));
    }
    // `length <= limit`, and `limit` came from a `usize`.
    let expected = length as usize;
    let mut data = Vec::with_capacity(expected.min(INITIAL_READ_CAPACITY));
    (&mut *io).take(length).read_to_end(&mut data).await?;
    if data.len() != expected {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "{kind} frame ended after {} of {expected} bytes",
                data.len()
            ),
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

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        request: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, FrameKind::Request, self.max_request_bytes, &request).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        response: Vec<u8>,
    ) -> io::Result<()>
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
        metrics
    }

    fn reject(&self, reason: &'static str) {
        self.frames_rejected
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    fn request_outcome(&self, direction: &'static str, outcome: &'static str) {
        self.requests
            .get_or_create(&RequestLabels { direction, outcome })
            .inc();
    }

    fn gossip(&self, topic: Topic, direction: &'static str, bytes: usize) {
        let labels = GossipLabels {
            topic: topic.name(),
            direction,
        };
        self.gossip_messages.get_or_create(&labels).inc();
        self.gossip_bytes
            .get_or_create(&labels)
            .inc_by(bytes as u64);
    }
}

// ---------------------------------------------------------------------------------------------
// Behaviour and construction
// ---------------------------------------------------------------------------------------------

type GossipBehaviour = gossipsub::Behaviour<IdentityTransform, WhitelistSubscriptionFilter>;

#[derive(NetworkBehaviour)]
struct Behaviour {
    gossipsub: GossipBehaviour,
    sync: request_response::Behaviour<FrameCodec>,
    identify: identify::Behaviour,
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
        Topic::ALL
            .into_iter()
            .find(|topic| self.get(*topic).hash() == *hash)
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
    Ok(())
}

fn build_gossipsub(
    config: &NetworkConfig,
    topics: &Topics,
    registry: &mut Registry,
) -> Result<GossipBehaviour, NetworkError> {
    let invalid =
        |reason: String| NetworkError::InvalidConfiguration(format!("gossipsub: {reason}"));
    let gossip_config = gossipsub::ConfigBuilder::default()
        .validation_mode(ValidationMode::Strict)
        .validate_messages()
        .message_id_fn(content_message_id)
        .max_transmit_size(
            config
                .max_gossip_bytes
                .saturating_add(GOSSIP_ENVELOPE_ALLOWANCE),
        )
        .heartbeat_interval(GOSSIP_HEARTBEAT)
        .heartbeat_initial_delay(GOSSIP_HEARTBEAT_INITIAL_DELAY)
        .history_length(GOSSIP_HISTORY_LENGTH)
        .history_gossip(GOSSIP_HISTORY_GOSSIP)
        .build()
        .map_err(|error| invalid(error.to_string()))?;
    let filter = WhitelistSubscriptionFilter(
        Topic::ALL
            .into_iter()
            .map(|topic| topics.get(topic).hash())
            .collect(),
    );
    let mut gossipsub: GossipBehaviour = gossipsub::Behaviour::new_with_subscription_filter(
        MessageAuthenticity::Signed(config.keypair.clone()),
        gossip_config,
        filter,
    )
    .map_err(|reason| invalid(reason.to_string()))?
    .with_metrics(
        registry.sub_registry_with_prefix("gossipsub"),
        Default::default(),
    );
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
        request_response::Config::default().with_request_timeout(config.request_timeout),
    );
    let identify = identify::Behaviour::new(
        identify::Config::new(
            IDENTIFY_PROTOCOL_VERSION.to_string(),
            config.keypair.public(),
        )
        .with_agent_version(format!("mailmesh/{}", env!("CARGO_PKG_VERSION"))),
    );
    let behaviour = Behaviour {
        gossipsub,
        sync,
        identify,
        ping: ping::Behaviour::new(ping::Config::new()),
    };

    let idle_connection_timeout = config.idle_connection_timeout;
    let mut swarm = SwarmBuilder::with_existing_identity(config.keypair.clone())
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|error| NetworkError::Transport(error.to_string()))?
        .with_dns()
        .map_err(|error| NetworkError::Transport(error.to_string()))?
        .with_behaviour(move |_| behaviour)
        .map_err(|never| match never {})?
        .with_swarm_config(|swarm_config| {
            swarm_config.with_idle_connection_timeout(idle_connection_timeout)
        })
        .build();

    for address in &config.listen {
        swarm
            .listen_on(address.clone())
            .map_err(|error| NetworkError::Listen {
                address: address.clone(),
                reason: error.to_string(),
            })?;
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
    };
    for address in config.bootstrap {
        event_loop.add_bootstrap(address);
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

/// Exponential redial delay: 1 s, doubling up to 30 s.
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

    /// Schedules the next attempt after the current delay, doubles the delay, and returns the
    /// wait that was scheduled.
    fn schedule(&mut self, now: Instant) -> Duration {
        let wait = self.delay;
        self.next_attempt = Some(now + wait);
        self.delay = (self.delay * 2).min(MAX_REDIAL_DELAY);
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
    /// Bootstrap or previously connected: keep it connected.
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
    address
        .iter()
        .any(|protocol| matches!(protocol, Protocol::Tcp(_)))
        && !address
            .iter()
            .any(|protocol| matches!(protocol, Protocol::P2pCircuit))
}

fn describe_dial_error(error: &DialError) -> String {
    error.to_string()
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
                _ = redial_tick.tick() => self.redial_due(),
            }
        }
        tracing::info!(peer = %self.swarm.local_peer_id(), "network event loop stopped");
    }

    fn add_bootstrap(&mut self, address: Multiaddr) {
        let (plain, peer) = split_peer_id(&address);
        match peer {
            Some(peer) if peer == *self.swarm.local_peer_id() => {
                tracing::warn!(%address, "bootstrap address is this node itself; skipped");
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
        let droppable = matches!(
            event,
            NetworkEvent::Gossip { .. } | NetworkEvent::Request { .. }
        );
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
            tracing::warn!(
                "network event receiver dropped: incoming gossip and requests are ignored"
            );
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
            self.swarm
                .behaviour_mut()
                .gossipsub
                .report_message_validation_result(
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
                    .get_or_create(&DirectionLabels {
                        direction: OUTBOUND,
                    })
                    .inc_by(data.len() as u64);
                let request_id = self.swarm.behaviour_mut().sync.send_request(&peer, data);
                self.pending_requests.insert(request_id, reply);
            }
            Command::Respond {
                channel,
                data,
                reply,
            } => {
                let peer = channel.peer;
                let size = data.len();
                let result = if size > self.limits.max_response_bytes {
                    Err(NetworkError::ResponseTooLarge {
                        size,
                        limit: self.limits.max_response_bytes,
                    })
                } else {
                    match self
                        .swarm
                        .behaviour_mut()
                        .sync
                        .send_response(channel.channel, data)
                    {
                        Ok(()) => {
                            self.metrics
                                .response_bytes
                                .get_or_create(&DirectionLabels {
                                    direction: OUTBOUND,
                                })
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
                let known = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&message_id, &source, acceptance);
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
                        })
                    })
                    .collect();
                let _ = reply.send(Ok(peers));
            }
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
                self.metrics
                    .publish_skipped
                    .get_or_create(&skipped("no_peers"))
                    .inc();
                Ok(())
            }
            Err(PublishError::Duplicate) => {
                tracing::debug!(%topic, "publication is a duplicate of a recent one");
                self.metrics
                    .publish_skipped
                    .get_or_create(&skipped("duplicate"))
                    .inc();
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
                self.dials
                    .insert(connection_id, DialPurpose::Command(address, reply));
            }
            // Already being dialed by someone else: the peer will be connected shortly.
            Err(DialError::DialPeerConditionFalse(_)) => {
                let _ = reply.send(Ok(()));
            }
            Err(error) => {
                tracing::warn!(%address, %error, "dial failed");
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
            if target
                .peer
                .is_some_and(|peer| self.swarm.is_connected(&peer))
            {
                target.backoff.cancel();
                continue;
            }
            let options = DialOpts::unknown_peer_id()
                .address(target.address.clone())
                .build();
            let connection_id = options.connection_id();
            target.backoff.cancel();
            match self.swarm.dial(options) {
                Ok(()) => {
                    target.dialing = Some(connection_id);
                    self.dials
                        .insert(connection_id, DialPurpose::Address(index));
                }
                Err(error) => {
                    let wait = target.backoff.schedule(now);
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
            if !record.redial
                || record.dialing.is_some()
                || record.connections > 0
                || !record.backoff.is_due(now)
            {
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
            } => self.on_connection_established(
                peer_id,
                connection_id,
                &endpoint,
                num_established.get(),
            ),
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
            } => self.on_dial_failure(connection_id, peer_id, error),
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                ..
            } => {
                tracing::warn!(from = %send_back_addr, %error, "incoming connection failed");
            }
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
            record.add_address(plain);
        }
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

    fn on_dial_failure(
        &mut self,
        connection_id: ConnectionId,
        peer: Option<PeerId>,
        error: DialError,
    ) {
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
                }
                let record = self.peers.entry(peer_id).or_insert_with(PeerRecord::new);
                for address in announced {
                    record.add_address(address);
                }
                record.agent_version = Some(info.agent_version);
                record.protocol_version = Some(info.protocol_version);
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
                    self.swarm
                        .behaviour_mut()
                        .gossipsub
                        .report_message_validation_result(
                            &message_id,
                            &propagation_source,
                            MessageAcceptance::Ignore,
                        );
                    return;
                };
                if message.data.len() > self.limits.max_gossip_bytes {
                    self.metrics.reject("gossip_too_large");
                    tracing::warn!(peer = %propagation_source, size = message.data.len(), "rejecting oversized gossip");
                    self.swarm
                        .behaviour_mut()
                        .gossipsub
                        .report_message_validation_result(
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
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
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
                message:
                    request_response::Message::Response {
                        request_id,
                        response,
                    },
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
                    OutboundFailure::DialFailure => {
                        ("dial_failure", NetworkError::PeerUnreachable { peer })
                    }
                    OutboundFailure::Timeout => ("timeout", NetworkError::RequestTimeout { peer }),
                    OutboundFailure::ConnectionClosed => {
                        ("connection_closed", NetworkError::ConnectionClosed { peer })
                    }
                    OutboundFailure::UnsupportedProtocols => (
                        "unsupported_protocol",
                        NetworkError::UnsupportedProtocol { peer },
                    ),
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
                    request_response::InboundFailure::UnsupportedProtocols => {
                        "unsupported_protocol"
                    }
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
            let (client, mut events, event_loop) =
                new(config, &mut registry).expect("the network should start");
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
        (0..2 * 1024 * 1024)
            .map(|index: usize| (index % 251) as u8)
            .collect()
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
            a_metrics
                .contains(r#"mailmesh_net_frames_rejected_total{reason="request_too_large"} 1"#)
                && a_metrics.contains(
                    r#"mailmesh_net_requests_total{direction="inbound",outcome="too_large"} 1"#
                ),
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
            metrics.contains(
                r#"mailmesh_net_requests_total{direction="outbound",outcome="success"} 2"#
            ),
            "outbound successes counted:\n{metrics}"
        );
        assert!(
            metrics.contains(r#"mailmesh_net_connected_peers 1"#),
            "{metrics}"
        );
        assert!(
            metrics.contains("libp2p_swarm_connections_established_total"),
            "{metrics}"
        );
        b.stop().await;
    }

    #[tokio::test]
    async fn gossip_reaches_a_peer_two_hops_away() {
        init_tracing();
        let a = Node::start(config(&identity::Keypair::generate_ed25519(), Vec::new())).await;
        let mut b = Node::start(config(
            &identity::Keypair::generate_ed25519(),
            vec![a.address_with_peer_id()],
        ))
        .await;
        let c = Node::start(config(
            &identity::Keypair::generate_ed25519(),
            vec![b.address_with_peer_id()],
        ))
        .await;
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
                .publish(
                    Topic::Operations,
                    format!("operation {attempt}").into_bytes(),
                )
                .await
                .expect("publishing never fails for lack of peers");
            if let Ok(Some(received)) =
                tokio::time::timeout(Duration::from_millis(500), c_gossip.recv()).await
            {
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
            metrics.contains(
                r#"mailmesh_net_gossip_messages_total{topic="operations",direction="inbound"}"#
            ),
            "inbound gossip counted on C:\n{metrics}"
        );
        assert!(
            metrics.contains("gossipsub_"),
            "gossipsub's own metrics registered"
        );
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
        let mut b = Node::start(config(
            &identity::Keypair::generate_ed25519(),
            vec![bootstrap],
        ))
        .await;
        b.wait_connected(a_peer).await;

        a.stop().await;
        wait_for(
            &mut b.events,
            "B to notice A is gone",
            |event| match event {
                NetworkEvent::PeerDisconnected(peer) if peer == a_peer => Some(()),
                _ => None,
            },
        )
        .await;
        // Let at least one redial fail, so that the backoff is exercised.
        tokio::time::sleep(Duration::from_millis(1500)).await;

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
            !a.address
                .iter()
                .any(|protocol| matches!(protocol, Protocol::P2p(_))),
            "the listen address carries no peer id"
        );
        let mut b = Node::start(config(
            &identity::Keypair::generate_ed25519(),
            vec![a.address.clone()],
        ))
        .await;
        b.wait_connected(a.peer_id()).await;
        let listen = b.client.listen_addresses().await.expect("listen addresses");
        assert_eq!(listen, vec![b.address.clone()]);
    }

    #[tokio::test]
    async fn nodes_listing_each_other_do_not_spin() {
        init_tracing();
        // Reserve two ports, then start both nodes pointing at each other.
        let ports: Vec<u16> = (0..2)
            .map(|_| {
                std::net::TcpListener::bind("127.0.0.1:0")
                    .and_then(|listener| listener.local_addr())
                    .map(|address| address.port())
                    .expect("a free port")
            })
            .collect();
        let keys = [
            identity::Keypair::generate_ed25519(),
            identity::Keypair::generate_ed25519(),
        ];
        let address = |index: usize| -> Multiaddr {
            format!(
                "/ip4/127.0.0.1/tcp/{}/p2p/{}",
                ports[index],
                keys[index].public().to_peer_id()
            )
            .parse()
            .expect("valid multiaddr")
        };
        let mut a_config = config(&keys[0], vec![address(1)]);
        a_config.listen = vec![format!("/ip4/127.0.0.1/tcp/{}", ports[0])
            .parse()
            .expect("multiaddr")];
        let mut b_config = config(&keys[1], vec![address(0)]);
        b_config.listen = vec![format!("/ip4/127.0.0.1/tcp/{}", ports[1])
            .parse()
            .expect("multiaddr")];
        let mut a = Node::start(a_config).await;
        let b = Node::start(b_config).await;
        a.wait_connected(b.peer_id()).await;
        tokio::time::sleep(Duration::from_secs(4)).await;

        let metrics = a.metrics();
        let established: u64 = metrics
            .lines()
            .filter(|line| line.starts_with("libp2p_swarm_connections_established_total"))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        assert!(
            (1..=2).contains(&established),
            "A established {established} connections in 4 s; expected 1 or 2:\n{metrics}"
        );
        while let Ok(event) = a.events.try_recv() {
            assert!(
                !matches!(event, NetworkEvent::PeerDisconnected(_)),
                "A lost B while both were up"
            );
        }
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
        assert!(write_frame(&mut sink, FrameKind::Request, 4, b"payload")
            .await
            .is_err());
    }

    #[test]
    fn backoff_doubles_up_to_thirty_seconds() {
        let mut backoff = Backoff::new();
        let now = Instant::now();
        let waits: Vec<u64> = (0..8).map(|_| backoff.schedule(now).as_secs()).collect();
        assert_eq!(waits, vec![1, 2, 4, 8, 16, 30, 30, 30]);
        assert!(!backoff.is_due(now));
        assert!(backoff.is_due(now + Duration::from_secs(30)));
        backoff.reset();
        assert_eq!(backoff.schedule(now), Duration::from_secs(1));
    }
}
