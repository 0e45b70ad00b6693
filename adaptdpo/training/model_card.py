"""The model card (README.md) written beside the final model: what was trained, how, on what, with which result,
and what to cite. Hub metadata (``library_name``, ``base_model``, ``tags``, ``datasets``) in the YAML header."""

from __future__ import annotations

import os
from typing import Any

from adaptdpo.methods.registry import method_spec

CITATIONS = {
    "dpo": ("DPO", """@inproceedings{rafailov2023direct,
  title     = {Direct Preference Optimization: Your Language Model is Secretly a Reward Model},
  author    = {Rafael Rafailov and Archit Sharma and Eric Mitchell and Christopher D. Manning and
               Stefano Ermon and Chelsea Finn},
  booktitle = {Advances in Neural Information Processing Systems 36},
  year      = {2023}
}"""),
    "beta_dpo": ("β-DPO", """@inproceedings{wu2024beta,
  title     = {$\\beta$-DPO: Direct Preference Optimization with Dynamic $\\beta$},
  author    = {Junkang Wu and Yuexiang Xie and Zhengyi Yang and Jiancan Wu and Jinyang Gao and Bolin Ding and
               Xiang Wang and Xiangnan He},
  booktitle = {Advances in Neural Information Processing Systems 37},
  year      = {2024},
  note      = {arXiv:2407.08639}
}"""),
    "sams": ("SamS", """@inproceedings{huang2025adaptive,
  title     = {Adaptive Batch-Wise Sample Scheduling for Direct Preference Optimization},
  author    = {Zixuan Huang and Yikun Ban and Lean Fu and Xiaojie Li and Zhongxiang Dai and Jianxin Li and
               Deqing Wang},
  booktitle = {Advances in Neural Information Processing Systems 38},
  year      = {2025},
  note      = {arXiv:2506.17252}
}"""),
    "selective_dpo": ("Selective DPO", """@inproceedings{gao2025principled,
  title     = {Principled Data Selection for Alignment: The Hidden Risks of Difficult Examples},
  author    = {Chengqian Gao and Haonan Li and Liu Liu and Zeke Xie and Peilin Zhao and Zhiqiang Xu},
  booktitle = {Proceedings of the 42nd International Conference on Machine Learning},
  year      = {2025},
  note      = {arXiv:2502.09650}
}"""),
    "epsilon_dpo": ("ε-DPO", """@inproceedings{lee2025kl,
  title     = {KL Penalty Control via Perturbation for Direct Preference Optimization},
  author    = {Sangkyu Lee and Janghoon Han and Hosung Song and Stanley Jungkyu Choi and Honglak Lee and
               Youngjae Yu},
  booktitle = {Advances in Neural Information Processing Systems 38},
  year      = {2025},
  note      = {arXiv:2502.13177}
}"""),
    "cdpo": ("conservative DPO (cDPO)", """@misc{mitchell2023note,
  title     = {A Note on DPO with Noisy Preferences and Relationship to IPO},
  author    = {Eric Mitchell},
  year      = {2023},
  note      = {https://ericmitchell.ai/cdpo.pdf}
}"""),
    "rdpo": ("robust DPO (rDPO)", """@inproceedings{chowdhury2024provably,
  title     = {Provably Robust {DPO}: Aligning Language Models with Noisy Feedback},
  author    = {Sayak Ray Chowdhury and Anush Kini and Nagarajan Natarajan},
  booktitle = {Proceedings of the 41st International Conference on Machine Learning},
  year      = {2024},
  note      = {arXiv:2403.00409}
}"""),
    "holder_dpo": ("Hölder-DPO", """@inproceedings{fujisawa2025scalable,
  title     = {Scalable Valuation of Human Feedback through Provably Robust Model Alignment},
  author    = {Masahiro Fujisawa and Masaki Adachi and Michael A. Osborne},
  booktitle = {Advances in Neural Information Processing Systems 38},
  year      = {2025},
  note      = {arXiv:2505.17859}
}"""),
}

#: the loss types with a citation of their own (besides DPO)
LOSS_CITATIONS = {"robust": "rdpo", "holder": "holder_dpo"}


def _settings(config: Any) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = [("method", config.method), ("beta", config.beta),
                                   ("loss_type", ", ".join(config.loss_type))]
    if config.loss_weights:
        rows.append(("loss_weights", ", ".join(str(w) for w in config.loss_weights)))
    if "beta_dpo" in config.method:
        rows += [(k, getattr(config, k)) for k in ("beta_dpo_alpha", "beta_dpo_keep_ratio", "beta_dpo_level",
                                                    "beta_dpo_filter")]
    if "sams" in config.method:
        rows += [(k, getattr(config, k)) for k in ("sams_ratio", "sams_mode", "sams_selection", "sams_preset")]
    if config.method == "epsilon_dpo":
        rows.append(("epsilon_dpo_epsilon", config.epsilon_dpo_epsilon))
    if config.label_smoothing > 0:
        rows.append(("label_smoothing", config.label_smoothing))
    if "holder" in config.loss_type:
        rows.append(("holder_gamma", config.holder_gamma))
    if config.pair_selection != "all":
        rows += [(k, getattr(config, k)) for k in ("pair_selection", "pair_keep_ratio", "pair_scores_field")]
    rows += [(k, getattr(config, k)) for k in ("learning_rate", "num_train_epochs", "max_steps",
                                                "per_device_train_batch_size", "gradient_accumulation_steps",
                                                "max_length", "seed")]
    if config.use_peft:
        rows += [(k, getattr(config, k)) for k in ("lora_r", "lora_alpha")]
    if getattr(config, "trainable_layers", None) is not None:
        rows.append(("trainable_layers", f"{config.trainable_layers} (only the top {config.trainable_layers} blocks "
                     "and the final norm were trained; the embeddings, the blocks below and a tied LM head are the "
                     "base model's)"))
    return rows


def _citations(config: Any) -> list[tuple[str, str]]:
    keys = list(method_spec(config.method).citations)
    keys += [LOSS_CITATIONS[t] for t in config.loss_type if t in LOSS_CITATIONS]
    if "sigmoid" in config.loss_type and config.label_smoothing > 0 and config.sigmoid_label_smoothing == "cdpo":
        keys.append("cdpo")
    if config.pair_selection == "easiest":
        keys.append("selective_dpo")
    return [CITATIONS[k] for k in keys]


def model_card(config: Any, summary: dict[str, Any] | None = None, model_name: str | None = None) -> str:
    base = config.model_name_or_path
    data = config.dataset_name or config.train_file
    name = model_name or os.path.basename(os.path.abspath(config.output_dir))
    spec = method_spec(config.method)
    tags = ["adaptdpo", "dpo", "preference-optimization", *spec.card_tags]
    header = ["---", "library_name: transformers"]
    if base and not str(base).startswith("tiny-"):
        header.append(f"base_model: {base}")
    header += ["tags:", *[f"- {t}" for t in tags]]
    if data and not os.path.exists(str(data)):  # a hub dataset name (local paths mean nothing on the hub)
        header += ["datasets:", f"- {data}"]
    header.append("---")
    method = spec.display_name
    lines = [*header, "", f"# {name}", "",
             f"This model was trained with [adaptdpo](https://pypi.org/project/adaptdpo/) ({method}, loss "
             f"{', '.join(config.loss_type)}) from `{base}` on `{data}`.", "",
             "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
             f'model = AutoModelForCausalLM.from_pretrained("{name}")',
             f'tokenizer = AutoTokenizer.from_pretrained("{name}")', "```", "",
             "## Training", "", "| setting | value |", "|---|---|",
             *[f"| `{k}` | {v} |" for k, v in _settings(config)]]
    if summary:
        data_counts = summary.get("data", {})
        if data_counts:
            lines += ["", f"Training pairs: {data_counts.get('train_pairs')}; evaluation pairs: "
                          f"{data_counts.get('eval_pairs')}; steps: {summary.get('global_step')}."]
        final = {k: v for k, v in (summary.get("final_metrics") or {}).items() if isinstance(v, (int, float))}
        evaluation = {k: v for k, v in (summary.get("final_eval") or {}).items() if isinstance(v, (int, float))}
        if final or evaluation:
            lines += ["", "## Results", "", "| metric | value |", "|---|---|",
                      *[f"| `{k}` | {v:.4g} |" for k, v in {**final, **evaluation}.items()]]
    lines += ["", "## Citations", ""]
    for title, bibtex in _citations(config):
        lines += [f"{title}:", "", "```bibtex", bibtex, "```", ""]
    return "\n".join(lines)


def write_model_card(folder: str, config: Any, summary: dict[str, Any] | None = None,
                     model_name: str | None = None) -> str:
    path = os.path.join(folder, "README.md")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(model_card(config, summary, model_name))
    return path
