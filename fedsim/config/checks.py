"""The rules a config must follow, checked once at load: ranges, limits, combinations.

A method's own rules live in its module (:meth:`fedsim.methods.base.Method.check`) and are
called from here; this module holds the rules of the engine's own sections.
"""

from __future__ import annotations

import math
import posixpath
import re
from dataclasses import fields, is_dataclass
from typing import Any

import fedsim.config.limits as limits
from fedsim.config.ranks import resolve_ranks
from fedsim.config.registry import BACKBONES as BACKBONE_SPECS
from fedsim.config.registry import (
    DATASETS,
    MERGERS,
    OBJECTIVES,
    SERVER_OPTIMIZERS,
    merger_class,
    method_classes,
)
from fedsim.config.schema import BACKBONES, GENERATIVE_BACKBONES, FedSimConfig
from fedsim.config.strict import ascii_float, ascii_int
from fedsim.errors import ConfigError

# the registered_models.name column of MLflow's SQL stores
MAX_NAME_LENGTH = 256


def model_name_problem(name: str | None) -> str | None:
    """Why MLflow would reject ``name`` as a registered model name (None: it would not).

    MLflow's own rules (no ``/`` or ``:``, not empty, a name that stays the same as a path)
    plus the length of the SQL stores' name column; checked at config load, before training.
    """
    if name is None or not name.strip():
        return "must not be empty"
    if "/" in name or ":" in name:
        return f"{name!r} contains '/' or ':', which MLflow does not allow in a model name"
    norm = posixpath.normpath(name)
    if norm != name or norm == "." or norm.startswith(".."):
        return f"{name!r} would resolve to {norm!r} as a path, which MLflow does not allow"
    if len(name) > MAX_NAME_LENGTH:
        return f"is {len(name)} characters; MLflow's stores take at most {MAX_NAME_LENGTH}"
    return None


def parse_ratio(ratio: str | int) -> float:
    """``"3:7"`` -> 0.3, the share of the first part; a number in [0, 1] is taken as the share.

    YAML 1.1 (and so an unquoted ``data.cross_ratio=3:7`` on the command line) reads ``3:7`` as
    the base-60 integer 187; such an integer is read back as the ratio it was written as.

    Raises:
        ValueError: not two non-negative numbers with a positive sum.
    """
    text = str(ratio).strip()
    whole = ascii_int(text)
    if whole is not None and whole >= 60:  # sexagesimal a:b == a * 60 + b
        a, b = divmod(whole, 60)
        text = f"{a}:{b}"
    numbers = [ascii_float(x) for x in text.split(":")]
    if len(numbers) > 2 or None in numbers or not all(map(math.isfinite, numbers)):
        raise ValueError(f"expected 'a:b' such as '3:7' or a share in [0, 1], got {ratio!r}")
    if len(numbers) == 1:
        if not 0 <= numbers[0] <= 1:
            raise ValueError(f"expected 'a:b' such as '3:7' or a share in [0, 1], got {ratio!r}")
        return numbers[0]
    a, b = numbers
    if a < 0 or b < 0 or not 0 < a + b < math.inf:
        raise ValueError(f"expected two non-negative numbers with a positive sum, got {ratio!r}")
    return a / (a + b)


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(key, message)


# Upper limits that keep a typo from exhausting memory before anything useful happens.
MAX_SEED = 2**32 - 1
MAX_CLIENTS = 1_000_000
MAX_ROUNDS = 1_000_000
_UPPER = {
    "rounds": MAX_ROUNDS,
    "clients.num": MAX_CLIENTS,
    "model.head_hidden": 65_536,
    "data.max_text_tokens": 8_192,
    "eval.max_new_tokens": 4_096,
    "eval.examples": 10_000,
    "train.local_epochs": 10_000,
    "train.batch_size": 1_000_000,
    "train.eval_batch_size": 1_000_000,
    "resources.max_retries": 100,
    "resources.actors": 100_000,
}


def _check_values(obj: Any, prefix: str = "") -> None:
    """Every number finite, every size below its upper limit; the message names the key."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if is_dataclass(value):
            _check_values(value, key + ".")
        elif isinstance(value, dict):
            for name, item in value.items():
                if is_dataclass(item):
                    _check_values(item, f"{key}.{name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(key, f"must be a finite number, got {value}")
        elif isinstance(value, int) and not isinstance(value, bool):
            if key in _UPPER:
                _check(
                    value <= _UPPER[key],
                    key,
                    f"{value} is above the limit of {_UPPER[key]:,} (a typo?)",
                )
            _check(
                abs(value) <= limits.MAX_INT,
                key,
                f"{value} does not fit a 64-bit integer (numpy's and torch's)",
            )
        elif isinstance(value, list):
            for item in value:
                _check(
                    not isinstance(item, int) or abs(item) <= limits.MAX_INT,
                    key,
                    f"{item} does not fit a 64-bit integer (numpy's and torch's)",
                )


def validate(cfg: FedSimConfig) -> None:
    """Check cross-field rules once; raise :class:`ConfigError` naming the key."""
    _check_values(cfg)
    _check(0 <= cfg.seed <= MAX_SEED, "seed", f"must be in [0, 2^32 - 1], got {cfg.seed}")
    _check(cfg.rounds >= 0, "rounds", f"must be >= 0 (0: zero-shot only), got {cfg.rounds}")
    _check(cfg.clients.num >= 1, "clients.num", f"must be >= 1, got {cfg.clients.num}")
    _check(
        0 < cfg.clients.fraction <= 1,
        "clients.fraction",
        f"must be in (0, 1], got {cfg.clients.fraction}",
    )
    resolve_ranks(cfg.clients, cfg.seed)
    d = cfg.data
    _check(d.alpha > 0, "data.alpha", f"must be > 0, got {d.alpha}")
    _check(
        0 <= d.missing_rate <= 1, "data.missing_rate", f"must be in [0, 1], got {d.missing_rate}"
    )
    _check(
        0 <= d.missing_beta <= 1, "data.missing_beta", f"must be in [0, 1], got {d.missing_beta}"
    )
    _check(0 <= d.hybrid_p <= 1, "data.hybrid_p", f"must be in [0, 1], got {d.hybrid_p}")
    try:
        parse_ratio(d.cross_ratio)
    except ValueError as exc:
        raise ConfigError("data.cross_ratio", str(exc)) from None
    _check(
        0 < d.test_fraction < 1, "data.test_fraction", f"must be in (0, 1), got {d.test_fraction}"
    )
    _check(
        0 < d.holdout_fraction < 1,
        "data.holdout_fraction",
        f"must be in (0, 1), got {d.holdout_fraction}",
    )
    _check(8 <= d.image_size <= 512, "data.image_size", f"must be in [8, 512], got {d.image_size}")
    _check(d.min_per_client >= 2, "data.min_per_client", f"must be >= 2, got {d.min_per_client}")
    _check(d.max_text_tokens >= 4, "data.max_text_tokens", "must be >= 4")
    _check(
        d.subset is None or d.subset >= 2 * cfg.clients.num,
        "data.subset",
        f"must be at least 2 * clients.num = {2 * cfg.clients.num}, got {d.subset}",
    )
    _check(
        d.test_split != "train",
        "data.test_split",
        "'train' is the training split; the global test set must be held out",
    )
    _check(
        d.dataset in DATASETS,
        "data.dataset",
        f"unknown dataset {d.dataset!r}; allowed: {', '.join(DATASETS)}",
    )
    _check(
        not DATASETS[d.dataset].needs_root or bool(d.root),
        "data.root",
        f"data.dataset={d.dataset} reads its files from a directory; set data.root",
    )
    m = cfg.model
    _check(
        m.backbone in BACKBONES,
        "model.backbone",
        f"unknown backbone {m.backbone!r}; allowed: {', '.join(BACKBONES)}",
    )
    for key in BACKBONE_SPECS[m.backbone].required:
        _check(
            bool(getattr(m, key)),
            f"model.{key}",
            f"is required when model.backbone={m.backbone} (a hub id or a local path)",
        )
    _check(0 <= m.head_dropout < 1, "model.head_dropout", "must be in [0, 1)")
    _check(m.head_hidden >= 1, "model.head_hidden", f"must be >= 1, got {m.head_hidden}")
    _validate_generative(cfg)
    _check(
        0 < cfg.lora.alpha <= limits.MAX_COEFFICIENT,
        "lora.alpha",
        f"must be > 0 and <= {limits.MAX_COEFFICIENT:g}, got {cfg.lora.alpha:g}",
    )
    _check(0 <= cfg.lora.dropout < 1, "lora.dropout", "must be in [0, 1)")
    _check(
        cfg.aggregation.method in MERGERS,
        "aggregation.method",
        f"unknown method {cfg.aggregation.method!r}; allowed: {', '.join(sorted(MERGERS))}",
    )
    _check(
        0 <= cfg.aggregation.damping <= 1,
        "aggregation.damping",
        f"must be in [0, 1], got {cfg.aggregation.damping}",
    )
    t = cfg.train
    _check(t.local_epochs >= 1, "train.local_epochs", "must be >= 1")
    _check(
        t.max_local_steps is None or t.max_local_steps >= 1, "train.max_local_steps", "must be >= 1"
    )
    _check(t.batch_size >= 1, "train.batch_size", "must be >= 1")
    _check(t.eval_batch_size >= 1, "train.eval_batch_size", "must be >= 1")
    _check(
        0 < t.lr <= limits.MAX_LR,
        "train.lr",
        f"must be > 0 and <= {limits.MAX_LR:g} (a larger step overflows float32 within a "
        f"round), got {t.lr:g}",
    )
    _check(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    r = cfg.resources
    top = limits.MAX_ACTOR_RESOURCE
    _check(
        0 < r.client.num_cpus <= top,
        "resources.client.num_cpus",
        f"must be in (0, {top:,.0f}] (one actor runs on one node), got {r.client.num_cpus:g}",
    )
    _check(
        r.client.num_gpus >= 0
        and (r.client.num_gpus <= 1 or float(r.client.num_gpus).is_integer())
        and r.client.num_gpus <= top,
        "resources.client.num_gpus",
        f"must be 0, a fraction in (0, 1] or a whole number up to {top:,.0f}, "
        f"got {r.client.num_gpus:g}",
    )
    _check(r.actors is None or r.actors >= 1, "resources.actors", "must be >= 1")
    _check(r.max_retries >= 0, "resources.max_retries", "must be >= 0")
    _check(bool(cfg.tracking.experiment), "tracking.experiment", "must not be empty")
    _check(
        len(cfg.tracking.experiment) <= 500,
        "tracking.experiment",
        f"is {len(cfg.tracking.experiment)} characters; MLflow takes at most 500",
    )
    _check(
        cfg.tracking.run_name is None or len(cfg.tracking.run_name) <= 250,
        "tracking.run_name",
        "MLflow takes at most 250 characters",
    )
    _check(
        cfg.tracking.system_metrics_interval_s >= 0.1,
        "tracking.system_metrics_interval_s",
        f"must be at least 0.1 seconds, got {cfg.tracking.system_metrics_interval_s}",
    )
    if cfg.tracking.register_model is not None:
        _check(
            cfg.tracking.save_adapter,
            "tracking.register_model",
            "registers the final global adapter, which tracking.save_adapter=false does not "
            "log; set tracking.save_adapter=true or drop tracking.register_model",
        )
        problem = model_name_problem(cfg.tracking.register_model)
        _check(problem is None, "tracking.register_model", f"not a model name: {problem}")
    _check_combinations(cfg)
    for cid in cfg.faults.nan_update_clients:
        _check(
            0 <= cid < cfg.clients.num,
            "faults.nan_update_clients",
            f"client id {cid} is not in [0, {cfg.clients.num})",
        )
    _validate_faults_rounds_devices(cfg)


def clients_per_round(cfg: FedSimConfig) -> int:
    """The clients sampled per round: ``max(1, round(fraction * num))``, as
    :func:`fedsim.data.partition.sample_clients` samples them (the most a round can merge)."""
    return max(1, int(round(cfg.clients.fraction * cfg.clients.num)))


def is_generative(cfg: FedSimConfig) -> bool:
    """Whether the configured backbone generates text (the generation task)."""
    return cfg.model.backbone in GENERATIVE_BACKBONES


def _validate_generative(cfg: FedSimConfig) -> None:
    """Rules of the generation task and of the eval.* settings."""
    m, d, ev = cfg.model, cfg.data, cfg.eval
    _check(ev.every >= 1, "eval.every", f"must be >= 1, got {ev.every}")
    _check(
        ev.max_samples is None or ev.max_samples >= 1,
        "eval.max_samples",
        f"must be >= 1 or null, got {ev.max_samples}",
    )
    _check(ev.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1")
    _check(ev.examples >= 0, "eval.examples", "must be >= 0")
    _check(bool(m.targets), "model.targets", "must name at least one module suffix")
    if m.target_regex is not None:
        try:
            re.compile(m.target_regex)
        except re.error as exc:
            raise ConfigError("model.target_regex", f"not a valid regex: {exc}") from None
    if not is_generative(cfg):
        _check(
            not DATASETS[d.dataset].generative_only,
            "data.dataset",
            f"{d.dataset} targets are free text and need a generative model: model.backbone="
            + " or ".join(GENERATIVE_BACKBONES),
        )
        return
    _check(
        d.image_fill != "learned",
        "data.image_fill",
        "learned is a classifier's fill (a trained embedding of the image features); a "
        "generative model takes zeros (a zero image) or mask (no image in the prompt)",
    )


# A device profile's rates relative to the reference device: a task's simulated seconds divide
# by them, so a rate near 0 (1e-300) makes them infinite; a million times slower or faster
# than the reference covers any device.
_MIN_RATE, _MAX_RATE = 1e-6, 1e12
_MAX_SHARE = 1e6


def _validate_faults_rounds_devices(cfg: FedSimConfig) -> None:
    f = cfg.faults
    _check(0 <= f.fail_prob <= 1, "faults.fail_prob", f"must be in [0, 1], got {f.fail_prob}")
    _check(0 <= f.delay_prob <= 1, "faults.delay_prob", f"must be in [0, 1], got {f.delay_prob}")
    sim = limits.MAX_SIM_SECONDS
    _check(
        0 <= f.delay_s <= sim,
        "faults.delay_s",
        f"must be in [0, {sim:g}] simulated seconds, got {f.delay_s:g}",
    )
    _check(f.delay_sigma > 0, "faults.delay_sigma", f"must be > 0, got {f.delay_sigma}")
    if f.delay_dist == "lognormal":
        tail = f.delay_s * math.exp(min(limits.LOGNORMAL_TAIL_Z * f.delay_sigma, 709.0))
        _check(
            tail <= sim,
            "faults.delay_sigma",
            f"a lognormal delay of median faults.delay_s={f.delay_s:g} and log-sd "
            f"{f.delay_sigma:g} draws up to {tail:.3g} simulated seconds, above {sim:g}; "
            "use a smaller log-sd",
        )
    _check(
        0 <= f.sleep_scale <= 10,
        "faults.sleep_scale",
        f"must be in [0, 10] real seconds per simulated second, got {f.sleep_scale}",
    )
    _check(
        f.delay_dist == "none" or f.delay_s > 0,
        "faults.delay_s",
        f"faults.delay_dist={f.delay_dist} needs faults.delay_s > 0",
    )
    _check(
        f.delay_dist == "none" or f.sleep_scale * f.delay_s <= limits.MAX_SLEEP_SECONDS,
        "faults.sleep_scale",
        f"a task would really sleep faults.sleep_scale x faults.delay_s = "
        f"{f.sleep_scale * f.delay_s:g} s for a typical delay, more than a day "
        f"({limits.MAX_SLEEP_SECONDS:g} s)",
    )
    r = cfg.round
    _check(
        0 <= r.deadline_s <= sim,
        "round.deadline_s",
        f"must be in [0, {sim:g}] simulated seconds, got {r.deadline_s:g}",
    )
    _check(
        r.max_empty_rounds >= 0,
        "round.max_empty_rounds",
        f"must be >= 0 (0: never stop), got {r.max_empty_rounds}",
    )
    per_round = clients_per_round(cfg)
    _check(
        1 <= r.min_clients <= per_round,
        "round.min_clients",
        f"must be in [1, {per_round}] (the clients sampled per round), got {r.min_clients}",
    )
    d = cfg.devices
    _check(
        0 <= d.step_s <= sim,
        "devices.step_s",
        f"must be in [0, {sim:g}] simulated seconds, got {d.step_s:g}",
    )
    for name, p in d.profiles.items():
        key = f"devices.profiles.{name}"
        _check(
            0 <= p.share <= _MAX_SHARE,
            f"{key}.share",
            f"must be in [0, {_MAX_SHARE:g}] (shares are relative), got {p.share:g}",
        )
        for name_, value in (
            ("speed", p.speed),
            ("up_mbps", p.up_mbps),
            ("down_mbps", p.down_mbps),
        ):
            _check(
                _MIN_RATE <= value <= _MAX_RATE,
                f"{key}.{name_}",
                f"must be in [{_MIN_RATE:g}, {_MAX_RATE:g}] (a task's simulated seconds "
                f"divide by it), got {value:g}",
            )
    _check(
        not d.profiles or sum(p.share for p in d.profiles.values()) > 0,
        "devices.profiles",
        "the shares must not all be 0 ("
        + ", ".join(f"devices.profiles.{name}.share" for name in d.profiles)
        + ")",
    )
    c = cfg.checkpoint
    _check(c.every >= 0, "checkpoint.every", f"must be >= 0, got {c.every}")
    _check(c.keep >= 1, "checkpoint.keep", f"must be >= 1, got {c.keep}")
    _check(
        0 < cfg.resources.placement_timeout_s <= 3600,
        "resources.placement_timeout_s",
        f"must be in (0, 3600] seconds, got {cfg.resources.placement_timeout_s}",
    )


def _check_combinations(cfg: FedSimConfig) -> None:
    """Names from the registries, then every method's own rules (:mod:`fedsim.methods`)."""
    merger = merger_class(cfg.aggregation.method)
    method = f"aggregation.method={cfg.aggregation.method}"
    opt = cfg.server.optimizer
    _check(
        opt in SERVER_OPTIMIZERS,
        "server.optimizer",
        f"unknown optimiser {opt!r}; allowed: {', '.join(SERVER_OPTIMIZERS)}",
    )
    _check(
        cfg.objective.method in OBJECTIVES,
        "objective.method",
        f"unknown objective {cfg.objective.method!r}; allowed: {', '.join(OBJECTIVES)}",
    )
    _check(
        opt == "fedavg" or merger.linear_in_factors,
        "server.optimizer",
        f"{method} does not compose with server.optimizer={opt}: "
        + (
            "FLoRA stacks a fresh adapter every round, so there is no persistent global "
            "adapter for moments to act on"
            if merger.fresh_adapter_each_round
            else "its factors are re-derived by an SVD every round (signs and bases change), "
            "so moments over them are meaningless"
        )
        + "; use server.optimizer=fedavg",
    )
    for method in method_classes():  # each method's own rules, in hook order
        method.check(cfg)
    _check(
        cfg.data.partition != "centralized" or cfg.clients.num == 1,
        "clients.num",
        f"data.partition=centralized is one client holding all data; set clients.num=1 "
        f"(got {cfg.clients.num})",
    )
    _check(
        cfg.server.lr is None or 0 < cfg.server.lr <= limits.MAX_LR,
        "server.lr",
        f"must be > 0 and <= {limits.MAX_LR:g} (a larger step overflows float32), "
        f"got {cfg.server.lr}",
    )
    _check(0 <= cfg.server.beta1 < 1, "server.beta1", "must be in [0, 1)")
    _check(0 <= cfg.server.beta2 < 1, "server.beta2", "must be in [0, 1)")
    _check(cfg.server.tau > 0, "server.tau", "must be > 0")
