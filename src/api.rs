//! The HTTP API: JSON over axum. The mail routes speak only to the mail service
//! ([`MailService`]); the operator's routes read the replication engine's status ([`Node`]).
//!
//! Errors are `{"error": "..."}` with a status that says what to do: 400 for bad input, 404 for
//! unknown mailboxes or messages, 413 for oversized messages, 500 when the store fails.
//! Authentication (bearer token, HTTP Basic against the accounts file) is described at
//! [`router`].

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::accounts::{AccountName, AuthenticationError, Password};
use crate::http::{bad_request, json_errors, not_found, ApiError};
use crate::mailbox::Role;
use crate::merkle::Prefix;
use crate::model::{Flag, MailboxId, MessageId};
use crate::node::{hex, Node};
use crate::service::{
    parse_flags, Delivery, Email, MailService, MailboxSummary, MailboxTarget, MailboxUpdate, Query as ListingQuery,
    ServiceError, SortKey,
};
use crate::tls::ClientAddress;

/// What every route handler gets: the mail service and the engine (for operator views).
#[derive(Clone)]
pub struct ApiState {
    service: MailService,
    engine: Node,
}

/// The routes, bound to a node.
///
/// Who reaches what, once a bearer token (`http_token_file`) or an accounts file
/// (`accounts_file`) is configured (with neither, everything stays open as before):
/// - `/healthz` and `/readyz` stay open;
/// - the routes under `/v1/mailboxes/{account}/` take HTTP Basic for that account only (403 for
///   another account's), or the operator's bearer token;
/// - every other route takes only the bearer token (403 for an account's Basic credentials).
///
/// Missing or wrong credentials get 401 with a `WWW-Authenticate` challenge, too many failed
/// logins 429 with `Retry-After`.
///
/// `stop` is the node's stop flag: streams that would otherwise stay open (the JMAP EventSource)
/// end when it is set, so a stopping node's HTTP server and store close without waiting.
pub fn router(service: MailService, engine: Node, stop: tokio::sync::watch::Receiver<bool>) -> Router {
    let jmap = crate::jmap::routes(service.clone(), engine.config().allow_plaintext_auth, stop);
    let guard = Guard {
        service: service.clone(),
        engine: engine.clone(),
    };
    let account_routes = Router::new()
        .route("/v1/mailboxes/{account}/{mailbox}", get(get_mailbox))
        .route(
            "/v1/mailboxes/{account}/{mailbox}/messages",
            post(append).get(list_messages),
        )
        .route(
            "/v1/mailboxes/{account}/{mailbox}/messages/{id}",
            get(get_message).delete(expunge),
        )
        .route("/v1/mailboxes/{account}/{mailbox}/messages/{id}/raw", get(get_raw))
        .route("/v1/mailboxes/{account}/{mailbox}/messages/{id}/flags", post(set_flags))
        .route("/v1/mailboxes/{account}/{mailbox}/sync", get(sync_ranges))
        .route("/v1/mailboxes/{account}/{mailbox}/sync/ids", get(sync_ids))
        .route("/v1/mailboxes/{account}/{mailbox}/changes", get(changes))
        .route("/v1/accounts/{account}/changes", get(account_changes))
        .route(
            "/v1/accounts/{account}/mailboxes",
            get(account_mailboxes).post(create_mailbox),
        )
        .route(
            "/v1/accounts/{account}/mailboxes/{mailbox}",
            patch(update_mailbox).delete(delete_mailbox),
        )
        .route("/v1/accounts/{account}/emails/{id}", get(get_email))
        .route("/v1/accounts/{account}/emails/{id}/move", post(move_email))
        .route_layer(axum::middleware::from_fn_with_state(guard.clone(), require_account));
    let operator_routes = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/mailboxes", get(list_mailboxes))
        .route("/metrics", get(metrics))
        .merge(crate::page::routes().with_state(engine.clone()))
        .route_layer(axum::middleware::from_fn_with_state(guard, require_operator));
    Router::new()
        .merge(account_routes)
        .merge(operator_routes)
        .route("/healthz", get(|| async { Json(json!({ "status": "alive" })) }))
        .route("/readyz", get(ready))
        .fallback(|| async { not_found("no such route") })
        .layer(axum::middleware::map_response(json_errors))
        .layer(DefaultBodyLimit::disable())
        .with_state(ApiState { service, engine })
        .merge(jmap)
}

/// What the routes' guards check credentials against.
#[derive(Clone)]
struct Guard {
    service: MailService,
    engine: Node,
}

impl Guard {
    /// With neither a token nor an accounts file, the API is open (loopback by default).
    fn is_open(&self) -> bool {
        self.engine.config().http_token.is_none() && !self.service.has_accounts()
    }

    fn token_matches(&self, presented: &str) -> bool {
        self.engine
            .config()
            .http_token
            .as_deref()
            .is_some_and(|expected| constant_time_equal(presented.as_bytes(), expected.as_bytes()))
    }

    /// 401 with the challenges this node accepts on the route.
    fn unauthorized(&self, basic: bool, message: &str) -> Response {
        self.engine.metrics().http_unauthorized.inc();
        let mut response = ApiError(StatusCode::UNAUTHORIZED, message.to_owned()).into_response();
        let headers = response.headers_mut();
        if basic && self.service.has_accounts() {
            headers.append(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Basic realm=\"mailmesh\""),
            );
        }
        if self.engine.config().http_token.is_some() || !basic || !self.service.has_accounts() {
            headers.append(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        }
        response
    }

    /// Checks Basic credentials; the error is the response to send.
    async fn login(
        &self,
        login: String,
        password: Password,
        source: IpAddr,
        basic: bool,
    ) -> Result<AccountName, Response> {
        if !self.service.has_accounts() {
            return Err(self.unauthorized(basic, "this node has no accounts file: use the bearer token"));
        }
        let refused = match self.service.authenticate(login, password, source).await {
            Ok(name) => return Ok(name),
            Err(ServiceError::Authentication(error)) => error,
            Err(other) => return Err(ApiError::from(other).into_response()),
        };
        match refused {
            AuthenticationError::Refused => Err(self.unauthorized(basic, "unknown account or wrong password")),
            error @ AuthenticationError::Throttled { retry_after } => {
                let mut response = ApiError(StatusCode::TOO_MANY_REQUESTS, error.to_string()).into_response();
                let seconds = retry_after.as_secs_f64().ceil().max(1.0) as u64;
                if let Ok(value) = header::HeaderValue::from_str(&seconds.to_string()) {
                    response.headers_mut().insert(header::RETRY_AFTER, value);
                }
                Err(response)
            }
            error @ AuthenticationError::Unavailable => {
                Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, error.to_string()).into_response())
            }
        }
    }
}

/// Credentials a request carries.
enum Presented {
    Nothing,
    Token(String),
    Basic {
        login: String,
        password: Password,
    },
    /// An `Authorization` header this API cannot read.
    Unreadable,
}

fn presented(request: &axum::extract::Request) -> Presented {
    let from_query = || {
        request.uri().query().and_then(|query| {
            query
                .split('&')
                .find_map(|pair| pair.strip_prefix("token="))
                .map(str::to_owned)
        })
    };
    let Some(value) = request.headers().get(header::AUTHORIZATION) else {
        return from_query().map_or(Presented::Nothing, Presented::Token);
    };
    let Ok(value) = value.to_str() else {
        return Presented::Unreadable;
    };
    let (scheme, rest) = value.trim().split_once(' ').unwrap_or((value, ""));
    if scheme.eq_ignore_ascii_case("bearer") {
        return Presented::Token(rest.trim().to_owned());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        return match decode_basic(rest.trim()) {
            Some((login, password)) => Presented::Basic { login, password },
            None => Presented::Unreadable,
        };
    }
    Presented::Unreadable
}

/// Decodes RFC 7617 `base64(user-id ":" password)`, UTF-8 only.
pub fn decode_basic(encoded: &str) -> Option<(String, Password)> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD.decode(encoded).ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let (login, password) = text.split_once(':')?;
    Some((login.to_owned(), Password::new(password)))
}

fn client_of(request: &axum::extract::Request) -> Option<ClientAddress> {
    request
        .extensions()
        .get::<axum::extract::ConnectInfo<ClientAddress>>()
        .map(|info| info.0)
}

fn source_of(request: &axum::extract::Request) -> IpAddr {
    client_of(request).map_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED), |client| client.address.ip())
}

/// Credentials sent in the clear from another host are refused (403) unless the operator allowed
/// it; they are not even checked, so a password sniffed on the way is not also confirmed.
fn refuse_plaintext_credentials(guard: &Guard, request: &axum::extract::Request) -> Option<Response> {
    let allowed = guard.engine.config().allow_plaintext_auth;
    match client_of(request) {
        Some(client) if !client.may_send_credentials(allowed) => Some(
            ApiError(
                StatusCode::FORBIDDEN,
                "credentials over plain HTTP are accepted only from loopback: use HTTPS (tls_cert_file and \
                 tls_key_file), or set allow_plaintext_auth behind a proxy that terminates TLS"
                    .into(),
            )
            .into_response(),
        ),
        _ => None,
    }
}

/// The guard of the routes under `/v1/mailboxes/{account}/`: Basic for that account, or the
/// bearer token.
async fn require_account(
    State(guard): State<Guard>,
    Path(parameters): Path<HashMap<String, String>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if guard.is_open() {
        return next.run(request).await;
    }
    let account = parameters.get("account").map(String::as_str).unwrap_or_default();
    let presented = presented(&request);
    if matches!(presented, Presented::Token(_) | Presented::Basic { .. }) {
        if let Some(refusal) = refuse_plaintext_credentials(&guard, &request) {
            return refusal;
        }
    }
    match presented {
        Presented::Token(token) if guard.token_matches(&token) => next.run(request).await,
        Presented::Token(_) => guard.unauthorized(true, "wrong bearer token"),
        Presented::Basic { login, password } => match guard.login(login, password, source_of(&request), true).await {
            Ok(name) if name.as_str() == account => next.run(request).await,
            Ok(name) => ApiError(
                StatusCode::FORBIDDEN,
                format!("{name} may reach only its own mailboxes"),
            )
            .into_response(),
            Err(response) => response,
        },
        Presented::Nothing | Presented::Unreadable => guard.unauthorized(
            true,
            "log in with HTTP Basic (account and password) or the bearer token",
        ),
    }
}

/// The guard of the operator's routes: the bearer token only.
async fn require_operator(
    State(guard): State<Guard>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if guard.is_open() {
        return next.run(request).await;
    }
    let needs_token = if guard.engine.config().http_token.is_some() {
        "missing or wrong bearer token"
    } else {
        "this route needs the operator's bearer token, and this node has none: set http_token_file"
    };
    let presented = presented(&request);
    if matches!(presented, Presented::Token(_) | Presented::Basic { .. }) {
        if let Some(refusal) = refuse_plaintext_credentials(&guard, &request) {
            return refusal;
        }
    }
    match presented {
        Presented::Token(token) if guard.token_matches(&token) => next.run(request).await,
        Presented::Basic { login, password } => match guard.login(login, password, source_of(&request), false).await {
            Ok(name) => ApiError(
                StatusCode::FORBIDDEN,
                format!("{name} may reach only its own mailboxes; this route needs the operator's bearer token"),
            )
            .into_response(),
            Err(response) => response,
        },
        _ => guard.unauthorized(false, needs_token),
    }
}

fn constant_time_equal(left: &[u8], right: &[u8]) -> bool {
    if left.len() != right.len() {
        return false;
    }
    left.iter()
        .zip(right)
        .fold(0u8, |difference, (a, b)| difference | (a ^ b))
        == 0
}

fn message_id(text: &str) -> Result<MessageId, ApiError> {
    text.parse()
        .map_err(|error: crate::model::ModelError| bad_request(error.to_string()))
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
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        (rest % 3600) / 60,
        rest % 60,
        millis % 1000
    )
}

fn item(email: &Email) -> Value {
    let flags: Vec<&str> = email.flags.iter().map(Flag::as_str).collect();
    json!({
        "id": email.id.to_string(),
        "blob": email.blob.to_string(),
        "size": email.size,
        "received": rfc3339(email.received_millis),
        "date": rfc3339(email.date_millis.unwrap_or(email.received_millis)),
        "from": email.from,
        "subject": email.subject,
        "flags": flags,
    })
}

async fn status(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let node = &state.engine;
    let peers = node.peer_statuses().await;
    let listen: Vec<String> = node
        .listen_addresses()
        .await
        .iter()
        .map(|address| address.to_string())
        .collect();
    let blocked: Vec<Value> = node
        .blocked_peers()
        .await
        .into_iter()
        .map(|(peer, left)| json!({ "peer_id": peer.to_string(), "seconds_left": left.as_secs() }))
        .collect();
    Ok(Json(json!({
        "peer_id": node.peer_id().to_string(),
        "name": node.name(),
        "listen": listen,
        "announce": node.announce_statuses(&peers),
        "peers": peers,
        "digest": node.digest_hex()?,
        "mailboxes": node.directory()?.count,
        "stale": node.is_stale(),
        "tombstones_acknowledged_before": node.acknowledged_before(),
        "blocked": blocked,
        "divergent": node
            .divergent_mailboxes()
            .into_iter()
            .map(|(key, peer, since)| json!({
                "account": key.account(),
                "mailbox": key.mailbox(),
                "peer_id": peer.to_string(),
                "seconds": since.as_secs(),
            }))
            .collect::<Vec<Value>>(),
    })))
}

async fn list_mailboxes(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let mailboxes: Vec<Value> = state
        .service
        .all_mailboxes()?
        .iter()
        .map(|mailbox| {
            json!({
                "account": mailbox.account,
                "mailbox": mailbox.name,
                "count": mailbox.total,
                "root": mailbox.root,
            })
        })
        .collect();
    Ok(Json(json!({ "mailboxes": mailboxes })))
}

fn mailbox_json(mailbox: &MailboxSummary) -> Value {
    json!({
        "account": mailbox.account,
        "id": mailbox.id.to_string(),
        "mailbox": mailbox.name,
        "parent": mailbox.parent.map(|parent| parent.to_string()),
        "role": mailbox.role.map(Role::as_str),
        "subscribed": mailbox.subscribed,
        "sort_order": mailbox.sort_order,
        "count": mailbox.total,
        "unseen": mailbox.unseen,
        "tombstones": mailbox.tombstones,
        "root": mailbox.root,
    })
}

async fn get_mailbox(
    State(state): State<ApiState>,
    Path((account, mailbox)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let id = state.service.find_mailbox(&account, &mailbox)?;
    Ok(Json(mailbox_json(&state.service.mailbox(&account, id)?)))
}

async fn account_mailboxes(
    State(state): State<ApiState>,
    Path(account): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let mailboxes: Vec<Value> = state.service.mailboxes(&account)?.iter().map(mailbox_json).collect();
    Ok(Json(json!({ "mailboxes": mailboxes })))
}

/// A mailbox named in a route: its stable ID, or its path.
fn mailbox_of(state: &ApiState, account: &str, text: &str) -> Result<MailboxId, ApiError> {
    match text.parse::<MessageId>() {
        Ok(id) if state.service.mailbox(account, MailboxId(id.0)).is_ok() => Ok(MailboxId(id.0)),
        _ => Ok(state.service.find_mailbox(account, text)?),
    }
}

fn role_of(text: Option<&str>) -> Result<Option<Role>, ApiError> {
    match text {
        None | Some("") => Ok(None),
        Some(name) => name
            .parse::<Role>()
            .map(Some)
            .map_err(|_| bad_request(format!("unknown role {name:?}: archive, drafts, junk, sent or trash"))),
    }
}

#[derive(Deserialize)]
struct NewMailbox {
    name: String,
    role: Option<String>,
}

async fn create_mailbox(
    State(state): State<ApiState>,
    Path(account): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let request: NewMailbox = serde_json::from_slice(&body)
        .map_err(|error| bad_request(format!("expected {{\"name\": \"...\", \"role\": ...}}: {error}")))?;
    let role = role_of(request.role.as_deref())?;
    let created = state.service.create_mailbox(&account, &request.name, role).await?;
    Ok((StatusCode::CREATED, Json(mailbox_json(&created))))
}

#[derive(Deserialize)]
struct MailboxChange {
    name: Option<String>,
    /// A role name, or "" / null to clear it.
    #[serde(default, with = "serde_with_option")]
    role: Option<Option<String>>,
    subscribed: Option<bool>,
    sort_order: Option<u32>,
}

/// Tells a JSON `null` (clear) from an absent field (keep).
mod serde_with_option {
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Option<String>>, D::Error> {
        Ok(Some(Option::<String>::deserialize(deserializer)?))
    }
}

async fn update_mailbox(
    State(state): State<ApiState>,
    Path((account, mailbox)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let change: MailboxChange = serde_json::from_slice(&body).map_err(|error| {
        bad_request(format!(
            "expected {{\"name\", \"role\", \"subscribed\", \"sort_order\"}} (each optional): {error}"
        ))
    })?;
    let id = mailbox_of(&state, &account, &mailbox)?;
    let mut summary = state.service.mailbox(&account, id)?;
    if let Some(name) = &change.name {
        summary = state.service.rename_mailbox(&account, id, name).await?;
    }
    let role = match &change.role {
        Some(role) => Some(role_of(role.as_deref())?),
        None => None,
    };
    if role.is_some() || change.subscribed.is_some() || change.sort_order.is_some() {
        summary = state
            .service
            .update_mailbox(
                &account,
                id,
                MailboxUpdate {
                    role,
                    subscribed: change.subscribed,
                    sort_order: change.sort_order,
                },
            )
            .await?;
    }
    Ok(Json(mailbox_json(&summary)))
}

async fn delete_mailbox(
    State(state): State<ApiState>,
    Path((account, mailbox)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let id = mailbox_of(&state, &account, &mailbox)?;
    let destroyed = state.service.delete_mailbox(&account, id).await?;
    Ok(Json(json!({ "id": id.to_string(), "destroyed": destroyed })))
}

async fn get_email(
    State(state): State<ApiState>,
    Path((account, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let email = state.service.email(&account, message_id(&id)?)?;
    Ok(Json(email_json(&state, &account, &email)))
}

#[derive(Deserialize)]
struct MoveRequest {
    /// The destination: a mailbox ID or path.
    mailbox: String,
}

async fn move_email(
    State(state): State<ApiState>,
    Path((account, id)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let request: MoveRequest = serde_json::from_slice(&body)
        .map_err(|error| bad_request(format!("expected {{\"mailbox\": \"ID or path\"}}: {error}")))?;
    let to = mailbox_of(&state, &account, &request.mailbox)?;
    let email = state.service.move_email(&account, message_id(&id)?, to).await?;
    Ok(Json(email_json(&state, &account, &email)))
}

/// An email's listing item plus its mailbox's ID and path.
fn email_json(state: &ApiState, account: &str, email: &Email) -> Value {
    let mut value = item(email);
    value["mailbox_id"] = Value::String(email.mailbox.to_string());
    if let Ok(mailbox) = state.service.mailbox(account, email.mailbox) {
        value["mailbox"] = Value::String(mailbox.name);
    }
    value
}

/// The email `id` if it is shown in the mailbox the route names (the routes under
/// `/v1/mailboxes/{account}/{mailbox}/messages/{id}` keep their meaning now that emails move).
fn email_in(state: &ApiState, account: &str, mailbox: &str, id: &str) -> Result<Email, ApiError> {
    let id = message_id(id)?;
    let mailbox = state.service.find_mailbox(account, mailbox)?;
    let email = state.service.email(account, id)?;
    if email.mailbox != mailbox {
        return Err(ServiceError::NoSuchMessage(id).into());
    }
    Ok(email)
}

#[derive(Deserialize)]
struct AppendOptions {
    /// Answer 200 with the existing message instead of appending when the mailbox already holds
    /// a live message with the same bytes (used by `mailmesh import`).
    #[serde(default)]
    skip_duplicate: bool,
    /// Flags to set on the new message, comma-separated (`\Seen,\Flagged,$label`).
    flags: Option<String>,
    /// The received date, in milliseconds since the epoch (an import keeps the original).
    received: Option<u64>,
}

async fn append(
    State(state): State<ApiState>,
    Path((account, mailbox)): Path<(String, String)>,
    Query(options): Query<AppendOptions>,
    body: Body,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let limit = state.service.max_message_bytes();
    let raw: Bytes = axum::body::to_bytes(body, usize::try_from(limit).unwrap_or(usize::MAX))
        .await
        .map_err(|_| {
            ApiError(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("message exceeds the limit of {limit} bytes"),
            )
        })?;
    if raw.is_empty() {
        return Err(bad_request("empty message body"));
    }
    let flag_names: Vec<String> = options
        .flags
        .as_deref()
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(str::to_owned)
        .collect();
    let delivered = state
        .service
        .deliver(Delivery {
            account,
            mailbox: MailboxTarget::PathOrCreate(mailbox),
            raw: raw.to_vec(),
            flags: parse_flags(&flag_names)?,
            received_millis: options.received,
            skip_duplicate: options.skip_duplicate,
        })
        .await?;
    let mut answer = json!({
        "id": delivered.id.to_string(),
        "mailbox_id": delivered.mailbox.to_string(),
        "blob": delivered.blob.to_string(),
        "size": delivered.size,
    });
    if delivered.duplicate {
        answer["duplicate"] = Value::Bool(true);
        return Ok((StatusCode::OK, Json(answer)));
    }
    Ok((StatusCode::CREATED, Json(answer)))
}

#[derive(Deserialize)]
struct ListQuery {
    sort: Option<String>,
    order: Option<String>,
    position: Option<usize>,
    limit: Option<usize>,
    search: Option<String>,
}

async fn list_messages(
    State(state): State<ApiState>,
    Path((account, mailbox)): Path<(String, String)>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let sort_name = query.sort.as_deref().unwrap_or("received");
    let sort = SortKey::parse(sort_name).ok_or_else(|| {
        bad_request(format!(
            "unsupported sort {sort_name:?}: use received, date, from, subject or size"
        ))
    })?;
    let descending = match query.order.as_deref() {
        None | Some("asc") => false,
        Some("desc") => true,
        Some(other) => return Err(bad_request(format!("order is asc or desc, not {other:?}"))),
    };
    let limit = query.limit.unwrap_or(100);
    if limit > 1000 {
        return Err(bad_request("limit is at most 1000"));
    }
    let mailbox = state.service.find_mailbox(&account, &mailbox)?;
    let result = state
        .service
        .query(
            &account,
            mailbox,
            ListingQuery {
                search: query.search,
                sort,
                descending,
                position: query.position.unwrap_or(0),
                limit,
            },
        )
        .await?;
    let items: Vec<Value> = result.emails.iter().map(item).collect();
    Ok(Json(json!({ "total": result.total, "items": items })))
}

#[derive(Deserialize)]
struct RangeQuery {
    lo: Option<String>,
    hi: Option<String>,
    split: Option<u32>,
    limit: Option<usize>,
}

/// The trie node whose bounds are exactly `lo..=hi` (the whole mailbox when both are absent).
fn prefix_of_bounds(lo: Option<&str>, hi: Option<&str>) -> Result<Prefix, ApiError> {
    let (low, high) = match (lo, hi) {
        (None, None) => return Ok(Prefix::ROOT),
        (Some(lo), Some(hi)) => (message_id(lo)?.0, message_id(hi)?.0),
        _ => return Err(bad_request("give both lo and hi, or neither")),
    };
    (0..=crate::merkle::KEY_NIBBLES)
        .map(|depth| Prefix::of(low, depth))
        .find(|prefix| prefix.bounds() == (low, high))
        .ok_or_else(|| bad_request("lo and hi must be the bounds of a range returned by /sync"))
}

fn range_json(prefix: Prefix, aggregate: &crate::merkle::Aggregate) -> Value {
    let (low, high) = prefix.bounds();
    json!({
        "lo": MessageId(low).to_string(),
        "hi": MessageId(high).to_string(),
        "count": aggregate.count,
        "fingerprint": hex(&aggregate.fingerprint().0),
    })
}

/// Range fingerprints for heavy clients: the same counts and fingerprints peers compare.
async fn sync_ranges(
    State(state): State<ApiState>,
    Path((account, mailbox)): Path<(String, String)>,
    Query(query): Query<RangeQuery>,
) -> Result<Json<Value>, ApiError> {
    let prefix = prefix_of_bounds(query.lo.as_deref(), query.hi.as_deref())?;
    let levels = match query.split.unwrap_or(16) {
        16 => 1,
        256 => 2,
        other => return Err(bad_request(format!("split is 16 or 256, not {other}"))),
    };
    let service = &state.service;
    // The ranges cover the account's emails trie (every mailbox of the account), the unit
    // peers reconcile; the mailbox in the route must exist.
    service.find_mailbox(&account, &mailbox)?;
    let (whole, _) = service.range(&account, prefix)?;
    // Skip single-child levels (time-ordered IDs share their high nibbles), as peers do, so
    // each answer splits where the messages actually branch.
    let mut branching = prefix;
    while branching.depth() < crate::merkle::KEY_NIBBLES && whole.count > 1 {
        let (_, children) = service.range(&account, branching)?;
        let mut present = children
            .iter()
            .enumerate()
            .filter(|(_, aggregate)| !aggregate.is_empty());
        match (present.next(), present.next()) {
            (Some((index, _)), None) => match branching.child(index as u8) {
                Some(child) => branching = child,
                None => break,
            },
            _ => break,
        }
    }
    let mut frontier = vec![branching];
    for _ in 0..levels {
        frontier = frontier
            .iter()
            .flat_map(|parent| (0..16).filter_map(move |index| parent.child(index)))
            .collect();
    }
    let mut ranges = Vec::new();
    for child in frontier {
        let (aggregate, _) = service.range(&account, child)?;
        if !aggregate.is_empty() {
            ranges.push(range_json(child, &aggregate));
        }
    }
    let mut answer = range_json(prefix, &whole);
    answer["ranges"] = Value::Array(ranges);
    Ok(Json(answer))
}

/// The IDs in a range with an 8-byte digest of each record's state (the leaf tag peers use).
async fn sync_ids(
    State(state): State<ApiState>,
    Path((account, mailbox)): Path<(String, String)>,
    Query(query): Query<RangeQuery>,
) -> Result<Json<Value>, ApiError> {
    let low = query.lo.as_deref().map(message_id).transpose()?.unwrap_or(MessageId(0));
    let high = query
        .hi
        .as_deref()
        .map(message_id)
        .transpose()?
        .unwrap_or(MessageId(u128::MAX));
    let limit = query.limit.unwrap_or(1000);
    if limit > 10_000 {
        return Err(bad_request("limit is at most 10000"));
    }
    state.service.find_mailbox(&account, &mailbox)?;
    let mut entries = state.service.range_entries(&account, low, high, limit + 1)?;
    let more = entries.len() > limit;
    entries.truncate(limit);
    let ids: Vec<Value> = entries
        .iter()
        .map(|entry| {
            json!({
                "id": entry.id.to_string(),
                "state": hex(&entry.state),
                "expunged": !entry.live,
            })
        })
        .collect();
    Ok(Json(json!({ "ids": ids, "more": more })))
}

#[derive(Deserialize)]
struct ChangesQuery {
    since: Option<u64>,
    limit: Option<usize>,
}

/// Created, updated and expunged IDs since a node-local modseq (like CONDSTORE or JMAP /changes).
async fn changes(
    State(state): State<ApiState>,
    Path((account, mailbox)): Path<(String, String)>,
    Query(query): Query<ChangesQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = query.limit.unwrap_or(10_000).min(100_000);
    let mailbox = state.service.find_mailbox(&account, &mailbox)?;
    let changes = state
        .service
        .changes(&account, mailbox, query.since.unwrap_or(0), limit)?;
    let text = |ids: &[MessageId]| ids.iter().map(|id| id.to_string()).collect::<Vec<_>>();
    Ok(Json(json!({
        "created": text(&changes.created),
        "updated": text(&changes.updated),
        "expunged": text(&changes.expunged),
        "modseq": changes.modseq,
        "cannot_calculate": changes.cannot_calculate,
        "node": state.engine.peer_id().to_string(),
    })))
}

#[derive(Deserialize)]
struct AccountChangesQuery {
    since: Option<String>,
    limit: Option<usize>,
}

/// The account's change feed: emails created, updated and destroyed since a state that any node
/// of the cluster accepts (410 Gone when the state is too old or not one of ours: resync).
async fn account_changes(
    State(state): State<ApiState>,
    Path(account): Path<String>,
    Query(query): Query<AccountChangesQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = query.limit.unwrap_or(10_000).clamp(1, 100_000);
    let changes = state.service.account_changes(&account, query.since.as_deref(), limit)?;
    let emails = |emails: &[crate::service::ChangedEmail]| -> Vec<Value> {
        emails
            .iter()
            .map(|email| {
                json!({
                    "id": email.id.to_string(),
                    "mailbox": email.mailbox_name,
                    "mailbox_id": email.mailbox.map(|mailbox| mailbox.to_string()),
                })
            })
            .collect()
    };
    Ok(Json(json!({
        "created": emails(&changes.created),
        "updated": emails(&changes.updated),
        "destroyed": changes.destroyed.iter().map(|id| id.to_string()).collect::<Vec<_>>(),
        "mailboxes": changes.mailboxes.iter().map(|id| id.to_string()).collect::<Vec<_>>(),
        "state": changes.new_state,
        "has_more": changes.has_more,
    })))
}

async fn get_message(
    State(state): State<ApiState>,
    Path((account, mailbox, id)): Path<(String, String, String)>,
) -> Result<Json<Value>, ApiError> {
    let email = email_in(&state, &account, &mailbox, &id)?;
    Ok(Json(item(&email)))
}

async fn get_raw(
    State(state): State<ApiState>,
    Path((account, mailbox, id)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    let email = email_in(&state, &account, &mailbox, &id)?;
    let bytes = state.service.raw(&account, email.id)?;
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
    State(state): State<ApiState>,
    Path((account, mailbox, id)): Path<(String, String, String)>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let id = email_in(&state, &account, &mailbox, &id)?.id;
    let change: FlagChange = serde_json::from_slice(&body)
        .map_err(|error| bad_request(format!("expected {{\"add\":[...],\"remove\":[...]}}: {error}")))?;
    let (add, remove) = (parse_flags(&change.add)?, parse_flags(&change.remove)?);
    let email = state.service.set_flags(&account, id, add, remove).await?;
    Ok(Json(item(&email)))
}

async fn expunge(
    State(state): State<ApiState>,
    Path((account, mailbox, id)): Path<(String, String, String)>,
) -> Result<StatusCode, ApiError> {
    let email = email_in(&state, &account, &mailbox, &id)?;
    state.service.destroy(&account, email.id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Ready when the store answers and, if peers are configured, at least one is connected.
async fn ready(State(state): State<ApiState>) -> Response {
    let node = &state.engine;
    if let Err(error) = node.directory() {
        return ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("store not readable: {error}")).into_response();
    }
    if node.is_stale() {
        return ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "stale replica: see the node's log; rejoin it empty".into(),
        )
        .into_response();
    }
    let peers = node.peer_statuses().await.len();
    if !node.config().peers.is_empty() && peers == 0 {
        return ApiError(StatusCode::SERVICE_UNAVAILABLE, "no peer connected yet".into()).into_response();
    }
    Json(json!({ "status": "ready", "peers": peers })).into_response()
}

async fn metrics(State(state): State<ApiState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.engine.encode_metrics(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::{decode_basic, rfc3339};

    #[test]
    fn decodes_basic_credentials() {
        // base64("alice@example.org:pa:ss word")
        let (login, password) = decode_basic("YWxpY2VAZXhhbXBsZS5vcmc6cGE6c3Mgd29yZA==").unwrap();
        assert_eq!((login.as_str(), password.expose()), ("alice@example.org", "pa:ss word"));
        assert!(format!("{password:?}").find("pa:ss").is_none());
        assert!(decode_basic("not base64!").is_none());
        assert!(decode_basic("YWxpY2U=").is_none(), "no colon");
        assert!(decode_basic("/w==").is_none(), "not UTF-8");
        assert!(decode_basic("").is_none());
    }

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_767_225_600_123), "2026-01-01T00:00:00.123Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}
