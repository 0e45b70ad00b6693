"""SamS scheduler networks (§4, App. D.1, F.2): layer encoder, exploitation net f_S, exploration net f_S′.

Differences from the official code, on purpose: the layer encoder has learned layer-position embeddings
(the code drops BERT's embeddings, so it cannot tell layer order); every residual block has its own
LayerNorm (the code shares one across all blocks); the exploration net's last layer starts at zero, so
the first scores equal f_S (sams.md §5.1 oracle 9); dropout masks come from :class:`FastDropout`
(drop probability exact to within 2⁻¹⁵, a quarter of the random-number calls: the scheduler's fit is a fixed
per-step cost, and ``torch.bernoulli`` on CPU was a quarter of it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FastDropout(nn.Module):
    """Inverted dropout with the drop probability ``p`` rounded to a multiple of 2⁻¹⁵.

    Each element keeps or drops by comparing a uniform 15-bit integer with a threshold; four of them come
    from one 64-bit draw of the current torch generator (the low 15 bits of each 16-bit lane; ``random_``
    fills [0, 2⁶³)). On CPU a forward and backward take about a third of ``nn.Dropout``'s time, whose
    ``bernoulli_`` draws one random number per element. Identity in eval mode or at ``p = 0``.
    """

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.dropped = round(p * 2**15)  # lane values below this are dropped
        self.scale = 2**15 / (2**15 - self.dropped)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.dropped == 0:
            return x
        n = x.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_()
        lanes = words.view(torch.int16)[:n].view(x.shape) & 0x7FFF
        return x * (lanes >= self.dropped).to(x.dtype).mul_(self.scale)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_fast_dropout(module: nn.Module) -> nn.Module:
    """Replace every ``nn.Dropout`` inside ``module`` (e.g. a torch or Hugging Face encoder) by :class:`FastDropout`."""
    for name, child in module.named_children():
        if isinstance(child, nn.Dropout):
            setattr(module, name, FastDropout(child.p))
        else:
            use_fast_dropout(child)
    return module


@dataclass(frozen=True)
class SchedulerSize:
    width: int  # m, the residual MLPs' width
    depth: int  # L of f_S (input layer + depth-2 residual blocks + output layer)
    block: int  # down-sampling of f_S's activations for f_S′
    encoder_dim: int
    encoder_layers: int
    encoder_heads: int
    connector_hidden: int
    dropout: float


PRESETS = {
    # the paper / official code for 7–8B policies: width 4096, depth 16, block 16 (paper text: 4), MiniLM-sized
    "paper": SchedulerSize(width=4096, depth=16, block=16, encoder_dim=384, encoder_layers=6, encoder_heads=12,
                           connector_hidden=1024, dropout=0.3),
    # for small policies and CPU runs
    "small": SchedulerSize(width=256, depth=4, block=4, encoder_dim=64, encoder_layers=1, encoder_heads=4,
                           connector_hidden=128, dropout=0.1),
}


class LayerEncoder(nn.Module):
    """[n, L, D] contexts → [n, encoder_dim], L2-normalised: connector MLP per layer, transformer over layers.

    ``backbone``: any BERT-style encoder module that takes ``inputs_embeds`` and returns
    ``last_hidden_state`` (the paper uses all-MiniLM-L6-v2); its own position embeddings then tell the
    layers apart, and ``size.encoder_dim`` must be its hidden size. Without one, a small
    ``nn.TransformerEncoder`` with learned layer-position embeddings.
    """

    def __init__(self, num_layers: int, context_dim: int, size: SchedulerSize, backbone: nn.Module | None = None):
        super().__init__()
        self.connector = nn.Sequential(nn.Linear(context_dim, size.connector_hidden), nn.ReLU(),
                                       nn.Linear(size.connector_hidden, size.encoder_dim), nn.ReLU())
        self.uses_backbone = backbone is not None
        if backbone is None:
            self.layer_position = nn.Embedding(num_layers, size.encoder_dim)
            layer = nn.TransformerEncoderLayer(size.encoder_dim, size.encoder_heads, 4 * size.encoder_dim,
                                               dropout=size.dropout, batch_first=True)
            self.encoder: nn.Module = nn.TransformerEncoder(layer, size.encoder_layers, enable_nested_tensor=False)
        else:
            self.encoder = backbone
        use_fast_dropout(self.encoder)

    def forward(self, contexts: Tensor) -> Tensor:
        tokens = self.connector(contexts)
        if self.uses_backbone:
            hidden = self.encoder(inputs_embeds=tokens).last_hidden_state
        else:
            hidden = self.encoder(tokens + self.layer_position.weight[None, : contexts.shape[1]])
        return F.normalize(hidden.mean(dim=1), dim=-1)


class ExploitationNet(nn.Module):
    """f_S: encoded context → predicted reward, plus its hidden activations (the input of f_S′)."""

    def __init__(self, in_dim: int, size: SchedulerSize):
        super().__init__()
        if size.depth < 3:
            raise ValueError("depth must be at least 3 (input layer, one residual block, output layer)")
        self.inp = nn.Linear(in_dim, size.width)
        self.blocks = nn.ModuleList(nn.Linear(size.width, size.width) for _ in range(size.depth - 2))
        self.norms = nn.ModuleList(nn.LayerNorm(size.width) for _ in range(size.depth - 2))
        self.dropout = FastDropout(size.dropout)
        self.out = nn.Linear(size.width, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = torch.relu(self.inp(x))
        activations = []
        for linear, norm in zip(self.blocks, self.norms, strict=True):
            a = torch.relu(linear(h))
            activations.append(a)
            h = self.dropout(norm(a + h))
        return self.out(h).squeeze(-1), torch.cat(activations, dim=-1)


class ExplorationNet(nn.Module):
    """f_S′: block-averaged activations of f_S → predicted residual r − f_S (the exploration bonus)."""

    def __init__(self, size: SchedulerSize):
        super().__init__()
        total = size.width * (size.depth - 2)
        if total % size.block:
            raise ValueError(f"block={size.block} must divide width·(depth−2) = {total}")
        self.block = size.block
        dim = total // size.block
        self.inp = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(nn.Linear(dim, dim) for _ in range(size.depth - 2))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(size.depth - 2))
        self.dropout = FastDropout(size.dropout)
        self.out = nn.Linear(dim, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def downsample(self, activations: Tensor) -> Tensor:
        return activations.view(activations.shape[0], -1, self.block).mean(dim=-1)

    def forward(self, activations: Tensor) -> Tensor:
        x = self.downsample(activations)
        h = torch.relu(torch.relu(self.inp(x)) + x)
        for linear, norm in zip(self.blocks, self.norms, strict=True):
            h = self.dropout(norm(torch.relu(linear(h)) + x))
        return self.out(h).squeeze(-1)


def size_from(preset: str, **overrides: int | float) -> SchedulerSize:
    if preset not in PRESETS:
        raise ValueError(f"unknown scheduler preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return SchedulerSize(**{**asdict(PRESETS[preset]), **{k: v for k, v in overrides.items() if v is not None}})
