//! JMAP (RFC 8620 core, RFC 8621 mail) on the mail service.
//!
//! This module is the protocol's frame: the session resource, the API endpoint with batched
//! method calls, result references and the request-level and method-level errors. The methods
//! live beside it: [`mailbox`] (Mailbox/get, /changes, /set, /query and /queryChanges),
//! [`email`] (Email/get, /query, /queryChanges, /changes, /set, /import, /copy and /parse), [`thread`]
//! (Thread/get and /changes), [`snippet`] (SearchSnippet/get), [`blobs`] (upload and download, RFC 8620
//! §6) and [`push`] (the EventSource of §7.3). Like every protocol here it calls only
//! [`MailService`]: logins go through the accounts file with its throttling, and nothing reaches
//! the store, the network or the sync core.
//!
//! Every `state` string is the account's portable change-feed token
//! ([`MailService::account_changes`]): a client that moves to another node of the cluster hands
//! that node its state and carries on, with no `cannotCalculateChanges`.
//!
//! Limits are advertised in the session and enforced: a request body over
//! [`MAX_SIZE_REQUEST`] or with more than [`MAX_CALLS_IN_REQUEST`] calls gets the `limit`
//! request error naming the limit; a /get over [`MAX_OBJECTS_IN_GET`] ids or a /set over
//! [`MAX_OBJECTS_IN_SET`] objects gets `requestTooLarge`.

pub mod blobs;
pub mod body;
pub mod create;
pub mod email;
pub mod mailbox;
pub mod push;
pub mod snippet;
pub mod thread;

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::DefaultBodyLimit;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};

use crate::accounts::AuthenticationError;
use crate::service::{MailService, ServiceError};
use crate::tls::ClientAddress;

pub const CORE: &str = "urn:ietf:params:jmap:core";
pub const MAIL: &str = "urn:ietf:params:jmap:mail";
/// The largest request body accepted, in bytes.
pub const MAX_SIZE_REQUEST: usize = 10 * 1024 * 1024;
/// The most method calls in one request.
pub const MAX_CALLS_IN_REQUEST: usize = 64;
/// The most objects one /get may ask for, and one /set may change.
pub const MAX_OBJECTS_IN_GET: usize = 1000;
pub const MAX_OBJECTS_IN_SET: usize = 500;
/// The deepest a result reference path may go.
const MAX_PATH_DEPTH: usize = 32;

/// The JMAP routes: `/.well-known/jmap`, `/jmap/api`, blob upload and download, and the
/// EventSource.
pub fn routes(service: MailService, allow_plaintext_auth: bool, stop: tokio::sync::watch::Receiver<bool>) -> Router {
    Router::new()
        .route("/.well-known/jmap", get(session))
        .route("/jmap/api", post(api))
        .route("/jmap/upload/{account}/", post(blobs::upload))
        .route("/jmap/download/{account}/{blob}/{name}", get(blobs::download))
        .route("/jmap/eventsource", get(push::event_source))
        .layer(DefaultBodyLimit::disable())
        .with_state(Jmap {
            service,
            allow_plaintext_auth,
            uploads: Arc::new(blobs::Uploads::default()),
            threads: Arc::new(crate::service::threads::ThreadIndex::default()),
            stop,
        })
}

#[derive(Clone)]
pub(crate) struct Jmap {
    service: MailService,
    allow_plaintext_auth: bool,
    uploads: Arc<blobs::Uploads>,
    /// The thread index, a cache over the service (see [`crate::service::threads`]).
    threads: Arc<crate::service::threads::ThreadIndex>,
    /// The node's stop flag: open event streams end when it is set.
    stop: tokio::sync::watch::Receiver<bool>,
}

/// A request-level error (RFC 8620 §3.6.1), answered as RFC 7807 problem details.
pub(crate) fn problem(status: StatusCode, kind: &str, detail: &str, extra: Option<(&str, Value)>) -> Response {
    let mut body =
        json!({ "type": format!("urn:ietf:params:jmap:error:{kind}"), "status": status.as_u16(), "detail": detail });
    if let Some((key, value)) = extra {
        body[key] = value;
    }
    (
        status,
        [(header::CONTENT_TYPE, "application/problem+json")],
        body.to_string(),
    )
        .into_response()
}

fn unauthorized(detail: &str) -> Response {
    let mut response = (StatusCode::UNAUTHORIZED, Json(json!({ "error": detail }))).into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Basic realm=\"mailmesh\""),
    );
    response
}

/// Checks HTTP Basic against the accounts file; the error is the response to send.
pub(crate) async fn login(jmap: &Jmap, headers: &HeaderMap, client: ClientAddress) -> Result<String, Response> {
    if !jmap.service.has_accounts() {
        return Err(unauthorized("JMAP needs accounts: set accounts_file"));
    }
    let source = client.address.ip();
    if !client.may_send_credentials(jmap.allow_plaintext_auth) {
        return Err((
            StatusCode::FORBIDDEN,
            Json(json!({ "error": "credentials over plain HTTP are accepted only from loopback: use HTTPS" })),
        )
            .into_response());
    }
    let credentials = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| {
            let (scheme, rest) = value.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("basic").then_some(rest.trim())
        })
        .and_then(crate::api::decode_basic);
    let Some((name, password)) = credentials else {
        return Err(unauthorized("log in with HTTP Basic"));
    };
    match jmap.service.authenticate(name, password, source).await {
        Ok(account) => Ok(account.as_str().to_owned()),
        Err(ServiceError::Authentication(AuthenticationError::Throttled { retry_after })) => {
            let mut response = (
                StatusCode::TOO_MANY_REQUESTS,
                Json(json!({ "error": "too many failed logins" })),
            )
                .into_response();
            if let Ok(value) = header::HeaderValue::from_str(&retry_after.as_secs().max(1).to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
            Err(response)
        }
        Err(ServiceError::Authentication(AuthenticationError::Refused)) => {
            Err(unauthorized("unknown account or wrong password"))
        }
        Err(other) => Err((
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "error": other.to_string() })),
        )
            .into_response()),
    }
}

/// The session resource (RFC 8620 §2).
async fn session(
    State(jmap): State<Jmap>,
    ConnectInfo(client): ConnectInfo<ClientAddress>,
    headers: HeaderMap,
) -> Response {
    let account = match login(&jmap, &headers, client).await {
        Ok(account) => account,
        Err(response) => return response,
    };
    let host = headers
        .get(header::HOST)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("localhost");
    let scheme = if client.secure { "https" } else { "http" };
    let base = format!("{scheme}://{host}");
    Json(json!({
        "capabilities": {
            CORE: {
                "maxSizeUpload": jmap.service.max_message_bytes(),
                "maxConcurrentUpload": 4,
                "maxSizeRequest": MAX_SIZE_REQUEST,
                "maxConcurrentRequests": 4,
                "maxCallsInRequest": MAX_CALLS_IN_REQUEST,
                "maxObjectsInGet": MAX_OBJECTS_IN_GET,
                "maxObjectsInSet": MAX_OBJECTS_IN_SET,
                "collationAlgorithms": [],
            },
            MAIL: {},
        },
        "accounts": {
            &account: {
                "name": &account,
                "isPersonal": true,
                "isReadOnly": false,
                "accountCapabilities": {
                    MAIL: {
                        "maxMailboxesPerEmail": 1,
                        "maxMailboxDepth": null,
                        "maxSizeMailboxName": 255,
                        "maxSizeAttachmentsPerEmail": jmap.service.max_message_bytes(),
                        "emailQuerySortOptions": email::SORT_OPTIONS,
                        "mayCreateTopLevelMailbox": true,
                    }
                },
            }
        },
        "primaryAccounts": { MAIL: &account },
        "username": &account,
        "apiUrl": format!("{base}/jmap/api"),
        "downloadUrl": format!("{base}/jmap/download/{{accountId}}/{{blobId}}/{{name}}?type={{type}}"),
        "uploadUrl": format!("{base}/jmap/upload/{{accountId}}/"),
        "eventSourceUrl": format!("{base}/jmap/eventsource?types={{types}}&closeafter={{closeafter}}&ping={{ping}}"),
        "state": "0",
    }))
    .into_response()
}

/// The API endpoint (RFC 8620 §3).
async fn api(
    State(jmap): State<Jmap>,
    ConnectInfo(client): ConnectInfo<ClientAddress>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let account = match login(&jmap, &headers, client).await {
        Ok(account) => account,
        Err(response) => return response,
    };
    // Read at most the limit: a larger body is refused without being buffered whole.
    let Ok(body) = axum::body::to_bytes(body, MAX_SIZE_REQUEST).await else {
        return problem(
            StatusCode::BAD_REQUEST,
            "limit",
            "the request is larger than maxSizeRequest",
            Some(("limit", json!("maxSizeRequest"))),
        );
    };
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return problem(StatusCode::BAD_REQUEST, "notJSON", "the request body is not JSON", None);
    };
    match answer(&jmap, &account, &request).await {
        Ok(response) => Json(response).into_response(),
        Err(response) => response,
    }
}

/// One method call of a request.
#[derive(Clone, Debug, PartialEq)]
pub struct MethodCall {
    pub name: String,
    pub arguments: Map<String, Value>,
    pub call_id: String,
}

/// A request-level error: its type (after `urn:ietf:params:jmap:error:`), a description, and
/// the limit it names, if any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestError {
    pub kind: &'static str,
    pub detail: String,
    pub limit: Option<&'static str>,
}

impl RequestError {
    fn new(kind: &'static str, detail: impl Into<String>) -> RequestError {
        RequestError {
            kind,
            detail: detail.into(),
            limit: None,
        }
    }

    fn into_response(self) -> Response {
        problem(
            StatusCode::BAD_REQUEST,
            self.kind,
            &self.detail,
            self.limit.map(|limit| ("limit", json!(limit))),
        )
    }
}

/// Checks a request's shape (RFC 8620 §3.3): its capabilities and its method calls.
pub fn check_request(request: &Value) -> Result<(Vec<String>, Vec<MethodCall>), RequestError> {
    let not_request = |detail: &str| RequestError::new("notRequest", detail);
    let using: Vec<String> = request
        .get("using")
        .and_then(Value::as_array)
        .ok_or_else(|| not_request("the request has no \"using\" array"))?
        .iter()
        .map(|capability| {
            capability
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| not_request("\"using\" holds a non-string"))
        })
        .collect::<Result<_, _>>()?;
    if let Some(unknown) = using
        .iter()
        .find(|capability| ![CORE, MAIL].contains(&capability.as_str()))
    {
        return Err(RequestError::new(
            "unknownCapability",
            format!("this server does not support {unknown}"),
        ));
    }
    let calls = request
        .get("methodCalls")
        .and_then(Value::as_array)
        .ok_or_else(|| not_request("the request has no \"methodCalls\" array"))?;
    if calls.len() > MAX_CALLS_IN_REQUEST {
        return Err(RequestError {
            limit: Some("maxCallsInRequest"),
            ..RequestError::new("limit", "the request has more method calls than maxCallsInRequest")
        });
    }
    let calls = calls
        .iter()
        .map(|call| match call.as_array().map(Vec::as_slice) {
            Some([Value::String(name), Value::Object(arguments), Value::String(call_id)]) => Ok(MethodCall {
                name: name.clone(),
                arguments: arguments.clone(),
                call_id: call_id.clone(),
            }),
            _ => Err(not_request("each method call is [name, arguments, call id]")),
        })
        .collect::<Result<_, _>>()?;
    Ok((using, calls))
}

/// Runs every method call of a request in order and collects their responses.
async fn answer(jmap: &Jmap, account: &str, request: &Value) -> Result<Value, Response> {
    let (using, calls) = check_request(request).map_err(RequestError::into_response)?;
    let using: Vec<&str> = using.iter().map(String::as_str).collect();
    // Creation ids are request-wide (RFC 8620 §3.3): the request may bring some, and every /set
    // adds the ones it creates, for later calls to reference as "#id".
    let given_created_ids = request.get("createdIds");
    let mut created_ids: CreatedIds = match given_created_ids {
        None | Some(Value::Null) => CreatedIds::new(),
        Some(value) => serde_json::from_value(value.clone())
            .map_err(|_| RequestError::new("notRequest", "createdIds is not a map of ids").into_response())?,
    };
    let mut responses: Vec<Value> = Vec::with_capacity(calls.len());
    for call in calls {
        let outcome = match resolve_references(&call.arguments, &responses) {
            Ok(arguments) => call_method(jmap, account, &using, &call.name, arguments, &mut created_ids).await,
            Err(error) => Err(error),
        };
        match outcome {
            // Moved in, not through `json!`, which would copy the whole answer (the macro
            // serialises each value it is given): with 1,000 mailboxes those copies were half
            // of a Mailbox/get.
            Ok(response) => responses.push(Value::Array(vec![
                Value::String(call.name),
                response,
                Value::String(call.call_id),
            ])),
            Err(error) => responses.push(Value::Array(vec![
                Value::String("error".into()),
                error,
                Value::String(call.call_id),
            ])),
        }
    }
    let mut response = Map::new();
    response.insert("methodResponses".into(), Value::Array(responses));
    response.insert("sessionState".into(), Value::String("0".into()));
    if given_created_ids.is_some_and(|value| !value.is_null()) {
        response.insert("createdIds".into(), json!(created_ids));
    }
    Ok(Value::Object(response))
}

/// A /get response (RFC 8620 §5.1), its list moved in rather than copied by `json!`. `state` is
/// `None` for the types that have none (SearchSnippet).
pub(crate) fn get_response(account: &str, state: Option<String>, list: Vec<Value>, not_found: Vec<Value>) -> Value {
    let mut response = Map::new();
    response.insert("accountId".into(), Value::String(account.to_owned()));
    if let Some(state) = state {
        response.insert("state".into(), Value::String(state));
    }
    response.insert("list".into(), Value::Array(list));
    response.insert("notFound".into(), Value::Array(not_found));
    Value::Object(response)
}

/// The creation ids of a request and the ids of what they created.
pub(crate) type CreatedIds = HashMap<String, String>;

/// A method-level error object (RFC 8620 §3.6.2).
pub(crate) fn method_error(kind: &str, description: impl Into<String>) -> Value {
    json!({ "type": kind, "description": description.into() })
}

/// The method error a service failure is answered with.
pub(crate) fn service_error(error: ServiceError) -> Value {
    match &error {
        ServiceError::Invalid(_) => method_error("invalidArguments", error.to_string()),
        ServiceError::CannotCalculateChanges(_) => method_error("cannotCalculateChanges", error.to_string()),
        ServiceError::NoSuchAccount(_) => method_error("accountNotFound", error.to_string()),
        _ if error.is_temporary() => method_error("serverUnavailable", error.to_string()),
        _ => method_error("serverFail", error.to_string()),
    }
}

/// What one method answers: its response arguments, or a method error.
pub(crate) type MethodResult = Result<Value, Value>;

async fn call_method(
    jmap: &Jmap,
    account: &str,
    using: &[&str],
    name: &str,
    arguments: Map<String, Value>,
    created_ids: &mut CreatedIds,
) -> MethodResult {
    if let Some(asked) = arguments.get("accountId") {
        if asked.as_str() != Some(account) {
            return Err(method_error("accountNotFound", "no such account for this login"));
        }
    }
    if name == "Core/echo" {
        return Ok(Value::Object(arguments));
    }
    if name.contains('/') && !name.starts_with("Core/") && !using.contains(&MAIL) {
        return Err(method_error(
            "unknownMethod",
            format!("{name}: its capability is not in \"using\""),
        ));
    }
    let service = &jmap.service;
    match name {
        "Mailbox/get" => mailbox::get(service, account, &arguments),
        "Mailbox/changes" => mailbox::changes(service, account, &arguments),
        "Mailbox/set" => mailbox::set(service, account, &arguments, created_ids).await,
        "Mailbox/query" => mailbox::query(service, account, &arguments),
        "Mailbox/queryChanges" => mailbox::query_changes(service, account, &arguments),
        "Email/get" => email::get(service, account, &arguments),
        "Email/query" => email::query(jmap, account, &arguments).await,
        "Email/changes" => email::changes(service, account, &arguments),
        "Email/queryChanges" => email::query_changes(service, account, &arguments),
        "Email/set" => email::set(jmap, account, &arguments, created_ids).await,
        "Email/import" => email::import(jmap, account, &arguments).await,
        "Email/copy" => email::copy(account, &arguments),
        "Email/parse" => email::parse(jmap, account, &arguments),
        "Thread/get" => thread::get(jmap, account, &arguments),
        "Thread/changes" => thread::changes(jmap, account, &arguments),
        "SearchSnippet/get" => snippet::get(jmap, account, &arguments),
        _ => Err(method_error("unknownMethod", format!("{name} is not supported"))),
    }
}

/// The `ids` argument of a /get: `None` for null (every object), refused over
/// [`MAX_OBJECTS_IN_GET`].
pub fn ids_argument(arguments: &Map<String, Value>) -> Result<Option<Vec<String>>, Value> {
    match arguments.get("ids") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => {
            if items.len() > MAX_OBJECTS_IN_GET {
                return Err(method_error(
                    "requestTooLarge",
                    format!("at most {MAX_OBJECTS_IN_GET} ids in one /get (maxObjectsInGet)"),
                ));
            }
            items
                .iter()
                .map(|item| {
                    item.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| method_error("invalidArguments", "ids holds a non-string"))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some)
        }
        Some(_) => Err(method_error("invalidArguments", "ids is not an array")),
    }
}

/// A string argument that must be given.
pub(crate) fn required_string<'a>(arguments: &'a Map<String, Value>, name: &str) -> Result<&'a str, Value> {
    arguments
        .get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| method_error("invalidArguments", format!("{name} is missing or not a string")))
}

/// An optional non-negative integer argument.
pub(crate) fn optional_count(arguments: &Map<String, Value>, name: &str) -> Result<Option<u64>, Value> {
    match arguments.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => value
            .as_u64()
            .map(Some)
            .ok_or_else(|| method_error("invalidArguments", format!("{name} is not a non-negative integer"))),
    }
}

/// The `properties` argument: `None` for the type's default list; unknown names are refused.
pub(crate) fn properties_argument(
    arguments: &Map<String, Value>,
    known: &[&str],
) -> Result<Option<Vec<String>>, Value> {
    match arguments.get("properties") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => {
            let mut properties = Vec::with_capacity(items.len());
            for item in items {
                let Some(name) = item.as_str() else {
                    return Err(method_error("invalidArguments", "properties holds a non-string"));
                };
                if !known.contains(&name) && !name.starts_with("header:") {
                    return Err(method_error("invalidArguments", format!("unknown property {name}")));
                }
                properties.push(name.to_owned());
            }
            Ok(Some(properties))
        }
        Some(_) => Err(method_error("invalidArguments", "properties is not an array")),
    }
}

/// A SetError object (RFC 8620 §5.3).
pub(crate) fn set_error(kind: &str, description: impl Into<String>) -> Value {
    json!({ "type": kind, "description": description.into() })
}

/// An `invalidProperties` SetError naming the property at fault.
pub(crate) fn invalid_property(property: &str, description: impl Into<String>) -> Value {
    let mut error = set_error("invalidProperties", description);
    error["properties"] = json!([property]);
    error
}

/// Checks `ifInState` against the account's state and returns that state (a /set's oldState).
pub(crate) fn check_in_state(
    service: &MailService,
    account: &str,
    arguments: &Map<String, Value>,
) -> Result<String, Value> {
    let state = service.account_state(account).map_err(service_error)?;
    match arguments.get("ifInState") {
        None | Some(Value::Null) => Ok(state),
        Some(Value::String(asked)) if *asked == state => Ok(state),
        Some(Value::String(_)) => Err(method_error(
            "stateMismatch",
            "ifInState does not match the current state",
        )),
        Some(_) => Err(method_error("invalidArguments", "ifInState is not a string")),
    }
}

/// An optional object argument.
pub(crate) fn object_argument<'a>(
    arguments: &'a Map<String, Value>,
    name: &str,
) -> Result<Option<&'a Map<String, Value>>, Value> {
    match arguments.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(map)) => Ok(Some(map)),
        Some(_) => Err(method_error("invalidArguments", format!("{name} is not an object"))),
    }
}

/// An optional boolean argument, false when absent.
pub(crate) fn flag_argument(arguments: &Map<String, Value>, name: &str) -> Result<bool, Value> {
    match arguments.get(name) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(value)) => Ok(*value),
        Some(_) => Err(method_error("invalidArguments", format!("{name} is not a boolean"))),
    }
}

/// The objects of one /set: creations, updates and destroys, refused over [`MAX_OBJECTS_IN_SET`].
pub(crate) fn check_set_size(arguments: &Map<String, Value>) -> Result<(), Value> {
    let count = ["create", "update"]
        .iter()
        .filter_map(|name| arguments.get(*name).and_then(Value::as_object).map(Map::len))
        .sum::<usize>()
        + arguments.get("destroy").and_then(Value::as_array).map_or(0, Vec::len);
    if count > MAX_OBJECTS_IN_SET {
        return Err(method_error(
            "requestTooLarge",
            format!("at most {MAX_OBJECTS_IN_SET} objects in one /set (maxObjectsInSet)"),
        ));
    }
    Ok(())
}

/// What one /set did, object by object.
pub(crate) struct SetOutcome {
    pub created: Map<String, Value>,
    pub not_created: Map<String, Value>,
    pub updated: Map<String, Value>,
    pub not_updated: Map<String, Value>,
    pub destroyed: Vec<Value>,
    pub not_destroyed: Map<String, Value>,
}

impl SetOutcome {
    /// The /set response (RFC 8620 §5.3), with the account's state after the writes.
    pub(crate) fn respond(self, service: &MailService, account: &str, old_state: String) -> MethodResult {
        let new_state = service.account_state(account).map_err(service_error)?;
        let mut response = Map::new();
        response.insert("accountId".into(), Value::String(account.to_owned()));
        response.insert("oldState".into(), Value::String(old_state));
        response.insert("newState".into(), Value::String(new_state));
        response.insert("created".into(), Value::Object(self.created));
        response.insert("notCreated".into(), Value::Object(self.not_created));
        response.insert("updated".into(), Value::Object(self.updated));
        response.insert("notUpdated".into(), Value::Object(self.not_updated));
        response.insert("destroyed".into(), Value::Array(self.destroyed));
        response.insert("notDestroyed".into(), Value::Object(self.not_destroyed));
        Ok(Value::Object(response))
    }
}

/// Files one /set update's outcome under `updated` or `notUpdated`.
pub(crate) fn file_update(
    outcome: Result<(), Value>,
    id: &str,
    updated: &mut Map<String, Value>,
    not_updated: &mut Map<String, Value>,
) {
    match outcome {
        Ok(()) => {
            updated.insert(id.to_owned(), Value::Null);
        }
        Err(error) => {
            not_updated.insert(id.to_owned(), error);
        }
    }
}

/// A /queryChanges' `maxChanges`: `None` for no limit; zero is refused.
pub(crate) fn max_changes_argument(arguments: &Map<String, Value>) -> Result<Option<usize>, Value> {
    match optional_count(arguments, "maxChanges")? {
        Some(0) => Err(method_error("invalidArguments", "maxChanges must be positive")),
        other => Ok(other.map(|max| max as usize)),
    }
}

/// A /queryChanges response (RFC 8620 §5.6), or tooManyChanges when the removed and added
/// entries together exceed `max_changes`.
pub(crate) fn query_changes_response(
    account: &str,
    since: &str,
    new_state: &str,
    removed: Vec<String>,
    added: Vec<(String, usize)>,
    max_changes: Option<usize>,
    total: Option<usize>,
) -> MethodResult {
    let count = removed.len() + added.len();
    if max_changes.is_some_and(|max| count > max) {
        return Err(method_error(
            "tooManyChanges",
            format!("{count} changes, more than maxChanges"),
        ));
    }
    let added: Vec<Value> = added
        .into_iter()
        .map(|(id, index)| json!({ "id": id, "index": index }))
        .collect();
    let mut response = json!({
        "accountId": account,
        "oldQueryState": since,
        "newQueryState": new_state,
        "removed": removed,
        "added": added,
    });
    if let Some(total) = total {
        response["total"] = json!(total);
    }
    Ok(response)
}

/// How deep a filter's operator tree may nest.
const MAX_FILTER_DEPTH: usize = 16;

/// A /query filter (RFC 8620 §5.5): conditions under AND, OR and NOT operators.
#[derive(Clone, Debug, PartialEq)]
pub enum FilterTree<Condition> {
    Condition(Condition),
    All(Vec<FilterTree<Condition>>),
    Any(Vec<FilterTree<Condition>>),
    /// None of them.
    Not(Vec<FilterTree<Condition>>),
}

impl<Condition> FilterTree<Condition> {
    /// Whether an object passes, `test` deciding each condition.
    pub fn matches(&self, test: &mut impl FnMut(&Condition) -> bool) -> bool {
        match self {
            FilterTree::Condition(condition) => test(condition),
            FilterTree::All(parts) => parts.iter().all(|part| part.matches(test)),
            FilterTree::Any(parts) => parts.iter().any(|part| part.matches(test)),
            FilterTree::Not(parts) => !parts.iter().any(|part| part.matches(test)),
        }
    }

    /// The conditions, anywhere in the tree.
    pub fn conditions(&self) -> Vec<&Condition> {
        match self {
            FilterTree::Condition(condition) => vec![condition],
            FilterTree::All(parts) | FilterTree::Any(parts) | FilterTree::Not(parts) => {
                parts.iter().flat_map(FilterTree::conditions).collect()
            }
        }
    }
}

/// Reads a filter: an object with `operator` is an operator over `conditions`, any other object a
/// condition read by `condition`. `None` for no filter.
pub fn parse_filter<Condition>(
    value: Option<&Value>,
    condition: &mut impl FnMut(&Map<String, Value>) -> Result<Condition, Value>,
) -> Result<Option<FilterTree<Condition>>, Value> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(value) => parse_filter_at(value, condition, 0).map(Some),
    }
}

fn parse_filter_at<Condition>(
    value: &Value,
    condition: &mut impl FnMut(&Map<String, Value>) -> Result<Condition, Value>,
    depth: usize,
) -> Result<FilterTree<Condition>, Value> {
    let Some(object) = value.as_object() else {
        return Err(method_error("invalidArguments", "a filter is not an object"));
    };
    let Some(operator) = object.get("operator") else {
        return condition(object).map(FilterTree::Condition);
    };
    if depth >= MAX_FILTER_DEPTH {
        return Err(method_error(
            "unsupportedFilter",
            format!("filters nest at most {MAX_FILTER_DEPTH} operators deep"),
        ));
    }
    let parts = match object.get("conditions") {
        Some(Value::Array(parts)) => parts
            .iter()
            .map(|part| parse_filter_at(part, condition, depth + 1))
            .collect::<Result<Vec<_>, _>>()?,
        _ => return Err(method_error("invalidArguments", "an operator needs a conditions array")),
    };
    if object.keys().any(|key| key != "operator" && key != "conditions") {
        return Err(method_error(
            "invalidArguments",
            "an operator has only operator and conditions",
        ));
    }
    match operator.as_str() {
        Some("AND") => Ok(FilterTree::All(parts)),
        Some("OR") => Ok(FilterTree::Any(parts)),
        Some("NOT") => Ok(FilterTree::Not(parts)),
        _ => Err(method_error("unsupportedFilter", "the operator is not AND, OR or NOT")),
    }
}

/// The window a /query asks for (RFC 8620 §5.5): a position or an anchor, and a limit.
#[derive(Clone, Debug, PartialEq)]
pub struct QueryWindow {
    pub position: i64,
    pub anchor: Option<String>,
    pub anchor_offset: i64,
    pub limit: usize,
    /// The client asked for more than [`MAX_OBJECTS_IN_GET`] (or named no limit): the response
    /// says the limit used.
    pub limit_cut: bool,
    pub calculate_total: bool,
}

/// Reads a /query's position, anchor, anchorOffset, limit and calculateTotal.
pub fn query_window(arguments: &Map<String, Value>) -> Result<QueryWindow, Value> {
    let integer = |name: &str| -> Result<i64, Value> {
        match arguments.get(name) {
            None | Some(Value::Null) => Ok(0),
            Some(value) => value
                .as_i64()
                .ok_or_else(|| method_error("invalidArguments", format!("{name} is not an integer"))),
        }
    };
    let anchor = match arguments.get("anchor") {
        None | Some(Value::Null) => None,
        Some(Value::String(anchor)) => Some(anchor.clone()),
        Some(_) => return Err(method_error("invalidArguments", "anchor is not an id")),
    };
    let asked = optional_count(arguments, "limit")?;
    let limit = asked.map_or(MAX_OBJECTS_IN_GET, |limit| (limit as usize).min(MAX_OBJECTS_IN_GET));
    Ok(QueryWindow {
        position: integer("position")?,
        anchor,
        anchor_offset: integer("anchorOffset")?,
        limit,
        limit_cut: asked.is_none_or(|asked| asked as usize > MAX_OBJECTS_IN_GET),
        calculate_total: flag_argument(arguments, "calculateTotal")?,
    })
}

impl QueryWindow {
    /// Where the window starts in results of `total` items: from the anchor's index (found by
    /// `anchor_index`) plus the offset, or from the position (negative: from the end), clamped.
    pub fn start(&self, total: usize, anchor_index: Option<usize>) -> Result<usize, Value> {
        let start = match &self.anchor {
            Some(_) => {
                let index =
                    anchor_index.ok_or_else(|| method_error("anchorNotFound", "the anchor is not in the results"))?;
                (index as i64).saturating_add(self.anchor_offset).max(0)
            }
            None if self.position < 0 => (total as i64).saturating_add(self.position).max(0),
            None => self.position,
        };
        Ok(start as usize)
    }
}

/// Replaces every `#name` argument by the value its result reference points at (RFC 8620 §3.7).
pub fn resolve_references(arguments: &Map<String, Value>, responses: &[Value]) -> Result<Map<String, Value>, Value> {
    let mut resolved = Map::new();
    for (key, value) in arguments {
        let Some(plain) = key.strip_prefix('#') else {
            resolved.insert(key.clone(), value.clone());
            continue;
        };
        if arguments.contains_key(plain) {
            return Err(method_error(
                "invalidArguments",
                format!("both {key} and {plain} are given"),
            ));
        }
        let reference: HashMap<String, Value> = serde_json::from_value(value.clone())
            .map_err(|_| method_error("invalidResultReference", format!("{key} is not a result reference")))?;
        let text = |field: &str| {
            reference
                .get(field)
                .and_then(Value::as_str)
                .ok_or_else(|| method_error("invalidResultReference", format!("{key} has no {field}")))
        };
        let (result_of, name, path) = (text("resultOf")?, text("name")?, text("path")?);
        let source = responses
            .iter()
            .find(|response| response[2].as_str() == Some(result_of) && response[0].as_str() == Some(name))
            .ok_or_else(|| {
                method_error(
                    "invalidResultReference",
                    format!("no earlier {name} response with call id {result_of}"),
                )
            })?;
        let value = evaluate_pointer(&source[1], path)
            .ok_or_else(|| method_error("invalidResultReference", format!("the path {path} leads nowhere")))?;
        resolved.insert(plain.to_owned(), value);
    }
    Ok(resolved)
}

/// A JSON pointer (RFC 6901) with JMAP's `*`: applied to an array, the rest of the path is
/// evaluated on every item and array results are flattened into one array.
pub fn evaluate_pointer(value: &Value, path: &str) -> Option<Value> {
    if path.is_empty() {
        return Some(value.clone());
    }
    let rest = path.strip_prefix('/')?;
    let tokens: Vec<String> = rest
        .split('/')
        .map(|token| token.replace("~1", "/").replace("~0", "~"))
        .collect();
    if tokens.len() > MAX_PATH_DEPTH {
        return None;
    }
    walk(value, &tokens)
}

fn walk(value: &Value, tokens: &[String]) -> Option<Value> {
    let Some((token, rest)) = tokens.split_first() else {
        return Some(value.clone());
    };
    match value {
        Value::Object(map) => walk(map.get(token)?, rest),
        Value::Array(items) if token == "*" => {
            let mut flattened = Vec::new();
            for item in items {
                match walk(item, rest)? {
                    Value::Array(inner) => flattened.extend(inner),
                    other => flattened.push(other),
                }
            }
            Some(Value::Array(flattened))
        }
        Value::Array(items) => {
            if token.len() > 1 && token.starts_with('0') {
                return None;
            }
            walk(items.get(token.parse::<usize>().ok()?)?, rest)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::{evaluate_pointer, resolve_references};
    use serde_json::json;

    #[test]
    fn pointers_follow_rfc_6901_and_the_jmap_wildcard() {
        let value = json!({
            "list": [{"id": "a", "tags": ["x", "y"]}, {"id": "b", "tags": ["z"]}],
            "a/b": 1, "m~n": 2, "ids": ["i1", "i2"]
        });
        assert_eq!(evaluate_pointer(&value, "/ids"), Some(json!(["i1", "i2"])));
        assert_eq!(evaluate_pointer(&value, "/list/*/id"), Some(json!(["a", "b"])));
        assert_eq!(
            evaluate_pointer(&value, "/list/*/tags"),
            Some(json!(["x", "y", "z"])),
            "flattened"
        );
        assert_eq!(evaluate_pointer(&value, "/list/1/id"), Some(json!("b")));
        assert_eq!(evaluate_pointer(&value, "/a~1b"), Some(json!(1)));
        assert_eq!(evaluate_pointer(&value, "/m~0n"), Some(json!(2)));
        assert_eq!(evaluate_pointer(&value, ""), Some(value.clone()));
        for nowhere in ["/list/2/id", "/list/01/id", "/missing", "ids", "/ids/x", "/list/*/nope"] {
            assert_eq!(evaluate_pointer(&value, nowhere), None, "{nowhere}");
        }
        let deep = format!("/{}", vec!["a"; 40].join("/"));
        assert_eq!(evaluate_pointer(&value, &deep), None, "bounded depth");
    }

    #[test]
    fn references_resolve_against_earlier_responses_only() {
        let responses = vec![json!(["Email/query", {"ids": ["e1", "e2"]}, "c0"])];
        let arguments =
            json!({"#ids": {"resultOf": "c0", "name": "Email/query", "path": "/ids"}, "properties": ["id"]});
        let resolved = resolve_references(arguments.as_object().unwrap(), &responses).unwrap();
        assert_eq!(resolved["ids"], json!(["e1", "e2"]));
        assert_eq!(resolved["properties"], json!(["id"]));
        let kind = |arguments: serde_json::Value| {
            resolve_references(arguments.as_object().unwrap(), &responses).unwrap_err()["type"].clone()
        };
        assert_eq!(
            kind(json!({"#ids": {"resultOf": "c9", "name": "Email/query", "path": "/ids"}})),
            "invalidResultReference"
        );
        assert_eq!(
            kind(json!({"#ids": {"resultOf": "c0", "name": "Email/get", "path": "/ids"}})),
            "invalidResultReference"
        );
        assert_eq!(kind(json!({"#ids": "not a reference"})), "invalidResultReference");
        assert_eq!(
            kind(json!({"#ids": {"resultOf": "c0", "name": "Email/query", "path": "/ids"}, "ids": []})),
            "invalidArguments"
        );
    }
}
