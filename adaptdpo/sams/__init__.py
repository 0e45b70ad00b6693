"""SamS (Huang et al., NeurIPS 2025, arXiv 2506.17252): adaptive batch-wise sample scheduling. Torch only.

Implemented so far: arm contexts (:mod:`.contexts`), rewards (:mod:`.rewards`) and selection rules
(:mod:`.selection`). The scheduler networks, the lagged training with a replay pool and the trainer
integration (``method: sams``) are the next steps of the SamS issue.
"""

from .contexts import layer_contexts
from .rewards import batch_reward, combined_reward, min_max, sample_reward
from .selection import SELECTIONS, num_selected, select

__all__ = ["SELECTIONS", "batch_reward", "combined_reward", "layer_contexts", "min_max", "num_selected",
           "sample_reward", "select"]
