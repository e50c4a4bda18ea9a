"""The toy corpus (determinism, answerability, baselines, languages), its atomic writer, and the user-data reader."""
import hashlib
import json
import os
import re
import subprocess
import sys

import pytest

import glm.corpus as corpus_mod
from glm.corpus import (
    KINDS,
    MASK,
    SIZES,
    Corpus,
    DataError,
    InfillExample,
    accuracy,
    baseline_accuracy,
    baseline_by_kind,
    exact_match,
    first_word,
    generate_corpus,
    min_train_docs,
    normalize_answer,
    read_corpus,
    read_documents,
    write_corpus,
)

CJK = re.compile(r"[\u4e00-\u9fff]")


@pytest.fixture(scope="module")
def small() -> Corpus:
    return generate_corpus(seed=0, size="small")


@pytest.fixture(scope="module")
def train_sentences(small) -> set:
    return {s for doc in small.train for s in sentences(doc)}


@pytest.fixture(scope="module")
def train_text(small) -> str:
    return "\n".join(small.train)


def sentences(doc: str) -> list:
    return [s for s in re.split(r"(?<=[.。])\s*", doc) if s]


def filled(e: InfillExample) -> str:
    return e.text_with_blank.replace(MASK, e.answer)


def digest(c: Corpus) -> str:
    h = hashlib.sha256()
    for doc in c.train:
        h.update(doc.encode() + b"\n")
    for e in c.heldout:
        h.update(json.dumps([e.text_with_blank, e.answer, e.kind, e.lang, e.evidence], ensure_ascii=False).encode())
    return h.hexdigest()


# --- determinism

def test_same_seed_same_corpus_and_seeds_differ():
    a, b = generate_corpus(seed=3, size="tiny"), generate_corpus(seed=3, size="tiny")
    assert a == b
    c = generate_corpus(seed=4, size="tiny")
    assert c.train != a.train and c.heldout != a.heldout


def test_independent_of_hash_randomisation():
    # a fresh interpreter with another PYTHONHASHSEED must build the same corpus (no set/hash ordering)
    code = ("import hashlib\n"
            "from glm.corpus import generate_corpus\n"
            "c = generate_corpus(seed=1, size='tiny')\n"
            "print(hashlib.sha256(repr((c.train, c.heldout)).encode()).hexdigest())\n")
    outs = set()
    for hash_seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        run = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                             capture_output=True, text=True)
        outs.add(run.stdout.strip())
    c = generate_corpus(seed=1, size="tiny")
    outs.add(hashlib.sha256(repr((c.train, c.heldout)).encode()).hexdigest())
    assert len(outs) == 1


# Pinned so a change of Python, platform or code that alters the corpus is noticed. Update it only when
# the generator is changed on purpose (and say so in docs/corpus.md: trained demo models see other data).
GOLDEN_TINY_SEED0 = "ef9938e62460b44fc0f7a7c6b993355077bfe57ee899e690fa157491c5109e2b"


def test_golden_digest():
    assert digest(generate_corpus(seed=0, size="tiny")) == GOLDEN_TINY_SEED0


# --- answerability

def test_examples_well_formed(small):
    # answers survive first_word, so a demo may cut over-long fills with it
    assert all(first_word(e.answer) == e.answer for e in small.heldout)
    assert len(small.heldout) == SIZES["small"].n_heldout
    assert all(e.text_with_blank.count(MASK) == 1 for e in small.heldout)
    assert all(MASK not in doc for doc in small.train)
    assert all(e.answer and normalize_answer(e.answer) == e.answer for e in small.heldout)
    assert len({e.text_with_blank for e in small.heldout}) == len(small.heldout)
    assert {e.kind for e in small.heldout} == set(KINDS)


def test_recalled_facts_are_stated_in_train(small, train_sentences):
    recall = [e for e in small.heldout if e.kind in ("fact", "record")]
    assert recall
    for e in recall:
        assert filled(e) == e.evidence and e.evidence in train_sentences, e


def test_paraphrased_facts_are_new_text_but_stated_elsewhere(small, train_sentences, train_text):
    para = [e for e in small.heldout if e.kind == "fact-paraphrase"]
    assert para
    for e in para:
        assert e.evidence in train_sentences, e
        assert e.answer in e.evidence
        # the entity is the sentence's first word/characters in both templates' evidence
        name = e.evidence.split(" ")[0].replace("'s", "") if e.lang == "en" else e.evidence[:2]
        assert name in e.text_with_blank, e
        assert filled(e) not in train_text, e


def test_arithmetic_is_unseen_but_commutes_to_a_stated_equation(small, train_sentences, train_text):
    ar = [e for e in small.heldout if e.kind == "arithmetic"]
    assert ar
    for e in ar:
        a, b, c = map(int, re.findall(r"\d+", filled(e)))
        assert a + b == c, e
        assert filled(e) not in train_text, e
        assert e.evidence in train_sentences and list(map(int, re.findall(r"\d+", e.evidence))) == [b, a, c], e


def test_sequences_are_unseen_and_follow_their_rule(small, train_text):
    seq = [e for e in small.heldout if e.kind == "sequence"]
    assert seq
    for e in seq:
        nums = list(map(int, re.findall(r"\d+", filled(e))))
        assert len(nums) == 5 and len({y - x for x, y in zip(nums, nums[1:])}) == 1 and nums[1] > nums[0], e
        assert filled(e) not in train_text, e


def stated_facts(c: Corpus) -> dict:
    """(language, attribute, person) -> the set of values the training sentences give it."""
    names = {lang: "|".join(o[i] + c[i] for o in corpus_mod._ONSETS for c in corpus_mod._CODAS)
             for i, lang in enumerate(("en", "zh"))}
    patterns = []
    for attr, by_lang in corpus_mod._FACT_TEMPLATES.items():
        for lang, templates in by_lang.items():
            for t in templates:
                body = re.escape(t).replace(re.escape("{p}"), f"({names[lang]})").replace(re.escape("{v}"), r"(\w+)")
                patterns.append((attr, lang, re.compile(body + "$")))
    seen = {}
    for doc in c.train:
        for s in sentences(doc):
            for attr, lang, pat in patterns:
                m = pat.match(s)
                if m:
                    seen.setdefault((lang, attr, m.group(1)), set()).add(m.group(2))
    return seen


def test_attributes_are_consistent_across_documents(small):
    seen = stated_facts(small)
    assert len(seen) == 2 * 4 * SIZES["small"].n_people
    assert all(len(v) == 1 for v in seen.values()), {k: v for k, v in seen.items() if len(v) > 1}


def test_smallest_corpus_still_states_every_fact_in_every_language():
    c = generate_corpus(seed=0, size="tiny", n_train=min_train_docs("tiny"))
    assert len(stated_facts(c)) == 2 * 4 * SIZES["tiny"].n_people
    sents = {s for doc in c.train for s in sentences(doc)}
    assert all(e.evidence in sents for e in c.heldout if e.evidence)


# --- baseline and scoring

@pytest.mark.parametrize("size", list(SIZES))
def test_baseline_is_low(size):
    for seed in range(3):
        c = generate_corpus(seed=seed, size=size)
        assert baseline_accuracy(c) <= 0.25, (size, seed, baseline_by_kind(c))


def test_baseline_counts_majority_per_kind_and_language():
    ex = [InfillExample("x [MASK]", "a", "fact", "en"), InfillExample("y [MASK]", "a", "fact", "en"),
          InfillExample("z [MASK]", "b", "fact", "en"), InfillExample("w [MASK]", "c", "fact", "zh"),
          InfillExample("v [MASK]", "7", "arithmetic", "en"), InfillExample("u [MASK]", "8", "arithmetic", "en")]
    c = Corpus(train=["doc"], heldout=ex)
    assert baseline_accuracy(c) == pytest.approx((2 + 1 + 1) / 6)
    assert baseline_by_kind(c) == {"fact": pytest.approx(3 / 4), "arithmetic": pytest.approx(1 / 2)}
    with pytest.raises(ValueError, match="no held-out"):
        baseline_accuracy(Corpus(train=["doc"], heldout=[]))


def test_exact_match_normalisation():
    assert exact_match(" Kelda.", "Kelda")
    assert exact_match("\u2581蓝色。", "蓝色")
    assert exact_match("「凯达」", "凯达")
    assert exact_match("17 ", "17")
    assert not exact_match("kelda", "Kelda")           # case-sensitive
    assert not exact_match("Kel da", "Kelda")          # inner spaces count
    assert not exact_match("Kelda Brisk", "Kelda")
    assert not exact_match("", "Kelda")
    assert normalize_answer("..a.b..") == "a.b"
    assert first_word(" red. Belia is 30") == "red"
    assert first_word("橙色。贝尤斯喜欢") == "橙色"
    assert first_word("56 岁") == "56" and first_word("48岁。") == "48" and first_word("square;colour") == "square"
    assert first_word("id 7") == "id" and first_word("月牙形") == "月牙形"
    assert first_word("\u2581Kelda\u2581is") == "Kelda"
    ex = [InfillExample("[MASK]", "a", "fact"), InfillExample("[MASK]", "b", "fact")]
    assert accuracy(["a.", "c"], ex) == 0.5
    with pytest.raises(ValueError, match="1 predictions for 2 examples"):
        accuracy(["a"], ex)


# --- languages and sizes

def test_both_languages_present(small):
    zh_docs = sum(bool(CJK.search(d)) for d in small.train)
    assert 0.3 * len(small.train) < zh_docs < 0.7 * len(small.train)
    for kind in KINDS:
        langs = {e.lang for e in small.heldout if e.kind == kind}
        assert langs == {"en", "zh"}, kind
    assert all(bool(CJK.search(e.text_with_blank)) == (e.lang == "zh") for e in small.heldout)


def test_one_language():
    en = generate_corpus(seed=0, size="tiny", languages=("en",))
    assert not any(CJK.search(d) for d in en.train) and {e.lang for e in en.heldout} == {"en"}
    zh = generate_corpus(seed=0, size="tiny", languages=("zh",))
    assert all(CJK.search(d) for d in zh.train) and {e.lang for e in zh.heldout} == {"zh"}


def test_size_knob_and_overrides():
    counts = [len(generate_corpus(seed=0, size=s).train) for s in ("tiny", "small", "base")]
    assert counts == sorted(counts) and len(set(counts)) == 3
    c = generate_corpus(seed=0, size="tiny", n_train=min_train_docs("tiny"), n_heldout=7)
    assert len(c.train) == min_train_docs("tiny") and len(c.heldout) == 7
    custom = corpus_mod.CorpusSize(n_people=4, n_records=4, max_operand=4, max_start=5, max_step=2, n_train=100,
                                   n_heldout=20)
    assert len(generate_corpus(size=custom).train) == 100


@pytest.mark.parametrize("kwargs, message", [
    (dict(size="huge"), "unknown size 'huge'.*tiny, small, base"),
    (dict(size="tiny", n_train=10), "n_train=10 is too few.*n_train >= 104"),
    (dict(size="tiny", n_heldout=100000), "n_heldout=100000.*lower n_heldout"),
    (dict(size="tiny", languages=("en", "fr")), "languages"),
    (dict(size="tiny", languages=()), "languages"),
    (dict(seed=-1), "non-negative"),
])
def test_bad_generator_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_corpus(**kwargs)


# --- writing

def tmp_leftovers(folder) -> list:
    # atomic_write's temp files are named like "train.txt.tmp-k3j9x_" (tempfile.mkstemp, prefix "<name>.tmp-").
    return [n for n in os.listdir(folder) if ".tmp" in n or n.startswith(".")]


def test_write_corpus_round_trips_without_temp_files(tmp_path):
    c = generate_corpus(seed=0, size="tiny")
    train_path, heldout_path = write_corpus(c, str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path / "out")) == ["heldout.jsonl", "train.txt"]
    with open(train_path, encoding="utf-8") as f:
        assert f.read().split("\n") == c.train + [""]
    with open(heldout_path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert [(r["text"], r["answer"], r["kind"]) for r in rows] == [(e.text_with_blank, e.answer, e.kind)
                                                                   for e in c.heldout]
    assert read_corpus(str(tmp_path / "out")) == c
    assert read_documents([train_path]) == c.train


def test_write_corpus_failure_keeps_old_files(tmp_path, monkeypatch):
    old = generate_corpus(seed=0, size="tiny")
    write_corpus(old, str(tmp_path))
    before = (tmp_path / "train.txt").read_bytes()

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(corpus_mod.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        write_corpus(generate_corpus(seed=1, size="tiny"), str(tmp_path))
    assert (tmp_path / "train.txt").read_bytes() == before
    assert tmp_leftovers(tmp_path) == []


def test_write_corpus_refuses_multiline_documents_before_writing(tmp_path):
    with pytest.raises(DataError, match="train document 1 contains a line break"):
        write_corpus(Corpus(train=["one", "two\nlines"], heldout=[]), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_written_corpus_trains_a_tokenizer_with_short_answers(tmp_path, small):
    from glm.tokenizer import train
    train_path, _ = write_corpus(small, str(tmp_path))
    tok = train([train_path], str(tmp_path / "tok"), 1000, "glm", model_type="bpe")
    short = 0
    for e in small.heldout:
        ids = tok.encode(filled(e))
        ends = [len(tok.decode(ids[:k])) for k in range(len(ids) + 1)]
        start = e.text_with_blank.index(MASK)
        first = next(k for k in range(len(ids)) if ends[k + 1] > start)
        last = next(k for k in range(len(ids)) if ends[k + 1] >= start + len(e.answer))
        short += last - first + 1 <= 3
    assert short >= 0.95 * len(small.heldout)


# --- reading user data

def write(path, data) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")
    return str(path)


def test_read_text_lines_and_file_mode(tmp_path):
    p = write(tmp_path / "a.txt", "first doc\r\n\n   \nsecond doc  \n佐安住在凯达。\n")
    assert read_documents([p]) == ["first doc", "second doc  ", "佐安住在凯达。"]
    assert read_documents(p, mode="file") == ["first doc\r\n\n   \nsecond doc  \n佐安住在凯达。"]
    bom = write(tmp_path / "bom.txt", "\ufeffhello\n".encode("utf-8"))
    assert read_documents([bom]) == ["hello"]


def test_read_glob_sorted_and_deduplicated(tmp_path):
    write(tmp_path / "d" / "b.txt", "b1\nb2\n")
    write(tmp_path / "d" / "a.txt", "a1\n")
    write(tmp_path / "d" / "sub" / "c.txt", "c1\n")
    (tmp_path / "d" / "folder.txt").mkdir()
    d = tmp_path / "d"
    assert read_documents([str(d / "*.txt")]) == ["a1", "b1", "b2"]
    assert read_documents([str(d / "**" / "*.txt"), str(d / "a.txt")]) == ["a1", "b1", "b2", "c1"]


def test_read_jsonl(tmp_path):
    rows = [{"text": "one\ntwo", "id": 1}, {"text": "三"}, {"text": "  "}]
    p = write(tmp_path / "x.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n")
    assert read_documents([p]) == ["one\ntwo", "三"]
    assert read_documents([p, write(tmp_path / "y.txt", "plain\n")], mode="file") == ["one\ntwo", "三", "plain"]


@pytest.mark.parametrize("name, content, message", [
    ("bad.txt", b"fine\nalso fine\nbroken \xff\xfe here\n", r"bad\.txt line 3: not valid UTF-8"),
    ("empty.txt", b"", r"empty\.txt: the file is empty"),
    ("blank.txt", b"\n  \n", r"blank\.txt: the file is empty"),
    ("bad.jsonl", b'{"text": "ok"}\n\n{"text": "unterminated\n', r"bad\.jsonl line 3: not valid JSON"),
    ("notext.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', r"notext\.jsonl line 2: has no \"text\" field"),
    ("numtext.jsonl", b'{"text": 5}\n', r"numtext\.jsonl line 1: has a \"text\" of type int"),
    ("list.jsonl", b'["text"]\n', r"list\.jsonl line 1: a JSON list, not an object"),
    ("alltextempty.jsonl", b'{"text": ""}\n', r"alltextempty\.jsonl: every \"text\" is empty"),
    ("bad8.jsonl", b'{"text": "ok"}\n{"text": "\xc3("}\n', r"bad8\.jsonl line 2: not valid UTF-8"),
])
def test_read_errors_name_file_and_line(tmp_path, name, content, message):
    p = write(tmp_path / name, content)
    with pytest.raises(DataError, match=message) as e:
        read_documents([p])
    assert str(tmp_path) in str(e.value)


def test_read_errors_for_specs(tmp_path):
    with pytest.raises(DataError, match=r"nothing\*\.txt: the glob matches no files"):
        read_documents([str(tmp_path / "nothing*.txt")])
    with pytest.raises(DataError, match=r"missing\.txt: no such file"):
        read_documents([str(tmp_path / "missing.txt")])
    with pytest.raises(DataError, match="is a folder"):
        read_documents([str(tmp_path)])
    with pytest.raises(DataError, match="no data given"):
        read_documents([])
    with pytest.raises(DataError, match="unknown mode 'para'"):
        read_documents([write(tmp_path / "a.txt", "x\n")], mode="para")
    assert issubclass(DataError, ValueError)
