"""Log-probs computed on the completion window only equal the full-logits computation."""

import torch

from adaptdpo.data import PreferenceCollator
from adaptdpo.logprobs import accepts_logits_to_keep, completion_window, sequence_logps


class FullLogitsOnly(torch.nn.Module):
    """The same model behind a forward without ``logits_to_keep``: the fallback path."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, use_cache=False, output_hidden_states=False):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache,
                          output_hidden_states=output_hidden_states)


def test_completion_window_matches_full_logits(models_and_examples):
    policy, _, examples, _ = models_and_examples
    batch = PreferenceCollator(0)(examples)
    shortest_prompt = min(len(e["prompt_ids"]) for e in examples)
    assert batch["logits_to_keep"] == batch["input_ids"].shape[1] - shortest_prompt + 1
    assert batch["logits_to_keep"] < batch["input_ids"].shape[1]  # the window really is smaller here
    without = {k: v for k, v in batch.items() if k != "logits_to_keep"}
    assert completion_window(without) == batch["logits_to_keep"]
    assert accepts_logits_to_keep(policy) and not accepts_logits_to_keep(FullLogitsOnly(policy))
    windowed = sequence_logps(policy, batch)
    full = sequence_logps(FullLogitsOnly(policy), batch)
    torch.testing.assert_close(windowed.logps, full.logps, atol=1e-5, rtol=1e-6)
    assert torch.equal(windowed.lengths, full.lengths)
