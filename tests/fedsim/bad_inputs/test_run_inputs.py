"""Bad input, as a new user would type it: one line naming the culprit, nothing left behind.

Every case goes through the ``fedsim`` command line in-process (or the Python API) from an
empty working directory and asserts: a non-zero exit status (or an exception), exactly one
line on stderr that starts with ``fedsim:`` and names the key, file, row or client, no
traceback, and no partial state: no checkpoint directory and no MLflow run of a run that
never started. None of these cases starts a Ray of its own: ``fedsim run`` joins Ray first
thing, in the background, and here it finds the session's (``ray_address``) and no client
actor ever starts: every case is caught before that.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

import fedsim
from aggregation import UpdateRejected, merge_lora_state_dicts
from fedsim.checkpoint.disk import CheckpointWriter
from fedsim.config import ConfigError, FedSimConfig, load_config, to_yaml

# --- config values ------------------------------------------------------------------------

VALUES = [
    (["seed=-1", "clients.ranks=choice:4,8"], "seed"),
    (["seed=4294967296"], "seed"),
    (["server.lr=inf"], "server.lr"),
    (["server.optimizer=fedavgm", "server.lr=-1"], "server.lr"),
    (["lora.alpha=inf"], "lora.alpha"),
    (["lora.alpha=nan"], "lora.alpha"),
    (["lora.dropout=1"], "lora.dropout"),
    (["train.lr=inf"], "train.lr"),
    (["train.lr=0"], "train.lr"),
    (["train.lr=abc"], "train.lr"),
    (["train.weight_decay=nan"], "train.weight_decay"),
    (["train.weight_decay=-0.1"], "train.weight_decay"),
    (["train.batch_size=0"], "train.batch_size"),
    (["model.head_hidden=0"], "model.head_hidden"),
    (["model.backbone=resnet"], "model.backbone"),
    (["model.backbone=hf"], "model.text_encoder"),
    (["clients.num=1000000000"], "clients.num"),
    (["clients.num=0"], "clients.num"),
    (["clients.fraction=0"], "clients.fraction"),
    (["clients.fraction=1.5"], "clients.fraction"),
    (["clients.ranks=[8,8]"], "clients.ranks"),
    (["clients.ranks=choice:a,b"], "clients.ranks"),
    (["clients.ranks=[8,8,4,4,2,0]"], "clients.ranks"),
    (["data.test_split=train"], "data.test_split"),
    (["data.alpha=0"], "data.alpha"),
    (["data.image_size=4"], "data.image_size"),
    (["data.missing_rate=1.5"], "data.missing_rate"),
    (["data.cross_ratio=3-7"], "data.cross_ratio"),
    (["data.dataset=llava", "data.root=."], "data.dataset"),
    (["data.dataset=hateful_memes"], "data.root"),
    (["faults.delay_dist=constant", "faults.delay_s=inf"], "faults.delay_s"),
    (["faults.fail_prob=2"], "faults.fail_prob"),
    (["faults.nan_update_clients=[6]"], "faults.nan_update_clients"),
    (["round.min_clients=100"], "round.min_clients"),
    (["round.max_empty_rounds=-1"], "round.max_empty_rounds"),
    (["devices.step_s=nan"], "devices.step_s"),
    (["faults.sleep_scale=1000"], "faults.sleep_scale"),
    (["resources.placement_timeout_s=1e9"], "resources.placement_timeout_s"),
    (["aggregation.method=fedsgd"], "aggregation.method"),
    (["rounds=-1"], "rounds"),
    (["rounds=10000000"], "rounds"),
    (["eval.max_new_tokens=0"], "eval.max_new_tokens"),
    (["resources.client.num_gpus=1.5"], "resources.client.num_gpus"),
    (["objective.method=scaffold"], "train.optimizer"),
    (["sharing.policy=none", "editing.enabled=true"], "editing.enabled"),
    (["aggregation.method=flora", "editing.enabled=true"], "editing.enabled"),
    (["editing.enabled=maybe"], "editing.enabled"),
    (["aggregation.method=flora", "server.optimizer=fedadam"], "server.optimizer"),
    (["checkpoint.every=-1"], "checkpoint.every"),
    (["checkpoint.keep=0"], "checkpoint.keep"),
    (["tracking.experiment="], "tracking.experiment"),
    (["no.such_key=1"], "no.such_key"),
    (["checkpoint.dir=~nonexistentuser/runs"], "checkpoint.dir"),
    (["tracking.uri=sqlite:///~nonexistentuser/m.db"], "tracking.uri"),
    (["tracking.experiment=" + "x" * 600], "tracking.experiment"),
    (["model.target_regex=("], "model.target_regex"),
    (["rounds"], "rounds"),
]


@pytest.mark.parametrize(("overrides", "culprit"), VALUES, ids=lambda v: str(v)[:60])
def test_config_value(fails, base, overrides, culprit):
    fails(["run", *base, *overrides], culprit)


def test_config_command_fails_fast_on_a_huge_client_count(fails):
    fails(["config", "clients.num=1000000000"], "clients.num")


# --- config files -------------------------------------------------------------------------

FILES = {
    "missing": (None, "missing.yaml"),
    "unparseable": ("rounds: [1\n", "cannot parse"),
    "binary": (b"\x7fELF\x02\x01\x01\x00\xd0\xff\xfe", "cannot parse"),
    "list": ("- rounds: 1\n", "not a list"),
    "unknown-key": ("nope: 1\n", "nope"),
    "wrong-type": ("rounds: many\n", "rounds"),
    "deep": ("a: " + "[" * 50_000 + "\n", "deep.yaml"),
    "wrong-shape": ("clients: 3\n", "clients"),
}


def _write(path: Path, content: str | bytes | None) -> Path:
    """Write ``content`` (text or bytes) to ``path``; None leaves the file missing."""
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    return path


@pytest.mark.parametrize("kind", list(FILES))
def test_config_file(fails, base, workdir, kind):
    content, culprit = FILES[kind]
    path = _write(workdir / f"{kind}.yaml", content)
    fails(["run", str(path), *base], culprit)


# --- study and sweep files ----------------------------------------------------------------

DEFAULT = Path(__file__).resolve().parents[3] / "experiments" / "default.yaml"
STUDIES = {
    "list": ("- a\n- b\n", "must be a mapping"),
    "unparseable": ("variants: {a: [x=1\n", "cannot parse"),
    "binary": (b"\x89PNG\r\n\x1a\n\xff\xfe\x00", "not a UTF-8"),
    "no-variants": (f"base: {DEFAULT}\n", "variants"),
    "grid-not-list": (f"base: {DEFAULT}\nvariants: {{a: []}}\ngrids: [{{rounds: 1}}]\n", "grids"),
    "missing-base": ("base: nope.yaml\nvariants: {a: []}\n", "nope.yaml"),
    "negative-seed": (f"base: {DEFAULT}\nvariants: {{a: []}}\nseeds: [-1]\n", "seed"),
    "bad-variant-key": (f"base: {DEFAULT}\nvariants: {{a: [nokey=1]}}\n", "nokey"),
    "unknown-study-key": (f"base: {DEFAULT}\nvariants: {{a: []}}\nseedz: [1]\n", "seedz"),
    "bad-last-variant": (
        # CACHE: the session's dataset cache (the command line's would override the variant's)
        f"base: {DEFAULT}\noverrides: [data.cache_dir=CACHE]\n"
        "variants: {good: [], bad: [data.cache_dir=/proc/fedsim]}\n",
        "in run 'bad seed=0'",
    ),
    "unwritable-output": (
        f"base: {DEFAULT}\nvariants: {{a: []}}\noutput: /proc/fedsim/x.md\n",
        "output",
    ),
}


@pytest.mark.parametrize("command", ["compare", "sweep"])
@pytest.mark.parametrize(
    "kind",
    # the bad cache directory is found by rendering the emoji set first: seconds
    [pytest.param(k, marks=pytest.mark.slow) if k == "bad-last-variant" else k for k in STUDIES],
)
def test_study_file(fails, base, workdir, emoji_cache, command, kind):
    content, culprit = STUDIES[kind]
    if isinstance(content, str):
        content = content.replace("CACHE", str(emoji_cache))
    path = _write(workdir / f"{kind}.yaml", content)
    extra = [o for o in base if not o.startswith("data.cache_dir")]
    fails([command, str(path), *extra], culprit)


def test_missing_study_file(fails):
    fails(["sweep", "nope.yaml"], "nope.yaml")


# --- data files ---------------------------------------------------------------------------


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), (200, 30, 30)).save(path)


def _memes(root: Path, train_rows: list | None = None, dev_rows: list | None = None) -> Path:
    """A tiny Hateful Memes directory: 40 train and 6 dev rows unless given."""
    for i in range(3):
        _image(root / "img" / f"{i}.png")
    rows = [
        {"id": i, "img": f"img/{i % 3}.png", "label": i % 2, "text": f"meme {i}"} for i in range(40)
    ]
    lines = {"train": train_rows if train_rows is not None else rows}
    lines["dev"] = dev_rows if dev_rows is not None else rows[:6]
    for split, items in lines.items():
        text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in items)
        (root / f"{split}.jsonl").write_text(text)
    return root


def _memes_args(root: Path) -> list[str]:
    return [
        "data.dataset=hateful_memes",
        f"data.root={root}",
        "clients.num=2",
        "clients.ranks=[4,4]",
        "clients.fraction=1",
        "data.min_per_client=2",
        "data.subset=null",
    ]


def _row(i: int, img: str) -> dict:
    return {"id": i, "img": img, "label": 1, "text": "x"}


def _bad_train(kind: str, root: Path) -> list:
    good = [_row(i, f"img/{i % 3}.png") for i in range(40)]
    outside = root.parent / "outside.png"
    _image(outside)
    bad = {
        "parent-escape": _row(99, "../outside.png"),
        "absolute-path": _row(99, str(outside)),
        "deep-json": "[" * 100_000,
        "not-an-object": "[1, 2, 3]",
        "missing-image": _row(99, "img/nope.png"),
        "bad-label": {"id": 99, "img": "img/0.png", "label": "yes", "text": "x"},
    }[kind]
    return [*good[:5], bad, *good[5:]]


@pytest.mark.parametrize(
    "kind",
    ["parent-escape", "absolute-path", "deep-json", "not-an-object", "missing-image", "bad-label"],
)
def test_bad_data_row_names_file_and_row(fails, base, tmp_path, kind):
    root = tmp_path / "memes"
    _memes(root, train_rows=_bad_train(kind, root))
    line = fails(["run", *base, *_memes_args(root)], "train.jsonl")
    assert "6" in line  # the bad row is line 6 of the file


def test_symlink_out_of_root_is_refused(fails, base, tmp_path):
    root = tmp_path / "memes"
    _memes(root)
    outside = tmp_path / "secret.png"
    _image(outside)
    (root / "img" / "link.png").symlink_to(outside)
    rows = [_row(i, "img/link.png" if i == 0 else f"img/{i % 3}.png") for i in range(40)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fails(["run", *base, *_memes_args(root)], "outside data.root")


@pytest.mark.parametrize(
    ("setup", "culprit"),
    [
        ("empty-test", "data.test_split"),
        ("test-is-train-link", "data.test_split"),
        ("all-skipped", "no usable rows"),
        ("no-root", "data.root"),
        ("missing-test", "dev"),
    ],
)
def test_bad_split(fails, base, tmp_path, setup, culprit):
    root = tmp_path / "memes"
    extra: list[str] = []
    if setup == "empty-test":
        _memes(root, dev_rows=[])
    elif setup == "test-is-train-link":
        _memes(root)
        (root / "dev.jsonl").unlink()
        (root / "dev.jsonl").symlink_to(root / "train.jsonl")
    elif setup == "all-skipped":
        _memes(root, dev_rows=["{broken", "[1]"])
        extra = ["data.on_error=skip"]
    elif setup == "missing-test":
        _memes(root)
        (root / "dev.jsonl").unlink()
    args = _memes_args(root if setup != "no-root" else tmp_path / "nowhere")
    fails(["run", *base, *args, *extra], culprit)


def test_too_many_clients_for_the_data(fails, base):
    fails(["run", *base, "clients.num=200", "clients.ranks=equal:4"], "clients")


def test_hf_encoders_that_cannot_be_found(fails, base, tmp_path):
    args = [f"model.text_encoder={tmp_path / 'nope'}", f"model.vision_encoder={tmp_path}"]
    fails(["run", *base, "model.backbone=hf", *args], "model.text_encoder")


def test_partition_heatmap_in_an_unwritable_place(fails, base):
    fails(["partition", *base, "--heatmap", "/proc/fedsim/heat.png"], "--heatmap")


def test_unwritable_dataset_cache(fails, base):
    fails(["run", *base, "data.cache_dir=/proc/fedsim-cache"], "data.cache_dir")


# --- tracking and checkpoint locations ----------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "culprit"),
    [
        ("foo://bar", "tracking.uri"),
        ("sqlite:////proc/fedsim/mlflow.db", "tracking.uri"),
        ("sqlite://", "tracking.uri"),
        ("http://127.0.0.1:9", "tracking.uri"),
        ("file:///proc/fedsim/mlruns", "tracking.uri"),
    ],
)
def test_bad_tracking_uri(fails, base, uri, culprit):
    fails(["run", *base, f"tracking.uri={uri}"], culprit)


def test_tracking_store_under_a_file(fails, base, workdir):
    (workdir / "afile").write_text("x")
    fails(["run", *base, "tracking.uri=sqlite:///afile/mlflow.db"], "tracking.uri")


@pytest.mark.parametrize("where", ["/proc/fedsim-runs", "afile", "afile/below"])
def test_bad_checkpoint_dir(fails, base, workdir, where):
    (workdir / "afile").write_text("x")
    fails(["run", *base, f"checkpoint.dir={where}"], "checkpoint.dir")


def test_deleted_experiment(fails, base, workdir, new_mlflow_db):
    from mlflow.tracking import MlflowClient

    uri = new_mlflow_db(workdir / "store")  # its own file: MLflow keeps stores by URI
    client = MlflowClient(uri)
    client.delete_experiment(client.create_experiment("gone", artifact_location="art"))
    fails(["run", *base, f"tracking.uri={uri}", "tracking.experiment=gone"], "tracking.experiment")


@pytest.mark.slow  # a fresh Python process
def test_a_ray_address_that_is_no_address(base, workdir, no_partial_state):
    # a process of its own: this one has joined the session's Ray, which fedsim would use
    import os
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "fedsim", "run", *base],
        env={**os.environ, "RAY_ADDRESS": "nonsense"},
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("fedsim: "), proc.stderr[-3000:]
    assert "RAY_ADDRESS" in lines[0] and "nonsense" in lines[0]
    no_partial_state(workdir)


# --- checkpoints --------------------------------------------------------------------------


@pytest.fixture
def run_dir(tmp_path, tiny_overrides) -> Path:
    """A checkpointed round 1 of the tiny config, written by the real writer (no Ray)."""
    cfg = load_config(None, [*tiny_overrides, "tracking.uri=sqlite:///mlflow.db"])
    path = tmp_path / "ckpt" / "run1"
    writer = CheckpointWriter(path, 2, config=cfg)
    writer.write_config(to_yaml(cfg))
    server = {"global": {"m.lora_A.weight": torch.ones(2, 3), "m.lora_B.weight": torch.ones(3, 2)}}
    meta = {
        "ranks": [8, 8, 4, 4, 2, 2],
        "history": [{"round": 0}, {"round": 1}],
        "clients": [[], []],
        "totals": {"upload_bytes": 0, "download_bytes": 0, "simulated_s": 0.0},
        "mlflow_run_id": "0" * 32,
        "tracking_uri": cfg.tracking.uri,
        "rng": {"seed": cfg.seed, "next_round": 2},
    }
    writer.save(1, server, {3: {"private": {"x": torch.zeros(2)}}}, meta)
    return path


def _state_file(run_dir: Path) -> Path:
    return run_dir / "round_00001" / "state.json"


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


CORRUPTIONS = {
    "no-such-dir": lambda d: d.rename(d.with_name("moved")),
    "no-latest": lambda d: (d / "latest.json").unlink(),
    "latest-escapes": lambda d: (d / "latest.json").write_text(
        json.dumps({"round": 1, "dir": "../../../../etc"})
    ),
    "latest-absolute": lambda d: (d / "latest.json").write_text(
        json.dumps({"round": 1, "dir": "/etc"})
    ),
    "latest-not-json": lambda d: (d / "latest.json").write_text("{round: 1"),
    "latest-a-list": lambda d: (d / "latest.json").write_text("[1, 2]"),
    "state-missing-field": lambda d: _edit_json(_state_file(d), lambda s: s.pop("ranks")),
    "state-wrong-type": lambda d: _edit_json(
        _state_file(d), lambda s: s.update(ranks="8,8,4,4,2,2")
    ),
    "client-file-escapes": lambda d: _edit_json(
        _state_file(d), lambda s: s.update(client_files={"3": "../../x.safetensors"})
    ),
    "tensor-file-edited": lambda d: _flip_byte(d / "round_00001" / "server.safetensors"),
    "tensor-file-removed": lambda d: (d / "round_00001" / "server.safetensors").unlink(),
    "client-file-edited": lambda d: _flip_byte(next((d / "clients").iterdir())),
    "deep-state-json": lambda d: _state_file(d).write_text("[" * 100_000),
}


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path.parent)) for p in path.parent.rglob("*"))


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_checkpoint(fails, run_dir, kind):
    CORRUPTIONS[kind](run_dir)
    before = _tree(run_dir)
    fails(["run", "--resume", str(run_dir)], "--resume")
    assert _tree(run_dir) == before  # nothing written next to the checkpoint


def test_non_finite_checkpoint_tensors_refuse_to_load(fails, tmp_path, tiny_overrides):
    cfg = load_config(None, [*tiny_overrides])
    path = tmp_path / "nan-run"
    writer = CheckpointWriter(path, 2, config=cfg)
    writer.write_config(to_yaml(cfg))
    server = {"global": {"m.lora_A.weight": torch.tensor([[math.nan, 1.0]])}}
    meta = {
        "ranks": [8] * 6,
        "history": [{"round": 0}],
        "clients": [[]],
        "totals": {"upload_bytes": 0, "download_bytes": 0, "simulated_s": 0.0},
        "mlflow_run_id": "0" * 32,
        "tracking_uri": "sqlite:///mlflow.db",
        "rng": {"seed": 0, "next_round": 1},
    }
    writer.save(0, server, {}, meta)
    line = fails(["run", "--resume", str(path)], "m.lora_A.weight")
    assert "NaN" in line


def test_resume_into_a_store_without_the_run(fails, run_dir):
    fails(["run", "--resume", str(run_dir)], "is not in the store")


@pytest.mark.parametrize(
    ("edit", "culprit"),
    [("seed: 0", "seed"), ("method: fedilora", "aggregation.method")],
)
def test_edited_config_yaml_is_refused(fails, run_dir, edit, culprit):
    path = run_dir / "config.yaml"
    text = path.read_text()
    assert edit in text
    key, value = edit.split(": ")
    path.write_text(text.replace(edit, f"{key}: {'7' if key == 'seed' else 'zeropad'}"))
    fails(["run", "--resume", str(run_dir)], culprit)


@pytest.mark.parametrize(
    ("argv", "culprit"),
    [
        (["seed=3"], "seed"),
        (["aggregation.method=zeropad"], "aggregation.method"),
        (["tracking.experiment=other"], "tracking.experiment"),
        (["experiments/default.yaml"], "--resume"),
        (["rounds=0"], "rounds"),
    ],
)
def test_resume_override_that_would_change_the_numbers(fails, run_dir, argv, culprit):
    fails(["run", "--resume", str(run_dir), *argv], culprit)


# --- the Python API -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "culprit"),
    [
        ({"clients": {"num": 0}}, "clients.num"),
        ({"nokey": 1}, "nokey"),
        ({"train": {"lr": float("inf")}}, "train.lr"),
        ({"clients": 3}, "config"),
        ("missing.yaml", "missing.yaml"),
        (FedSimConfig(rounds=-1), "rounds"),
    ],
    ids=["value", "unknown-key", "inf", "shape", "missing-file", "object"],
)
def test_api_run(workdir, config, culprit, no_partial_state):
    with pytest.raises(ConfigError) as info:
        fedsim.run(config)
    assert culprit in str(info.value) and "\n" not in str(info.value)
    no_partial_state(workdir)


def test_api_resume_of_a_missing_directory(workdir, no_partial_state):
    with pytest.raises(ConfigError, match="no such run directory"):
        fedsim.resume(workdir / "runs" / "nope")
    no_partial_state(workdir)


def _states(bad) -> list[dict]:
    good = {"m.lora_A.weight": torch.ones(2, 3), "m.lora_B.weight": torch.ones(3, 2)}
    return [good, {**good, "m.lora_A.weight": bad}]


@pytest.mark.parametrize(
    "bad",
    [
        torch.tensor([[math.nan, 1, 1], [1, 1, 1]]),
        torch.full((2, 3), math.inf),
        torch.ones(2, 3, dtype=torch.int64),
        torch.ones(2, 3, dtype=torch.bool),
        torch.ones(2, 3, dtype=torch.complex64),
        torch.ones(2, 3, dtype=torch.float64),
        [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]],
    ],
    ids=["nan", "inf", "int", "bool", "complex", "mixed-dtype", "not-a-tensor"],
)
@pytest.mark.parametrize("method", ["fedilora", "zeropad", "hetlora", "flexlora", "flora"])
def test_api_merge_rejects(bad, method):
    with pytest.raises(UpdateRejected) as info:
        merge_lora_state_dicts(_states(bad), [2, 2], [5, 5], method=method)
    message = str(info.value)
    assert "client 1" in message and "m.lora_A.weight" in message and "\n" not in message
