"""deploy/: images, compose and Kubernetes files parse, reference what exists, and run commands the CLI accepts.

Offline and without docker or a cluster: YAML is read with PyYAML, every container command is parsed by
`specserve.cli.build_parser()` (and torchrun's own parser), Dockerfiles are checked against the repository.
Where kubectl, kubeconform, kubernetes-validate or a docker daemon happen to be present they check more;
otherwise those tests skip. The slow test runs the distillation Job's torchrun recipe as two nodes on this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from specserve.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
NAMESPACE = "specserve"
DOCKERFILES = [DEPLOY / "Dockerfile.cpu", DEPLOY / "Dockerfile.cuda"]
COMPOSE = DEPLOY / "docker-compose.yml"

# Files applied by hand (README), in no kustomization: the Secret template, the copy pod, the CRD-backed extras.
ON_DEMAND = {
    "base/secret.template.yaml",
    "distill/datasets-shell.yaml",
    "optional/hpa.yaml",
    "optional/servicemonitor.yaml",
}
POD_OWNERS = ("Deployment", "StatefulSet", "Job")

YAML_FILES = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
K8S_FILES = [p for p in YAML_FILES if K8S in p.parents and p.name != "kustomization.yaml"]


def rel(path: Path) -> str:
    return str(path.relative_to(K8S if K8S in path.parents else DEPLOY))


def load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def objects() -> list[tuple[Path, dict]]:
    """Every complete Kubernetes object in deploy/k8s (patches excluded)."""
    return [(p, d) for p in K8S_FILES if not p.name.endswith(".patch.yaml") for d in load(p)]


def find(kind: str, name: str | None = None) -> list[dict]:
    return [d for _, d in objects() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def pod_spec(obj: dict) -> dict:
    return obj["spec"] if obj["kind"] == "Pod" else obj["spec"]["template"]["spec"]


def pod_objects() -> list[dict]:
    return [d for _, d in objects() if d["kind"] in (*POD_OWNERS, "Pod")]


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# ---- YAML and Kubernetes objects ------------------------------------------------------------------


@pytest.mark.parametrize("path", YAML_FILES, ids=rel)
def test_yaml_parses(path):
    docs = load(path)
    assert docs and all(isinstance(d, dict) for d in docs), f"{path}: expected one or more mappings"


@pytest.mark.parametrize("path", K8S_FILES, ids=rel)
def test_k8s_objects_have_identity(path):
    for doc in load(path):
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), f"{path}: {sorted(doc)}"
        name = doc["metadata"].get("name", "")
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, f"{path}: name {name!r}"
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{path}: {doc['kind']} {name} not in {NAMESPACE}"


def test_kustomizations_reference_existing_files_and_miss_none():
    referenced = set()
    for kustomization in K8S.rglob("kustomization.yaml"):
        k = load(kustomization)[0]
        for entry in [*k.get("resources", []), *(p["path"] for p in k.get("patches", []))]:
            target = (kustomization.parent / entry).resolve()
            assert target.is_file() or (target / "kustomization.yaml").is_file(), f"{kustomization}: {entry}"
            if target.is_file():
                referenced.add(rel(target))
    assert {rel(p) for p in K8S_FILES} - referenced == ON_DEMAND


def test_pod_references_resolve():
    config = {d["metadata"]["name"]: d["data"] for d in find("ConfigMap")}
    secrets = {d["metadata"]["name"]: d["stringData"] for d in find("Secret")}
    claims = {d["metadata"]["name"] for d in find("PersistentVolumeClaim")}
    for obj in pod_objects():
        spec, where = pod_spec(obj), f"{obj['kind']} {obj['metadata']['name']}"
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        volumes.update({t["metadata"]["name"]: t for t in obj["spec"].get("volumeClaimTemplates", [])})
        for v in volumes.values():
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims, f"{where}: claim of volume {v['name']}"
        for c in spec["containers"]:
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, f"{where}/{c['name']}: mount of unknown volume {m['name']!r}"
            for e in c.get("envFrom", []):
                assert e["configMapRef"]["name"] in config, f"{where}/{c['name']}: {e}"
            for e in c.get("env", []):
                ref = e.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    assert ref["secretKeyRef"]["key"] in secrets[ref["secretKeyRef"]["name"]], f"{where}: {e}"
                if "configMapKeyRef" in ref:
                    assert ref["configMapKeyRef"]["key"] in config[ref["configMapKeyRef"]["name"]], f"{where}: {e}"
            env = container_env(c)
            for token in [*c.get("command", []), *c.get("args", [])]:
                for name in re.findall(r"\$\((\w+)\)", token):
                    assert name in env, f"{where}/{c['name']}: $({name}) is not in its environment"


def test_selectors_match_what_they_select():
    templates = {(d["kind"], d["metadata"]["name"]): d for d in pod_objects()}
    labels = {
        key: (d["spec"]["template"]["metadata"] if d["kind"] != "Pod" else d["metadata"])["labels"]
        for key, d in templates.items()
    }
    for key, d in templates.items():
        if d["kind"] in ("Deployment", "StatefulSet"):
            assert selects(d["spec"]["selector"]["matchLabels"], labels[key]), key
    for svc in find("Service"):
        chosen = [k for k, lab in labels.items() if selects(svc["spec"]["selector"], lab)]
        assert chosen, f"Service {svc['metadata']['name']} selects no pod template"
        declared = [p for k in chosen for c in pod_spec(templates[k])["containers"] for p in c.get("ports", [])]
        ports = {p.get("name") for p in declared} | {p["containerPort"] for p in declared}
        for p in svc["spec"]["ports"]:
            assert p.get("targetPort", p["port"]) in ports, f"Service {svc['metadata']['name']}: {p}"
    for sts in find("StatefulSet"):
        assert find("Service", sts["spec"]["serviceName"])[0]["spec"].get("clusterIP") == "None"
    server = labels[("Deployment", "specserve-server")]
    assert selects(find("PodDisruptionBudget", "specserve-server")[0]["spec"]["selector"]["matchLabels"], server)
    target = find("HorizontalPodAutoscaler")[0]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "specserve-server")
    monitor = find("ServiceMonitor")[0]["spec"]
    (service,) = [s for s in find("Service") if selects(monitor["selector"]["matchLabels"], s["metadata"]["labels"])]
    assert {e["port"] for e in monitor["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    assert monitor["endpoints"][0]["path"] == "/metrics"


def test_server_deployment_serves_safely():
    (server,) = find("Deployment", "specserve-server")
    spec = pod_spec(server)
    (c,) = spec["containers"]
    assert server["spec"]["replicas"] >= 2
    port = c["ports"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health" and c[probe]["httpGet"]["port"] in (port["name"], 8000)
    sleep = c["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep" and spec["terminationGracePeriodSeconds"] > 2 * int(sleep[1])
    for kind in ("requests", "limits"):
        assert {"cpu", "memory", "nvidia.com/gpu"} <= c["resources"][kind].keys()
    annotations = server["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    assert annotations["prometheus.io/port"] == str(port["containerPort"])
    drafts = [m for m in c["volumeMounts"] if m["mountPath"] == "/drafts"]
    assert drafts and drafts[0]["readOnly"], "replicas only read the draft registry"
    (pvc,) = find("PersistentVolumeClaim", "specserve-drafts")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    (trainer,) = find("Deployment", "specserve-trainer")
    assert trainer["spec"]["replicas"] == 1 and trainer["spec"]["strategy"]["type"] == "Recreate"


@pytest.mark.parametrize("obj", pod_objects(), ids=lambda d: f"{d['kind']}-{d['metadata']['name']}")
def test_every_container_probes_health_and_bounds_resources(obj):
    for c in pod_spec(obj)["containers"]:
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= c.get("resources", {}).get(kind, {}).keys(), f"{c['name']}: {kind}"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if "httpGet" in c.get(probe, {}):
                assert c[probe]["httpGet"]["path"] == "/health", f"{c['name']}: {probe}"


# ---- commands: every specserve invocation parses with the real CLI ---------------------------------


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


def config_data(variant: str) -> dict[str, str]:
    (base,) = find("ConfigMap", "specserve-config")
    data = dict(base["data"])
    if variant == "cpu":
        data.update(load(K8S / "overlays" / "cpu" / "config.patch.yaml")[0]["data"])
    return data


def container_env(c: dict, variant: str = "base") -> dict[str, str]:
    """The container's environment as the kubelet builds it (secrets: the template's placeholders)."""
    env = config_data(variant) if c.get("envFrom") else {}
    secrets = {d["metadata"]["name"]: d["stringData"] for d in find("Secret")}
    for e in c.get("env", []):
        ref = e.get("valueFrom", {})
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "secretKeyRef" in ref:
            env[e["name"]] = secrets[ref["secretKeyRef"]["name"]][ref["secretKeyRef"]["key"]]
        elif "configMapKeyRef" in ref:
            env[e["name"]] = config_data(variant)[ref["configMapKeyRef"]["key"]]
        else:
            assert ref["fieldRef"]["fieldPath"] == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
            env[e["name"]] = "0"
    return env


def expand(tokens: list[str], env: dict[str, str]) -> list[str]:
    """The kubelet's $(NAME) expansion of command and args (an undefined name stays as it is, as there)."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), t) for t in tokens]


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    lines = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1].strip()) for ln in joined.splitlines() if ln.strip()]


def instruction(path: Path, name: str) -> list[str]:
    return [arg for ins, arg in dockerfile(path) if ins == name]


def entrypoint(path: Path) -> list[str]:
    return json.loads(instruction(path, "ENTRYPOINT")[-1])


def commands() -> list[tuple[str, list[str]]]:
    """(id, argv with $(NAME) / ${NAME:-default} expanded) of every specserve container, image and compose service."""
    out = []
    for obj in pod_objects():
        for c in pod_spec(obj)["containers"]:
            if "specserve" not in c["image"] or c.get("command") == ["sleep", "infinity"]:
                continue
            for variant in ("base", "cpu") if obj["kind"] == "Deployment" else ("base",):
                argv = expand(c["command"] + c["args"], container_env(c, variant))
                out.append((f"{obj['kind']}-{obj['metadata']['name']}[{variant}]", argv))
    for path in DOCKERFILES:
        out.append((path.name, entrypoint(path) + json.loads(instruction(path, "CMD")[-1])))
    for name, service in load(COMPOSE)[0]["services"].items():
        if "build" in service:
            argv = service.get("entrypoint") or entrypoint(ROOT / service["build"]["dockerfile"])
            argv = argv + service["command"]
            argv = [re.sub(r"\$\{\w+(?::-([^}]*))?\}", lambda m: m.group(1) or "", t) for t in argv]
            out.append((f"compose-{name}", argv))
    return out


def specserve_args(argv: list[str]) -> list[str]:
    """The `specserve` arguments of an argv: direct, or the script arguments of torchrun -m specserve.cli."""
    if argv[0] == "specserve":
        return argv[1:]
    assert argv[0] == "torchrun", f"not a specserve command: {shlex.join(argv)}"
    from torch.distributed.run import get_args_parser

    launch = get_args_parser().parse_args(argv[1:])
    assert launch.module and launch.training_script == "specserve.cli", shlex.join(argv)
    return launch.training_script_args


@pytest.mark.parametrize("case", commands(), ids=lambda c: c[0])
def test_command_is_accepted_by_the_cli(case):
    _, argv = case
    args = specserve_args(argv)
    parser = build_parser()
    cli, sub = subcommands(parser), args[0]
    assert sub in cli, f"no subcommand {sub!r}; the CLI has {sorted(cli)}"
    known = {s for a in cli[sub]._actions for s in a.option_strings}
    # exact names: argparse would also take an abbreviation, which a later flag can make ambiguous
    unknown = {t.split("=")[0] for t in args[1:] if t.startswith("--")} - known
    assert not unknown, f"`specserve {sub}` has no {sorted(unknown)}"
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            parser.parse_args(args)
        except SystemExit:
            pytest.fail(f"`specserve {shlex.join(args)}` is refused: {stderr.getvalue()}")


def test_distill_job_is_a_consistent_multi_node_recipe():
    from torch.distributed.run import get_args_parser

    (job,) = find("Job", "specserve-distill")
    spec = pod_spec(job)
    (c,) = spec["containers"]
    launch = get_args_parser().parse_args(expand(c["args"], container_env(c)))
    nodes = int(launch.nnodes)
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == nodes > 1
    assert int(launch.nproc_per_node) == c["resources"]["limits"]["nvidia.com/gpu"]
    assert "--node-rank=$(JOB_COMPLETION_INDEX)" in c["args"], "pod i is node i"
    assert launch.rdzv_backend == "static"
    host, port = launch.rdzv_endpoint.rsplit(":", 1)
    assert host == f"{job['metadata']['name']}-0.{spec['subdomain']}", "node 0's pod hosts the rendezvous"
    (svc,) = find("Service", spec["subdomain"])
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"]
    assert int(port) in {p["port"] for p in svc["spec"]["ports"]} & {p["containerPort"] for p in c["ports"]}
    assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in spec["volumes"]), "NCCL needs /dev/shm"


# ---- Dockerfiles, .dockerignore, compose ---------------------------------------------------------


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.lstrip("!").strip("/")
        regex = re.escape(body).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        if any(re.fullmatch(regex, p) for p in prefixes):
            excluded = not negate
    return excluded


def makefile_torch_pin() -> str:
    (pin,) = re.findall(r"torch==([\w.+]+)", (ROOT / "Makefile").read_text())
    return pin


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile(path):
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [p for p in patterns if p and not p.startswith("#")]
    args = dict(a.split("=", 1) for a in instruction(path, "ARG") if "=" in a)
    for image in instruction(path, "FROM"):
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image.split()[0])
        assert ":" in image and not image.endswith(":latest"), f"{path.name}: unpinned base {image}"
    for copy in instruction(path, "COPY") + instruction(path, "ADD"):
        if copy.startswith("--from"):
            continue
        for src in shlex.split(copy)[:-1]:
            assert (ROOT / src).exists(), f"{path.name}: COPY {src} does not exist"
            files = [ROOT / src] if (ROOT / src).is_file() else sorted((ROOT / src).rglob("*.py"))
            for f in files:
                assert not dockerignore_excludes(str(f.relative_to(ROOT)), patterns), f".dockerignore drops {f}"
    for kept_out in (".venv/bin/python", ".git/HEAD", "tests/test_deploy.py", "specserve/__pycache__/x.pyc"):
        assert dockerignore_excludes(kept_out, patterns), f".dockerignore lets {kept_out} into the context"
    text = " ".join(instruction(path, "RUN"))
    assert f"torch=={makefile_torch_pin()}" in text, f"{path.name}: torch pin differs from the Makefile's"
    if path.name == "Dockerfile.cpu":
        assert "--index-url https://download.pytorch.org/whl/cpu" in text
    (names,) = re.findall(r"from specserve\.model\.default_models import ([\w, ]+);", text)
    from specserve.model import default_models

    assert all(hasattr(default_models, n.strip()) for n in names.split(",")), names
    assert instruction(path, "USER")[-1].split(":")[0] not in ("root", "0")
    assert instruction(path, "STOPSIGNAL") == ["SIGTERM"]
    assert entrypoint(path) == ["specserve", "serve"]
    cmd = json.loads(instruction(path, "CMD")[-1])
    (health,) = instruction(path, "HEALTHCHECK")
    assert f"127.0.0.1:{cmd[cmd.index('--port') + 1]}/health" in health


def test_compose_wires_server_trainer_and_postgres():
    compose = load(COMPOSE)[0]
    services = compose["services"]
    assert {"server", "trainer", "postgres"} <= services.keys()
    postgres = services["postgres"]
    assert postgres["image"] == "postgres:16" and "pg_isready" in postgres["healthcheck"]["test"]
    for name in ("server", "trainer"):
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
    mounts = {name: dict(v.split(":", 1) for v in s.get("volumes", [])) for name, s in services.items()}
    assert set().union(*(m.keys() for m in mounts.values())) <= compose["volumes"].keys()
    assert mounts["server"]["drafts"].startswith("/drafts") and mounts["trainer"]["drafts"] == "/drafts"
    for name in ("server", "trainer"):
        build = services[name]["build"]
        assert (COMPOSE.parent / build["context"]).resolve() == ROOT and (ROOT / build["dockerfile"]).is_file()


# ---- optional tools: used when present --------------------------------------------------------------

KUSTOMIZATIONS = sorted(p.parent for p in K8S.rglob("kustomization.yaml"))


def rendered(directory: Path) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(K8S)))
def test_kustomize_renders(directory):
    docs = rendered(directory)
    assert docs and all(d["metadata"].get("namespace", NAMESPACE) == NAMESPACE for d in docs)
    if directory.name == "cpu":
        for d in docs:
            if d["kind"] == "Deployment":
                for c in pod_spec(d)["containers"]:
                    assert "nvidia.com/gpu" not in json.dumps(c["resources"]) and c["image"].startswith("specserve-cpu")


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(K8S)))
def test_manifests_match_the_kubernetes_schemas(directory):
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed (renders the kustomization)")
    docs = rendered(directory)
    if directory.name == "base":
        docs += [d for p in K8S_FILES if rel(p) in ON_DEMAND for d in load(p)]
    for doc in docs:
        try:
            kv.validate(doc, "1.30.0", strict=True)
        except kv.SchemaNotFoundError:
            assert "coreos.com" in doc["apiVersion"], f"no schema for {doc['apiVersion']} {doc['kind']}"


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("kubeconform") is None, reason="kubeconform is not installed")
def test_kubeconform():
    files = [str(p) for p in K8S_FILES if not p.name.endswith(".patch.yaml")]
    out = subprocess.run(
        ["kubeconform", "-strict", "-ignore-missing-schemas", "-summary", *files],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def docker_daemon() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


@pytest.mark.integration
@pytest.mark.skipif(not docker_daemon(), reason="no docker daemon")
@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_docker_build_check(path):
    out = subprocess.run(
        ["docker", "build", "--check", "-f", str(path), str(ROOT)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout + out.stderr


# ---- the multi-node recipe, run -----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
@pytest.mark.slow  # four fresh interpreters (two torchrun agents, two workers) importing torch: ~1 min
def test_distill_job_recipe_runs_as_two_nodes(tiny, tmp_path):
    """The Job's torchrun argv, node 0 and node 1 on this machine (gloo on the CPU), on the tiny verifier."""
    from tiny_models import CORPUS

    (job,) = find("Job", "specserve-distill")
    (c,) = pod_spec(job)["containers"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": line[:40]}) for line in CORPUS[:8]))
    out = tmp_path / "draft"
    port = _free_port()
    values = {"--data": str(prompts), "--out": str(out)}
    args = [values.get(prev, t) for prev, t in zip(["", *c["args"][:-1]], c["args"], strict=True)]
    args = [f"--rdzv-endpoint=127.0.0.1:{port}" if t.startswith("--rdzv-endpoint=") else t for t in args]
    # later flags override the Job's: the tiny verifier, a tiny student, two steps
    args += [
        "--verifier",
        tiny["llama"],
        *shlex.split(
            "--student-layers 1 --student-hidden 32 --student-heads 2 "
            "--student-kv-heads 1 --max-prompts 8 --max-new-tokens 8 --steps 2 --batch-size 2 --eval-every 0 "
            "--device cpu"
        ),
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run"]
    # each node logs to a file, not a pipe: a pipe read only after node 0 ends fills up while node 1 writes, and
    # node 1 then blocks on its write while node 0 waits for it at a barrier
    log_paths = [tmp_path / f"node{rank}.log" for rank in range(job["spec"]["completions"])]
    nodes = []
    for rank, log_path in enumerate(log_paths):
        with open(log_path, "w") as log:
            nodes.append(
                subprocess.Popen(
                    launch + expand(args, {"JOB_COMPLETION_INDEX": str(rank)}),
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # a process group per node: the agent and its worker stop together
                )
            )
    deadline = time.monotonic() + 600
    try:
        for node in nodes:
            node.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:  # a node whose peer is gone waits on a barrier or a collective for many minutes: stop it with the test
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
    logs = [p.read_text() for p in log_paths]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(log[-3000:] for log in logs)
    record = json.loads((out / "distill.json").read_text())
    assert record["world_size"] == 2 and record["status"] == "finished"
    assert (out / "model.safetensors").exists()
