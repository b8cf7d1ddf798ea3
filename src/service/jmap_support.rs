//! Service calls JMAP needs that the rest of the service does not offer yet: the account's
//! current change state (what a fresh Email/get or Mailbox/get returns), finding a mailbox by
//! its handle, and finding an email by its ID alone (JMAP addresses emails without their
//! mailbox). Built only on public store calls;
//! once emails are addressed by (account, ID) in the service itself, `find_email` folds into it.

use crate::changes::{ChangeLog, ChangeState};
use crate::model::{MailboxId, MailboxKey, MessageId};

use super::{Email, MailService, ServiceError};

impl MailService {
    /// The account's change-feed state as it stands now, accepted by every node of the cluster:
    /// a client that reads the account after this call and later asks for the changes since it
    /// misses nothing. The log's latest times are read before the frontier, and both before the
    /// client's read: a change between the two reads is then at or below the frontier and in
    /// what the client reads.
    pub fn account_state(&self, account: &str) -> Result<String, ServiceError> {
        MailboxKey::new(account, "INBOX")?;
        let store = &self.inner.store;
        let latest = store.account_log(account).latest_by_origin()?;
        let frontier = store.frontier()?;
        Ok(ChangeState::current(&frontier, &latest).encode())
    }

    /// The name of the account's mailbox with this handle ([`MailboxKey::id`]), found without
    /// listing every mailbox: one that holds or held mail here, or the account's INBOX.
    pub fn mailbox_name_by_id(&self, account: &str, id: MailboxId) -> Result<Option<String>, ServiceError> {
        if let Some(entry) = self.inner.store.mailbox_entry(id)? {
            return Ok((entry.key.account() == account).then(|| entry.key.mailbox().to_owned()));
        }
        let inbox = MailboxKey::new(account, "INBOX")?;
        if inbox.id() == id {
            return match self.mailbox(account, "INBOX") {
                Ok(_) => Ok(Some("INBOX".to_owned())),
                Err(ServiceError::NoSuchMailbox(_)) => Ok(None),
                Err(other) => Err(other),
            };
        }
        Ok(None)
    }

    /// The name of the mailbox that holds (or last held) an email of the account on this node.
    pub fn email_mailbox_name(&self, account: &str, id: MessageId) -> Result<Option<String>, ServiceError> {
        MailboxKey::new(account, "INBOX")?;
        let store = &self.inner.store;
        let Some(mailbox) = store.email_mailbox(account, id)? else {
            return Ok(None);
        };
        Ok(store
            .mailbox_entry(mailbox)?
            .filter(|entry| entry.key.account() == account)
            .map(|entry| entry.key.mailbox().to_owned()))
    }

    /// A live email of the account found by its ID alone, with the name of its mailbox.
    pub fn find_email(&self, account: &str, id: MessageId) -> Result<Option<(String, Email)>, ServiceError> {
        let Some(mailbox) = self.email_mailbox_name(account, id)? else {
            return Ok(None);
        };
        match self.email(account, &mailbox, id) {
            Ok(email) => Ok(Some((mailbox, email))),
            Err(ServiceError::NoSuchMessage(_)) => Ok(None),
            Err(other) => Err(other),
        }
    }
}
