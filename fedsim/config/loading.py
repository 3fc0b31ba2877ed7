"""Loading a config: defaults, then a YAML file, then dotlist overrides, then validation."""

from __future__ import annotations

import copy
import functools
import re
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedsim.config.checks import validate
from fedsim.config.ranks import rank_spec
from fedsim.config.schema import FedSimConfig
from fedsim.errors import ConfigError


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
        path: experiment YAML; ``None`` means defaults only.
        overrides: ``key=value`` strings applied last.

    Returns:
        The resolved, validated :class:`FedSimConfig`.

    Raises:
        ConfigError: unreadable file, unknown key or value not allowed.
    """
    merged = _schema()  # never changed: every merge below copies what it merges into
    try:
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError("config", f"file not found: {path}")
            try:
                loaded = _ranks_as_spec(OmegaConf.load(path))
            except Exception as exc:  # yaml errors carry line numbers
                reason = " ".join(str(exc).split())[:500]
                raise ConfigError("config", f"cannot parse {path}: {reason}") from None
            merged = _merge_file(merged, loaded, path)
        merged = _merge_overrides(merged, overrides)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _raise_from_omegaconf(exc) from None
    validate(cfg)
    return cfg


@functools.cache
def _schema() -> DictConfig:
    """The typed defaults as an OmegaConf node, built once and only ever read (merges copy
    it; ``OmegaConf.to_object`` builds new objects)."""
    return OmegaConf.structured(FedSimConfig)


def _merge_overrides(merged: DictConfig, overrides) -> DictConfig:
    """Apply ``key=value`` overrides in order: all in one merge when they fit (each merge
    copies the whole tree), else one at a time, to name the first that does not."""
    if not overrides:
        return merged
    try:
        if all("=" in item for item in overrides):
            parts = [_ranks_as_spec(OmegaConf.from_dotlist([item])) for item in overrides]
            return OmegaConf.merge(merged, *parts)
    except Exception:  # noqa: BLE001 - the loop below names the override and the reason
        pass
    for item in overrides:
        key, eq, _ = item.partition("=")
        if not eq:
            raise ConfigError(item, "an override must look like key=value")
        try:
            merged = OmegaConf.merge(merged, _ranks_as_spec(OmegaConf.from_dotlist([item])))
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
    """Accept a config object, a plain dict of overrides, a YAML path or None (defaults)."""
    if isinstance(config, FedSimConfig):
        validate(config)
        return config
    if config is None or isinstance(config, (str, Path)):
        return load_config(config)
    try:
        if isinstance(config, dict):
            config = _ranks_as_spec(copy.deepcopy(config))
        merged = OmegaConf.merge(_schema(), config)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _raise_from_omegaconf(exc) from None
    except TypeError as exc:
        raise ConfigError("config", f"does not fit the config's shape: {exc}") from None
    validate(cfg)
    return cfg


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
