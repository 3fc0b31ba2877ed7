"""How large a config value may be: bounded by what the arithmetic downstream can carry.

A finite value can still break a run rounds later (``train.lr=1e300`` is finite; every client
then fails), so the values that scale weights, losses, noise or delays are bounded at load,
each by the computation that would overflow first. The help text of each key states its
bound; docs/concepts/failures.md explains them.

Float32, the dtype of the LoRA tensors, carries magnitudes up to 3.4e38; a LayerNorm squares
its input, so a transformer's activations must stay below sqrt(3.4e38) = 1.8e19.
"""

from __future__ import annotations

# Integers cross into numpy and torch (seeds, sizes, counts), whose integers are 64-bit.
MAX_INT = 2**63 - 1

# The largest learning rate, local (train.lr) or on the server (server.lr). AdamW moves a
# weight by about lr per step whatever the gradient (SGD: lr times a gradient of order 1), so
# after T steps a LoRA pair B, A holds entries of about lr * T and a layer's output is about
# alpha * (lr * T)^2 * d for d input features. For T = 1,000 steps, d = 8,192 and alpha = 32,
# that stays under the 1.8e19 a LayerNorm can square while lr <= 8e3; 1e3 keeps a margin. (At
# lr = 1e8 the tiny test model's updates are NaN by its second round; at 1e300 the optimiser's
# first step already cannot cast lr to float32.)
MAX_LR = 1e3

# The largest coefficient on a float32 loss term or LoRA output: lora.alpha (the output is
# scaled by alpha / R), objective.mu and objective.layer_weight (the proximal term), and
# pruning.gamma (the tail penalty). Each multiplies float32 values computed from weights of up
# to MAX_LR's size; past about 3.4e38 the factor itself is infinite in float32, and inf * 0
# (a LoRA B starts at zero) is NaN in the first forward pass. 1e4 is far above what any
# method's paper uses (alpha <= 512, mu <= 1, gamma <= 1).
MAX_COEFFICIENT = 1e4

# SGD on a quadratic term c/2 ||x - x0||^2 multiplies x - x0 by (1 - lr * c) every step: the
# term diverges geometrically once lr * c > 2 (FedProx's mu, FedMLLM's mu * layer_weight).
MAX_SGD_CURVATURE_STEP = 2.0

# The largest noise multiplier z: from about z = 1e6 the accountants' epsilon is 0 (nothing
# more to buy), and at z = 1.3e154, z^2 overflows float64 (OverflowError in dp_accounting).
MAX_NOISE_MULTIPLIER = 1e6
# The largest noise std z * C on the sum of the clipped updates: it moves a global weight by
# up to z * C per round, the role train.lr has on a client (MAX_LR).
MAX_NOISE_STD = MAX_LR
# The smallest positive z the PLD accountant evaluates in bounded memory: its privacy-loss
# grid grows as 1 / z^2 (z = 0.1: about 1 GB and 15 s per evaluation, z = 0.05: 2.3 GB and a
# minute, z = 0.01: 38 GiB); the run evaluates it every round. The RDP accountant has no such
# floor.
PLD_MIN_NOISE_MULTIPLIER = 0.1
# Adaptive clipping multiplies the clip norm by exp(-clip_lr * (b - gamma)) every round, b the
# noised share of unclipped clients. With b within six standard deviations of the count noise
# (|b - gamma| <= max(gamma, 1 - gamma) + 6 sigma_b / n), one round may move C by at most
# e^20 (5e8): beyond, a few rounds take C out of float32's range (C = 0 or inf, then every
# update clips to nothing or the noise is infinite). Andrew et al. use clip_lr = 0.2 and
# sigma_b = n / 20: an exponent of 0.16.
MAX_CLIP_EXPONENT = 20.0

# faults.attack_scale, faults.attack_norm: a forged update must stay a float32 tensor whose
# squared norm (what the norm checks, the clipping and Krum compute) is finite; an update that
# overflows is rejected by the server's validation and never reaches the robust rule it is
# meant to test. 1e6 times an update of norm up to 1e6 squares to 1e24.
MAX_ATTACK = 1e6

# Simulated seconds (faults.delay_s, round.deadline_s, devices.step_s): about 30 years, far
# beyond any round; the largest delay a distribution draws (lognormal: delay_s *
# exp(7.04 * delay_sigma)) must stay finite. A task really sleeps faults.sleep_scale times its
# delay: at most a day for a delay of faults.delay_s (time.sleep itself stops at about 9e9 s).
MAX_SIM_SECONDS = 1e9
MAX_SLEEP_SECONDS = 86_400.0
# scipy's ndtri at the largest uniform draw fedsim uses (1 - 1e-12): the lognormal's tail.
LOGNORMAL_TAIL_Z = 7.04

# Ray resources per actor: one actor lives on one node, and no node has this many CPUs or
# GPUs (Ray stores quantities as fixed-point integers; 1e300 CPUs cannot even be requested).
MAX_ACTOR_RESOURCE = 10_000.0
