//! Segment creation and opening against real POSIX shared memory, including
//! every refusal. Each test uses its own instance name.

#![allow(clippy::unwrap_used)] // test-only module: a failed unwrap is a failed test

use crate::inflight::tests::queued;
use crate::layout::{
    ABI_MINOR, ABI_VERSION_OFFSET, CONTROL_OFFSET, COUNTERS_OFFSET, OverflowMode,
    inflight_offset_for, pack_version,
};
use crate::record::tests::sample_record;
use crate::ring::{PollError, StartAt};
use crate::segment::*;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::time::Duration;

fn instance(test: &str) -> String {
    format!("t{}-{test}", std::process::id())
}

fn options(instance: &str) -> CreateOptions {
    let mut o = CreateOptions::new(instance, vec!["gemma-3-270m".into(), "other".into()]);
    o.capacity = 16;
    o.step_capacity = 8;
    o
}

fn patch(instance: &str, offset: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(segment_path(instance))
        .unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

#[test]
fn an_engine_segment_is_read_back_by_an_attached_reader() {
    let name = instance("roundtrip");
    let engine = EngineSegment::create(&options(&name)).unwrap();
    let attached = AttachedSegment::open(&name, &OpenOptions::default()).unwrap();
    let info = attached.info();
    assert_eq!(info, engine.info());
    assert_eq!(
        info.models,
        vec!["gemma-3-270m".to_string(), "other".to_string()]
    );
    assert_eq!(info.capacity, 16);
    assert_eq!(info.identity.pid, std::process::id());
    assert_eq!(info.identity.generation, 1);
    assert!(info.clock.realtime_ns > info.clock.monotonic_ns);
    assert_eq!(attached.liveness(), Liveness::Alive);

    let mut consumer = attached.ring().consumer(StartAt::Newest);
    let producer = engine.ring().producer();
    let _ = producer.push(&sample_record(1));
    let mut got = Vec::new();
    consumer
        .poll(10, |_, r| got.push(r.decode(info.model_count()).unwrap()))
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].prompt_tokens, 12);

    attached.ring().control().set_tracing_enabled(false);
    assert!(
        !producer.tracing_enabled(),
        "the agent's control write reaches the engine"
    );

    let mode = std::fs::metadata(segment_path(&name))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o660, "exact mode, whatever the umask");
    assert!(list_segments().unwrap().contains(&name));
    drop(engine);
    assert!(
        !std::path::Path::new(&segment_path(&name)).exists(),
        "unlinked on drop"
    );
    assert!(attached.replaced());
}

#[test]
fn a_name_held_by_a_live_engine_is_refused() {
    let name = instance("live");
    let _engine = EngineSegment::create(&options(&name)).unwrap();
    match EngineSegment::create(&options(&name)) {
        Err(CreateError::InUse { pid, .. }) => assert_eq!(pid, std::process::id()),
        other => panic!("expected InUse, got {other:?}"),
    }
}

#[test]
fn a_stale_segment_of_a_dead_engine_is_replaced_with_the_next_generation() {
    let name = instance("stale");
    let mut o = options(&name);
    o.unlink_on_drop = false;
    drop(EngineSegment::create(&o).unwrap());
    // Forge a dead engine: a pid that does not exist and no heartbeat.
    patch(&name, 48, &0x3fff_fff0u32.to_le_bytes());
    patch(&name, (COUNTERS_OFFSET + 88) as u64, &0u64.to_le_bytes());
    let engine = EngineSegment::create(&options(&name)).unwrap();
    assert_eq!(engine.info().identity.generation, 2);
}

#[test]
fn a_name_squatted_by_another_user_is_refused() {
    if rustix::process::geteuid().as_raw() != 0 {
        return; // needs root to give the file away
    }
    let name = instance("squat");
    let mut o = options(&name);
    o.unlink_on_drop = false;
    drop(EngineSegment::create(&o).unwrap());
    let path = segment_path(&name);
    std::os::unix::fs::chown(&path, Some(4242), None).unwrap();
    let err = EngineSegment::create(&options(&name)).unwrap_err();
    assert!(
        matches!(err, CreateError::Squatted { owner: 4242, .. }),
        "{err}"
    );
    // And a reader does not trust it either, unless told to.
    let err = AttachedSegment::open(&name, &OpenOptions::default()).unwrap_err();
    assert!(
        matches!(err, OpenError::UntrustedOwner { owner: 4242, .. }),
        "{err}"
    );
    let trusting = OpenOptions {
        trusted_uids: vec![4242],
    };
    assert!(AttachedSegment::open(&name, &trusting).is_ok());
    std::fs::remove_file(path).unwrap();
}

#[test]
fn a_world_writable_segment_is_refused() {
    let name = instance("worldw");
    let _engine = EngineSegment::create(&options(&name)).unwrap();
    std::fs::set_permissions(segment_path(&name), std::fs::Permissions::from_mode(0o666)).unwrap();
    let err = AttachedSegment::open(&name, &OpenOptions::default()).unwrap_err();
    assert!(
        matches!(err, OpenError::OpenToOthers { mode: 0o666, .. }),
        "{err}"
    );
}

#[test]
fn a_world_readable_segment_is_refused_and_not_created() {
    let name = instance("worldr");
    let _engine = EngineSegment::create(&options(&name)).unwrap();
    std::fs::set_permissions(segment_path(&name), std::fs::Permissions::from_mode(0o664)).unwrap();
    let err = AttachedSegment::open(&name, &OpenOptions::default()).unwrap_err();
    assert!(
        matches!(err, OpenError::OpenToOthers { mode: 0o664, .. }),
        "{err}"
    );
    let mut o = options(&format!("{name}-b"));
    o.mode = 0o644;
    assert!(matches!(
        EngineSegment::create(&o),
        Err(CreateError::UnsafeMode(0o644))
    ));
}

#[test]
fn a_symlinked_segment_name_is_neither_followed_nor_replaced() {
    // The link points at a real segment the reader would accept: only the
    // link itself must make it refuse.
    let target = instance("symtarget");
    let _engine = EngineSegment::create(&options(&target)).unwrap();
    let name = instance("symlink");
    std::os::unix::fs::symlink(segment_path(&target), segment_path(&name)).unwrap();
    let err = AttachedSegment::open(&name, &OpenOptions::default()).unwrap_err();
    assert!(matches!(err, OpenError::NotAFile(_)), "{err}");
    // An engine starting on that name refuses it and leaves the link alone.
    match EngineSegment::create(&options(&name)) {
        Err(CreateError::NotAFile { .. }) => {}
        other => panic!("expected NotAFile, got {other:?}"),
    }
    assert!(
        std::fs::symlink_metadata(segment_path(&name))
            .unwrap()
            .is_symlink()
    );
    std::fs::remove_file(segment_path(&name)).unwrap();
}

#[test]
fn a_fifo_under_a_segment_name_is_refused_without_blocking() {
    let name = instance("fifo");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        segment_path(&name).as_str(),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    let err = AttachedSegment::open(&name, &OpenOptions::default()).unwrap_err();
    assert!(matches!(err, OpenError::NotAFile(_)), "{err}");
    match EngineSegment::create(&options(&name)) {
        Err(CreateError::NotAFile { .. }) => {}
        other => panic!("expected NotAFile, got {other:?}"),
    }
    std::fs::remove_file(segment_path(&name)).unwrap();
}

#[test]
fn bad_magic_is_refused() {
    let name = instance("magic");
    let _engine = EngineSegment::create(&options(&name)).unwrap();
    patch(&name, 0, b"NOTRING!");
    let err = AttachedSegment::open(&name, &OpenOptions::default()).unwrap_err();
    assert!(matches!(err, OpenError::BadMagic { .. }), "{err}");
}

#[test]
fn another_major_version_is_refused_naming_both_versions() {
    let name = instance("major");
    let _engine = EngineSegment::create(&options(&name)).unwrap();
    patch(
        &name,
        ABI_VERSION_OFFSET as u64,
        &pack_version(2, 7).to_le_bytes(),
    );
    let err = AttachedSegment::open(&name, &OpenOptions::default()).unwrap_err();
    assert!(matches!(
        err,
        OpenError::AbiMismatch {
            found_major: 2,
            found_minor: 7,
            ..
        }
    ));
    assert!(
        err.to_string().contains("2.7") && err.to_string().contains(&format!("1.{ABI_MINOR}")),
        "{err}"
    );
}

#[test]
fn a_newer_minor_version_is_accepted() {
    let name = instance("minor");
    let _engine = EngineSegment::create(&options(&name)).unwrap();
    patch(
        &name,
        ABI_VERSION_OFFSET as u64,
        &pack_version(1, 7).to_le_bytes(),
    );
    let attached = AttachedSegment::open(&name, &OpenOptions::default()).unwrap();
    assert_eq!(attached.info().abi, (1, 7));
}

#[test]
fn the_engine_listen_port_is_read_back_from_1_1_segments_only() {
    let name = instance("port");
    let mut o = options(&name);
    o.listen_port = Some(8080);
    let engine = EngineSegment::create(&o).unwrap();
    assert_eq!(engine.info().listen_port, Some(8080));
    let attached = AttachedSegment::open(&name, &OpenOptions::default()).unwrap();
    assert_eq!(attached.info().listen_port, Some(8080));
    drop(attached);
    // Written by a 1.0 engine, the same bytes were reserved: no port.
    patch(
        &name,
        ABI_VERSION_OFFSET as u64,
        &pack_version(1, 0).to_le_bytes(),
    );
    let old = AttachedSegment::open(&name, &OpenOptions::default()).unwrap();
    assert_eq!((old.info().abi, old.info().listen_port), ((1, 0), None));
    let unknown = instance("port-unknown");
    let _engine = EngineSegment::create(&options(&unknown)).unwrap();
    let attached = AttachedSegment::open(&unknown, &OpenOptions::default()).unwrap();
    assert_eq!(attached.info().listen_port, None);
}

#[test]
fn sizes_beyond_the_file_are_refused_before_the_ring_is_touched() {
    let name = instance("sizes");
    let _engine = EngineSegment::create(&options(&name)).unwrap();
    // Capacity 16 -> 1 << 20: the ring would extend far past the file.
    patch(&name, 44, &(1u32 << 20).to_le_bytes());
    patch(
        &name,
        16,
        &(crate::layout::segment_size(1 << 20) as u64).to_le_bytes(),
    );
    let err = AttachedSegment::open(&name, &OpenOptions::default()).unwrap_err();
    assert!(matches!(err, OpenError::BadLayout { .. }), "{err}");
    assert!(err.to_string().contains("the file has"), "{err}");
}

#[test]
fn forged_header_fields_are_refused_with_the_reason() {
    let cases: &[(&str, u64, &[u8], &str)] = &[
        ("cap", 44, &3u32.to_le_bytes(), "power of two"),
        ("slot", 40, &128u32.to_le_bytes(), "slot size"),
        ("hsize", 12, &2048u32.to_le_bytes(), "header size"),
        ("off", 24, &0u32.to_le_bytes(), "offsets"),
        ("models", 52, &9u32.to_le_bytes(), "model count"),
        ("nomodel", 52, &0u32.to_le_bytes(), "model count"),
        ("segsz", 16, &1u64.to_le_bytes(), "segment size"),
        ("utf8", 96, &[0xff, 0xfe], "UTF-8"),
        ("inst", 96, b"zz", "instance"),
    ];
    for (tag, offset, bytes, reason) in cases {
        let name = instance(&format!("forged-{tag}"));
        let _engine = EngineSegment::create(&options(&name)).unwrap();
        patch(&name, *offset, bytes);
        let err = AttachedSegment::open(&name, &OpenOptions::default()).unwrap_err();
        assert!(
            matches!(err, OpenError::BadLayout { .. }) && err.to_string().contains(reason),
            "{tag}: {err}"
        );
    }
}

#[test]
fn forged_step_ring_fields_are_refused_with_the_reason() {
    let name = instance("steps-size");
    let engine = EngineSegment::create(&options(&name)).unwrap();
    let offset = engine.info().steps.unwrap().offset;
    drop(engine);
    let cases: &[(&str, u64, &[u8], &str)] = &[
        ("stepslot", 716, &128u32.to_le_bytes(), "step slot size"),
        ("stepcap", 712, &3u32.to_le_bytes(), "step ring"),
        ("stepbig", 712, &(1u32 << 20).to_le_bytes(), "does not fit"),
        (
            "stepunal",
            704,
            &(offset + 64).to_le_bytes(),
            "page-aligned",
        ),
        ("stepover", 704, &4096u64.to_le_bytes(), "overlaps"),
    ];
    for (tag, at, bytes, reason) in cases {
        let name = instance(&format!("forged-{tag}"));
        let _engine = EngineSegment::create(&options(&name)).unwrap();
        patch(&name, *at, bytes);
        let err = AttachedSegment::open(&name, &OpenOptions::default()).unwrap_err();
        assert!(
            matches!(err, OpenError::BadLayout { .. }) && err.to_string().contains(reason),
            "{tag}: {err}"
        );
    }
}

#[test]
fn steps_written_by_the_engine_are_read_through_the_attached_segment() {
    let name = instance("steps");
    let engine = EngineSegment::create(&options(&name)).unwrap();
    let attached = AttachedSegment::open(&name, &OpenOptions::default()).unwrap();
    let steps = attached.steps().unwrap();
    assert_eq!(steps.capacity(), 8);
    let producer = engine.steps().unwrap().producer();
    let mut step = crate::Step {
        step: 1,
        t_start_ns: 10,
        t_decode_end_ns: 20,
        t_end_ns: 30,
        slots_total: 4,
        ..Default::default()
    };
    step.decode_slots.insert(3);
    step.decode_rows = 4;
    step.decode_calls = 1;
    let _ = producer.push(&step.encode());
    let mut seen = Vec::new();
    steps
        .consumer(StartAt::Oldest)
        .poll(10, |ticket, r| seen.push((ticket, r.decode())))
        .unwrap();
    assert_eq!(seen, [(0, Ok(step))]);
    // The request ring is untouched by steps.
    assert_eq!(attached.ring().counters().head, 0);
}

#[test]
fn a_1_3_reader_view_ignores_the_step_ring_fields() {
    let name = instance("steps-13");
    let _engine = EngineSegment::create(&options(&name)).unwrap();
    patch(
        &name,
        ABI_VERSION_OFFSET as u64,
        &pack_version(1, 3).to_le_bytes(),
    );
    let attached = AttachedSegment::open(&name, &OpenOptions::default()).unwrap();
    assert!(attached.steps().is_none());
    assert_eq!(attached.info().steps, None);
}

#[test]
fn an_uninitialised_segment_is_waited_for_then_refused() {
    let name = instance("uninit");
    let _engine = EngineSegment::create(&options(&name)).unwrap();
    patch(&name, ABI_VERSION_OFFSET as u64, &0u32.to_le_bytes());
    let err =
        AttachedSegment::open_waiting(&name, &OpenOptions::default(), Duration::from_millis(50))
            .unwrap_err();
    assert!(matches!(err, OpenError::NotInitialized(_)), "{err}");
}

#[test]
fn a_segment_truncated_while_mapped_stops_the_reader_cleanly() {
    let name = instance("trunc");
    let engine = EngineSegment::create(&options(&name)).unwrap();
    let attached = AttachedSegment::open(&name, &OpenOptions::default()).unwrap();
    let _ = engine.ring().producer().push(&sample_record(0));
    let mut consumer = attached.ring().consumer(StartAt::Oldest);
    std::fs::OpenOptions::new()
        .write(true)
        .open(segment_path(&name))
        .unwrap()
        .set_len(100)
        .unwrap();
    let err = consumer
        .poll(10, |_, _| panic!("must not read"))
        .unwrap_err();
    assert!(
        matches!(err, PollError::Truncated { actual: 100, .. }),
        "{err}"
    );
}

#[test]
fn missing_segments_and_bad_names_are_clear_errors() {
    let err = AttachedSegment::open(&instance("absent"), &OpenOptions::default()).unwrap_err();
    assert!(matches!(err, OpenError::NotFound(_)), "{err}");
    for bad in ["", ".hidden", "a/b", "sp ace", &"x".repeat(64)] {
        assert!(validate_instance(bad).is_err(), "{bad:?}");
        assert!(matches!(
            AttachedSegment::open(bad, &OpenOptions::default()),
            Err(OpenError::Name(_))
        ));
    }
    assert!(validate_instance("engine-8000.gemma_3").is_ok());
}

#[test]
fn unsafe_creation_options_are_refused() {
    let name = instance("opts");
    let mut o = options(&name);
    o.capacity = 1000;
    assert!(matches!(
        EngineSegment::create(&o),
        Err(CreateError::Capacity(_))
    ));
    let mut o = options(&name);
    o.mode = 0o662;
    assert!(matches!(
        EngineSegment::create(&o),
        Err(CreateError::UnsafeMode(0o662))
    ));
    let mut o = options(&name);
    o.models = vec![];
    assert!(matches!(
        EngineSegment::create(&o),
        Err(CreateError::Models(_))
    ));
    let mut o = options(&name);
    o.models = vec!["m".repeat(64)];
    assert!(matches!(
        EngineSegment::create(&o),
        Err(CreateError::Models(_))
    ));
    assert!(
        !std::path::Path::new(&segment_path(&name)).exists(),
        "nothing left behind"
    );
}

#[test]
fn initial_control_settings_are_published_with_the_header() {
    let name = instance("ctl");
    let mut o = options(&name);
    o.control.tracing_enabled = false;
    o.control.overflow_mode = OverflowMode::Discard;
    let _engine = EngineSegment::create(&o).unwrap();
    let attached = AttachedSegment::open(&name, &OpenOptions::default()).unwrap();
    let control = attached.ring().control();
    assert!(!control.tracing_enabled());
    assert_eq!(control.overflow_mode(), Ok(OverflowMode::Discard));
    assert_eq!(control.head_sample_ppm(), 1_000_000);
}

#[test]
fn process_start_time_is_read_from_proc() {
    assert!(process_start_time(std::process::id()).is_some());
    assert_eq!(process_start_time(0x3fff_fff0), None);
}

fn forge_death(name: &str) {
    // A pid that does not exist and no heartbeat.
    patch(name, 48, &0x3fff_fff0u32.to_le_bytes());
    patch(name, (COUNTERS_OFFSET + 88) as u64, &0u64.to_le_bytes());
}

fn dead_of(name: &str) -> Vec<DeadSegment> {
    list_dead_generations()
        .unwrap()
        .into_iter()
        .filter(|d| d.instance == name)
        .collect()
}

#[test]
fn a_table_written_by_the_engine_is_snapshotted_by_a_reader() {
    let name = instance("table");
    let mut o = options(&name);
    o.inflight_capacity = 3;
    let engine = EngineSegment::create(&o).unwrap();
    let table = engine.inflight().unwrap();
    assert_eq!(table.capacity(), 3);
    let attached = AttachedSegment::open(&name, &OpenOptions::default()).unwrap();
    assert_eq!(
        attached.info().inflight,
        Some(crate::inflight::InflightLayout {
            offset: inflight_offset_for(16) as u64,
            capacity: 3
        })
    );
    let reader = attached.inflight().unwrap();
    let handles: Vec<_> = (0..4).filter_map(|i| table.claim(&queued(i))).collect();
    assert_eq!(handles.len(), 3);
    let snapshot = reader.snapshot().unwrap();
    assert_eq!((snapshot.requests.len(), snapshot.untracked), (3, 1));
    drop(handles);
    assert!(reader.snapshot().unwrap().requests.is_empty());
    assert_eq!(reader.reported(), None);
    assert!(reader.mark_reported(1));
    assert!(
        !reader.mark_reported(1),
        "a second agent does not report twice"
    );
    assert_eq!(reader.reported(), Some(1));
}

#[test]
fn a_segment_without_a_table_or_of_minor_1_has_no_reader() {
    let name = instance("notable");
    let mut o = options(&name);
    o.inflight_capacity = 0;
    let engine = EngineSegment::create(&o).unwrap();
    assert!(engine.inflight().is_none());
    let attached = AttachedSegment::open(&name, &OpenOptions::default()).unwrap();
    assert!(attached.inflight().is_none());

    let name = instance("minor1");
    let _engine = EngineSegment::create(&options(&name)).unwrap();
    patch(
        &name,
        ABI_VERSION_OFFSET as u64,
        &pack_version(1, 1).to_le_bytes(),
    );
    let attached = AttachedSegment::open(&name, &OpenOptions::default()).unwrap();
    assert_eq!(attached.info().abi, (1, 1));
    assert!(
        attached.inflight().is_none(),
        "1.1 bytes there were reserved"
    );
}

#[test]
fn a_table_that_does_not_fit_the_file_is_refused() {
    let cases: &[(&str, u64, &[u8], &str)] = &[
        ("cap", 688, &4097u32.to_le_bytes(), "in-flight capacity"),
        ("zero", 688, &0u32.to_le_bytes(), "in-flight capacity"),
        ("big", 688, &4000u32.to_le_bytes(), "does not fit"),
        ("esize", 692, &256u32.to_le_bytes(), "entry size"),
        ("align", 680, &(8192u64 + 8).to_le_bytes(), "unaligned"),
        ("ring", 680, &4096u64.to_le_bytes(), "overlaps the ring"),
        ("far", 680, &(!63u64).to_le_bytes(), "does not fit"),
    ];
    for (tag, offset, bytes, reason) in cases {
        let name = instance(&format!("tbl-{tag}"));
        let _engine = EngineSegment::create(&options(&name)).unwrap();
        patch(&name, *offset, bytes);
        let err = AttachedSegment::open(&name, &OpenOptions::default()).unwrap_err();
        assert!(
            matches!(err, OpenError::BadLayout { .. }) && err.to_string().contains(reason),
            "{tag}: {err}"
        );
    }
    // A table over the limit is refused at creation, too.
    let mut o = options(&instance("tbl-create"));
    o.inflight_capacity = 4097;
    assert!(matches!(
        EngineSegment::create(&o),
        Err(CreateError::Capacity(_))
    ));
}

#[test]
fn a_dead_generation_with_claimed_entries_is_kept_for_the_agent() {
    let name = instance("dead");
    let mut o = options(&name);
    o.unlink_on_drop = false;
    let engine = EngineSegment::create(&o).unwrap();
    let attached = AttachedSegment::open(&name, &OpenOptions::default()).unwrap();
    engine
        .inflight()
        .unwrap()
        .claim(&queued(1))
        .unwrap()
        .abandon();
    drop(engine);
    forge_death(&name);
    let next = EngineSegment::create(&options(&name)).unwrap();
    assert_eq!(next.info().identity.generation, 2);
    // The agent's mapping survives the rename, and it finds the dead file.
    assert!(attached.replaced());
    let dead = attached.dead_generation().unwrap();
    assert_eq!(dead_of(&name), vec![dead.clone()]);
    assert_eq!(dead.generation, 1);
    assert!(!list_segments().unwrap().iter().any(|s| s.contains('~')));
    // A later agent (--backfill) opens it and sees the claimed entry.
    let backfill = AttachedSegment::open_dead(&dead, &OpenOptions::default()).unwrap();
    assert_eq!(backfill.liveness(), Liveness::Dead);
    let snapshot = backfill.inflight().unwrap().snapshot().unwrap();
    assert_eq!(snapshot.requests.len(), 1);
    assert_eq!(snapshot.requests[0].request_id, queued(1).request_id);
    assert!(backfill.inflight().unwrap().mark_reported(1));
    assert!(backfill.release_dead().unwrap());
    assert!(dead_of(&name).is_empty());
    assert!(!attached.release_dead().unwrap(), "already removed");
}

#[test]
fn a_dead_generation_with_unread_records_is_kept_and_a_reported_one_is_not() {
    let name = instance("deadring");
    let mut o = options(&name);
    o.unlink_on_drop = false;
    let engine = EngineSegment::create(&o).unwrap();
    let _ = engine.ring().producer().push(&sample_record(1));
    drop(engine);
    forge_death(&name);
    drop(EngineSegment::create(&o).unwrap());
    let dead = dead_of(&name);
    assert_eq!(dead.iter().map(|d| d.generation).collect::<Vec<_>>(), [1]);

    // Generation 2 has a claimed entry too, but an agent reported it.
    let engine = EngineSegment::create(&{
        forge_death(&name);
        o.clone()
    })
    .unwrap();
    assert_eq!(engine.info().identity.generation, 3);
    engine
        .inflight()
        .unwrap()
        .claim(&queued(1))
        .unwrap()
        .abandon();
    patch(&name, (CONTROL_OFFSET + 256) as u64, &3u64.to_le_bytes());
    drop(engine);
    forge_death(&name);
    let engine = EngineSegment::create(&o).unwrap();
    assert_eq!(engine.info().identity.generation, 4);
    let gens: Vec<_> = dead_of(&name).iter().map(|d| d.generation).collect();
    assert_eq!(gens, [1], "generation 2 was empty, 3 was reported");
    drop(engine);
    for d in dead_of(&name) {
        remove_dead_generation(&d).unwrap();
    }
    let _ = std::fs::remove_file(segment_path(&name));
}

#[test]
fn at_most_four_dead_generations_are_kept() {
    let name = instance("deadmax");
    let mut o = options(&name);
    o.unlink_on_drop = false;
    for _ in 0..7 {
        let engine = EngineSegment::create(&o).unwrap();
        engine
            .inflight()
            .unwrap()
            .claim(&queued(1))
            .unwrap()
            .abandon();
        drop(engine);
        forge_death(&name);
    }
    let gens: Vec<_> = dead_of(&name).iter().map(|d| d.generation).collect();
    assert_eq!(gens, [3, 4, 5, 6]);
    assert_eq!(MAX_DEAD_GENERATIONS, 4);
    // A dead file whose header names another generation is refused.
    let wrong = DeadSegment {
        instance: name.clone(),
        generation: 9,
        path: String::new(),
    };
    std::fs::copy(&dead_of(&name)[0].path, dead_segment_path(&name, 9)).unwrap();
    std::fs::set_permissions(
        dead_segment_path(&name, 9),
        std::fs::Permissions::from_mode(0o660),
    )
    .unwrap();
    let err = AttachedSegment::open_dead(&wrong, &OpenOptions::default()).unwrap_err();
    assert!(err.to_string().contains("generation 3, not 9"), "{err}");
    for d in dead_of(&name) {
        remove_dead_generation(&d).unwrap();
    }
    let _ = std::fs::remove_file(segment_path(&name));
}

#[test]
fn a_removed_name_is_noticed_and_a_replacement_gets_the_next_generation() {
    let name = instance("removed");
    let engine = EngineSegment::create(&options(&name)).unwrap();
    assert!(engine.name_still_mapped());
    std::fs::remove_file(segment_path(&name)).unwrap();
    assert!(!engine.name_still_mapped());
    let mut next = options(&name);
    next.replaces_generation = engine.info().identity.generation;
    let replacement = EngineSegment::create(&next).unwrap();
    assert!(replacement.name_still_mapped());
    assert!(!engine.name_still_mapped());
    assert_eq!(
        replacement.info().identity.generation,
        engine.info().identity.generation + 1
    );
    // Dropping the old segment leaves the replacement's name alone.
    drop(engine);
    assert!(std::path::Path::new(&segment_path(&name)).exists());
    drop(replacement);
    assert!(!std::path::Path::new(&segment_path(&name)).exists());
}

#[test]
fn a_killed_engine_is_dead_at_once_while_its_heartbeat_is_fresh() {
    let name = instance("lock");
    let mut o = options(&name);
    o.unlink_on_drop = false;
    let engine = EngineSegment::create(&o).unwrap();
    let attached = AttachedSegment::open(&name, &OpenOptions::default()).unwrap();
    assert!(attached.info().liveness_lock);
    assert_eq!(attached.liveness(), Liveness::Alive);
    // Closing the engine's file is what the kernel does when it dies: the
    // pid (ours) still runs and the heartbeat is fresh, yet it is dead.
    drop(engine);
    assert_eq!(attached.liveness(), Liveness::Dead);
    // A restart within the heartbeat's staleness takes the name over at once.
    let next = EngineSegment::create(&options(&name)).unwrap();
    assert_eq!(next.info().identity.generation, 2);
    assert_eq!(attached.liveness(), Liveness::Dead);
    let fresh = AttachedSegment::open(&name, &OpenOptions::default()).unwrap();
    assert_eq!(fresh.liveness(), Liveness::Alive);
}

#[test]
fn a_writer_without_the_liveness_lock_is_judged_by_pid_and_heartbeat() {
    let name = instance("nolock");
    let mut o = options(&name);
    o.unlink_on_drop = false;
    drop(EngineSegment::create(&o).unwrap());
    patch(&name, 696, &0u32.to_le_bytes());
    let attached = AttachedSegment::open(&name, &OpenOptions::default()).unwrap();
    assert!(!attached.info().liveness_lock);
    // Our own pid with its start time: alive, although no lock is held.
    assert_eq!(attached.liveness(), Liveness::Alive);
    assert!(matches!(
        EngineSegment::create(&options(&name)),
        Err(CreateError::InUse { .. })
    ));
    forge_death(&name);
    // The header is copied once at open: a new reader sees the forged pid.
    let reopened = AttachedSegment::open(&name, &OpenOptions::default()).unwrap();
    assert_eq!(reopened.liveness(), Liveness::Dead);
    let next = EngineSegment::create(&options(&name)).unwrap();
    assert_eq!(next.info().identity.generation, 2);
}
