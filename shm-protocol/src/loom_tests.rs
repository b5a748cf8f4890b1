//! Loom models of the commit protocol: two producers and the consumer, in
//! both overflow modes, including lapping. Run with
//! `RUSTFLAGS="--cfg loom" cargo test -p ringside-shm-protocol --release --lib loom`.

#![allow(clippy::unwrap_used)] // test-only module: a failed unwrap is a failed test

use crate::layout::{OverflowMode, PAYLOAD_WORDS};
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
