"""Training-step benchmark: tokens/s and MFU of glm vs transformers' GlmForCausalLM, same config and batch.

Both models get the same weights (glm saves a transformers Glm checkpoint, both load it) and run
the same causal-LM step: forward, fp32 cross entropy, backward, AdamW. The device ceiling is measured
in the same run (a large fp32/bf16 matmul), and MFU = 6 * params * tokens/s / ceiling (plus the
attention term 12 * layers * hidden * T per token).

    python benchmarks/train.py [--device cpu|cuda] [--steps 5] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.nn.functional as F

from common import matmul_peak, summary_row, sync, write_record

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="torch.compile both models' forward (same for both)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)

    import transformers

    import glm

    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    H = args.hidden
    cfg = glm.preset("tiny-glm-hf").replace(vocab_size=8000, hidden_size=H, num_layers=args.layers,
                                            num_heads=max(1, H // 64), num_kv_heads=max(1, H // 256),
                                            head_dim=64, ffn_hidden_size=int(H * 8 / 3) // 64 * 64,
                                            max_positions=args.seq + 1, name="bench-train")
    src = glm.GLM(cfg)
    src.init_weights(seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        src.save_pretrained(os.path.join(tmp, "hf"), format="hf")
        ours = glm.from_pretrained(os.path.join(tmp, "hf"), device=device).train()
        ref = transformers.GlmForCausalLM.from_pretrained(os.path.join(tmp, "hf"), dtype=torch.float32).to(device).train()

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen).to(device)
    x, y = ids[:, :-1], ids[:, 1:]

    fwd_glm = lambda x: ours(x, check_inputs=False)  # noqa: E731
    fwd_hf = lambda x: ref(input_ids=x).logits  # noqa: E731
    if args.compile:
        fwd_glm, fwd_hf = torch.compile(fwd_glm), torch.compile(fwd_hf)

    def timed(forward, model) -> float:
        """Seconds per training step (forward, fp32 cross entropy, backward, AdamW) of ``forward``."""
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                logits = forward(x)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # warm-up (twice: a compiled step recompiles once for the backward's shapes)
        step()
        sync(device)
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync(device)
        return (time.perf_counter() - t) / args.steps

    peak = matmul_peak(device, dtype)
    tokens = args.batch * args.seq
    flops_per_token = 6 * cfg.num_parameters + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * args.seq
    t_glm, t_hf = timed(fwd_glm, ours), timed(fwd_hf, ref)
    rows = {"glm": t_glm, "transformers": t_hf}
    print(f"{cfg.num_parameters / 1e6:.1f}M-param GLM-4-shaped model, batch {args.batch} x {args.seq} tokens, "
          f"{device} {dtype}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"measured matmul ceiling: {peak / 1e9:.1f} GFLOP/s")
    print(f"{'impl':<13} {'s/step':>8} {'tokens/s':>9} {'GFLOP/s':>8} {'MFU':>6}")
    out = {}
    for k, t in rows.items():
        tps = tokens / t
        out[k] = {"seconds_per_step": t, "tokens_per_s": tps, "mfu": tps * flops_per_token / peak}
        print(f"{k:<13} {t:8.3f} {tps:9.0f} {tps * flops_per_token / 1e9:8.1f} {out[k]['mfu']:6.1%}")
    print(f"glm / transformers: {t_hf / t_glm:.2f}x")

    path = write_record(args.out, f"train_{device}", device, benchmark="train", transformers=transformers.__version__,
                        config=cfg.to_dict(), batch=args.batch, seq=args.seq, compiled=args.compile,
                        ceiling_flops=peak, results=out,
                        speedup=t_hf / t_glm,
                        ceiling={"value": peak / 1e12, "unit": "TFLOP/s", "what": f"measured {dtype} matmul"},
                        summary=[summary_row(f"train step, MFU {out['glm']['mfu']:.0%} vs {out['transformers']['mfu']:.0%}",
                                             out["glm"]["tokens_per_s"], out["transformers"]["tokens_per_s"],
                                             "tokens/s", "transformers GlmForCausalLM")])
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4.5, 3))
        ax.bar(list(out), [v["tokens_per_s"] for v in out.values()], color=["tab:blue", "tab:gray"])
        ax.set_ylabel("training tokens / s")
        ax.set_title(f"train step, {cfg.num_parameters / 1e6:.1f}M params, {device}")
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, f"train_{device}.png"), dpi=120)
    except ImportError:
        pass
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
