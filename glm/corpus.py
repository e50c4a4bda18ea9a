"""The embedded toy corpus for `make demo`, and the reader for user data.

`generate_corpus` builds, from a seed alone, templated English and Chinese documents about made-up
people, key-value records, additions and number sequences, plus held-out blank-infilling questions
whose single right answer is stated in, or inferable from, the training documents. Nothing is
downloaded. `read_documents` turns user text/JSONL files and globs into documents, with one clear
`DataError` per bad input. See docs/corpus.md for the kinds, sizes and measured baselines.
"""
from __future__ import annotations

import glob
import json
import os
import random
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Literal, Optional, Sequence, TypeVar, Union, get_args

from .errors import ArgumentError, DataError
from .files import atomic_write, fsync_dir

MASK = "[MASK]"
LANGUAGES = ("en", "zh")
# The order held-out examples are interleaved in (round robin over kind, then language).
KINDS = ("fact", "fact-paraphrase", "record", "arithmetic", "sequence")

T = TypeVar("T")


@dataclass(frozen=True)
class InfillExample:
    """One held-out question: ``text_with_blank`` holds exactly one ``[MASK]`` and ``answer`` fills it.

    ``evidence`` is the training sentence the answer can be recalled from (empty for ``sequence``,
    whose answer follows from the other numbers of the same line).
    """
    text_with_blank: str
    answer: str
    kind: str
    lang: str = ""
    evidence: str = ""


@dataclass(frozen=True)
class Corpus:
    train: list[str]
    heldout: list[InfillExample]


@dataclass(frozen=True)
class CorpusSize:
    """How much the generator makes. More entities and numbers mean more facts to learn per step."""
    n_people: int      # made-up people, 4 facts each (city, colour, pet, age)
    n_records: int     # key-value records "id 417: colour blue; shape star."
    max_operand: int   # additions a + b with 0 <= a, b <= max_operand
    max_start: int     # sequences start, start+step, ... (5 numbers) with 0 <= start <= max_start
    max_step: int      # and 1 <= step <= max_step
    n_train: int       # training documents (at least every fact once per language; see min_train_docs)
    n_heldout: int     # held-out examples, interleaved over kinds and languages


# The named sizes (what `glm train --corpus-size` offers).
CorpusSizeName = Literal["tiny", "small", "base"]

SIZES: dict[CorpusSizeName, CorpusSize] = {
    "tiny": CorpusSize(n_people=16, n_records=16, max_operand=9, max_start=15, max_step=4, n_train=1500, n_heldout=160),
    "small": CorpusSize(n_people=32, n_records=32, max_operand=12, max_start=20, max_step=4, n_train=4000,
                        n_heldout=200),
    "base": CorpusSize(n_people=64, n_records=64, max_operand=19, max_start=30, max_step=5, n_train=12000,
                       n_heldout=400),
}

# Fractions of items kept out of training so held-out questions about them are new text.
PARAPHRASE_WITHHELD = 0.25   # (person, attribute) pairs only ever stated with their first template
ARITHMETIC_WITHHELD = 0.3    # unordered pairs {a, b}: one order is never stated, the other always is
SEQUENCE_WITHHELD = 0.2      # (start, step) progressions never stated
# Mix of the documents added after every fact has been stated once.
DOC_WEIGHTS = (("profile", 0.4), ("record", 0.2), ("arithmetic", 0.2), ("sequence", 0.2))

# --- vocabulary: made-up names with a fixed Chinese rendering, so one entity is one entity in both languages
_ONSETS = (("Zor", "佐"), ("Bel", "贝"), ("Mir", "米"), ("Tal", "塔"), ("Quin", "昆"), ("Rav", "拉"), ("Sel", "塞"),
           ("Vor", "沃"), ("Nim", "尼"), ("Hal", "哈"), ("Fen", "芬"), ("Gor", "戈"))
_CODAS = (("an", "安"), ("ia", "娅"), ("et", "特"), ("io", "奥"), ("en", "恩"), ("ius", "尤斯"), ("a", "雅"),
          ("on", "翁"), ("is", "斯"), ("ek", "克"))
_CITIES = (("Kelda", "凯达"), ("Brisk", "布里"), ("Ostra", "欧卓"), ("Velm", "维姆"), ("Doran", "多兰"),
           ("Pell", "佩尔"), ("Umbra", "乌布"), ("Arvo", "阿福"), ("Tirn", "蒂林"), ("Lusk", "卢库"),
           ("Esker", "埃珂"), ("Norra", "诺亚"), ("Calder", "卡德"), ("Jorvik", "约维"), ("Wenlo", "温洛"),
           ("Ybar", "伊巴"))
_COLOURS = (("red", "红色"), ("blue", "蓝色"), ("green", "绿色"), ("yellow", "黄色"), ("purple", "紫色"),
            ("orange", "橙色"), ("black", "黑色"), ("white", "白色"), ("pink", "粉色"), ("grey", "灰色"),
            ("brown", "棕色"), ("gold", "金色"))
_ANIMALS = (("cat", "猫"), ("dog", "狗"), ("rabbit", "兔子"), ("parrot", "鹦鹉"), ("turtle", "乌龟"),
            ("hamster", "仓鼠"), ("fox", "狐狸"), ("monkey", "猴子"), ("duck", "鸭子"), ("goat", "山羊"))
_SHAPES = (("circle", "圆形"), ("square", "方形"), ("triangle", "三角形"), ("star", "星形"), ("heart", "心形"),
           ("diamond", "菱形"), ("oval", "椭圆形"), ("cross", "十字形"), ("arrow", "箭形"), ("crescent", "月牙形"))
_AGES = tuple((str(a), str(a)) for a in range(18, 71))

ATTRIBUTES = ("city", "colour", "pet", "age")
_ATTR_VALUES = {"city": _CITIES, "colour": _COLOURS, "pet": _ANIMALS, "age": _AGES}
# Per attribute and language: the first template states every fact; the second is the paraphrase
# that withheld pairs never get in training (the "fact-paraphrase" questions).
_FACT_TEMPLATES = {
    "city": {"en": ("{p} lives in {v}.", "The home of {p} is {v}."), "zh": ("{p}住在{v}。", "{p}的家在{v}。")},
    "colour": {"en": ("{p}'s favourite colour is {v}.", "{p} likes the colour {v}."),
               "zh": ("{p}最喜欢的颜色是{v}。", "{p}喜欢{v}。")},
    "pet": {"en": ("{p} has a pet {v}.", "The pet of {p} is a {v}."), "zh": ("{p}养了一只{v}。", "{p}的宠物是{v}。")},
    "age": {"en": ("{p} is {v} years old.", "The age of {p} is {v}."), "zh": ("{p}今年{v}岁。", "{p}的年龄是{v}岁。")},
}
_RECORD_FIELDS = {"en": {"colour": "colour {v}", "shape": "shape {v}"}, "zh": {"colour": "颜色{v}", "shape": "形状{v}"}}
_RECORD = {"en": "id {id}: {a}; {b}.", "zh": "编号{id}：{a}；{b}。"}
_ADD = {"en": "{a} plus {b} is {c}.", "zh": "{a}加{b}等于{c}。"}
_SEQ = {"en": "Sequence: {nums}.", "zh": "数列：{nums}。"}
_SEQ_LEN = 5
_JOIN = {"en": " ", "zh": ""}


class _Rng:
    """Draws only through ``random.Random.random()``, the one method whose stream Python promises to keep
    across versions and platforms (``randrange``/``shuffle``/``sample`` may change), so a seed gives the
    same corpus everywhere."""

    def __init__(self, seed: int) -> None:
        self._r = random.Random(seed)

    def below(self, n: int) -> int:
        return min(int(self._r.random() * n), n - 1)

    def uniform(self) -> float:
        return self._r.random()

    def chance(self, p: float) -> bool:
        return self._r.random() < p

    def choice(self, seq: Sequence[T]) -> T:
        return seq[self.below(len(seq))]

    def shuffle(self, xs: list) -> None:
        for i in range(len(xs) - 1, 0, -1):
            j = self.below(i + 1)
            xs[i], xs[j] = xs[j], xs[i]

    def sample(self, seq: Sequence[T], k: int) -> list[T]:
        xs = list(seq)
        self.shuffle(xs)
        return xs[:k]

    def between(self, lo: int, hi: int) -> int:
        """Uniform in [lo, hi]."""
        return lo + self.below(hi - lo + 1)


@dataclass(frozen=True)
class _Person:
    name: dict[str, str]                     # lang -> name
    values: dict[str, tuple[str, str]]       # attribute -> (en, zh)


@dataclass(frozen=True)
class _Record:
    id: int
    values: dict[str, tuple[str, str]]       # field -> (en, zh)


def _lang_index(lang: str) -> int:
    return LANGUAGES.index(lang)


def _make_people(rng: _Rng, n: int) -> list[_Person]:
    names = [(o[0] + c[0], o[1] + c[1]) for o in _ONSETS for c in _CODAS]
    if n > len(names):
        raise ArgumentError(f"generate_corpus: n_people={n} but only {len(names)} distinct made-up names exist; "
                         f"use n_people <= {len(names)}")
    people = []
    for en, zh in rng.sample(names, n):
        values = {a: rng.choice(_ATTR_VALUES[a]) for a in ATTRIBUTES}
        people.append(_Person({"en": en, "zh": zh}, values))
    return people


def _make_records(rng: _Rng, n: int) -> list[_Record]:
    # three-digit ids: never confused with the small numbers of the arithmetic and sequence lines
    if n > 900:
        raise ArgumentError(f"generate_corpus: n_records={n} exceeds the 900 three-digit ids; use n_records <= 900")
    ids = sorted(rng.sample(range(100, 1000), n))
    return [_Record(i, {"colour": rng.choice(_COLOURS), "shape": rng.choice(_SHAPES)}) for i in ids]


def _fact(person: _Person, attr: str, lang: str, template: int, value: Optional[str] = None) -> str:
    v = person.values[attr][_lang_index(lang)] if value is None else value
    return _FACT_TEMPLATES[attr][lang][template].format(p=person.name[lang], v=v)


def _record(rec: _Record, order: tuple[str, str], lang: str, blank: Optional[str] = None) -> str:
    parts = []
    for field in order:
        v = MASK if field == blank else rec.values[field][_lang_index(lang)]
        parts.append(_RECORD_FIELDS[lang][field].format(v=v))
    return _RECORD[lang].format(id=rec.id, a=parts[0], b=parts[1])


def _addition(a: int, b: int, lang: str, blank: Optional[str] = None) -> str:
    vals = {"a": str(a), "b": str(b), "c": str(a + b)}
    if blank is not None:
        vals[blank] = MASK
    return _ADD[lang].format(**vals)


def _sequence(start: int, step: int, lang: str, blank: Optional[int] = None) -> str:
    nums = [str(start + i * step) for i in range(_SEQ_LEN)]
    if blank is not None:
        nums[blank] = MASK
    return _SEQ[lang].format(nums=" ".join(nums))


def min_train_docs(size: Union[str, CorpusSize] = "small", languages: Sequence[str] = LANGUAGES) -> int:
    """The fewest training documents that state every fact, record, addition and sequence once per language."""
    sz = _resolve_size(size)
    pairs, withheld_pairs = _arithmetic_split_counts(sz)
    seqs = (sz.max_start + 1) * sz.max_step
    return len(languages) * (sz.n_people + _ceil_div(sz.n_records, 4)
                             + _ceil_div(pairs - withheld_pairs, 6)
                             + _ceil_div(seqs - round(seqs * SEQUENCE_WITHHELD), 3))


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _arithmetic_split_counts(sz: CorpusSize) -> tuple[int, int]:
    n = sz.max_operand + 1
    unordered = n * (n - 1) // 2
    return n * n, round(unordered * ARITHMETIC_WITHHELD)


def _resolve_size(size: Union[str, CorpusSize]) -> CorpusSize:
    if isinstance(size, CorpusSize):
        return size
    if size not in SIZES:
        raise ArgumentError(f"generate_corpus: unknown size {size!r}; use one of {', '.join(SIZES)} or a "
                            f"CorpusSize(...)")
    return SIZES[size]


def _chunks(items: list[T], k: int) -> list[list[T]]:
    return [items[i:i + k] for i in range(0, len(items), k)]


def generate_corpus(seed: int = 0, size: Union[str, CorpusSize] = "small", n_train: Optional[int] = None,
                    n_heldout: Optional[int] = None, languages: Sequence[str] = LANGUAGES) -> Corpus:
    """Generate the toy corpus: ``size`` (a name in `SIZES` or a `CorpusSize`) sets how many facts exist;
    ``n_train``/``n_heldout`` override the size's document counts. The same arguments give the same
    corpus on every platform and Python version."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        # random.Random(-s) seeds like random.Random(s); refusing negatives keeps seeds distinct
        raise ArgumentError(f"generate_corpus: seed must be a non-negative int, got {seed!r}")
    if isinstance(languages, str):
        languages = (languages,)
    languages = tuple(languages)
    if not languages or len(set(languages)) != len(languages) or any(lang not in LANGUAGES for lang in languages):
        raise ArgumentError(f"generate_corpus: languages={languages!r}; pass distinct entries from {LANGUAGES}")
    sz = _resolve_size(size)
    if min(sz.n_people, sz.n_records, sz.max_operand, sz.max_start, sz.max_step) < 1:
        raise ArgumentError(f"generate_corpus: every count in {sz} must be at least 1")
    n_train = sz.n_train if n_train is None else n_train
    n_heldout = sz.n_heldout if n_heldout is None else n_heldout
    floor = min_train_docs(sz, languages)
    if n_train < floor:
        raise ArgumentError(f"generate_corpus: n_train={n_train} is too few to state every fact of size {sz} in "
                         f"{len(languages)} language(s); use n_train >= {floor} or a smaller size")
    if n_heldout < 1:
        raise ArgumentError(f"generate_corpus: n_heldout={n_heldout}; ask for at least 1 held-out example")

    rng = _Rng(seed)
    people = _make_people(rng, sz.n_people)
    records = _make_records(rng, sz.n_records)

    # (person index, attribute) pairs whose paraphrase template never appears in training
    all_pairs = [(i, a) for i in range(len(people)) for a in ATTRIBUTES]
    para_withheld = sorted(rng.sample(all_pairs, round(len(all_pairs) * PARAPHRASE_WITHHELD)),
                           key=lambda x: (x[0], ATTRIBUTES.index(x[1])))
    para_withheld_set = frozenset(para_withheld)

    # one order of some unordered pairs {a, b} is never stated; the other order always is
    n = sz.max_operand + 1
    unordered = [(a, b) for a in range(n) for b in range(a + 1, n)]
    withheld_add = []
    for a, b in rng.sample(unordered, _arithmetic_split_counts(sz)[1]):
        withheld_add.append((a, b) if rng.chance(0.5) else (b, a))
    withheld_add.sort()
    withheld_add_set = frozenset(withheld_add)
    train_add = [(a, b) for a in range(n) for b in range(n) if (a, b) not in withheld_add_set]

    progressions = [(s, d) for s in range(sz.max_start + 1) for d in range(1, sz.max_step + 1)]
    withheld_seq = sorted(rng.sample(progressions, round(len(progressions) * SEQUENCE_WITHHELD)))
    withheld_seq_set = frozenset(withheld_seq)
    train_seq = [p for p in progressions if p not in withheld_seq_set]

    stated_facts: dict[str, None] = {}      # ordered set: dicts keep insertion order, sets do not
    stated_records: dict[tuple[int, tuple[str, str], str], None] = {}

    def profile(i: int, attrs: Sequence[str], lang: str) -> str:
        sents = []
        for a in attrs:
            template = 0 if (i, a) in para_withheld_set else rng.below(2)
            s = _fact(people[i], a, lang, template)
            stated_facts.setdefault(s)
            sents.append(s)
        return _JOIN[lang].join(sents)

    def record_doc(idx: Sequence[int], lang: str) -> str:
        sents = []
        for r in idx:
            order = ("colour", "shape") if rng.chance(0.5) else ("shape", "colour")
            stated_records.setdefault((r, order, lang))
            sents.append(_record(records[r], order, lang))
        return _JOIN[lang].join(sents)

    def add_doc(eqs: Sequence[tuple[int, int]], lang: str) -> str:
        return _JOIN[lang].join(_addition(a, b, lang) for a, b in eqs)

    def seq_doc(seqs: Sequence[tuple[int, int]], lang: str) -> str:
        return _JOIN[lang].join(_sequence(s, d, lang) for s, d in seqs)

    docs: list[str] = []
    # Coverage first: every fact, record, addition and sequence is stated at least once per language.
    for lang in languages:
        for i in range(len(people)):
            attrs = list(ATTRIBUTES)
            rng.shuffle(attrs)
            docs.append(profile(i, attrs, lang))
        order = list(range(len(records)))
        rng.shuffle(order)
        docs += [record_doc(c, lang) for c in _chunks(order, 4)]
        eqs = list(train_add)
        rng.shuffle(eqs)
        docs += [add_doc(c, lang) for c in _chunks(eqs, 6)]
        seqs = list(train_seq)
        rng.shuffle(seqs)
        docs += [seq_doc(c, lang) for c in _chunks(seqs, 3)]

    kinds, weights = zip(*DOC_WEIGHTS)
    cum = [sum(weights[:k + 1]) for k in range(len(weights))]
    while len(docs) < n_train:
        lang = rng.choice(languages)
        u = rng.uniform() * cum[-1]
        kind = next(k for k, c in zip(kinds, cum) if u < c)
        if kind == "profile":
            docs.append(profile(rng.below(len(people)), rng.sample(ATTRIBUTES, rng.between(2, 4)), lang))
        elif kind == "record":
            docs.append(record_doc(rng.sample(range(len(records)), min(len(records), rng.between(2, 4))), lang))
        elif kind == "arithmetic":
            docs.append(add_doc([rng.choice(train_add) for _ in range(rng.between(4, 6))], lang))
        else:
            docs.append(seq_doc([rng.choice(train_seq) for _ in range(rng.between(2, 3))], lang))
    rng.shuffle(docs)

    # Held-out candidates per (kind, language), each list in a seeded order.
    groups: dict[tuple[str, str], list[InfillExample]] = {(k, lang): [] for k in KINDS for lang in languages}
    fact_lookup = {}
    for i, p in enumerate(people):
        for a in ATTRIBUTES:
            for lang in languages:
                for t in (0, 1):
                    fact_lookup[_fact(p, a, lang, t)] = (i, a, lang, t)
    for sent in stated_facts:
        i, a, lang, t = fact_lookup[sent]
        ans = people[i].values[a][_lang_index(lang)]
        groups[("fact", lang)].append(InfillExample(_fact(people[i], a, lang, t, MASK), ans, "fact", lang, sent))
    for i, a in para_withheld:
        for lang in languages:
            ans = people[i].values[a][_lang_index(lang)]
            groups[("fact-paraphrase", lang)].append(InfillExample(
                _fact(people[i], a, lang, 1, MASK), ans, "fact-paraphrase", lang, _fact(people[i], a, lang, 0)))
    for r, order, lang in stated_records:
        for field in order:
            groups[("record", lang)].append(InfillExample(
                _record(records[r], order, lang, field), records[r].values[field][_lang_index(lang)], "record", lang,
                _record(records[r], order, lang)))
    for a, b in withheld_add:
        for lang in languages:
            # the sum most of the time; sometimes an operand, which the swapped equation also gives
            blank = "c" if rng.chance(2 / 3) else "b"
            ans = str(a + b) if blank == "c" else str(b)
            groups[("arithmetic", lang)].append(InfillExample(
                _addition(a, b, lang, blank), ans, "arithmetic", lang, _addition(b, a, lang)))
    for s, d in withheld_seq:
        for lang in languages:
            pos = rng.below(_SEQ_LEN)
            groups[("sequence", lang)].append(InfillExample(
                _sequence(s, d, lang, pos), str(s + pos * d), "sequence", lang, ""))
    for g in groups.values():
        rng.shuffle(g)

    heldout: list[InfillExample] = []
    cursors = {g: 0 for g in groups}
    while len(heldout) < n_heldout:
        progressed = False
        for g, cands in groups.items():
            if cursors[g] < len(cands) and len(heldout) < n_heldout:
                heldout.append(cands[cursors[g]])
                cursors[g] += 1
                progressed = True
        if not progressed:
            raise ArgumentError(f"generate_corpus: n_heldout={n_heldout} but size {sz} yields only {len(heldout)} "
                             f"distinct held-out examples; lower n_heldout or use a larger size")
    return Corpus(train=docs, heldout=heldout)


# --- scoring

_END_STRIP = frozenset(" \t\n\r\f\v\u3000\u00a0\u2581")  # \u2581: SentencePiece's word-boundary mark


def normalize_answer(text: str) -> str:
    """Strip whitespace (incl. ideographic space and SentencePiece's ``▁``) and Unicode punctuation
    (category P*: ``.,;:!?`` and ``。，；：！？`` alike) from both ends; nothing else changes."""
    def strippable(ch: str) -> bool:
        return ch in _END_STRIP or ch.isspace() or unicodedata.category(ch).startswith("P")
    start, end = 0, len(text)
    while start < end and strippable(text[start]):
        start += 1
    while end > start and strippable(text[end - 1]):
        end -= 1
    return text[start:end]


def exact_match(prediction: str, answer: str) -> bool:
    """True when the two are equal after `normalize_answer` (ends only; case and inner spaces count)."""
    return normalize_answer(prediction) == normalize_answer(answer)


def first_word(prediction: str) -> str:
    """The fill up to its first space or punctuation mark, or to where digits meet non-digits
    (after `normalize_answer`): ``"red. Belia is"`` -> ``"red"``, ``"48岁。"`` -> ``"48"``.

    A GLM fill runs until ``<eop>``, and a small model often writes on past the blank. Every answer
    of the generated corpus is one word, one number or one Chinese word, with no space, punctuation
    or digit/non-digit boundary inside, so this cut loses nothing for it; do not use it on answers
    that have such boundaries inside."""
    text = normalize_answer(prediction)
    for i, ch in enumerate(text):
        if (ch.isspace() or ch == "\u2581" or unicodedata.category(ch).startswith("P")
                or ch.isdigit() != text[0].isdigit()):
            return text[:i]
    return text


def accuracy(predictions: Sequence[str], examples: Sequence[InfillExample]) -> float:
    """Exact-match accuracy of ``predictions[i]`` against ``examples[i].answer``."""
    if len(predictions) != len(examples):
        raise ArgumentError(f"accuracy: {len(predictions)} predictions for {len(examples)} examples; pass one per "
                            f"example")
    if not examples:
        raise ArgumentError("accuracy: no examples to score")
    return sum(exact_match(p, e.answer) for p, e in zip(predictions, examples)) / len(examples)


def _majority_hits(examples: Iterable[InfillExample]) -> tuple[int, int]:
    by_group: dict[tuple[str, str], Counter] = {}
    for e in examples:
        by_group.setdefault((e.kind, e.lang), Counter())[normalize_answer(e.answer)] += 1
    hits = sum(max(c.values()) for c in by_group.values())
    return hits, sum(sum(c.values()) for c in by_group.values())


def baseline_accuracy(corpus: Corpus) -> float:
    """Exact-match accuracy on ``corpus.heldout`` of always giving, for each (kind, language), that group's
    most frequent held-out answer. The answer is picked on the held-out set itself, so this is an upper
    bound on every constant-answer strategy that knows the question's kind and language."""
    if not corpus.heldout:
        raise ArgumentError("baseline_accuracy: the corpus has no held-out examples")
    hits, total = _majority_hits(corpus.heldout)
    return hits / total


def baseline_by_kind(corpus: Corpus) -> dict[str, float]:
    """`baseline_accuracy` restricted to each kind (still one constant answer per kind and language)."""
    out = {}
    for kind in KINDS:
        ex = [e for e in corpus.heldout if e.kind == kind]
        if ex:
            hits, total = _majority_hits(ex)
            out[kind] = hits / total
    return out


# --- writing and reading the corpus folder

def write_corpus(corpus: Corpus, folder: str) -> tuple[str, str]:
    """Write ``folder/train.txt`` (one document per line) and ``folder/heldout.jsonl`` (one
    ``{"text", "answer", "kind", "lang", "evidence"}`` object per line), each atomically; returns both paths.
    Documents must be one line each: a document with a line break is refused before anything is written."""

    for i, doc in enumerate(corpus.train):
        if not isinstance(doc, str) or not doc.strip():
            raise DataError(f"write_corpus: train document {i} is empty or not a string; drop it before writing")
        if "\n" in doc or "\r" in doc:
            raise DataError(f"write_corpus: train document {i} contains a line break but train.txt holds one "
                            f"document per line; replace its line breaks (e.g. doc.replace('\\n', ' '))")
    for i, ex in enumerate(corpus.heldout):
        if ex.text_with_blank.count(MASK) != 1:
            raise DataError(f"write_corpus: held-out example {i} has {ex.text_with_blank.count(MASK)} {MASK} blanks; "
                            f"each example needs exactly one")
    os.makedirs(folder, exist_ok=True)
    train_path = os.path.join(folder, "train.txt")
    heldout_path = os.path.join(folder, "heldout.jsonl")
    atomic_write(train_path, "".join(doc + "\n" for doc in corpus.train).encode("utf-8"))
    atomic_write(heldout_path, "".join(
        json.dumps({"text": e.text_with_blank, "answer": e.answer, "kind": e.kind, "lang": e.lang,
                    "evidence": e.evidence}, ensure_ascii=False) + "\n" for e in corpus.heldout).encode("utf-8"))
    fsync_dir(folder)
    return train_path, heldout_path


def read_corpus(folder: str) -> Corpus:
    """Read back what `write_corpus` wrote."""
    train = read_documents([os.path.join(folder, "train.txt")], mode="lines")
    heldout = []
    path = os.path.join(folder, "heldout.jsonl")
    for lineno, obj in jsonl_objects(path):
        missing = [k for k in ("text", "answer", "kind") if not isinstance(obj.get(k), str)]
        if missing:
            raise DataError(f"{path} line {lineno}: needs string fields {missing}; rewrite it with write_corpus")
        heldout.append(InfillExample(obj["text"], obj["answer"], obj["kind"], obj.get("lang", ""),
                                     obj.get("evidence", "")))
    return Corpus(train=train, heldout=heldout)


# --- user data

# One document per non-blank line; per file; or per run of lines between blank lines.
ReadMode = Literal["lines", "file", "blank-line"]
READ_MODES = get_args(ReadMode)
_GLOB_CHARS = frozenset("*?[")


def _expand(spec: str) -> list[str]:
    if any(c in _GLOB_CHARS for c in spec):
        matches = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        if not matches:
            raise DataError(f"{spec}: the glob matches no files; check the pattern (use '**' with a folder "
                            f"to search below it, e.g. 'data/**/*.txt')")
        return matches
    if os.path.isdir(spec):
        raise DataError(f"{spec}: is a folder; pass its files or a glob such as '{os.path.join(spec, '*.txt')}'")
    if not os.path.isfile(spec):
        raise DataError(f"{spec}: no such file; check the path (relative paths start at {os.getcwd()})")
    return [spec]


def read_text(path: str) -> str:
    """A UTF-8 text file's text; a DataError naming the file (missing, a folder, unreadable, not UTF-8 with
    the line, or holding nothing but whitespace)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; check the path (relative paths start at {os.getcwd()})") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder; pass a file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror}); check its permissions") from None
    try:
        text = raw.decode("utf-8-sig")  # a leading byte-order mark is not part of the text
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path} line {line}: not valid UTF-8 (byte {e.start}: {e.reason}); re-save the file "
                        f"as UTF-8, e.g. iconv -f GB18030 -t UTF-8") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty; remove it from the data or fill it")
    return text


def _lines(text: str) -> list[str]:
    # only \n, \r\n and \r end a line: str.splitlines() would also split on \x0b, \x1c, \u2028, ...
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


_LINE_BREAK = re.compile(r"(\r\n|\r|\n)")


def _blank_line_documents(text: str) -> list[str]:
    """``text`` cut at blank (empty or whitespace-only) lines: each run of non-blank lines is one
    document, its line breaks kept as written (``\r\n`` stays ``\r\n``) except the one ending its
    last line."""
    parts = _LINE_BREAK.split(text)  # line, break, line, break, ..., line
    docs, current = [], []
    for i in range(0, len(parts), 2):
        line = parts[i]
        if line.strip():
            current += [line, parts[i + 1] if i + 1 < len(parts) else ""]
        elif current:
            docs.append("".join(current[:-1]))
            current = []
    if current:
        docs.append("".join(current[:-1]))
    return docs


def jsonl_objects(path: str, example: str = '{"text": "..."}') -> list[tuple[int, dict]]:
    """(line number, object) of every non-blank line of a JSONL file; a DataError naming the file and line
    for a line that is not a JSON object (``example`` shows what a line should be)."""
    out = []
    for lineno, line in enumerate(_lines(read_text(path)), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {lineno}: not valid JSON (column {e.colno}: {e.msg}); each line must be "
                            f"one object such as {example}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path} line {lineno}: a JSON {type(obj).__name__}, not an object; each line must be "
                            f"one object such as {example}")
        out.append((lineno, obj))
    return out


def _jsonl_documents(path: str) -> list[str]:
    docs = []
    for lineno, obj in jsonl_objects(path):
        text = obj.get("text")
        if not isinstance(text, str):
            what = "has no \"text\" field" if "text" not in obj else f"has a \"text\" of type {type(text).__name__}"
            raise DataError(f"{path} line {lineno}: {what}; each line needs a string field \"text\"")
        if text.strip():
            docs.append(text)
    if not docs:
        raise DataError(f"{path}: every \"text\" is empty; remove the file from the data specs or fill it")
    return docs


def read_documents(specs: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
                   mode: ReadMode = "lines") -> list[str]:
    """Documents from files, in the order given. Each spec is a path or a glob (``*``, ``?``, ``[...]``,
    ``**`` recursive; matches sorted by name, folders skipped); a file matched twice is read once.

    ``*.jsonl`` files: one JSON object per non-blank line, its string ``"text"`` is one document
    (line breaks inside it are kept, whatever ``mode``). Other files are UTF-8 text: ``mode="lines"``
    makes each non-blank line a document (line ending removed, nothing else); ``mode="file"`` makes the
    whole file one document (line breaks and blank lines inside kept, trailing line breaks removed);
    ``mode="blank-line"`` makes each run of non-blank lines a document (blank lines, empty or only
    whitespace, separate documents and belong to none; the line breaks inside a document are kept).
    Blank lines and empty texts are skipped.
    Raises `DataError` naming the file (and line) for unreadable input or an empty result.
    """
    if mode not in READ_MODES:
        raise DataError(f"read_documents: unknown mode {mode!r}; use one of {', '.join(READ_MODES)}")
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]  # one path, not a sequence of one-character paths
    specs = [os.fspath(s) for s in specs]
    if not specs:
        raise DataError("read_documents: no data given; pass files or globs such as 'data/*.txt'")
    seen: dict[str, None] = {}
    files: list[str] = []
    for spec in specs:
        for path in _expand(spec):
            key = os.path.realpath(path)
            if key not in seen:
                seen.setdefault(key)
                files.append(path)
    docs: list[str] = []
    for path in files:
        if path.lower().endswith(".jsonl"):
            docs += _jsonl_documents(path)
        elif mode == "file":
            docs.append(read_text(path).rstrip("\r\n"))
        elif mode == "blank-line":
            docs += _blank_line_documents(read_text(path))
        else:
            docs += [line for line in _lines(read_text(path)) if line.strip()]
    if not docs:
        raise DataError(f"read_documents: {specs} hold no documents; add text to them")
    return docs


__all__ = ["MASK", "LANGUAGES", "KINDS", "ATTRIBUTES", "SIZES", "CorpusSize", "CorpusSizeName", "Corpus",
           "InfillExample", "DataError", "generate_corpus", "min_train_docs", "normalize_answer", "exact_match",
           "first_word", "accuracy", "baseline_accuracy", "baseline_by_kind", "write_corpus", "read_corpus",
           "read_documents"]
