"""The checkpoint format, and the checks that a checkpoint read back is one fedsim wrote.

``state.json`` (format 3) is one object::

    format         3
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
    merge          [{"round": int, ...}, ...]: the merge diagnostics of the rounds that kept
                   them, rounds ascending, none after ``round`` (absent from checkpoints
                   written before the diagnostics existed: read as [])

:func:`fedsim.checkpoint.disk.load_checkpoint` trusts nothing it reads: every field is checked for
its type, every path must resolve inside its directory (symlinks included), every tensor file
must match its digest and hold finite values, and the server file must hold exactly the
tensors the state names. A checkpoint of an older format is refused, not
read unchecked. Every failure is a one-line :class:`ConfigError` on ``--resume`` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from fedsim.config import ConfigError, FedSimConfig, flatten

# 3: the server state holds each method's state under its name (fedsim.methods)
FORMAT = 3
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
MISSING = object()


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
    return {"digest": values_digest(values), "values": values}


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


def canonical(x: Any) -> str:
    """``x`` as compact JSON with sorted keys: one text per value (digests, comparisons)."""
    return json.dumps(x, sort_keys=True, separators=(",", ":"))


def values_digest(values: dict) -> str:
    """The sha256 of a config record's values (see :func:`config_record`)."""
    return hashlib.sha256(canonical(values).encode()).hexdigest()


def file_digest(fh: BinaryIO) -> str:
    """The sha256 hex digest of an open file's remaining bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    for chunk in iter(lambda: fh.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    """The sha256 hex digest of the file at ``path``."""
    with open(path, "rb") as fh:
        return file_digest(fh)


def fail(file: Path, message: str) -> NoReturn:
    """Raise the one-line ``--resume`` error that names ``file``."""
    raise ConfigError("--resume", f"{file}: {' '.join(message.split())}")


def inside(path: Path, root: Path, blame: Path) -> Path:
    """``path`` resolved (symlinks followed); an error on ``blame`` unless it is under ``root``."""
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop (RuntimeError before 3.13)
        fail(blame, f"{path} cannot be resolved: {exc}")
    if not resolved.is_relative_to(root):
        fail(blame, f"{path} resolves to {resolved}, outside {root}")
    return resolved


def read_json(file: Path, root: Path) -> Any:
    """Parse ``file`` (which must lie under ``root``), refusing nesting deeper than a state's."""
    inside(file, root, file)
    try:
        obj = json.loads(file.read_bytes())
    except RecursionError:
        fail(file, "nests too deeply to be a checkpoint file")
    except (OSError, ValueError) as exc:
        fail(file, f"cannot read the checkpoint file: {exc}")
    _check_depth(obj, file)
    return obj


def _check_depth(obj: Any, file: Path) -> None:
    stack = [(obj, 1)]
    while stack:  # iterative: the point is not to recurse into what may be a bomb
        x, depth = stack.pop()
        if depth > _MAX_DEPTH:
            fail(file, f"nests deeper than {_MAX_DEPTH} levels: not a checkpoint file")
        if isinstance(x, dict):
            stack.extend((v, depth + 1) for v in x.values())
        elif isinstance(x, list):
            stack.extend((v, depth + 1) for v in x)


def show(value: Any) -> str:
    """``value`` for an error message: JSON, cut at 80 characters."""
    if value is MISSING:
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


def check_pointer(pointer: Any, latest: Path) -> tuple[int, str]:
    """Check ``latest.json``'s content; return its round and checkpoint directory name."""
    if not isinstance(pointer, dict):
        fail(latest, f'must be an object {{"round": int, "dir": str}}, got {show(pointer)}')
    extra = sorted(set(pointer) - {"round", "dir"})
    if extra:
        fail(latest, f"has an unknown field {extra[0]!r}")
    round_idx, name = pointer.get("round", MISSING), pointer.get("dir", MISSING)
    if not _is_count(round_idx):
        fail(latest, f"round must be an integer >= 0, got {show(round_idx)}")
    want = f"round_{round_idx:05d}"
    if not isinstance(name, str) or not _ROUND_DIR.fullmatch(name) or name != want:
        fail(latest, f'dir must be "{want}" (a directory of the run), got {show(name)}')
    return round_idx, name


def check_state(state: Any, file: Path, round_idx: int) -> None:
    """Check ``state.json``: its format, every field's type, and that its parts agree."""
    if not isinstance(state, dict):
        fail(file, f"must be a JSON object, got {show(state)}")
    fmt = state.get("format", MISSING)
    if _is_int(fmt) and fmt in (1, 2):
        what = {1: "without digests or the run's config", 2: "before methods were plug-ins"}
        fail(
            file,
            f"was written by an older fedsim (checkpoint format {fmt}, {what[fmt]}); this "
            f"fedsim resumes format {FORMAT} only: finish the run with the fedsim that started "
            "it, or start a new run",
        )
    if fmt != FORMAT or not _is_int(fmt):
        newer = " (written by a newer fedsim?)" if _is_int(fmt) and fmt > FORMAT else ""
        fail(file, f"format must be {FORMAT}, got {show(fmt)}{newer}")
    for name, (check, want) in _STATE_FIELDS.items():
        value = state.get(name, MISSING)
        if value is MISSING:
            fail(file, f"lacks the field {name!r} ({want})")
        if not check(value):
            fail(file, f"{name} must be {want}, got {show(value)}")
    if state["round"] != round_idx:
        fail(file, f"round is {state['round']} but latest.json names round {round_idx}")
    _check_merge(state, file, round_idx)
    if state["rng"]["next_round"] != round_idx + 1:
        fail(file, f"rng.next_round must be {round_idx + 1}, got {state['rng']['next_round']}")
    if len(state["history"]) != len(state["clients"]):
        fail(file, "history and clients must have one entry per round each")
    config = state["config"]
    if values_digest(config["values"]) != config["digest"]:
        fail(file, "config.digest does not match config.values (the file was edited)")
    if config["values"].get("seed", state["rng"]["seed"]) != state["rng"]["seed"]:
        fail(file, "rng.seed differs from the config's seed (the file was edited)")
    wanted = {"server.safetensors"}
    for cid, name in state["client_files"].items():
        match = _CLIENT_FILE.fullmatch(name)
        canonical = re.fullmatch(r"[0-9]+", cid) and cid == str(int(cid))
        if not canonical or not match or match[1] != f"{int(cid):06d}":
            fail(
                file,
                f"client_files[{cid!r}] must be c<id:06d>_r<round:05d>.safetensors of "
                f"client {cid}, got {show(name)}",
            )
        if match[2] != f"{int(match[2]):05d}" or int(match[2]) > round_idx:
            fail(file, f"client_files[{cid!r}] = {name!r} is from after round {round_idx}")
        wanted.add(f"clients/{name}")
    have = set(state["digests"])
    if have != wanted:
        odd = sorted(wanted - have) or sorted(have - wanted)
        verb = "lacks" if wanted - have else "names a file the checkpoint does not hold:"
        fail(file, f"digests {verb} {odd[0]!r}")


def _check_merge(state: dict, file: Path, round_idx: int) -> None:
    """The ``merge`` field: one object per round with diagnostics, rounds ascending and none
    after the checkpoint's round. A checkpoint from before the diagnostics has none: it is
    set to [] here, so that readers take the field as it is."""
    merge = state.setdefault("merge", [])
    rows = 'a list of objects with an integer "round"'
    if not _is_list_of(lambda d: isinstance(d, dict) and _is_count(d.get("round")))(merge):
        fail(file, f"merge must be {rows}, got {show(merge)}")
    rounds = [d["round"] for d in merge]
    if rounds != sorted(set(rounds)) or any(r > round_idx for r in rounds):
        fail(file, f"merge must hold rounds ascending, none after round {round_idx}, got {rounds}")


def load_tensors(file: Path, root: Path, digest: str) -> dict[str, torch.Tensor]:
    """The tensors of ``file``, once it lies under ``root``, matches ``digest`` and is finite."""
    inside(file, root, file)
    try:
        actual = sha256_file(file)
    except OSError as exc:
        fail(file, f"cannot read the checkpoint file: {exc}")
    if actual != digest:
        fail(file, "digest mismatch (the file was changed after it was written)")
    try:
        tensors = load_file(str(file))
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        fail(file, f"cannot read the checkpoint file: {exc}")
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
            fail(
                file,
                f"tensor {key!r} holds {nan} NaN and {inf} infinite value(s) of {t.numel()}; "
                "resuming would continue a broken model",
            )
    return tensors


def join_checked(skeleton: dict, tensors: dict[str, torch.Tensor], file: Path) -> dict:
    """:func:`join_tensors`, once ``file`` holds exactly the tensors ``skeleton`` names."""
    named: set[str] = set()

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            if _TENSOR in x:
                if set(x) != {_TENSOR} or not isinstance(x[_TENSOR], str):
                    fail(file.with_name("state.json"), f"server holds a malformed {x!r}")
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
        fail(file, f"lacks tensor {missing[0]!r}, which state.json names")
    if extra:
        fail(file, f"holds tensor {extra[0]!r}, which state.json does not name")
    return join_tensors(skeleton, tensors)


def unflatten(flat: dict[str, torch.Tensor], file: Path) -> dict:
    """Nest a client file's ``a/b/c`` tensor keys back into dicts (``file`` for errors)."""
    out: dict = {}
    for path, tensor in flat.items():
        node = out
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                fail(file, f"tensor {path!r} lies under another tensor")
        if leaf in node:
            fail(file, f"tensor {path!r} lies over other tensors")
        node[leaf] = tensor
    return out
