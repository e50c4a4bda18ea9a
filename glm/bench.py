"""``glm bench``: run one of the benchmark scripts in ``benchmarks/`` and print its summary table.

The scripts live in the repository (they are measurement programs, not library code), so ``glm
bench`` needs a checkout installed with ``pip install -e .``. Each suite runs in its own process (the
converter measures peak RSS; the others must not inherit this process's allocations) and writes a
JSON record plus a PNG into ``--out``; this module then prints the record's ``summary`` rows (ours vs
the peer measured in the same run) and its ``ceiling`` (what the device can do at best, also
measured in the same run).

Where the record goes: ``benchmarks/results/`` holds the committed records the docs quote, and only
``--publish`` (or an explicit ``--out``) writes there; a plain run writes to the untracked
``benchmarks/results/local/``, a ``--quick`` smoke run to ``benchmarks/results/quick/``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Optional, Sequence

from .errors import BenchError
from .files import atomic_write

SUITES = ("attention", "decode", "train", "convert", "demo", "finetune", "quantize")
# Suites that measure the host alone (disk and memory; the CPU kernels), and why; their record is <suite>_cpu.
CPU_ONLY = {"convert": "measures disk and host memory", "quantize": "measures glm's CPU kernels"}

# Arguments that make each suite a smoke run of a few seconds (tests, first try on a new machine).
QUICK = {
    "attention": ["--seqs", "128,256", "--dtypes", "float32", "--repeats", "1", "--no-decode"],
    "decode": ["--small", "--prompt", "8", "--new-tokens", "2", "--batches", "1", "--repeats", "1"],
    "train": ["--hidden", "64", "--layers", "1", "--seq", "32", "--batch", "2", "--steps", "1", "--nano-rounds", "2",
              "--quality-steps", "2"],
    "convert": ["--gb", "0.02", "--shard-size", "8MB", "--repeats", "1"],
    "demo": ["--steps", "20", "--eval-examples", "8"],
    "finetune": ["--small", "--steps", "1"],
    "quantize": ["--small", "--new-tokens", "4", "--repeats", "1", "--no-load", "--quiet-wait", "0", "--reruns", "0"],
}
# Suites whose scripts judge goals; a smoke run tells them not to (tiny sizes say nothing about a goal).
JUDGES_GOALS = ("attention", "convert", "quantize")
SMOKE_NOTE = ("--quick is a smoke run at tiny sizes, not a measurement: goals are not judged and the record is not "
              "published")


def benchmarks_dir() -> str:
    """The repository's benchmarks/ folder, found next to the installed glm package."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    folder = os.path.join(here, "benchmarks")
    if not os.path.isfile(os.path.join(folder, "common.py")):
        raise BenchError(f"glm bench runs the scripts in the repository's benchmarks/ folder, which is not part of "
                         f"an installed package (looked in {folder}); run it from a clone installed with "
                         f"`pip install -e .`")
    return folder


def results_dir(*, quick: bool = False, publish: bool = False) -> str:
    """Where a run's record goes when no --out is given: the committed records only with ``publish``."""
    if quick and publish:
        raise BenchError("--quick is a smoke run at tiny sizes, not a measurement, so it cannot be published; "
                         "drop --quick to publish, or --publish to smoke-test")
    results = os.path.join(benchmarks_dir(), "results")
    return results if publish else os.path.join(results, "quick" if quick else "local")


def record_name(suite: str, device: str, quantize: Optional[str] = None) -> str:
    """The file name (without .json) a suite's script writes its record under: ``<suite>_<device>``, ``cpu``
    for the host-only suites; a quantized decode run has a record of its own (``decode_cpu_int8``) beside
    the full-precision one."""
    return f"{suite}_{'cpu' if suite in CPU_ONLY else device}{'' if quantize is None else '_' + quantize}"


def run_suite(suite: str, *, device: str = "cpu", out: Optional[str] = None, quick: bool = False,
              publish: bool = False, extra: Sequence[str] = (), quantize: Optional[str] = None,
              group_size: Optional[int] = None) -> dict:
    """Runs ``benchmarks/<suite>.py`` in a fresh process and returns the JSON record it wrote.

    The record goes to ``out``; without it to benchmarks/results/ with ``publish`` (the records the
    docs quote), else to the untracked benchmarks/results/local/ (results/quick/ with ``quick``).
    ``quantize`` ("int8" / "int4", with ``group_size``) has the decode suite quantize its model first."""
    if suite not in SUITES:
        raise BenchError(f"unknown benchmark {suite!r}; choose one of {', '.join(SUITES)}")
    if suite in CPU_ONLY and device != "cpu":
        raise BenchError(f"the {suite} benchmark {CPU_ONLY[suite]}; it has no --device (use cpu)")
    if quantize is None and group_size is not None:
        raise BenchError(f"--group-size {group_size} needs --quantize int8 or int4")
    if quantize is not None and suite != "decode":
        raise BenchError(f"--quantize applies to the decode suite, not {suite}"
                         + (" (it measures every scheme itself)" if suite == "quantize" else ""))
    if publish and out:
        raise BenchError(f"--publish writes the committed records in benchmarks/results/ and --out names another "
                         f"folder ({out}); pass one of them")
    folder = benchmarks_dir()
    out = os.path.abspath(out or results_dir(quick=quick, publish=publish))
    argv = [sys.executable, os.path.join(folder, f"{suite}.py"), "--out", out]
    if suite != "convert":
        argv += ["--device", device]
    if quantize is not None:
        argv += ["--quantize", quantize] + (["--group-size", str(group_size)] if group_size is not None else [])
    if quick:
        argv += QUICK[suite] + (["--smoke"] if suite in JUDGES_GOALS else [])
    argv += list(extra)
    rc = subprocess.run(argv, cwd=folder).returncode
    if rc != 0:
        raise BenchError(f"benchmarks/{suite}.py exited with status {rc} (its output is above)")
    with open(os.path.join(out, record_name(suite, device, quantize) + ".json")) as f:
        return json.load(f)


def summary_table(record: dict) -> str:
    """The record's summary rows and ceiling as an aligned text table."""
    rows = record.get("summary", [])
    width = max([len(r["case"]) for r in rows] + [4])
    lines = [f"{record.get('benchmark', '?')} on {record.get('device', '?')} (torch {record.get('torch', '?')}, "
             f"git {record.get('git_sha', '?')})",
             f"{'case':<{width}}  {'glm':>10}  {'peer':>10}  {'unit':<9} {'ratio':>6}  peer"]
    for r in rows:
        lines.append(f"{r['case']:<{width}}  {r['ours']:10.3g}  {r['peer']:10.3g}  {r['unit']:<9} "
                     f"{r['ratio']:5.2f}x  {r['peer_name']}")
    c = record.get("ceiling")
    if c:
        lines.append(f"device ceiling: {c['value']:.3g} {c['unit']} ({c['what']}, same run)")
    return "\n".join(lines)


def markdown_table(record: dict) -> str:
    """The record's summary rows and ceiling as a Markdown table (for benchmarks/README.md)."""
    lines = ["| case | glm | peer | unit | ratio | peer |", "|---|---|---|---|---|---|"]
    for r in record.get("summary", []):
        lines.append(f"| {r['case']} | {r['ours']:.3g} | {r['peer']:.3g} | {r['unit']} | {r['ratio']:.2f}× | "
                     f"{r['peer_name']} |")
    c = record.get("ceiling")
    tail = f"Device ceiling: {c['value']:.3g} {c['unit']} ({c['what']}, same run). " if c else ""
    return "\n".join(lines) + f"\n\n{tail}Device: {record.get('device')}, torch {record.get('torch')}, " \
                               f"git {record.get('git_sha')}, {record.get('time')}."


README_HEAD = """# Benchmarks

Each script measures glm against a peer in the same run on the same machine and prints the ratio,
with the device's ceiling measured in the same run too. Run one with `glm bench SUITE` (a checkout
installed with `pip install -e .`; `--quick` for a smoke run, `--device cuda` on a GPU, arguments
after `--` go to the script) or `python benchmarks/SUITE.py --help`. Each run writes a record (JSON:
device, torch version, git sha, config, results) and a chart (PNG). A plain run writes them to
`benchmarks/results/local/` (not tracked by git), a `--quick` smoke run to `benchmarks/results/quick/`
(a smoke run judges no goals: its sizes measure nothing). The committed records in
`benchmarks/results/`, which the docs quote and this page shows, are replaced only by
`glm bench SUITE --publish` (or `--out benchmarks/results`; `make gpu-check` publishes the GPU
records). This page is regenerated from them by `glm bench report`.

| suite | what | peer |
|---|---|---|
""" + "".join(f"| {suite} | {what} | {peer} |\n" for suite, what, peer in (
    ("attention", "fused prefix-LM / causal attention, fwd and fwd+bwd, FLOP/s over visible pairs (CPU: also decode "
                  "with the fused vs sdpa backend)",
     "`scaled_dot_product_attention` (dense mask / `is_causal`); on GPU also FlexAttention (compiled, prefix-LM "
     "`BlockMask`)"),
    ("decode", "greedy decode tokens/s, batch 1 and 8: a 122M GLM-4-shaped model on CPU; GLM-4-9B-shaped (random "
               "bf16 weights) on GPU, eager / CUDA graphs / graphs + `torch.compile`, against the bandwidth roofline",
     "transformers `GlmForCausalLM`, same weights"),
    ("train", "training step tokens/s and MFU, small GLM-4-shaped model; tokens/s and held-out loss per character "
              "at equal steps of a nanoGPT-sized char-level causal LM",
     "transformers `GlmForCausalLM`, same config and batch; a plain PyTorch GPT-2-style loop of the same size"),
    ("convert", "peak RSS and GB/s of streaming checkpoint conversion (2.2 GB, 3 shards)",
     "loading everything, converting, saving"),
    ("demo", "`make demo`'s run (`glm.demo.DEMO`): held-out blank-infilling exact match on the fill's first word "
             "and on the whole fill; the record also has the held-out loss, steps and seconds",
     "the most-frequent-answer baseline"),
    ("finetune", "fine-tuning step tokens/s, trainable parameters, optimizer state and peak RSS of full, LoRA and "
                 "P-tuning v2 on a 122M GLM-4-shaped model",
     "glm full fine-tuning; peft + transformers `GlmForCausalLM` LoRA, same weights and batches"),
    ("quantize", "batch-1 decode tokens/s on CPU of glm fp32, INT8 and INT4 (122M and ~1B GLM-4-shaped models, "
                 "same random weights), with bytes per token against the copy bandwidth; peak RSS of "
                 "`from_pretrained(quantize=)`; the demo model's held-out loss per scheme",
     "glm fp32; transformers `GlmForCausalLM` fp32; PyTorch's `_weight_int8pack_mm` / "
     "`_weight_int4pack_mm_for_cpu` on the same integers"),
))


def write_report(results: Optional[str] = None) -> str:
    """Regenerates README.md next to the records folder ``results`` (default benchmarks/results, so
    benchmarks/README.md) from its latest CPU and CUDA records."""
    results = os.path.abspath(results or os.path.join(benchmarks_dir(), "results"))
    path = os.path.join(os.path.dirname(results), "README.md")
    rel = os.path.basename(results)
    parts = [README_HEAD]
    for device, title in (("cpu", "CPU"), ("cuda", "GPU")):
        parts.append(f"## {title}\n")
        found = False
        for suite in SUITES:
            name = record_name(suite, device)
            if suite in CPU_ONLY and device != "cpu":
                continue
            record_path = os.path.join(results, name + ".json")
            if not os.path.exists(record_path):
                continue
            found = True
            with open(record_path) as f:
                record = json.load(f)
            parts.append(f"### {suite}\n\n{markdown_table(record)}\n")
            if os.path.exists(os.path.join(results, name + ".png")):
                parts.append(f"![{suite} on {device}]({rel}/{name}.png)\n")
        if not found:
            parts.append(f"No {title} records yet: run `glm bench SUITE --device {device}` on such a machine.\n")
    atomic_write(path, "\n".join(parts).encode())
    return path


def main(suite: str, *, device: str, out: Optional[str], quick: bool, extra: Sequence[str],
         publish: bool = False, quantize: Optional[str] = None, group_size: Optional[int] = None) -> int:
    if suite == "report":
        print(f"wrote {write_report(out)}")
        return 0
    record = run_suite(suite, device=device, out=out, quick=quick, publish=publish, extra=extra,
                       quantize=quantize, group_size=group_size)
    print()
    print(summary_table(record))
    if quick:
        print(SMOKE_NOTE)
    return 0
