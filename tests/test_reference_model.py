"""The reference model placed like the policy (adaptdpo.training.reference): sharded under FSDP2, the DeepSpeed
inference config TRL uses, and accelerate's placement everywhere else."""

import os
import sys

import pytest
import torch
from helpers import ROOT, run_command
from transformers import LlamaConfig, LlamaForCausalLM

from adaptdpo.training.reference import deepspeed_inference_config, is_sharded, prepare_reference


@pytest.mark.two_processes
@pytest.mark.slow
def test_fsdp2_reference_is_sharded_across_two_ranks_and_computes_the_same_log_probs(tmp_path):
    """2 gloo processes: each rank stores about half of the reference's parameter elements, in 7 FSDP units (3
    decoder layers, the embedding, the final norm and the head, the root), the halves add up to the whole, and the
    sequence log-probs of a fixed batch equal the unsharded model's in the stacked and shared-prompt layouts. The
    same with cpu_ram_efficient_loading, where rank 1 starts with zeros and gets rank 0's weights."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               os.path.join(ROOT, "tests", "fsdp_reference_probe.py"), str(tmp_path)]
    done = run_command(command, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    total = ranks[0]["total"]
    assert total == 34080  # 97·32 embedding + 97·32 head + 3 layers of 9,280 + the final norm's 32
    for case in ("loaded", "ram_efficient"):
        assert ranks[0][case]["stored"] + ranks[1][case]["stored"] == total
        for rank in ranks:
            got = rank[case]
            assert abs(got["stored"] - total / 2) < 0.01 * total
            assert got["units"] == 7 and got["frozen"] and got["eval"] and got["sharded"]
            for layout in ("stacked", "shared_prompt"):
                assert got["got"][layout].shape == (6,)
                torch.testing.assert_close(got["got"][layout], rank["expected"][layout], rtol=0, atol=1e-5)


def test_deepspeed_reference_config_keeps_zero3_and_drops_the_optimizer():
    """TRL's prepare_deepspeed, by hand: ZeRO-3 stays (sharded reference) with buckets from hidden size 8; other
    stages become 0 (one replica); the optimizer, scheduler and optimizer offload go; the run's config is untouched."""
    run = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW"}, "scheduler": {"type": "WarmupLR"},
           "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                 "offload_param": {"device": "cpu"}}}
    got = deepspeed_inference_config(run, hidden_size=8)
    assert got == {"train_micro_batch_size_per_gpu": 2,
                   "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}},
                   "zero_optimization.reduce_bucket_size": 64,
                   "zero_optimization.stage3_param_persistence_threshold": 80,
                   "zero_optimization.stage3_prefetch_bucket_size": 0.9 * 64}
    assert run["zero_optimization"]["stage"] == 3 and "optimizer" in run  # a copy was changed, not the run's
    stage2 = deepspeed_inference_config({"zero_optimization": {"stage": 2}, "optimizer": {}}, hidden_size=8)
    assert stage2 == {"zero_optimization": {"stage": 0}}


def test_reference_without_sharding_is_frozen_and_placed_by_accelerate():
    from accelerate import Accelerator

    config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    reference = LlamaForCausalLM(config).train()
    prepared = prepare_reference(reference, Accelerator(cpu=True))
    assert not prepared.training and not any(p.requires_grad for p in prepared.parameters())
    assert not is_sharded(prepared) and not is_sharded(None)
    assert next(prepared.parameters()).device.type == "cpu"
