"""CI check of the Kubernetes manifests: the built-in kinds validate against
the Kubernetes schema (kubernetes-validate, strict), and the operator's custom
resources parse and carry the fields the OpenTelemetry Operator expects
(OpenTelemetryCollector v1beta1, Instrumentation v1alpha1)."""

import pathlib
import re
import subprocess
import sys

import yaml

here = pathlib.Path(__file__).parent


def fail(message):
    print(f"kubernetes check: FAIL: {message}", file=sys.stderr)
    sys.exit(1)


result = subprocess.run(
    [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", str(here / "ringside.yaml")],
    capture_output=True, text=True,
)
if result.returncode != 0:
    fail(f"kubernetes-validate ringside.yaml:\n{result.stdout}{result.stderr}")

docs = list(yaml.safe_load_all((here / "ringside.yaml").read_text()))
deployment = next(d for d in docs if d["kind"] == "Deployment")
pod = deployment["spec"]["template"]["spec"]
containers = {c["name"]: c for c in pod["containers"]}
if set(containers) != {"engine", "agent"}:
    fail(f"containers {sorted(containers)}")
shm = next(v for v in pod["volumes"] if v["name"] == "shm")
if shm.get("emptyDir", {}).get("medium") != "Memory":
    fail("the shm volume must be an emptyDir with medium Memory")
for name, c in containers.items():
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    if mounts.get("/dev/shm") != "shm":
        fail(f"{name} does not mount the shared volume at /dev/shm")
agent_env = {e["name"] for e in containers["agent"].get("env", [])}
if not {"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SERVICE_NAME"} <= agent_env:
    fail("the agent must be configured by OTEL_* variables")
if containers["agent"]["livenessProbe"]["httpGet"]["path"] != "/healthz":
    fail("agent liveness probe")
if containers["engine"]["readinessProbe"]["httpGet"]["path"] != "/health":
    fail("engine readiness probe")

collector = yaml.safe_load((here / "collector.yaml").read_text())
if (collector["apiVersion"], collector["kind"]) != ("opentelemetry.io/v1beta1", "OpenTelemetryCollector"):
    fail("collector apiVersion/kind")
config = collector["spec"]["config"]
for pipeline in ("traces", "metrics"):
    p = config["service"]["pipelines"][pipeline]
    if "otlp" not in p["receivers"]:
        fail(f"{pipeline} pipeline lacks the otlp receiver")
    for exporter in p["exporters"]:
        if exporter not in config["exporters"]:
            fail(f"{pipeline} exporter {exporter} undefined")
if set(config["receivers"]["otlp"]["protocols"]) != {"grpc", "http"}:
    fail("otlp receiver protocols")

instrumentation = yaml.safe_load((here / "instrumentation.yaml").read_text())
if (instrumentation["apiVersion"], instrumentation["kind"]) != ("opentelemetry.io/v1alpha1", "Instrumentation"):
    fail("instrumentation apiVersion/kind")
if not instrumentation["spec"]["exporter"]["endpoint"].startswith("http"):
    fail("instrumentation exporter endpoint")
annotations = deployment["spec"]["template"]["metadata"]["annotations"]
if annotations.get("instrumentation.opentelemetry.io/inject-sdk") != instrumentation["metadata"]["name"]:
    fail("the pod annotation must name the Instrumentation resource")

# gateway.yaml: no collector binary can be installed here to run
# `otelcol validate`, so this checks the structure the collector would: every
# component a pipeline names is defined, of a type otelcol-contrib has, and
# the two tiers agree (trace-id routing to the sampling tier's headless
# Service and port, the agent's sampling.priority mark in a policy).
CONTRIB_TYPES = {
    "receivers": {"otlp"},
    "processors": {"memory_limiter", "batch", "tail_sampling", "probabilistic_sampler"},
    "exporters": {"otlp_grpc", "otlp_http", "loadbalancing", "kafka", "clickhouse", "debug"},
}
gateway = {d["metadata"]["name"]: d for d in yaml.safe_load_all((here / "gateway.yaml").read_text())}
if set(gateway) != {"ringside-lb", "ringside-sampler"}:
    fail(f"gateway.yaml resources {sorted(gateway)}")
for name, resource in gateway.items():
    if (resource["apiVersion"], resource["kind"]) != ("opentelemetry.io/v1beta1", "OpenTelemetryCollector"):
        fail(f"{name}: apiVersion/kind")
    config = resource["spec"]["config"]
    for kind, types in CONTRIB_TYPES.items():
        for component in config.get(kind, {}):
            if component.split("/")[0] not in types:
                fail(f"{name}: unknown {kind[:-1]} type {component}")
    for pipeline, p in config["service"]["pipelines"].items():
        for kind in ("receivers", "processors", "exporters"):
            for component in p.get(kind, []):
                if component not in config.get(kind, {}):
                    fail(f"{name}: {pipeline} names undefined {kind[:-1]} {component}")
        if p.get("processors") and p["processors"][0] != "memory_limiter":
            fail(f"{name}: {pipeline} must start with memory_limiter")
lb, sampler = gateway["ringside-lb"], gateway["ringside-sampler"]
lb_config, sampler_config = lb["spec"]["config"], sampler["spec"]["config"]
if lb_config["service"]["pipelines"]["traces"]["exporters"] != ["loadbalancing"]:
    fail("ringside-lb must send traces only through the loadbalancing exporter")
balancer = lb_config["exporters"]["loadbalancing"]
if balancer.get("routing_key") != "traceID":
    fail("the loadbalancing exporter must route by traceID")
sampler_port = int(sampler_config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].rsplit(":", 1)[1])
dns = balancer["resolver"]["dns"]
if (dns["hostname"], dns["port"]) != ("ringside-sampler-collector-headless", sampler_port):
    fail(f"the resolver must name the sampling tier's headless Service and port: {dns}")
if sampler["spec"]["mode"] != "statefulset":
    fail("the sampling tier is a statefulset (stable pod names behind its headless Service)")
if "tail_sampling" not in sampler_config["service"]["pipelines"]["traces"]["processors"]:
    fail("the sampling tier's traces pipeline lacks tail_sampling")
policies = sampler_config["processors"]["tail_sampling"]["policies"]
for policy in policies:
    if policy["type"] not in policy:
        fail(f"tail_sampling policy {policy['name']} lacks its {policy['type']} block")
spans_rs = (here / "../../agent/src/pipeline/spans.rs").read_text()
mark = re.search(r'SAMPLING_PRIORITY: &str = "([^"]+)"', spans_rs).group(1)
if not any(p["type"] == "numeric_attribute" and p["numeric_attribute"]["key"] == mark for p in policies):
    fail(f"no tail_sampling policy keeps what the agent marks with {mark}")
print("kubernetes check: ok")
