//! The composition root: opens the store, builds the mail service and the replication engine,
//! and serves HTTP. It only wires parts together; what each part does lives in its own module.
//!
//! - [`crate::store`]: the RocksDB store and its group commit, with the commit feed;
//! - [`crate::service`]: the mail service every protocol speaks to;
//! - [`crate::node`]: the replication engine, which follows the commit feed;
//! - [`crate::api`]: the HTTP API over the service (and the engine's operator views);
//! - [`crate::lmtp`]: the LMTP server over the service, when `lmtp_listen` is set;
//! - [`crate::imap`]: the IMAP server over the service, when `imap_listen` or `imaps_listen` is set.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::accounts::{Accounts, RateLimits};
use crate::environment::{self, Environment};
use crate::metrics::NodeMetrics;
use crate::model::NodeId;
use crate::node::{load_or_create_identity, EngineParts, Node, NodeConfig, NodeError};
use crate::search::SearchIndex;
use crate::service::{MailService, ServiceParts};
use crate::store::{CommitQueue, Store, StoreOptions};
use crate::tls::{ClientAddress, TlsListener};

/// The longest the background full-text indexer waits for reconciliation to finish.
const INDEX_WAIT_LIMIT: Duration = Duration::from_secs(10);
/// How long a stopping node waits for its store to close before the process exits anyway.
/// Without clients it closes in milliseconds; an open event stream (the live page, JMAP push)
/// does not end on the stop yet and holds it, so the limit is short.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(3);

/// The running parts of one node.
#[derive(Clone)]
pub struct Running {
    pub service: MailService,
    pub engine: Node,
    pub http: std::net::SocketAddr,
    /// Tells when the store has closed after a stop.
    pub closed: StoreClosed,
}

/// Watches the store of a node that is stopping: RocksDB closes (and its background threads
/// end) once the last task lets go of it. A process must not exit before that, or RocksDB's
/// threads run on while its statics are torn down.
#[derive(Clone)]
pub struct StoreClosed(std::sync::Weak<()>);

impl StoreClosed {
    /// Whether every holder has let go of the store, so it is closed.
    pub fn is_closed(&self) -> bool {
        self.0.strong_count() == 0
    }

    /// Waits, after the stop flag is set and the caller's own service and engine are dropped,
    /// until the store has closed or `limit` has passed; says which.
    pub async fn wait(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while !self.is_closed() {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }
}

/// Starts a node and runs it until `shutdown` resolves.
pub async fn run(
    config: NodeConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    let (stop_sender, stop) = watch::channel(false);
    let running = start(config, environment::system(), stop.clone()).await?;
    shutdown.await;
    tracing::info!("shutting down");
    let _ = stop_sender.send(true);
    // Wait for the tasks to end and the store to close. An open HTTP connection can hold it
    // (event streams end on the stop, idle keep-alive connections are closed): after the limit
    // the process exits anyway, as RocksDB's write-ahead log keeps what was acknowledged.
    let closed = running.closed.clone();
    drop(running);
    if !closed.wait(SHUTDOWN_LIMIT).await {
        tracing::warn!("the store was still in use {SHUTDOWN_LIMIT:?} after the stop; exiting anyway");
    }
    Ok(())
}

/// Opens the store and starts the service, the engine, the background indexer and HTTP.
pub async fn start(
    config: NodeConfig,
    environment: Arc<dyn Environment>,
    stop: watch::Receiver<bool>,
) -> Result<Running, NodeError> {
    std::fs::create_dir_all(&config.data_dir)?;
    let keypair = load_or_create_identity(&config.data_dir.join("identity.key"))?;
    let node_id = NodeId::from_identity(&keypair.public().to_peer_id().to_bytes());
    let store = Arc::new(Store::open(
        &config.data_dir.join("store"),
        node_id,
        StoreOptions {
            max_message_bytes: config.max_message_bytes,
            clock_bound_millis: config.clock_bound_millis,
            sync_writes: true,
            tombstone_horizon_millis: config.tombstone_horizon_millis,
            min_free_bytes: config.min_free_bytes,
            ..StoreOptions::default()
        },
    )?);
    let closed = StoreClosed(store.closed_marker());
    let queue = CommitQueue::start(store.clone(), 512);
    let search = Arc::new(SearchIndex::open(&config.data_dir.join("search"))?);
    let mut registry = Registry::default();
    let metrics = NodeMetrics::register(&mut registry);
    let accounts = config.accounts_file.as_ref().map(|path| {
        // The file was checked at start; if it went bad since, the node still serves the
        // operator and refuses logins until the file reads well again.
        let accounts = Accounts::open(path, RateLimits::default()).unwrap_or_else(|error| {
            tracing::error!("{error}; logins are refused until it is fixed");
            Accounts::new(path, RateLimits::default())
        });
        Arc::new(accounts.with_metrics(metrics.clone()))
    });
    let service = MailService::new(ServiceParts {
        store: store.clone(),
        queue: queue.clone(),
        search: search.clone(),
        accounts,
        environment: environment.clone(),
        metrics: metrics.clone(),
        max_message_bytes: config.max_message_bytes,
    });
    let engine = Node::start(
        EngineParts {
            config: config.clone(),
            keypair,
            store: store.clone(),
            queue,
            metrics: metrics.clone(),
            registry,
            environment,
        },
        stop.clone(),
    )
    .await?;

    // The full-text index follows the store's queue in the background (searches also catch
    // up before they run). While this node reconciles it waits, up to 10 s: a node back from
    // a partition heals sooner.
    let indexer = engine.clone();
    let mut indexer_stop = stop.clone();
    let commit = crate::search::Commit::After(config.search_commit_interval);
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(Duration::from_millis(500));
        let mut waiting_since: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = interval.tick() => {
                    if indexer.is_reconciling()
                        && waiting_since.get_or_insert_with(Instant::now).elapsed() < INDEX_WAIT_LIMIT
                    {
                        continue;
                    }
                    waiting_since = None;
                    let (search, store) = (search.clone(), store.clone());
                    let caught_up = tokio::task::spawn_blocking(move || search.update(&store, commit, usize::MAX)).await;
                    if let Ok(Err(error)) = caught_up {
                        tracing::warn!("full-text index update failed: {error}");
                    }
                }
                _ = stopped(&mut indexer_stop) => break,
            }
        }
    });

    // HTTP, or HTTPS when a certificate is configured (checked before anything listens).
    let tls = match (&config.tls_cert_file, &config.tls_key_file) {
        (Some(certificate), Some(key)) => Some(crate::tls::server_config(certificate, key)?),
        (None, None) => None,
        _ => {
            return Err(NodeError::Tls(crate::tls::TlsError::Invalid(
                "set both tls_cert_file and tls_key_file, or neither".into(),
            )))
        }
    };

    // LMTP, before HTTP: once http.addr exists, lmtp.addr does too.
    if let Some(address) = &config.lmtp_listen {
        let listener = crate::lmtp::Listener::bind(address)
            .await
            .map_err(|error| std::io::Error::other(error.to_string()))?;
        std::fs::write(config.data_dir.join("lmtp.addr"), listener.local_address())?;
        tracing::info!(address = %listener.local_address(), "LMTP listening");
        let server = crate::lmtp::LmtpServer::new(service.clone(), &config.name, Some(metrics));
        let mut limits = server.limits();
        limits.max_connections = config.lmtp_max_connections;
        limits.idle_timeout = config.lmtp_idle_timeout;
        limits.session_deadline = config.lmtp_session_deadline;
        limits.session.max_recipients = config.lmtp_max_recipients;
        let server = server.with_limits(limits);
        tokio::spawn(server.serve(listener, stop.clone()));
    }

    // IMAP, before HTTP too; its UIDs are a node-local index beside the store.
    if config.imap_listen.is_some() || config.imaps_listen.is_some() {
        let uids = Arc::new(
            crate::service::uids::UidIndex::open(&config.data_dir.join("uids"))
                .map_err(|error| std::io::Error::other(error.to_string()))?,
        );
        let mut settings = crate::imap::ImapSettings::for_service(&service);
        settings.allow_plaintext = config.imap_allow_plaintext;
        settings.connections = config.imap_connections;
        // The HTTP listener's configuration announces ALPN http/1.1; IMAP's announces imap (RFC 9051).
        let imap_tls = tls.as_ref().map(|tls| {
            let mut config = (**tls).clone();
            config.alpn_protocols = vec![b"imap".to_vec()];
            Arc::new(config)
        });
        let server = crate::imap::ImapServer::new(service.clone(), uids, imap_tls, settings);
        for (address, implicit_tls, file) in [
            (config.imap_listen, false, "imap.addr"),
            (config.imaps_listen, true, "imaps.addr"),
        ] {
            let Some(address) = address else { continue };
            let listener = crate::imap::ImapServer::bind(address)
                .await
                .map_err(|error| std::io::Error::other(error.to_string()))?;
            let bound = listener.local_addr()?;
            std::fs::write(config.data_dir.join(file), bound.to_string())?;
            tracing::info!(address = %bound, implicit_tls, "IMAP listening");
            tokio::spawn(server.clone().serve(listener, implicit_tls, stop.clone()));
        }
    }

    // HTTP.
    let listener = tokio::net::TcpListener::bind(config.http).await?;
    let http = listener.local_addr()?;
    std::fs::write(config.data_dir.join("http.addr"), http.to_string())?;
    let router = crate::api::router(service.clone(), engine.clone(), stop.clone());
    let service_with_address = router.into_make_service_with_connect_info::<ClientAddress>();
    let mut http_stop = stop;
    let shutdown = async move { stopped(&mut http_stop).await };
    match tls {
        Some(tls) => {
            tracing::info!(address = %http, "HTTPS API listening");
            let listener = TlsListener::new(listener, tls)?;
            tokio::spawn(async move {
                if let Err(error) = axum::serve(listener, service_with_address)
                    .with_graceful_shutdown(shutdown)
                    .await
                {
                    tracing::error!("HTTPS server failed: {error}");
                }
            });
        }
        None => {
            tracing::info!(address = %http, "HTTP API listening");
            tokio::spawn(async move {
                if let Err(error) = axum::serve(listener, service_with_address)
                    .with_graceful_shutdown(shutdown)
                    .await
                {
                    tracing::error!("HTTP server failed: {error}");
                }
            });
        }
    }
    Ok(Running {
        service,
        engine,
        http,
        closed,
    })
}

/// Resolves once the stop flag is set (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}
