"""The robust-DPO rivals inside the trainer: cDPO, rDPO, Hölder-DPO (loss types) and ε-DPO (a step policy)."""

import pytest
import torch
from helpers import make_trainer

from adaptdpo.data.collate import PreferenceCollator


def test_holder_logs_its_contamination_estimate(models_and_examples, tmp_path):
    from adaptdpo.methods.losses import holder_contamination

    _, _, examples, _ = models_and_examples
    trainer = make_trainer(models_and_examples, tmp_path, loss_type="holder", holder_gamma=0.5)
    batch = PreferenceCollator(0)(examples)
    loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=torch.tensor(8))
    assert torch.isfinite(loss)
    logged = trainer._metrics["train"]["holder/contamination"]
    assert len(logged) == 1
    with torch.no_grad():  # recomputed from the models: ε̂ of β0·h over the batch
        from adaptdpo.models.sequence_logps import sequence_logps

        c, r = sequence_logps(trainer.model, dict(batch)).split()
        rc, rr = sequence_logps(trainer.ref_model, dict(batch)).split()
    h = (c - rc) - (r - rr)
    assert float(logged[0]) == pytest.approx(float(holder_contamination(0.2 * h, 0.5)), abs=1e-6)
