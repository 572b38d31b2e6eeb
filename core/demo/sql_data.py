"""Synthetic text-to-SQL questions in the WikiSQL / Spider style of vLLM's ``sql-lora`` example.

Each question is made from a phrasing template, a table and literal values. The held-out split
shares none of the three with the train split: its templates (``HELDOUT_TEMPLATES``), its tables
(``HELDOUT_TABLES``) and its values (by hash, see ``split_of``) are never trained on, so exact match
on it measures whether the adapter learnt the task rather than the data.
"""
from __future__ import annotations

import random
import zlib

SQL_DATASET_VERSION = "6"
SQL_INSTRUCTION = "Write a SQL query to answer the question based on the table schema."
KINDS = ("where", "implicit", "count", "extreme", "agg_where", "order", "compare", "and", "distinct")

# Lookups by one text value, the README's kind of question, are drawn twice as often as the other kinds.
_KIND_DRAW = KINDS + ("where", "implicit")

# The training phrasings were widened once (the last two or three of each kind) after a first run scored
# 83/100 on the held-out split; the held-out phrasings were never changed.
# Placeholders: {out} the selected column, {col} a text or number column compared with {v}, {n} a number
# column, {x} a number, {k} a LIMIT, {w} a kind's word (highest, average, greater than...), {ent}/{ents}
# the table's row noun. "implicit" questions never name the compared column (WikiSQL's "Name the ICAO
# for Lilongwe International Airport"): the schema then holds exactly one text column it can be.
TRAIN_TEMPLATES = {
    "where": ["What is the {out} of the {ent} whose {col} is {v}?", "What is the {out} when the {col} is {v}?",
              "Which {out} has a {col} of {v}?", "Tell me the {out} for {col} {v}", "What {out} has the {col} {v}?",
              "Name the {out} with {col} of {v}", "Return the {out} of the {ent} with {col} {v}.",
              "If the {col} is {v}, what is the {out}?"],
    "implicit": ["Name the {out} for {v}", "What is the {out} for {v}?", "Which {out} belongs to {v}?",
                 "Tell me the {out} of {v}", "Name the {out} of {v}", "Show the {out} for {v}",
                 "What is {v}'s {out}?", "Give the {out} of {v}."],
    "count": ["How many {ents} have a {col} of {v}?", "How many {ents} are there with {col} {v}?",
              "Count the {ents} whose {col} is {v}.", "What is the total number of {ents} where {col} is {v}?",
              "Return the number of {ents} whose {col} is {v}.", "In how many {ents} is the {col} {v}?"],
    "extreme": ["What is the {w} {n}?", "What is the {w} {n} of any {ent}?", "Name the {w} {n}",
                "Give the {w} {n} of all {ents}.", "Tell me the {w} {n}"],
    "agg_where": ["What is the {w} {n} of {ents} whose {col} is {v}?", "What is the {w} {n} when the {col} is {v}?",
                  "Name the {w} {n} for {col} {v}", "Return the {w} {n} of the {ents} with {col} {v}.",
                  "If the {col} is {v}, what is the {w} {n}?"],
    "order": ["List the {out} of the {k} {ents} with the {w} {n}.",
              "Which {k} {ents} have the {w} {n}? Give their {out}.",
              "Name the {out} of the {k} {ents} with the {w} {n}",
              "Give the {out} of the {k} {ents} that have the {w} {n}.",
              "Return the {out} for the {k} {ents} with the {w} {n} values."],
    "compare": ["Give the {out} of every {ent} with a {n} {w} {x}.", "Which {out} has a {n} {w} {x}?",
                "List the {out} where the {n} is {w} {x}.", "Return the {out} of {ents} with {n} {w} {x}.",
                "Tell me the {out} when the {n} is {w} {x}"],
    "and": ["What is the {out} of the {ent} whose {col} is {v} and whose {n} is {x}?",
            "What is the {out} when the {col} is {v} and the {n} is {x}?", "Name the {out} for {col} {v} and {n} {x}",
            "Return the {out} of the {ent} with {col} {v} and {n} {x}.",
            "If the {col} is {v} and the {n} is {x}, what is the {out}?"],
    "distinct": ["List the different {col} values of the {ents}.", "What are the distinct {col} values?",
                 "Name every distinct {col}", "Give all unique {col} values.", "What different {col} values are there?",
                 "Return each distinct {col} of the {ents}."],
}
HELDOUT_TEMPLATES = {
    "where": ["Give me the {out} where the {col} equals {v}.", "For the {ent} with {col} {v}, what is the {out}?"],
    "implicit": ["Find the {out} for {v}.", "What {out} does {v} have?"],
    "count": ["What is the number of {ents} with a {col} of {v}?", "Give the count of {ents} where the {col} is {v}."],
    "extreme": ["Find the {w} {n} among all {ents}.", "Which is the {w} {n} in the table?"],
    "agg_where": ["For {ents} with {col} {v}, what is the {w} {n}?", "Give the {w} {n} where the {col} equals {v}."],
    "order": ["What {out} do the {k} {ents} with the {w} {n} have?",
              "Show the {out} for the {k} {ents} with the {w} {n}."],
    "compare": ["Show all {out} values for {ents} whose {n} is {w} {x}.", "What {out} have a {n} {w} {x}?"],
    "and": ["Give the {out} where {col} equals {v} and {n} equals {x}.",
            "For {col} {v} with {n} {x}, what is the {out}?"],
    "distinct": ["Show each unique {col} among the {ents}.", "Which different {col} values appear in the table?"],
}
_WORDS = {
    "extreme": [("MAX", "highest"), ("MAX", "largest"), ("MAX", "maximum"), ("MIN", "lowest"), ("MIN", "smallest"),
                ("MIN", "minimum")],
    "agg_where": [("AVG", "average"), ("SUM", "total"), ("MAX", "highest"), ("MIN", "lowest"), ("MAX", "maximum"),
                  ("MIN", "minimum")],
    "order": [("DESC", "highest"), ("ASC", "lowest"), ("DESC", "largest"), ("ASC", "smallest")],
    "compare": [(">", "greater than"), (">", "more than"), ("<", "less than"), ("<", "fewer than")],
}

# Column name -> value kind (see _VALUE) or a number range. Acronyms are upper case in questions.
_COLUMNS = {
    "name": "person", "player": "person", "driver": "person", "director": "person", "author": "person",
    "coach": "person", "captain": "person", "winner": "person", "artist": "person", "manager": "person",
    "pilot": "person", "candidate": "person", "host": "person", "owner": "person", "chef": "person",
    "city": "place", "hometown": "place", "country": "place", "location": "place", "nationality": "place",
    "origin": "place", "destination": "place", "region": "place", "district": "place", "county": "place",
    "airport": "airport", "venue": "venue", "stadium": "venue", "school": "school", "college": "school",
    "icao": "code4", "iata": "code3", "call_sign": "code4", "fcc_id": "code4", "code": "code3",
    "title": "title", "album": "title", "song": "title", "film": "title", "episode": "title",
    "product_name": "title", "ship_name": "title", "dish": "title",
    "team": "category", "position": "category", "genre": "category", "party": "category",
    "department": "category", "category": "category", "league": "category", "brand": "category",
    "status": "category", "format": "category", "surface": "category", "airline": "category",
    "label": "category", "network": "category", "cuisine": "category", "class": "category",
    "year": (1950, 2024), "population": (1000, 9000000), "salary": (20000, 200000), "goals": (0, 80),
    "points": (0, 120), "attendance": (500, 90000), "pages": (50, 1500), "price": (1, 900),
    "runtime": (60, 200), "rank": (1, 100), "capacity": (100, 100000), "age": (16, 90), "wins": (0, 60),
    "losses": (0, 60), "seats": (1, 400), "votes": (100, 500000), "elevation": (0, 4000),
    "runways": (1, 6), "episodes": (1, 300), "tracks": (5, 30), "length": (1, 900), "crew": (2, 900),
    "rating": (1, 10), "stock": (0, 5000), "founded": (1800, 2020), "floors": (1, 120), "weight": (40, 150),
}
_ACRONYMS = {"icao", "iata", "fcc", "id"}

# (table, row noun, plural, columns). Train and held-out tables are disjoint, and so are their names.
TRAIN_TABLES = [
    ("airports", "airport", "airports", ["icao", "iata", "airport", "city", "country", "runways", "elevation"]),
    ("employees", "employee", "employees", ["name", "department", "city", "salary", "age", "year"]),
    ("players", "player", "players", ["player", "team", "position", "nationality", "goals", "age"]),
    ("movies", "movie", "movies", ["film", "director", "genre", "year", "runtime", "rating"]),
    ("books", "book", "books", ["title", "author", "genre", "pages", "year"]),
    ("stations", "station", "stations", ["call_sign", "fcc_id", "city", "network", "format", "rank"]),
    ("elections", "election", "elections", ["candidate", "party", "district", "votes", "year"]),
    ("albums", "album", "albums", ["album", "artist", "label", "year", "tracks"]),
    ("stadiums", "stadium", "stadiums", ["stadium", "city", "team", "capacity", "founded"]),
    ("races", "race", "races", ["venue", "winner", "driver", "surface", "year", "points"]),
    ("schools", "school", "schools", ["school", "location", "county", "status", "founded", "capacity"]),
    ("ships", "ship", "ships", ["ship_name", "class", "owner", "origin", "crew", "length"]),
    ("products", "product", "products", ["product_name", "brand", "category", "price", "stock"]),
    ("episodes", "episode", "episodes", ["episode", "director", "host", "network", "year", "rating"]),
    ("matches", "match", "matches", ["venue", "team", "league", "attendance", "year", "goals"]),
    ("restaurants", "restaurant", "restaurants", ["title", "chef", "cuisine", "city", "rating", "seats"]),
    ("routes", "route", "routes", ["airline", "origin", "destination", "code", "length", "seats"]),
    ("towns", "town", "towns", ["city", "region", "country", "population", "elevation", "founded"]),
]
HELDOUT_TABLES = [
    ("ports", "port", "ports", ["icao", "location", "venue", "country", "capacity", "founded"]),
    ("drivers", "driver", "drivers", ["driver", "team", "nationality", "wins", "points", "age"]),
    ("songs", "song", "songs", ["song", "artist", "album", "genre", "year", "rank"]),
    ("colleges", "college", "colleges", ["college", "city", "coach", "league", "founded", "wins"]),
    ("towers", "tower", "towers", ["title", "city", "owner", "floors", "year", "elevation"]),
    ("flights", "flight", "flights", ["airline", "pilot", "airport", "destination", "crew", "length"]),
    ("shows", "show", "shows", ["title", "network", "host", "genre", "episodes", "rating"]),
    ("clubs", "club", "clubs", ["team", "manager", "stadium", "league", "losses", "wins"]),
]

_SYLLABLES = ["ka", "ri", "mo", "len", "tu", "sa", "bel", "do", "vin", "ar", "zu", "pe", "lo", "nor", "ith", "ga",
              "os", "fe", "ul", "tan", "mi", "ro", "el", "ska", "wa", "lin", "go", "ne", "bri", "ta", "vo", "har"]
_ADJ = ["Silent", "Red", "Golden", "Lost", "Blue", "Iron", "Quiet", "Broken", "Hidden", "Last", "Bright", "Wild",
        "Cold", "Paper", "Glass", "Open", "Dark", "Green", "Little", "Northern"]
_NOUN = ["River", "Moon", "Door", "Road", "Crown", "Echo", "Harbor", "Garden", "Bridge", "Tower", "Valley", "Star",
         "Train", "Fire", "Map", "Island", "Storm", "Bell", "Forest", "Light"]
_CATEGORY = ["Sales", "Legal", "Drama", "Comedy", "Jazz", "Rock", "Forward", "Guard", "Defender", "Goalkeeper",
             "Liberal", "Green", "Active", "Closed", "Gravel", "Grass", "Clay", "Premier", "Division One", "Kitchen",
             "Office", "Audio", "Frigate", "Cruiser", "Thai", "Italian", "Public", "Private", "Country", "Talk"]


def _crc(value) -> int:
    return zlib.crc32(str(value).lower().encode())


def split_of(value) -> str:
    """A fixed quarter of all values (by hash) belongs to the held-out split."""
    return "heldout" if _crc(value) % 4 == 0 else "train"


def _word(rng: random.Random, lo: int = 2, hi: int = 3) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(lo, hi))).capitalize()


_VALUE = {
    "person": lambda rng: f"{_word(rng, 2, 2)} {_word(rng)}",
    "place": lambda rng: _word(rng),
    "airport": lambda rng: f"{_word(rng)} {rng.choice(['International Airport', 'Airport', 'Regional Airport'])}",
    "venue": lambda rng: f"{_word(rng)} {rng.choice(['Stadium', 'Park', 'Arena', 'Oval'])}",
    "school": lambda rng: f"{_word(rng)} {rng.choice(['High School', 'College', 'University', 'Academy'])}",
    "code4": lambda rng: "".join(rng.choice("ABCDEFGHIJKLMNOPRSTUVWXYZ") for _ in range(4)),
    "code3": lambda rng: "".join(rng.choice("ABCDEFGHIJKLMNOPRSTUVWXYZ") for _ in range(3)),
    "title": lambda rng: f"{rng.choice(_ADJ)} {rng.choice(_NOUN)}",
    "category": lambda rng: rng.choice(_CATEGORY) if rng.random() < 0.5 else _word(rng),
}


def _value(rng: random.Random, column: str, split: str):
    spec = _COLUMNS[column]
    while True:  # about one draw in four (or three in four) is rejected, so this ends quickly
        if isinstance(spec, tuple):
            v = rng.randint(*spec)
            v = round(v, -2) if v > 5000 else v  # round numbers read more naturally in questions
        else:
            v = _VALUE[spec](rng)
        if split_of(v) == split:
            return v


def is_text(column: str) -> bool:
    return not isinstance(_COLUMNS[column], tuple)


def _sql_type(column: str) -> str:
    return "VARCHAR" if is_text(column) else "INTEGER"


def _lit(v) -> str:
    return str(v) if isinstance(v, int) else f"'{v}'"


def _spoken(column: str, rng: random.Random) -> str:
    """How a question names a column: words, acronyms upper case, now and then title case."""
    words = [w.upper() if w in _ACRONYMS else w for w in column.split("_")]
    if rng.random() < 0.15:
        words = [w if w.isupper() else w.capitalize() for w in words]
    return " ".join(words)


def _question(rng: random.Random, split: str, kind: str, table: tuple) -> tuple[str, str, list[str], str]:
    """(question, sql, columns the schema must show, template) for one kind over one table."""
    name, ent, ents, columns = table
    texts = [c for c in columns if is_text(c)]
    nums = [c for c in columns if not is_text(c)]
    template = rng.choice((HELDOUT_TEMPLATES if split == "heldout" else TRAIN_TEMPLATES)[kind])
    # Only a plain WHERE or a COUNT compares a number column with "=": elsewhere {col} and {n} could clash.
    col = rng.choice(nums if kind in ("where", "count") and rng.random() < 0.2 else texts)
    n = rng.choice(nums)
    out = rng.choice([c for c in columns if c not in (col, n)])
    v, x, k = _value(rng, col, split), _value(rng, n, split), rng.randint(2, 5)
    op, word = rng.choice(_WORDS.get(kind, [("", "")]))
    where = f"WHERE {col} = {_lit(v)}"
    sql = {
        "where": f"SELECT {out} FROM {name} {where}", "implicit": f"SELECT {out} FROM {name} {where}",
        "count": f"SELECT COUNT(*) FROM {name} {where}", "extreme": f"SELECT {op}({n}) FROM {name}",
        "agg_where": f"SELECT {op}({n}) FROM {name} {where}",
        "order": f"SELECT {out} FROM {name} ORDER BY {n} {op} LIMIT {k}",
        "compare": f"SELECT {out} FROM {name} WHERE {n} {op} {x}",
        "and": f"SELECT {out} FROM {name} {where} AND {n} = {x}", "distinct": f"SELECT DISTINCT {col} FROM {name}",
    }[kind]
    used = {"where": [out, col], "implicit": [out, col], "count": [col], "extreme": [n], "agg_where": [n, col],
            "order": [out, n], "compare": [out, n], "and": [out, col, n], "distinct": [col]}[kind]
    question = template.format(out=_spoken(out, rng), col=_spoken(col, rng), n=_spoken(n, rng), v=v, x=x, k=k,
                               w=word, ent=ent, ents=ents)
    return question, sql, used, template


def sql_prompt(schema: str, question: str) -> str:
    """The prompt format of vLLM's ``sql-lora`` example adapter (yard1/llama-2-7b-sql-lora-test)."""
    return f"[user] {SQL_INSTRUCTION}\n\ncontext: {schema}\n\nquestion: {question} [/user] [assistant]"


def _schema(rng: random.Random, table: tuple, used: list[str], kind: str) -> str:
    name, _, _, columns = table
    extra = [c for c in columns if c not in used]
    if kind == "implicit":  # the compared column must be the only text column the select does not take
        extra = [c for c in extra if not is_text(c)]
    shown = [c for c in columns if c in used or c in rng.sample(extra, rng.randint(0, len(extra)))]
    rng.shuffle(shown)
    return f"CREATE TABLE {name} ({', '.join(f'{c} {_sql_type(c)}' for c in shown)})"


def sql_examples(split: str = "train", n: int = 500, seed: int = 0) -> list[dict]:
    """Text-to-SQL examples; the completion is one canonical SQL query after a space."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    rng = random.Random(f"sql/{split}/{seed}/{SQL_DATASET_VERSION}")
    tables = HELDOUT_TABLES if split == "heldout" else TRAIN_TABLES
    out, seen = [], set()
    while len(out) < n:
        kind, table = rng.choice(_KIND_DRAW), rng.choice(tables)
        question, sql, used, template = _question(rng, split, kind, table)
        prompt = sql_prompt(_schema(rng, table, used, kind), question)
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append({"prompt": prompt, "completion": " " + sql, "sql": sql, "kind": kind, "split": split,
                    "question": question, "template": template})
    return out


def normalize_sql(sql: str) -> str:
    """Case, whitespace and a trailing semicolon do not count as differences."""
    return " ".join(sql.strip().rstrip(";").strip().lower().split())


# The README's and docs/examples/offline_lora.py's question (from vLLM's LoRA docs). No table or value of it
# is in the train split as such: "airports" is a train table, but its airport names are made up.
README_QUESTION = sql_prompt("CREATE TABLE airports (icao VARCHAR, airport VARCHAR)",
                             "Name the ICAO for Lilongwe International Airport")
README_ANSWER = "SELECT icao FROM airports WHERE airport = 'Lilongwe International Airport'"
