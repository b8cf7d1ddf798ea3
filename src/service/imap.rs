//! Service calls that IMAP needs over whole mailboxes, answered from the store's indexes so that
//! a 100,000-message mailbox costs one index scan and not one listing per message: the IDs in a
//! sort order (SORT), and an email's record without its listing (FETCH FLAGS, SIZE, dates).

use super::{Email, MailService, ServiceError, SortKey};
use crate::mail::Listing;
use crate::model::{MailboxKey, MessageId};

impl MailService {
    /// Every live message's ID in a sort order of the mailbox's sort indexes (a mailbox made of
    /// several records merges their orders by the sort key).
    pub fn sorted_ids(
        &self,
        account: &str,
        mailbox: &str,
        sort: SortKey,
        descending: bool,
    ) -> Result<Vec<MessageId>, ServiceError> {
        let id = self.find_mailbox(account, mailbox)?;
        let mailboxes = self.account_mailboxes(account)?;
        let views = super::mailboxes::views_of(&mailboxes, id);
        if let [view] = views.as_slice() {
            return Ok(self.inner.store.list_ids(*view, sort, descending, 0, usize::MAX)?);
        }
        let mut all = Vec::new();
        for view in views {
            all.extend(self.inner.store.list(view, sort, descending, 0, usize::MAX)?);
        }
        all.sort_by_cached_key(|(record, listing)| (sort.key(record, listing), record.id));
        if descending {
            all.reverse();
        }
        Ok(all.into_iter().map(|(record, _)| record.id).collect())
    }

    /// A live message's metadata from its record alone: flags, size and received time, with
    /// `from`, `subject` and `date_millis` left empty (one read instead of two).
    pub fn email_record(&self, account: &str, id: MessageId) -> Result<Email, ServiceError> {
        let container = MailboxKey::emails(account)?;
        let record = match self.inner.store.record(container.id(), id)? {
            Some(record) if record.is_live() => record,
            _ => return Err(ServiceError::NoSuchMessage(id)),
        };
        let placement = self
            .account_mailboxes(account)?
            .tree
            .place(record.location.mailbox)
            .ok_or(ServiceError::NoSuchMessage(id))?;
        Ok(Email::of(&record, placement.mailbox(), Listing::default()))
    }
}

impl MailService {
    /// A live message's node-local modseq (CONDSTORE's MODSEQ, RFC 7162): the modseq of its last
    /// change here, in the sequence its mailbox's [`MailService::changes`] counts.
    pub fn email_modseq(&self, account: &str, id: MessageId) -> Result<u64, ServiceError> {
        let container = MailboxKey::emails(account)?;
        match self.inner.store.local_state(container.id(), id)? {
            Some(state) if state.listing.is_some() => Ok(state.modseq),
            _ => Err(ServiceError::NoSuchMessage(id)),
        }
    }
}
