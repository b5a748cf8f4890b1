//! A telemetry segment removed while the engine runs (`rm`, systemd `RemoveIPC=`) is noticed at
//! the next heartbeat tick and replaced with the next generation, to which the engine's
//! records go from then on. Needs `RINGSIDE_E2E=1`.

#![forbid(unsafe_code)]

use ringside_shm_protocol::{AttachedSegment, OpenOptions, segment_path};
use ringside_tests::harness::{
    Agent, Collector, Engine, e2e_enabled, hex, http, records, span_field, wait_for_records,
};
use std::time::{Duration, Instant};

fn chat(engine: &Engine) -> String {
    let body = serde_json::json!({
        "model": engine.model,
        "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 4,
        "temperature": 0,
    });
    let response = http(
        engine.port,
        "POST",
        "/v1/chat/completions",
        &[("content-type", "application/json")],
        body.to_string().as_bytes(),
    )
    .expect("chat request");
    assert_eq!(
        response.status,
        200,
        "{:?}",
        String::from_utf8_lossy(&response.body)
    );
    let id = response.json()["id"].as_str().expect("id").to_owned();
    id.rsplit('-').next().unwrap_or(&id).to_owned()
}

#[test]
fn a_removed_segment_is_replaced_with_the_next_generation() {
    if !e2e_enabled("a_removed_segment_is_replaced_with_the_next_generation") {
        return;
    }
    let engine = Engine::start("removed", &[]);
    let first = engine.segment();
    let generation = first.info().identity.generation;
    let first_id = chat(&engine);
    wait_for_records(&first, 1);
    assert!(
        records(&first)
            .iter()
            .any(|r| hex(&r.request_id) == first_id)
    );

    // Let a heartbeat tick see the name in place after the first record: records pushed
    // since the last such tick count as lost when the name is then found gone.
    std::thread::sleep(Duration::from_millis(1200));
    let path = segment_path(&engine.instance);
    std::fs::remove_file(&path).expect("rm the segment");
    let deadline = Instant::now() + Duration::from_secs(5);
    let second = loop {
        if let Ok(segment) = AttachedSegment::open(&engine.instance, &OpenOptions::default())
            && segment.info().identity.generation > generation
        {
            break segment;
        }
        assert!(
            Instant::now() < deadline,
            "no new generation of {path} within 5 s; engine log:\n{}",
            engine.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(second.info().identity.generation, generation + 1);
    assert_eq!(second.info().identity.pid, engine.pid());
    assert_eq!(second.info().models, first.info().models);
    assert_eq!(second.info().capacity, first.info().capacity);
    assert_eq!(second.info().inflight, first.info().inflight);
    assert_eq!(
        second.ring().control().tracing_enabled(),
        first.ring().control().tracing_enabled()
    );
    let log = engine.log_text();
    assert!(
        log.contains(&path),
        "the log names the removed path:\n{log}"
    );

    let second_id = chat(&engine);
    wait_for_records(&second, 1);
    let in_second = records(&second);
    assert!(
        in_second.iter().any(|r| hex(&r.request_id) == second_id),
        "the second request's record is in the new generation"
    );
    assert!(!in_second.iter().any(|r| hex(&r.request_id) == first_id));
    // Nothing was pushed while the name was gone (nor since the tick before): nothing lost.
    let metrics = http(engine.port, "GET", "/metrics", &[], b"").expect("metrics");
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.lines().any(
            |l| l.starts_with("ringside_records_lost_segment_removed_total") && l.ends_with(" 0")
        ),
        "{text}"
    );
}

#[test]
fn an_agent_follows_a_removed_segment_to_the_next_generation_and_exports_from_it() {
    if !e2e_enabled("an_agent_follows_a_removed_segment_to_the_next_generation_and_exports_from_it")
    {
        return;
    }
    let collector = Collector::start();
    let engine = Engine::start("removed-follow", &[]);
    let endpoint = format!("http://127.0.0.1:{}", collector.grpc_port);
    let _agent = Agent::start(&[
        "--engine",
        &engine.instance,
        "--endpoint",
        &endpoint,
        "--batch-delay-ms",
        "100",
    ]);
    let first = chat(&engine);
    let old = engine.segment();
    wait_for_records(&old, 1);
    let first_span = hex(&records(&old)[0].span_id);
    collector.wait_for_span(&first_span, Duration::from_secs(30));
    let generation = old.info().identity.generation;
    std::fs::remove_file(segment_path(&engine.instance)).expect("rm the segment");
    let deadline = Instant::now() + Duration::from_secs(10);
    let new = loop {
        if let Ok(s) = AttachedSegment::open(&engine.instance, &OpenOptions::default())
            && s.info().identity.generation > generation
        {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "no new generation:\n{}",
            engine.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let second = chat(&engine);
    assert_ne!(first, second);
    wait_for_records(&new, 1);
    let second_span = hex(&records(&new)[0].span_id);
    // The agent notices the replaced name at its next scan and attaches to
    // the new generation: the second request reaches the collector too.
    let span = collector.wait_for_span(&second_span, Duration::from_secs(30));
    assert_eq!(span_field(&span, "Kind"), Some("SPAN_KIND_SERVER"));
}
