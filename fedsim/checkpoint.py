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

``state.json`` (format 2) is one object::

    format         2
    round          int >= 0, the round latest.json names
    server         the server state with each tensor replaced by {"__tensor__": key}
    client_files   {"<client id>": "c<id:06d>_r<round:05d>.safetensors"}
    ranks          [int, ...]              history  [{"round": int, ...}, ...]
    clients        [[{...}, ...], ...]      (one list of client rows per history entry)
    totals         {"upload_bytes": n, "download_bytes": n, "simulated_s": n}
    mlflow_run_id  str                     tracking_uri  str
    rng            {"seed": int, "next_round": round + 1}
    digests        {"server.safetensors": sha256, "clients/<file>": sha256, ...}
    config         {"digest": sha256, "values": {key: value}}: the config keys a resumed
                   run may not change (all but :func:`is_resumable` ones), flattened

:func:`load_checkpoint` trusts nothing it reads: every field is checked for its type, every
path must resolve inside its directory (symlinks included), every tensor file must match its
digest and hold finite values, and the server file must hold exactly the tensors the state
names. A format-1 checkpoint (fedsim before verification) is refused, not read unchecked.
Every failure is a one-line :class:`ConfigError` on ``--resume`` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedsim.config import ConfigError, FedSimConfig, flatten

FORMAT = 2
_TENSOR = "__tensor__"

# Overrides a resumed run may take: they change where and how fast it runs, not its numbers.
RESUMABLE = ("rounds", "progress", "resources.", "checkpoint.every", "checkpoint.keep", "tracking.")
_NOT_ON_RESUME = ("tracking.experiment", "tracking.run_name", "tracking.parent_run_id")

# Wider than the names we write (5 and 6 digits) so a 100000th round still loads; the
# names are also compared with the exact name the round or client id gives.
_ROUND_DIR = re.compile(r"round_[0-9]{5,}")
_CLIENT_FILE = re.compile(r"c([0-9]{6,})_r([0-9]{5,})\.safetensors")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# A state nests a few levels; deeper is damage, and stopping here keeps every later
# recursive walk (ours, json's) far from Python's recursion limit.
_MAX_DEPTH = 64
_MISSING = object()
_ISNAN_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def is_resumable(key: str) -> bool:
    """Whether a resumed run may change config key ``key`` (it cannot change the numbers)."""
    return key.startswith(RESUMABLE) and key not in _NOT_ON_RESUME


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


def config_record(cfg: FedSimConfig) -> dict:
    """What a checkpoint keeps of the run's config: the keys a resumed run may not change.

    Returns:
        ``{"digest": sha256 of the canonical JSON of "values", "values": {key: value}}`` with
        the flattened, non-resumable keys and JSON values.
    """
    values = {k: _plain(v) for k, v in sorted(flatten(cfg).items()) if not is_resumable(k)}
    return {"digest": _values_digest(values), "values": values}


def _plain(x: Any) -> Any:
    """``x`` as a JSON value, one spelling per value."""
    if isinstance(x, float) and x.is_integer() and abs(x) < 2**53:
        return int(x)  # YAML and a dataclass may spell a float field 16 or 16.0: one value
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if is_dataclass(x) and not isinstance(x, type):
        return _plain(asdict(x))
    return str(x)


def _canonical(x: Any) -> str:
    return json.dumps(x, sort_keys=True, separators=(",", ":"))


def _values_digest(values: dict) -> str:
    return hashlib.sha256(_canonical(values).encode()).hexdigest()


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


def _digest(fh: BinaryIO) -> str:
    h = hashlib.sha256()
    for chunk in iter(lambda: fh.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return _digest(fh)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> str:
    """Write ``tensors`` to ``path`` durably; return the sha256 of the bytes on disk."""
    save_file(tensors, str(path))
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())
        return _digest(fh)


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

    Raises:
        ConfigError: a client file of ``client_files`` cannot be read (to digest it).
    """

    run_dir: Path
    keep: int = 2
    client_files: dict[int, str] = field(default_factory=dict)
    config: FedSimConfig = field(kw_only=True)
    _digests: dict[str, str] = field(default_factory=dict, init=False, repr=False)
    _record: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        (self.run_dir / "clients").mkdir(parents=True, exist_ok=True)
        self._record = config_record(self.config)
        # A resumed run's files were verified by load_checkpoint a moment ago; digest them
        # once here, since later checkpoints keep naming them.
        for name in self.client_files.values():
            path = self.run_dir / "clients" / name
            try:
                self._digests[name] = _sha256(path)
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
        """
        clash = _WRITER_FIELDS & set(meta)
        if clash:
            raise ValueError(f"checkpoint meta may not set {sorted(clash)}: the writer does")
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
    pointer = _read_json(latest, root)
    round_idx, name = _check_pointer(pointer, latest)
    path = run_dir / name
    if not path.is_dir():
        _fail(latest, f"names {name}, which is not a directory of {run_dir}")
    path_root = _inside(path, root, latest)
    state_file = path / "state.json"
    state = _read_json(state_file, path_root)
    _check_state(state, state_file, round_idx)
    digests = state["digests"]

    server_file = path / "server.safetensors"
    tensors = _load_tensors(server_file, path_root, digests["server.safetensors"])
    server = _join_checked(state.pop("server"), tensors, server_file)

    clients_dir = run_dir / "clients"
    clients_root = _inside(clients_dir, root, clients_dir)
    clients = {}
    for cid, file_name in state["client_files"].items():
        file = clients_dir / file_name
        flat = _load_tensors(file, clients_root, digests[f"clients/{file_name}"])
        clients[int(cid)] = _unflatten(flat, file)
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
        before, after = saved.get(key, _MISSING), now.get(key, _MISSING)
        if before is _MISSING or after is _MISSING or _canonical(before) != _canonical(after):
            raise ConfigError(
                key,
                f"was {_show(before)} when the run started and is {_show(after)} in {where}; "
                "a resumed run cannot change it (it would change the run's numbers or identity); "
                "restore it or start a new run",
            )
    state_file = ckpt.path / "state.json"
    ranks = ckpt.meta["ranks"]
    if len(ranks) != cfg.clients.num:
        _fail(state_file, f"ranks has {len(ranks)} entries but clients.num is {cfg.clients.num}")
    stray = sorted(c for c in ckpt.clients if c >= cfg.clients.num)
    if stray:
        _fail(
            state_file, f"holds the state of client {stray[0]} but clients.num is {cfg.clients.num}"
        )


def _fail(file: Path, message: str) -> NoReturn:
    raise ConfigError("--resume", f"{file}: {' '.join(message.split())}")


def _inside(path: Path, root: Path, blame: Path) -> Path:
    """``path`` resolved (symlinks followed); an error on ``blame`` unless it is under ``root``."""
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop (RuntimeError before 3.13)
        _fail(blame, f"{path} cannot be resolved: {exc}")
    if not resolved.is_relative_to(root):
        _fail(blame, f"{path} resolves to {resolved}, outside {root}")
    return resolved


def _read_json(file: Path, root: Path) -> Any:
    _inside(file, root, file)
    try:
        obj = json.loads(file.read_bytes())
    except RecursionError:
        _fail(file, "nests too deeply to be a checkpoint file")
    except (OSError, ValueError) as exc:
        _fail(file, f"cannot read the checkpoint file: {exc}")
    _check_depth(obj, file)
    return obj


def _check_depth(obj: Any, file: Path) -> None:
    stack = [(obj, 1)]
    while stack:  # iterative: the point is not to recurse into what may be a bomb
        x, depth = stack.pop()
        if depth > _MAX_DEPTH:
            _fail(file, f"nests deeper than {_MAX_DEPTH} levels: not a checkpoint file")
        if isinstance(x, dict):
            stack.extend((v, depth + 1) for v in x.values())
        elif isinstance(x, list):
            stack.extend((v, depth + 1) for v in x)


def _show(value: Any) -> str:
    if value is _MISSING:
        return "not set"
    text = json.dumps(value, default=repr)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_count(x: Any) -> bool:
    return _is_int(x) and x >= 0


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_sha256(x: Any) -> bool:
    return isinstance(x, str) and _SHA256.fullmatch(x) is not None


def _is_list_of(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda x: isinstance(x, list) and all(check(v) for v in x)


def _is_dict_of(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda x: isinstance(x, dict) and all(check(v) for v in x.values())


def _has(keys: dict[str, Callable[[Any], bool]]) -> Callable[[Any], bool]:
    """An object with exactly ``keys``, each value passing its check."""
    return lambda x: (
        isinstance(x, dict) and set(x) == set(keys) and all(c(x[k]) for k, c in keys.items())
    )


_STATE_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "round": (_is_count, "an integer >= 0"),
    "server": (lambda x: isinstance(x, dict), "an object"),
    "client_files": (_is_dict_of(lambda x: isinstance(x, str)), "an object of strings"),
    "ranks": (_is_list_of(_is_count), "a list of integers >= 0"),
    "history": (
        _is_list_of(lambda h: isinstance(h, dict) and _is_count(h.get("round"))),
        'a list of objects with an integer "round"',
    ),
    "clients": (
        _is_list_of(_is_list_of(lambda r: isinstance(r, dict))),
        "a list of lists of objects",
    ),
    "totals": (
        _has({"upload_bytes": _is_number, "download_bytes": _is_number, "simulated_s": _is_number}),
        'an object {"upload_bytes": n, "download_bytes": n, "simulated_s": n}',
    ),
    "mlflow_run_id": (lambda x: isinstance(x, str) and x != "", "a non-empty string"),
    "tracking_uri": (lambda x: isinstance(x, str), "a string"),
    "rng": (_has({"seed": _is_int, "next_round": _is_count}), '{"seed": int, "next_round": int}'),
    "digests": (_is_dict_of(_is_sha256), "an object of sha256 hex digests"),
    "config": (
        _has({"digest": _is_sha256, "values": lambda x: isinstance(x, dict)}),
        '{"digest": sha256 hex, "values": object}',
    ),
}


def _check_pointer(pointer: Any, latest: Path) -> tuple[int, str]:
    if not isinstance(pointer, dict):
        _fail(latest, f'must be an object {{"round": int, "dir": str}}, got {_show(pointer)}')
    extra = sorted(set(pointer) - {"round", "dir"})
    if extra:
        _fail(latest, f"has an unknown field {extra[0]!r}")
    round_idx, name = pointer.get("round", _MISSING), pointer.get("dir", _MISSING)
    if not _is_count(round_idx):
        _fail(latest, f"round must be an integer >= 0, got {_show(round_idx)}")
    want = f"round_{round_idx:05d}"
    if not isinstance(name, str) or not _ROUND_DIR.fullmatch(name) or name != want:
        _fail(latest, f'dir must be "{want}" (a directory of the run), got {_show(name)}')
    return round_idx, name


def _check_state(state: Any, file: Path, round_idx: int) -> None:
    if not isinstance(state, dict):
        _fail(file, f"must be a JSON object, got {_show(state)}")
    fmt = state.get("format", _MISSING)
    if fmt == 1 and _is_int(fmt):
        _fail(
            file,
            f"was written by an older fedsim (checkpoint format 1, without digests or the run's "
            f"config); this fedsim resumes format {FORMAT} only: finish the run with the fedsim "
            "that started it, or start a new run",
        )
    if fmt != FORMAT or not _is_int(fmt):
        newer = " (written by a newer fedsim?)" if _is_int(fmt) and fmt > FORMAT else ""
        _fail(file, f"format must be {FORMAT}, got {_show(fmt)}{newer}")
    for name, (check, want) in _STATE_FIELDS.items():
        value = state.get(name, _MISSING)
        if value is _MISSING:
            _fail(file, f"lacks the field {name!r} ({want})")
        if not check(value):
            _fail(file, f"{name} must be {want}, got {_show(value)}")
    if state["round"] != round_idx:
        _fail(file, f"round is {state['round']} but latest.json names round {round_idx}")
    if state["rng"]["next_round"] != round_idx + 1:
        _fail(file, f"rng.next_round must be {round_idx + 1}, got {state['rng']['next_round']}")
    if len(state["history"]) != len(state["clients"]):
        _fail(file, "history and clients must have one entry per round each")
    config = state["config"]
    if _values_digest(config["values"]) != config["digest"]:
        _fail(file, "config.digest does not match config.values (the file was edited)")
    if config["values"].get("seed", state["rng"]["seed"]) != state["rng"]["seed"]:
        _fail(file, "rng.seed differs from the config's seed (the file was edited)")
    wanted = {"server.safetensors"}
    for cid, name in state["client_files"].items():
        match = _CLIENT_FILE.fullmatch(name)
        canonical = re.fullmatch(r"[0-9]+", cid) and cid == str(int(cid))
        if not canonical or not match or match[1] != f"{int(cid):06d}":
            _fail(
                file,
                f"client_files[{cid!r}] must be c<id:06d>_r<round:05d>.safetensors of "
                f"client {cid}, got {_show(name)}",
            )
        if match[2] != f"{int(match[2]):05d}" or int(match[2]) > round_idx:
            _fail(file, f"client_files[{cid!r}] = {name!r} is from after round {round_idx}")
        wanted.add(f"clients/{name}")
    have = set(state["digests"])
    if have != wanted:
        odd = sorted(wanted - have) or sorted(have - wanted)
        verb = "lacks" if wanted - have else "names a file the checkpoint does not hold:"
        _fail(file, f"digests {verb} {odd[0]!r}")


def _load_tensors(file: Path, root: Path, digest: str) -> dict[str, torch.Tensor]:
    """The tensors of ``file``, once it lies under ``root``, matches ``digest`` and is finite."""
    _inside(file, root, file)
    try:
        actual = _sha256(file)
    except OSError as exc:
        _fail(file, f"cannot read the checkpoint file: {exc}")
    if actual != digest:
        _fail(file, "digest mismatch (the file was changed after it was written)")
    try:
        tensors = load_file(str(file))
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        _fail(file, f"cannot read the checkpoint file: {exc}")
    for key, t in tensors.items():
        if not t.is_floating_point():
            continue  # integers are always finite
        x = (
            t
            if t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
            else t.float()
        )
        nan, inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
        if nan or inf:
            _fail(
                file,
                f"tensor {key!r} holds {nan} NaN and {inf} infinite value(s) of {t.numel()}; "
                "resuming would continue a broken model",
            )
    return tensors


def _join_checked(skeleton: dict, tensors: dict[str, torch.Tensor], file: Path) -> dict:
    """:func:`join_tensors`, once ``file`` holds exactly the tensors ``skeleton`` names."""
    named: set[str] = set()

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            if _TENSOR in x:
                if set(x) != {_TENSOR} or not isinstance(x[_TENSOR], str):
                    _fail(file.with_name("state.json"), f"server holds a malformed {x!r}")
                named.add(x[_TENSOR])
                return
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(skeleton)
    missing, extra = sorted(named - set(tensors)), sorted(set(tensors) - named)
    if missing:
        _fail(file, f"lacks tensor {missing[0]!r}, which state.json names")
    if extra:
        _fail(file, f"holds tensor {extra[0]!r}, which state.json does not name")
    return join_tensors(skeleton, tensors)


def _unflatten(flat: dict[str, torch.Tensor], file: Path) -> dict:
    out: dict = {}
    for path, tensor in flat.items():
        node = out
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                _fail(file, f"tensor {path!r} lies under another tensor")
        if leaf in node:
            _fail(file, f"tensor {path!r} lies over other tensors")
        node[leaf] = tensor
    return out
