"""fedsim on a real two-node Ray cluster through `ray job submit`, tracked by a real MLflow server.

The integration test starts, on this machine, what a cluster deployment runs: a Ray head node
with its dashboard (the job server), a second Ray node, and an MLflow tracking server. It
submits `python -m fedsim run ...` with the `cluster/runtime_env.yaml` the README documents,
waits for the job, then reads the run back from the server: finished, metrics at rounds 0 and
1, and a per-client table whose `node_id` column names both Ray nodes.

Every process is started in its own session and stopped by process group (SIGTERM, then
SIGKILL) with its whole process tree, never with `ray stop`, which would stop every Ray
instance on the machine. Ray's files live in a short temp dir (Unix socket paths must stay
under 108 bytes) that is removed at the end; the teardown fails the test if any process of
ours survives.

The other tests check that the deployment files in cluster/ parse, match the schemas their
tools enforce, and compose with fedsim's own runtime env and config.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
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
    import fedsim.simulation as simulation

    captured: dict = {}
    monkeypatch.setattr(simulation.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(simulation.ray, "init", lambda **kw: captured.update(kw))
    simulation.init_ray()
    return captured.get("runtime_env") or {}


def _entrypoint_config(entrypoint: str):
    """The fedsim config an entrypoint ``python -m fedsim run CONFIG overrides...`` resolves."""
    from fedsim.config import load_config

    argv = shlex.split(entrypoint)
    assert argv[:4] == ["python", "-m", "fedsim", "run"], entrypoint
    path, overrides = argv[4], argv[5:]
    return load_config(REPO / path, overrides)


def test_runtime_env_ships_the_project_and_composes_with_the_driver(monkeypatch):
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
    from ray.runtime_env import RuntimeEnv
    from ray.runtime_env.runtime_env import _merge_runtime_env

    path = CLUSTER / "runtime_env.yaml"
    # exactly what `ray job submit --runtime-env cluster/runtime_env.yaml` does with the file
    env = parse_runtime_env_args(runtime_env=str(path))
    RuntimeEnv(**env)  # Ray's own validation of every field
    assert env["working_dir"] == "."
    for pattern in (".git", ".venv", "mlflow.db", "mlruns", "runs", "checkpoints", "*.png"):
        assert pattern in env["excludes"], pattern
    # Ray merges the job's runtime env with the one fedsim's driver passes to ray.init; a
    # variable set by both is a conflict that fails the job before it starts.
    driver = _driver_runtime_env(monkeypatch)
    assert driver.get("env_vars"), "fedsim's init_ray no longer sets env vars: update this test"
    assert _merge_runtime_env(RuntimeEnv(**env), RuntimeEnv(**driver)) is not None, (
        f"cluster/runtime_env.yaml env_vars {env.get('env_vars')} clash with fedsim's "
        f"{driver['env_vars']}"
    )


def test_cluster_launcher_config_passes_ray_up_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _load("ray-cluster.yaml")
    config = prepare_config(raw)  # what `ray up` does before launching anything
    validate_config(config)  # Ray's JSON schema of a cluster config
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert workers and all(t["min_workers"] >= 1 for t in workers)
    assert "fedsim" in " ".join(config["setup_commands"])
    assert "." in config["file_mounts"].values()


def test_rayjob_runs_a_valid_fedsim_command_on_a_gpu_cluster(monkeypatch):
    from ray.runtime_env import RuntimeEnv
    from ray.runtime_env.runtime_env import _merge_runtime_env

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
    assert _merge_runtime_env(RuntimeEnv(**env), RuntimeEnv(**driver)) is not None
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


def _cli(name: str) -> list[str]:
    """The console script beside this interpreter, else its module form."""
    exe = Path(sys.executable).parent / name
    if exe.exists():
        return [str(exe)]
    module = {"ray": "ray.scripts.scripts", "mlflow": "mlflow"}[name]
    return [sys.executable, "-m", module]


def _tail(path: Path, n: int = 60) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"<{path}: {exc}>"
    return "\n".join(lines[-n:])


class Processes:
    """Processes started in their own sessions, stopped with their whole process trees."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root = root
        self.env = env
        self.started: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}

    def start(self, name: str, argv: list[str], cwd: Path | None = None) -> subprocess.Popen:
        log = self.root / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=cwd or self.root,
                env=self.env,
                start_new_session=True,
            )
        self.started[name] = proc
        self.logs[name] = log
        return proc

    def check_alive(self, name: str) -> None:
        proc = self.started[name]
        if proc.poll() is not None:
            pytest.fail(f"{name} exited with {proc.returncode}:\n{_tail(self.logs[name])}")

    def dump(self) -> str:
        parts = [f"--- {name} ({self.logs[name]}) ---\n{_tail(self.logs[name])}" for name in self.logs]
        for pattern in ("raylet.out", "gcs_server.out", "dashboard.log", "job-driver-*.log"):
            for path in sorted(self.root.glob(f"*/session_latest/logs/{pattern}")):
                parts.append(f"--- {path} ---\n{_tail(path, 30)}")
        return "\n".join(parts)

    def _ours(self) -> set[psutil.Process]:
        """Every live process we started, their descendants, and anything running in our dir."""
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
            cmd = " ".join(p.info["cmdline"] or [])
            if root in cmd or (p.info["cwd"] or "").startswith(root):
                found.add(p)
        return {p for p in found if p.pid != os.getpid()}

    def stop(self) -> list[str]:
        """SIGTERM every process group and tree we started, then SIGKILL; returns survivors."""
        procs = self._ours()
        for proc in self.started.values():
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        for p in procs:
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(list(procs), timeout=15)
        for p in alive:
            try:
                print("DEBUG alive after SIGTERM:", p.pid, p.name(), " ".join(p.cmdline())[:150])
            except psutil.Error:
                pass
        for _ in range(3):  # SIGKILL what is left, and whatever it spawned meanwhile
            alive = set(alive) | self._ours()
            if not alive:
                break
            for proc in self.started.values():
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            for p in alive:
                try:
                    p.kill()
                except psutil.Error:
                    pass
            _, alive = psutil.wait_procs(list(alive), timeout=10)
        for proc in self.started.values():
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


def _nodes(dashboard: str, token: str) -> list[dict]:
    """The cluster's nodes from the dashboard's state API (node_id, state, ...)."""
    request = urllib.request.Request(
        f"{dashboard}/api/v0/nodes?limit=100", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        body = json.load(resp)
    return body["data"]["result"]["result"]


def _wait(what: str, check, timeout: float, procs: Processes, names: list[str]):
    """Poll ``check()`` until it returns a truthy value; fail with logs after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        for name in names:
            procs.check_alive(name)
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(1)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})\n{procs.dump()}")


@pytest.fixture
def cluster():
    """A Ray head (with dashboard and job server), a second Ray node and an MLflow server."""
    # Short path: Ray's Unix sockets live under <temp-dir>/session_*/sockets/.
    root = Path(tempfile.mkdtemp(prefix="fsc-", dir="/tmp"))
    gcs, dash, client, agent_head, agent_worker, mlflow_port = _free_ports(6)
    # Token authentication, with a token of our own: what Ray >= 2.52 runs with when
    # RAY_AUTH_MODE=token, and independent of any ~/.ray/auth_token on this machine.
    token = uuid.uuid4().hex + uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    procs = Processes(root, env)
    t0 = time.monotonic()
    common = [
        "--block",
        "--node-ip-address=127.0.0.1",
        "--num-cpus=1",
        "--num-gpus=0",
        "--object-store-memory=100000000",
        "--min-worker-port=0",  # random worker ports: never collide with another Ray here
        "--max-worker-port=0",
        "--disable-usage-stats",
    ]
    try:
        procs.start(
            "mlflow-server",
            [
                *_cli("mlflow"),
                "server",
                "--backend-store-uri",
                f"sqlite:///{root / 'mlflow.db'}",
                "--artifacts-destination",
                str(root / "mlartifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(mlflow_port),
                "--workers",
                "1",
            ],
        )
        procs.start(
            "ray-head",
            [
                *_cli("ray"),
                "start",
                "--head",
                f"--port={gcs}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash}",
                f"--dashboard-agent-listen-port={agent_head}",
                f"--ray-client-server-port={client}",
                f"--temp-dir={root / 'head'}",
                *common,
            ],
        )
        dashboard = f"http://127.0.0.1:{dash}"

        def alive_nodes():
            return [n for n in _nodes(dashboard, token) if n["state"] == "ALIVE"]

        _wait("the Ray head node", alive_nodes, START_TIMEOUT_S, procs, ["ray-head"])
        print(f"[{time.monotonic() - t0:5.1f}s] head node up")
        procs.start(
            "ray-worker",
            [
                *_cli("ray"),
                "start",
                f"--address=127.0.0.1:{gcs}",
                f"--dashboard-agent-listen-port={agent_worker}",
                f"--temp-dir={root / 'worker'}",
                *common,
            ],
        )
        nodes = _wait(
            "two alive Ray nodes",
            lambda: (lambda ns: ns if len(ns) == 2 else None)(alive_nodes()),
            START_TIMEOUT_S,
            procs,
            ["ray-head", "ray-worker"],
        )
        print(f"[{time.monotonic() - t0:5.1f}s] two nodes up")
        mlflow_uri = f"http://127.0.0.1:{mlflow_port}"

        def mlflow_up():
            with urllib.request.urlopen(f"{mlflow_uri}/health", timeout=5) as resp:
                return resp.status == 200

        _wait("the MLflow server", mlflow_up, START_TIMEOUT_S, procs, ["mlflow-server"])
        print(f"[{time.monotonic() - t0:5.1f}s] MLflow server up")
        yield {
            "dashboard": dashboard,
            "mlflow": mlflow_uri,
            "node_ids": {n["node_id"] for n in nodes},
            "token": token,
            "procs": procs,
            "root": root,
        }
    finally:
        t1 = time.monotonic()
        survivors = procs.stop()
        print(f"teardown took {time.monotonic() - t1:.1f}s")
        shutil.rmtree(root, ignore_errors=True)
        assert not survivors, f"processes survived the teardown: {survivors}"


def _submit(cluster, entrypoint: list[str]) -> str:
    """``ray job submit --no-wait`` with the README's runtime env; retried while the job
    server's agent starts. Returns the submission id."""
    submission_id = f"fedsim-cluster-test-{uuid.uuid4().hex[:8]}"
    argv = [
        *_cli("ray"),
        "job",
        "submit",
        "--address",
        cluster["dashboard"],
        "--runtime-env",
        "cluster/runtime_env.yaml",
        "--submission-id",
        submission_id,
        "--no-wait",
        "--",
        *entrypoint,
    ]
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        out = subprocess.run(
            argv,
            cwd=REPO,
            env=cluster["procs"].env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if out.returncode == 0:
            return submission_id
        if time.monotonic() > deadline:
            pytest.fail(
                f"ray job submit failed ({out.returncode}):\n{out.stdout}\n{out.stderr}\n"
                f"{cluster['procs'].dump()}"
            )
        time.sleep(2)


def _wait_for_job(cluster, submission_id: str) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(
        cluster["dashboard"], headers={"Authorization": f"Bearer {cluster['token']}"}
    )
    deadline = time.monotonic() + JOB_TIMEOUT_S
    status = None
    while time.monotonic() < deadline:
        status = client.get_job_status(submission_id)
        if status.is_terminal():
            break
        time.sleep(2)
    else:
        client.stop_job(submission_id)
    if status != JobStatus.SUCCEEDED:
        info = client.get_job_info(submission_id)
        pytest.fail(
            f"job {submission_id} ended {status} ({info.message}) after "
            f"{'timeout' if not status.is_terminal() else 'running'}; its logs:\n"
            f"{client.get_job_logs(submission_id)}\n{cluster['procs'].dump()}"
        )


def test_fedsim_job_on_two_nodes_logs_to_the_mlflow_server(cluster, tiny_overrides, tmp_path):
    from mlflow.tracking import MlflowClient

    overrides = [
        *tiny_overrides,
        "clients.num=4",
        "clients.ranks=[8,8,4,4]",
        "clients.fraction=1.0",
        "rounds=1",
        "tracking.plots=false",
        f"tracking.uri={cluster['mlflow']}",
        f"tracking.experiment={EXPERIMENT}",
    ]
    started = time.monotonic()
    submission_id = _submit(cluster, [sys.executable, "-m", "fedsim", "run", *overrides])
    _wait_for_job(cluster, submission_id)
    print(f"job {submission_id} succeeded in {time.monotonic() - started:.1f}s")
    from ray.job_submission import JobSubmissionClient
    print(JobSubmissionClient(cluster["dashboard"], headers={"Authorization": f"Bearer {cluster['token']}"}).get_job_logs(submission_id))

    client = MlflowClient(tracking_uri=cluster["mlflow"])
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None, "the job created no MLflow experiment on the server"
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "global/accuracy"))
    assert steps == [0, 1]

    local = client.download_artifacts(run.info.run_id, "clients/round_0001.json", str(tmp_path))
    table = json.loads(Path(local).read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert sorted(r["client_id"] for r in rows) == [0, 1, 2, 3]
    assert all(r["status"] == "ok" for r in rows)
    used = {r["node_id"] for r in rows}
    assert used == cluster["node_ids"], (
        f"clients trained on nodes {used}, the cluster's nodes are {cluster['node_ids']}"
    )
