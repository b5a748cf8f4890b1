"""CI check of the Kubernetes manifests: the built-in kinds validate against
the Kubernetes schema (kubernetes-validate, strict), and the operator's custom
resources parse and carry the fields the OpenTelemetry Operator expects
(OpenTelemetryCollector v1beta1, Instrumentation v1alpha1)."""

import pathlib
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
print("kubernetes check: ok")
