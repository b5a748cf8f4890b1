//! The engine's front door against careless and hostile clients, on loopback: the
//! header-read and idle timeouts, the connection cap, the lingering close of a refused
//! body, the shutdown deadline and the second signal, and rejection records that a
//! flood cannot turn into a weapon (issue 12, items 1 and 3). Needs `RINGSIDE_E2E=1`.

#![forbid(unsafe_code)]

use ringside_shm_protocol::{ErrorType, FinishReason, RecordKind};
use ringside_tests::harness::{
    Engine, e2e_enabled, hex, http, log_number, records, wait_for_records,
};
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One engine at a time: they share two cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn connect(port: u16) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    stream
}

/// One keep-alive request on `stream`; the status and the body.
fn request_on(stream: &mut TcpStream, path: &str) -> std::io::Result<(u16, String)> {
    write!(stream, "GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")?;
    read_response(stream)
}

/// Reads one response with a `content-length` body.
fn read_response(stream: &mut TcpStream) -> std::io::Result<(u16, String)> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut length = 0;
    loop {
        let mut header = String::new();
        reader.read_line(&mut header)?;
        let header = header.trim_end().to_ascii_lowercase();
        if header.is_empty() {
            break;
        }
        if let Some(v) = header.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    // Nothing is read ahead: responses here are one at a time.
    assert!(
        reader.buffer().is_empty(),
        "unexpected bytes after a response"
    );
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Waits (up to `limit`) until the server closes `stream`: end of file or a reset.
/// Returns how long that took, or `None` if it stayed open.
fn time_until_closed(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("read timeout");
    let mut buf = [0u8; 256];
    while start.elapsed() < limit {
        match stream.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return Some(start.elapsed()),
        }
    }
    None
}

/// Starts a streamed completion long enough to outlast the test and waits for its first
/// tokens; the returned socket is then left unread (a stuck client).
fn stuck_streaming_client(engine: &Engine) -> TcpStream {
    let body = format!(
        r#"{{"model":"{}","prompt":"Tell me a very long story.","max_tokens":3000,"stream":true}}"#,
        engine.model
    );
    let mut stream = connect(engine.port);
    write!(
        stream,
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send the request");
    let mut buf = [0u8; 2048];
    let mut seen = 0;
    while seen < 600 {
        let n = stream.read(&mut buf).expect("streamed tokens");
        assert!(n > 0, "the stream ended early");
        seen += n;
    }
    stream
}

fn send_signal(engine: &Engine, signal: &str) {
    let status = Command::new("kill")
        .args(["-s", signal, &engine.pid().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -s {signal}");
}

/// Waits (up to `limit`) for the engine to exit; how long it took.
fn time_until_exit(engine: &mut Engine, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if !engine.running() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

fn metrics_page(port: u16) -> String {
    let page = http(port, "GET", "/metrics", &[], b"").expect("/metrics");
    assert_eq!(page.status, 200);
    String::from_utf8_lossy(&page.body).into_owned()
}

/// The value of the one sample of `metric` whose labels contain `labels`.
fn sample(page: &str, metric: &str, labels: &str) -> Option<f64> {
    page.lines()
        .filter(|l| l.starts_with(metric) && l.contains(labels))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn a_slowloris_client_is_closed_by_the_header_read_timeout() {
    if !e2e_enabled("a_slowloris_client_is_closed_by_the_header_read_timeout") {
        return;
    }
    let _serial = serial();
    let engine = Engine::start(
        "slowloris",
        &["--header-read-timeout", "2", "--idle-timeout", "60"],
    );
    let mut slow = connect(engine.port);
    slow.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let head = b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let start = Instant::now();
    let mut closed_after = None;
    for byte in head.iter().take(20) {
        if slow.write_all(std::slice::from_ref(byte)).is_err() {
            closed_after = Some(start.elapsed());
            break;
        }
        // One byte a second; the read doubles as the wait and notices the close.
        let mut buf = [0u8; 64];
        match slow.read(&mut buf) {
            Ok(0) => {
                closed_after = Some(start.elapsed());
                break;
            }
            Ok(n) => panic!(
                "an unfinished head got an answer: {:?}",
                String::from_utf8_lossy(&buf[..n])
            ),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => {
                closed_after = Some(start.elapsed());
                break;
            }
        }
    }
    let closed_after = closed_after.expect("the slowloris connection stayed open for 20 s");
    eprintln!("slowloris connection closed after {closed_after:?}");
    assert!(
        closed_after >= Duration::from_millis(1500) && closed_after < Duration::from_secs(5),
        "closed after {closed_after:?}, the header-read timeout is 2 s"
    );
    let health = http(engine.port, "GET", "/health", &[], b"").expect("/health");
    assert_eq!(health.status, 200);
}

#[test]
fn a_slow_body_gets_408_from_the_body_read_timeout() {
    if !e2e_enabled("a_slow_body_gets_408_from_the_body_read_timeout") {
        return;
    }
    let _serial = serial();
    let engine = Engine::start("slowbody", &["--body-read-timeout", "2"]);
    let mut slow = connect(engine.port);
    write!(
        slow,
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         content-length: 1000\r\n\r\n"
    )
    .expect("head");
    slow.set_read_timeout(Some(Duration::from_secs(1)))
        .expect("read timeout");
    let start = Instant::now();
    let mut answer = Vec::new();
    for _ in 0..20 {
        // One body byte a second; the read doubles as the wait.
        if slow.write_all(b" ").is_err() {
            break;
        }
        let mut buf = [0u8; 1024];
        match slow.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                answer.extend_from_slice(&buf[..n]);
                break;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("reset instead of a 408: {e}"),
        }
    }
    let took = start.elapsed();
    let answer = String::from_utf8_lossy(&answer);
    eprintln!("slow body answered after {took:?}");
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "{answer:?} after {took:?}"
    );
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(5),
        "answered after {took:?}, the body-read timeout is 2 s"
    );
}

#[test]
fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    if !e2e_enabled("an_idle_keep_alive_connection_is_closed_after_the_idle_timeout") {
        return;
    }
    let _serial = serial();
    let engine = Engine::start(
        "idle",
        &["--header-read-timeout", "30", "--idle-timeout", "2"],
    );
    // Requests 1.2 s apart keep the connection: the idle time restarts after each.
    let mut busy = connect(engine.port);
    for _ in 0..4 {
        assert_eq!(request_on(&mut busy, "/health").expect("/health").0, 200);
        std::thread::sleep(Duration::from_millis(1200));
    }
    assert_eq!(request_on(&mut busy, "/health").expect("/health").0, 200);
    // Then it idles.
    let idle_for = time_until_closed(&mut busy, Duration::from_secs(10))
        .expect("an idle keep-alive connection stayed open for 10 s");
    eprintln!("idle keep-alive connection closed after {idle_for:?}");
    assert!(
        idle_for >= Duration::from_millis(1500) && idle_for < Duration::from_secs(5),
        "closed after {idle_for:?}, the idle timeout is 2 s"
    );
}

#[test]
fn the_connection_cap_refuses_connections_beyond_it_and_health_still_answers() {
    if !e2e_enabled("the_connection_cap_refuses_connections_beyond_it_and_health_still_answers") {
        return;
    }
    let _serial = serial();
    let engine = Engine::start(
        "cap",
        &[
            "--max-connections",
            "4",
            "--header-read-timeout",
            "60",
            "--idle-timeout",
            "60",
        ],
    );
    // Wait for the readiness probes' connections to be gone.
    std::thread::sleep(Duration::from_millis(300));
    let mut held: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut s = connect(engine.port);
            assert_eq!(request_on(&mut s, "/health").expect("/health").0, 200);
            s
        })
        .collect();
    for attempt in 0..5 {
        let mut extra = connect(engine.port);
        // An error: closed before the request was read, refused as well.
        if let Ok((status, _)) = request_on(&mut extra, "/health") {
            assert_eq!(status, 503, "attempt {attempt} beyond the cap");
        }
        assert!(
            time_until_closed(&mut extra, Duration::from_secs(2)).is_some(),
            "a connection beyond the cap stayed open"
        );
    }
    // An existing connection still answers, and reports the refusals.
    let (status, page) = request_on(&mut held[0], "/metrics").expect("/metrics");
    assert_eq!(status, 200);
    let refused = sample(&page, "ringside_connections_refused_total", "").unwrap_or(0.0);
    assert!(refused >= 5.0, "refused {refused}:\n{page}");
    assert_eq!(
        sample(&page, "ringside_connections_open", ""),
        Some(4.0),
        "{page}"
    );
    // A freed slot takes a new connection.
    drop(held.pop());
    std::thread::sleep(Duration::from_millis(300));
    let mut fresh = connect(engine.port);
    assert_eq!(request_on(&mut fresh, "/health").expect("/health").0, 200);
    let log = engine.log_text();
    assert_eq!(
        log.matches("connection cap reached").count(),
        1,
        "one warning for the burst, not one per connection:\n{log}"
    );
}

#[test]
fn a_refused_body_gets_its_413_or_401_not_a_reset() {
    if !e2e_enabled("a_refused_body_gets_its_413_or_401_not_a_reset") {
        return;
    }
    let _serial = serial();
    let engine = Engine::start(
        "linger",
        &["--api-key", "sk-test", "--max-request-bytes", "1048576"],
    );
    // Clients that send the whole body before they read (Python's http.client does).
    let cases = [
        ("oversized", "Bearer sk-test", 24 * 1024 * 1024, 413),
        ("unauthorized", "Bearer wrong", 512 * 1024, 401),
    ];
    for (what, key, length, want) in cases {
        let mut stream = connect(engine.port);
        write!(
            stream,
            "POST /v1/completions HTTP/1.1\r\nhost: x\r\nauthorization: {key}\r\n\
             content-type: application/json\r\ncontent-length: {length}\r\n\r\n"
        )
        .unwrap();
        let body = vec![b' '; length];
        stream
            .write_all(&body)
            .unwrap_or_else(|e| panic!("{what}: the body was cut off by {e}"));
        let (status, text) = read_response(&mut stream)
            .unwrap_or_else(|e| panic!("{what}: no response to read: {e}"));
        assert_eq!(status, want, "{what}: {text}");
        assert!(text.contains("error"), "{what}: {text}");
    }
}

#[test]
fn sigterm_with_a_stuck_streaming_client_exits_within_the_shutdown_deadline() {
    if !e2e_enabled("sigterm_with_a_stuck_streaming_client_exits_within_the_shutdown_deadline") {
        return;
    }
    let _serial = serial();
    let mut engine = Engine::start("deadline", &["--parallel", "1", "--shutdown-timeout", "2"]);
    let segment = engine.segment();
    let _stuck = stuck_streaming_client(&engine);
    send_signal(&engine, "TERM");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        TcpStream::connect(("127.0.0.1", engine.port)).is_err(),
        "a new connection was accepted after SIGTERM"
    );
    // The 2 s deadline, the aborted response's grace and the teardown.
    let took = time_until_exit(&mut engine, Duration::from_secs(15)).unwrap_or_else(|| {
        panic!(
            "still running 15 s after SIGTERM; log:\n{}",
            engine.log_text()
        )
    });
    eprintln!("exited {took:?} after SIGTERM (shutdown timeout 2 s)");
    assert!(
        took >= Duration::from_millis(1500),
        "exited before the deadline: {took:?}"
    );
    assert!(took < Duration::from_secs(8), "took {took:?}");
    wait_for_records(&segment, 1);
    let aborted = records(&segment)
        .into_iter()
        .find(|r| r.finish_reason == FinishReason::Abort)
        .expect("a record of the aborted request");
    assert_eq!(aborted.http_status, 503);
    assert_eq!(aborted.error_type, ErrorType::Unavailable);
    assert!(aborted.completion_tokens > 0 && aborted.completion_tokens < 3000);
    assert!(engine.log_text().contains("shutdown deadline"));
}

#[test]
fn a_second_sigterm_exits_at_once() {
    if !e2e_enabled("a_second_sigterm_exits_at_once") {
        return;
    }
    let _serial = serial();
    let mut engine = Engine::start("second", &["--parallel", "1", "--shutdown-timeout", "60"]);
    let segment = engine.segment();
    let _stuck = stuck_streaming_client(&engine);
    send_signal(&engine, "TERM");
    std::thread::sleep(Duration::from_millis(700));
    assert!(engine.running(), "the first SIGTERM waits for the request");
    send_signal(&engine, "TERM");
    let took = time_until_exit(&mut engine, Duration::from_secs(10))
        .expect("still running 10 s after the second SIGTERM");
    eprintln!("exited {took:?} after the second SIGTERM");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert!(engine.log_text().contains("second signal"));
    // What it could record: the stuck request, as aborted by the engine.
    wait_for_records(&segment, 1);
    let aborted = records(&segment)
        .into_iter()
        .find(|r| r.finish_reason == FinishReason::Abort)
        .expect("a record of the aborted request");
    assert_eq!(aborted.http_status, 503);
    // No orderly teardown: the segment's name is left for a successor (or the agent).
    let _ = std::fs::remove_file(ringside_shm_protocol::segment_path(&engine.instance));
}

#[test]
fn a_401_flood_neither_adopts_the_callers_trace_nor_laps_the_ring() {
    if !e2e_enabled("a_401_flood_neither_adopts_the_callers_trace_nor_laps_the_ring") {
        return;
    }
    let _serial = serial();
    let engine = Engine::start(
        "flood",
        &[
            "--api-key",
            "sk-test",
            "--rejection-records-per-second",
            "5",
            "--ring-capacity",
            "1024",
        ],
    );
    let victim = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traceparent = format!("00-{victim}-00f067aa0ba902b7-01");
    let flood = 2000;
    let start = Instant::now();
    for _ in 0..flood {
        let r = http(
            engine.port,
            "POST",
            "/v1/completions",
            &[
                ("traceparent", &traceparent),
                ("content-type", "application/json"),
            ],
            b"{}",
        )
        .expect("401");
        assert_eq!(r.status, 401);
    }
    let seconds = start.elapsed().as_secs() + 1;
    // An authenticated caller's trace is still continued.
    let own = "0af7651916cd43dd8448eb211c80319c";
    let ok = http(
        engine.port,
        "POST",
        "/v1/completions",
        &[
            ("authorization", "Bearer sk-test"),
            ("traceparent", &format!("00-{own}-b7ad6b7169203331-01")),
            ("content-type", "application/json"),
        ],
        format!(
            r#"{{"model":"{}","prompt":"Hi","max_tokens":2}}"#,
            engine.model
        )
        .as_bytes(),
    )
    .expect("authorized request");
    assert_eq!(ok.status, 200);

    let segment = engine.segment();
    let page = metrics_page(engine.port);
    let suppressed = sample(
        &page,
        "ringside_rejection_records_suppressed_total",
        r#"error_type="unauthorized""#,
    )
    .expect("the suppressed count in /metrics");
    let counted = sample(
        &page,
        "ringside_requests_total",
        r#"operation="text_completion",status="401""#,
    );
    assert_eq!(
        counted,
        Some(f64::from(flood)),
        "every 401 is still counted"
    );
    let head = segment.ring().counters().head;
    let rejected = records(&segment)
        .into_iter()
        .filter(|r| r.kind == RecordKind::RequestRejected)
        .collect::<Vec<_>>();
    eprintln!(
        "{flood} 401s in {seconds} s: {} records, {suppressed} suppressed",
        rejected.len()
    );
    assert!(
        head < 1024,
        "the flood lapped the ring: {head} records written"
    );
    assert!(
        rejected.len() as u64 <= 5 * (seconds + 1),
        "{} rejection records for a 5/s limit over {seconds} s",
        rejected.len()
    );
    assert!(!rejected.is_empty(), "some 401s are still recorded");
    assert_eq!(
        rejected.len() as f64 + suppressed,
        f64::from(flood),
        "recorded + suppressed = refused"
    );
    for r in &rejected {
        assert_ne!(hex(&r.trace_id), victim, "a 401 adopted the caller's trace");
        assert_eq!(r.parent_span_id, None);
        assert_eq!(r.error_type, ErrorType::Unauthorized);
    }
    wait_for_records(&segment, rejected.len() as u64 + 1);
    assert!(
        records(&segment)
            .iter()
            .any(|r| r.http_status == 200 && hex(&r.trace_id) == own),
        "the authenticated request continues its caller's trace"
    );
    // The periodic log line says what was dropped.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !engine.log_text().contains("rejection records rate-limited") {
        assert!(
            Instant::now() < deadline,
            "no rate-limit log line; log:\n{}",
            engine.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_full_queue_answers_429_with_retry_after_and_a_record() {
    if !e2e_enabled("a_full_queue_answers_429_with_retry_after_and_a_record") {
        return;
    }
    let _serial = serial();
    let engine = Engine::start("queuefull", &["--parallel", "1", "--max-queue", "1"]);
    let segment = engine.segment();
    // One request decoding, one waiting: the engine is full.
    let _running = stuck_streaming_client(&engine);
    let body = format!(
        r#"{{"model":"{}","prompt":"Another story.","max_tokens":3000,"stream":true}}"#,
        engine.model
    );
    let mut queued = connect(engine.port);
    write!(
        queued,
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let refused = http(
        engine.port,
        "POST",
        "/v1/completions",
        &[("content-type", "application/json")],
        format!(
            r#"{{"model":"{}","prompt":"Hi","max_tokens":2}}"#,
            engine.model
        )
        .as_bytes(),
    )
    .expect("the third request");
    assert_eq!(
        refused.status,
        429,
        "{}",
        String::from_utf8_lossy(&refused.body)
    );
    assert_eq!(refused.header("retry-after"), Some("1"));
    let id = refused
        .header("x-request-id")
        .expect("x-request-id")
        .to_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    let record = loop {
        if let Some(r) = records(&segment)
            .into_iter()
            .find(|r| hex(&r.request_id) == id)
        {
            break r;
        }
        assert!(Instant::now() < deadline, "no record of the 429");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(record.kind, RecordKind::RequestRejected);
    assert_eq!(record.http_status, 429);
    assert_eq!(record.error_type, ErrorType::QueueFull);
}

#[test]
fn fd_exhaustion_under_prlimit_lowers_the_connection_cap_and_health_keeps_answering() {
    if !e2e_enabled(
        "fd_exhaustion_under_prlimit_lowers_the_connection_cap_and_health_keeps_answering",
    ) {
        return;
    }
    let _serial = serial();
    // The default --max-connections (1024) under 64 descriptors: before the cap was fitted to
    // the limit, 80 idle sockets left accept() failing with EMFILE and /health unanswered.
    let engine = Engine::start_with_nofile(
        "nofile",
        &["--header-read-timeout", "60", "--idle-timeout", "60"],
        64,
    );
    let log = engine.log_text();
    assert!(
        log.contains("--max-connections does not fit RLIMIT_NOFILE"),
        "no log line for the lowered cap:\n{log}"
    );
    let cap = log_number(&log, "serving_at_most")
        .unwrap_or_else(|| panic!("no serving_at_most in the log:\n{log}")) as usize;
    eprintln!("connection cap under a 64-descriptor limit: {cap}");
    assert!((4..64).contains(&cap), "cap {cap}");
    // Wait for the readiness probes' connections to be gone.
    std::thread::sleep(Duration::from_millis(300));
    let mut probe = connect(engine.port);
    assert_eq!(request_on(&mut probe, "/health").expect("/health").0, 200);

    // Three times as many idle sockets as the process has descriptors.
    let flood = 200;
    let mut idle: Vec<TcpStream> = (0..flood).map(|_| connect(engine.port)).collect();
    for _ in 0..10 {
        let (status, _) = request_on(&mut probe, "/health").expect("/health under the flood");
        assert_eq!(status, 200);
        std::thread::sleep(Duration::from_millis(200));
    }
    // Those beyond the cap were answered and closed, not left unaccepted in the backlog.
    let mut closed = 0;
    for s in &mut idle {
        if time_until_closed(s, Duration::from_millis(50)).is_some() {
            closed += 1;
        }
    }
    eprintln!("{closed} of {flood} idle sockets refused and closed");
    assert!(
        closed >= flood - cap,
        "only {closed} of {flood} idle sockets were closed with a cap of {cap}"
    );
    let (status, page) = request_on(&mut probe, "/metrics").expect("/metrics");
    assert_eq!(status, 200);
    let refused = sample(&page, "ringside_connections_refused_total", "").unwrap_or(0.0);
    assert!(refused >= (flood - cap) as f64, "refused {refused}");
    let open_fds = std::fs::read_dir(format!("/proc/{}/fd", engine.pid()))
        .map(|d| d.count())
        .unwrap_or(0);
    assert!(open_fds <= 64, "{open_fds} descriptors open");
    let log = engine.log_text();
    assert!(
        !log.contains("cannot accept connections"),
        "accept() ran out of descriptors:\n{log}"
    );
    assert!(log.contains("connection cap reached"), "{log}");
    // Once the flood is gone, new connections are served again.
    drop(idle);
    std::thread::sleep(Duration::from_millis(300));
    let health = http(engine.port, "GET", "/health", &[], b"").expect("/health");
    assert_eq!(health.status, 200);
}
