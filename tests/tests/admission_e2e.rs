//! Work before admission, and the API key's paths (issue 12, items 2 and 6): a prompt that
//! cannot fit the context is refused from its byte length before it is tokenized, tokenizing
//! stays off the async workers (`/health` answers while the engine is fed abusive requests),
//! every list is capped; `--api-key-file` is checked, and the key never reaches the companion
//! agent's environment. Needs `RINGSIDE_E2E=1`.

#![forbid(unsafe_code)]

use ringside_tests::harness::{
    Collector, Engine, HttpResponse, e2e_enabled, free_port, http, log_number, unique_instance,
    workspace_bin,
};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One engine at a time: they share two cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const JSON: (&str, &str) = ("content-type", "application/json");

fn post(port: u16, path: &str, body: &[u8]) -> HttpResponse {
    http(port, "POST", path, &[JSON], body).expect("POST")
}

/// The engine's `max_token_bytes` from its "model loaded" log line.
fn max_token_bytes(engine: &Engine) -> usize {
    let log = engine.log_text();
    let value = log_number(&log, "max_token_bytes")
        .unwrap_or_else(|| panic!("no max_token_bytes in the log:\n{log}"))
        as usize;
    assert!(value > 0, "the default model's tokenizer has a byte bound");
    value
}

fn error_of(r: &HttpResponse) -> (String, String, String) {
    let e = &r.json()["error"];
    let s = |k: &str| e[k].as_str().unwrap_or_default().to_owned();
    (s("param"), s("code"), s("message"))
}

/// A completion body whose prompt is `text` (JSON-escaped).
fn completion_body(model: &str, text: &str, max_tokens: u32) -> Vec<u8> {
    serde_json::json!({"model": model, "prompt": text, "max_tokens": max_tokens})
        .to_string()
        .into_bytes()
}

#[test]
fn health_answers_within_100_ms_while_abusive_requests_are_refused() {
    if !e2e_enabled("health_answers_within_100_ms_while_abusive_requests_are_refused") {
        return;
    }
    let _serial = serial();
    let engine = Engine::start("abuse", &[]);
    let port = engine.port;
    let model = engine.model.clone();
    let m = max_token_bytes(&engine);
    let four_mib = 4 * 1024 * 1024;
    // Each body just under the 4 MiB body cap.
    let huge_text = completion_body(&model, &"a".repeat(four_mib - 200), 1);
    let huge_chat = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "b".repeat(four_mib - 200)}],
    })
    .to_string()
    .into_bytes();
    let ids = vec!["7"; (four_mib - 200) / 2].join(",");
    let huge_ids = format!(r#"{{"model":"{model}","prompt":[{ids}]}}"#).into_bytes();
    let nested_ids = format!(r#"{{"model":"{model}","prompt":[[{ids}]]}}"#).into_bytes();
    let stops = vec![r#""s""#; (four_mib - 300) / 4].join(",");
    let huge_stop = format!(r#"{{"model":"{model}","prompt":"Hi","stop":[{stops}]}}"#).into_bytes();
    // At the byte bound: passes the check, is tokenized (off the async workers), and is then
    // refused from its token count.
    let at_bound = completion_body(&model, &"hello world ".repeat(4095 * m / 12), 1);
    assert!(at_bound.len() < four_mib);

    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        (
            "4 MiB prompt",
            huge_text.clone(),
            "prompt",
            "context_length_exceeded",
        ),
        (
            "4 MiB prompt",
            huge_text.clone(),
            "prompt",
            "context_length_exceeded",
        ),
        (
            "4 MiB prompt",
            huge_text,
            "prompt",
            "context_length_exceeded",
        ),
        (
            "4 MiB chat",
            huge_chat.clone(),
            "messages",
            "context_length_exceeded",
        ),
        (
            "4 MiB chat",
            huge_chat,
            "messages",
            "context_length_exceeded",
        ),
        ("2 M token ids", huge_ids.clone(), "prompt", "invalid_value"),
        ("2 M token ids", huge_ids, "prompt", "invalid_value"),
        (
            "2 M nested token ids",
            nested_ids,
            "prompt[0]",
            "invalid_value",
        ),
        ("1 M stop strings", huge_stop, "stop", "invalid_value"),
        (
            "prompt at the byte bound",
            at_bound.clone(),
            "prompt",
            "context_length_exceeded",
        ),
        (
            "prompt at the byte bound",
            at_bound,
            "prompt",
            "context_length_exceeded",
        ),
    ];

    let stop = Arc::new(AtomicBool::new(false));
    let prober = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut latencies = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let start = Instant::now();
                let r = http(port, "GET", "/health", &[], b"").expect("/health");
                latencies.push(start.elapsed());
                assert_eq!(r.status, 200);
                std::thread::sleep(Duration::from_millis(10));
            }
            latencies
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    let abusers: Vec<_> = cases
        .into_iter()
        .map(|(what, body, param, code)| {
            std::thread::spawn(move || {
                let start = Instant::now();
                let path = if what.contains("chat") {
                    "/v1/chat/completions"
                } else {
                    "/v1/completions"
                };
                let r = post(port, path, &body);
                let took = start.elapsed();
                (what, r, took, param, code)
            })
        })
        .collect();
    let mut results = Vec::new();
    for a in abusers {
        results.push(a.join().expect("abusive client"));
    }
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    let latencies = prober.join().expect("/health prober");

    for (what, r, took, param, code) in &results {
        let (p, c, message) = error_of(r);
        eprintln!("{what}: {} in {took:?}: {message}", r.status);
        assert_eq!(r.status, 400, "{what}: {message}");
        assert_eq!(
            (p.as_str(), c.as_str()),
            (*param, *code),
            "{what}: {message}"
        );
        if what.starts_with("4 MiB") {
            // Refused from its byte length: never tokenized (that took 5.6 s a request).
            assert!(message.contains("bytes long"), "{what}: {message}");
            assert!(*took < Duration::from_secs(2), "{what} took {took:?}");
        }
        if what.starts_with("prompt at the byte bound") {
            assert!(message.contains("your prompt has"), "{what}: {message}");
        }
    }
    let worst = latencies.iter().max().copied().unwrap_or_default();
    eprintln!(
        "/health: {} probes during the abuse, worst {worst:?}",
        latencies.len()
    );
    assert!(latencies.len() >= 5, "too few probes: {latencies:?}");
    assert!(
        worst < Duration::from_millis(100),
        "/health took {worst:?} while the engine was fed abusive requests: {latencies:?}"
    );
    // And the engine still serves.
    let ok = post(port, "/v1/completions", &completion_body(&model, "Hi", 2));
    assert_eq!(ok.status, 200);
}

#[test]
fn the_byte_bound_refuses_just_above_it_and_tokenizes_at_it() {
    if !e2e_enabled("the_byte_bound_refuses_just_above_it_and_tokenizes_at_it") {
        return;
    }
    let _serial = serial();
    let engine = Engine::start("bytebound", &["--ctx-size", "512"]);
    let m = max_token_bytes(&engine);
    // A prompt is refused at 512 tokens: 511 * m bytes may still fit, one byte more cannot.
    let above = post(
        engine.port,
        "/v1/completions",
        &completion_body(&engine.model, &"a".repeat(511 * m + 1), 1),
    );
    let (param, code, message) = error_of(&above);
    assert_eq!(above.status, 400, "{message}");
    assert_eq!(
        (param.as_str(), code.as_str()),
        ("prompt", "context_length_exceeded")
    );
    assert!(
        message.contains("bytes long") && message.contains("at least 512 tokens"),
        "{message}"
    );

    let at = post(
        engine.port,
        "/v1/completions",
        &completion_body(&engine.model, &"a".repeat(511 * m), 1),
    );
    if at.status == 200 {
        let tokens = at.json()["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
        assert!(tokens >= 511, "{tokens} tokens for {} bytes", 511 * m);
    } else {
        let (param, code, message) = error_of(&at);
        assert_eq!(at.status, 400, "{message}");
        assert_eq!(
            (param.as_str(), code.as_str()),
            ("prompt", "context_length_exceeded")
        );
        // Tokenized: the refusal gives the exact count.
        assert!(message.contains("your prompt has"), "{message}");
    }
    // Token ids are counted, not measured: 511 ids fit, 512 do not.
    for (n, fits) in [(511, true), (512, false)] {
        let ids = vec!["1000"; n].join(",");
        let r = post(
            engine.port,
            "/v1/completions",
            format!(
                r#"{{"model":"{}","prompt":[{ids}],"max_tokens":1}}"#,
                engine.model
            )
            .as_bytes(),
        );
        assert_eq!(r.status == 200, fits, "{n} ids: {}", error_of(&r).2);
    }
}

#[test]
fn the_byte_bound_never_exceeds_the_token_count_of_real_prompts() {
    if !e2e_enabled("the_byte_bound_never_exceeds_the_token_count_of_real_prompts") {
        return;
    }
    let _serial = serial();
    let engine = Engine::start("boundsound", &[]);
    let m = max_token_bytes(&engine);
    // Pseudo-random printable text (a fixed LCG: the same every run).
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let noise: String = (0..1500)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            char::from(b' ' + ((state >> 33) % 95) as u8)
        })
        .collect();
    let longest_space_run = " ".repeat(4000);
    let texts: Vec<(&str, String)> = vec![
        ("prose", "Hello world, this is ringside. ".repeat(60)),
        ("spaces", longest_space_run),
        ("newlines", "\n".repeat(2000)),
        ("tabs and spaces", "\t \t  \t   ".repeat(150)),
        ("letters", "a".repeat(4000)),
        ("digits", "0123456789".repeat(150)),
        ("punctuation", "=-=*".repeat(400)),
        ("japanese", "日本語のテキストです。".repeat(100)),
        ("emoji", "🦀🚀".repeat(300)),
        (
            "special tokens",
            "<start_of_turn>user\nhi<end_of_turn>\n".repeat(60),
        ),
        ("html", "<div class=\"x\"></div>\n".repeat(80)),
        ("noise", noise),
    ];
    for (what, text) in texts {
        let r = post(
            engine.port,
            "/v1/completions",
            &completion_body(&engine.model, &text, 1),
        );
        assert_eq!(r.status, 200, "{what}: {}", error_of(&r).2);
        let tokens = r.json()["usage"]["prompt_tokens"].as_u64().unwrap_or(0) as usize;
        let bound = text.len().div_ceil(m);
        eprintln!(
            "{what}: {} bytes, {tokens} tokens, bound {bound} ({:.1} bytes a token)",
            text.len(),
            text.len() as f64 / tokens as f64
        );
        assert!(
            tokens >= bound,
            "{what}: {tokens} tokens for {} bytes, below the bound {bound} (max_token_bytes {m})",
            text.len()
        );
    }
}

/// The pid of the engine's companion agent (its child), waiting for it to start.
fn companion_pid(engine_pid: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = std::fs::read_dir("/proc")
            .expect("/proc")
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .find(|pid| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                // The parent pid is the second field after the command name.
                let after = stat.rfind(')').map_or("", |i| &stat[i + 1..]);
                after.split_whitespace().nth(1) == Some(&engine_pid.to_string())
                    && stat.contains("(ringside-agent)")
            });
        if let Some(pid) = found {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "no companion agent under {engine_pid}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_api_key_stays_out_of_the_companion_agents_environment() {
    if !e2e_enabled("the_api_key_stays_out_of_the_companion_agents_environment") {
        return;
    }
    let _serial = serial();
    let collector = Collector::start();
    let endpoint = format!("http://127.0.0.1:{}", collector.grpc_port);
    let engine = Engine::start_with_env(
        "companionenv",
        &["--otlp-traces-endpoint", &endpoint],
        &[
            ("RINGSIDE_API_KEY", "sk-env-secret"),
            ("VLLM_API_KEY", "sk-vllm-secret"),
            ("RINGSIDE_TEST_MARKER", "passed-on"),
        ],
    );
    // The key is in force.
    let models = |auth: &[(&str, &str)]| {
        http(engine.port, "GET", "/v1/models", auth, b"")
            .expect("/v1/models")
            .status
    };
    assert_eq!(models(&[]), 401);
    assert_eq!(models(&[("authorization", "Bearer sk-env-secret")]), 200);

    let pid = companion_pid(engine.pid());
    let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("companion environ");
    let environ = String::from_utf8_lossy(&environ);
    let names: Vec<&str> = environ
        .split('\0')
        .filter_map(|kv| kv.split('=').next())
        .collect();
    // The rest of the engine's environment (the OTEL_* settings, say) is passed on.
    assert!(
        environ
            .split('\0')
            .any(|kv| kv == "RINGSIDE_TEST_MARKER=passed-on"),
        "the companion's environment was not read: {names:?}"
    );
    for name in ["RINGSIDE_API_KEY", "VLLM_API_KEY", "RINGSIDE_API_KEY_FILE"] {
        assert!(!names.contains(&name), "{name} reached the companion");
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("companion cmdline");
    let cmdline = String::from_utf8_lossy(&cmdline);
    for secret in ["sk-env-secret", "sk-vllm-secret"] {
        assert!(
            !environ.contains(secret),
            "{secret} in the companion's environment"
        );
        assert!(
            !cmdline.contains(secret),
            "{secret} in the companion's command line"
        );
    }
}

fn scratch_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(unique_instance(tag));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn write_key(dir: &Path, name: &str, content: &str, mode: u32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let path = dir.join(name);
    std::fs::write(&path, content).expect("key file");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    path
}

/// Runs `ringside-engine serve` with `args` and expects it to refuse to start: its stderr.
fn refused_start(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut child = Command::new(workspace_bin("ringside-engine"))
        .arg("serve")
        .args(["--port", &free_port().to_string()])
        .args(["--instance", &unique_instance("refused")])
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ringside-engine");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the engine started with {args:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    assert!(!status.success(), "{args:?}: {status}\n{stderr}");
    stderr
}

#[test]
fn an_api_key_file_is_used_and_an_unsafe_or_ambiguous_one_is_refused_at_start() {
    if !e2e_enabled("an_api_key_file_is_used_and_an_unsafe_or_ambiguous_one_is_refused_at_start") {
        return;
    }
    let _serial = serial();
    let dir = scratch_dir("apikeyfile");
    let good = write_key(&dir, "good", "sk-from-file\n", 0o600);
    let good_arg = good.to_str().expect("utf-8 path");
    {
        let engine = Engine::start("apikeyfile", &["--api-key-file", good_arg]);
        let models = |auth: &[(&str, &str)]| {
            http(engine.port, "GET", "/v1/models", auth, b"")
                .expect("/v1/models")
                .status
        };
        assert_eq!(models(&[]), 401);
        assert_eq!(models(&[("authorization", "Bearer sk-from-file")]), 200);
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", engine.pid())).expect("cmdline");
        assert!(!String::from_utf8_lossy(&cmdline).contains("sk-from-file"));
    }

    let readable = write_key(&dir, "readable", "sk\n", 0o644);
    let stderr = refused_start(&["--api-key-file", readable.to_str().unwrap()], &[]);
    assert!(
        stderr.contains("other users may read") && stderr.contains(readable.to_str().unwrap()),
        "{stderr}"
    );
    let fifo = dir.join("fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());
    let stderr = refused_start(&["--api-key-file", fifo.to_str().unwrap()], &[]);
    assert!(stderr.contains("not a regular file"), "{stderr}");
    let stderr = refused_start(&["--api-key-file", good_arg, "--api-key", "sk-flag"], &[]);
    assert!(stderr.contains("cannot be used with"), "{stderr}");
    for (name, value) in [("RINGSIDE_API_KEY", "sk-env"), ("VLLM_API_KEY", "sk-vllm")] {
        let stderr = refused_start(&["--api-key-file", good_arg], &[(name, value)]);
        assert!(
            stderr.contains("both give an API key") || stderr.contains("cannot be used with"),
            "{name}: {stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
