//! A fleet on one machine: three "hosts", each in its own network, UTS and
//! mount namespace (its own address, host name, `/dev/shm` and
//! `/etc/machine-id`), each with an engine on the same port under the same
//! default instance name (`engine-8000`, as every bare-metal host has) and
//! an agent. Every agent sends OTLP to one gateway collector (rotel) on a
//! bridge, which forwards to a backend collector (rotel) on loopback. Every
//! host's spans and metrics must arrive there, told apart by their resource.
//! Needs `RINGSIDE_E2E=1` and root (namespaces); addresses only on the
//! bridge and namespaces the test creates.

#![forbid(unsafe_code)]

use ringside_tests::harness::{Collector, e2e_enabled, free_port, rotel_binary, workspace_bin};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const HOSTS: usize = 3;
const ENGINE_PORT: u16 = 8000;

fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The namespaces, the bridge and the processes of one fleet; all removed
/// when dropped.
struct Fleet {
    subnet: String,
    bridge: String,
    namespaces: Vec<String>,
    hosts: Vec<Child>,
    gateway: Option<Child>,
    dir: PathBuf,
}

impl Fleet {
    fn new() -> Fleet {
        // Names of at most 15 bytes (interface names), unique per run.
        let tag = std::process::id() % 10_000;
        let subnet = format!("10.77.{}", tag % 250);
        let dir = std::env::temp_dir().join(format!("ringside-fleet-{tag}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("fleet dir");
        let mut fleet = Fleet {
            bridge: format!("rsf{tag}br"),
            subnet,
            namespaces: Vec::new(),
            hosts: Vec::new(),
            gateway: None,
            dir,
        };
        let bridge = fleet.bridge.clone();
        run(&["ip", "link", "add", &bridge, "type", "bridge"]);
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{}.1/24", fleet.subnet),
            "dev",
            &bridge,
        ]);
        run(&["ip", "link", "set", &bridge, "up"]);
        for i in 0..HOSTS {
            let ns = format!("rsf{tag}h{i}");
            run(&["ip", "netns", "add", &ns]);
            fleet.namespaces.push(ns.clone());
            let (inside, outside) = (format!("rsf{tag}h{i}a"), format!("rsf{tag}h{i}b"));
            run(&[
                "ip", "link", "add", &inside, "type", "veth", "peer", "name", &outside,
            ]);
            run(&["ip", "link", "set", &inside, "netns", &ns]);
            run(&["ip", "link", "set", &outside, "master", &bridge, "up"]);
            let address = format!("{}/24", fleet.host_address(i));
            run(&["ip", "-n", &ns, "addr", "add", &address, "dev", &inside]);
            run(&["ip", "-n", &ns, "link", "set", &inside, "up"]);
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        }
        fleet
    }

    fn host_address(&self, host: usize) -> String {
        format!("{}.{}", self.subnet, 10 + host)
    }

    fn host_name(host: usize) -> String {
        format!("fleet-host-{host}")
    }

    fn machine_id(host: usize) -> String {
        format!("{:032x}", 0xf1ee7_u128 * 1_000 + host as u128)
    }

    /// The gateway: rotel on the bridge, forwarding to `backend` over OTLP/gRPC.
    fn start_gateway(&mut self, backend: &Collector) -> String {
        let port = free_port();
        let listen = format!("{}.1:{port}", self.subnet);
        let child = Command::new(rotel_binary())
            .args(["start", "--exporter", "otlp"])
            .args([
                "--otlp-exporter-endpoint",
                &format!("http://127.0.0.1:{}", backend.grpc_port),
            ])
            .args(["--otlp-grpc-endpoint", &listen])
            .args([
                "--otlp-http-endpoint",
                &format!("{}.1:{}", self.subnet, free_port()),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("gateway.log")).expect("log"))
            .spawn()
            .expect("start the gateway rotel");
        self.gateway = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(&listen).is_err() {
            assert!(Instant::now() < deadline, "the gateway did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        format!("http://{listen}")
    }

    /// Starts host `i`'s engine and agent in its namespaces, in a process
    /// group of their own.
    fn start_host(&mut self, i: usize, gateway: &str) {
        let machine_id = self.dir.join(format!("machine-id-{i}"));
        std::fs::write(&machine_id, format!("{}\n", Self::machine_id(i))).expect("machine id");
        let script = format!(
            "set -e
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount --bind '{machine_id}' /etc/machine-id
hostname '{host}'
'{engine}' serve --host 0.0.0.0 --port {ENGINE_PORT} --served-model-name gemma-3-270m &
'{agent}' run --endpoint '{gateway}' --batch-delay-ms 100 --metrics-interval-ms 1000 \
    --admin-listen off --state-file /dev/shm/agent-state.json &
wait",
            machine_id = machine_id.display(),
            host = Self::host_name(i),
            engine = workspace_bin("ringside-engine").display(),
            agent = workspace_bin("ringside-agent").display(),
        );
        let log = std::fs::File::create(self.dir.join(format!("host-{i}.log"))).expect("log");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.namespaces[i]])
            .args(["unshare", "--uts", "--mount", "--propagation", "private"])
            .args(["sh", "-c", &script])
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start a host");
        self.hosts.push(child);
    }

    fn host_log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("host-{i}.log"))).unwrap_or_default()
    }

    fn wait_ready(&self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(180);
        while post(&self.host_address(i), "GET", "/health", &[], "").0 != 200 {
            assert!(
                Instant::now() < deadline,
                "host {i}'s engine is not ready; its log:\n{}",
                self.host_log(i)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for host in &mut self.hosts {
            // SIGTERM to the whole group: the agent flushes, the engine stops.
            let _ = Command::new("kill")
                .args(["-TERM", "--", &format!("-{}", host.id())])
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        for host in &mut self.hosts {
            while host.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", host.id())])
                .status();
            let _ = host.wait();
        }
        if let Some(gateway) = &mut self.gateway {
            let _ = gateway.kill();
            let _ = gateway.wait();
        }
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One HTTP/1.1 request to `address:8000`; (status, body).
fn post(
    address: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let Ok(mut socket) = TcpStream::connect((address, ENGINE_PORT)) else {
        return (0, String::new());
    };
    let _ = socket.set_read_timeout(Some(Duration::from_secs(120)));
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    if socket.write_all(request.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut response = String::new();
    let _ = socket.read_to_string(&mut response);
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, response)
}

/// The value of resource attribute `key` in a rotel `Resource…` block.
fn resource_attribute<'a>(block: &'a str, key: &str) -> Option<&'a str> {
    block.lines().find_map(|l| {
        let rest = l
            .trim()
            .strip_prefix("-> ")?
            .strip_prefix(key)?
            .strip_prefix(": ")?;
        let inner = rest.split_once('(')?.1;
        inner.strip_suffix(')')
    })
}

#[test]
fn every_host_of_a_fleet_reaches_the_backend_through_one_gateway_told_apart_by_its_resource() {
    if !e2e_enabled(
        "every_host_of_a_fleet_reaches_the_backend_through_one_gateway_told_apart_by_its_resource",
    ) {
        return;
    }
    let backend = Collector::start();
    let mut fleet = Fleet::new();
    let gateway = fleet.start_gateway(&backend);
    for i in 0..HOSTS {
        fleet.start_host(i, &gateway);
    }
    for i in 0..HOSTS {
        fleet.wait_ready(i);
    }
    // The agents attach within a scan; requests before it would be history.
    std::thread::sleep(Duration::from_secs(2));
    let trace_id = |i: usize| format!("{:032x}", 0x000f_1ee7_0000_u128 + i as u128);
    for i in 0..HOSTS {
        let body = r#"{"model":"gemma-3-270m","messages":[{"role":"user","content":"hi"}],"max_tokens":4}"#;
        let traceparent = format!("00-{}-00000000000000bb-01", trace_id(i));
        let (status, response) = post(
            &fleet.host_address(i),
            "POST",
            "/v1/chat/completions",
            &[
                ("content-type", "application/json"),
                ("traceparent", &traceparent),
            ],
            body,
        );
        assert_eq!(status, 200, "host {i}: {response}");
    }

    // Each host's request span, under a resource that names its host.
    let deadline = Instant::now() + Duration::from_secs(60);
    let resources_of = |text: &str| -> Vec<Option<String>> {
        (0..HOSTS)
            .map(|i| {
                text.split("ResourceSpans #")
                    .skip(1)
                    .find(|block| block.contains(&trace_id(i)))
                    .map(str::to_owned)
            })
            .collect()
    };
    let resources = loop {
        let found = resources_of(&backend.text());
        if found.iter().all(Option::is_some) {
            break found.into_iter().flatten().collect::<Vec<_>>();
        }
        assert!(
            Instant::now() < deadline,
            "spans of hosts {:?} did not reach the backend; gateway log:\n{}\nhost logs:\n{}",
            found
                .iter()
                .enumerate()
                .filter(|(_, f)| f.is_none())
                .map(|(i, _)| i)
                .collect::<Vec<_>>(),
            std::fs::read_to_string(fleet.dir.join("gateway.log")).unwrap_or_default(),
            (0..HOSTS)
                .map(|i| fleet.host_log(i))
                .collect::<Vec<_>>()
                .join("\n---\n"),
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    let mut instance_ids = Vec::new();
    for (i, resource) in resources.iter().enumerate() {
        let attribute = |key: &str| {
            resource_attribute(resource, key)
                .unwrap_or_else(|| panic!("host {i}: no {key} in\n{resource}"))
        };
        assert_eq!(attribute("host.name"), Fleet::host_name(i), "{resource}");
        assert_eq!(attribute("host.id"), Fleet::machine_id(i), "{resource}");
        // The name every bare-metal host's engine has by default...
        assert_eq!(attribute("ringside.engine.instance"), "engine-8000");
        // ...and the identity that tells them apart.
        instance_ids.push(attribute("service.instance.id").to_owned());
    }
    instance_ids.sort();
    instance_ids.dedup();
    assert_eq!(instance_ids.len(), HOSTS, "{instance_ids:?}");

    // Metrics from every host, each under its own host's resource.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = backend.text();
        let hosts_with_metrics: Vec<usize> = (0..HOSTS)
            .filter(|i| {
                text.split("ResourceMetrics #").skip(1).any(|block| {
                    resource_attribute(block, "host.name") == Some(&Fleet::host_name(*i))
                        && block.contains("gen_ai.server.request.duration")
                })
            })
            .collect();
        if hosts_with_metrics.len() == HOSTS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "metrics reached the backend only from hosts {hosts_with_metrics:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}
