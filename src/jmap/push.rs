//! The JMAP EventSource (RFC 8620 §7.3): `GET /jmap/eventsource?types=&closeafter=&ping=`.
//!
//! The stream follows the service's change notices for the logged-in account
//! ([`MailService::subscribe`]), local writes and replicated ones alike. Notices that arrive
//! together are folded into one `state` event, a `StateChange` whose states are the account's
//! portable change-feed token (Email, Mailbox and Thread share it); a subscriber that fell behind
//! gets a state event too, so it asks for changes and misses nothing. `ping` events carry the
//! interval actually used, at least [`MIN_PING_SECONDS`].

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::Stream;
use serde_json::{json, Map, Value};

use crate::service::{MailService, Notice, Subscription};
use crate::tls::ClientAddress;

use super::{login, Jmap};

/// The shortest ping interval served; a client asking for less gets this.
pub const MIN_PING_SECONDS: u64 = 1;
/// The longest ping interval served.
pub const MAX_PING_SECONDS: u64 = 3600;
/// How long notices are gathered into one state event after the first.
const FOLD_WINDOW: Duration = Duration::from_millis(20);
/// The data types whose states the events carry.
const TYPES: [&str; 3] = ["Email", "Mailbox", "Thread"];

/// What the query string asks for, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushRequest {
    pub types: Vec<&'static str>,
    pub close_after_state: bool,
    pub ping: Option<Duration>,
}

/// Reads `types`, `closeafter` and `ping`; the error says which one is wrong.
pub fn parse_request(query: &HashMap<String, String>) -> Result<PushRequest, String> {
    let types = match query.get("types").map(String::as_str) {
        None | Some("*") | Some("") => TYPES.to_vec(),
        Some(list) => {
            let mut types = Vec::new();
            for name in list.split(',') {
                // A type this server has no objects of has no state changes to report.
                if let Some(known) = TYPES.iter().find(|known| **known == name) {
                    types.push(*known);
                }
            }
            types
        }
    };
    let close_after_state = match query.get("closeafter").map(String::as_str) {
        None | Some("no") => false,
        Some("state") => true,
        Some(other) => return Err(format!("closeafter must be state or no, not {other:?}")),
    };
    let ping = match query.get("ping") {
        None => None,
        Some(text) => {
            let seconds: u64 = text
                .parse()
                .map_err(|_| format!("ping must be a number of seconds, not {text:?}"))?;
            (seconds > 0).then(|| Duration::from_secs(seconds.clamp(MIN_PING_SECONDS, MAX_PING_SECONDS)))
        }
    };
    Ok(PushRequest {
        types,
        close_after_state,
        ping,
    })
}

/// The `StateChange` object for one account.
pub fn state_change(account: &str, types: &[&str], state: &str) -> Value {
    let mut changed = Map::new();
    for name in types {
        changed.insert((*name).to_owned(), json!(state));
    }
    json!({ "@type": "StateChange", "changed": { account: changed } })
}

struct Pusher {
    service: MailService,
    account: String,
    request: PushRequest,
    subscription: Subscription,
    ping: Option<tokio::time::Interval>,
    /// The node's stop flag: the stream ends when it is set.
    stop: tokio::sync::watch::Receiver<bool>,
    finished: bool,
}

impl Pusher {
    /// The next event, or `None` once the stream is over, or the node is stopping (a stream left
    /// open would hold the HTTP server's graceful shutdown, and the store, until the process
    /// gives up waiting).
    async fn next_event(&mut self) -> Option<Event> {
        if self.finished {
            return None;
        }
        let mut stop = self.stop.clone();
        tokio::select! {
            biased;
            _ = stop.wait_for(|stopped| *stopped) => {
                self.finished = true;
                None
            }
            event = self.following_event() => event,
        }
    }

    /// The next ping or state event of an open stream.
    async fn following_event(&mut self) -> Option<Event> {
        let notice = match &mut self.ping {
            Some(ping) => tokio::select! {
                notice = self.subscription.next() => notice,
                _ = ping.tick() => {
                    let seconds = self.request.ping.map_or(0, |interval| interval.as_secs());
                    return Some(Event::default().event("ping").data(json!({ "interval": seconds }).to_string()));
                }
            },
            None => self.subscription.next().await,
        };
        notice.as_ref()?;
        // Fold the notices that follow closely into this one event.
        let deadline = tokio::time::Instant::now() + FOLD_WINDOW;
        loop {
            match tokio::time::timeout_at(deadline, self.subscription.next()).await {
                Ok(Some(Notice::Changed { .. } | Notice::Missed(_))) => continue,
                Ok(None) => {
                    self.finished = true;
                    break;
                }
                Err(_) => break,
            }
        }
        if self.request.close_after_state {
            self.finished = true;
        }
        let data = match self.service.account_state(&self.account) {
            Ok(state) => state_change(&self.account, &self.request.types, &state),
            // The store failed: end the stream; the client reconnects and resyncs.
            Err(error) => {
                tracing::warn!(%error, "JMAP push could not read the account state");
                self.finished = true;
                return None;
            }
        };
        Some(Event::default().event("state").data(data.to_string()))
    }
}

fn events(pusher: Pusher) -> impl Stream<Item = Result<Event, Infallible>> {
    futures::stream::unfold(pusher, |mut pusher| async move {
        let event = pusher.next_event().await?;
        Some((Ok(event), pusher))
    })
}

/// `GET /jmap/eventsource` (RFC 8620 §7.3).
pub(crate) async fn event_source(
    State(jmap): State<Jmap>,
    ConnectInfo(client): ConnectInfo<ClientAddress>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let account = match login(&jmap, &headers, client).await {
        Ok(account) => account,
        Err(response) => return response,
    };
    let request = match parse_request(&query) {
        Ok(request) => request,
        Err(detail) => return (StatusCode::BAD_REQUEST, Json(json!({ "error": detail }))).into_response(),
    };
    let ping = request.ping.map(|interval| {
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping
    });
    let pusher = Pusher {
        subscription: jmap.service.subscribe(Some(&account)),
        service: jmap.service.clone(),
        account,
        request,
        ping,
        stop: jmap.stop.clone(),
        finished: false,
    };
    Sse::new(events(pusher)).into_response()
}

#[cfg(test)]
mod tests {
    use super::{parse_request, state_change};
    use serde_json::json;
    use std::collections::HashMap;
    use std::time::Duration;

    fn query(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect()
    }

    #[test]
    fn the_query_string_is_read_as_rfc_8620_says() {
        let request = parse_request(&query(&[("types", "*"), ("closeafter", "no"), ("ping", "0")])).unwrap();
        assert_eq!(request.types, vec!["Email", "Mailbox", "Thread"]);
        assert!(!request.close_after_state);
        assert_eq!(request.ping, None);
        let request = parse_request(&query(&[
            ("types", "Email,CalendarEvent"),
            ("closeafter", "state"),
            ("ping", "99999"),
        ]))
        .unwrap();
        assert_eq!(request.types, vec!["Email"], "types without objects here are left out");
        assert!(request.close_after_state);
        assert_eq!(request.ping, Some(Duration::from_secs(3600)), "clamped");
        assert!(parse_request(&query(&[("closeafter", "maybe")])).is_err());
        assert!(parse_request(&query(&[("ping", "-1")])).is_err());
    }

    #[test]
    fn a_state_change_names_the_account_and_each_type() {
        assert_eq!(
            state_change("alice@example.org", &["Email", "Mailbox"], "m1x"),
            json!({"@type": "StateChange", "changed": {"alice@example.org": {"Email": "m1x", "Mailbox": "m1x"}}})
        );
    }
}
