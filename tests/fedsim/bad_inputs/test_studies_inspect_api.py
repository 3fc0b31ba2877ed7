"""Bad input to studies, ``fedsim inspect`` and the Python API, as a hostile but realistic
user brings it (issue 27, item 3): YAML that expands or nests without end, grids of 100,000
cells, an ``output:`` that is a directory, ``base: /etc/passwd``; stores that are no SQLite
file, an empty file, a file store, a server that never answers; damaged diagnostics; and API
calls with a string where a list goes, a number where a path goes, ranks as strings, meta
tensors.

Each is refused in seconds with one line (or one exception) naming the culprit, and leaves
nothing behind: no checkpoint directory, no MLflow run, and a store inspect reads is not
changed by a byte. The command-line cases run in-process and start no Ray (compare and sweep
refuse before their first run; inspect never needs it).
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

import fedsim
from aggregation import UpdateRejected, get_merger, merge_lora_state_dicts
from fedsim.cli import main
from fedsim.config import ConfigError, load_config
from fedsim.config.yaml_file import MAX_BYTES, MAX_DEPTH
from fedsim.simulation.study import MAX_RUNS, StudyConfig, grid_cells, load_study, run_study
from fedsim.tracking.merge_report import inspect_run

# Nine lines that expand to 9**9 (387 million) strings once a loader copies the aliases.
BOMB = "".join(
    f"{name}: &{name} [{', '.join([f'*{prev}'] * 9) if prev else ', '.join(['x'] * 9)}]\n"
    for prev, name in zip([None, *"abcdefgh"], "abcdefghi")
)
STUDY = "base: default\nvariants: {a: []}\nseeds: [0]\n"


@pytest.fixture
def refuses(capsys, workdir, no_partial_state):
    """``refuses(argv, culprit)``: the command exits 2 within ``seconds`` with one line naming
    ``culprit`` and leaves nothing in ``workdir``; for commands that start no Ray."""

    def check(argv: list[str], culprit: str, seconds: float = 5.0) -> str:
        start = time.perf_counter()
        status = main(argv)
        took = time.perf_counter() - start
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert status == 2, f"exit {status}, stderr: {err}"
        assert "Traceback" not in err, err
        assert len(lines) == 1 and lines[0].startswith("fedsim: "), err
        assert culprit in lines[0], f"{culprit!r} not named in: {lines[0]}"
        assert took < seconds, f"took {took:.1f} s: {lines[0]}"
        no_partial_state(workdir)
        return lines[0]

    return check


def _write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


# --- YAML within limits: configs and studies alike -----------------------------------------

YAMLS = {
    "alias-bomb": (BOMB, "once its aliases are expanded"),
    "recursive-alias": ("a: &a [1, *a]\n", "repeats its own anchor"),
    "deep-flow": ("a: " + "[" * (MAX_DEPTH + 5) + "]" * (MAX_DEPTH + 5) + "\n", "deep"),
    "deep-block": ("".join("  " * i + f"k{i}:\n" for i in range(MAX_DEPTH + 5)) + "\n", "deep"),
    # libyaml stops at its own nesting limit first, PyYAML's Python parser at fedsim's
    "very-deep": ("a: " + "[" * 100_000 + "\n", "line 1"),
    "too-large": ("# " + "x" * MAX_BYTES + "\n", "larger than 1 MiB"),
    "two-documents": ("seed: 1\n---\nseed: 2\n", "several YAML documents"),
    "a-scalar": ("root:x:0:0:root:/root:/bin/bash\n", "not a single value"),
}


@pytest.mark.parametrize("kind", list(YAMLS))
@pytest.mark.parametrize("command", ["config", "compare"])
def test_yaml_over_the_limits_is_refused_at_once(refuses, workdir, command, kind):
    content, problem = YAMLS[kind]
    path = _write(workdir / f"{kind}.yaml", content)
    line = refuses([command, str(path)], problem, seconds=2.0)
    key = "config" if command == "config" else "study"
    assert line.startswith(f"fedsim: config error: {key}: ") and str(path) in line


def test_load_config_refuses_an_alias_bomb_through_the_api(workdir):
    path = _write(workdir / "bomb.yaml", BOMB)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="once its aliases are expanded") as info:
        load_config(path)
    assert info.value.key == "config" and time.perf_counter() - start < 2


def test_a_study_within_the_limits_still_loads(workdir):
    # the shipped studies, and a copy with anchors and aliases, load as before
    path = _write(
        workdir / "study.yaml",
        "base: default\noverrides: &all [rounds=1]\nvariants: {a: *all, b: *all}\n",
    )
    study, base = load_study(path)
    assert study.variants == {"a": ["rounds=1"], "b": ["rounds=1"]}
    assert base.name == "default.yaml"


# --- a study's base experiment ------------------------------------------------------------

BASES = {
    # the content of the file is never shown (/etc/passwd was printed as the culprit)
    "passwd": ("passwd", "root:x:0:0:root:/root:/bin/bash\nbin:x:2:2::/bin:/sbin/nologin\n"),
    "alias-bomb": ("bomb.yaml", BOMB),
    "binary": ("model.bin", b"\x7fELF\x02\x01\x01\x00\xd0\xff\xfe"),
    "a-study": ("other.yaml", STUDY),
    "a-list": ("list.yaml", "- rounds: 1\n"),
    "directory": ("subdir", None),
    "empty-name": ("", None),
}


@pytest.mark.parametrize("kind", list(BASES))
def test_a_bad_base_names_base(refuses, workdir, kind):
    name, content = BASES[kind]
    if content is not None:
        _write(workdir / name, content)
    elif name:
        (workdir / name).mkdir()
    study = _write(workdir / "study.yaml", f"base: '{name}'\nvariants: {{a: []}}\nseeds: [0]\n")
    line = refuses(["compare", str(study)], "base")
    assert line.startswith("fedsim: config error: base: "), line
    assert "root:x" not in line and "nologin" not in line


def test_base_etc_passwd(refuses, workdir):
    if not Path("/etc/passwd").is_file():
        pytest.skip("no /etc/passwd here")
    study = _write(workdir / "study.yaml", "base: /etc/passwd\nvariants: {a: []}\n")
    line = refuses(["sweep", str(study)], "/etc/passwd")
    assert line.startswith("fedsim: config error: base: ") and "root:" not in line


# --- how many runs a study may plan -------------------------------------------------------


def _values(n: int) -> str:
    return "[" + ", ".join(str(i) for i in range(n)) + "]"


SIZES = {
    "grid-100000-cells": (
        "grids:\n  - {" + ", ".join(f"data.k{k}: {_values(10)}" for k in range(5)) + "}\n",
        "grids",
        "100,000 runs",
    ),
    "two-thousand-seeds": (f"seeds: {_values(2000)}\n", "seeds", "2,000 runs"),
    "many-variants": (
        "variants:\n" + "".join(f"  v{i}: []\n" for i in range(MAX_RUNS + 1)),
        "variants",
        f"{MAX_RUNS + 1:,} runs",
    ),
}


@pytest.mark.parametrize("kind", list(SIZES))
def test_a_study_too_large_to_plan_names_the_count(refuses, workdir, kind):
    extra, key, count = SIZES[kind]
    head = "base: default\n"
    head += "" if kind == "many-variants" else "variants: {a: []}\n"
    head += "" if kind == "two-thousand-seeds" else "seeds: [0]\n"
    study = _write(workdir / "study.yaml", head + extra)
    line = refuses(["sweep", str(study)], count, seconds=3.0)
    assert line.startswith(f"fedsim: config error: {key}: ")
    assert f"more than the {MAX_RUNS:,} one study may hold" in line


def test_grid_cells_refuses_a_huge_grid_built_in_python():
    grid = {f"data.k{k}": list(range(10)) for k in range(6)}  # a million cells
    study = StudyConfig(grids=[grid], variants={"a": []}, seeds=[0])
    with pytest.raises(ConfigError, match="1,000,000 runs") as info:
        grid_cells(study)
    assert info.value.key == "grids"


# --- where the table goes: checked before the first run -----------------------------------


@pytest.mark.parametrize("where", ["directory", "empty", "under-a-file"])
def test_output_that_cannot_take_the_table_fails_before_any_run(refuses, workdir, where):
    output = {"directory": str(workdir), "empty": "''", "under-a-file": "notes.txt/table.md"}
    (workdir / "notes.txt").write_text("mine\n")
    study = _write(workdir / "study.yaml", f"{STUDY}output: {output[where]}\n")
    refuses(["compare", str(study), "rounds=1"], "output")
    assert (workdir / "notes.txt").read_text() == "mine\n"


class _Finished:
    """What the table reads of a finished run's :class:`RunResult`."""

    def __init__(self, i: int):
        self.run_id = f"fake{i}"
        self.history = [
            {"round": t, "global/accuracy": 0.5, "comm/upload_bytes": 1e6} for t in range(3)
        ]


@pytest.fixture
def fake_study(monkeypatch, workdir, base, new_mlflow_db):
    """A one-variant, two-seed study whose runs are ``runs[i](cfg)`` (no Ray, no training);
    its parent run is logged to ``workdir/mlflow.db``."""
    import actors.executor
    import fedsim.simulation.run as run_module

    new_mlflow_db(workdir)  # workdir/mlflow.db, as the base overrides name it
    monkeypatch.setattr(actors.executor, "init_ray", lambda *args, **kwargs: False)
    calls: list = []

    def run(cfg, **kwargs):
        calls.append(cfg)
        return calls_hook[0](len(calls), cfg)

    calls_hook = [lambda i, cfg: _Finished(i)]
    monkeypatch.setattr(run_module, "run", run)
    body = {
        "base": "default",
        # an absolute store: MLflow keeps one engine per URI, bound to the first test's cwd
        "overrides": [
            *(o for o in base if not o.startswith(("checkpoint.dir", "tracking.uri"))),
            f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
        ],
        "seeds": [0, 1],
        "variants": {"a": []},
        "output": "out/table.md",
    }
    path = _write(workdir / "study.yaml", yaml.safe_dump(body))
    return SimpleNamespace(path=path, hook=calls_hook, calls=calls)


def _parent(workdir: Path):
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        "attributes.run_name = 'study study'",
    )
    assert len(runs) == 1
    return client, runs[0]


def test_a_failing_run_stops_no_other_and_ends_the_parent_run_failed(fake_study, workdir):
    from fedsim.simulation.study import StudyIncomplete

    def boom_first(i, cfg):
        if i == 1:
            raise RuntimeError("boom")
        return _Finished(i)

    fake_study.hook[0] = boom_first
    with pytest.raises(StudyIncomplete, match=r"1 of 2 runs failed \('a seed=0'; above\)"):
        run_study(fake_study.path, quiet=True)
    assert len(fake_study.calls) == 2  # the second run still ran
    table = (workdir / "out" / "table.md").read_text()
    assert "| a | 0.500 ± 0.000 |" in table and "Left out: 1 failed run(s) (a seed=0)" in table
    _, parent = _parent(workdir)
    assert parent.info.status == "FAILED"


def test_a_study_whose_every_run_fails_writes_no_table(fake_study, workdir):
    from fedsim.simulation.study import StudyIncomplete

    def boom(i, cfg):
        raise RuntimeError(f"boom {i}")

    fake_study.hook[0] = boom
    with pytest.raises(StudyIncomplete, match="2 of 2 runs failed") as info:
        run_study(fake_study.path, quiet=True)
    assert [f.error for f in info.value.failures] == ["boom 1", "boom 2"]
    assert info.value.output is None and not (workdir / "out").exists()
    _, parent = _parent(workdir)
    assert parent.info.status == "FAILED"


def test_a_table_that_cannot_be_written_after_the_runs_is_not_lost(fake_study, workdir, capsys):
    def then_block_the_output(i, cfg):
        if i == 2:  # after the pre-flight check: a file now stands where out/ would go
            (workdir / "out").write_text("in the way\n")
        return _Finished(i)

    fake_study.hook[0] = then_block_the_output
    with pytest.raises(ConfigError) as info:
        run_study(fake_study.path)
    assert info.value.key == "output" and "summary.md" in str(info.value)
    assert "| a |" in capsys.readouterr().out  # the table was printed before the error
    client, parent = _parent(workdir)
    assert parent.info.status == "FINISHED"
    assert "summary.md" in {a.path for a in client.list_artifacts(parent.info.run_id)}


# --- fedsim inspect: stores -----------------------------------------------------------------

MERGE = {
    "round": 2,
    "coverage": [2, 2, 1, 1],
    "weight": [30.0, 30.0, 10.0, 10.0],
    "merge_weight": [1.0, 1.0, 1.0, 1.0],
    "update_norm": [0.1, 0.2, 0.3, 0.4],
    "energy": {
        "bands": ["1-2", "3-4"],
        "energy": [3.0, 1.0],
        "share": [0.75, 0.25],
        "modules": {"m.q": {"energy": 4.0, "share": [0.75, 0.25]}},
    },
}
OLD_MERGE = {k: v for k, v in MERGE.items() if k != "energy"}  # a run from before §6.1
COLUMNS = ["client_id", "rank", "num_samples", "status", "share", "contribution"]
ROWS = {"columns": COLUMNS, "data": [[0, 4, 10, "ok", 0.6, 0.3], [1, 2, 20, "ok", 0.4, 0.2]]}
CLIENTS = {"columns": ["client", "labels"], "data": [[0, "3 1 0"], [1, "0 2 5"]]}
ARTIFACTS = {
    "merge/round_0001.json": json.dumps({**OLD_MERGE, "round": 1}),
    "merge/round_0002.json": json.dumps(MERGE),
    "clients/round_0001.json": json.dumps(ROWS),
    "clients/round_0002.json": json.dumps(ROWS),
    "data/clients.json": json.dumps(CLIENTS),
    "data/classes.tsv": "0\tcat\n1\tdog\n2\tbird\n",
}


@pytest.fixture(scope="module")
def store(tmp_path_factory, new_mlflow_db):
    """A SQLite store and ``log(**artifacts)``: a run with a score drop at round 2 and the
    merge diagnostics of rounds 1 and 2 (``artifacts`` replace them by path)."""
    root = tmp_path_factory.mktemp("inspect")
    uri = new_mlflow_db(root)
    client = MlflowClient(uri)
    experiment = client.create_experiment("inspect", artifact_location=(root / "a").as_uri())

    def log(replace: dict[str, str | bytes] | None = None) -> str:
        run_id = client.create_run(experiment).info.run_id
        for step, value in enumerate([0.5, 0.6, 0.4]):
            client.log_metric(run_id, "global/accuracy", value, step=step)
        client.log_param(run_id, "rounds", 2)
        client.set_tag(run_id, "fedsim.merge", "fedilora")
        files = root / f"files-{run_id}"
        for path, content in {**ARTIFACTS, **(replace or {})}.items():
            (files / path).parent.mkdir(parents=True, exist_ok=True)
            _write(files / path, content)
        client.log_artifacts(run_id, str(files))
        client.set_terminated(run_id)
        return run_id

    return SimpleNamespace(uri=uri, file=Path(uri.removeprefix("sqlite:///")), log=log)


def _fingerprint(path: Path) -> tuple:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns, path.read_bytes()


def test_inspect_reads_a_good_run_without_changing_the_store(store, capsys):
    run_id = store.log()
    before = _fingerprint(store.file)
    assert main(["inspect", run_id, "--tracking-uri", store.uri]) == 0
    out = capsys.readouterr().out
    assert "round 2" in out and "cat 75%" in out and "merge per dimension band" in out
    assert "rank collapse: 75.0% of the global adapter's energy in rank dimensions 1-2" in out
    assert "share per rank band: 1-2 75.0%, 3-4 25.0%" in out
    # a round logged before the energy was measured shows no such line
    assert main(["inspect", run_id, "--round", "1", "--tracking-uri", store.uri]) == 0
    out = capsys.readouterr().out
    assert "round 1" in out and "rank collapse" not in out
    assert _fingerprint(store.file) == before


def _not_sqlite(path: Path) -> None:
    path.write_text("hello, I am notes\n")


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _other_sqlite(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("create table notes (text)")
    db.close()


def _damaged_sqlite(path: Path) -> None:
    path.write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 16)


STORE_FILES = {
    "not-sqlite": (_not_sqlite, "is not an SQLite database"),
    "empty-file": (_empty, "is empty"),
    "sqlite-but-not-mlflow": (_other_sqlite, "no MLflow store"),
    "damaged-sqlite": (_damaged_sqlite, "damaged"),
}


@pytest.mark.parametrize("kind", list(STORE_FILES))
def test_inspect_of_a_file_that_is_no_store_leaves_it_unchanged(refuses, workdir, kind):
    make, problem = STORE_FILES[kind]
    path = workdir / "mlflow-copy.db"
    make(path)
    os.utime(path, ns=(1_000_000_000_000, 1_000_000_000_000))  # any change would move it
    before = _fingerprint(path)
    line = refuses(["inspect", "abc", "--tracking-uri", f"sqlite:///{path}"], problem)
    assert line.startswith("fedsim: config error: --tracking-uri: ")
    assert _fingerprint(path) == before
    assert sorted(p.name for p in workdir.iterdir()) == ["mlflow-copy.db"]


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("sqlite:///missing.db", "no MLflow store at missing.db"),
        ("sqlite:///a-directory", "is not a file"),
        ("sqlite://", "names no database file"),
        ("file:///nonexistent/mlruns", "no MLflow store at /nonexistent/mlruns"),
        ("FILESTORE", "MLFLOW_ALLOW_FILE_STORE"),
    ],
    ids=["missing-file", "directory", "no-path", "missing-file-store", "file-store"],
)
def test_inspect_names_a_store_it_cannot_open(refuses, workdir, monkeypatch, uri, problem):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    (workdir / "a-directory").mkdir()
    (workdir / "mlruns").mkdir()
    uri = uri.replace("FILESTORE", (workdir / "mlruns").as_uri())
    refuses(["inspect", "abc", "--tracking-uri", uri], problem)
    assert sorted(p.name for p in workdir.iterdir()) == ["a-directory", "mlruns"]
    assert not any((workdir / "mlruns").iterdir())  # the file store was not written either


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_inspect_of_a_server_that_refuses_says_cannot_reach(refuses):
    uri = f"http://127.0.0.1:{_closed_port()}"
    line = refuses(["inspect", "abc", "--tracking-uri", uri], "cannot reach the MLflow store")
    assert "--tracking-uri" in line and "no run" not in line


def test_inspect_of_a_server_that_never_answers_gives_up_after_the_timeout(refuses, monkeypatch):
    import fedsim.tracking.store as store_module

    monkeypatch.setattr(store_module, "REMOTE_TIMEOUT_S", 1)
    with socket.socket() as silent:  # the kernel accepts the connection; nobody ever reads
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        refuses(["inspect", "abc", "--tracking-uri", uri], "cannot reach", seconds=5.0)


@pytest.mark.parametrize("run_id", ["0123456789abcdef0123456789abcdef", "../../etc/passwd"])
def test_inspect_of_a_run_the_store_lacks_names_the_run(refuses, store, run_id):
    before = _fingerprint(store.file)
    line = refuses(["inspect", run_id, "--tracking-uri", store.uri], "no run")
    assert line.startswith("fedsim: config error: RUN_ID: ")
    assert _fingerprint(store.file) == before


# --- fedsim inspect: damaged diagnostics ----------------------------------------------------

_TRUNCATED = json.dumps(MERGE)[:25]
DAMAGED = {
    "merge-truncated": ("merge/round_0002.json", _TRUNCATED, "not JSON"),
    "merge-a-list": ("merge/round_0002.json", "[1, 2, 3]", "not a mapping"),
    "merge-no-weight": (
        "merge/round_0002.json",
        json.dumps({k: v for k, v in MERGE.items() if k != "weight"}),
        "'weight'",
    ),
    "merge-short-weight": (
        "merge/round_0002.json",
        json.dumps({**MERGE, "weight": [1]}),
        "'weight'",
    ),
    "merge-text-coverage": (
        "merge/round_0002.json",
        json.dumps({**MERGE, "coverage": ["two", "two", "one", "one"]}),
        "'coverage'",
    ),
    "merge-nan-norm": (
        "merge/round_0002.json",
        json.dumps({**MERGE, "update_norm": [float("nan")] * 4}),
        "finite",
    ),
    "merge-binary": ("merge/round_0002.json", b"\xff\xfe\x00{", "UTF-8"),
    "merge-energy-a-list": (
        "merge/round_0002.json",
        json.dumps({**MERGE, "energy": [0.75, 0.25]}),
        "'energy' is no mapping",
    ),
    "merge-energy-short-share": (
        "merge/round_0002.json",
        json.dumps({**MERGE, "energy": {**MERGE["energy"], "share": [1.0]}}),
        "one value per band",
    ),
    "merge-energy-bad-band": (
        "merge/round_0002.json",
        json.dumps({**MERGE, "energy": {**MERGE["energy"], "bands": ["low", "high"]}}),
        "LO-HI",
    ),
    "merge-energy-module-nan": (
        "merge/round_0002.json",
        json.dumps(
            {
                **MERGE,
                "energy": {**MERGE["energy"], "modules": {"m.q": {"share": [float("nan"), 1]}}},
            }
        ),
        "module 'm.q'",
    ),
    "clients-truncated": ("clients/round_0002.json", json.dumps(ROWS)[:30], "not JSON"),
    "clients-no-columns": ("clients/round_0002.json", json.dumps({"rows": []}), "'columns'"),
    "clients-short-row": (
        "clients/round_0002.json",
        json.dumps({"columns": COLUMNS, "data": [[0, 4]]}),
        "row 0",
    ),
    "clients-text-share": (
        "clients/round_0002.json",
        json.dumps({"columns": COLUMNS, "data": [[0, 4, 10, "ok", "most", 0.3]]}),
        "share",
    ),
    "clients-no-id": (
        "clients/round_0002.json",
        json.dumps({"columns": COLUMNS[1:], "data": [[4, 10, "ok", 0.6, 0.3]]}),
        "client id",
    ),
    "data-bad-labels": (
        "data/clients.json",
        json.dumps({"columns": ["client", "labels"], "data": [[0, "three cats"]]}),
        "labels",
    ),
    "data-truncated": ("data/clients.json", "{", "not JSON"),
}


@pytest.mark.parametrize("kind", list(DAMAGED))
def test_inspect_names_a_damaged_artifact(refuses, store, kind):
    path, content, problem = DAMAGED[kind]
    run_id = store.log({path: content})
    line = refuses(["inspect", run_id, "--round", "2", "--tracking-uri", store.uri], problem)
    assert line.startswith(f"fedsim: config error: {path}: run {run_id}"), line


def test_inspect_of_a_round_without_diagnostics_lists_the_rounds_that_have_them(refuses, store):
    run_id = store.log()
    refuses(["inspect", run_id, "--round", "9", "--tracking-uri", store.uri], "1-2")


# --- the Python API: arguments of the wrong type name the argument ---------------------------


@pytest.mark.parametrize(
    ("call", "key"),
    [
        (lambda: load_config(None, "rounds=3"), "overrides"),
        (lambda: load_config(None, ["rounds=3", 3]), "overrides[1]"),
        (lambda: load_config(None, None), "overrides"),
        (lambda: load_config(42), "path"),
        (lambda: load_config(""), "path"),
        (lambda: fedsim.run(42), "config"),
        (lambda: fedsim.run(["rounds=3"]), "config"),
        (lambda: fedsim.run(None, quiet="yes"), "quiet"),
        (lambda: fedsim.run(None, executor="ray"), "executor"),
        (lambda: fedsim.resume(42), "run_dir"),
        (lambda: fedsim.resume("runs/x", "rounds=3"), "overrides"),
        (lambda: run_study(3.5), "path"),
        (lambda: run_study("compare", "rounds=2"), "extra"),
        (lambda: load_study(None), "path"),
        (lambda: inspect_run(123), "run_id"),
        (lambda: inspect_run("abc", "2"), "round_idx"),
        (lambda: inspect_run("abc", None, 5), "tracking_uri"),
    ],
    ids=[
        "load_config-string-overrides",
        "load_config-int-override",
        "load_config-None-overrides",
        "load_config-int-path",
        "load_config-empty-path",
        "run-int",
        "run-list",
        "run-quiet-string",
        "run-executor-string",
        "resume-int",
        "resume-string-overrides",
        "run_study-float",
        "run_study-string-extra",
        "load_study-None",
        "inspect_run-int-id",
        "inspect_run-string-round",
        "inspect_run-int-uri",
    ],
)
def test_api_argument_of_the_wrong_type_is_named(workdir, no_partial_state, call, key):
    with pytest.raises(ConfigError) as info:
        call()
    assert info.value.key == key and "\n" not in str(info.value), str(info.value)
    no_partial_state(workdir)


def test_a_string_of_overrides_is_not_read_as_characters():
    with pytest.raises(ConfigError, match=r"write \['rounds=3'\]") as info:
        load_config(None, "rounds=3")
    assert info.value.key == "overrides"  # not 'r', the first character


def _lora(rank: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    return {
        "m.lora_A.weight": torch.ones(rank, 3, device=device),
        "m.lora_B.weight": torch.ones(3, rank, device=device),
    }


METHODS = ["fedilora", "zeropad", "hetlora", "flexlora", "flora"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"ranks": ["2", "2"]}, "ranks[0]: expected an int, got str '2'"),
        ({"ranks": [2.0, 2]}, "ranks[0]"),
        ({"ranks": 2}, "ranks: expected a list"),
        ({"num_samples": ["5", "5"]}, "num_samples[0]: expected a number, got str"),
        ({"num_samples": [5, None]}, "num_samples[1]"),
        ({"states": (s for s in [_lora(2), _lora(2)])}, "states: expected a list"),
        ({"global_rank": "4"}, "global_rank"),
        ({"scalings": ["1", "1"]}, "scalings[0]"),
    ],
    ids=[
        "rank-strings",
        "rank-float",
        "ranks-int",
        "count-strings",
        "count-None",
        "states-generator",
        "global-rank-string",
        "scaling-strings",
    ],
)
def test_merge_arguments_of_the_wrong_type_are_named(method, kwargs, named):
    args = {"states": [_lora(2), _lora(2)], "ranks": [2, 2], "num_samples": [5, 5], **kwargs}
    with pytest.raises(ValueError) as info:
        merge_lora_state_dicts(method=method, **args)
    assert named in str(info.value) and not isinstance(info.value, UpdateRejected)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    ("bad", "named"),
    [
        ({"m.lora_A.weight": torch.ones(2, 3, device="meta")}, "a meta tensor holds no values"),
        ({"m.lora_A.weight": torch.ones(2, 3).to_sparse()}, "sparse"),
        ({7: torch.ones(2, 3)}, "key 7"),
    ],
    ids=["meta", "sparse", "int-key"],
)
def test_merge_rejects_tensors_without_values_naming_the_client(method, bad, named):
    states = [_lora(2), {**_lora(2), **bad}]
    with pytest.raises(UpdateRejected) as info:
        merge_lora_state_dicts(states, [2, 2], [5, 5], method=method)
    assert "client 1" in str(info.value) and named in str(info.value), str(info.value)


@pytest.mark.parametrize(
    ("args", "error", "named"),
    [
        ((_lora(2), "2", 5), ValueError, "rank: expected an int, got str '2'"),
        ((_lora(2), 2, "5"), ValueError, "num_samples: expected a number, got str '5'"),
        (({"m.lora_A.weight": torch.ones(2, 3, device="meta")}, 2, 5), UpdateRejected, "meta"),
        (([1, 2], 2, 5), UpdateRejected, "state: expected a mapping"),
    ],
    ids=["rank-string", "count-string", "meta", "state-list"],
)
def test_a_streaming_merge_names_a_client_argument_of_the_wrong_type(args, error, named):
    stream = get_merger("fedilora").stream(None, 2, _lora(2))
    with pytest.raises(error, match=named):
        stream.add(*args)
    assert stream.count == 0
