"""fedsim on a real two-node Ray cluster through `ray job submit`, tracked by a real MLflow server.

The integration test starts, on this machine, what a cluster deployment runs: a Ray head node
with its dashboard (the job server), a second Ray node, and an MLflow tracking server. It
submits `python -m fedsim run ...` with the `cluster/runtime_env.yaml` the README documents,
waits for the job, then reads the run back from the server: finished, metrics at rounds 0 and
1, and a per-client table whose `node_id` column names both Ray nodes.

The nodes use Ray's token authentication with a token of their own, their own temp dirs and
free ports, so they neither see nor disturb any other Ray on the machine. Every process is
started in its own session and stopped by process group (SIGTERM, then SIGKILL) with its whole
process tree, never with `ray stop`, which would stop every Ray instance on the machine. Ray's
files live in a short temp dir (Unix socket paths must stay under 108 bytes) that is removed
at the end; the teardown fails the test if any process of ours survives.

The other tests check that the deployment files in cluster/ parse, match the schemas their
tools enforce, and compose with fedsim's own runtime env and config, and that they are secure
by default: every Ray node and client authenticates with the token (from the token file or a
Kubernetes Secret), the launcher's dashboard and MLflow listen on 127.0.0.1, MLflow runs its
basic-auth app with credentials from a Secret that the job logs in with, NetworkPolicies admit
only the pods that need the Ray head and MLflow, and no file holds a token or password.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
EXPERIMENT = "cluster-test"
JOB_TIMEOUT_S = 240
START_TIMEOUT_S = 90


# ---------------------------------------------------------------------------------------------
# The deployment files
# ---------------------------------------------------------------------------------------------


def _load(name: str):
    return yaml.safe_load((CLUSTER / name).read_text())


def _driver_runtime_env(monkeypatch) -> dict:
    """The runtime env fedsim's driver passes to ``ray.init`` (captured, Ray not started)."""
    import ray

    from actors.executor import init_ray

    captured: dict = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: captured.update(kw))
    init_ray()
    return captured.get("runtime_env") or {}


def _entrypoint_config(entrypoint: str):
    """The fedsim config an entrypoint ``python -m fedsim run CONFIG overrides...`` resolves."""
    from fedsim.config import load_config

    argv = shlex.split(entrypoint)
    assert argv[:4] == ["python", "-m", "fedsim", "run"], entrypoint
    ref, overrides = argv[4], argv[5:]  # a path from the repository root, or a shipped name
    return load_config(REPO / ref if (REPO / ref).exists() else ref, overrides)


def _runtime_env_conflicts(job: dict, driver: dict) -> set[str]:
    """What keeps Ray from merging a job's runtime env (``ray job submit --runtime-env``, a
    RayJob's ``runtimeEnvYAML``) with the one its driver passes to ``ray.init``: a field both
    set, or an environment variable both set. Ray then fails the job before it starts ("Failed
    to merge the Job's runtime env ... Specifying the same runtime_env fields or the same
    environment variable keys is not allowed"), unless RAY_OVERRIDE_JOB_RUNTIME_ENV=1."""
    fields = (set(job) & set(driver)) - {"env_vars"}
    variables = set(job.get("env_vars") or {}) & set(driver.get("env_vars") or {})
    return fields | {f"env_vars.{name}" for name in variables}


def test_runtime_env_conflicts_are_shared_fields_and_variables():
    job = {"working_dir": ".", "env_vars": {"A": "1", "B": "2"}}
    assert _runtime_env_conflicts(job, {}) == set()
    assert _runtime_env_conflicts(job, {"pip": ["x"], "env_vars": {"C": "3"}}) == set()
    assert _runtime_env_conflicts(job, {"working_dir": "/x", "env_vars": {"B": "9"}}) == {
        "working_dir",
        "env_vars.B",
    }


def test_runtime_env_ships_the_project_and_composes_with_the_driver(monkeypatch):
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
    from ray.runtime_env import RuntimeEnv

    path = CLUSTER / "runtime_env.yaml"
    # exactly what `ray job submit --runtime-env cluster/runtime_env.yaml` does with the file
    env = parse_runtime_env_args(runtime_env=str(path))
    RuntimeEnv(**env)  # Ray's own validation of every field
    assert env["working_dir"] == "."
    for pattern in (".git", ".venv", "mlflow.db", "mlruns", "runs", "checkpoints", "*.png"):
        assert pattern in env["excludes"], pattern
    # Ray merges the job's runtime env with any runtime env the driver passes to ray.init; a
    # variable set by both is a conflict that fails the job before it starts. fedsim's driver
    # passes none, so whatever a user's job sets is kept.
    driver = _driver_runtime_env(monkeypatch)
    assert not driver, f"init_ray passes a runtime_env {driver} that can clash with a job's"
    assert not _runtime_env_conflicts(RuntimeEnv(**env), RuntimeEnv(**driver))


def test_cluster_launcher_config_passes_ray_up_validation():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler.sdk import fillout_defaults

    raw = _load("ray-cluster.yaml")
    # Ray's JSON schema of a cluster config (shipped beside ray.autoscaler), which `ray up`
    # checks the config against once it has filled in the provider's defaults
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(raw, schema)
    config = fillout_defaults(raw)
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert workers and all(t["min_workers"] >= 1 for t in workers)
    assert sum(t.get("min_workers", 0) for t in types.values()) <= config["max_workers"]
    assert "fedsim" in " ".join(config["setup_commands"])
    assert "." in config["file_mounts"].values()


def test_rayjob_runs_a_valid_fedsim_command_on_a_gpu_cluster(monkeypatch):
    from ray.runtime_env import RuntimeEnv

    docs = list(yaml.safe_load_all((CLUSTER / "rayjob.yaml").read_text()))
    (job,) = [d for d in docs if d and d.get("kind") == "RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    cfg = _entrypoint_config(spec["entrypoint"])
    assert cfg.tracking.uri == "http://mlflow:5000"
    assert 0 < cfg.resources.client.num_gpus < 1
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert env["working_dir"]
    driver = _driver_runtime_env(monkeypatch)
    assert not _runtime_env_conflicts(RuntimeEnv(**env), RuntimeEnv(**driver))
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    gpus = [
        c["resources"]["limits"].get("nvidia.com/gpu")
        for g in cluster["workerGroupSpecs"]
        for c in g["template"]["spec"]["containers"]
    ]
    assert gpus and all(int(g) >= 1 for g in gpus)


def test_mlflow_manifest_serves_the_uri_the_job_logs_to():
    docs = [d for d in yaml.safe_load_all((CLUSTER / "mlflow.yaml").read_text()) if d]
    kinds = {d["kind"]: d for d in docs}
    assert {"Deployment", "Service"} <= set(kinds)
    service = kinds["Service"]
    assert service["metadata"]["name"] == "mlflow"
    assert [p["port"] for p in service["spec"]["ports"]] == [5000]
    (container,) = kinds["Deployment"]["spec"]["template"]["spec"]["containers"]
    args = container.get("command", []) + container.get("args", [])
    assert "server" in args and "--allowed-hosts" in args
    allowed = args[args.index("--allowed-hosts") + 1].split(",")
    from mlflow.server.security_utils import is_allowed_host_header

    # the Host header a job sends to http://mlflow:5000, and a browser through port-forward
    assert is_allowed_host_header(allowed, "mlflow:5000")
    assert is_allowed_host_header(allowed, "localhost:5000")


# ---------------------------------------------------------------------------------------------
# Secure defaults: token auth everywhere, loopback-only servers, MLflow behind a login, no
# secret in any file
# ---------------------------------------------------------------------------------------------

RAY_TOKEN_SECRET_KEY = "auth_token"  # the Secret key KubeRay's authOptions.secretName must hold
SECRET_LIKE = re.compile(r"TOKEN|PASSWORD|SECRET|CREDENTIAL", re.IGNORECASE)


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]


def _one(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d.get("kind") == kind]
    return doc


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _secret_ref(entry: dict | None) -> tuple[str, str] | None:
    """(Secret name, key) of an env entry that takes its value from a Secret, else None."""
    ref = ((entry or {}).get("valueFrom") or {}).get("secretKeyRef")
    if not ref or "value" in entry:
        return None
    return ref["name"], ref["key"]


def _walk(obj):
    """Every dict nested in a parsed YAML document."""
    if isinstance(obj, dict):
        yield obj
        for value in obj.values():
            yield from _walk(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _walk(value)


def _selects(selector: dict, labels: dict) -> bool:
    """Whether a Kubernetes label selector (matchLabels, matchExpressions) selects ``labels``."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def _rayjob_pods() -> dict[str, dict]:
    """The pod templates of the RayJob: ``head``, ``worker:<group>`` and ``submitter``."""
    spec = _one(_docs("rayjob.yaml"), "RayJob")["spec"]
    cluster = spec["rayClusterSpec"]
    pods = {"head": cluster["headGroupSpec"]["template"]}
    for group in cluster["workerGroupSpecs"]:
        pods[f"worker:{group['groupName']}"] = group["template"]
    if "submitterPodTemplate" in spec:
        pods["submitter"] = spec["submitterPodTemplate"]
    return pods


def _labels(template: dict) -> dict:
    return (template.get("metadata") or {}).get("labels") or {}


def _run_with_stub_ray(command: str) -> list[tuple[str | None, list[str]]]:
    """Run a start command of the launcher config in bash with `ray` (and `ulimit`) replaced by
    stubs; return, for every `ray start` it runs, the RAY_AUTH_MODE it sees and its arguments."""
    # `mlflow` and `nohup` are stubbed too: the head's commands start an MLflow server, which
    # must not really start (it would outlive the test, listening on port 5000)
    stub = (
        'ray() { if [ "$1" = start ]; then printf "%s\\0" "start" "${RAY_AUTH_MODE-<unset>}" '
        '"$@"; printf "\\n"; fi; }; ulimit() { :; }; mlflow() { :; }; nohup() { "$@"; }; '
    )
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "RAY_HEAD_IP": "10.0.0.1"}
    with tempfile.TemporaryDirectory(prefix="fedsim-stub-home-") as home:
        env["HOME"] = home
        out = subprocess.run(
            ["bash", "-c", stub + command], env=env, capture_output=True, text=True, check=True
        ).stdout
    calls = []
    for line in out.splitlines():
        fields = line.split("\0")[:-1]
        if fields and fields[0] == "start":
            mode = None if fields[1] == "<unset>" else fields[1]
            calls.append((mode, fields[3:]))  # fields[2] is "start" itself
    return calls


def _ray_default_token_file(home: Path) -> str:
    """Ray's default token file, as a ``~/`` path: where ``ray get-auth-token --generate``
    writes a new token when neither RAY_AUTH_TOKEN nor RAY_AUTH_TOKEN_PATH is set (run with
    ``home`` as HOME, so it touches no token of this machine)."""
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0")
    subprocess.run(
        [*_cli("ray"), "get-auth-token", "--generate"],
        env=env,
        capture_output=True,
        check=True,
        timeout=120,
    )
    (token,) = [p for p in home.rglob("*") if p.is_file()]
    return "~/" + token.relative_to(home).as_posix()


def test_cluster_launcher_runs_every_ray_node_with_token_auth(tmp_path):
    config = _load("ray-cluster.yaml")
    starts = {
        name: [call for cmd in config[name] for call in _run_with_stub_ray(cmd)]
        for name in ("head_start_ray_commands", "worker_start_ray_commands")
    }
    (head,) = starts["head_start_ray_commands"]
    (worker,) = starts["worker_start_ray_commands"]
    assert "--head" in head[1] and "--head" not in worker[1]
    for mode, argv in (head, worker):
        assert mode == "token", f"`ray start {' '.join(argv)}` runs without RAY_AUTH_MODE=token"
    # every other `ray` command run in the node's container (ray exec, ray status, attach)
    run_options = shlex.split(" ".join(config["docker"]["run_options"]))
    pairs = set(zip(run_options, run_options[1:]))
    assert ("-e", "RAY_AUTH_MODE=token") in pairs or ("--env", "RAY_AUTH_MODE=token") in pairs
    # The token: the file `ray start` reads (Ray's default path, under the container's home)
    # comes from the same file on the machine that runs `ray up`, never from the config itself.
    default = _ray_default_token_file(tmp_path / "home")
    assert config["file_mounts"].get(default) == default
    commands = " ".join(
        cmd for key, value in config.items() if key.endswith("_commands") for cmd in value
    )
    assert "RAY_AUTH_TOKEN=" not in commands and "disabled" not in commands


def test_cluster_launcher_dashboard_and_mlflow_listen_on_loopback_only():
    config = _load("ray-cluster.yaml")
    (head,) = [c for cmd in config["head_start_ray_commands"] for c in _run_with_stub_ray(cmd)]
    hosts = [a.split("=", 1)[1] for a in head[1] if a.startswith("--dashboard-host=")]
    assert hosts == ["127.0.0.1"], f"the head's dashboard listens on {hosts or 'the default'}"
    commands = [cmd for key, value in config.items() if key.endswith("_commands") for cmd in value]
    assert not [c for c in commands if "0.0.0.0" in c], "a server of the launcher binds 0.0.0.0"
    (mlflow,) = [c for c in config["head_start_ray_commands"] if "mlflow server" in c]
    assert re.findall(r"--host[= ](\S+)", mlflow) == ["127.0.0.1"]


def test_rayjob_head_workers_and_submitter_authenticate_with_the_token_secret():
    spec = _one(_docs("rayjob.yaml"), "RayJob")["spec"]
    cluster = spec["rayClusterSpec"]
    major, minor = (int(x) for x in cluster["rayVersion"].split(".")[:2])
    assert (major, minor) >= (2, 52), "Ray token authentication needs Ray 2.52 or newer"
    # KubeRay's own token auth: it also makes the operator's dashboard requests authenticate
    auth = cluster.get("authOptions") or {}
    assert auth.get("mode") == "token"
    secret = auth["secretName"]
    pods = _rayjob_pods()
    assert {"head", "submitter"} <= set(pods) and any(p.startswith("worker:") for p in pods)
    (submitter,) = pods["submitter"]["spec"]["containers"]
    assert submitter["name"] == "ray-job-submitter"  # the name KubeRay gives its submitter
    assert pods["submitter"]["spec"]["restartPolicy"] == "Never"
    for role, template in pods.items():
        for container in template["spec"]["containers"]:
            env = _env(container)
            where = f"{role} container {container['name']}"
            assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", where
            assert _secret_ref(env.get("RAY_AUTH_TOKEN")) == (secret, RAY_TOKEN_SECRET_KEY), where
    assert "RAY_AUTH_TOKEN" not in spec.get("runtimeEnvYAML", "")


def test_image_defaults_to_token_auth_and_bakes_in_no_secret():
    lines = [line.split() for line in (CLUSTER / "Dockerfile").read_text().splitlines()]
    settings = [" ".join(words[1:]) for words in lines if words and words[0] in {"ENV", "ARG"}]
    assert "RAY_AUTH_MODE=token" in settings
    names = [s.split("=", 1)[0] for s in settings]
    assert not [n for n in names if SECRET_LIKE.search(n)], settings


def _mlflow_auth_module(name: str):
    """A module of ``mlflow.server.auth``, loaded from its file: the package itself imports
    Flask-WTF (``mlflow[auth]``), which the MLflow image has and this environment need not."""
    import importlib.util

    import mlflow

    path = Path(mlflow.__file__).parent / "server" / "auth" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_fedsim_test_mlflow_auth_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _mlflow_container() -> tuple[dict, dict]:
    deployment = _one(_docs("mlflow.yaml"), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return container, pod


def test_mlflow_runs_the_basic_auth_app_with_credentials_from_a_secret(monkeypatch, tmp_path):
    from importlib.metadata import entry_points

    from mlflow.environment_variables import (
        MLFLOW_AUTH_ADMIN_PASSWORD,
        MLFLOW_AUTH_ADMIN_USERNAME,
        MLFLOW_AUTH_CONFIG_PATH,
        MLFLOW_FLASK_SERVER_SECRET_KEY,
    )

    container, pod = _mlflow_container()
    argv = container.get("command", []) + container.get("args", [])
    assert argv[:2] == ["mlflow", "server"]
    assert "--app-name" in argv and argv[argv.index("--app-name") + 1] == "basic-auth"
    assert "basic-auth" in {e.name for e in entry_points(group="mlflow.app")}
    env = _env(container)
    refs = {
        var.name: _secret_ref(env.get(var.name))
        for var in (MLFLOW_AUTH_ADMIN_USERNAME, MLFLOW_AUTH_ADMIN_PASSWORD)
        + (MLFLOW_FLASK_SERVER_SECRET_KEY,)
    }
    assert all(refs.values()), f"not from a Secret: {[k for k, v in refs.items() if not v]}"
    assert len({name for name, _ in refs.values()}) == 1  # one Secret holds them all
    # The auth config file: a ConfigMap mounted where MLFLOW_AUTH_CONFIG_PATH points.
    config_path = Path(env[MLFLOW_AUTH_CONFIG_PATH.name]["value"])
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    (volume,) = [n for n, p in mounts.items() if Path(p) == config_path.parent]
    config_map = _one(_docs("mlflow.yaml"), "ConfigMap")
    assert volumes[volume]["configMap"]["name"] == config_map["metadata"]["name"]
    ini = config_map["data"][config_path.name]
    assert "admin_password" not in ini
    # Read it as MLflow does, with the Secret's values in the environment: the admin comes
    # from the Secret, the user store lives on the data volume, strangers see nothing.
    (tmp_path / config_path.name).write_text(ini)
    monkeypatch.setenv(MLFLOW_AUTH_CONFIG_PATH.name, str(tmp_path / config_path.name))
    monkeypatch.setenv(MLFLOW_AUTH_ADMIN_USERNAME.name, "from-the-secret")
    monkeypatch.setenv(MLFLOW_AUTH_ADMIN_PASSWORD.name, "from-the-secret-too")
    auth = _mlflow_auth_module("config").read_auth_config()
    assert (auth.admin_username, auth.admin_password) == ("from-the-secret", "from-the-secret-too")
    data_mount = mounts[next(n for n, v in volumes.items() if "persistentVolumeClaim" in v)]
    assert auth.database_uri.startswith(f"sqlite:///{data_mount.rstrip('/')}/")
    permissions = _mlflow_auth_module("permissions")
    assert permissions.get_permission(auth.default_permission) == permissions.NO_PERMISSIONS
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"  # open under basic-auth


def test_fedsim_job_logs_in_to_mlflow_with_the_servers_secret():
    from mlflow.environment_variables import (
        MLFLOW_AUTH_ADMIN_PASSWORD,
        MLFLOW_AUTH_ADMIN_USERNAME,
        MLFLOW_TRACKING_PASSWORD,
        MLFLOW_TRACKING_USERNAME,
    )

    server = _env(_mlflow_container()[0])
    # The job's driver runs on the head and inherits its environment.
    (head,) = _rayjob_pods()["head"]["spec"]["containers"]
    job = _env(head)
    for client, admin in (
        (MLFLOW_TRACKING_USERNAME, MLFLOW_AUTH_ADMIN_USERNAME),
        (MLFLOW_TRACKING_PASSWORD, MLFLOW_AUTH_ADMIN_PASSWORD),
    ):
        ref = _secret_ref(job.get(client.name))
        assert ref is not None, f"the head container takes {client.name} from no Secret"
        assert ref == _secret_ref(server[admin.name]), client.name


def test_network_policies_admit_only_the_ray_pods_the_submitter_and_the_operator():
    pods = _rayjob_pods()
    ray_labels = [_labels(t) for role, t in pods.items() if role != "submitter"]
    submitter = _labels(pods["submitter"])
    head_ports = {
        p["name"]: p["containerPort"]
        for p in pods["head"]["spec"]["containers"][0].get("ports", [])
    }
    policy = _one(_docs("rayjob.yaml"), "NetworkPolicy")["spec"]
    assert all(_selects(policy["podSelector"], labels) for labels in ray_labels)
    assert not _selects(policy["podSelector"], submitter)
    assert policy["policyTypes"] == ["Ingress"]
    for rule in policy["ingress"]:
        peers = rule.get("from")
        assert peers, "an ingress rule without `from` admits every pod and address"
        assert all("ipBlock" not in p for p in peers)
        if "ports" not in rule:  # all ports: the Ray pods themselves only
            for peer in peers:
                assert "namespaceSelector" not in peer
                assert not _selects(peer["podSelector"], submitter)
                assert all(_selects(peer["podSelector"], labels) for labels in ray_labels)
        else:  # everything else: the dashboard only
            assert [p["port"] for p in rule["ports"]] == [head_ports["dashboard"]]
    assert any(
        "ports" in rule and any(_selects(p.get("podSelector", {}), submitter) for p in rule["from"])
        for rule in policy["ingress"]
    ), "the submitter cannot reach the dashboard"
    # MLflow: reachable from the head pods (the job's driver) only, on its port only.
    docs = _docs("mlflow.yaml")
    policy = _one(docs, "NetworkPolicy")["spec"]
    deployment = _one(docs, "Deployment")["spec"]["template"]
    assert _selects(policy["podSelector"], _labels(deployment))
    (rule,) = policy["ingress"]
    assert [p["port"] for p in rule["ports"]] == [_one(docs, "Service")["spec"]["ports"][0]["port"]]
    for peer in rule["from"]:
        assert _selects(peer["podSelector"], _labels(pods["head"]))
        assert not _selects(peer["podSelector"], submitter)
        assert not any(_selects(peer["podSelector"], labels) for labels in ray_labels[1:])


def test_no_cluster_file_holds_a_token_or_password():
    for path in sorted(CLUSTER.iterdir()):
        text = path.read_text()
        # a pasted token: `openssl rand -hex`, `ray get-auth-token`, uuid4().hex
        assert not re.search(r"\b[0-9a-fA-F]{32,}\b", text), f"{path.name} holds a token"
        if path.suffix != ".yaml":
            continue
        docs = [d for d in yaml.safe_load_all(text) if d]
        assert not [d for d in docs if d.get("kind") == "Secret"], (
            f"{path.name} holds a Secret: applying it would set its placeholder values"
        )
        for node in _walk(docs):
            name = node.get("name")
            if isinstance(name, str) and ("value" in node or "valueFrom" in node):
                if SECRET_LIKE.search(name):
                    assert _secret_ref(node), f"{path.name}: {name} is not from a Secret"
    # runtime envs are shown to everyone who lists jobs: no secrets there
    job = _one(_docs("rayjob.yaml"), "RayJob")
    for env in (_load("runtime_env.yaml"), yaml.safe_load(job["spec"]["runtimeEnvYAML"])):
        leaked = [k for k in (env.get("env_vars") or {}) if SECRET_LIKE.search(k)]
        assert not leaked, f"secret-like variables in a runtime env: {leaked}"


# ---------------------------------------------------------------------------------------------
# The integration test: two Ray nodes, an MLflow server, `ray job submit`
# ---------------------------------------------------------------------------------------------


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _cli(name: str) -> list[str]:
    """The console script beside this interpreter, else its module form."""
    exe = Path(sys.executable).parent / name
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", {"ray": "ray.scripts.scripts", "mlflow": "mlflow"}[name]]


def _tail(path: Path, n: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"<{exc}>"
    return "\n".join(lines[-n:])


class Processes:
    """Processes started in their own sessions, stopped with their whole process trees."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root = root
        self.env = env
        self.started: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}

    def start(self, name: str, argv: list[str], **env: str) -> None:
        self.logs[name] = self.root / f"{name}.log"
        with open(self.logs[name], "wb") as out:
            self.started[name] = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.root,
                env={**self.env, **env},
                start_new_session=True,  # its own process group, killed as one
            )

    def check_alive(self, *names: str) -> None:
        for name in names:
            code = self.started[name].poll()
            if code is not None:
                pytest.fail(f"{name} exited with status {code}\n{self.dump()}")

    def dump(self) -> str:
        """The tails of our processes' logs and of Ray's main logs, for a failure message."""
        parts = [f"--- {name}: {path}\n{_tail(path)}" for name, path in self.logs.items()]
        for pattern in ("raylet.out", "gcs_server.out", "dashboard.log", "job-driver-*.log"):
            for path in sorted(self.root.glob(f"*/session_latest/logs/{pattern}")):
                parts.append(f"--- {path}\n{_tail(path)}")
        return "\n".join(parts)

    def _ours(self) -> set[psutil.Process]:
        """Our processes, their descendants, and any process running from our temp dir (Ray's
        workers change their titles and process groups, but stay children of their raylet
        or run with their cwd in the session dir)."""
        found: set[psutil.Process] = set()
        for proc in self.started.values():
            try:
                top = psutil.Process(proc.pid)
                found.add(top)
                found.update(top.children(recursive=True))
            except psutil.NoSuchProcess:
                pass
        root = str(self.root)
        for p in psutil.process_iter(["cmdline", "cwd"]):
            if root in " ".join(p.info["cmdline"] or []) or (p.info["cwd"] or "").startswith(root):
                found.add(p)
        found.discard(psutil.Process())
        return found

    def _signal_groups(self, sig: int) -> None:
        for proc in self.started.values():
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def stop(self) -> list[str]:
        """SIGTERM, a short grace period, then SIGKILL; returns what survived all that."""
        alive = self._ours()
        self._signal_groups(signal.SIGTERM)
        for p in alive:
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(alive, timeout=5)
        for _ in range(3):  # SIGKILL what is left, and whatever was spawned meanwhile
            alive = set(alive) | self._ours()
            if not alive:
                break
            self._signal_groups(signal.SIGKILL)
            for p in alive:
                try:
                    p.kill()
                except psutil.Error:
                    pass
            _, alive = psutil.wait_procs(alive, timeout=10)
        for proc in self.started.values():  # reap our direct children
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        survivors = []
        for p in set(alive) | self._ours():
            try:
                survivors.append(f"{p.pid} {' '.join(p.cmdline())}")
            except psutil.Error:
                pass
        return survivors


def _wait(what: str, check, procs: Processes, names: tuple[str, ...], timeout=START_TIMEOUT_S):
    """Poll ``check()`` until it returns a truthy value; fail with logs after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        procs.check_alive(*names)
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(0.5)
    pytest.fail(
        f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})\n{procs.dump()}"
    )


class Cluster:
    """A Ray head node (with the dashboard's job server), a second Ray node and an MLflow
    tracking server, all on 127.0.0.1 with free ports. The nodes use token authentication
    with a token of their own (RAY_AUTH_MODE=token: what Ray >= 2.52 runs with when asked,
    and independent of any ~/.ray/auth_token on this machine)."""

    def __init__(self, root: Path):
        gcs, dash, client, agent_head, agent_worker, mlflow = _free_ports(6)
        self.gcs_port = gcs
        self.dashboard = f"http://127.0.0.1:{dash}"
        self.mlflow = f"http://127.0.0.1:{mlflow}"
        self.token = uuid.uuid4().hex + uuid.uuid4().hex
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)
        self.procs = Processes(root, env)
        node = [
            "--block",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=1",
            "--num-gpus=0",
            "--object-store-memory=100000000",
            "--min-worker-port=0",  # random worker ports: no clash with another Ray here
            "--max-worker-port=0",
            "--disable-usage-stats",
            "--include-log-monitor=false",  # job logs come from the job server, not from it
        ]
        self.head = [
            *_cli("ray"),
            "start",
            "--head",
            f"--port={gcs}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            f"--dashboard-agent-listen-port={agent_head}",
            f"--ray-client-server-port={client}",
            f"--temp-dir={root / 'head'}",  # never /tmp/ray: its ray_current_cluster file
            *node,  # tells every ray.init() on this machine which cluster to join
        ]
        self.worker = [
            *_cli("ray"),
            "start",
            f"--address=127.0.0.1:{gcs}",
            f"--dashboard-agent-listen-port={agent_worker}",
            f"--temp-dir={root / 'worker'}",
            *node,
        ]
        self.mlflow_server = [
            *_cli("mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "mlartifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(mlflow),
            "--workers",
            "1",
        ]
        self.node_ids: set[str] = set()

    def start(self) -> None:
        """Start everything; return once both Ray nodes are alive (MLflow may still start)."""
        # No MLflow job runner: 8 more processes, and a store in /dev/shm that a killed
        # server leaves behind.
        self.procs.start(
            "mlflow-server", self.mlflow_server, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"
        )
        self.procs.start("ray-head", self.head)
        # The second node needs the head's GCS only; the dashboard comes up meanwhile.
        _wait("the head's GCS", lambda: _listening(self.gcs_port), self.procs, ("ray-head",))
        self.procs.start("ray-worker", self.worker)
        nodes = _wait(
            "two alive Ray nodes in the dashboard",
            lambda: (lambda alive: alive if len(alive) == 2 else None)(
                [n for n in self.nodes() if n["state"] == "ALIVE"]
            ),
            self.procs,
            ("ray-head", "ray-worker"),
        )
        self.node_ids = {n["node_id"] for n in nodes}

    def wait_for_mlflow(self) -> None:
        def healthy() -> bool:
            with urllib.request.urlopen(f"{self.mlflow}/health", timeout=5) as resp:
                return resp.status == 200

        _wait("the MLflow server", healthy, self.procs, ("mlflow-server",))

    def nodes(self) -> list[dict]:
        """The cluster's nodes (node_id, state, ...) from the dashboard's state API."""
        request = urllib.request.Request(
            f"{self.dashboard}/api/v0/nodes?limit=100", headers=self.auth_header
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            return json.load(resp)["data"]["result"]["result"]

    @property
    def auth_header(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def submit(self, entrypoint: list[str]) -> str:
        """``ray job submit --no-wait --runtime-env cluster/runtime_env.yaml`` from the repo
        root, as the README does; retried while the job server starts. Returns the job id."""
        submission_id = f"fedsim-cluster-test-{uuid.uuid4().hex[:8]}"
        argv = [
            *_cli("ray"),
            "job",
            "submit",
            f"--address={self.dashboard}",
            "--runtime-env=cluster/runtime_env.yaml",
            f"--submission-id={submission_id}",
            "--no-wait",
            "--",
            *entrypoint,
        ]
        deadline = time.monotonic() + 30
        while True:
            out = subprocess.run(
                argv, cwd=REPO, env=self.procs.env, capture_output=True, text=True, timeout=120
            )
            if out.returncode == 0:
                return submission_id
            if time.monotonic() > deadline:
                pytest.fail(
                    f"ray job submit exited with {out.returncode}:\n{out.stdout}\n{out.stderr}\n"
                    f"{self.procs.dump()}"
                )
            time.sleep(2)

    def wait_for_job(self, submission_id: str, timeout: float = JOB_TIMEOUT_S) -> None:
        """Wait until the job ends; fail with its logs unless it succeeded."""
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(self.dashboard, headers=self.auth_header)
        deadline = time.monotonic() + timeout
        while not (status := client.get_job_status(submission_id)).is_terminal():
            if time.monotonic() > deadline:
                client.stop_job(submission_id)
                break
            time.sleep(1)
        if status != JobStatus.SUCCEEDED:
            info = client.get_job_info(submission_id)
            ended = "is still" if not status.is_terminal() else "ended"
            pytest.fail(
                f"job {submission_id} {ended} {status.value} after {timeout:.0f}s at most: "
                f"{info.message}\n--- job logs:\n{client.get_job_logs(submission_id)}\n"
                f"{self.procs.dump()}"
            )


@pytest.fixture(scope="module")
def cluster():
    """One cluster for the module's tests (starting one takes about 25 s on 2 cores): each test
    submits its own job, logs to its own experiment and checkpoints in its own tmp_path."""
    # A short path: Ray's Unix sockets live under <temp-dir>/session_*/sockets/ and a socket
    # path must stay under 108 bytes, which pytest's tmp_path can exceed.
    root = Path(tempfile.mkdtemp(prefix="fsc-", dir="/tmp" if os.path.isdir("/tmp") else None))
    cluster = Cluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        survivors = cluster.procs.stop()
        shutil.rmtree(root, ignore_errors=True)
        assert not survivors, f"processes outlived the teardown: {survivors}"


@pytest.mark.slow  # two Ray nodes, an MLflow server and a job: about a minute
@pytest.mark.timeout(JOB_TIMEOUT_S + 3 * START_TIMEOUT_S)
def test_fedsim_job_on_two_nodes_logs_to_the_mlflow_server(cluster, tiny_overrides, tmp_path):
    from mlflow.tracking import MlflowClient

    overrides = [
        *tiny_overrides,  # the tiny model, and data.cache_dir: no actor renders the font
        "clients.num=4",
        "clients.ranks=[8,8,4,4]",
        "clients.fraction=1.0",
        "rounds=1",
        "tracking.plots=false",
        "tracking.system_metrics_interval_s=1",
        f"tracking.uri={cluster.mlflow}",
        f"tracking.experiment={EXPERIMENT}",
    ]
    # Token auth is on: without the token, or with another one, the job server refuses.
    for headers in ({}, {"Authorization": f"Bearer {uuid.uuid4().hex}"}):
        request = urllib.request.Request(f"{cluster.dashboard}/api/jobs/", headers=headers)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code in (401, 403), headers
    # The driver reaches MLflow only once its actors are up (MLflow's client also retries),
    # so the server may finish starting while the job starts.
    job = cluster.submit([sys.executable, "-m", "fedsim", "run", *overrides])
    cluster.wait_for_mlflow()
    cluster.wait_for_job(job)

    client = MlflowClient(tracking_uri=cluster.mlflow)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None, "the job created no MLflow experiment on the server"
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "global/accuracy")
    assert sorted(m.step for m in history) == [0, 1]

    path = client.download_artifacts(run.info.run_id, "clients/round_0001.json", str(tmp_path))
    table = json.loads(Path(path).read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert sorted(r["client_id"] for r in rows) == [0, 1, 2, 3]
    assert all(r["status"] == "ok" for r in rows)
    used = {r["node_id"] for r in rows}
    assert used == cluster.node_ids, f"clients trained on {used}, the nodes are {cluster.node_ids}"
    # system metrics of both nodes, each under its own label (the driver's node included)
    run = client.get_run(run.info.run_id)
    cpu = [k for k in run.data.metrics if k.endswith("/cpu_utilization_percentage")]
    labels = {k.split("/")[1] for k in cpu}
    assert len(labels) == 2 and all(k.count("/") == 2 for k in cpu), cpu


def test_relative_outputs_under_a_job_with_a_working_dir_are_named():
    from fedsim.config import load_config
    from fedsim.simulation.run import ephemeral_paths

    job = {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {"working_dir": "gcs://p"}})}
    default = REPO / "experiments" / "default.yaml"

    def keys(*overrides, environ=job):
        return ephemeral_paths(load_config(default, list(overrides)), environ)

    assert keys() == ["checkpoint.dir", "tracking.uri"]  # runs/ and sqlite:///mlflow.db
    assert keys("tracking.uri=mlruns", "checkpoint.dir=/data/runs") == ["tracking.uri"]
    assert keys("tracking.uri=sqlite:////data/mlflow.db", "checkpoint.dir=/data/runs") == []
    assert keys("tracking.uri=http://127.0.0.1:5000", "checkpoint.every=0") == []
    assert keys("tracking.uri=file:///data/mlruns", "checkpoint.dir=/data/runs") == []
    assert keys("tracking.uri=databricks", "checkpoint.dir=/data/runs") == []
    # outside a job, or a job without a working_dir, relative paths are the user's own
    assert keys(environ={}) == []
    no_dir = {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {}})}
    assert keys(environ=no_dir) == []


def _checkpointed_round(runs: Path) -> int:
    """The round the run's ``latest.json`` names (-1 before the first checkpoint)."""
    for pointer in runs.glob("*/latest.json"):
        try:
            return json.loads(pointer.read_text())["round"]
        except (OSError, ValueError, KeyError):
            return -1  # being replaced
    return -1


@pytest.mark.slow  # two Ray nodes, an MLflow server, a job stopped mid-run and its resume: ~3 min
@pytest.mark.timeout(JOB_TIMEOUT_S + 3 * START_TIMEOUT_S)
def test_ray_job_stop_marks_the_run_killed_and_prints_the_resume_line(
    cluster, tiny_overrides, tmp_path
):
    """`ray job stop` sends the driver SIGTERM (and SIGKILL RAY_JOB_STOP_WAIT_TIME_S later, 3 s
    by default): fedsim marks its MLflow run KILLED and prints the resume line within that, and
    the checkpoint it left continues the same MLflow run."""
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobStatus, JobSubmissionClient

    import fedsim
    from actors.executor import LocalExecutor
    from fedsim.checkpoint.disk import load_checkpoint

    runs = tmp_path / "runs"
    overrides = [
        *tiny_overrides,
        "clients.num=4",
        "clients.ranks=[8,8,4,4]",
        "clients.fraction=1.0",
        "rounds=500",  # it is stopped long before
        f"checkpoint.dir={runs}",
        f"tracking.uri={cluster.mlflow}",
        f"tracking.experiment={EXPERIMENT}-stop",
    ]
    job = cluster.submit([sys.executable, "-m", "fedsim", "run", *overrides])
    cluster.wait_for_mlflow()
    jobs = JobSubmissionClient(cluster.dashboard, headers=cluster.auth_header)

    def checkpointed() -> bool:
        status = jobs.get_job_status(job)
        if status.is_terminal():
            pytest.fail(f"job ended {status.value} before round 1:\n{jobs.get_job_logs(job)}")
        return _checkpointed_round(runs) >= 1

    _wait("round 1's checkpoint", checkpointed, cluster.procs, ("ray-head",), JOB_TIMEOUT_S)
    stop = subprocess.run(
        [*_cli("ray"), "job", "stop", f"--address={cluster.dashboard}", job],
        env=cluster.procs.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert stop.returncode == 0, f"{stop.stdout}\n{stop.stderr}"
    assert jobs.get_job_status(job) == JobStatus.STOPPED
    logs = jobs.get_job_logs(job)
    (run_dir,) = runs.iterdir()
    hint = f"fedsim: warning: the run stopped; continue it with: fedsim run --resume {run_dir}"
    assert hint in logs, logs
    assert "SIGTERM received" not in logs and "Traceback" not in logs, logs

    client = MlflowClient(tracking_uri=cluster.mlflow)
    run = client.get_run(run_dir.name)
    assert run.info.status == "KILLED"
    # the checkpoint it left continues the same MLflow run (in this process: no Ray needed)
    done = load_checkpoint(run_dir).round
    result = fedsim.resume(run_dir, [f"rounds={done + 1}"], executor=LocalExecutor(), quiet=True)
    assert result.run_id == run.info.run_id
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "time/round_s")}
    assert steps == set(range(done + 2))


@pytest.mark.slow  # two Ray nodes, an MLflow server and a study job of two runs: about a minute
@pytest.mark.timeout(JOB_TIMEOUT_S + 3 * START_TIMEOUT_S)
def test_a_study_runs_two_runs_at_once_across_both_nodes(cluster, tiny_overrides, tmp_path):
    """``parallel: 2`` on the two one-CPU nodes: each run's pool is capped at one actor, the
    two runs train at the same time, and between them they use both nodes."""
    import yaml
    from mlflow.tracking import MlflowClient

    experiment = f"{EXPERIMENT}-study"
    (tmp_path / "base.yaml").write_text("rounds: 1\n")
    study = {
        "base": "base.yaml",
        "overrides": [
            *tiny_overrides,
            "clients.num=4",
            "clients.ranks=[8,8,4,4]",
            "clients.fraction=1.0",
            "rounds=2",
            f"checkpoint.dir={tmp_path / 'runs'}",
            f"tracking.uri={cluster.mlflow}",
            f"tracking.experiment={experiment}",
        ],
        "seeds": [0],
        "variants": {"fedilora": [], "zeropad": ["aggregation.method=zeropad"]},
        "output": str(tmp_path / "table.md"),
        "parallel": 2,
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    job = cluster.submit([sys.executable, "-m", "fedsim", "compare", str(path)])
    cluster.wait_for_mlflow()
    cluster.wait_for_job(job)
    assert "| zeropad |" in (tmp_path / "table.md").read_text()

    client = MlflowClient(tracking_uri=cluster.mlflow)
    exp = client.get_experiment_by_name(experiment)
    runs = [
        r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("mlflow.parentRunId")
    ]
    assert sorted(r.info.run_name for r in runs) == ["fedilora seed=0", "zeropad seed=0"]
    assert all(r.info.status == "FINISHED" for r in runs)
    first, second = sorted(runs, key=lambda r: r.info.start_time)
    assert second.info.start_time < first.info.end_time, "the two runs did not overlap"
    used = set()
    for run in runs:
        local = client.download_artifacts(
            run.info.run_id, "clients/round_0001.json", str(tmp_path / run.info.run_id)
        )
        table = json.loads(Path(local).read_text())
        used |= {dict(zip(table["columns"], row))["node_id"] for row in table["data"]}
    assert used == cluster.node_ids, f"the runs trained on {used}, the nodes are {cluster.node_ids}"
