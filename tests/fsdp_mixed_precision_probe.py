"""On every rank of a 2-process gloo group: prepare a policy for FSDP2 with bf16 mixed precision the way the trainer
does under ``--accelerate_config fsdp2`` (accelerate's ``fsdp2_prepare_model``, which ``Trainer`` calls through
``accelerator.prepare``), once loaded in float32 and once in bfloat16 (``dtype: auto`` of a bf16 checkpoint), then take
one optimizer step on a preference batch; save the dtypes of the sharded parameters, their gradients and the AdamW
state, and whether the forward ran in bf16.

usage: torchrun --nproc_per_node 2 tests/fsdp_mixed_precision_probe.py OUT_DIR
(accelerate puts FSDP on GPUs only, so the accelerator here is a stand-in with the state fsdp2_prepare_model reads)
"""

import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.fsdp import MixedPrecisionPolicy
from transformers import LlamaConfig, LlamaForCausalLM

from adaptdpo.data.collate import PreferenceCollator
from adaptdpo.models.sequence_logps import sequence_logps


def policy(dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
    return LlamaForCausalLM(config).to(dtype)


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1 + dist.get_rank())
    ids = lambda n: torch.randint(1, 97, (n,), generator=g).tolist()  # noqa: E731
    return PreferenceCollator(0)([{"prompt_ids": ids(5), "chosen_ids": ids(3), "rejected_ids": ids(4)}
                                  for _ in range(2)])


def step(dtype: torch.dtype) -> dict[str, object]:
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True,
        mixed_precision_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    accelerator = SimpleNamespace(distributed_type=DistributedType.FSDP, state=SimpleNamespace(fsdp_plugin=plugin),
                                  device=torch.device("cpu"), torch_device_mesh=None, mixed_precision="bf16",
                                  is_main_process=dist.get_rank() == 0)
    model = fsdp2_prepare_model(accelerator, policy(dtype))
    prepared = {str(p.dtype) for p in model.parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)  # Trainer builds it after prepare under FSDP2
    seen = set()
    hook = model.model.layers[0].register_forward_hook(lambda m, i, o: seen.add(str(o[0].dtype)))
    chosen, rejected = sequence_logps(model, batch()).split()
    (-torch.nn.functional.logsigmoid(chosen - rejected)).mean().backward()
    hook.remove()
    grads = {str(p.grad.dtype) for p in model.parameters()}
    optimizer.step()
    state = {str(v.dtype) for s in optimizer.state.values() for k, v in s.items() if k != "step"}
    return {"params": prepared, "after_step": {str(p.dtype) for p in model.parameters()}, "grads": grads,
            "optimizer_state": state, "compute": seen}


if __name__ == "__main__":
    from accelerate import PartialState

    dist.init_process_group("gloo")
    PartialState(cpu=True)  # accelerate's logging needs its state
    out = {str(dtype): step(dtype) for dtype in (torch.float32, torch.bfloat16)}
    torch.save(out, os.path.join(sys.argv[1], f"rank{dist.get_rank()}.pt"))
    dist.destroy_process_group()
