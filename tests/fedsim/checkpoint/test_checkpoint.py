"""Checkpoints: lossless round trips, atomic writes, pruning, the server's state dict, and the
verification of everything a resume reads (schema, digests, paths, finite tensors, config)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from actors.server import ServerState
from aggregation import FedAdam, get_merger
from fedsim.checkpoint.disk import (
    CheckpointWriter,
    check_resume_config,
    is_resumable,
    join_tensors,
    load_checkpoint,
    split_tensors,
)
from fedsim.config import ConfigError, FedSimConfig, load_config, to_yaml
from fedsim.messages import ClientMeta, Upload

CFG = FedSimConfig()


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


def _meta(t: int, cfg: FedSimConfig = CFG) -> dict:
    """The driver's part of state.json after round ``t`` (what ``RoundLoop._checkpoint`` saves)."""
    return {
        "ranks": [4] * cfg.clients.num,
        "history": [{"round": r, "global/loss": 1.0 / (r + 1)} for r in range(t + 1)],
        "clients": [[{"client_id": 0, "status": "ok"}] for _ in range(t + 1)],
        "totals": {"upload_bytes": 10 * t, "download_bytes": 20 * t, "simulated_s": 0.5 * t},
        "mlflow_run_id": "0123abcd",
        "tracking_uri": "sqlite:///mlflow.db",
        "rng": {"seed": cfg.seed, "next_round": t + 1},
    }


def _save_rounds(tmp_path, rounds, keep=2):
    writer = CheckpointWriter(tmp_path, keep=keep, config=CFG)
    writer.write_config(to_yaml(CFG))
    server = {"global": {"w": torch.zeros(3)}, "steps": 0}
    for t in rounds:
        server = {"global": {"w": torch.full((3,), float(t))}, "steps": t}
        # client t % 3 changes each round; client 5 has an empty state
        writer.save(t, server, {t % 3: _state(t), 5: {"private": {}}}, _meta(t))
    return writer


def test_latest_checkpoint_holds_every_clients_latest_state(tmp_path):
    _save_rounds(tmp_path, range(0, 5))
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.round == 4 and [h["round"] for h in ckpt.meta["history"]] == [0, 1, 2, 3, 4]
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
        tmp_path,
        keep=2,
        client_files={int(c): f for c, f in ckpt.meta["client_files"].items()},
        config=CFG,
    )
    writer.save(3, {"global": {"w": torch.ones(3)}}, {0: _state(33)}, _meta(3))
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
    return ServerState(get_merger("fedilora"), initial, FedAdam(lr=0.1), [], 2)


def _updates(round_idx: int) -> list[Upload]:
    g = torch.Generator().manual_seed(100 + round_idx)
    return [
        Upload(
            {
                "m.lora_A.weight": torch.randn(r, 6, generator=g),
                "m.lora_B.weight": torch.randn(6, r, generator=g),
            }
        )
        for r in (4, 2)
    ]


def test_server_state_dict_resumes_the_same_trajectory(tmp_path):
    """Three merges straight equal two merges, a checkpoint, a fresh server and one more."""
    meta = [ClientMeta(0, 4, 10, 5), ClientMeta(1, 2, 30, 5)]
    straight = _server(0)
    for t in (1, 2, 3):
        straight.aggregate(t, meta, _updates(t))
    first = _server(0)
    for t in (1, 2):
        first.aggregate(t, meta, _updates(t))
    CheckpointWriter(tmp_path, config=CFG).save(2, first.state_dict(), {}, _meta(2))
    second = _server(0)
    second.load_state_dict(load_checkpoint(tmp_path).server)
    second.aggregate(3, meta, _updates(3))
    for k, v in straight.get_global().items():
        assert torch.equal(second.get_global()[k], v), k
    assert second.optimizer.steps == 3


def test_server_rejects_a_checkpoint_of_another_shape():
    server = _server(0)
    state = server.state_dict()
    state["global"] = {"m.lora_A.weight": torch.zeros(2, 6), "m.lora_B.weight": torch.zeros(6, 2)}
    with pytest.raises(ValueError, match="does not fit"):
        server.load_state_dict(state)


# --- verification: what a resume refuses ----------------------------------------------------


def _run(tmp_path) -> Path:
    """A run directory at round 2 (keep=3): clients 0, 1, 2 hold state from rounds 0, 1, 2."""
    run_dir = tmp_path / "run"
    _save_rounds(run_dir, range(0, 3), keep=3)
    return run_dir


def _refused(run_dir, *words) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_checkpoint(run_dir)
    message = str(info.value)
    assert info.value.key == "--resume" and "\n" not in message
    for word in words:
        assert word in message, message
    return info.value


def _edit_json(path: Path, edit) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "pointer, words",
    [
        ({"round": 2, "dir": "../../../../etc"}, 'dir must be "round_00002"'),
        ({"round": 2, "dir": "/etc"}, "/etc"),
        ({"round": 2, "dir": "round_00002/../../x"}, "dir must be"),
        ({"round": 2, "dir": "round_00001"}, 'dir must be "round_00002"'),
        ({"round": 7, "dir": "round_00007"}, "not a directory"),
        ({"round": "2", "dir": "round_00002"}, "round must be an integer"),
        ({"round": True, "dir": "round_00001"}, "round must be an integer"),
        ({"round": -1, "dir": "round_-0001"}, "round must be an integer >= 0"),
        ({"round": 2.0, "dir": "round_00002"}, "round must be an integer"),
        ({"dir": "round_00002"}, "round must be"),
        ({"round": 2}, "dir must be"),
        ({"round": 2, "dir": 2}, "dir must be"),
        ({"round": 2, "dir": "round_00002", "more": 1}, "unknown field 'more'"),
        ([2, "round_00002"], "must be an object"),
        ("round_00002", "must be an object"),
    ],
)
def test_latest_json_that_points_anywhere_else_is_refused(tmp_path, pointer, words):
    run_dir = _run(tmp_path)
    (run_dir / "latest.json").write_text(json.dumps(pointer))
    _refused(run_dir, "latest.json", words)


@pytest.mark.parametrize(
    "text, words",
    [
        ('{"round": 2, "dir": "round_0', "cannot read the checkpoint file"),
        ("[" * 100_000 + "]" * 100_000, "nests too deeply"),
        ("[" * 100 + "]" * 100, "nests deeper than"),
        ("", "cannot read the checkpoint file"),
    ],
)
@pytest.mark.parametrize("file", ["latest.json", "round_00002/state.json"])
def test_malformed_json_is_a_config_error_not_a_traceback(tmp_path, file, text, words):
    run_dir = _run(tmp_path)
    (run_dir / file).write_text(text)
    _refused(run_dir, file.split("/")[-1], words)


def test_state_json_bytes_that_are_not_utf8_are_refused(tmp_path):
    run_dir = _run(tmp_path)
    (run_dir / "round_00002" / "state.json").write_bytes(b"\xff\xfe\xfa{")
    _refused(run_dir, "state.json", "cannot read")


def test_a_round_directory_linked_outside_the_run_is_refused(tmp_path):
    run_dir = _run(tmp_path)
    outside = tmp_path / "outside"
    (run_dir / "round_00002").rename(outside)
    (run_dir / "round_00002").symlink_to(outside, target_is_directory=True)
    _refused(run_dir, "latest.json", "outside")


def test_a_latest_json_linked_outside_the_run_is_refused(tmp_path):
    run_dir = _run(tmp_path)
    (run_dir / "latest.json").rename(tmp_path / "latest.json")
    (run_dir / "latest.json").symlink_to(tmp_path / "latest.json")
    _refused(run_dir, "latest.json", "outside")


STATE_FIELDS = [
    "format",
    "round",
    "server",
    "client_files",
    "ranks",
    "history",
    "clients",
    "totals",
    "mlflow_run_id",
    "tracking_uri",
    "rng",
    "digests",
    "config",
]


@pytest.mark.parametrize("name", STATE_FIELDS)
def test_state_json_missing_a_field_is_refused_naming_it(tmp_path, name):
    run_dir = _run(tmp_path)
    _edit_json(run_dir / "round_00002" / "state.json", lambda s: s.pop(name))
    _refused(run_dir, "state.json", name)


@pytest.mark.parametrize(
    "name, value",
    [
        ("round", "2"),
        ("round", None),
        ("server", []),
        ("client_files", ["c000000_r00000.safetensors"]),
        ("client_files", {"0": 7}),
        ("ranks", "4,4"),
        ("ranks", [4, 2.5]),
        ("ranks", [4, True]),
        ("history", {"round": 0}),
        ("history", [1, 2, 3]),
        ("history", [{"loss": 1}, {"round": 1}, {"round": 2}]),
        ("clients", [1, 2, 3]),
        ("clients", [[1], [], []]),
        ("totals", {"upload_bytes": "10", "download_bytes": 0, "simulated_s": 0}),
        ("totals", {"upload_bytes": 0, "download_bytes": 0}),
        ("totals", {"upload_bytes": 0, "download_bytes": 0, "simulated_s": 0, "x": 1}),
        ("mlflow_run_id", 12),
        ("mlflow_run_id", ""),
        ("tracking_uri", None),
        ("rng", {"seed": "0", "next_round": 3}),
        ("rng", [0, 3]),
        ("digests", {"server.safetensors": "abc"}),
        ("digests", []),
        ("config", {"digest": "0" * 64}),
        ("config", {"digest": "x", "values": {}}),
    ],
)
def test_state_json_field_of_another_type_is_refused_naming_it(tmp_path, name, value):
    run_dir = _run(tmp_path)
    _edit_json(run_dir / "round_00002" / "state.json", lambda s: s.update({name: value}))
    _refused(run_dir, "state.json", name)


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda s: s.update(round=1), "latest.json names round 2"),
        (lambda s: s["rng"].update(next_round=7), "rng.next_round"),
        (lambda s: s["rng"].update(seed=5), "rng.seed"),
        (lambda s: s["history"].pop(), "one entry per round"),
        (lambda s: s["config"]["values"].update(seed=5), "config.digest"),
        (lambda s: s["digests"].pop("clients/c000001_r00001.safetensors"), "digests lacks"),
        (lambda s: s["digests"].update({"clients/x": "0" * 64}), "does not hold"),
        (lambda s: s.update(format=[3]), "format must be 3"),
        (lambda s: s.update(format=4), "newer fedsim"),
    ],
)
def test_state_json_that_contradicts_itself_is_refused(tmp_path, edit, words):
    run_dir = _run(tmp_path)
    _edit_json(run_dir / "round_00002" / "state.json", edit)
    _refused(run_dir, "state.json", words)


@pytest.mark.parametrize("text", ["[]", "2", '"state"', "null"])
def test_state_json_that_is_not_an_object_is_refused(tmp_path, text):
    run_dir = _run(tmp_path)
    (run_dir / "round_00002" / "state.json").write_text(text)
    _refused(run_dir, "state.json", "must be a JSON object")


@pytest.mark.parametrize("fmt", [1, 2])
def test_an_older_format_is_refused_as_written_by_an_older_fedsim(tmp_path, fmt):
    run_dir = _run(tmp_path)
    _edit_json(run_dir / "round_00002" / "state.json", lambda s: s.update(format=fmt))
    _refused(run_dir, "state.json", "older fedsim", f"format {fmt}")


@pytest.mark.parametrize(
    "name",
    [
        "../../x.safetensors",
        "/etc/x.safetensors",
        "c000001_r00001.safetensors/../../../x.safetensors",
        "c000002_r00001.safetensors",  # another client's file
        "c0000001_r00001.safetensors",  # 7 digits for client 1
        "c000001_r00009.safetensors",  # a round after the checkpoint's
        "c000001_r00001.pt",
    ],
)
def test_client_file_names_are_confined_to_the_clients_directory(tmp_path, name):
    run_dir = _run(tmp_path)
    (tmp_path / "x.safetensors").write_bytes(b"not to be read")

    def edit(state):
        state["client_files"]["1"] = name
        state["digests"][f"clients/{name}"] = state["digests"].pop(
            "clients/c000001_r00001.safetensors"
        )

    _edit_json(run_dir / "round_00002" / "state.json", edit)
    _refused(run_dir, "state.json", "client_files['1']")


def test_a_client_id_that_is_not_a_plain_number_is_refused(tmp_path):
    run_dir = _run(tmp_path)

    def edit(state):
        state["client_files"]["01"] = state["client_files"].pop("1")

    _edit_json(run_dir / "round_00002" / "state.json", edit)
    _refused(run_dir, "state.json", "client_files['01']")


def test_a_client_file_linked_outside_the_run_is_refused(tmp_path):
    run_dir = _run(tmp_path)
    file = run_dir / "clients" / "c000001_r00001.safetensors"
    outside = tmp_path / "stolen.safetensors"
    file.rename(outside)  # the same bytes, so the digest alone would not notice
    file.symlink_to(outside)
    _refused(run_dir, "c000001_r00001.safetensors", "outside")


def test_a_clients_directory_linked_outside_the_run_is_refused(tmp_path):
    run_dir = _run(tmp_path)
    (run_dir / "clients").rename(tmp_path / "clients")
    (run_dir / "clients").symlink_to(tmp_path / "clients", target_is_directory=True)
    _refused(run_dir, "clients", "outside")


def test_a_symlink_loop_is_refused(tmp_path):
    run_dir = _run(tmp_path)
    file = run_dir / "clients" / "c000001_r00001.safetensors"
    file.unlink()
    file.symlink_to(file)
    _refused(run_dir, "c000001_r00001.safetensors")


def test_a_server_file_linked_outside_the_run_is_refused(tmp_path):
    run_dir = _run(tmp_path)
    file = run_dir / "round_00002" / "server.safetensors"
    file.rename(tmp_path / "server.safetensors")
    file.symlink_to(tmp_path / "server.safetensors")
    _refused(run_dir, "server.safetensors", "outside")


def test_the_digests_are_those_of_the_files_written(tmp_path):
    run_dir = _run(tmp_path)
    state = json.loads((run_dir / "round_00002" / "state.json").read_text())
    assert set(state["digests"]) == {
        "server.safetensors",
        "clients/c000000_r00000.safetensors",
        "clients/c000001_r00001.safetensors",
        "clients/c000002_r00002.safetensors",
    }
    for name, digest in state["digests"].items():
        folder = run_dir / "round_00002" if name == "server.safetensors" else run_dir
        assert _sha(folder / name) == digest, name


@pytest.mark.parametrize(
    "file", ["round_00002/server.safetensors", "clients/c000000_r00000.safetensors"]
)
def test_a_tensor_file_with_a_flipped_byte_fails_its_digest(tmp_path, file):
    run_dir = _run(tmp_path)
    path = run_dir / file
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor: still a valid safetensors file
    path.write_bytes(bytes(data))
    _refused(run_dir, path.name, "digest mismatch")


def test_a_reshaped_tensor_fails_its_digest(tmp_path):
    run_dir = _run(tmp_path)
    path = run_dir / "round_00002" / "server.safetensors"
    tensors = load_file(str(path))
    save_file({k: v.reshape(1, -1) for k, v in tensors.items()}, str(path))
    _refused(run_dir, "server.safetensors", "digest mismatch")


def _resave(run_dir: Path, edit) -> None:
    """Rewrite the server file through ``edit`` and fix its digest, as a careful forger would."""
    path = run_dir / "round_00002" / "server.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))
    _edit_json(
        run_dir / "round_00002" / "state.json",
        lambda s: s["digests"].update({"server.safetensors": _sha(path)}),
    )


def test_a_server_file_lacking_a_tensor_is_refused_naming_it(tmp_path):
    run_dir = _run(tmp_path)
    _resave(run_dir, lambda t: t.pop("global/w"))
    _refused(run_dir, "server.safetensors", "lacks tensor 'global/w'")


def test_a_server_file_with_an_extra_tensor_is_refused_naming_it(tmp_path):
    run_dir = _run(tmp_path)
    _resave(run_dir, lambda t: t.update({"global/extra": torch.zeros(2)}))
    _refused(run_dir, "server.safetensors", "holds tensor 'global/extra'")


def test_a_malformed_tensor_reference_is_refused(tmp_path):
    run_dir = _run(tmp_path)
    _edit_json(
        run_dir / "round_00002" / "state.json",
        lambda s: s["server"].update(steps={"__tensor__": 3}),
    )
    _refused(run_dir, "state.json", "malformed")


def test_a_file_that_is_not_safetensors_with_a_matching_digest_is_refused(tmp_path):
    run_dir = _run(tmp_path)
    path = run_dir / "clients" / "c000001_r00001.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")

    def edit(state):
        state["digests"]["clients/c000001_r00001.safetensors"] = _sha(path)

    _edit_json(run_dir / "round_00002" / "state.json", edit)
    _refused(run_dir, "c000001_r00001.safetensors", "cannot read the checkpoint file")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_non_finite_server_tensors_refuse_to_load(tmp_path, bad, dtype):
    w = torch.zeros(4, dtype=dtype)
    w[1] = bad
    writer = CheckpointWriter(tmp_path, config=CFG)
    writer.save(0, {"global": {"w": w}, "count": torch.arange(3)}, {}, _meta(0))
    kind = "1 NaN and 0 infinite" if bad != bad else "0 NaN and 1 infinite"
    _refused(tmp_path, "server.safetensors", "'global/w'", kind, "of 4")


def test_non_finite_client_tensors_refuse_to_load(tmp_path):
    state = _state(0)
    state["private"]["m.lora_A.weight"][0, :3] = float("nan")
    state["private"]["m.lora_A.weight"][1, 0] = float("inf")
    writer = CheckpointWriter(tmp_path, config=CFG)
    writer.save(0, {"w": torch.ones(2)}, {3: state}, _meta(0))
    _refused(
        tmp_path,
        "c000003_r00000.safetensors",
        "'private/m.lora_A.weight'",
        "3 NaN and 1 infinite value(s) of 24",
    )


def test_integer_tensors_need_no_finite_check(tmp_path):
    writer = CheckpointWriter(tmp_path, config=CFG)
    writer.save(0, {"n": torch.tensor([2**31, -1], dtype=torch.int64)}, {}, _meta(0))
    assert load_checkpoint(tmp_path).server["n"].tolist() == [2**31, -1]


def test_the_writer_will_not_let_meta_overwrite_its_own_fields(tmp_path):
    writer = CheckpointWriter(tmp_path, config=CFG)
    with pytest.raises(ValueError, match="digests"):
        writer.save(0, {}, {}, {**_meta(0), "digests": {}})


# --- the config a resumed run may not change -------------------------------------------------


@pytest.mark.parametrize(
    "key, resumable",
    [
        ("rounds", True),
        ("progress", True),
        ("resources.actors", True),
        ("resources.client.num_gpus", True),
        ("checkpoint.every", True),
        ("checkpoint.keep", True),
        ("tracking.uri", True),
        ("tracking.plots", True),
        ("tracking.experiment", False),
        ("tracking.run_name", False),
        ("tracking.parent_run_id", False),
        ("checkpoint.dir", False),
        ("seed", False),
        ("round.deadline_s", False),
        ("aggregation.method", False),
        ("faults.fail_prob", False),
    ],
)
def test_resumable_keys(key, resumable):
    assert is_resumable(key) is resumable


def test_state_json_records_the_non_resumable_config(tmp_path):
    run_dir = _run(tmp_path)
    config = load_checkpoint(run_dir).meta["config"]
    assert config["values"]["seed"] == 0 and config["values"]["aggregation.method"] == "fedilora"
    assert "rounds" not in config["values"] and "tracking.uri" not in config["values"]
    assert "tracking.experiment" in config["values"]
    assert len(config["digest"]) == 64


def _yaml_config(run_dir: Path, overrides=()) -> FedSimConfig:
    return load_config(run_dir / "config.yaml", list(overrides))


def test_the_config_yaml_of_a_run_resumes_under_its_own_record(tmp_path):
    run_dir = _run(tmp_path)
    check_resume_config(load_checkpoint(run_dir), _yaml_config(run_dir))


def test_a_float_key_spelt_as_an_int_is_the_same_value(tmp_path):
    cfg = dataclasses.replace(CFG, lora=dataclasses.replace(CFG.lora, alpha=16))
    writer = CheckpointWriter(tmp_path, config=cfg)
    writer.write_config(to_yaml(cfg))
    writer.save(0, {"w": torch.ones(1)}, {}, _meta(0, cfg))
    check_resume_config(load_checkpoint(tmp_path), _yaml_config(tmp_path))  # 16 and 16.0


@pytest.mark.parametrize(
    "overrides",
    [["rounds=20"], ["resources.actors=2"], ["progress=false", "checkpoint.keep=5"]],
)
def test_a_resume_may_change_the_resumable_keys(tmp_path, overrides):
    run_dir = _run(tmp_path)
    check_resume_config(load_checkpoint(run_dir), _yaml_config(run_dir, overrides))


@pytest.mark.parametrize(
    "key, line, before, after",
    [
        ("seed", "seed: 3", "0", "3"),
        ("aggregation.method", "aggregation:\n  method: zeropad", '"fedilora"', '"zeropad"'),
        ("tracking.experiment", "tracking:\n  experiment: other", '"fedsim"', '"other"'),
        ("clients.ranks", "clients:\n  ranks: equal:4", '"32,32,16', '"equal:4"'),
    ],
)
def test_an_edited_config_yaml_is_refused_naming_the_key(tmp_path, key, line, before, after):
    run_dir = _run(tmp_path)
    edited = tmp_path / "edited.yaml"
    edited.write_text(line + "\n")
    cfg = load_config(edited)  # what an edit of run_dir/config.yaml would load
    with pytest.raises(ConfigError) as info:
        check_resume_config(load_checkpoint(run_dir), cfg)
    message = str(info.value)
    assert info.value.key == key
    assert f"was {before}" in message and f"is {after}" in message
    assert str(run_dir / "config.yaml") in message and "start a new run" in message


def test_the_first_differing_key_in_sorted_order_is_named(tmp_path):
    run_dir = _run(tmp_path)
    (run_dir / "config.yaml").write_text(
        to_yaml(CFG).replace("seed: 0", "seed: 1").replace("method: fedilora", "method: zeropad")
    )
    with pytest.raises(ConfigError) as info:
        check_resume_config(load_checkpoint(run_dir), _yaml_config(run_dir))
    assert info.value.key == "aggregation.method"


def test_resume_refuses_an_edited_config_yaml_before_starting_anything(tmp_path):
    from fedsim.simulation.run import resume

    run_dir = _run(tmp_path)
    text = (run_dir / "config.yaml").read_text()
    (run_dir / "config.yaml").write_text(text.replace("seed: 0", "seed: 4"))
    with pytest.raises(ConfigError) as info:
        resume(run_dir, ["rounds=5"])
    assert info.value.key == "seed" and "was 0" in str(info.value)


def test_ranks_that_do_not_fit_the_clients_are_refused(tmp_path):
    run_dir = _run(tmp_path)
    ckpt = load_checkpoint(run_dir)
    ckpt.meta["ranks"] = ckpt.meta["ranks"][:3]
    with pytest.raises(ConfigError, match="ranks has 3 entries"):
        check_resume_config(ckpt, _yaml_config(run_dir))


@pytest.mark.parametrize(
    "merge, words",
    [
        ({"round": 1}, "merge must be a list"),
        ([{"coverage": [1]}], "merge must be a list"),
        ([{"round": 2}, {"round": 1}], "rounds ascending"),
        ([{"round": 1}, {"round": 1}], "rounds ascending"),
        ([{"round": 3}], "none after round 2"),
    ],
)
def test_state_json_with_a_bad_merge_field_is_refused(tmp_path, merge, words):
    run_dir = _run(tmp_path)
    _edit_json(run_dir / "round_00002" / "state.json", lambda s: s.update(merge=merge))
    _refused(run_dir, "state.json", words)


def test_merge_diagnostics_are_read_back_and_absent_ones_read_as_none(tmp_path):
    run_dir = _run(tmp_path)
    state = run_dir / "round_00002" / "state.json"
    _edit_json(state, lambda s: s.update(merge=[{"round": 1, "coverage": [2, 1]}]))
    assert load_checkpoint(run_dir).meta["merge"] == [{"round": 1, "coverage": [2, 1]}]
    # a checkpoint written before the diagnostics existed has no field at all
    _edit_json(state, lambda s: s.pop("merge"))
    assert load_checkpoint(run_dir).meta["merge"] == []
