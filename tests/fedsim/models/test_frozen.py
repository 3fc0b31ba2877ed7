"""Frozen weights shared on a node (fedsim/models/frozen.py): built once per key, mapped from
one file by every worker, the same numbers as a private build, copy-on-write, and removed with
the pool."""

from __future__ import annotations

import os

import pytest
import torch

from actors.client import ClientWorker
from fedsim.config import flatten
from fedsim.messages import Broadcast, ClientTask
from fedsim.models.backbone import build_backbone
from fedsim.models.frozen import drop, frozen_key, shared

pytestmark = pytest.mark.usefixtures("restore_threads")


def _mapped(path) -> bool:
    """Whether this process maps ``path`` (its frozen tensors live in the file's pages)."""
    with open(f"/proc/{os.getpid()}/maps") as maps:
        return any(line.rstrip().endswith(str(path)) for line in maps)


def _args(cfg):
    return (cfg.model, 10, cfg.seed, cfg.data.image_fill, cfg.data.text_fill)


def test_the_first_caller_builds_and_every_caller_maps_the_same_values(make_config, tmp_path):
    cfg = make_config()
    built = []

    def build():
        built.append(build_backbone(*_args(cfg)))
        return built[-1]

    key = frozen_key(flatten(cfg.model, "model."), *_args(cfg)[1:])
    first = shared(tmp_path, key, build)
    second = shared(tmp_path, key, build)
    assert len(built) == 1  # the second caller found the file
    path = tmp_path / f"{key}.pt"
    assert path.is_file() and _mapped(path)
    ref = built[0].model.state_dict()
    for loaded in (first, second):
        assert loaded.model is not built[0].model  # a copy mapped from the file
        sd = loaded.model.state_dict()
        assert sd.keys() == ref.keys()
        for k in ref:
            assert torch.equal(sd[k], ref[k]), k
        assert not any(p.requires_grad for p in loaded.model.parameters())
        assert loaded.target_modules == built[0].target_modules
        assert loaded.max_rank == built[0].max_rank


def test_a_write_changes_only_the_writers_copy(make_config, tmp_path):
    cfg = make_config()
    key = "k" * 32
    a = shared(tmp_path, key, lambda: build_backbone(*_args(cfg)))
    b = shared(tmp_path, key, lambda: pytest.fail("built twice"))
    name, weight = next(iter(a.model.state_dict().items()))
    before = b.model.state_dict()[name].clone()
    weight.add_(1.0)  # in place, as FedEx-LoRA's residual is folded into a frozen weight
    assert torch.equal(b.model.state_dict()[name], before)
    c = shared(tmp_path, key, lambda: pytest.fail("built twice"))
    assert torch.equal(c.model.state_dict()[name], before)


def test_the_key_follows_every_input_of_the_build(make_config, tmp_path):
    cfg = make_config()
    model = flatten(cfg.model, "model.")
    base = frozen_key(model, 10, 0, "zeros", "placeholder")
    assert frozen_key(dict(model), 10, 0, "zeros", "placeholder") == base
    others = [
        frozen_key({**model, "model.head_hidden": 7}, 10, 0, "zeros", "placeholder"),
        frozen_key(model, 11, 0, "zeros", "placeholder"),
        frozen_key(model, 10, 1, "zeros", "placeholder"),
        frozen_key(model, 10, 0, "mean", "placeholder"),
        frozen_key(model, 10, 0, "zeros", "empty"),
    ]
    assert len({base, *others}) == 6
    # a local model directory: its files are part of the key
    local = tmp_path / "model"
    local.mkdir()
    (local / "config.json").write_text("{}")
    with_dir = {**model, "model.name_or_path": str(local)}
    k1 = frozen_key(with_dir, 10, 0, "zeros", "placeholder")
    (local / "config.json").write_text('{"changed": true}')
    assert frozen_key(with_dir, 10, 0, "zeros", "placeholder") != k1


def test_drop_removes_the_files_and_the_mappings_stay_valid(make_config, tmp_path):
    cfg = make_config()
    loaded = shared(tmp_path / "frozen", "d" * 32, lambda: build_backbone(*_args(cfg)))
    total = sum(float(p.sum()) for p in loaded.model.parameters())
    assert drop(tmp_path / "frozen") == 1
    assert not (tmp_path / "frozen").exists()
    assert sum(float(p.sum()) for p in loaded.model.parameters()) == total
    assert drop(tmp_path / "frozen") == 0  # nothing left: not an error


def test_a_worker_on_the_shared_copy_trains_to_the_same_numbers(make_config, tmp_path):
    cfg = make_config()
    private = ClientWorker(cfg)
    mapped = ClientWorker(cfg, frozen_dir=tmp_path)
    assert len(list(tmp_path.glob("*.pt"))) == 1
    start = private.initial_global()
    assert start.keys() == mapped.initial_global().keys()
    assert all(torch.equal(start[k], v) for k, v in mapped.initial_global().items())
    for cid in (0, 5):  # the largest and the smallest rank
        task = ClientTask(cid, private.ranks[cid], 1)
        (report, ours, _), (_, theirs, _) = (
            w.train(task, Broadcast(start), None) for w in (private, mapped)
        )
        ours, theirs = ours.update, theirs.update
        assert ours.keys() == theirs.keys()
        for k in ours:
            assert torch.equal(ours[k], theirs[k]), k
