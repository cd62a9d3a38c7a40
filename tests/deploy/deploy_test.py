#!/usr/bin/python3
"""Checks deploy/ against the server itself (issue 7, "Done when").

Usage: deploy_test.py <polysketch-server binary> <repo root> [<k8s dir>]

1. `promtool check config` (deploy/prometheus/prometheus.yml, prometheus-kubernetes.yml),
   `promtool check rules` (rules.yml) and `promtool test rules` (rules_test.yml) pass.
2. `kubectl kustomize` renders <k8s dir>/overlays/cpu, .../gpu, .../secure and .../sessions
   (default <repo root>/deploy/k8s).
3. A real polysketch-server on free ports (run with the cpu overlay's flags, model, hosts and ports
   replaced) answers a Generate request and both health service names with SERVING; its /metrics
   is scraped. The rendered objects are checked against it: container, Service and probe ports
   against the server's ports (defaults from --help), every --flag of the Deployment is one
   --help lists, probe service names and ports (--health_port when set),
   terminationGracePeriodSeconds >= preStop sleep + --drain_timeout, selectors match the pod
   labels, the ServiceMonitor's port is on a Service, the HPA / KEDA targets and queries, non-root
   and read-only root filesystem, GPU request and tolerations in the gpu overlay only. The live
   server runs the model the cpu overlay names (its /opt/polysketch/models/<name> is this
   repository's models/<name>); every overlay's image (deploy/docker) must carry the model it
   names, and its memory request must hold the sizing of docs/deploy.md ("Sizing"): --slots x the
   live GetModelInfo state bytes + model.safetensors + --prefix_cache_bytes +
   --session_budget_bytes + 64 MiB.
   With --state_tier (the sessions overlay): its host:port is a Service of the overlay whose
   selector and target port reach a StatefulSet's Redis container with a PersistentVolumeClaim
   mounted at its --dir, readiness and liveness probes, a --maxmemory under the memory limit and a
   TTL-only eviction policy, Redis 6.2 or later, non-root; the grace period also covers
   --state_tier_flush_timeout; and a real polysketch-server with the overlay's flags (--state_tier
   pointed at a redis-server this test starts) reaches it and continues a session.
4. Every metric named by rules.yml, the HPA / prometheus-adapter / KEDA queries and the Grafana
   dashboard (deploy/grafana/polysketch-dashboard.json, which must parse) is in the live scrape.

Runs with Debian's /usr/bin/python3 (python3-grpcio, python3-protobuf, python3-yaml). Every
problem found is listed; the exit status is 1 when there is any.
"""
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import yaml

READINESS_SERVICE = "polysketch.v1.GenerationService"
LIVENESS_SERVICE = ""
# secure: cpu + TLS and tokens (docs/security.md); sessions: cpu + the shared state tier in Redis
# (docs/sessions.md "Shared tier").
OVERLAYS = ("cpu", "gpu", "secure", "sessions")
# Redis maxmemory policies that evict only keys with a TTL (every key polysketch writes has one).
REDIS_TTL_POLICIES = ("volatile-lru", "volatile-lfu", "volatile-ttl", "volatile-random")
GPU_RESOURCE = "nvidia.com/gpu"
# Series Prometheus makes itself for every target.
SYNTHETIC_METRICS = {"up", "scrape_duration_seconds", "scrape_samples_scraped",
                     "scrape_samples_post_metric_relabeling", "scrape_series_added"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Where the images keep the shipped models, and which image each overlay runs.
IMAGE_MODELS = "/opt/polysketch/models/"
DOCKERFILES = {"cpu": "Dockerfile.cpu", "secure": "Dockerfile.cpu", "gpu": "Dockerfile.cuda"}
PROCESS_OVERHEAD_BYTES = 64 << 20  # docs/deploy.md, "Sizing"

problems = []


def problem(message):
    problems.append(message)
    print(f"  problem: {message}", flush=True)


def check(condition, message):
    if not condition:
        problem(message)
    return condition


def run(cmd, **kwargs):
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


# --- PromQL ---------------------------------------------------------------------------------
PROMQL_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
                   "group_right", "offset", "bool", "inf", "nan", "start", "end"}


def promql_metric_names(expr):
    """The metric names an expression selects (not functions, keywords, labels or numbers)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    s = re.sub(r"\{[^{}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range and subquery selectors
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", s)
    s = re.sub(r"\$\{[^}]*\}|\$\w+", " 1 ", s)  # Grafana variables
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        name = m.group(0)
        before = s[:m.start()]
        if before and (before[-1].isdigit() or before[-1] == "."):
            continue  # 1e3, 5m, 0.5e-3
        if s[m.end():].lstrip().startswith("("):
            continue  # function or aggregation
        if name.lower() in PROMQL_KEYWORDS:
            continue
        names.add(name)
    return names


def grafana_query_metric_names(query):
    """Metric names of a Grafana Prometheus variable query (label_values(...)) or expression."""
    m = re.fullmatch(r"\s*label_values\((.*)\)\s*", query, re.S)
    if m:
        inner = m.group(1)
        # label_values(label) names no metric; label_values(expr, label) selects with expr.
        depth, split = 0, None
        for i, c in enumerate(inner):
            depth += c in "({["
            depth -= c in ")}]"
            if c == "," and depth == 0:
                split = i
        return promql_metric_names(inner[:split]) if split is not None else set()
    m = re.fullmatch(r"\s*query_result\((.*)\)\s*", query, re.S)
    return promql_metric_names(m.group(1) if m else query)


def self_test_promql():
    cases = {
        'histogram_quantile(0.99, sum by (namespace, le) '
        '(rate(a_bucket{job=~"$job"}[$__rate_interval])))':
            {"a_bucket"},
        "max by (x) (b) > 0 and on (x) sum by (x) (rate(c_total[2m])) == 0": {"b", "c_total"},
        "d / ignoring (reason) group_left e offset 5m > 1e3": {"d", "e"},
        'up{job=~".*p.*"} == bool 0': {"up"},
        "sum(rate(f[5m])) by (le)": {"f"},
        "rec:name:p99_5m > 0.5": {"rec:name:p99_5m"},
    }
    for expr, want in cases.items():
        got = promql_metric_names(expr)
        assert got == want, f"promql_metric_names({expr!r}) = {got}, want {want}"
    assert grafana_query_metric_names('label_values(g{job="$job"}, instance)') == {"g"}
    assert grafana_query_metric_names("label_values(job)") == set()


# --- absl flags and durations ---------------------------------------------------------------
def help_flags(server):
    """{flag: default} from `polysketch-server --help`, and the set --helpfull lists."""
    out = run([server, "--help"])
    text = out.stdout + out.stderr
    flags = {}
    for m in re.finditer(r"--(\w+) \(.*?\);\s+default: (.*?);", text, re.S):
        flags[m.group(1)] = m.group(2).strip().strip('"')
    full = run([server, "--helpfull"])
    all_flags = set(re.findall(r"--(\w+) \(", full.stdout + full.stderr))
    return flags, all_flags


def duration_seconds(text):
    """absl duration ("30s", "1m30s", "500ms", "inf") in seconds; None if it is not one."""
    text = text.strip().strip('"')
    if text in ("0", "0s"):
        return 0.0
    units = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|ms|s|m|h)", text)
    if not parts or "".join(a + b for a, b in parts) != text:
        return None
    return sum(float(a) * units[b] for a, b in parts)


def parse_flag_tokens(tokens):
    """[(name, value or None)] of the --flags (or -flags) in a command line."""
    flags = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        m = re.fullmatch(r"--?([A-Za-z_][\w-]*)(?:=(.*))?", tok, re.S)
        if m:
            name, value = m.group(1), m.group(2)
            if value is None and i + 1 < len(tokens) and not tokens[i + 1].startswith("-"):
                value = tokens[i + 1]
                i += 1
            flags.append((name, value))
        i += 1
    return flags


# --- the server -----------------------------------------------------------------------------
class Server:
    READY = re.compile(r"^polysketch-server: serving .* on .*:(\d+), metrics on .*:(\d+)$", re.M)
    HTTP = re.compile(r"^polysketch-server: HTTP on [^ ]+:(\d+) ", re.M)

    def __init__(self, server, args, tmp):
        self.log_path = os.path.join(tmp, "server.log")
        self.log = open(self.log_path, "w")
        self.cmd = [server] + args
        print("starting: " + " ".join(self.cmd), flush=True)
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.port = self.metrics_port = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"polysketch-server exited ({self.proc.returncode}) before it "
                                   f"was ready:\n{self.tail()}")
            log = open(self.log_path).read()
            m = self.READY.search(log)
            if m:
                self.port, self.metrics_port = int(m.group(1)), int(m.group(2))
                http = self.HTTP.search(log)
                self.http_port = int(http.group(1)) if http else None
                return
            time.sleep(0.1)
        raise RuntimeError(f"polysketch-server printed no ready line within 60 s:\n{self.tail()}")

    def tail(self):
        return "".join(open(self.log_path).readlines()[-30:])

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


HEALTH_PROTO = """syntax = "proto3";
package grpc.health.v1;
message HealthCheckRequest { string service = 1; }
message HealthCheckResponse {
  enum ServingStatus { UNKNOWN = 0; SERVING = 1; NOT_SERVING = 2; SERVICE_UNKNOWN = 3; }
  ServingStatus status = 1;
}
service Health { rpc Check(HealthCheckRequest) returns (HealthCheckResponse); }
"""


def generate_stubs(root, tmp):
    py = os.path.join(tmp, "py")
    os.makedirs(os.path.join(tmp, "health", "grpc", "health", "v1"))
    with open(os.path.join(tmp, "health", "grpc", "health", "v1", "health.proto"), "w") as f:
        f.write(HEALTH_PROTO)
    os.makedirs(py)
    for include, proto in ((os.path.join(root, "proto"), "polysketch/v1/generation.proto"),
                           (os.path.join(tmp, "health"), "grpc/health/v1/health.proto")):
        out = run(["/usr/bin/protoc", "-I", include, f"--python_out={py}",
                   f"--grpc_python_out={py}",
                   "--plugin=protoc-gen-grpc_python=/usr/bin/grpc_python_plugin", proto])
        if out.returncode != 0:
            raise RuntimeError(f"protoc {proto} failed: {out.stderr}")
    # The generated grpc/health/v1 package must not shadow the installed grpc module.
    os.rename(os.path.join(py, "grpc"), os.path.join(py, "healthpb"))
    for name in ("health_pb2.py", "health_pb2_grpc.py"):
        path = os.path.join(py, "healthpb", "health", "v1", name)
        src = open(path).read().replace("from grpc.health.v1 import",
                                        "from healthpb.health.v1 import")
        open(path, "w").write(src)
    sys.path.insert(0, py)


def quantity_bytes(text):
    """Bytes of a Kubernetes memory quantity ("320Mi", "1Gi", "500M", "1048576"); None if not one."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i?)?", str(text))
    if not m:
        return None
    scale = {None: 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[m.group(2)]
    return int(float(m.group(1)) * scale)


def repo_model(root, image_path):
    """This repository's directory of the image's model path, or None when it names none."""
    if not image_path or not image_path.startswith(IMAGE_MODELS):
        return None
    name = image_path[len(IMAGE_MODELS):].strip("/")
    path = os.path.join(root, "models", name)
    return path if name and "/" not in name and os.path.isdir(path) else None


def check_sizing(root, where, overlay, given, help_defaults, memory, model_info):
    """The overlay's image carries its model, and its memory request holds the sizing."""
    model = given.get("model")
    local = repo_model(root, model)
    if not check(local is not None, f"{where}: --model={model} is not {IMAGE_MODELS}<name> of a "
                 "shipped model (models/<name>)"):
        return
    name = os.path.basename(local)
    dockerfile = os.path.join(root, "deploy", "docker", DOCKERFILES.get(overlay, "Dockerfile.cpu"))
    copied = re.search(rf"^COPY\s+(--\S+\s+)*\S*models/{re.escape(name)}/?\s+"
                       rf"{re.escape(IMAGE_MODELS + name)}/?\s*$", open(dockerfile).read(), re.M)
    check(copied is not None, f"{where}: --model={model}, but {os.path.basename(dockerfile)} does "
          f"not COPY models/{name} there")
    if not check(model_info is not None and model_info.name == name,
                 f"{where}: cannot size for {name}: the live server ran "
                 f"{model_info.name if model_info else 'no model'}"):
        return
    request = quantity_bytes(memory)
    if not check(request is not None, f"{where}: memory request {memory!r} is not a quantity"):
        return

    def flag_int(flag):
        return int(given.get(flag, help_defaults[flag]))

    slots = flag_int("slots")
    weights = os.path.getsize(os.path.join(local, "model.safetensors"))
    need = (slots * model_info.state_bytes_per_request + weights + flag_int("prefix_cache_bytes")
            + flag_int("session_budget_bytes") + PROCESS_OVERHEAD_BYTES)
    check(request >= need, f"{where}: memory request {memory} = {request:,} B < {slots} slots x "
          f"{model_info.state_bytes_per_request:,} B + weights {weights:,} B + budgets + 64 MiB "
          f"= {need:,} B ({name})")
    print(f"{where}: {name}, {slots} slots: needs {need / 2**20:.1f} MiB, requests {memory}",
          flush=True)


def talk_to_server(port):
    """One Generate; the health status of both service names ({name: status name}); ModelInfo."""
    import grpc
    from healthpb.health.v1 import health_pb2, health_pb2_grpc
    from polysketch.v1 import generation_pb2, generation_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        response = stub.Generate(generation_pb2.GenerateRequest(
            text=b"In the beginning", max_new_tokens=8,
            sampling=generation_pb2.SamplingParams(temperature=0.0)), timeout=30)
        check(response.final.generated_tokens >= 1, f"Generate produced no tokens: {response}")
        health = health_pb2_grpc.HealthStub(channel)
        statuses = {}
        for service in (LIVENESS_SERVICE, READINESS_SERVICE):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            statuses[service] = health_pb2.HealthCheckResponse.ServingStatus.Name(status.status)
        info = stub.GetModelInfo(generation_pb2.GetModelInfoRequest(), timeout=10)
        return statuses, info


def scrape(metrics_port):
    """(sample names, histogram base names) of the live /metrics."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    samples, histograms = set(), set()
    for line in text.splitlines():
        m = re.match(r"# TYPE (\S+) histogram", line)
        if m:
            histograms.add(m.group(1))
        elif line and not line.startswith("#"):
            samples.add(re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", line).group(0))
    return samples, histograms


# --- Prometheus config and rules --------------------------------------------------------------
def check_prometheus(root, tmp):
    prom = os.path.join(root, "deploy", "prometheus")
    for cmd in (["check", "config", os.path.join(prom, "prometheus.yml")],
                ["check", "rules", os.path.join(prom, "rules.yml")],
                ["test", "rules", os.path.join(prom, "rules_test.yml")]):
        out = run(["promtool"] + cmd)
        check(out.returncode == 0, f"promtool {' '.join(cmd)} failed:\n{out.stdout}{out.stderr}")
        print(f"promtool {' '.join(cmd)}: rc {out.returncode}", flush=True)

    # prometheus-kubernetes.yml: Debian's promtool has no Kubernetes service discovery; then
    # check everything else with the kubernetes_sd_configs swapped for static_configs.
    path = os.path.join(prom, "prometheus-kubernetes.yml")
    out = run(["promtool", "check", "config", path])
    if out.returncode != 0 and "field kubernetes_sd_configs not found" in out.stdout + out.stderr:
        config = yaml.safe_load(open(path))
        for job in config["scrape_configs"]:
            if job.pop("kubernetes_sd_configs", None) is not None:
                job["static_configs"] = [{"targets": ["localhost:9464"]}]
        shutil.copy(os.path.join(prom, "rules.yml"), tmp)
        swapped = os.path.join(tmp, "prometheus-kubernetes.yml")
        yaml.safe_dump(config, open(swapped, "w"))
        out = run(["promtool", "check", "config", swapped])
        print("promtool check config prometheus-kubernetes.yml (kubernetes_sd_configs swapped "
              f"for static_configs: this promtool has no Kubernetes SD): rc {out.returncode}")
    else:
        print(f"promtool check config prometheus-kubernetes.yml: rc {out.returncode}")
    check(out.returncode == 0, f"promtool check config {path} failed:\n{out.stdout}{out.stderr}")
    config = yaml.safe_load(open(path))
    pods = [j for j in config["scrape_configs"]
            if any(sd.get("role") == "pod" for sd in j.get("kubernetes_sd_configs", []))]
    if check(pods, f"{path}: no scrape job with kubernetes_sd_configs role pod"):
        keeps = {(tuple(r.get("source_labels", [])), r.get("regex"))
                 for r in pods[0].get("relabel_configs", []) if r.get("action") == "keep"}
        check((("__meta_kubernetes_pod_label_app_kubernetes_io_name",), "polysketch") in keeps,
              f"{path}: the pod job does not keep app.kubernetes.io/name=polysketch")
        check((("__meta_kubernetes_pod_container_port_name",), "metrics") in keeps,
              f"{path}: the pod job does not keep the container port named metrics")

    rules = yaml.safe_load(open(os.path.join(prom, "rules.yml")))
    exprs, recorded = [], set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            exprs.append((f"rules.yml {rule.get('record') or rule.get('alert')}", rule["expr"]))
            if "record" in rule:
                recorded.add(rule["record"])
            else:
                check(rule.get("labels", {}).get("severity") in ("critical", "warning", "info"),
                      f"rules.yml alert {rule['alert']} has no severity label")
                annotations = rule.get("annotations", {})
                check("summary" in annotations and "description" in annotations,
                      f"rules.yml alert {rule['alert']} lacks a summary or description")
    return exprs, recorded


def dashboard_queries(root):
    path = os.path.join(root, "deploy", "grafana", "polysketch-dashboard.json")
    try:
        dashboard = json.load(open(path))
    except (OSError, ValueError) as e:
        problem(f"{path} does not parse: {e}")
        return []
    queries = []

    def panels(items):
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if "expr" in target:
                queries.append((f"dashboard panel {panel.get('title')!r} {target.get('refId')}",
                                target["expr"]))
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var.get("query")
            query = query.get("query", "") if isinstance(query, dict) else query or ""
            queries.append((f"dashboard variable {var.get('name')}", "GRAFANA:" + query))
    check(len(queries) >= 10, f"the dashboard has only {len(queries)} queries")
    ds = json.dumps(dashboard.get("templating", {})) + json.dumps(dashboard.get("panels", []))
    check("${DS_PROMETHEUS}" in ds, "the dashboard does not use the ${DS_PROMETHEUS} datasource")
    return queries


# --- Kubernetes objects -----------------------------------------------------------------------
def render(k8s, overlay):
    path = os.path.join(k8s, "overlays", overlay)
    if not os.path.isdir(path):
        problem(f"{path} does not exist (deploy/k8s is missing the {overlay} overlay)")
        return None
    out = run(["kubectl", "kustomize", path])
    if not check(out.returncode == 0, f"kubectl kustomize {path} failed:\n{out.stderr}"):
        return None
    objects = [o for o in yaml.safe_load_all(out.stdout) if o]
    print(f"kubectl kustomize {path}: {len(objects)} objects: "
          + ", ".join(sorted(f"{o['kind']}/{o['metadata']['name']}" for o in objects)), flush=True)
    return objects


def matches(selector, labels):
    """Whether a label selector (matchLabels / matchExpressions, or a plain map) selects labels."""
    if not selector:
        return False
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        selector = {"matchLabels": selector}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for e in selector.get("matchExpressions") or []:
        op, key, values = e["operator"], e["key"], e.get("values", [])
        if ((op == "In" and labels.get(key) not in values)
                or (op == "NotIn" and labels.get(key) in values)
                or (op == "Exists" and key not in labels)
                or (op == "DoesNotExist" and key in labels)):
            return False
    return True


def server_container(deployment):
    containers = deployment["spec"]["template"]["spec"]["containers"]
    for c in containers:
        text = " ".join([c.get("name", ""), c.get("image", "")] + c.get("command", [])
                        + c.get("args", []))
        if "polysketch" in text:
            return c
    return containers[0]


def container_flags(objects, pod, container):
    """[(flag, value)] of the container's command line, $(VAR) resolved from env / ConfigMaps,
    plus the flags of a --flagfile mounted from a ConfigMap."""
    configmaps = {o["metadata"]["name"]: o.get("data", {}) for o in objects
                  if o["kind"] == "ConfigMap"}
    env = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            prefix = source.get("prefix", "")
            for k, v in configmaps.get(source["configMapRef"]["name"], {}).items():
                env[prefix + k] = v
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "configMapKeyRef" in var.get("valueFrom", {}):
            ref = var["valueFrom"]["configMapKeyRef"]
            value = configmaps.get(ref["name"], {}).get(ref["key"])
            if check(value is not None, f"env {var['name']}: no key {ref['key']} in ConfigMap "
                     f"{ref['name']}"):
                env[var["name"]] = value
    tokens = [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), t)
              for t in container.get("command", []) + container.get("args", [])]
    flags = parse_flag_tokens(tokens)
    for name, value in list(flags):
        if name != "flagfile" or not value:
            continue
        content = None
        for mount in container.get("volumeMounts", []):
            mount_path = mount["mountPath"].rstrip("/")
            if os.path.dirname(value) != mount_path and value != mount_path:
                continue
            volume = next((v for v in pod.get("volumes", []) if v["name"] == mount["name"]), {})
            if "configMap" not in volume:
                continue
            key = mount.get("subPath") or os.path.basename(value)
            for item in volume["configMap"].get("items", []):
                if item["path"] == key:
                    key = item["key"]
            content = configmaps.get(volume["configMap"]["name"], {}).get(key)
        if check(content is not None, f"--flagfile={value} is not a key of a mounted ConfigMap"):
            lines = [l.strip() for l in content.splitlines()]
            flags += parse_flag_tokens([l for l in lines if l and not l.startswith("#")])
    return flags


def prestop_seconds(container):
    pre = container.get("lifecycle", {}).get("preStop")
    if not pre:
        return 0.0
    if "sleep" in pre:
        return float(pre["sleep"]["seconds"])
    command = " ".join(pre.get("exec", {}).get("command", []))
    m = re.search(r"\bsleep\s+(\d+(?:\.\d+)?)", command)
    check(m, f"preStop {pre} has no `sleep N`: cannot tell how long it takes")
    return float(m.group(1)) if m else 0.0


def memory_bytes(text):
    """A Kubernetes quantity ("1536Mi", "2G") or Redis size ("1gb", "512mb") in bytes; None if
    neither."""
    m = re.fullmatch(r"(\d+)([A-Za-z]*)", str(text).strip())
    factors = {"": 1, "b": 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40,
               "k": 1000, "M": 1000 ** 2, "G": 1000 ** 3, "kb": 1 << 10, "mb": 1 << 20,
               "gb": 1 << 30}
    if not m or m.group(2) not in factors:
        return None
    return int(m.group(1)) * factors[m.group(2)]


def check_state_tier(where, by_kind, address):
    """--state_tier=host:port reaches a Redis StatefulSet of the overlay, sized and kept right."""
    m = re.fullmatch(r"(?:redis://)?([^:]+):(\d+)", address)
    if not check(m, f"{where}: --state_tier={address} is not host:port"):
        return
    host, port = m.group(1).split(".")[0], int(m.group(2))
    services = {s["metadata"]["name"]: s for s in by_kind.get("Service", [])}
    svc = services.get(host)
    if not check(svc, f"{where}: --state_tier host {host} is not a Service of the overlay "
                 "(an external Redis: leave this overlay's Redis out and skip this check)"):
        return
    svc_port = next((p for p in svc["spec"].get("ports", []) if p["port"] == port), None)
    if not check(svc_port, f"{where}: Service {host} has no port {port} (--state_tier)"):
        return
    sets = [st for st in by_kind.get("StatefulSet", [])
            if matches(svc["spec"].get("selector"), st["spec"]["template"]["metadata"]
                       .get("labels", {}))]
    if not check(len(sets) == 1, f"{where}: Service {host} selects {len(sets)} StatefulSets, "
                 "want 1 (Redis)"):
        return
    st = sets[0]
    sname = f"{where}: StatefulSet {st['metadata']['name']}"
    check(st["spec"].get("serviceName") in services,
          f"{sname}: serviceName {st['spec'].get('serviceName')} is not a Service of the overlay")
    pod = st["spec"]["template"]["spec"]
    c = pod["containers"][0]
    ports = {p["containerPort"]: p.get("name") for p in c.get("ports", [])}
    t = svc_port.get("targetPort", port)
    check(t in ports or t in ports.values(),
          f"{sname}: Service {host} targets {t}, not a port of container {c['name']}")
    m = re.search(r":(\d+)\.(\d+)", c.get("image", ""))
    check(m and (int(m.group(1)), int(m.group(2))) >= (6, 2),
          f"{sname}: image {c.get('image')} is not Redis 6.2 or later (SET ... GET)")
    args = dict(parse_flag_tokens(c.get("command", []) + c.get("args", [])))
    claims = [t["metadata"]["name"] for t in st["spec"].get("volumeClaimTemplates", [])]
    check(claims, f"{sname}: no volumeClaimTemplates (sessions would not survive a restart)")
    mounts = {v["name"]: v["mountPath"] for v in c.get("volumeMounts", [])}
    check(any(mounts.get(claim) == args.get("dir") for claim in claims),
          f"{sname}: Redis --dir {args.get('dir')} is not a mounted PersistentVolumeClaim")
    check(args.get("appendonly") == "yes" or args.get("save") not in (None, ""),
          f"{sname}: neither --appendonly yes nor --save: a restart loses every session")
    check(args.get("maxmemory-policy") in REDIS_TTL_POLICIES,
          f"{sname}: --maxmemory-policy {args.get('maxmemory-policy')}, want one of "
          f"{REDIS_TTL_POLICIES} (evict expiring keys only)")
    maxmemory = memory_bytes(args.get("maxmemory", ""))
    limit = memory_bytes(c.get("resources", {}).get("limits", {}).get("memory", ""))
    check(maxmemory and limit and maxmemory < limit,
          f"{sname}: --maxmemory {args.get('maxmemory')} is not below the memory limit "
          f"{c.get('resources', {}).get('limits', {}).get('memory')}")
    for kind in ("readinessProbe", "livenessProbe"):
        check(kind in c, f"{sname}: no {kind}")
    sc = {**pod.get("securityContext", {}), **c.get("securityContext", {})}
    check(sc.get("runAsNonRoot") is True and sc.get("runAsUser", 0) != 0,
          f"{sname}: Redis does not run as non-root")
    print(f"{where}: state tier {address} -> StatefulSet {st['metadata']['name']} "
          f"(claims {claims}, maxmemory {args.get('maxmemory')}, "
          f"{args.get('maxmemory-policy')})", flush=True)


def free_port():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_state_tier_live(server, root, objects, valid_flags, tmp):
    """A server with the sessions overlay's flags, its --state_tier pointed at a local
    redis-server, reaches Redis and runs a session turn."""
    deployment = next((o for o in objects if o["kind"] == "Deployment"), None)
    redis_server = shutil.which("redis-server")
    if not check(redis_server, "redis-server is missing (scripts/setup-deps installs it)"):
        return
    flags = container_flags(objects, deployment["spec"]["template"]["spec"],
                            server_container(deployment))
    redis_port = free_port()
    redis = subprocess.Popen([redis_server, "--port", str(redis_port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no", "--dir", tmp],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    live = None
    try:
        time.sleep(0.5)
        args = [f"--{n}={v}" if v is not None else f"--{n}" for n, v in flags
                if n in valid_flags - {"model", "host", "port", "metrics_host", "metrics_port",
                                       "http_port", "flagfile", "state_tier"}]
        args += ["--state_tier", f"127.0.0.1:{redis_port}",
                 "--model", os.path.join(root, "tests", "golden", "polysketch-random"),
                 "--host", "127.0.0.1", "--port", "0", "--metrics_host", "127.0.0.1",
                 "--metrics_port", "0", "--http_port", "0"]
        sub = os.path.join(tmp, "sessions")
        os.makedirs(sub, exist_ok=True)
        live = Server(server, args, sub)
        check("state tier redis 127.0.0.1" in live.tail(),
              f"the sessions overlay's server did not reach Redis:\n{live.tail()}")
        import grpc
        from polysketch.v1 import generation_pb2 as gpb  # generated by generate_stubs
        from polysketch.v1 import generation_pb2_grpc as gpbg
        with grpc.insecure_channel(f"127.0.0.1:{live.port}") as channel:
            stub = gpbg.GenerationServiceStub(channel)
            session = stub.OpenSession(gpb.OpenSessionRequest(), timeout=30).session_id.encode()
            stub.Generate(gpb.GenerateRequest(text=b"abc", session_id=session, max_new_tokens=2),
                          timeout=30)
        print("sessions overlay: a server with its flags reached Redis and ran a session turn",
              flush=True)
    except RuntimeError as e:
        problem(f"the sessions overlay's flags: {e}")
    finally:
        if live:
            live.stop()
        redis.kill()
        redis.wait()


def check_overlay(root, overlay, objects, help_defaults, valid_flags, statuses, model_info):
    """Checks one rendered overlay; returns (its server flags, its PromQL queries)."""
    where = f"overlay {overlay}"
    by_kind = {}
    for o in objects:
        by_kind.setdefault(o["kind"], []).append(o)
    deployments = by_kind.get("Deployment", [])
    if not check(len(deployments) == 1, f"{where}: {len(deployments)} Deployments, want 1"):
        return [], []
    deployment = deployments[0]
    name = deployment["metadata"]["name"]
    pod = deployment["spec"]["template"]["spec"]
    pod_labels = deployment["spec"]["template"]["metadata"].get("labels", {})
    container = server_container(deployment)
    check(pod_labels.get("app.kubernetes.io/name") == "polysketch",
          f"{where}: pod template lacks label app.kubernetes.io/name=polysketch "
          "(prometheus-kubernetes.yml scrapes by it)")
    check(matches(deployment["spec"].get("selector"), pod_labels),
          f"{where}: Deployment selector does not match its pod template labels")

    # Flags: every one is a server flag; effective ports and drain timeout.
    flags = container_flags(objects, pod, container)
    for flag, value in flags:
        check(flag in valid_flags, f"{where}: --{flag} is not a flag of polysketch-server --help")
        check(value is None or "$(" not in value,
              f"{where}: --{flag}={value} references an unresolved variable")
    given = dict(flags)
    check("model" in given, f"{where}: the server's args have no --model (required)")
    port = int(given.get("port", help_defaults["port"]))
    metrics_port = int(given.get("metrics_port", help_defaults["metrics_port"]))
    drain = duration_seconds(given.get("drain_timeout", help_defaults["drain_timeout"]))
    check(drain is not None, f"{where}: --drain_timeout={given.get('drain_timeout')} is not a "
          "duration")
    for flag in ("host", "metrics_host"):
        check(given.get(flag, help_defaults[flag]) not in ("127.0.0.1", "localhost"),
              f"{where}: --{flag} listens on loopback only: probes and Services cannot reach it")

    # Ports.
    http_port = int(given.get("http_port", help_defaults.get("http_port", "-1")))
    tls = "tls_cert" in given
    container_ports = {p["containerPort"]: p.get("name") for p in container.get("ports", [])}
    port_names = {v: k for k, v in container_ports.items() if v}
    check(port in container_ports, f"{where}: no container port {port} (gRPC, --port)")
    check(metrics_port in container_ports,
          f"{where}: no container port {metrics_port} (metrics, --metrics_port)")
    check(container_ports.get(metrics_port) == "metrics",
          f"{where}: container port {metrics_port} is not named \"metrics\" "
          "(prometheus-kubernetes.yml scrapes the port named metrics)")
    if http_port >= 0:
        check(http_port in container_ports,
              f"{where}: no container port {http_port} (the HTTP API, --http_port)")

    def target(svc_port):
        t = svc_port.get("targetPort", svc_port["port"])
        return port_names.get(t) if isinstance(t, str) else t

    stateful_labels = [st["spec"]["template"]["metadata"].get("labels", {})
                       for st in by_kind.get("StatefulSet", [])]
    services = [svc for svc in by_kind.get("Service", [])
                if not any(matches(svc["spec"].get("selector"), lb) for lb in stateful_labels)]
    headless = [s for s in services if s["spec"].get("clusterIP") == "None"]
    normal = [s for s in services if s["spec"].get("clusterIP") != "None"]
    check(headless, f"{where}: no headless Service (clusterIP: None) for client-side balancing")
    check(normal, f"{where}: no (non-headless) Service")
    for svc in services:
        sname = f"{where}: Service {svc['metadata']['name']}"
        check(matches(svc["spec"].get("selector"), pod_labels),
              f"{sname}: selector {svc['spec'].get('selector')} does not match pod labels "
              f"{pod_labels}")
        targets = []
        for p in svc["spec"].get("ports", []):
            t = target(p)
            check(t in container_ports, f"{sname}: port {p.get('name')} targets "
                  f"{p.get('targetPort')}, not a container port")
            targets.append(t)
        check(port in targets, f"{sname}: no port for gRPC ({port})")
        if http_port >= 0:
            check(http_port in targets, f"{sname}: no port for the HTTP API ({http_port})")
        if svc in normal:
            check(metrics_port in targets, f"{sname}: no port for metrics ({metrics_port})")

    # Probes: native gRPC on the health service names the server answers, on the gRPC port or,
    # when --health_port is set (TLS on the gRPC port: kubelet probes cannot speak TLS), on it.
    health_port = int(given.get("health_port", help_defaults.get("health_port", "-1")))
    probe_port = health_port if health_port >= 0 else port
    if health_port >= 0:
        check(health_port in container_ports,
              f"{where}: no container port {health_port} (probes, --health_port)")
    probes = {kind: container.get(kind) for kind in
              ("startupProbe", "readinessProbe", "livenessProbe")}
    want = {"readinessProbe": READINESS_SERVICE, "livenessProbe": LIVENESS_SERVICE,
            "startupProbe": None}
    for kind, probe in probes.items():
        if kind == "startupProbe" and probe is None:
            continue
        # Readiness may instead be the HTTP API's GET /health (503 while loading or draining,
        # like the gRPC readiness service): on the HTTP port, HTTPS when TLS is on.
        if kind == "readinessProbe" and probe and "httpGet" in probe:
            get = probe["httpGet"]
            get_port = get.get("port")
            get_port = port_names.get(get_port) if isinstance(get_port, str) else get_port
            check(http_port >= 0 and get_port == http_port,
                  f"{where}: readiness httpGet port {get.get('port')} is not the HTTP API's "
                  f"port {http_port} (--http_port)")
            check(get.get("path") == "/health", f"{where}: readiness httpGet path "
                  f"{get.get('path')!r}, want /health")
            scheme = get.get("scheme", "HTTP")
            check(scheme == ("HTTPS" if tls else "HTTP"),
                  f"{where}: readiness scheme {scheme} on a port {'with' if tls else 'without'} "
                  "TLS")
            check(statuses.get("http /health") == 200,
                  f"{where}: readiness: the server's /health answers {statuses.get('http /health')}")
            continue
        if not check(probe and "grpc" in probe, f"{where}: {kind} is not a native grpc probe"):
            continue
        service = probe["grpc"].get("service", "")
        check(probe["grpc"].get("port") == probe_port,
              f"{where}: {kind} port {probe['grpc'].get('port')} is not the probe port "
              f"{probe_port} (--health_port, else --port)")
        allowed = {want[kind]} if want[kind] is not None else {LIVENESS_SERVICE,
                                                               READINESS_SERVICE}
        check(service in allowed, f"{where}: {kind} service {service!r}, want one of {allowed}")
        check(statuses.get(service) == "SERVING",
              f"{where}: {kind} service {service!r}: the server answers {statuses.get(service)}")

    # Graceful shutdown (with a state tier, the drain is followed by the sessions' flush).
    grace = pod.get("terminationGracePeriodSeconds", 30)
    pre = prestop_seconds(container)
    if "state_tier" in given:
        flush = duration_seconds(given.get("state_tier_flush_timeout",
                                           help_defaults.get("state_tier_flush_timeout", "10s")))
        check(flush is not None, f"{where}: --state_tier_flush_timeout is not a duration")
        if drain is not None and flush is not None:
            check(grace >= pre + drain + flush,
                  f"{where}: terminationGracePeriodSeconds {grace} < preStop {pre:g} s + "
                  f"--drain_timeout {drain:g} s + --state_tier_flush_timeout {flush:g} s")
        check_state_tier(where, by_kind, given["state_tier"])
    elif drain is not None:
        check(grace >= pre + drain, f"{where}: terminationGracePeriodSeconds {grace} < preStop "
              f"{pre:g} s + --drain_timeout {drain:g} s")
    print(f"{where}: ports {port}/{metrics_port}, grace {grace} s >= preStop {pre:g} s + drain "
          f"{drain} s", flush=True)

    # Security and resources.
    pod_sc, c_sc = pod.get("securityContext", {}), container.get("securityContext", {})
    non_root = c_sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
    user = c_sc.get("runAsUser", pod_sc.get("runAsUser"))
    check(non_root is True or (user is not None and user != 0), f"{where}: not run as non-root")
    check(user != 0, f"{where}: runAsUser 0")
    check(c_sc.get("readOnlyRootFilesystem") is True,
          f"{where}: container root filesystem is not read-only")
    resources = container.get("resources", {})
    for part in ("requests", "limits"):
        check("memory" in resources.get(part, {}), f"{where}: no memory {part}")
    check_sizing(root, where, overlay, given, help_defaults,
                 resources.get("requests", {}).get("memory"), model_info)
    gpus = resources.get("limits", {}).get(GPU_RESOURCE)
    tolerations = [t.get("key") for t in pod.get("tolerations", [])]
    if overlay == "gpu":
        check(gpus is not None and int(gpus) >= 1, f"{where}: no {GPU_RESOURCE} limit")
        check(GPU_RESOURCE in tolerations, f"{where}: no toleration for {GPU_RESOURCE}")
    else:
        check(gpus is None, f"{where}: requests {GPU_RESOURCE}")

    # PodDisruptionBudget, ServiceMonitor, autoscalers.
    pdbs = by_kind.get("PodDisruptionBudget", [])
    check(pdbs, f"{where}: no PodDisruptionBudget")
    for pdb in pdbs:
        check(matches(pdb["spec"].get("selector"), pod_labels),
              f"{where}: PodDisruptionBudget {pdb['metadata']['name']} selector does not match "
              "the pod labels")
    monitors = by_kind.get("ServiceMonitor", [])
    check(monitors, f"{where}: no ServiceMonitor")
    for sm in monitors:
        selected = [s for s in services if matches(sm["spec"].get("selector"),
                                                   s["metadata"].get("labels", {}))]
        smname = f"{where}: ServiceMonitor {sm['metadata']['name']}"
        if not check(selected, f"{smname}: selector matches no Service's labels"):
            continue
        for endpoint in sm["spec"].get("endpoints", []):
            names = {p.get("name") for s in selected for p in s["spec"].get("ports", [])}
            check(endpoint.get("port") in names,
                  f"{smname}: endpoint port {endpoint.get('port')!r} is not a port name of the "
                  f"Services it selects ({sorted(n for n in names if n)})")
            ports = {target(p) for s in selected for p in s["spec"].get("ports", [])
                     if p.get("name") == endpoint.get("port")}
            check(ports == {metrics_port}, f"{smname}: endpoint port {endpoint.get('port')!r} "
                  f"does not reach the metrics port {metrics_port}")

    queries = []
    hpas = by_kind.get("HorizontalPodAutoscaler", [])
    check(hpas, f"{where}: no HorizontalPodAutoscaler")
    adapter_names = adapter_metric_names(objects, queries, where)
    for hpa in hpas:
        ref = hpa["spec"]["scaleTargetRef"]
        hname = f"{where}: HPA {hpa['metadata']['name']}"
        check(ref.get("kind") == "Deployment" and ref.get("name") == name,
              f"{hname}: scaleTargetRef {ref} is not Deployment {name}")
        for metric in hpa["spec"].get("metrics", []):
            source = metric.get(metric["type"].lower() if "type" in metric else "", {})
            mname = source.get("metric", {}).get("name")
            if mname:
                queries.append((f"{hname} metric", mname, adapter_names))
    for so in by_kind.get("ScaledObject", []):
        soname = f"{where}: ScaledObject {so['metadata']['name']}"
        ref = so["spec"]["scaleTargetRef"]
        check(ref.get("name") == name and ref.get("kind", "Deployment") == "Deployment",
              f"{soname}: scaleTargetRef {ref} is not Deployment {name}")
        for trigger in so["spec"].get("triggers", []):
            if trigger.get("type") == "prometheus":
                queries.append((f"{soname} trigger", trigger["metadata"]["query"], set()))
    return flags, queries


def adapter_metric_names(objects, queries, where):
    """Names a prometheus-adapter rules config among the objects exposes; its series and metrics
    queries go to `queries`."""
    names = set()
    for o in objects:
        if o["kind"] != "ConfigMap":
            continue
        for key, text in (o.get("data") or {}).items():
            if "seriesQuery" not in text:
                continue
            config = yaml.safe_load(text) or {}
            for section in ("rules", "externalRules"):
                for rule in config.get(section) or []:
                    label = f"{where}: adapter ConfigMap {o['metadata']['name']} {key}"
                    series = promql_metric_names(rule["seriesQuery"])
                    queries.append((label + " seriesQuery", rule["seriesQuery"], set()))
                    if "metricsQuery" in rule:
                        # <<.Series>> is the series the seriesQuery found; <<.LabelMatchers>>,
                        # <<.GroupBy>> are labels.
                        mq = rule["metricsQuery"].replace("<<.Series>>", " ".join(sorted(series)))
                        mq = re.sub(r"<<\.\w+>>", " ", mq)
                        queries.append((label + " metricsQuery", mq, set()))
                    rename = rule.get("name", {})
                    for s in series:
                        if "matches" in rename:
                            as_ = re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>", rename.get("as", "$0"))
                            names.add(re.sub(rename["matches"], as_, s))
                        else:
                            names.add(s)
    return names


def main():
    if len(sys.argv) not in (3, 4):
        sys.exit(f"usage: {sys.argv[0]} <polysketch-server binary> <repo root> [<k8s dir>]")
    server, root = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
    k8s = (os.path.abspath(sys.argv[3]) if len(sys.argv) == 4
           else os.path.join(root, "deploy", "k8s"))
    for tool in (server, shutil.which("promtool"), shutil.which("kubectl"), "/usr/bin/protoc",
                 "/usr/bin/grpc_python_plugin"):
        if not tool or not os.access(tool, os.X_OK):
            sys.exit(f"FAIL: {tool or 'promtool/kubectl'} is missing (scripts/setup-deps "
                     "installs it)")
    self_test_promql()
    tmp = tempfile.mkdtemp(prefix="deploy_test.")
    live = None
    try:
        print("--- Prometheus config and rules", flush=True)
        exprs, recorded = check_prometheus(root, tmp)
        queries = [(n, q, set()) for n, q in exprs]
        queries += [(n, q, set()) for n, q in dashboard_queries(root)]

        print("--- kubectl kustomize", flush=True)
        rendered = {overlay: render(k8s, overlay) for overlay in OVERLAYS}

        print("--- polysketch-server", flush=True)
        help_defaults, all_flags = help_flags(server)
        for flag in ("port", "metrics_port", "http_port", "host", "metrics_host", "drain_timeout",
                     "model"):
            if flag not in help_defaults:
                sys.exit(f"FAIL: polysketch-server --help lists no --{flag}")
        check(help_defaults["port"] == "50051" and help_defaults["metrics_port"] == "9464",
              f"server defaults are --port {help_defaults['port']} --metrics_port "
              f"{help_defaults['metrics_port']}, the manifests assume 50051 / 9464")
        valid_flags = set(help_defaults) | ({"flagfile"} & all_flags)
        # The live server runs with the cpu overlay's flags (so their values are proven to parse),
        # on this machine's model, loopback and free ports.
        args = []
        model = os.path.join(root, "tests", "golden", "polysketch-random")
        if rendered["cpu"]:
            deployment = next((o for o in rendered["cpu"] if o["kind"] == "Deployment"), None)
            if deployment:
                flags = container_flags(rendered["cpu"], deployment["spec"]["template"]["spec"],
                                        server_container(deployment))
                args = [f"--{n}={v}" if v is not None else f"--{n}" for n, v in flags
                        if n in valid_flags - {"model", "host", "port", "metrics_host",
                                               "metrics_port", "http_port", "flagfile"}]
                model = repo_model(root, dict(flags).get("model")) or model
        local = ["--model", model,
                 "--host", "127.0.0.1", "--port", "0",
                 "--metrics_host", "127.0.0.1", "--metrics_port", "0",
                 "--http_port", "0"]
        generate_stubs(root, tmp)
        try:
            live = Server(server, args + local, tmp)
        except RuntimeError as e:
            if not args:
                raise
            # Report it, then check the rest against a server with default flags.
            problem(f"the cpu overlay's flags {args}: {e}")
            live = Server(server, local, tmp)
        print(f"gRPC on 127.0.0.1:{live.port}, metrics on 127.0.0.1:{live.metrics_port}")
        statuses, model_info = talk_to_server(live.port)
        print(f"model {model_info.name}: {model_info.state_bytes_per_request:,} state bytes per "
              "request", flush=True)
        print(f"health: {statuses}", flush=True)
        for service, status in statuses.items():
            check(status == "SERVING", f"health service {service!r} answers {status}")
        check(live.http_port is not None, "the server logged no HTTP port")
        if live.http_port is not None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{live.http_port}/health",
                                            timeout=10) as r:
                    statuses["http /health"] = r.status
            except urllib.error.HTTPError as e:
                statuses["http /health"] = e.code
            print(f"HTTP /health: {statuses['http /health']}", flush=True)
        samples, histograms = scrape(live.metrics_port)
        print(f"/metrics: {len(samples)} sample names, {len(histograms)} histograms", flush=True)

        for overlay, objects in rendered.items():
            if objects:
                print(f"--- overlay {overlay}", flush=True)
                queries += check_overlay(root, overlay, objects, help_defaults, valid_flags,
                                         statuses, model_info)[1]

        if rendered.get("sessions"):
            print("--- overlay sessions: a live server on its flags and a local Redis", flush=True)
            check_state_tier_live(server, root, rendered["sessions"], valid_flags, tmp)

        # A ScaledObject kept out of the kustomization (KEDA as an alternative to the HPA) is still
        # checked: its scale target and its queries.
        for path in sorted(glob.glob(os.path.join(k8s, "**", "*.y*ml"), recursive=True)):
            for o in yaml.safe_load_all(open(path)):
                # (JSON 6902 patches are YAML lists, not objects.)
                if not isinstance(o, dict) or o.get("kind") != "ScaledObject" or any(
                        o["metadata"]["name"] == r["metadata"]["name"] and r["kind"] == o["kind"]
                        for r in rendered["cpu"] or []):
                    continue
                print(f"--- {path} (not in the rendered overlays)", flush=True)
                ref = o["spec"]["scaleTargetRef"]
                check(ref.get("name") in {d["metadata"]["name"] for d in rendered["cpu"] or []
                                          if d["kind"] == "Deployment"},
                      f"{path}: scaleTargetRef {ref} is not the cpu overlay's Deployment")
                for trigger in o["spec"].get("triggers", []):
                    if trigger.get("type") == "prometheus":
                        queries.append((f"{path} trigger", trigger["metadata"]["query"], set()))

        print("--- metric names in queries", flush=True)

        def known(name, extra):
            if name in samples or name in SYNTHETIC_METRICS or name in recorded or name in extra:
                return True
            return any(name.endswith(s) and name[:-len(s)] in histograms
                       for s in HISTOGRAM_SUFFIXES)

        used = set()
        for label, query, extra in queries:
            if query.startswith("GRAFANA:"):
                names = grafana_query_metric_names(query[len("GRAFANA:"):])
            else:
                names = promql_metric_names(query)
                check(names, f"{label}: {query!r} names no metric")
            for name in sorted(names):
                used.add(name)
                check(known(name, extra), f"{label}: metric {name} is not in the live scrape "
                      "(nor a recording rule of rules.yml)")
        print(f"{len(queries)} queries name {len(used)} metrics: {sorted(used)}")
        unused = sorted(n for n in samples if n.startswith("polysketch_") and n not in used
                        and not any(n.endswith(s) for s in HISTOGRAM_SUFFIXES))
        if unused:
            print(f"(metrics no query uses: {unused})")
    except RuntimeError as e:
        problem(str(e))
    finally:
        if live:
            live.stop()
            if problems:
                print("--- last lines of the server log\n" + live.tail())
        shutil.rmtree(tmp, ignore_errors=True)
    if problems:
        print(f"FAIL: {len(problems)} problems:\n" + "\n".join(f"- {p}" for p in problems))
        sys.exit(1)
    print("PASS")


if __name__ == "__main__":
    main()
