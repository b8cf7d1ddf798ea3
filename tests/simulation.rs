//! Simulation of the pure core: replicas with random appends, flag changes and expunges reconcile
//! through the sync protocol (wire-encoded) and must end holding exactly the merge of everything;
//! then whole clusters under faults, through `mailmesh_core::simulation`.

use std::collections::BTreeMap;

use mailmesh::crdt::{self, Clock};
use mailmesh::merkle::{MemoryTree, StoredDepth, TreeView};
use mailmesh::model::{BlobHash, Flag, MessageId, MessageIdGenerator, MessageRecord, NodeId, Stamp};
use mailmesh::sync::{self, Outcome, SyncLimits};
use proptest::prelude::*;

#[derive(Clone)]
struct Replica {
    node: NodeId,
    clock: Clock,
    ids: MessageIdGenerator,
    records: BTreeMap<MessageId, MessageRecord>,
    tree: MemoryTree,
}

impl Replica {
    fn new(node: u64) -> Self {
        Replica {
            node: NodeId(node),
            clock: Clock::resume(0, 60_000),
            ids: MessageIdGenerator::default(),
            records: BTreeMap::new(),
            tree: MemoryTree::new(StoredDepth::MAILBOX),
        }
    }

    fn put(&mut self, record: MessageRecord) {
        self.tree.insert(record.id.0, crdt::state_hash(&record));
        self.records.insert(record.id, record);
    }

    fn merge_in(&mut self, record: &MessageRecord, now: u64) {
        if let Some(stamp) = record.latest_stamp() {
            self.clock.observe(stamp.time, now).expect("honest stamps are near");
        }
        let merged = match self.records.get(&record.id) {
            Some(existing) => crdt::merge(existing, record).expect("same immutable part"),
            None => record.clone(),
        };
        self.put(merged);
    }
}

#[derive(Clone, Debug)]
enum Action {
    Append {
        replica: usize,
        random: u128,
    },
    Flag {
        replica: usize,
        pick: usize,
        flag: u8,
        set: bool,
    },
    Expunge {
        replica: usize,
        pick: usize,
    },
    Tick {
        millis: u64,
    },
}

fn action_strategy(replicas: usize) -> impl Strategy<Value = Action> {
    prop_oneof![
        4 => (0..replicas, any::<u128>()).prop_map(|(replica, random)| Action::Append { replica, random }),
        3 => (0..replicas, any::<usize>(), 0u8..4, any::<bool>())
            .prop_map(|(replica, pick, flag, set)| Action::Flag { replica, pick, flag, set }),
        1 => (0..replicas, any::<usize>()).prop_map(|(replica, pick)| Action::Expunge { replica, pick }),
        1 => (0u64..5).prop_map(|millis| Action::Tick { millis }),
    ]
}

fn flag(index: u8) -> Flag {
    match index {
        0 => Flag::Seen,
        1 => Flag::Flagged,
        2 => Flag::Deleted,
        _ => Flag::Keyword("$Important".into()),
    }
}

fn play(replicas: &mut [Replica], actions: &[Action]) {
    let mut now: u64 = 1_767_225_600_000;
    for action in actions {
        match action {
            Action::Append { replica, random } => {
                let replica = &mut replicas[*replica];
                let id = replica.ids.next(now, *random);
                let blob = BlobHash::of(&id.to_bytes());
                let record = MessageRecord::new(id, blob, 100, now, replica.node);
                replica.put(record);
            }
            Action::Flag {
                replica,
                pick,
                flag: index,
                set,
            } => {
                let replica = &mut replicas[*replica];
                if replica.records.is_empty() {
                    continue;
                }
                let id = *replica.records.keys().nth(pick % replica.records.len()).unwrap();
                let stamp = Stamp {
                    time: replica.clock.tick(now),
                    node: replica.node,
                };
                let mut record = replica.records[&id].clone();
                crdt::apply_flag(&mut record, flag(*index), *set, stamp);
                replica.put(record);
            }
            Action::Expunge { replica, pick } => {
                let replica = &mut replicas[*replica];
                if replica.records.is_empty() {
                    continue;
                }
                let id = *replica.records.keys().nth(pick % replica.records.len()).unwrap();
                let stamp = Stamp {
                    time: replica.clock.tick(now),
                    node: replica.node,
                };
                let mut record = replica.records[&id].clone();
                record.expunged = record.expunged.max(Some(stamp));
                replica.put(record);
            }
            Action::Tick { millis } => now += millis,
        }
    }
}

/// One reconciliation session between two replicas, through the wire encoding, then each pulls
/// and merges what it learned. Returns the number of messages.
fn reconcile(replicas: &mut [Replica], a: usize, b: usize, limits: &SyncLimits) -> usize {
    let (mut a_needs, mut b_needs) = (Outcome::default(), Outcome::default());
    let mut outgoing = sync::initial(&replicas[a].tree, limits).unwrap();
    let mut messages = 0;
    let mut a_turn = false;
    while !outgoing.is_empty() {
        messages += 1;
        assert!(messages <= 70, "session between {a} and {b} did not end");
        let incoming = sync::decode(&sync::encode(&outgoing), limits).unwrap();
        let (view, needs) = if a_turn {
            (&replicas[a].tree, &mut a_needs)
        } else {
            (&replicas[b].tree, &mut b_needs)
        };
        let (reply, outcome) = sync::respond(view, &incoming, limits).unwrap();
        needs.extend(outcome);
        outgoing = reply;
        a_turn = !a_turn;
    }
    let now = 1_767_225_700_000;
    for (needer, source, needs) in [(a, b, &mut a_needs), (b, a, &mut b_needs)] {
        needs.normalize();
        let mut pulled: Vec<MessageRecord> = needs
            .need_keys
            .iter()
            .filter_map(|key| replicas[source].records.get(&MessageId(*key)).cloned())
            .collect();
        for prefix in &needs.need_prefixes {
            for (key, _) in replicas[source].tree.leaves(*prefix, usize::MAX).unwrap() {
                pulled.push(replicas[source].records[&MessageId(key)].clone());
            }
        }
        for record in pulled {
            replicas[needer].merge_in(&record, now);
        }
    }
    messages
}

fn expected_union(replicas: &[Replica]) -> BTreeMap<MessageId, MessageRecord> {
    let mut union: BTreeMap<MessageId, MessageRecord> = BTreeMap::new();
    for replica in replicas {
        for (id, record) in &replica.records {
            let merged = match union.get(id) {
                Some(existing) => crdt::merge(existing, record).unwrap(),
                None => record.clone(),
            };
            union.insert(*id, merged);
        }
    }
    union
}

fn check_converged(replicas: &[Replica], expected: &BTreeMap<MessageId, MessageRecord>) -> Result<(), TestCaseError> {
    for (index, replica) in replicas.iter().enumerate() {
        prop_assert_eq!(
            replica.records.len(),
            expected.len(),
            "replica {} holds a different number of records",
            index
        );
        for (id, record) in expected {
            // Compare values, not only roots: LWW can converge to the same wrong value.
            prop_assert_eq!(
                replica.records.get(id),
                Some(record),
                "replica {} differs at {}",
                index,
                id
            );
        }
        prop_assert_eq!(replica.tree.root(), replicas[0].tree.root());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn two_replicas_reconcile_to_the_merged_union(actions in proptest::collection::vec(action_strategy(2), 0..300)) {
        let mut replicas = vec![Replica::new(1), Replica::new(2)];
        play(&mut replicas, &actions);
        let expected = expected_union(&replicas);
        let limits = SyncLimits { leaf_threshold: 3, exact_threshold: 12, ..SyncLimits::default() };
        reconcile(&mut replicas, 0, 1, &limits);
        check_converged(&replicas, &expected)?;
        // A second session finds nothing to do and ends after one message.
        prop_assert_eq!(reconcile(&mut replicas, 1, 0, &limits), 1);
    }

    #[test]
    fn three_replicas_reconcile_in_two_passes(actions in proptest::collection::vec(action_strategy(3), 0..400)) {
        let mut replicas = vec![Replica::new(1), Replica::new(2), Replica::new(3)];
        play(&mut replicas, &actions);
        let expected = expected_union(&replicas);
        let limits = SyncLimits::default();
        // A line 0-1-2 then back: every update reaches every replica within two passes.
        reconcile(&mut replicas, 0, 1, &limits);
        reconcile(&mut replicas, 1, 2, &limits);
        reconcile(&mut replicas, 0, 1, &limits);
        check_converged(&replicas, &expected)?;
    }
}

#[test]
fn concurrent_appends_on_two_sites_both_survive() {
    let mut replicas = vec![Replica::new(1), Replica::new(2)];
    // Same millisecond, same mailbox, both sites.
    play(
        &mut replicas,
        &[
            Action::Append { replica: 0, random: 1 },
            Action::Append { replica: 1, random: 2 },
        ],
    );
    reconcile(&mut replicas, 0, 1, &SyncLimits::default());
    assert_eq!(replicas[0].records.len(), 2);
    assert_eq!(replicas[1].records.len(), 2);
}

#[test]
fn conflicting_flag_changes_resolve_the_same_way_everywhere() {
    let mut replicas = vec![Replica::new(1), Replica::new(2)];
    play(&mut replicas, &[Action::Append { replica: 0, random: 1 }]);
    reconcile(&mut replicas, 0, 1, &SyncLimits::default());
    play(
        &mut replicas,
        &[
            Action::Flag {
                replica: 0,
                pick: 0,
                flag: 0,
                set: true,
            },
            Action::Flag {
                replica: 1,
                pick: 0,
                flag: 0,
                set: false,
            },
        ],
    );
    reconcile(&mut replicas, 1, 0, &SyncLimits::default());
    let left = replicas[0].records.values().next().unwrap();
    let right = replicas[1].records.values().next().unwrap();
    assert_eq!(left, right);
    // Both stamped in the same millisecond with fresh clocks: equal times, node 2 wins the tie.
    assert!(!left.has_flag(&Flag::Seen));
}

/// The whole engine under faults: 50 seeded schedules of 3 to 7 nodes with drops, duplicates,
/// reordering, partitions, restarts, clock skew and forged stamps, each healed and checked
/// against its history (`examples/simulate.rs` runs 10,000).
#[test]
fn fifty_seeded_fault_schedules_lose_nothing_and_converge() {
    use mailmesh_core::simulation;
    for index in 0..50 {
        let report = simulation::run(simulation::schedule_seed(2026, index), false);
        if report.failed() {
            let traced = simulation::run(report.seed, true);
            panic!(
                "schedule seed {} failed (replay: cargo run --release --example simulate -- --replay {}):\n{}\n{}",
                traced.seed,
                traced.seed,
                traced.problems.join("\n"),
                traced.trace.join("\n")
            );
        }
        assert!(report.converged);
        assert_eq!(report.forged_accepted, 0);
    }
}
