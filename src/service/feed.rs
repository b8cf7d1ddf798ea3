//! The account change feed's listing of whole mailboxes: an email is shown in another mailbox
//! when its mailbox becomes an alias of a same-named one or is deleted (the email rescued to the
//! INBOX), though its own record, and so its place in the change log, did not change. When a page
//! lists such a mailbox change, [`super::MailService::account_changes`] lists the mailbox's emails too,
//! page by page, the place reached carried in the state token ([`PendingMailboxes`]). An email
//! listed while this node did not hold its mailbox's record is listed again once it does (the
//! token carries those mailboxes: `ChangeState::unplaced`). An email listed as shown in another
//! mailbox than its own (an alias shown in its canonical mailbox) is listed again once a node
//! shows that mailbox's emails elsewhere, for the group can split up through a change made on a
//! site that never knew the alias (the token carries those pairs: `ChangeState::aliased`).

use std::collections::{BTreeSet, VecDeque};

use crate::changes::{ChangeState, PendingMailboxes, MAX_ALIASED_PAIRS, MAX_UNPLACED_MAILBOXES};
use crate::mailbox::{MailboxTree, Placement};
use crate::model::{MailboxId, MessageId};
use crate::store::Store;

use super::mailboxes::AccountMailboxes;
use super::{ChangedEmail, ServiceError};

/// Emails as the account feed lists them: where each is shown now. A live email whose mailbox
/// record this node does not hold yet is listed without a mailbox, and that mailbox is added to
/// `unplaced` (carried in the client's token, see [`ViewListing::queue_placed`]).
/// An email shown in an alias's canonical mailbox adds the pair (its mailbox, the one shown) to
/// `aliased` (see [`ViewListing::queue_realiased`]).
pub(super) fn named_emails(
    store: &Store,
    mailboxes: &AccountMailboxes,
    emails: MailboxId,
    ids: &[MessageId],
    shown: &mut ShownPlaces,
) -> Result<Vec<ChangedEmail>, ServiceError> {
    let mut named = Vec::with_capacity(ids.len());
    // One batched read of the page's records, not a lookup each.
    for (id, record) in ids.iter().zip(store.records_by_id(emails, ids)?) {
        let mailbox = match record {
            Some(record) if record.is_live() => {
                let located = record.location.mailbox;
                let placed = mailboxes.tree.place(located);
                match placed {
                    None => {
                        shown.unplaced.insert(located.0);
                    }
                    Some(Placement::In(canonical)) if canonical != located => {
                        shown.aliased.insert((located.0, canonical.0));
                    }
                    Some(_) => {}
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

/// What a client's token says it was shown of where emails are, beyond the change log: the
/// mailboxes whose emails it was shown without a mailbox (this node or the one that listed them
/// did not hold the mailbox's record) and the (mailbox, shown in) pairs of aliases.
#[derive(Default)]
pub(super) struct ShownPlaces {
    pub(super) unplaced: BTreeSet<u128>,
    pub(super) aliased: BTreeSet<(u128, u128)>,
}

impl ShownPlaces {
    /// Takes them out of a client's token.
    pub(super) fn take(since: &mut ChangeState) -> Self {
        ShownPlaces {
            unplaced: std::mem::take(&mut since.unplaced),
            aliased: std::mem::take(&mut since.aliased),
        }
    }

    /// Puts them in a new token, within the bounds a token may carry. Past them (a node that
    /// lacks that many mailbox records while it lists their emails, or that many aliases) the
    /// client resyncs rather than be left with emails shown in the wrong mailbox.
    pub(super) fn store_in(self, state: &mut ChangeState) -> Result<(), ServiceError> {
        if self.unplaced.len() > MAX_UNPLACED_MAILBOXES {
            return Err(ServiceError::CannotCalculateChanges(format!(
                "this node does not hold yet the mailboxes of emails from more than {MAX_UNPLACED_MAILBOXES} mailboxes; resync from a fresh state"
            )));
        }
        if self.aliased.len() > MAX_ALIASED_PAIRS {
            return Err(ServiceError::CannotCalculateChanges(format!(
                "emails of more than {MAX_ALIASED_PAIRS} aliased mailboxes were shown in others; resync from a fresh state"
            )));
        }
        state.unplaced = self.unplaced;
        state.aliased = self.aliased;
        Ok(())
    }
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

    /// Queues a view's emails to list, unless it is queued already.
    fn enqueue(&mut self, view: MailboxId) {
        if !self.queue.contains(&view) {
            self.queue.push_back(view);
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
                // Its children go to the top level, where they may meet same-named mailboxes.
                views.extend(aliases_under(tree, None));
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
            // A mailbox that joins a same-named one brings its children beside the other's:
            // same-named children become aliases too.
            views.extend(aliases_under(tree, Some(canonical)));
        }
        for view in views {
            self.enqueue(view);
        }
    }

    /// Queues the views of the mailboxes whose emails the client was shown in a mailbox this node
    /// does not show them in (an alias's group split up here, or here its canonical mailbox is
    /// another), and takes their pairs out of `aliased`: the listing adds the pairs it shows now.
    /// A mailbox this node does not place keeps its pairs until one does.
    pub(super) fn queue_realiased(&mut self, mailboxes: &AccountMailboxes, aliased: &mut BTreeSet<(u128, u128)>) {
        let mut moved = BTreeSet::new();
        for (mailbox, shown) in aliased.iter() {
            let placed = mailboxes.tree.place(MailboxId(*mailbox));
            if placed.is_some_and(|placement| placement.mailbox().0 != *shown) {
                moved.insert(*mailbox);
            }
        }
        aliased.retain(|(mailbox, _)| !moved.contains(mailbox));
        for mailbox in moved {
            self.enqueue(MailboxId(mailbox));
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
            self.enqueue(MailboxId(*mailbox));
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

/// The aliases (non-canonical members) of every visible mailbox under `root` (itself included)
/// or, with no root, of the whole tree.
fn aliases_under(tree: &MailboxTree, root: Option<MailboxId>) -> Vec<MailboxId> {
    let mut aliases = Vec::new();
    let mut stack: Vec<MailboxId> = match root {
        Some(root) => vec![root],
        None => tree.children(None).iter().map(|mailbox| mailbox.id).collect(),
    };
    let mut visited = BTreeSet::new();
    while let Some(mailbox) = stack.pop() {
        if !visited.insert(mailbox) {
            continue;
        }
        aliases.extend(tree.members(mailbox).into_iter().filter(|member| *member != mailbox));
        stack.extend(tree.children(Some(mailbox)).iter().map(|child| child.id));
    }
    aliases
}
