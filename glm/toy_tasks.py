"""Embedded toy fine-tuning sets for `make demo-finetune`, made from a seed alone like the toy corpus.

`instruction_set` asks questions about the facts of `glm.corpus.generate_corpus`'s world (the same
made-up people, records, additions and sequences for the same seed and size), so a model pretrained on
that corpus has seen every answer stated and fine-tuning only teaches it to answer questions:
"What is Belia's favourite colour?" -> "red.". Train and held-out questions ask about different items
(a person's attribute, a record's field, an addition, a sequence), so a held-out answer was never a
fine-tuning target, in either language.

`classification_set` labels sentences of that world: ``task="topic"`` (which attribute a fact sentence
states: city, colour, pet or age) or ``task="fact-check"`` (whether the sentence agrees with the corpus:
true or false). `classification_task` gives each task's labels, a cloze template with one ``[MASK]`` and
the verbalizer of each label, for `glm.cloze`.

Everything draws through the corpus's version-stable generator, so a seed gives the same sets on every
platform; `write_jsonl` writes rows atomically.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Literal, Sequence, Union, get_args

from .corpus import (
    _ATTR_VALUES,
    ATTRIBUTES,
    LANGUAGES,
    SIZES,
    CorpusSize,
    CorpusSizeName,
    _make_people,
    _make_records,
    _Rng,
)
from .errors import ArgumentError, DataError
from .files import atomic_write

Lang = Literal["en", "zh", "both"]
TaskName = Literal["topic", "fact-check"]
TASKS: tuple[str, ...] = get_args(TaskName)
INSTRUCTION_KINDS = ("fact", "record", "arithmetic", "sequence")

_END = {"en": ".", "zh": "。"}
_QUESTIONS = {
    "city": {"en": "Where does {p} live?", "zh": "{p}住在哪里？"},
    "colour": {"en": "What is {p}'s favourite colour?", "zh": "{p}最喜欢什么颜色？"},
    "pet": {"en": "What pet does {p} have?", "zh": "{p}养了什么宠物？"},
    "age": {"en": "How old is {p}?", "zh": "{p}今年几岁？"},
}
_RECORD_QUESTION = {"en": "What is the {f} of id {id}?", "zh": "编号{id}的{f}是什么？"}
_RECORD_FIELD_NAMES = {"colour": ("colour", "颜色"), "shape": ("shape", "形状")}
_ADD_QUESTION = {"en": "What is {a} plus {b}?", "zh": "{a}加{b}等于多少？"}
_SEQ_QUESTION = {"en": "What comes after {nums}?", "zh": "{nums}之后是什么？"}
_SEQ_SHOWN = 4

# Fact sentences for classification: the corpus's two templates per attribute, and two it never uses.
_FACT_SENTENCES = {
    "city": {"en": ("{p} lives in {v}.", "The home of {p} is {v}.", "{p} moved to {v} long ago.",
                    "You can visit {p} in {v}."),
             "zh": ("{p}住在{v}。", "{p}的家在{v}。", "{p}很早就搬到了{v}。", "去{v}可以找到{p}。")},
    "colour": {"en": ("{p}'s favourite colour is {v}.", "{p} likes the colour {v}.", "{p} paints everything {v}.",
                      "The colour {p} loves is {v}."),
               "zh": ("{p}最喜欢的颜色是{v}。", "{p}喜欢{v}。", "{p}把东西都涂成{v}。", "{p}爱的颜色是{v}。")},
    "pet": {"en": ("{p} has a pet {v}.", "The pet of {p} is a {v}.", "{p} feeds a {v} every morning.",
                   "A {v} lives with {p}."),
            "zh": ("{p}养了一只{v}。", "{p}的宠物是{v}。", "{p}每天早上喂{v}。", "{p}家里有一只{v}。")},
    "age": {"en": ("{p} is {v} years old.", "The age of {p} is {v}.", "{p} turned {v} this year.",
                   "{p} has lived for {v} years."),
            "zh": ("{p}今年{v}岁。", "{p}的年龄是{v}岁。", "{p}刚满{v}岁。", "{p}已经活了{v}年。")},
}


@dataclass(frozen=True)
class ToyClassification:
    """A classification task of the toy world: its labels, a cloze ``template`` (``{text}`` and one
    ``[MASK]``) and the ``verbalizers`` (label -> the words that fill the blank)."""

    name: str
    lang: str
    labels: tuple[str, ...]
    template: str
    verbalizers: dict[str, str] = field(default_factory=dict)


_TASKS = {
    ("topic", "en"): ToyClassification("topic", "en", ATTRIBUTES, "{text} This is about [MASK].",
                                       {"city": "city", "colour": "colour", "pet": "pet", "age": "age"}),
    ("topic", "zh"): ToyClassification("topic", "zh", ATTRIBUTES, "{text}这句话说的是[MASK]。",
                                       {"city": "城市", "colour": "颜色", "pet": "宠物", "age": "年龄"}),
    ("fact-check", "en"): ToyClassification("fact-check", "en", ("true", "false"), "{text} Is that right? [MASK].",
                                            {"true": "yes", "false": "no"}),
    ("fact-check", "zh"): ToyClassification("fact-check", "zh", ("true", "false"), "{text}对吗？[MASK]。",
                                            {"true": "对", "false": "错"}),
}


def classification_task(task: str = "topic", lang: str = "en") -> ToyClassification:
    """The labels, cloze template and verbalizers of a `classification_set` task in ``lang``."""
    if (task, lang) not in _TASKS:
        raise ArgumentError(f"classification_task: unknown task {task!r} / lang {lang!r}; use task one of "
                            f"{', '.join(TASKS)} with lang 'en' or 'zh'")
    return _TASKS[(task, lang)]


# ---------------------------------------------------------------------------------------------

def _check_counts(fn: str, seed: object, n_train: object, n_heldout: object) -> None:
    for name, v, low in (("seed", seed, 0), ("n_train", n_train, 1), ("n_heldout", n_heldout, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise ArgumentError(f"{fn}: {name} must be an int >= {low}, got {v!r}")


def _langs(fn: str, lang: object, allowed: Sequence[str]) -> tuple[str, ...]:
    if lang not in allowed:
        raise ArgumentError(f"{fn}: lang={lang!r}; use one of {', '.join(map(repr, allowed))}")
    return LANGUAGES if lang == "both" else (lang,)  # type: ignore[return-value]


def _size(fn: str, size: Union[str, CorpusSize]) -> CorpusSize:
    if isinstance(size, CorpusSize):
        return size
    if size not in SIZES:
        raise ArgumentError(f"{fn}: unknown size {size!r}; use the corpus size the model was pretrained on "
                            f"({', '.join(SIZES)})")
    return SIZES[size]  # type: ignore[index]


def _world(seed: int, sz: CorpusSize):
    # The corpus draws its people, then its records, first from a generator seeded with the seed alone;
    # the same draws give the same world (tests/test_toy_tasks.py checks every fact against the corpus).
    rng = _Rng(seed)
    return _make_people(rng, sz.n_people), _make_records(rng, sz.n_records)


def _interleave(groups: list[list], n: int) -> list:
    """Up to ``n`` items, round robin over ``groups`` (each already in a seeded order)."""
    out, cursor = [], 0
    while len(out) < n and any(cursor < len(g) for g in groups):
        out += [g[cursor] for g in groups if cursor < len(g)][: n - len(out)]
        cursor += 1
    return out


def _row(question: str, answer: str, kind: str, lang: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "kind": kind, "lang": lang}


def instruction_set(seed: int = 0, n_train: int = 200, n_heldout: int = 60, lang: Lang = "en", *,
                    size: Union[CorpusSizeName, CorpusSize] = "tiny") -> tuple[list[dict], list[dict]]:
    """``(train_rows, heldout_rows)`` of ``{"messages": [user question, assistant answer], "kind", "lang"}``
    about the world of ``generate_corpus(seed, size)``: a person's city, colour, pet or age, a record's
    colour or shape, an addition, the next number of a sequence. Items are split between the two sets
    (all languages of one item go to the same set), and each set is drawn round robin over the kinds."""
    fn = "instruction_set"
    _check_counts(fn, seed, n_train, n_heldout)
    langs = _langs(fn, lang, ("en", "zh", "both"))
    sz = _size(fn, size)
    people, records = _world(seed, sz)
    items: dict[str, list[list[dict]]] = {k: [] for k in INSTRUCTION_KINDS}  # kind -> items -> rows per lang
    for person in people:
        for attr in ATTRIBUTES:
            items["fact"].append([_row(_QUESTIONS[attr][lg].format(p=person.name[lg]),
                                       person.values[attr][LANGUAGES.index(lg)] + _END[lg], "fact", lg)
                                  for lg in langs])
    for rec in records:
        for fld, names in _RECORD_FIELD_NAMES.items():
            items["record"].append([_row(_RECORD_QUESTION[lg].format(f=names[LANGUAGES.index(lg)], id=rec.id),
                                         rec.values[fld][LANGUAGES.index(lg)] + _END[lg], "record", lg)
                                    for lg in langs])
    n = sz.max_operand + 1
    for a in range(n):
        for b in range(n):
            items["arithmetic"].append([_row(_ADD_QUESTION[lg].format(a=a, b=b), f"{a + b}{_END[lg]}", "arithmetic",
                                             lg) for lg in langs])
    for start in range(sz.max_start + 1):
        for step in range(1, sz.max_step + 1):
            nums = " ".join(str(start + i * step) for i in range(_SEQ_SHOWN))
            items["sequence"].append([_row(_SEQ_QUESTION[lg].format(nums=nums), f"{start + _SEQ_SHOWN * step}"
                                           f"{_END[lg]}", "sequence", lg) for lg in langs])
    rng = _Rng(f"instruction_set:{seed}")
    for group in items.values():
        rng.shuffle(group)
    per_item = len(langs)
    total = sum(len(g) for g in items.values()) * per_item
    if n_train + n_heldout > total:
        raise ArgumentError(f"{fn}: asked for {n_train} + {n_heldout} rows but size {sz} in {len(langs)} "
                            f"language(s) has {total} distinct questions; ask for fewer")
    # Held-out items first, round robin over kinds; the rest of every kind is the training pool.
    held_items = _interleave(list(items.values()), -(-n_heldout // per_item))
    held_ids = {id(x) for x in held_items}
    train_items = _interleave([[x for x in g if id(x) not in held_ids] for g in items.values()],
                              -(-n_train // per_item))
    heldout = [r for item in held_items for r in item][:n_heldout]
    train = [r for item in train_items for r in item][:n_train]
    if len(train) < n_train:
        raise ArgumentError(f"{fn}: only {len(train)} training rows remain after {n_heldout} held-out ones; ask "
                            f"for fewer")
    return train, heldout


def classification_set(seed: int = 0, n_train: int = 200, n_heldout: int = 48, task: TaskName = "topic",
                       lang: Literal["en", "zh"] = "en", *,
                       size: Union[CorpusSizeName, CorpusSize] = "tiny") -> tuple[list[dict], list[dict]]:
    """``(train_rows, heldout_rows)`` of ``{"text": sentence, "label": label}`` about the world of
    ``generate_corpus(seed, size)``. The labels of ``task`` (`classification_task`) take turns, so both
    sets are balanced to within one row per label.

    ``topic``: a fact sentence in one of four templates per attribute (the corpus's two and two it never
    uses) -> the attribute it states; train and held-out sentences differ (person, attribute or template).
    ``fact-check``: a sentence in one of the corpus's templates with the person's own value (``true``) or
    another value of the attribute (``false``); each (person, attribute) pair gives one of each, and
    train and held-out ask about different pairs, so a held-out answer is known only from pretraining.
    Training rows repeat when ``n_train`` exceeds the distinct sentences (fact-check draws a fresh
    template and wrong value each time); held-out rows never do."""
    fn = "classification_set"
    _check_counts(fn, seed, n_train, n_heldout)
    lg = _langs(fn, lang, ("en", "zh"))[0]
    if task not in TASKS:
        raise ArgumentError(f"{fn}: unknown task {task!r}; use one of {', '.join(TASKS)}")
    labels = classification_task(task, lg).labels
    sz = _size(fn, size)
    people, _ = _world(seed, sz)
    li = LANGUAGES.index(lg)
    rng = _Rng(f"classification_set:{task}:{seed}")

    def too_few() -> ArgumentError:
        return ArgumentError(f"{fn}: size {sz} has too few sentences for {n_heldout} held-out rows of task {task!r} "
                             f"and training rows about other ones; ask for fewer held-out rows or a larger size")

    if task == "topic":
        groups = {a: [(i, t) for i in range(len(people)) for t in range(len(_FACT_SENTENCES[a][lg]))]
                  for a in ATTRIBUTES}
        for g in groups.values():
            rng.shuffle(g)
        n_held = -(-n_heldout // len(labels))
        if any(len(g) <= n_held for g in groups.values()):
            raise too_few()

        def topic_row(attr: str, i: int, t: int) -> dict:
            text = _FACT_SENTENCES[attr][lg][t].format(p=people[i].name[lg], v=people[i].values[attr][li])
            return {"text": text, "label": attr}

        heldout = [topic_row(lab, *groups[lab][k // len(labels)])
                   for k, lab in ((k, labels[k % len(labels)]) for k in range(n_heldout))]
        train = [topic_row(lab, *groups[lab][n_held + (k // len(labels)) % (len(groups[lab]) - n_held)])
                 for k, lab in ((k, labels[k % len(labels)]) for k in range(n_train))]
        return train, heldout

    pairs = [(i, a) for i in range(len(people)) for a in ATTRIBUTES]
    rng.shuffle(pairs)
    n_held = -(-n_heldout // 2)
    if len(pairs) <= n_held:
        raise too_few()

    def check_row(i: int, attr: str, label: str) -> dict:
        own = people[i].values[attr]
        value = own if label == "true" else rng.choice([v for v in _ATTR_VALUES[attr] if v != own])
        template = _FACT_SENTENCES[attr][lg][rng.below(2)]  # the corpus states facts in its two templates
        return {"text": template.format(p=people[i].name[lg], v=value[li]), "label": label}

    heldout = [check_row(*pairs[k // 2], labels[k % 2]) for k in range(n_heldout)]
    rest = pairs[n_held:]
    train = [check_row(*rest[(k // 2) % len(rest)], labels[k % 2]) for k in range(n_train)]
    return train, heldout


def write_jsonl(rows: Sequence[dict], path: str) -> str:
    """Write ``rows`` as JSONL (one object per line, UTF-8) to ``path`` atomically; returns the path.
    A row that is not a JSON object is refused before anything is written."""
    path = os.fspath(path)
    lines = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"write_jsonl: row {i} is a {type(row).__name__}, not a dict; every row is one JSON "
                            f"object")
        try:
            lines.append(json.dumps(row, ensure_ascii=False) + "\n")
        except (TypeError, ValueError) as e:
            raise DataError(f"write_jsonl: row {i} is not JSON data ({e}); use strings, numbers, lists and "
                            f"dicts") from None
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    atomic_write(path, "".join(lines).encode("utf-8"))
    return path


__all__ = ["TASKS", "INSTRUCTION_KINDS", "ToyClassification", "classification_task", "instruction_set",
           "classification_set", "write_jsonl"]
