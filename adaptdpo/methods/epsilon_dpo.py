"""ε-DPO (Lee et al., NeurIPS 2025, arXiv 2502.13177, "KL Penalty Control via Perturbation for Direct Preference
Optimization"): a β for every pair, from whether the preference logit moves monotonically when β is perturbed.

Read as a preference model, the DPO policy for β is π_θ ∝ π_ref·exp(r/β). Perturbing β to β/(1 + ε) gives
π ∝ π_ref·(π_θ/π_ref)^(1+ε), and β/(1 − ε) gives π ∝ π_ref·(π_θ/π_ref)^(1−ε); per token, their logits are the
mixtures (1 ± ε)·z_θ ∓ ε·z_ref of the policy's and the reference's logits, which the step has already computed
(no extra forward: :func:`adaptdpo.models.sequence_logps.perturbed_logratios`). For each pair, with L the policy's
log-ratio log π(y_w) − log π(y_l) and L₊ / L₋ that of the policy estimated for β/(1 + ε) / β/(1 − ε):

    s = +1 if L₊ > L > L₋  (less KL penalty makes the pair's preference more confident: relax it),
    s = −1 if L₋ > L > L₊  (more KL penalty does: tighten it),    s = 0 otherwise;
    β_i = β_t / (1 + ε·s_i)  for the pair's loss;
    after each optimizer step, β_{t+1} = β_t / (1 + ε·mean(s)), the mean over the step's pairs.

Defaults as the paper's official code (github.com/oddqueue/e-dpo): ε = 0.01 (its ``EpsilonDPOConfig``; its shipped
configs also use β = 0.01 on UltraFeedback, ours keeps the configured ``beta``).

Choices the paper (as read here: its abstract, Algorithm 1 and the official code) leaves open, and what we do:

* **Which logits.** The perturbed policies are per-token softmaxes of the logit mixtures, summed over the completion
  tokens, as the official code computes them (an autoregressive estimate: the sequence-level normaliser would cancel
  and make s the sign of h). The middle value L is recomputed by the same routine, so the three are compared on
  equal footing; it equals the trained log-ratio to float32 rounding. LD-DPO weights, when on, weigh the perturbed
  sums as they weigh the log-probs.
* **Which β moves.** β_t (the "baseline" β) is updated once per optimizer step by the mean decision over all pairs
  of the step: every micro-batch of it and every process (the official code averages per-micro-batch means over
  the configured accumulation steps, then over processes; equal when micro-batches are equal in size; an uneven
  last step is averaged over the micro-batches it has). The update is applied when the next step's first
  micro-batch arrives, so every micro-batch of one step uses the same β_t; the last step's update is never used.
* **No clamp.** β_t is not clamped (as the official code); each step changes it by a factor in
  [1/(1 + ε), 1/(1 − ε)].
* **Loss types.** Any loss that takes a per-pair β (the official code is sigmoid only); the batch-sorted ``aot*``
  losses cannot take one and are refused.
* **Evaluation.** Evaluation uses the configured β, as every method here (the official code evaluates with the
  current β_t and decisions); ``eps_dpo/beta`` logs β_t.
* **Precomputed reference log-probs** cannot be used: the reference's logits are needed (as in the official code).
* **Cost.** Three extra log-softmaxes over the vocabulary at the completion positions, without gradient, and the
  policy's scored window (logits, or the final hidden states with a chunked head) is held until the reference
  forward has run.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from adaptdpo.methods.step_policy import PairView, StepPlan, StepPolicyBase

EPSILON = 0.01
#: the extras key of the perturbed log-ratios [n, 3] (toward the reference, current, away from it)
PERTURBED_KEY = "epsilon_logratios"


def kl_steps(logratios: Tensor) -> Tensor:
    """The decision s ∈ {−1, 0, +1} per pair from [n, 3] log-ratios (L₋, L, L₊): +1 when L₊ > L > L₋, −1 when
    L₋ > L > L₊, else 0 (ties are 0)."""
    toward, current, away = logratios.unbind(-1)
    relax = (away > current) & (current > toward)
    tighten = (toward > current) & (current > away)
    return relax.long() - tighten.long()


def instance_betas(beta: float | Tensor, steps: Tensor, epsilon: float) -> Tensor:
    """β_i = β / (1 + ε·s_i)."""
    return beta / (1 + epsilon * steps.to(torch.float64))


class EpsilonDPO:
    """The ε-DPO controller: decisions in, per-pair β out; the baseline β_t and the current step's decisions as state.

    ``step(logratios, global_step)`` is called once per training micro-batch with the global micro-batch's [n, 3]
    perturbed log-ratios and the number of optimizer steps done so far; a new ``global_step`` first applies the
    previous step's update β_t ← β_t / (1 + ε·mean(s)).
    """

    def __init__(self, beta: float = 0.1, epsilon: float = EPSILON):
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if not 0.0 < epsilon < 1.0:
            raise ValueError(f"ε-DPO's epsilon must be in (0, 1), got {epsilon}")
        self.epsilon = float(epsilon)
        self._beta = torch.tensor(float(beta), dtype=torch.float64)
        self._pending_sum = torch.zeros((), dtype=torch.float64)  # Σ over the step's micro-batches of mean(s)
        self._pending_pairs = 0
        self._pending_batches = 0
        self.last_step = -1

    @property
    def beta(self) -> float:
        return float(self._beta)

    def _apply_pending(self) -> None:
        if self._pending_batches:
            mean = self._pending_sum / self._pending_batches  # mean over the step's micro-batches of mean(s)
            self._beta = self._beta / (1 + self.epsilon * mean)
        self._pending_sum = torch.zeros_like(self._pending_sum)
        self._pending_pairs = self._pending_batches = 0

    def step(self, logratios: Tensor, global_step: int) -> tuple[Tensor, Tensor]:
        """(β per pair [n] float32, decisions [n]) for one micro-batch."""
        if logratios.dim() != 2 or logratios.shape[1] != 3:
            raise ValueError(f"ε-DPO needs [n, 3] perturbed log-ratios, got shape {tuple(logratios.shape)}")
        if not bool(torch.isfinite(logratios).all()):
            raise FloatingPointError("ε-DPO got non-finite perturbed log-ratios (NaN/inf log-probs)")
        if global_step > self.last_step:
            self._apply_pending()
            self.last_step = int(global_step)
        self._beta = self._beta.to(logratios.device)
        steps = kl_steps(logratios)
        betas = instance_betas(self._beta, steps, self.epsilon)
        self._pending_sum = self._pending_sum.to(logratios.device) + steps.double().mean()
        self._pending_pairs += int(steps.shape[0])
        self._pending_batches += 1
        return betas.float(), steps

    def state_dict(self) -> dict[str, Any]:
        return {"beta": self.beta, "pending_sum": float(self._pending_sum), "pending_pairs": self._pending_pairs,
                "pending_batches": self._pending_batches, "last_step": self.last_step,
                "config": {"epsilon": self.epsilon}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._beta = torch.tensor(float(state["beta"]), dtype=torch.float64)
        self._pending_sum = torch.tensor(float(state["pending_sum"]), dtype=torch.float64)
        self._pending_pairs, self._pending_batches = int(state["pending_pairs"]), int(state["pending_batches"])
        self.last_step = int(state["last_step"])


class EpsilonDPOPolicy(StepPolicyBase):
    """ε-DPO as a step policy (:mod:`adaptdpo.methods.step_policy`): every pair is trained on, each with its β.

    ``perturbation`` tells the trainer to put the perturbed log-ratios of the global micro-batch in
    ``view.extras["epsilon_logratios"]`` and the optimizer steps done in ``view.extras["global_step"]``. Every rank
    sees the same gathered values, so every rank makes the same decisions (no communication)."""

    def __init__(self, controller: EpsilonDPO):
        self.controller = controller
        self.perturbation = controller.epsilon

    def plan(self, view: PairView) -> StepPlan:
        if PERTURBED_KEY not in view.extras or "global_step" not in view.extras:
            raise ValueError("ε-DPO needs the perturbed log-ratios and the step number from the trainer "
                             f"(view.extras[{PERTURBED_KEY!r}], view.extras['global_step'])")
        betas, steps = self.controller.step(view.extras[PERTURBED_KEY], int(view.extras["global_step"]))
        steps = steps.float()
        metrics: dict[str, Tensor | float] = {
            "eps_dpo/beta": self.controller._beta.float(), "eps_dpo/relaxed": (steps > 0).float().mean(),
            "eps_dpo/tightened": (steps < 0).float().mean(), "beta/min": betas.min(), "beta/max": betas.max()}
        return StepPlan(beta=betas.to(view.chosen_logratios.device), train_mask=None, metrics=metrics)

    def num_trained(self, n_pairs: int) -> int:
        return n_pairs

    def state_dict(self) -> dict[str, Any]:
        return {"epsilon_dpo": self.controller.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.controller.load_state_dict(state["epsilon_dpo"])
