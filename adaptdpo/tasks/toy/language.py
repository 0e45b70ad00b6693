"""The synthetic language of the gold-reward task and its hidden gold reward r*(x, y).

Words are made-up two-syllable strings. Every word w carries a hidden feature vector v_w. A prompt x is a
few words; it asks for responses whose words point the way its own words point:

    r*(x, y) = (1/s) · (1/|y|) · Σ_{w ∈ y} (q_w + ⟨u(x), v_w⟩),   u(x) = normalised mean of v over the prompt's words

q_w is a prompt-independent quality of the word (what a policy can learn first); the second term depends
on prompt and response together. The reward does not reward length.
s makes the reward's standard deviation 1 on the reference model's own responses (set when the task is
built). The *base* distribution that the reference model is trained on knows nothing of r*: responses
follow a random Markov chain over words that sometimes copies a prompt word.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"


@dataclass
class Language:
    words: list[str]
    vectors: torch.Tensor  # [V, d] gold features
    quality: torch.Tensor  # [V] prompt-independent word quality
    start: torch.Tensor  # [V] base distribution of the first response word
    transition: torch.Tensor  # [V, V] base Markov chain
    copy_prob: float
    min_words: int
    max_words: int
    prompt_words: int
    scale: float = 1.0

    @classmethod
    def create(cls, seed: int, num_words: int = 48, feature_dim: int = 4, prompt_words: int = 3,
               min_words: int = 3, max_words: int = 8, copy_prob: float = 0.15) -> Language:
        rng = random.Random(seed)
        syllables = [c + v for c in CONSONANTS for v in VOWELS]
        words: list[str] = []
        while len(words) < num_words:
            word = rng.choice(syllables) + rng.choice(syllables)
            if word not in words:
                words.append(word)
        g = torch.Generator().manual_seed(seed)
        vectors = torch.randn(num_words, feature_dim, generator=g, dtype=torch.float64)
        quality = torch.randn(num_words, generator=g, dtype=torch.float64)
        dirichlet = torch.distributions.Dirichlet(torch.full((num_words,), 0.3, dtype=torch.float64))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            transition = dirichlet.sample((num_words,))
            start = dirichlet.sample()
        return cls(words, vectors, quality, start, transition, copy_prob, min_words, max_words, prompt_words)

    @property
    def index(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.words)}

    # ------------------------------------------------------------------------------------ text

    def prompt_text(self, words: list[str]) -> str:
        return "Q: " + " ".join(words) + "\nA:"

    @staticmethod
    def prompt_words_of(prompt: str) -> list[str]:
        return prompt.removeprefix("Q: ").removesuffix("\nA:").split()

    @staticmethod
    def response_text(words: list[str]) -> str:
        return " " + " ".join(words)

    def sample_prompt(self, rng: random.Random) -> list[str]:
        return rng.sample(self.words, self.prompt_words)

    def sample_base_response(self, prompt: list[str], rng: random.Random) -> list[str]:
        """A response from the base distribution (what the reference model is trained to imitate)."""
        length = rng.randint(self.min_words, self.max_words)
        out: list[str] = []
        probs = self.start
        for _ in range(length):
            if rng.random() < self.copy_prob:
                word = rng.choice(prompt)
            else:
                word = self.words[_categorical(probs, rng)]
            out.append(word)
            probs = self.transition[self.index[word]]
        return out

    # ------------------------------------------------------------------------------------ gold

    def gold_reward(self, prompt: str, response: str) -> float:
        """r*(x, y); words the language does not know (a sampling accident) count with feature 0."""
        index = self.index
        prompt_ids = [index[w] for w in self.prompt_words_of(prompt) if w in index]
        direction = self.vectors[prompt_ids].mean(dim=0)
        direction = direction / direction.norm().clamp(min=1e-12)
        words = response.split()
        if not words:
            return 0.0
        total = sum(float(self.quality[index[w]] + self.vectors[index[w]] @ direction) for w in words if w in index)
        return total / len(words) / self.scale

    def to_dict(self) -> dict:
        tensors = {k: getattr(self, k).tolist() for k in ("vectors", "quality", "start", "transition")}
        return {"words": self.words, **tensors, "copy_prob": self.copy_prob, "min_words": self.min_words,
                "max_words": self.max_words, "prompt_words": self.prompt_words, "scale": self.scale}

    @classmethod
    def from_dict(cls, d: dict) -> Language:
        t = {k: torch.tensor(d[k], dtype=torch.float64) for k in ("vectors", "quality", "start", "transition")}
        return cls(d["words"], t["vectors"], t["quality"], t["start"], t["transition"], d["copy_prob"],
                   d["min_words"], d["max_words"], d["prompt_words"], d["scale"])


def _categorical(probs: torch.Tensor, rng: random.Random) -> int:
    u, acc = rng.random(), 0.0
    for i, p in enumerate(probs.tolist()):
        acc += p
        if u < acc:
            return i
    return len(probs) - 1
