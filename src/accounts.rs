//! Site accounts: who may log in to this node, read from an accounts file in Dovecot's
//! passwd-file format, so an operator can reuse a file (or the habits) they already have.
//!
//! One account a line, `user:{SCHEME}hash`, optionally followed by Dovecot's other colon fields
//! (uid, gid, gecos, home, shell, extra fields), which are ignored. `#` starts a comment line;
//! blank lines are skipped. The schemes are ARGON2ID, ARGON2I, SHA512-CRYPT, SHA256-CRYPT and
//! BLF-CRYPT; `mailmesh passwd` (or `doveadm pw -s ARGON2ID`) makes a line. The file is site
//! configuration: every node reads its own and nothing of it is replicated.
//!
//! What a login may learn, and what it costs:
//! - an unknown account and a wrong password get the same answer ([`AuthenticationError::Refused`])
//!   after about the same work: an unknown account is checked against a dummy hash of the same
//!   scheme and cost as the file's accounts;
//! - failed logins spend tokens from two buckets, one per login name and one per source address
//!   (an IPv6 /64 counts as one address); an empty bucket answers
//!   [`AuthenticationError::Throttled`] before any hash is computed;
//! - a successful login is remembered for five minutes under a keyed digest of the password, so
//!   a client that sends its credentials with every request does not pay a hash each time, and
//!   an attack that throttles an account does not lock out its clients already logged in.
//!
//! The file is reloaded when its modification time, size or inode change, checked at most once a
//! second when a login or lookup needs it. A reload that fails keeps the last good table and logs
//! why. No password or hash ever reaches a log line, an error message or a `Debug` print: the
//! errors name the line and what is wrong with it, never its content.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use crate::metrics::{NodeMetrics, OutcomeLabel};

/// How often the file's metadata is looked at, at most.
const RELOAD_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// How long a successful login is remembered.
const SUCCESS_CACHE_LIFETIME: Duration = Duration::from_secs(300);

/// The most remembered logins; past it the cache starts again empty.
const SUCCESS_CACHE_CAPACITY: usize = 10_000;

/// The most rate-limit buckets kept per kind; past it, buckets that have refilled are dropped
/// first, then the fullest ones.
const MAX_TRACKED_BUCKETS: usize = 65_536;

/// Login names longer than this are cut to it for rate limiting and logs (no account name is
/// longer: an address has at most 254 characters).
const MAX_LOGIN_CHARACTERS: usize = 320;

/// The Argon2id costs `mailmesh passwd` uses: Dovecot 2.3's `doveadm pw -s ARGON2ID` defaults
/// (64 MiB, 3 passes, 1 lane).
const PASSWD_MEMORY_KIB: u32 = 65_536;
const PASSWD_PASSES: u32 = 3;
const PASSWD_LANES: u32 = 1;

/// Argon2 hashes asking for more memory than this (in KiB) are refused when the file is read.
const MAX_ARGON2_MEMORY_KIB: u32 = 1024 * 1024;

/// A password scheme of the accounts file, named as Dovecot names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scheme {
    Argon2id,
    Argon2i,
    Sha512Crypt,
    Sha256Crypt,
    BlfCrypt,
}

impl Scheme {
    /// Every supported scheme.
    pub const ALL: [Scheme; 5] = [
        Scheme::Argon2id,
        Scheme::Argon2i,
        Scheme::Sha512Crypt,
        Scheme::Sha256Crypt,
        Scheme::BlfCrypt,
    ];

    /// The name between the braces, e.g. `ARGON2ID`.
    pub fn name(self) -> &'static str {
        match self {
            Scheme::Argon2id => "ARGON2ID",
            Scheme::Argon2i => "ARGON2I",
            Scheme::Sha512Crypt => "SHA512-CRYPT",
            Scheme::Sha256Crypt => "SHA256-CRYPT",
            Scheme::BlfCrypt => "BLF-CRYPT",
        }
    }

    /// The scheme of a name, ignoring case as Dovecot does.
    pub fn parse(name: &str) -> Option<Scheme> {
        Scheme::ALL
            .into_iter()
            .find(|scheme| scheme.name().eq_ignore_ascii_case(name))
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

/// What is wrong with one line of an accounts file. No variant carries the line's content, so
/// an error can be logged or shown without leaking a hash.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineProblem {
    #[error("expected `user:{{SCHEME}}hash` but found no ':' after the user name")]
    MissingPassword,
    #[error("the user name is empty")]
    EmptyUser,
    #[error("the user name holds whitespace or control characters")]
    BadUser,
    #[error("the password does not start with {{SCHEME}} (e.g. {{ARGON2ID}}); make one with `mailmesh passwd`")]
    NoScheme,
    #[error("unsupported password scheme {0}: use ARGON2ID, ARGON2I, SHA512-CRYPT, SHA256-CRYPT or BLF-CRYPT")]
    UnsupportedScheme(String),
    #[error("the {scheme} hash is malformed ({reason}); make a new one with `mailmesh passwd`")]
    MalformedHash { scheme: Scheme, reason: &'static str },
    #[error("this user is already defined on line {first}")]
    Duplicate { first: usize },
}

/// Why an accounts file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AccountsError {
    #[error("cannot read the accounts file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the accounts file {path} is not UTF-8 text")]
    NotText { path: PathBuf },
    #[error("{path}, line {line}: {problem}")]
    Malformed {
        path: PathBuf,
        line: usize,
        problem: LineProblem,
    },
}

/// Why a login was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthenticationError {
    /// Unknown account or wrong password: deliberately the same answer.
    #[error("unknown account or wrong password")]
    Refused,
    /// Too many failed logins for this account or from this address: try again later.
    #[error("too many failed logins; try again in {} s", retry_after.as_secs().max(1))]
    Throttled { retry_after: Duration },
    /// The accounts file has never been read successfully.
    #[error("the accounts file is not available; see the node's log")]
    Unavailable,
}

/// The accounts file has never been read successfully, so no account is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the accounts file is not available; see the node's log")]
pub struct AccountsUnavailable;

impl From<AccountsUnavailable> for AuthenticationError {
    fn from(_: AccountsUnavailable) -> Self {
        AuthenticationError::Unavailable
    }
}

/// An account that logged in, e.g. `alice@example.org`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AccountName(String);

impl AccountName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AccountName {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.0)
    }
}

/// A password presented by a client. Its `Debug` form hides it.
#[derive(Clone)]
pub struct Password(String);

impl Password {
    pub fn new(text: impl Into<String>) -> Password {
        Password(text.into())
    }

    /// The password itself, for verification.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("Password(..)")
    }
}

/// A hash from the accounts file, checked for shape when it was read.
#[derive(Clone)]
struct StoredHash {
    scheme: Scheme,
    encoded: String,
}

impl fmt::Debug for StoredHash {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "StoredHash({}, ..)", self.scheme)
    }
}

impl StoredHash {
    /// Checks the hash's shape without computing it (so a large file loads fast).
    fn parse(scheme: Scheme, encoded: &str) -> Result<StoredHash, LineProblem> {
        let malformed = |reason| LineProblem::MalformedHash { scheme, reason };
        match scheme {
            Scheme::Argon2id | Scheme::Argon2i => {
                let parsed = argon2::PasswordHash::new(encoded).map_err(|_| malformed("not a PHC string"))?;
                let expected = if scheme == Scheme::Argon2id {
                    argon2::ARGON2ID_IDENT
                } else {
                    argon2::ARGON2I_IDENT
                };
                if parsed.algorithm != expected {
                    return Err(malformed("its algorithm does not match the scheme"));
                }
                let params = argon2::Params::try_from(&parsed).map_err(|_| malformed("bad Argon2 parameters"))?;
                if params.m_cost() > MAX_ARGON2_MEMORY_KIB {
                    return Err(malformed("more than 1 GiB of Argon2 memory"));
                }
                if parsed.salt.is_none() || parsed.hash.is_none() {
                    return Err(malformed("no salt or no hash"));
                }
            }
            Scheme::Sha512Crypt => check_sha_crypt(encoded, "$6$", 86).map_err(malformed)?,
            Scheme::Sha256Crypt => check_sha_crypt(encoded, "$5$", 43).map_err(malformed)?,
            Scheme::BlfCrypt => {
                let parts = encoded
                    .parse::<bcrypt::HashParts>()
                    .map_err(|_| malformed("not a $2y$ bcrypt string"))?;
                if !(4..=31).contains(&parts.get_cost()) {
                    return Err(malformed("cost out of range"));
                }
            }
        }
        Ok(StoredHash {
            scheme,
            encoded: encoded.to_owned(),
        })
    }

    /// Whether `password` matches. Costs what the scheme and its parameters cost.
    fn verify(&self, password: &str) -> bool {
        use argon2::PasswordVerifier;
        let encoded = self.encoded.as_str();
        match self.scheme {
            Scheme::Argon2id | Scheme::Argon2i => argon2::Argon2::default()
                .verify_password(password.as_bytes(), encoded)
                .is_ok(),
            Scheme::Sha512Crypt | Scheme::Sha256Crypt => sha_crypt::ShaCrypt::default()
                .verify_password(password.as_bytes(), encoded)
                .is_ok(),
            Scheme::BlfCrypt => bcrypt::verify(password, encoded).unwrap_or(false),
        }
    }

    /// A hash of a random password with this hash's scheme and costs: what an unknown account
    /// is checked against, so that it takes as long as a known one.
    fn dummy_like(&self) -> StoredHash {
        let secret: String = random_text(24);
        let encoded = match self.scheme {
            Scheme::Argon2id | Scheme::Argon2i => {
                let params = argon2::PasswordHash::new(&self.encoded)
                    .ok()
                    .and_then(|parsed| argon2::Params::try_from(&parsed).ok())
                    .unwrap_or_default();
                argon2_hash(argon2_algorithm(self.scheme), params, &secret)
            }
            Scheme::Sha512Crypt | Scheme::Sha256Crypt => {
                sha_crypt_hash(self.scheme, sha_crypt_rounds(&self.encoded), &secret)
            }
            Scheme::BlfCrypt => {
                let cost = self
                    .encoded
                    .parse::<bcrypt::HashParts>()
                    .map(|parts| parts.get_cost())
                    .unwrap_or(bcrypt::DEFAULT_COST);
                bcrypt::hash(&secret, cost).ok()
            }
        };
        match encoded {
            Some(encoded) => StoredHash {
                scheme: self.scheme,
                encoded,
            },
            // Hashing a fresh random password cannot fail with parameters that parsed; if it
            // somehow does, the stored hash itself is the dummy (the answer is discarded).
            None => self.clone(),
        }
    }
}

fn argon2_algorithm(scheme: Scheme) -> argon2::Algorithm {
    if scheme == Scheme::Argon2i {
        argon2::Algorithm::Argon2i
    } else {
        argon2::Algorithm::Argon2id
    }
}

fn random_bytes<const LENGTH: usize>() -> [u8; LENGTH] {
    let mut bytes = [0u8; LENGTH];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
    bytes
}

fn argon2_hash(algorithm: argon2::Algorithm, params: argon2::Params, password: &str) -> Option<String> {
    use argon2::PasswordHasher;
    argon2::Argon2::new(algorithm, argon2::Version::V0x13, params)
        .hash_password_with_salt(password.as_bytes(), &random_bytes::<16>())
        .ok()
        .map(|hash| hash.to_string())
}

/// `$6$rounds=N$salt$hash` (or `$5$`) with a fresh 16-character salt.
fn sha_crypt_hash(scheme: Scheme, rounds: u32, password: &str) -> Option<String> {
    use sha_crypt::PasswordHasher;
    let algorithm = if scheme == Scheme::Sha256Crypt {
        sha_crypt::Algorithm::Sha256Crypt
    } else {
        sha_crypt::Algorithm::Sha512Crypt
    };
    let params = sha_crypt::Params::new(rounds).ok()?;
    sha_crypt::ShaCrypt::new(algorithm, params)
        .hash_password_with_salt(password.as_bytes(), &random_bytes::<12>())
        .ok()
        .map(|hash| hash.to_string())
}

/// `$6$[rounds=N$]salt$hash` (or `$5$`), with a salt of at most 16 characters.
fn check_sha_crypt(encoded: &str, prefix: &str, hash_length: usize) -> Result<(), &'static str> {
    let rest = encoded.strip_prefix(prefix).ok_or("wrong prefix")?;
    let mut parts: Vec<&str> = rest.split('$').collect();
    if parts.first().is_some_and(|first| first.starts_with("rounds=")) {
        let rounds = parts.remove(0)["rounds=".len()..]
            .parse::<u32>()
            .map_err(|_| "bad rounds")?;
        if !(1000..=999_999_999).contains(&rounds) {
            return Err("rounds out of range");
        }
    }
    let [salt, hash] = parts[..] else {
        return Err("expected salt$hash");
    };
    let is_crypt_base64 = |text: &str| {
        text.bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'.' || byte == b'/')
    };
    if salt.is_empty() || salt.len() > 16 || !salt.bytes().all(|byte| byte != b':' && !byte.is_ascii_whitespace()) {
        return Err("bad salt");
    }
    if hash.len() != hash_length || !is_crypt_base64(hash) {
        return Err("bad hash length or alphabet");
    }
    Ok(())
}

/// The rounds of a SHA-crypt string (5000 when it names none).
fn sha_crypt_rounds(encoded: &str) -> u32 {
    encoded
        .split('$')
        .find_map(|part| part.strip_prefix("rounds="))
        .and_then(|rounds| rounds.parse().ok())
        .unwrap_or(5000)
}

fn random_text(length: usize) -> String {
    use rand::distributions::{Alphanumeric, DistString};
    Alphanumeric.sample_string(&mut rand::rngs::OsRng, length)
}

/// Hashes a password as `doveadm pw -s ARGON2ID` does: `{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$...`.
pub fn hash_password(password: &str) -> Result<String, String> {
    let params = argon2::Params::new(PASSWD_MEMORY_KIB, PASSWD_PASSES, PASSWD_LANES, None)
        .map_err(|error| format!("Argon2 parameters: {error}"))?;
    let encoded = argon2_hash(argon2::Algorithm::Argon2id, params, password)
        .ok_or_else(|| "Argon2id hashing failed".to_owned())?;
    Ok(format!("{{{}}}{encoded}", Scheme::Argon2id))
}

/// The accounts of one version of the file.
struct AccountTable {
    hashes: HashMap<String, StoredHash>,
    /// The hash unknown accounts are checked against, made on first need.
    dummy: OnceLock<Option<StoredHash>>,
}

impl fmt::Debug for AccountTable {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "AccountTable({} accounts)", self.hashes.len())
    }
}

impl AccountTable {
    /// Parses the text of an accounts file; an error names the first bad line (1-based).
    fn parse(text: &str) -> Result<AccountTable, (usize, LineProblem)> {
        let mut hashes = HashMap::new();
        let mut lines_of: HashMap<String, usize> = HashMap::new();
        for (index, line) in text.lines().enumerate() {
            let number = index + 1;
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let (user, rest) = line.split_once(':').ok_or((number, LineProblem::MissingPassword))?;
            if user.is_empty() {
                return Err((number, LineProblem::EmptyUser));
            }
            if user
                .chars()
                .any(|character| character.is_whitespace() || character.is_control())
            {
                return Err((number, LineProblem::BadUser));
            }
            let password = rest.split(':').next().unwrap_or_default();
            let (scheme_name, encoded) = password
                .strip_prefix('{')
                .and_then(|rest| rest.split_once('}'))
                .ok_or((number, LineProblem::NoScheme))?;
            let scheme = Scheme::parse(scheme_name).ok_or_else(|| {
                // A scheme name is no secret; anything that does not look like one is not shown.
                let shown = if scheme_name.len() <= 24
                    && scheme_name
                        .bytes()
                        .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'.')
                {
                    scheme_name.to_owned()
                } else {
                    "(not shown)".to_owned()
                };
                (number, LineProblem::UnsupportedScheme(shown))
            })?;
            let hash = StoredHash::parse(scheme, encoded).map_err(|problem| (number, problem))?;
            if let Some(first) = lines_of.insert(user.to_owned(), number) {
                return Err((number, LineProblem::Duplicate { first }));
            }
            hashes.insert(user.to_owned(), hash);
        }
        Ok(AccountTable {
            hashes,
            dummy: OnceLock::new(),
        })
    }

    /// The dummy for unknown accounts: the most common scheme in the file, with the costs of
    /// its first account of that scheme. None for an empty file.
    fn dummy(&self) -> Option<&StoredHash> {
        self.dummy
            .get_or_init(|| {
                let mut counts: HashMap<Scheme, usize> = HashMap::new();
                for hash in self.hashes.values() {
                    *counts.entry(hash.scheme).or_default() += 1;
                }
                let (scheme, _) = counts
                    .into_iter()
                    .max_by_key(|(scheme, count)| (*count, scheme.name()))?;
                let template = self.hashes.values().find(|hash| hash.scheme == scheme)?;
                Some(template.dummy_like())
            })
            .as_ref()
    }
}

/// How failed logins are limited: each failure spends a token from the login name's bucket and
/// from the source address's bucket; each bucket regains one token per `refill`.
#[derive(Clone, Copy, Debug)]
pub struct RateLimits {
    pub account_burst: u32,
    pub account_refill: Duration,
    pub address_burst: u32,
    pub address_refill: Duration,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            account_burst: 10,
            account_refill: Duration::from_secs(30),
            address_burst: 20,
            address_refill: Duration::from_secs(10),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    /// The tokens after refilling up to `now`.
    fn refill(&mut self, now: Instant, burst: u32, refill: Duration) -> f64 {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed / refill.as_secs_f64().max(1e-9)).min(f64::from(burst));
        self.updated = now.max(self.updated);
        self.tokens
    }
}

/// Buckets keyed by login name or address.
#[derive(Debug)]
struct Buckets<Key> {
    burst: u32,
    refill: Duration,
    buckets: HashMap<Key, Bucket>,
}

impl<Key: std::hash::Hash + Eq + Clone> Buckets<Key> {
    fn new(burst: u32, refill: Duration) -> Self {
        Buckets {
            burst: burst.max(1),
            refill,
            buckets: HashMap::new(),
        }
    }

    /// How long until `key` has a token again, if it has none now.
    fn wait(&mut self, key: &Key, now: Instant) -> Option<Duration> {
        let bucket = self.buckets.get_mut(key)?;
        let tokens = bucket.refill(now, self.burst, self.refill);
        (tokens < 1.0).then(|| self.refill.mul_f64(1.0 - tokens))
    }

    fn spend(&mut self, key: &Key, now: Instant) {
        if !self.buckets.contains_key(key) && self.buckets.len() >= MAX_TRACKED_BUCKETS {
            self.shrink(now);
        }
        let (burst, refill) = (self.burst, self.refill);
        let bucket = self.buckets.entry(key.clone()).or_insert(Bucket {
            tokens: f64::from(burst),
            updated: now,
        });
        bucket.refill(now, burst, refill);
        bucket.tokens -= 1.0;
    }

    fn give_back(&mut self, key: &Key, now: Instant) {
        let (burst, refill) = (self.burst, self.refill);
        if let Some(bucket) = self.buckets.get_mut(key) {
            bucket.refill(now, burst, refill);
            bucket.tokens = (bucket.tokens + 1.0).min(f64::from(burst));
        }
    }

    /// Drops refilled buckets, then the fullest, down to three quarters of the limit.
    fn shrink(&mut self, now: Instant) {
        let (burst, refill) = (self.burst, self.refill);
        self.buckets
            .retain(|_, bucket| bucket.refill(now, burst, refill) < f64::from(burst));
        let target = MAX_TRACKED_BUCKETS * 3 / 4;
        if self.buckets.len() > target {
            let mut fullness: Vec<(Key, f64)> = self
                .buckets
                .iter()
                .map(|(key, bucket)| (key.clone(), bucket.tokens))
                .collect();
            fullness.sort_by(|left, right| right.1.total_cmp(&left.1));
            for (key, _) in fullness.into_iter().take(self.buckets.len() - target) {
                self.buckets.remove(&key);
            }
        }
    }
}

/// A source address as rate limiting sees it: IPv4 addresses whole, IPv6 by /64 (one site).
fn address_key(source: IpAddr) -> IpAddr {
    match source {
        IpAddr::V4(_) => source,
        IpAddr::V6(address) => match address.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let segments = address.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(
                    segments[0],
                    segments[1],
                    segments[2],
                    segments[3],
                    0,
                    0,
                    0,
                    0,
                ))
            }
        },
    }
}

fn login_key(login: &str) -> String {
    login.chars().take(MAX_LOGIN_CHARACTERS).collect()
}

#[derive(Debug)]
struct Throttle {
    accounts: Buckets<String>,
    addresses: Buckets<IpAddr>,
}

/// What identifies one version of the file on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileIdentity {
    modified: Option<SystemTime>,
    size: u64,
    inode: u64,
}

impl FileIdentity {
    fn of(path: &Path) -> std::io::Result<FileIdentity> {
        let metadata = std::fs::metadata(path)?;
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(&metadata);
        #[cfg(not(unix))]
        let inode = 0;
        Ok(FileIdentity {
            modified: metadata.modified().ok(),
            size: metadata.len(),
            inode,
        })
    }
}

#[derive(Debug, Default)]
struct Loaded {
    table: Option<Arc<AccountTable>>,
    /// Bumped on every successful load; remembered logins of older generations are stale.
    generation: u64,
    /// The version last tried, whether it loaded or not (a failed one is not retried until the
    /// file changes again).
    tried: Option<FileIdentity>,
    checked_at: Option<Instant>,
    /// The last failure logged, so that a file that stays unreadable is logged once.
    last_failure: Option<String>,
}

/// Remembered successful logins: login name -> (keyed digest of the password, generation, until).
struct SuccessCache {
    key: [u8; 32],
    entries: HashMap<String, ([u8; 32], u64, Instant)>,
}

impl SuccessCache {
    fn digest(&self, login: &str, password: &str) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new_keyed(&self.key);
        hasher.update(&(login.len() as u64).to_le_bytes());
        hasher.update(login.as_bytes());
        hasher.update(password.as_bytes());
        *hasher.finalize().as_bytes()
    }
}

/// The accounts of this node: the table read from the accounts file, the failed-login limits
/// and the remembered logins. Share it with `Arc`; every method takes `&self`.
pub struct Accounts {
    path: PathBuf,
    loaded: Mutex<Loaded>,
    throttle: Mutex<Throttle>,
    successes: Mutex<SuccessCache>,
    /// Password hashes computed so far (dummy ones included).
    verifications: AtomicU64,
    /// Bounds the hashes computed at once: Argon2 takes tens of MiB each.
    verification_slots: tokio::sync::Semaphore,
    metrics: Option<NodeMetrics>,
}

impl fmt::Debug for Accounts {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = lock(&self.loaded).table.as_ref().map(|table| table.hashes.len());
        formatter
            .debug_struct("Accounts")
            .field("path", &self.path)
            .field("accounts", &count)
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here leaves its data consistent, so a panic elsewhere does not
    // make it unusable.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Accounts {
    /// Accounts read from `path` on first use (unavailable until the file reads well).
    pub fn new(path: &Path, limits: RateLimits) -> Accounts {
        let mut key = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut key);
        let parallel = std::thread::available_parallelism()
            .map_or(2, |count| count.get())
            .max(2);
        Accounts {
            path: path.to_owned(),
            loaded: Mutex::new(Loaded::default()),
            throttle: Mutex::new(Throttle {
                accounts: Buckets::new(limits.account_burst, limits.account_refill),
                addresses: Buckets::new(limits.address_burst, limits.address_refill),
            }),
            successes: Mutex::new(SuccessCache {
                key,
                entries: HashMap::new(),
            }),
            verifications: AtomicU64::new(0),
            verification_slots: tokio::sync::Semaphore::new(parallel),
            metrics: None,
        }
    }

    /// Reads `path` now; an unreadable or malformed file is an error.
    pub fn open(path: &Path, limits: RateLimits) -> Result<Accounts, AccountsError> {
        let accounts = Accounts::new(path, limits);
        let identity = FileIdentity::of(path).ok();
        let table = Self::read(path)?;
        let mut loaded = lock(&accounts.loaded);
        loaded.table = Some(Arc::new(table));
        loaded.generation = 1;
        loaded.tried = identity;
        drop(loaded);
        Ok(accounts)
    }

    /// Counts failed and throttled logins and reloads in these metrics.
    pub fn with_metrics(mut self, metrics: NodeMetrics) -> Accounts {
        self.metrics = Some(metrics);
        self
    }

    /// Checks the text of an accounts file as a load would, computing no hash: how many
    /// accounts it holds, or the first bad line (1-based) and what is wrong with it.
    pub fn check_text(text: &str) -> Result<usize, (usize, LineProblem)> {
        Ok(AccountTable::parse(text)?.hashes.len())
    }

    /// Checks a file the way a reload would; returns how many accounts it holds.
    pub fn check_file(path: &Path) -> Result<usize, AccountsError> {
        Ok(Self::read(path)?.hashes.len())
    }

    fn read(path: &Path) -> Result<AccountTable, AccountsError> {
        let bytes = std::fs::read(path).map_err(|source| AccountsError::Read {
            path: path.to_owned(),
            source,
        })?;
        let text = String::from_utf8(bytes).map_err(|_| AccountsError::NotText { path: path.to_owned() })?;
        AccountTable::parse(&text).map_err(|(line, problem)| AccountsError::Malformed {
            path: path.to_owned(),
            line,
            problem,
        })
    }

    /// The file this reads.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many password hashes were computed so far, dummy ones included.
    pub fn verifications(&self) -> u64 {
        self.verifications.load(Ordering::Relaxed)
    }

    /// How many accounts the current table holds.
    pub fn count(&self, now: Instant) -> Result<usize, AccountsUnavailable> {
        Ok(self.current(now)?.0.hashes.len())
    }

    /// Whether `name` is an account (for recipient resolution).
    pub fn exists(&self, name: &str, now: Instant) -> Result<bool, AccountsUnavailable> {
        Ok(self.current(now)?.0.hashes.contains_key(name))
    }

    /// The current table, reloading it first if the file changed (looked at once a second at
    /// most).
    fn current(&self, now: Instant) -> Result<(Arc<AccountTable>, u64), AccountsUnavailable> {
        let mut loaded = lock(&self.loaded);
        let due = loaded
            .checked_at
            .is_none_or(|checked| now.saturating_duration_since(checked) >= RELOAD_CHECK_INTERVAL);
        if due {
            loaded.checked_at = Some(now);
            self.reload_if_changed(&mut loaded);
        }
        let generation = loaded.generation;
        loaded
            .table
            .clone()
            .map(|table| (table, generation))
            .ok_or(AccountsUnavailable)
    }

    fn reload_if_changed(&self, loaded: &mut Loaded) {
        let identity = match FileIdentity::of(&self.path) {
            Ok(identity) => identity,
            Err(source) => {
                let error = AccountsError::Read {
                    path: self.path.clone(),
                    source,
                };
                self.note_failure(loaded, error);
                return;
            }
        };
        if loaded.tried == Some(identity) {
            return;
        }
        loaded.tried = Some(identity);
        match Self::read(&self.path) {
            Ok(table) => {
                let count = table.hashes.len();
                let first = loaded.table.is_none();
                loaded.table = Some(Arc::new(table));
                loaded.generation += 1;
                loaded.last_failure = None;
                self.count_reload("loaded");
                if first {
                    tracing::info!(path = %self.path.display(), accounts = count, "read the accounts file");
                } else {
                    tracing::info!(path = %self.path.display(), accounts = count, "reloaded the accounts file");
                }
            }
            Err(error) => self.note_failure(loaded, error),
        }
    }

    fn note_failure(&self, loaded: &mut Loaded, error: AccountsError) {
        let message = error.to_string();
        if loaded.last_failure.as_deref() == Some(message.as_str()) {
            return;
        }
        self.count_reload("failed");
        if loaded.table.is_some() {
            tracing::warn!("{message}; keeping the accounts read before");
        } else {
            tracing::error!("{message}; no login can succeed until it is fixed");
        }
        loaded.last_failure = Some(message);
    }

    fn count_reload(&self, outcome: &'static str) {
        if let Some(metrics) = &self.metrics {
            metrics.accounts_reloads.get_or_create(&OutcomeLabel { outcome }).inc();
        }
    }

    /// Checks a login (an account name such as `alice@example.org`) and its password, from
    /// `source` at `now`. Computes a password hash unless the login was throttled or
    /// remembered: call it from a blocking context ([`Accounts::authenticate_blocking`] does).
    pub fn authenticate(
        &self,
        login: &str,
        password: &str,
        source: IpAddr,
        now: Instant,
    ) -> Result<AccountName, AuthenticationError> {
        let (table, generation) = self.current(now)?;
        let login_key = login_key(login);
        let address = address_key(source);
        {
            let cache = lock(&self.successes);
            if let Some((digest, remembered_generation, until)) = cache.entries.get(login) {
                if *remembered_generation == generation
                    && now < *until
                    && constant_time_equal(digest, &cache.digest(login, password))
                    && table.hashes.contains_key(login)
                {
                    return Ok(AccountName(login.to_owned()));
                }
            }
        }
        // A token is spent before the hash is computed and given back on success, so that
        // parallel attempts cannot pass the limit together.
        {
            let mut throttle = lock(&self.throttle);
            let wait = [
                throttle.accounts.wait(&login_key, now),
                throttle.addresses.wait(&address, now),
            ]
            .into_iter()
            .flatten()
            .max();
            if let Some(retry_after) = wait {
                drop(throttle);
                if let Some(metrics) = &self.metrics {
                    metrics.login_throttled.inc();
                }
                tracing::info!(login = ?login_key, source = %source, "login throttled after repeated failures");
                return Err(AuthenticationError::Throttled { retry_after });
            }
            throttle.accounts.spend(&login_key, now);
            throttle.addresses.spend(&address, now);
        }
        let known = table.hashes.get(login);
        let verified = match known.or_else(|| table.dummy()) {
            Some(hash) => {
                self.verifications.fetch_add(1, Ordering::Relaxed);
                hash.verify(password) && known.is_some()
            }
            None => false,
        };
        if verified {
            {
                let mut throttle = lock(&self.throttle);
                throttle.accounts.give_back(&login_key, now);
                throttle.addresses.give_back(&address, now);
            }
            let mut cache = lock(&self.successes);
            if cache.entries.len() >= SUCCESS_CACHE_CAPACITY {
                cache.entries.clear();
            }
            let digest = cache.digest(login, password);
            cache
                .entries
                .insert(login.to_owned(), (digest, generation, now + SUCCESS_CACHE_LIFETIME));
            return Ok(AccountName(login.to_owned()));
        }
        if let Some(metrics) = &self.metrics {
            metrics.login_failures.inc();
        }
        let reason = if known.is_some() {
            "wrong password"
        } else {
            "unknown account"
        };
        tracing::warn!(login = ?login_key, source = %source, reason, "login failed");
        Err(AuthenticationError::Refused)
    }

    /// [`Accounts::authenticate`] on tokio's blocking pool, a few at a time, at the current time.
    pub async fn authenticate_blocking(
        self: &Arc<Self>,
        login: String,
        password: Password,
        source: IpAddr,
    ) -> Result<AccountName, AuthenticationError> {
        let _slot = self
            .verification_slots
            .acquire()
            .await
            .map_err(|_| AuthenticationError::Unavailable)?;
        let accounts = self.clone();
        tokio::task::spawn_blocking(move || accounts.authenticate(&login, password.expose(), source, Instant::now()))
            .await
            .unwrap_or(Err(AuthenticationError::Unavailable))
    }
}

fn constant_time_equal(left: &[u8], right: &[u8]) -> bool {
    left.len() == right.len()
        && left
            .iter()
            .zip(right)
            .fold(0u8, |difference, (a, b)| difference | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    /// Made here with `doveadm pw -s SCHEME -p secret` (Dovecot 2.3.19, Debian 12).
    const DOVEADM_HASHES: [&str; 5] = [
        "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$8/nB/C6xTlzhbXYpjtjUCw$SYo5NzTjmnJOqCTWgcKvD1CFqtQ2VLIdSvQOhZcyjb4",
        "{ARGON2I}$argon2i$v=19$m=32768,t=4,p=1$QyNcl/GvOBcu97LE5fP+GQ$VJqrbGCYrgJr8o7/5kVkwkryZJ8Lc3NEVW65J1AbqMA",
        "{SHA512-CRYPT}$6$3d1jxbtsSUvkdMJd$BaSpHPEbL9a6Kr7aotyzcanEM22vEvv6JW1FUXXS9/OoWz/Q.Tvq/MR1BhXbNBe2D5X7YGGGLka2prNYroVB8.",
        "{SHA256-CRYPT}$5$8hIR1oBj/m/MYdrH$7L6jQjXclmNVH17BY0mLxTFX1zbCkEyMGqFfifIl/m0",
        "{BLF-CRYPT}$2y$05$bbVqlDDdAJcBv65/ORmOt.wwpd44hT4XhF29D1.ApMZkkl39iaCrS",
    ];

    const HOME: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    const ELSEWHERE: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7));

    /// A cheap hash of `password` in `scheme`, made with the crates (low costs keep tests fast).
    fn cheap_hash(scheme: Scheme, password: &str) -> String {
        let encoded = match scheme {
            Scheme::Argon2id | Scheme::Argon2i => {
                let params = argon2::Params::new(256, 1, 1, None).unwrap();
                argon2_hash(argon2_algorithm(scheme), params, password).unwrap()
            }
            Scheme::Sha512Crypt | Scheme::Sha256Crypt => sha_crypt_hash(scheme, 1000, password).unwrap(),
            Scheme::BlfCrypt => bcrypt::hash_with_result(password, 4)
                .unwrap()
                .format_for_version(bcrypt::Version::TwoY),
        };
        format!("{{{scheme}}}{encoded}")
    }

    struct File {
        _directory: tempfile::TempDir,
        path: PathBuf,
    }

    impl File {
        fn new(text: &str) -> File {
            let directory = tempfile::tempdir().unwrap();
            let path = directory.path().join("accounts");
            std::fs::write(&path, text).unwrap();
            File {
                _directory: directory,
                path,
            }
        }

        /// Replaces the file as an editor or `mv` would: a new inode.
        fn replace(&self, text: &str) {
            let temporary = self.path.with_extension("new");
            std::fs::write(&temporary, text).unwrap();
            std::fs::rename(&temporary, &self.path).unwrap();
        }
    }

    fn open(file: &File) -> Accounts {
        Accounts::open(&file.path, RateLimits::default()).unwrap()
    }

    #[test]
    fn every_scheme_verifies_hashes_made_by_the_crates() {
        let mut text = String::new();
        for (index, scheme) in Scheme::ALL.into_iter().enumerate() {
            text.push_str(&format!(
                "user{index}@example.org:{}\n",
                cheap_hash(scheme, &format!("pass {index}"))
            ));
        }
        let file = File::new(&text);
        let accounts = open(&file);
        let now = Instant::now();
        for (index, scheme) in Scheme::ALL.into_iter().enumerate() {
            let login = format!("user{index}@example.org");
            let address = IpAddr::V4(Ipv4Addr::new(10, 0, 0, index as u8));
            assert_eq!(
                accounts.authenticate(&login, &format!("pass {index}"), address, now),
                Ok(AccountName(login.clone())),
                "{scheme}"
            );
            assert_eq!(
                accounts.authenticate(&login, "pass 9", address, now),
                Err(AuthenticationError::Refused),
                "{scheme}"
            );
        }
    }

    #[test]
    fn hashes_made_by_doveadm_verify() {
        let text: String = DOVEADM_HASHES
            .iter()
            .enumerate()
            .map(|(index, hash)| format!("user{index}:{hash}\n"))
            .collect();
        let file = File::new(&text);
        let accounts = open(&file);
        let now = Instant::now();
        for (index, hash) in DOVEADM_HASHES.iter().enumerate() {
            let login = format!("user{index}");
            assert!(accounts.authenticate(&login, "secret", HOME, now).is_ok(), "{hash}");
            assert_eq!(
                accounts.authenticate(&login, "Secret", HOME, now),
                Err(AuthenticationError::Refused),
                "{hash}"
            );
        }
    }

    #[test]
    fn passwd_lines_verify_and_look_like_doveadm_ones() {
        let line = hash_password("correct horse").unwrap();
        assert!(line.starts_with("{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$"), "{line}");
        let file = File::new(&format!("carol@example.org:{line}\n"));
        let accounts = open(&file);
        let now = Instant::now();
        assert!(accounts
            .authenticate("carol@example.org", "correct horse", HOME, now)
            .is_ok());
        assert_eq!(
            accounts.authenticate("carol@example.org", "correct horse ", HOME, now),
            Err(AuthenticationError::Refused)
        );
    }

    #[test]
    fn comments_blank_lines_crlf_and_dovecot_fields_are_read() {
        let alice = cheap_hash(Scheme::Sha512Crypt, "alice pass");
        let bob = cheap_hash(Scheme::BlfCrypt, "bob pass");
        let text = format!(
            "# accounts of example.org\r\n\r\n   \nalice@example.org:{alice}:1000:1000::/home/alice::userdb_quota_rule=*:storage=1G\r\n  # indented comment\nbob@example.org:{{blf-crypt}}{}\n",
            bob.trim_start_matches("{BLF-CRYPT}")
        );
        let file = File::new(&text);
        let accounts = open(&file);
        let now = Instant::now();
        assert_eq!(accounts.count(now), Ok(2));
        assert_eq!(accounts.exists("alice@example.org", now), Ok(true));
        assert_eq!(accounts.exists("carol@example.org", now), Ok(false));
        assert!(accounts
            .authenticate("alice@example.org", "alice pass", HOME, now)
            .is_ok());
        assert!(accounts.authenticate("bob@example.org", "bob pass", HOME, now).is_ok());
    }

    #[test]
    fn malformed_lines_name_the_line_and_never_show_the_hash() {
        let good = cheap_hash(Scheme::Argon2id, "x");
        let secret_part = good.rsplit('$').next().unwrap().to_owned();
        let cases: Vec<(String, usize, LineProblem)> = vec![
            (format!("# c\n{good}\n"), 2, LineProblem::MissingPassword),
            (format!("a:{good}\n:{good}\n"), 2, LineProblem::EmptyUser),
            (format!("al ice:{good}\n"), 1, LineProblem::BadUser),
            (format!("alice {good}\n"), 1, LineProblem::MissingPassword),
            (
                format!("alice:{}\n", &good["{ARGON2ID}".len()..]),
                1,
                LineProblem::NoScheme,
            ),
            (
                "\n\nalice:{PLAIN}hunter2\n".to_owned(),
                3,
                LineProblem::UnsupportedScheme("PLAIN".into()),
            ),
            (
                format!("alice:{{{secret_part}}}x\n"),
                1,
                LineProblem::UnsupportedScheme("(not shown)".into()),
            ),
            (
                format!("alice:{}\n", good.replace("$argon2id$", "$argon2i$")),
                1,
                LineProblem::MalformedHash {
                    scheme: Scheme::Argon2id,
                    reason: "its algorithm does not match the scheme",
                },
            ),
            (
                format!("alice:{}\n", &good[..good.len() - 30]),
                1,
                LineProblem::MalformedHash {
                    scheme: Scheme::Argon2id,
                    reason: "not a PHC string",
                },
            ),
            (
                format!("alice:{{SHA512-CRYPT}}$6$salt${secret_part}\n"),
                1,
                LineProblem::MalformedHash {
                    scheme: Scheme::Sha512Crypt,
                    reason: "bad hash length or alphabet",
                },
            ),
            (
                format!("alice:{{BLF-CRYPT}}$2y$05${secret_part}\n"),
                1,
                LineProblem::MalformedHash {
                    scheme: Scheme::BlfCrypt,
                    reason: "not a $2y$ bcrypt string",
                },
            ),
            (
                format!("alice:{good}\nbob:{good}\nalice:{good}\n"),
                3,
                LineProblem::Duplicate { first: 1 },
            ),
        ];
        for (text, line, problem) in cases {
            let file = File::new(&text);
            let error = Accounts::open(&file.path, RateLimits::default()).unwrap_err();
            match &error {
                AccountsError::Malformed {
                    line: found_line,
                    problem: found_problem,
                    ..
                } => assert_eq!((*found_line, found_problem), (line, &problem), "{text}"),
                other => panic!("{other} for {text}"),
            }
            let shown = format!("{error} {error:?}");
            assert!(shown.contains(&format!("line {line}")), "{shown}");
            assert!(!shown.contains(&secret_part), "the hash leaked: {shown}");
            assert!(!shown.contains("hunter2"), "the password leaked: {shown}");
            assert!(Accounts::check_file(&file.path).is_err());
        }
    }

    #[test]
    fn the_file_is_reloaded_when_it_changes_and_a_bad_version_keeps_the_last_good_one() {
        let file = File::new(&format!("alice:{}\n", cheap_hash(Scheme::Argon2id, "first")));
        let accounts = open(&file);
        let start = Instant::now();
        assert!(accounts.authenticate("alice", "first", HOME, start).is_ok());

        file.replace(&format!(
            "alice:{}\nbob:{}\n",
            cheap_hash(Scheme::Argon2id, "second"),
            cheap_hash(Scheme::Sha256Crypt, "bob")
        ));
        // Looked at once a second at most: half a second after the first look, still the old file.
        let soon = start + Duration::from_millis(500);
        assert_eq!(accounts.exists("bob", soon), Ok(false));
        let later = start + Duration::from_secs(2);
        assert_eq!(accounts.exists("bob", later), Ok(true));
        assert_eq!(
            accounts.authenticate("alice", "first", HOME, later),
            Err(AuthenticationError::Refused),
            "a remembered login must not outlive a password change"
        );
        assert!(accounts.authenticate("alice", "second", HOME, later).is_ok());

        // A broken version is refused and the table before it kept.
        file.replace("alice:{ARGON2ID}$argon2id$broken\n");
        let broken = start + Duration::from_secs(4);
        assert_eq!(accounts.count(broken), Ok(2));
        assert!(accounts.authenticate("bob", "bob", HOME, broken).is_ok());
        // The file vanishing keeps it too.
        std::fs::remove_file(&file.path).unwrap();
        assert_eq!(accounts.count(start + Duration::from_secs(6)), Ok(2));
        // Fixed again: read again.
        file.replace(&format!("carol:{}\n", cheap_hash(Scheme::BlfCrypt, "carol")));
        let fixed = start + Duration::from_secs(8);
        assert_eq!(accounts.count(fixed), Ok(1));
        assert!(accounts.authenticate("carol", "carol", HOME, fixed).is_ok());
        assert_eq!(accounts.exists("alice", fixed), Ok(false));
    }

    #[test]
    fn a_file_that_never_read_well_makes_logins_unavailable_until_it_does() {
        let file = File::new("alice:{PLAIN}x\n");
        let accounts = Accounts::new(&file.path, RateLimits::default());
        let start = Instant::now();
        assert_eq!(
            accounts.authenticate("alice", "x", HOME, start),
            Err(AuthenticationError::Unavailable)
        );
        assert_eq!(accounts.exists("alice", start), Err(AccountsUnavailable));
        file.replace(&format!("alice:{}\n", cheap_hash(Scheme::Sha512Crypt, "x")));
        assert!(accounts
            .authenticate("alice", "x", HOME, start + Duration::from_secs(1))
            .is_ok());
    }

    #[test]
    fn unknown_accounts_and_wrong_passwords_get_the_same_answer_after_the_same_work() {
        let file = File::new(&format!("alice:{}\n", cheap_hash(Scheme::Argon2id, "right")));
        let accounts = open(&file);
        let now = Instant::now();
        let before = accounts.verifications();
        let wrong = accounts.authenticate("alice", "wrong", HOME, now);
        assert_eq!(accounts.verifications(), before + 1);
        let unknown = accounts.authenticate("mallory", "wrong", ELSEWHERE, now);
        assert_eq!(
            accounts.verifications(),
            before + 2,
            "an unknown account computes a hash too"
        );
        assert_eq!(wrong, unknown);
        assert_eq!(wrong, Err(AuthenticationError::Refused));
        assert_eq!(wrong.unwrap_err().to_string(), "unknown account or wrong password");
        // The dummy has the scheme and costs of the file's accounts.
        let table = lock(&accounts.loaded).table.clone().unwrap();
        let dummy = table.dummy().unwrap();
        assert_eq!(dummy.scheme, Scheme::Argon2id);
        assert!(dummy.encoded.contains("m=256,t=1,p=1"), "{}", dummy.encoded);
        assert!(!dummy.verify("right"));
    }

    #[test]
    fn failed_logins_are_throttled_per_account_and_per_address() {
        let limits = RateLimits {
            account_burst: 3,
            account_refill: Duration::from_secs(60),
            address_burst: 5,
            address_refill: Duration::from_secs(10),
        };
        let file = File::new(&format!(
            "alice:{}\nbob:{}\ncarol:{}\n",
            cheap_hash(Scheme::Sha256Crypt, "alice"),
            cheap_hash(Scheme::Sha256Crypt, "bob"),
            cheap_hash(Scheme::Sha256Crypt, "carol")
        ));
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = NodeMetrics::register(&mut registry);
        let accounts = Accounts::open(&file.path, limits)
            .unwrap()
            .with_metrics(metrics.clone());
        let start = Instant::now();
        let addresses: Vec<IpAddr> = (1..=4).map(|last| IpAddr::V4(Ipv4Addr::new(10, 1, 1, last))).collect();
        // Three failures on alice from different addresses spend alice's bucket.
        for address in &addresses[..3] {
            assert_eq!(
                accounts.authenticate("alice", "guess", *address, start),
                Err(AuthenticationError::Refused)
            );
        }
        let verifications = accounts.verifications();
        // Throttled now, even with the right password, and without computing a hash.
        match accounts.authenticate("alice", "alice", addresses[3], start) {
            Err(AuthenticationError::Throttled { retry_after }) => assert_eq!(retry_after, Duration::from_secs(60)),
            other => panic!("expected Throttled, got {other:?}"),
        }
        assert_eq!(accounts.verifications(), verifications);
        // Bob is not affected.
        assert!(accounts.authenticate("bob", "bob", addresses[3], start).is_ok());
        // A refill period later alice has one token again.
        let later = start + Duration::from_secs(60);
        assert!(accounts.authenticate("alice", "alice", addresses[3], later).is_ok());

        // Five failures from one address, on different names, spend the address's bucket.
        for index in 0..5 {
            assert_eq!(
                accounts.authenticate(&format!("nobody{index}"), "guess", ELSEWHERE, later),
                Err(AuthenticationError::Refused)
            );
        }
        match accounts.authenticate("carol", "carol", ELSEWHERE, later) {
            Err(AuthenticationError::Throttled { retry_after }) => assert_eq!(retry_after, Duration::from_secs(10)),
            other => panic!("expected Throttled, got {other:?}"),
        }
        // A login remembered from a success minutes ago is no guess: it still passes, so an
        // attack does not lock out clients already logged in.
        assert!(accounts.authenticate("bob", "bob", ELSEWHERE, later).is_ok());
        assert!(accounts.authenticate("carol", "carol", HOME, later).is_ok());
        assert!(accounts
            .authenticate("alice", "alice", ELSEWHERE, later + Duration::from_secs(10))
            .is_ok());
        assert_eq!(metrics.login_failures.get(), 8);
        assert_eq!(metrics.login_throttled.get(), 2);
    }

    #[test]
    fn an_ipv6_site_counts_as_one_address() {
        let one: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let other: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(address_key(one), address_key(other));
        assert_ne!(address_key(one), address_key("2001:db8:1:3::1".parse().unwrap()));
        assert_eq!(address_key(mapped), HOME);
    }

    #[test]
    fn a_successful_login_is_remembered_without_another_hash() {
        let file = File::new(&format!("alice:{}\n", cheap_hash(Scheme::BlfCrypt, "right")));
        let accounts = open(&file);
        let now = Instant::now();
        assert!(accounts.authenticate("alice", "right", HOME, now).is_ok());
        let verifications = accounts.verifications();
        assert!(accounts
            .authenticate("alice", "right", HOME, now + Duration::from_millis(1))
            .is_ok());
        assert_eq!(accounts.verifications(), verifications);
        // A wrong password is still checked, and refused.
        assert_eq!(
            accounts.authenticate("alice", "wrong", HOME, now),
            Err(AuthenticationError::Refused)
        );
        assert_eq!(accounts.verifications(), verifications + 1);
        // Forgotten after its lifetime.
        assert!(accounts
            .authenticate("alice", "right", HOME, now + SUCCESS_CACHE_LIFETIME)
            .is_ok());
        assert_eq!(accounts.verifications(), verifications + 2);
    }

    /// A log sink for one test.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            lock(&self.0).extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn no_hash_or_password_reaches_a_log_or_a_debug_print() {
        let hash = cheap_hash(Scheme::Sha512Crypt, "the password");
        let hash_tail = hash.rsplit('$').next().unwrap().to_owned();
        let file = File::new(&format!("alice:{hash}\n"));
        let captured = Captured::default();
        let sink = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .finish();
        let accounts = open(&file);
        let start = Instant::now();
        tracing::subscriber::with_default(subscriber, || {
            assert!(accounts.count(start).is_ok());
            assert!(accounts.authenticate("alice", "the password", HOME, start).is_ok());
            for _ in 0..12 {
                let _ = accounts.authenticate("alice", "the password?", HOME, start);
            }
            let _ = accounts.authenticate("nobody", "the password", HOME, start);
            // A reload that fails on a line holding a hash, then one that succeeds.
            file.replace(&format!("alice {hash}\n"));
            let _ = accounts.count(start + Duration::from_secs(2));
            file.replace(&format!("alice:{hash}\nbob:{hash}\n"));
            let _ = accounts.count(start + Duration::from_secs(4));
        });
        let logs = String::from_utf8(lock(&captured.0).clone()).unwrap();
        assert!(logs.contains("login failed"), "{logs}");
        assert!(logs.contains("login throttled"), "{logs}");
        assert!(logs.contains("line 1"), "{logs}");
        assert!(logs.contains("reloaded the accounts file"), "{logs}");
        let loaded = format!("{:?}", lock(&accounts.loaded));
        let debug = format!(
            "{accounts:?} {loaded} {:?} {:?}",
            Password::new("the password"),
            StoredHash::parse(Scheme::Sha512Crypt, hash.trim_start_matches("{SHA512-CRYPT}")).unwrap()
        );
        for shown in [&logs, &debug] {
            assert!(!shown.contains(&hash_tail), "a hash leaked: {shown}");
            assert!(!shown.contains("the password"), "a password leaked: {shown}");
        }
    }

    #[test]
    fn long_and_odd_logins_are_refused_without_trouble() {
        let file = File::new(&format!("alice:{}\n", cheap_hash(Scheme::Argon2i, "a")));
        let accounts = open(&file);
        let now = Instant::now();
        let long = "x".repeat(100_000);
        assert_eq!(
            accounts.authenticate(&long, "a", HOME, now),
            Err(AuthenticationError::Refused)
        );
        assert_eq!(
            accounts.authenticate("", "", ELSEWHERE, now),
            Err(AuthenticationError::Refused)
        );
        assert_eq!(
            accounts.authenticate("alice\n", "a", IpAddr::V4(Ipv4Addr::LOCALHOST), now),
            Err(AuthenticationError::Refused)
        );
    }
}
