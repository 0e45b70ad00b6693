"""The SamS scheduler (Algorithm 1): lagged fit on round t−1, score round t, select k pairs.

One call of :meth:`SamsScheduler.step` per scheduling round, with what the round's forward already
computed (contexts, margins, chosen log-probs, mean DPO loss):

1. if a previous round is stored: its batch reward r_B from its mean loss (θ_{t−2}) and this round's
   (θ_{t−1}); its per-pair rewards r = γσ(s·r_B + o) + (1−γ)σ(r_S); fit f_S on (contexts, r) and f_S′ on
   (f_S activations, r − f_S's prediction at scoring time), on that round plus up to ``pool_batches``
   rounds from the replay pool; then push it into the pool;
2. score this round: r̂ = f_S + λ·f_S′ (networks in eval mode, no gradient);
3. select k = max(1, ⌊ratio·n⌋): random during ``warmup_rounds`` (the scheduler has learned nothing yet),
   then ``topk`` / ``softmax`` / ``random``;
4. store this round for the next call.

Nothing of round t trains the scheduler before round t is scored (the lag, sams.md §5.1 oracle 6).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from adaptdpo.methods.sams.networks import (
    ExploitationNet,
    ExplorationNet,
    LayerEncoder,
    SchedulerSize,
    size_from,
)
from adaptdpo.methods.sams.rewards import batch_reward, combined_reward, sample_reward
from adaptdpo.methods.sams.selection import SELECTIONS, num_selected, select


@dataclass
class Round:
    """What is kept of a scored round until the next round rewards it."""

    contexts: Tensor  # [n, L, D]
    margins: Tensor  # [n]
    chosen_logps: Tensor  # [n]
    mean_loss: float
    predictions: Tensor  # f_S at scoring time [n]
    selected: Tensor  # bool [n]


@dataclass
class PoolEntry:
    contexts: Tensor
    rewards: Tensor
    predictions: Tensor

    def to(self, device: torch.device | str) -> PoolEntry:
        return PoolEntry(self.contexts.to(device), self.rewards.to(device), self.predictions.to(device))


def fit_batch(current: PoolEntry, pooled: list[PoolEntry]) -> tuple[Tensor, Tensor, Tensor]:
    """One fit's data: the current round and pooled rounds, concatenated on the current round's device.

    The pool lives on ``pool_device`` (the CPU by default, so that 40,000 rounds do not take GPU memory)
    while the round and the networks live on the training device: every pooled round is moved first."""
    device = current.contexts.device
    batches = [current, *(entry.to(device) for entry in pooled)]
    return (torch.cat([b.contexts for b in batches]), torch.cat([b.rewards.to(current.rewards.dtype) for b in batches]),
            torch.cat([b.predictions.to(current.predictions.dtype) for b in batches]))


class SamsScheduler:
    def __init__(self, num_layers: int, context_dim: int, preset: str = "small", ratio: float = 0.5,
                 selection: str = "topk", temperature: float = 1.0, exploration_weight: float = 0.01,
                 use_exploration: bool = True, gamma: float = 0.5, delta: float = 0.5,
                 batch_reward_scale: float = 1.0, batch_reward_offset: float = 0.0, train_on: str = "all",
                 pool_capacity: int = 40_000, pool_batches: int = 32, fit_steps: int = 4, lr: float = 1e-4,
                 weight_decay: float = 1e-5, warmup_rounds: int = 10, seed: int = 0,
                 size: SchedulerSize | None = None, encoder_backbone: torch.nn.Module | None = None,
                 freeze_encoder: bool = False, pool_device: torch.device | str = "cpu"):
        """``encoder_backbone``: a pretrained BERT-style encoder for the layer encoder (see :class:`LayerEncoder`).
        ``freeze_encoder``: keep the layer encoder's transformer fixed (the paper, App. D.1, after
        pre-training); the connector, f_S's MLP and f_S′ still learn."""
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        if train_on not in ("all", "selected"):
            raise ValueError(f"train_on must be 'all' or 'selected', got {train_on!r}")
        self.size = size or size_from(preset)
        if encoder_backbone is not None:
            config: Any = encoder_backbone.config  # a transformers model's config (a dynamic attribute)
            self.size = replace(self.size, encoder_dim=int(config.hidden_size))
        self.num_layers, self.context_dim = num_layers, context_dim
        self.freeze_encoder = freeze_encoder
        self.ratio, self.selection, self.temperature = ratio, selection, temperature
        self.exploration_weight, self.use_exploration = exploration_weight, use_exploration
        self.gamma, self.delta = gamma, delta
        self.batch_reward_scale, self.batch_reward_offset = batch_reward_scale, batch_reward_offset
        self.train_on, self.pool_capacity, self.pool_batches = train_on, pool_capacity, pool_batches
        self.fit_steps, self.warmup_rounds = fit_steps, warmup_rounds
        torch_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.encoder = LayerEncoder(num_layers, context_dim, self.size, encoder_backbone)
        self.exploit = ExploitationNet(self.size.encoder_dim, self.size)
        self.explore = ExplorationNet(self.size)
        torch.random.set_rng_state(torch_state)
        if freeze_encoder:
            self.encoder.encoder.requires_grad_(False)
        trainable = [p for p in [*self.encoder.parameters(), *self.exploit.parameters()] if p.requires_grad]
        # fused Adam: one kernel over all parameters (a fifth of the per-tensor loop's time on CPU)
        self.exploit_optimizer = torch.optim.Adam(trainable, lr=lr, weight_decay=weight_decay, fused=True)
        self.explore_optimizer = torch.optim.Adam(self.explore.parameters(), lr=lr, weight_decay=weight_decay,
                                                  fused=True)
        self.generator = torch.Generator().manual_seed(seed)
        self.dropout_rng = {"cpu": torch.Generator().manual_seed(seed + 1).get_state()}
        self.pool_rng = random.Random(seed)
        self.pool: list[PoolEntry] = []
        self.pool_device = torch.device(pool_device)
        self.previous: Round | None = None
        self.rounds = 0
        self.last_metrics: dict[str, float] = {}

    # ------------------------------------------------------------------------------------ networks

    def modules(self) -> list[torch.nn.Module]:
        return [self.encoder, self.exploit, self.explore]

    def to(self, device: torch.device | str) -> SamsScheduler:
        for module in self.modules():
            module.to(device)
        return self

    @torch.no_grad()
    def score(self, contexts: Tensor) -> tuple[Tensor, Tensor]:
        """(score r̂ = f_S + λ·f_S′, f_S prediction), both [n], networks in eval mode."""
        for module in self.modules():
            module.eval()
        prediction, activations = self.exploit(self.encoder(contexts))
        score = prediction
        if self.use_exploration:
            score = prediction + self.exploration_weight * self.explore(activations)
        return score, prediction

    def _fit(self, contexts: Tensor, rewards: Tensor, predictions: Tensor) -> tuple[float, float]:
        """Fit with the scheduler's own RNG stream for dropout (saved in state_dict: resume is exact)."""
        devices = [contexts.device] if contexts.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.dropout_rng["cpu"])
            if devices and "cuda" in self.dropout_rng:
                torch.cuda.set_rng_state(self.dropout_rng["cuda"], contexts.device)
            losses = self._fit_steps(contexts, rewards, predictions)
            self.dropout_rng = {"cpu": torch.get_rng_state()}
            if devices:
                self.dropout_rng["cuda"] = torch.cuda.get_rng_state(contexts.device)
        return losses

    def _regress(self, optimizer: torch.optim.Optimizer, predict: Any, target: Tensor) -> float:
        """``fit_steps`` Adam steps of ½·mean squared error; prediction and target shapes must match."""
        loss = torch.zeros(())
        for _ in range(self.fit_steps):
            prediction = predict()
            assert prediction.shape == target.shape, (prediction.shape, target.shape)
            loss = 0.5 * F.mse_loss(prediction, target, reduction="sum") / target.shape[0]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return float(loss.detach())

    def _fit_steps(self, contexts: Tensor, rewards: Tensor, predictions: Tensor) -> tuple[float, float]:
        """f_S on r, then f_S′ on r − f_S's prediction at scoring time, from f_S's eval-mode activations."""
        for module in self.modules():
            module.train()
        if self.freeze_encoder:
            self.encoder.encoder.eval()
        exploit_loss = self._regress(self.exploit_optimizer, lambda: self.exploit(self.encoder(contexts))[0],
                                     rewards)
        explore_loss = float("nan")
        if self.use_exploration:
            # f_S′'s input as it is at scoring time: f_S's activations in eval mode (no dropout)
            self.encoder.eval()
            self.exploit.eval()
            with torch.no_grad():
                _, activations = self.exploit(self.encoder(contexts))
            explore_loss = self._regress(self.explore_optimizer, lambda: self.explore(activations),
                                         rewards - predictions)
        return exploit_loss, explore_loss

    # ------------------------------------------------------------------------------------ one round

    def rewards_for(self, previous: Round, current_mean_loss: float) -> tuple[Tensor, float]:
        r_batch = batch_reward(previous.mean_loss, current_mean_loss)
        r_sample = sample_reward(previous.margins, previous.chosen_logps, self.delta)
        r = combined_reward(r_batch, r_sample, self.gamma, self.batch_reward_scale, self.batch_reward_offset)
        return r.float(), float(r_batch)

    def learn_from_previous(self, current_mean_loss: float) -> None:
        """The lagged update: reward round t−1 with round t's loss, fit, pool it."""
        previous = self.previous
        if previous is None:
            return
        rewards, r_batch = self.rewards_for(previous, current_mean_loss)
        keep = previous.selected if self.train_on == "selected" else torch.ones_like(previous.selected)
        device = previous.contexts.device
        entry = PoolEntry(previous.contexts[keep], rewards.to(device)[keep], previous.predictions[keep])
        sampled = self.pool_rng.sample(range(len(self.pool)), min(len(self.pool), self.pool_batches))
        exploit_loss, explore_loss = self._fit(*fit_batch(entry, [self.pool[i] for i in sampled]))
        stored = entry.to(self.pool_device)
        if len(self.pool) < self.pool_capacity:
            self.pool.append(stored)
        else:
            self.pool[self.pool_rng.randrange(self.pool_capacity)] = stored
        self.last_metrics.update({"sams/batch_reward": r_batch, "sams/exploit_loss": exploit_loss,
                                  "sams/explore_loss": explore_loss})

    def step(self, contexts: Tensor, margins: Tensor, chosen_logps: Tensor, mean_loss: float) -> Tensor:
        """One scheduling round; returns the bool mask of the pairs to train on."""
        self.last_metrics = {}
        self.learn_from_previous(mean_loss)
        contexts = contexts.detach().float()
        score, prediction = self.score(contexts)
        n = contexts.shape[0]
        k = num_selected(n, self.ratio)
        rule = "random" if self.rounds < self.warmup_rounds else self.selection
        selected = select(score, k, rule, self.temperature, self.generator)
        self.previous = Round(contexts, margins.detach().double(), chosen_logps.detach().double(), float(mean_loss),
                              prediction, selected)
        self.rounds += 1
        self.last_metrics["sams/selected_fraction"] = k / n
        return selected

    # ------------------------------------------------------------------------------------ state

    def network_state(self) -> dict[str, Any]:
        """The networks alone (what scheduler pre-training hands to a DPO run, App. F.3)."""
        return {"encoder": self.encoder.state_dict(), "exploit": self.exploit.state_dict(),
                "explore": self.explore.state_dict(), "num_layers": self.num_layers,
                "context_dim": self.context_dim, "size": asdict(self.size)}

    def load_networks(self, state: dict[str, Any], source: str = "the pre-trained scheduler") -> None:
        """Warm-start f_S (with its encoder) and f_S′ from :meth:`network_state` (the official DPO run loads
        both); optimisers, pool and lag buffer start fresh."""
        got = (state["num_layers"], state["context_dim"], state["size"])
        want = (self.num_layers, self.context_dim, asdict(self.size))
        if got != want:
            raise ValueError(f"{source} does not fit this run: it was trained on {got[0]} layers × {got[1]} "
                             f"context dims with sizes {got[2]}; this run has {want[0]} × {want[1]} with {want[2]}")
        self.encoder.load_state_dict(state["encoder"])
        self.exploit.load_state_dict(state["exploit"])
        self.explore.load_state_dict(state["explore"])

    def state_dict(self) -> dict[str, Any]:
        return {
            "encoder": self.encoder.state_dict(), "exploit": self.exploit.state_dict(),
            "explore": self.explore.state_dict(), "exploit_optimizer": self.exploit_optimizer.state_dict(),
            "explore_optimizer": self.explore_optimizer.state_dict(), "generator": self.generator.get_state(),
            "pool_rng": self.pool_rng.getstate(), "dropout_rng": self.dropout_rng, "pool": [vars(e) for e in self.pool],
            "previous": None if self.previous is None else vars(self.previous), "rounds": self.rounds,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.encoder.load_state_dict(state["encoder"])
        self.exploit.load_state_dict(state["exploit"])
        self.explore.load_state_dict(state["explore"])
        self.exploit_optimizer.load_state_dict(state["exploit_optimizer"])
        self.explore_optimizer.load_state_dict(state["explore_optimizer"])
        self.generator.set_state(state["generator"])
        self.pool_rng.setstate(state["pool_rng"])
        self.dropout_rng = dict(state["dropout_rng"])
        self.pool = [PoolEntry(**e) for e in state["pool"]]
        self.previous = None if state["previous"] is None else Round(**state["previous"])
        self.rounds = int(state["rounds"])
