"""The gold-reward task: a synthetic language with a hidden reward r*(x, y), a reference model trained on
it, and on-policy preference pairs with controlled gold gaps and label flips (DESIGN.md §6)."""

from adaptdpo.tasks.toy.language import Language
from adaptdpo.tasks.toy.task import ToySpec, ToyTask, build_task, load_task

__all__ = ["Language", "ToySpec", "ToyTask", "build_task", "load_task"]
