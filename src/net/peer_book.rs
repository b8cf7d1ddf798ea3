//! The peers a node has been connected to, kept on disk beside the store, so that a node whose
//! only bootstrap peer is gone (or that comes back on a new address) still finds the rest of the
//! cluster after a restart.
//!
//! One line per peer: the unix seconds it was last connected, a space, and a dialable multiaddr
//! ending in `/p2p/<peer id>`. Lines that do not parse are skipped (the file is a cache, never a
//! source of truth), entries older than [`MAX_AGE`] are dropped (a wiped node comes back with a
//! new peer id; its old one should not be dialed for ever), and at most [`MAX_ENTRIES`] are kept,
//! newest first.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};

/// The most peers kept.
pub const MAX_ENTRIES: usize = 256;
/// Peers not connected for this long are forgotten.
pub const MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// The largest file read; a bigger one is read up to here.
const MAX_FILE_BYTES: u64 = 1 << 20;

/// Where each known peer was last seen, and when (unix seconds).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerBook {
    entries: HashMap<PeerId, (u64, Multiaddr)>,
}

impl PeerBook {
    /// Parses the file's text; `now` (unix seconds) decides what is too old.
    pub fn parse(text: &str, now: u64) -> PeerBook {
        let mut book = PeerBook::default();
        for line in text.lines() {
            let Some((seconds, address)) = line.trim().split_once(' ') else {
                continue;
            };
            let (Ok(seconds), Ok(address)) = (seconds.parse::<u64>(), address.trim().parse::<Multiaddr>()) else {
                continue;
            };
            let Some(Protocol::P2p(peer)) = address.iter().last() else {
                continue;
            };
            let mut plain = address.clone();
            plain.pop();
            book.note(peer, plain, seconds.min(now));
        }
        book.forget_older_than(now);
        book
    }

    /// Reads the file at `path`; a missing or unreadable file is an empty book.
    pub fn load(path: &Path, now: u64) -> PeerBook {
        use std::io::Read;
        let mut text = String::new();
        let read = std::fs::File::open(path).and_then(|file| file.take(MAX_FILE_BYTES).read_to_string(&mut text));
        match read {
            Ok(_) => PeerBook::parse(&text, now),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => PeerBook::default(),
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "could not read the peer book; starting without it");
                PeerBook::default()
            }
        }
    }

    /// Records that `peer` was connected at `address` at `seconds`.
    pub fn note(&mut self, peer: PeerId, address: Multiaddr, seconds: u64) {
        match self.entries.get(&peer) {
            Some((known, _)) if *known > seconds => {}
            _ => {
                self.entries.insert(peer, (seconds, address));
            }
        }
    }

    fn forget_older_than(&mut self, now: u64) {
        let oldest = now.saturating_sub(MAX_AGE.as_secs());
        self.entries.retain(|_, (seconds, _)| *seconds >= oldest);
        if self.entries.len() > MAX_ENTRIES {
            let mut ages: Vec<u64> = self.entries.values().map(|(seconds, _)| *seconds).collect();
            ages.sort_unstable_by(|a, b| b.cmp(a));
            let cut = ages[MAX_ENTRIES - 1];
            self.entries.retain(|_, (seconds, _)| *seconds >= cut);
            let mut extra = self.entries.len().saturating_sub(MAX_ENTRIES);
            self.entries.retain(|_, (seconds, _)| {
                let drop = extra > 0 && *seconds == cut;
                if drop {
                    extra -= 1;
                }
                !drop
            });
        }
    }

    /// Every entry as a dialable address ending in `/p2p/<peer id>`.
    pub fn addresses(&self) -> Vec<Multiaddr> {
        let mut entries: Vec<_> = self.entries.iter().collect();
        entries.sort_by(|a, b| b.1 .0.cmp(&a.1 .0).then(a.0.cmp(b.0)));
        entries
            .into_iter()
            .map(|(peer, (_, address))| address.clone().with(Protocol::P2p(*peer)))
            .collect()
    }

    /// The file's text, newest first, after dropping what is too old.
    pub fn render(&mut self, now: u64) -> String {
        self.forget_older_than(now);
        let mut entries: Vec<_> = self.entries.iter().collect();
        entries.sort_by(|a, b| b.1 .0.cmp(&a.1 .0).then(a.0.cmp(b.0)));
        let mut text = String::new();
        for (peer, (seconds, address)) in entries {
            text.push_str(&format!("{seconds} {}\n", address.clone().with(Protocol::P2p(*peer))));
        }
        text
    }

    /// Writes the book to `path` through a temporary file and a rename, so that a crash leaves
    /// the old book or the new one, never half of one.
    pub fn save(&mut self, path: &Path, now: u64) -> std::io::Result<()> {
        let text = self.render(now);
        let temporary = path.with_extension("tmp");
        {
            let mut file = std::fs::File::create(&temporary)?;
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
        }
        std::fs::rename(&temporary, path)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> PeerId {
        libp2p::identity::Keypair::generate_ed25519().public().to_peer_id()
    }

    #[test]
    fn a_book_survives_its_text_and_skips_what_does_not_parse() {
        let (first, second) = (peer(), peer());
        let mut book = PeerBook::default();
        book.note(first, "/ip4/10.0.0.1/tcp/4801".parse().unwrap(), 1_000);
        book.note(second, "/ip4/10.0.0.2/tcp/4801".parse().unwrap(), 2_000);
        // An older sighting never replaces a newer one.
        book.note(second, "/ip4/10.9.9.9/tcp/1".parse().unwrap(), 1_500);
        let text = book.render(3_000);
        let garbage = format!("{text}not a line\n12 /ip4/1.2.3.4/tcp/5\nx /ip4/1.2.3.4/tcp/5/p2p/{first}\n");
        let read = PeerBook::parse(&garbage, 3_000);
        assert_eq!(read, book);
        assert_eq!(
            read.addresses(),
            vec![
                format!("/ip4/10.0.0.2/tcp/4801/p2p/{second}")
                    .parse::<Multiaddr>()
                    .unwrap(),
                format!("/ip4/10.0.0.1/tcp/4801/p2p/{first}")
                    .parse::<Multiaddr>()
                    .unwrap(),
            ]
        );
    }

    #[test]
    fn old_entries_are_forgotten_and_the_book_is_bounded() {
        let now = MAX_AGE.as_secs() + 10_000;
        let mut book = PeerBook::default();
        let stale = peer();
        book.note(stale, "/ip4/10.0.0.1/tcp/1".parse().unwrap(), 5_000);
        for index in 0..(MAX_ENTRIES + 10) {
            book.note(peer(), "/ip4/10.0.0.2/tcp/1".parse().unwrap(), now - index as u64);
        }
        let read = PeerBook::parse(&book.render(now), now);
        assert_eq!(read.len(), MAX_ENTRIES);
        assert!(!read
            .addresses()
            .iter()
            .any(|address| address.to_string().contains(&stale.to_string())));
    }

    #[test]
    fn saving_and_loading_round_trips_and_a_missing_file_is_empty() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("peers");
        assert!(PeerBook::load(&path, 100).is_empty());
        let mut book = PeerBook::default();
        book.note(peer(), "/ip4/127.0.0.1/tcp/4801".parse().unwrap(), 90);
        book.save(&path, 100).unwrap();
        assert_eq!(PeerBook::load(&path, 100), book);
    }
}
