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
        MailboxKey::emails(account)?;
        let store = &self.inner.store;
        let latest = store.account_log(account).latest_by_origin()?;
        let frontier = store.frontier()?;
        Ok(ChangeState::current(&frontier, &latest).encode())
    }

    /// The path of the account's mailbox with this ID, if it is shown.
    pub fn mailbox_name_by_id(&self, account: &str, id: MailboxId) -> Result<Option<String>, ServiceError> {
        match self.mailbox(account, id) {
            Ok(summary) => Ok(Some(summary.name)),
            Err(ServiceError::NoSuchMailbox(_)) => Ok(None),
            Err(other) => Err(other),
        }
    }

    /// The path of the mailbox a live email of the account is shown in.
    pub fn email_mailbox_name(&self, account: &str, id: MessageId) -> Result<Option<String>, ServiceError> {
        Ok(self.find_email(account, id)?.map(|(name, _)| name))
    }

    /// A live email of the account found by its ID, with the path of its mailbox.
    pub fn find_email(&self, account: &str, id: MessageId) -> Result<Option<(String, Email)>, ServiceError> {
        match self.email(account, id) {
            Ok(email) => Ok(self
                .mailbox_name_by_id(account, email.mailbox)?
                .map(|name| (name, email))),
            Err(ServiceError::NoSuchMessage(_)) => Ok(None),
            Err(other) => Err(other),
        }
    }
}
