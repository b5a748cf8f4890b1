//! Loom models of the commit protocol (two producers and the consumer, in
//! both overflow modes, including lapping) and of the in-flight table
//! (an owner updating under a reader; two claimers racing). Run with
//! `RUSTFLAGS="--cfg loom" cargo test -p ringside-shm-protocol --release --lib loom`.

#![allow(clippy::unwrap_used)] // test-only module: a failed unwrap is a failed test

use crate::inflight::{SlotRead, read_slot};
use crate::layout::{INFLIGHT_WORDS, OverflowMode, PAYLOAD_WORDS};
use crate::region::ControlDefaults;
use crate::ring::{PushOutcome, Ring, StartAt};
use loom::thread;

fn payload(seq: u64) -> [u64; PAYLOAD_WORDS] {
    std::array::from_fn(|i| seq * 1000 + i as u64)
}

/// Checks a delivered payload is whole and returns its sequence number.
fn whole(words: &[u64; PAYLOAD_WORDS]) -> u64 {
    let seq = words[0] / 1000;
    assert_eq!(*words, payload(seq), "torn record delivered");
    seq
}

fn model(mode: OverflowMode, capacity: u32, pushes: [u64; 2]) {
    loom::model(move || {
        let ring = Ring::on_heap(
            capacity,
            ControlDefaults {
                overflow_mode: mode,
                ..ControlDefaults::default()
            },
        )
        .unwrap();
        let mut consumer = ring.consumer(StartAt::Newest);
        // A ticket whose record was dropped as busy stays empty: the consumer
        // skips it once it has been stuck for one "nanosecond" of model time.
        consumer.set_abandon_after_ns(1);
        let producers: Vec<_> = (0..2u64)
            .map(|p| {
                let producer = ring.producer();
                thread::spawn(move || {
                    let mut written = 0;
                    for i in 0..pushes[p as usize] {
                        if let PushOutcome::Written(_) =
                            producer.push_words(&payload(p * 10 + i + 1))
                        {
                            written += 1;
                        }
                    }
                    written
                })
            })
            .collect();
        let mut seen = Vec::new();
        // Poll while the producers run...
        consumer.poll_words(0, usize::MAX, |_, w| seen.push(whole(w)));
        consumer.commit_cursor(consumer.cursor());
        let written: u64 = producers.into_iter().map(|h| h.join().unwrap()).sum();
        // ...and after they finished, until everything is accounted for.
        for now in 1..=8 {
            consumer.poll_words(now, usize::MAX, |_, w| seen.push(whole(w)));
        }
        let mut unique = seen.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), seen.len(), "a record was delivered twice");
        let counters = ring.counters();
        let totals = consumer.totals();
        assert_eq!(
            counters.head,
            totals.consumed(),
            "every ticket consumed: {counters:?} {totals:?} {seen:?}"
        );
        assert_eq!(
            pushes[0] + pushes[1],
            counters.head + counters.dropped_before_ticket()
        );
        assert_eq!(written + counters.dropped_busy, counters.head);
        if mode == OverflowMode::Discard {
            assert_eq!(totals.lost_overwritten, 0);
        }
    });
}

#[test]
fn loom_two_producers_and_a_consumer_without_lapping() {
    model(OverflowMode::Overwrite, 4, [1, 1]);
}

#[test]
fn loom_two_producers_lapping_the_consumer_in_overwrite_mode() {
    model(OverflowMode::Overwrite, 2, [2, 1]);
}

#[test]
fn loom_two_producers_in_discard_mode_with_a_full_ring() {
    model(OverflowMode::Discard, 2, [2, 1]);
}

fn entry_words(update: u64) -> [u64; INFLIGHT_WORDS] {
    std::array::from_fn(|i| update * 1000 + i as u64)
}

fn inflight_table(capacity: u32) -> crate::inflight::InflightTable {
    Ring::on_heap_with_inflight(2, capacity, ControlDefaults::default())
        .unwrap()
        .1
}

#[test]
fn loom_a_reader_sees_a_whole_update_or_nothing() {
    loom::model(|| {
        let table = inflight_table(1);
        // Update 1 is the claimer's fill; the owner thread then writes 2 and 3.
        let mut handle = table.claim_words(&entry_words(1)).unwrap();
        let owner = thread::spawn(move || {
            handle.update_words(&entry_words(2));
            handle.update_words(&entry_words(3));
            handle.abandon();
        });
        let view = table.view_for_tests();
        let slot = &view.entries()[0];
        match read_slot(slot) {
            SlotRead::Stable { newest, older } => {
                for copy in std::iter::once(newest).chain(older) {
                    assert_eq!(copy.words, entry_words(copy.update), "torn copy");
                    assert!((1..=3).contains(&copy.update));
                }
                if let Some(older) = older {
                    assert!(older.update < newest.update);
                }
            }
            // Every retry of both copies raced with a write.
            SlotRead::Torn => {}
            SlotRead::Unclaimed | SlotRead::Unwritten | SlotRead::Misplaced => {
                panic!("update 1 was complete before the reader started")
            }
        }
        owner.join().unwrap();
        // Afterwards the newest copy is update 3, the older one update 2.
        match read_slot(slot) {
            SlotRead::Stable { newest, older } => {
                assert_eq!(newest.words, entry_words(3));
                assert_eq!(older.map(|o| o.update), Some(2));
            }
            _ => panic!("a quiescent entry must read stable"),
        }
    });
}

#[test]
fn loom_two_claimers_never_share_an_entry() {
    for capacity in [1u32, 2] {
        loom::model(move || {
            let table = inflight_table(capacity);
            let claimers: Vec<_> = (0..2u64)
                .map(|c| {
                    let table = table.clone();
                    thread::spawn(move || {
                        table.claim_words(&entry_words(c + 1)).map(|h| {
                            let index = h.index();
                            h.abandon();
                            index
                        })
                    })
                })
                .collect();
            let won: Vec<u32> = claimers
                .into_iter()
                .filter_map(|h| h.join().unwrap())
                .collect();
            let mut unique = won.clone();
            unique.dedup();
            assert_eq!(unique.len(), won.len(), "two owners of one entry");
            assert_eq!(won.len(), capacity.min(2) as usize);
            assert_eq!(table.untracked(), 2 - won.len() as u64);
        });
    }
}
