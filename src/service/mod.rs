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
//! # What this version covers
//! Mailboxes are addressed by (account, name) and exist once they hold a message (INBOX always
//! does); an email stays in the mailbox it was delivered to, and the change feed is the node-local
//! modseq of one mailbox. The replicated mailbox objects with stable IDs, moves and the change
//! feed any site accepts are in the pure core (`mailbox`, `changes`) and come to this interface
//! when the store carries them (docs/mail-model.md); the calls keep their shape, their mailbox
//! arguments turn into IDs.

pub mod imap;
pub mod uids;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::broadcast;

use crate::accounts::{AccountName, Accounts, AuthenticationError, Password};
use crate::changes::{ChangeState, ChangesError};
use crate::environment::Environment;
use crate::mail::Listing;
use crate::merkle::{Aggregate, Prefix, TreeView};
use crate::metrics::{NodeMetrics, WriteLabel};
use crate::model::{BlobHash, Flag, MailboxKey, MessageId, MessageRecord, ModelError};
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
    pub name: String,
    /// Live messages.
    pub total: u64,
    /// Live messages without `\Seen`.
    pub unseen: u64,
    /// Expunged records still kept so the expunge reaches every replica.
    pub tombstones: u64,
    /// The fingerprint of the mailbox's replicated state (equal on two nodes means equal content).
    pub root: String,
}

/// An email's metadata, as every protocol lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Email {
    pub id: MessageId,
    pub blob: BlobHash,
    pub size: u64,
    pub received_millis: u64,
    /// The `Date:` header, when it parses.
    pub date_millis: Option<u64>,
    pub from: String,
    pub subject: String,
    pub flags: Vec<Flag>,
}

impl Email {
    fn of(record: &MessageRecord, listing: Listing) -> Email {
        Email {
            id: record.id,
            blob: record.blob,
            size: record.size,
            received_millis: record.received_millis,
            date_millis: listing.date_millis,
            from: listing.from,
            subject: listing.subject,
            flags: record.set_flags().into_iter().cloned().collect(),
        }
    }
}

/// A message to store: an LMTP delivery, an IMAP APPEND, an import or an HTTP POST.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub account: String,
    pub mailbox: String,
    pub raw: Vec<u8>,
    pub flags: Vec<Flag>,
    /// When it was received, if not now (an import keeps the original date).
    pub received_millis: Option<u64>,
    /// Answer with the existing message instead of storing a second copy when the mailbox
    /// already holds a live message with the same bytes (what makes an import resumable).
    pub skip_duplicate: bool,
}

/// What a delivery stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivered {
    pub id: MessageId,
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
    /// The mailbox's name (absent when this node no longer knows it).
    pub mailbox: Option<String>,
}

/// What changed in an account since a state, and the state to ask from next. The state is
/// accepted by every node of the cluster, so a client that fails over carries on from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountChanges {
    pub created: Vec<ChangedEmail>,
    /// May repeat an email the client already knows (RFC 8620 allows it); never a creation twice.
    pub updated: Vec<ChangedEmail>,
    pub destroyed: Vec<MessageId>,
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
        mailbox: String,
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
                        mailbox: change.mailbox.mailbox().to_owned(),
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
}

impl MailService {
    pub fn new(parts: ServiceParts) -> MailService {
        MailService { inner: Arc::new(parts) }
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
        let candidates = [
            (address.to_owned(), None),
            (address.to_lowercase(), None),
            (format!("{base}@{domain}"), detail),
            (format!("{base}@{domain}").to_lowercase(), detail),
        ];
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
        let Ok(key) = MailboxKey::new(account, mailbox) else {
            return Ok(false);
        };
        Ok(self.inner.store.mailbox_entry(key.id())?.is_some())
    }

    // -----------------------------------------------------------------------------------------
    // Mailboxes
    // -----------------------------------------------------------------------------------------

    /// The account's mailboxes, INBOX first. An account of the accounts file has its INBOX before
    /// the first message arrives; with no accounts file (the open setup) a mailbox exists once it
    /// holds a message, as the HTTP API has always answered.
    pub fn mailboxes(&self, account: &str) -> Result<Vec<MailboxSummary>, ServiceError> {
        let inbox = MailboxKey::new(account, "INBOX")?;
        let mut mailboxes: Vec<MailboxSummary> = self
            .inner
            .store
            .mailboxes()?
            .into_iter()
            .filter(|entry| entry.key.account() == account)
            .map(summary_of)
            .collect();
        if self.has_accounts()
            && self.account_exists(account)?
            && !mailboxes.iter().any(|mailbox| mailbox.name == inbox.mailbox())
        {
            mailboxes.push(empty_summary(&inbox));
        }
        mailboxes.sort_by(|left, right| (left.name != "INBOX", &left.name).cmp(&(right.name != "INBOX", &right.name)));
        Ok(mailboxes)
    }

    /// Every mailbox of every account held here (the operator's view).
    pub fn all_mailboxes(&self) -> Result<Vec<MailboxSummary>, ServiceError> {
        Ok(self.inner.store.mailboxes()?.into_iter().map(summary_of).collect())
    }

    /// One mailbox (see [`MailService::mailboxes`] for when an empty INBOX exists).
    pub fn mailbox(&self, account: &str, mailbox: &str) -> Result<MailboxSummary, ServiceError> {
        let key = MailboxKey::new(account, mailbox)?;
        match self.inner.store.mailbox_entry(key.id())? {
            Some(entry) => Ok(summary_of(entry)),
            None if key.mailbox() == "INBOX" && self.has_accounts() && self.account_exists(account)? => {
                Ok(empty_summary(&key))
            }
            None => Err(ServiceError::NoSuchMailbox(mailbox.to_owned())),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Writes
    // -----------------------------------------------------------------------------------------

    /// Stores a message; returns once it is durable on this node.
    pub async fn deliver(&self, delivery: Delivery) -> Result<Delivered, ServiceError> {
        let key = MailboxKey::new(&delivery.account, &delivery.mailbox)?;
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
        if delivery.skip_duplicate {
            let blob = BlobHash::of(&delivery.raw);
            if let Some(id) = self.inner.store.live_message_with_blob(key.id(), &blob)? {
                return Ok(Delivered {
                    id,
                    blob,
                    size,
                    duplicate: true,
                });
            }
        }
        let applied = self
            .inner
            .queue
            .submit(Operation::Append {
                mailbox: key,
                raw: delivery.raw,
                flags: delivery.flags,
                received_millis: delivery.received_millis,
                now_millis: now,
                random: self.inner.environment.random(),
            })
            .await?;
        let Applied::Appended { id, blob, size, .. } = applied else {
            return Err(ServiceError::Unavailable(
                "the store answered an append with no message".into(),
            ));
        };
        self.count_write("append");
        Ok(Delivered {
            id,
            blob,
            size,
            duplicate: false,
        })
    }

    /// Sets and clears flags of a live message; returns the message as it now stands.
    pub async fn set_flags(
        &self,
        account: &str,
        mailbox: &str,
        id: MessageId,
        add: Vec<Flag>,
        remove: Vec<Flag>,
    ) -> Result<Email, ServiceError> {
        let key = MailboxKey::new(account, mailbox)?;
        self.live_record(&key, id)?;
        let applied = self
            .inner
            .queue
            .submit(Operation::SetFlags {
                mailbox: key.clone(),
                id,
                add,
                remove,
                now_millis: self.inner.environment.now_millis(),
            })
            .await?;
        let Applied::Record { record, changed } = applied else {
            return Err(ServiceError::Unavailable(
                "the store answered a flag change with no record".into(),
            ));
        };
        if changed {
            self.count_write("flags");
        }
        self.email_of(&key, &record)
    }

    /// Expunges a live message (the expunge replicates as a tombstone).
    pub async fn destroy(&self, account: &str, mailbox: &str, id: MessageId) -> Result<(), ServiceError> {
        let key = MailboxKey::new(account, mailbox)?;
        self.live_record(&key, id)?;
        let applied = self
            .inner
            .queue
            .submit(Operation::Expunge {
                mailbox: key,
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

    fn live_record(&self, key: &MailboxKey, id: MessageId) -> Result<MessageRecord, ServiceError> {
        match self.inner.store.record(key.id(), id)? {
            Some(record) if record.is_live() => Ok(record),
            _ => Err(ServiceError::NoSuchMessage(id)),
        }
    }

    fn email_of(&self, key: &MailboxKey, record: &MessageRecord) -> Result<Email, ServiceError> {
        let listing = self
            .inner
            .store
            .local_state(key.id(), record.id)?
            .and_then(|state| state.listing)
            .unwrap_or_default();
        Ok(Email::of(record, listing))
    }

    /// A live message's metadata.
    pub fn email(&self, account: &str, mailbox: &str, id: MessageId) -> Result<Email, ServiceError> {
        let key = MailboxKey::new(account, mailbox)?;
        let record = self.live_record(&key, id)?;
        self.email_of(&key, &record)
    }

    /// A live message's bytes, exactly as delivered.
    pub fn raw(&self, account: &str, mailbox: &str, id: MessageId) -> Result<Vec<u8>, ServiceError> {
        let key = MailboxKey::new(account, mailbox)?;
        let record = self.live_record(&key, id)?;
        self.inner.store.blob(&record.blob)?.ok_or(ServiceError::BodyNotYetHere)
    }

    /// A window of a mailbox's listing, sorted (and filtered by full-text search) near the data.
    pub async fn query(&self, account: &str, mailbox: &str, query: Query) -> Result<QueryResult, ServiceError> {
        let key = MailboxKey::new(account, mailbox)?;
        let entry = self.mailbox(account, mailbox)?;
        match query.search.filter(|text| !text.trim().is_empty()) {
            Some(text) => {
                let store = self.inner.store.clone();
                let index = self.inner.search.clone();
                let mailbox_id = key.id();
                let hits = tokio::task::spawn_blocking(move || {
                    index.search(
                        &store,
                        mailbox_id,
                        &text,
                        query.sort,
                        query.descending,
                        query.position,
                        query.limit,
                    )
                })
                .await
                .map_err(|error| ServiceError::Unavailable(error.to_string()))??;
                let mut emails = Vec::with_capacity(hits.ids.len());
                for id in hits.ids {
                    if let Some(record) = self.inner.store.record(key.id(), id)? {
                        emails.push(self.email_of(&key, &record)?);
                    }
                }
                Ok(QueryResult {
                    emails,
                    total: hits.total,
                })
            }
            None => {
                let emails = self
                    .inner
                    .store
                    .list(key.id(), query.sort, query.descending, query.position, query.limit)?
                    .into_iter()
                    .map(|(record, listing)| Email::of(&record, listing))
                    .collect();
                Ok(QueryResult {
                    emails,
                    total: entry.total as usize,
                })
            }
        }
    }

    /// Created, updated and expunged IDs since a modseq of this node.
    pub fn changes(&self, account: &str, mailbox: &str, since: u64, limit: usize) -> Result<Changes, ServiceError> {
        let key = MailboxKey::new(account, mailbox)?;
        Ok(self.inner.store.changes_since(key.id(), since, limit)?)
    }

    /// The emails of `account` created, updated and destroyed since `since` (a state this or any
    /// other node of the cluster returned; `None`: since the beginning), at most about `limit`.
    pub fn account_changes(
        &self,
        account: &str,
        since: Option<&str>,
        limit: usize,
    ) -> Result<AccountChanges, ServiceError> {
        MailboxKey::new(account, "INBOX")?;
        let store = &self.inner.store;
        // The frontier is read before the log: every change it covers is then in what is read.
        let frontier = store.frontier()?;
        // A client that starts from nothing cannot have missed an expunge whose tombstone is gone.
        let (since, purged) = match since {
            Some(text) => (ChangeState::decode(text)?, store.purged_by_origin()?),
            None => (ChangeState::default(), Default::default()),
        };
        let changes = crate::changes::changes_since(
            &since,
            store.node(),
            &frontier,
            &purged,
            &store.account_log(account),
            limit.max(1),
        )?;
        let named = |item: &u128| -> Result<ChangedEmail, ServiceError> {
            let id = MessageId(*item);
            let mailbox = match store.email_mailbox(account, id)? {
                Some(mailbox) => store
                    .mailbox_entry(mailbox)?
                    .map(|entry| entry.key.mailbox().to_owned()),
                None => None,
            };
            Ok(ChangedEmail { id, mailbox })
        };
        Ok(AccountChanges {
            created: changes.created.iter().map(named).collect::<Result<_, _>>()?,
            updated: changes.updated.iter().map(named).collect::<Result<_, _>>()?,
            destroyed: changes.destroyed.iter().map(|item| MessageId(*item)).collect(),
            new_state: changes.new_state.encode(),
            has_more: changes.has_more,
        })
    }

    /// The count and fingerprint of a range of a mailbox's trie, and of its 16 children.
    pub fn range(
        &self,
        account: &str,
        mailbox: &str,
        prefix: Prefix,
    ) -> Result<(Aggregate, Vec<Aggregate>), ServiceError> {
        let key = MailboxKey::new(account, mailbox)?;
        let tree = self.inner.store.tree(Space::Mailbox(key.id()));
        let whole = tree.aggregate(prefix)?;
        let children = if prefix.depth() < crate::merkle::KEY_NIBBLES {
            tree.child_aggregates(prefix)?.to_vec()
        } else {
            Vec::new()
        };
        Ok((whole, children))
    }

    /// The records whose IDs lie in `low..=high`, at most `limit`, with their leaf tags.
    pub fn range_entries(
        &self,
        account: &str,
        mailbox: &str,
        low: MessageId,
        high: MessageId,
        limit: usize,
    ) -> Result<Vec<RangeEntry>, ServiceError> {
        let key = MailboxKey::new(account, mailbox)?;
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

fn summary_of(entry: crate::store::MailboxEntry) -> MailboxSummary {
    MailboxSummary {
        account: entry.key.account().to_owned(),
        name: entry.key.mailbox().to_owned(),
        total: entry.live,
        unseen: entry.unseen,
        tombstones: entry.records.saturating_sub(entry.live),
        root: format!("{:?}", entry.root),
    }
}

fn empty_summary(key: &MailboxKey) -> MailboxSummary {
    MailboxSummary {
        account: key.account().to_owned(),
        name: key.mailbox().to_owned(),
        total: 0,
        unseen: 0,
        tombstones: 0,
        root: format!("{:?}", crate::model::FixedBytes(Aggregate::default().root_hash())),
    }
}

/// Parses flag names (`\Seen`, `$label`) for any protocol.
pub fn parse_flags(names: &[String]) -> Result<Vec<Flag>, ServiceError> {
    names
        .iter()
        .map(|name| name.parse::<Flag>().map_err(ServiceError::from))
        .collect()
}
