"""Pairwise preference losses: pure functions returning one loss per pair, unreduced.

Every function takes summed completion log-probabilities (policy and reference, chosen and rejected)
and a β that is either a float or a tensor with one value per pair. Nothing here reduces over the
batch except the two `aot*` losses, whose definition sorts the batch, and `kto_pair`, whose reference
point is a batch mean.
The trainer decides how per-pair losses are averaged, which is what lets β-DPO and SamS drop or
reweight pairs without touching the losses.

Conventions match TRL 1.16's ``DPOTrainer`` (checked number for number in the test suite):
``h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))``; the DPO loss is
``−log σ(β·h)`` (Rafailov et al. 2023, Eq. 7).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

Beta = float | Tensor


@dataclass(frozen=True)
class PairLogps:
    """The four summed completion log-probs of a batch of pairs, plus completion lengths."""

    chosen: Tensor
    rejected: Tensor
    ref_chosen: Tensor
    ref_rejected: Tensor
    chosen_lengths: Tensor | None = None
    rejected_lengths: Tensor | None = None

    @property
    def chosen_logratios(self) -> Tensor:
        return self.chosen - self.ref_chosen

    @property
    def rejected_logratios(self) -> Tensor:
        return self.rejected - self.ref_rejected

    @property
    def delta(self) -> Tensor:
        """h = chosen log-ratio − rejected log-ratio (the DPO logit before β)."""
        return self.chosen_logratios - self.rejected_logratios

    def length_normalised_delta(self, loss_type: str) -> Tensor:
        if self.chosen_lengths is None or self.rejected_lengths is None:
            raise ValueError(
                f"loss_type={loss_type!r} normalises by completion length: pass chosen_lengths and rejected_lengths "
                "(completion token counts)"
            )
        chosen = self.chosen_logratios / self.chosen_lengths.to(self.chosen.dtype).clamp(min=1.0)
        rejected = self.rejected_logratios / self.rejected_lengths.to(self.rejected.dtype).clamp(min=1.0)
        return chosen - rejected


#: what ``sigmoid`` does with ``label_smoothing`` ε > 0: ``cdpo`` (conservative DPO, Mitchell 2023; TRL < 1.0) or
#: ``ignore`` (TRL 1.16, whose sigmoid loss never reads label_smoothing)
SIGMOID_SMOOTHING = ("cdpo", "ignore")


def sigmoid_loss(p: PairLogps, beta: Beta, *, label_smoothing: float = 0.0, sigmoid_smoothing: str = "cdpo",
                 **_: float) -> Tensor:
    """DPO (Rafailov et al. 2023, Eq. 7): −log σ(β·h). With ``label_smoothing`` ε > 0, conservative DPO (cDPO,
    Mitchell 2023, "A note on DPO with noisy preferences"): the labels are taken to be flipped with probability ε,
    so the target of σ(βh) is 1 − ε instead of 1 — the binary cross-entropy −(1 − ε)·log σ(βh) − ε·log σ(−βh), as TRL
    computed it before 1.0. Its gradient −β·(1 − ε − σ(βh)) vanishes at σ(βh) = 1 − ε: a pair is no longer pushed
    once the model prefers its chosen response with probability 1 − ε. ``sigmoid_smoothing="ignore"`` is TRL 1.16,
    which ignores label_smoothing for this loss."""
    if sigmoid_smoothing not in SIGMOID_SMOOTHING:
        raise ValueError(f"sigmoid_label_smoothing must be one of {SIGMOID_SMOOTHING}, got {sigmoid_smoothing!r}")
    logits = beta * p.delta
    if sigmoid_smoothing == "ignore" or label_smoothing == 0.0:
        return -F.logsigmoid(logits)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"sigmoid with label_smoothing is conservative DPO (cDPO): it needs 0 <= label_smoothing "
                         f"< 0.5 (the assumed flip rate), got {label_smoothing}")
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def hinge_loss(p: PairLogps, beta: Beta, **_: float) -> Tensor:
    """SLiC hinge (Zhao et al. 2023): max(0, 1 − β·h)."""
    return torch.relu(1 - beta * p.delta)


def ipo_loss(p: PairLogps, beta: Beta, **_: float) -> Tensor:
    """IPO (Azar et al. 2023, Eq. 17) with β as τ: (h̄ − 1/(2τ))², h̄ on per-token averaged log-ratios.

    The per-token normalisation is TRL's (confirmed with the IPO authors, per TRL's source comment).
    """
    return (p.length_normalised_delta("ipo") - 1 / (2 * beta)) ** 2


def exo_pair_loss(p: PairLogps, beta: Beta, *, label_smoothing: float = 0.0, **_: float) -> Tensor:
    """EXO-pref (Ji et al. 2024, Eq. 16) with K=2: KL(p_fθ ‖ [1−ε, ε]); needs ε = label_smoothing > 0."""
    if not 0.0 < label_smoothing < 1.0:
        raise ValueError(f"exo_pair needs 0 < label_smoothing < 1 (the ε of EXO), got {label_smoothing}")
    logits = beta * p.delta
    log_pw = math.log1p(-label_smoothing)
    log_pl = math.log(label_smoothing)
    return torch.sigmoid(logits) * (F.logsigmoid(logits) - log_pw) + torch.sigmoid(-logits) * (
        F.logsigmoid(-logits) - log_pl
    )


def nca_pair_loss(p: PairLogps, beta: Beta, **_: float) -> Tensor:
    """NCA (Chen et al. 2024): −log σ(r_w) − ½ log σ(−r_w) − ½ log σ(−r_l), r = β·log-ratio."""
    chosen_rewards = beta * p.chosen_logratios
    rejected_rewards = beta * p.rejected_logratios
    return -F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards) - 0.5 * F.logsigmoid(-rejected_rewards)


def robust_loss(p: PairLogps, beta: Beta, *, label_smoothing: float = 0.0, **_: float) -> Tensor:
    """Robust DPO (rDPO; Chowdhury et al. 2024, "Provably Robust DPO"): the unbiased loss under a known flip rate
    ε = label_smoothing ∈ [0, ½), ℓ̂(h) = ((1 − ε)·ℓ(h) − ε·ℓ(−h)) / (1 − 2ε) with ℓ(h) = −log σ(βh), the DPO loss
    of the observed order and ℓ(−h) that of the reversed one. Unbiased: if a pair's true order is observed with
    probability 1 − ε and reversed with probability ε, (1 − ε)·ℓ̂(h) + ε·ℓ̂(−h) = ℓ(h) (tested with hand numbers).
    Unlike cDPO it can be negative and its gradient does not vanish: it pushes a confidently wrong pair back."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust needs 0 <= label_smoothing < 0.5 (the flip rate), got {label_smoothing}")
    logits = beta * p.delta
    clean = -(1 - label_smoothing) * F.logsigmoid(logits)
    flipped = -label_smoothing * F.logsigmoid(-logits)
    return (clean - flipped) / (1 - 2 * label_smoothing)


def bco_pair_loss(p: PairLogps, beta: Beta, **_: float) -> Tensor:
    """BCO, paired form as in TRL (Jung et al. 2024) without the running reward shift: −log σ(r_w) − log σ(−r_l)."""
    return -F.logsigmoid(beta * p.chosen_logratios) - F.logsigmoid(-beta * p.rejected_logratios)


def sppo_hard_loss(p: PairLogps, beta: Beta, **_: float) -> Tensor:
    """SPPO with hard probabilities (Wu et al. 2024, Eq. 4.7 with P=1/0): squared distance to ±1/(2β)."""
    return (p.chosen_logratios - 0.5 / beta) ** 2 + (p.rejected_logratios + 0.5 / beta) ** 2


def _aot_from_sorted_delta(delta: Tensor, beta: Beta, label_smoothing: float) -> Tensor:
    if isinstance(beta, Tensor) and beta.numel() > 1 and not bool((beta == beta.flatten()[0]).all()):
        raise ValueError("aot/aot_unpaired sort the batch, so they need one β for the whole batch, not one per pair")
    if isinstance(beta, Tensor) and beta.numel() > 1:
        beta = beta.flatten()[0]
    return -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing


def aot_loss(p: PairLogps, beta: Beta, *, label_smoothing: float = 0.0, **_: float) -> Tensor:
    """AOT paired (Melnyk et al. 2024): DPO on the sorted policy vs sorted reference log-ratios of the batch.

    The i-th output belongs to the i-th quantile of the batch, not to pair i.
    """
    policy = torch.sort(p.chosen - p.rejected, dim=0).values
    reference = torch.sort(p.ref_chosen - p.ref_rejected, dim=0).values
    return _aot_from_sorted_delta(policy - reference, beta, label_smoothing)


def aot_unpaired_loss(p: PairLogps, beta: Beta, *, label_smoothing: float = 0.0, **_: float) -> Tensor:
    """AOT unpaired (Melnyk et al. 2024): sorted chosen log-ratios against sorted rejected log-ratios."""
    chosen = torch.sort(p.chosen_logratios, dim=0).values
    rejected = torch.sort(p.rejected_logratios, dim=0).values
    return _aot_from_sorted_delta(chosen - rejected, beta, label_smoothing)


def apo_zero_loss(p: PairLogps, beta: Beta, **_: float) -> Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, Eq. 7): raise chosen, lower rejected likelihood."""
    return 1 - torch.sigmoid(beta * p.chosen_logratios) + torch.sigmoid(beta * p.rejected_logratios)


def apo_down_loss(p: PairLogps, beta: Beta, **_: float) -> Tensor:
    """APO-down (D'Oosterlinck et al. 2024, Eq. 8): lower both, rejected more."""
    return torch.sigmoid(beta * p.chosen_logratios) + 1 - torch.sigmoid(beta * p.delta)


def discopop_loss(p: PairLogps, beta: Beta, *, discopop_tau: float = 0.05, **_: float) -> Tensor:
    """DiscoPOP / LRML (Chris Lu et al. 2024, Eq. 5): logistic and exponential losses blended by σ(β·h/τ)."""
    logits = beta * p.delta
    modulation = torch.sigmoid(logits / discopop_tau)
    return -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation


HOLDER_GAMMA = 2.0


def _sigmoid_powers(logits: Tensor, gamma: float) -> tuple[Tensor, Tensor, Tensor]:
    """p, p^γ and p^(1+γ) for p = σ(βh), the last two computed in log space."""
    log_p = F.logsigmoid(logits)
    return torch.exp(log_p), torch.exp(gamma * log_p), torch.exp((1 + gamma) * log_p)


def holder_scale(logits: Tensor, gamma: float = HOLDER_GAMMA) -> Tensor:
    """The clean-data proportion estimate ξ̂ of Fujisawa et al. 2025, Eq. (27) (Appendix F.3, Lemma 4), over the
    pairs of ``logits`` (= β·h per pair), detached: with p_i = σ(βh_i),

        ξ̂ = mean(p) · mean(p^γ) / mean(p^(1+γ))

    i.e. the empirical enlarged-model optimum mean(p^γ)/mean(p^(1+γ)) of Eq. (26) (which is ≥ 1, Lemma 3) rescaled
    by v = 1/mean(p) (Lemma 4), so that 0 < ξ̂ ≤ 1 (Chebyshev's sum inequality). When the model gives the clean
    pairs p = 1 and the flipped ones p = 0 (the tail-contamination assumption), ξ̂ = (N − M)/N exactly."""
    p, p_g, p_g1 = _sigmoid_powers(logits.detach(), gamma)
    return p.mean() * p_g.mean() / p_g1.mean()


def holder_contamination(logits: Tensor, gamma: float = HOLDER_GAMMA) -> Tensor:
    """The contamination-ratio estimate ε̂ = 1 − ξ̂ (Fujisawa et al. 2025, Eq. (11), with ξ̂ of Eq. (27), see
    :func:`holder_scale`) of the pairs of ``logits`` (= β·h per pair), detached. ξ̂ ∈ (0, 1] by Lemma 4; the clamp
    to [0, 1] only guards rounding. The paper computes it once over the training set with the trained model
    (Algorithm 1, line 2); the trainer's ``holder/contamination`` metric applies it to each step's batch."""
    return (1 - holder_scale(logits, gamma)).clamp(0.0, 1.0)


def holder_loss(p: PairLogps, beta: Beta, *, holder_gamma: float = HOLDER_GAMMA, **_: float) -> Tensor:
    """Hölder-DPO (Fujisawa, Adachi & Osborne, NeurIPS 2025, arXiv 2505.17859): the density-power (DP) divergence
    choice ϕ(h) = γ − (1 + γ)·h of the Hölder-DPO objective (Prob. (9); Remark 1, Appendix F.4), with the intractable
    integral ∫σ(g_θ)^(1+γ) ds replaced by the empirical measure of the data (Appendix D), which gives the empirical
    objective of Eq. (12), as in the paper's pseudocode (Appendix H, Figure 6). Per pair, with p = σ(βh):

        ℓ = −(1 + γ)·p^γ + γ·p^(1+γ)

    whose batch mean is Figure 6's ``-(1 + γ)·p.pow(γ).mean() + γ·p.pow(γ + 1).mean()``. The loss is per pair (no
    batch statistic; the enlarged model's scale ξ enters only the contamination estimate, :func:`holder_scale`).
    Its gradient in βh is −γ(1 + γ)·p^γ·(1 − p)², which → 0 as p → 0 (redescending: a pair the model confidently
    calls mislabelled stops pulling, where DPO's tends to −1) and as p → 1. The loss lies in [−1, 0]; it does not tend
    to DPO's −log σ(βh) as γ → 0 (it tends to the constant −1). The paper's default γ is 2.0 (Section 5, Section 6),
    and so is ours (HOLDER_GAMMA)."""
    if holder_gamma <= 0:
        raise ValueError(f"holder needs holder_gamma > 0 (the power γ), got {holder_gamma}")
    p_g, p_g1 = _sigmoid_powers(beta * p.delta, holder_gamma)[1:]
    return -(1 + holder_gamma) * p_g + holder_gamma * p_g1


def kto_pair_loss(p: PairLogps, beta: Beta, **_: float) -> Tensor:
    """Paired KTO (Ethayarajh et al. 2024, Eq. 7 of the HALOs paper), as TRL ≤ 0.11's ``kto_pair``.

    The reference point of the chosen (rejected) half is the batch's mean rejected (chosen) log-ratio,
    clamped at 0, with gradient, as TRL had it. TRL returns the 2n values [chosen terms; rejected terms];
    pair i's loss here is the mean of its two terms, so the batch mean is the same number.
    """
    chosen_kl = p.chosen_logratios.mean().clamp(min=0)
    rejected_kl = p.rejected_logratios.mean().clamp(min=0)
    chosen_term = 1 - torch.sigmoid(beta * (p.chosen_logratios - rejected_kl))
    rejected_term = 1 - torch.sigmoid(beta * (chosen_kl - p.rejected_logratios))
    return 0.5 * (chosen_term + rejected_term)


def sigmoid_norm_loss(p: PairLogps, beta: Beta, **_: float) -> Tensor:
    """DPO on per-token averaged log-ratios (TRL's `sigmoid_norm`, SimPO-style but with a reference)."""
    return -F.logsigmoid(beta * p.length_normalised_delta("sigmoid_norm"))


def sft_loss(p: PairLogps, beta: Beta, **_: float) -> Tensor:
    """The SFT term of RPO (Pang et al. 2024) and MPO, as TRL 1.16 computes it: the mean negative log-likelihood of
    the batch's chosen tokens, −Σ log π(y_w) / Σ|y_w|. Spread over the pairs (pair i gets −log π(y_w,i)·n / Σ|y_w|),
    so that the mean over pairs is that token mean; β plays no part."""
    if p.chosen_lengths is None:
        raise ValueError("loss_type 'sft' averages over chosen tokens: pass chosen_lengths (completion token counts)")
    tokens = p.chosen_lengths.to(p.chosen.dtype).sum().clamp(min=1.0)
    return -p.chosen * p.chosen.shape[0] / tokens


LOSSES: dict[str, Callable[..., Tensor]] = {
    "sigmoid": sigmoid_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
    "exo_pair": exo_pair_loss,
    "nca_pair": nca_pair_loss,
    "robust": robust_loss,
    "bco_pair": bco_pair_loss,
    "sppo_hard": sppo_hard_loss,
    "aot": aot_loss,
    "aot_unpaired": aot_unpaired_loss,
    "apo_zero": apo_zero_loss,
    "apo_down": apo_down_loss,
    "discopop": discopop_loss,
    "sigmoid_norm": sigmoid_norm_loss,
    "sft": sft_loss,
    "kto_pair": kto_pair_loss,
    "holder": holder_loss,
}
LOSS_TYPES: tuple[str, ...] = tuple(LOSSES)
#: losses whose pair-i output depends on the other pairs of the batch (AOT sorts it, kto_pair averages it, sft
#: divides by the batch's chosen tokens): under a mask, their batch is the pairs trained on. (holder is per pair.)
BATCH_COUPLED_LOSSES: frozenset[str] = frozenset({"aot", "aot_unpaired", "kto_pair", "sft"})
#: the losses TRL 1.16's DPOTrainer has (kto_pair was removed from it in 0.12; sft only makes sense in a mixture;
#: holder is ours)
TRL_LOSS_TYPES: tuple[str, ...] = tuple(t for t in LOSS_TYPES if t not in ("kto_pair", "holder"))


#: f-DPO (Wang et al. 2024): the divergences TRL 1.16 offers, and the losses that admit them (the
#: reparameterisation leaves a β·log Z(x) term that cancels only in the chosen − rejected difference)
F_DIVERGENCES: tuple[str, ...] = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
F_DIVERGENCE_LOSSES: frozenset[str] = frozenset({"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust",
                                                 "discopop", "sft"})


def f_divergence_scores(logratios: Tensor, divergence: str, alpha: float = 0.5) -> Tensor:
    """f′(π/π_ref) evaluated at the log-ratio ρ = log π − log π_ref (f-DPO, Wang et al. 2024, Table 1), as TRL:
    reverse KL ρ; forward KL 1 − e^(−ρ); JS log 2 + log σ(ρ); α-divergence (e^((α−1)ρ) − 1)/(α − 1) (→ ρ as α → 1;
    the exponent is clamped at 80 in float32 and bfloat16, 11 in float16, as TRL does)."""
    if divergence == "reverse_kl":
        return logratios
    if divergence == "forward_kl":
        return 1 - torch.exp(-logratios)
    if divergence == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if divergence == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return logratios
        t = (alpha - 1.0) * logratios
        limit = {torch.float16: 11.0}.get(t.dtype, 80.0)
        return (torch.exp(torch.clamp(t.float(), max=limit)) - 1.0).to(t.dtype) / (alpha - 1.0)
    raise ValueError(f"f_divergence_type {divergence!r}: choose one of {', '.join(F_DIVERGENCES)}")


def preference_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: Beta,
    loss_type: str = "sigmoid",
    *,
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    discopop_tau: float = 0.05,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    sigmoid_label_smoothing: str = "cdpo",
    holder_gamma: float = HOLDER_GAMMA,
) -> Tensor:
    """Per-pair losses, shape [n], for one of :data:`LOSS_TYPES`.

    Args:
        chosen_logps, rejected_logps: policy log-probs summed over completion tokens, shape [n].
        ref_chosen_logps, ref_rejected_logps: the same under the frozen reference.
        beta: a float, or a tensor of shape [n] (one β per pair; β-DPO's instance level) or [] .
        loss_type: which loss; see the table in docs/metrics.md.
        label_smoothing: the flip rate ε of ``robust`` and of ``sigmoid`` (cDPO), the ε of ``exo_pair``, the
            smoothing of ``aot*``.
        chosen_lengths, rejected_lengths: completion token counts, required by ``ipo`` and ``sigmoid_norm``.
        discopop_tau: the temperature τ of ``discopop``.
        f_divergence_type, f_alpha_divergence_coef: f-DPO: the log-ratios enter the loss through
            :func:`f_divergence_scores` (reverse_kl = DPO); only :data:`F_DIVERGENCE_LOSSES` admit another one.
        sigmoid_label_smoothing: ``cdpo`` (label_smoothing makes ``sigmoid`` conservative DPO) or ``ignore``
            (TRL 1.16: ``sigmoid`` ignores it).
        holder_gamma: the power γ of ``holder`` (Hölder-DPO).
    """
    try:
        fn = LOSSES[loss_type]
    except KeyError:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}") from None
    n = chosen_logps.shape[0]
    for name, t in (("rejected_logps", rejected_logps), ("ref_chosen_logps", ref_chosen_logps),
                    ("ref_rejected_logps", ref_rejected_logps)):
        if t.shape != chosen_logps.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, chosen_logps has {tuple(chosen_logps.shape)}")
    if isinstance(beta, Tensor):
        if beta.dim() > 1 or (beta.dim() == 1 and beta.shape[0] != n):
            raise ValueError(f"a tensor beta must have shape [] or [{n}], got {tuple(beta.shape)}")
        beta = beta.to(chosen_logps.dtype)
    pairs = PairLogps(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                      chosen_lengths, rejected_lengths)
    if f_divergence_type != "reverse_kl":
        if loss_type not in F_DIVERGENCE_LOSSES:
            raise ValueError(f"f_divergence_type={f_divergence_type!r} works with the losses built on the chosen − "
                             f"rejected difference only ({', '.join(sorted(F_DIVERGENCE_LOSSES))}), not {loss_type!r}")
        if loss_type != "sft":  # the SFT term reads the policy's log-probs, not the log-ratios
            zeros = torch.zeros_like(chosen_logps)
            pairs = PairLogps(f_divergence_scores(pairs.chosen_logratios, f_divergence_type, f_alpha_divergence_coef),
                              f_divergence_scores(pairs.rejected_logratios, f_divergence_type,
                                                  f_alpha_divergence_coef),
                              zeros, zeros, chosen_lengths, rejected_lengths)
    return fn(pairs, beta, label_smoothing=label_smoothing, discopop_tau=discopop_tau,
              sigmoid_smoothing=sigmoid_label_smoothing, holder_gamma=holder_gamma)


def implicit_rewards(logratios: Tensor, beta: Beta) -> Tensor:
    """The DPO implicit reward r = β·(log π − log π_ref) (Rafailov et al. 2023, Eq. 5), detached."""
    return (beta * logratios).detach()


def combined_preference_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: Beta,
    loss_types: Sequence[str] = ("sigmoid",),
    loss_weights: Sequence[float] | None = None,
    **kwargs: Any,
) -> Tensor:
    """Σ_k w_k·loss_k per pair, shape [n]: TRL 1.16's ``loss_type`` list with ``loss_weights`` (default 1 each).

    TRL sums ``w_k · mean_i loss_k,i``; the mean over pairs of this per-pair sum is the same number, and keeping
    it per pair lets β-DPO and SamS weight or drop pairs as with one loss. RPO = ``["sigmoid", "sft"]``; MPO =
    ``["sigmoid", "bco_pair", "sft"]`` with weights ``[0.8, 0.2, 1.0]``."""
    if isinstance(loss_types, str):
        loss_types = [loss_types]
    weights = [1.0] * len(loss_types) if loss_weights is None else list(loss_weights)
    if len(weights) != len(loss_types):
        raise ValueError(f"loss_weights has {len(weights)} values for {len(loss_types)} loss types")
    total: Tensor | None = None
    for loss_type, weight in zip(loss_types, weights, strict=True):
        term = preference_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, loss_type,
                               **kwargs)
        total = term * weight if total is None else total + term * weight
    assert total is not None, "loss_types is empty"
    return total
