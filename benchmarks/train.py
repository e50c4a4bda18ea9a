"""Training-step benchmarks: glm's training step against a peer measured in the same run.

1. A small GLM-4-shaped model (6.7M parameters) vs transformers' GlmForCausalLM, same config and batch.
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

2. A nanoGPT-sized causal model vs a plain GPT-2-style loop (`benchmarks/gpt2.py`: learned positions,
LayerNorm, 4x GELU MLP, tied embeddings): 4 layers, 4 heads, width 128, context 64, batch 12, a
char-level vocabulary of a text from glm.corpus's generator, AdamW (lr 1e-3 warmed up and cosine-decayed
to 1e-4, betas (0.9, 0.99), weight decay 0.1 on every matrix, embeddings included, as nanoGPT), gradient
clipping at 1. glm's model is the GLM-4 family's block (RMSNorm, half-rotary RoPE, SwiGLU, QKV bias,
untied head) with the FFN width that makes its parameter count the GPT-2 model's, and its step is
glm's trainer's: `glm.train.make_optimizer` and `lr_at`, `loss_sum` on the `glm.data.PackedRows`
batch, clipping, AdamW, with the default (`auto`) attention backend. The GPT-2 loop trains on the same
rows. Tokens/s: single steps alternated between the two (`--nano-rounds` each, the order swapped every
round, after warm-up steps that include `auto`'s calibration), median per side. Quality: both trained
from scratch for `--quality-steps` steps on the same batches, then the held-out loss per character
(nats and bits) over every row of the held-out tenth of the text.

    python benchmarks/train.py [--device cpu|cuda] [--steps 5] [--objective causal|glm|both]
                               [--suite all|transformers|nanogpt] [--nano-rounds 30] [--quality-steps 300]
                               [--out benchmarks/results/local]
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time

import gpt2
import numpy as np
import torch
import torch.nn.functional as F
from common import LOCAL, matmul_peak, pyplot, save_figure, summary_row, sync, write_record


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


def transformers_case(args, device: str, dtype: torch.dtype, peak: float) -> tuple[dict, list, dict]:
    """The 6.7M GLM-4-shaped model vs transformers' GlmForCausalLM: results, summary rows, config."""
    import transformers

    import glm

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

    tokens = args.batch * args.seq
    # FLOP count: the embedding table is a lookup (no FLOPs); the LM head is a matmul per projected
    # position; everything else is 6 FLOPs per parameter per token (forward + backward).
    head = cfg.vocab_size * cfg.hidden_size
    body = cfg.num_parameters - cfg.vocab_size * cfg.hidden_size - (0 if cfg.tie_word_embeddings else head)
    attn = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * args.seq
    print(f"\n{cfg.num_parameters / 1e6:.1f}M-param GLM-4-shaped model, batch {args.batch} x {args.seq} tokens, "
          f"{device} {dtype}, transformers {transformers.__version__}")

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
    return results, summary, {"config": cfg.to_dict(), "transformers": transformers.__version__}


# ------------------------------------------------------------------------------------------------
# nanoGPT-sized causal model vs a plain GPT-2-style loop


def char_text(seed: int = 0) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The English text of glm.corpus's generator (documents one per line) as character ids: the
    vocabulary (sorted characters), the training stream (first 90%) and the held-out stream."""
    from glm.corpus import generate_corpus

    text = "\n".join(generate_corpus(seed=seed, size="small", languages=("en",)).train)
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = np.array([index[c] for c in text], dtype=np.int64)
    cut = len(ids) * 9 // 10
    return chars, ids[:cut], ids[cut:]


def nano_configs(args, vocab: int):
    """(glm's GLMConfig, the GPT-2 model's parameter count): glm's FFN width is the multiple of 8 that
    brings its parameter count closest to the GPT-2 model's."""
    import glm

    W, L, H, T = args.nano_width, args.nano_layers, args.nano_heads, args.nano_context
    target = gpt2.GPT2(vocab, T, W, L, H).num_parameters
    kv = args.nano_kv_heads or H
    base = glm.preset("tiny-glm4-chatglm").replace(vocab_size=vocab, hidden_size=W, num_layers=L, num_heads=H,
                                                   num_kv_heads=kv, head_dim=W // H, max_positions=T,
                                                   name="bench-nanogpt")
    ffn = min(range(8, 16 * W, 8), key=lambda f: abs(base.replace(ffn_hidden_size=f).num_parameters - target))
    return base.replace(ffn_hidden_size=ffn), target


class NanoRun:
    """One model and its optimizer, stepped as its trainer steps it (glm: glm.train's pieces; gpt2: the
    plain loop), with the lr of `glm.train.lr_at` for both."""

    def __init__(self, kind: str, model_cfg, vocab: int, args, device: str, steps: int):
        from glm.model import GLM
        from glm.train import TrainConfig, make_optimizer

        self.kind, self.device = kind, torch.device(device)
        self.tc = TrainConfig(lr=1e-3, min_lr_ratio=0.1, warmup=max(1, min(100, steps // 10)), steps=steps,
                              betas=(0.9, 0.99), weight_decay=0.1, decay_embeddings=True, grad_clip=1.0, seed=0)
        torch.manual_seed(0)
        if kind == "glm":
            self.model = GLM(model_cfg).to(device)
            self.model.init_weights(seed=0)
            self.opt = make_optimizer(self.model, self.tc)
        else:
            self.model = gpt2.GPT2(vocab, args.nano_context, args.nano_width, args.nano_layers, args.nano_heads)
            self.model = self.model.to(device)
            self.opt = gpt2.optimizer(self.model, self.tc.lr, self.tc.betas, self.tc.weight_decay)
        self.model.train()

    def step(self, i: int, batch) -> None:
        from glm.train import loss_sum, lr_at

        for g in self.opt.param_groups:
            g["lr"] = lr_at(i, self.tc)
        if self.kind == "gpt2":
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                gpt2.train_step(self.model, self.opt, batch.tokens, batch.targets, self.tc.grad_clip)
            return
        # glm.train._step for one micro-batch on one process.
        self.opt.zero_grad(set_to_none=True)
        ls = loss_sum(self.model, batch, self.device.type == "cuda", self.device)
        (ls / max(batch.num_loss_tokens, 1)).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.grad_clip)
        self.opt.step()

    @torch.no_grad()
    def heldout_loss(self, batches) -> float:
        """Mean cross entropy (nats) per held-out target character."""
        from glm.train import loss_sum

        self.model.eval()
        total, count = 0.0, 0
        for b in batches:
            if self.kind == "glm":
                total += float(loss_sum(self.model, b, False, self.device))
            else:
                logits = self.model(b.tokens).float()
                total += float(F.cross_entropy(logits[b.loss_mask], b.targets[b.loss_mask], reduction="sum"))
            count += b.num_loss_tokens
        self.model.train()
        return total / count


def nanogpt_case(args, device: str, peak: float) -> tuple[dict, list, dict]:
    """glm's training step vs the GPT-2 loop at nanoGPT size: tokens/s and held-out loss per character."""
    from glm.data import PackedRows

    chars, train_ids, val_ids = char_text()
    cfg, gpt2_params = nano_configs(args, len(chars))
    other_kv = 2 if cfg.num_kv_heads == cfg.num_heads else cfg.num_heads
    other = nano_configs(argparse.Namespace(**{**vars(args), "nano_kv_heads": other_kv}), len(chars))[0]
    B, T = args.nano_batch, args.nano_context
    rows = PackedRows(train_ids, T, "causal", position_streams=1)
    held = PackedRows(val_ids, T, "causal", position_streams=1)
    batch_of = lambda step: rows.batch(0, step, B).to(device)  # noqa: E731
    print(f"\nnanoGPT-sized causal LM: {args.nano_layers} layers, {args.nano_heads} heads, width {args.nano_width}, "
          f"context {T}, batch {B}; char-level vocabulary of {len(chars)} from glm.corpus's generator "
          f"({len(train_ids)} training / {len(val_ids)} held-out characters)")
    print(f"glm: GLM-4 block, {cfg.num_kv_heads} KV heads, FFN {cfg.ffn_hidden_size}, {cfg.num_parameters:,} "
          f"parameters ({other.num_kv_heads} KV heads would take FFN {other.ffn_hidden_size} for "
          f"{other.num_parameters:,}); GPT-2 loop: {gpt2_params:,} parameters")

    # Tokens/s: alternated single steps on a few cycled batches.
    runs = {k: NanoRun(k, cfg, len(chars), args, device, steps=10**6) for k in ("glm", "gpt2")}
    batches = [batch_of(i) for i in range(8)]
    for i in range(3):  # warm-up (glm's first forward also calibrates `auto` for this shape, once per machine)
        for run in runs.values():
            run.step(i, batches[i])
    times = {k: [] for k in runs}
    for r in range(args.nano_rounds):
        for k in (("glm", "gpt2") if r % 2 == 0 else ("gpt2", "glm")):
            b = batches[r % len(batches)]
            sync(device)
            t = time.perf_counter()
            runs[k].step(r, b)
            sync(device)
            times[k].append(time.perf_counter() - t)
    tokens = B * T
    med = {k: statistics.median(v) for k, v in times.items()}
    per_round = [g2 / gl for gl, g2 in zip(times["glm"], times["gpt2"])]
    q = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else [per_round[0]] * 3
    flops_per_token = {"glm": 6 * cfg.num_parameters + 12 * cfg.num_layers * cfg.hidden_size * T,
                       "gpt2": 6 * gpt2_params + 12 * args.nano_layers * args.nano_width * T}
    speedup = med["gpt2"] / med["glm"]
    out = {k: {"seconds_per_step": t, "tokens_per_s": tokens / t, "mfu": tokens / t * flops_per_token[k] / peak}
           for k, t in med.items()}
    print(f"{'impl':<6} {'ms/step':>8} {'tokens/s':>9} {'MFU':>6}   (median of {args.nano_rounds} alternated steps)")
    for k, o in out.items():
        print(f"{k:<6} {o['seconds_per_step'] * 1e3:8.1f} {o['tokens_per_s']:9.0f} {o['mfu']:6.1%}")
    print(f"glm / GPT-2 loop: {speedup:.2f}x (per-round ratio quartiles {q[0]:.2f} / {q[1]:.2f} / {q[2]:.2f})")
    results = {"tokens_per_s": {k: o["tokens_per_s"] for k, o in out.items()}, "impl": out, "speedup": speedup,
               "round_ratio_quartiles": q, "rounds": args.nano_rounds, "glm_parameters": cfg.num_parameters,
               "gpt2_parameters": gpt2_params, "vocab": len(chars),
               "alternative_kv_heads": {"kv_heads": other.num_kv_heads, "ffn": other.ffn_hidden_size,
                                        "parameters": other.num_parameters}}
    summary = [summary_row(f"train step, nanoGPT-sized causal LM ({cfg.num_parameters / 1e6:.2f}M params, "
                           f"T={T}, batch {B})", out["glm"]["tokens_per_s"], out["gpt2"]["tokens_per_s"],
                           "tokens/s", "plain PyTorch GPT-2 loop")]

    if args.quality_steps > 0:
        steps = args.quality_steps
        runs = {k: NanoRun(k, cfg, len(chars), args, device, steps=steps) for k in ("glm", "gpt2")}
        t0 = time.perf_counter()
        for i in range(steps):
            b = batch_of(i)
            for run in runs.values():
                run.step(i, b)
        eval_batches = [held.rows_at(list(range(s, min(s + 64, held.num_rows))), np.random.default_rng(0)).to(device)
                        for s in range(0, held.num_rows, 64)]
        loss = {k: run.heldout_loss(eval_batches) for k, run in runs.items()}
        print(f"held-out loss per character after {steps} steps (same batches, lr 1e-3 cosine to 1e-4; "
              f"{time.perf_counter() - t0:.0f} s for both):")
        for k, v in loss.items():
            print(f"  {k:<6} {v:.4f} nats/char = {v / math.log(2):.4f} bits/char")
        results["quality"] = {"steps": steps, "heldout_nats_per_char": loss,
                              "heldout_bits_per_char": {k: v / math.log(2) for k, v in loss.items()},
                              "heldout_characters": sum(b.num_loss_tokens for b in eval_batches)}
        summary.append(summary_row(f"held-out loss per char after {steps} steps, nanoGPT-sized, same batches",
                                   loss["glm"], loss["gpt2"], "nats/char", "plain PyTorch GPT-2 loop",
                                   higher_is_better=False))
    return results, summary, {"config": cfg.to_dict()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--suite", default="all", choices=("all", "transformers", "nanogpt"),
                    help="the 6.7M model vs transformers, the nanoGPT-sized model vs the GPT-2 loop, or both")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="torch.compile both models' forward (same for both)")
    ap.add_argument("--objective", default="both", choices=("causal", "glm", "both"))
    ap.add_argument("--nano-width", type=int, default=128)
    ap.add_argument("--nano-layers", type=int, default=4)
    ap.add_argument("--nano-heads", type=int, default=4)
    ap.add_argument("--nano-kv-heads", type=int, default=0,
                    help="glm's KV heads in the nanoGPT case (default: as many as heads, like the GPT-2 model)")
    ap.add_argument("--nano-context", type=int, default=64)
    ap.add_argument("--nano-batch", type=int, default=12)
    ap.add_argument("--nano-rounds", type=int, default=30, help="timed steps per side in the nanoGPT case")
    ap.add_argument("--quality-steps", type=int, default=300,
                    help="training steps before the held-out loss comparison (0: skip it)")
    ap.add_argument("--out", default=LOCAL)
    args = ap.parse_args(argv)

    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    peak = matmul_peak(device, dtype)
    print(f"{device} {dtype}, torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"measured matmul ceiling: {peak / 1e9:.1f} GFLOP/s")
    results, summary, extra = {}, [], {}
    if args.suite in ("all", "transformers"):
        res, rows, info = transformers_case(args, device, dtype, peak)
        results.update(res)
        summary += rows
        extra.update(info, batch=args.batch, seq=args.seq, compiled=args.compile)
    if args.suite in ("all", "nanogpt"):
        res, rows, info = nanogpt_case(args, device, peak)
        results["nanogpt"] = res
        summary += rows
        extra["nanogpt_config"] = info["config"]
    first = next(iter(results.values()))
    path = write_record(args.out, f"train_{device}", device, benchmark="train", ceiling_flops=peak, results=results,
                        speedup=first["speedup"],
                        ceiling={"value": peak / 1e12, "unit": "TFLOP/s", "what": f"measured {dtype} matmul"},
                        summary=summary, **extra)
    plt = pyplot()
    if plt is not None:
        bars = []  # (label, tokens/s): glm and its peer, case by case
        for case, v in results.items():
            sides = (v["tokens_per_s"] if case == "nanogpt"
                     else {k: v[k]["tokens_per_s"] for k in ("glm", "transformers")})
            bars += [(f"{impl}\n{case}", tps) for impl, tps in sides.items()]
        fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(bars), 3))
        ax.bar([b[0] for b in bars], [b[1] for b in bars], color=["tab:blue", "tab:gray"] * (len(bars) // 2))
        ax.tick_params(axis="x", labelsize=7)
        ax.set_ylabel("training tokens / s")
        ax.set_title(f"train step, {device}")
        save_figure(fig, os.path.join(args.out, f"train_{device}.png"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
