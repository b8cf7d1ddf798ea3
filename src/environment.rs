//! Time and randomness, passed in rather than read where they are used, so that a test can drive
//! the mail service and the replication engine with a clock and a random source it controls.
//!
//! The running node uses [`SystemEnvironment`]: the wall clock (shifted by
//! `MAILMESH_CLOCK_OFFSET_MS`, a testing aid to run a node whose clock is wrong, as a
//! misconfigured site's would be) and the operating system's random source.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Where the IO layers get the time of day and random numbers.
pub trait Environment: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_millis(&self) -> u64;
    /// 128 random bits (message IDs, session salts).
    fn random(&self) -> u128;
}

/// The wall clock and the operating system's randomness.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemEnvironment;

impl Environment for SystemEnvironment {
    fn now_millis(&self) -> u64 {
        now_millis()
    }

    fn random(&self) -> u128 {
        rand::random::<u128>()
    }
}

/// The environment a running node uses.
pub fn system() -> Arc<dyn Environment> {
    Arc::new(SystemEnvironment)
}

/// Milliseconds since the Unix epoch, as this node's wall clock reads them, shifted by
/// `MAILMESH_CLOCK_OFFSET_MS` (signed) when it is set.
pub fn now_millis() -> u64 {
    static OFFSET: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    let offset = *OFFSET.get_or_init(|| {
        std::env::var("MAILMESH_CLOCK_OFFSET_MS")
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(0)
    });
    let real = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or(0);
    real.saturating_add_signed(offset)
}
