"""Checkpoints: lossless round trips, atomic writes, pruning, and the server's state dict."""

from __future__ import annotations

import json
import os

import pytest
import torch

from actors.server import ServerOptions, ServerState
from aggregation import FedAdam, get_merger
from fedsim.checkpoint import CheckpointWriter, join_tensors, load_checkpoint, split_tensors
from fedsim.config import ConfigError


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "private": {"m.lora_A.weight": torch.randn(4, 6, generator=g)},
        "scaffold_c": {"m.lora_B.weight": torch.randn(6, 4, generator=g, dtype=torch.float64)},
    }


def test_split_and_join_round_trip_nested_values():
    obj = {
        "a": torch.arange(6).reshape(2, 3),
        "b": None,
        "c": [torch.ones(2, dtype=torch.bfloat16), {"d": 3, "e": "x"}],
        "f": {},
    }
    skeleton, tensors = split_tensors(obj)
    json.dumps(skeleton)  # the rest is plain JSON
    back = join_tensors(skeleton, tensors)
    assert torch.equal(back["a"], obj["a"]) and back["b"] is None and back["f"] == {}
    assert back["c"][0].dtype == torch.bfloat16 and back["c"][1] == {"d": 3, "e": "x"}


def test_split_rejects_keys_that_would_be_ambiguous():
    with pytest.raises(ValueError, match="without '/'"):
        split_tensors({"a/b": torch.zeros(1)})


def _save_rounds(tmp_path, rounds, keep=2):
    writer = CheckpointWriter(tmp_path, keep=keep)
    server = {"global": {"w": torch.zeros(3)}, "steps": 0}
    for t in rounds:
        server = {"global": {"w": torch.full((3,), float(t))}, "steps": t}
        # client t % 3 changes each round; client 5 has an empty state
        writer.save(t, server, {t % 3: _state(t), 5: {"private": {}}}, {"history": list(range(t))})
    return writer


def test_latest_checkpoint_holds_every_clients_latest_state(tmp_path):
    _save_rounds(tmp_path, range(0, 5))
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.round == 4 and ckpt.meta["history"] == [0, 1, 2, 3]
    assert torch.equal(ckpt.server["global"]["w"], torch.full((3,), 4.0))
    assert ckpt.server["steps"] == 4
    # client 0 last changed in round 3, client 1 in round 4, client 2 in round 2
    for cid, t in [(0, 3), (1, 4), (2, 2)]:
        want = _state(t)
        got = ckpt.clients[cid]
        assert torch.equal(got["private"]["m.lora_A.weight"], want["private"]["m.lora_A.weight"])
        assert got["scaffold_c"]["m.lora_B.weight"].dtype == torch.float64
        assert torch.equal(
            got["scaffold_c"]["m.lora_B.weight"], want["scaffold_c"]["m.lora_B.weight"]
        )
    assert 5 not in ckpt.clients  # nothing to store


def test_old_checkpoints_and_unreferenced_client_files_are_pruned(tmp_path):
    _save_rounds(tmp_path, range(0, 6), keep=2)
    assert sorted(p.name for p in tmp_path.glob("round_*")) == ["round_00004", "round_00005"]
    files = sorted(p.name for p in (tmp_path / "clients").iterdir())
    # round 4's checkpoint names c0 (round 3), c1 (round 4), c2 (round 2); round 5's adds c2 r5
    assert files == [
        "c000000_r00003.safetensors",
        "c000001_r00004.safetensors",
        "c000002_r00002.safetensors",
        "c000002_r00005.safetensors",
    ]


def test_a_write_killed_half_way_leaves_the_previous_checkpoint(tmp_path):
    _save_rounds(tmp_path, range(0, 3))
    # what a kill during round 3's save leaves: a temp dir and a client file, latest unchanged
    (tmp_path / ".round_00003.tmp").mkdir()
    (tmp_path / ".round_00003.tmp" / "state.json").write_text("{trunc")
    (tmp_path / "clients" / "c000000_r00003.safetensors").write_bytes(b"partial")
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.round == 2
    assert torch.equal(
        ckpt.clients[0]["private"]["m.lora_A.weight"], _state(0)["private"]["m.lora_A.weight"]
    )
    # the resumed run writes round 3 again over the debris
    writer = CheckpointWriter(
        tmp_path, keep=2, client_files={int(c): f for c, f in ckpt.meta["client_files"].items()}
    )
    writer.save(3, {"global": {"w": torch.ones(3)}}, {0: _state(33)}, {})
    again = load_checkpoint(tmp_path)
    assert again.round == 3
    assert torch.equal(
        again.clients[0]["private"]["m.lora_A.weight"], _state(33)["private"]["m.lora_A.weight"]
    )
    assert torch.equal(
        again.clients[1]["private"]["m.lora_A.weight"], _state(1)["private"]["m.lora_A.weight"]
    )
    assert not (tmp_path / ".round_00003.tmp").exists()


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda d: None, "no such run directory"),
        (lambda d: os.remove(d / "latest.json"), "no latest.json"),
        (lambda d: (d / "latest.json").write_text("{"), "cannot read the checkpoint"),
        (
            lambda d: (d / "clients" / "c000001_r00001.safetensors").write_bytes(b"xx"),
            "c000001_r00001.safetensors",
        ),
    ],
)
def test_unusable_checkpoints_raise_config_errors_naming_the_file(tmp_path, damage, words):
    run_dir = tmp_path / "run"
    _save_rounds(run_dir, range(0, 2))
    target = tmp_path / "elsewhere" if "no such" in words else run_dir
    damage(run_dir)
    with pytest.raises(ConfigError) as info:
        load_checkpoint(target)
    assert words in str(info.value) and info.value.key == "--resume"


def _server(seed: int) -> ServerState:
    g = torch.Generator().manual_seed(seed)
    initial = {
        "m.lora_A.weight": torch.randn(4, 6, generator=g),
        "m.lora_B.weight": torch.zeros(6, 4),
    }
    options = ServerOptions(shared=tuple(initial), optimizer=FedAdam(lr=0.1))
    return ServerState(get_merger("fedilora"), initial, options)


def _updates(round_idx: int) -> list[dict]:
    g = torch.Generator().manual_seed(100 + round_idx)
    return [
        {
            "m.lora_A.weight": torch.randn(r, 6, generator=g),
            "m.lora_B.weight": torch.randn(6, r, generator=g),
        }
        for r in (4, 2)
    ]


def test_server_state_dict_resumes_the_same_trajectory(tmp_path):
    """Three merges straight equal two merges, a checkpoint, a fresh server and one more."""
    meta = [(0, 4, 10, 5), (1, 2, 30, 5)]
    straight = _server(0)
    for t in (1, 2, 3):
        straight.aggregate(t, meta, _updates(t))
    first = _server(0)
    for t in (1, 2):
        first.aggregate(t, meta, _updates(t))
    CheckpointWriter(tmp_path).save(2, first.state_dict(), {}, {})
    second = _server(0)
    second.load_state_dict(load_checkpoint(tmp_path).server)
    second.aggregate(3, meta, _updates(3))
    for k, v in straight.get_global().items():
        assert torch.equal(second.get_global()[k], v), k
    assert second.options.optimizer.steps == 3


def test_server_rejects_a_checkpoint_of_another_shape():
    server = _server(0)
    state = server.state_dict()
    state["global"] = {"m.lora_A.weight": torch.zeros(2, 6), "m.lora_B.weight": torch.zeros(6, 2)}
    with pytest.raises(ValueError, match="does not fit"):
        server.load_state_dict(state)
