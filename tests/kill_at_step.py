"""Train like `adaptdpo train`, then SIGKILL this process right after optimizer step K (a crash mid-run).

usage: python tests/kill_at_step.py K [--key value ...]
"""

import os
import signal
import sys

from transformers import TrainerCallback

from adaptdpo.training.config_io import parse_config
from adaptdpo.training.job import run_training


class KillAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    run_training(parse_config(sys.argv[2:]), extra_callbacks=[KillAt(int(sys.argv[1]))])
