"""glm.toy_tasks: the embedded fine-tuning sets are deterministic, disjoint, balanced, and about the
facts the toy corpus of the same seed states."""
import json
import re
from collections import Counter

import pytest

from glm.corpus import generate_corpus
from glm.errors import ArgumentError, DataError
from glm.toy_tasks import (
    INSTRUCTION_KINDS,
    TASKS,
    classification_set,
    classification_task,
    instruction_set,
    write_jsonl,
)


def question(row):
    return row["messages"][0]["content"]


def answer(row):
    return row["messages"][1]["content"]


@pytest.mark.parametrize("lang", ["en", "zh", "both"])
def test_instruction_set_deterministic_disjoint_balanced(lang):
    train, held = instruction_set(3, 120, 40, lang)
    assert (train, held) == instruction_set(3, 120, 40, lang)
    assert (train, held) != instruction_set(4, 120, 40, lang)
    assert len(train) == 120 and len(held) == 40
    assert not {question(r) for r in train} & {question(r) for r in held}
    assert len({question(r) for r in train}) == 120
    per_item = 2 if lang == "both" else 1
    # questions per kind in the tiny world: 16 people x 4 attributes, 16 records x 2 fields, 10 x 10
    # additions, 16 starts x 4 steps
    available = {"fact": 64, "record": 32, "arithmetic": 100, "sequence": 64}
    held_counts = Counter(r["kind"] for r in held)
    for rows in (train, held):
        counts = Counter(r["kind"] for r in rows)
        assert set(counts) == set(INSTRUCTION_KINDS)
        top = max(counts.values())
        for kind, n in counts.items():
            # round robin: a kind falls behind only once it has no questions left
            exhausted = rows is train and n == available[kind] * per_item - held_counts[kind]
            assert top - n <= 2 * per_item or exhausted, counts
        for r in rows:
            assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
            assert r["lang"] in (("en", "zh") if lang == "both" else (lang,))


def test_instruction_set_items_stay_on_one_side_across_languages():
    train, held = instruction_set(0, 200, 60, "both")
    held_zh = {question(r) for r in held if r["lang"] == "zh"}
    for i, r in enumerate(held):
        if r["lang"] == "en" and i + 1 < len(held):
            assert question(held[i + 1]) in held_zh  # its Chinese twin comes right after it
    assert not {question(r) for r in train} & held_zh


def test_instruction_answers_are_stated_in_the_corpus():
    corpus = " ".join(generate_corpus(seed=0, size="tiny").train)
    train, held = instruction_set(0, 200, 60, "en")
    for r in train + held:
        q, a = question(r), answer(r).rstrip(".")
        if r["kind"] == "fact":
            person = re.match(r"(?:Where does|What is|What pet does|How old is) (\w+)", q).group(1)
            stated = re.findall(rf"{person}(?:'s favourite colour is| lives in| has a pet| is) (\w+)", corpus)
            stated += re.findall(rf"(?:The home of|The pet of|The age of) {person} is (?:a )?(\w+)", corpus)
            stated += re.findall(rf"{person} likes the colour (\w+)", corpus)
            assert a in stated, (q, a)
        elif r["kind"] == "record":
            field, rid = re.match(r"What is the (\w+) of id (\d+)", q).groups()
            assert re.search(rf"id {rid}: [^.]*{field} {a}[;.]", corpus), (q, a)
        elif r["kind"] == "arithmetic":
            x, y = map(int, re.findall(r"\d+", q))
            assert int(a) == x + y
        else:
            nums = list(map(int, re.findall(r"\d+", q)))
            assert int(a) - nums[-1] == nums[1] - nums[0]


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("lang", ["en", "zh"])
def test_classification_set(task, lang):
    train, held = classification_set(1, 100, 24, task, lang)
    assert (train, held) == classification_set(1, 100, 24, task, lang)
    labels = classification_task(task, lang).labels
    for rows, n in ((train, 100), (held, 24)):
        assert len(rows) == n
        counts = Counter(r["label"] for r in rows)
        assert set(counts) == set(labels) and max(counts.values()) - min(counts.values()) <= 1
    assert not {r["text"] for r in train} & {r["text"] for r in held}
    assert len({r["text"] for r in held}) == len(held)


def test_classification_labels_follow_from_the_text():
    # the corpus's two templates per attribute; a fact may be stated in either
    patterns = {"city": (r"(\w+) lives in (\w+)\.", r"The home of (\w+) is (\w+)\."),
                "colour": (r"(\w+)'s favourite colour is (\w+)\.", r"(\w+) likes the colour (\w+)\."),
                "pet": (r"(\w+) has a pet (\w+)\.", r"The pet of (\w+) is a (\w+)\."),
                "age": (r"(\w+) is (\d+) years old\.", r"The age of (\w+) is (\d+)\.")}

    def fact(sentence):
        for attr, pats in patterns.items():
            for pat in pats:
                m = re.fullmatch(pat, sentence)
                if m:
                    return (attr, m.group(1)), m.group(2)
        return None, None

    facts = {}
    for doc in generate_corpus(seed=0, size="tiny").train:
        for sentence in re.split(r"(?<=\.) ", doc):
            key, value = fact(sentence)
            if key:
                assert facts.setdefault(key, value) == value
    train, held = classification_set(0, 200, 48, "fact-check", "en")
    for r in train + held:
        key, value = fact(r["text"])
        assert key in facts and (facts[key] == value) == (r["label"] == "true"), r
    train, held = classification_set(0, 200, 48, "topic", "en")
    words = {"city": ("lives", "home", "moved", "visit"), "colour": ("colour", "paints"), "pet": ("pet", "feeds", "A "),
             "age": ("old", "age", "turned", "years")}
    for r in train + held:
        assert any(w in r["text"] for w in words[r["label"]]), r


def test_cloze_tasks_have_one_blank_and_a_verbalizer_per_label():
    for task in TASKS:
        for lang in ("en", "zh"):
            t = classification_task(task, lang)
            assert t.template.count("[MASK]") == 1 and "{text}" in t.template
            assert set(t.verbalizers) == set(t.labels)


def test_bad_arguments():
    with pytest.raises(ArgumentError, match="lang='fr'"):
        instruction_set(0, 10, 5, "fr")
    with pytest.raises(ArgumentError, match="n_train must be an int >= 1"):
        instruction_set(0, 0, 5)
    with pytest.raises(ArgumentError, match="distinct questions"):
        instruction_set(0, 10_000, 5)
    with pytest.raises(ArgumentError, match="unknown task"):
        classification_set(0, 10, 5, "sentiment")
    with pytest.raises(ArgumentError, match="too few sentences"):
        classification_set(0, 10, 500, "fact-check")
    with pytest.raises(ArgumentError, match="unknown size"):
        instruction_set(0, 10, 5, size="huge")


def test_write_jsonl_round_trip_and_refusal(tmp_path):
    train, _ = instruction_set(0, 10, 4, "both")
    path = write_jsonl(train, str(tmp_path / "sub" / "train.jsonl"))
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    assert rows == train
    before = open(path, "rb").read()
    with pytest.raises(DataError, match="row 1 is a str"):
        write_jsonl([train[0], "oops"], path)
    with pytest.raises(DataError, match="row 0 is not JSON data"):
        write_jsonl([{"x": {1, 2}}], path)
    assert open(path, "rb").read() == before
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["train.jsonl"]
