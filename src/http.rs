//! HTTP plumbing shared by the API ([`crate::api`]) and the live page ([`crate::page`]): the
//! `{"error": "..."}` answer and the status each kind of failure gets.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::service::ServiceError;
use crate::store::StoreError;

/// An API error: a status and a message.
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<ServiceError> for ApiError {
    fn from(error: ServiceError) -> Self {
        let status = match &error {
            ServiceError::Invalid(_) => StatusCode::BAD_REQUEST,
            ServiceError::NoSuchAccount(_) | ServiceError::NoSuchMailbox(_) | ServiceError::NoSuchMessage(_) => {
                StatusCode::NOT_FOUND
            }
            ServiceError::BodyNotYetHere => StatusCode::NOT_FOUND,
            ServiceError::MailboxExists(_) | ServiceError::MailboxHasChildren(_) => StatusCode::CONFLICT,
            ServiceError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ServiceError::Authentication(crate::accounts::AuthenticationError::Refused) => StatusCode::UNAUTHORIZED,
            ServiceError::Authentication(crate::accounts::AuthenticationError::Throttled { .. }) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ServiceError::Authentication(crate::accounts::AuthenticationError::Unavailable) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ServiceError::StorageFull(_) => StatusCode::INSUFFICIENT_STORAGE,
            ServiceError::CannotCalculateChanges(_) => StatusCode::GONE,
            ServiceError::Unavailable(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, error.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        ApiError::from(ServiceError::from(error))
    }
}

pub fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, message.into())
}

pub fn not_found(message: impl Into<String>) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, message.into())
}

/// Turns axum's own plain-text refusals (bad query strings, bad paths, wrong methods) into the
/// API's `{"error": "..."}` form, keeping their status.
pub async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let body = axum::body::to_bytes(response.into_body(), 64 * 1024)
        .await
        .unwrap_or_default();
    let mut message = String::from_utf8_lossy(&body).trim().to_owned();
    if message.is_empty() {
        message = status.canonical_reason().unwrap_or("error").to_owned();
    }
    ApiError(status, message).into_response()
}
