//! Blob upload and download (RFC 8620 §6) for JMAP.
//!
//! An email's blob is its message bytes: its blobId is `M` and the email's id, so a download
//! finds it through the service within the logged-in account only. A body part's blob is its
//! decoded content, cut out of its message's blob on each download (see [`super::body`]). An upload is held in this
//! node's memory (not replicated, not kept across a restart) for [`UPLOAD_LIFETIME`], with at
//! most [`MAX_HELD_UPLOAD_BYTES`] held at once (the oldest go first): it exists to be turned into
//! an email by Email/import, which stores and replicates it like any delivery.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::service::ServiceError;
use crate::tls::ClientAddress;

use super::email::parse_email_id;
use super::{login, problem, Jmap};

/// The blobId prefix of an email's message bytes.
pub const EMAIL_BLOB_PREFIX: &str = "M";
/// The blobId prefix of an upload.
pub const UPLOAD_BLOB_PREFIX: &str = "U";
/// How long an upload is held (RFC 8620 §6.1 asks for at least an hour).
pub const UPLOAD_LIFETIME: Duration = Duration::from_secs(60 * 60);
/// The most upload bytes held on this node at once.
pub const MAX_HELD_UPLOAD_BYTES: usize = 256 * 1024 * 1024;

struct Upload {
    bytes: Vec<u8>,
    content_type: String,
    at: Instant,
}

/// The uploads held on this node, by (account, blobId).
#[derive(Default)]
pub struct Uploads {
    held: Mutex<HashMap<(String, String), Upload>>,
}

impl Uploads {
    fn insert(&self, account: &str, blob_id: String, bytes: Vec<u8>, content_type: String) {
        // A poisoned lock only means another upload panicked half-way: the map is still whole.
        let mut held = self.held.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = Instant::now();
        held.retain(|_, upload| now.duration_since(upload.at) < UPLOAD_LIFETIME);
        let mut total: usize = held.values().map(|upload| upload.bytes.len()).sum::<usize>() + bytes.len();
        while total > MAX_HELD_UPLOAD_BYTES {
            let Some(oldest) = held
                .iter()
                .min_by_key(|(_, upload)| upload.at)
                .map(|(key, _)| key.clone())
            else {
                break;
            };
            if let Some(upload) = held.remove(&oldest) {
                total -= upload.bytes.len();
            }
        }
        held.insert(
            (account.to_owned(), blob_id),
            Upload {
                bytes,
                content_type,
                at: now,
            },
        );
    }

    fn get(&self, account: &str, blob_id: &str) -> Option<(Vec<u8>, String)> {
        let held = self.held.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        held.get(&(account.to_owned(), blob_id.to_owned()))
            .filter(|upload| upload.at.elapsed() < UPLOAD_LIFETIME)
            .map(|upload| (upload.bytes.clone(), upload.content_type.clone()))
    }
}

/// The bytes of a blob of the account: an email's message or an upload held here.
pub(crate) fn bytes(jmap: &Jmap, account: &str, blob_id: &str) -> Result<Option<Vec<u8>>, ServiceError> {
    Ok(blob(jmap, account, blob_id)?.map(|(bytes, _)| bytes))
}

fn blob(jmap: &Jmap, account: &str, blob_id: &str) -> Result<Option<(Vec<u8>, String)>, ServiceError> {
    if let Some(id) = blob_id.strip_prefix(EMAIL_BLOB_PREFIX).and_then(parse_email_id) {
        return match jmap.service.raw(account, id) {
            Ok(raw) => Ok(Some((raw, "message/rfc822".to_owned()))),
            Err(ServiceError::NoSuchMessage(_)) => Ok(None),
            Err(other) => Err(other),
        };
    }
    if blob_id.starts_with(UPLOAD_BLOB_PREFIX) {
        return Ok(jmap.uploads.get(account, blob_id));
    }
    if let Some((message, index)) = super::body::split_part_blob_id(blob_id) {
        // One level: a part's blobId names the blob of a message, not of another part.
        if message.starts_with(super::body::PART_BLOB_PREFIX) {
            return Ok(None);
        }
        return Ok(blob(jmap, account, message)?.and_then(|(raw, _)| super::body::part_blob(&raw, index)));
    }
    Ok(None)
}

fn not_found(detail: &str) -> Response {
    (StatusCode::NOT_FOUND, Json(json!({ "error": detail }))).into_response()
}

/// Logs in and checks that the URL's account is the one logged in; the error is the response.
async fn login_as(jmap: &Jmap, headers: &HeaderMap, client: ClientAddress, account: &str) -> Result<(), Response> {
    if login(jmap, headers, client).await? != account {
        return Err((
            StatusCode::FORBIDDEN,
            Json(json!({ "error": "that account is not the one logged in" })),
        )
            .into_response());
    }
    Ok(())
}

/// A content type from outside, kept only when it is a plain `type/subtype` with parameters.
fn safe_content_type(value: Option<&str>) -> String {
    value
        .map(str::trim)
        .filter(|value| {
            !value.is_empty()
                && value.len() <= 255
                && value.contains('/')
                && value.bytes().all(|byte| byte.is_ascii_graphic() || byte == b' ')
        })
        .unwrap_or("application/octet-stream")
        .to_owned()
}

/// `POST /jmap/upload/{account}/` (RFC 8620 §6.1).
pub(crate) async fn upload(
    State(jmap): State<Jmap>,
    ConnectInfo(client): ConnectInfo<ClientAddress>,
    Path(account): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Err(response) = login_as(&jmap, &headers, client, &account).await {
        return response;
    }
    let limit = jmap.service.max_message_bytes();
    let Ok(bytes) = axum::body::to_bytes(body, usize::try_from(limit).unwrap_or(usize::MAX)).await else {
        return problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            "limit",
            "the upload is larger than maxSizeUpload",
            Some(("limit", json!("maxSizeUpload"))),
        );
    };
    let content_type = safe_content_type(headers.get(header::CONTENT_TYPE).and_then(|value| value.to_str().ok()));
    let hash = blake3::hash(&bytes);
    let blob_id = format!("{UPLOAD_BLOB_PREFIX}{}", &hash.to_hex()[..40]);
    let size = bytes.len();
    jmap.uploads
        .insert(&account, blob_id.clone(), bytes.to_vec(), content_type.clone());
    (
        StatusCode::CREATED,
        Json(json!({ "accountId": account, "blobId": blob_id, "type": content_type, "size": size })),
    )
        .into_response()
}

/// `GET /jmap/download/{account}/{blob}/{name}?type=` (RFC 8620 §6.2).
pub(crate) async fn download(
    State(jmap): State<Jmap>,
    ConnectInfo(client): ConnectInfo<ClientAddress>,
    Path((account, blob_id, name)): Path<(String, String, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if let Err(response) = login_as(&jmap, &headers, client, &account).await {
        return response;
    }
    let (bytes, stored_type) = match blob(&jmap, &account, &blob_id) {
        Ok(Some(found)) => found,
        Ok(None) => return not_found("no such blob"),
        Err(error) if error.is_temporary() => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({ "error": error.to_string() })),
            )
                .into_response()
        }
        Err(error) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({ "error": error.to_string() })),
            )
                .into_response()
        }
    };
    let content_type = match query.get("type") {
        Some(asked) => safe_content_type(Some(asked)),
        None => stored_type,
    };
    let file_name: String = name
        .chars()
        .filter(|character| !character.is_control() && *character != '"' && *character != '\\')
        .take(200)
        .collect();
    let mut response = (StatusCode::OK, bytes).into_response();
    let headers = response.headers_mut();
    if let Ok(value) = header::HeaderValue::from_str(&content_type) {
        headers.insert(header::CONTENT_TYPE, value);
    }
    if let Ok(value) = header::HeaderValue::from_str(&format!("attachment; filename=\"{file_name}\"")) {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("private, immutable, max-age=31536000"),
    );
    response
}
