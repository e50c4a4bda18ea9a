"""Fine-tuning steps: full vs LoRA vs P-tuning v2 in glm, and glm's LoRA vs peft + transformers on the same weights.

Case 1 (methods): a 122M GLM-4-shaped model (the decode benchmark's: vocab 32000, hidden 768, 12 layers, 12 heads
over 2 KV heads, FFN 2048), fp32, batch 4 x 256 tokens with the loss on the last 128 of each row (a prompt and its
response). Each method runs in a fresh process, so its peak RSS is its own: tokens/s (median of the timed steps
after one warm-up step), trainable parameters, optimizer-state bytes (AdamW's moments after a step) and peak RSS.
P-tuning runs on the same dims in the chatglm format (transformers' Glm has no P-tuning); LoRA is r=8, alpha 16 on
the attention projections; P-tuning pre_seq_len 16 without the projection. Goals: a LoRA step <= 0.7x the time of
a full step, optimizer state >= 50x smaller.

Case 2 (peer): glm LoRA against peft's LoRA on transformers' GlmForCausalLM loaded from the same weights (glm
saves them in the release format), the same batches and targets, the same r / alpha / target modules, steps
alternated; goal >= 1.3x (glm projects onto the vocabulary only where the loss is).

Case 3 (classification, when make demo's model exists in runs/demo): the toy topic task of `glm.toy_tasks`
(4 labels, 48 held-out sentences), held-out accuracy of zero-shot cloze, cloze fine-tuning and a head on the final
hidden state (both full fine-tuning, 100 steps of 8), each trained on the first n of 200 labelled sentences for
several n: how many labelled examples cloze needs to reach the head's accuracy on all 200.

    python benchmarks/finetune.py [--steps 3] [--small] [--classify-base runs/demo] [--out benchmarks/results/local]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from common import LOCAL, device_name, pyplot, save_figure, summary_row, write_record

from glm.tuning import cpu_model

B, T, RESPONSE = 4, 256, 128
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def model_config(family_preset: str, small: bool):
    import glm

    if small:
        return glm.preset(family_preset).replace(vocab_size=1000, hidden_size=128, num_layers=2, num_heads=2,
                                                 num_kv_heads=1, head_dim=64, ffn_hidden_size=256, max_positions=512)
    return glm.preset(family_preset).replace(vocab_size=32000, hidden_size=768, num_layers=12, num_heads=12,
                                             num_kv_heads=2, head_dim=64, ffn_hidden_size=2048, max_positions=512)


def batch(vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, T] and the loss mask of the response: slot t (P-1 <= t <= T-2) predicts token t+1."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=gen)
    where = torch.zeros(B, T, dtype=torch.bool)
    where[:, T - RESPONSE - 1:T - 1] = True
    return ids, where


def glm_loss(model, ids: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    logits = model(ids, logits_at=where, check_inputs=False)
    targets = torch.roll(ids, -1, dims=1)[where]
    return F.cross_entropy(logits.float(), targets)


def optimizer_for(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4, fused=True)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if isinstance(t, torch.Tensor) and t.dim() > 0)


def run_method(method: str, small: bool, steps: int, threads: int, queue) -> None:
    """One method in this (fresh) process; puts its measurements on ``queue``."""
    import glm

    torch.set_num_threads(threads)
    cfg = model_config("tiny-glm4-chatglm" if method == "ptuning" else "tiny-glm-hf", small)
    model = glm.GLM(cfg)
    model.init_weights(seed=0)
    if method == "lora":
        glm.lora.apply(model, glm.lora.LoraConfig(r=8, alpha=16, targets=TARGETS))
    elif method == "ptuning":
        glm.ptuning.apply(model, glm.ptuning.PrefixConfig(pre_seq_len=16))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer_for(params)
    ids, where = batch(cfg.vocab_size)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        glm_loss(model, ids, where).backward()
        opt.step()
        if i:  # the first step allocates the optimizer state and warms the allocator
            times.append(time.perf_counter() - t0)
    queue.put({"method": method, "seconds_per_step": statistics.median(times), "times": times,
               "tokens_per_s": B * T / statistics.median(times), "trainable_parameters": sum(p.numel() for p in params),
               "parameters": sum(p.numel() for p in model.parameters()), "optimizer_state_bytes": state_bytes(opt),
               "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})


def methods_case(small: bool, steps: int, threads: int) -> dict:
    ctx = mp.get_context("spawn")
    out = {}
    for method in ("full", "lora", "ptuning"):
        q = ctx.Queue()
        p = ctx.Process(target=run_method, args=(method, small, steps, threads, q))
        p.start()
        out[method] = q.get()
        p.join()
        r = out[method]
        print(f"  {method:8s} {r['seconds_per_step']:7.3f} s/step  {r['tokens_per_s']:8.0f} tokens/s  trainable "
              f"{r['trainable_parameters']:>11,}  optimizer state {r['optimizer_state_bytes'] / 2**20:8.2f} MiB  "
              f"peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    return out


def peft_case(small: bool, steps: int) -> dict:
    """glm LoRA vs peft LoRA on transformers' Glm, same weights / batches / targets, steps alternated."""
    import glm

    try:
        import peft
        import transformers
    except ImportError as e:
        return {"skipped": f"peft / transformers not installed ({e}); pip install -e '.[test]'"}
    cfg = model_config("tiny-glm-hf", small)
    model = glm.GLM(cfg)
    model.init_weights(seed=0)
    with tempfile.TemporaryDirectory(prefix="glm-bench-ft-") as tmp:
        model.save_pretrained(tmp, format="hf")
        ref = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    ref = peft.get_peft_model(ref, peft.LoraConfig(r=8, lora_alpha=16, target_modules=list(TARGETS),
                                                   lora_dropout=0.0, task_type="CAUSAL_LM"))
    glm.lora.apply(model, glm.lora.LoraConfig(r=8, alpha=16, targets=TARGETS))
    model.train()
    ref.train()
    ids, where = batch(cfg.vocab_size)
    labels = ids.masked_fill(~torch.roll(where, 1, dims=1), -100)  # transformers shifts labels itself

    glm_opt = optimizer_for([p for p in model.parameters() if p.requires_grad])
    ref_opt = optimizer_for([p for p in ref.parameters() if p.requires_grad])

    def glm_step():
        glm_opt.zero_grad(set_to_none=True)
        glm_loss(model, ids, where).backward()
        glm_opt.step()

    def ref_step():
        ref_opt.zero_grad(set_to_none=True)
        ref(input_ids=ids, labels=labels).loss.backward()
        ref_opt.step()

    # Same loss before any step: the two compute the same thing (LoRA's B starts at zero).
    with torch.no_grad():
        gap = abs(float(glm_loss(model, ids, where)) - float(ref(input_ids=ids, labels=labels).loss))
    glm_step(), ref_step()
    times = {"glm": [], "peft": []}
    for _ in range(steps):
        for name, fn in (("glm", glm_step), ("peft", ref_step)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"glm": {"seconds_per_step": med["glm"], "tokens_per_s": B * T / med["glm"]},
           "peft": {"seconds_per_step": med["peft"], "tokens_per_s": B * T / med["peft"]},
           "speedup": med["peft"] / med["glm"], "loss_gap_before_training": gap, "times": times,
           "transformers": transformers.__version__, "peft_version": peft.__version__}
    print(f"  glm LoRA {med['glm']:.3f} s/step, peft + transformers LoRA {med['peft']:.3f} s/step: "
          f"{res['speedup']:.2f}x (loss gap before training {gap:.1e})", flush=True)
    return res


SIZES = (8, 16, 32, 64, 200)


def classification_case(base: str, sizes=SIZES) -> dict:
    """Zero-shot cloze, then cloze and head fine-tuning on n labelled rows, held-out accuracy of each."""
    import glm
    from glm.cloze import ClozeTask
    from glm.finetune import FinetuneConfig, classification_scores, finetune, load_labelled
    from glm.toy_tasks import classification_set, classification_task, write_jsonl

    toy = classification_task("topic")
    task = ClozeTask(template=toy.template, labels=list(toy.labels), verbalizers=dict(toy.verbalizers))
    train, held = classification_set(0, max(sizes), 48, task="topic")
    out = {"labels": list(toy.labels), "heldout": len(held), "sizes": list(sizes), "cloze": {}, "head": {}}
    with tempfile.TemporaryDirectory(prefix="glm-bench-cls-") as tmp:
        held_path = write_jsonl(held, f"{tmp}/held.jsonl")
        base = glm.hub.resolve_model_folder(base)
        model, tok = glm.from_pretrained(base), glm.tokenizer.load(base)
        zero = classification_scores(model, tok, task, load_labelled(held_path, toy.labels))
        out["zero_shot"], out["baseline"] = zero["eval_accuracy"], zero["baseline"]
        print(f"  zero-shot cloze {zero['eval_accuracy']:.1%}, most-frequent label {zero['baseline']:.1%}")
        for n in sizes:
            path = write_jsonl(train[:n], f"{tmp}/train{n}.jsonl")
            for kind in ("cloze", "head"):
                s = finetune(FinetuneConfig(base=base, data=path, eval_data=held_path, out_dir=f"{tmp}/{kind}{n}",
                                            task=kind, method="full", lr=1e-4, steps=100, batch_size=8,
                                            labels=toy.labels, template=toy.template,
                                            verbalizers=dict(toy.verbalizers), progress=False, device="cpu"))
                out[kind][n] = s["eval_accuracy"]
            print(f"  n={n:4d}: cloze {out['cloze'][n]:.1%}, head {out['head'][n]:.1%}", flush=True)
    target = out["head"][max(sizes)]
    out["cloze_examples_to_reach_head"] = next((n for n in sizes if out["cloze"][n] >= target), None)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu",), help="CPU only (the GPU table needs a GPU run)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per method / side (default 3)")
    ap.add_argument("--small", action="store_true", help="a 0.5M model: a smoke run, not a measurement")
    ap.add_argument("--classify-base", default=os.path.join(REPO, "runs", "demo"),
                    help="the model of the classification case (default make demo's, runs/demo; skipped when absent)")
    ap.add_argument("--out", default=LOCAL, help="folder for JSON + PNG")
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()
    print(f"{device_name('cpu')}, torch {torch.__version__}, {threads} threads, batch {B} x {T}, loss on the last "
          f"{RESPONSE} tokens of each row", flush=True)
    print("methods (each in a fresh process):")
    methods = methods_case(args.small, args.steps, threads)
    print("LoRA, glm vs peft + transformers (steps alternated):")
    peer = peft_case(args.small, args.steps)
    if args.small or not os.path.isdir(args.classify_base):
        classify = {"skipped": f"no model in {args.classify_base} (run make demo first)" if not args.small
                    else "--small"}
        print(f"classification: skipped ({classify['skipped']})")
    else:
        print(f"classification, toy topic task, from {args.classify_base}:")
        classify = classification_case(args.classify_base)
    full, lora_, pt = methods["full"], methods["lora"], methods["ptuning"]
    lora_time_ratio = lora_["seconds_per_step"] / full["seconds_per_step"]
    state_ratio = full["optimizer_state_bytes"] / max(lora_["optimizer_state_bytes"], 1)
    print(f"LoRA step / full step: {lora_time_ratio:.2f}x the time (goal <= 0.7); optimizer state {state_ratio:.0f}x "
          f"smaller (goal >= 50)")
    summary = [
        summary_row("train step, LoRA r=8 vs full fine-tuning", lora_["tokens_per_s"], full["tokens_per_s"],
                    "tokens/s", "glm full fine-tuning"),
        summary_row("train step, P-tuning v2 (16) vs full fine-tuning", pt["tokens_per_s"], full["tokens_per_s"],
                    "tokens/s", "glm full fine-tuning"),
        summary_row("optimizer state, LoRA vs full", lora_["optimizer_state_bytes"] / 2**20,
                    full["optimizer_state_bytes"] / 2**20, "MiB", "glm full fine-tuning", higher_is_better=False),
    ]
    if "cloze" in classify:
        n = max(classify["sizes"])
        summary.append(summary_row(f"held-out accuracy, toy topic task, cloze vs head ({n} examples)",
                                   100 * classify["cloze"][n], 100 * classify["head"][n], "%", "classification head"))
    if "speedup" in peer:
        summary.append(summary_row("LoRA train step, glm vs peft", peer["glm"]["tokens_per_s"],
                                   peer["peft"]["tokens_per_s"], "tokens/s", "peft + transformers GlmForCausalLM"))
    path = write_record(args.out, "finetune_cpu", "cpu", benchmark="finetune", small=args.small, cpu_model=cpu_model(),
                        results={"methods": methods, "peft": peer, "lora_over_full_time": lora_time_ratio,
                                 "optimizer_state_ratio": state_ratio, "classification": classify},
                        batch=B, seq=T, response=RESPONSE, summary=summary)
    plot(path, methods, peer)
    print(f"wrote {path}")


def plot(path: str, methods: dict, peer: dict) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    names = list(methods)
    axes[0].bar(names, [methods[m]["tokens_per_s"] for m in names])
    axes[0].set_title("tokens/s (higher is better)")
    axes[1].bar(names, [methods[m]["optimizer_state_bytes"] / 2**20 for m in names])
    axes[1].set_yscale("log")
    axes[1].set_title("optimizer state, MiB (log)")
    if "speedup" in peer:
        axes[2].bar(["glm LoRA", "peft LoRA"], [peer["glm"]["tokens_per_s"], peer["peft"]["tokens_per_s"]])
        axes[2].set_title("LoRA tokens/s vs peft + transformers")
    fig.suptitle(f"fine-tuning steps, {device_name('cpu')}", fontsize=9)
    save_figure(fig, path[:-5] + ".png", dpi=100)


if __name__ == "__main__":
    main()
