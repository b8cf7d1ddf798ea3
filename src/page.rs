//! The live status page served at `/` (placeholder until the page lands).

use axum::response::Html;
use axum::routing::get;
use axum::Router;

use crate::node::Node;

/// Routes of the status page.
pub fn routes() -> Router<Node> {
    Router::new().route("/", get(|| async { Html("<!doctype html><title>mailmesh</title><p>mailmesh node</p>") }))
}
