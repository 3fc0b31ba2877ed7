"""Atomic per-round checkpoints in safetensors and JSON (never pickle).

A run directory holds::

    config.yaml                  the resolved config of the run
    latest.json                  {"round": t, "dir": "round_0000t"}, replaced atomically
    round_0000t/server.safetensors   global adapter, server-optimiser moments, SCAFFOLD's
                                 server variate, FLoRA's base updates and stacked factors
    round_0000t/state.json       round, client ranks, RNG scheme, history, counters, the
                                 tensor-free part of the server state, client state files
    clients/c000042_r0000t.safetensors   one client's persistent state, written the round it
                                 changed (a round writes only the clients it sampled)

A checkpoint directory is written under a temporary name and renamed into place, then
``latest.json`` is replaced: a run killed at any instant leaves the previous checkpoint intact.
Old checkpoints beyond ``checkpoint.keep`` and client files no kept checkpoint names are removed.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedsim.config import ConfigError

FORMAT = 1
_TENSOR = "__tensor__"


def split_tensors(obj: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Separate the tensors of a nested dict/list structure from the rest.

    Returns:
        ``(skeleton, tensors)``: the structure with each tensor replaced by
        ``{"__tensor__": path}`` (JSON-serialisable if the other leaves are), and the tensors
        by path.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            tensors[path] = x.detach().cpu().contiguous().clone()
            return {_TENSOR: path}
        if isinstance(x, dict):
            for k in x:
                if not isinstance(k, str) or "/" in k:
                    raise ValueError(f"checkpoint keys must be strings without '/', got {k!r}")
            return {k: walk(v, f"{path}/{k}" if path else k) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v, f"{path}/{i}" if path else str(i)) for i, v in enumerate(x)]
        return x

    return walk(obj, prefix), tensors


def join_tensors(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`split_tensors`."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {_TENSOR}:
            return tensors[skeleton[_TENSOR]]
        return {k: join_tensors(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [join_tensors(v, tensors) for v in skeleton]
    return skeleton


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - some filesystems cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, str(path))
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _replace_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    _write_bytes(tmp, json.dumps(obj, indent=1).encode())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        round: the last completed round.
        server: the server state (see ``ServerState.state_dict``).
        clients: client id to its persistent state, for clients that have one.
        meta: everything else the driver saved (history, ranks, counters, MLflow run).
        path: the checkpoint directory it came from.
    """

    round: int
    server: dict
    clients: dict[int, dict]
    meta: dict
    path: Path


@dataclass
class CheckpointWriter:
    """Writes a run's checkpoints under ``run_dir``, keeping the last ``keep``.

    Args:
        run_dir: the run's directory (created).
        keep: how many checkpoints to keep.
        client_files: client id to its current state file (from a resumed checkpoint).
    """

    run_dir: Path
    keep: int = 2
    client_files: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        (self.run_dir / "clients").mkdir(parents=True, exist_ok=True)

    def write_config(self, yaml_text: str) -> None:
        path = self.run_dir / "config.yaml"
        tmp = path.with_name(".config.yaml.tmp")
        _write_bytes(tmp, yaml_text.encode())
        os.replace(tmp, path)

    def save(
        self, round_idx: int, server: dict, changed_clients: dict[int, dict | None], meta: dict
    ) -> Path:
        """Write the checkpoint of round ``round_idx`` atomically.

        Args:
            round_idx: the completed round.
            server: the server's state dict (tensors and plain values).
            changed_clients: the clients whose state changed this round, to their new state.
            meta: JSON-serialisable driver state.

        Returns:
            The checkpoint directory.
        """
        files = dict(self.client_files)
        for cid, state in sorted(changed_clients.items()):
            skeleton, tensors = split_tensors(state or {})
            if not tensors:
                files.pop(cid, None)
                continue
            name = f"c{cid:06d}_r{round_idx:05d}.safetensors"
            _save_tensors(tensors, self.run_dir / "clients" / name)
            files[cid] = name
        _fsync_dir(self.run_dir / "clients")
        final = self.run_dir / f"round_{round_idx:05d}"
        tmp = self.run_dir / f".round_{round_idx:05d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        skeleton, tensors = split_tensors(server)
        _save_tensors(tensors, tmp / "server.safetensors")
        state = {
            "format": FORMAT,
            "round": round_idx,
            "server": skeleton,
            "client_files": {str(c): f for c, f in sorted(files.items())},
            **meta,
        }
        _write_bytes(tmp / "state.json", json.dumps(state).encode())
        _fsync_dir(tmp)
        if final.exists():  # a resumed run re-doing a round it had not recorded as latest
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.run_dir)
        _replace_json(self.run_dir / "latest.json", {"round": round_idx, "dir": final.name})
        self.client_files = files
        self._prune()
        return final

    def _prune(self) -> None:
        rounds = sorted(self.run_dir.glob("round_*"))
        for old in rounds[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        referenced = set(self.client_files.values())
        for kept in rounds[-self.keep :]:
            try:
                saved = json.loads((kept / "state.json").read_text())["client_files"]
                referenced |= set(saved.values())
            except (OSError, ValueError, KeyError):
                continue
        for path in (self.run_dir / "clients").glob("*.safetensors"):
            if path.name not in referenced:
                path.unlink(missing_ok=True)


def load_checkpoint(run_dir: str | Path) -> Checkpoint:
    """Load the latest complete checkpoint of a run directory.

    Raises:
        ConfigError: the directory, its ``latest.json`` or a file it names is missing or
            unreadable (the message names the file).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError("--resume", f"no such run directory: {run_dir}")
    latest = run_dir / "latest.json"
    if not latest.is_file():
        raise ConfigError(
            "--resume", f"{run_dir} has no latest.json: no round of this run was checkpointed"
        )
    try:
        pointer = json.loads(latest.read_text())
        path = run_dir / pointer["dir"]
        state = json.loads((path / "state.json").read_text())
        tensors = load_file(str(path / "server.safetensors"))
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise ConfigError("--resume", f"cannot read the checkpoint in {run_dir}: {exc}") from None
    if state.get("format") != FORMAT:
        raise ConfigError(
            "--resume", f"{path / 'state.json'} has format {state.get('format')}, not {FORMAT}"
        )
    server = join_tensors(state.pop("server"), tensors)
    clients = {}
    for cid, name in state["client_files"].items():
        file = run_dir / "clients" / name
        try:
            flat = load_file(str(file))
        except (OSError, ValueError, SafetensorError) as exc:
            raise ConfigError("--resume", f"cannot read client state {file}: {exc}") from None
        clients[int(cid)] = _unflatten(flat)
    return Checkpoint(int(state.pop("round")), server, clients, state, path)


def _unflatten(flat: dict[str, torch.Tensor]) -> dict:
    out: dict = {}
    for path, tensor in flat.items():
        node = out
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = tensor
    return out
