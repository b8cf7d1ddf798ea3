//! The node-to-node messages: request-response frames and gossip payloads, as versioned CBOR.
//!
//! Reconciliation messages themselves are encoded by [`crate::sync`]; this module wraps them with
//! the space they are about, and adds the pulls (records by ID, records by prefix, blobs, mailbox
//! keys) and the two gossip payloads (a new operation, a node digest). Decoding never trusts a
//! length: frames are bounded by the transport before they get here, every list is checked
//! against a limit, and every key and flag is validated.

use serde::{Deserialize, Serialize};

use crate::model::{BlobHash, MailboxKey, MessageId, MessageRecord, NodeId};
use crate::sync::ByteString;

/// The version of these frames. Version 2: [`Request::FetchRecords`] names the records the asker
/// already holds, and reconciliation replies send no blob of a record the asker holds. Version 5:
/// trie messages of sync version 3 (leaf lists by position, `Tags`), and records as arrays
/// ([`WireRecord`]), not maps with field names. A peer speaking another version is refused (not
/// synced with, not blamed).
pub const WIRE_VERSION: u8 = 5;
/// The most records one response carries.
pub const MAX_RECORDS_PER_RESPONSE: usize = 2_000;
/// The most IDs one fetch names.
pub const MAX_IDS_PER_REQUEST: usize = 4_000;
/// The most blob bytes one response carries.
pub const MAX_BLOB_CHUNK: u32 = 4 * 1024 * 1024;
/// The most mailboxes one [`Request::ReconcileMailboxes`] may open.
pub const MAX_MAILBOXES_PER_BATCH: usize = 64;
/// The length of the salt a [`Request::Sketch`] carries.
pub const SKETCH_SALT_BYTES: usize = 16;

/// Why a frame was refused.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("frame version {0} is not supported (this node speaks {WIRE_VERSION})")]
    UnsupportedVersion(u8),
    #[error("frame exceeds a limit: {0}")]
    LimitExceeded(String),
}

/// Which trie a reconciliation message is about.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireSpace {
    #[serde(rename = "d")]
    Directory,
    #[serde(rename = "m")]
    Mailbox(MailboxKey),
}

/// A request from one node to another.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// One reconciliation message ([`crate::sync::encode`]), in a mailbox with the asker's record
    /// states for the message's `Differ` bits ([`crate::sync::encode_states`]) and, with their
    /// IDs, merged states that hold more than the states the previous reply brought
    /// ([`crate::sync::encode_keyed_states`]).
    #[serde(rename = "reconcile")]
    Reconcile {
        space: WireSpace,
        message: ByteString,
        #[serde(default, skip_serializing_if = "is_empty")]
        states: ByteString,
        #[serde(default, skip_serializing_if = "is_empty")]
        returned: ByteString,
    },
    /// The first reconciliation message of several small mailboxes at once: after a partition
    /// thousands of them differ, and a request each was most of the cost of healing. Answered by
    /// [`Response::ReconciledMailboxes`], one reply per mailbox in the same order; later rounds,
    /// if any, go by [`Request::Reconcile`].
    #[serde(rename = "reconcile_many")]
    ReconcileMailboxes { mailboxes: Vec<MailboxMessage> },
    /// Records by ID: `ids` the asker lacks entirely (their small blobs come inline) and `held`
    /// the asker holds in another state (records only: it has their bytes).
    #[serde(rename = "records")]
    FetchRecords {
        mailbox: MailboxKey,
        ids: Vec<MessageId>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        held: Vec<MessageId>,
    },
    /// Records inside a trie prefix, after an ID (paging), at most `limit`.
    #[serde(rename = "range")]
    FetchRange {
        mailbox: MailboxKey,
        depth: u8,
        bits: ByteString,
        after: Option<MessageId>,
        limit: u32,
    },
    /// Part of a blob by hash: `length` bytes from `offset` (blobs larger than a response are paged).
    #[serde(rename = "blob")]
    FetchBlob { hash: BlobHash, offset: u64, length: u32 },
    /// A record just written on the sender, pushed once to each connected peer (small blobs
    /// inline); not forwarded further, anti-entropy reaches peers that are not connected.
    #[serde(rename = "push")]
    Push {
        mailbox: MailboxKey,
        #[serde(with = "record_on_wire")]
        record: MessageRecord,
        blob: Option<ByteString>,
    },
    /// Mailbox keys for mailbox IDs (from the directory trie), or all keys in a prefix.
    #[serde(rename = "mailboxes")]
    ResolveMailboxes {
        ids: Vec<ByteString>,
        depth: u8,
        bits: ByteString,
    },
    /// One message of a sketch session on a mailbox ([`crate::sketch_session::encode`]: an
    /// opening or a request for more cells), with the asker's 16-byte salt: both sides compute
    /// their cells under the key derived from it and the mailbox ID. Answered by
    /// [`Response::Sketch`], or by [`Response::Reconcile`] when the responder finds trie descent
    /// cheaper (its reply to the opening's trie element).
    #[serde(rename = "sketch")]
    Sketch {
        mailbox: MailboxKey,
        salt: ByteString,
        message: ByteString,
    },
    /// The end of a decoded sketch session: the records the asker lacks entirely (`send`, which
    /// come back with their small blobs), the asker's states of the records both hold in
    /// different states, with their IDs ([`crate::sync::encode_keyed_states`]), and the records
    /// the responder lacks (`you_lack`, which it pulls). Answered by [`Response::SketchSettled`].
    #[serde(rename = "sketch_settle")]
    SketchSettle {
        mailbox: MailboxKey,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        send: Vec<MessageId>,
        #[serde(default, skip_serializing_if = "is_empty")]
        states: ByteString,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        you_lack: Vec<MessageId>,
    },
}

/// The answer to a [`Request`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    #[serde(rename = "reconciled_many")]
    ReconciledMailboxes { replies: Vec<MailboxReply> },
    #[serde(rename = "reconcile")]
    Reconcile {
        message: ByteString,
        /// In a mailbox, the records the reply says the asker lacks (some or all of its `YouLack`
        /// keys), with their small blobs inline: one round trip saved per differing mailbox.
        /// Keys not sent here are pulled as usual.
        #[serde(default, skip_serializing_if = "Vec::is_empty", with = "records_on_wire")]
        records: Vec<MessageRecord>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        blobs: Vec<ByteString>,
        /// This side's record states for the reply's `Differ` bits, in order: both sides hold
        /// those messages, so neither records nor blobs travel for them.
        #[serde(default, skip_serializing_if = "is_empty")]
        states: ByteString,
        /// Merged states that hold more than the states the request brought, each after its
        /// position among them ([`crate::sync::encode_indexed_states`]).
        #[serde(default, skip_serializing_if = "is_empty")]
        returned: ByteString,
    },
    #[serde(rename = "records")]
    Records {
        #[serde(with = "records_on_wire")]
        records: Vec<MessageRecord>,
        more: bool,
        /// Blobs of small live records, inline, so a pull needs no separate blob fetch; each is
        /// checked against its hash on arrival.
        #[serde(default)]
        blobs: Vec<ByteString>,
    },
    /// The requested part of a blob and the blob's total size; `None` when the blob is unknown.
    #[serde(rename = "blob")]
    Blob { bytes: Option<ByteString>, total: u64 },
    #[serde(rename = "mailboxes")]
    Mailboxes { keys: Vec<MailboxKey> },
    /// A push was taken in (or was already known).
    #[serde(rename = "ack")]
    Ack,
    #[serde(rename = "error")]
    Error { message: String },
    /// A sketch session reply ([`crate::sketch_session::encode`]: cells, or a settlement of a
    /// single difference); empty when the replicas are equal. A settlement carries the records it
    /// says the asker lacks, with their small blobs.
    #[serde(rename = "sketch")]
    Sketch {
        message: ByteString,
        #[serde(default, skip_serializing_if = "Vec::is_empty", with = "records_on_wire")]
        records: Vec<MessageRecord>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        blobs: Vec<ByteString>,
    },
    /// The answer to [`Request::SketchSettle`]: some or all of the records asked for (the rest
    /// are pulled as usual), with their small blobs, and the merged states that hold more than
    /// the states the request brought, each after its position among them
    /// ([`crate::sync::encode_indexed_states`]).
    #[serde(rename = "sketch_settled")]
    SketchSettled {
        #[serde(default, skip_serializing_if = "Vec::is_empty", with = "records_on_wire")]
        records: Vec<MessageRecord>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        blobs: Vec<ByteString>,
        #[serde(default, skip_serializing_if = "is_empty")]
        returned: ByteString,
    },
}

/// One mailbox's reconciliation message inside a batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailboxMessage {
    pub mailbox: MailboxKey,
    pub message: ByteString,
}

/// One mailbox's reply inside a batch: as [`Response::Reconcile`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct MailboxReply {
    pub message: ByteString,
    #[serde(default, skip_serializing_if = "Vec::is_empty", with = "records_on_wire")]
    pub records: Vec<MessageRecord>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blobs: Vec<ByteString>,
    #[serde(default, skip_serializing_if = "is_empty")]
    pub states: ByteString,
    #[serde(default, skip_serializing_if = "is_empty")]
    pub returned: ByteString,
}

fn is_empty(bytes: &ByteString) -> bool {
    bytes.0.is_empty()
}

/// What nodes gossip.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Gossip {
    /// A record just written on its origin, pushed at once; small blobs travel inline.
    #[serde(rename = "op")]
    Operation {
        mailbox: MailboxKey,
        #[serde(with = "record_on_wire")]
        record: MessageRecord,
        blob: Option<ByteString>,
    },
    /// A node's digest over all its mailboxes. `sequence` makes each announcement unique, so
    /// gossipsub's duplicate cache does not drop an unchanged digest.
    #[serde(rename = "digest")]
    Digest {
        peer: String,
        name: String,
        sequence: u64,
        digest: ByteString,
        mailboxes: u64,
        addresses: Vec<String>,
        /// The sender was away longer than the tombstone horizon and does not sync.
        #[serde(default)]
        stale: bool,
        /// The sender's hybrid clock when it sent this: every stamp it makes later is greater.
        #[serde(default)]
        clock: u64,
        /// The sender's acknowledged tombstone cut (milliseconds; 0: none).
        #[serde(default)]
        acknowledged_before: u64,
        /// The sender's change-feed frontier (origin, time), read before `digest`: a receiver
        /// whose digest equals `digest` holds all of it and adopts it.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        frontier: Vec<(u64, u64)>,
    },
}

/// A record as it travels: an array, not a map with a name per field (a record with no flags was
/// about 215 bytes as a map, about 120 as this; a heal of 100 new messages sends 100 of them).
/// The mutable part goes in the packing of [`crate::sync::encode_states`], so it is checked by
/// the same decoder as a `Differ`'s states.
#[derive(Serialize, Deserialize)]
struct WireRecord(
    MessageId,
    BlobHash,
    u64, // size
    u64, // received, milliseconds
    u64, // origin
    u64, // created (origin's clock)
    crate::model::MailboxId,
    u64,        // location stamp time
    u64,        // location stamp node
    ByteString, // expunge and flags, one packed state
);

impl WireRecord {
    fn of(record: &MessageRecord) -> Self {
        let state = crate::sync::RecordState {
            expunged: record.expunged,
            flags: record.flags.clone(),
            moved: None,
        };
        WireRecord(
            record.id,
            record.blob,
            record.size,
            record.received_millis,
            record.origin.0,
            record.created,
            record.location.mailbox,
            record.location.stamp.time,
            record.location.stamp.node.0,
            ByteString(crate::sync::encode_states(std::slice::from_ref(&state))),
        )
    }

    fn into_record(self) -> Result<MessageRecord, String> {
        let WireRecord(id, blob, size, received_millis, origin, created, mailbox, time, node, state) = self;
        let mut states = crate::sync::decode_states(&state.0, &crate::sync::SyncLimits::default())
            .map_err(|error| format!("record state: {error}"))?;
        let state = match (states.pop(), states.is_empty()) {
            (Some(state), true) => state,
            _ => return Err("a record carries exactly one state".into()),
        };
        if state.moved.is_some() {
            return Err("a record's location travels beside its state".into());
        }
        Ok(MessageRecord {
            id,
            blob,
            size,
            received_millis,
            origin: NodeId(origin),
            created,
            expunged: state.expunged,
            flags: state.flags,
            location: crate::mailbox::Location {
                mailbox,
                stamp: crate::model::Stamp {
                    time,
                    node: NodeId(node),
                },
            },
        })
    }
}

mod record_on_wire {
    use super::*;

    pub fn serialize<S: serde::Serializer>(record: &MessageRecord, serializer: S) -> Result<S::Ok, S::Error> {
        WireRecord::of(record).serialize(serializer)
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<MessageRecord, D::Error> {
        WireRecord::deserialize(deserializer)?
            .into_record()
            .map_err(serde::de::Error::custom)
    }
}

mod records_on_wire {
    use super::*;

    pub fn serialize<S: serde::Serializer>(records: &[MessageRecord], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(records.iter().map(WireRecord::of))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<MessageRecord>, D::Error> {
        Vec::<WireRecord>::deserialize(deserializer)?
            .into_iter()
            .map(|record| record.into_record().map_err(serde::de::Error::custom))
            .collect()
    }
}

#[derive(Serialize, Deserialize)]
struct Envelope<T>(u8, T);

/// Encodes a frame with its version.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    cbor4ii::serde::to_vec(Vec::new(), &Envelope(WIRE_VERSION, value)).unwrap_or_default()
}

/// Decodes a frame, checking its version.
pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, WireError> {
    // The version first, so a newer peer's frame is reported as such rather than as garbage.
    let Envelope(version, _): Envelope<serde::de::IgnoredAny> =
        cbor4ii::serde::from_slice(bytes).map_err(|error| WireError::Malformed(error.to_string()))?;
    if version != WIRE_VERSION {
        return Err(WireError::UnsupportedVersion(version));
    }
    let Envelope(_, value): Envelope<T> =
        cbor4ii::serde::from_slice(bytes).map_err(|error| WireError::Malformed(error.to_string()))?;
    Ok(value)
}

/// Checks what a decoded record claims before it goes near the store.
pub fn validate_record(record: &MessageRecord) -> Result<(), WireError> {
    if record.flags.len() > 256 {
        return Err(WireError::LimitExceeded(format!(
            "{} flags on one record",
            record.flags.len()
        )));
    }
    Ok(())
}

/// Checks a request's lists and keys.
pub fn validate_request(request: &Request) -> Result<(), WireError> {
    let check_key = |key: &MailboxKey| key.validate().map_err(|error| WireError::Malformed(error.to_string()));
    match request {
        Request::Reconcile {
            space: WireSpace::Mailbox(key),
            ..
        } => check_key(key),
        Request::Reconcile {
            space: WireSpace::Directory,
            ..
        } => Ok(()),
        Request::ReconcileMailboxes { mailboxes } => {
            if mailboxes.len() > MAX_MAILBOXES_PER_BATCH {
                return Err(WireError::LimitExceeded(format!(
                    "{} mailboxes in one batch",
                    mailboxes.len()
                )));
            }
            mailboxes.iter().try_for_each(|entry| check_key(&entry.mailbox))
        }
        Request::FetchRecords { mailbox, ids, held } => {
            check_key(mailbox)?;
            if ids.len() + held.len() > MAX_IDS_PER_REQUEST {
                return Err(WireError::LimitExceeded(format!(
                    "{} ids in one fetch",
                    ids.len() + held.len()
                )));
            }
            Ok(())
        }
        Request::FetchRange { mailbox, limit, .. } => {
            check_key(mailbox)?;
            if *limit as usize > MAX_RECORDS_PER_RESPONSE {
                return Err(WireError::LimitExceeded(format!("range limit {limit}")));
            }
            Ok(())
        }
        Request::Push { mailbox, record, .. } => {
            check_key(mailbox)?;
            validate_record(record)
        }
        Request::FetchBlob { length, .. } => {
            if *length > MAX_BLOB_CHUNK {
                return Err(WireError::LimitExceeded(format!("blob chunk of {length} bytes")));
            }
            Ok(())
        }
        Request::Sketch { mailbox, salt, .. } => {
            check_key(mailbox)?;
            if salt.0.len() != SKETCH_SALT_BYTES {
                return Err(WireError::Malformed(format!(
                    "a sketch salt has {SKETCH_SALT_BYTES} bytes, not {}",
                    salt.0.len()
                )));
            }
            Ok(())
        }
        Request::SketchSettle {
            mailbox,
            send,
            you_lack,
            ..
        } => {
            check_key(mailbox)?;
            if send.len() + you_lack.len() > MAX_IDS_PER_REQUEST {
                return Err(WireError::LimitExceeded(format!(
                    "{} ids in one sketch settlement",
                    send.len() + you_lack.len()
                )));
            }
            Ok(())
        }
        Request::ResolveMailboxes { ids, .. } => {
            if ids.len() > MAX_IDS_PER_REQUEST || ids.iter().any(|id| id.0.len() != 16) {
                return Err(WireError::Malformed(
                    "mailbox ids must be at most 4000 of 16 bytes".into(),
                ));
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{NodeId, Stamp};
    use proptest::prelude::*;

    fn record_with_everything(seed: u64) -> MessageRecord {
        let mut record = MessageRecord::new(
            MessageId(u128::from(seed) << 64 | 7),
            BlobHash::of(&seed.to_be_bytes()),
            2_000 + seed,
            1_767_000_000_000 + seed,
            NodeId(seed % 5 + 1),
        );
        let stamp = |time: u64, node: u64| Stamp {
            time,
            node: NodeId(node),
        };
        crate::crdt::apply_flag(&mut record, crate::model::Flag::Seen, true, stamp(seed + 10, 2));
        crate::crdt::apply_flag(&mut record, crate::model::Flag::Flagged, false, stamp(seed + 11, 3));
        crate::crdt::apply_flag(
            &mut record,
            crate::model::Flag::Keyword("$label1".into()),
            true,
            stamp(seed + 12, 4),
        );
        record.location = crate::mailbox::Location {
            mailbox: crate::model::MailboxId(u128::from(seed) * 31),
            stamp: stamp(seed + 13, 9),
        };
        if seed % 2 == 0 {
            record.expunged = Some(stamp(seed + 14, 1));
        }
        record
    }

    #[test]
    fn records_travel_as_compact_arrays_and_round_trip() {
        let records: Vec<MessageRecord> = (0..6).map(record_with_everything).collect();
        let response = Response::Records {
            records: records.clone(),
            more: false,
            blobs: vec![],
        };
        assert_eq!(decode::<Response>(&encode(&response)).unwrap(), response);
        let push = Request::Push {
            mailbox: MailboxKey::emails("erin@example.org").unwrap(),
            record: records[1].clone(),
            blob: None,
        };
        assert_eq!(decode::<Request>(&encode(&push)).unwrap(), push);
        // A fresh record with no flags, as a heal of new messages sends them: well under the
        // 215 bytes it took as a map.
        let fresh = MessageRecord::new(
            MessageId(1 << 100),
            BlobHash::of(b"x"),
            5_000,
            1_767_000_000_000,
            NodeId(3),
        );
        let size = cbor4ii::serde::to_vec(Vec::new(), &WireRecord::of(&fresh))
            .unwrap()
            .len();
        assert!(size <= 130, "a fresh record takes {size} bytes on the wire");
    }

    #[test]
    fn a_record_with_a_bad_state_is_refused() {
        let record = record_with_everything(3);
        let mut wire = WireRecord::of(&record);
        let state = crate::sync::RecordState::of(&record);
        wire.9 = ByteString(crate::sync::encode_states(&[state.clone(), state]));
        let bytes = cbor4ii::serde::to_vec(Vec::new(), &Envelope(WIRE_VERSION, (vec![&wire],))).unwrap();
        assert!(decode::<(Vec<WireRecord>,)>(&bytes).is_ok());
        let response = |wire: &WireRecord| {
            #[derive(Serialize)]
            enum Shape<'a> {
                #[serde(rename = "records")]
                Records { records: Vec<&'a WireRecord>, more: bool },
            }
            cbor4ii::serde::to_vec(
                Vec::new(),
                &Envelope(
                    WIRE_VERSION,
                    Shape::Records {
                        records: vec![wire],
                        more: false,
                    },
                ),
            )
            .unwrap()
        };
        assert!(decode::<Response>(&response(&wire)).is_err(), "two states");
        wire.9 = ByteString(vec![0xff, 0xff]);
        assert!(decode::<Response>(&response(&wire)).is_err(), "garbage state");
        let mut moved = WireRecord::of(&record);
        let mut state = crate::sync::RecordState::of(&record);
        state.moved = Some(record.location);
        moved.9 = ByteString(crate::sync::encode_states(&[state]));
        assert!(
            decode::<Response>(&response(&moved)).is_err(),
            "a location inside the state"
        );
        assert!(decode::<Response>(&response(&WireRecord::of(&record))).is_ok());
    }

    #[test]
    fn frames_round_trip() {
        let mailbox = MailboxKey::new("erin", "INBOX").unwrap();
        let mut record = MessageRecord::new(MessageId(99), BlobHash::of(b"raw"), 3, 4, NodeId(5));
        crate::crdt::apply_flag(
            &mut record,
            crate::model::Flag::Seen,
            true,
            Stamp {
                time: 9,
                node: NodeId(5),
            },
        );
        let gossip = Gossip::Operation {
            mailbox: mailbox.clone(),
            record,
            blob: Some(ByteString(b"raw".to_vec())),
        };
        assert_eq!(decode::<Gossip>(&encode(&gossip)).unwrap(), gossip);
        let request = Request::FetchRecords {
            mailbox,
            ids: vec![MessageId(1), MessageId(2)],
            held: vec![MessageId(3)],
        };
        assert_eq!(decode::<Request>(&encode(&request)).unwrap(), request);
    }

    #[test]
    fn sketch_frames_round_trip_and_are_validated() {
        let mailbox = MailboxKey::new("erin", "INBOX").unwrap();
        let record = MessageRecord::new(MessageId(99), BlobHash::of(b"raw"), 3, 4, NodeId(5));
        let requests = [
            Request::Sketch {
                mailbox: mailbox.clone(),
                salt: ByteString(vec![7; SKETCH_SALT_BYTES]),
                message: ByteString(vec![0x82, 3, 0x61]),
            },
            Request::SketchSettle {
                mailbox: mailbox.clone(),
                send: vec![MessageId(1)],
                states: ByteString(vec![1, 2, 3]),
                you_lack: vec![MessageId(2), MessageId(3)],
            },
            Request::SketchSettle {
                mailbox: mailbox.clone(),
                send: vec![],
                states: ByteString::default(),
                you_lack: vec![],
            },
        ];
        for request in requests {
            assert_eq!(decode::<Request>(&encode(&request)).unwrap(), request);
            validate_request(&request).unwrap();
        }
        let responses = [
            Response::Sketch {
                message: ByteString(vec![1, 2]),
                records: vec![record.clone()],
                blobs: vec![ByteString(b"raw".to_vec())],
            },
            Response::Sketch {
                message: ByteString::default(),
                records: vec![],
                blobs: vec![],
            },
            Response::SketchSettled {
                records: vec![record],
                blobs: vec![],
                returned: ByteString(vec![4, 5]),
            },
        ];
        for response in responses {
            assert_eq!(decode::<Response>(&encode(&response)).unwrap(), response);
        }
        // A salt of the wrong length, and more IDs than one request may name, are refused.
        for length in [0, 15, 17] {
            let request = Request::Sketch {
                mailbox: mailbox.clone(),
                salt: ByteString(vec![0; length]),
                message: ByteString::default(),
            };
            assert!(matches!(validate_request(&request), Err(WireError::Malformed(_))));
        }
        let request = Request::SketchSettle {
            mailbox,
            send: (0..3_000).map(MessageId).collect(),
            states: ByteString::default(),
            you_lack: (0..1_001).map(MessageId).collect(),
        };
        assert!(matches!(validate_request(&request), Err(WireError::LimitExceeded(_))));
    }

    #[test]
    fn bad_frames_are_refused() {
        assert!(decode::<Request>(&[]).is_err());
        assert!(matches!(
            decode::<Request>(&cbor4ii::serde::to_vec(Vec::new(), &Envelope(9u8, 0u8)).unwrap()),
            Err(WireError::UnsupportedVersion(9))
        ));
        assert!(
            decode::<Gossip>(&cbor4ii::serde::to_vec(Vec::new(), &Envelope(WIRE_VERSION, ("x", 1))).unwrap()).is_err()
        );
        // An invalid flag inside a record is refused at decoding: a keyword spelled as a system
        // flag, patched into the packed state.
        let mailbox = MailboxKey::new("erin", "INBOX").unwrap();
        let mut record = MessageRecord::new(MessageId(99), BlobHash::of(b"raw"), 3, 4, NodeId(5));
        crate::crdt::apply_flag(
            &mut record,
            crate::model::Flag::Keyword("$Junk".into()),
            true,
            Stamp {
                time: 9,
                node: NodeId(5),
            },
        );
        let mut frame = encode(&Gossip::Operation {
            mailbox,
            record,
            blob: None,
        });
        assert!(decode::<Gossip>(&frame).is_ok());
        let position = frame.windows(5).position(|window| window == b"$Junk").unwrap();
        frame[position..position + 5].copy_from_slice(b"\\Junk");
        assert!(matches!(decode::<Gossip>(&frame), Err(WireError::Malformed(_))));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
            let _ = decode::<Request>(&bytes);
            let _ = decode::<Response>(&bytes);
            let _ = decode::<Gossip>(&bytes);
        }
    }
}
