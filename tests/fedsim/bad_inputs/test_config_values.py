"""Config values that pass a range check and break later, refused at load with one line.

Found by a hostile but realistic user (issue 27): finite numbers whose arithmetic overflows
rounds later (``train.lr=1e300``: every client fails; ``privacy.noise_multiplier=1e300``: the
accountant overflows after the run stopped), settings that can never apply given the clients
a round samples (Krum with more faulty clients than a round holds, Multi-Krum selecting more
than are sampled, a trimmed mean that trims nothing), and numbers in Unicode digits (``"²"``
passes ``str.isdigit``, ``"٣"`` passes ``int``). Each case runs ``fedsim run`` in-process on
the tiny config (3 of 6 clients sampled per round) and checks, through ``fails``: exit status
2, one line naming the key, no traceback, no checkpoint and no MLflow run.
"""

from __future__ import annotations

import math

import pytest
import torch

import fedsim
from fedsim.config import ConfigError, limits, load_config
from fedsim.config.strict import ascii_float, ascii_int

DP = ["privacy.enabled=true"]
ADAPTIVE = [*DP, "privacy.clipping=adaptive", "privacy.count_noise=1"]
ATTACK = ["faults.attack=scale", "faults.malicious=1"]
FEDPROX_SGD = ["objective.method=fedprox", "train.optimizer=sgd"]

VALUES = [
    # values whose arithmetic overflows downstream
    (["train.lr=1e300"], "train.lr"),
    (["train.lr=1e4"], "train.lr"),
    (["train.lr=1" + "0" * 400], "train.lr"),  # an int too large for a float
    (["server.optimizer=fedavgm", "server.lr=1e39"], "server.lr"),
    (["lora.alpha=1e300"], "lora.alpha"),
    (["objective.method=fedprox", "objective.mu=1e300"], "objective.mu"),
    ([*FEDPROX_SGD, "train.lr=0.5", "objective.mu=10"], "objective.mu"),  # lr mu = 5 > 2
    (["objective.method=fedmllm", "objective.layer_weight=1e300"], "objective.layer_weight"),
    (["pruning.gamma=1e300"], "pruning.gamma"),
    ([*DP, "privacy.noise_multiplier=1e300"], "privacy.noise_multiplier"),
    ([*DP, "privacy.noise_multiplier=1e-300"], "privacy.noise_multiplier"),  # 1/0 in RDP
    ([*DP, "privacy.clip_norm=1e300"], "privacy.clip_norm"),
    ([*DP, "privacy.target_epsilon=1e-300"], "privacy.target_epsilon"),  # never met
    ([*DP, "privacy.accountant=pld", "privacy.noise_multiplier=0.01"], "privacy.noise"),
    ([*ADAPTIVE, "privacy.clip_lr=1e300"], "privacy.clip_lr"),
    ([*ADAPTIVE, "privacy.count_noise=1e300"], "privacy.count_noise"),
    ([*ATTACK, "faults.attack_scale=1e300"], "faults.attack_scale"),
    (["faults.attack=gaussian", "faults.malicious=1", "faults.attack_norm=1e300"], "attack_norm"),
    (
        ["faults.delay_dist=lognormal", "faults.delay_s=1", "faults.delay_sigma=200"],
        "faults.delay_sigma",
    ),
    (
        ["faults.delay_dist=constant", "faults.delay_s=1e5", "faults.sleep_scale=1"],
        "faults.sleep_scale",
    ),
    (["devices.step_s=1e300"], "devices.step_s"),
    (["round.deadline_s=1e300"], "round.deadline_s"),
    (["devices.profiles.slow.share=1", "devices.profiles.slow.speed=1e-300"], "slow.speed"),
    (["resources.client.num_cpus=1e300"], "resources.client.num_cpus"),
    (["resources.client.num_gpus=1e300"], "resources.client.num_gpus"),
    (["checkpoint.keep=9223372036854775808"], "checkpoint.keep"),
    (["train.max_local_steps=" + "1" + "0" * 30], "train.max_local_steps"),
    # settings that can never apply to the 3 clients a round samples
    (["robust.rule=krum", "robust.num_faulty=1"], "robust.num_faulty"),  # needs f + 3 = 4
    (["robust.rule=multi_krum", "robust.num_faulty=0", "robust.num_selected=4"], "num_selected"),
    (["robust.rule=trimmed_mean", "robust.trim=0.2"], "robust.trim"),  # floor(0.6) = 0
    (["robust.rule=trimmed_mean", "robust.trim=0.4", "clients.fraction=0.2"], "robust.trim"),
    (["pruning.gamma=0.1", "pruning.min_rank=8"], "pruning.min_rank"),  # 8 - 1 < 8
    # Unicode digits are not integers, and nothing but true/false is a boolean
    (["seed=٣"], "seed"),
    (["train.batch_size=１６"], "train.batch_size"),  # fullwidth digits
    (["train.lr=٠.٠١"], "train.lr"),
    ([*ATTACK[:1], "faults.malicious=²"], "faults.malicious"),
    (["clients.ranks=[8,8,4,4,2,٢]"], "clients.ranks"),
    (["data.scenario=cross", "data.cross_ratio=٣:٧"], "data.cross_ratio"),
    (["faults.nan_update_clients=[٣]"], "faults.nan_update_clients"),
    (["progress=-1"], "progress"),
    (["tracking.plots=2"], "tracking.plots"),
    # a list inside a list of names or ids
    (["model.targets=[[q_proj]]"], "model.targets"),
    (["faults.nan_update_clients=[[1]]"], "faults.nan_update_clients"),
]


@pytest.mark.parametrize(("overrides", "culprit"), VALUES, ids=lambda v: str(v)[:60])
def test_config_value(fails, base, overrides, culprit):
    fails(["run", *base, *overrides], culprit)


FILES = {
    "unicode-seed": ("seed: '٣'\n", "seed"),
    "int-as-bool": ("tracking:\n  plots: 1\n", "tracking.plots"),
    "superscript-id": ("faults:\n  attack: scale\n  malicious: '²'\n", "faults.malicious"),
}


@pytest.mark.parametrize("kind", list(FILES))
def test_config_file_value(fails, base, workdir, kind):
    content, culprit = FILES[kind]
    path = workdir / f"{kind}.yaml"
    path.write_text(content, encoding="utf-8")
    fails(["run", str(path), *base], culprit)


def test_python_api_refuses_unicode_digits_in_a_dict():
    with pytest.raises(ConfigError) as info:
        fedsim.run({"seed": "٣", "rounds": 0})
    assert info.value.key == "seed"


# --- what stays valid: the bounds themselves, and the numbers of valid configs -----------


@pytest.mark.parametrize(
    "overrides",
    [
        [f"train.lr={limits.MAX_LR}"],
        ["server.optimizer=fedavgm", f"server.lr={limits.MAX_LR}"],
        ["robust.rule=krum", "robust.num_faulty=1", "clients.fraction=0.4"],  # n = 4 = f + 3
        ["robust.rule=multi_krum", "robust.num_faulty=1", "robust.num_selected=3"],  # n - f
        ["robust.rule=trimmed_mean", "robust.trim=0.25"],  # floor(0.25 x 4) = 1
        [*DP, "privacy.noise_multiplier=1000", "privacy.clip_norm=1"],  # z C = MAX_NOISE_STD
        ["seed=3", "train.batch_size=+16", "progress=false", "tracking.plots=yes"],
        ["faults.attack=scale", "faults.malicious=0.2"],
        ["faults.attack=scale", "faults.malicious=[1, 3]"],
        ["data.scenario=cross", "data.cross_ratio=3:7"],
    ],
    ids=lambda v: " ".join(v)[:60],
)
def test_values_at_the_bounds_load(overrides):
    load_config(None, overrides)  # the defaults: 10 clients, 4 sampled per round


@pytest.mark.slow  # the privacy studies calibrate their noise at load: seconds each
def test_every_shipped_experiment_and_study_variant_still_loads():
    """The bounds refuse nothing fedsim ships: every experiment, and every variant and grid
    cell of every study, on the experiment it runs on."""
    import itertools

    import yaml

    from fedsim import experiments

    for name in experiments.names("run"):
        load_config(name)
    for name in experiments.names("study"):
        study = yaml.safe_load(experiments.shipped(name).read_text(encoding="utf-8"))
        base, common = experiments.shipped(study["base"]), list(study.get("overrides", []))
        cells = [[]]
        for grid in study.get("grids", []):
            keys = list(grid)
            cells += [
                [f"{k}={v}" for k, v in zip(keys, values)]
                for values in itertools.product(*(grid[k] for k in keys))
            ]
        for variant, cell in itertools.product(study["variants"].values(), cells):
            load_config(base, [*common, *cell, *variant])


@pytest.mark.parametrize(
    ("text", "value"),
    [("3", 3), (" 12 ", 12), ("-4", -4), ("+5", 5), ("٣", None), ("²", None), ("１", None)]
    + [("3.0", None), ("", None), ("1_000", None), ("0x10", None)],
)
def test_ascii_int_takes_ascii_digits_only(text, value):
    assert ascii_int(text) == value


@pytest.mark.parametrize(
    ("text", "value"),
    [("1e-3", 1e-3), (".5", 0.5), ("-2", -2.0), ("3.", 3.0), ("٣", None), ("٠.٥", None)]
    + [("1e", None), ("", None), ("infinity", float("inf"))],
)
def test_ascii_float_takes_ascii_numbers_only(text, value):
    assert ascii_float(text) == value


# --- at run time: adaptive clipping beyond what the load-time bound allows ----------------


def _adapter(rank: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "m.lora_A.weight": torch.randn(rank, 6, generator=g),
        "m.lora_B.weight": torch.randn(5, rank, generator=g),
    }


@pytest.mark.parametrize("next_clip", [0.0, math.inf, OverflowError])
def test_a_clip_norm_leaving_the_float_range_stops_the_run(monkeypatch, next_clip):
    """The bound holds the count noise within six standard deviations; past them (or with a
    math that still overflows) the server stops the run with a reason, never a traceback
    from clip_update's ``max_norm ... 0.0``."""
    from actors.server import ServerState
    from aggregation import FedAvg
    from fedsim.config.registry import build_merger, enabled_methods
    from fedsim.errors import RunFailed
    from fedsim.messages import ClientMeta, Upload
    from fedsim.methods import privacy

    def step(*args):
        if next_clip is OverflowError:
            raise OverflowError("math range error")
        return next_clip

    monkeypatch.setattr(privacy, "adaptive_clip_update", step)
    cfg = load_config(None, [*ADAPTIVE, "aggregation.method=zeropad", "editing.enabled=false"])
    server = ServerState(build_merger(cfg), _adapter(4, 0), FedAvg(), enabled_methods(cfg), 10)
    metas = [ClientMeta(c, 4, 10, 1) for c in range(4)]
    uploads = [Upload(_adapter(4, seed=c + 1)) for c in range(4)]
    with pytest.raises(RunFailed, match="privacy.clip_lr"):
        server.aggregate(1, metas, uploads)
