//! The account change feed's listing of whole mailboxes: an email is shown in another mailbox
//! when its mailbox becomes an alias of a same-named one or is deleted (the email rescued to the
//! INBOX), though its own record, and so its place in the change log, did not change. When a page
//! lists such a mailbox change, [`super::MailService::account_changes`] lists the mailbox's emails too,
//! page by page, the place reached carried in the state token ([`PendingMailboxes`]).

use std::collections::{BTreeSet, VecDeque};

use crate::changes::{ChangeState, PendingMailboxes};
use crate::model::{MailboxId, MessageId};
use crate::store::Store;

use super::mailboxes::AccountMailboxes;
use super::{ChangedEmail, ServiceError};

/// An email as the account feed lists it: where it is shown now.
pub(super) fn named_email(
    store: &Store,
    mailboxes: &AccountMailboxes,
    emails: MailboxId,
    id: MessageId,
) -> Result<ChangedEmail, ServiceError> {
    let mailbox = match store.record(emails, id)? {
        Some(record) if record.is_live() => mailboxes
            .tree
            .place(record.location.mailbox)
            .map(|placement| placement.mailbox()),
        _ => None,
    };
    Ok(ChangedEmail {
        id,
        mailbox,
        mailbox_name: mailbox
            .and_then(|mailbox| mailboxes.tree.get(mailbox))
            .map(|shown| shown.path.clone()),
    })
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
