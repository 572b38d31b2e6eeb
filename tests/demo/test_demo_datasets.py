"""The synthetic demo data: deterministic, well-formed, and held-out really held out."""
from __future__ import annotations

import re

from loraplex.demo import datasets, sql_data


def _literals(sql: str) -> set[str]:
    return set(re.findall(r"'([^']*)'", sql)) | set(re.findall(r"\b\d+\b", sql))


def test_sql_is_deterministic_and_seeded():
    a = datasets.sql_examples("train", 200, seed=0)
    assert a == datasets.sql_examples("train", 200, seed=0)
    assert a != datasets.sql_examples("train", 200, seed=1)
    # A shorter request is a prefix of a longer one, so n can change without reshuffling.
    assert datasets.sql_examples("train", 50) == a[:50]


def test_sql_train_and_heldout_are_disjoint():
    train = datasets.sql_examples("train", 1500)
    held = datasets.sql_examples("heldout", 200)
    assert not {e["prompt"] for e in train} & {e["prompt"] for e in held}
    train_text_values = set().union(*(set(re.findall(r"'([^']*)'", e["sql"])) for e in train))
    held_text_values = set().union(*(set(re.findall(r"'([^']*)'", e["sql"])) for e in held))
    assert held_text_values and not train_text_values & held_text_values
    for e in held:
        numbers = re.findall(r"[<>=] (\d+)", e["sql"])
        assert all(sql_data.split_of(int(x)) == "heldout" for x in numbers), e["sql"]


def test_sql_heldout_templates_and_tables_are_unseen():
    """The held-out split's phrasings and tables never occur in training, and every template is used."""
    train = sql_data.TRAIN_TEMPLATES
    held = sql_data.HELDOUT_TEMPLATES
    assert set(train) == set(held) == set(sql_data.KINDS)
    assert not {t for ts in train.values() for t in ts} & {t for ts in held.values() for t in ts}
    assert not {t[0] for t in sql_data.TRAIN_TABLES} & {t[0] for t in sql_data.HELDOUT_TABLES}
    assert not {t[1] for t in sql_data.TRAIN_TABLES} & {t[1] for t in sql_data.HELDOUT_TABLES}

    held_used = {e["template"] for e in sql_data.sql_examples("heldout", 100)}
    assert held_used == {t for ts in held.values() for t in ts}
    train_used = {e["template"] for e in sql_data.sql_examples("train", 1600)}
    assert train_used == {t for ts in train.values() for t in ts}
    for e in sql_data.sql_examples("heldout", 100):  # the question really is the template filled in
        assert e["template"] in held[e["kind"]]
        head = e["template"].split("{")[0]
        assert e["question"].startswith(head) and e["question"][-1:] == e["template"][-1:]


def test_readme_question_is_not_trained_on():
    train = sql_data.sql_examples("train", 1600)
    assert sql_data.README_QUESTION not in {e["prompt"] for e in train}
    assert not any("Lilongwe" in e["prompt"] for e in train)
    # ...but its phrasing and shape are: "Name the <column> for <value>" over a two-column table.
    assert any(e["question"].startswith("Name the ICAO for ") for e in train)


def test_implicit_questions_have_one_possible_column():
    """"Name the X for V" names no column for V: the schema must leave exactly one text column for it."""
    for e in sql_data.sql_examples("train", 600) + sql_data.sql_examples("heldout", 100):
        if e["kind"] != "implicit":
            continue
        schema = re.search(r"CREATE TABLE \w+ \(([^)]*)\)", e["prompt"]).group(1)
        texts = [c.split()[0] for c in schema.split(", ") if c.endswith("VARCHAR")]
        selected = e["sql"].split()[1]
        assert len([c for c in texts if c != selected]) == 1, e["prompt"]


def test_sql_examples_are_well_formed():
    kinds = set()
    for e in datasets.sql_examples("train", 300) + datasets.sql_examples("heldout", 100):
        kinds.add(e["kind"])
        assert e["prompt"].startswith("[user] Write a SQL query") and e["prompt"].endswith("[/user] [assistant]")
        assert e["completion"] == " " + e["sql"] and e["sql"].startswith("SELECT ")
        table = re.search(r"CREATE TABLE (\w+) \(([^)]*)\)", e["prompt"])
        columns = {c.split()[0] for c in table.group(2).split(", ")}
        assert f"FROM {table.group(1)}" in e["sql"]
        used = set(re.findall(r"\b[a-z_]+\b", e["sql"])) - {table.group(1)}
        assert used <= columns, (used, columns)
    assert kinds == set(sql_data.KINDS)


def test_pirate_examples():
    train = datasets.pirate_examples("train", 200)
    assert train == datasets.pirate_examples("train", 200)
    held = datasets.pirate_examples("heldout", 15)
    assert len(train) == 200 and len(held) == 15
    assert not {e["prompt"] for e in train} & {e["prompt"] for e in held}
    assert all(datasets.has_pirate_marker(e["completion"]) for e in train)
    assert all(e["messages"] == [{"role": "user", "content": e["prompt"]}] for e in train)
    prompts = datasets.style_eval_prompts(30)
    assert len(prompts) == len(set(prompts)) == 30
    assert not set(prompts) & {e["prompt"] for e in datasets.pirate_examples("train", 400)}


def test_bad_split_is_a_value_error():
    import pytest

    with pytest.raises(ValueError, match="split must be"):
        sql_data.sql_examples("test", 3)


def test_markers_and_normalisation():
    assert datasets.has_pirate_marker("  Arr! Ahoy")
    assert datasets.has_pirate_marker("arrr matey")
    assert not datasets.has_pirate_marker("The capital of France is Paris. Arr!")
    assert datasets.normalize_sql(" select  A FROM t ;\n") == datasets.normalize_sql("SELECT a FROM t")
    assert datasets.normalize_sql("SELECT a FROM t WHERE x = 1") != datasets.normalize_sql("SELECT a FROM t")
