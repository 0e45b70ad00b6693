"""The noisy-pair audit and data-level selection (Selective DPO): folds, out-of-fold scores of DPO fold models
(``--signal dpo_folds``; the probe, the default signal: tests/test_audit_probe.py), a planted flip, cleaned data,
ranking metrics by hand (scikit-learn's), the flip mixture, the easy-to-hard order, resume."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from adaptdpo.audit.folds import assign_folds, fold_members
from adaptdpo.audit.ranking import auroc, average_precision, precision_at, precision_curve, roc_curve
from adaptdpo.audit.run import AuditError, AuditOptions, run_audit
from adaptdpo.audit.signals import FlipMixture, fit_flip_mixture, validation_loss
from adaptdpo.methods.pair_selection import KeepAll, KeepEasiest, KeepHardest, kept_number, select_pairs

TOPICS = ["apples", "rivers", "trains", "music", "winter", "gardens", "bridges", "stars", "coffee", "forests",
          "cities", "oceans", "books", "horses", "clocks", "lamps", "roads", "clouds", "stones", "birds"]
PLANTED = (7, 29)  # rows whose labels are flipped in the hand-built data


def hand_built_rows() -> list[dict]:
    """40 pairs whose preference is obvious (a kind answer beats a rude one); rows 7 and 29 flipped."""
    rows = []
    for i in range(40):
        topic = TOPICS[i % len(TOPICS)]
        prompt = f"Q: tell me about {topic} {'please' if i >= 20 else 'now'} A:"
        good, bad = f" {topic} are good and kind and lovely", f" {topic} are bad and rude and awful"
        flipped = i in PLANTED
        rows.append({"prompt": prompt, "chosen": bad if flipped else good, "rejected": good if flipped else bad,
                     "score_chosen": 1.0 if flipped else 9.0, "score_rejected": 9.0 if flipped else 1.0,
                     "flipped": flipped})
    return rows


@pytest.fixture(scope="module")
def hand_built(tmp_path_factory):
    """The hand-built data file and a small 'pretrained' reference folder (a tiny GPT-2 saved with a word
    tokenizer: the audit, like a user, starts from a saved model)."""
    from adaptdpo.models.tiny import build_tiny_model, tiny_model_config
    from adaptdpo.tasks.toy.task import train_word_tokenizer

    root = tmp_path_factory.mktemp("audit")
    rows = hand_built_rows()
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tokenizer = train_word_tokenizer([r["prompt"] + r["chosen"] + r["rejected"] for r in rows])
    cfg = tiny_model_config("tiny-gpt2", len(tokenizer), 32, 1, 2, 64, tokenizer.pad_token_id, tokenizer.eos_token_id)
    reference = root / "reference"
    build_tiny_model(cfg, seed=0).save_pretrained(reference)
    tokenizer.save_pretrained(reference)
    return str(data), str(reference), rows


def fold_training_args(reference: str, **overrides: object) -> list[str]:
    settings: dict[str, object] = {
        "model_name_or_path": reference, "max_length": 32, "per_device_train_batch_size": 8,
        "num_train_epochs": 6, "learning_rate": 5e-3, "lr_scheduler_type": "constant", "beta": 0.1,
        "save_strategy": "no", "use_cpu": True, "disable_tqdm": True, "report_to": "none", "logging_steps": 5,
        "dataloader_num_workers": 0, "seed": 0}
    settings.update(overrides)
    return [item for key, value in settings.items() for item in (f"--{key}", str(value))]


def dpo_options(data: str, out: str, **options: object) -> AuditOptions:
    """The audit with DPO fold models (``--signal dpo_folds``), 4 folds."""
    return AuditOptions(data=data, output_dir=out, folds=4, signal="dpo_folds", **options)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def audited(hand_built, tmp_path_factory):
    data, reference, _ = hand_built
    out = str(tmp_path_factory.mktemp("audit-run") / "audit")
    summary = run_audit(dpo_options(data, out, drop_fraction=0.05),
                        fold_training_args(reference))
    records = [json.loads(line) for line in open(os.path.join(out, "audit.jsonl"), encoding="utf-8")]
    return out, summary, records


# ------------------------------------------------------------------------------------------------ folds


def test_fold_assignment_covers_every_pair_exactly_once():
    ids = list(range(3, 50))  # 47 pairs, ids need not start at 0
    assignment = assign_folds(ids, 5, seed=1)
    assert sorted(assignment) == ids
    sizes = [sum(1 for f in assignment.values() if f == k) for k in range(5)]
    assert sorted(sizes) == [9, 9, 9, 10, 10]
    held_all = []
    for k in range(5):
        train, held = fold_members(assignment, k)
        assert not set(train) & set(held) and sorted(train + held) == ids
        held_all += held
    assert sorted(held_all) == ids  # each pair held out exactly once
    assert assign_folds(ids, 5, seed=1) == assignment and assign_folds(ids, 5, seed=2) != assignment
    with pytest.raises(ValueError, match="at least 2"):
        assign_folds(ids, 1)
    with pytest.raises(ValueError, match="cannot be split"):
        assign_folds([1, 2], 3)


# ------------------------------------------------------------------------------------- ranking metrics by hand


def test_ranking_metrics_by_hand():
    scores, bad = [0.9, 0.8, 0.3, 0.1], [True, False, True, False]
    # positive/negative pairs: 0.9>0.8, 0.9>0.1, 0.3<0.8, 0.3>0.1 → 3 of 4
    assert auroc(scores, bad) == pytest.approx(0.75)
    assert auroc([0.5, 0.5], [True, False]) == pytest.approx(0.5)  # a tie counts ½
    assert precision_at(scores, bad, 1) == 1.0 and precision_at(scores, bad, 2) == 0.5
    assert average_precision(scores, bad) == pytest.approx((1 / 1 + 2 / 3) / 2)
    fpr, tpr = roc_curve(scores, bad)
    assert fpr == [0.0, 0.0, 0.5, 0.5, 1.0] and tpr == [0.0, 0.5, 0.5, 1.0, 1.0]
    flagged, precision = precision_curve(scores, bad)
    assert flagged == [0.25, 0.5, 0.75, 1.0] and precision == pytest.approx([1.0, 0.5, 2 / 3, 0.5])
    with pytest.raises(ValueError):
        auroc([1.0, 2.0], [True, True])


def test_validation_loss_and_flip_posterior_by_hand():
    assert validation_loss(torch.tensor([0.0]))[0].item() == pytest.approx(math.log(2))
    assert validation_loss(torch.tensor([2.0]))[0].item() == pytest.approx(math.log(1 + math.exp(-2)))
    mix = FlipMixture(flip_rate=0.2, mean=1.0, std=0.5, iterations=0)
    m = 0.3
    flip = 0.2 * math.exp(-((m + 1.0) ** 2) / (2 * 0.25))
    clean = 0.8 * math.exp(-((m - 1.0) ** 2) / (2 * 0.25))
    assert mix.flip_probability(torch.tensor([m]))[0].item() == pytest.approx(flip / (flip + clean))
    assert mix.flip_probability(torch.tensor([0.0]))[0].item() == pytest.approx(0.2)  # margin 0: the prior


def test_flip_mixture_recovers_a_planted_rate():
    g = torch.Generator().manual_seed(0)
    n = 4000
    flipped = torch.rand(n, generator=g) < 0.2
    margins = torch.randn(n, generator=g, dtype=torch.float64) * 0.5 + 1.0
    margins[flipped] *= -1
    fit = fit_flip_mixture(margins)
    assert fit.flip_rate == pytest.approx(float(flipped.double().mean()), abs=0.01)
    assert fit.mean == pytest.approx(1.0, abs=0.03) and fit.std == pytest.approx(0.5, abs=0.03)
    assert auroc(fit.flip_probability(margins).tolist(), flipped.tolist()) > 0.99
    mirrored = fit_flip_mixture(-margins)  # labels mostly wrong: the positive-mean component is the clean one
    assert mirrored.mean > 0 and mirrored.flip_rate == pytest.approx(1 - fit.flip_rate, abs=0.01)


# ------------------------------------------------------------------------------------------ the audit, end to end


def test_audit_writes_one_record_per_input_row_with_out_of_fold_scores(audited, hand_built):
    out, summary, records = audited
    _, _, rows = hand_built
    assert [r["row"] for r in records] == list(range(len(rows)))
    assert summary["scored_pairs"] == 40 and summary["folds"] == 4
    with open(os.path.join(out, "folds.json"), encoding="utf-8") as fh:
        assignment = {int(k): v for k, v in json.load(fh)["assignment"].items()}
    key = lambda r: (r["prompt"], r["chosen"], r["rejected"])  # noqa: E731
    for fold in range(4):
        with open(os.path.join(out, "folds", f"fold-{fold}-train.jsonl"), encoding="utf-8") as fh:
            trained_on = {key(json.loads(line)) for line in fh}
        scored_here = [r["row"] for r in records if r["fold"] == fold]
        assert scored_here == [i for i, f in sorted(assignment.items()) if f == fold]
        # a pair is never scored by a model that trained on it, and each fold model trained on all other pairs
        assert not trained_on & {key(rows[i]) for i in scored_here}
        assert trained_on == {key(rows[i]) for i in range(40) if assignment[i] != fold}
        with open(os.path.join(out, f"fold-{fold}", "config.yaml"), encoding="utf-8") as fh:
            assert "fold-" + str(fold) + "-train.jsonl" in fh.read()


def test_planted_flipped_pairs_rank_at_the_top(audited):
    out, summary, records = audited
    ranks = {r["row"]: r["suspect_rank"] for r in records}
    assert sorted(ranks[i] for i in PLANTED) == [1, 2]
    by_margin = sorted(records, key=lambda r: r["margin"])
    assert {r["row"] for r in by_margin[:2]} == set(PLANTED)
    assert [r["score"] for r in by_margin] == sorted((r["score"] for r in records), reverse=True)  # monotone
    for r in records:
        assert r["validation_loss"] == pytest.approx(math.log1p(math.exp(-r["margin"])), rel=1e-6)
        assert r["known_bad"] == (r["row"] in PLANTED)
    gt = summary["ground_truth"]
    assert gt["auroc"] == 1.0 and gt["precision_at_flip_rate"] == 1.0 and gt["known_bad_pairs"] == 2
    assert os.path.isfile(os.path.join(out, "report.md"))
    assert os.path.isfile(os.path.join(out, "plots", "audit_roc_precision.png"))
    text = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    assert "| 1 | 7 |" in text or "| 1 | 29 |" in text
    # Hölder-DPO's contamination estimate of the same held-out margins, beside the mixture fit's
    from adaptdpo.methods.losses import HOLDER_GAMMA, holder_contamination

    margins = torch.tensor([r["margin"] for r in records if "margin" in r], dtype=torch.float64)
    assert summary["holder_flip_rate"] == pytest.approx(float(holder_contamination(margins, HOLDER_GAMMA)), abs=1e-9)
    assert 0.0 <= summary["holder_flip_rate"] <= 1.0 and "Hölder-DPO's 1 − ξ̂" in text


def test_cleaned_data_keeps_row_identities(audited, hand_built):
    out, summary, records = audited
    _, _, rows = hand_built
    cleaned = [json.loads(line) for line in open(os.path.join(out, "cleaned.jsonl"), encoding="utf-8")]
    dropped = {r["row"] for r in records if r["action"] == "drop"}
    assert dropped == set(PLANTED)  # drop_fraction 0.05 of 40 pairs: the 2 top suspects
    assert [r["audit_row"] for r in cleaned] == [i for i in range(40) if i not in dropped]
    for r in cleaned:
        original = rows[r["audit_row"]]
        assert {k: v for k, v in r.items() if k != "audit_row"} == original
    assert summary["cleaned_counts"] == {"kept": 38, "swapped": 0, "dropped": 2, "weighted": 0, "unscored": 0}


def test_swap_mode_swaps_chosen_rejected_and_their_fields(audited, hand_built):
    data, reference, rows = hand_built
    out, _, _ = audited
    summary = run_audit(dpo_options(data, out, clean="swap", swap_threshold=0.5),
                        fold_training_args(reference))  # reuses every fold model (nothing retrained)
    cleaned = {r["audit_row"]: r for r in map(json.loads, open(os.path.join(out, "cleaned.jsonl"), encoding="utf-8"))}
    assert len(cleaned) == 40 and summary["cleaned_counts"]["swapped"] == 2
    for i in PLANTED:
        assert cleaned[i]["chosen"] == rows[i]["rejected"] and cleaned[i]["rejected"] == rows[i]["chosen"]
        assert (cleaned[i]["score_chosen"], cleaned[i]["score_rejected"]) == (9.0, 1.0)
        assert cleaned[i]["audit_action"] == "swapped"


def test_audit_resumes_without_retraining_and_refuses_changed_settings(audited, hand_built):
    data, reference, _ = hand_built
    out, _, records = audited
    final = os.path.join(out, "fold-0", "model.safetensors")
    before = os.path.getmtime(final)
    os.remove(os.path.join(out, "fold-3", "heldout_scores.json"))  # as if killed while scoring fold 3
    run_audit(dpo_options(data, out, drop_fraction=0.05), fold_training_args(reference))
    again = [json.loads(line) for line in open(os.path.join(out, "audit.jsonl"), encoding="utf-8")]
    assert os.path.getmtime(final) == before
    assert [(r["row"], r["fold"]) for r in again] == [(r["row"], r["fold"]) for r in records]
    assert [r["margin"] for r in again] == pytest.approx([r["margin"] for r in records], abs=1e-9)
    with pytest.raises(AuditError, match=r"training\.beta"):
        run_audit(dpo_options(data, out), fold_training_args(reference, beta=0.3))
    with pytest.raises(AuditError, match="fold_seed"):
        run_audit(dpo_options(data, out, fold_seed=5), fold_training_args(reference))


def test_signals_from_a_training_run(audited, hand_built, tmp_path):
    from helpers import train_in_process

    data, reference, rows = hand_built
    out, _, _ = audited
    run_dir = str(tmp_path / "dpo-run")
    train_in_process([*fold_training_args(reference, num_train_epochs=2, per_device_train_batch_size=4),
                      "--train_file", data, "--output_dir", run_dir, "--trace_pairs", "true"])
    run_audit(dpo_options(data, out, drop_fraction=0.05, from_run=run_dir),
              fold_training_args(reference))
    records = {r["row"]: r for r in map(json.loads, open(os.path.join(out, "audit.jsonl"), encoding="utf-8"))}
    trace = [json.loads(line) for line in open(os.path.join(run_dir, "pairs.jsonl"), encoding="utf-8")]
    margins_of_7 = [m for t in trace for pid, m in zip(t["pair_id"], t["margin"], strict=True) if pid == 7]
    assert len(margins_of_7) == 2  # two epochs
    assert records[7]["run_margin_mean"] == pytest.approx(sum(margins_of_7) / 2, abs=1e-6)
    assert records[7]["run_trained_fraction"] == 1.0 and "run_margin_z" in records[7]
    copy = tmp_path / "copy.jsonl"
    copy.write_text("".join(json.dumps(r) + "\n" for r in rows[:39]), encoding="utf-8")
    other_run = str(tmp_path / "other-run")
    train_in_process([*fold_training_args(reference, num_train_epochs=1), "--train_file", str(copy),
                      "--output_dir", other_run])
    with pytest.raises(AuditError, match="not on the audited data"):
        run_audit(dpo_options(data, out, from_run=other_run), fold_training_args(reference))


def test_audit_errors_name_the_problem(hand_built, tmp_path):
    data, reference, _ = hand_built
    with pytest.raises(AuditError, match="tiny preset"):
        run_audit(AuditOptions(data=data, output_dir=str(tmp_path / "a")), fold_training_args("tiny-llama"))
    with pytest.raises(AuditError, match="--folds"):
        AuditOptions(data=data, output_dir=str(tmp_path / "b"), folds=1)
    with pytest.raises(AuditError, match="no such file"):
        run_audit(AuditOptions(data=str(tmp_path / "missing.jsonl"), output_dir=str(tmp_path / "c")),
                  fold_training_args(reference))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    from adaptdpo.data.readers import DataValidationError

    with pytest.raises(DataValidationError, match=r"bad.jsonl.*row 1.*rejected"):
        run_audit(AuditOptions(data=str(bad), output_dir=str(tmp_path / "d")), fold_training_args(reference))


# ------------------------------------------------------------------------------------- selection and Selective DPO


def test_selection_policies_by_hand():
    difficulty = {10: 0.9, 11: 0.1, 12: 0.5, 13: 0.1, 14: 2.0, 15: 0.3}
    ids = list(difficulty)
    assert kept_number(6, 0.5) == 3 and kept_number(3, 0.1) == 1 and kept_number(0, 0.5) == 0
    easiest = select_pairs(ids, difficulty, KeepEasiest(0.5), "easy_to_hard")
    assert easiest.kept == [11, 13, 15] and easiest.dropped == [10, 12, 14]  # tie 0.1: lower row id first
    hardest = select_pairs(ids, difficulty, KeepHardest(0.5), "hard_to_easy")
    assert hardest.kept == [14, 10, 12]
    assert select_pairs(ids, difficulty, KeepAll(), "easy_to_hard").kept == [11, 13, 15, 12, 10, 14]
    assert select_pairs(ids, difficulty, KeepAll(), "shuffled").kept == ids
    with pytest.raises(ValueError, match="no finite difficulty"):
        select_pairs([*ids, 99], difficulty, KeepAll())


def test_selective_dpo_trains_the_easiest_half_easy_to_hard(audited, hand_built, tmp_path):
    from helpers import train_in_process

    data, reference, _ = hand_built
    out, _, records = audited
    scores = os.path.join(out, "audit.jsonl")
    run_dir = str(tmp_path / "selective")
    common = [*fold_training_args(reference, num_train_epochs=1, per_device_train_batch_size=4),
              "--train_file", data, "--pair_selection", "easiest", "--pair_scores_file", scores,
              "--trace_pairs", "true"]
    summary = train_in_process([*common, "--output_dir", run_dir])
    difficulty = {r["row"]: r["validation_loss"] for r in records}
    expected = sorted(difficulty, key=lambda i: (difficulty[i], i))[:20]
    seen = [pid for line in open(os.path.join(run_dir, "pairs.jsonl"), encoding="utf-8")
            for pid in json.loads(line)["pair_id"]]
    assert seen == expected  # the easiest half, in ascending validation loss
    assert [difficulty[i] for i in seen] == sorted(difficulty[i] for i in seen)
    assert not set(seen) & set(PLANTED)  # the planted flips are the hardest pairs: dropped
    with open(os.path.join(run_dir, "pair_selection.json"), encoding="utf-8") as fh:
        selection = json.load(fh)
    assert selection["kept"] == expected and sorted(selection["dropped"]) == sorted(set(range(40)) - set(expected))
    assert summary["data"]["pair_selection"] == {"kept": 20, "dropped": 20, "order": "easy_to_hard"}

    # with SamS (the SamS paper's Table 3 combination): SamS picks within the kept pairs only
    sams_dir = str(tmp_path / "selective-sams")
    train_in_process([*common, "--output_dir", sams_dir, "--method", "sams", "--sams_ratio", "0.5",
                      "--sams_warmup_rounds", "1"])
    trained = [pid for line in open(os.path.join(sams_dir, "pairs.jsonl"), encoding="utf-8")
               for pid, t in zip(json.loads(line)["pair_id"], json.loads(line)["trained"], strict=True) if t]
    assert trained and set(trained) <= set(expected) and len(trained) == 10  # half of each batch of 4 × 5 batches


def test_pair_scores_must_come_from_the_same_file(audited, hand_built, tmp_path):
    from adaptdpo.training.config_io import parse_config
    from adaptdpo.training.job import run_training

    _, reference, rows = hand_built
    out, _, _ = audited
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(r) + "\n" for r in rows[::-1]), encoding="utf-8")
    argv = [*fold_training_args(reference), "--train_file", str(other), "--output_dir", str(tmp_path / "r"),
            "--pair_selection", "easiest", "--pair_scores_file", os.path.join(out, "audit.jsonl")]
    with pytest.raises(ValueError, match=r"pair_scores_file.*differ"):
        run_training(parse_config(argv))
    with pytest.raises(ValueError, match="need pair_scores_file"):
        parse_config([*fold_training_args(reference), "--pair_selection", "hardest"])


def test_audit_command_line(hand_built, tmp_path, capsys):
    from adaptdpo.cli import main

    data, reference, _ = hand_built
    out = str(tmp_path / "cli-audit")
    code = main(["audit", data, "--folds", "2", "--output_dir", out, "--clean", "none",
                 *fold_training_args(reference, num_train_epochs=1)])
    out_text = capsys.readouterr().out  # the trainer's log lines first, then the audit's summary
    printed = json.loads(out_text[out_text.index('{\n  "audit_dir"'):])
    assert code == 0 and printed["scored_pairs"] == 40 and printed["cleaned_counts"]["kept"] == 40
    assert main(["audit", data, "--fold", "2"]) == 1  # no prefix matching: an unknown flag, refused
    assert "unknown argument" in capsys.readouterr().err


def test_probe_and_dpo_folds_combined_reuse_the_fold_models(audited, hand_built):
    data, reference, _ = hand_built
    out, _, records = audited
    final = os.path.join(out, "fold-0", "model.safetensors")
    before = os.path.getmtime(final)
    summary = run_audit(AuditOptions(data=data, output_dir=out, folds=4, drop_fraction=0.05,
                                     signal="probe+dpo_folds", bootstrap=20),
                        fold_training_args(reference))
    assert os.path.getmtime(final) == before  # the fold models were reused, not trained again
    combined = {r["row"]: r for r in map(json.loads, open(os.path.join(out, "audit.jsonl"), encoding="utf-8"))}
    assert summary["signal"] == "probe+dpo_folds" and summary["probe+dpo_folds"]["members"]
    assert set(summary["probe+dpo_folds"]["candidates"]) == {"probe", "dpo_folds"}
    for r in records:
        assert combined[r["row"]]["dpo_fold_margin"] == pytest.approx(r["margin"], abs=1e-9)
        assert combined[r["row"]]["fold"] == r["fold"]
    assert summary["ground_truth"]["auroc"] == 1.0
