//! The node's own metrics, registered in the one Prometheus registry it shares with libp2p.
//!
//! Operators read convergence from here: reconciliation sessions, rounds and bytes, records and
//! blobs pulled, mailboxes found divergent, and the writes that caused them.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// A label for a direction of traffic.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    pub direction: &'static str,
}

/// A label for gossip kind and direction.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GossipLabel {
    pub kind: &'static str,
    pub direction: &'static str,
}

/// A label for a write kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabel {
    pub kind: &'static str,
}

/// A label for an outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

/// A label naming a limit.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabel {
    pub limit: &'static str,
}

/// A label naming why a peer was penalised.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// Every metric the node keeps. Cloning shares the same counters.
#[derive(Clone)]
pub struct NodeMetrics {
    pub gossip_messages: Family<GossipLabel, Counter>,
    pub gossip_bytes: Family<GossipLabel, Counter>,
    pub sessions: Family<OutcomeLabel, Counter>,
    /// Sketch sessions this node opened, by how they ended (see `node::sketch_reconcile`).
    pub sketch_sessions: Family<OutcomeLabel, Counter>,
    pub session_rounds: Counter,
    pub sync_bytes: Family<DirectionLabel, Counter>,
    pub records_pulled: Counter,
    pub blobs_pulled: Counter,
    pub blobs_rejected: Counter,
    pub mailboxes_divergent: Counter,
    pub writes: Family<WriteLabel, Counter>,
    pub peers_agreeing: Gauge,
    /// The store's compactions and flushes running, read when the metrics are (see
    /// `Node::encode_metrics`): a node that just took a bulk import works on for minutes.
    pub store_background_jobs: Gauge,
    /// RocksDB's estimate of the bytes its compactions still have to rewrite.
    pub store_pending_compaction_bytes: Gauge,
    /// Stored messages not yet in the full-text index (search finds them once they are).
    pub search_backlog: Gauge,
    pub reconcile_seconds: Histogram,
    pub replication_lag_seconds: Histogram,
    pub limits_hit: Family<LimitLabel, Counter>,
    pub peers_penalised: Family<ReasonLabel, Counter>,
    pub peers_refused: Family<ReasonLabel, Counter>,
    pub http_unauthorized: Counter,
    pub login_failures: Counter,
    pub login_throttled: Counter,
    pub accounts_reloads: Family<OutcomeLabel, Counter>,
    /// LMTP recipients by outcome: accepted (stored), refused (5xx), deferred (4xx).
    pub lmtp_deliveries: Family<OutcomeLabel, Counter>,
    pub lmtp_connections_refused: Counter,
}

impl NodeMetrics {
    /// Registers every metric under the `mailmesh` prefix.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = NodeMetrics {
            gossip_messages: Family::default(),
            gossip_bytes: Family::default(),
            sessions: Family::default(),
            sketch_sessions: Family::default(),
            session_rounds: Counter::default(),
            sync_bytes: Family::default(),
            records_pulled: Counter::default(),
            blobs_pulled: Counter::default(),
            blobs_rejected: Counter::default(),
            mailboxes_divergent: Counter::default(),
            writes: Family::default(),
            peers_agreeing: Gauge::default(),
            store_background_jobs: Gauge::default(),
            store_pending_compaction_bytes: Gauge::default(),
            search_backlog: Gauge::default(),
            reconcile_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            replication_lag_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 18)),
            limits_hit: Family::default(),
            peers_penalised: Family::default(),
            peers_refused: Family::default(),
            http_unauthorized: Counter::default(),
            login_failures: Counter::default(),
            login_throttled: Counter::default(),
            accounts_reloads: Family::default(),
            lmtp_deliveries: Family::default(),
            lmtp_connections_refused: Counter::default(),
        };
        let registry = registry.sub_registry_with_prefix("mailmesh");
        registry.register(
            "gossip_messages",
            "Gossip messages by kind (operation, digest) and direction",
            metrics.gossip_messages.clone(),
        );
        registry.register(
            "gossip_bytes",
            "Gossip payload bytes by kind and direction",
            metrics.gossip_bytes.clone(),
        );
        registry.register(
            "reconcile_sessions",
            "Reconciliation sessions started by this node, by outcome",
            metrics.sessions.clone(),
        );
        registry.register(
            "sketch_sessions",
            "Sketch sessions opened by this node on large mailboxes, by how they ended: decoded (settled by cells), \
             trie_by_responder (the responder chose trie descent), trie_after_cells (the cells did not settle it), \
             refused, stale (a mailbox changed under the cells) or rounds_exhausted; and over_budget: a peer's \
             session this node answered by trie because the peer had used up its cell builds",
            metrics.sketch_sessions.clone(),
        );
        registry.register(
            "reconcile_rounds",
            "Reconciliation request-response rounds this node initiated",
            metrics.session_rounds.clone(),
        );
        registry.register(
            "sync_bytes",
            "Bytes of reconciliation and pull frames, by direction",
            metrics.sync_bytes.clone(),
        );
        registry.register(
            "records_pulled",
            "Records pulled from peers and merged",
            metrics.records_pulled.clone(),
        );
        registry.register(
            "blobs_pulled",
            "Blobs pulled from peers, verified and stored",
            metrics.blobs_pulled.clone(),
        );
        registry.register(
            "blobs_rejected",
            "Blobs from peers whose bytes did not match their hash",
            metrics.blobs_rejected.clone(),
        );
        registry.register(
            "mailboxes_divergent",
            "Mailboxes found to differ from a peer",
            metrics.mailboxes_divergent.clone(),
        );
        registry.register(
            "writes",
            "Local writes accepted, by kind (append, flags, expunge)",
            metrics.writes.clone(),
        );
        registry.register(
            "peers_agreeing",
            "Connected peers whose last digest equals ours",
            metrics.peers_agreeing.clone(),
        );
        registry.register(
            "store_background_jobs",
            "Compactions and flushes the store is running",
            metrics.store_background_jobs.clone(),
        );
        registry.register(
            "store_pending_compaction_bytes",
            "Bytes the store's compactions still have to rewrite (RocksDB's estimate)",
            metrics.store_pending_compaction_bytes.clone(),
        );
        registry.register(
            "search_backlog",
            "Index tasks (stored or expunged messages) the full-text index has not taken yet",
            metrics.search_backlog.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of reconciliation sessions",
            metrics.reconcile_seconds.clone(),
        );
        registry.register(
            "replication_lag_seconds",
            "Time from a record's origin stamp to its arrival here by gossip or pull",
            metrics.replication_lag_seconds.clone(),
        );
        registry.register(
            "limits_hit",
            "Requests or frames refused because a configured limit was reached, by limit",
            metrics.limits_hit.clone(),
        );
        registry.register(
            "peers_penalised",
            "Peers disconnected and blocked for misbehaving, by reason",
            metrics.peers_penalised.clone(),
        );
        registry.register(
            "peers_refused",
            "Peers this node does not sync with although they behave, by reason (protocol_version: the peer \
             speaks another version of the node-to-node protocol)",
            metrics.peers_refused.clone(),
        );
        registry.register(
            "http_unauthorized",
            "HTTP requests refused for a missing or wrong bearer token",
            metrics.http_unauthorized.clone(),
        );
        registry.register(
            "login_failures",
            "Logins refused for an unknown account or a wrong password",
            metrics.login_failures.clone(),
        );
        registry.register(
            "login_throttled",
            "Logins refused unchecked after too many failures for the account or the address",
            metrics.login_throttled.clone(),
        );
        registry.register(
            "accounts_reloads",
            "Reads of the accounts file, by outcome (loaded, failed)",
            metrics.accounts_reloads.clone(),
        );
        registry.register(
            "lmtp_deliveries",
            "LMTP recipients by outcome (accepted: stored; refused: 5xx; deferred: 4xx, the MTA retries)",
            metrics.lmtp_deliveries.clone(),
        );
        registry.register(
            "lmtp_connections_refused",
            "LMTP connections answered 421 because the connection limit was reached",
            metrics.lmtp_connections_refused.clone(),
        );
        metrics
    }
}
