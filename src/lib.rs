//! mailmesh: a peer-to-peer replication node for mail stores.
//!
//! Every node accepts appends, flag changes and expunges on its own; replicas converge by merging
//! CRDT records and by reconciling per-mailbox Merkle tries with their peers.
//!
//! The pure core has no IO, never reads the clock or a random source, and is what the tests
//! simulate:
//! - [`model`]: message IDs, mailbox keys, flags, stamps and records;
//! - [`crdt`]: the merge laws, the record state hash, the hybrid logical clock;
//! - [`merkle`]: the 16-way trie with additive aggregates, per mailbox and over the directory;
//! - [`sync`]: the range-reconciliation state machine and its CBOR wire form;
//! - [`position`]: counted blocks that find deep pages of a sort index in O(log n).
//!
//! The IO layers drive it:
//! - [`store`]: RocksDB column families, atomic write batches, durable group commit;
//! - [`wire`]: node-to-node request, response and gossip frames;
//! - [`net`]: the libp2p swarm (TCP, noise, yamux, gossipsub, request-response) as byte frames;
//! - [`service`]: the mail service, the one interface every protocol speaks to;
//! - [`node`]: the replication engine, the only place store, network and reconciliation meet;
//! - [`server`]: the composition root that wires store, service, engine and HTTP;
//! - [`api`]: the HTTP API over the service; [`http`]: its error answers;
//!   [`lmtp`]: the LMTP server an MTA delivers to, over the service; [`imap`]: the IMAP server
//!   mail clients use, over the service;
//!   [`metrics`]: the node's Prometheus metrics; [`environment`]: time and randomness, passed in;
//! - [`accounts`]: the accounts file (Dovecot passwd-file), logins and their rate limits;
//! - [`fuzzing`]: the body of each cargo-fuzz target, shared with the replay of saved inputs;
//! - [`config`]: TOML configuration; [`harness`], [`demo`]: local clusters of real node processes
//!   for the demo and the integration tests; [`api_client`]: the HTTP client of the node's API;
//! - [`import`]: Maildir and mbox into a running node.

pub mod accounts;
pub mod api;
pub mod api_client;
pub mod config;
pub mod demo;
pub mod environment;
pub mod fuzzing;
pub mod harness;
pub mod http;
pub mod imap;
pub mod import;
pub mod jmap;
pub mod lmtp;
pub mod mail;
pub mod metrics;
pub mod net;
pub mod node;
pub mod page;
pub mod search;
pub mod server;
pub mod service;
pub mod store;
pub mod tls;
pub mod wire;

// The pure core lives in its own crate (core/); these keep `crate::model` and friends working.
pub use mailmesh_core::{changes, crdt, mailbox, merkle, model, position, sketch, sketch_session, sync};
