//! Service calls that IMAP needs over whole mailboxes, answered from the store's indexes so that
//! a 100,000-message mailbox costs one index scan and not one listing per message: the IDs in a
//! sort order (SORT), and an email's record without its listing (FETCH FLAGS, SIZE, dates).

use super::{Email, MailService, ServiceError, SortKey};
use crate::mail::Listing;
use crate::model::{MailboxKey, MessageId};

impl MailService {
    /// Every live message's ID in a sort order of the mailbox's sort indexes.
    pub fn sorted_ids(
        &self,
        account: &str,
        mailbox: &str,
        sort: SortKey,
        descending: bool,
    ) -> Result<Vec<MessageId>, ServiceError> {
        let key = MailboxKey::new(account, mailbox)?;
        Ok(self.inner.store.list_ids(key.id(), sort, descending, 0, usize::MAX)?)
    }

    /// A live message's metadata from its record alone: flags, size and received time, with
    /// `from`, `subject` and `date_millis` left empty (one read instead of two).
    pub fn email_record(&self, account: &str, mailbox: &str, id: MessageId) -> Result<Email, ServiceError> {
        let key = MailboxKey::new(account, mailbox)?;
        let record = self.live_record(&key, id)?;
        Ok(Email::of(&record, Listing::default()))
    }
}
