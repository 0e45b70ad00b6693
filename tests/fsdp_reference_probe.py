"""On every rank of a 2-process gloo group: shard a reference with FSDP2 the way the trainer does under
``--accelerate_config fsdp2`` (:func:`adaptdpo.training.reference.prepare_reference`), and save what it holds and what
it
computes: the parameter elements this rank stores, the FSDP units, and the sequence log-probs of a fixed batch in
the stacked and shared-prompt layouts, next to those of the same model unsharded. Twice: as loaded on every rank,
and with ``cpu_ram_efficient_loading``, where only rank 0 holds the weights (rank 1's are zeros, as transformers
leaves them) and sharding must broadcast them.

usage: torchrun --nproc_per_node 2 tests/fsdp_reference_probe.py OUT_DIR
(accelerate puts FSDP on GPUs only, so the accelerator here is a stand-in with the state the trainer reads)
"""

import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.fsdp import FSDPModule
from transformers import LlamaConfig, LlamaForCausalLM

from adaptdpo.data.collate import PreferenceCollator
from adaptdpo.models.sequence_logps import sequence_logps
from adaptdpo.training.reference import is_sharded, prepare_reference


def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
    return LlamaForCausalLM(config)


def batches() -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(1, 97, (n,), generator=g).tolist()  # noqa: E731
    examples = [{"prompt_ids": ids(5 + i), "chosen_ids": ids(3 + i), "rejected_ids": ids(6 - i), "pair_id": i}
                for i in range(3)]
    return {"stacked": dict(PreferenceCollator(0)(examples)),
            "shared_prompt": dict(PreferenceCollator(0, shared_prompt=True)(examples))}


def logps(reference: torch.nn.Module) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {name: torch.cat(sequence_logps(reference, batch).split()) for name, batch in batches().items()}


def prepared(ram_efficient: bool) -> torch.nn.Module:
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            reshard_after_forward=True, cpu_ram_efficient_loading=ram_efficient)
    accelerator = SimpleNamespace(distributed_type=DistributedType.FSDP, state=SimpleNamespace(fsdp_plugin=plugin),
                                  device=torch.device("cpu"), torch_device_mesh=None, mixed_precision="no",
                                  is_main_process=dist.get_rank() == 0)
    reference = model()
    if ram_efficient and dist.get_rank() != 0:
        with torch.no_grad():
            for param in reference.parameters():
                param.zero_()
    return prepare_reference(reference, accelerator)


if __name__ == "__main__":
    dist.init_process_group("gloo")
    whole = model().eval()
    expected = logps(whole)
    results = {}
    for ram_efficient in (False, True):
        reference = prepared(ram_efficient)
        results["ram_efficient" if ram_efficient else "loaded"] = {
            "stored": sum(p.to_local().numel() for p in reference.parameters()),
            "units": sum(isinstance(m, FSDPModule) for m in reference.modules()),
            "frozen": not any(p.requires_grad for p in reference.parameters()),
            "eval": not reference.training, "sharded": is_sharded(reference), "got": logps(reference)}
    torch.save({"total": sum(p.numel() for p in whole.parameters()), "expected": expected, **results},
               os.path.join(sys.argv[1], f"rank{dist.get_rank()}.pt"))
    dist.destroy_process_group()
