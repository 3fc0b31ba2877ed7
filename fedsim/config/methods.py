"""The config sections of the methods that take options, one dataclass each.

They live in the config room, not beside their methods, so that the schema (and anything that
only reads a config) loads no method and no torch. A section's own field rules are in its
``__post_init__`` or in :mod:`fedsim.config.checks`; the rules that read other sections or a
merge's capability flags are the method's ``check`` (see :mod:`fedsim.methods.base`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fedsim.config.fields import doc


@dataclass
class EditingConfig:
    # Literal, not bool | str: OmegaConf 2.4 checks a Literal by type and value, so it takes
    # true, false (YAML booleans) and the string auto, and rejects 1, 0 or maybe at load.
    enabled: Literal["auto", True, False] = field(
        default="auto",
        metadata={
            "help": "FediLoRA layer-wise model editing (clients, round >= 2): auto (on only "
            "with aggregation.method=fedilora or fedilora_damped, where a global adapter to "
            "compare with exists), "
            "true (any merge method; an error where it cannot apply) or false."
        },
    )
    key: Literal["lora_A", "lora_B", "all"] = field(
        default="lora_A", metadata=doc("Which LoRA tensors are candidates for editing.")
    )
    count: int = field(default=1, metadata=doc("How many lowest-similarity tensors to edit."))
    threshold: float = field(default=0.95, metadata=doc("Edit only if cosine < threshold."))
    mode: Literal["weighted", "replace", "half"] = field(
        default="weighted",
        metadata=doc("weighted: mix by clamped cosine; replace; half."),
    )


@dataclass
class FedExConfig:
    enabled: bool = field(
        default=False,
        metadata={
            "help": "FedEx-LoRA: fold the residual sum_i p_i B_i A_i - B_g A_g of the merge "
            "into every client's frozen base weights, so the global model is the exact "
            "average of the clients' models (aggregation.method zeropad is the paper's)."
        },
    )


@dataclass
class FedPLoRAConfig:
    enabled: bool = field(
        default=False,
        metadata=doc(
            "Fed-PLoRA (docs/algorithms.md §6.3): the global adapter is R one-rank modules; "
            "each round a client of rank r trains r of them, starting from their global "
            "values, with the other modules folded into its frozen weights (so it starts from "
            "the global model exactly), and the server averages each module over the clients "
            "that trained it. Needs aggregation.method=fedilora (the rule it generalises) and "
            "sharing.policy=all; every client downloads all R modules."
        ),
    )
    rule: Literal["random", "first"] = field(
        default="random",
        metadata=doc(
            "Which modules a client trains: random (the paper: r of the R modules, drawn per "
            "round and client from the seed) or first (modules 0..r-1; the server rule is "
            "then FediLoRA's merge). random rejects the methods that take a client's "
            "dimensions to be the leading ones (robust rules, privacy, fednova, scaffold, "
            "pruning) and faults.attack=lie_about_rank; the merge diagnostics count each "
            "module for the clients that trained it (no top band)."
        ),
    )


@dataclass
class PrivacyConfig:
    enabled: bool = field(
        default=False,
        metadata=doc(
            "Client-level differential privacy (DP-FedAvg): clip every client's update to "
            "privacy.clip_norm, weight the clients equally and add Gaussian noise."
        ),
    )
    noise: Literal["server", "client"] = field(
        default="server",
        metadata=doc(
            "Where clipping and noise happen: on the server (a trusted server sees the clipped "
            "updates) or on the clients (each adds its share of the noise before upload; the "
            "guarantee then needs secure aggregation)."
        ),
    )
    clipping: Literal["fixed", "adaptive"] = field(
        default="fixed",
        metadata=doc(
            "fixed: clip to privacy.clip_norm every round; adaptive: track the "
            "privacy.target_quantile of the update norms (Andrew et al., 2021)."
        ),
    )
    clip_norm: float = field(
        default=1.0,
        metadata=doc(
            "Clip norm C of a client's update (adaptive: the initial C); the noise std z x C "
            "must be at most 1e3 (it moves a global weight by that much per round)."
        ),
    )
    noise_multiplier: float = field(
        default=1.0,
        metadata=doc(
            "Noise multiplier z (noise std z C on the sum of updates), in [0, 1e6] (from about "
            "1e6 the accountants' epsilon is 0); the pld accountant needs z >= 0.1 (its grid "
            "grows as 1/z^2). Derived instead when privacy.target_epsilon > 0. The accountant "
            "is evaluated at load for the planned rounds."
        ),
    )
    target_epsilon: float = field(
        default=0.0,
        metadata=doc(
            "Derive the noise multiplier so that the whole run (rounds) is "
            "(target_epsilon, delta)-DP (0: use privacy.noise_multiplier); a target that even "
            "the largest noise allowed (z C = 1e3) cannot meet is refused at load."
        ),
    )
    delta: float = field(default=1e-5, metadata=doc("The delta of (epsilon, delta)-DP."))
    target_quantile: float = field(
        default=0.5, metadata=doc("Adaptive clipping: the quantile of update norms to track.")
    )
    clip_lr: float = field(
        default=0.2,
        metadata=doc(
            "Adaptive clipping: the geometric step size of C. One round may scale C by at most "
            "e^20: clip_lr x (max(q, 1 - q) + 6 sigma_b / n) <= 20, q the target quantile, "
            "sigma_b the count noise, n the clients per round."
        ),
    )
    count_noise: float = field(
        default=0.0,
        metadata=doc(
            "Adaptive clipping: std of the noise on the count of clipped updates (0: the "
            "sampled clients per round / 20, Andrew et al.'s choice); bounded with "
            "privacy.clip_lr."
        ),
    )
    accountant: Literal["rdp", "pld"] = field(
        default="rdp",
        metadata=doc(
            "Privacy accountant of dp-accounting: Renyi DP or privacy loss distributions."
        ),
    )


@dataclass
class PruningConfig:
    gamma: float = field(
        default=0.0,
        metadata={
            "help": "HetLoRA's rank self-pruning: weight of gamma * ||B[:, r-delta:] "
            "A[r-delta:]||_F in the local loss, in [0, 1e4]; 0 turns pruning off."
        },
    )
    delta: int = field(default=1, metadata=doc("Tail dimensions penalised and dropped at once."))
    threshold: float = field(
        default=1e-3,
        metadata=doc("Drop the tail when its norm after training is below this."),
    )
    min_rank: int = field(
        default=1,
        metadata=doc(
            "A client's rank never drops below this; with pruning on, the largest rank minus "
            "pruning.delta must reach it (else no client could prune)."
        ),
    )


@dataclass
class RobustConfig:
    rule: Literal["none", "median", "trimmed_mean", "krum", "multi_krum", "product"] = field(
        default="none",
        metadata=doc(
            "Robust rule in front of the merge: median or trimmed_mean (per coordinate over "
            "the clients covering it), krum or multi_krum (on zero-padded factors), product "
            "(fedsim's rank-aware outlier rule on the low-rank products B_i A_i)."
        ),
    )
    clip_norm: float = field(
        default=0.0,
        metadata=doc(
            "Norm bounding: clip every client's update (its factors minus what it started "
            "from) to this L2 norm before the rule (0: off)."
        ),
    )
    trim: float = field(
        default=0.1,
        metadata=doc(
            "trimmed_mean: the share beta of values dropped at each end, per coordinate "
            "(floor(beta * n) of the n clients covering it); floor(beta * n) >= 1 for the "
            "clients sampled per round, or nothing is ever trimmed."
        ),
    )
    num_faulty: int = field(
        default=1,
        metadata=doc(
            "krum, multi_krum: the number f of faulty clients assumed; a round must sample "
            "n >= f + 3 clients (Krum scores by the n - f - 2 nearest; its guarantee, "
            "Blanchard et al. 2017, needs n > 2f + 2)."
        ),
    )
    num_selected: int = field(
        default=0,
        metadata=doc(
            "multi_krum: how many best-scored clients are merged, at most n - f for the n "
            "clients sampled per round (0: n - f)."
        ),
    )
    threshold: float = field(
        default=3.0,
        metadata=doc(
            "product: leave out clients whose score is above this many times the median "
            "score (> 1)."
        ),
    )
