"""SamS (Huang et al., NeurIPS 2025, arXiv 2506.17252): adaptive batch-wise sample scheduling. Torch only.

Implemented so far (torch only, unit-tested): arm contexts (:mod:`.contexts`), rewards (:mod:`.rewards`),
selection rules (:mod:`.selection`), the scheduler networks (:mod:`.networks`) and the lagged bandit
scheduler with its replay pool (:mod:`.scheduler`). Not yet: the trainer integration (``method: sams``,
``mask`` and ``subset`` modes, global selection across ranks), scheduler pre-training, plots and the
benchmark — the remaining steps of the SamS issue.
"""

from adaptdpo.methods.sams.contexts import layer_contexts
from adaptdpo.methods.sams.rewards import batch_reward, combined_reward, min_max, sample_reward
from adaptdpo.methods.sams.scheduler import SamsScheduler
from adaptdpo.methods.sams.selection import SELECTIONS, num_selected, select

__all__ = [
    "SELECTIONS",
    "SamsScheduler",
    "batch_reward",
    "combined_reward",
    "layer_contexts",
    "min_max",
    "num_selected",
    "sample_reward",
    "select",
]
