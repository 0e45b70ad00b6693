"""The sentiment task's prompts: templates × topics, split into training and held-out prompts by topic, so no
held-out prompt shares its subject with a training one."""

from __future__ import annotations

import random
from dataclasses import dataclass

#: each template takes one topic of its domain
TEMPLATES: dict[str, tuple[str, ...]] = {
    "film": ("Write a short review of the film {}.", "Tell a friend what you thought of the film {}.",
             "Describe your experience watching {} at the cinema.", "Summarise your opinion of the movie {}."),
    "stay": ("Describe your stay at {}.", "Write a short review of your holiday in {}.",
             "Tell a friend about your weekend in {}.", "Summarise your trip to {}."),
    "meal": ("Write a short review of the {} you had for dinner.", "Describe the {} at the restaurant last night.",
             "Tell a friend about the {} you ordered.", "Summarise what you thought of the {} at the cafe."),
    "product": ("Write a short review of your new {}.", "Describe your first week using the {}.",
                "Tell a friend whether to buy the {}.", "Summarise your opinion of the {} you bought."),
    "book": ("Write a short review of the book {}.", "Describe what you thought of the novel {}.",
             "Tell a friend about reading {}.", "Summarise your opinion of the book {}."),
}

#: topics per domain (invented titles and ordinary nouns: no real works, no names of people)
TOPICS: dict[str, tuple[str, ...]] = {
    "film": tuple(f"The {a} {b}" for a in ("Silent", "Last", "Hidden", "Northern", "Broken", "Golden", "Quiet",
                                           "Lost", "Red", "Winter")
                  for b in ("Harbor", "Road", "Garden", "Signal", "River")),
    "stay": tuple(f"{a} {b}" for a in ("a seaside", "a mountain", "a city", "a lakeside", "a countryside",
                                       "a desert", "an island", "a riverside", "a forest", "a village")
                  for b in ("hotel", "hostel", "cabin", "guesthouse", "resort")),
    "meal": tuple(f"{a} {b}" for a in ("grilled", "spicy", "roasted", "fried", "steamed", "baked", "smoked",
                                       "braised", "fresh", "creamy")
                  for b in ("chicken", "noodles", "fish", "soup", "salad")),
    "product": tuple(f"{a} {b}" for a in ("wireless", "electric", "portable", "smart", "folding", "compact",
                                          "steel", "budget", "premium", "refurbished")
                     for b in ("headphones", "kettle", "bicycle", "vacuum cleaner", "desk lamp")),
    "book": tuple(f"{a} of the {b}" for a in ("The Keeper", "The Song", "The Map", "The Edge", "The Voice",
                                              "The Weight", "The Garden", "The Light", "The Memory", "The Shadow")
                  for b in ("Tides", "Hills", "Stars", "Sea", "North")),
}


@dataclass(frozen=True)
class PromptSplit:
    """Training and held-out prompts, and the topics each side uses (disjoint)."""

    train: list[str]
    held_out: list[str]
    train_topics: frozenset[str]
    held_out_topics: frozenset[str]


def sentiment_prompts(seed: int = 0, held_out_share: float = 0.2) -> PromptSplit:
    """Every template × topic prompt (5 domains × 50 topics × 4 templates = 1,000 topic-template pairs, each
    with and without a sentiment-neutral "In about three sentences: " prefix = 2,000 distinct prompts); a
    ``held_out_share`` of each domain's topics, drawn with ``seed``, goes to held-out with all its prompts."""
    if not 0.0 < held_out_share < 1.0:
        raise ValueError(f"held_out_share must be in (0, 1), got {held_out_share}")
    rng = random.Random(seed)
    train: list[str] = []
    held_out: list[str] = []
    train_topics: set[str] = set()
    held_topics: set[str] = set()
    for domain, topics in TOPICS.items():
        order = list(topics)
        rng.shuffle(order)
        n_held = max(1, round(held_out_share * len(order)))
        for i, topic in enumerate(order):
            side, names = (held_out, held_topics) if i < n_held else (train, train_topics)
            names.add(topic)
            for template in TEMPLATES[domain]:
                text = template.format(topic)
                side.extend([text, "In about three sentences: " + text[0].lower() + text[1:]])
    return PromptSplit(train, held_out, frozenset(train_topics), frozenset(held_topics))
