//! Runs real mailmesh node processes on 127.0.0.1 with OS-chosen ports: the demo and the
//! integration tests use it, so both exercise the same binary a user runs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::api_client::{self, encode_segment, Response};

/// Why the harness could not do something.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("node {name} did not start within {seconds} s; see {log}")]
    StartTimeout { name: String, seconds: u64, log: String },
    #[error("http: {0}")]
    Http(#[from] api_client::ClientError),
    #[error("{0}")]
    Unexpected(String),
}

/// One node process.
pub struct LocalNode {
    pub name: String,
    pub data_dir: PathBuf,
    pub http: String,
    binary: PathBuf,
    arguments: Vec<String>,
    environment: Vec<(String, String)>,
    child: Option<Child>,
    /// The bearer token sent with every request, when the node requires one.
    pub token: Option<String>,
    /// Keeps a connection to the node alive between requests.
    agent: ureq::Agent,
}

impl LocalNode {
    /// Starts `binary node` with its store in `data_dir`, bootstrapping from `peers`.
    pub fn spawn(
        binary: &Path,
        name: &str,
        data_dir: &Path,
        cluster: &str,
        peers: &[String],
        gossip_interval_ms: u64,
        extra: &[String],
    ) -> Result<LocalNode, HarnessError> {
        Self::spawn_with_environment(binary, name, data_dir, cluster, peers, gossip_interval_ms, extra, &[])
    }

    /// The same, with extra environment variables for the node process.
    #[allow(clippy::too_many_arguments)]
    pub fn spawn_with_environment(
        binary: &Path,
        name: &str,
        data_dir: &Path,
        cluster: &str,
        peers: &[String],
        gossip_interval_ms: u64,
        extra: &[String],
        environment: &[(&str, &str)],
    ) -> Result<LocalNode, HarnessError> {
        std::fs::create_dir_all(data_dir)?;
        let mut arguments: Vec<String> = vec![
            "node".into(),
            "--name".into(),
            name.into(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--listen".into(),
            "/ip4/127.0.0.1/tcp/0".into(),
            "--http".into(),
            "127.0.0.1:0".into(),
            "--cluster".into(),
            cluster.into(),
            "--gossip-interval-ms".into(),
            gossip_interval_ms.to_string(),
        ];
        for peer in peers {
            arguments.push("--peer".into());
            arguments.push(peer.clone());
        }
        arguments.extend(extra.iter().cloned());
        let mut node = LocalNode {
            name: name.into(),
            data_dir: data_dir.to_owned(),
            http: String::new(),
            binary: binary.to_owned(),
            arguments,
            environment: environment
                .iter()
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .collect(),
            child: None,
            token: None,
            agent: api_client::agent(),
        };
        node.start()?;
        Ok(node)
    }

    fn start(&mut self) -> Result<(), HarnessError> {
        let address_file = self.data_dir.join("http.addr");
        let _ = std::fs::remove_file(&address_file);
        let log_path = self.data_dir.join("node.log");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
        let child = Command::new(&self.binary)
            .args(&self.arguments)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .envs(
                self.environment
                    .iter()
                    .map(|(key, value)| (key.as_str(), value.as_str())),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(address) = std::fs::read_to_string(&address_file) {
                self.http = address.trim().to_owned();
                if self
                    .get("/healthz")
                    .map(|response| response.status == 200)
                    .unwrap_or(false)
                {
                    return Ok(());
                }
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(HarnessError::Unexpected(format!(
                        "node {} exited with {status}; see {}",
                        self.name,
                        log_path.display()
                    )));
                }
            }
            if Instant::now() > deadline {
                return Err(HarnessError::StartTimeout {
                    name: self.name.clone(),
                    seconds: 60,
                    log: log_path.display().to_string(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the process with SIGKILL (no clean shutdown).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the process with SIGTERM and waits for it.
    pub fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY-free: `kill` from the shell sends SIGTERM.
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The node's process ID while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }

    /// Freezes the process with SIGSTOP: its sockets stay open but it answers nothing, as a
    /// node stalled by the kernel or a debugger would.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused process run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        if let Some(child) = self.child.as_ref() {
            let _ = Command::new("kill").arg(signal).arg(child.id().to_string()).status();
        }
    }

    /// Starts the same node again (same data dir, same identity).
    pub fn restart(&mut self) -> Result<(), HarnessError> {
        self.kill();
        self.start()
    }

    /// GET a path.
    pub fn get(&self, path: &str) -> Result<Response, HarnessError> {
        Ok(api_client::request(
            &self.agent,
            &self.http,
            "GET",
            path,
            &[],
            self.token.as_deref(),
        )?)
    }

    /// Sends a request with a body.
    pub fn send(&self, method: &str, path: &str, body: &[u8]) -> Result<Response, HarnessError> {
        Ok(api_client::request(
            &self.agent,
            &self.http,
            method,
            path,
            body,
            self.token.as_deref(),
        )?)
    }

    /// The node's status document.
    pub fn status(&self) -> Result<Value, HarnessError> {
        let response = self.get("/v1/status")?;
        if response.status != 200 {
            return Err(HarnessError::Unexpected(format!("status answered {}", response.status)));
        }
        Ok(response.json())
    }

    /// The node's listen address on 127.0.0.1 with its /p2p/ suffix.
    pub fn listen_address(&self) -> Result<String, HarnessError> {
        let status = self.status()?;
        status["listen"]
            .as_array()
            .and_then(|list| {
                list.iter()
                    .filter_map(Value::as_str)
                    .find(|address| address.contains("127.0.0.1"))
            })
            .map(str::to_owned)
            .ok_or_else(|| HarnessError::Unexpected(format!("no listen address in {status}")))
    }

    /// The mailbox path prefix for an account and mailbox.
    pub fn mailbox_path(account: &str, mailbox: &str) -> String {
        format!("/v1/mailboxes/{}/{}", encode_segment(account), encode_segment(mailbox))
    }

    /// Appends a message and returns its ID.
    pub fn append(&self, account: &str, mailbox: &str, raw: &[u8]) -> Result<String, HarnessError> {
        let response = self.send(
            "POST",
            &format!("{}/messages", Self::mailbox_path(account, mailbox)),
            raw,
        )?;
        if response.status != 201 {
            return Err(HarnessError::Unexpected(format!(
                "append on {} answered {}: {}",
                self.name,
                response.status,
                String::from_utf8_lossy(&response.body)
            )));
        }
        response.json()["id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| HarnessError::Unexpected("no id".into()))
    }

    /// Every live message of a mailbox as (id, sorted flags), in ID order.
    pub fn messages(&self, account: &str, mailbox: &str) -> Result<Vec<(String, Vec<String>)>, HarnessError> {
        let mut all = Vec::new();
        let mut position = 0;
        loop {
            let path = format!(
                "{}/messages?limit=1000&position={position}",
                Self::mailbox_path(account, mailbox)
            );
            let response = self.get(&path)?;
            if response.status == 404 {
                return Ok(all);
            }
            let json = response.json();
            let items = json["items"].as_array().cloned().unwrap_or_default();
            if items.is_empty() {
                return Ok(all);
            }
            position += items.len();
            for item in items {
                let id = item["id"].as_str().unwrap_or_default().to_owned();
                let flags = item["flags"]
                    .as_array()
                    .map(|flags| flags.iter().filter_map(Value::as_str).map(str::to_owned).collect())
                    .unwrap_or_default();
                all.push((id, flags));
            }
        }
    }

    /// The node digest.
    pub fn digest(&self) -> Result<String, HarnessError> {
        Ok(self.status()?["digest"].as_str().unwrap_or_default().to_owned())
    }

    /// The sum of a metric's samples whose line starts with `name` (all label sets).
    pub fn metric_sum(&self, name: &str) -> Result<f64, HarnessError> {
        let text = String::from_utf8_lossy(&self.get("/metrics")?.body).into_owned();
        Ok(api_client::metric_sum(&text, name))
    }

    /// Sends `request` with HTTP Basic for `login` to `path` (a JMAP route) and parses the JSON
    /// answer; any status but 200 is an error carrying the body.
    pub fn jmap_send(
        &self,
        login: &str,
        password: &str,
        method: &str,
        path: &str,
        request: &Value,
    ) -> Result<Value, HarnessError> {
        use base64::Engine;
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{login}:{password}"));
        let body = if method == "GET" {
            Vec::new()
        } else {
            request.to_string().into_bytes()
        };
        let response = api_client::request_with_authorization(
            &self.agent,
            &self.http,
            method,
            path,
            &body,
            Some(&format!("Basic {basic}")),
        )?;
        if response.status != 200 {
            return Err(HarnessError::Unexpected(format!(
                "{method} {path} on {} answered {}: {}",
                self.name,
                response.status,
                response.text()
            )));
        }
        serde_json::from_slice(&response.body)
            .map_err(|error| HarnessError::Unexpected(format!("{path} on {} answered no JSON: {error}", self.name)))
    }

    /// Sends JMAP method calls (RFC 8620 §3.3, with the core and mail capabilities) as `login`
    /// and returns the `methodResponses`; a method-level `error` answer is an error.
    pub fn jmap(&self, login: &str, password: &str, method_calls: Value) -> Result<Vec<Value>, HarnessError> {
        let request = serde_json::json!({
            "using": ["urn:ietf:params:jmap:core", "urn:ietf:params:jmap:mail"],
            "methodCalls": method_calls,
        });
        let answer = self.jmap_send(login, password, "POST", "/jmap/api", &request)?;
        let responses = answer["methodResponses"].as_array().cloned().unwrap_or_default();
        if let Some(error) = responses.iter().find(|response| response[0] == "error") {
            return Err(HarnessError::Unexpected(format!(
                "JMAP on {} answered {error}",
                self.name
            )));
        }
        Ok(responses)
    }
}

impl Drop for LocalNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `check` every 50 ms until it returns true or `limit` passes; returns the time taken.
pub fn wait_until(limit: Duration, check: impl FnMut() -> bool) -> Option<Duration> {
    wait_until_every(Duration::from_millis(50), limit, check)
}

/// [`wait_until`] with another polling interval: the time returned is exact to about `every`
/// (the demo polls every 2 ms so that its figures are not rounded up to the 50 ms of the tests).
pub fn wait_until_every(every: Duration, limit: Duration, mut check: impl FnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    loop {
        if check() {
            return Some(started.elapsed());
        }
        if started.elapsed() > limit {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// Whether every node reports the same digest.
pub fn digests_agree(nodes: &[&LocalNode]) -> bool {
    let digests: Vec<String> = nodes.iter().map(|node| node.digest().unwrap_or_default()).collect();
    !digests[0].is_empty() && digests.iter().all(|digest| digest == &digests[0])
}

/// A realistic small RFC 5322 message.
pub fn sample_message(from: &str, subject: &str, body: &str) -> Vec<u8> {
    format!(
        "From: {from}\r\nTo: team@example.org\r\nSubject: {subject}\r\nDate: Sun, 29 Nov 2026 08:00:00 +0000\r\nMessage-ID: <{}@example.org>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n",
        blake3::hash(format!("{from}{subject}{body}").as_bytes()).to_hex()
    )
    .into_bytes()
}

/// Gives `to` a record of `from` the way a pull does: its blob (when `from` has it), then the
/// record merged in. For tests that replicate between two stores without a network.
pub fn pull_record(
    from: &crate::store::Store,
    to: &crate::store::Store,
    mailbox: &crate::model::MailboxKey,
    record: crate::model::MessageRecord,
    now_millis: u64,
) -> Result<(), crate::store::StoreError> {
    if let Some(bytes) = from.blob(&record.blob)? {
        to.apply_one(crate::store::Operation::PutBlob {
            expected: record.blob,
            bytes,
        })?;
    }
    to.apply_one(crate::store::Operation::Merge {
        mailbox: mailbox.clone(),
        record,
        now_millis,
    })?;
    Ok(())
}
