"""The docs cannot rot: their code runs, their pictures and tables are what the code computes.

- Every ```python block of docs/examples.md runs, top to bottom in one namespace (a notebook), in a
  temporary working directory; so do the ```python blocks of docs/architecture.md and README.md
  (README's from a folder whose ../shared/reference holds the golden fixtures, as beside a
  checkout). Only blocks fenced exactly ```python run: write a signature or a fragment under
  ```text or a bare fence.
- Every `glm ...` command in README.md's ```bash blocks parses with glm's own argument parser, and
  the quick ones (parity, convert, generate, infill, train-tokenizer) run, after README's Python.
- README's pretraining example is `make demo`'s run, and every demo result README.md and
  docs/training.md quote is the committed record benchmarks/results/demo_cpu.json, as printed.
- Every attention-mask picture in docs/architecture.md (a ```text block whose first line is a
  ``visible_mask(...)`` call) equals what `visible_mask` (glm/attention.py) returns for that call.
- The worked blank-infilling table of docs/architecture.md equals `glm.data.infill_layout`'s sample.
- The family table of docs/architecture.md (rows labelled with a backticked `GLMConfig` field)
  equals `glm.PRESETS`.
"""
from __future__ import annotations

import ast
import json
import math
import os
import re
import shlex
import sys
import tempfile
import textwrap

import pytest
import torch
from conftest import REFERENCE_DIR

import glm
from glm.attention import visible_mask
from glm.cli import _train_config, build_parser, main
from glm.data import SpecialIds, infill_layout

DOCS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs")
ARCHITECTURE = os.path.join(DOCS, "architecture.md")
EXAMPLES = os.path.join(DOCS, "examples.md")
TRAINING = os.path.join(DOCS, "training.md")
README = os.path.join(DOCS, "..", "README.md")
DEMO_RECORD = os.path.join(DOCS, "..", "benchmarks", "results", "demo_cpu.json")

FENCE = re.compile(r"^[ \t]*```([\w-]*)[^\n]*\n(.*?)^[ \t]*```[ \t]*$", re.S | re.M)


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def blocks(path: str, lang: str) -> list[tuple[int, str]]:
    """(line number, code) of every fenced block of ``lang`` in a markdown file."""
    text = read(path)
    return [(text[: m.start()].count("\n") + 1, textwrap.dedent(m.group(2)))
            for m in FENCE.finditer(text) if m.group(1) == lang]


def run_notebook(path: str, tmp_path, monkeypatch) -> dict:
    """Exec the file's python blocks in order in one namespace, cwd = tmp_path; a failing block names
    its line. Modules the blocks import from benchmarks/ (a folder of scripts) are forgotten after."""
    code = blocks(path, "python")
    assert code, f"{path} has no ```python blocks"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the examples' tempfile.mkdtemp() lands here
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    ns: dict = {"__name__": "__docs__"}
    try:
        for line, src in code:
            try:
                exec(compile(src, f"{os.path.basename(path)}:{line}", "exec"), ns)
            except Exception as e:
                raise AssertionError(f"{os.path.basename(path)}: the python block at line {line} raised "
                                     f"{type(e).__name__}: {e}") from e
    finally:
        bench = os.path.abspath(os.path.join(DOCS, "..", "benchmarks"))
        for name in set(sys.modules) - before:
            file = getattr(sys.modules[name], "__file__", None)
            if file and os.path.abspath(file).startswith(bench + os.sep):
                del sys.modules[name]
    return ns


# ---------------------------------------------------------------------------------------------
# Executed examples

def test_examples_run_as_a_notebook(tmp_path, monkeypatch):
    ns = run_notebook(EXAMPLES, tmp_path, monkeypatch)
    # The notebook really ran its sections (load, infill, chat, pretrain, benchmark).
    assert {"model", "tok", "chat_tok", "summary", "timings"} <= set(ns)


def test_architecture_snippets_run(tmp_path, monkeypatch):
    run_notebook(ARCHITECTURE, tmp_path, monkeypatch)


# ---------------------------------------------------------------------------------------------
# README: its code runs as written, its commands parse, its demo numbers are the record's

# The commands cheap enough to run here; the rest (training, benchmarks, chat, DDP) only parse.
RUN_COMMANDS = ("parity", "convert", "generate", "infill", "train-tokenizer")


def glm_commands(path: str) -> list[tuple[int, list[str]]]:
    """(line number, arguments after ``glm``) of every glm command in the file's ```bash blocks:
    ``glm ...``, ``python -m glm ...`` and ``torchrun ... -m glm ...``; comments dropped, lines
    continued with a backslash joined."""
    out = []
    for start, code in blocks(path, "bash"):
        lines = code.splitlines()
        i = 0
        while i < len(lines):
            line, cmd = start + 1 + i, lines[i]
            while cmd.endswith("\\") and i + 1 < len(lines):
                i += 1
                cmd = cmd[:-1] + " " + lines[i]
            i += 1
            words = shlex.split(cmd, comments=True)
            if words[:1] == ["glm"]:
                out.append((line, words[1:]))
            elif "-m" in words and words[words.index("-m") + 1:][:1] == ["glm"]:
                out.append((line, words[words.index("-m") + 2:]))
    return out


def parse_command(argv: list[str]):
    """glm's own parse of a command (``glm bench ... -- ARGS`` split as glm.cli.main splits it)."""
    if argv[:1] == ["bench"] and "--" in argv:
        argv = argv[:argv.index("--")]
    try:
        return build_parser().parse_args(argv)
    except SystemExit as e:  # argparse printed why on stderr
        raise AssertionError(f"glm {shlex.join(argv)} does not parse (exit {e.code})") from None


def test_readme_commands_parse():
    commands = glm_commands(README)
    assert {argv[0] for _, argv in commands} >= {*RUN_COMMANDS, "chat", "train", "demo", "bench"}
    for line, argv in commands:
        try:
            parse_command(argv)
        except AssertionError as e:
            raise AssertionError(f"README.md line {line}: {e}") from None


def test_readme_commands_that_do_not_parse_are_caught():
    # The check above really runs argparse: an unknown option or a missing argument fails it.
    with pytest.raises(AssertionError, match="does not parse"):
        parse_command(["train", "--no-such-option"])
    with pytest.raises(AssertionError, match="does not parse"):
        parse_command(["convert", "only-a-source"])


@pytest.fixture
def beside_the_fixtures(tmp_path):
    """A working folder laid out as README's paths expect of a checkout: ../shared/reference holds
    the golden fixtures."""
    if not os.path.isdir(REFERENCE_DIR):
        pytest.skip(f"golden fixtures not found at {REFERENCE_DIR}: README's examples run against "
                    f"../shared/reference beside the checkout")
    (tmp_path / "shared").mkdir()
    os.symlink(REFERENCE_DIR, tmp_path / "shared" / "reference")
    work = tmp_path / "checkout"
    work.mkdir()
    return work


def test_readme_runs_as_written(beside_the_fixtures, monkeypatch, capsys):
    # Python first, top to bottom, then the quick commands in order, in the same folder: the
    # generate/infill commands use the folders README's Python saved, the second convert the first's.
    ns = run_notebook(README, beside_the_fixtures, monkeypatch)
    assert {"model", "glm_model", "cache", "new_tokens", "tok", "chat_model"} <= set(ns)
    ran = []
    for line, argv in glm_commands(README):
        if argv[0] in RUN_COMMANDS:
            capsys.readouterr()
            rc = main(argv)
            assert rc == 0, f"README.md line {line}: glm {shlex.join(argv)} exited {rc}: {capsys.readouterr().err}"
            ran.append(argv[0])
    assert set(ran) == set(RUN_COMMANDS)


def test_readme_train_example_is_the_demo_run():
    # `glm train`'s defaults are not tuned for the embedded corpus; README's example is the demo's
    # run, which learns. Only what does not change the trained model may differ.
    from glm.demo import DEMO

    argv = next(a for _, a in glm_commands(README) if a[:1] == ["train"] and "--model-overrides" in a)
    cfg = _train_config(parse_command(argv))
    loose = ("out_dir", "eval_examples", "progress")
    assert {k: v for k, v in vars(cfg).items() if k not in loose} == \
        {k: v for k, v in vars(DEMO).items() if k not in loose}


def _printed(text: str, value: float) -> bool:
    """Whether ``text`` is ``value`` rounded as printed (to as many decimals as ``text`` has)."""
    decimals = len(text.split(".")[1]) if "." in text else 0
    return f"{value:.{decimals}f}" == text


def demo_passages() -> list[tuple[str, str]]:
    """The passages that quote `make demo`'s results: README's paragraph on it, and training.md's
    section."""
    readme = read(README)
    start = readme.index("`make demo` trains")
    training = read(TRAINING)
    section = training.index("## `make demo`, measured")
    return [("README.md", readme[start:readme.index("\n\n", start)]),
            ("docs/training.md", training[section:training.index("\n## ", section + 1)])]


def check_demo_quotes(record: dict, passages: list[tuple[str, str]]) -> None:
    r = record["results"]
    scores = {"first-word exact match": 100 * r["exact_match_first_word"],
              "whole-fill exact match": 100 * r["exact_match"], "most-frequent-answer baseline": 100 * r["baseline"]}
    others = {r"held-out loss (\d+\.\d+)": r["eval_loss"], r"perplexity (\d+\.\d+)": r["eval_ppl"],
              r"(\d+) steps": r["steps"], r"(\d+\.\d)M-parameter": r["parameters"] / 1e6,
              r"(\d+) held-out blanks": r["blanks"], r"(\d+) s of training": r["seconds"]}
    for name, text in passages:
        percents = re.findall(r"(\d+(?:\.\d+)?)%", text)
        for p in percents:
            assert any(_printed(p, v) for v in scores.values()), \
                f"{name} quotes a demo result of {p}%, which is none of the record's {scores}"
        for what, value in scores.items():
            assert any(_printed(p, value) for p in percents), f"{name} does not quote the record's {what}, {value:.1f}%"
        for pattern, value in others.items():
            for q in re.findall(pattern, text):
                assert _printed(q, value), f"{name}: {pattern} quotes {q}, the record has {value}"
        assert re.search(r"held-out loss \d", text), f"{name} does not quote the held-out loss"


def test_demo_results_quoted_are_the_record():
    with open(DEMO_RECORD) as f:
        record = json.load(f)
    assert record["benchmark"] == "demo" and record["git_sha"] and record["torch"] and record["cpu_model"]
    check_demo_quotes(record, demo_passages())


def test_demo_quote_check_catches_stale_numbers():
    # What the docs quoted before the record existed: a result the code no longer gives.
    record = {"results": {"exact_match_first_word": 0.262, "exact_match": 0.075, "baseline": 0.156, "eval_loss": 2.167,
                          "eval_ppl": 8.73, "steps": 1500, "parameters": 2021376, "blanks": 160, "seconds": 200.0}}
    stale = [("README", "**23.1%** exact match (7.5% whole) against 15.6%, held-out loss 2.167")]
    with pytest.raises(AssertionError, match="23.1%"):
        check_demo_quotes(record, stale)
    with pytest.raises(AssertionError, match="loss"):
        check_demo_quotes(record, [("README", "26.2% / 7.5% / 15.6%, held-out loss 2.23")])
    check_demo_quotes(record, [("README", "26.2% / 7.5% / 15.6%, held-out loss 2.167 after 1500 steps")])


# ---------------------------------------------------------------------------------------------
# Mask pictures

ROW = re.compile(r"^\s*(\S+)\s+([x.]+)(?:\s|$)")


def _literal(node: ast.AST):
    v = ast.literal_eval(node)
    return torch.tensor(v) if isinstance(v, list) else v


def parse_picture(block: str) -> tuple[dict, list[str]]:
    """A picture block: its first line is a ``visible_mask(batch, q_len, kv_size, **kw)`` call (lists
    stand for tensors), the rows that follow are ``label  xx..x  [comment]``."""
    first, *rest = block.splitlines()
    m = re.search(r"visible_mask\(.*\)", first)
    assert m, f"picture header is not a visible_mask(...) call: {first!r}"
    call = ast.parse(m.group(0), mode="eval").body
    args = dict(zip(("batch", "q_len", "kv_size"), (_literal(a) for a in call.args)))
    args.update({k.arg: _literal(k.value) for k in call.keywords})
    rows = [r.group(2) for r in map(ROW.match, rest) if r]
    return args, rows


def mask_pictures() -> list[tuple[int, str]]:
    return [(line, b) for line, b in blocks(ARCHITECTURE, "text") if b.lstrip().startswith("visible_mask(")]


def test_architecture_has_the_mask_pictures():
    assert len(mask_pictures()) >= 3


@pytest.mark.parametrize("line,block", [pytest.param(n, b, id=f"line{n}") for n, b in mask_pictures()])
def test_mask_picture_is_what_visible_mask_computes(line, block):
    args, rows = parse_picture(block)
    assert args["batch"] == 1, "pictures show one sample"
    grid = visible_mask(**args)[0, 0]
    want = ["".join("x" if v else "." for v in row) for row in grid.tolist()]
    assert rows == want, f"architecture.md line {line}: the picture differs from visible_mask:\n" + "\n".join(want)


# ---------------------------------------------------------------------------------------------
# Tables

def md_tables(path: str) -> list[list[list[str]]]:
    """Every markdown table as rows of stripped cells (the |---| separator dropped)."""
    tables, cur = [], []
    for line in read(path).splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                cur.append(cells)
        elif cur:
            tables.append(cur)
            cur = []
    return tables


def test_worked_example_table_is_infill_layout():
    table = next(t for t in md_tables(ARCHITECTURE) if t[0][0] == "slot" and any(r[0] == "block position" for r in t))
    rows = {r[0]: [c.strip("()").strip("`") for c in r[1:]] for r in table[1:]}
    special = SpecialIds(mask=1, smask=2, gmask=3, sop=4, eop=5, eos=6, pad=0, cls=7)
    names = {7: "[CLS]", 6: "<eos>", 1: "[MASK]", 4: "<sop>", 5: "<eop>", **{10 + i: f"x{i}" for i in range(1, 7)}}
    s = infill_layout([7, 11, 12, 13, 14, 15, 16, 6], [(2, 3), (4, 6)], special.mask, special, order=[1, 0])
    want = {"tokens": [names[t] for t in s.tokens.tolist()], "targets": [names[t] for t in s.targets.tolist()],
            "loss": [str(int(b)) for b in s.loss_mask], "position": [str(p) for p in s.position.tolist()],
            "block position": [str(p) for p in s.block_position.tolist()]}
    assert table[0][1:] == [str(i) for i in range(len(s))]
    for name, cells in want.items():
        assert rows[name] == cells, f"architecture.md worked example, row {name!r}: infill_layout gives {cells}"
    # Parenthesised targets are exactly the no-loss ones.
    raw_targets = next(r for r in table if r[0] == "targets")[1:]
    assert [c.startswith("(") for c in raw_targets] == [not b for b in s.loss_mask]
    text = read(ARCHITECTURE)
    assert f"prefix_len = {s.prefix_len}" in text


def _cell_matches(cell: str, value) -> bool:
    cell = cell.replace("`", "").strip()
    if isinstance(value, bool):
        return cell.split()[0] == ("yes" if value else "no")
    if value is None or value == ():
        return cell.split()[0] == "none"
    if isinstance(value, tuple):
        return [int(x) for x in cell.split(",")] == list(value)
    if isinstance(value, (int, float)):
        return math.isclose(float(cell.split()[0]), value, rel_tol=1e-4)
    return cell.split()[0] == str(value)


def test_family_table_is_the_presets():
    table = next(t for t in md_tables(ARCHITECTURE) if "GLMConfig" in t[0][0] and "field" in t[0][0])
    presets = [h.strip("`") for h in table[0][1:]]
    assert all(p in glm.PRESETS for p in presets), presets
    checked = 0
    for row in table[1:]:
        m = re.fullmatch(r"`(\w+)`.*", row[0])
        if not m:
            continue  # descriptive rows
        field = m.group(1)
        for name, cell in zip(presets, row[1:]):
            if cell == "—":
                continue
            value = getattr(glm.PRESETS[name], field)
            assert _cell_matches(cell, value), \
                f"architecture.md: {field} of {name} is {value!r}, the table says {cell!r}"
            checked += 1
    assert checked > 100
