"""Quantized CPU kernels benchmark: time per call of glm::int8_linear / glm::int4_linear (per-row scales and
groups of 32, 64, 128) against glm's fp32 glm::small_linear and torch's F.linear, same shapes, same run.

A case is a weight shape N x K (out x in features), a row count M of x and a thread count. Every variant gets
its own copies of its weight (random integers and fp32 scales; random fp32 for the float peers), as many as
fill ``--rotate-mb`` (default 256 MiB, 8x the L3 of the 2-core test machine), and each call takes the next
copy: the weights stream from memory, as every decode step reads every weight once. A round calls every
variant once per copy (the variants alternate, so a burst of load from another process hits all of them);
its time per call is the mean over the copies, and a variant's time the best of ``--rounds`` rounds.

Printed per case: microseconds per call, the weight bytes streamed per second (integers + scales, or the
fp32 weight) and the speed-up over fp32 small_linear measured in the same round. The ceilings, measured in
the same run: copy bandwidth (read + write) and the fp32 matmul FLOP/s (the bound for the compute-heavy M = 8
cases). Machine load is noted before and after (os.getloadavg): on a shared machine, repeat.

    python benchmarks/quant_kernels.py [--shapes 768x3072,3072x768,2304x768,4096x4096] [--rows 1,2,4,8]
                                       [--threads 1,2] [--rounds 7] [--rotate-mb 256] [--out benchmarks/results/local]
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from common import LOCAL, copy_bandwidth, matmul_peak, pyplot, save_figure, summary_row, write_record

from glm import kernels

SHAPES = "768x3072,3072x768,2304x768,4096x4096"
PEER = "fp32 small_linear"


@dataclasses.dataclass
class Variant:
    """One way to compute the layer: ``make(N, K, gen)`` draws one copy of its weight operands (a tuple),
    ``call(x, *operands)`` computes it, ``nbytes(N, K)`` is what one call streams."""
    make: Callable[[int, int, torch.Generator], tuple]
    call: Callable[..., torch.Tensor]
    nbytes: Callable[[int, int], int]


def quant_variant(bits: int, group: Optional[int], scale_dtype: torch.dtype = torch.float32) -> Variant:
    op = torch.ops.glm.int4_linear if bits == 4 else torch.ops.glm.int8_linear

    def make(N: int, K: int, gen: torch.Generator) -> tuple:
        G = 1 if group is None else K // group
        # Random bytes: every int8 value, every nibble (the kernels' speed does not depend on them).
        q = torch.randint(-128, 128, (N, K * bits // 8), generator=gen, dtype=torch.int8)
        return q, (torch.rand(N, G, generator=gen) * 0.01).to(scale_dtype)

    def nbytes(N: int, K: int) -> int:
        return N * K * bits // 8 + N * (1 if group is None else K // group) * scale_dtype.itemsize

    return Variant(make, lambda x, q, s: op(x, q, s, None), nbytes)


def float_variant(call: Callable[..., torch.Tensor]) -> Variant:
    return Variant(lambda N, K, gen: (torch.randn(N, K, generator=gen),), call, lambda N, K: 4 * N * K)


def default_variants() -> dict[str, Variant]:
    out = {PEER: float_variant(lambda x, w: torch.ops.glm.small_linear(x, w, None)),
           "fp32 F.linear": float_variant(lambda x, w: F.linear(x, w))}
    for bits, groups in ((8, (None, 32)), (4, (None, 32, 64, 128))):
        for g in groups:
            out[f"int{bits} {'row' if g is None else f'g{g}'}"] = quant_variant(bits, g)
    return out


def bench_case(N: int, K: int, M: int, variants: dict[str, Variant], rounds: int, rotate_bytes: int,
               copies: Optional[dict[str, list[tuple]]] = None, seed: int = 0) -> dict[str, float]:
    """Best seconds per call of every variant for x ``[M, K]`` (see the module docstring). ``copies`` (variant
    -> list of operand tuples) may be passed to reuse weights across row and thread counts."""
    gen = torch.Generator().manual_seed(seed)
    if copies is None:
        copies = make_copies(N, K, variants, rotate_bytes, gen)
    x = torch.randn(M, K, generator=gen)
    best = {name: math.inf for name in variants}
    with torch.no_grad():
        for name, v in variants.items():  # warm-up: first-call costs (allocations, page faults)
            v.call(x, *copies[name][0])
        for _ in range(rounds):
            for name, v in variants.items():
                ops = copies[name]
                t = time.perf_counter()
                for args in ops:
                    v.call(x, *args)
                best[name] = min(best[name], (time.perf_counter() - t) / len(ops))
    return best


def make_copies(N: int, K: int, variants: dict[str, Variant], rotate_bytes: int,
                gen: torch.Generator) -> dict[str, list[tuple]]:
    return {name: [v.make(N, K, gen) for _ in range(max(2, math.ceil(rotate_bytes / v.nbytes(N, K))))]
            for name, v in variants.items()}


def plot(rows: list[dict], path: str, threads: int) -> None:
    plt = pyplot()
    if plt is None:
        return
    shapes = sorted({(r["N"], r["K"]) for r in rows}, key=lambda s: s[0] * s[1])
    fig, axes = plt.subplots(1, len(shapes), figsize=(3.2 * len(shapes), 3.2), sharey=True, squeeze=False)
    for ax, (N, K) in zip(axes[0], shapes):
        sel = [r for r in rows if (r["N"], r["K"]) == (N, K) and r["threads"] == threads]
        for name in dict.fromkeys(r["variant"] for r in sel):
            pts = sorted((r["M"], r["speedup"]) for r in sel if r["variant"] == name)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_title(f"{N}x{K}, {threads} threads")
        ax.set_xlabel("rows of x (M)")
        ax.set_xscale("log", base=2)
    axes[0][0].set_ylabel(f"speed-up over {PEER}")
    axes[0][-1].legend(fontsize=7)
    save_figure(fig, path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=SHAPES, help="weight shapes NxK (out x in features)")
    ap.add_argument("--rows", default="1,2,4,8", help="rows of x (M)")
    ap.add_argument("--threads", default=",".join(str(t) for t in sorted({1, min(2, os.cpu_count() or 1)})))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--rotate-mb", type=int, default=256, help="weight copies per variant fill this much memory")
    ap.add_argument("--out", default=LOCAL)
    args = ap.parse_args(argv)
    if not kernels.available():
        raise SystemExit(f"quant_kernels benchmark: {kernels.load_error()}")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    row_counts = [int(v) for v in args.rows.split(",")]
    thread_counts = [int(v) for v in args.threads.split(",")]
    load_before = os.getloadavg()
    torch.set_num_threads(max(thread_counts))
    bandwidth, peak = copy_bandwidth("cpu"), matmul_peak("cpu", torch.float32, 2048)
    print(f"load average {load_before[0]:.2f}; ceilings: copy {bandwidth:.1f} GB/s (read + write), fp32 matmul "
          f"{peak / 1e9:.0f} GFLOP/s ({max(thread_counts)} threads)", flush=True)
    variants = default_variants()
    rows: list[dict] = []
    for N, K in shapes:
        copies = make_copies(N, K, variants, args.rotate_mb << 20, torch.Generator().manual_seed(0))
        for threads in thread_counts:
            torch.set_num_threads(threads)
            for M in row_counts:
                best = bench_case(N, K, M, variants, args.rounds, 0, copies)
                line = [f"{N}x{K} M={M} t={threads}:"]
                for name, seconds in best.items():
                    gbs = variants[name].nbytes(N, K) / seconds / 1e9
                    rows.append({"N": N, "K": K, "M": M, "threads": threads, "variant": name, "us": seconds * 1e6,
                                 "GBps": gbs, "speedup": best[PEER] / seconds})
                    line.append(f"{name} {seconds * 1e6:.0f}us {gbs:.1f}GB/s ({best[PEER] / seconds:.2f}x)")
                print("  ".join(line), flush=True)
        del copies
    load_after = os.getloadavg()
    top = max(thread_counts)
    summary = [summary_row(f"{r['variant']} {r['N']}x{r['K']} M={r['M']}", r["us"], base["us"], "us", PEER,
                           higher_is_better=False)
               for r in rows if r["threads"] == top and r["variant"] in ("int8 row", "int4 g32") and r["M"] in (1, 8)
               for base in rows if base["variant"] == PEER and (base["N"], base["K"], base["M"], base["threads"])
               == (r["N"], r["K"], r["M"], r["threads"])]
    path = write_record(args.out, "quant_kernels_cpu", "cpu", benchmark="quant_kernels",
                        config={"shapes": args.shapes, "rows": row_counts, "threads": thread_counts,
                                "rounds": args.rounds, "rotate_mb": args.rotate_mb},
                        load_average={"before": load_before[0], "after": load_after[0]},
                        ceiling={"value": bandwidth, "unit": "GB/s", "what": "measured copy bandwidth (read + write)",
                                 "matmul_GFLOPs": peak / 1e9},
                        results=rows, summary=summary)
    plot(rows, os.path.join(args.out, "quant_kernels_cpu.png"), top)
    print(f"load average after: {load_after[0]:.2f}\nwrote {path}")


if __name__ == "__main__":
    main()
