"""Synthetic, seeded training data for the demo adapters: text-to-SQL and pirate speech.

Every example is ``{"prompt": str, "completion": str}`` plus a few metadata keys. ``split`` is
``"train"`` or ``"heldout"``; held-out examples only use literal values (names, numbers) that
the train split never contains, so evaluation measures the skill, not recall of the data.
The same (split, n, seed) always gives the same list, on any machine and Python version.
"""
from __future__ import annotations

import functools
import random
import re
import zlib

DATASET_VERSION = "4"
SQL_INSTRUCTION = "Write a SQL query to answer the question based on the table schema."
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


def _check_split(split: str) -> None:
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")


# --- text-to-SQL ------------------------------------------------------------------------------

_PEOPLE = ["Alice", "Bob", "Carmen", "David", "Elena", "Farid", "Grace", "Hiro", "Ingrid", "Jamal", "Keiko",
           "Liam", "Maria", "Noah", "Olga", "Pedro", "Quinn", "Rosa", "Sven", "Tara", "Umar", "Vera", "Wei", "Yara"]
_CITIES = ["Paris", "Lagos", "Tokyo", "Lima", "Oslo", "Cairo", "Denver", "Madrid", "Seoul", "Dublin", "Quito",
           "Nairobi", "Berlin", "Austin", "Hanoi", "Perth", "Porto", "Accra", "Boston", "Riga"]
_COUNTRIES = ["France", "Kenya", "Japan", "Peru", "Norway", "Egypt", "Chile", "Spain", "Korea", "Ireland", "Brazil",
              "Canada", "Ghana", "Italy", "Poland", "Vietnam", "Mexico", "India", "Latvia", "Greece"]
_GENRES = ["Drama", "Comedy", "Horror", "Jazz", "Rock", "Fantasy", "Mystery", "Romance", "Thriller", "Western",
           "Pop", "Folk", "Poetry", "History", "Science", "Travel"]

_SYLLABLES = ["ka", "ri", "mo", "len", "tu", "sa", "bel", "do", "vin", "ar", "zu", "pe", "lo", "nor", "ith", "ga",
              "os", "fe", "ul", "tan", "mi", "ro", "el", "sk", "wa"]

# (singular, plural, table names, columns). A column is (name, sql type, values or (lo, hi)).
_DOMAINS = [
    ("employee", "employees", ["employees", "staff"], [
        ("name", "VARCHAR", _PEOPLE), ("department", "VARCHAR", ["Sales", "Legal", "Finance", "Support", "Research",
                                                                   "Marketing", "Design", "Security", "Training"]),
        ("city", "VARCHAR", _CITIES), ("salary", "INTEGER", (30000, 150000)), ("age", "INTEGER", (21, 65)),
        ("hire_year", "INTEGER", (1990, 2023))]),
    ("product", "products", ["products", "inventory"], [
        ("product_name", "VARCHAR", ["Lamp", "Desk", "Kettle", "Blender", "Mirror", "Sofa", "Toaster", "Router",
                                      "Camera", "Guitar", "Helmet", "Backpack", "Printer", "Monitor", "Drill"]),
        ("category", "VARCHAR", ["Kitchen", "Office", "Garden", "Audio", "Sports", "Toys", "Outdoor", "Bath", "Tools"]),
        ("brand", "VARCHAR", ["Acme", "Zenith", "Orbit", "Nova", "Apex", "Vertex", "Lumen", "Polar", "Summit"]),
        ("price", "INTEGER", (5, 900)), ("stock", "INTEGER", (0, 500))]),
    ("student", "students", ["students", "pupils"], [
        ("name", "VARCHAR", _PEOPLE), ("major", "VARCHAR", ["Biology", "Physics", "Music", "Law", "Economics",
                                                            "Chemistry", "Art", "Geology", "Nursing", "Drama"]),
        ("hometown", "VARCHAR", _CITIES), ("grade", "INTEGER", (40, 100)), ("credits", "INTEGER", (0, 180))]),
    ("movie", "movies", ["movies", "films"], [
        ("title", "VARCHAR", ["Red Sky", "Lost River", "Iron Moon", "Blue Door", "Night Train", "Glass Road",
                              "Silent Hill", "Cold Fire", "Paper Crown", "Deep Echo", "Last Light", "Golden Gate"]),
        ("director", "VARCHAR", _PEOPLE), ("genre", "VARCHAR", _GENRES), ("release_year", "INTEGER", (1950, 2024)),
        ("runtime", "INTEGER", (70, 200))]),
    ("book", "books", ["books", "library"], [
        ("title", "VARCHAR", ["Salt Road", "Quiet Stars", "Green Harbor", "Broken Bell", "Winter Garden", "Tall Grass",
                              "Hidden Valley", "Stone Bridge", "Open Sea", "White Tower", "Dark Forest", "Old Map"]),
        ("author", "VARCHAR", _PEOPLE), ("genre", "VARCHAR", _GENRES), ("pages", "INTEGER", (80, 1200)),
        ("publish_year", "INTEGER", (1900, 2024))]),
    ("player", "players", ["players", "athletes"], [
        ("name", "VARCHAR", _PEOPLE), ("team", "VARCHAR", ["Lions", "Hawks", "Sharks", "Wolves", "Bears", "Eagles",
                                                          "Tigers", "Falcons", "Rangers", "Comets"]),
        ("country", "VARCHAR", _COUNTRIES), ("goals", "INTEGER", (0, 60)), ("games", "INTEGER", (1, 90))]),
    ("city", "cities", ["cities", "towns"], [
        ("city_name", "VARCHAR", _CITIES), ("country", "VARCHAR", _COUNTRIES), ("population", "INTEGER",
                                                                               (10000, 9000000)),
        ("area", "INTEGER", (10, 3000)), ("founded", "INTEGER", (800, 1950))]),
    ("flight", "flights", ["flights", "routes"], [
        ("airline", "VARCHAR", ["Skyway", "Aero", "Jetline", "Cloud", "Horizon", "Bluebird", "Sunair", "Polaris"]),
        ("origin", "VARCHAR", _CITIES), ("destination", "VARCHAR", _CITIES), ("duration", "INTEGER", (30, 900)),
        ("passengers", "INTEGER", (10, 400))]),
]


def _value(rng: random.Random, spec, split: str):
    if isinstance(spec, tuple):
        lo, hi = spec
        while True:  # about one draw in four is rejected, so this ends quickly
            v = rng.randint(lo, hi)
            if hi - lo > 100 and v > 1000:
                v = round(v, -2)  # round numbers read more naturally in questions
            if is_heldout_value(v) == (split == "heldout"):
                return v
    if split == "train" and rng.random() < 0.3:
        # Made-up names teach the adapter to copy the value from the question; with only the
        # pools it would learn to recall the few names it saw, and miss held-out ones.
        while True:
            v = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
            if not is_heldout_value(v) and v not in _heldout_names():
                return v
    return rng.choice(_pool(spec, split))


@functools.lru_cache(maxsize=None)
def _heldout_names() -> frozenset:
    specs = [spec for *_, cols in _DOMAINS for _, _, spec in cols if isinstance(spec, list)]
    return frozenset(v for spec in specs for v in _pool(spec, "heldout"))


def _lit(v) -> str:
    return str(v) if isinstance(v, int) else f"'{v}'"


def _words(col: str) -> str:
    return col.replace("_", " ")


def _sql_question(rng: random.Random, split: str, text_cols, num_cols, ent: str, ents: str, table: str):
    """One (question, sql, kind, used columns) from a random question template."""
    tb = rng.choice(text_cols)
    n = rng.choice(num_cols)
    others = [c for c in text_cols + num_cols if c[0] not in (tb[0], n[0])]
    out = rng.choice(others) if others else tb
    v = _value(rng, tb[2], split)
    kind = rng.choice(["where", "count", "extreme", "agg_where", "order", "compare", "and", "distinct"])
    if kind == "where":
        q = rng.choice([f"What is the {_words(out[0])} of the {ent} whose {_words(tb[0])} is {v}?",
                        f"Which {_words(out[0])} does the {ent} with {_words(tb[0])} {v} have?"])
        return q, f"SELECT {out[0]} FROM {table} WHERE {tb[0]} = {_lit(v)}", kind, {out[0], tb[0]}
    if kind == "count":
        q = rng.choice([f"How many {ents} have a {_words(tb[0])} of {v}?",
                        f"Count the {ents} whose {_words(tb[0])} is {v}."])
        return q, f"SELECT COUNT(*) FROM {table} WHERE {tb[0]} = {_lit(v)}", kind, {tb[0]}
    if kind == "extreme":
        hi = rng.random() < 0.5
        word = rng.choice(["highest", "largest"] if hi else ["lowest", "smallest"])
        q = f"What is the {word} {_words(n[0])} of any {ent}?"
        return q, f"SELECT {'MAX' if hi else 'MIN'}({n[0]}) FROM {table}", kind, {n[0]}
    if kind == "agg_where":
        fn, word = rng.choice([("AVG", "average"), ("SUM", "total"), ("MAX", "highest"), ("MIN", "lowest")])
        q = f"What is the {word} {_words(n[0])} of {ents} whose {_words(tb[0])} is {v}?"
        return q, f"SELECT {fn}({n[0]}) FROM {table} WHERE {tb[0]} = {_lit(v)}", kind, {n[0], tb[0]}
    if kind == "order":
        k = rng.randint(2, 5)
        hi = rng.random() < 0.5
        q = f"List the {_words(out[0])} of the {k} {ents} with the {'highest' if hi else 'lowest'} {_words(n[0])}."
        sql = f"SELECT {out[0]} FROM {table} ORDER BY {n[0]} {'DESC' if hi else 'ASC'} LIMIT {k}"
        return q, sql, kind, {out[0], n[0]}
    if kind == "compare":
        x = _value(rng, n[2], split)
        gt = rng.random() < 0.5
        q = f"Give the {_words(out[0])} of every {ent} with a {_words(n[0])} {'greater' if gt else 'less'} than {x}."
        return q, f"SELECT {out[0]} FROM {table} WHERE {n[0]} {'>' if gt else '<'} {x}", kind, {out[0], n[0]}
    if kind == "and":
        x = _value(rng, n[2], split)
        q = f"What is the {_words(out[0])} of the {ent} whose {_words(tb[0])} is {v} and whose {_words(n[0])} is {x}?"
        sql = f"SELECT {out[0]} FROM {table} WHERE {tb[0]} = {_lit(v)} AND {n[0]} = {x}"
        return q, sql, kind, {out[0], tb[0], n[0]}
    q = f"List the different {_words(tb[0])} values of the {ents}."
    return q, f"SELECT DISTINCT {tb[0]} FROM {table}", kind, {tb[0]}


def sql_prompt(schema: str, question: str) -> str:
    """The prompt format of vLLM's ``sql-lora`` example adapter (yard1/llama-2-7b-sql-lora-test)."""
    return f"[user] {SQL_INSTRUCTION}\n\ncontext: {schema}\n\nquestion: {question} [/user] [assistant]"


def sql_examples(split: str = "train", n: int = 500, seed: int = 0) -> list[dict]:
    """Text-to-SQL examples over random schemas; the completion is one canonical SQL query."""
    _check_split(split)
    rng = random.Random(f"sql/{split}/{seed}/{DATASET_VERSION}")
    out, seen = [], set()
    while len(out) < n:
        ent, ents, tables, cols = rng.choice(_DOMAINS)
        table = rng.choice(tables)
        text_cols = [c for c in cols if c[1] == "VARCHAR"]
        num_cols = [c for c in cols if c[1] == "INTEGER"]
        question, sql, kind, used = _sql_question(rng, split, text_cols, num_cols, ent, ents, table)
        extra = [c for c in cols if c[0] not in used]
        kept = rng.sample(extra, rng.randint(0, len(extra)))
        shown = [c for c in cols if c[0] in used or c in kept]
        rng.shuffle(shown)
        schema = f"CREATE TABLE {table} ({', '.join(f'{c[0]} {c[1]}' for c in shown)})"
        prompt = sql_prompt(schema, question)
        # Questions without a literal value (MAX of a column, DISTINCT, ...) cannot be split by
        # value, so the prompt's own hash decides which split may use it.
        if prompt in seen or is_heldout_value(prompt) != (split == "heldout"):
            continue
        seen.add(prompt)
        out.append({"prompt": prompt, "completion": " " + sql, "sql": sql, "kind": kind, "split": split})
    return out


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
    a, b = _value(rng, (2, 60), split), _value(rng, (2, 40), split)
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


def normalize_sql(sql: str) -> str:
    """Case, whitespace and a trailing semicolon do not count as differences."""
    return " ".join(sql.strip().rstrip(";").strip().lower().split())
