"""The audit's reward probe (issue 26): planted structure, cross-fitting by construction, the flip-rate estimate,
the safeguards, bad input; and the probe audit end to end on the hand-built data (a tiny reference, no download)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from test_audit import PLANTED, fold_training_args, hand_built  # noqa: F401  (hand_built: a fixture)

from adaptdpo.audit.features import FeatureError, parse_layers, parse_poolings, pool, resolve_layers, token_bag
from adaptdpo.audit.probe import ProbeError, calibrated, check_inputs, cross_fitted_margins, select_ensemble
from adaptdpo.audit.ranking import auroc
from adaptdpo.audit.run import AuditError, AuditOptions, agreement, decide_actions, run_audit, safety_warnings
from adaptdpo.audit.signals import FlipRateEstimate, estimate_flip_rate


def planted_pairs(n: int, dim: int, rate: float, seed: int, carries_reward: bool = True
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(feature differences as labelled, fold numbers, flipped) for n pairs whose true reward is linear in the
    features (r = w·f, every pair's |gap| at least 0.3·|w|·|d|) or, with ``carries_reward`` False, independent
    of them; a share ``rate`` of the labels flipped (the difference negated)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=dim)
    rows = []
    while len(rows) < n:
        d = rng.normal(size=dim)
        gap = float(w @ d)
        if abs(gap) >= 0.3 * np.linalg.norm(w) * np.linalg.norm(d):
            rows.append(d if gap > 0 else -d)  # oriented: the chosen has the higher reward
    diffs = np.array(rows)
    if not carries_reward:
        diffs = rng.normal(size=(n, dim))
    flipped = rng.random(n) < rate
    diffs[flipped] *= -1
    folds = np.arange(n) % 5
    rng.shuffle(folds)
    return diffs, folds, flipped


def test_probe_on_features_that_carry_the_reward_finds_every_flip():
    diffs, folds, flipped = planted_pairs(400, 6, 0.2, seed=0)
    fit = cross_fitted_margins(diffs, folds)
    assert flipped.sum() == 86  # the planted flips (seeded)
    assert auroc(-fit.margins, flipped) == 1.0  # every flipped pair below every clean one
    assert (fit.margins[flipped] < 0).all() and (fit.margins[~flipped] > 0).all()
    assert all(m.C in np.logspace(-4, 4, 9) for m in fit.models.values())  # chosen on the grid by inner CV


def test_probe_on_features_that_carry_nothing_is_at_chance():
    diffs, folds, flipped = planted_pairs(400, 6, 0.2, seed=1, carries_reward=False)
    fit = cross_fitted_margins(diffs, folds)
    value = auroc(-fit.margins, flipped)
    assert abs(value - 0.5) < 0.08, value
    accuracy, p_value = agreement(torch.tensor(fit.margins))
    assert abs(accuracy - 0.5) < 0.08 and p_value > 0.01
    estimate = estimate_flip_rate(torch.tensor(fit.margins), bootstrap=20)
    warnings = safety_warnings("probe", accuracy, p_value, estimate)
    assert warnings and "at chance" in warnings[0]


def test_cross_fitting_never_scores_a_pair_with_a_probe_that_saw_it():
    diffs, folds, _ = planted_pairs(120, 4, 0.2, seed=2)
    fit = cross_fitted_margins(diffs, folds)
    held_all = []
    for k, model in fit.models.items():
        assert not set(model.train_index) & set(model.held_index)
        assert set(model.held_index) == set(np.flatnonzero(folds == k))
        assert set(model.train_index) == set(np.flatnonzero(folds != k))
        held_all += list(model.held_index)
    assert sorted(held_all) == list(range(120))
    # by construction: flip pair 0's label; no other margin of its fold moves (its probe never saw pair 0), its own
    # margin is negated exactly, and the other folds' probes (which trained on it) change
    changed = diffs.copy()
    changed[0] *= -1
    again = cross_fitted_margins(changed, folds)
    same_fold = np.flatnonzero(folds == folds[0])
    assert again.margins[0] == pytest.approx(-fit.margins[0], abs=1e-12)
    assert np.array_equal(again.margins[same_fold[1:]], fit.margins[same_fold[1:]])
    others = np.flatnonzero(folds != folds[0])
    assert not np.allclose(again.margins[others], fit.margins[others], atol=1e-9, rtol=0)


@pytest.mark.parametrize("rate", [0.1, 0.2, 0.3])
def test_flip_rate_estimate_covers_the_planted_rate(rate):
    diffs, folds, flipped = planted_pairs(600, 6, rate, seed=3)
    fit = cross_fitted_margins(diffs, folds)
    estimate = estimate_flip_rate(torch.tensor(fit.margins), bootstrap=100, seed=0)
    low, high = estimate.interval
    assert low <= flipped.mean() <= high, (estimate, flipped.mean())
    assert abs(estimate.flip_rate - flipped.mean()) < 0.05
    assert estimate.flip_count == round(estimate.flip_rate * 600)


def test_flip_rate_on_clean_labels_is_near_zero_and_posterior_by_hand():
    diffs, folds, _ = planted_pairs(400, 6, 0.0, seed=4)
    estimate = estimate_flip_rate(torch.tensor(cross_fitted_margins(diffs, folds).margins), bootstrap=50)
    assert estimate.flip_rate < 0.01 and estimate.interval[1] < 0.02 and estimate.flip_count <= 2
    by_hand = FlipRateEstimate(0.2, 1.5, (0.1, 0.3), 10, 0.0)
    m = 0.4
    flip, clean = 0.2 / (1 + math.exp(1.5 * m)), 0.8 / (1 + math.exp(-1.5 * m))
    assert by_hand.flip_probability(torch.tensor([m]))[0].item() == pytest.approx(flip / (flip + clean))
    assert by_hand.flip_probability(torch.tensor([0.0]))[0].item() == pytest.approx(0.2)  # margin 0: the prior


def test_calibration_and_ensemble_selection_by_likelihood():
    diffs, folds, _ = planted_pairs(300, 6, 0.2, seed=5)
    good = cross_fitted_margins(diffs, folds).margins
    noise = np.random.default_rng(0).normal(size=300)
    scaled, a, ll = calibrated(3.0 * good)
    assert a > 0 and scaled == pytest.approx(a * 3.0 * good)
    assert calibrated(good)[2] == pytest.approx(ll)  # the temperature absorbs any scale
    ensemble = select_ensemble({"noise": noise, "good": good})
    assert ensemble.members == ["good"]  # the noise does not raise the held-out likelihood
    assert ensemble.candidates["good"] > ensemble.candidates["noise"]


def test_bad_probe_input_is_refused_before_any_fit():
    diffs = np.ones((3, 2))
    with pytest.raises(ProbeError, match="one way"):
        check_inputs(diffs, np.array([0, 1, 0]), np.ones(3, dtype=bool), mirror=False)
    with pytest.raises(ProbeError, match="NaN"):
        check_inputs(np.array([[1.0, np.nan], [1.0, 2.0]]), np.array([0, 1]))
    with pytest.raises(ProbeError, match="at least 2 folds"):
        cross_fitted_margins(np.ones((4, 2)), np.zeros(4))
    with pytest.raises(FeatureError, match="layer 5 does not exist"):
        resolve_layers([5], 4)
    with pytest.raises(FeatureError, match="layer -6 does not exist"):
        resolve_layers([-6], 4)
    with pytest.raises(FeatureError, match="comma-separated"):
        parse_layers("8,x")
    with pytest.raises(FeatureError, match="choose from"):
        parse_poolings("max")


def test_pooling_and_layers_by_hand():
    hidden = torch.arange(16, dtype=torch.float32).reshape(2, 4, 2)
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]])
    assert pool(hidden, mask, "mean")[:, 0].tolist() == [3.0, 13.0]  # positions 1, 2 / 2, 3 (feature 0)
    assert pool(hidden, mask, "last")[:, 0].tolist() == [4.0, 14.0]
    assert resolve_layers("auto", 30) == [0, 8, 15, 30] and resolve_layers("auto", 2) == [0, 1, 2]
    assert resolve_layers([0, -1, 2, 2], 4) == [0, 2, 4]


def test_token_bag_by_hand():
    """Completions {5,5,7}, {7,9} | {9,3}, {5}: tokens 5, 7 and 9 are in two completions each, 3 in one (dropped);
    rows are frequencies (counts / length), columns by frequency then id."""
    examples = [{"chosen_ids": [5, 5, 7], "rejected_ids": [7, 9]}, {"chosen_ids": [9, 3], "rejected_ids": [5]}]
    chosen, rejected, vocabulary = token_bag(examples)
    assert vocabulary == [5, 7, 9]
    torch.testing.assert_close(chosen, torch.tensor([[2 / 3, 1 / 3, 0.0], [0.0, 0.0, 0.5]]))
    torch.testing.assert_close(rejected, torch.tensor([[0.0, 0.5, 0.5], [1.0, 0.0, 0.0]]))
    assert token_bag(examples, max_tokens=2)[2] == [5, 7]
    assert token_bag(examples, min_count=3)[2] == []
    with pytest.raises(FeatureError, match="positive"):
        token_bag(examples, min_count=0)


def test_a_probe_on_the_token_bag_finds_the_flips_of_a_per_token_reward():
    """A reward that is the mean of per-token scores is linear in the token frequencies: the cross-fitted probe on
    the bag ranks the planted flips (15%, pairs with a clear gap) near perfectly."""
    rng = np.random.default_rng(0)
    score = rng.normal(size=30)
    examples, flipped = [], []
    while len(examples) < 400:
        a, b = rng.integers(0, 30, size=8).tolist(), rng.integers(0, 30, size=8).tolist()
        gap = score[a].mean() - score[b].mean()
        if abs(gap) < 0.3:
            continue
        chosen, rejected = (a, b) if gap > 0 else (b, a)
        flip = rng.random() < 0.15
        examples.append({"chosen_ids": rejected if flip else chosen, "rejected_ids": chosen if flip else rejected})
        flipped.append(flip)
    bag_chosen, bag_rejected, _ = token_bag(examples)
    diffs = (bag_chosen - bag_rejected).double().numpy()
    folds = np.arange(len(examples)) % 5
    margins = cross_fitted_margins(diffs, folds).margins
    assert auroc(-margins, np.array(flipped)) > 0.97


def test_mirrored_twins_share_a_fold():
    from adaptdpo.audit.folds import assign_folds
    from adaptdpo.audit.run import duplicates_and_twins

    rows = {i: {"prompt": f"p{i % 6}", "chosen": f"a{i % 6}", "rejected": f"b{i % 6}"} for i in range(6)}
    rows[6] = {"prompt": "p2", "chosen": "b2", "rejected": "a2"}  # row 2 swapped
    twins = duplicates_and_twins(rows, "d.jsonl")
    assert twins == [[2, 6]]
    for seed in range(5):
        assignment = assign_folds(list(range(7)), 3, seed, twins)
        assert assignment[2] == assignment[6] and sorted(assignment) == list(range(7))
    rows[7] = dict(rows[4])
    with pytest.raises(AuditError, match=r"rows 4 and 7"):
        duplicates_and_twins(rows, "d.jsonl")


def _scored(p_flips: list[float]) -> dict[int, dict]:
    order = sorted(range(len(p_flips)), key=lambda i: -p_flips[i])
    return {i: {"flip_probability": p, "score": p, "suspect_rank": order.index(i) + 1} for i, p in enumerate(p_flips)}


def test_cleaning_never_exceeds_the_estimate_and_stops_after_a_warning():
    scored = _scored([0.9, 0.8, 0.4, 0.3, 0.1, 0.05, 0.02, 0.01, 0.01, 0.0])
    estimate = FlipRateEstimate(0.2, 1.0, (0.1, 0.3), 10, 0.0)  # 2 pairs
    actions, cleaning = decide_actions(AuditOptions(data="x", output_dir="y", drop_fraction=0.5), scored, estimate,
                                       False)
    assert [i for i, a in actions.items() if a == "drop"] == [0, 1] and cleaning["asked"] == 5
    assert "estimated flip count (2)" in cleaning["held_back"]
    forced, _ = decide_actions(AuditOptions(data="x", output_dir="y", drop_fraction=0.5, force=True), scored,
                               estimate, False)
    assert sum(a == "drop" for a in forced.values()) == 5
    warned, cleaning = decide_actions(AuditOptions(data="x", output_dir="y"), scored, estimate, True)
    assert set(warned.values()) == {"keep"} and "warning" in cleaning["held_back"]
    three = FlipRateEstimate(0.3, 1.0, (0.1, 0.4), 10, 0.0)  # relabel swaps only where P(flip) >= 1/2
    relabel, cleaning = decide_actions(AuditOptions(data="x", output_dir="y", clean="relabel"), scored, three, False)
    assert [i for i, a in relabel.items() if a == "swap"] == [0, 1] and "P(flip) < 1/2" in cleaning["held_back"]


# ------------------------------------------------------------------------------------------ the probe audit, end to end


@pytest.fixture(scope="module")
def probe_audited(hand_built, tmp_path_factory):  # noqa: F811
    data, reference, _ = hand_built
    out = str(tmp_path_factory.mktemp("probe-audit") / "audit")
    summary = run_audit(AuditOptions(data=data, output_dir=out, folds=4, bootstrap=50), fold_training_args(reference))
    records = [json.loads(line) for line in open(os.path.join(out, "audit.jsonl"), encoding="utf-8")]
    return out, summary, records


def test_probe_audit_ranks_planted_flips_first_and_drops_only_them(probe_audited, hand_built):  # noqa: F811
    out, summary, records = probe_audited
    _, _, rows = hand_built
    assert summary["signal"] == "probe" and not summary["warnings"]
    assert not os.path.exists(os.path.join(out, "fold-0"))  # no language model trained
    ranks = {r["row"]: r["suspect_rank"] for r in records}
    assert sorted(ranks[i] for i in PLANTED) == [1, 2]
    assert summary["ground_truth"]["auroc"] == 1.0
    assert summary["estimated_flip_count"] == 2 and summary["flip_rate_interval"][0] <= 0.05
    dropped = {r["row"] for r in records if r["action"] == "drop"}
    assert dropped == set(PLANTED)
    for r in records:
        assert r["weight"] == pytest.approx(1 - r["flip_probability"]) and r["score"] == r["flip_probability"]
        assert "reference_logratio" in r and r["validation_loss"] == pytest.approx(math.log1p(math.exp(-r["margin"])))
    assert set(summary["probe"]["candidates"]) == {"L0.mean", "L0.last", "L1.mean", "L1.last", "tokens.mean",
                                                   "reference.per_token_logratio"}
    assert summary["probe"]["features"]["token_bag_vocabulary"] > 0
    cleaned = [json.loads(line) for line in open(os.path.join(out, "cleaned.jsonl"), encoding="utf-8")]
    assert [r["audit_row"] for r in cleaned] == [i for i in range(len(rows)) if i not in dropped]
    report = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    assert "estimated flip rate" in report and "Warnings" not in report
    with open(os.path.join(out, "audit_summary.json"), encoding="utf-8") as fh:
        assert json.load(fh)["audit_jsonl_sha256"] == summary["audit_jsonl_sha256"]


def test_probe_audit_on_clean_data_estimates_near_zero_and_drops_little(hand_built, tmp_path):  # noqa: F811
    _, reference, rows = hand_built
    clean = tmp_path / "clean.jsonl"
    fixed = []
    for i, r in enumerate(rows):
        if i in PLANTED:
            r = {**r, "chosen": r["rejected"], "rejected": r["chosen"], "flipped": False}
        fixed.append(r)
    clean.write_text("".join(json.dumps(r) + "\n" for r in fixed), encoding="utf-8")
    out = str(tmp_path / "audit")
    summary = run_audit(AuditOptions(data=str(clean), output_dir=out, folds=4, bootstrap=50),
                        fold_training_args(reference))
    assert summary["estimated_flip_rate"] < 0.03 and summary["cleaned_counts"]["dropped"] <= 1
    assert not summary["warnings"]


def test_probe_audit_bad_input_errors_before_work(hand_built, tmp_path):  # noqa: F811
    data, reference, rows = hand_built
    with pytest.raises(AuditError, match="layer 7 does not exist"):
        run_audit(AuditOptions(data=data, output_dir=str(tmp_path / "a"), probe_layers="0,7"),
                  fold_training_args(reference))
    assert not os.path.exists(tmp_path / "a" / "features.pt")
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]), encoding="utf-8")
    with pytest.raises(AuditError, match="3 usable pairs cannot be split into 5 folds"):
        run_audit(AuditOptions(data=str(few), output_dir=str(tmp_path / "b")), fold_training_args(reference))
    twice = tmp_path / "twice.jsonl"
    twice.write_text("".join(json.dumps(r) + "\n" for r in [*rows[:10], rows[3]]), encoding="utf-8")
    with pytest.raises(AuditError, match=r"appear more than once \(rows 3 and 10"):
        run_audit(AuditOptions(data=str(twice), output_dir=str(tmp_path / "c"), folds=2),
                  fold_training_args(reference))
    with pytest.raises(AuditError, match="--signal"):
        AuditOptions(data=data, output_dir="x", signal="oracle")


def test_probe_audit_resumes_from_its_features_and_never_mixes_reports(probe_audited, hand_built,  # noqa: F811
                                                                        tmp_path):
    import shutil

    from adaptdpo.data.pair_scores import read_pair_scores

    data, reference, _ = hand_built
    out, summary, _ = probe_audited
    copy = str(tmp_path / "audit")
    shutil.copytree(out, copy)
    features = os.path.join(copy, "features.pt")
    before = os.path.getmtime(features)
    again = run_audit(AuditOptions(data=data, output_dir=copy, folds=4, bootstrap=50, clean="relabel"),
                      fold_training_args(reference))
    assert os.path.getmtime(features) == before  # the forward pass was not run again
    assert again["estimated_flip_rate"] == pytest.approx(summary["estimated_flip_rate"])
    assert again["cleaned_counts"]["swapped"] == 2 and again["cleaned_counts"]["dropped"] == 0
    assert read_pair_scores(os.path.join(copy, "audit.jsonl"), "validation_loss", data)
    with open(os.path.join(copy, "audit.jsonl"), "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"row": 99, "validation_loss": 1.0}) + "\n")  # as if another audit had written it
    with pytest.raises(ValueError, match=r"not the audit\.jsonl"):
        read_pair_scores(os.path.join(copy, "audit.jsonl"), "validation_loss", data)


def test_an_estimate_above_one_half_is_a_warning():
    inverted = FlipRateEstimate(0.8, 1.0, (0.7, 0.9), 100, 0.0)
    warnings = safety_warnings("dpo_folds", 0.9, 1e-9, inverted)
    assert len(warnings) == 1 and "above one half" in warnings[0] and "inverted" in warnings[0]
    assert safety_warnings("probe", 0.9, 1e-9, FlipRateEstimate(0.1, 1.0, (0.05, 0.15), 100, 0.0)) == []


def test_probe_audit_command_line(hand_built, tmp_path, capsys):  # noqa: F811
    from adaptdpo.cli import main

    data, reference, _ = hand_built
    out = str(tmp_path / "cli-probe")
    args = ["audit", data, "--folds", "4", "--output_dir", out, "--bootstrap", "20", "--probe_layers", "0,-1",
            "--probe_poolings", "mean", "--probe_token_bag", "false", "--clean", "relabel",
            *fold_training_args(reference)]
    assert main(args) == 0
    text = capsys.readouterr().out
    printed = json.loads(text[text.index('{\n  "audit_dir"'):])
    assert printed["signal"] == "probe" and printed["estimated_flip_count"] == 2 and printed["warnings"] == []
    assert printed["cleaned_counts"]["swapped"] == 2 and printed["ground_truth"]["auroc"] == 1.0
    with open(os.path.join(out, "audit_summary.json"), encoding="utf-8") as fh:
        summary = json.load(fh)
    assert set(summary["probe"]["candidates"]) == {"L0.mean", "L1.mean", "reference.per_token_logratio"}
    assert main(["audit", data, "--output_dir", str(tmp_path / "bad"), "--probe_layers", "0,9",
                 *fold_training_args(reference)]) == 1
    assert "layer 9 does not exist" in capsys.readouterr().err


def test_anchor_reading_by_hand_and_the_note_where_the_estimate_is_not_identified():
    from adaptdpo.audit.run import identification_note
    from adaptdpo.audit.signals import anchor_flip_rate

    m = torch.tensor([3.0, -2.5, 2.0, 1.0, -0.5, 0.2])
    assert anchor_flip_rate(m, share=0.5, minimum=1, bootstrap=0) == (pytest.approx(1 / 3), (1 / 3, 1 / 3))
    assert anchor_flip_rate(torch.tensor([0.0, 4.0]), share=1.0, minimum=1, bootstrap=0)[0] == 0.25  # a tie: ½
    assert anchor_flip_rate(m, share=0.01, minimum=30, bootstrap=0)[0] == pytest.approx(2 / 6)  # all 6 when < 30
    # a weak, flat signal: the logistic estimate falls to 0 with a wide interval; the note gives the anchor reading
    wide = FlipRateEstimate(0.0, 1.0, (0.0, 0.26), 1024, 0.0)
    note = identification_note(wide, 0.225)
    assert note is not None and "0.0%-26.0%" in note and "22.5%" in note and "--force" in note
    assert identification_note(FlipRateEstimate(0.2, 3.0, (0.15, 0.25), 1024, 0.0), 0.21) is None
