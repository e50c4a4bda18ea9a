"""Attention benchmark: glm's fused prefix-LM kernel vs scaled_dot_product_attention, same run.

Two comparisons per sequence length and dtype, forward and forward+backward:

- prefix-LM (the GLM mask, prefix = T/2): ours with ``prefix_len`` vs SDPA with the dense boolean
  mask (the only way to express it to SDPA);
- plain causal: ours vs SDPA ``is_causal=True``.

GFLOP/s count only the visible (query, key) pairs: forward 4·B·H·D·pairs, forward+backward 3.5× that
(the backward does 2.5× the forward's matmul work). So a kernel that computes masked-out blocks gains
nothing from them. A last section times greedy decode of a GLM-4-shaped model with the ``fused``
backend against the ``sdpa`` backend (same weights, same tokens).

    python benchmarks/attention.py [--device cpu] [--seqs 512,1024,2048] [--dtypes float32,bfloat16]
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch
import torch.nn.functional as F

from common import matmul_peak, run_timed, summary_row, write_record

HERE = os.path.dirname(os.path.abspath(__file__))


def median_time(fn, device: str, repeats: int) -> float:
    """Median wall time of ``fn`` after one warm-up call (medians shrug off a stray slow run)."""
    return statistics.median(run_timed(fn, device, repeats)[0])


def prefix_mask(T: int, prefix: int, device: str) -> torch.Tensor:
    i = torch.arange(T, device=device)
    return (i[None, :] <= i[:, None]) | (i[None, :] < prefix)


def visible_pairs(T: int, prefix: int) -> int:
    # Row i sees max(i + 1, prefix) keys.
    return sum(max(i + 1, prefix) for i in range(T))


def bench_kernels(device: str, dtypes, seqs, B: int, H: int, D: int, repeats: int) -> list[dict]:
    from glm.kernels import fused_attention

    rows = []
    gen = torch.Generator().manual_seed(0)
    for dtype in dtypes:
        for T in seqs:
            prefix = T // 2
            q, k, v, g = (torch.randn(B, H, T, D, generator=gen).to(device=device, dtype=dtype) for _ in range(4))
            mask = prefix_mask(T, prefix, device)
            pl = torch.full((B,), prefix, dtype=torch.int32, device=device)
            cases = {
                "prefix": (lambda q, k, v: fused_attention(q, k, v, causal=True, prefix_len=pl),
                           lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                           visible_pairs(T, prefix), "sdpa dense mask"),
                "causal": (lambda q, k, v: fused_attention(q, k, v, causal=True),
                           lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                           visible_pairs(T, 0), "sdpa is_causal"),
            }
            for mask_kind, (ours, peer, pairs, peer_name) in cases.items():
                fwd_flops = 4 * B * H * D * pairs
                for pass_ in ("fwd", "fwd+bwd"):
                    if pass_ == "fwd":
                        def run(f):
                            with torch.no_grad():
                                f(q, k, v)
                        flops = fwd_flops
                    else:
                        qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))

                        def run(f):
                            f(qg, kg, vg).backward(g)
                        flops = 3.5 * fwd_flops
                    t_ours = median_time(lambda: run(ours), device, repeats)
                    t_peer = median_time(lambda: run(peer), device, repeats)
                    rows.append({"dtype": str(dtype).replace("torch.", ""), "T": T, "mask": mask_kind, "pass": pass_,
                                 "peer": peer_name, "ours_ms": t_ours * 1e3, "peer_ms": t_peer * 1e3,
                                 "ours_GFLOPs": flops / t_ours / 1e9, "peer_GFLOPs": flops / t_peer / 1e9,
                                 "speedup": t_peer / t_ours})
                    r = rows[-1]
                    print(f"{r['dtype']:>8} T={T:<5} {mask_kind:6} {pass_:7} ours {r['ours_ms']:8.2f} ms "
                          f"{r['ours_GFLOPs']:6.0f} GF/s | {peer_name:15} {r['peer_ms']:8.2f} ms "
                          f"{r['peer_GFLOPs']:6.0f} GF/s | x{r['speedup']:.2f}", flush=True)
    return rows


def bench_decode(device: str, prompt: int, new_tokens: int, batches, repeats: int) -> list[dict]:
    """Greedy decode tokens/s of one model with the fused vs the sdpa attention backend."""
    import glm
    from decode import bench_config
    from glm.generate import generate

    cfg = bench_config().replace(max_positions=max(2048, prompt + new_tokens))
    model = glm.GLM(cfg).to(device)
    model.init_weights(std=0.02, seed=0)
    model.eval()
    rows = []
    gen = torch.Generator().manual_seed(0)
    for B in batches:
        ids = torch.randint(3, cfg.vocab_size, (B, prompt), generator=gen).to(device)
        times, tokens = {}, {}
        for backend in ("fused", "sdpa"):
            model.backend = backend
            times[backend] = median_time(lambda: tokens.__setitem__(backend, generate(model, ids, max_new_tokens=new_tokens)),
                                         device, repeats)
        rows.append({"batch": B, "prompt": prompt, "new_tokens": new_tokens,
                     "fused_tokens_per_s": B * new_tokens / times["fused"],
                     "sdpa_tokens_per_s": B * new_tokens / times["sdpa"], "speedup": times["sdpa"] / times["fused"],
                     "tokens_equal": bool(torch.equal(tokens["fused"], tokens["sdpa"]))})
        r = rows[-1]
        print(f"decode batch {B} (prompt {prompt}, +{new_tokens}): fused {r['fused_tokens_per_s']:.1f} tok/s, "
              f"sdpa {r['sdpa_tokens_per_s']:.1f} tok/s, x{r['speedup']:.2f}, tokens equal: {r['tokens_equal']}",
              flush=True)
    return rows


def plot(rows: list[dict], path: str, device: str) -> None:
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, p) for m in ("prefix", "causal") for p in ("fwd", "fwd+bwd")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), sharey=True)
    for ax, (m, p) in zip(axes, panels):
        for dtype in sorted({r["dtype"] for r in rows}):
            sel = [r for r in rows if r["mask"] == m and r["pass"] == p and r["dtype"] == dtype]
            xs = [r["T"] for r in sel]
            line, = ax.plot(xs, [r["ours_GFLOPs"] for r in sel], "o-", label=f"glm fused {dtype}")
            ax.plot(xs, [r["peer_GFLOPs"] for r in sel], "x--", color=line.get_color(), label=f"{sel[0]['peer']} {dtype}")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{m} mask, {p}")
        ax.set_xlabel("sequence length")
    axes[0].set_ylabel("GFLOP/s (visible pairs only)")
    axes[-1].legend(fontsize=7)
    fig.suptitle(f"attention, {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--seqs", default="512,1024,2048")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--decode-prompt", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--decode-batches", default="1,8")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)

    from glm import kernels

    if not kernels.available():
        raise SystemExit(f"glm.kernels: {kernels.load_error()}")
    if args.device not in kernels.devices():
        raise SystemExit(f"glm.kernels has no {args.device} kernel in this build (has: {sorted(kernels.devices())})")
    device = args.device
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    seqs = [int(s) for s in args.seqs.split(",")]
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"B={args.batch} H={args.heads} D={args.dim}, prefix = T/2")
    peak = matmul_peak(device, torch.float32 if device == "cpu" else torch.bfloat16)
    print(f"measured matmul ceiling: {peak / 1e9:.0f} GFLOP/s")
    rows = bench_kernels(device, dtypes, seqs, args.batch, args.heads, args.dim, args.repeats)
    decode_rows = [] if args.no_decode else bench_decode(
        device, args.decode_prompt, args.decode_tokens, [int(b) for b in args.decode_batches.split(",")],
        max(2, args.repeats // 2))
    name = f"attention_{device}"
    path = write_record(args.out, name, device, benchmark="attention", shape={"B": args.batch, "H": args.heads,
                        "D": args.dim, "prefix": "T/2"}, threads=torch.get_num_threads(), results=rows,
                        decode=decode_rows,
                        ceiling={"value": peak / 1e12, "unit": "TFLOP/s", "what": "measured matmul"},
                        summary=[summary_row(f"{r['dtype']} T={r['T']} {r['mask']} {r['pass']}", r["ours_GFLOPs"],
                                             r["peer_GFLOPs"], "GFLOP/s", r["peer"]) for r in rows]
                        + [summary_row(f"decode batch {r['batch']} (fused vs sdpa backend)", r["fused_tokens_per_s"],
                                       r["sdpa_tokens_per_s"], "tokens/s", "sdpa backend") for r in decode_rows])
    plot(rows, os.path.join(args.out, name + ".png"), device)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
