//! The account change feed's listing of whole mailboxes: an email is shown in another mailbox
//! when its mailbox becomes an alias of a same-named one or is deleted (the email rescued to the
//! INBOX), though its own record, and so its place in the change log, did not change. When a page
//! lists such a mailbox change, [`super::MailService::account_changes`] lists the mailbox's emails too,
//! page by page, the place reached carried in the state token ([`PendingMailboxes`]). An email
//! listed while this node did not hold its mailbox's record is listed again once it does (the
//! token carries those mailboxes: `ChangeState::unplaced`).

use std::collections::{BTreeSet, VecDeque};

use crate::changes::{ChangeState, PendingMailboxes};
use crate::model::{MailboxId, MessageId};
use crate::store::Store;

use super::mailboxes::AccountMailboxes;
use super::{ChangedEmail, ServiceError};

/// Emails as the account feed lists them: where each is shown now. A live email whose mailbox
/// record this node does not hold yet is listed without a mailbox, and that mailbox is added to
/// `unplaced` (carried in the client's token, see [`ViewListing::queue_placed`]).
pub(super) fn named_emails(
    store: &Store,
    mailboxes: &AccountMailboxes,
    emails: MailboxId,
    ids: &[MessageId],
    unplaced: &mut BTreeSet<u128>,
) -> Result<Vec<ChangedEmail>, ServiceError> {
    let mut named = Vec::with_capacity(ids.len());
    // One batched read of the page's records, not a lookup each.
    for (id, record) in ids.iter().zip(store.records_by_id(emails, ids)?) {
        let mailbox = match record {
            Some(record) if record.is_live() => {
                let placed = mailboxes.tree.place(record.location.mailbox);
                if placed.is_none() {
                    unplaced.insert(record.location.mailbox.0);
                }
                placed.map(|placement| placement.mailbox())
            }
            _ => None,
        };
        named.push(ChangedEmail {
            id: *id,
            mailbox,
            mailbox_name: mailbox
                .and_then(|mailbox| mailboxes.tree.get(mailbox))
                .map(|shown| shown.path.clone()),
        });
    }
    Ok(named)
}

/// The feed's listing of whole mailboxes (store views) whose emails are shown elsewhere since a
/// mailbox change: a queue of views and the place reached in the first.
pub(super) struct ViewListing {
    queue: VecDeque<MailboxId>,
    after: Option<(u64, MessageId)>,
}

impl ViewListing {
    pub(super) fn new(pending: Option<PendingMailboxes>) -> Self {
        let pending = pending.unwrap_or_default();
        ViewListing {
            queue: pending.mailboxes.into_iter().map(MailboxId).collect(),
            after: pending.after.map(|(received, id)| (received, MessageId(id))),
        }
    }

    pub(super) fn is_pending(&self) -> bool {
        !self.queue.is_empty()
    }

    pub(super) fn pending(&self) -> Option<PendingMailboxes> {
        self.is_pending().then(|| PendingMailboxes {
            mailboxes: self.queue.iter().map(|view| view.0).collect(),
            after: self.after.map(|(received, id)| (received, id.0)),
        })
    }

    /// Queues the views whose emails a change of these mailboxes shows elsewhere: a deleted
    /// mailbox's (rescued to the INBOX), the aliases of the mailbox's canonical one (shown in
    /// it), and the canonical one's own when the client cannot have seen it created (its emails
    /// may have come before its record and been listed without a mailbox).
    pub(super) fn queue_changed(
        &mut self,
        mailboxes: &AccountMailboxes,
        changed: &BTreeSet<MailboxId>,
        since: &ChangeState,
    ) {
        let tree = &mailboxes.tree;
        let mut views = BTreeSet::new();
        for mailbox in changed {
            if tree.deleted().contains(mailbox) {
                views.insert(*mailbox);
                continue;
            }
            let Some(canonical) = tree.canonical(*mailbox) else {
                continue;
            };
            for member in tree.members(canonical) {
                let new_to_client = mailboxes
                    .records
                    .get(&member)
                    .is_some_and(|record| !since.may_have_seen(record.created));
                if member != canonical || new_to_client {
                    views.insert(member);
                }
            }
        }
        for view in views {
            if !self.queue.contains(&view) {
                self.queue.push_back(view);
            }
        }
    }

    /// Queues the views of the unplaced mailboxes this node now places (it holds their records:
    /// live, an alias, or deleted with their emails rescued), and takes them out of `unplaced`.
    /// Their emails were listed to the client without a mailbox, and no change of their own
    /// records says they have one now: the mailbox record's arrival must list them again. (Its
    /// change alone does not, when the mailbox is older than what the client was shown: the
    /// chaos runs' feed checker found emails left without a mailbox that way, after a node was
    /// wiped and got emails back before their mailboxes.)
    pub(super) fn queue_placed(&mut self, mailboxes: &AccountMailboxes, unplaced: &mut BTreeSet<u128>) {
        unplaced.retain(|mailbox| {
            if mailboxes.tree.place(MailboxId(*mailbox)).is_none() {
                return true;
            }
            if !self.queue.contains(&MailboxId(*mailbox)) {
                self.queue.push_back(MailboxId(*mailbox));
            }
            false
        });
    }

    /// Lists up to `room` emails from the queued views into `out`, skipping those already in
    /// `listed` and those whose creation the client cannot have seen (the core lists them as
    /// created), and moves the queue on.
    pub(super) fn list(
        &mut self,
        store: &Store,
        emails: MailboxId,
        since: &ChangeState,
        room: usize,
        listed: &BTreeSet<MessageId>,
        out: &mut Vec<MessageId>,
    ) -> Result<(), ServiceError> {
        let mut taken = 0;
        while let Some(view) = self.queue.front().copied() {
            if taken >= room {
                return Ok(());
            }
            let batch = store.view_emails_after(view, self.after, room - taken)?;
            let finished = batch.len() < room - taken;
            for (received, id) in batch {
                self.after = Some((received, id));
                if listed.contains(&id) || out.contains(&id) {
                    continue;
                }
                let seen = store
                    .record(emails, id)?
                    .is_some_and(|record| since.may_have_seen(record.created_stamp()));
                if seen {
                    out.push(id);
                    taken += 1;
                }
            }
            if finished {
                self.queue.pop_front();
                self.after = None;
            }
        }
        Ok(())
    }
}
