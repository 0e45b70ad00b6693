"""Per-token log-probabilities (and TRL's token statistics) from the LM head, plain or chunked.

The plain path reads the model's logits ``[rows, T, V]``. The chunked path never holds them: the model's forward
runs as usual (through any DDP wrapper, so gradients are still all-reduced) but its LM head hands back its input,
the final hidden states; :class:`ChunkedHeadLogProbs` then computes ``log softmax(h Wᵀ)[label]`` a chunk of
positions at a time, and its backward recomputes each chunk's logits, so the head's peak memory is
O(chunk × vocabulary) in forward and backward instead of O(positions × vocabulary). The gradient is the exact
one of log-softmax: ∂ log p_y / ∂ z = onehot(y) − softmax(z), so ∂h = g·(onehot − p)·W and ∂W = Σ g·(onehot − p)ᵀ h.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from adaptdpo.models.token_ops import log_sum_squared_probs, selective_log_softmax, token_statistics, unwrap


@dataclass
class TokenScores:
    """Per scored position: log p(label) (float32, with gradient) and, when asked for, detached statistics."""

    logp: Tensor
    entropy: Tensor | None = None
    mean_logit: Tensor | None = None
    top1: Tensor | None = None
    log_sum_sq: Tensor | None = None  # log Σ_v p_v² (WPO)


def scores_from_logits(logits: Tensor, labels: Tensor, stats: bool, wpo: bool) -> TokenScores:
    """The plain path: the model's logits ``[..., V]`` at the scored positions."""
    out = TokenScores(selective_log_softmax(logits, labels))
    if stats:
        out.entropy, out.mean_logit, out.top1 = token_statistics(logits, labels)
    if wpo:
        out.log_sum_sq = log_sum_squared_probs(logits)
    return out


class ChunkedHeadLogProbs(torch.autograd.Function):
    """log softmax(h Wᵀ)[y] for rows of ``hidden`` [N, H], ``chunk`` rows at a time, never holding [N, V].

    Returns (log-probs [N] float32, statistics [N, 4] detached: entropy, mean logit, top-1 hit, log Σp²)."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int,
                want_stats: bool, want_wpo: bool) -> tuple[Tensor, Tensor]:
        n = hidden.shape[0]
        dtype = torch.promote_types(hidden.dtype, torch.float32)  # float32 (float64 stays: the gradient check)
        logp = torch.empty(n, dtype=dtype, device=hidden.device)
        extras = torch.zeros(n, 4, dtype=dtype, device=hidden.device)
        for start in range(0, n, chunk):
            end = start + chunk
            logits = (hidden[start:end] @ weight.t()).to(dtype)
            lse = torch.logsumexp(logits, dim=-1)
            logp[start:end] = logits.gather(-1, labels[start:end, None]).squeeze(-1) - lse
            if want_stats or want_wpo:
                log_p = logits - lse[:, None]
                if want_stats:
                    extras[start:end, 0] = -(log_p.exp() * log_p).sum(dim=-1)
                    extras[start:end, 1] = logits.mean(dim=-1)
                    extras[start:end, 2] = (logits.argmax(dim=-1) == labels[start:end]).float()
                if want_wpo:
                    extras[start:end, 3] = torch.logsumexp(2 * log_p, dim=-1)
        ctx.save_for_backward(hidden, weight, labels)
        ctx.chunk = chunk
        device = hidden.device.type
        # the backward's matmuls run in the forward's precision: the autocast dtype where autocast was on (as the
        # plain head's backward would), else the tensors' own
        ctx.matmul_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        ctx.mark_non_differentiable(extras)
        return logp, extras

    @staticmethod
    def backward(ctx: Any, grad_logp: Tensor, grad_extras: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, labels = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        dtype = torch.promote_types(hidden.dtype, torch.float32)  # softmax and accumulation
        mm = ctx.matmul_dtype or torch.promote_types(hidden.dtype, weight.dtype)
        grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if want_weight else None
        w = weight.to(mm)
        for start in range(0, hidden.shape[0], ctx.chunk):
            end = start + ctx.chunk
            h = hidden[start:end].to(mm)
            logits = (h @ w.t()).to(dtype)
            g = -torch.softmax(logits, dim=-1)  # ∂ log p_y / ∂ z = onehot(y) − softmax(z), times the upstream grad
            g.scatter_add_(-1, labels[start:end, None], torch.ones_like(labels[start:end, None], dtype=g.dtype))
            g *= grad_logp[start:end, None].to(dtype)
            g = g.to(mm)
            if grad_hidden is not None:  # want_hidden
                grad_hidden[start:end] = (g @ w).to(hidden.dtype)
            if want_weight:
                grad_weight += (g.t() @ h).to(dtype)
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None, None, None)


def scores_from_hidden(hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int, stats: bool,
                       wpo: bool) -> TokenScores:
    """The chunked path: final hidden states ``[..., H]`` at the scored positions and the head's weight."""
    shape = labels.shape
    logp, extras = ChunkedHeadLogProbs.apply(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                             int(chunk), stats, wpo)
    out = TokenScores(logp.reshape(shape))
    if stats:
        out.entropy, out.mean_logit = extras[:, 0].reshape(shape), extras[:, 1].reshape(shape)
        out.top1 = extras[:, 2].reshape(shape).bool()
    if wpo:
        out.log_sum_sq = extras[:, 3].reshape(shape)
    return out


def chunkable_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The model's LM head when the chunked path computes exactly what the model would: a plain bias-free
    ``nn.Linear`` holding its whole weight (not sharded, not adapted), and no logit transform after it (soft-capping,
    scaling); else None."""
    inner = unwrap(model)
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    weight = head.weight
    if type(weight.data) is not torch.Tensor or weight.dim() != 2 or weight.numel() == 0:  # DTensor, ZeRO-3 shard
        return None
    config = getattr(inner, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"):
        if getattr(text_config, name, None) not in (None, 1, 1.0):
            return None
    return head


@dataclass
class HeadWindow:
    """What one forward produced at the scored window: logits (plain) or hidden states and the head (chunked)."""

    logits: Tensor | None = None
    hidden: Tensor | None = None
    head: torch.nn.Linear | None = None
    chunk: int = 0

    def scores(self, select: Callable[[Tensor], Tensor], labels: Tensor, stats: bool, wpo: bool) -> TokenScores:
        """Scores of the positions ``select`` picks from the window (the same indexing for logits or hidden)."""
        if self.logits is not None:
            return scores_from_logits(select(self.logits), labels, stats, wpo)
        assert self.hidden is not None and self.head is not None  # chunked: both set (forward_window)
        return scores_from_hidden(select(self.hidden), self.head.weight, labels, self.chunk, stats, wpo)

    def values(self) -> Tensor:
        """The window's logits (plain) or hidden states (chunked)."""
        values = self.logits if self.logits is not None else self.hidden
        assert values is not None
        return values


def mixture_weights(epsilon: float) -> tuple[tuple[float, float], ...]:
    """The (policy, reference) logit weights of :func:`mixed_log_probs` for a perturbation ε: toward the reference
    (the policy at β/(1 − ε)), the policy itself (β), away from it (β/(1 + ε))."""
    return (1.0 - epsilon, epsilon), (1.0, 0.0), (1.0 + epsilon, -epsilon)


def _window_logits(window: HeadWindow, selected: Tensor) -> Tensor:
    """Logits of already-selected window rows ``[N, V]`` (plain) or ``[N, H]`` hidden states (chunked), float32."""
    if window.logits is not None:
        return selected.float()
    assert window.head is not None  # chunked: the head is set (forward_window)
    return (selected @ window.head.weight.detach().t()).float()


@torch.no_grad()
def mixed_log_probs(policy: HeadWindow, reference: HeadWindow, select: Callable[[Tensor], Tensor], labels: Tensor,
                    epsilon: float) -> Tensor:
    """ε-DPO's estimate of the policies under a perturbed β (Lee et al. 2025; as the official code): at every scored
    position, log softmax(w·z_θ + (1 − w)·z_ref)[label] for w = 1 − ε, 1, 1 + ε, with z_θ the policy's logits and
    z_ref the reference's at the same position. Since π_θ ∝ π_ref·exp(r/β), the policy for β/(1 + ε) is
    ∝ π_ref·(π_θ/π_ref)^(1+ε), whose per-token logits are (1 + ε)·z_θ − ε·z_ref (and β/(1 − ε) likewise with −ε):
    no forward pass beyond the two the step already made. Returns ``labels.shape + (3,)``, float32, detached; the
    middle column is log π_θ(label) itself, so the three are compared on equal footing.

    ``select`` picks the scored positions from a window (the same indexing for logits and hidden states)."""
    a_all, b_all = select(policy.values()), select(reference.values())
    a_all = a_all.detach().reshape(-1, a_all.shape[-1])
    b_all = b_all.reshape(-1, b_all.shape[-1])
    flat = labels.reshape(-1)
    out = torch.empty(flat.shape[0], 3, dtype=torch.float32, device=flat.device)
    chunk = policy.chunk or 256
    weights = mixture_weights(epsilon)
    for start in range(0, flat.shape[0], chunk):
        end = start + chunk
        z_policy, z_reference = _window_logits(policy, a_all[start:end]), _window_logits(reference, b_all[start:end])
        label = flat[start:end, None]
        for column, (w_policy, w_reference) in enumerate(weights):
            mixed = z_policy if w_reference == 0.0 else w_policy * z_policy + w_reference * z_reference
            out[start:end, column] = mixed.gather(-1, label).squeeze(-1) - torch.logsumexp(mixed, dim=-1)
    return out.reshape(*labels.shape, 3)


@contextlib.contextmanager
def head_input_captured(head: torch.nn.Linear) -> Iterator[dict[str, Tensor]]:
    """While active, the head returns a width-1 placeholder instead of logits and keeps its input (the final
    hidden states, already cut to ``logits_to_keep``) in the yielded dict under "hidden"."""
    store: dict[str, Tensor] = {}

    def capture(hidden: Tensor) -> Tensor:
        store["hidden"] = hidden
        return hidden[..., :1]

    # an instance attribute: nn.Module.__call__ finds it before the class's forward
    head.forward = capture  # type: ignore[method-assign,assignment]  # shadows Linear.forward on this instance
    try:
        yield store
    finally:
        del head.forward


def forward_window(model: torch.nn.Module, keep: int, head_chunk: int | None, **forward_kwargs: Any) -> tuple[
        Any, HeadWindow]:
    """Run the model (as given: DDP and PEFT wrappers included) and return its outputs and the last ``keep``
    positions' window, chunked when ``head_chunk`` is set and the head allows it."""
    head = chunkable_head(model) if head_chunk else None
    if head is None:
        outputs = model(**forward_kwargs)
        return outputs, HeadWindow(logits=outputs.logits[:, -keep:])
    with head_input_captured(head) as store:
        outputs = model(**forward_kwargs)
    if "hidden" not in store:  # the model computed its logits without calling its head module: they are real
        return outputs, HeadWindow(logits=outputs.logits[:, -keep:])
    # head_chunk is set (the head is None without it)
    return outputs, HeadWindow(hidden=store["hidden"][:, -keep:], head=head, chunk=int(head_chunk or 0))
