"""Decode benchmark: tokens/s of glm's static-cache generation (eager; on CUDA also replayed from CUDA
graphs, plain and torch.compile'd) vs transformers' GlmForCausalLM, against the bandwidth roofline.

Both models get the same random weights: glm's model is built on the device, and its state dict is
converted in memory to transformers' Glm layout by glm.formats' mappings (nothing goes to disk, so
the 9.4B GLM-4-9B shape needs no 19 GB checkpoint). Each side generates greedily from the same prompts
(batch 1 and 8) in the same process, and the tokens of every row are compared across the rows.

The roofline: a decode step reads every weight once (the embedding table excepted: only B of its
rows) for B tokens, so with the copy bandwidth measured in this run the ceiling is
B × bandwidth / bytes-per-step tokens/s; each row prints its fraction of it.

    python benchmarks/decode.py [--device cpu|cuda] [--shape bench-120m|glm4-9b] [--small]
                                [--prompt N] [--new-tokens N] [--batches 1,8] [--out benchmarks/results/local]
    # the GLM-4-9B goal (H100): glm with CUDA graphs >= 118 tokens/s at batch 1 (~75% of the roofline)
    python benchmarks/decode.py --device cuda --shape glm4-9b
"""
from __future__ import annotations

import argparse
import gc
import os
import time

import torch
from common import (
    LOCAL,
    copy_bandwidth,
    model_bytes,
    pyplot,
    run_timed,
    save_figure,
    step_bytes,
    summary_row,
    write_record,
)

SHAPES = ("bench-120m", "glm4-9b")
# (prompt, new tokens) per shape when not given.
DEFAULT_LENGTHS = {"bench-120m": (32, 64), "glm4-9b": (128, 128)}


def bench_config(small: bool = False, shape: str = "bench-120m"):
    """The model decode is measured on: a ~120M GLM-4-shaped one, the real GLM-4-9B dims (``shape``
    ``glm4-9b``), or a 2M one for smoke runs (``small``)."""
    import glm

    if small:
        return glm.preset("tiny-glm-hf").replace(vocab_size=1000, hidden_size=128, num_layers=2, num_heads=2,
                                                 num_kv_heads=1, head_dim=64, ffn_hidden_size=256,
                                                 max_positions=2048, name="bench-small")
    if shape == "glm4-9b":
        # GLM-4-9B as transformers' Glm holds it: 151552 vocab, 4096 hidden, 40 layers, 32 heads over 2
        # KV heads of 128, SwiGLU 13696, RMSNorm, half the head rotated. RoPE rounding is set to
        # match the transformers model in build_models.
        return glm.preset("glm-4-9b-chat-hf").replace(name="glm4-9b")
    return glm.preset("tiny-glm-hf").replace(vocab_size=32000, hidden_size=768, num_layers=12, num_heads=12,
                                             num_kv_heads=2, head_dim=64, ffn_hidden_size=2048,
                                             max_positions=2048, name="bench-120m")


def random_weights(model: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """N(0, std) matrices, unit norms, zero biases, drawn on the parameters' own device (a 9.4B model
    drawn on the host and copied over would take minutes)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std, generator=gen)
            elif name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.zero_()


def build_models(cfg, device: str, dtype: torch.dtype, seed: int = 0):
    """glm's model and transformers' GlmForCausalLM with the same random weights, both built on
    ``device`` in ``dtype``."""
    import transformers

    import glm
    from glm import formats

    hf_cfg = transformers.GlmConfig.from_dict(formats.config_to_hf(cfg, dtype))
    with torch.device(device):
        ref = transformers.GlmForCausalLM._from_config(hf_cfg, dtype=dtype).eval()
    # transformers keeps the rotary frequencies in whatever dtype its buffer has; glm rounds its own
    # the same way, so both compute the same angles.
    hf_inv = ref.model.rotary_emb.inv_freq.dtype
    cfg = cfg.replace(rope_inv_freq_dtype=str(hf_inv).replace("torch.", "") if hf_inv != torch.float32 else None)
    with torch.device("meta"):
        ours = glm.GLM(cfg)
    ours = ours.to(dtype).to_empty(device=device).eval()
    ours.reset_buffers(device)
    random_weights(ours, seed)
    sd = ours.state_dict()
    converted = {}
    for mp in formats.mappings(cfg, dtype):
        converted.update(zip(mp.hf, mp.to_hf(*(sd[n] for n in mp.glm))))
    ref.load_state_dict(converted, strict=True)
    del converted, sd
    return ours, ref


def timed(fn, device: str, repeats: int) -> tuple[float, object]:
    """Best time of ``fn`` and its (last) result: the generated tokens, compared across libraries."""
    times, out = run_timed(fn, device, repeats)
    return min(times), out


def once(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default=None, help="float32 (cpu default) or bfloat16 (cuda default)")
    ap.add_argument("--shape", default="bench-120m", choices=SHAPES,
                    help="model dims: a 122M GLM-4-shaped model, or GLM-4-9B (9.4B, a GPU with ~40 GB free)")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 32; 128 for glm4-9b)")
    ap.add_argument("--new-tokens", type=int, default=None,
                    help="generated tokens per row (default 64; 128 for glm4-9b)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="a 2M-parameter model (smoke runs)")
    ap.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph rows (cuda)")
    ap.add_argument("--no-compile", action="store_true", help="skip the CUDA graphs + torch.compile row (cuda)")
    ap.add_argument("--quantize", choices=("int8", "int4"), default=None,
                    help="quantize glm's model (weight-only, glm.quantize) before measuring; transformers' stays "
                         "in --dtype")
    ap.add_argument("--group-size", type=int, default=None,
                    help="with --quantize: one scale per GROUP_SIZE input columns (default: per output row)")
    ap.add_argument("--out", default=LOCAL)
    args = ap.parse_args(argv)

    import transformers

    import glm
    from glm.bench import record_name
    from glm.generate import generate, release_cuda_graphs

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("decode benchmark: --device cuda, but CUDA is not available on this machine")
    if args.shape == "glm4-9b" and device != "cuda" and not args.small:
        raise SystemExit("decode benchmark: the glm4-9b shape holds two 9.4B models (~38 GB in bf16); run it with "
                         "--device cuda on a GPU with ~40 GB free")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    cfg = bench_config(args.small, args.shape)
    prompt, new = DEFAULT_LENGTHS["bench-120m" if args.small else args.shape]
    prompt, n = args.prompt or prompt, args.new_tokens or new
    graphs = device == "cuda" and not args.no_graphs
    compiled = graphs and not args.no_compile
    elem = torch.tensor([], dtype=dtype).element_size()
    ceiling = copy_bandwidth(device)
    t0 = time.perf_counter()
    ours, ref = build_models(cfg, device, dtype)
    cfg = ours.config
    if args.quantize is not None:
        glm.quantize(ours, glm.quant.SCHEME_BITS[args.quantize], args.group_size)
        print(f"glm's model quantized: {glm.quant.describe(ours.quantization)} ({model_bytes(ours) / 1e9:.2f} GB)")
    size = f"{cfg.num_parameters / 1e9:.2f}B" if cfg.num_parameters >= 1e9 else f"{cfg.num_parameters / 1e6:.0f}M"
    print(f"model {cfg.name}: {size} params ({cfg.num_parameters * elem / 1e9:.2f} GB in "
          f"{dtype}), device {device}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"threads {torch.get_num_threads()}; built both in {time.perf_counter() - t0:.1f} s")
    print(f"measured copy bandwidth (ceiling): {ceiling:.1f} GB/s; prompt {prompt}, {n} new tokens per row")

    rows = []
    gen = torch.Generator().manual_seed(0)
    for B in [int(b) for b in args.batches.split(",")]:
        ids = torch.randint(3, cfg.vocab_size, (B, prompt), generator=gen).to(device)
        # Mean context over the generated tokens: what the attention reads besides the weights.
        roofline = B * ceiling * 1e9 / step_bytes(ours, prompt + n // 2, B)

        def run_glm(ids=ids):
            return generate(ours, ids, max_new_tokens=n, cuda_graphs=False, eos_token_ids=())

        def run_graphs(ids=ids):
            return generate(ours, ids, max_new_tokens=n, cuda_graphs=True, eos_token_ids=())

        def run_compiled(ids=ids):
            return generate(ours, ids, max_new_tokens=n, cuda_graphs=True, compile=True, eos_token_ids=())

        def run_hf(ids=ids):
            with torch.no_grad():
                out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=n, min_new_tokens=n, pad_token_id=0, eos_token_id=None)
            return out[:, ids.shape[1]:]

        t_glm, tok_glm = timed(run_glm, device, args.repeats)
        r = {"batch": B, "prompt": prompt, "new_tokens": n, "roofline_tokens_per_s": roofline,
             "glm_tokens_per_s": B * n / t_glm}
        if graphs:
            release_cuda_graphs(ours)
            r["graphs_first_call_s"] = once(run_graphs, device)  # captures the graph
            t_graph, tok_graph = timed(run_graphs, device, args.repeats)
            r["graphs_tokens_per_s"] = B * n / t_graph
            r["graphs_agree_eager"] = float((tok_graph.cpu() == tok_glm.cpu()).float().mean())
            release_cuda_graphs(ours)
        if compiled:
            r["compiled_first_call_s"] = once(run_compiled, device)  # compiles, then captures
            t_comp, tok_comp = timed(run_compiled, device, args.repeats)
            r["compiled_tokens_per_s"] = B * n / t_comp
            r["compiled_agree_eager"] = float((tok_comp.cpu() == tok_glm.cpu()).float().mean())
            release_cuda_graphs(ours)
        if device == "cuda":
            torch.cuda.empty_cache()
        t_hf, tok_hf = timed(run_hf, device, args.repeats)
        r["hf_tokens_per_s"] = B * n / t_hf
        r["speedup"] = t_hf / t_glm
        if graphs:
            r["graphs_speedup"] = r["graphs_tokens_per_s"] / r["hf_tokens_per_s"]
        if compiled:
            r["compiled_speedup"] = r["compiled_tokens_per_s"] / r["hf_tokens_per_s"]
        r["greedy_agreement"] = float((tok_glm.cpu() == tok_hf.cpu()).float().mean())
        r["glm_weight_GBps"] = (step_bytes(ours, prompt + n // 2, B) * r["glm_tokens_per_s"]
                                / B / 1e9)
        rows.append(r)
        del ids
        gc.collect()

    variants = [("glm eager", "glm_tokens_per_s")] \
        + ([("glm CUDA graphs", "graphs_tokens_per_s")] if graphs else []) \
        + ([("glm graphs+compile", "compiled_tokens_per_s")] if compiled else []) \
        + [("transformers", "hf_tokens_per_s")]
    print(f"\n{'batch':>5} {'':18} {'tok/s':>9} {'of roofline':>11} {'vs transformers':>15}")
    for r in rows:
        print(f"{r['batch']:5d} {'roofline':18} {r['roofline_tokens_per_s']:9.1f}")
        for label, key in variants:
            print(f"{'':5} {label:18} {r[key]:9.1f} {r[key] / r['roofline_tokens_per_s']:10.1%} "
                  f"{r[key] / r['hf_tokens_per_s']:14.2f}x")
        agree = f"greedy tokens agree: glm vs transformers {r['greedy_agreement']:.0%}"
        if graphs:
            agree += (f"; graphs vs eager {r['graphs_agree_eager']:.0%} (first call, with capture: "
                      f"{r['graphs_first_call_s']:.2f} s)")
        if compiled:
            agree += (f"; graphs+compile vs eager {r['compiled_agree_eager']:.0%} (first call, with compile: "
                      f"{r['compiled_first_call_s']:.1f} s)")
        print(f"{'':5} {agree}")

    # A quantized run is its own record: publishing it must not replace the full-precision one the docs quote.
    name = record_name("decode", device, args.quantize)
    peer = "transformers GlmForCausalLM"
    summary = []
    for r in rows:
        summary.append(summary_row(f"decode batch {r['batch']}", r["glm_tokens_per_s"], r["hf_tokens_per_s"],
                                   "tokens/s", peer))
        if graphs:
            summary.append(summary_row(f"decode batch {r['batch']}, CUDA graphs", r["graphs_tokens_per_s"],
                                       r["hf_tokens_per_s"], "tokens/s", peer))
        if compiled:
            summary.append(summary_row(f"decode batch {r['batch']}, CUDA graphs + torch.compile",
                                       r["compiled_tokens_per_s"], r["hf_tokens_per_s"], "tokens/s", peer))
    path = write_record(args.out, name, device, benchmark="decode", transformers=transformers.__version__,
                        dtype=str(dtype), shape=cfg.name, quantization=getattr(ours, "quantization", None),
                        config=cfg.to_dict(), ceiling_GBps=ceiling, results=rows,
                        ceiling={"value": ceiling, "unit": "GB/s", "what": "measured copy bandwidth"}, summary=summary)
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        width = 0.8 / len(variants)
        for i, (label, key) in enumerate(variants):
            xs = [x - 0.4 + width * (i + 0.5) for x in range(len(rows))]
            ax.bar(xs, [r[key] for r in rows], width, label=label)
        for x, r in enumerate(rows):
            ax.hlines(r["roofline_tokens_per_s"], x - 0.45, x + 0.45, colors="k", linestyles="dashed",
                      label="bandwidth roofline" if x == 0 else None)
        ax.set_xticks(list(range(len(rows))), [f"batch {r['batch']}" for r in rows])
        ax.set_yscale("log")
        ax.set_ylabel("tokens / s")
        ax.set_title(f"greedy decode, {cfg.name} ({size} params), {device}", fontsize=9)
        ax.legend(fontsize=7)
        save_figure(fig, os.path.join(args.out, name + ".png"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
