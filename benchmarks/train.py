"""Training-step benchmark: tokens/s and MFU of glm vs transformers' GlmForCausalLM, same config and batch.

Both models get the same weights (glm saves a transformers Glm checkpoint, both load it) and run
the same training step: forward, fp32 cross entropy, backward, AdamW, on two objectives:

- causal LM: every position has a target; both compute the same FLOPs.
- GLM blank infilling (`--objective glm`), the workload glm trains: batches from glm.data with the
  published mode mix (token spans / sentences / a [gMASK] suffix, one mode per batch), the same
  batches for both. transformers gets the prefix-LM mask as a 4D boolean mask and computes the loss
  as its users do, logits everywhere with ignore_index; glm projects onto the vocabulary only at the
  positions with a target (``logits_at``, as glm's trainer does), so it skips most of the LM head
  on token- and sentence-mode batches. Same loss value either way (checked).

The device ceiling is measured in the same run (a large fp32/bf16 matmul). MFU counts the FLOPs the
objective needs, for both implementations: 6 x (parameters outside the embedding table and the LM
head) per token, plus the attention term 12 x layers x hidden x T, plus 6 x LM head per position
with a target (all of them for causal LM). (Records before 2026-11-25 13:40 counted 6 x all
parameters, the embedding table included, which overstated MFU: ~90% on CPU was ~65%.)

    python benchmarks/train.py [--device cpu|cuda] [--steps 5] [--objective causal|glm|both]
                               [--out benchmarks/results/local]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.nn.functional as F
from common import LOCAL, matmul_peak, summary_row, sync, write_record


def causal_batches(cfg, batch: int, seq: int, device: str) -> list[dict]:
    """One random causal-LM batch: every position predicts the next token."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=gen).to(device)
    x = ids[:, :-1]
    return [{"glm": {"input_ids": x}, "hf": {"input_ids": x}, "targets": ids[:, 1:], "loss_mask": None}]


def glm_batches(cfg, batch: int, seq: int, device: str, count: int) -> list[dict]:
    """``count`` blank-infilling batches (glm.data, one mode per batch, the modes in the published mix's
    proportions) of random documents, as glm's model and as transformers take them (a 4D prefix-LM mask, [B, T]
    positions)."""
    import numpy as np

    from glm.attention import visible_mask
    from glm.data import Objective, SpecialIds, make_batch, make_sample

    top = cfg.vocab_size
    special = SpecialIds(mask=top - 1, smask=top - 2, gmask=top - 3, sop=top - 4, eop=top - 5, eos=top - 6, pad=top - 7)
    period = top - 8  # a sentence end every ~12 tokens, for the sentence mode
    objective = Objective(kind="glm", add_cls=False)
    doc_len = objective.max_doc_len(seq, cls=False)
    rng = np.random.default_rng(0)
    # The modes in the objective's proportions (stratified: a handful of random draws can land far
    # from the mix, and the share of positions with a target differs a lot between modes).
    n_token, n_sentence = round(objective.bert_prob * count), round(objective.gap_sentence_prob * count)
    modes = ["token"] * n_token + ["sentence"] * n_sentence + ["document"] * (count - n_token - n_sentence)
    out = []
    for mode in rng.permutation(modes):
        docs = rng.integers(0, top - 8, (batch, doc_len))
        docs[rng.random((batch, doc_len)) < 1 / 12] = period
        samples = [make_sample(d, mode, rng, special, objective, is_sentence_end=lambda t: t == period, index=i)
                   for i, d in enumerate(docs)]
        b = make_batch(samples, pad_id=special.pad, position_streams=1, max_len=seq).to(device)
        T = b.tokens.shape[1]
        mask = visible_mask(batch, T, T, causal=True, prefix_len=b.prefix_len, device=device)
        out.append({"mode": str(mode), "glm": {**b.model_inputs(), "logits_at": b.loss_mask},
                    "hf": {"input_ids": b.tokens, "position_ids": b.position_ids, "attention_mask": mask},
                    "targets": b.targets.masked_fill(~b.loss_mask, -100), "loss_mask": b.loss_mask})
    return out


def loss_of(forward, b: dict, side: str, device: str) -> torch.Tensor:
    """Mean cross entropy over the batch's targets, fp32: glm's logits come only at the loss positions
    when the batch says so; transformers' everywhere, masked by ignore_index."""
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        logits = forward(b[side])
    n = (b["targets"] != -100).sum()
    if side == "glm" and b["loss_mask"] is not None:
        return F.cross_entropy(logits.float(), b["targets"][b["loss_mask"]], reduction="sum") / n
    return F.cross_entropy(logits.float().flatten(0, 1), b["targets"].flatten(), ignore_index=-100, reduction="sum") / n


@torch.no_grad()
def logit_gap(fwd_glm, fwd_hf, b: dict, device: str) -> float:
    """max |glm - transformers| / max |transformers| over the logits at the loss positions: both
    compute the same function there (a near-uniform random model would hide a wrong selection in
    the loss value, not in the logits)."""
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        ours, theirs = fwd_glm(b["glm"]).float(), fwd_hf(b["hf"]).float()
    if b["loss_mask"] is not None:
        theirs = theirs[b["loss_mask"]]
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def timed(forward, model, batches: list[dict], side: str, device: str, steps: int) -> float:
    """Seconds per training step (forward, fp32 cross entropy, backward, AdamW), cycling ``batches``."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(i: int) -> None:
        loss_of(forward, batches[i % len(batches)], side, device).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(0)  # warm-up (twice: a compiled step recompiles once for the backward's shapes)
    step(1)
    sync(device)
    t = time.perf_counter()
    for i in range(steps):
        step(i)
    sync(device)
    return (time.perf_counter() - t) / steps


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="torch.compile both models' forward (same for both)")
    ap.add_argument("--objective", default="both", choices=("causal", "glm", "both"))
    ap.add_argument("--out", default=LOCAL)
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
        ref = transformers.GlmForCausalLM.from_pretrained(os.path.join(tmp, "hf"), dtype=torch.float32)
        ref = ref.to(device).train()

    peak = matmul_peak(device, dtype)
    tokens = args.batch * args.seq
    # FLOP count: the embedding table is a lookup (no FLOPs); the LM head is a matmul per projected
    # position; everything else is 6 FLOPs per parameter per token (forward + backward).
    head = cfg.vocab_size * cfg.hidden_size
    body = cfg.num_parameters - cfg.vocab_size * cfg.hidden_size - (0 if cfg.tie_word_embeddings else head)
    attn = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * args.seq
    print(f"{cfg.num_parameters / 1e6:.1f}M-param GLM-4-shaped model, batch {args.batch} x {args.seq} tokens, "
          f"{device} {dtype}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"measured matmul ceiling: {peak / 1e9:.1f} GFLOP/s")

    objectives = ("causal", "glm") if args.objective == "both" else (args.objective,)
    results, summary = {}, []
    for objective in objectives:
        batches = (causal_batches(cfg, args.batch, args.seq, device) if objective == "causal"
                   else glm_batches(cfg, args.batch, args.seq, device, max(args.steps, 10)))
        compiled = args.compile and objective == "causal"  # blank-infilling shapes vary batch to batch
        fwd_glm = lambda kw: ours(**kw, check_inputs=False)  # noqa: E731
        fwd_hf = lambda kw: ref(**kw).logits  # noqa: E731
        if compiled:
            fwd_glm, fwd_hf = torch.compile(fwd_glm), torch.compile(fwd_hf)
        gap = logit_gap(fwd_glm, fwd_hf, batches[0], device)
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        if gap > tol:
            raise SystemExit(f"{objective}: glm's and transformers' logits at the loss positions differ by {gap:.2e} "
                             f"(> {tol}, relative to their scale); not timing a different computation")
        rows = {"glm": timed(fwd_glm, ours, batches, "glm", device, args.steps),
                "transformers": timed(fwd_hf, ref, batches, "hf", device, args.steps)}
        loss_share = sum(float((b["targets"] != -100).sum()) for b in batches) / (len(batches) * tokens)
        modes = {m: sum(b.get("mode") == m for b in batches) for m in ("token", "sentence", "document")}
        mix = "" if objective == "causal" else " (" + ", ".join(f"{n} {m}" for m, n in modes.items()) + ")"
        print(f"\n{objective} objective ({len(batches)} batch(es) cycled{mix}; {loss_share:.0%} of positions have a "
              f"target; max |logit glm - transformers| / max |logit| = {gap:.1e}{', compiled' if compiled else ''})")
        # The FLOPs the objective needs: every layer at every position, the LM head only where there
        # is a target. Both implementations are measured against that (work beyond it is waste).
        flops_per_token = 6 * body + attn + 6 * head * loss_share
        print(f"{'impl':<13} {'s/step':>8} {'tokens/s':>9} {'GFLOP/s':>8} {'MFU':>6}")
        out = {}
        for k, t in rows.items():
            tps = tokens / t
            out[k] = {"seconds_per_step": t, "tokens_per_s": tps, "mfu": tps * flops_per_token / peak}
            print(f"{k:<13} {t:8.3f} {tps:9.0f} {tps * flops_per_token / 1e9:8.1f} {out[k]['mfu']:6.1%}")
        speedup = rows["transformers"] / rows["glm"]
        print(f"glm / transformers: {speedup:.2f}x")
        results[objective] = dict(out, speedup=speedup, logit_gap=gap, loss_positions=loss_share, compiled=compiled,
                                  **({} if objective == "causal" else {"modes": modes}))
        what = "train step" if objective == "causal" else "train step, GLM blank infilling"
        summary.append(summary_row(f"{what}, MFU {out['glm']['mfu']:.0%} vs {out['transformers']['mfu']:.0%}",
                                   out["glm"]["tokens_per_s"], out["transformers"]["tokens_per_s"], "tokens/s",
                                   "transformers GlmForCausalLM"))

    path = write_record(args.out, f"train_{device}", device, benchmark="train", transformers=transformers.__version__,
                        config=cfg.to_dict(), batch=args.batch, seq=args.seq, compiled=args.compile,
                        ceiling_flops=peak, results=results,
                        speedup=results[objectives[0]]["speedup"],
                        ceiling={"value": peak / 1e12, "unit": "TFLOP/s", "what": f"measured {dtype} matmul"},
                        summary=summary)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4.5, 3))
        labels = [f"{impl}\n{obj}" for obj in results for impl in ("glm", "transformers")]
        ax.bar(labels, [results[obj][impl]["tokens_per_s"] for obj in results for impl in ("glm", "transformers")],
               color=["tab:blue", "tab:gray"] * len(results))
        ax.tick_params(axis="x", labelsize=7)
        ax.set_ylabel("training tokens / s")
        ax.set_title(f"train step, {cfg.num_parameters / 1e6:.1f}M params, {device}")
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, f"train_{device}.png"), dpi=120)
    except ImportError:
        pass
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
