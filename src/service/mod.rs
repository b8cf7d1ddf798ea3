//! The mail service: the one interface every protocol speaks to.
//!
//! The HTTP API, and the LMTP, JMAP and IMAP servers that follow it, call only [`MailService`].
//! None of them reaches the store, the network or the sync core: the service owns the local
//! write path (through the store's group commit), the reads, the queries near the data, the
//! change feed and the logins. What replication does with a write is the engine's business: it
//! follows the store's commit feed ([`crate::store::CommitQueue::feed`]) and pushes local writes
//! to peers from there, so a write returns once it is durable here.
//!
//! Every call returns a [`ServiceError`] a caller can act on: [`ServiceError::is_temporary`] says
//! whether trying again later can succeed (LMTP answers 4xx then, 5xx otherwise).
//!
//! # The model it serves
//! Mailboxes are replicated objects with stable IDs ([`mailboxes`]): create, rename and delete
//! work on any node with no coordination, and every account has its INBOX everywhere. An email
//! has one ID for its whole life and sits in one mailbox (its location register), so a move keeps
//! the ID; emails are addressed by (account, ID). The account's change feed
//! ([`MailService::account_changes`]) gives a state any node of the cluster accepts.

mod mailboxes;

pub use mailboxes::{decode_snapshot, fold as fold_snapshots, AccountMailboxes, MailboxUpdate, MAX_MAILBOX_WRITES};

mod feed;
mod jmap_support;

pub mod imap;
pub mod threads;
pub mod uids;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::broadcast;

use crate::accounts::{AccountName, Accounts, AuthenticationError, Password};
use crate::changes::{ChangeState, ChangesError};
use crate::environment::Environment;
use crate::mail::Listing;
use crate::mailbox::Role;
use crate::merkle::{Aggregate, Prefix, TreeView};
use crate::metrics::{NodeMetrics, WriteLabel};
use crate::model::{BlobHash, Flag, MailboxId, MailboxKey, MessageId, MessageRecord, ModelError};
use crate::search::SearchIndex;
use crate::store::{Applied, CommitQueue, Committed, Operation, Origin, Space, Store, StoreError};

pub use crate::store::{Changes, SortKey};

/// How far ahead of this node's clock a received date given with a delivery may be.
const MAX_RECEIVED_AHEAD_MILLIS: u64 = 24 * 60 * 60 * 1000;

/// Why a call failed, in terms a protocol can answer with.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The request itself is wrong (a bad mailbox name, flag, ID or argument): do not retry.
    #[error("{0}")]
    Invalid(String),
    /// No account by that name (recipient resolution).
    #[error("no such account: {0}")]
    NoSuchAccount(String),
    #[error("no such mailbox: {0}")]
    NoSuchMailbox(String),
    #[error("a mailbox named {0:?} exists already")]
    MailboxExists(String),
    #[error("mailbox {0:?} has child mailboxes: delete or move them first")]
    MailboxHasChildren(String),
    /// No live message with that ID in the mailbox (never there, or expunged).
    #[error("no message {0}")]
    NoSuchMessage(MessageId),
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: u64, limit: u64 },
    /// The record has replicated here but its bytes have not arrived yet: try again shortly.
    #[error("the message's bytes have not arrived from a peer yet")]
    BodyNotYetHere,
    /// A login was refused, throttled, or the accounts file is unreadable.
    #[error(transparent)]
    Authentication(#[from] AuthenticationError),
    /// The disk is (nearly) full: nothing was written; try again once space is freed.
    #[error("storage is full: {0}")]
    StorageFull(String),
    /// The store failed or is closing: nothing was acknowledged; try again.
    #[error("the store failed: {0}")]
    Unavailable(String),
    /// The change state is too old (its deletions were forgotten) or not one of ours: the client
    /// must resync from a fresh state.
    #[error("{0}")]
    CannotCalculateChanges(String),
}

impl ServiceError {
    /// Whether the same call can succeed later without changing it.
    pub fn is_temporary(&self) -> bool {
        match self {
            ServiceError::BodyNotYetHere | ServiceError::StorageFull(_) | ServiceError::Unavailable(_) => true,
            ServiceError::Authentication(error) => !matches!(error, AuthenticationError::Refused),
            ServiceError::Invalid(_)
            | ServiceError::NoSuchAccount(_)
            | ServiceError::NoSuchMailbox(_)
            | ServiceError::MailboxExists(_)
            | ServiceError::MailboxHasChildren(_)
            | ServiceError::NoSuchMessage(_)
            | ServiceError::TooLarge { .. }
            | ServiceError::CannotCalculateChanges(_) => false,
        }
    }
}

impl From<StoreError> for ServiceError {
    fn from(error: StoreError) -> Self {
        if error.is_disk_full() {
            return ServiceError::StorageFull(error.to_string());
        }
        match error {
            StoreError::NotFound { id, .. } | StoreError::Expunged(id) => ServiceError::NoSuchMessage(id),
            StoreError::TooLarge { size, limit } => ServiceError::TooLarge { size, limit },
            StoreError::BlobMismatch { .. } | StoreError::Merge(_) => ServiceError::Invalid(error.to_string()),
            other => ServiceError::Unavailable(other.to_string()),
        }
    }
}

impl From<ModelError> for ServiceError {
    fn from(error: ModelError) -> Self {
        ServiceError::Invalid(error.to_string())
    }
}

impl From<ChangesError> for ServiceError {
    fn from(error: ChangesError) -> Self {
        match error {
            ChangesError::InvalidToken(_) | ChangesError::CannotCalculate { .. } => {
                ServiceError::CannotCalculateChanges(error.to_string())
            }
            ChangesError::Log(message) => ServiceError::Unavailable(message),
        }
    }
}

impl From<crate::search::SearchError> for ServiceError {
    fn from(error: crate::search::SearchError) -> Self {
        ServiceError::Unavailable(error.to_string())
    }
}

/// A mailbox as clients see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MailboxSummary {
    pub account: String,
    /// The stable ID: it survives renames and moves.
    pub id: MailboxId,
    /// The full path, levels joined by `/` (`Archive/2026`).
    pub name: String,
    pub parent: Option<MailboxId>,
    pub role: Option<Role>,
    pub subscribed: bool,
    pub sort_order: u32,
    /// Live messages.
    pub total: u64,
    /// Live messages without `\Seen`.
    pub unseen: u64,
    /// Expunged records of the account still kept so the expunge reaches every replica.
    pub tombstones: u64,
    /// The fingerprint of the account's replicated emails (equal on two nodes means equal
    /// content, in every mailbox of the account).
    pub root: String,
}

/// An email's metadata, as every protocol lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Email {
    pub id: MessageId,
    /// The mailbox it is shown in.
    pub mailbox: MailboxId,
    pub blob: BlobHash,
    pub size: u64,
    pub received_millis: u64,
    /// The `Date:` header, when it parses.
    pub date_millis: Option<u64>,
    pub from: String,
    pub subject: String,
    /// The From: header's addresses, when the listing kept them.
    pub from_addresses: crate::mail::KeptAddresses,
    pub flags: Vec<Flag>,
}

impl Email {
    fn of(record: &MessageRecord, mailbox: MailboxId, listing: Listing) -> Email {
        Email {
            id: record.id,
            mailbox,
            blob: record.blob,
            size: record.size,
            received_millis: record.received_millis,
            date_millis: listing.date_millis,
            from: listing.from,
            subject: listing.subject,
            from_addresses: listing.from_addresses,
            flags: record.set_flags().into_iter().cloned().collect(),
        }
    }
}

/// A message to store: an LMTP delivery, an IMAP APPEND, an import or an HTTP POST.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub account: String,
    pub mailbox: MailboxTarget,
    pub raw: Vec<u8>,
    pub flags: Vec<Flag>,
    /// When it was received, if not now (an import keeps the original date).
    pub received_millis: Option<u64>,
    /// Answer with the existing message instead of storing a second copy when the mailbox
    /// already holds a live message with the same bytes (what makes an import resumable).
    pub skip_duplicate: bool,
}

/// The mailbox a delivery goes to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MailboxTarget {
    /// An existing mailbox by path (`INBOX` always exists).
    Path(String),
    /// A mailbox by path, created (with missing parents) when there is none: the HTTP API's
    /// append and an import.
    PathOrCreate(String),
    /// A mailbox by ID.
    Id(MailboxId),
}

/// What a delivery stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivered {
    pub id: MessageId,
    pub mailbox: MailboxId,
    pub blob: BlobHash,
    pub size: u64,
    /// True when the bytes were already there and nothing was written.
    pub duplicate: bool,
}

/// Where a recipient address delivers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recipient {
    pub account: String,
    pub mailbox: String,
}

/// A listing request: filter, sort, window.
#[derive(Clone, Debug)]
pub struct Query {
    /// Full-text search words; `None` lists every message.
    pub search: Option<String>,
    pub sort: SortKey,
    pub descending: bool,
    pub position: usize,
    pub limit: usize,
}

/// One window of a listing and the size of the whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueryResult {
    pub emails: Vec<Email>,
    pub total: usize,
}

/// An email listed by the account's change feed, with the mailbox that holds it here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangedEmail {
    pub id: MessageId,
    /// The mailbox it is shown in here (absent when it is not shown: destroyed since, or its
    /// mailbox's record has not arrived yet).
    pub mailbox: Option<MailboxId>,
    /// That mailbox's path.
    pub mailbox_name: Option<String>,
}

/// What changed in an account since a state, and the state to ask from next. The state is
/// accepted by every node of the cluster, so a client that fails over carries on from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountChanges {
    pub created: Vec<ChangedEmail>,
    /// May repeat an email the client already knows (RFC 8620 allows it); never a creation twice.
    pub updated: Vec<ChangedEmail>,
    pub destroyed: Vec<MessageId>,
    /// Mailboxes whose records changed (created, renamed, deleted, role, subscription): read
    /// them again. A deleted one is no longer among [`MailService::mailboxes`].
    pub mailboxes: Vec<MailboxId>,
    pub new_state: String,
    /// The listing was cut at the limit: ask again from `new_state`.
    pub has_more: bool,
}

/// A record's leaf in a mailbox's trie, for heavy clients that resync by ranges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeEntry {
    pub id: MessageId,
    /// The first 8 bytes of the record's state hash (the leaf tag peers compare).
    pub state: [u8; 8],
    pub live: bool,
}

/// A change committed on this node, to one account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    Changed {
        account: String,
        /// The mailbox of the email's location now (a move out shows the new one); `None` for a
        /// change to the account's mailboxes themselves.
        mailbox: Option<MailboxId>,
        id: MessageId,
        /// False once the message is expunged.
        live: bool,
        /// True when the change came from a peer.
        replicated: bool,
    },
    /// The subscriber fell behind and this many notices were dropped: it should resync.
    Missed(u64),
}

/// Change notices for one account (or every account), for IMAP IDLE and JMAP push.
pub struct Subscription {
    account: Option<String>,
    receiver: broadcast::Receiver<Committed>,
}

impl Subscription {
    /// The next notice; `None` once the node is shutting down.
    pub async fn next(&mut self) -> Option<Notice> {
        loop {
            match self.receiver.recv().await {
                Ok(change) => {
                    if self
                        .account
                        .as_deref()
                        .is_some_and(|account| account != change.mailbox.account())
                    {
                        continue;
                    }
                    return Some(Notice::Changed {
                        account: change.mailbox.account().to_owned(),
                        mailbox: (!change.mailbox.holds_mailboxes()).then_some(change.record.location.mailbox),
                        id: change.record.id,
                        live: change.record.is_live(),
                        replicated: change.origin == Origin::Peer,
                    });
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => return Some(Notice::Missed(missed)),
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

/// What the service is built from (the composition root passes them in).
pub struct ServiceParts {
    pub store: Arc<Store>,
    pub queue: CommitQueue,
    pub search: Arc<SearchIndex>,
    /// The accounts file, when one is configured.
    pub accounts: Option<Arc<Accounts>>,
    pub environment: Arc<dyn Environment>,
    pub metrics: NodeMetrics,
    pub max_message_bytes: u64,
}

/// The local mail service of one node. Cheap to clone.
#[derive(Clone)]
pub struct MailService {
    inner: Arc<ServiceParts>,
    trees: Arc<mailboxes::TreeCache>,
}

impl MailService {
    pub fn new(parts: ServiceParts) -> MailService {
        MailService {
            inner: Arc::new(parts),
            trees: Arc::default(),
        }
    }

    /// The largest message a delivery may carry.
    pub fn max_message_bytes(&self) -> u64 {
        self.inner.max_message_bytes
    }

    /// Whether an accounts file is configured.
    pub fn has_accounts(&self) -> bool {
        self.inner.accounts.is_some()
    }

    // -----------------------------------------------------------------------------------------
    // Accounts
    // -----------------------------------------------------------------------------------------

    /// Checks a login against the accounts file (rate-limited per account and per address).
    pub async fn authenticate(
        &self,
        login: String,
        password: Password,
        source: IpAddr,
    ) -> Result<AccountName, ServiceError> {
        let Some(accounts) = &self.inner.accounts else {
            return Err(ServiceError::Authentication(AuthenticationError::Unavailable));
        };
        Ok(accounts.authenticate_blocking(login, password, source).await?)
    }

    /// Where mail to `address` goes: its account, and the mailbox named by a `+detail` when the
    /// account has one (else INBOX), as Dovecot's `lmtp_save_to_detail_mailbox` does.
    ///
    /// The address is looked up as given, then in lower case. With no accounts file every
    /// well-formed address is an account (the open, loopback-only setup of the demo).
    pub fn resolve_recipient(&self, address: &str) -> Result<Recipient, ServiceError> {
        let address = address.trim().trim_start_matches('<').trim_end_matches('>');
        let (local, domain) = address
            .rsplit_once('@')
            .filter(|(local, domain)| !local.is_empty() && !domain.is_empty())
            .ok_or_else(|| ServiceError::Invalid(format!("{address:?} is not an address")))?;
        let (base, detail) = match local.split_once('+') {
            Some((base, detail)) if !base.is_empty() => (base, Some(detail)),
            _ => (local, None),
        };
        let whole = [(address.to_owned(), None), (address.to_lowercase(), None)];
        let stripped = [
            (format!("{base}@{domain}"), detail),
            (format!("{base}@{domain}").to_lowercase(), detail),
        ];
        // With an accounts file, an account literally named `user+detail@domain` wins over
        // `user@domain`. Without one every address is an account, so the whole address would
        // always win and `+detail` would never file into a mailbox: `+` is then the delimiter.
        let open = self.inner.accounts.is_none();
        let candidates: Vec<(String, Option<&str>)> = if open && detail.is_some() {
            stripped.into_iter().collect()
        } else {
            whole.into_iter().chain(stripped).collect()
        };
        for (account, detail) in candidates {
            if !self.account_exists(&account)? {
                continue;
            }
            let mailbox = match detail {
                Some(detail) if !detail.is_empty() && self.mailbox_exists(&account, detail)? => detail.to_owned(),
                _ => "INBOX".to_owned(),
            };
            MailboxKey::new(&account, &mailbox)?;
            return Ok(Recipient { account, mailbox });
        }
        Err(ServiceError::NoSuchAccount(address.to_owned()))
    }

    fn account_exists(&self, account: &str) -> Result<bool, ServiceError> {
        match &self.inner.accounts {
            Some(accounts) => accounts
                .exists(account, Instant::now())
                .map_err(|error| ServiceError::Authentication(error.into())),
            None => Ok(MailboxKey::new(account, "INBOX").is_ok()),
        }
    }

    fn mailbox_exists(&self, account: &str, mailbox: &str) -> Result<bool, ServiceError> {
        if MailboxKey::emails(account).is_err() {
            return Ok(false);
        }
        Ok(self.account_mailboxes(account)?.tree.find(mailbox).is_some())
    }

    // -----------------------------------------------------------------------------------------
    // Writes
    // -----------------------------------------------------------------------------------------

    fn emails_of(account: &str) -> Result<MailboxKey, ServiceError> {
        Ok(MailboxKey::emails(account)?)
    }

    /// The visible mailbox a delivery goes to (creating it when asked).
    async fn target(&self, account: &str, target: &MailboxTarget) -> Result<MailboxId, ServiceError> {
        match target {
            MailboxTarget::Id(id) => {
                let mailboxes = self.account_mailboxes(account)?;
                mailboxes
                    .tree
                    .canonical(*id)
                    .filter(|canonical| mailboxes.tree.get(*canonical).is_some())
                    .ok_or_else(|| ServiceError::NoSuchMailbox(id.to_string()))
            }
            MailboxTarget::Path(path) => self.find_mailbox(account, path),
            MailboxTarget::PathOrCreate(path) => match self.find_mailbox(account, path) {
                Err(ServiceError::NoSuchMailbox(_)) => match self.create_mailbox(account, path, None).await {
                    Ok(created) => Ok(created.id),
                    // Another delivery created it meanwhile.
                    Err(ServiceError::MailboxExists(_)) => self.find_mailbox(account, path),
                    Err(error) => Err(error),
                },
                other => other,
            },
        }
    }

    /// Stores a message; returns once it is durable on this node.
    pub async fn deliver(&self, delivery: Delivery) -> Result<Delivered, ServiceError> {
        let container = Self::emails_of(&delivery.account)?;
        let size = delivery.raw.len() as u64;
        if delivery.raw.is_empty() {
            return Err(ServiceError::Invalid("empty message".into()));
        }
        if size > self.inner.max_message_bytes {
            return Err(ServiceError::TooLarge {
                size,
                limit: self.inner.max_message_bytes,
            });
        }
        let now = self.inner.environment.now_millis();
        if let Some(received) = delivery.received_millis {
            if received > now.saturating_add(MAX_RECEIVED_AHEAD_MILLIS) {
                return Err(ServiceError::Invalid(format!(
                    "the received date {received} ms is more than a day ahead of this node's clock"
                )));
            }
        }
        self.check_account(&delivery.account)?;
        let mailbox = self.target(&delivery.account, &delivery.mailbox).await?;
        // The duplicate check runs in the store's single writer, so two concurrent deliveries of
        // the same bytes (a resumed import racing itself) store one copy.
        let unless_held_in = if delivery.skip_duplicate {
            let mailboxes = self.account_mailboxes(&delivery.account)?;
            mailboxes::views_of(&mailboxes, mailbox)
        } else {
            Vec::new()
        };
        let applied = self
            .inner
            .queue
            .submit(Operation::Append {
                mailbox: container,
                location: Some(mailbox),
                unless_held_in,
                raw: delivery.raw,
                flags: delivery.flags,
                received_millis: delivery.received_millis,
                now_millis: now,
                random: self.inner.environment.random(),
            })
            .await?;
        let (id, blob, size) = match applied {
            Applied::Appended { id, blob, size, .. } => (id, blob, size),
            Applied::Record { record, changed: false } => {
                return Ok(Delivered {
                    id: record.id,
                    mailbox,
                    blob: record.blob,
                    size: record.size,
                    duplicate: true,
                })
            }
            _ => {
                return Err(ServiceError::Unavailable(
                    "the store answered an append with no message".into(),
                ))
            }
        };
        self.count_write("append");
        Ok(Delivered {
            id,
            mailbox,
            blob,
            size,
            duplicate: false,
        })
    }

    /// Sets and clears flags of a live email; returns the email as it now stands.
    pub async fn set_flags(
        &self,
        account: &str,
        id: MessageId,
        add: Vec<Flag>,
        remove: Vec<Flag>,
    ) -> Result<Email, ServiceError> {
        self.write_flags(account, id, add, remove, None)
            .await?
            .ok_or_else(|| ServiceError::Unavailable("the store refused an unconditional flag change".into()))
    }

    /// Sets and clears flags as [`MailService::set_flags`] does, unless the email changed on this
    /// node after `modseq` (a modseq of [`MailService::email_modseq`]): then nothing is written
    /// and the answer is `None`. The store's single writer checks and writes in one step, so a
    /// concurrent change can never slip in between (IMAP's `STORE (UNCHANGEDSINCE n)`).
    pub async fn set_flags_unchanged_since(
        &self,
        account: &str,
        id: MessageId,
        add: Vec<Flag>,
        remove: Vec<Flag>,
        modseq: u64,
    ) -> Result<Option<Email>, ServiceError> {
        self.write_flags(account, id, add, remove, Some(modseq)).await
    }

    async fn write_flags(
        &self,
        account: &str,
        id: MessageId,
        add: Vec<Flag>,
        remove: Vec<Flag>,
        unless_changed_since: Option<u64>,
    ) -> Result<Option<Email>, ServiceError> {
        let container = Self::emails_of(account)?;
        self.email(account, id)?;
        let applied = self
            .inner
            .queue
            .submit(Operation::SetFlags {
                mailbox: container,
                id,
                add,
                remove,
                unless_changed_since,
                now_millis: self.inner.environment.now_millis(),
            })
            .await?;
        match applied {
            Applied::Record { changed, .. } => {
                if changed {
                    self.count_write("flags");
                }
                self.email(account, id).map(Some)
            }
            Applied::ChangedSince { .. } => Ok(None),
            _ => Err(ServiceError::Unavailable(
                "the store answered a flag change with no record".into(),
            )),
        }
    }

    /// Moves a live email to another mailbox of its account; its ID stays. Concurrent moves
    /// to different mailboxes end in the later one on every node.
    pub async fn move_email(&self, account: &str, id: MessageId, to: MailboxId) -> Result<Email, ServiceError> {
        let container = Self::emails_of(account)?;
        self.email(account, id)?;
        let to = self.target(account, &MailboxTarget::Id(to)).await?;
        let applied = self
            .inner
            .queue
            .submit(Operation::Move {
                mailbox: container,
                id,
                to,
                now_millis: self.inner.environment.now_millis(),
            })
            .await?;
        if let Applied::Record { changed: true, .. } = applied {
            self.count_write("move");
        }
        self.email(account, id)
    }

    /// Expunges a live email (the expunge replicates as a tombstone).
    pub async fn destroy(&self, account: &str, id: MessageId) -> Result<(), ServiceError> {
        let container = Self::emails_of(account)?;
        self.email(account, id)?;
        let applied = self
            .inner
            .queue
            .submit(Operation::Expunge {
                mailbox: container,
                id,
                now_millis: self.inner.environment.now_millis(),
            })
            .await?;
        if let Applied::Record { changed: true, .. } = applied {
            self.count_write("expunge");
        }
        Ok(())
    }

    fn count_write(&self, kind: &'static str) {
        self.inner.metrics.writes.get_or_create(&WriteLabel { kind }).inc();
    }

    // -----------------------------------------------------------------------------------------
    // Reads
    // -----------------------------------------------------------------------------------------

    /// A live email's metadata, with the mailbox it is shown in. An email whose mailbox's record
    /// has not replicated here yet is not shown (NoSuchMessage) until it has.
    pub fn email(&self, account: &str, id: MessageId) -> Result<Email, ServiceError> {
        let container = Self::emails_of(account)?;
        let record = match self.inner.store.record(container.id(), id)? {
            Some(record) if record.is_live() => record,
            _ => return Err(ServiceError::NoSuchMessage(id)),
        };
        let mailboxes = self.account_mailboxes(account)?;
        let placement = mailboxes
            .tree
            .place(record.location.mailbox)
            .ok_or(ServiceError::NoSuchMessage(id))?;
        let listing = self.listing_of(&container, id)?;
        Ok(Email::of(&record, placement.mailbox(), listing))
    }

    /// The headers kept for listing an email (empty when this node has none).
    fn listing_of(&self, container: &MailboxKey, id: MessageId) -> Result<Listing, ServiceError> {
        Ok(self
            .inner
            .store
            .local_state(container.id(), id)?
            .and_then(|state| state.listing)
            .unwrap_or_default())
    }

    /// A live email's bytes, exactly as delivered.
    pub fn raw(&self, account: &str, id: MessageId) -> Result<Vec<u8>, ServiceError> {
        let email = self.email(account, id)?;
        self.inner.store.blob(&email.blob)?.ok_or(ServiceError::BodyNotYetHere)
    }

    /// A window of a mailbox's listing, sorted (and filtered by full-text search) near the data.
    /// A mailbox made of several records (see [`mailboxes`]) merges their listings by sort key.
    pub async fn query(&self, account: &str, mailbox: MailboxId, query: Query) -> Result<QueryResult, ServiceError> {
        let mailboxes = self.account_mailboxes(account)?;
        let views = mailboxes::views_of(&mailboxes, mailbox);
        self.query_views(account, mailbox, &views, query).await
    }

    /// [`Self::query`] over the mailbox's records (`views`), worked out once by the caller.
    async fn query_views(
        &self,
        account: &str,
        mailbox: MailboxId,
        views: &[MailboxId],
        query: Query,
    ) -> Result<QueryResult, ServiceError> {
        let container = Self::emails_of(account)?;
        let (ids, total) = self.listed_ids(account, mailbox, views, &query).await?;
        // One batched read of the page's records and listings, not a lookup each.
        let store = &self.inner.store;
        let records = store.records_by_id(container.id(), &ids)?;
        let states = store.local_states_by_id(container.id(), &ids)?;
        let mut page: Vec<(MessageRecord, Listing)> = records
            .into_iter()
            .zip(states)
            .filter_map(|(record, state)| Some((record?, state.and_then(|state| state.listing).unwrap_or_default())))
            .collect();
        if views.len() > 1 {
            // Several listings, each sorted: merge them by the sort key, then take the window.
            page.sort_by_cached_key(|(record, listing)| (query.sort.key(record, listing), record.id));
            if query.descending {
                page.reverse();
            }
            page = page.into_iter().skip(query.position).take(query.limit).collect();
        }
        let emails = page
            .into_iter()
            .map(|(record, listing)| Email::of(&record, mailbox, listing))
            .collect();
        Ok(QueryResult { emails, total })
    }

    /// The IDs of the window [`Self::query`] returns, and the size of the whole, without reading
    /// the emails when the mailbox is one record: an Email/query answers with IDs alone, and the
    /// page's emails are read once, by the Email/get that follows.
    pub async fn query_ids(
        &self,
        account: &str,
        mailbox: MailboxId,
        query: Query,
    ) -> Result<(Vec<MessageId>, usize), ServiceError> {
        let mailboxes = self.account_mailboxes(account)?;
        let views = mailboxes::views_of(&mailboxes, mailbox);
        if views.len() > 1 {
            let result = self.query_views(account, mailbox, &views, query).await?;
            return Ok((result.emails.iter().map(|email| email.id).collect(), result.total));
        }
        self.listed_ids(account, mailbox, &views, &query).await
    }

    /// The IDs a query reads from the sort indexes or the search index: the window itself for a
    /// mailbox of one record, each record's first `position + limit` otherwise (to be merged).
    async fn listed_ids(
        &self,
        account: &str,
        mailbox: MailboxId,
        views: &[MailboxId],
        query: &Query,
    ) -> Result<(Vec<MessageId>, usize), ServiceError> {
        let summary = self.mailbox(account, mailbox)?;
        let store = self.inner.store.clone();
        let window = query.position.saturating_add(query.limit);
        match query.search.clone().filter(|text| !text.trim().is_empty()) {
            Some(text) => {
                let index = self.inner.search.clone();
                let views = views.to_vec();
                let (sort, descending, single) = (query.sort, query.descending, views.len() == 1);
                let (position, limit) = (query.position, query.limit);
                tokio::task::spawn_blocking(move || -> Result<(Vec<MessageId>, usize), ServiceError> {
                    if single {
                        let hits = index.search(&store, views[0], &text, sort, descending, position, limit)?;
                        return Ok((hits.ids, hits.total));
                    }
                    let mut ids = Vec::new();
                    let mut total = 0;
                    for view in &views {
                        let hits = index.search(&store, *view, &text, sort, descending, 0, window)?;
                        ids.extend(hits.ids);
                        total += hits.total;
                    }
                    Ok((ids, total))
                })
                .await
                .map_err(|error| ServiceError::Unavailable(error.to_string()))?
            }
            None if views.len() == 1 => Ok((
                store.list_ids(views[0], query.sort, query.descending, query.position, query.limit)?,
                summary.total as usize,
            )),
            None => {
                let mut ids = Vec::new();
                for view in views {
                    ids.extend(store.list_ids(*view, query.sort, query.descending, 0, window)?);
                }
                Ok((ids, summary.total as usize))
            }
        }
    }

    /// Created, updated and expunged IDs of a mailbox since a modseq of this node (the modseqs
    /// of an account's mailboxes share one sequence).
    pub fn changes(
        &self,
        account: &str,
        mailbox: MailboxId,
        since: u64,
        limit: usize,
    ) -> Result<Changes, ServiceError> {
        self.mailbox(account, mailbox)?;
        let container = Self::emails_of(account)?.id();
        let mailboxes = self.account_mailboxes(account)?;
        let mut merged = Changes::default();
        let mut other_reason = false;
        for view in mailboxes::views_of(&mailboxes, mailbox) {
            let changes = self.inner.store.changes_since_in(container, view, since, limit)?;
            merged.created.extend(changes.created);
            merged.updated.extend(changes.updated);
            merged.expunged.extend(changes.expunged);
            merged.cannot_calculate |= changes.cannot_calculate;
            other_reason |= changes.cannot_calculate && !changes.expunges_purged;
            merged.modseq = merged.modseq.max(changes.modseq);
        }
        merged.expunges_purged = merged.cannot_calculate && !other_reason;
        Ok(merged)
    }

    /// What changed in `account` since `since` (a state this or any other node of the cluster
    /// returned; `None`: since the beginning): emails created, updated and destroyed, and the
    /// mailboxes whose records changed, at most `limit` emails.
    ///
    /// An email is also listed (as updated) when the mailbox it is shown in changes while its own
    /// record does not: its mailbox became an alias of a same-named one (two sites created the
    /// name while apart), or was deleted and the email is rescued to the INBOX, or its mailbox's
    /// record arrived after it. When a page lists a mailbox's change, it lists the emails of each
    /// such mailbox; what does not fit is carried in the state
    /// ([`crate::changes::PendingMailboxes`]) and listed first by the next page, in
    /// `(received, ID)` order, the same on every node (see [`feed`]).
    pub fn account_changes(
        &self,
        account: &str,
        since: Option<&str>,
        limit: usize,
    ) -> Result<AccountChanges, ServiceError> {
        let limit = limit.max(1);
        let emails = Self::emails_of(account)?.id();
        let mailbox_container = MailboxKey::mailboxes(account)?.id();
        let store = &self.inner.store;
        // The frontier is read before the log: every change it covers is then in what is read.
        let frontier = store.frontier()?;
        // A client that starts from nothing cannot have missed an expunge whose tombstone is gone.
        let (mut since, purged) = match since {
            Some(text) => (ChangeState::decode(text)?, store.purged_by_origin()?),
            None => (ChangeState::default(), Default::default()),
        };
        let mailboxes = self.account_mailboxes(account)?;
        let mut views = feed::ViewListing::new(since.pending.take());
        // Mailboxes the client was shown emails of without a mailbox, or in a mailbox this node
        // does not show them in: list them again.
        let mut shown = feed::ShownPlaces::take(&mut since);
        views.queue_placed(&mailboxes, &mut shown.unplaced);
        views.queue_realiased(&mailboxes, &mut shown.aliased);
        // Mailbox listings an earlier page left unfinished come first.
        let mut expanded = Vec::new();
        views.list(
            store,
            emails,
            &since,
            limit,
            &std::collections::BTreeSet::new(),
            &mut expanded,
        )?;
        if views.is_pending() || expanded.len() >= limit {
            // The page is full before the change log was read: the next page reads it.
            let mut new_state = since.clone();
            new_state.pending = views.pending();
            let updated = feed::named_emails(store, &mailboxes, emails, &expanded, &mut shown)?;
            shown.store_in(&mut new_state)?;
            return Ok(AccountChanges {
                created: Vec::new(),
                updated,
                destroyed: Vec::new(),
                mailboxes: Vec::new(),
                new_state: new_state.encode(),
                has_more: true,
            });
        }
        let changes = crate::changes::changes_since(
            &since,
            store.node(),
            &frontier,
            &purged,
            &store.account_log(account),
            limit - expanded.len(),
        )?;
        let mut changed_mailboxes = std::collections::BTreeSet::new();
        // The changed mailboxes whose emails this page lists: a snapshot new to the client, or
        // one at or below the frontier. A snapshot above it is listed again by every call until
        // the frontier passes it (the core's price for node hopping), and its mailbox's emails
        // with it would make a feed that never ends; the call whose bound passes it lists it at
        // or below the frontier, and its emails then.
        let mut moved_mailboxes = std::collections::BTreeSet::new();
        // Snapshot records name the mailbox they changed inside their bytes.
        let mut is_snapshot = |item: &u128, created: bool| -> Result<bool, ServiceError> {
            let id = MessageId(*item);
            if store.email_mailbox(account, id)? != Some(mailbox_container) {
                return Ok(false);
            }
            if let Some(record) = store.record(mailbox_container, id)? {
                if let Some(snapshot) = store
                    .blob(&record.blob)?
                    .and_then(|bytes| mailboxes::decode_snapshot(&bytes))
                {
                    changed_mailboxes.insert(snapshot.id);
                    let covered = record
                        .stamps_by_origin()
                        .iter()
                        .all(|(origin, time)| *time <= frontier.get(*origin));
                    if created || covered {
                        moved_mailboxes.insert(snapshot.id);
                    }
                }
            }
            Ok(true)
        };
        let mut created_items = Vec::new();
        for item in &changes.created {
            if !is_snapshot(item, true)? {
                created_items.push(MessageId(*item));
            }
        }
        let mut updated_items = Vec::new();
        for item in &changes.updated {
            if !is_snapshot(item, false)? {
                updated_items.push(MessageId(*item));
            }
        }
        // A destroyed snapshot record is a superseded mailbox snapshot, collected: its mailbox
        // is listed as changed, never its ID as a destroyed email.
        let mut destroyed = Vec::new();
        for item in &changes.destroyed {
            if !is_snapshot(item, false)? {
                destroyed.push(MessageId(*item));
            }
        }
        // The emails of each changed mailbox now shown elsewhere, as far as the page has room.
        views.queue_changed(&mailboxes, &moved_mailboxes, &since);
        let mut listed: std::collections::BTreeSet<MessageId> = created_items
            .iter()
            .chain(&updated_items)
            .chain(&destroyed)
            .copied()
            .collect();
        expanded.retain(|id| !listed.contains(id));
        listed.extend(expanded.iter().copied());
        let room = limit.saturating_sub(listed.len());
        views.list(store, emails, &since, room, &listed, &mut expanded)?;
        updated_items.extend(expanded);
        let mut new_state = changes.new_state;
        new_state.pending = views.pending();
        let created = feed::named_emails(store, &mailboxes, emails, &created_items, &mut shown)?;
        let updated = feed::named_emails(store, &mailboxes, emails, &updated_items, &mut shown)?;
        shown.store_in(&mut new_state)?;
        Ok(AccountChanges {
            created,
            updated,
            destroyed,
            mailboxes: changed_mailboxes.into_iter().collect(),
            has_more: changes.has_more || new_state.pending.is_some(),
            new_state: new_state.encode(),
        })
    }

    /// The count and fingerprint of a range of the account's emails trie (every mailbox of the
    /// account: the unit peers reconcile), and of its 16 children.
    pub fn range(&self, account: &str, prefix: Prefix) -> Result<(Aggregate, Vec<Aggregate>), ServiceError> {
        let key = Self::emails_of(account)?;
        let tree = self.inner.store.tree(Space::Mailbox(key.id()));
        let whole = tree.aggregate(prefix)?;
        let children = if prefix.depth() < crate::merkle::KEY_NIBBLES {
            tree.child_aggregates(prefix)?.to_vec()
        } else {
            Vec::new()
        };
        Ok((whole, children))
    }

    /// The account's email records whose IDs lie in `low..=high`, at most `limit`, with their
    /// leaf tags.
    pub fn range_entries(
        &self,
        account: &str,
        low: MessageId,
        high: MessageId,
        limit: usize,
    ) -> Result<Vec<RangeEntry>, ServiceError> {
        let key = Self::emails_of(account)?;
        Ok(self
            .inner
            .store
            .records_in_range(key.id(), low, high, limit)?
            .iter()
            .map(|record| {
                let hash = crate::crdt::state_hash(record);
                let mut state = [0u8; 8];
                state.copy_from_slice(&hash[..8]);
                RangeEntry {
                    id: record.id,
                    state,
                    live: record.is_live(),
                }
            })
            .collect())
    }

    /// Change notices for `account` (every account when `None`), from now on.
    pub fn subscribe(&self, account: Option<&str>) -> Subscription {
        Subscription {
            account: account.map(str::to_owned),
            receiver: self.inner.queue.feed(),
        }
    }
}

/// Parses flag names (`\Seen`, `$label`) for any protocol.
pub fn parse_flags(names: &[String]) -> Result<Vec<Flag>, ServiceError> {
    names
        .iter()
        .map(|name| name.parse::<Flag>().map_err(ServiceError::from))
        .collect()
}
