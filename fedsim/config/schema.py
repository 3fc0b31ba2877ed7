"""The config schema: one typed dataclass per section, every field with help text.

A method's own section lives in its module (``editing``, ``pruning``, ``fedex``: see
:mod:`fedsim.methods`); names that come from a registry (merge, objective, server optimiser,
sharing policy) are plain strings checked against that registry in :mod:`fedsim.config.checks`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fedsim.config.fields import doc
from fedsim.config.methods import (
    EditingConfig,
    FedExConfig,
    FedPLoRAConfig,
    PrivacyConfig,
    PruningConfig,
    RobustConfig,
)
from fedsim.config.ranks import FEDILORA_RANKS, rank_spec
from fedsim.config.registry import (
    BACKBONES as BACKBONE_SPECS,
)
from fedsim.config.registry import (
    DATASETS,
    MERGERS,
    OBJECTIVES,
    SERVER_OPTIMIZERS,
    SHARING_POLICIES,
)

BACKBONES = tuple(BACKBONE_SPECS)
# Backbones that generate text (the generation task); the others are classifiers.
GENERATIVE_BACKBONES = tuple(n for n, spec in BACKBONE_SPECS.items() if spec.generative)


@dataclass
class ClientsConfig:
    num: int = field(
        default=10,
        metadata=doc(
            "Number of simulated clients (for hundreds or thousands, give clients.ranks as a "
            "named distribution)."
        ),
    )
    fraction: float = field(
        default=0.4,
        metadata=doc(
            "Share of clients sampled per round, in (0, 1]: max(1, round(fraction * num)) clients."
        ),
    )
    ranks: str = field(
        default=rank_spec(FEDILORA_RANKS),
        metadata=doc(
            "LoRA rank per client: clients.num comma-separated ints (a YAML or override list "
            "[32, 32, ...] is taken too), one int for every client, or a named distribution: "
            "'fedilora' (FediLoRA's 32,32,16,16,8,8,4,4,4,4 pattern repeated), "
            "'equal:R' (every client R), 'choice:R1,R2,...' (seeded draw per client)."
        ),
    )

    def __post_init__(self) -> None:
        # a list given in code reads like one given in YAML
        self.ranks = rank_spec(self.ranks)


@dataclass
class DataConfig:
    dataset: str = field(
        default="emoji",
        metadata=doc(
            "; ".join(f"{n}: {spec.summary}" for n, spec in DATASETS.items())
            + " (real datasets read their files under data.root; llava needs a generative "
            "model).",
            choices=DATASETS,
        ),
    )
    root: str | None = field(
        default=None, metadata=doc("Directory holding a real dataset's files.")
    )
    test_split: str | None = field(
        default=None,
        metadata=doc(
            "Real datasets: the split used as the global test set (default: dev for "
            "hateful_memes, test for crisismmd); their train split is partitioned."
        ),
    )
    on_error: Literal["raise", "skip"] = field(
        default="raise",
        metadata=doc("A corrupt row, missing image or bad label: stop, or skip and count it."),
    )
    label: Literal["group", "subgroup"] = field(
        default="group", metadata=doc("Target: Unicode group (9 classes) or subgroup.")
    )
    target: Literal["caption", "label"] = field(
        default="caption",
        metadata=doc(
            "Generative models on emoji: caption (the image, plus a hint where the client has "
            "text, to the emoji's Unicode name) or label (the class name, posed as instruction "
            "following). Hateful Memes and CrisisMMD are always label; llava always caption."
        ),
    )
    prompt_style: Literal["default", "modality", "agnostic", "verbatim"] = field(
        default="default",
        metadata=doc(
            "Generative models: what ends each prompt. modality: a phrase naming the "
            "modalities the sample has ('Use the image and the text.'); agnostic: FedMLLM's "
            "modality-agnostic suffix, one for every sample ('Answer based on the given "
            "input.'); verbatim: nothing, the instruction as written; default: verbatim for "
            "conversation data (llava: the user's instruction reaches the model unchanged), "
            "modality for the datasets posed as instruction following (emoji, hateful_memes, "
            "crisismmd), whose instruction fedsim writes."
        ),
    )
    image_size: int = field(default=32, metadata=doc("Rendered image side in pixels."))
    test_fraction: float = field(default=0.2, metadata=doc("Share held out as global test."))
    holdout_fraction: float = field(
        default=0.2, metadata=doc("Share of each client's data held out for personalised eval.")
    )
    partition: Literal["dirichlet", "centralized"] = field(
        default="dirichlet",
        metadata=doc(
            "dirichlet: label-skew split over clients; centralized: the centralised baseline, "
            "one client (clients.num=1) holding all training data."
        ),
    )
    alpha: float = field(default=0.5, metadata=doc("Dirichlet concentration of label skew."))
    min_per_client: int = field(
        default=10,
        metadata=doc(
            "Minimum samples per client (the emoji set's 3,155 training rows allow 315 clients "
            "at 10; use 3 for 1,000)."
        ),
    )
    scenario: Literal["aligned", "missing", "fedilora", "cross", "hybrid"] = field(
        default="fedilora",
        metadata=doc(
            "Modality heterogeneity: aligned (both kept); missing (each row loses each modality "
            "with probability missing_beta); fedilora (a share missing_rate of each client's "
            "rows loses exactly one); cross (image-only : text-only clients, cross_ratio); "
            "hybrid (each client keeps each modality with probability hybrid_p)."
        ),
    )
    missing_rate: float = field(
        default=0.4,
        metadata=doc("FediLoRA missing rate: share of each client's samples missing one modality."),
    )
    missing_beta: float = field(
        default=0.3, metadata=doc("missing: per-row probability of losing each modality.")
    )
    cross_ratio: str = field(
        default="3:7", metadata=doc("cross: image-only : text-only clients, e.g. 3:7.")
    )
    hybrid_p: float = field(
        default=0.8, metadata=doc("hybrid: probability that a client keeps each modality.")
    )
    image_fill: Literal["zeros", "learned", "mask"] = field(
        default="zeros",
        metadata=doc(
            "A missing image: zeros (a zero input image, FediLoRA's choice), learned (a "
            "trained, federated embedding replaces the image features), or mask (the image "
            "features are zeroed)."
        ),
    )
    text_fill: Literal["placeholder", "mask"] = field(
        default="placeholder",
        metadata=doc(
            "A missing text: placeholder (data.text_placeholder is encoded instead) or mask "
            "(the text features are zeroed)."
        ),
    )
    text_placeholder: str = field(
        default="", metadata=doc("Text that stands in for a missing text (empty string).")
    )
    max_text_tokens: int = field(
        default=32,
        metadata=doc("Token limit of the text tower (generative models: of the prompt text)."),
    )
    subset: int | None = field(
        default=None,
        metadata=doc(
            "Keep only this many samples (seeded), for quick runs; at least 2 * clients.num."
        ),
    )
    cache_dir: str | None = field(
        default=None,
        metadata=doc(
            "Where built datasets are cached (default: $FEDSIM_CACHE, else ~/.cache/fedsim)."
        ),
    )


@dataclass
class ModelConfig:
    backbone: str = field(
        default="minilm-effnet",
        metadata=doc(
            "; ".join(f"{n}: {spec.summary}" for n, spec in BACKBONE_SPECS.items()),
            choices=BACKBONE_SPECS,
        ),
    )
    text_encoder: str | None = field(default=None, metadata=doc("hf: text encoder id/path."))
    vision_encoder: str | None = field(default=None, metadata=doc("hf: vision encoder id/path."))
    text_targets: list[str] = field(
        default_factory=lambda: ["query", "value", "q_proj", "v_proj"],
        metadata=doc("hf: module-name suffixes that get LoRA in the text tower."),
    )
    vision_targets: list[str] = field(
        default_factory=lambda: ["query", "value", "q_proj", "v_proj"],
        metadata=doc("hf: module-name suffixes that get LoRA in the vision tower."),
    )
    head_hidden: int = field(default=256, metadata=doc("Hidden width of the fusion head."))
    head_dropout: float = field(default=0.1, metadata=doc("Dropout in the fusion head."))
    name_or_path: str | None = field(
        default=None,
        metadata=doc(
            "hf-vlm: a Hugging Face image-text-to-text model (hub id or local directory), "
            "loaded with AutoProcessor + AutoModelForImageTextToText."
        ),
    )
    targets: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj"],
        metadata=doc(
            "Generative models: module-name suffixes that get LoRA, in the vision tower and "
            "the language model alike (FediLoRA: q_proj, v_proj)."
        ),
    )
    target_regex: str | None = field(
        default=None,
        metadata=doc(
            "Generative models: a full-match regex of module names that get LoRA, instead of "
            "model.targets (e.g. '.*text_model.*(q_proj|v_proj)' for the language model only)."
        ),
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata=doc(
            "Generative models: non-LoRA modules trained in full and federated like the "
            "classifier head (default: the projector for smolvlm-effnet, none for hf-vlm; "
            "e.g. [multi_modal_projector] for LLaVA)."
        ),
    )
    dtype: Literal["float32", "bfloat16"] = field(
        default="float32",
        metadata=doc(
            "Generative models: dtype of the frozen weights (bfloat16 halves memory on GPUs; "
            "LoRA tensors stay float32)."
        ),
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata=doc("Generative models: recompute activations in backward (saves memory)."),
    )


@dataclass
class LoraConfig:
    alpha: float = field(
        default=16.0,
        metadata=doc("LoRA alpha, in (0, 1e4] (it scales every LoRA output, in float32)."),
    )
    scaling: Literal["constant", "rank"] = field(
        default="constant",
        metadata=doc(
            "'constant': every client uses s = alpha / R (R = largest rank), so B@A means the "
            "same on every client; 'rank': peft's per-client alpha / r_i."
        ),
    )
    dropout: float = field(default=0.0, metadata=doc("LoRA dropout."))


@dataclass
class AggregationConfig:
    method: str = field(
        default="fedilora",
        metadata=doc("Heterogeneous-rank merge: " + ", ".join(MERGERS), choices=MERGERS),
    )
    empty_dim: Literal["keep", "zero"] = field(
        default="keep",
        metadata=doc(
            "FediLoRA, raFLoRA: a rank dimension no merged client covers keeps its previous "
            "global value (raFLoRA: its part B_prev[:, j] A_prev[j] of the merged product) "
            "or is zeroed."
        ),
    )
    damping: float = field(
        default=1.0,
        metadata=doc(
            "fedilora_damped (fedsim's own variant): blend each dimension's FediLoRA average "
            "with the previous global value by 1 - damping * (1 - covered weight share); "
            "in [0, 1], 0 is FediLoRA."
        ),
    )
    svd: Literal["auto", "exact", "lowrank"] = field(
        default="auto",
        metadata=doc(
            "FlexLoRA, raFLoRA: exact SVD, randomised torch.svd_lowrank, or auto by size."
        ),
    )
    partition_weights: Literal["samples", "clients"] = field(
        default="samples",
        metadata=doc(
            "raFLoRA: how the clients covering a rank partition share it: by sample count "
            "(n_i over the coverers' total) or one equal share per covering client."
        ),
    )
    streaming: bool = field(
        default=True,
        metadata=doc(
            "Linear merges (zeropad, fedilora, hetlora, flora) add each update as it arrives, "
            "in client-id order, so the server holds one adapter, not one per client; false: "
            "merge the round's updates as one batch (equal up to float rounding)."
        ),
    )


@dataclass
class SharingConfig:
    policy: str = field(
        default="all",
        metadata=doc(
            "Which LoRA parts go to the server ("
            + ", ".join(SHARING_POLICIES)
            + "): all; B (pLoRA: each client keeps its own A); A (FedSA-LoRA: each client "
            "keeps its own B); none (local-only baseline).",
            choices=SHARING_POLICIES,
        ),
    )


@dataclass
class ServerConfig:
    optimizer: str = field(
        default="fedavg",
        metadata=doc(
            "Server optimiser on the pseudo-gradient (Reddi et al. 2021): "
            + ", ".join(SERVER_OPTIMIZERS),
            choices=SERVER_OPTIMIZERS,
        ),
    )
    lr: float | None = field(
        default=None,
        metadata=doc(
            "Server learning rate (default: 1.0 FedAvgM, 1e-2 adaptive), in (0, 1e3] like train.lr."
        ),
    )
    beta1: float = field(default=0.9, metadata=doc("First-moment decay."))
    beta2: float = field(default=0.99, metadata=doc("Second-moment decay."))
    tau: float = field(default=1e-3, metadata=doc("Adaptivity (epsilon) of adaptive optimisers."))


@dataclass
class ObjectiveConfig:
    method: str = field(
        default="plain",
        metadata=doc(
            "Client objective ("
            + ", ".join(OBJECTIVES)
            + "): plain; fedprox (mu/2 ||theta - theta_g||^2); scaffold (control variates); "
            "fednova (normalised averaging); fedmllm (FedProx term weighted by layer_weight on "
            "layers layer_skip .. L-1-layer_skip only).",
            choices=OBJECTIVES,
        ),
    )
    mu: float = field(
        default=0.01,
        metadata=doc(
            "Proximal coefficient (fedprox, fedmllm), in [0, 1e4]. With train.optimizer=sgd, "
            "train.lr x mu (fedmllm: x layer_weight) must be at most 2, or the term's own "
            "steps diverge."
        ),
    )
    layer_weight: float = field(
        default=0.1, metadata=doc("fedmllm: weight w of the term, in [0, 1e4].")
    )
    layer_skip: int = field(
        default=1,
        metadata=doc(
            "fedmllm: layers s .. L-1-s of each tower get the term (FedMLLM uses s=4 on a "
            "32-layer LLM; the default MiniLM tower has 6 layers, hence 1)."
        ),
    )


@dataclass
class TrainConfig:
    local_epochs: int = field(default=1, metadata=doc("Local epochs per round."))
    max_local_steps: int | None = field(
        default=None, metadata=doc("Cap on local optimiser steps per round.")
    )
    batch_size: int = field(default=32, metadata=doc("Local training batch size."))
    eval_batch_size: int = field(
        default=64,
        metadata=doc(
            "Evaluation batch size. The global evaluation is sharded over the actors by "
            "batches, so small batches balance the shards (and run faster on CPUs)."
        ),
    )
    optimizer: Literal["adamw", "sgd"] = field(
        default="adamw", metadata=doc("Local optimiser (SCAFFOLD needs sgd).")
    )
    lr: float = field(
        default=2e-3,
        metadata=doc(
            "Local learning rate, in (0, 1e3]: AdamW moves a weight by about lr per step, and "
            "a larger step overflows float32 within a round."
        ),
    )
    weight_decay: float = field(default=0.0, metadata=doc("AdamW weight decay."))
    precision: Literal["fp32", "bf16"] = field(
        default="fp32", metadata=doc("Autocast precision of the forward pass.")
    )


@dataclass
class EvalConfig:
    every: int = field(
        default=1,
        metadata=doc(
            "Evaluate (global and personalised) every this many rounds; round 0 and the last "
            "round are always evaluated."
        ),
    )
    max_samples: int | None = field(
        default=None,
        metadata=doc(
            "Cap on the samples of the global test set and of each client's held-out split "
            "that are evaluated (a fixed seeded subset); None: all."
        ),
    )
    max_new_tokens: int = field(
        default=32, metadata=doc("Generative models: greedy decoding length limit.")
    )
    examples: int = field(
        default=8,
        metadata=doc("Generative models: example generations logged per evaluated round."),
    )


@dataclass
class ClientResources:
    num_cpus: float = field(
        default=1.0, metadata=doc("CPUs per client actor, in (0, 1e4] (an actor is on one node).")
    )
    num_gpus: float = field(
        default=0.0,
        metadata=doc("GPUs per client actor: 0, a fraction in (0, 1] or a whole number up to 1e4."),
    )


@dataclass
class ResourcesConfig:
    client: ClientResources = field(default_factory=ClientResources)
    actors: int | None = field(
        default=None, metadata=doc("Cap on the actor pool (default: what the cluster fits).")
    )
    max_retries: int = field(
        default=1, metadata=doc("Retries of a failed client task on another actor.")
    )
    placement: Literal["pack", "spread", "strict_spread", "none"] = field(
        default="pack",
        metadata=doc(
            "Reserve the client actors in a Ray placement group: pack (fill a node, e.g. four "
            "0.25-GPU actors on one GPU, before the next), spread (one per node where it can), "
            "strict_spread (one per node, or fail), none (plain actors)."
        ),
    )
    placement_timeout_s: float = field(
        default=60.0,
        metadata=doc(
            "Seconds to wait for the cluster to place the actor pool before failing with the "
            "numbers (an autoscaling cluster may need minutes to add nodes)."
        ),
    )
    server: Literal["driver", "actor"] = field(
        default="driver",
        metadata=doc(
            "Where the server (global adapter, merge, server optimiser) runs: in the driver "
            "process (no extra process; updates stream to it as clients finish) or in its own "
            "Ray actor (num_cpus=0), for a driver on a machine too small to hold the adapter."
        ),
    )
    share_frozen: bool = field(
        default=True,
        metadata=doc(
            "Client actors on one node share one read-only, memory-mapped copy of the frozen "
            "backbone (built once per node, seed and model config, in the Ray session's "
            "directory, removed when the actor pool ends) instead of building and holding one "
            "each; the same numbers either way. A warm actor serving a later run maps it again "
            "instead of rebuilding. GPU memory is not shared (each actor copies to its GPU). The "
            "built-in backbones only: an hf-vlm model is built privately in each actor."
        ),
    )
    log_to_driver: bool = field(
        default=True,
        metadata=doc(
            "Forward what the Ray actors print, and Ray's reports of a dead worker, to this "
            "process's stdout and stderr (Ray's ray.init(log_to_driver=...)); false: they stay "
            "in Ray's log files (/tmp/ray/session_latest/logs on each node). Takes effect when "
            "fedsim starts or joins Ray; a Ray already initialised in this process keeps its "
            "own setting."
        ),
    )


@dataclass
class FaultsConfig:
    nan_update_clients: list[int] = field(
        default_factory=list,
        metadata=doc(
            "Client ids whose uploads are poisoned with NaN, to exercise the server's update "
            "validation (such updates must be rejected and logged, never merged)."
        ),
    )
    fail_prob: float = field(
        default=0.0,
        metadata=doc(
            "Probability that a client task attempt fails after training (seeded per seed, "
            "round, client and attempt); the pool retries it like any failure."
        ),
    )
    fail_mode: Literal["raise", "crash"] = field(
        default="raise",
        metadata=doc(
            "How an injected failure happens: raise an exception in the task, or crash the "
            "actor's process (the pool then replaces the actor)."
        ),
    )
    delay_dist: Literal["none", "constant", "uniform", "exponential", "lognormal"] = field(
        default="none",
        metadata=doc(
            "Distribution of the extra simulated seconds a straggling client task takes: "
            "constant (delay_s), uniform on [0, 2 delay_s], exponential (mean delay_s), "
            "lognormal (median delay_s, log-sd delay_sigma)."
        ),
    )
    delay_s: float = field(
        default=0.0, metadata=doc("Scale of faults.delay_dist, simulated seconds, in [0, 1e9].")
    )
    delay_sigma: float = field(
        default=1.0,
        metadata=doc(
            "Log-sd of the lognormal delay; its largest draw, delay_s x exp(7.04 delay_sigma), "
            "must stay within 1e9 simulated seconds."
        ),
    )
    delay_prob: float = field(
        default=1.0, metadata=doc("Probability that a client task is delayed at all.")
    )
    sleep_scale: float = field(
        default=0.0,
        metadata=doc(
            "Real seconds a delayed task sleeps per simulated delay second, in [0, 10] (0: the "
            "delay is only on the simulated clock); sleep_scale x delay_s at most a day. Makes "
            "clients really finish out of order."
        ),
    )
    malicious: str = field(
        default="",
        metadata=doc(
            'Malicious clients: their ids ("3,7" or a list), or a share of the clients '
            '("0.1", chosen by the seed, fixed for the run); they run faults.attack.'
        ),
    )
    attack: Literal["none", "scale", "sign_flip", "gaussian", "label_flip", "lie_about_rank"] = (
        field(
            default="none",
            metadata=doc(
                "What the malicious clients do: scale (send their update times "
                "faults.attack_scale), sign_flip (send minus their update), gaussian (send "
                "Gaussian noise of norm faults.attack_norm as their update), label_flip (train "
                "on labels y -> C-1-y), lie_about_rank (pad or truncate their factors to claim "
                "rank faults.claimed_rank)."
            ),
        )
    )
    attack_scale: float = field(
        default=100.0,
        metadata=doc(
            "faults.attack=scale: the factor k of the update, 0 < |k| <= 1e6 (a larger forged "
            "update overflows float32 and is rejected before any robust rule sees it)."
        ),
    )
    attack_norm: float = field(
        default=1.0,
        metadata=doc("faults.attack=gaussian: the norm of the noise update, in (0, 1e6]."),
    )
    claimed_rank: int = field(
        default=0,
        metadata=doc(
            "faults.attack=lie_about_rank: the rank claimed (0: the global rank, or half the "
            "client's rank for a client at the global rank)."
        ),
    )


@dataclass
class RoundConfig:
    deadline_s: float = field(
        default=0.0,
        metadata=doc(
            "Close a round after this many simulated seconds, in [0, 1e9]; clients that would "
            "report later are late: left out of the merge and counted in clients/late (0: no "
            "deadline)."
        ),
    )
    min_clients: int = field(
        default=1,
        metadata=doc(
            "A round waits past the deadline until this many clients reported; with fewer "
            "successful clients in all, the round merges nothing."
        ),
    )
    max_empty_rounds: int = field(
        default=3,
        metadata=doc(
            "Stop the run with an error once this many rounds in a row merged no update "
            "(every sampled client failed, was late or was rejected); 0: never stop."
        ),
    )


@dataclass
class DeviceProfile:
    share: float = field(
        default=1.0, metadata=doc("Share of clients with this profile (relative), in [0, 1e6].")
    )
    speed: float = field(
        default=1.0,
        metadata=doc("Compute speed (1: the reference device), in [1e-6, 1e12]."),
    )
    up_mbps: float = field(default=10.0, metadata=doc("Upload bandwidth, Mbit/s, in [1e-6, 1e12]."))
    down_mbps: float = field(
        default=50.0, metadata=doc("Download bandwidth, Mbit/s, in [1e-6, 1e12].")
    )


@dataclass
class DevicesConfig:
    step_s: float = field(
        default=0.5,
        metadata=doc(
            "Simulated seconds of one local training step on a speed-1 device, in [0, 1e9]."
        ),
    )
    profiles: dict[str, DeviceProfile] = field(
        default_factory=dict,
        metadata=doc(
            "Named device profiles (share, speed, up_mbps, down_mbps), assigned to clients by a "
            "seeded draw with the given shares; empty: every client is the reference device "
            "(speed 1, 10 Mbit/s up, 50 Mbit/s down)."
        ),
    )


@dataclass
class CheckpointConfig:
    dir: str = field(
        default="runs",
        metadata=doc(
            "Checkpoints go to DIR/<MLflow run id>/; resume with fedsim run --resume that path."
        ),
    )
    every: int = field(
        default=1, metadata=doc("Write a checkpoint every this many rounds (0: never).")
    )
    keep: int = field(default=2, metadata=doc("How many recent checkpoints to keep."))


@dataclass
class TrackingConfig:
    uri: str | None = field(
        default=None,
        metadata=doc(
            "MLflow tracking URI (sqlite:///PATH.db, file:///DIR, http(s)://SERVER). Unset: "
            "the MLFLOW_TRACKING_URI environment variable, else sqlite:///mlflow.db in the "
            "working directory. Precedence: an override > the config file > the environment > "
            "the default; a loaded config holds the store it resolved to."
        ),
    )
    experiment: str = field(default="fedsim", metadata=doc("MLflow experiment name."))
    run_name: str | None = field(
        default=None,
        metadata=doc(
            "MLflow run name (default: what ran, e.g. 'fedilora+editing, ranks 4-32, fedilora, "
            "seed 0')."
        ),
    )
    parent_run_id: str | None = field(
        default=None, metadata=doc("Nest the run under this MLflow run (set by sweeps).")
    )
    save_adapter: bool = field(default=True, metadata=doc("Log the final global adapter."))
    save_client_adapters: bool = field(
        default=False,
        metadata=doc(
            "Also log each client's last personalised adapter (clients/cNNNNNN) as a peft "
            "adapter directory."
        ),
    )
    plots: bool = field(default=True, metadata=doc("Log PNG plots of the curves."))
    system_metrics: bool = field(
        default=True,
        metadata=doc(
            "Log system metrics (CPU, memory, disk, network, GPU where present) of the driver's "
            "machine and of every Ray node the run's actors use (the UI's System metrics tab)."
        ),
    )
    system_metrics_interval_s: float = field(
        default=5.0, metadata=doc("Seconds between two system-metrics samples.")
    )
    merge_diagnostics: bool = field(
        default=True,
        metadata=doc(
            "Log what each round's merge did per rank dimension and per client (coverage, "
            "contribution shares, update norm per band, the global adapter's energy share per "
            "rank band and merge/rank_collapse; plots/merge.png; fedsim inspect)."
        ),
    )
    register_model: str | None = field(
        default=None,
        metadata=doc(
            "Register the final global adapter in the MLflow Model Registry under this name "
            "(a new version per run; needs tracking.save_adapter)."
        ),
    )


@dataclass
class FedSimConfig:
    seed: int = field(default=0, metadata=doc("Seed of every random choice."))
    rounds: int = field(
        default=10,
        metadata=doc("Federated rounds; 0 is the zero-shot baseline (round 0 evaluation only)."),
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
    fedplora: FedPLoRAConfig = field(default_factory=FedPLoRAConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    round: RoundConfig = field(default_factory=RoundConfig)
    devices: DevicesConfig = field(default_factory=DevicesConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    progress: bool = field(
        default=True,
        metadata=doc(
            "Draw a progress bar (on stderr). false hides the bar only: the summary, the MLflow "
            "run id and its link still print (fedsim run --quiet silences them)."
        ),
    )
