"""Per-pair loss weights and β from the data (weight_column, beta_column): every format, every bad value, the exact
weighted loss for every loss type, β per pair, and the normalisation under accumulation, SamS and 2 processes."""

import csv
import json
import math
import sys

import pytest
import torch
from helpers import base_argv, final_params, loss_and_grads, make_trainer, run_cli, train_in_process, train_logs

from adaptdpo.data.collate import PreferenceCollator
from adaptdpo.data.readers import DataValidationError
from adaptdpo.data.rows import load_preference_rows
from adaptdpo.methods.losses import LOSS_TYPES, preference_loss
from adaptdpo.models.sequence_logps import sequence_logps

ROWS = [{"prompt": "p0", "chosen": "good", "rejected": "bad", "w": 0.5, "b": 0.2},
        {"prompt": "p1", "chosen": "fine", "rejected": "poor", "w": 0.0, "b": 0.05},
        {"prompt": "p2", "chosen": "yes", "rejected": "no", "w": 2, "b": 1}]


def write(path, rows, fmt):
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "csv":
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), str(path))
    elif fmt == "dataset":
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return str(path)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet", "dataset"])
def test_every_format_reads_the_columns(tmp_path, fmt):
    source = write(tmp_path / f"pairs.{fmt if fmt != 'dataset' else 'd'}", ROWS, fmt)
    rows, _ = load_preference_rows(source, weight_column="w", beta_column="b")
    assert [r["weight"] for r in rows] == [0.5, 0.0, 2.0]  # CSV cells are text: read as numbers
    assert [r["beta"] for r in rows] == [0.2, 0.05, 1.0]
    plain, _ = load_preference_rows(source)
    assert "weight" not in plain[0] and "beta" not in plain[0]  # unnamed columns are not read


BAD = [("w", "abc", r"row 1 .*field 'w': expected a loss weight \(weight_column\), a number, got 'abc'"),
       ("w", -0.5, r"row 1 .*field 'w': a loss weight \(weight_column\) must be >= 0, got -0.5"),
       ("w", float("nan"), r"row 1 .*field 'w': a loss weight \(weight_column\) must be finite, got nan"),
       ("w", float("inf"), r"row 1 .*field 'w': .* must be finite, got inf"),
       ("w", True, r"row 1 .*field 'w': expected a loss weight \(weight_column\), a number, got bool"),
       ("w", None, r"row 1 .*field 'w': missing: a loss weight"),
       ("w", [1], r"row 1 .*field 'w': expected .* got list"),
       ("b", 0, r"row 1 .*field 'b': a per-pair β \(beta_column\) must be > 0, got 0"),
       ("b", -1.0, r"row 1 .*field 'b': .* must be > 0, got -1.0"),
       ("b", "x", r"row 1 .*field 'b': expected a per-pair β \(beta_column\), a number, got 'x'")]


@pytest.mark.parametrize("field,value,message", BAD, ids=[f"{f}={v!r}" for f, v, _ in BAD])
def test_every_bad_value_is_an_error_naming_file_row_and_field_or_a_skipped_row(tmp_path, field, value, message):
    rows = [dict(r) for r in ROWS]
    rows[1][field] = value
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # NaN and Infinity as JSON allows them (Python)
    with pytest.raises(DataValidationError, match=str(path).replace(".", r"\.") + ": " + message):
        load_preference_rows(str(path), weight_column="w", beta_column="b")
    kept, report = load_preference_rows(str(path), weight_column="w", beta_column="b", skip_invalid=True)
    assert [r["pair_id"] for r in kept] == [0, 2] and report.skipped[0].field == field


def test_a_row_without_the_field_and_a_column_the_data_lacks(tmp_path):
    rows = [dict(r) for r in ROWS]
    del rows[2]["w"]
    path = tmp_path / "some.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataValidationError, match=r"row 2 .*field 'w': missing"):
        load_preference_rows(str(path), weight_column="w")
    # a column the data does not have at all: an error before any work, even with skip_invalid_rows
    with pytest.raises(ValueError, match=r"weight_column='confidence' but the data has no column 'confidence' "
                                         r"\(its columns: b, chosen, prompt, rejected, w\)"):
        load_preference_rows(str(path), weight_column="confidence", skip_invalid=True)
    with pytest.raises(ValueError, match="beta_column='beta'"):
        load_preference_rows(str(path), beta_column="beta")


def test_a_datasets_dataset_in_the_python_api(tokenizer, tmp_path):
    from datasets import Dataset

    from adaptdpo.training.config import AdaptiveDPOConfig
    from adaptdpo.training.inputs import prepare_dataset

    args = AdaptiveDPOConfig(output_dir=str(tmp_path), use_cpu=True, weight_column="w", beta_column="b")
    ds = prepare_dataset(Dataset.from_list(ROWS), tokenizer, args, "train_dataset", pair_columns=True)
    assert ds["weight"] == [0.5, 0.0, 2.0] and ds["beta"] == [0.2, 0.05, 1.0]
    # evaluation data needs no such column
    evaluation = prepare_dataset(Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")}
                                                    for r in ROWS]), tokenizer, args, "eval_dataset")
    assert "weight" not in evaluation.column_names
    bad = [dict(r) for r in ROWS]
    bad[2]["b"] = -2
    with pytest.raises(DataValidationError, match=r"train_dataset: row 2, field 'b': .* must be > 0"):
        prepare_dataset(Dataset.from_list(bad), tokenizer, args, "train_dataset", pair_columns=True)
    with pytest.raises(ValueError, match="weight_column='w' but the data has no column 'w'"):
        prepare_dataset(Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]), tokenizer, args,
                        "train_dataset", pair_columns=True)
    # already tokenised data: the columns are checked and renamed too
    tokenised = Dataset.from_list([{**{k: v for k, v in e.items()}, "w": w}
                                   for e, w in zip([dict(x) for x in ds.remove_columns(["weight", "beta"])],
                                                   (1.0, 2.0, 3.0), strict=True)])
    out = prepare_dataset(tokenised, tokenizer, AdaptiveDPOConfig(output_dir=str(tmp_path), use_cpu=True,
                                                                  weight_column="w"), "train_dataset",
                          pair_columns=True)
    assert out["weight"] == [1.0, 2.0, 3.0] and "w" not in out.column_names
    # a tokenised `weight` column that no weight_column names is not read (dropped: it cannot weigh the loss)
    unnamed = prepare_dataset(out, tokenizer, AdaptiveDPOConfig(output_dir=str(tmp_path), use_cpu=True),
                              "train_dataset", pair_columns=True)
    assert "weight" not in unnamed.column_names and len(unnamed) == 3


WEIGHTS = [0.5, 0.0, 2.0, 1.0, 0.25, 3.0, 1.5, 0.75]


def weighted(examples, weights=WEIGHTS, betas=None):
    out = []
    for i, e in enumerate(examples):
        e = {**e, "weight": float(weights[i])}
        if betas is not None:
            e["beta"] = float(betas[i])
        out.append(e)
    return out


def logps(setup, examples):
    policy, reference, _, _ = setup
    batch = PreferenceCollator(0)(examples)
    with torch.no_grad():
        p = sequence_logps(policy, dict(batch))
        r = sequence_logps(reference, dict(batch))
    return (*p.split(), *r.split()), p.lengths.chunk(2)


SMOOTHING = {"robust": 0.1, "exo_pair": 0.1, "aot": 0.1, "aot_unpaired": 0.1, "sigmoid": 0.1}


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_weight_column_is_the_explicitly_weighted_loss(models_and_examples, tmp_path, loss_type):
    """Σ w_i ℓ_i / Σ w_i to 1e-6, for every loss type (ℓ from the pure loss on the same log-probs)."""
    _, _, examples, _ = models_and_examples
    smoothing = SMOOTHING.get(loss_type, 0.0)
    trainer = make_trainer(models_and_examples, tmp_path, loss_type=loss_type, label_smoothing=smoothing)
    loss = trainer.compute_loss(trainer.model, dict(PreferenceCollator(0)(weighted(examples))),
                                num_items_in_batch=torch.tensor(sum(WEIGHTS)))
    values, (chosen_lengths, rejected_lengths) = logps(models_and_examples, examples)
    per_pair = preference_loss(*values, 0.2, loss_type, label_smoothing=smoothing, chosen_lengths=chosen_lengths,
                               rejected_lengths=rejected_lengths)
    w = torch.tensor(WEIGHTS)
    assert loss.item() == pytest.approx(float((w * per_pair).sum() / w.sum()), abs=1e-6)


def test_weights_of_one_are_no_column_and_the_step_denominator_is_the_weight_sum(models_and_examples, tmp_path):
    _, _, examples, _ = models_and_examples
    plain = loss_and_grads(make_trainer(models_and_examples, tmp_path / "a"), PreferenceCollator(0)(examples), 8)
    trainer = make_trainer(models_and_examples, tmp_path / "b")
    ones = PreferenceCollator(0)(weighted(examples, [1.0] * 8))
    assert trainer._get_num_items_in_batch([ones], torch.device("cpu")).item() == 8.0
    with_ones = loss_and_grads(trainer, ones, 8.0)
    assert with_ones[0] == pytest.approx(plain[0], abs=1e-7)
    for key, grad in plain[1].items():
        torch.testing.assert_close(with_ones[1][key], grad, atol=1e-7, rtol=1e-6, msg=key)
    # the step's denominator: Σ w over its micro-batches; × k/n when a method trains on k of n pairs
    a, b = PreferenceCollator(0)(weighted(examples[:4])), PreferenceCollator(0)(weighted(examples[4:], WEIGHTS[4:]))
    assert trainer._get_num_items_in_batch([a, b], torch.device("cpu")).item() == pytest.approx(sum(WEIGHTS))
    sams = make_trainer(models_and_examples, tmp_path / "s", method="sams", sams_ratio=0.5)
    assert sams._get_num_items_in_batch([a, b], torch.device("cpu")).item() == pytest.approx(sum(WEIGHTS) * 0.5)
    # evaluation is unweighted: the plain mean
    trainer.model.eval()
    evaluation = trainer.compute_loss(trainer.model, dict(PreferenceCollator(0)(weighted(examples))))
    reference = make_trainer(models_and_examples, tmp_path / "c")
    reference.model.eval()
    assert evaluation.item() == pytest.approx(reference.compute_loss(reference.model, dict(
        PreferenceCollator(0)(examples))).item(), abs=1e-7)


def test_beta_column_is_a_beta_per_pair_and_beta_dpo_multiplies_it(models_and_examples, tmp_path):
    _, _, examples, _ = models_and_examples
    betas = [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 0.3, 0.15]
    values, _ = logps(models_and_examples, examples)
    ones = [1.0] * 8
    trainer = make_trainer(models_and_examples, tmp_path / "a")
    loss = trainer.compute_loss(trainer.model, dict(PreferenceCollator(0)(weighted(examples, ones, betas))),
                                num_items_in_batch=torch.tensor(8.0))
    expected = preference_loss(*values, torch.tensor(betas, dtype=torch.float32)).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    # β-DPO (batch level, no filter): pair i trains with β_i · β_batch/β0
    beta_dpo = make_trainer(models_and_examples, tmp_path / "b", method="beta_dpo", beta_dpo_alpha=5.0,
                            beta_dpo_keep_ratio=1.0)
    warm = weighted(examples[4:] + examples[:4], ones, betas)  # M0 from another batch first: β_batch ≠ β0 below
    beta_dpo.compute_loss(beta_dpo.model, dict(PreferenceCollator(0)(warm[:5])), num_items_in_batch=torch.tensor(5.0))
    beta_dpo._metrics["train"].clear()
    loss = beta_dpo.compute_loss(beta_dpo.model, dict(PreferenceCollator(0)(weighted(examples, ones, betas))),
                                 num_items_in_batch=torch.tensor(8.0))
    batch_beta = float(beta_dpo._metrics["train"]["beta/batch"][0])
    assert batch_beta != pytest.approx(0.2)
    expected = preference_loss(*values, torch.tensor(betas) * batch_beta / 0.2).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)


def test_sams_subset_and_mask_modes_agree_with_weights(models_and_examples, tmp_path):
    """SamS subset mode (forward and backward on the selected pairs only) = mask mode, weights included."""
    _, _, examples, _ = models_and_examples
    data = weighted(examples)
    results = {}
    for mode in ("mask", "subset"):
        trainer = make_trainer(models_and_examples, tmp_path / mode, method="sams", sams_warmup_rounds=1,
                               sams_mode=mode)
        for shift in (3, 5):
            rolled = data[shift:] + data[:shift]
            trainer.compute_loss(trainer.model, dict(PreferenceCollator(0)(rolled)),
                                 num_items_in_batch=torch.tensor(4.0))
            trainer.model.zero_grad()
        batch = PreferenceCollator(0)(data)
        results[mode] = loss_and_grads(trainer, batch,
                                       trainer._get_num_items_in_batch([batch], torch.device("cpu")).item())
        trainer.flush_trace()
        results[mode + "_trained"] = [json.loads(x) for x in open(tmp_path / mode / "pairs.jsonl")][-1]["trained"]
    assert results["mask_trained"] == results["subset_trained"] and sum(results["mask_trained"]) == 4
    assert results["subset"][0] == pytest.approx(results["mask"][0], abs=1e-6)
    for key, grad in results["mask"][1].items():
        torch.testing.assert_close(results["subset"][1][key], grad, atol=1e-6, rtol=1e-4, msg=key)
    # and it is Σ_selected w ℓ / (Σ w · 4/8)
    values, _ = logps(models_and_examples, examples)
    per_pair = preference_loss(*values, 0.2)
    selected = torch.tensor(results["mask_trained"], dtype=torch.float32)
    w = torch.tensor(WEIGHTS)
    assert results["mask"][0] == pytest.approx(float((selected * w * per_pair).sum() / (w.sum() * 0.5)), abs=1e-6)


@pytest.fixture(scope="module")
def weighted_data(hh_rows, tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("weighted")
    tokenizer.save_pretrained(str(root / "tok"))
    path = root / "pairs.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for i, row in enumerate(hh_rows[:48]):
            fh.write(json.dumps({**{k: row[k] for k in ("prompt", "chosen", "rejected")},
                                 "confidence": [0.0, 0.5, 1.0, 2.0, 0.25, 1.5][i % 6],
                                 "pair_beta": [0.1, 0.2, 0.4][i % 3]}) + "\n")
    return str(path), str(root / "tok")


def assert_same_runs(a_dir, b_dir, rel=1e-5):
    for x, y in zip(train_logs(a_dir), train_logs(b_dir), strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=rel, abs=1e-6), x["step"]
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=rel * 10), x["step"]
    a, b = final_params(a_dir), final_params(b_dir)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)


def test_gradient_accumulation_one_and_four_are_the_same_weighted_update(weighted_data, tmp_path):
    """8 pairs in one micro-batch = 4 micro-batches of 2 (uneven weight sums, some 0): same loss, gradient, update."""
    data, tok = weighted_data
    common = dict(max_steps=3, optim="sgd", learning_rate=0.5, weight_column="confidence", beta_column="pair_beta")
    big, acc = str(tmp_path / "big"), str(tmp_path / "acc")
    train_in_process(base_argv(data, tok, big, per_device_train_batch_size=8, **common))
    train_in_process(base_argv(data, tok, acc, per_device_train_batch_size=2, gradient_accumulation_steps=4, **common))
    assert_same_runs(big, acc)
    plain = str(tmp_path / "plain")  # the columns reached the loss: without them the run differs
    train_in_process(base_argv(data, tok, plain, per_device_train_batch_size=8, max_steps=3, optim="sgd",
                               learning_rate=0.5))
    weighted_logs, plain_logs = train_logs(big), train_logs(plain)
    assert all(math.isfinite(r["loss"]) for r in weighted_logs)
    assert weighted_logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference: ln 2, any w, β
    assert abs(weighted_logs[2]["loss"] - plain_logs[2]["loss"]) > 1e-4


@pytest.mark.two_processes
@pytest.mark.slow
def test_two_processes_are_the_same_weighted_update(weighted_data, tmp_path):
    data, tok = weighted_data
    common = dict(max_steps=3, optim="sgd", learning_rate=0.5, weight_column="confidence", beta_column="pair_beta")
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    r1 = run_cli(base_argv(data, tok, one, per_device_train_batch_size=4, **common))
    assert r1.returncode == 0, r1.stderr[-3000:]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    r2 = run_cli(base_argv(data, tok, two, per_device_train_batch_size=2, **common), launcher=launcher)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert_same_runs(one, two, rel=1e-4)


def test_audit_writes_a_weight_column_that_trains_as_weight_column(tmp_path):
    """`adaptdpo audit --clean weight`: every scored row kept with audit_weight = 1 − P(flip); the file then loads
    with --weight_column audit_weight (audit → weight, one command from audit → drop)."""
    from adaptdpo.audit.run import WEIGHT_FIELD, AuditOptions, decide_actions, write_cleaned
    from adaptdpo.audit.signals import FlipRateEstimate

    data = write(tmp_path / "pairs.jsonl", ROWS, "jsonl")
    options = AuditOptions(data=data, output_dir=str(tmp_path / "audit"), clean="weight")
    scored = {0: {"flip_probability": 0.1, "score": 0.1, "suspect_rank": 3},
              1: {"flip_probability": 0.9, "score": 0.9, "suspect_rank": 1},
              2: {"flip_probability": 0.5, "score": 0.5, "suspect_rank": 2}}
    estimate = FlipRateEstimate(flip_rate=1 / 3, temperature=1.0, interval=(0.0, 0.6), pairs=3, log_likelihood=-0.6)
    actions, cleaning = decide_actions(options, scored, estimate, warned=False)
    assert set(actions.values()) == {"weight"}  # every pair weighted: the estimated flip count (1) caps nothing here
    assert cleaning["changed"] == 3 and cleaning["held_back"] is None
    warned, held = decide_actions(options, scored, estimate, warned=True)  # after a warning: nothing, unless --force
    assert set(warned.values()) == {"keep"} and held["changed"] == 0 and "warning" in held["held_back"]
    counts = write_cleaned(options, actions, str(tmp_path / "cleaned.jsonl"), scored)
    assert counts == {"kept": 3, "swapped": 0, "dropped": 0, "weighted": 3, "unscored": 0}
    rows, _ = load_preference_rows(str(tmp_path / "cleaned.jsonl"), weight_column=WEIGHT_FIELD)
    assert [r["weight"] for r in rows] == pytest.approx([0.9, 0.1, 0.5])
