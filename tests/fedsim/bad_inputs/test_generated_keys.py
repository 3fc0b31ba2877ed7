"""Every config key, mutated to the edge values of its type: a valid config or one line.

The cases are generated from the schema (:func:`fedsim.config.keys.config_keys`), so a key
added tomorrow is covered without a hand-written case. Each key is set, alone over the typed
defaults, to the edge values of its type: 0, negative, huge finite, tiny, NaN, infinities, a
wrong type, Unicode digits (``"٣"`` is an Arabic-Indic three, ``"²"`` a superscript two;
Python's ``int`` takes the first and ``str.isdigit`` the second). Every case must either

- load, hold the value as written (no silent coercion: ``-1`` is no boolean), survive a
  save and reload (the YAML a checkpoint keeps), and pass the driver's checks before any
  actor starts (the ranks, the round's sample, the merge, the server optimiser, every
  enabled method built, the run's name and digest), or
- raise a :class:`ConfigError` of one line that is the mutated key or names it,

and nothing else: no other exception type. The same holds on the command line
(``fedsim config``, ``fedsim run``) for a sample, with the exit status, the one line and no
partial state checked by the ``fails`` fixture.
"""

from __future__ import annotations

import math
import re
import typing
from pathlib import Path
from typing import Any

import pytest

from fedsim.cli import main
from fedsim.config import ConfigError, config_digest, load_config, resolve_ranks, to_yaml
from fedsim.config.keys import NAME, KeyInfo, config_keys

# the edge values of each type, as a user writes them in an override
INT = ["0", "-1", "-9223372036854775809", "9223372036854775808", "1" + "0" * 30]
FLOAT = ["0", "-1", "1e300", "-1e300", "1e-300", "1" + "0" * 400]
NOT_FINITE = ["nan", "inf"]
UNICODE = ["٣", "²", "１", "٣.٥"]  # Arabic-Indic 3, superscript 2, fullwidth 1, Arabic 3.5
WRONG = ["abc", "[1, 2]", "{a: 1}", "true"]
BOOL = ["0", "1", "-1", "2", "nan", "abc", "٣", "[1]", "{a: 1}"]
TEXT = ["''", "1e300", "٣", "²", "[1, 2]", "{a: 1}", "true", "null", "x" * 300]
LIST = ["[]", "[0]", "[-1]", "[٣]", "[nan]", "[1e300]", "abc", "[[1]]", "{a: 1}", "null"]
CHOICE = ["abc", "''", "0", "-1", "٣", "nan", "[1]", "null"]

# string keys whose text fedsim reads as numbers (ranks, client ids, a ratio)
NUMBERS_IN_TEXT = {"clients.ranks", "faults.malicious", "data.cross_ratio"}

# a named device profile stands for every <name>
PROFILE = "phone"

# Settings that make a section's keys take effect: a key under one of these prefixes is also
# mutated in each of its contexts (its override comes last, so it replaces the context's).
CONTEXTS = {
    "privacy.": [
        ["privacy.enabled=true"],
        ["privacy.enabled=true", "privacy.clipping=adaptive", "privacy.count_noise=1"],
    ],
    "robust.": [["robust.rule=multi_krum"], ["robust.rule=trimmed_mean", "robust.trim=0.25"]],
    "faults.": [
        ["faults.attack=lie_about_rank", "faults.malicious=1", "faults.claimed_rank=4"],
        ["faults.delay_dist=lognormal", "faults.delay_s=1", "faults.sleep_scale=0.01"],
    ],
    "pruning.": [["pruning.gamma=0.1"]],
    "objective.": [
        ["objective.method=fedprox", "train.optimizer=sgd"],
        ["objective.method=fedmllm"],
    ],
    "train.": [["objective.method=fedprox", "train.optimizer=sgd"]],
    "server.": [["server.optimizer=fedadam"]],
    "editing.": [["editing.enabled=true"]],
}


def _contexts(key: str) -> list[list[str]]:
    """The plain defaults, then every context that makes ``key`` take effect."""
    return [[], *(c for prefix, cs in CONTEXTS.items() if key.startswith(prefix) for c in cs)]


def _values(info: KeyInfo) -> list[str]:
    """The edge values for ``info``'s type."""
    kind = info.type
    if info.choices:
        return CHOICE
    if kind.startswith("dict["):
        return ["0", "abc", "[1]", "null", "{}"]
    if kind.startswith("list["):
        return LIST
    base = kind.replace(" | None", "")
    if base == "bool":
        return BOOL
    if base == "int":
        return INT + ["1.5", "nan", *UNICODE, *WRONG]
    if base == "float":
        return FLOAT + NOT_FINITE + UNICODE + WRONG
    return TEXT


def _key(info: KeyInfo) -> str:
    return info.key.replace(NAME, PROFILE)


KEYS = {_key(k): k for k in config_keys()}


def _written(info: KeyInfo, text: str) -> Any:
    """What the override ``text`` means for the key's type, for the keys whose loaded value
    must equal it (None: not compared; strings and lists are compared by the round trip)."""
    base = info.type.replace(" | None", "")
    if text == "null":
        return None
    if base == "int" and re.fullmatch(r"-?[0-9]+", text):
        return int(text)
    if base == "float" and re.fullmatch(r"-?[0-9.e-]+", text):
        return float(text)
    if base == "bool":
        return {"true": True, "false": False}.get(text, "not a bool")
    return None


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = cfg[part] if isinstance(cfg, dict) else getattr(cfg, part)
    return cfg


def _overrides(key: str, value: str, context: list[str]) -> list[str]:
    """The override after its context (and the profile it belongs to, for a profile's field)."""
    out = [*context, f"{key}={value}"]
    if key.startswith(f"devices.profiles.{PROFILE}."):
        out.insert(0, f"devices.profiles.{PROFILE}.share=1")
    return out


def _before_actors(cfg) -> None:
    """What the driver computes from a config before any actor starts (no Ray, no data)."""
    from fedsim.config.registry import build_merger, build_server_optimizer, enabled_methods
    from fedsim.data.partition import sample_clients
    from fedsim.tracking.tracker import default_run_name

    ranks = resolve_ranks(cfg.clients, cfg.seed)
    assert len(ranks) == cfg.clients.num and min(ranks) >= 1
    sampled = sample_clients(cfg.clients.num, cfg.clients.fraction, cfg.seed, 1)
    assert 1 <= len(sampled) <= cfg.clients.num
    build_merger(cfg)
    build_server_optimizer(cfg.server)
    enabled_methods(cfg)
    default_run_name(cfg)
    config_digest(cfg)


def _case(info: KeyInfo, value: str, context: list[str]) -> str | None:
    """Run one case; None when it behaves, else what went wrong."""
    key = _key(info)
    where = f" (after {' '.join(context)})" if context else ""
    try:
        cfg = load_config(None, _overrides(key, value, context))
    except ConfigError as exc:
        text = str(exc)
        if "\n" in text:
            return f"{key}={value}{where}: a ConfigError of several lines: {text!r}"
        if exc.key != key and key not in text:
            return f"{key}={value}{where}: the error names {exc.key!r}, not the key: {text}"
        return None
    except Exception as exc:  # noqa: BLE001 - any other type is the failure this test finds
        return f"{key}={value}{where}: {type(exc).__name__}: {exc}"
    base = info.type.replace(" | None", "")
    numeric = base in ("int", "float", "bool") or key in NUMBERS_IN_TEXT
    if numeric and any(c.isdigit() and not c.isascii() for c in value):
        return f"{key}={value}{where}: a number in Unicode digits loaded as {_get(cfg, key)!r}"
    try:
        got = _get(cfg, key)
        if isinstance(got, int) and not -(2**63) <= got < 2**63:
            return f"{key}={value}{where}: loaded {got}, beyond numpy's and torch's integers"
        want = _written(info, value)
        if want is not None and not (got == want or _both_nan(got, want)):
            return f"{key}={value}{where}: loaded as {got!r}, not as written ({want!r})"
        if isinstance(got, float) and not math.isfinite(got):
            return f"{key}={value}{where}: loaded a non-finite {got!r}"
        if not context and _quoted(info) and load_config(_yaml_file(cfg), ()) != cfg:
            return f"{key}={value}{where}: the saved config reloads as another one"
        _before_actors(cfg)
    except Exception as exc:  # noqa: BLE001
        return f"{key}={value}{where}: loaded, then {type(exc).__name__}: {exc}"
    return None


def _quoted(info: KeyInfo) -> bool:
    """Whether the key's values go through YAML quoting (strings, lists, names), so that a
    save and reload may change them: those cases are saved and reloaded (about 0.15 s each;
    numbers and booleans are compared with what was written instead)."""
    base = info.type.replace(" | None", "")
    return bool(info.choices) or base not in ("int", "float", "bool")


def _both_nan(a: Any, b: Any) -> bool:
    return isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)


def _yaml_file(cfg) -> Path:
    """The config saved as a checkpoint saves it (in the test's working directory)."""
    path = Path("saved.yaml")
    path.write_text(to_yaml(cfg))
    return path


@pytest.mark.parametrize("key", list(KEYS))
def test_every_edge_value_loads_or_names_the_key(key, workdir):
    info = KEYS[key]
    problems = [
        p
        for context in _contexts(key)
        for v in _values(info)
        if (p := _case(info, v, context)) is not None
    ]
    assert not problems, "\n".join(problems)


def test_the_cases_cover_every_key_and_type():
    """Every leaf key of the schema is generated, with the edge values of its type."""
    assert len(KEYS) == len(config_keys()) >= 100
    kinds = {typing.cast(str, k.type).replace(" | None", "") for k in KEYS.values()}
    assert {"int", "float", "bool", "str", "list[str]", "list[int]"} <= kinds
    cases = sum(len(_values(k)) * len(_contexts(key)) for key, k in KEYS.items())
    assert cases >= 1500, cases


# --- the command line, for a sample of the generated cases --------------------------------

SAMPLE = [
    ("train.lr", "1e300"),
    ("seed", "٣"),
    ("faults.malicious", "²"),
    ("progress", "-1"),
    ("privacy.noise_multiplier", "1e300"),
    ("robust.num_faulty", "9223372036854775808"),
]


@pytest.mark.parametrize(("key", "value"), SAMPLE)
def test_config_command_prints_one_line(capsys, workdir, key, value):
    assert main(["config", f"{key}={value}"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fedsim: ") and key in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize(("key", "value"), SAMPLE[:3])
def test_run_command_fails_before_training(fails, base, key, value):
    fails(["run", *base, f"{key}={value}"], key)
