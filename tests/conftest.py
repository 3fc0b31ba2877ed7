"""Shared fixtures: a session emoji cache, tiny configs, a local Ray and an MLflow store.

Everything heavy is built once per session: the 16 px emoji cache (every test and every Ray
actor reads the same directory, so no actor ever renders the font) and the local Ray cluster.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from fedsim.config import FedSimConfig, load_config

IMAGE_SIZE = 16


# the benchmarks' slow tests: their Ray cases join the session's Ray and need its CPUs
# (ray_address_for_actors releases the warm pool), so they go first, while no pool is warm yet
FIRST_FILES = (
    "tests/experiments/test_bench_vlm.py",
    "tests/experiments/test_bench_scale.py",
    "tests/experiments/test_bench_startup.py",
)

# the files that take longest (whole runs, subprocesses), longest first, as measured with
# --durations=0 on 2 idle cores: the two xdist workers start on these (after FIRST_FILES)
LONGEST_FILES = (
    "tests/actors/test_faults.py",
    "tests/actors/test_warm_pool.py",
    "tests/fedsim/simulation/test_resume.py",
    "tests/fedsim/bad_inputs/test_faults_mid_run.py",
    "tests/fedsim/test_console.py",
    "tests/fedsim/models/test_vlm_demo.py",
    "tests/cluster/test_cluster.py",
    "tests/fedsim/methods/test_fedex_method.py",
    "tests/fedsim/test_vlm_run.py",
    "tests/test_packaging.py",
    "tests/fedsim/simulation/test_streaming_engine.py",
    "tests/fedsim/simulation/test_scale.py",
    "tests/fedsim/bad_inputs/test_run_inputs.py",
    "tests/actors/test_executor.py",
    "tests/test_docs_site.py",
    "tests/fedsim/methods/test_attack_method.py",
    "tests/fedsim/test_default_backbone_run.py",
    "tests/actors/test_placement.py",
    "tests/fedsim/simulation/test_study_parallel.py",
    "tests/fedsim/simulation/test_integration.py",
    "tests/fedsim/methods/test_methods_composed.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """``FIRST_FILES``, then the longest files (``LONGEST_FILES``), then the files with the
    most slow tests; each file's tests keep their order.

    The suite runs on pytest-xdist workers, a file at a time each (``--dist loadfile``, so a
    module's fixtures are built once): handing out the long files first keeps one worker from
    finishing a long file alone at the end. The order changes no result.
    """
    slow: dict[str, int] = {}
    for item in items:
        path = item.nodeid.split("::")[0]
        slow[path] = slow.get(path, 0) + (item.get_closest_marker("slow") is not None)

    ordered = FIRST_FILES + LONGEST_FILES

    def rank(item: pytest.Item) -> tuple[int, int]:
        path = item.nodeid.split("::")[0]
        if path in ordered:
            return (ordered.index(path), 0)
        return (len(ordered), -slow[path])

    items.sort(key=rank)


@pytest.fixture(scope="session", autouse=True)
def _offline_hub():
    """Tests never reach the Hugging Face Hub: every model they build is local."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session", autouse=True)
def _no_tracking_server():
    """Tests never log to the MLflow store of the developer's environment: a config without
    tracking.uri resolves to ./mlflow.db, whatever MLFLOW_TRACKING_URI says outside."""
    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    if saved is not None:
        os.environ["MLFLOW_TRACKING_URI"] = saved


@pytest.fixture(scope="session")
def emoji_cache(tmp_path_factory) -> Path:
    """A cache directory holding the 16 px emoji dataset, built once for the session."""
    from fedsim.data.emoji import load_emoji

    root = tmp_path_factory.mktemp("fedsim-cache")
    load_emoji(IMAGE_SIZE, "group", root)
    return root


@pytest.fixture(scope="session")
def tiny_overrides(emoji_cache, tmp_path_factory) -> list[str]:
    """Dotlist overrides that make a config fast: tiny backbone, 16 px, 300 rows, 2 steps,
    no plots.

    Checkpoints go to a session temp dir, never into the working directory.
    """
    return [
        f"checkpoint.dir={tmp_path_factory.mktemp('runs')}",
        "model.backbone=tiny",
        "model.head_hidden=32",
        f"data.image_size={IMAGE_SIZE}",
        "data.subset=300",
        "data.min_per_client=5",
        f"data.cache_dir={emoji_cache}",
        "train.max_local_steps=2",
        "train.batch_size=16",
        "train.eval_batch_size=32",
        "clients.num=6",
        "clients.ranks=[8,8,4,4,2,2]",
        "clients.fraction=0.5",
        "rounds=2",
        "progress=false",
        # matplotlib's layout costs about a second a run; the tests of the plots turn them on
        "tracking.plots=false",
    ]


@pytest.fixture(scope="session")
def make_config(tiny_overrides) -> Callable[..., FedSimConfig]:
    """``make_config("rounds=3", ...)``: the tiny config with further dotlist overrides."""

    def make(*overrides: str) -> FedSimConfig:
        return load_config(None, [*tiny_overrides, *overrides])

    return make


@pytest.fixture(scope="module")
def restore_threads():
    """A ``ClientWorker`` sets torch's thread count for its process; put it back afterwards.

    Modules that build workers in-process use it (``pytestmark`` or a fixture argument).
    """
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster with 2 CPUs for every test that needs Ray."""
    import ray

    if ray.is_initialized():  # pragma: no cover - another plugin started it
        yield ray
        return
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        logging_level="ERROR",
        log_to_driver=False,
        runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
    )
    yield ray
    ray.shutdown()


@pytest.fixture
def ray_address(ray_cluster, monkeypatch) -> str:
    """The session cluster's address, also in ``RAY_ADDRESS``: for a ``fedsim`` command (in
    this process or another) that joins Ray but stops before any client actor starts, so it
    neither starts a Ray of its own nor needs the warm pool's CPUs (the pool stays)."""
    address = ray_cluster.get_runtime_context().gcs_address
    monkeypatch.setenv("RAY_ADDRESS", address)
    return address


@pytest.fixture
def ray_address_for_actors(ray_address) -> str:
    """The session cluster's address (as ``ray_address``) for another process that joins it
    and starts client actors of its own, such as a benchmark's case: the warm pool's actors go
    first, so that the cluster's CPUs are free for them. It saves that process a Ray start."""
    if _WARM:
        _WARM[0].release()
    return ray_address


@pytest.fixture(scope="session")
def warm_ray(ray_cluster):
    """A Ray executor that keeps its client actors between runs (the session's warm pool).

    Runs that are not about starting actors take it: each reuses the previous run's actor
    processes when it needs as many actors with the same resources, instead of paying an
    actor's start-up (its imports) again. ``tests/actors/test_warm_pool.py`` checks that the
    numbers are those of fresh actors.
    """
    from actors.executor import RayExecutor

    with RayExecutor(keep_actors=True) as executor:
        _WARM.append(executor)
        yield executor
        _WARM.clear()


_WARM: list = []


@pytest.fixture
def warm_cli(warm_ray, monkeypatch):
    """``fedsim run`` through :func:`fedsim.cli.main` runs on the session's warm pool.

    The command line builds a ``RayExecutor`` of its own (new actors, stopped at the end);
    here it is handed the warm pool instead, so a test about what the command prints or
    records does not pay the actors' start-up. Tests about starting or stopping Ray do not
    take it.
    """
    import actors.executor
    import fedsim.simulation.run  # noqa: F401 - before the patch: it keeps the real class

    monkeypatch.setattr(actors.executor, "RayExecutor", lambda *args, **kwargs: warm_ray)
    return warm_ray


@pytest.fixture(autouse=True)
def _free_warm_actors(request):
    """A test that takes ``ray_cluster`` but not ``warm_ray`` may start client actors of its
    own: it gets the cluster's CPUs, and the kept actors go.

    Every other test leaves the pool warm (a test that starts actors on the session's Ray
    takes ``ray_cluster``), so the next test on the pool does not pay the actors' start-up
    again.
    """
    names = request.fixturenames
    if _WARM and "ray_cluster" in names and not {"warm_ray", "ray_address"} & set(names):
        _WARM[0].release()


@pytest.fixture(scope="session")
def new_mlflow_db(tmp_path_factory) -> Callable[[Path], str]:
    """``new_mlflow_db(directory)``: the SQLite URI of a new, empty MLflow store there.

    MLflow builds a new store's schema by running its migrations, seconds each time; the
    session builds one store that way and each new store is a copy of its file (the same
    bytes MLflow would write: the tests that create a store through fedsim still do).
    """
    from mlflow.tracking import MlflowClient

    template = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{template}").search_experiments()

    def new(directory: Path) -> str:
        import shutil

        path = Path(directory) / "mlflow.db"
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, path)
        return f"sqlite:///{path}"

    return new


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory, new_mlflow_db) -> Callable[[str], str]:
    """``mlflow_store(experiment)``: a SQLite URI whose experiment keeps artifacts in tmp.

    The experiment is created up front with an artifact location under the temp dir, so a
    run never writes ``./mlruns`` into the working directory.
    """
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = new_mlflow_db(root)
    client = MlflowClient(tracking_uri=uri)

    def experiment(name: str) -> str:
        if client.get_experiment_by_name(name) is None:
            client.create_experiment(name, artifact_location=(root / name).as_uri())
        return uri

    return experiment


@pytest.fixture(scope="module")
def experiment_config(make_config, mlflow_store) -> Callable[[str], Callable[..., FedSimConfig]]:
    """``experiment_config(name)("rounds=3", ...)``: tiny configs logging to experiment ``name``
    of the module's MLflow store."""

    def for_experiment(name: str) -> Callable[..., FedSimConfig]:
        def build(*overrides: str) -> FedSimConfig:
            uri = mlflow_store(name)
            return make_config(f"tracking.uri={uri}", f"tracking.experiment={name}", *overrides)

        return build

    return for_experiment
