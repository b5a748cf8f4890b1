//! The ring across two real processes: a writer killed mid-write never
//! stalls the reader, never yields a torn record, and is counted.

#![forbid(unsafe_code)]

use ringside_shm_protocol::{AttachedSegment, OpenOptions, StartAt, segment_path};
use ringside_tests::record_matches;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Writer {
    child: std::process::Child,
    lines: BufReader<std::process::ChildStdout>,
    instance: String,
}

impl Writer {
    fn start(tag: &str, before: u64, stop: &str, after: u64) -> Self {
        let instance = format!("xproc-{}-{tag}", std::process::id());
        let mut child = Command::new(env!("CARGO_BIN_EXE_ring-writer"))
            .args([&instance, &before.to_string(), stop, &after.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn ring-writer");
        let lines = BufReader::new(child.stdout.take().expect("piped stdout"));
        Writer {
            child,
            lines,
            instance,
        }
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.lines
            .read_line(&mut line)
            .expect("read from ring-writer");
        line.trim().to_owned()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(segment_path(&self.instance));
    }
}

#[test]
fn a_writer_killed_between_claim_and_commit_is_skipped_and_counted() {
    for stop_after_words in ["0", "15", "31"] {
        let mut writer = Writer::start(&format!("kill{stop_after_words}"), 10, stop_after_words, 5);
        assert_eq!(writer.line(), "stalled 10");
        assert_eq!(writer.line(), "ready 15");
        writer.child.kill().unwrap();
        writer.child.wait().unwrap();

        let segment = AttachedSegment::open(&writer.instance, &OpenOptions::default()).unwrap();
        let mut consumer = segment.ring().consumer(StartAt::Oldest);
        consumer.set_abandon_after_ns(50_000_000);
        let mut delivered = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while consumer.backlog() > 0 {
            assert!(
                Instant::now() < deadline,
                "reader hung on the abandoned slot"
            );
            consumer
                .poll(usize::MAX, |_, record| {
                    delivered.push(record_matches(record).expect("torn record delivered"));
                })
                .unwrap();
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(
            delivered,
            (0..15).collect::<Vec<_>>(),
            "every committed record, in order"
        );
        let totals = consumer.totals();
        assert_eq!(totals.lost_abandoned, 1, "the abandoned slot is counted");
        assert_eq!(totals.lost_overwritten, 0);
        assert_eq!(segment.ring().counters().head, 16);
    }
}

#[test]
fn a_reader_attaching_late_reads_back_what_a_dead_writer_left() {
    let mut writer = Writer::start("flight", 100, "none", 0);
    assert_eq!(writer.line(), "ready 100");
    writer.child.kill().unwrap();
    writer.child.wait().unwrap();
    let segment = AttachedSegment::open(&writer.instance, &OpenOptions::default()).unwrap();
    let mut consumer = segment.ring().consumer(StartAt::Oldest);
    let mut delivered = Vec::new();
    consumer
        .poll(usize::MAX, |_, r| {
            delivered.push(record_matches(r).expect("whole record"))
        })
        .unwrap();
    // Capacity 64: the last 64 of 100 are still there.
    assert_eq!(delivered, (36..100).collect::<Vec<_>>());
}

/// /dev/shm full at start: the engine side fails at creation with a clear
/// error (the segment is preallocated), never with SIGBUS later. Runs the
/// writer in a private mount namespace whose /dev/shm is a 1 MiB tmpfs.
#[test]
fn a_full_dev_shm_fails_at_creation_with_a_clear_error() {
    let writer = env!("CARGO_BIN_EXE_ring-writer");
    let script =
        format!("mount -t tmpfs -o size=1m tmpfs /dev/shm && exec {writer} nospace 0 none 0");
    let output = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .env("RING_WRITER_CAPACITY", "65536") // 16 MiB of slots
        .stdin(Stdio::null())
        .output();
    let output = match output {
        Ok(o)
            if !String::from_utf8_lossy(&o.stderr).starts_with("unshare:")
                && !String::from_utf8_lossy(&o.stderr).starts_with("mount:") =>
        {
            o
        }
        other => {
            ringside_tests::harness::skip(
                "a_full_dev_shm_fails_at_creation_with_a_clear_error",
                &format!("no private mount namespace here ({other:?})"),
            );
            return;
        }
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no room in /dev/shm"), "{stderr}");
}
