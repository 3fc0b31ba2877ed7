"""Typed experiment configuration: defaults, then a YAML file, then dotlist overrides.

Every field has help text in its ``metadata``; cross-field rules are checked once in
:func:`validate`, which raises :class:`ConfigError` naming the key and what is allowed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from aggregation import MERGERS, SERVER_OPTIMIZERS
from fedsim.errors import ConfigError
from fedsim.methods import (
    OBJECTIVES,
    EditingConfig,
    FedExConfig,
    PruningConfig,
    check_methods,
)

# FediLoRA's setting: ranks of its 10 clients. Repeated in blocks of 10 for more clients.
FEDILORA_RANKS = (32, 32, 16, 16, 8, 8, 4, 4, 4, 4)
BACKBONES = ("minilm-effnet", "tiny", "hf", "smolvlm-effnet", "hf-vlm")
# Backbones that generate text (the generation task); the others are classifiers.
GENERATIVE_BACKBONES = ("smolvlm-effnet", "hf-vlm")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class ClientsConfig:
    num: int = field(default=10, metadata=_help("Number of simulated clients."))
    fraction: float = field(
        default=0.4, metadata=_help("Share of clients sampled per round, in (0, 1].")
    )
    ranks: Any = field(
        default_factory=lambda: list(FEDILORA_RANKS),
        metadata=_help(
            "LoRA rank per client: a list of clients.num ints, or a named distribution: "
            "'fedilora' (FediLoRA's 32,32,16,16,8,8,4,4,4,4 pattern repeated), "
            "'equal:R' (every client R), 'choice:R1,R2,...' (seeded draw per client)."
        ),
    )


@dataclass
class DataConfig:
    dataset: Literal["emoji", "hateful_memes", "crisismmd", "llava"] = field(
        default="emoji",
        metadata=_help(
            "emoji (built in: OpenMoji + Unicode names); hateful_memes or crisismmd (their "
            "released files under data.root); llava (LLaVA conversation JSON: "
            "data.root/train.json and data.root/<test_split>.json, generative models only)."
        ),
    )
    root: str | None = field(
        default=None, metadata=_help("Directory holding a real dataset's files.")
    )
    test_split: str | None = field(
        default=None,
        metadata=_help(
            "Real datasets: the split used as the global test set (default: dev for "
            "hateful_memes, test for crisismmd); their train split is partitioned."
        ),
    )
    on_error: Literal["raise", "skip"] = field(
        default="raise",
        metadata=_help("A corrupt row, missing image or bad label: stop, or skip and count it."),
    )
    label: Literal["group", "subgroup"] = field(
        default="group", metadata=_help("Target: Unicode group (9 classes) or subgroup.")
    )
    target: Literal["caption", "label"] = field(
        default="caption",
        metadata=_help(
            "Generative models on emoji: caption (the image, plus a hint where the client has "
            "text, to the emoji's Unicode name) or label (the class name, posed as instruction "
            "following). Hateful Memes and CrisisMMD are always label; llava always caption."
        ),
    )
    prompt_style: Literal["default", "agnostic"] = field(
        default="default",
        metadata=_help(
            "Generative models: default (the instruction names the modalities a sample has) or "
            "agnostic (FedMLLM's modality-agnostic prompt: one template for every sample)."
        ),
    )
    image_size: int = field(default=32, metadata=_help("Rendered image side in pixels."))
    test_fraction: float = field(default=0.2, metadata=_help("Share held out as global test."))
    holdout_fraction: float = field(
        default=0.2, metadata=_help("Share of each client's data held out for personalised eval.")
    )
    partition: Literal["dirichlet", "centralized"] = field(
        default="dirichlet",
        metadata=_help(
            "dirichlet: label-skew split over clients; centralized: the centralised baseline, "
            "one client (clients.num=1) holding all training data."
        ),
    )
    alpha: float = field(default=0.5, metadata=_help("Dirichlet concentration of label skew."))
    min_per_client: int = field(default=10, metadata=_help("Minimum samples per client."))
    scenario: Literal["aligned", "missing", "fedilora", "cross", "hybrid"] = field(
        default="fedilora",
        metadata=_help(
            "Modality heterogeneity: aligned (both kept); missing (each row loses each modality "
            "with probability missing_beta); fedilora (a share missing_rate of each client's "
            "rows loses exactly one); cross (image-only : text-only clients, cross_ratio); "
            "hybrid (each client keeps each modality with probability hybrid_p)."
        ),
    )
    missing_rate: float = field(
        default=0.4,
        metadata=_help(
            "FediLoRA missing rate: share of each client's samples missing one modality."
        ),
    )
    missing_beta: float = field(
        default=0.3, metadata=_help("missing: per-row probability of losing each modality.")
    )
    cross_ratio: str = field(
        default="3:7", metadata=_help("cross: image-only : text-only clients, e.g. 3:7.")
    )
    hybrid_p: float = field(
        default=0.8, metadata=_help("hybrid: probability that a client keeps each modality.")
    )
    image_fill: Literal["zeros", "learned", "mask"] = field(
        default="zeros",
        metadata=_help(
            "A missing image: zeros (a zero input image, FediLoRA's choice), learned (a "
            "trained, federated embedding replaces the image features), or mask (the image "
            "features are zeroed)."
        ),
    )
    text_fill: Literal["placeholder", "mask"] = field(
        default="placeholder",
        metadata=_help(
            "A missing text: placeholder (data.text_placeholder is encoded instead) or mask "
            "(the text features are zeroed)."
        ),
    )
    text_placeholder: str = field(
        default="", metadata=_help("Text that stands in for a missing text (empty string).")
    )
    max_text_tokens: int = field(
        default=32,
        metadata=_help("Token limit of the text tower (generative models: of the prompt text)."),
    )
    subset: int | None = field(
        default=None, metadata=_help("Keep only this many samples (seeded), for quick runs.")
    )
    cache_dir: str | None = field(
        default=None, metadata=_help("Where built datasets are cached (default ~/.cache/fedsim).")
    )


@dataclass
class ModelConfig:
    backbone: str = field(
        default="minilm-effnet",
        metadata=_help(
            "'minilm-effnet' (pretrained MiniLM + EfficientNet-Lite0), 'tiny' (random, tests), "
            "or 'hf' (model.text_encoder / model.vision_encoder by hub id or local path)."
        ),
    )
    text_encoder: str | None = field(default=None, metadata=_help("hf: text encoder id/path."))
    vision_encoder: str | None = field(default=None, metadata=_help("hf: vision encoder id/path."))
    text_targets: list[str] = field(
        default_factory=lambda: ["query", "value", "q_proj", "v_proj"],
        metadata=_help("hf: module-name suffixes that get LoRA in the text tower."),
    )
    vision_targets: list[str] = field(
        default_factory=lambda: ["query", "value", "q_proj", "v_proj"],
        metadata=_help("hf: module-name suffixes that get LoRA in the vision tower."),
    )
    head_hidden: int = field(default=256, metadata=_help("Hidden width of the fusion head."))
    head_dropout: float = field(default=0.1, metadata=_help("Dropout in the fusion head."))
    name_or_path: str | None = field(
        default=None,
        metadata=_help(
            "hf-vlm: a Hugging Face image-text-to-text model (hub id or local directory), "
            "loaded with AutoProcessor + AutoModelForImageTextToText."
        ),
    )
    targets: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj"],
        metadata=_help(
            "Generative models: module-name suffixes that get LoRA, in the vision tower and "
            "the language model alike (FediLoRA: q_proj, v_proj)."
        ),
    )
    target_regex: str | None = field(
        default=None,
        metadata=_help(
            "Generative models: a full-match regex of module names that get LoRA, instead of "
            "model.targets (e.g. '.*text_model.*(q_proj|v_proj)' for the language model only)."
        ),
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata=_help(
            "Generative models: non-LoRA modules trained in full and federated like the "
            "classifier head (default: the projector for smolvlm-effnet, none for hf-vlm; "
            "e.g. [multi_modal_projector] for LLaVA)."
        ),
    )
    dtype: Literal["float32", "bfloat16"] = field(
        default="float32",
        metadata=_help(
            "Generative models: dtype of the frozen weights (bfloat16 halves memory on GPUs; "
            "LoRA tensors stay float32)."
        ),
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata=_help("Generative models: recompute activations in backward (saves memory)."),
    )


@dataclass
class LoraConfig:
    alpha: float = field(default=16.0, metadata=_help("LoRA alpha."))
    scaling: Literal["constant", "rank"] = field(
        default="constant",
        metadata=_help(
            "'constant': every client uses s = alpha / R (R = largest rank), so B@A means the "
            "same on every client; 'rank': peft's per-client alpha / r_i."
        ),
    )
    dropout: float = field(default=0.0, metadata=_help("LoRA dropout."))


@dataclass
class AggregationConfig:
    method: str = field(
        default="fedilora", metadata=_help("Heterogeneous-rank merge: " + ", ".join(MERGERS))
    )
    empty_dim: Literal["keep", "zero"] = field(
        default="keep",
        metadata=_help("FediLoRA: a rank dimension no sampled client covers keeps or zeroes."),
    )
    svd: Literal["auto", "exact", "lowrank"] = field(
        default="auto",
        metadata=_help("FlexLoRA: exact SVD, randomised torch.svd_lowrank, or auto by size."),
    )


@dataclass
class SharingConfig:
    policy: str = field(
        default="all",
        metadata=_help(
            "Which LoRA parts go to the server: all; B (pLoRA: each client keeps its own A); "
            "A (FedSA-LoRA: each client keeps its own B); none (local-only baseline)."
        ),
    )


@dataclass
class ServerConfig:
    optimizer: str = field(
        default="fedavg",
        metadata=_help(
            "Server optimiser on the pseudo-gradient (Reddi et al. 2021): "
            + ", ".join(SERVER_OPTIMIZERS)
        ),
    )
    lr: float | None = field(
        default=None, metadata=_help("Server learning rate (default: 1.0 FedAvgM, 1e-2 adaptive).")
    )
    beta1: float = field(default=0.9, metadata=_help("First-moment decay."))
    beta2: float = field(default=0.99, metadata=_help("Second-moment decay."))
    tau: float = field(default=1e-3, metadata=_help("Adaptivity (epsilon) of adaptive optimisers."))


@dataclass
class ObjectiveConfig:
    method: str = field(
        default="plain",
        metadata=_help(
            "Client objective: plain; fedprox (mu/2 ||theta - theta_g||^2); scaffold (control "
            "variates); fednova (normalised averaging); fedmllm (FedProx term weighted by "
            "layer_weight on layers layer_skip .. L-1-layer_skip only)."
        ),
    )
    mu: float = field(default=0.01, metadata=_help("Proximal coefficient (fedprox, fedmllm)."))
    layer_weight: float = field(default=0.1, metadata=_help("fedmllm: weight w of the term."))
    layer_skip: int = field(
        default=1,
        metadata=_help(
            "fedmllm: layers s .. L-1-s of each tower get the term (FedMLLM uses s=4 on a "
            "32-layer LLM; the default MiniLM tower has 6 layers, hence 1)."
        ),
    )


@dataclass
class TrainConfig:
    local_epochs: int = field(default=1, metadata=_help("Local epochs per round."))
    max_local_steps: int | None = field(
        default=None, metadata=_help("Cap on local optimiser steps per round.")
    )
    batch_size: int = field(default=32, metadata=_help("Local training batch size."))
    eval_batch_size: int = field(default=256, metadata=_help("Evaluation batch size."))
    optimizer: Literal["adamw", "sgd"] = field(
        default="adamw", metadata=_help("Local optimiser (SCAFFOLD needs sgd).")
    )
    lr: float = field(default=2e-3, metadata=_help("Local learning rate."))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay."))
    precision: Literal["fp32", "bf16"] = field(
        default="fp32", metadata=_help("Autocast precision of the forward pass.")
    )


@dataclass
class EvalConfig:
    every: int = field(
        default=1,
        metadata=_help(
            "Evaluate (global and personalised) every this many rounds; round 0 and the last "
            "round are always evaluated."
        ),
    )
    max_samples: int | None = field(
        default=None,
        metadata=_help(
            "Cap on the samples of the global test set and of each client's held-out split "
            "that are evaluated (a fixed seeded subset); None: all."
        ),
    )
    max_new_tokens: int = field(
        default=32, metadata=_help("Generative models: greedy decoding length limit.")
    )
    examples: int = field(
        default=8,
        metadata=_help("Generative models: example generations logged per evaluated round."),
    )


@dataclass
class ClientResources:
    num_cpus: float = field(default=1.0, metadata=_help("CPUs per client actor."))
    num_gpus: float = field(default=0.0, metadata=_help("GPU fraction per client actor."))


@dataclass
class ResourcesConfig:
    client: ClientResources = field(default_factory=ClientResources)
    actors: int | None = field(
        default=None, metadata=_help("Cap on the actor pool (default: what the cluster fits).")
    )
    max_retries: int = field(
        default=1, metadata=_help("Retries of a failed client task on another actor.")
    )
    placement: Literal["pack", "spread", "strict_spread", "none"] = field(
        default="pack",
        metadata=_help(
            "Reserve the client actors in a Ray placement group: pack (fill a node, e.g. four "
            "0.25-GPU actors on one GPU, before the next), spread (one per node where it can), "
            "strict_spread (one per node, or fail), none (plain actors)."
        ),
    )
    placement_timeout_s: float = field(
        default=60.0,
        metadata=_help(
            "Seconds to wait for the cluster to place the actor pool before failing with the "
            "numbers (an autoscaling cluster may need minutes to add nodes)."
        ),
    )


@dataclass
class FaultsConfig:
    nan_update_clients: list[int] = field(
        default_factory=list,
        metadata=_help(
            "Client ids whose uploads are poisoned with NaN, to exercise the server's update "
            "validation (such updates must be rejected and logged, never merged)."
        ),
    )
    fail_prob: float = field(
        default=0.0,
        metadata=_help(
            "Probability that a client task attempt fails after training (seeded per seed, "
            "round, client and attempt); the pool retries it like any failure."
        ),
    )
    fail_mode: Literal["raise", "crash"] = field(
        default="raise",
        metadata=_help(
            "How an injected failure happens: raise an exception in the task, or crash the "
            "actor's process (the pool then replaces the actor)."
        ),
    )
    delay_dist: Literal["none", "constant", "uniform", "exponential", "lognormal"] = field(
        default="none",
        metadata=_help(
            "Distribution of the extra simulated seconds a straggling client task takes: "
            "constant (delay_s), uniform on [0, 2 delay_s], exponential (mean delay_s), "
            "lognormal (median delay_s, log-sd delay_sigma)."
        ),
    )
    delay_s: float = field(default=0.0, metadata=_help("Scale of faults.delay_dist, seconds."))
    delay_sigma: float = field(default=1.0, metadata=_help("Log-sd of the lognormal delay."))
    delay_prob: float = field(
        default=1.0, metadata=_help("Probability that a client task is delayed at all.")
    )
    sleep_scale: float = field(
        default=0.0,
        metadata=_help(
            "Real seconds a delayed task sleeps per simulated delay second (0: the delay is "
            "only on the simulated clock). Makes clients really finish out of order."
        ),
    )


@dataclass
class RoundConfig:
    deadline_s: float = field(
        default=0.0,
        metadata=_help(
            "Close a round after this many simulated seconds; clients that would report later "
            "are late: left out of the merge and counted in clients/late (0: no deadline)."
        ),
    )
    min_clients: int = field(
        default=1,
        metadata=_help(
            "A round waits past the deadline until this many clients reported; with fewer "
            "successful clients in all, the round merges nothing."
        ),
    )
    max_empty_rounds: int = field(
        default=3,
        metadata=_help(
            "Stop the run with an error once this many rounds in a row merged no update "
            "(every sampled client failed, was late or was rejected); 0: never stop."
        ),
    )


@dataclass
class DeviceProfile:
    share: float = field(default=1.0, metadata=_help("Share of clients with this profile."))
    speed: float = field(default=1.0, metadata=_help("Compute speed (1: the reference device)."))
    up_mbps: float = field(default=10.0, metadata=_help("Upload bandwidth, Mbit/s."))
    down_mbps: float = field(default=50.0, metadata=_help("Download bandwidth, Mbit/s."))


@dataclass
class DevicesConfig:
    step_s: float = field(
        default=0.5,
        metadata=_help("Simulated seconds of one local training step on a speed-1 device."),
    )
    profiles: dict[str, DeviceProfile] = field(
        default_factory=dict,
        metadata=_help(
            "Named device profiles (share, speed, up_mbps, down_mbps), assigned to clients by a "
            "seeded draw with the given shares; empty: every client is the reference device "
            "(speed 1, 10 Mbit/s up, 50 Mbit/s down)."
        ),
    )


@dataclass
class CheckpointConfig:
    dir: str = field(
        default="runs",
        metadata=_help(
            "Checkpoints go to DIR/<MLflow run id>/; resume with fedsim run --resume that path."
        ),
    )
    every: int = field(
        default=1, metadata=_help("Write a checkpoint every this many rounds (0: never).")
    )
    keep: int = field(default=2, metadata=_help("How many recent checkpoints to keep."))


@dataclass
class TrackingConfig:
    uri: str = field(default="sqlite:///mlflow.db", metadata=_help("MLflow tracking URI."))
    experiment: str = field(default="fedsim", metadata=_help("MLflow experiment name."))
    run_name: str | None = field(default=None, metadata=_help("MLflow run name."))
    parent_run_id: str | None = field(
        default=None, metadata=_help("Nest the run under this MLflow run (set by sweeps).")
    )
    save_adapter: bool = field(default=True, metadata=_help("Log the final global adapter."))
    save_client_adapters: bool = field(
        default=False,
        metadata=_help(
            "Also log each client's last personalised adapter (clients/cNNNNNN) as a peft "
            "adapter directory."
        ),
    )
    plots: bool = field(default=True, metadata=_help("Log PNG plots of the curves."))


@dataclass
class FedSimConfig:
    seed: int = field(default=0, metadata=_help("Seed of every random choice."))
    rounds: int = field(
        default=10,
        metadata=_help("Federated rounds; 0 is the zero-shot baseline (round 0 evaluation only)."),
    )
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    sharing: SharingConfig = field(default_factory=SharingConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    editing: EditingConfig = field(default_factory=EditingConfig)
    fedex: FedExConfig = field(default_factory=FedExConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    round: RoundConfig = field(default_factory=RoundConfig)
    devices: DevicesConfig = field(default_factory=DevicesConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    progress: bool = field(default=True, metadata=_help("Show a progress bar and summary."))


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
    merged = OmegaConf.structured(FedSimConfig)
    try:
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError("config", f"file not found: {path}")
            try:
                loaded = OmegaConf.load(path)
            except Exception as exc:  # yaml errors carry line numbers
                reason = " ".join(str(exc).split())[:500]
                raise ConfigError("config", f"cannot parse {path}: {reason}") from None
            merged = _merge_file(merged, loaded, path)
        for item in overrides:
            key, eq, _ = item.partition("=")
            if not eq:
                raise ConfigError(item, "an override must look like key=value")
            try:
                merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
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
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _raise_from_omegaconf(exc) from None
    validate(cfg)
    return cfg


def as_config(config: FedSimConfig | DictConfig | dict | str | Path | None) -> FedSimConfig:
    """Accept a config object, a plain dict of overrides, a YAML path or None (defaults)."""
    if isinstance(config, FedSimConfig):
        validate(config)
        return config
    if config is None or isinstance(config, (str, Path)):
        return load_config(config)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(FedSimConfig), config)
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


def resolve_ranks(clients: ClientsConfig, seed: int) -> list[int]:
    """Turn ``clients.ranks`` into one rank per client.

    Raises:
        ConfigError: a malformed list or distribution name.
    """
    import numpy as np

    spec = clients.ranks
    n = clients.num
    if isinstance(spec, (list, tuple)):
        ranks = list(spec)
        if len(ranks) != n:
            raise ConfigError("clients.ranks", f"has {len(ranks)} entries but clients.num is {n}")
    elif isinstance(spec, int):
        ranks = [spec] * n
    elif isinstance(spec, str):
        name, _, arg = spec.partition(":")
        if name == "fedilora" and not arg:
            ranks = [FEDILORA_RANKS[i % len(FEDILORA_RANKS)] for i in range(n)]
        elif name == "equal" and arg.strip().isdigit():
            ranks = [int(arg)] * n
        elif name == "choice" and arg and all(p.strip().isdigit() for p in arg.split(",")):
            options = [int(p) for p in arg.split(",")]
            rng = np.random.default_rng([seed, 0x5A4B])
            ranks = [int(r) for r in rng.choice(options, size=n)]
        else:
            raise ConfigError(
                "clients.ranks",
                f"unknown distribution {spec!r}; allowed: a list of ints, 'fedilora', "
                "'equal:R', 'choice:R1,R2,...'",
            )
    else:
        raise ConfigError("clients.ranks", f"must be a list of ints or a name, got {spec!r}")
    for i, r in enumerate(ranks):
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ConfigError("clients.ranks", f"client {i}: rank must be an int >= 1, got {r!r}")
    return ranks


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
        elif isinstance(value, int) and not isinstance(value, bool) and key in _UPPER:
            _check(
                value <= _UPPER[key],
                key,
                f"{value} is above the limit of {_UPPER[key]:,} (a typo?)",
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
        from fedsim.data.partition import parse_ratio

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
        d.dataset == "emoji" or bool(d.root),
        "data.root",
        f"data.dataset={d.dataset} reads its files from a directory; set data.root",
    )
    m = cfg.model
    _check(
        m.backbone in BACKBONES,
        "model.backbone",
        f"unknown backbone {m.backbone!r}; allowed: {', '.join(BACKBONES)}",
    )
    if m.backbone == "hf":
        _check(bool(m.text_encoder), "model.text_encoder", "is required when model.backbone=hf")
        _check(bool(m.vision_encoder), "model.vision_encoder", "is required when model.backbone=hf")
    _check(0 <= m.head_dropout < 1, "model.head_dropout", "must be in [0, 1)")
    _check(m.head_hidden >= 1, "model.head_hidden", f"must be >= 1, got {m.head_hidden}")
    _validate_generative(cfg)
    _check(cfg.lora.alpha > 0, "lora.alpha", f"must be > 0, got {cfg.lora.alpha}")
    _check(0 <= cfg.lora.dropout < 1, "lora.dropout", "must be in [0, 1)")
    _check(
        cfg.aggregation.method in MERGERS,
        "aggregation.method",
        f"unknown method {cfg.aggregation.method!r}; allowed: {', '.join(sorted(MERGERS))}",
    )
    t = cfg.train
    _check(t.local_epochs >= 1, "train.local_epochs", "must be >= 1")
    _check(
        t.max_local_steps is None or t.max_local_steps >= 1, "train.max_local_steps", "must be >= 1"
    )
    _check(t.batch_size >= 1, "train.batch_size", "must be >= 1")
    _check(t.eval_batch_size >= 1, "train.eval_batch_size", "must be >= 1")
    _check(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    _check(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    r = cfg.resources
    _check(r.client.num_cpus > 0, "resources.client.num_cpus", "must be > 0")
    _check(
        r.client.num_gpus >= 0
        and (r.client.num_gpus <= 1 or float(r.client.num_gpus).is_integer()),
        "resources.client.num_gpus",
        f"must be 0, a fraction in (0, 1] or a whole number, got {r.client.num_gpus}",
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
    _check_combinations(cfg)
    for cid in cfg.faults.nan_update_clients:
        _check(
            0 <= cid < cfg.clients.num,
            "faults.nan_update_clients",
            f"client id {cid} is not in [0, {cfg.clients.num})",
        )
    _validate_faults_rounds_devices(cfg)


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
    if m.backbone == "hf-vlm":
        _check(
            bool(m.name_or_path),
            "model.name_or_path",
            "is required when model.backbone=hf-vlm (a hub id or a local model directory)",
        )
    if not is_generative(cfg):
        _check(
            d.dataset != "llava",
            "data.dataset",
            "llava conversation data needs a generative model: model.backbone=smolvlm-effnet "
            "or hf-vlm",
        )
        return
    _check(
        d.image_fill != "learned",
        "data.image_fill",
        "learned is a classifier's fill (a trained embedding of the image features); a "
        "generative model takes zeros (a zero image) or mask (no image in the prompt)",
    )


def _validate_faults_rounds_devices(cfg: FedSimConfig) -> None:
    f = cfg.faults
    _check(0 <= f.fail_prob <= 1, "faults.fail_prob", f"must be in [0, 1], got {f.fail_prob}")
    _check(0 <= f.delay_prob <= 1, "faults.delay_prob", f"must be in [0, 1], got {f.delay_prob}")
    _check(f.delay_s >= 0, "faults.delay_s", f"must be >= 0, got {f.delay_s}")
    _check(f.delay_sigma > 0, "faults.delay_sigma", f"must be > 0, got {f.delay_sigma}")
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
    r = cfg.round
    _check(r.deadline_s >= 0, "round.deadline_s", f"must be >= 0, got {r.deadline_s}")
    _check(
        r.max_empty_rounds >= 0,
        "round.max_empty_rounds",
        f"must be >= 0 (0: never stop), got {r.max_empty_rounds}",
    )
    per_round = max(1, int(round(cfg.clients.fraction * cfg.clients.num)))
    _check(
        1 <= r.min_clients <= per_round,
        "round.min_clients",
        f"must be in [1, {per_round}] (the clients sampled per round), got {r.min_clients}",
    )
    d = cfg.devices
    _check(d.step_s >= 0, "devices.step_s", f"must be >= 0, got {d.step_s}")
    for name, p in d.profiles.items():
        key = f"devices.profiles.{name}"
        _check(p.share >= 0, f"{key}.share", f"must be >= 0, got {p.share}")
        _check(p.speed > 0, f"{key}.speed", f"must be > 0, got {p.speed}")
        _check(p.up_mbps > 0, f"{key}.up_mbps", f"must be > 0, got {p.up_mbps}")
        _check(p.down_mbps > 0, f"{key}.down_mbps", f"must be > 0, got {p.down_mbps}")
    _check(
        not d.profiles or sum(p.share for p in d.profiles.values()) > 0,
        "devices.profiles",
        "the shares must not all be 0",
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
    merger = MERGERS[cfg.aggregation.method]
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
    check_methods(cfg)
    _check(
        cfg.data.partition != "centralized" or cfg.clients.num == 1,
        "clients.num",
        f"data.partition=centralized is one client holding all data; set clients.num=1 "
        f"(got {cfg.clients.num})",
    )
    _check(cfg.server.lr is None or cfg.server.lr > 0, "server.lr", "must be > 0")
    _check(0 <= cfg.server.beta1 < 1, "server.beta1", "must be in [0, 1)")
    _check(0 <= cfg.server.beta2 < 1, "server.beta2", "must be in [0, 1)")
    _check(cfg.server.tau > 0, "server.tau", "must be > 0")
