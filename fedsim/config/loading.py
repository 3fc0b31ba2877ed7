"""Loading a config: defaults, then a YAML file, then dotlist overrides, then validation."""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedsim.config.arguments import check_overrides, check_path
from fedsim.config.checks import validate
from fedsim.config.ranks import rank_spec, resolve_ranks
from fedsim.config.registry import BACKBONES
from fedsim.config.schema import FedSimConfig
from fedsim.config.strict import check_written
from fedsim.config.yaml_file import read_yaml_text
from fedsim.errors import ConfigError
from fedsim.experiments import find

_log = logging.getLogger(__name__)

# Where runs are logged when neither the config nor MLFLOW_TRACKING_URI names a store.
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def tracking_uri(uri: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The MLflow store to use: ``uri`` when given, else ``MLFLOW_TRACKING_URI``, else
    :data:`DEFAULT_TRACKING_URI` (``mlflow.db`` in the working directory).

    The one rule for every command: ``fedsim run``, ``compare``, ``sweep`` and ``inspect`` and
    the Python API. For a config, ``uri`` is ``tracking.uri`` after the file and the overrides,
    so the precedence is: an override > the config file > the environment > the default.
    An empty string counts as unset.
    """
    if uri:
        return uri
    env = os.environ if environ is None else environ
    return env.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _ranks_as_spec(node: Any) -> Any:
    """``clients.ranks`` given as a YAML list or int, turned into its string spec in place.

    The field is a string (one type, no ``Any``); a list in a file, an override
    ``clients.ranks=[8,8,4]`` or a dict is the same spec written the natural way.
    """
    clients = node.get("clients") if isinstance(node, (DictConfig, dict)) else None
    if isinstance(clients, (DictConfig, dict)) and "ranks" in clients:
        value = clients["ranks"]
        if isinstance(value, (DictConfig, dict)):  # `choice:` read by YAML as a mapping
            raise ConfigError(
                "clients.ranks",
                f"got a mapping {dict(value)!r}; write a rank list, one int, 'fedilora', "
                "'equal:R' or 'choice:R1,R2,...' (in YAML, quote a spec with a colon)",
            )
        if isinstance(value, (ListConfig, list, tuple, int)) and not isinstance(value, bool):
            items = list(value) if not isinstance(value, int) else value
            clients["ranks"] = rank_spec(items)
    faults = node.get("faults") if isinstance(node, (DictConfig, dict)) else None
    if isinstance(faults, (DictConfig, dict)) and "malicious" in faults:
        value = faults["malicious"]  # ids as a YAML list, or one id / share as a number
        if isinstance(value, (ListConfig, list, tuple)):
            faults["malicious"] = ",".join(str(v).strip() for v in value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            faults["malicious"] = str(value)
    return node


_KEY_RE = re.compile(r"full_key: (\S+)")


def _raise_from_omegaconf(exc: OmegaConfBaseException) -> ConfigError:
    msg = str(exc).splitlines()[0]
    match = _KEY_RE.search(str(exc))
    key = match.group(1) if match else getattr(exc, "full_key", None) or "config"
    if "not in struct" in msg or "Key '" in msg and "not" in msg:
        return ConfigError(key, f"unknown key ({msg})")
    return ConfigError(key, msg)


def _merge_file(merged: DictConfig, loaded: Any, path: Path) -> DictConfig:
    """Merge a loaded YAML file; a part that does not fit names its top-level key."""
    if not isinstance(loaded, DictConfig):
        raise ConfigError(
            "config", f"{path} must be a mapping of config keys (key: value lines), not a list"
        )
    try:
        return OmegaConf.merge(merged, loaded)
    except (TypeError, OmegaConfBaseException) as exc:
        for key in loaded:  # find the key that does not fit, to name it
            try:
                OmegaConf.merge(merged, {key: loaded[key]})
            except (TypeError, OmegaConfBaseException) as part:
                reason = " ".join(str(part).split("\n")[0].split())
                named = getattr(part, "full_key", None) or _KEY_RE.search(str(part))
                if named is not None and not isinstance(named, str):
                    named = named.group(1)
                raise ConfigError(named or str(key), f"{path}: {reason}") from None
        raise ConfigError("config", f"{path} does not fit the config's shape: {exc}") from None


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> FedSimConfig:
    """Build a validated config from defaults, an optional YAML file and dotlist overrides.

    Args:
        path: an experiment YAML, or the name of a shipped experiment (``"vlm_emoji"``, see
            :mod:`fedsim.experiments`); ``None`` means the typed defaults only.
        overrides: ``key=value`` strings applied last (a list or tuple).

    Returns:
        The resolved, validated :class:`FedSimConfig`. An unset ``tracking.uri`` is resolved
        by :func:`tracking_uri` (``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``). When
        the overrides set ``model.backbone`` but not ``clients.ranks``, the experiment's ranks
        are capped at that backbone's largest rank, with a warning (``model.backbone=tiny``
        runs the default experiment).

    Raises:
        ConfigError: unreadable file, one over the limits of
            :mod:`fedsim.config.yaml_file` (size, aliases, nesting), unknown name or key, a
            value not allowed, or an argument of the wrong type (``path`` no path,
            ``overrides`` no list of strings; the error names the argument).
    """
    check_path(path, "path", optional=True)
    overrides = check_overrides(overrides)
    merged = _schema()  # a fresh copy: merged into in place
    try:
        if path is not None:
            path = find(path)
            text = read_yaml_text(path, "config", "config keys (key: value lines)")
            try:
                loaded = _ranks_as_spec(OmegaConf.create(text))
            except ConfigError:
                raise
            except Exception as exc:  # yaml errors carry line numbers
                reason = " ".join(str(exc).split())[:500]
                raise ConfigError("config", f"cannot parse {path}: {reason}") from None
            if isinstance(loaded, DictConfig):
                _check_written(loaded)
            merged = _merge_file(merged, loaded, path)
        merged = _merge_overrides(merged, overrides)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _raise_from_omegaconf(exc) from None
    keys = {item.partition("=")[0].strip() for item in overrides}
    return _resolved(cfg, "model.backbone" in keys and "clients.ranks" not in keys)


def _resolved(cfg: FedSimConfig, only_backbone: bool = False) -> FedSimConfig:
    """``cfg`` with its unset tracking store resolved, validated; ``only_backbone``: the
    caller switched the backbone and left the ranks to the experiment (see
    :func:`_fit_ranks`)."""
    cfg.tracking.uri = tracking_uri(cfg.tracking.uri)
    validate(cfg)
    if only_backbone:
        _fit_ranks(cfg)
    return cfg


def _fit_ranks(cfg: FedSimConfig) -> None:
    """The experiment's ranks, capped at the backbone's largest rank, when the user switched
    the backbone alone (``fedsim run model.backbone=tiny``: the default experiment's ranks go
    to 32, the tiny backbone admits 16); a warning says so. Ranks the user set are never
    changed: one the backbone cannot take is refused when the run starts."""
    spec = BACKBONES.get(cfg.model.backbone)
    limit = spec.max_rank if spec is not None else None
    if limit is None:
        return
    ranks = resolve_ranks(cfg.clients, cfg.seed)
    above = sorted({r for r in ranks if r > limit})
    if not above:
        return
    capped = [min(r, limit) for r in ranks]
    _log.warning(
        "clients.ranks: the %s backbone admits LoRA ranks up to %d, so the experiment's "
        "ranks %s run at %d (%d of %d clients); set clients.ranks to choose the ranks",
        cfg.model.backbone,
        limit,
        ", ".join(map(str, above)),
        limit,
        sum(r > limit for r in ranks),
        len(ranks),
    )
    cfg.clients.ranks = rank_spec(capped)


@functools.cache
def _schema_pickle() -> bytes:
    """The typed defaults as an OmegaConf node, built once and kept pickled."""
    return pickle.dumps(OmegaConf.structured(FedSimConfig))


def _schema() -> DictConfig:
    """A fresh copy of the typed defaults, the caller's to change (unpickling it is ten times
    faster than OmegaConf's deep copy, and a config loads in a few milliseconds)."""
    return pickle.loads(_schema_pickle())


def _merged(node: DictConfig, *others: Any) -> DictConfig:
    """``OmegaConf.merge(node, *others)`` for a ``node`` this module owns and ``others``
    built for this one merge: ``node`` is changed in place, neither is copied."""
    return OmegaConf.unsafe_merge(node, *others)


def _check_written(node: DictConfig) -> None:
    """The written values of a file or an override, checked before OmegaConf converts them
    (:mod:`fedsim.config.strict`); interpolations are left unresolved."""
    check_written(OmegaConf.to_container(node, resolve=False), FedSimConfig)


def _merge_overrides(merged: DictConfig, overrides) -> DictConfig:
    """Apply ``key=value`` overrides in order: all in one merge when they fit (each merge
    copies the whole tree), else one at a time, to name the first that does not (a single
    override goes that way at once: one merge either way)."""
    if not overrides:
        return merged
    parts = None
    try:
        if len(overrides) > 1 and all("=" in item for item in overrides):
            parts = [_ranks_as_spec(OmegaConf.from_dotlist([item])) for item in overrides]
    except Exception:  # noqa: BLE001 - the loop below names the override and the reason
        pass
    if parts is not None:
        for part in parts:
            _check_written(part)
        try:  # on a copy: after a failure the loop starts again from ``merged``
            return _merged(pickle.loads(pickle.dumps(merged)), *parts)
        except Exception:  # noqa: BLE001 - the loop below names the override and the reason
            pass
    for item in overrides:
        key, eq, _ = item.partition("=")
        if not eq:
            raise ConfigError(item, "an override must look like key=value")
        try:
            part = _ranks_as_spec(OmegaConf.from_dotlist([item]))
            _check_written(part)
            merged = _merged(merged, part)
        except TypeError as exc:
            raise ConfigError(key, f"cannot set {item!r}: {exc}") from None
        except yaml.YAMLError as exc:  # the value is not valid YAML
            reason = " ".join(str(exc).split())
            raise ConfigError(key, f"cannot parse the value of {item!r}: {reason}") from None
        except OmegaConfBaseException as exc:
            error = _raise_from_omegaconf(exc)
            if key != error.key and key.startswith(f"{error.key}."):  # an unknown section
                raise ConfigError(key, f"unknown key ({error.key!r} is no section)") from None
            raise error from None
    return merged


def as_config(config: FedSimConfig | DictConfig | dict | str | Path | None) -> FedSimConfig:
    """Accept a config object, a plain dict of overrides, a YAML path or shipped experiment's
    name, or None (the typed defaults).

    Raises:
        ConfigError: as :func:`load_config`; ``config`` of another type names ``config``.
    """
    if isinstance(config, FedSimConfig):
        if not config.tracking.uri:  # resolved on a copy: the caller's object stays as it was
            config = copy.deepcopy(config)
        return _resolved(config)
    if config is None or isinstance(config, (str, Path)):
        return load_config(config)
    if not isinstance(config, (dict, DictConfig)):
        raise ConfigError(
            "config",
            "expected a FedSimConfig, a dict of config values, a YAML path, a shipped "
            f"experiment's name or None; got {type(config).__name__}",
        )
    only_backbone = False
    try:
        if isinstance(config, dict):
            config = _ranks_as_spec(copy.deepcopy(config))
            check_written(config, FedSimConfig)
            model, clients = config.get("model"), config.get("clients")
            only_backbone = (isinstance(model, dict) and "backbone" in model) and not (
                isinstance(clients, dict) and "ranks" in clients
            )
            merged = _merged(_schema(), OmegaConf.create(config))  # a copy: merged in place
        else:
            if isinstance(config, DictConfig):
                _check_written(config)
            merged = OmegaConf.merge(_schema(), config)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _raise_from_omegaconf(exc) from None
    except TypeError as exc:
        raise ConfigError("config", f"does not fit the config's shape: {exc}") from None
    return _resolved(cfg, only_backbone)


def to_yaml(cfg: FedSimConfig) -> str:
    """The resolved config as YAML, re-loadable with :func:`load_config`."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a config dataclass into ``{"a.b": value}`` (for MLflow params)."""
    out: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if is_dataclass(value):
            out.update(flatten(value, key + "."))
        elif isinstance(value, dict) and value and all(is_dataclass(v) for v in value.values()):
            for name, item in value.items():
                out.update(flatten(item, f"{key}.{name}."))
        else:
            out[key] = value
    return out


# Keys that change how a run is shown, where it runs or what it keeps, never its numbers: left
# out of config_digest (everything else, rounds and seed included, is in).
_NOT_IN_DIGEST = ("progress", "resources.", "checkpoint.", "tracking.")


def config_digest(cfg: Any) -> str:
    """The sha256 (hex) of the settings that decide a run's numbers: every flattened key of
    ``cfg`` but ``progress``, ``resources.*``, ``checkpoint.*`` and ``tracking.*``, as
    canonical JSON. Runs are tagged with it (``fedsim.config_digest``): two runs with one
    digest and one fedsim commit ran the same experiment."""
    values = {k: v for k, v in flatten(cfg).items() if not k.startswith(_NOT_IN_DIGEST)}
    text = json.dumps(values, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()
