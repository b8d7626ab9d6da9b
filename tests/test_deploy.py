"""The deployment files under deploy/ (docs/DEPLOY.md) say what the code accepts.

- Every YAML file parses; the Kubernetes manifests validate against the Kubernetes schemas
  (kubernetes-validate, strict: an unknown field fails); KEDA's objects, which have no built-in
  schema, are checked field by field, and their query runs against a real kleinserve PostgreSQL schema.
- Every container that runs kleinserve (compose and k8s) is parsed by the REAL CLI parsers with its
  real environment (envFrom, secret and config map references, compose interpolation and the
  Dockerfile's ENV resolved), and the result builds a `Settings`: a mistyped flag, an env var that
  the process does not read, a bad duration or an API replica listening on 127.0.0.1 fail here.
- The pieces fit together: the load balancer's upstreams are the API services on their port, probes
  name real ports, selectors match, grace periods cover --shutdown-grace, referenced secrets,
  config maps, volumes and services exist.
- deploy/worker_alive.py (the worker's exec probe) answers from a real store.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import os
import re
import shlex
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pytest
import yaml

from kleinserve.service.settings import OPTIONS, Settings, add_arguments, parse_duration
from kleinserve.service.worker_process import build_parser as build_worker_parser

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
K8S_VERSION = "1.33"

def option_envs(command: Optional[str] = None) -> set[str]:
    return {o.env for o in OPTIONS if command is None or command in o.commands}


def cli_parser(command: str) -> argparse.ArgumentParser:
    """The parser `kleinserve serve` / `kleinserve worker` uses."""
    if command == "worker":
        parser = build_worker_parser()
    else:
        parser = argparse.ArgumentParser(prog="kleinserve serve")
        add_arguments(parser, command="serve")
    return parser


# --------------------------------------------------------------------------------------------------
# Reading the files


def load_all(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))


def k8s_docs() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        out += [(path.name, d) for d in load_all(path)]
    return out


def dockerfile() -> dict[str, Any]:
    """ENTRYPOINT, CMD (exec form) and ENV of deploy/Dockerfile."""
    text = DOCKERFILE.read_text()
    lines, buf = [], ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("#") and not buf:
            continue
        buf += raw.rstrip("\\").strip() + " "
        if not raw.rstrip().endswith("\\"):
            lines.append(buf.strip())
            buf = ""
    out: dict[str, Any] = {"env": {}, "from": [], "volumes": []}
    for line in lines:
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word in ("ENTRYPOINT", "CMD"):
            out[word.lower()] = json.loads(rest)
        elif word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                out["env"][key] = value
        elif word == "FROM":
            out["from"].append(rest.split()[0])
        elif word == "VOLUME":
            out["volumes"] += json.loads(rest)
    return out


_INTERPOLATION = re.compile(r"\$\{(\w+)(?::?([-?])([^}]*))?\}")


def interpolate(value: Any) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error}, with no variable set: the default, or a
    stand-in value for a required one."""
    def sub(m: re.Match) -> str:
        kind, arg = m.group(2), m.group(3)
        if kind == "-":
            return arg
        return f"test-{m.group(1).lower()}"
    return _INTERPOLATION.sub(sub, str(value))


@dataclass
class Process:
    where: str
    argv: list[str]  # after the entrypoint `kleinserve`
    env: dict[str, str]
    stop_grace: Optional[float] = None  # seconds the orchestrator waits after SIGTERM
    port: Optional[int] = None  # where the orchestrator expects the HTTP server
    extra: dict[str, Any] = field(default_factory=dict)


def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def is_kleinserve_image(image: str) -> bool:
    return image.split("@")[0].split(":")[0].rsplit("/", 1)[-1] == "kleinserve"


def compose_processes() -> tuple[list[Process], dict[str, dict[str, str]]]:
    """The kleinserve CLI processes of the compose file, and every kleinserve-image service's env."""
    df = dockerfile()
    procs, envs = [], {}
    for name, svc in compose()["services"].items():
        if not is_kleinserve_image(interpolate(svc.get("image", ""))):
            continue
        env = dict(df["env"])
        raw_env = svc.get("environment") or {}
        if isinstance(raw_env, list):
            raw_env = dict(item.split("=", 1) for item in raw_env)
        env.update({k: interpolate(v) for k, v in raw_env.items()})
        envs[name] = env
        entrypoint = svc.get("entrypoint", df["entrypoint"])
        if entrypoint != ["kleinserve"]:
            continue
        command = svc.get("command", df["cmd"])
        assert isinstance(command, list), f"compose {name}: write command as a list (no shell word splitting)"
        grace = parse_duration(svc["stop_grace_period"]) if "stop_grace_period" in svc else 10.0
        procs.append(Process(f"compose service {name}", [interpolate(a) for a in command], env,
                             stop_grace=grace, extra={"profiles": svc.get("profiles", [])}))
    return procs, envs


def _ref(docs: list[tuple[str, dict]], kind: str, name: str) -> Optional[dict]:
    for _, d in docs:
        if d.get("kind") == kind and d["metadata"]["name"] == name:
            return d
    return None


def _data(obj: dict) -> dict[str, str]:
    data = {k: str(v) for k, v in (obj.get("stringData") or {}).items()}
    for k, v in (obj.get("data") or {}).items():
        data[k] = base64.b64decode(v).decode() if obj["kind"] == "Secret" else str(v)
    return data


def k8s_container_env(docs: list[tuple[str, dict]], container: dict, where: str) -> dict[str, str]:
    env = dict(dockerfile()["env"])
    for src in container.get("envFrom", []):
        kind, ref = ("ConfigMap", src["configMapRef"]) if "configMapRef" in src else ("Secret", src["secretRef"])
        obj = _ref(docs, kind, ref["name"])
        assert obj is not None or ref.get("optional"), f"{where}: envFrom names a missing {kind} {ref['name']}"
        env.update({(src.get("prefix") or "") + k: v for k, v in _data(obj or {}).items()})
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        vf = item["valueFrom"]
        if "fieldRef" in vf:
            env[item["name"]] = f"field-{vf['fieldRef']['fieldPath'].replace('.', '-')}"
            continue
        kind, ref = ("Secret", vf["secretKeyRef"]) if "secretKeyRef" in vf else ("ConfigMap", vf["configMapKeyRef"])
        obj = _ref(docs, kind, ref["name"])
        if obj is None or ref["key"] not in _data(obj):
            assert ref.get("optional"), \
                f"{where}: env {item['name']} names a missing {kind} key {ref['name']}/{ref['key']}"
            continue
        env[item["name"]] = _data(obj)[ref["key"]]
    return env


def expand_k8s(arg: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), arg)


def deployments(docs: list[tuple[str, dict]]) -> list[dict]:
    return [d for _, d in docs if d.get("kind") == "Deployment"]


def k8s_processes() -> list[Process]:
    docs = k8s_docs()
    df = dockerfile()
    procs = []
    for dep in deployments(docs):
        spec = dep["spec"]["template"]["spec"]
        for c in spec["containers"]:
            if not is_kleinserve_image(c["image"]):
                continue
            where = f"k8s Deployment {dep['metadata']['name']} container {c['name']}"
            env = k8s_container_env(docs, c, where)
            command = c.get("command", df["entrypoint"])
            args = c.get("args", [] if "command" in c else df["cmd"])
            assert command == ["kleinserve"], f"{where}: the image's entrypoint is kleinserve"
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            procs.append(Process(where, [expand_k8s(a, env) for a in args], env,
                                 stop_grace=float(spec.get("terminationGracePeriodSeconds", 30)),
                                 port=ports.get("http"),
                                 extra={"container": c, "pod": spec, "meta": dep["spec"]["template"]["metadata"]}))
    return procs


def parse_process(p: Process) -> tuple[str, argparse.Namespace, Settings]:
    """The process's argv through the real CLI, then its Settings (flags > its env > defaults)."""
    from kleinserve.cli import build_parser

    assert p.argv and p.argv[0] in ("serve", "worker"), f"{p.where}: not a kleinserve serve/worker command: {p.argv}"
    top, _ = build_parser().parse_known_args(p.argv)
    assert top.command == p.argv[0]
    command = p.argv[0]
    try:
        ns, extra = cli_parser(command).parse_known_args(p.argv[1:])
    except SystemExit:
        pytest.fail(f"{p.where}: `kleinserve {' '.join(p.argv)}` is rejected by the CLI (see stderr)")
    assert not extra, f"{p.where}: `kleinserve {command}` does not take {extra}"
    unknown = sorted(k for k in p.env if k.startswith("KLEINSERVE_") and k not in option_envs(command))
    assert not unknown, (f"{p.where}: `kleinserve {command}` does not read {unknown} "
                         f"(known: settings.OPTIONS of {command})")
    try:
        settings = Settings.from_args(ns, env=p.env, command=command)
    except ValueError as exc:
        pytest.fail(f"{p.where}: {exc}")
    return command, ns, settings


def storage_of(ns: argparse.Namespace, settings: Settings, env: dict[str, str]) -> str:
    return getattr(settings, "storage", None) or getattr(ns, "storage", None) or env.get("KLEINSERVE_STORAGE", "")


# --------------------------------------------------------------------------------------------------
# Parsing and validation


def kubernetes_validate():
    """The validator (the [test] extra): skipped without it locally, a failure on CI (CI set)."""
    try:
        import kubernetes_validate
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("CI is set and kubernetes-validate is not installed (pip install -e '.[test]')")
        pytest.skip("kubernetes-validate is not installed (pip install -e '.[test]')")
    return kubernetes_validate


def test_every_yaml_file_parses():
    files = yaml_files()
    assert {p.name for p in files} >= {"docker-compose.yml", "kustomization.yaml", "api.yaml", "worker.yaml",
                                       "keda.yaml", "config.yaml"}
    for path in files:
        docs = load_all(path)
        assert docs and all(isinstance(d, dict) for d in docs), f"{path}: expected YAML mappings"


def test_k8s_manifests_validate_against_the_kubernetes_schemas():
    kv = kubernetes_validate()
    from kubernetes_validate.utils import SchemaNotFoundError

    builtin = 0
    for name, doc in k8s_docs():
        if doc["apiVersion"].startswith("keda.sh/"):
            with pytest.raises(SchemaNotFoundError):  # checked by hand below
                kv.validate(doc, K8S_VERSION, strict=True)
            continue
        try:
            kv.validate(doc, K8S_VERSION, strict=True)
        except kv.ValidationError as exc:
            where = ".".join(map(str, exc.path))
            pytest.fail(f"{name} {doc['kind']}/{doc['metadata']['name']}: {where}: {exc.message}")
        builtin += 1
    assert builtin >= 8


def test_the_schema_check_catches_a_bad_manifest():
    """The validator in use really rejects what kubectl would: a typo'd field, a wrong type."""
    kv = kubernetes_validate()
    dep = next(d for d in deployments(k8s_docs()) if d["metadata"]["name"] == "kleinserve-api")
    typo = json.loads(json.dumps(dep))
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/ready", "port": 8000}}
    with pytest.raises(kv.ValidationError):
        kv.validate(typo, K8S_VERSION, strict=True)
    wrong = json.loads(json.dumps(dep))
    wrong["spec"]["replicas"] = "two"
    with pytest.raises(kv.ValidationError):
        kv.validate(wrong, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    images = {i["name"] for i in kust.get("images", [])}
    for dep in deployments(k8s_docs()):
        for c in dep["spec"]["template"]["spec"]["containers"]:
            assert c["image"] in images, f"{c['image']} is not mapped by kustomization's images"


# --------------------------------------------------------------------------------------------------
# The kleinserve processes, through the real CLI


def test_every_kleinserve_command_is_accepted_by_the_cli():
    procs = compose_processes()[0] + k8s_processes()
    assert len(procs) >= 6
    for p in procs:
        parse_process(p)


def test_the_cli_check_catches_a_bad_command():
    ok = Process("t", ["worker", "--device", "cuda"], {"KLEINSERVE_STORE": "postgresql://u@h:5432/d"})
    parse_process(ok)
    for bad in (Process("t", ["worker", "--devise", "cuda"], {}),  # a typo'd flag
                Process("t", ["worker"], {"KLEINSERVE_API_KEYS": "k"}),  # an env var workers ignore
                Process("t", ["worker"], {"KLEINSERVE_SHUTDOWN_GRACE": "two minutes"}),  # a bad value
                Process("t", ["serve", "--role", "api", "--devices", "cuda:0"], {}),  # a bad combination
                Process("t", ["server"], {})):
        with pytest.raises((AssertionError, pytest.fail.Exception)):
            parse_process(bad)


def check_api(p: Process, expected_port: int) -> Settings:
    command, ns, s = parse_process(p)
    assert command == "serve" and s.role == "api", f"{p.where}: an API replica runs `serve --role api`"
    assert s.host == "0.0.0.0", f"{p.where}: listens on {s.host}; the load balancer cannot reach it"
    assert s.port == expected_port, f"{p.where}: port {s.port}, the load balancer expects {expected_port}"
    assert s.store_url.startswith("postgresql://"), f"{p.where}: replicas share a PostgreSQL store"
    assert storage_of(ns, s, p.env).startswith("s3://"), f"{p.where}: replicas share S3 storage"
    assert s.api_keys and not s.no_auth, f"{p.where}: serves without API keys"
    assert s.public_url, f"{p.where}: set KLEINSERVE_PUBLIC_URL (result URLs must not depend on the replica)"
    return s


def check_worker(p: Process, *, gpu: bool) -> Settings:
    command, ns, s = parse_process(p)
    assert command == "worker", p.where
    assert s.store_url.startswith("postgresql://"), f"{p.where}: workers share a PostgreSQL store"
    assert storage_of(ns, s, p.env).startswith("s3://"), f"{p.where}: workers share S3 storage"
    assert s.threads > 0, f"{p.where}: give torch a thread count (--threads / KLEINSERVE_THREADS)"
    if gpu:
        assert s.device and s.device.startswith("cuda"), f"{p.where}: a GPU worker runs on cuda"
        assert s.model not in ("auto", "tiny"), f"{p.where}: name the model (auto falls back to tiny without CUDA)"
    assert p.stop_grace is not None and p.stop_grace >= s.shutdown_grace + 15, (
        f"{p.where}: the orchestrator kills it {p.stop_grace}s after SIGTERM, but it may take "
        f"--shutdown-grace {s.shutdown_grace}s (+ time to release and exit)")
    return s


def test_compose_processes_form_the_fleet():
    procs, envs = compose_processes()
    by_name = {p.where.rsplit(" ", 1)[-1]: p for p in procs}
    api = [n for n, p in by_name.items() if p.argv[0] == "serve"]
    assert len(api) == 2, "two API replicas"
    for n in api:
        check_api(by_name[n], 8000)
    gpu_workers = [p for p in procs if p.argv[0] == "worker" and "cpu" not in p.extra["profiles"]]
    cpu_workers = [p for p in procs if p.argv[0] == "worker" and "cpu" in p.extra["profiles"]]
    assert len(gpu_workers) >= 2 and len(cpu_workers) == 1
    for p in gpu_workers:
        check_worker(p, gpu=True)
    for p in cpu_workers:
        s = check_worker(p, gpu=False)
        assert s.device == "cpu" and s.model == "tiny"
    # Every kleinserve-image service (the bucket one-shot too) reads only KLEINSERVE_* names that exist.
    for name, env in envs.items():
        unknown = sorted(k for k in env if k.startswith("KLEINSERVE_") and k not in option_envs())
        assert not unknown, f"compose service {name}: unknown {unknown}"
    # All processes name the same store and storage.
    assert len({envs[n]["KLEINSERVE_STORE"] for n in envs}) == 1
    assert len({envs[n]["KLEINSERVE_STORAGE"] for n in envs}) == 1


def test_k8s_processes_form_the_fleet():
    procs = k8s_processes()
    api = [p for p in procs if p.argv[0] == "serve"]
    workers = [p for p in procs if p.argv[0] == "worker"]
    assert len(api) == 1 and len(workers) == 1
    check_api(api[0], api[0].port)
    check_worker(workers[0], gpu=True)
    assert api[0].env["KLEINSERVE_STORE"] == workers[0].env["KLEINSERVE_STORE"]
    assert api[0].env["KLEINSERVE_STORAGE"] == workers[0].env["KLEINSERVE_STORAGE"]


# --------------------------------------------------------------------------------------------------
# Compose structure


def _duration_ok(v: Any) -> bool:
    return isinstance(v, str) and re.fullmatch(r"(\d+(\.\d+)?(h|m|s|ms|us))+", v) is not None


# The service keys of the Compose specification this file may use (a typo is not silently ignored).
COMPOSE_SERVICE_KEYS = {
    "image", "build", "command", "entrypoint", "environment", "env_file", "volumes", "ports", "expose",
    "depends_on", "healthcheck", "restart", "deploy", "profiles", "stop_grace_period", "stop_signal",
    "networks", "hostname", "container_name", "user", "working_dir", "labels", "logging", "ulimits",
    "shm_size", "ipc", "init", "read_only", "tmpfs", "secrets", "configs", "extra_hosts", "gpus",
    "security_opt", "cap_add", "cap_drop", "mem_limit", "cpus", "pull_policy", "platform", "scale"}


def test_compose_structure():
    c = compose()
    top_level = {"name", "services", "volumes", "networks", "configs", "secrets"}
    assert set(c) <= top_level | {k for k in c if k.startswith("x-")}
    services = c["services"]
    assert {"postgres", "minio", "lb"} <= set(services)
    volumes = set(c.get("volumes") or {})
    for name, svc in services.items():
        where = f"compose service {name}"
        assert set(svc) <= COMPOSE_SERVICE_KEYS, f"{where}: unknown keys {set(svc) - COMPOSE_SERVICE_KEYS}"
        assert "image" in svc or "build" in svc, f"{where}: needs image or build"
        if "build" in svc:
            b = svc["build"]
            ctx = (COMPOSE_FILE.parent / b["context"]).resolve()
            assert (ctx / b["dockerfile"]).is_file(), f"{where}: build file missing"
        deps = svc.get("depends_on", {})
        deps = {d: {"condition": "service_started"} for d in deps} if isinstance(deps, list) else deps
        for dep, cond in deps.items():
            assert dep in services, f"{where}: depends_on {dep}, which does not exist"
            assert cond["condition"] in ("service_started", "service_healthy", "service_completed_successfully")
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{where}: waits for {dep} to be healthy; it has no healthcheck"
        for port in svc.get("ports", []):
            assert isinstance(port, str) and re.fullmatch(r"((\d+\.\d+\.\d+\.\d+):)?\d+:\d+(/(tcp|udp))?", port), \
                f"{where}: port {port!r}: quote it as [IP:]HOST:CONTAINER"
        hc = svc.get("healthcheck")
        if hc:
            assert isinstance(hc["test"], list) and hc["test"][0] in ("CMD", "CMD-SHELL", "NONE"), where
            for key in ("interval", "timeout", "start_period"):
                assert key not in hc or _duration_ok(hc[key]), f"{where}: healthcheck {key} {hc.get(key)!r}"
        if "stop_grace_period" in svc:
            assert _duration_ok(svc["stop_grace_period"]), where
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if source.startswith((".", "/")):
                assert (COMPOSE_FILE.parent / source).exists(), f"{where}: bind mount {source} is missing"
            else:
                assert source in volumes, f"{where}: named volume {source} is not declared"
        assert svc.get("restart", "no") in ("no", "always", "on-failure", "unless-stopped"), where
    # The long-running processes are health-checked.
    for name in ("postgres", "minio", "lb", "api-1", "api-2", "worker-gpu0", "worker-gpu1"):
        assert "healthcheck" in services[name], f"{name}: no healthcheck"


def test_compose_gives_each_gpu_worker_its_own_gpu():
    services = compose()["services"]
    seen = []
    for name, svc in services.items():
        devices = (((svc.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices")
        if not devices:
            continue
        assert svc["command"][0] == "worker", f"{name}: only workers get GPUs"
        (dev,) = devices
        assert dev["driver"] == "nvidia" and dev["capabilities"] == ["gpu"]
        assert "count" not in dev and len(dev["device_ids"]) == 1, f"{name}: one GPU per worker"
        seen += dev["device_ids"]
    assert len(seen) >= 2 and len(set(seen)) == len(seen), f"GPU ids reserved twice: {seen}"


def test_the_load_balancer_sends_to_the_api_replicas():
    conf = re.sub(r"#[^\n]*", "", (DEPLOY / "nginx.conf").read_text())
    services = compose()["services"]
    lb = services["lb"]
    assert any(v.startswith("./nginx.conf:") for v in lb["volumes"])
    upstream = re.search(r"upstream\s+\w+\s*\{(.*?)\}", conf, re.S).group(1)
    servers = re.findall(r"^\s*server\s+([\w.-]+):(\d+)", upstream, re.M)
    api = {n for n, s in services.items() if isinstance(s.get("command"), list) and s["command"][:1] == ["serve"]}
    assert {n for n, _ in servers} == api
    assert all(int(port) == 8000 for _, port in servers)
    listen = re.search(r"listen\s+(\d+)", conf).group(1)
    assert f"{listen}:{listen}" in " ".join(lb["ports"])
    assert "proxy_buffering off" in conf, "SSE streams need unbuffered proxying"
    assert set(lb["depends_on"]) == api


def test_dockerfile():
    df = dockerfile()
    assert df["from"] and all(f.startswith(("nvidia/cuda:", "${")) for f in df["from"])
    assert "nvidia/cuda:" in DOCKERFILE.read_text()
    assert df["entrypoint"] == ["kleinserve"]
    assert df["env"]["HF_HOME"] in df["volumes"], "the Hugging Face cache is a volume"
    text = DOCKERFILE.read_text()
    assert not re.search(r"snapshot_download|huggingface-cli|hf download|\.safetensors", text), "no weights baked in"
    assert (DEPLOY / "Dockerfile.dockerignore").is_file()
    for f in re.findall(r"^COPY\s+(\S+)", text, re.M):
        assert (ROOT / f).exists(), f"the Dockerfile copies {f}, which is missing"
    unknown = [k for k in df["env"] if k.startswith("KLEINSERVE_") and k not in option_envs()]
    assert not unknown


# --------------------------------------------------------------------------------------------------
# Kubernetes wiring


def _labels_match(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_k8s_wiring():
    docs = k8s_docs()
    deps = {d["metadata"]["name"]: d for d in deployments(docs)}
    pod_labels = {n: d["spec"]["template"]["metadata"]["labels"] for n, d in deps.items()}
    for n, d in deps.items():
        assert _labels_match(d["spec"]["selector"]["matchLabels"], pod_labels[n]), n
    for _, d in docs:
        kind = d["kind"]
        if kind == "Service":
            (target,) = [n for n, labels in pod_labels.items() if _labels_match(d["spec"]["selector"], labels)]
            names = {p.get("name") for c in deps[target]["spec"]["template"]["spec"]["containers"]
                     for p in c.get("ports", [])}
            for port in d["spec"]["ports"]:
                assert port["targetPort"] in names, f"Service {d['metadata']['name']}: no port {port['targetPort']}"
        if kind == "PodDisruptionBudget":
            assert any(_labels_match(d["spec"]["selector"]["matchLabels"], lab) for lab in pod_labels.values())
        if kind == "Ingress":
            for rule in d["spec"]["rules"]:
                for path in rule["http"]["paths"]:
                    svc = path["backend"]["service"]
                    assert _ref(docs, "Service", svc["name"]) is not None
            assert d["spec"].get("tls"), "TLS terminates at the ingress"
    for n, d in deps.items():
        spec = d["spec"]["template"]["spec"]
        for vol in spec.get("volumes", []):
            if "persistentVolumeClaim" in vol:
                assert _ref(docs, "PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"]) is not None
        mounts = {m["name"] for c in spec["containers"] for m in c.get("volumeMounts", [])}
        assert mounts <= {v["name"] for v in spec.get("volumes", [])}, n


def test_k8s_probes():
    procs = k8s_processes()
    (api,) = [p for p in procs if p.argv[0] == "serve"]
    c = api.extra["container"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    for probe in (c["readinessProbe"], c["livenessProbe"]):
        assert probe["httpGet"]["port"] in {p["name"] for p in c["ports"]} | {p["containerPort"] for p in c["ports"]}
    (worker,) = [p for p in procs if p.argv[0] == "worker"]
    c = worker.extra["container"]
    # A worker serves no API, only its Prometheus metrics, scraped from another pod.
    _, _, settings = parse_process(worker)
    assert [p["containerPort"] for p in c["ports"]] == [settings.metrics_port] and settings.host == "0.0.0.0"
    annotations = worker.extra["meta"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == settings.metrics_port
    for key in ("startupProbe", "livenessProbe"):
        assert c[key]["exec"]["command"] == ["kleinserve-worker-alive"]
    assert "COPY deploy/worker_alive.py /usr/local/bin/kleinserve-worker-alive" in DOCKERFILE.read_text()
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 20 * 60, "room for the first model download"
    res = c["resources"]
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == 1
    # The torch threads match the CPU the pod asks for.
    assert Settings.from_sources(env=worker.env, command="worker").threads == int(res["requests"]["cpu"])


def test_keda_objects():
    docs = k8s_docs()
    (so,) = [d for _, d in docs if d["kind"] == "ScaledObject"]
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    spec = so["spec"]
    assert set(spec) <= {"scaleTargetRef", "minReplicaCount", "maxReplicaCount", "pollingInterval", "cooldownPeriod",
                         "idleReplicaCount", "initialCooldownPeriod", "advanced", "fallback", "triggers"}
    target = _ref(docs, spec["scaleTargetRef"].get("kind", "Deployment"), spec["scaleTargetRef"]["name"])
    assert target is not None, "scaleTargetRef names no Deployment"
    container = target["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][0] == "worker" and container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    for key in ("pollingInterval", "cooldownPeriod"):
        assert isinstance(spec[key], int) and spec[key] > 0
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "postgresql"
    meta = trigger["metadata"]
    assert all(isinstance(v, str) for v in meta.values()), "KEDA trigger metadata values are strings"
    assert float(meta["targetQueryValue"]) > 0 and float(meta.get("activationTargetQueryValue", "0")) >= 0
    assert "FROM jobs" in meta["query"] and "'IN_QUEUE'" in meta["query"]
    auth = _ref(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    assert auth is not None
    (ref,) = auth["spec"]["secretTargetRef"]
    assert ref["parameter"] == "connection"
    secret = _ref(docs, "Secret", ref["name"])
    assert secret is not None and _data(secret)[ref["key"]].startswith("postgresql://")
    # The same database the workers use, named so KEDA (another namespace) resolves it.
    assert _data(secret)[ref["key"]] == k8s_container_env(docs, container, "worker")["KLEINSERVE_STORE"]
    assert ".svc" in _data(secret)[ref["key"]]


# --------------------------------------------------------------------------------------------------
# Against a real PostgreSQL store: the KEDA query and the worker probe


def _worker_alive():
    spec = importlib.util.spec_from_file_location("worker_alive", DEPLOY / "worker_alive.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_keda_query_and_worker_probe_on_a_real_store(pg_url, capsys):
    import psycopg

    from kleinserve.service import jobs as J
    from kleinserve.service.store import open_store

    query = next(d for _, d in k8s_docs() if d["kind"] == "ScaledObject")["spec"]["triggers"][0]["metadata"]["query"]
    probe = _worker_alive()
    store = open_store(pg_url)
    try:
        # Before any worker registered: the probe fails (the schema is there, no registration).
        assert probe.main(["probe", pg_url]) == 1
        for i in range(3):
            store.submit(J.Job(request_id=J.new_request_id(), endpoint_id="fal-ai/flux-2/klein/9b/base",
                               owner="k", input={"prompt": f"p{i}", "seed": i}))
        host = socket.gethostname()
        worker_id = f"{host}:4242:deadbeef:gpu0"
        assert store.claim_next(worker_id) is not None
        with psycopg.connect(pg_url) as conn:
            (value,) = conn.execute(query).fetchone()
        assert isinstance(value, int) and value == 3 == sum(store.queue_depth().values())
        # A worker of another host does not make this one live.
        store.register_worker(f"other-{host}:1:aa:w0", ["fal-ai/flux-2/klein/9b/base"], ttl=60)
        assert probe.main(["probe", pg_url]) == 1
        store.register_worker(worker_id, ["fal-ai/flux-2/klein/9b/base"], ttl=60)
        assert probe.main(["probe", pg_url]) == 0
        # An expired registration (the worker stopped renewing it): not live.
        store.register_worker(worker_id, ["fal-ai/flux-2/klein/9b/base"], ttl=-1)
        assert probe.main(["probe", pg_url]) == 1
    finally:
        store.close()
    # The store cannot be reached: not the worker's fault, the probe passes.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    assert probe.main(["probe", f"postgresql://kleinserve@127.0.0.1:{closed}/kleinserve"]) == 0
    assert probe.main(["probe", "sqlite:///data/jobs.sqlite3"]) == 0
    capsys.readouterr()


def test_the_deployment_docs_point_at_the_files():
    readme = (ROOT / "README.md").read_text()
    assert "(docs/DEPLOY.md)" in readme
    assert "(DEPLOY.md)" in (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    text = (ROOT / "docs" / "DEPLOY.md").read_text()
    for path in ("deploy/Dockerfile", "deploy/docker-compose.yml", "deploy/k8s", "deploy/nginx.conf",
                 "deploy/worker_alive.py", "keda.yaml", "api.yaml", "worker.yaml", "config.yaml"):
        assert path in text, f"docs/DEPLOY.md does not mention {path}"
    # Every kleinserve env var the guide names is one kleinserve reads.
    unknown = set(re.findall(r"KLEINSERVE_[A-Z_]+", text)) - option_envs()
    assert not unknown, f"docs/DEPLOY.md names unknown variables {unknown}"
