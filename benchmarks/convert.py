"""Converter benchmark: peak memory and throughput of glm's streaming conversion vs load-everything.

Builds a synthetic multi-shard checkpoint (transformers Glm format, bf16, >= 2 GB by default) in a
temp dir, then converts it release -> glm format twice, each in its own fresh process so peak RSS is
its own: (1) `glm convert` (streaming, one tensor at a time) and (2) the naive approach that loads
every shard into one dict, converts in memory and saves. Reports peak RSS against the largest
shard (goal: streaming <= largest shard + 10%), GB/s, and the ratio between the two (goal: streaming
at >= 0.8x the naive throughput, although it also fsyncs and hashes every byte it writes).

    python benchmarks/convert.py [--gb 2.2] [--shard-size 1GB] [--out benchmarks/results/local]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Optional

import torch
from common import LOCAL, disk_write_bandwidth, pyplot, save_figure, summary_row, write_record


def synthetic_config(target_gb: float):
    import glm

    base = glm.preset("glm-4-9b-chat-hf").replace(hidden_size=2048, num_heads=16, num_kv_heads=2, head_dim=128,
                                                   ffn_hidden_size=5632, vocab_size=65024, num_layers=1)
    per_layer = base.replace(num_layers=2).num_parameters - base.num_parameters
    layers = max(1, round((target_gb * 1e9 / 2 - (base.num_parameters - per_layer)) / per_layer))
    return base.replace(num_layers=layers, name="bench-synthetic")


def build_checkpoint(folder: str, target_gb: float, shard_size: str) -> dict:
    """Random weights streamed straight to a bf16 release-format checkpoint (never all in memory),
    as a release from the Hub is: without the checksum record glm's writer adds (which `glm convert`
    would verify first, a read of every byte that converting a downloaded release does not pay)."""
    import glm
    from glm.checkpoint import CHECKSUMS_NAME
    from glm.formats import native
    from glm.hub import Source, write_from

    cfg = synthetic_config(target_gb)
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in glm.GLM(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    get = lambda n: (torch.randn(shapes[n], generator=gen) * 0.02).to(torch.bfloat16)  # noqa: E731
    meta = lambda n: torch.empty(shapes[n], dtype=torch.bfloat16, device="meta")  # noqa: E731
    src = Source(cfg, None, native.mappings(cfg), get, meta)
    s = write_from(src, folder, to="hf", shard_size=shard_size)
    os.remove(os.path.join(folder, CHECKSUMS_NAME))
    return {"params": cfg.num_parameters, "bytes": s.bytes, "shards": len(s.files), "layers": cfg.num_layers}


# The two measured jobs run in child processes: `python convert.py --job streaming|naive SRC DST`.
def job(kind: str, src: str, dst: str, shard_size: str) -> dict:
    import glm  # noqa: F401  (import cost is part of the baseline, measured before the work)
    from glm.hub import peak_rss  # VmHWM: unlike ru_maxrss, not inherited across fork+exec

    base_rss = peak_rss()
    t0 = time.perf_counter()
    if kind == "streaming":
        from glm.hub import convert_checkpoint

        s = convert_checkpoint(src, dst, to="glm", shard_size=shard_size)
        nbytes = s.bytes
    else:
        from safetensors.torch import load_file, save_file

        from glm import formats
        from glm.config import GLMConfig

        cfg = GLMConfig.from_hf(src)
        sd = {}
        for f in sorted(os.listdir(src)):
            if f.endswith(".safetensors"):
                sd.update(load_file(os.path.join(src, f)))
        out = {}
        for mp in formats.mappings(cfg, keys=list(sd)):
            out.update(zip(mp.glm, mp.to_glm(*[sd[n] for n in mp.hf])))
        os.makedirs(dst)
        save_file(out, os.path.join(dst, "model.safetensors"))
        nbytes = sum(t.numel() * t.element_size() for t in out.values())
    secs = time.perf_counter() - t0
    peak = peak_rss()
    return {"kind": kind, "seconds": secs, "bytes": nbytes, "peak_rss": peak, "baseline_rss": base_rss}


def run_job(kind: str, src: str, dst: str, shard_size: str) -> dict:
    # Each job starts with no dirty pages: the naive job's output is not flushed when it exits, and
    # the kernel writing it back would otherwise slow whichever job runs next.
    if hasattr(os, "sync"):
        os.sync()
    out = subprocess.run([sys.executable, __file__, "--job", kind, src, dst, "--shard-size", shard_size],
                         check=True, capture_output=True, text=True)
    shutil.rmtree(dst, ignore_errors=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def typical(runs: list[dict]) -> dict:
    """An approach's median run by time, with the highest peak memory of them all. Not the fastest:
    the load-everything job's time swings 2.6-11 s on a 2-core VM (its 2.7 GB of allocations and
    unsynced page-cache writes meet whatever the neighbours do), so a best-of would judge the goal on
    its luckiest run."""
    ordered = sorted(runs, key=lambda r: r["seconds"])
    mid = dict(ordered[(len(ordered) - 1) // 2])
    mid["peak_rss"] = max(r["peak_rss"] for r in runs)
    mid["runs_seconds"] = [r["seconds"] for r in runs]
    return mid


VERDICT = {True: "met", False: "NOT met", None: "not judged (smoke run)"}


SPEED_GOAL = 0.8  # streaming throughput / load-everything throughput


def speed_goal_met(ratio: float, smoke: bool = False) -> Optional[bool]:
    """The streaming converter's speed goal, >= `SPEED_GOAL` x the naive throughput; None on a smoke run."""
    return None if smoke else ratio >= SPEED_GOAL


def goal_met(peak_rss: int, largest_shard: int, smoke: bool = False) -> Optional[bool]:
    """The streaming converter's goal, peak RSS <= largest shard + 10%; None (not judged) on a smoke
    run, whose shards of a few MB are dwarfed by the interpreter's own memory."""
    return None if smoke else peak_rss <= 1.10 * largest_shard


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=2.2, help="synthetic checkpoint size in GB (default 2.2)")
    ap.add_argument("--shard-size", default="1GB", help="shard size of the synthetic input and the output")
    ap.add_argument("--out", default=LOCAL, help="folder for JSON + PNG")
    ap.add_argument("--smoke", action="store_true", help="a smoke run (glm bench --quick): the goal is not judged")
    ap.add_argument("--repeats", type=int, default=3,
                    help="runs of each approach, alternating which goes first (default 3); the median counts")
    ap.add_argument("--job", nargs=3, metavar=("KIND", "SRC", "DST"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.job:
        print(json.dumps(job(*args.job, args.shard_size)))
        return

    with tempfile.TemporaryDirectory(prefix="glm-bench-convert-") as tmp:
        src = os.path.join(tmp, "src")
        info = build_checkpoint(src, args.gb, args.shard_size)
        largest = max(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src) if f.endswith(".safetensors"))
        runs: dict[str, list[dict]] = {"streaming": [], "naive": []}
        for i in range(max(1, args.repeats)):
            for k in (("streaming", "naive") if i % 2 == 0 else ("naive", "streaming")):
                runs[k].append(run_job(k, src, os.path.join(tmp, k), args.shard_size))
        results = {k: typical(r) for k, r in runs.items()}
        disk = disk_write_bandwidth(tmp, mb=min(256, max(16, info["bytes"] // 2**20)))  # as much as was converted

    gb = lambda b: b / 1e9  # noqa: E731
    print(f"synthetic Glm checkpoint: {info['params'] / 1e9:.2f} B params, {gb(info['bytes']):.2f} GB bf16 in "
          f"{info['shards']} shards, largest shard {gb(largest):.2f} GB")
    print(f"{'approach':<10} {'seconds':>8} {'GB/s':>6} {'peak RSS GB':>12} {'baseline GB':>12} "
          f"{'peak/largest shard':>19}")
    for k, r in results.items():
        print(f"{k:<10} {r['seconds']:8.2f} {gb(r['bytes']) / r['seconds']:6.2f} {gb(r['peak_rss']):12.2f} "
              f"{gb(r['baseline_rss']):12.2f} {r['peak_rss'] / largest:19.2f}")
    for k, r in results.items():
        print(f"{k} runs (s): {', '.join(f'{x:.2f}' for x in r['runs_seconds'])}; the median counts")
    s, n = results["streaming"], results["naive"]
    goal_ok = goal_met(s["peak_rss"], largest, smoke=args.smoke)
    speed_ok = speed_goal_met(n["seconds"] / s["seconds"], smoke=args.smoke)
    print(f"streaming vs naive: {n['peak_rss'] / s['peak_rss']:.2f}x less peak memory, "
          f"{n['seconds'] / s['seconds']:.2f}x the speed; goal peak <= largest shard + 10%: {VERDICT[goal_ok]}; "
          f"goal speed >= {SPEED_GOAL}x: {VERDICT[speed_ok]}")
    print(f"disk ceiling (sequential write + fsync): {disk:.2f} GB/s")

    path = write_record(args.out, "convert_cpu", "cpu", benchmark="convert", config=info,
                        largest_shard_bytes=largest, shard_size=args.shard_size, results=results, goal_met=goal_ok,
                        speed_goal_met=speed_ok,
                        smoke=args.smoke,
                        ceiling={"value": disk, "unit": "GB/s", "what": "measured sequential write + fsync"},
                        summary=[summary_row("peak RSS", gb(s["peak_rss"]), gb(n["peak_rss"]), "GB", "load-everything",
                                             higher_is_better=False),
                                 summary_row("throughput", gb(s["bytes"]) / s["seconds"], gb(n["bytes"]) / n["seconds"],
                                             "GB/s", "load-everything")])
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ks = list(results)
        ax.bar(ks, [gb(results[k]["peak_rss"]) for k in ks], color=["tab:green", "tab:red"])
        ax.axhline(gb(largest), ls="--", c="k", label="largest shard")
        ax.axhline(gb(1.1 * largest), ls=":", c="gray", label="goal (+10%)")
        ax.set_ylabel("peak RSS (GB)")
        ax.set_title(f"convert {gb(info['bytes']):.1f} GB checkpoint")
        ax.legend()
        save_figure(fig, os.path.join(args.out, "convert_cpu.png"))
        print(f"wrote {path} and convert_cpu.png")
    else:
        print(f"wrote {path} (matplotlib missing: no plot)")


if __name__ == "__main__":
    main()
