"""Decode benchmark: tokens/s of glm's static-cache generation vs transformers' GlmForCausalLM.

A ~120M-parameter GLM-4-shaped model (random weights) is saved once as a transformers Glm checkpoint
and loaded by both libraries, so the weights are identical. Each side generates greedily from the
same prompts (batch 1 and batch 8) in the same process; the greedy tokens are checked to agree. The
ceiling printed is a measured memory-copy bandwidth of this machine: batch-1 decode reads every
weight once per token, so weight bytes × tokens/s against it is the bandwidth utilisation.

    python benchmarks/decode.py [--device cpu|cuda] [--new-tokens 64] [--prompt 32] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch

from common import copy_bandwidth, run_timed, summary_row, write_record

HERE = os.path.dirname(os.path.abspath(__file__))


def bench_config(small: bool = False):
    """The ~120M GLM-4-shaped model decode is measured on (``small``: a 2M one for smoke runs)."""
    import glm

    if small:
        return glm.preset("tiny-glm-hf").replace(vocab_size=1000, hidden_size=128, num_layers=2, num_heads=2,
                                                 num_kv_heads=1, head_dim=64, ffn_hidden_size=256,
                                                 max_positions=2048, name="bench-small")
    return glm.preset("tiny-glm-hf").replace(vocab_size=32000, hidden_size=768, num_layers=12, num_heads=12,
                                             num_kv_heads=2, head_dim=64, ffn_hidden_size=2048,
                                             max_positions=2048, name="bench-120m")


def timed(fn, device: str, repeats: int) -> tuple[float, object]:
    """Best time of ``fn`` and its (last) result: the generated tokens, compared across libraries."""
    times, out = run_timed(fn, device, repeats)
    return min(times), out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default=None, help="float32 (cpu default) or bfloat16 (cuda default)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--new-tokens", type=int, default=64, help="generated tokens per row")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="a 2M-parameter model (smoke runs)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)

    import transformers

    import glm
    from glm.generate import generate

    device = args.device
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    cfg = bench_config(args.small)
    model = glm.GLM(cfg)
    model.init_weights(std=0.02, seed=0)
    weight_bytes = cfg.num_parameters * torch.tensor([], dtype=dtype).element_size()
    ceiling = copy_bandwidth(device)
    print(f"model {cfg.num_parameters / 1e6:.0f}M params ({weight_bytes / 1e9:.2f} GB in {dtype}), device {device}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}")
    print(f"measured copy bandwidth (ceiling): {ceiling:.1f} GB/s")

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(os.path.join(tmp, "hf"), format="hf")
        ours = glm.from_pretrained(os.path.join(tmp, "hf"), dtype=dtype, device=device)
        ref = transformers.GlmForCausalLM.from_pretrained(os.path.join(tmp, "hf"), dtype=dtype).to(device).eval()
    del model

    rows = []
    gen = torch.Generator().manual_seed(0)
    for B in [int(b) for b in args.batches.split(",")]:
        ids = torch.randint(3, cfg.vocab_size, (B, args.prompt), generator=gen).to(device)
        n = args.new_tokens

        def run_glm():
            return generate(ours, ids, max_new_tokens=n)

        def run_hf():
            with torch.no_grad():
                out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=n, min_new_tokens=n, pad_token_id=0, eos_token_id=None)
            return out[:, ids.shape[1]:]

        t_glm, tok_glm = timed(run_glm, device, args.repeats)
        t_hf, tok_hf = timed(run_hf, device, args.repeats)
        agree = float((tok_glm.cpu() == tok_hf.cpu()).float().mean())
        r = {"batch": B, "prompt": args.prompt, "new_tokens": n,
             "glm_tokens_per_s": B * n / t_glm, "hf_tokens_per_s": B * n / t_hf, "speedup": t_hf / t_glm,
             "glm_weight_GBps": weight_bytes * n / t_glm / 1e9, "greedy_agreement": agree}
        rows.append(r)

    print(f"{'batch':>5} {'glm tok/s':>10} {'hf tok/s':>9} {'glm/hf':>7} {'glm weight GB/s':>16} {'of ceiling':>10} {'tokens agree':>12}")
    for r in rows:
        print(f"{r['batch']:5d} {r['glm_tokens_per_s']:10.1f} {r['hf_tokens_per_s']:9.1f} {r['speedup']:6.2f}x "
              f"{r['glm_weight_GBps']:16.2f} {r['glm_weight_GBps'] / ceiling:9.0%} {r['greedy_agreement']:12.0%}")

    name = f"decode_{device}"
    summary = [summary_row(f"decode batch {r['batch']}", r["glm_tokens_per_s"], r["hf_tokens_per_s"], "tokens/s",
                           "transformers GlmForCausalLM") for r in rows]
    path = write_record(args.out, name, device, benchmark="decode", transformers=transformers.__version__,
                        dtype=str(dtype), config=cfg.to_dict(), ceiling_GBps=ceiling, results=rows,
                        ceiling={"value": ceiling, "unit": "GB/s", "what": "measured copy bandwidth"}, summary=summary)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2))
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r["glm_tokens_per_s"] for r in rows], 0.4, label="glm")
        ax.bar([x + 0.2 for x in xs], [r["hf_tokens_per_s"] for r in rows], 0.4, label="transformers Glm")
        ax.set_xticks(list(xs), [f"batch {r['batch']}" for r in rows])
        ax.set_ylabel("tokens / s")
        ax.set_title(f"greedy decode, {cfg.num_parameters / 1e6:.0f}M GLM-4-shaped, {device}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, name + ".png"), dpi=120)
    except ImportError:
        pass
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
