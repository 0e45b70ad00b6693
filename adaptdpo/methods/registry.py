"""Every training method, in one table: adding a method adds one :class:`MethodSpec` here.

The config's ``method`` choices, the CLI's help, the model card (display name, tags, citations) and the docs'
method table all read :data:`METHODS`; the trainer asks a spec whether the method reads hidden states and how
its step policy is built. ``build(config, load_backbone)`` receives the training config (read by attribute, so
this layer imports none of the training layer) and the models layer's loader of a local encoder (SamS's
``sams_encoder_path``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from adaptdpo.methods.beta_dpo import BetaDPO
from adaptdpo.methods.epsilon_dpo import EpsilonDPO, EpsilonDPOPolicy
from adaptdpo.methods.policies import BetaDPOPolicy, BetaSamsPolicy, SamsPolicy
from adaptdpo.methods.step_policy import StaticBeta, StepPolicy

BackboneLoader = Callable[[str], torch.nn.Module] | None


@dataclass(frozen=True)
class MethodSpec:
    name: str  #: the config's ``method`` value
    display_name: str  #: in the model card, plots and tables
    summary: str  #: one line for the CLI help and the docs
    card_tags: tuple[str, ...]  #: hub tags of the model card (besides adaptdpo, dpo, preference-optimization)
    citations: tuple[str, ...]  #: keys of training.model_card.CITATIONS
    reads_hidden_states: bool  #: needs per-row hidden states at every step (no padding-free rows)
    build: Callable[[Any, BackboneLoader], StepPolicy]


def beta_dpo_controller(config: Any) -> BetaDPO:
    """β-DPO's controller from the config's ``beta_dpo_*`` fields (Wu et al. 2024, Eq. 6-7)."""
    return BetaDPO(beta=config.beta, alpha=config.beta_dpo_alpha, keep_ratio=config.beta_dpo_keep_ratio,
                   momentum=config.beta_dpo_momentum, level=config.beta_dpo_level, min_beta=config.beta_dpo_min_beta,
                   filter=config.beta_dpo_filter, init=config.beta_dpo_init, seed=config.seed)


METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec("dpo", "DPO", "DPO with a static β (Rafailov et al. 2023)", (), ("dpo",), False,
               lambda config, _: StaticBeta(config.beta)),
    MethodSpec("beta_dpo", "β-DPO", "β calibrated per batch from the implicit-reward margin, and β-guided "
               "filtering (Wu et al. 2024)", ("beta-dpo",), ("dpo", "beta_dpo"), False,
               lambda config, _: BetaDPOPolicy(beta_dpo_controller(config))),
    MethodSpec("sams", "SamS", "a contextual-bandit scheduler picks each batch's pairs from the model's hidden "
               "states (Huang et al. 2025)", ("sams",), ("dpo", "sams"), True,
               lambda config, load: SamsPolicy(config, load_backbone=load)),
    MethodSpec("beta_dpo+sams", "β-DPO + SamS", "SamS picks the pairs, β-DPO calibrates β on them and filters",
               ("beta-dpo", "sams"), ("dpo", "beta_dpo", "sams"), True,
               lambda config, load: BetaSamsPolicy(SamsPolicy(config, load_backbone=load),
                                                   BetaDPOPolicy(beta_dpo_controller(config)))),
    MethodSpec("epsilon_dpo", "ε-DPO", "a β for every pair from whether its preference logit grows monotonically "
               "when β is perturbed, estimated from the policy's and the reference's logits (Lee et al. 2025)",
               ("epsilon-dpo",), ("dpo", "epsilon_dpo"), False,
               lambda config, _: EpsilonDPOPolicy(EpsilonDPO(config.beta, config.epsilon_dpo_epsilon))),
)}

METHOD_NAMES: tuple[str, ...] = tuple(METHODS)


def method_spec(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ValueError(f"method={name!r}: choose one of {METHOD_NAMES}")
    return METHODS[name]


def build_step_policy(config: Any, load_backbone: BackboneLoader = None) -> StepPolicy:
    """The step policy the config's ``method`` names (``sams_pretrain`` set: SamS scheduler pre-training)."""
    if getattr(config, "sams_pretrain", "none") != "none":
        return SamsPolicy(config, pretraining=True, load_backbone=load_backbone)
    return method_spec(config.method).build(config, load_backbone)
