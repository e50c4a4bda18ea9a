"""Tokenizer throughput: encode and decode MB/s of glm's tokenizer per family vs transformers' tokenizer
built from the same files, in the same run.

Text: the embedded corpus generator's English and Chinese documents (glm.corpus.generate_corpus) mixed
with Python code (glm's own sources), cut into ~4 KB chunks, each encoded and decoded by one call, as a
data loader or a chat loop calls a tokenizer. MB/s counts the UTF-8 bytes of the text. glm's sources spell
special tokens ("[MASK]", "<|endoftext|>") and SentencePiece's space symbol U+2581, so the text holds them.

No release files are read: each family's files are trained in the run on the same text (so vocabularies
are small, a few thousand ids), and transformers' peer is built from the files that were saved:
  glm4 (tiktoken rank file)   transformers' TikTokenConverter -> PreTrainedTokenizerFast
  glm4 tokenizer.json         PreTrainedTokenizerFast(tokenizer_file=...), glm reads it with `tokenizers`
  glm, chatglm2, chatglm3     transformers' SentencePieceBackend (its sentencepiece tokenizer base, which
                              the releases' remote-code tokenizers build on), vocab_file = the model file
  chatglm                     the same; glm also rewrites whitespace into ChatGLM-6B's placeholder pieces,
                              which SentencePieceBackend does not, so its ids differ (recorded)
  glm-10b (GPT-2 BPE)         transformers' GPT2Tokenizer on vocab.json + merges.txt + added_tokens.json,
  glm-roberta (RoBERTa BPE)   RobertaTokenizer and BertTokenizer likewise (files written by the
  glm-large (WordPiece)       `tokenizers` trainers in glm-10b's / glm-roberta-large's / glm-large's layout)

Two ways to encode, each timed and checked for equal ids on the whole text:
  encode                glm `encode` (special-token strings stay text) vs transformers'
                        `encode(..., split_special_tokens=True)`
  encode with specials  glm `encode_with_specials` vs transformers' plain `encode`, which matches its added
                        tokens in the text; only for peers that carry the release's special tokens (glm4 and
                        the English files: a bare SentencePieceBackend knows none of GLM's)
Each row also records whether decode(encode(text)) gives back what the family guarantees (docs/tokenizers.md,
Round trips): the text itself (byte-level files), the text with U+2581 as a space (SentencePiece; chatglm
also turns placeholder spellings into whitespace), or transformers' decode of the same ids (WordPiece).

    .venv/bin/python benchmarks/tokenize_speed.py [--mb 1.0] [--repeats 3] [--out benchmarks/results/local]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass

from common import LOCAL, pyplot, save_figure, summary_row, write_record

from glm.corpus import generate_corpus
from glm.tokenizer import TokenizerError, load, train
from glm.tokenizer.glm4 import GLM4_SPECIALS, PAT_STR
from glm.tokenizer.glm_english import EOP, SOP

CHUNK = 4096
SP_VOCAB = 2000
GLM4_RANKS = 2000
ENGLISH_VOCAB = 2000
# original GLM's token layouts (THUDM's added_tokens.json / tokenizer_config.json of each release)
GPT2_ADDED = (SOP, EOP, "[CLS]", "[MASK]", "[SEP]", "[UNUSED]", "[gMASK]", "[sMASK]")
ENGLISH_CONFIGS = {
    "gpt2": {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "cls_token": "[CLS]", "mask_token": "[MASK]",
             "unk_token": "[UNK]", "additional_special_tokens": [SOP, EOP, "[gMASK]", "[sMASK]"],
             "add_prefix_space": False, "tokenizer_class": "GLMGPT2Tokenizer", "use_fast": False},
    "roberta": {"eos_token": "</s>", "pad_token": "</s>", "cls_token": "<s>", "mask_token": "[MASK]",
                "unk_token": "<unk>", "additional_special_tokens": [SOP, EOP], "add_prefix_space": False,
                "tokenizer_class": "GLMRobertaTokenizer", "use_fast": False},
    "bert": {"do_lower_case": True, "tokenizer_class": "GLMBertTokenizer", "additional_special_tokens": [SOP, EOP]},
}


def bench_text(mb: float) -> list[str]:
    """About ``mb`` MB of mixed Chinese/English prose and Python code, in ~4 KB chunks."""
    docs = generate_corpus(seed=0, size="small").train
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "glm")
    code = []
    for path in sorted(glob.glob(os.path.join(root, "*.py"))):
        with open(path, encoding="utf-8") as f:
            code.append(f.read())
    prose, source = "\n\n".join(docs), "\n".join(code)
    target = int(mb * 1e6)
    text, i = [], 0
    # alternate ~3 parts prose with 1 part code until the byte budget is met
    while sum(len(t.encode()) for t in text) < target:
        text.append(prose[(i * 3 * CHUNK) % len(prose):][:3 * CHUNK])
        text.append(source[(i * CHUNK) % len(source):][:CHUNK])
        i += 1
    joined = "".join(text)
    return [joined[k:k + CHUNK] for k in range(0, len(joined), CHUNK)]


def throughput(fn, items, nbytes: int, repeats: int) -> float:
    """Best-of-``repeats`` MB/s of calling ``fn`` on every item."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for x in items:
            fn(x)
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e6


@dataclass
class Case:
    label: str
    tok: object  # glm's tokenizer
    peer: object  # transformers' tokenizer built from the same files
    peer_name: str
    peer_has_specials: bool  # the peer carries the release's special tokens (so "encode with specials" compares)
    round_trip: str  # what decode(encode(text)) gives back: see expected_round_trip


def expected_round_trip(rule: str, text: str) -> str:
    """The text decode(encode(text)) gives back as docs/tokenizers.md states it (WordPiece is compared
    with transformers' decode instead)."""
    if rule in ("sentencepiece", "chatglm"):
        text = text.replace("\u2581", " ")  # SentencePiece's own space symbol decodes as a space
    if rule == "chatglm":  # ChatGLM-6B's whitespace placeholders, spelled in the text, decode as whitespace
        text = re.sub(r"<\|blank_(\d+)\|>", lambda m: " " * int(m.group(1)), text)
        text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
    return text


def _english_folders(work: str, corpus: list[str]) -> dict[str, str]:
    """Folders in glm-10b's (GPT-2 BPE), glm-roberta-large's (RoBERTa BPE) and glm-large's (WordPiece)
    layouts, their vocabularies trained on ``corpus`` by the `tokenizers` trainers."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    def write(path: str, obj) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False)

    def byte_bpe(folder: str, first: tuple = (), last: tuple = ()) -> int:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.train_from_iterator(corpus, trainers.BpeTrainer(
            vocab_size=ENGLISH_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=list(first), show_progress=False))
        tok.model.save(folder)  # vocab.json + merges.txt
        with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
            vocab = json.load(f)
        for t in last:
            vocab[t] = len(vocab)
        write(os.path.join(folder, "vocab.json"), vocab)
        return len(vocab)

    folders = {kind: os.path.join(work, f"english-{kind}") for kind in ENGLISH_CONFIGS}
    for folder in folders.values():
        os.makedirs(folder)
    n = byte_bpe(folders["gpt2"], last=("<|endoftext|>",))  # GPT-2: <|endoftext|> is the last of vocab.json
    write(os.path.join(folders["gpt2"], "added_tokens.json"), {t: n + i for i, t in enumerate(GPT2_ADDED)})
    n = byte_bpe(folders["roberta"], first=("<s>", "<pad>", "</s>", "<unk>"), last=("<mask>",))
    write(os.path.join(folders["roberta"], "added_tokens.json"), {SOP: n, EOP: n + 1, "[MASK]": n + 2})
    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.train_from_iterator(corpus, trainers.WordPieceTrainer(
        vocab_size=ENGLISH_VOCAB, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False))
    wp.model.save(folders["bert"])  # vocab.txt
    with open(os.path.join(folders["bert"], "vocab.txt"), encoding="utf-8") as f:
        n = len(f.read().splitlines())
    write(os.path.join(folders["bert"], "added_tokens.json"), {SOP: n, EOP: n + 1})
    for kind, folder in folders.items():
        write(os.path.join(folder, "tokenizer_config.json"), ENGLISH_CONFIGS[kind])
    return folders


def build(work: str, chunks: list[str]) -> list[Case]:
    """glm's tokenizer and transformers' peer for each family, from files trained in ``work``."""
    import transformers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    corpus = os.path.join(work, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        f.write("".join(chunks[:256]))  # ~1 MB is plenty for a few-thousand-id vocabulary
    out = []
    for family in ("glm", "chatglm", "chatglm2", "chatglm3"):
        tok = train([corpus], os.path.join(work, family), SP_VOCAB, family)
        peer = SentencePieceBackend(vocab_file=os.path.join(work, family, tok.model_file))
        out.append(Case(family, tok, peer, "transformers SentencePieceBackend", False,
                        "chatglm" if family == "chatglm" else "sentencepiece"))
    small = os.path.join(work, "corpus-small.txt")
    with open(small, "w", encoding="utf-8") as f:
        f.write("".join(chunks[:48]))  # glm4's toy BPE trainer is pure Python
    tok4 = train([small], os.path.join(work, "glm4"), GLM4_RANKS + len(GLM4_SPECIALS), "glm4")
    conv = TikTokenConverter(vocab_file=os.path.join(work, "glm4", "tokenizer.model"), pattern=PAT_STR,
                             extra_special_tokens=list(GLM4_SPECIALS)).converted()
    out.append(Case("glm4 (tiktoken file)", tok4, PreTrainedTokenizerFast(tokenizer_object=conv),
                    "transformers PreTrainedTokenizerFast (TikTokenConverter)", True, "exact"))
    # the same vocabulary as a release tokenizer.json folder (glm-4-9b-chat-hf's layout)
    folder = os.path.join(work, "glm4-json")
    os.makedirs(folder)
    conv.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
                   "pad_token": "<|endoftext|>"}, f)
    out.append(Case("glm4 (tokenizer.json)", load(folder),
                    PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json")),
                    "transformers PreTrainedTokenizerFast", True, "exact"))
    english = _english_folders(work, chunks[:256])
    for kind, label, cls, rule in (("gpt2", "glm-10b (GPT-2 BPE)", "GPT2Tokenizer", "exact"),
                                   ("roberta", "glm-roberta (RoBERTa BPE)", "RobertaTokenizer", "exact"),
                                   ("bert", "glm-large (WordPiece)", "BertTokenizer", "wordpiece")):
        peer = getattr(transformers, cls).from_pretrained(english[kind])
        out.append(Case(label, load(english[kind]), peer, f"transformers {cls}", True, rule))
    return out


def measure(case: Case, chunks: list[str], nbytes: int, repeats: int) -> dict:
    """One row: ids equal and throughput of each way to encode, decode, and the round trip."""
    tok, peer = case.tok, case.peer
    ours_ids = [tok.encode(c) for c in chunks]
    hf_ids = [peer.encode(c, add_special_tokens=False, split_special_tokens=True) for c in chunks]
    if case.round_trip == "wordpiece":
        round_trip = all(tok.decode(i) == peer.decode(i) for i in ours_ids)
    else:
        round_trip = all(tok.decode(i) == expected_round_trip(case.round_trip, c) for i, c in zip(ours_ids, chunks))
    row = {"family": case.label, "peer": case.peer_name, "vocab_size": tok.vocab_size,
           "ids_equal": ours_ids == hf_ids, "round_trip": round_trip, "round_trip_rule": case.round_trip,
           "exact_round_trips": sum(tok.decode(i) == c for i, c in zip(ours_ids, chunks)), "chunks": len(chunks),
           "glm_encode_MBps": throughput(tok.encode, chunks, nbytes, repeats),
           "hf_encode_MBps": throughput(lambda c: peer.encode(c, add_special_tokens=False, split_special_tokens=True),
                                        chunks, nbytes, repeats),
           "glm_decode_MBps": throughput(tok.decode, ours_ids, nbytes, repeats),
           "hf_decode_MBps": throughput(peer.decode, hf_ids, nbytes, repeats)}
    row["encode_ratio"] = row["glm_encode_MBps"] / row["hf_encode_MBps"]
    row["decode_ratio"] = row["glm_decode_MBps"] / row["hf_decode_MBps"]
    if case.peer_has_specials:
        try:
            ours = [tok.encode_with_specials(c) for c in chunks]
        except TokenizerError as e:
            # RoBERTa / WordPiece GLM refuse a literal [gMASK] / [sMASK] here (glm infill's path): they have none
            row["ids_equal_with_specials"] = None
            row["with_specials_refused"] = str(e)
        else:
            row["ids_equal_with_specials"] = ours == [peer.encode(c, add_special_tokens=False) for c in chunks]
            row["glm_encode_specials_MBps"] = throughput(tok.encode_with_specials, chunks, nbytes, repeats)
            row["hf_encode_specials_MBps"] = throughput(lambda c: peer.encode(c, add_special_tokens=False), chunks,
                                                        nbytes, repeats)
            row["encode_specials_ratio"] = row["glm_encode_specials_MBps"] / row["hf_encode_specials_MBps"]
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=1.0, help="MB of text (default 1)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=LOCAL)
    args = ap.parse_args(argv)
    import transformers

    chunks = bench_text(args.mb)
    nbytes = sum(len(c.encode()) for c in chunks)
    print(f"{len(chunks)} chunks, {nbytes / 1e6:.2f} MB of UTF-8 text; load average {os.getloadavg()[0]:.2f}")
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for case in build(work, chunks):
            row = measure(case, chunks, nbytes, args.repeats)
            rows.append(row)
            specials = (f"   with specials {row['encode_specials_ratio']:5.2f}x, ids equal: "
                        f"{row['ids_equal_with_specials']}" if "encode_specials_ratio" in row else
                        "   with specials: refused ([gMASK] in text)" if "with_specials_refused" in row else "")
            print(f"{case.label:26} encode {row['glm_encode_MBps']:7.2f} vs {row['hf_encode_MBps']:7.2f} MB/s "
                  f"({row['encode_ratio']:5.2f}x)   decode {row['glm_decode_MBps']:7.2f} vs "
                  f"{row['hf_decode_MBps']:7.2f} MB/s ({row['decode_ratio']:5.2f}x)   ids equal: {row['ids_equal']}"
                  f"{specials}   round trip ({row['round_trip_rule']}): {row['round_trip']}")
    summary = []
    for r in rows:
        summary.append(summary_row(f"{r['family']} encode", r["glm_encode_MBps"], r["hf_encode_MBps"], "MB/s",
                                   r["peer"]))
        if "glm_encode_specials_MBps" in r:
            summary.append(summary_row(f"{r['family']} encode with specials", r["glm_encode_specials_MBps"],
                                       r["hf_encode_specials_MBps"], "MB/s", r["peer"]))
        summary.append(summary_row(f"{r['family']} decode", r["glm_decode_MBps"], r["hf_decode_MBps"], "MB/s",
                                   r["peer"]))
    import tokenizers

    path = write_record(args.out, "tokenize_cpu", "cpu", benchmark="tokenize", transformers=transformers.__version__,
                        tokenizers=tokenizers.__version__, load_average=os.getloadavg(), text_MB=nbytes / 1e6,
                        chunk_chars=CHUNK, results=rows, summary=summary,
                        ceiling={"value": None, "unit": "MB/s", "what": "none: CPU-bound string processing"})
    plt = pyplot()
    if plt is not None:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        for ax, kind in zip(axes, ("encode", "decode")):
            xs = list(range(len(rows)))
            ax.bar([x - 0.2 for x in xs], [r[f"glm_{kind}_MBps"] for r in rows], 0.4, label="glm")
            ax.bar([x + 0.2 for x in xs], [r[f"hf_{kind}_MBps"] for r in rows], 0.4, label="transformers")
            ax.set_xticks(xs, [r["family"] for r in rows], rotation=30, ha="right", fontsize=7)
            ax.set_yscale("log")
            ax.set_ylabel("MB/s")
            ax.set_title(f"{kind}, {nbytes / 1e6:.1f} MB mixed zh/en/code, cpu", fontsize=9)
            ax.legend(fontsize=7)
        save_figure(fig, os.path.join(args.out, "tokenize_cpu.png"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
