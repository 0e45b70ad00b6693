"""The sentiment task's building blocks (issue 14): the VADER judge against hand-computed and published values, the
prompt split (size, distinctness, disjoint topics, determinism), and the pair generator shared with the toy task
(gap buckets, Bradley–Terry labels, flip counts)."""

from __future__ import annotations

import math

import pytest

from adaptdpo.tasks.sentiment.judge import VaderJudge
from adaptdpo.tasks.sentiment.prompts import TOPICS, sentiment_prompts


def test_vader_compound_by_hand_and_published_values():
    pytest.importorskip("vaderSentiment")
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


def _pool(gaps: list[float]) -> list[dict]:
    return [{"prompt": f"p{i}", "y1": f"good {i}", "y2": f"bad {i}", "gold1": g, "gold2": 0.0}
            for i, g in enumerate(gaps)]


def test_gap_buckets_labels_and_flips_by_hand():
    """Nine pairs with gaps 1..9: the cuts are the 4th and 7th smallest gaps (4 and 7), so low = gaps 1..4 and
    high = 7..9; at a near-zero Bradley–Terry temperature labels follow the gold reward; flip rate 0 flips none,
    1 flips every pair (the chosen is then always the worse response)."""
    from adaptdpo.tasks.pairs import bradley_terry_first_wins, controlled_pairs, gold_labelled_pairs

    pool = _pool([float(g) for g in range(1, 10)]) + _pool([0.0])  # the tie is left out
    rows, stats = controlled_pairs(pool, 6, high_gap_fraction=0.5, flip_rate=0.0, bt_temperature=1e-6, seed=0)
    assert (stats["low_gap_cut"], stats["high_gap_cut"]) == (4.0, 7.0)
    assert sorted(r["gold_chosen"] for r in rows if r["gap_group"] == "high") == [7.0, 8.0, 9.0]
    assert all(r["gold_chosen"] <= 4.0 for r in rows if r["gap_group"] == "low")
    assert stats["flipped"] == 0 and stats["labels_agreeing_with_gold"] == 1.0
    flipped, stats = controlled_pairs(pool, 6, high_gap_fraction=0.5, flip_rate=1.0, bt_temperature=1e-6, seed=0)
    assert stats["flipped"] == 6 and stats["labels_agreeing_with_gold"] == 0.0
    assert all(r["chosen"].startswith("bad") for r in flipped)
    with pytest.raises(ValueError, match="sample a larger pool"):
        controlled_pairs(pool, 8, high_gap_fraction=0.5, flip_rate=0.0, bt_temperature=1.0, seed=0)
    # σ(gap / T) by hand: gap 1, T 0.5 → σ(2) = 0.880797; gap −1 → 0.119203
    assert bradley_terry_first_wins(1.0, 0.5) == pytest.approx(0.880797, abs=1e-6)
    assert bradley_terry_first_wins(-1.0, 0.5) == pytest.approx(0.119203, abs=1e-6)
    held = gold_labelled_pairs(pool)
    assert len(held) == 9 and all(r["gold_chosen"] > r["gold_rejected"] and not r["flipped"] for r in held)


def test_flip_counts_follow_the_rate():
    """At 20% and 40% flips over 1,000 pairs the recorded counts are within 4 standard deviations of n·rate, and every
    recorded flip (at a near-zero temperature) is exactly a label that disagrees with gold."""
    from adaptdpo.tasks.pairs import controlled_pairs

    pool = _pool([0.01 * (i + 1) for i in range(3000)])
    for rate in (0.2, 0.4):
        rows, stats = controlled_pairs(pool, 1000, high_gap_fraction=0.5, flip_rate=rate, bt_temperature=1e-9,
                                       seed=1)
        assert abs(stats["flipped"] - 1000 * rate) < 4 * math.sqrt(1000 * rate * (1 - rate))
        assert all(r["flipped"] == (not r["label_agrees_with_gold"]) for r in rows)


def test_the_recovery_table_computes_the_share_won_back_by_hand():
    """DPO loses 0.2 gold reward, 0.1 accuracy and 0.1 win rate to flips; a method at 0.5 / 0.6 / 0.55 under flips
    wins back (0.5 − 0.4) / 0.2 = 50%, 0% and 50%; DPO's own row shows no share."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    from real_model import recovery_table

    def result(reward, accuracy, win):
        return {"gold/reward": reward, "gold/accuracy": accuracy, "gold/win_rate": win}

    text = recovery_table([("0% flips: DPO", [result(0.6, 0.7, 0.6)]), ("20% flips: DPO", [result(0.4, 0.6, 0.5)]),
                           ("20% flips: β-DPO", [result(0.5, 0.6, 0.55)])])
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert rows["β-DPO"] == "| β-DPO | 1 | 0.500 | +50% | 0.600 | +0% | 0.550 | +50% |"
    assert rows["DPO"] == "| DPO | 1 | 0.400 | – | 0.600 | – | 0.500 | – |"
    assert "gold reward +0.200, held-out accuracy +0.100, win rate +0.100" in text
    assert "not run" in recovery_table([("20% flips: DPO", [result(0.4, 0.6, 0.5)])])


def test_the_recovery_tables_standard_errors_are_the_delta_method_by_hand():
    """Two seeds each: clean 0.6/0.8, noisy 0.4/0.6, method 0.5/0.7, so every mean's variance is 0.02 / 2 = 0.01.
    R = (0.6 − 0.5) / 0.2 = 0.5; Var R = 0.01/0.2² + 0.01·(0.1/0.2²)² + 0.01·(−0.1/0.2²)² = 0.375, s.e. 0.612;
    method − noisy = 0.1 with s.e. √0.02 = 0.141 (0.7 SE: within two); clean − noisy = 0.2 (1.4 SE)."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    from real_model import difference, recovery_table, won_back

    def results(a, b):
        return [{"gold/reward": v, "gold/accuracy": v, "gold/win_rate": v} for v in (a, b)]

    won, se = won_back([0.5, 0.7], [0.6, 0.8], [0.4, 0.6])
    assert won == pytest.approx(0.5) and se == pytest.approx(0.375 ** 0.5)
    assert difference([0.5, 0.7], [0.4, 0.6]) == pytest.approx((0.1, 0.02 ** 0.5))
    assert won_back([0.5], [0.5], [0.5]) is None
    text = recovery_table([("0% flips: DPO", results(0.6, 0.8)), ("20% flips: DPO", results(0.4, 0.6)),
                           ("20% flips: β-DPO", results(0.5, 0.7))])
    assert "| β-DPO | 2 | 0.600 ± 0.141 | +50% ± 61% |" in text
    assert "gold reward +0.200 (1.4 SE)" in text
    assert "larger than two standard errors of the difference: none." in text
    assert "β-DPO gold reward +0.100 (0.7 SE)" in text
