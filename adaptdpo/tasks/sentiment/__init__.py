"""The controlled-sentiment task on real text (issue 14; the DPO paper's exact-judge experiment): prompts from
templates × topics split by topic, and a fixed, known reward, the VADER compound sentiment of the completion."""

from adaptdpo.tasks.sentiment.judge import VaderJudge
from adaptdpo.tasks.sentiment.prompts import PromptSplit, sentiment_prompts

__all__ = ["PromptSplit", "VaderJudge", "sentiment_prompts"]
