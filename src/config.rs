//! Node configuration: a TOML file (see config/*.toml) overridden by command-line flags.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::node::NodeConfig;

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("invalid {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

/// The keys of a configuration file; every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub name: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub listen: Option<Vec<String>>,
    pub http: Option<String>,
    pub peers: Option<Vec<String>>,
    /// Addresses peers should dial this node at (NAT, containers, other namespaces).
    pub announce: Option<Vec<String>>,
    pub cluster: Option<String>,
    pub gossip_interval_ms: Option<u64>,
    pub max_message_bytes: Option<u64>,
    pub inline_blob_bytes: Option<usize>,
    pub clock_bound_ms: Option<u64>,
    pub peer_requests_per_second: Option<f64>,
    pub peer_request_burst: Option<f64>,
    pub http_token_file: Option<PathBuf>,
    /// A Dovecot passwd-file of accounts that may log in (see `accounts`).
    pub accounts_file: Option<PathBuf>,
    /// PEM files: with both, the HTTP address speaks HTTPS only (see `tls`).
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// Accept credentials over plain HTTP from hosts other than loopback (off by default).
    pub allow_plaintext_auth: Option<bool>,
    pub tombstone_horizon_days: Option<u64>,
    pub min_free_bytes: Option<u64>,
    pub allow_peers: Option<Vec<String>>,
    pub allow_peers_file: Option<PathBuf>,
    pub cluster_key_file: Option<PathBuf>,
    pub max_connections: Option<u32>,
    pub max_connections_per_peer: Option<u32>,
    pub block_seconds: Option<u64>,
    pub max_request_bytes: Option<usize>,
    pub max_response_bytes: Option<usize>,
    pub max_gossip_bytes: Option<usize>,
    pub max_sync_elements: Option<usize>,
    pub max_records_per_response: Option<usize>,
    pub max_ids_per_request: Option<usize>,
    pub blob_chunk_bytes: Option<u32>,
    pub max_requests_in_flight_per_peer: Option<usize>,
    pub search_commit_interval_ms: Option<u64>,
    /// Where the LMTP server listens: `HOST:PORT`, or a unix socket path (`/...` or `unix:...`).
    pub lmtp_listen: Option<String>,
    /// LMTP sessions at once (default 100); more are answered 421 and closed.
    pub lmtp_max_connections: Option<usize>,
    /// Recipients accepted in one LMTP transaction (default 100, the least RFC 5321 allows).
    pub lmtp_max_recipients: Option<usize>,
    /// Seconds an LMTP read waits for the client before 421 (default 300).
    pub lmtp_idle_timeout_seconds: Option<u64>,
    /// Seconds one LMTP connection may last in all before 421 (default 3600).
    pub lmtp_session_timeout_seconds: Option<u64>,
    /// Where the IMAP server listens: `HOST:PORT` (STARTTLS offered when TLS is configured).
    pub imap_listen: Option<String>,
    /// Where the IMAP server listens with implicit TLS (needs tls_cert_file and tls_key_file).
    pub imaps_listen: Option<String>,
    /// Accept IMAP logins without TLS from hosts other than loopback (off by default).
    pub imap_allow_plaintext: Option<bool>,
    /// IMAP sessions at once (default 500); more are answered BYE and closed.
    pub imap_max_connections: Option<usize>,
    /// IMAP sessions at once from one address (default 50); more are answered BYE and closed.
    pub imap_max_connections_per_address: Option<usize>,
    /// Logged-in IMAP sessions of one account (default 20); one more login gets `NO [LIMIT]`.
    pub imap_max_connections_per_account: Option<usize>,
}

impl ConfigFile {
    /// Reads a TOML file.
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// Applies the file over the defaults.
    pub fn into_node_config(self) -> Result<NodeConfig, ConfigError> {
        let mut config = NodeConfig::default();
        if let Some(name) = self.name {
            config.name = name;
        }
        if let Some(data_dir) = self.data_dir {
            config.data_dir = data_dir;
        }
        if let Some(listen) = self.listen {
            config.listen = parse_addresses("listen", &listen)?;
        }
        if let Some(http) = self.http {
            config.http = http.parse().map_err(|error| ConfigError::Invalid {
                key: "http",
                reason: format!("{error}"),
            })?;
        }
        if let Some(peers) = self.peers {
            config.peers = parse_addresses("peers", &peers)?;
        }
        if let Some(announce) = self.announce {
            config.announce = parse_addresses("announce", &announce)?;
        }
        if let Some(cluster) = self.cluster {
            config.cluster = cluster;
        }
        if let Some(milliseconds) = self.gossip_interval_ms {
            config.gossip_interval = Duration::from_millis(milliseconds.max(10));
        }
        if let Some(bytes) = self.max_message_bytes {
            config.max_message_bytes = bytes;
        }
        if let Some(bytes) = self.inline_blob_bytes {
            config.inline_blob_bytes = bytes;
        }
        if let Some(milliseconds) = self.clock_bound_ms {
            config.clock_bound_millis = milliseconds;
        }
        if let Some(rate) = self.peer_requests_per_second {
            config.peer_requests_per_second = rate;
        }
        if let Some(burst) = self.peer_request_burst {
            config.peer_request_burst = burst;
        }
        let mut allowed = Vec::new();
        if let Some(peers) = &self.allow_peers {
            allowed.extend(peers.iter().cloned());
        }
        if let Some(path) = &self.allow_peers_file {
            allowed.extend(read_peer_list(path)?);
        }
        if self.allow_peers.is_some() || self.allow_peers_file.is_some() {
            add_allowed_peers(&mut config, &allowed)?;
        }
        if let Some(path) = &self.cluster_key_file {
            config.cluster_key = Some(read_cluster_key(path)?);
        }
        if let Some(limit) = self.max_connections {
            config.max_connections = limit;
        }
        if let Some(limit) = self.max_connections_per_peer {
            config.max_connections_per_peer = limit;
        }
        if let Some(bytes) = self.max_request_bytes {
            config.max_request_bytes = bytes;
        }
        if let Some(bytes) = self.max_response_bytes {
            config.max_response_bytes = bytes;
        }
        if let Some(bytes) = self.max_gossip_bytes {
            config.max_gossip_bytes = bytes;
        }
        if let Some(count) = self.max_sync_elements {
            config.max_sync_elements = count.max(64);
        }
        if let Some(count) = self.max_records_per_response {
            config.max_records_per_response = count.clamp(1, crate::wire::MAX_RECORDS_PER_RESPONSE);
        }
        if let Some(count) = self.max_ids_per_request {
            config.max_ids_per_request = count.clamp(1, crate::wire::MAX_IDS_PER_REQUEST);
        }
        if let Some(bytes) = self.blob_chunk_bytes {
            config.blob_chunk_bytes = bytes.clamp(4096, crate::wire::MAX_BLOB_CHUNK);
        }
        if let Some(count) = self.max_requests_in_flight_per_peer {
            config.max_requests_in_flight_per_peer = count.max(1);
        }
        if let Some(millis) = self.search_commit_interval_ms {
            config.search_commit_interval = Duration::from_millis(millis);
        }
        if let Some(seconds) = self.block_seconds {
            config.block_duration = Duration::from_secs(seconds.max(1));
        }
        if let Some(bytes) = self.min_free_bytes {
            config.min_free_bytes = bytes;
        }
        if let Some(days) = self.tombstone_horizon_days {
            config.tombstone_horizon_millis = days.max(1) * 86_400_000;
        }
        if let Some(path) = self.http_token_file {
            config.http_token = Some(read_token(&path)?);
        }
        if let Some(path) = self.accounts_file {
            config.accounts_file = Some(check_accounts_file(&path)?);
        }
        config.tls_cert_file = self.tls_cert_file;
        config.tls_key_file = self.tls_key_file;
        if let Some(allow) = self.allow_plaintext_auth {
            config.allow_plaintext_auth = allow;
        }
        if let Some(text) = self.lmtp_listen {
            config.lmtp_listen = Some(parse_lmtp_address(&text)?);
        }
        if let Some(count) = self.lmtp_max_connections {
            config.lmtp_max_connections = count;
        }
        if let Some(count) = self.lmtp_max_recipients {
            config.lmtp_max_recipients = count;
        }
        if let Some(seconds) = self.lmtp_idle_timeout_seconds {
            config.lmtp_idle_timeout = Duration::from_secs(seconds);
        }
        if let Some(seconds) = self.lmtp_session_timeout_seconds {
            config.lmtp_session_deadline = Duration::from_secs(seconds);
        }
        if let Some(text) = self.imap_listen {
            config.imap_listen = Some(parse_socket_address("imap_listen", &text)?);
        }
        if let Some(text) = self.imaps_listen {
            config.imaps_listen = Some(parse_socket_address("imaps_listen", &text)?);
        }
        if let Some(allow) = self.imap_allow_plaintext {
            config.imap_allow_plaintext = allow;
        }
        if let Some(count) = self.imap_max_connections {
            config.imap_connections.total = count;
        }
        if let Some(count) = self.imap_max_connections_per_address {
            config.imap_connections.per_address = count;
        }
        if let Some(count) = self.imap_max_connections_per_account {
            config.imap_connections.per_account = count;
        }
        validate(&config)?;
        Ok(config)
    }
}

/// Reads peer IDs, one per line (`#` starts a comment).
pub fn read_peer_list(path: &Path) -> Result<Vec<String>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    Ok(text
        .lines()
        .map(|line| line.split('#').next().unwrap_or_default().trim().to_owned())
        .filter(|line| !line.is_empty())
        .collect())
}

/// Adds peer IDs to the allow list (creating it), naming a bad ID.
pub fn add_allowed_peers(config: &mut NodeConfig, peers: &[String]) -> Result<(), ConfigError> {
    let list = config.allowed_peers.get_or_insert_with(Default::default);
    for text in peers {
        let peer = text.parse::<libp2p::PeerId>().map_err(|error| ConfigError::Invalid {
            key: "allow_peers",
            reason: format!("{text:?}: {error}"),
        })?;
        list.insert(peer);
    }
    Ok(())
}

/// Reads a pre-shared cluster key (go-ipfs swarm.key format or 64 hex characters).
pub fn read_cluster_key(path: &Path) -> Result<[u8; 32], ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    crate::net::parse_pre_shared_key(&text).map_err(|error| ConfigError::Invalid {
        key: "cluster_key_file",
        reason: format!("{}: {error}", path.display()),
    })
}

/// Reads a bearer token file (the first line, trimmed; at least 16 characters).
pub fn read_token(path: &Path) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let token = text.lines().next().unwrap_or_default().trim().to_owned();
    if token.len() < 16 || !token.bytes().all(|byte| byte.is_ascii_graphic()) {
        return Err(ConfigError::Invalid {
            key: "http_token_file",
            reason: format!("{}: the token must be at least 16 printable characters", path.display()),
        });
    }
    Ok(token)
}

/// Checks an accounts file at start, so that a bad one stops the node with the line to fix.
pub fn check_accounts_file(path: &Path) -> Result<PathBuf, ConfigError> {
    crate::accounts::Accounts::check_file(path).map_err(|error| ConfigError::Invalid {
        key: "accounts_file",
        reason: error.to_string(),
    })?;
    Ok(path.to_owned())
}

/// Parses the LMTP address (`lmtp_listen`, `--lmtp`): `HOST:PORT` or a unix socket path.
pub fn parse_lmtp_address(text: &str) -> Result<crate::lmtp::ListenAddress, ConfigError> {
    text.parse()
        .map_err(|error: crate::lmtp::LmtpError| ConfigError::Invalid {
            key: "lmtp_listen",
            reason: error.to_string(),
        })
}

/// Parses a `HOST:PORT` address (`imap_listen`, `imaps_listen`, `--imap`), naming the key on error.
pub fn parse_socket_address(key: &'static str, text: &str) -> Result<std::net::SocketAddr, ConfigError> {
    text.trim().parse().map_err(|error| ConfigError::Invalid {
        key,
        reason: format!("{text:?}: {error} (give HOST:PORT, e.g. 127.0.0.1:143)"),
    })
}

/// Parses multiaddrs, naming the key on error.
pub fn parse_addresses(key: &'static str, texts: &[String]) -> Result<Vec<libp2p::Multiaddr>, ConfigError> {
    texts
        .iter()
        .map(|text| {
            text.parse().map_err(|error| ConfigError::Invalid {
                key,
                reason: format!("{text:?}: {error}"),
            })
        })
        .collect()
}

/// Checks values that must make sense together.
pub fn validate(config: &NodeConfig) -> Result<(), ConfigError> {
    if config.cluster.is_empty() || config.cluster.contains(['/', ' ']) {
        return Err(ConfigError::Invalid {
            key: "cluster",
            reason: "must be non-empty without '/' or spaces".into(),
        });
    }
    if config.max_message_bytes == 0 {
        return Err(ConfigError::Invalid {
            key: "max_message_bytes",
            reason: "must be positive".into(),
        });
    }
    if !(config.peer_requests_per_second > 0.0 && config.peer_request_burst >= 1.0) {
        return Err(ConfigError::Invalid {
            key: "peer_requests_per_second",
            reason: "the rate must be positive and the burst at least 1".into(),
        });
    }
    if config.imaps_listen.is_some() && (config.tls_cert_file.is_none() || config.tls_key_file.is_none()) {
        return Err(ConfigError::Invalid {
            key: "imaps_listen",
            reason: "implicit TLS needs tls_cert_file and tls_key_file".into(),
        });
    }
    for (key, positive) in [
        ("lmtp_max_connections", config.lmtp_max_connections > 0),
        ("lmtp_max_recipients", config.lmtp_max_recipients > 0),
        ("lmtp_idle_timeout_seconds", !config.lmtp_idle_timeout.is_zero()),
        ("lmtp_session_timeout_seconds", !config.lmtp_session_deadline.is_zero()),
        ("imap_max_connections", config.imap_connections.total > 0),
        (
            "imap_max_connections_per_address",
            config.imap_connections.per_address > 0,
        ),
        (
            "imap_max_connections_per_account",
            config.imap_connections.per_account > 0,
        ),
    ] {
        if !positive {
            return Err(ConfigError::Invalid {
                key,
                reason: "must be positive".into(),
            });
        }
    }
    if config.inline_blob_bytes > 512 * 1024 {
        return Err(ConfigError::Invalid {
            key: "inline_blob_bytes",
            reason: "at most 524288".into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lmtp_limits_come_from_their_keys_and_zero_is_refused() {
        let file: ConfigFile = toml::from_str(
            "lmtp_max_connections = 7\nlmtp_max_recipients = 250\nlmtp_idle_timeout_seconds = 60\nlmtp_session_timeout_seconds = 900",
        )
        .unwrap();
        let config = file.into_node_config().unwrap();
        assert_eq!(config.lmtp_max_connections, 7);
        assert_eq!(config.lmtp_max_recipients, 250);
        assert_eq!(config.lmtp_idle_timeout, Duration::from_secs(60));
        assert_eq!(config.lmtp_session_deadline, Duration::from_secs(900));
        let defaults: ConfigFile = toml::from_str("").unwrap();
        let defaults = defaults.into_node_config().unwrap();
        assert_eq!(defaults.lmtp_session_deadline, Duration::from_secs(3600));
        let zero: ConfigFile = toml::from_str("lmtp_session_timeout_seconds = 0").unwrap();
        let error = zero.into_node_config().unwrap_err().to_string();
        assert!(error.contains("lmtp_session_timeout_seconds"), "{error}");
    }

    #[test]
    fn imap_connection_limits_come_from_their_keys_and_zero_is_refused() {
        let file: ConfigFile = toml::from_str(
            "imap_max_connections = 900\nimap_max_connections_per_address = 30\nimap_max_connections_per_account = 4",
        )
        .unwrap();
        let config = file.into_node_config().unwrap();
        assert_eq!(
            config.imap_connections,
            crate::imap::ConnectionLimits {
                total: 900,
                per_address: 30,
                per_account: 4
            }
        );
        let defaults: ConfigFile = toml::from_str("").unwrap();
        assert_eq!(
            defaults.into_node_config().unwrap().imap_connections,
            crate::imap::ConnectionLimits::default()
        );
        let zero: ConfigFile = toml::from_str("imap_max_connections_per_account = 0").unwrap();
        let error = zero.into_node_config().unwrap_err().to_string();
        assert!(error.contains("imap_max_connections_per_account"), "{error}");
    }

    #[test]
    fn the_example_configuration_parses() {
        let file: ConfigFile = toml::from_str(include_str!("../config/node.toml")).expect("config/node.toml parses");
        let config = file.into_node_config().expect("config/node.toml is valid");
        assert_eq!(config.name, "paris-1");
        assert_eq!(config.peers.len(), 1);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        assert!(toml::from_str::<ConfigFile>("nmae = \"typo\"").is_err());
        let file: ConfigFile = toml::from_str("cluster = \"a/b\"").unwrap();
        assert!(file.into_node_config().is_err());
        let file: ConfigFile = toml::from_str("listen = [\"not a multiaddr\"]").unwrap();
        assert!(file.into_node_config().is_err());
        let file: ConfigFile = toml::from_str("lmtp_listen = \"localhost\"").unwrap();
        assert!(file.into_node_config().is_err());
        let file: ConfigFile = toml::from_str("lmtp_listen = \"unix:/run/mailmesh/lmtp\"").unwrap();
        assert_eq!(
            file.into_node_config().unwrap().lmtp_listen,
            Some(crate::lmtp::ListenAddress::Unix("/run/mailmesh/lmtp".into()))
        );
    }
}
