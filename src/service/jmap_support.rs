//! Service calls JMAP needs that the rest of the service does not offer yet: the account's
//! current change state (what a fresh Email/get or Mailbox/get returns), finding a mailbox by
//! its handle, finding an email by its ID alone (JMAP addresses emails without their
//! mailbox), and where emails stand in a mailbox's sorted listing (Email/queryChanges and
//! Email/query's anchor). Built only on public store calls;
//! once emails are addressed by (account, ID) in the service itself, `find_email` folds into it.

use std::cmp::Ordering;

use crate::changes::{ChangeLog, ChangeState};
use crate::model::{MailboxId, MailboxKey, MessageId};
use crate::store::SortKey;

use super::{mailboxes, Email, MailService, ServiceError};

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

    /// Live emails of the account by ID, each with the path of its mailbox, in the order asked
    /// (`None` for one that is not live here, or whose mailbox is not shown). The same answers
    /// as [`Self::find_email`] one by one, with the mailbox tree read once and the records and
    /// listings in one batch each.
    pub fn find_emails(&self, account: &str, ids: &[MessageId]) -> Result<Vec<Option<(String, Email)>>, ServiceError> {
        let container = MailboxKey::emails(account)?;
        let store = &self.inner.store;
        let mailboxes = self.account_mailboxes(account)?;
        let records = store.records_by_id(container.id(), ids)?;
        let states = store.local_states_by_id(container.id(), ids)?;
        Ok(records
            .into_iter()
            .zip(states)
            .map(|(record, state)| {
                let record = record.filter(|record| record.is_live())?;
                let placement = mailboxes.tree.place(record.location.mailbox)?;
                let shown = mailboxes.tree.get(placement.mailbox())?;
                let listing = state.and_then(|state| state.listing).unwrap_or_default();
                Some((shown.path.clone(), Email::of(&record, placement.mailbox(), listing)))
            })
            .collect())
    }

    /// A live email of the account found by its ID, with the path of its mailbox.
    pub fn find_email(&self, account: &str, id: MessageId) -> Result<Option<(String, Email)>, ServiceError> {
        match self.email(account, id) {
            // The path from the folded tree: a whole summary (counters read from the store) for
            // each email of an Email/get would cost more than the email.
            Ok(email) => Ok(self
                .account_mailboxes(account)?
                .tree
                .get(email.mailbox)
                .map(|shown| (shown.path.clone(), email))),
            Err(ServiceError::NoSuchMessage(_)) => Ok(None),
            Err(other) => Err(other),
        }
    }

    /// The index of each email in `mailbox`'s listing sorted by `sort` (what [`MailService::query`]
    /// returns without search), or `None` for an email that is not live and shown there.
    ///
    /// Each index is found by a binary search per record of the mailbox (a mailbox may be made of
    /// several, see [`mailboxes`]): O(log n) probes of the sort index, each a deep page of one
    /// from the store's position cache, so a mailbox of a million emails costs about twenty
    /// probes per email, not a scan.
    pub fn positions_in_listing(
        &self,
        account: &str,
        mailbox: MailboxId,
        sort: SortKey,
        descending: bool,
        ids: &[MessageId],
    ) -> Result<Vec<Option<usize>>, ServiceError> {
        let container = Self::emails_container_of(account)?;
        let tree = self.account_mailboxes(account)?;
        let views = mailboxes::views_of(&tree, mailbox);
        let store = &self.inner.store;
        let mut sizes = Vec::with_capacity(views.len());
        for view in &views {
            sizes.push(store.view_entry(*view)?.map_or(0, |entry| entry.live) as usize);
        }
        let total: usize = sizes.iter().sum();
        let sort_key = |id: MessageId| -> Result<Option<(Vec<u8>, MessageId)>, ServiceError> {
            let Some(record) = store.record(container.id(), id)? else {
                return Ok(None);
            };
            let listing = self.listing_of(&container, id)?;
            Ok(Some((sort.key(&record, &listing), id)))
        };
        let mut positions = Vec::with_capacity(ids.len());
        for id in ids {
            let shown = match store.record(container.id(), *id)? {
                Some(record) if record.is_live() => tree
                    .tree
                    .place(record.location.mailbox)
                    .is_some_and(|placement| placement.mailbox() == mailbox),
                _ => false,
            };
            let target = if shown { sort_key(*id)? } else { None };
            let Some(target) = target else {
                positions.push(None);
                continue;
            };
            // Ascending rank: in each listing, how many entries sort before the target.
            let mut rank = 0;
            for (view, size) in views.iter().zip(&sizes) {
                let (mut low, mut high) = (0usize, *size);
                while low < high {
                    let middle = low + (high - low) / 2;
                    let probe = store.list_ids(*view, sort, false, middle, 1)?;
                    let before = match probe.first() {
                        Some(found) => match sort_key(*found)? {
                            Some(key) => compare_sort_keys(&key, &target) == Ordering::Less,
                            None => false,
                        },
                        None => false,
                    };
                    if before {
                        low = middle + 1;
                    } else {
                        high = middle;
                    }
                }
                rank += low;
            }
            positions.push(Some(if descending {
                total.saturating_sub(1).saturating_sub(rank)
            } else {
                rank
            }));
        }
        Ok(positions)
    }

    fn emails_container_of(account: &str) -> Result<MailboxKey, ServiceError> {
        Ok(MailboxKey::emails(account)?)
    }
}

/// The order of the store's sort indexes: the sort key's bytes, then the ID's.
fn compare_sort_keys(left: &(Vec<u8>, MessageId), right: &(Vec<u8>, MessageId)) -> Ordering {
    left.0
        .cmp(&right.0)
        .then_with(|| left.1.to_bytes().cmp(&right.1.to_bytes()))
}
