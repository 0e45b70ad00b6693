"""The sentiment task's building blocks (issue 14): the VADER judge against hand-computed and published values, and
the prompt split (size, distinctness, disjoint topics, determinism)."""

from __future__ import annotations

import math

import pytest

from adaptdpo.sentiment import VaderJudge, sentiment_prompts
from adaptdpo.sentiment.prompts import TOPICS

pytest.importorskip("vaderSentiment")


def test_vader_compound_by_hand_and_published_values():
    judge = VaderJudge()
    # one lexicon word, nothing else: compound = v / √(v² + 15) with VADER's valences good 1.9, clean 1.7
    assert judge.score("The book was good.") == pytest.approx(1.9 / math.sqrt(1.9**2 + 15), abs=1e-4)
    assert judge.score("The room was clean.") == pytest.approx(1.7 / math.sqrt(1.7**2 + 15), abs=1e-4)
    # VADER's README examples (negation, "but", intensifiers)
    assert judge.scores(["VADER is smart, handsome, and funny.", "VADER is not smart, handsome, nor funny.",
                         "A really bad, horrible book.",
                         "The plot was good, but the characters are uncompelling and the dialog is not great."]) == \
        pytest.approx([0.8316, -0.7424, -0.8211, -0.7042], abs=1e-4)
    assert judge.score("") == 0.0


def test_prompts_are_2000_distinct_and_split_by_topic():
    split = sentiment_prompts(seed=3, held_out_share=0.2)
    everything = split.train + split.held_out
    assert len(everything) == len(set(everything)) == 2000
    assert len(split.held_out) == 400  # 10 of each domain's 50 topics × 4 templates × 2 forms
    assert not split.train_topics & split.held_out_topics
    assert len(split.held_out_topics) == 50 and len(split.train_topics) == 200
    for topic in split.held_out_topics:  # no training prompt mentions a held-out topic
        assert not any(topic in p for p in split.train)
    assert sentiment_prompts(seed=3).held_out == split.held_out  # deterministic
    assert sentiment_prompts(seed=4).held_out_topics != split.held_out_topics
    assert all(len(topics) == 50 for topics in TOPICS.values())
    with pytest.raises(ValueError, match="held_out_share"):
        sentiment_prompts(held_out_share=1.0)
