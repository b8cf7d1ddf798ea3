//! Threads (RFC 8621 §3), computed from the replicated mail so that every node gives the same
//! emails the same thread id.
//!
//! # How an email's thread is chosen
//! An email's thread is a pure function of its own headers ([`thread_id`]): the thread's root is
//! the first message id of its `References` header (RFC 5322 §3.6.4 has a reply keep the
//! parent's References and add the parent, so the first entry is the message that started the
//! conversation), else the first of `In-Reply-To`, else its own `Message-ID`, else (no such
//! headers at all) the email's own replicated ID. The root and the subject with its reply and
//! forward prefixes stripped (mail-parser's `thread_name`, compared in lower case with white
//! space runs as one space) are hashed into the thread id: RFC 8621 lets a server keep emails
//! apart whose subjects differ, and a reply that changes the subject starts a thread of its own,
//! as Gmail does.
//!
//! Because nothing but the email itself goes in, the id does not depend on arrival order: a
//! reply that arrives before its parent is already in the parent's thread (it names the root in
//! its References), and the parent joins it when it arrives. It never changes afterwards, which
//! RFC 8621 requires of `threadId`, and two nodes holding the same email compute the same id
//! without talking. The price of that choice: a reply that carries only `In-Reply-To` naming a
//! message that is itself a reply (no References) starts a thread at its parent, not at the
//! conversation's root; merging such threads later would change ids that are immutable.
//!
//! # The index
//! Thread/get needs the other direction, a thread's emails. [`ThreadIndex`] keeps it in memory
//! per account, filled from the account's change feed on first use and brought up to date from
//! the same feed before every answer. It is a cache: never replicated, rebuilt after a restart by
//! reading the headers of every live email of the account once. It also remembers the thread of
//! each email it saw destroyed, for Thread/changes; a destroy from before the index was built is
//! not known, and such a state gets cannotCalculateChanges.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Mutex;

use crate::model::MessageId;

use super::{MailService, ServiceError};

/// The feed entries read per page while the index catches up.
const FEED_PAGE: usize = 1000;

/// A message id without its angle brackets and surrounding white space.
fn clean_message_id(id: &str) -> Option<String> {
    let trimmed = id.trim().trim_start_matches('<').trim_end_matches('>').trim();
    (!trimmed.is_empty()).then(|| trimmed.to_owned())
}

fn first_of(value: &mail_parser::HeaderValue<'_>) -> Option<String> {
    match value {
        mail_parser::HeaderValue::Text(text) => clean_message_id(text),
        mail_parser::HeaderValue::TextList(list) => list.iter().find_map(|item| clean_message_id(item)),
        _ => None,
    }
}

/// The subject a thread is known by: reply and forward prefixes off, lower case, white space
/// runs as one space.
pub fn thread_subject(subject: &str) -> String {
    mail_parser::parsers::fields::thread::thread_name(subject)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// What a message's thread is computed from: its root message id (`None` when it names none)
/// and its thread subject.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThreadKey {
    pub root: Option<String>,
    pub subject: String,
}

impl ThreadKey {
    /// Reads the key from a message's headers.
    pub fn of(raw: &[u8]) -> ThreadKey {
        let Some(message) = mail_parser::MessageParser::default().parse_headers(raw) else {
            return ThreadKey {
                root: None,
                subject: String::new(),
            };
        };
        let root = first_of(message.references())
            .or_else(|| first_of(message.in_reply_to()))
            .or_else(|| message.message_id().and_then(clean_message_id));
        ThreadKey {
            root,
            subject: thread_subject(message.subject().unwrap_or_default()),
        }
    }

    /// The thread id of the email with this key: `T` and 32 hex digits of the BLAKE3 hash of
    /// its root (the email's own ID when it names none) and its thread subject: a JMAP Id, and
    /// never an email id (those are 26 characters).
    pub fn thread_id(&self, email: MessageId) -> String {
        let root = self.root.clone().unwrap_or_else(|| format!("mailmesh:{email}"));
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"mailmesh thread v1\0");
        hasher.update(root.as_bytes());
        hasher.update(b"\0");
        hasher.update(self.subject.as_bytes());
        format!("T{}", &hasher.finalize().to_hex()[..32])
    }
}

/// The thread id of a message (see [`ThreadKey::thread_id`]).
pub fn thread_id(raw: &[u8], email: MessageId) -> String {
    ThreadKey::of(raw).thread_id(email)
}

/// What one account's index holds.
#[derive(Default)]
struct AccountThreads {
    /// The feed state applied (`None`: not built yet).
    state: Option<String>,
    /// Live emails: their thread and when they were received.
    thread_of: HashMap<MessageId, (String, u64)>,
    /// Each thread's live emails by (received time, ID): the order Thread/get lists them in.
    members: HashMap<String, BTreeSet<(u64, MessageId)>>,
    /// Emails this index saw destroyed, with their thread.
    gone: HashMap<MessageId, String>,
    /// Live emails whose bytes have not arrived yet: their thread is not known until they do.
    pending: BTreeSet<MessageId>,
}

impl AccountThreads {
    fn add(&mut self, service: &MailService, account: &str, id: MessageId) -> Result<(), ServiceError> {
        if self.thread_of.contains_key(&id) {
            return Ok(());
        }
        let email = match service.email(account, id) {
            Ok(email) => email,
            Err(ServiceError::NoSuchMessage(_)) => {
                self.pending.remove(&id);
                return Ok(());
            }
            Err(other) => return Err(other),
        };
        let raw = match service.raw(account, id) {
            Ok(raw) => raw,
            Err(ServiceError::BodyNotYetHere) => {
                self.pending.insert(id);
                return Ok(());
            }
            Err(ServiceError::NoSuchMessage(_)) => return Ok(()),
            Err(other) => return Err(other),
        };
        self.pending.remove(&id);
        let thread = thread_id(&raw, id);
        self.members
            .entry(thread.clone())
            .or_default()
            .insert((email.received_millis, id));
        self.thread_of.insert(id, (thread, email.received_millis));
        Ok(())
    }

    fn remove(&mut self, id: MessageId) {
        self.pending.remove(&id);
        if let Some((thread, received)) = self.thread_of.remove(&id) {
            if let Some(members) = self.members.get_mut(&thread) {
                members.remove(&(received, id));
                if members.is_empty() {
                    self.members.remove(&thread);
                }
            }
            self.gone.insert(id, thread);
        }
    }

    /// Applies the feed from the held state on.
    fn catch_up(&mut self, service: &MailService, account: &str) -> Result<(), ServiceError> {
        let pending: Vec<MessageId> = self.pending.iter().copied().collect();
        for id in pending {
            self.add(service, account, id)?;
        }
        loop {
            let page = service.account_changes(account, self.state.as_deref(), FEED_PAGE)?;
            for email in page.created.iter().chain(&page.updated) {
                if email.mailbox.is_some() {
                    self.add(service, account, email.id)?;
                }
            }
            for id in &page.destroyed {
                self.remove(*id);
            }
            self.state = Some(page.new_state);
            if !page.has_more {
                return Ok(());
            }
        }
    }
}

/// A thread as Thread/get shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Thread {
    pub id: String,
    /// Oldest first by received time, then by ID (RFC 8621 §3).
    pub emails: Vec<MessageId>,
}

/// What changed among an account's threads since a state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ThreadChanges {
    pub created: Vec<String>,
    pub updated: Vec<String>,
    pub destroyed: Vec<String>,
    pub new_state: String,
    pub has_more: bool,
}

/// The node's thread index: a local, rebuildable cache over the mail service.
#[derive(Default)]
pub struct ThreadIndex {
    accounts: Mutex<HashMap<String, AccountThreads>>,
}

impl ThreadIndex {
    fn with_account<T>(
        &self,
        service: &MailService,
        account: &str,
        work: impl FnOnce(&mut AccountThreads) -> Result<T, ServiceError>,
    ) -> Result<T, ServiceError> {
        // A panic while the lock was held leaves a cache that may be half updated: start over.
        let mut accounts = self.accounts.lock().unwrap_or_else(|poisoned| {
            let mut accounts = poisoned.into_inner();
            accounts.clear();
            accounts
        });
        let threads = accounts.entry(account.to_owned()).or_default();
        threads.catch_up(service, account)?;
        work(threads)
    }

    /// The threads with these ids, up to date with the feed; `None` for an id with no live email.
    pub fn threads(
        &self,
        service: &MailService,
        account: &str,
        ids: &[String],
    ) -> Result<Vec<Option<Thread>>, ServiceError> {
        self.with_account(service, account, |threads| {
            Ok(ids
                .iter()
                .map(|id| {
                    threads.members.get(id).map(|members| Thread {
                        id: id.clone(),
                        emails: members.iter().map(|(_, email)| *email).collect(),
                    })
                })
                .collect())
        })
    }

    /// The thread id of a live email, if its bytes are here.
    pub fn thread_of(
        &self,
        service: &MailService,
        account: &str,
        id: MessageId,
    ) -> Result<Option<String>, ServiceError> {
        self.with_account(service, account, |threads| {
            Ok(threads.thread_of.get(&id).map(|(thread, _)| thread.clone()))
        })
    }

    /// The thread id of each of these live emails (`None` where its bytes are not here, or it
    /// is not live), all read under one catch-up with the feed: what collapseThreads needs for a
    /// page of a listing.
    pub fn threads_of(
        &self,
        service: &MailService,
        account: &str,
        ids: &[MessageId],
    ) -> Result<Vec<Option<String>>, ServiceError> {
        self.with_account(service, account, |threads| {
            Ok(ids
                .iter()
                .map(|id| threads.thread_of.get(id).map(|(thread, _)| thread.clone()))
                .collect())
        })
    }

    /// The threads whose emails changed since `since` (a state of the account's feed, from any
    /// node), at most `max` of them: a thread with no live email now is destroyed, one made only
    /// of emails created since is created, any other is updated (a flag change or move of one of
    /// its emails makes it updated too, which RFC 8620 allows: the client refetches it).
    pub fn changes(
        &self,
        service: &MailService,
        account: &str,
        since: &str,
        max: usize,
    ) -> Result<ThreadChanges, ServiceError> {
        self.with_account(service, account, |threads| {
            let mut state = since.to_owned();
            let mut created_emails: HashSet<MessageId> = HashSet::new();
            let mut touched: Vec<String> = Vec::new();
            let mut seen: HashSet<String> = HashSet::new();
            let mut lost: HashSet<String> = HashSet::new();
            let mut has_more;
            loop {
                let room = max.saturating_sub(touched.len()).max(1);
                let page = service.account_changes(account, Some(&state), room)?;
                let thread_of = |id: MessageId, destroyed: bool| -> Result<Option<String>, ServiceError> {
                    if let Some((thread, _)) = threads.thread_of.get(&id) {
                        return Ok(Some(thread.clone()));
                    }
                    if let Some(thread) = threads.gone.get(&id) {
                        return Ok(Some(thread.clone()));
                    }
                    if destroyed {
                        return Err(ServiceError::CannotCalculateChanges(format!(
                            "email {id} was destroyed before this node's thread index was built: resync threads"
                        )));
                    }
                    Ok(None) // its bytes are not here yet, or it is gone again
                };
                let mut found = Vec::new();
                for email in &page.created {
                    created_emails.insert(email.id);
                    found.push(thread_of(email.id, false)?);
                }
                for email in &page.updated {
                    found.push(thread_of(email.id, false)?);
                }
                for id in &page.destroyed {
                    let thread = thread_of(*id, true)?;
                    if let Some(thread) = &thread {
                        lost.insert(thread.clone());
                    }
                    found.push(thread);
                }
                for thread in found.into_iter().flatten() {
                    if seen.insert(thread.clone()) {
                        touched.push(thread);
                    }
                }
                state = page.new_state;
                has_more = page.has_more;
                if !has_more || touched.len() >= max {
                    break;
                }
            }
            let mut changes = ThreadChanges {
                new_state: state,
                has_more,
                ..ThreadChanges::default()
            };
            for thread in touched {
                match threads.members.get(&thread) {
                    None => changes.destroyed.push(thread),
                    Some(members)
                        if !lost.contains(&thread) && members.iter().all(|(_, id)| created_emails.contains(id)) =>
                    {
                        changes.created.push(thread)
                    }
                    Some(_) => changes.updated.push(thread),
                }
            }
            Ok(changes)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{thread_id, thread_subject};
    use crate::model::MessageId;

    #[test]
    fn replies_share_the_root_s_thread_whatever_their_order() {
        let root = b"Message-ID: <root@example.net>\r\nSubject: Plan\r\n\r\nbody\r\n";
        let reply = b"Message-ID: <r1@example.net>\r\nIn-Reply-To: <root@example.net>\r\nReferences: <root@example.net>\r\nSubject: Re: Plan\r\n\r\nbody\r\n";
        let deeper = b"Message-ID: <r2@example.net>\r\nIn-Reply-To: <r1@example.net>\r\nReferences: <root@example.net>\r\n <r1@example.net>\r\nSubject: RE: Fwd: plan\r\n\r\nbody\r\n";
        let only_parent =
            b"Message-ID: <r3@example.net>\r\nIn-Reply-To: <root@example.net>\r\nSubject: Re: Plan\r\n\r\nx\r\n";
        let other_subject =
            b"Message-ID: <r4@example.net>\r\nReferences: <root@example.net>\r\nSubject: Something else\r\n\r\nx\r\n";
        let id = |n: u128| MessageId(n);
        let thread = thread_id(root, id(1));
        assert!(thread.starts_with('T') && thread.len() == 33, "{thread}");
        assert_eq!(thread_id(reply, id(2)), thread);
        assert_eq!(thread_id(deeper, id(3)), thread);
        assert_eq!(thread_id(only_parent, id(4)), thread);
        assert_ne!(thread_id(other_subject, id(5)), thread);
        // No ids at all: the email's own replicated ID is the root, so two such emails differ.
        let bare = b"Subject: Plan\r\n\r\nx\r\n";
        assert_ne!(thread_id(bare, id(6)), thread_id(bare, id(7)));
        assert_eq!(thread_id(bare, id(6)), thread_id(bare, id(6)));
        assert_eq!(thread_id(b"", id(8)), thread_id(b"", id(8)));
        assert_eq!(
            thread_subject("Re:  [list]  Big   Plan"),
            thread_subject("re: [list] big plan")
        );
    }
}
