"""The gold reward of the sentiment task: VADER's compound score (Hutto & Gilbert, ICWSM 2014).

r*(x, y) = compound(y) ∈ [−1, 1]: the sum s of the valence of the completion's lexicon words (with VADER's rules
for negation, intensifiers, "but", punctuation and capitals), normalised as s / √(s² + 15). Rule-based and
deterministic, its lexicon ships inside the PyPI package (`vaderSentiment`, MIT), so the judge is exact and known;
no model here was trained on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class VaderJudge:
    """Scores texts with VADER's compound sentiment (the task's gold reward)."""

    def __init__(self) -> None:
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError as e:
            raise ImportError("the sentiment task's judge needs vaderSentiment: pip install 'adaptdpo[sentiment]'") \
                from e
        self._analyzer: Any = SentimentIntensityAnalyzer()

    def score(self, text: str) -> float:
        """The compound score of one text (0.0 for an empty one)."""
        return float(self._analyzer.polarity_scores(text)["compound"])

    def scores(self, texts: Sequence[str]) -> list[float]:
        return [self.score(t) for t in texts]
