//! The data model: message IDs, node IDs, mailbox keys, blob hashes, flags and message records.
//!
//! Everything here is plain data with validation. Nothing reads the clock or a random source:
//! callers pass time and randomness in, so the same inputs always give the same values.
//!
//! A message ID is 128 bits ordered by time: the millisecond at which the accepting node took the
//! append sits in the high 48 bits and 80 random bits follow (the ULID layout). Printed, it is the
//! 26-character Crockford base32 form, which is URL-safe and sorts like the number.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a value from outside was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    #[error("invalid message id {0:?}: expected 26 Crockford base32 characters")]
    InvalidMessageId(String),
    #[error("invalid blob hash {0:?}: expected 64 hex characters")]
    InvalidBlobHash(String),
    #[error("invalid {field}: {reason}")]
    InvalidMailboxKey { field: &'static str, reason: &'static str },
    #[error("invalid flag {0:?}: use \\Seen, \\Answered, \\Flagged, \\Deleted, \\Draft or a keyword of 1 to 64 printable ASCII characters without spaces, parentheses, braces, quotes, backslashes, '%', '*' or ']'")]
    InvalidFlag(String),
}

/// The most bytes allowed in an account name or a mailbox name.
pub const MAX_NAME_BYTES: usize = 255;
/// The most bytes in a keyword flag.
pub const MAX_KEYWORD_BYTES: usize = 64;

// ---------------------------------------------------------------------------------------------
// Message IDs
// ---------------------------------------------------------------------------------------------

/// A 128-bit, time-ordered message identifier (48-bit milliseconds, then 80 random bits).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct MessageId(pub u128);

const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
const RANDOM_BITS: u32 = 80;
const MILLIS_MASK: u64 = (1 << 48) - 1;

impl MessageId {
    /// Builds an ID from a millisecond timestamp (low 48 bits kept) and random bits (low 80 kept).
    pub fn from_parts(millis: u64, random: u128) -> Self {
        let random_mask = (1u128 << RANDOM_BITS) - 1;
        MessageId((u128::from(millis & MILLIS_MASK) << RANDOM_BITS) | (random & random_mask))
    }

    /// The millisecond timestamp in the ID's high bits.
    pub fn millis(self) -> u64 {
        (self.0 >> RANDOM_BITS) as u64
    }

    /// The ID as 16 big-endian bytes: byte order equals numeric order.
    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }

    /// The ID from 16 big-endian bytes.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        MessageId(u128::from_be_bytes(bytes))
    }

    /// The ID from a slice that must hold exactly 16 bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let array: [u8; 16] = bytes.try_into().ok()?;
        Some(Self::from_bytes(array))
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = [0u8; 26];
        let mut value = self.0;
        for slot in text.iter_mut().rev() {
            *slot = CROCKFORD[(value & 31) as usize];
            value >>= 5;
        }
        // 26 * 5 = 130 bits: the first character carries only the top 3 bits.
        formatter.write_str(std::str::from_utf8(&text).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "MessageId({self})")
    }
}

impl FromStr for MessageId {
    type Err = ModelError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || ModelError::InvalidMessageId(text.chars().take(40).collect());
        if text.len() != 26 {
            return Err(invalid());
        }
        let mut value: u128 = 0;
        for (index, character) in text.bytes().enumerate() {
            let digit = match character.to_ascii_uppercase() {
                b'O' => 0,
                b'I' | b'L' => 1,
                upper => CROCKFORD.iter().position(|&c| c == upper).ok_or_else(invalid)? as u128,
            };
            if index == 0 && digit > 7 {
                return Err(invalid());
            }
            value = (value << 5) | digit;
        }
        Ok(MessageId(value))
    }
}

impl Serialize for MessageId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.to_bytes())
    }
}

impl<'de> Deserialize<'de> for MessageId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let bytes: FixedBytes<16> = Deserialize::deserialize(deserializer)?;
        Ok(MessageId::from_bytes(bytes.0))
    }
}

/// Makes message IDs for one node: time-ordered, and strictly increasing even when the wall clock
/// stalls or steps back, so an ID is never reused by the node that made it.
#[derive(Debug, Clone, Default)]
pub struct MessageIdGenerator {
    last: MessageId,
}

impl MessageIdGenerator {
    /// A generator that will only issue IDs above `last`.
    pub fn after(last: MessageId) -> Self {
        MessageIdGenerator { last }
    }

    /// The next ID for an append accepted at `now_millis`, using `random` for the low bits.
    pub fn next(&mut self, now_millis: u64, random: u128) -> MessageId {
        let candidate = MessageId::from_parts(now_millis, random);
        let id = if candidate > self.last {
            candidate
        } else {
            MessageId(self.last.0.wrapping_add(1 + (random & 0xFFFF)))
        };
        self.last = id;
        id
    }

    /// The last ID issued.
    pub fn last(&self) -> MessageId {
        self.last
    }
}

// ---------------------------------------------------------------------------------------------
// Fixed-size byte helpers
// ---------------------------------------------------------------------------------------------

/// A fixed-size byte array that serializes as a CBOR byte string.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FixedBytes<const N: usize>(pub [u8; N]);

impl<const N: usize> fmt::Debug for FixedBytes<N> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in &self.0 {
            write!(formatter, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl<const N: usize> Serialize for FixedBytes<N> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de, const N: usize> Deserialize<'de> for FixedBytes<N> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor<const M: usize>;
        impl<const M: usize> serde::de::Visitor<'_> for Visitor<M> {
            type Value = FixedBytes<M>;
            fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(formatter, "a byte string of {M} bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<Self::Value, E> {
                let array: [u8; M] = bytes.try_into().map_err(|_| E::invalid_length(bytes.len(), &self))?;
                Ok(FixedBytes(array))
            }
        }
        deserializer.deserialize_bytes(Visitor::<N>)
    }
}

// ---------------------------------------------------------------------------------------------
// Node IDs and blob hashes
// ---------------------------------------------------------------------------------------------

/// A node's identity inside stamps: 64 bits derived from its libp2p peer ID.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct NodeId(pub u64);

impl NodeId {
    /// The node ID for a peer's identity bytes (e.g. a libp2p PeerId's bytes).
    pub fn from_identity(identity: &[u8]) -> Self {
        let hash = blake3::hash(identity);
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&hash.as_bytes()[..8]);
        NodeId(u64::from_be_bytes(bytes))
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{:016x}", self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "NodeId({self})")
    }
}

/// The blake3 hash of a message's raw RFC 5322 bytes: the blob's address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BlobHash(pub FixedBytes<32>);

impl BlobHash {
    /// Hashes raw message bytes.
    pub fn of(bytes: &[u8]) -> Self {
        BlobHash(FixedBytes(*blake3::hash(bytes).as_bytes()))
    }

    /// The 32 hash bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0 .0
    }
}

impl fmt::Display for BlobHash {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.as_bytes() {
            write!(formatter, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for BlobHash {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "BlobHash({self})")
    }
}

impl FromStr for BlobHash {
    type Err = ModelError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || ModelError::InvalidBlobHash(text.chars().take(80).collect());
        if text.len() != 64 || !text.is_ascii() {
            return Err(invalid());
        }
        let mut bytes = [0u8; 32];
        for (index, slot) in bytes.iter_mut().enumerate() {
            *slot = u8::from_str_radix(&text[index * 2..index * 2 + 2], 16).map_err(|_| invalid())?;
        }
        Ok(BlobHash(FixedBytes(bytes)))
    }
}

// ---------------------------------------------------------------------------------------------
// Mailbox keys
// ---------------------------------------------------------------------------------------------

/// Which mailbox: an account and a mailbox name, both validated UTF-8.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MailboxKey {
    account: String,
    mailbox: String,
}

/// A mailbox's fixed 128-bit handle: the first 16 bytes of blake3 over its key.
/// It places the mailbox in the node-level directory tree and prefixes its keys on disk.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct MailboxId(pub u128);

impl MailboxId {
    /// 16 big-endian bytes.
    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }

    /// A new mailbox's ID, laid out like a message ID: the creating node's millisecond, then 80
    /// random bits, so two sites never make the same one.
    pub fn from_parts(millis: u64, random: u128) -> Self {
        MailboxId(MessageId::from_parts(millis, random).0)
    }
}

/// Printed like a message ID: 26 Crockford base32 characters (JMAP and URL safe).
impl fmt::Display for MailboxId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&MessageId(self.0), formatter)
    }
}

impl FromStr for MailboxId {
    type Err = ModelError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        text.parse::<MessageId>().map(|id| MailboxId(id.0))
    }
}

impl Serialize for MailboxId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.to_bytes())
    }
}

impl<'de> Deserialize<'de> for MailboxId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let bytes: FixedBytes<16> = Deserialize::deserialize(deserializer)?;
        Ok(MailboxId(u128::from_be_bytes(bytes.0)))
    }
}

fn validate_name(field: &'static str, value: &str) -> Result<(), ModelError> {
    let invalid = |reason| ModelError::InvalidMailboxKey { field, reason };
    if value.is_empty() {
        return Err(invalid("must not be empty"));
    }
    if value.len() > MAX_NAME_BYTES {
        return Err(invalid("must be at most 255 bytes"));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid("must not contain control characters"));
    }
    if value.trim() != value {
        return Err(invalid("must not start or end with white space"));
    }
    Ok(())
}

/// The replicated container of an account's emails: one trie per account, so a move between
/// mailboxes is a register change inside one trie. Its key is `(account, EMAILS_CONTAINER)`.
pub const EMAILS_CONTAINER: &str = "#emails";
/// The replicated container of an account's mailbox records: each write to a mailbox (create,
/// rename, delete, role, subscription) is one immutable snapshot record there, whose blob is the
/// mailbox's state; every node folds the snapshots with [`crate::mailbox::merge`].
pub const MAILBOXES_CONTAINER: &str = "#mailboxes";

impl MailboxKey {
    /// The container of an account's emails.
    pub fn emails(account: &str) -> Result<Self, ModelError> {
        MailboxKey::new(account, EMAILS_CONTAINER)
    }

    /// The container of an account's mailbox records.
    pub fn mailboxes(account: &str) -> Result<Self, ModelError> {
        MailboxKey::new(account, MAILBOXES_CONTAINER)
    }

    /// Whether this is a container of mailbox records.
    pub fn holds_mailboxes(&self) -> bool {
        self.mailbox == MAILBOXES_CONTAINER
    }

    /// A validated key. Names are non-empty, at most 255 bytes, without control characters and
    /// without leading or trailing white space. "Archive/2026" is a valid mailbox name.
    pub fn new(account: &str, mailbox: &str) -> Result<Self, ModelError> {
        validate_name("account", account)?;
        validate_name("mailbox", mailbox)?;
        Ok(MailboxKey {
            account: account.to_owned(),
            mailbox: mailbox.to_owned(),
        })
    }

    /// Validates a key that came from outside (e.g. decoded from the wire).
    pub fn validate(&self) -> Result<(), ModelError> {
        validate_name("account", &self.account)?;
        validate_name("mailbox", &self.mailbox)
    }

    /// The account name.
    pub fn account(&self) -> &str {
        &self.account
    }

    /// The mailbox name.
    pub fn mailbox(&self) -> &str {
        &self.mailbox
    }

    /// The mailbox's 128-bit handle.
    pub fn id(&self) -> MailboxId {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"mailmesh mailbox key\0");
        hasher.update(&(self.account.len() as u64).to_be_bytes());
        hasher.update(self.account.as_bytes());
        hasher.update(self.mailbox.as_bytes());
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
        MailboxId(u128::from_be_bytes(bytes))
    }
}

impl fmt::Debug for MailboxKey {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{:?}/{:?}", self.account, self.mailbox)
    }
}

// ---------------------------------------------------------------------------------------------
// Flags and stamps
// ---------------------------------------------------------------------------------------------

/// An IMAP flag: one of the five system flags or a keyword.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Flag {
    Seen,
    Answered,
    Flagged,
    Deleted,
    Draft,
    Keyword(String),
}

impl Flag {
    /// The flag's IMAP spelling.
    pub fn as_str(&self) -> &str {
        match self {
            Flag::Seen => "\\Seen",
            Flag::Answered => "\\Answered",
            Flag::Flagged => "\\Flagged",
            Flag::Deleted => "\\Deleted",
            Flag::Draft => "\\Draft",
            Flag::Keyword(keyword) => keyword,
        }
    }
}

impl FromStr for Flag {
    type Err = ModelError;

    /// System flags are matched without regard to case; keywords are kept as written and must be
    /// IMAP atoms of at most 64 bytes.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || ModelError::InvalidFlag(text.chars().take(80).collect());
        if let Some(name) = text.strip_prefix('\\') {
            return match name.to_ascii_lowercase().as_str() {
                "seen" => Ok(Flag::Seen),
                "answered" => Ok(Flag::Answered),
                "flagged" => Ok(Flag::Flagged),
                "deleted" => Ok(Flag::Deleted),
                "draft" => Ok(Flag::Draft),
                _ => Err(invalid()),
            };
        }
        let atom_character = |byte: u8| {
            byte.is_ascii_graphic() && !matches!(byte, b'(' | b')' | b'{' | b'%' | b'*' | b'"' | b'\\' | b']')
        };
        if text.is_empty() || text.len() > MAX_KEYWORD_BYTES || !text.bytes().all(atom_character) {
            return Err(invalid());
        }
        Ok(Flag::Keyword(text.to_owned()))
    }
}

impl fmt::Display for Flag {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

impl fmt::Debug for Flag {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "Flag({})", self.as_str())
    }
}

impl Serialize for Flag {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Flag {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text: std::borrow::Cow<'de, str> = Deserialize::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// When and by whom a change was made: a Lamport (hybrid logical) time and the node that made it.
/// Stamps are totally ordered: time first, node ID breaks ties.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default, Serialize, Deserialize)]
pub struct Stamp {
    pub time: u64,
    pub node: NodeId,
}

/// A last-writer-wins register for one flag: whether it is set, and the stamp of that decision.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub struct FlagRegister {
    pub set: bool,
    pub stamp: Stamp,
}

// ---------------------------------------------------------------------------------------------
// Records
// ---------------------------------------------------------------------------------------------

/// One message in one mailbox: its immutable facts plus its mutable state (tombstone and flags).
///
/// The immutable part (id, blob, size, received time, origin) is fixed by the node that accepted
/// the append. The mutable part merges as a CRDT: see [`crate::crdt`].
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct MessageRecord {
    pub id: MessageId,
    pub blob: BlobHash,
    pub size: u64,
    /// Milliseconds since the Unix epoch at which the accepting node received the message.
    pub received_millis: u64,
    pub origin: NodeId,
    /// The origin's clock time when it accepted the append: with `origin`, the creation's stamp
    /// ([`MessageRecord::created_stamp`]), its place in the account's change feed
    /// ([`crate::changes`]). Only the time travels: the node is always `origin`.
    pub created: u64,
    /// Set once the message is expunged; the stamp of the expunge. Never cleared.
    pub expunged: Option<Stamp>,
    pub flags: BTreeMap<Flag, FlagRegister>,
    /// The mailbox the email is in: a last-writer-wins register, so a move keeps the ID. Its
    /// stamp is the creation stamp until the first move. In a container of mailbox records (see
    /// [`MAILBOXES_CONTAINER`]) it is unused and stays at [`MailboxId`] 0.
    pub location: crate::mailbox::Location,
}

impl MessageRecord {
    /// A fresh, live record with no flags, created at the start of its ID's millisecond (the
    /// store stamps appends with its clock instead, see [`MessageRecord::created`]).
    pub fn new(id: MessageId, blob: BlobHash, size: u64, received_millis: u64, origin: NodeId) -> Self {
        MessageRecord {
            id,
            blob,
            size,
            received_millis,
            origin,
            created: crate::crdt::physical_time(id.millis()),
            expunged: None,
            flags: BTreeMap::new(),
            location: crate::mailbox::Location {
                mailbox: MailboxId(0),
                stamp: Stamp {
                    time: crate::crdt::physical_time(id.millis()),
                    node: origin,
                },
            },
        }
    }

    /// Puts a new record in `mailbox`, stamped with its creation (call after setting `created`).
    pub fn place_in(&mut self, mailbox: MailboxId) {
        self.location = crate::mailbox::Location {
            mailbox,
            stamp: self.created_stamp(),
        };
    }

    /// Whether the record was moved since its creation.
    pub fn was_moved(&self) -> bool {
        self.location.stamp != self.created_stamp()
    }

    /// Whether the message has not been expunged.
    pub fn is_live(&self) -> bool {
        self.expunged.is_none()
    }

    /// Whether a flag is currently set.
    pub fn has_flag(&self, flag: &Flag) -> bool {
        self.flags.get(flag).is_some_and(|register| register.set)
    }

    /// The flags currently set, sorted.
    pub fn set_flags(&self) -> Vec<&Flag> {
        self.flags
            .iter()
            .filter(|(_, register)| register.set)
            .map(|(flag, _)| flag)
            .collect()
    }

    /// The stamp of the append that created the record.
    pub fn created_stamp(&self) -> Stamp {
        Stamp {
            time: self.created,
            node: self.origin,
        }
    }

    /// Per node, the latest time that node changed the record (its creation, a flag, the
    /// expunge): the record's entries in the change feed, one per origin.
    pub fn stamps_by_origin(&self) -> BTreeMap<NodeId, u64> {
        let mut latest: BTreeMap<NodeId, u64> = BTreeMap::new();
        let stamps = std::iter::once(self.created_stamp())
            .chain(self.flags.values().map(|register| register.stamp))
            .chain(self.expunged)
            .chain(std::iter::once(self.location.stamp));
        for stamp in stamps {
            let entry = latest.entry(stamp.node).or_insert(0);
            *entry = (*entry).max(stamp.time);
        }
        latest
    }

    /// The latest stamp anywhere in the record (creation, flags, tombstone and location).
    pub fn latest_stamp(&self) -> Option<Stamp> {
        self.flags
            .values()
            .map(|register| register.stamp)
            .chain(self.expunged)
            .chain(std::iter::once(self.created_stamp()))
            .chain(std::iter::once(self.location.stamp))
            .max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_id_text_round_trips_and_sorts_like_the_number() {
        let ids = [
            MessageId(0),
            MessageId::from_parts(1_767_225_600_000, 12345),
            MessageId::from_parts(1_767_225_600_001, 0),
            MessageId(u128::MAX),
        ];
        let texts: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
        for (id, text) in ids.iter().zip(&texts) {
            assert_eq!(text.len(), 26);
            assert_eq!(&text.parse::<MessageId>().unwrap(), id);
        }
        let mut sorted = texts.clone();
        sorted.sort();
        assert_eq!(sorted, texts);
        assert_eq!(ids[1].millis(), 1_767_225_600_000);
    }

    #[test]
    fn bad_message_ids_are_refused() {
        for text in [
            "",
            "short",
            "8ZZZZZZZZZZZZZZZZZZZZZZZZZ",
            "0000000000000000000000000U",
            "ü0000000000000000000000000",
        ] {
            assert!(text.parse::<MessageId>().is_err(), "{text:?} should fail");
        }
    }

    #[test]
    fn generator_never_repeats_even_when_time_steps_back() {
        let mut generator = MessageIdGenerator::default();
        let first = generator.next(1000, 5);
        let second = generator.next(999, 3);
        let third = generator.next(1000, 0);
        assert!(first < second && second < third);
    }

    #[test]
    fn mailbox_keys_are_validated() {
        assert!(MailboxKey::new("alice@example.org", "Archive/2026").is_ok());
        assert!(MailboxKey::new("", "INBOX").is_err());
        assert!(MailboxKey::new("alice", "").is_err());
        assert!(MailboxKey::new("alice", "IN\u{7}BOX").is_err());
        assert!(MailboxKey::new("alice", &"x".repeat(256)).is_err());
        assert_ne!(
            MailboxKey::new("a", "bc").unwrap().id(),
            MailboxKey::new("ab", "c").unwrap().id()
        );
    }

    #[test]
    fn flags_parse_and_refuse_bad_names() {
        assert_eq!("\\seen".parse::<Flag>().unwrap(), Flag::Seen);
        assert_eq!(
            "$Forwarded".parse::<Flag>().unwrap(),
            Flag::Keyword("$Forwarded".into())
        );
        for bad in ["", "\\Recent", "two words", "a(b", &"k".repeat(65), "é"] {
            assert!(bad.parse::<Flag>().is_err(), "{bad:?} should fail");
        }
    }

    #[test]
    fn blob_hash_text_round_trips() {
        let hash = BlobHash::of(b"Subject: hi\r\n\r\nhello\r\n");
        assert_eq!(hash.to_string().parse::<BlobHash>().unwrap(), hash);
        assert!("zz".parse::<BlobHash>().is_err());
    }

    #[test]
    fn a_record_lists_each_origin_once_at_the_latest_time_it_changed_the_record() {
        let mut record = MessageRecord::new(MessageId(7), BlobHash::of(b"raw"), 3, 4, NodeId(1));
        record.created = 100;
        assert_eq!(record.stamps_by_origin(), BTreeMap::from([(NodeId(1), 100)]));
        let register = |time, node| FlagRegister {
            set: true,
            stamp: Stamp {
                time,
                node: NodeId(node),
            },
        };
        record.flags.insert(Flag::Seen, register(150, 2));
        record.flags.insert(Flag::Flagged, register(120, 2));
        record.flags.insert(Flag::Draft, register(90, 1));
        record.expunged = Some(Stamp {
            time: 200,
            node: NodeId(3),
        });
        assert_eq!(
            record.stamps_by_origin(),
            BTreeMap::from([(NodeId(1), 100), (NodeId(2), 150), (NodeId(3), 200)])
        );
        assert_eq!(
            record.latest_stamp(),
            Some(Stamp {
                time: 200,
                node: NodeId(3)
            })
        );
    }
}
