"""Atomic, verified per-round checkpoints in safetensors and JSON (never pickle).

A run directory holds::

    config.yaml                  the resolved config of the run
    latest.json                  {"round": t, "dir": "round_0000t"}, replaced atomically
    round_0000t/server.safetensors   global adapter, server-optimiser moments, SCAFFOLD's
                                 server variate, FLoRA's base updates and stacked factors
    round_0000t/state.json       round, client ranks, RNG scheme, history, counters, the
                                 tensor-free part of the server state, client state files,
                                 a sha256 per tensor file and the run's config (see below)
    clients/c000042_r0000t.safetensors   one client's persistent state, written the round it
                                 changed (a round writes only the clients it sampled)

A checkpoint directory is written under a temporary name and renamed into place, then
``latest.json`` is replaced: a run killed at any instant leaves the previous checkpoint intact.
Old checkpoints beyond ``checkpoint.keep`` and client files no kept checkpoint names are removed.
A write that fails (a full disk, a directory made read-only or removed) is
:class:`CheckpointWriteFailed`, naming the directory and the last checkpoint that
``latest.json`` still points at, which stays whole and resumable.

The format of ``state.json`` and the checks :func:`load_checkpoint` runs live in
:mod:`fedsim.checkpoint.format`.
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
from safetensors.torch import save_file

from fedsim.checkpoint.format import (
    FORMAT,
    MISSING,
    RESUMABLE,
    canonical,
    check_pointer,
    check_state,
    config_record,
    fail,
    file_digest,
    inside,
    is_resumable,
    join_checked,
    join_tensors,
    load_tensors,
    read_json,
    sha256_file,
    show,
    split_tensors,
    unflatten,
)
from fedsim.config import ConfigError, FedSimConfig
from fedsim.errors import RunFailed, one_line

__all__ = [
    "FORMAT",
    "RESUMABLE",
    "Checkpoint",
    "CheckpointWriteFailed",
    "CheckpointWriter",
    "check_resume_config",
    "config_record",
    "is_resumable",
    "join_tensors",
    "load_checkpoint",
    "relabel_run",
    "split_tensors",
]

# What a write that the disk refuses raises: the OS's error, or safetensors' own (it wraps the
# OS error of its temporary file).
_WRITE_ERRORS = (OSError, SafetensorError)


class CheckpointWriteFailed(RunFailed):
    """A checkpoint could not be written; the message names the directory, the reason and the
    last checkpoint written (which a resume continues from)."""


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


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> str:
    """Write ``tensors`` to ``path`` durably; return the sha256 of the bytes on disk."""
    save_file(tensors, str(path))
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())
        return file_digest(fh)


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
        meta: everything else in ``state.json`` (history, ranks, counters, MLflow run,
            client files, digests, the config record).
        path: the checkpoint directory it came from.
    """

    round: int
    server: dict
    clients: dict[int, dict]
    meta: dict
    path: Path


# What the writer puts in state.json itself; the driver's meta may not name them.
_WRITER_FIELDS = frozenset({"format", "round", "server", "client_files", "digests", "config"})


@dataclass
class CheckpointWriter:
    """Writes a run's checkpoints under ``run_dir``, keeping the last ``keep``.

    Args:
        run_dir: the run's directory (created).
        keep: how many checkpoints to keep.
        client_files: client id to its current state file (from a resumed checkpoint).
        config: the run's resolved config; every checkpoint records its non-resumable keys.
        client_digests: the sha256 of each file of ``client_files`` (a resumed checkpoint's
            ``digests``, verified by :func:`load_checkpoint`); a file without one is read
            and digested here.

    Raises:
        ConfigError: a client file of ``client_files`` without a digest cannot be read.
    """

    run_dir: Path
    keep: int = 2
    client_files: dict[int, str] = field(default_factory=dict)
    config: FedSimConfig = field(kw_only=True)
    client_digests: dict[str, str] = field(default_factory=dict, kw_only=True)
    _digests: dict[str, str] = field(default_factory=dict, init=False, repr=False)
    _record: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        (self.run_dir / "clients").mkdir(parents=True, exist_ok=True)
        self._record = config_record(self.config)
        # Later checkpoints keep naming a resumed run's files: take their verified digests.
        for name in self.client_files.values():
            if name in self.client_digests:
                self._digests[name] = self.client_digests[name]
                continue
            path = self.run_dir / "clients" / name
            try:
                self._digests[name] = sha256_file(path)
            except OSError as exc:
                raise ConfigError("--resume", f"cannot read client state {path}: {exc}") from None

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
            meta: JSON-serialisable driver state (the fields of the format above).

        Returns:
            The checkpoint directory.

        Raises:
            ValueError: ``meta`` names a field the writer writes.
            CheckpointWriteFailed: the disk refused a write (full, read-only, a directory
                gone); the previous checkpoint is untouched.
        """
        clash = _WRITER_FIELDS & set(meta)
        if clash:
            raise ValueError(f"checkpoint meta may not set {sorted(clash)}: the writer does")
        try:
            return self._save(round_idx, server, changed_clients, meta)
        except _WRITE_ERRORS as exc:
            shutil.rmtree(self.run_dir / f".round_{round_idx:05d}.tmp", ignore_errors=True)
            raise CheckpointWriteFailed(_write_failure(self.run_dir, round_idx, exc)) from None

    def _save(
        self, round_idx: int, server: dict, changed_clients: dict[int, dict | None], meta: dict
    ) -> Path:
        files = dict(self.client_files)
        for cid, state in sorted(changed_clients.items()):
            skeleton, tensors = split_tensors(state or {})
            if not tensors:
                files.pop(cid, None)
                continue
            name = f"c{cid:06d}_r{round_idx:05d}.safetensors"
            self._digests[name] = _save_tensors(tensors, self.run_dir / "clients" / name)
            files[cid] = name
        _fsync_dir(self.run_dir / "clients")
        final = self.run_dir / f"round_{round_idx:05d}"
        tmp = self.run_dir / f".round_{round_idx:05d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        skeleton, tensors = split_tensors(server)
        digests = {"server.safetensors": _save_tensors(tensors, tmp / "server.safetensors")}
        names = sorted(set(files.values()))
        digests.update({f"clients/{name}": self._digests[name] for name in names})
        state = {
            "format": FORMAT,
            "round": round_idx,
            "server": skeleton,
            "client_files": {str(c): f for c, f in sorted(files.items())},
            **meta,
            "digests": digests,
            "config": self._record,
        }
        _write_bytes(tmp / "state.json", json.dumps(state).encode())
        _fsync_dir(tmp)
        if final.exists():  # a resumed run re-doing a round it had not recorded as latest
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.run_dir)
        _replace_json(self.run_dir / "latest.json", {"round": round_idx, "dir": final.name})
        self.client_files = files
        self._digests = {name: self._digests[name] for name in names}
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
                referenced |= {v for v in saved.values() if isinstance(v, str)}
            except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
                continue  # not ours to judge here; load_checkpoint says what is wrong
        for path in (self.run_dir / "clients").glob("*.safetensors"):
            if path.name not in referenced:
                path.unlink(missing_ok=True)


def _write_failure(run_dir: Path, round_idx: int, exc: BaseException) -> str:
    """Why round ``round_idx``'s checkpoint is not on disk, and which one is."""
    if isinstance(exc, OSError) and exc.strerror:
        reason = f"{exc.strerror} ({exc.filename})" if exc.filename else exc.strerror
    else:
        reason = one_line(exc, 200)
    try:
        last = json.loads((run_dir / "latest.json").read_text())["round"]
        kept = f"round {last} is the last checkpoint written"
    except (OSError, ValueError, KeyError, TypeError):
        kept = "no checkpoint of this run is readable"
    return f"cannot write the checkpoint of round {round_idx} in {run_dir}: {reason}; {kept}"


def relabel_run(ckpt: Checkpoint, run_id: str, tracking_uri: str) -> None:
    """Make a checkpoint name another MLflow run (``fedsim run --resume --new-run``): its
    ``state.json`` is replaced, atomically, with ``mlflow_run_id`` and ``tracking_uri`` changed
    (no tensor file changes, so every digest still holds).

    Raises:
        CheckpointWriteFailed: the checkpoint's directory refused the write.
    """
    state_file = ckpt.path / "state.json"
    try:
        state = json.loads(state_file.read_text())
        state.update(mlflow_run_id=run_id, tracking_uri=tracking_uri)
        tmp = state_file.with_name(".state.json.tmp")
        _write_bytes(tmp, json.dumps(state).encode())
        os.replace(tmp, state_file)
        _fsync_dir(ckpt.path)
    except OSError as exc:
        raise CheckpointWriteFailed(_write_failure(ckpt.path.parent, ckpt.round, exc)) from None


def load_checkpoint(run_dir: str | Path) -> Checkpoint:
    """Load and verify the latest checkpoint of a run directory.

    Raises:
        ConfigError: on ``--resume``, naming the file: the directory, its ``latest.json`` or a
            file it names is missing or unreadable, a field is missing or of another type, a
            path resolves outside its directory, a tensor file does not match its digest or
            holds NaN/Inf, the server file does not hold the tensors the state names, or the
            checkpoint was written by another fedsim format.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError("--resume", f"no such run directory: {run_dir}")
    latest = run_dir / "latest.json"
    if not latest.is_file():
        raise ConfigError(
            "--resume", f"{run_dir} has no latest.json: no round of this run was checkpointed"
        )
    root = run_dir.resolve()
    pointer = read_json(latest, root)
    round_idx, name = check_pointer(pointer, latest)
    path = run_dir / name
    if not path.is_dir():
        fail(latest, f"names {name}, which is not a directory of {run_dir}")
    path_root = inside(path, root, latest)
    state_file = path / "state.json"
    state = read_json(state_file, path_root)
    check_state(state, state_file, round_idx)
    digests = state["digests"]

    server_file = path / "server.safetensors"
    tensors = load_tensors(server_file, path_root, digests["server.safetensors"])
    server = join_checked(state.pop("server"), tensors, server_file)

    clients_dir = run_dir / "clients"
    clients_root = inside(clients_dir, root, clients_dir)
    clients = {}
    for cid, file_name in state["client_files"].items():
        file = clients_dir / file_name
        flat = load_tensors(file, clients_root, digests[f"clients/{file_name}"])
        clients[int(cid)] = unflatten(flat, file)
    return Checkpoint(state.pop("round"), server, clients, state, path)


def check_resume_config(ckpt: Checkpoint, cfg: FedSimConfig) -> None:
    """Refuse to resume under a config that differs from the run's in a non-resumable key.

    Args:
        ckpt: the checkpoint being resumed (its ``config`` record).
        cfg: the config the resumed run would use (``config.yaml`` and the overrides).

    Raises:
        ConfigError: on the first differing key in sorted order (``config.yaml`` was edited),
            or on ``--resume`` when the checkpoint's ranks or clients do not fit ``cfg``.
    """
    saved = ckpt.meta["config"]["values"]
    now = config_record(cfg)["values"]
    where = ckpt.path.parent / "config.yaml"
    for key in sorted(saved.keys() | now.keys()):
        before, after = saved.get(key, MISSING), now.get(key, MISSING)
        if before is MISSING or after is MISSING or canonical(before) != canonical(after):
            raise ConfigError(
                key,
                f"was {show(before)} when the run started and is {show(after)} in {where}; "
                "a resumed run cannot change it (it would change the run's numbers or identity); "
                "restore it or start a new run",
            )
    state_file = ckpt.path / "state.json"
    ranks = ckpt.meta["ranks"]
    if len(ranks) != cfg.clients.num:
        fail(state_file, f"ranks has {len(ranks)} entries but clients.num is {cfg.clients.num}")
    stray = sorted(c for c in ckpt.clients if c >= cfg.clients.num)
    if stray:
        fail(
            state_file, f"holds the state of client {stray[0]} but clients.num is {cfg.clients.num}"
        )
