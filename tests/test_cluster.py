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
    # Ray merges the job's runtime env with any runtime env the driver passes to ray.init; a
    # variable set by both is a conflict that fails the job before it starts. fedsim's driver
    # passes none, so whatever a user's job sets is kept.
    driver = _driver_runtime_env(monkeypatch)
    assert not driver, f"init_ray passes a runtime_env {driver} that can clash with a job's"
    assert _merge_runtime_env(RuntimeEnv(**env), RuntimeEnv(**driver)) is not None


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


@pytest.fixture
def cluster():
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
        f"tracking.uri={cluster.mlflow}",
        f"tracking.experiment={EXPERIMENT}",
    ]
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


def test_relative_outputs_under_a_job_with_a_working_dir_are_named():
    from fedsim.config import load_config
    from fedsim.simulation import ephemeral_paths

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
