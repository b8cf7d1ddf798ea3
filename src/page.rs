//! The live status page served at `/`, and the JSON it polls at `/v1/page-data`.
//!
//! The page is one self-contained HTML file (`src/page/index.html`, embedded at compile time):
//! inline CSS, plain JavaScript and inline SVG charts, nothing fetched from elsewhere. Every
//! second it polls `/v1/page-data`, which returns this node's identity and digest, the connected
//! peers and whether each agrees, and the current values of the node's counters and histograms.
//! The page keeps the last ten minutes of those samples in memory and derives rates and
//! quantiles from the differences, so the server keeps no history for it.
//!
//! Which mailboxes differ is only learnt inside a reconciliation session, so the page shows
//! divergence per peer (since when its digest differs from ours) and the count of mailboxes that
//! sessions found divergent, not a list of mailboxes.

use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use axum::{Json, Router};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde_json::{json, Value};

use crate::http::ApiError;
use crate::metrics::{DirectionLabel, GossipLabel, OutcomeLabel, WriteLabel};
use crate::node::{now_millis, Node};

const INDEX_HTML: &str = include_str!("page/index.html");

/// Routes of the status page.
pub fn routes() -> Router<Node> {
    Router::new()
        .route("/", get(index))
        .route("/v1/page-data", get(page_data))
}

async fn index() -> impl IntoResponse {
    ([(header::CACHE_CONTROL, "no-cache")], Html(INDEX_HTML))
}

/// `GET /v1/page-data`: a snapshot for the status page. Counters are totals since the node
/// started; the page turns consecutive snapshots into rates.
async fn page_data(State(node): State<Node>) -> Result<impl IntoResponse, ApiError> {
    let peers = node.peer_statuses().await;
    let listen: Vec<String> = node
        .listen_addresses()
        .await
        .iter()
        .map(|address| address.to_string())
        .collect();
    let digest = node.directory()?;
    let metrics = node.metrics();
    let direction = |direction: &'static str| {
        metrics
            .sync_bytes
            .get(&DirectionLabel { direction })
            .map(|counter| counter.get())
            .unwrap_or(0)
    };
    let gossip = |kind: &'static str, direction: &'static str| {
        metrics
            .gossip_bytes
            .get(&GossipLabel { kind, direction })
            .map(|counter| counter.get())
            .unwrap_or(0)
    };
    let writes = |kind: &'static str| {
        metrics
            .writes
            .get(&WriteLabel { kind })
            .map(|counter| counter.get())
            .unwrap_or(0)
    };
    let sessions = |outcome: &'static str| {
        metrics
            .sessions
            .get(&OutcomeLabel { outcome })
            .map(|counter| counter.get())
            .unwrap_or(0)
    };
    let body = json!({
        "now_ms": now_millis(),
        "node": {
            "name": node.name(),
            "peer_id": node.peer_id().to_string(),
            "cluster": &node.config().cluster,
            "digest": node.digest_hex()?,
            "mailboxes": digest.count,
            "listen": listen,
        },
        "peers": peers,
        "counters": {
            "sync_bytes_in": direction("in"),
            "sync_bytes_out": direction("out"),
            "records_pulled": metrics.records_pulled.get(),
            "blobs_pulled": metrics.blobs_pulled.get(),
            "blobs_rejected": metrics.blobs_rejected.get(),
            "mailboxes_divergent": metrics.mailboxes_divergent.get(),
            "sessions_ok": sessions("ok"),
            "sessions_failed": sessions("failed"),
            "reconcile_rounds": metrics.session_rounds.get(),
            "gossip_operation_bytes_in": gossip("operation", "in"),
            "gossip_operation_bytes_out": gossip("operation", "out"),
            "gossip_digest_bytes_in": gossip("digest", "in"),
            "gossip_digest_bytes_out": gossip("digest", "out"),
            "writes_append": writes("append"),
            "writes_flags": writes("flags"),
            "writes_expunge": writes("expunge"),
        },
        "histograms": {
            "reconcile_duration_seconds": histogram_json(&metrics.reconcile_seconds),
            "replication_lag_seconds": histogram_json(&metrics.replication_lag_seconds),
        },
    });
    Ok(([(header::CACHE_CONTROL, "no-store")], Json(body)))
}

/// A histogram's sum, count and cumulative bucket counts as
/// `{"sum","count","le":[finite upper bounds],"cumulative":[one more entry, for +Inf]}`.
///
/// prometheus-client exposes a histogram's values only through its encoder, so this encodes a
/// clone (which shares the same cells) in a throwaway registry and reads the text back.
fn histogram_json(histogram: &Histogram) -> Value {
    let mut registry = Registry::default();
    registry.register("h", "", histogram.clone());
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, &registry).is_err() {
        return Value::Null;
    }
    let (mut sum, mut count) = (0.0f64, 0u64);
    let mut bounds: Vec<f64> = Vec::new();
    let mut cumulative: Vec<u64> = Vec::new();
    for line in text.lines().filter(|line| !line.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        if series == "h_sum" {
            sum = value.parse().unwrap_or(0.0);
        } else if series == "h_count" {
            count = value.parse().unwrap_or(0);
        } else if let Some(bound) = series
            .strip_prefix("h_bucket{le=\"")
            .and_then(|rest| rest.strip_suffix("\"}"))
        {
            let Ok(value) = value.parse::<u64>() else { continue };
            if bound != "+Inf" {
                let Ok(bound) = bound.parse::<f64>() else { continue };
                bounds.push(bound);
            }
            cumulative.push(value);
        }
    }
    json!({ "sum": sum, "count": count, "le": bounds, "cumulative": cumulative })
}

#[cfg(test)]
mod tests {
    use super::histogram_json;
    use prometheus_client::metrics::histogram::Histogram;

    #[test]
    fn reads_a_histogram() {
        let histogram = Histogram::new([0.1, 1.0]);
        histogram.observe(0.05);
        histogram.observe(0.5);
        histogram.observe(5.0);
        let value = histogram_json(&histogram);
        assert_eq!(value["count"], 3);
        assert!((value["sum"].as_f64().unwrap() - 5.55).abs() < 1e-9);
        assert_eq!(value["le"], serde_json::json!([0.1, 1.0]));
        assert_eq!(value["cumulative"], serde_json::json!([1, 2, 3]));
    }
}
