//! Merge laws for message records, the state hash that Merkle leaves cover, and the node clock.
//!
//! # Merge
//! Replicas accept writes with no coordination, so two copies of one record are combined with
//! [`merge`], a join on a semilattice. For records `a`, `b`, `c` with the same immutable part:
//!
//! - commutative: `merge(a, b) == merge(b, a)`
//! - associative: `merge(merge(a, b), c) == merge(a, merge(b, c))`
//! - idempotent: `merge(a, a) == a`
//!
//! so every replica that has seen the same set of versions holds the same record, whatever the
//! order of arrival. The rules:
//!
//! - the set of records in a mailbox is a grow-only union: appends on two sites both survive;
//! - `expunged` is sticky: once a tombstone stamp is present it stays (the larger stamp is kept);
//! - each flag is a last-writer-wins register: the higher `(time, node)` stamp wins, and for the
//!   impossible case of one stamp carrying two values, "set" wins so the join stays total;
//! - the location (the mailbox the email is in) is a last-writer-wins register too
//!   ([`crate::mailbox::join_location`]): two concurrent moves end in the later one everywhere,
//!   and the email is always in exactly one mailbox.
//!
//! Two versions of one ID with different immutable parts cannot come from honest nodes (the ID is
//! issued once, by the node that stored the blob); [`merge`] refuses them with
//! [`MergeError::ImmutableConflict`] instead of picking one.
//!
//! # Clock
//! Stamps come from a hybrid logical clock: wall-clock milliseconds in the high 48 bits and a
//! 16-bit counter below, so the later click usually wins, and the Lamport rule
//! (`max(local, seen) + 1`) keeps causality when clocks disagree. A stamp further ahead of the
//! local clock than a configured bound is refused and leaves the clock untouched, so one peer
//! sending `u64::MAX` cannot freeze everyone's clock.

use crate::model::{Flag, FlagRegister, MessageRecord, Stamp};

/// Why two records could not be merged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MergeError {
    #[error("records have different ids")]
    DifferentIds,
    #[error("record {0} has two different immutable parts (blob, size, received time or origin)")]
    ImmutableConflict(crate::model::MessageId),
}

/// Joins two versions of one record. See the module doc for the laws.
pub fn merge(left: &MessageRecord, right: &MessageRecord) -> Result<MessageRecord, MergeError> {
    if left.id != right.id {
        return Err(MergeError::DifferentIds);
    }
    if left.blob != right.blob
        || left.size != right.size
        || left.received_millis != right.received_millis
        || left.origin != right.origin
        || left.created != right.created
    {
        return Err(MergeError::ImmutableConflict(left.id));
    }
    let mut merged = left.clone();
    merged.expunged = left.expunged.max(right.expunged);
    merged.location = crate::mailbox::join_location(left.location, right.location);
    for (flag, theirs) in &right.flags {
        merged
            .flags
            .entry(flag.clone())
            .and_modify(|ours| *ours = join_register(*ours, *theirs))
            .or_insert(*theirs);
    }
    Ok(merged)
}

/// The winner of two flag registers: higher stamp, then "set" over "unset".
pub fn join_register(left: FlagRegister, right: FlagRegister) -> FlagRegister {
    if (right.stamp, right.set) > (left.stamp, left.set) {
        right
    } else {
        left
    }
}

/// Writes a flag decision into a record if it wins against what the record holds.
/// Returns whether the record changed.
pub fn apply_flag(record: &mut MessageRecord, flag: Flag, set: bool, stamp: Stamp) -> bool {
    let proposed = FlagRegister { set, stamp };
    match record.flags.get_mut(&flag) {
        Some(current) => {
            let joined = join_register(*current, proposed);
            let changed = joined != *current;
            *current = joined;
            changed
        }
        None => {
            record.flags.insert(flag, proposed);
            true
        }
    }
}

/// The 32-byte hash of a record's whole state: immutable part, tombstone and every flag register.
/// Merkle leaves are these hashes, so one tree detects both missing messages and diverged flags.
pub fn state_hash(record: &MessageRecord) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"mailmesh record v2\0");
    hasher.update(&record.id.to_bytes());
    hasher.update(record.blob.as_bytes());
    hasher.update(&record.size.to_be_bytes());
    hasher.update(&record.received_millis.to_be_bytes());
    hasher.update(&record.origin.0.to_be_bytes());
    match record.expunged {
        None => hasher.update(&[0]),
        Some(stamp) => hasher
            .update(&[1])
            .update(&stamp.time.to_be_bytes())
            .update(&stamp.node.0.to_be_bytes()),
    };
    hasher.update(&(record.flags.len() as u64).to_be_bytes());
    for (flag, register) in &record.flags {
        let name = flag.as_str().as_bytes();
        hasher.update(&(name.len() as u64).to_be_bytes());
        hasher.update(name);
        hasher.update(&[u8::from(register.set)]);
        hasher.update(&register.stamp.time.to_be_bytes());
        hasher.update(&register.stamp.node.0.to_be_bytes());
    }
    hasher.update(&record.location.mailbox.to_bytes());
    hasher.update(&record.location.stamp.time.to_be_bytes());
    hasher.update(&record.location.stamp.node.0.to_be_bytes());
    *hasher.finalize().as_bytes()
}

// ---------------------------------------------------------------------------------------------
// Clock
// ---------------------------------------------------------------------------------------------

/// Bits of the stamp below the millisecond part.
pub const COUNTER_BITS: u32 = 16;

/// Why a stamp from elsewhere was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClockError {
    #[error("stamp {seen} is more than {bound_millis} ms ahead of this node's clock ({local}); refused so a bad peer cannot push every clock into the future")]
    TooFarAhead { seen: u64, local: u64, bound_millis: u64 },
}

/// A node's hybrid logical clock. Persist [`Clock::current`] with every write that carries a
/// stamp and restore it with [`Clock::resume`].
#[derive(Debug, Clone)]
pub struct Clock {
    last: u64,
    bound_millis: u64,
}

impl Clock {
    /// A clock that continues after `last` and refuses stamps more than `bound_millis` ahead.
    pub fn resume(last: u64, bound_millis: u64) -> Self {
        Clock { last, bound_millis }
    }

    /// The last time issued or seen.
    pub fn current(&self) -> u64 {
        self.last
    }

    /// Issues a new time, strictly above every time issued or seen so far.
    pub fn tick(&mut self, now_millis: u64) -> u64 {
        let physical = physical_time(now_millis);
        self.last = physical.max(self.last.saturating_add(1));
        self.last
    }

    /// Checks a stamp seen from elsewhere without moving the clock.
    pub fn check(&self, seen: u64, now_millis: u64) -> Result<(), ClockError> {
        let local = self.last.max(physical_time(now_millis));
        let limit = local.saturating_add(self.bound_millis.saturating_mul(1 << COUNTER_BITS));
        if seen > limit {
            return Err(ClockError::TooFarAhead {
                seen,
                local,
                bound_millis: self.bound_millis,
            });
        }
        Ok(())
    }

    /// Takes in a stamp seen from elsewhere: the clock moves to `max(local, seen) + 1`, or the
    /// stamp is refused (and the clock untouched) when it is too far ahead.
    pub fn observe(&mut self, seen: u64, now_millis: u64) -> Result<(), ClockError> {
        self.check(seen, now_millis)?;
        self.last = self.last.max(seen).saturating_add(1);
        Ok(())
    }
}

/// A wall-clock millisecond count as a clock time with a zero counter.
pub fn physical_time(now_millis: u64) -> u64 {
    (now_millis & ((1 << 48) - 1)) << COUNTER_BITS
}

/// The wall-clock milliseconds inside a clock time.
pub fn millis_of(time: u64) -> u64 {
    time >> COUNTER_BITS
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BlobHash, MessageId, NodeId};
    use proptest::prelude::*;

    fn base() -> MessageRecord {
        MessageRecord::new(MessageId(7), BlobHash::of(b"x"), 1, 2, NodeId(3))
    }

    fn flag_strategy() -> impl Strategy<Value = Flag> {
        prop_oneof![
            Just(Flag::Seen),
            Just(Flag::Flagged),
            Just(Flag::Deleted),
            Just(Flag::Keyword("$Junk".into())),
        ]
    }

    prop_compose! {
        fn record_strategy()(
            expunged in proptest::option::of((0u64..6, 0u64..3)),
            flags in proptest::collection::vec((flag_strategy(), any::<bool>(), 0u64..6, 0u64..3), 0..6),
            moved in proptest::option::of((0u128..4, 3u64..9, 0u64..3)),
        ) -> MessageRecord {
            let mut record = base();
            if let Some((mailbox, time, node)) = moved {
                record.location = crate::mailbox::Location {
                    mailbox: crate::model::MailboxId(mailbox),
                    stamp: Stamp { time, node: NodeId(node) },
                };
            }
            record.expunged = expunged.map(|(time, node)| Stamp { time, node: NodeId(node) });
            for (flag, set, time, node) in flags {
                apply_flag(&mut record, flag, set, Stamp { time, node: NodeId(node) });
            }
            record
        }
    }

    proptest! {
        #[test]
        fn merge_is_commutative(a in record_strategy(), b in record_strategy()) {
            prop_assert_eq!(merge(&a, &b).unwrap(), merge(&b, &a).unwrap());
        }

        #[test]
        fn merge_is_associative(a in record_strategy(), b in record_strategy(), c in record_strategy()) {
            let left = merge(&merge(&a, &b).unwrap(), &c).unwrap();
            let right = merge(&a, &merge(&b, &c).unwrap()).unwrap();
            prop_assert_eq!(&left, &right);
            prop_assert_eq!(state_hash(&left), state_hash(&right));
        }

        #[test]
        fn merge_is_idempotent(a in record_strategy(), b in record_strategy()) {
            prop_assert_eq!(merge(&a, &a).unwrap(), a.clone());
            let once = merge(&a, &b).unwrap();
            prop_assert_eq!(merge(&once, &b).unwrap(), once);
        }

        #[test]
        fn concurrent_moves_end_in_the_later_one_on_both_sides(a in record_strategy(), b in record_strategy()) {
            let merged = merge(&a, &b).unwrap();
            let later = if (b.location.stamp, b.location.mailbox) > (a.location.stamp, a.location.mailbox) { b.location } else { a.location };
            prop_assert_eq!(merged.location, later);
            prop_assert_eq!(merge(&b, &a).unwrap().location, later);
        }

        #[test]
        fn expunge_is_sticky(a in record_strategy(), b in record_strategy()) {
            let merged = merge(&a, &b).unwrap();
            if a.expunged.is_some() || b.expunged.is_some() {
                prop_assert!(merged.expunged.is_some());
            }
        }

        #[test]
        fn clock_never_goes_back_and_refuses_far_stamps(now in 0u64..1_000_000, seen in any::<u64>()) {
            let mut clock = Clock::resume(physical_time(now), 60_000);
            let before = clock.current();
            match clock.observe(seen, now) {
                Ok(()) => prop_assert!(clock.current() > before.max(seen.saturating_sub(1))),
                Err(_) => prop_assert_eq!(clock.current(), before),
            }
            let issued = clock.tick(now);
            prop_assert!(issued > before);
        }

        /// Stamps near the bound, where a clock that refused everything (or nothing) would differ:
        /// `offset` milliseconds ahead of the local clock, from well inside to just past the bound.
        #[test]
        fn stamps_within_the_bound_are_taken_and_stamps_past_it_are_refused(
            now in 1_000_000u64..2_000_000_000_000,
            bound in 1u64..3_600_000,
            offset in -5i64..5,
            counter in 0u64..(1 << COUNTER_BITS),
        ) {
            let mut clock = Clock::resume(physical_time(now), bound);
            let before = clock.current();
            let millis = (now + bound).checked_add_signed(offset).unwrap();
            let seen = physical_time(millis) | if offset == 0 { 0 } else { counter };
            let result = clock.observe(seen, now);
            if offset <= 0 {
                prop_assert!(result.is_ok(), "{} ms ahead with a bound of {} ms was refused", bound as i64 + offset, bound);
                prop_assert_eq!(clock.current(), seen + 1);
            } else {
                prop_assert!(result.is_err(), "{} ms ahead with a bound of {} ms was taken", bound as i64 + offset, bound);
                prop_assert_eq!(clock.current(), before);
            }
        }
    }

    #[test]
    fn higher_stamp_wins_and_node_breaks_ties() {
        let mut left = base();
        let mut right = base();
        apply_flag(
            &mut left,
            Flag::Seen,
            true,
            Stamp {
                time: 5,
                node: NodeId(1),
            },
        );
        apply_flag(
            &mut right,
            Flag::Seen,
            false,
            Stamp {
                time: 5,
                node: NodeId(2),
            },
        );
        let merged = merge(&left, &right).unwrap();
        assert!(!merged.has_flag(&Flag::Seen), "node 2 breaks the tie");
        apply_flag(
            &mut left,
            Flag::Seen,
            true,
            Stamp {
                time: 6,
                node: NodeId(1),
            },
        );
        assert!(merge(&left, &right).unwrap().has_flag(&Flag::Seen));
    }

    #[test]
    fn immutable_conflicts_are_refused() {
        let left = base();
        let mut right = base();
        right.size = 99;
        assert_eq!(merge(&left, &right), Err(MergeError::ImmutableConflict(left.id)));
    }

    #[test]
    fn u64_max_stamp_does_not_freeze_the_clock() {
        let mut clock = Clock::resume(0, 60_000);
        let now = 1_767_225_600_000;
        assert!(clock.observe(u64::MAX, now).is_err());
        let first = clock.tick(now);
        let second = clock.tick(now);
        assert!(second > first && second < u64::MAX / 2);
    }
}
