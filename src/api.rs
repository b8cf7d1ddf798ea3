//! The HTTP API: JSON over axum, a thin layer over a [`Node`] handle.
//!
//! Errors are `{"error": "..."}` with a status that says what to do: 400 for bad input, 404 for
//! unknown mailboxes or messages, 413 for oversized messages, 500 when the store fails.

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::model::{Flag, MailboxKey, MessageId, MessageRecord};
use crate::node::Node;
use crate::store::StoreError;

/// An API error: a status and a message.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        let status = match &error {
            StoreError::NotFound { .. } | StoreError::Expunged(_) => StatusCode::NOT_FOUND,
            StoreError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            StoreError::BlobMismatch { .. } | StoreError::Clock(_) | StoreError::Merge(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, error.to_string())
    }
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, message.into())
}

fn not_found(message: impl Into<String>) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, message.into())
}

/// The routes, bound to a node.
pub fn router(node: Node) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/mailboxes", get(list_mailboxes))
        .route("/v1/mailboxes/{account}/{mailbox}", get(get_mailbox))
        .route("/v1/mailboxes/{account}/{mailbox}/messages", post(append).get(list_messages))
        .route("/v1/mailboxes/{account}/{mailbox}/messages/{id}", get(get_message).delete(expunge))
        .route("/v1/mailboxes/{account}/{mailbox}/messages/{id}/raw", get(get_raw))
        .route("/v1/mailboxes/{account}/{mailbox}/messages/{id}/flags", post(set_flags))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { Json(json!({ "status": "alive" })) }))
        .route("/readyz", get(ready))
        .merge(crate::page::routes())
        .layer(DefaultBodyLimit::disable())
        .with_state(node)
}

fn mailbox_key(account: &str, mailbox: &str) -> Result<MailboxKey, ApiError> {
    MailboxKey::new(account, mailbox).map_err(|error| bad_request(error.to_string()))
}

fn message_id(text: &str) -> Result<MessageId, ApiError> {
    text.parse().map_err(|error: crate::model::ModelError| bad_request(error.to_string()))
}

/// RFC 3339 UTC with milliseconds, from milliseconds since the epoch.
pub fn rfc3339(millis: u64) -> String {
    let seconds = millis / 1000;
    let days = (seconds / 86_400) as i64;
    let rest = seconds % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm, restated).
    let shifted = days + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        (rest % 3600) / 60,
        rest % 60,
        millis % 1000
    )
}

fn item(record: &MessageRecord) -> Value {
    let flags: Vec<&str> = record.set_flags().into_iter().map(Flag::as_str).collect();
    json!({
        "id": record.id.to_string(),
        "blob": record.blob.to_string(),
        "size": record.size,
        "received": rfc3339(record.received_millis),
        "flags": flags,
    })
}

async fn status(State(node): State<Node>) -> Result<Json<Value>, ApiError> {
    let peers = node.peer_statuses().await;
    let listen: Vec<String> = node.listen_addresses().await.iter().map(|address| address.to_string()).collect();
    Ok(Json(json!({
        "peer_id": node.peer_id().to_string(),
        "name": node.name(),
        "listen": listen,
        "peers": peers,
        "digest": node.digest_hex()?,
        "mailboxes": node.store().digest()?.count,
    })))
}

async fn list_mailboxes(State(node): State<Node>) -> Result<Json<Value>, ApiError> {
    let entries = node.store().mailboxes()?;
    let mailboxes: Vec<Value> = entries
        .iter()
        .map(|entry| {
            json!({
                "account": entry.key.account(),
                "mailbox": entry.key.mailbox(),
                "count": entry.live,
                "root": format!("{:?}", entry.root),
            })
        })
        .collect();
    Ok(Json(json!({ "mailboxes": mailboxes })))
}

async fn get_mailbox(
    State(node): State<Node>,
    Path((account, mailbox)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let key = mailbox_key(&account, &mailbox)?;
    let entry = node.store().mailbox_entry(key.id())?.ok_or_else(|| not_found("no such mailbox"))?;
    Ok(Json(json!({
        "account": entry.key.account(),
        "mailbox": entry.key.mailbox(),
        "count": entry.live,
        "unseen": entry.unseen,
        "root": format!("{:?}", entry.root),
    })))
}

async fn append(
    State(node): State<Node>,
    Path((account, mailbox)): Path<(String, String)>,
    body: Body,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let key = mailbox_key(&account, &mailbox)?;
    let limit = node.config().max_message_bytes;
    let raw: Bytes = axum::body::to_bytes(body, usize::try_from(limit).unwrap_or(usize::MAX)).await.map_err(|_| {
        ApiError(StatusCode::PAYLOAD_TOO_LARGE, format!("message exceeds the limit of {limit} bytes"))
    })?;
    if raw.is_empty() {
        return Err(bad_request("empty message body"));
    }
    let record = node.append(&key, raw.to_vec(), vec![]).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "id": record.id.to_string(), "blob": record.blob.to_string(), "size": record.size })),
    ))
}

#[derive(Deserialize)]
struct ListQuery {
    sort: Option<String>,
    order: Option<String>,
    position: Option<usize>,
    limit: Option<usize>,
}

async fn list_messages(
    State(node): State<Node>,
    Path((account, mailbox)): Path<(String, String)>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let key = mailbox_key(&account, &mailbox)?;
    if let Some(sort) = &query.sort {
        if sort != "received" {
            return Err(bad_request(format!("unsupported sort {sort:?}: use received")));
        }
    }
    let descending = match query.order.as_deref() {
        None | Some("asc") => false,
        Some("desc") => true,
        Some(other) => return Err(bad_request(format!("order is asc or desc, not {other:?}"))),
    };
    let limit = query.limit.unwrap_or(100);
    if limit > 1000 {
        return Err(bad_request("limit is at most 1000"));
    }
    let position = query.position.unwrap_or(0);
    let entry = node.store().mailbox_entry(key.id())?.ok_or_else(|| not_found("no such mailbox"))?;
    let mut items = Vec::new();
    let mut skipped = 0;
    node.store().records_ordered(key.id(), descending, |record| {
        if !record.is_live() {
            return true;
        }
        if skipped < position {
            skipped += 1;
            return true;
        }
        items.push(item(&record));
        items.len() < limit
    })?;
    if limit == 0 {
        items.clear();
    }
    Ok(Json(json!({ "total": entry.live, "items": items })))
}

fn live_record(node: &Node, key: &MailboxKey, id: MessageId) -> Result<MessageRecord, ApiError> {
    match node.store().record(key.id(), id)? {
        Some(record) if record.is_live() => Ok(record),
        _ => Err(not_found(format!("no message {id}"))),
    }
}

async fn get_message(
    State(node): State<Node>,
    Path((account, mailbox, id)): Path<(String, String, String)>,
) -> Result<Json<Value>, ApiError> {
    let key = mailbox_key(&account, &mailbox)?;
    let record = live_record(&node, &key, message_id(&id)?)?;
    Ok(Json(item(&record)))
}

async fn get_raw(
    State(node): State<Node>,
    Path((account, mailbox, id)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    let key = mailbox_key(&account, &mailbox)?;
    let record = live_record(&node, &key, message_id(&id)?)?;
    let bytes = node.store().blob(&record.blob)?.ok_or_else(|| not_found("the message's blob has not arrived yet"))?;
    Ok(([(header::CONTENT_TYPE, "message/rfc822")], bytes).into_response())
}

#[derive(Deserialize)]
struct FlagChange {
    #[serde(default)]
    add: Vec<String>,
    #[serde(default)]
    remove: Vec<String>,
}

async fn set_flags(
    State(node): State<Node>,
    Path((account, mailbox, id)): Path<(String, String, String)>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let key = mailbox_key(&account, &mailbox)?;
    let id = message_id(&id)?;
    let change: FlagChange =
        serde_json::from_slice(&body).map_err(|error| bad_request(format!("expected {{\"add\":[...],\"remove\":[...]}}: {error}")))?;
    let parse = |names: &[String]| -> Result<Vec<Flag>, ApiError> {
        names.iter().map(|name| name.parse::<Flag>().map_err(|error| bad_request(error.to_string()))).collect()
    };
    let (add, remove) = (parse(&change.add)?, parse(&change.remove)?);
    let record = node.set_flags(&key, id, add, remove).await?;
    Ok(Json(item(&record)))
}

async fn expunge(
    State(node): State<Node>,
    Path((account, mailbox, id)): Path<(String, String, String)>,
) -> Result<StatusCode, ApiError> {
    let key = mailbox_key(&account, &mailbox)?;
    let id = message_id(&id)?;
    match node.store().record(key.id(), id)? {
        Some(record) if record.is_live() => {
            node.expunge(&key, id).await?;
            Ok(StatusCode::NO_CONTENT)
        }
        _ => Err(not_found(format!("no message {id}"))),
    }
}

/// Ready when the store answers and, if peers are configured, at least one is connected.
async fn ready(State(node): State<Node>) -> Response {
    if let Err(error) = node.store().digest() {
        return ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("store not readable: {error}")).into_response();
    }
    let peers = node.peer_statuses().await.len();
    if !node.config().peers.is_empty() && peers == 0 {
        return ApiError(StatusCode::SERVICE_UNAVAILABLE, "no peer connected yet".into()).into_response();
    }
    Json(json!({ "status": "ready", "peers": peers })).into_response()
}

async fn metrics(State(node): State<Node>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        node.encode_metrics(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::rfc3339;

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_767_225_600_123), "2026-01-01T00:00:00.123Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}
