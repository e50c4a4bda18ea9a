"""Pretraining data as a researcher expects it: text read as written, causal / prefix rows packed from
one stream with random offsets per epoch, held-out loss on text tokens, and every knob on the CLI."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch

import glm
from glm.cli import _train_config, build_parser
from glm.corpus import generate_corpus, read_documents
from glm.data import Collator, Objective, PackedRows, SpecialIds, join_documents
from glm.errors import ArgumentError, DataError, TrainingError
from glm.tokenizer import load as load_tokenizer
from glm.tokenizer import train as train_tokenizer
from glm.train import (
    DATA_LAYOUT,
    Prepared,
    TrainConfig,
    _warn_if_line_breaks_are_lost,
    check_resume,
    evaluate,
    global_batch,
    heldout_batches,
    make_optimizer,
    model_config_for,
    prepare,
    setting_changes,
    train,
)

SEP = 1
SPECIAL = SpecialIds(mask=90, smask=91, gmask=92, sop=93, eop=94, eos=SEP, pad=0, cls=95)


def write(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> str:
    """A small BPE tokenizer trained on the tiny corpus (its text with line breaks)."""
    folder = tmp_path_factory.mktemp("tok")
    text = folder / "text.txt"
    text.write_text("\n".join(generate_corpus(seed=0, size="tiny").train), encoding="utf-8")
    train_tokenizer([str(text)], str(folder / "tok"), 500, "glm", model_type="bpe")
    return str(folder / "tok")


@pytest.fixture(scope="module")
def prose(tmp_path_factory) -> str:
    """A file of 'paragraphs' separated by blank lines, with line breaks inside them."""
    c = generate_corpus(seed=1, size="tiny").train
    paragraphs = ["\n".join(c[i:i + 3]) for i in range(0, 240, 3)]
    path = tmp_path_factory.mktemp("prose") / "prose.txt"
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------------------------------------
# Reading text

def test_text_files_are_read_whole_or_split_at_blank_lines(tmp_path):
    p = write(tmp_path / "a.txt", "line one\nline two\n\n  \t\nsecond\r\ndoc\n\n\nthird\n")
    assert read_documents([p], mode="file") == ["line one\nline two\n\n  \t\nsecond\r\ndoc\n\n\nthird"]
    assert read_documents([p], mode="blank-line") == ["line one\nline two", "second\r\ndoc", "third"]
    assert read_documents([p], mode="lines") == ["line one", "line two", "second", "doc", "third"]
    assert read_documents([write(tmp_path / "b.txt", "\n\nonly\n")], mode="blank-line") == ["only"]
    with pytest.raises(DataError, match="unknown mode 'para'; use one of lines, file, blank-line"):
        read_documents([p], mode="para")


def test_the_default_reads_files_whole(tmp_path):
    p = write(tmp_path / "a.txt", "a\nb\n")
    cfg = TrainConfig(data=[p])
    assert cfg.doc_split == "file"
    with pytest.raises(ValueError, match=r"TrainConfig\.doc_split \(--doc-split\) must be file"):
        TrainConfig(data=[p], doc_split="paragraphs").validate()


@pytest.mark.parametrize("family,model", [("glm", "tiny-glm"), ("chatglm3", "tiny-chatglm3")])
def test_line_breaks_survive_file_to_tokens_to_text(tmp_path, prose, family, model):
    """The trainer's own tokenizer (trained by prepare on the text as written) and its packed stream
    give back the file's documents exactly, line breaks included."""
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), model=model, data=[prose], val_data=[prose],
                      doc_split="blank-line", objective="causal", vocab_size=600, seq_len=32, progress=False)
    prep = prepare(cfg, model_config_for(cfg))
    tok = prep.tokenizer
    assert tok.family == family and tok.decode(tok.encode("a\nb")) == "a\nb"
    docs = read_documents([prose], mode="blank-line")
    assert len(docs) == 80 and all(d.count("\n") == 2 for d in docs)
    stream = prep.train_rows.stream.tolist()
    sep = prep.collator.special.eos
    ends = [i for i, t in enumerate(stream) if t == sep]
    assert len(ends) == len(docs) and ends[-1] == len(stream) - 1  # one separator after each document
    assert [tok.decode(stream[a + 1:b]) for a, b in zip([-1] + ends, ends)] == docs
    with open(os.path.join(cfg.out_dir, "train_text.txt"), encoding="utf-8") as f:
        assert f.read() == "\n\n".join(docs) + "\n"  # the tokenizer trained on the documents as written


class _NoLineBreaks:
    def encode(self, text):
        return [ord(c) for c in text if c != "\n"]

    def decode(self, ids):
        return "".join(map(chr, ids))


def test_a_tokenizer_that_drops_line_breaks_is_reported():
    with pytest.warns(UserWarning, match=r"does not keep line breaks \('a\\nb' decodes as 'ab'\)"):
        _warn_if_line_breaks_are_lost(_NoLineBreaks(), "tok", ["x\ny"])
    _warn_if_line_breaks_are_lost(_NoLineBreaks(), "tok", ["no break here"])  # nothing to lose: no warning


# ------------------------------------------------------------------------------------------------
# Packed causal / prefix rows

def stream_of(n_docs: int = 37, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    docs = [rng.integers(10, 80, size=int(rng.integers(1, 12))).tolist() for _ in range(n_docs)]
    return join_documents(docs, SEP)


def test_join_documents_adds_only_separators():
    assert join_documents([[5, 6], [7]], SEP).tolist() == [5, 6, SEP, 7, SEP]
    with pytest.raises(DataError, match="document 1 is empty"):
        join_documents([[5], []], SEP)


def test_packed_rows_are_stream_slices_without_inserted_tokens():
    s = stream_of()
    rows = PackedRows(s, 16, "causal", position_streams=1)
    b = rows.batch(seed=3, micro_step=5, batch_size=6)
    assert b.tokens.shape == b.targets.shape == (6, 16) and bool(b.loss_mask.all())
    starts = rows.starts(3, 5, 6)
    for r, o in enumerate(starts.tolist()):
        want = np.take(s, np.arange(o, o + 17), mode="wrap")
        assert b.tokens[r].tolist() == want[:-1].tolist() and b.targets[r].tolist() == want[1:].tolist()
    # every separator in a row was in the stream: none is inserted per row
    assert int((b.targets == SEP).sum()) == sum(int((np.take(s, np.arange(o + 1, o + 17), mode="wrap") == SEP).sum())
                                                 for o in starts.tolist())
    assert b.position_ids.tolist() == [list(range(16))] * 6 and b.prefix_len.tolist() == [0] * 6
    two = PackedRows(s, 16, "causal", position_streams=2).batch(3, 5, 6)
    assert two.position_ids.shape == (6, 2, 16) and int(two.position_ids[:, 1].abs().sum()) == 0


@pytest.mark.parametrize("divisible", [True, False])
def test_every_token_is_a_target_once_per_epoch(divisible):
    s = stream_of(n_docs=60)
    L = 8
    s = s[: len(s) - len(s) % L] if divisible else s
    rows = PackedRows(s, L, "causal")
    n = rows.rows_per_epoch
    B = 5
    counts = {}
    for epoch in range(3):
        hits = np.zeros(len(s), int)
        offset, _ = rows.epoch(0, epoch)
        for m in range(max(0, epoch * n // B - 2), (epoch + 1) * n // B + 3):  # the micro-steps touching it
            g = m * B + np.arange(B)
            for o, gi in zip(rows.starts(0, m, B).tolist(), g.tolist()):
                if gi // n == epoch:
                    hits[(o + 1 + np.arange(L)) % len(s)] += 1
        counts[epoch] = (offset, hits)
        if divisible:
            assert (hits == 1).all()
        else:
            assert (hits >= 1).all() and hits.sum() == n * L and (hits == 2).sum() == n * L - len(s)
    offsets = [o for o, _ in counts.values()]
    assert len(set(offsets)) > 1  # the cut points move between epochs
    assert not np.array_equal(rows.epoch(0, 0)[1], rows.epoch(0, 1)[1])  # and so does the order


def test_a_batch_depends_on_seed_and_micro_step_only():
    s = stream_of()
    a, b = PackedRows(s, 8, "prefix"), PackedRows(s, 8, "prefix")
    for m in (7, 2, 40, 7):  # any order, a fresh object: the same rows, the same prefixes
        x, y = a.batch(1, m, 4), b.batch(1, m, 4)
        assert torch.equal(x.tokens, y.tokens) and torch.equal(x.prefix_len, y.prefix_len)
    assert not torch.equal(a.batch(1, 7, 4).tokens, a.batch(2, 7, 4).tokens)


def test_prefix_rows_put_the_loss_after_the_prefix():
    rows = PackedRows(stream_of(), 12, "prefix")
    b = rows.batch(0, 0, 64)
    prefix = b.prefix_len.tolist()
    assert min(prefix) >= 1 and max(prefix) <= 12 and len(set(prefix)) > 5
    for r, p in enumerate(prefix):
        # the prefix's last slot predicts the first token after it; earlier slots see their target
        assert b.loss_mask[r].tolist() == [j >= p - 1 for j in range(12)]
    assert b.num_loss_tokens == sum(13 - p for p in prefix)


def test_heldout_rows_read_the_stream_once_without_wrapping():
    s = stream_of()
    rows = PackedRows(s, 10, "causal", pad_id=0)
    n = rows.num_rows
    b = rows.rows_at(range(n), 0)
    assert b.num_loss_tokens == len(s) - 1  # every target once
    assert b.targets[b.loss_mask].tolist() == s[1:].tolist()
    last = b.lengths[-1].item()
    assert last == len(s) - (n - 1) * 10 and not b.loss_mask[-1, last - 1:].any()
    with pytest.raises(DataError, match="rows_at: rows must be"):
        rows.rows_at([n], 0)


# ------------------------------------------------------------------------------------------------
# The trainer's data: held-out split, val data, evaluation

def lm_config(tmp_path, tok, data, **kw) -> TrainConfig:
    base = dict(out_dir=str(tmp_path / "run"), model="tiny-chatglm3", tokenizer=tok, data=data, objective="causal",
                seq_len=16, batch_size=4, steps=2, eval_every=0, ckpt_every=0, progress=False, device="cpu")
    return TrainConfig(**{**base, **kw})


def test_one_file_keeps_its_last_5_percent_of_tokens_for_evaluation(tmp_path, tok, prose):
    cfg = lm_config(tmp_path, tok, [prose], seq_len=32)
    prep = prepare(cfg, model_config_for(cfg))
    whole = dataclasses.replace(cfg, val_data=[prose])
    n = len(prepare(whole, model_config_for(whole)).train_rows)
    t, h = len(prep.train_rows), len(prep.heldout_rows)
    assert prep.train_docs == prep.heldout_docs == []
    assert h == max(n // 20, 33) and t in (n - h, n - h + 1)  # + 1: a separator ends a document cut in two
    single = lm_config(tmp_path, tok, [write(tmp_path / "one.txt", open(prose).read())], doc_split="file")
    assert prepare(single, model_config_for(single)).heldout_rows is not None  # one document, still held out


def test_val_data_is_the_heldout_set(tmp_path, tok, prose):
    val = write(tmp_path / "val.txt", "Zoran lives in Kelda.\nHe likes red.")
    cfg = lm_config(tmp_path, tok, [prose], val_data=[val])
    prep = prepare(cfg, model_config_for(cfg))
    ids = prep.tokenizer.encode("Zoran lives in Kelda.\nHe likes red.")
    assert prep.heldout_rows.stream.tolist() == ids + [prep.collator.special.eos]
    full = join_documents([prep.tokenizer.encode(d) for d in read_documents([prose], mode="file")],
                          prep.collator.special.eos)
    assert prep.train_rows.stream.tolist() == full.tolist()  # nothing cut off the training data
    glm_cfg = dataclasses.replace(cfg, objective="glm", model="tiny-glm", seq_len=64)
    g = prepare(glm_cfg, model_config_for(glm_cfg))
    assert g.heldout_docs == [ids]
    whole = prep.tokenizer.encode(read_documents([prose], mode="file")[0])
    assert sum(g.train_docs, []) == whole and len(g.train_docs) > 1  # all of it, cut into chunks that fit a row


class _Uniformish(torch.nn.Module):
    """Logits that make the separator hard to predict and text tokens easy: the two losses differ."""

    def forward(self, input_ids, position_ids=None, prefix_len=None, logits_at=None, doc_start=None):
        logits = torch.zeros(*input_ids.shape, 100)
        logits[..., 10:80] = 3.0
        logits[..., SEP] = -3.0
        return logits[logits_at] if logits_at is not None else logits


def test_heldout_loss_leaves_out_separators(tmp_path):
    held = PackedRows(stream_of(), 8, "causal")
    collator = Collator(SPECIAL, max_len=8, objective=Objective(kind="causal"))
    prep = Prepared(None, [], [], [], None, collator, train_rows=held, heldout_rows=held)
    cfg = TrainConfig(batch_size=4, eval_iters="all")
    out = evaluate(_Uniformish(), prep, cfg, torch.device("cpu"), 0)
    s = held.stream
    n_sep = int((s[1:] == SEP).sum())
    assert out["eval_targets_all"] == len(s) - 1 and out["eval_targets"] == len(s) - 1 - n_sep
    logp = torch.log_softmax(_Uniformish()(torch.zeros(1, 1, dtype=torch.long))[0, 0], -1)
    assert out["eval_loss"] == pytest.approx(float(-logp[10]), rel=1e-5)
    assert out["eval_loss_all"] == pytest.approx((out["eval_targets"] * float(-logp[10]) - n_sep * float(logp[SEP]))
                                                 / out["eval_targets_all"], rel=1e-5)
    assert out["eval_loss_all"] > out["eval_loss"] + 0.1


def test_eval_iters_picks_fixed_rows_or_all(tmp_path):
    held = PackedRows(stream_of(n_docs=200), 8, "causal")
    prep = Prepared(None, [], [], [], None, Collator(SPECIAL, max_len=8, objective=Objective(kind="causal")),
                    train_rows=held, heldout_rows=held)
    some = TrainConfig(batch_size=4, eval_iters=3)
    a = [b.tokens for b in heldout_batches(prep, some)]
    assert len(a) == 3 and all(torch.equal(x, y) for x, y in zip(a, [b.tokens for b in heldout_batches(prep, some)]))
    every = list(heldout_batches(prep, dataclasses.replace(some, eval_iters="all")))
    assert sum(b.num_loss_tokens for b in every) == len(held) - 1
    with pytest.raises(ValueError, match=r"TrainConfig\.eval_iters \(--eval-iters\) must be an integer >= 1"):
        TrainConfig(eval_iters=0).validate()


def test_resume_with_random_offsets_is_bit_identical(tmp_path, tok, prose):
    """Two steps, then a resume to four, equals four straight; the run crosses epochs (new offsets)."""
    small = write(tmp_path / "small.txt", "\n".join(open(prose, encoding="utf-8").read().split("\n")[:12]))
    kw = dict(steps=4, ckpt_every=2, batch_size=8, objective="prefix", lr=3e-3, warmup=1, keep_last=3)
    straight = lm_config(tmp_path / "a", tok, [small], **kw)
    prep = prepare(straight, model_config_for(straight))
    assert prep.train_rows.rows_per_epoch < 4 * 8  # four steps see more than one epoch
    train(straight)
    cut = lm_config(tmp_path / "b", tok, [small], **{**kw, "steps": 2})
    train(cut)
    train(dataclasses.replace(cut, steps=4, resume=True))

    def losses(cfg):
        with open(os.path.join(cfg.out_dir, "metrics.jsonl")) as f:
            return [r["loss"] for r in map(json.loads, f) if "loss" in r]
    assert losses(straight) == losses(cut) and len(losses(cut)) == 4
    a, b = (torch.load(os.path.join(c.out_dir, "ckpt-0000004.pt"), weights_only=True) for c in (straight, cut))
    assert a["data_layout"] == DATA_LAYOUT and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_causal_checkpoint_of_the_old_layout_is_refused(tmp_path):
    cfg = TrainConfig(objective="causal", seq_len=64)
    model_cfg = model_config_for(cfg)
    state = {"config": json.loads(json.dumps(dataclasses.asdict(cfg))), "model_config": model_cfg.to_dict(),
             "step": 1}
    with pytest.raises(TrainingError, match=r"x\.pt: this causal run was written by an earlier glm .*new --out"):
        check_resume("x.pt", state, cfg, model_cfg)
    check_resume("x.pt", {**state, "data_layout": DATA_LAYOUT}, cfg, model_cfg)


def test_settings_missing_from_an_old_checkpoint_mean_the_old_behaviour():
    cfg = TrainConfig(model="tiny-glm", seq_len=128, data=["a.txt"])
    saved = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(cfg))).items()
             if k not in ("doc_split", "val_data", "decay_embeddings", "eval_iters")}
    old_model = model_config_for(cfg).replace(max_positions=129).to_dict()  # the earlier seq_len + 1 rule
    run, _ = setting_changes(saved, old_model, cfg, model_config_for(cfg))
    assert run == {"doc_split": ("lines", "file")}  # .txt was one document per line; positions are the same run
    run, _ = setting_changes(saved, old_model, dataclasses.replace(cfg, doc_split="lines"), model_config_for(cfg))
    assert run == {}


# ------------------------------------------------------------------------------------------------
# Positions: a preset trains at the context it has

def test_rows_need_seq_len_positions_exactly():
    TrainConfig(model="tiny-chatglm3", objective="causal", seq_len=64, model_overrides={"max_positions": 64}).validate()
    with pytest.raises(ValueError, match=r"max_positions 63, but rows of seq_len 64 need an int of at least 64"):
        TrainConfig(objective="causal", seq_len=64, model_overrides={"max_positions": 63}).validate()
    for name in ("tiny-chatglm3", "tiny-glm4-chatglm", "tiny-chatglm"):
        cfg = TrainConfig(model=name, objective="causal", seq_len=64)
        assert model_config_for(cfg).max_positions == 64 == glm.preset(name).max_positions


def test_blank_infilling_positions_stay_below_seq_len():
    """The glm objective's positions and block positions (2D) stay below seq_len in every mode."""
    L = 24
    collator = Collator(SPECIAL, max_len=L, objective=Objective(), is_sentence_end={12})
    limit = collator.objective.max_doc_len(L)
    rng = np.random.default_rng(0)
    worst = 0
    for _ in range(300):
        docs = [rng.integers(10, 80, size=int(rng.integers(1, limit + 1))).tolist() for _ in range(4)]
        worst = max(worst, int(collator(docs, rng).position_ids.max()))
    assert worst < L


# ------------------------------------------------------------------------------------------------
# Knobs

FLAGS = [(["--betas", "0.9", "0.99"], "betas", (0.9, 0.99)), (["--min-lr-ratio", "0.25"], "min_lr_ratio", 0.25),
         (["--decay-embeddings"], "decay_embeddings", True), (["--eval-iters", "all"], "eval_iters", "all"),
         (["--eval-iters", "7"], "eval_iters", 7), (["--val-data", "v.txt", "w.txt"], "val_data", ["v.txt", "w.txt"]),
         (["--doc-split", "blank-line"], "doc_split", "blank-line"), (["--mix", "0.5", "0.2"], "mix", (0.5, 0.2)),
         (["--eval-examples", "12"], "eval_examples", 12), (["--tokenizer-type", "char"], "tokenizer_type", "char"),
         (["--tokenizer-type", "char"], "vocab_size", None), (["--tokenizer-type", "char", "--vocab-size", "70"],
                                                                "vocab_size", 70),
         (["--tokenizer-type", "unigram"], "vocab_size", 1000)]


@pytest.mark.parametrize("argv,field,value", FLAGS, ids=[f[1] for f in FLAGS])
def test_every_new_flag_reaches_train_config(argv, field, value):
    cfg = _train_config(build_parser().parse_args(["train", *argv]))
    assert getattr(cfg, field) == value
    cfg.validate()


def test_flag_defaults_are_train_config_defaults():
    cfg = _train_config(build_parser().parse_args(["train"]))
    for name in ("betas", "min_lr_ratio", "decay_embeddings", "eval_iters", "val_data", "doc_split", "mix",
                 "eval_examples", "weight_decay", "warmup", "grad_clip"):
        assert getattr(cfg, name) == getattr(TrainConfig(), name), name
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--eval-iters", "some"])


def test_decay_embeddings_puts_the_tables_in_the_decayed_group():
    model = glm.GLM(glm.preset("tiny-glm"))
    names = {id(p): n for n, p in model.named_parameters()}
    for flag in (False, True):
        groups = make_optimizer(model, TrainConfig(decay_embeddings=flag)).param_groups
        decayed = {names[id(p)] for p in groups[0]["params"]}
        assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
        assert any("embed" in n for n in decayed) == flag
        assert not any(p.dim() < 2 for p in groups[0]["params"])


def test_global_batch_of_a_causal_run_is_packed(tmp_path, tok, prose):
    cfg = lm_config(tmp_path, tok, [prose])
    prep = prepare(cfg, model_config_for(cfg))
    b = global_batch(prep, cfg, 3)
    assert b.tokens.shape == (4, 16) and b.num_loss_tokens == 64
    assert torch.equal(b.tokens, prep.train_rows.batch(cfg.seed, 3, 4).tokens)


def test_the_knob_table_lists_every_field_and_flag():
    """docs/training.md's "Every knob" table names each TrainConfig field once, with flags the CLI has."""
    import re

    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "training.md"), encoding="utf-8").read()
    table = doc[doc.index("## Every knob"):doc.index("\n## ", doc.index("## Every knob") + 1)]
    rows = [line.split("|")[1:4] for line in table.splitlines() if line.startswith("| `")]
    fields = [f for _, names, _ in rows for f in re.findall(r"`(\w+)`", names)]
    assert sorted(fields) == sorted(f.name for f in dataclasses.fields(TrainConfig))
    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    known = {o for a in train_parser._actions for o in a.option_strings}
    flags = [f for flags, _, _ in rows for f in re.findall(r"`(--[\w-]+)", flags)]
    assert len(flags) >= len(fields) - 1 and set(flags) <= known, set(flags) - known


def test_a_char_level_run_trains_one_id_per_character(tmp_path):
    """nanoGPT's character-level setup through glm train: the tokenizer the run trains has one id per
    character of the text (plus the family's specials), and every character, line breaks included,
    encodes to exactly one id."""
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 8
    path = tmp_path / "tiny.txt"
    path.write_text(text, encoding="utf-8")
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), model="tiny-chatglm3", data=[str(path)], objective="causal",
                      tokenizer_type="char", vocab_size=None, seq_len=16, batch_size=2, steps=2, eval_every=0,
                      ckpt_every=0, progress=False)
    train(cfg)
    tok = load_tokenizer(str(tmp_path / "run" / "tokenizer"))
    chars = sorted(set(text))
    assert all(len(tok.encode(c)) == 1 for c in chars)
    assert len({tok.encode(c)[0] for c in chars}) == len(chars)
    assert tok.decode(tok.encode(text[:60])) == text[:60]
    with pytest.raises(ArgumentError, match="tokenizer_type 'char'"):
        TrainConfig(vocab_size=None).validate()
