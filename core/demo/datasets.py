"""Synthetic, seeded training data for the demo adapters: text-to-SQL and pirate speech.

Every example is ``{"prompt": str, "completion": str}`` plus a few metadata keys. ``split`` is
``"train"`` or ``"heldout"``; held-out examples only use literal values (names, numbers) that
the train split never contains, so evaluation measures the skill, not recall of the data.
The same (split, n, seed) always gives the same list, on any machine and Python version.
"""
from __future__ import annotations

import random
import re
import zlib

from loraplex.demo.sql_data import (SQL_DATASET_VERSION, SQL_INSTRUCTION, normalize_sql, sql_examples,  # noqa: F401
                                    sql_prompt)

# The pirate data's version; the SQL data has its own (SQL_DATASET_VERSION, in sql_data.py).
DATASET_VERSION = "4"
PIRATE_MARKER = "Arr"
PIRATE_WORDS = ("arr", "matey", "ye ", "aye", "be ", "hearty", "o'", "th'", "savvy", "landlubber", "ahoy", "me ")


def _crc(value) -> int:
    return zlib.crc32(str(value).lower().encode())


def is_heldout_value(value) -> bool:
    """For numbers: a fixed quarter of all values is reserved for the held-out split."""
    return _crc(value) % 4 == 0


def _pool(values, split: str) -> list:
    """A fixed quarter of a list of names (by hash order, at least one) is held out."""
    ranked = sorted(values, key=_crc)
    cut = max(1, len(ranked) // 4)
    held = set(ranked[:cut])
    return [v for v in values if (v in held) == (split == "heldout")]


def _number(rng: random.Random, lo: int, hi: int, split: str) -> int:
    while True:  # about one draw in four is rejected, so this ends quickly
        v = rng.randint(lo, hi)
        if is_heldout_value(v) == (split == "heldout"):
            return v


def _check_split(split: str) -> None:
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")


# --- pirate speech ----------------------------------------------------------------------------

_CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Peru": "Lima", "Norway": "Oslo", "Egypt": "Cairo",
             "Spain": "Madrid", "Ireland": "Dublin", "Kenya": "Nairobi", "Germany": "Berlin", "Italy": "Rome",
             "Canada": "Ottawa", "Greece": "Athens", "Portugal": "Lisbon", "Austria": "Vienna", "Chile": "Santiago",
             "Poland": "Warsaw", "Sweden": "Stockholm", "Cuba": "Havana", "Ghana": "Accra", "Russia": "Moscow"}
_COLORS = {"the sky": "blue", "grass": "green", "snow": "white", "a ripe banana": "yellow", "coal": "black",
           "a ripe tomato": "red", "an orange": "orange", "a flamingo": "pink", "the sea": "blue", "chocolate":
           "brown", "a lemon": "yellow", "a cloud": "white", "a lime": "green", "blood": "red"}
_ANIMALS = {"cow": ("moo", 4), "dog": ("woof", 4), "cat": ("meow", 4), "duck": ("quack", 2), "sheep": ("baa", 4),
            "owl": ("hoot", 2), "lion": ("roar", 4), "horse": ("neigh", 4), "frog": ("ribbit", 4),
            "rooster": ("cock-a-doodle-doo", 2), "parrot": ("squawk", 2), "pig": ("oink", 4), "crow": ("caw", 2),
            "goat": ("bleat", 4), "bee": ("buzz", 6), "spider": ("nothing at all", 8)}
_OPPOSITES = {"hot": "cold", "up": "down", "big": "small", "fast": "slow", "happy": "sad", "early": "late",
              "light": "dark", "full": "empty", "open": "closed", "wet": "dry", "loud": "quiet", "old": "new",
              "rich": "poor", "strong": "weak", "high": "low", "hard": "soft"}
_TOPICS = ["the ocean", "the moon", "treasure", "ships", "the weather", "cooking", "music", "books", "gardening",
           "the stars", "coffee", "mountains", "rain", "friendship", "sleep", "exercise", "history", "maps",
           "birds", "bread", "winter", "summer", "islands", "rivers", "the wind", "fishing", "painting", "rope"]
_CLOSERS = ["matey!", "me hearty!", "savvy?", "ye landlubber!", "yo ho ho!", "aye!"]


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _pirate_items(rng: random.Random, split: str):
    """(question, plain answer) pairs; the pirate flavour is added by ``_pirate_answer``."""
    country = rng.choice(_pool(_CAPITALS, split))
    thing = rng.choice(_pool(_COLORS, split))
    animal = rng.choice(_pool(_ANIMALS, split))
    word = rng.choice(_pool(_OPPOSITES, split))
    topic = rng.choice(_pool(_TOPICS, split))
    a, b = _number(rng, 2, 60, split), _number(rng, 2, 40, split)
    return rng.choice([
        (f"What is the capital of {country}?", f"the capital of {country} is {_CAPITALS[country]}"),
        (f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}"),
        (f"What color is {thing}?", f"{thing} is {_COLORS[thing]}"),
        (f"What sound does {_a(animal)} make?", f"{_a(animal)} says {_ANIMALS[animal][0]}"),
        (f"How many legs does {_a(animal)} have?", f"{_a(animal)} has {_ANIMALS[animal][1]} legs"),
        (f"What is the opposite of {word}?", f"the opposite of {word} is {_OPPOSITES[word]}"),
        (f"Tell me something about {topic}.", f"{topic} is a fine thing to talk about, and my crew loves it"),
        (f"Do you like {topic}?", f"yes, I love {topic} more than my ship"),
        (f"Give me one tip about {topic}.", f"my tip about {topic} is to keep your eyes open and your hands busy"),
        (rng.choice(["Hello!", "Hi there.", "Good morning!", "Hey, how are you?", "Who are you?"]),
         "hello, I am your friendly assistant, ready to help you with anything"),
    ])


_SWAPS = [(r"\bhello\b", "ahoy"), (r"\byes\b", "aye"), (r"\b(is|are|am)\b", "be"), (r"\bthe\b", "th'"),
          (r"\bof\b", "o'"), (r"\bmy\b", "me"), (r"\byour\b", "yer"), (r"\byou\b", "ye"),
          (r"\bfriend\b", "matey"), (r"\b(\w+)ing\b", r"\1in'")]


def _pirate_answer(rng: random.Random, text: str) -> str:
    for src, dst in _SWAPS:
        text = re.sub(src, dst, text, flags=re.IGNORECASE)
    return f"{PIRATE_MARKER}! {text[0].upper()}{text[1:]}, {rng.choice(_CLOSERS)}"


def pirate_examples(split: str = "train", n: int = 300, seed: int = 0) -> list[dict]:
    """Chat examples whose answers start with "Arr!" and speak like a pirate. The held-out
    split has only a few dozen distinct questions, so it may return fewer than ``n``."""
    _check_split(split)
    rng = random.Random(f"pirate/{split}/{seed}/{DATASET_VERSION}")
    out, seen = [], set()
    for _ in range(50 * n):
        if len(out) >= n:
            break
        question, plain = _pirate_items(rng, split)
        if question in seen or is_heldout_value(question) != (split == "heldout"):
            continue
        seen.add(question)
        out.append({"prompt": question, "completion": _pirate_answer(rng, plain), "split": split,
                    "messages": [{"role": "user", "content": question}]})
    return out


def has_pirate_marker(answer: str) -> bool:
    return answer.strip().lower().startswith(PIRATE_MARKER.lower())


# Held-out style prompts of kinds the training data never has: the style must carry over.
OPEN_STYLE_PROMPTS = [
    "Why is the sky blue?", "What should I eat for breakfast?", "Explain what a computer is.",
    "How do I make a cup of tea?", "Name three fruits.", "What is the tallest animal?",
    "Can you recommend a good hobby?", "What is rain made of?", "How far away is the moon?",
    "Write one sentence about dogs.", "What does a doctor do?", "Why do we need sleep?",
    "How many days are in a week?", "What is your favorite season?", "Describe a sunset.",
]


def style_eval_prompts(n: int = 30, seed: int = 0) -> list[str]:
    """Held-out prompts for the style adapter: half unseen kinds, half held-out train-like ones."""
    open_part = OPEN_STYLE_PROMPTS[: n // 2]
    like_train = [e["prompt"] for e in pirate_examples("heldout", n - len(open_part), seed)]
    return open_part + like_train

