//! mailmesh's pure core. Nothing here does IO, reads the clock or draws randomness: callers pass
//! time and randomness in, so the same inputs always give the same outputs and the tests can
//! simulate whole clusters. It is its own crate so that importing tokio, RocksDB or libp2p here is
//! a compile error rather than a convention.
//!
//! - [`model`]: message IDs, mailbox keys, flags, stamps and records;
//! - [`changes`]: the per-account change feed whose state tokens every node accepts;
//! - [`crdt`]: the merge laws, the record state hash, the hybrid logical clock;
//! - [`mailbox`]: mailboxes as replicated objects, email locations, and the tree every replica shows;
//! - [`merkle`]: the 16-way trie with additive aggregates, per mailbox and over the directory;
//! - [`sync`]: the range-reconciliation state machine and its CBOR wire form;
//! - [`sketch`]: rateless set sketches (coded cells of (ID, state) elements) and their decoder;
//! - [`sketch_session`]: reconciliation that picks sketches or trie descent, as a pure state machine;
//! - [`simulation`]: a seeded, single-threaded simulation of whole clusters over a faulty network;
//! - [`varint`]: the LEB128 numbers of the compact wire forms;
//! - [`position`]: counted blocks that find deep pages of a sort index in O(log n).

pub mod changes;
pub mod crdt;
pub mod mailbox;
pub mod merkle;
pub mod model;
pub mod position;
pub mod simulation;
pub mod sketch;
pub mod sketch_session;
pub mod sync;
pub mod varint;
