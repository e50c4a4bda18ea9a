"""``make demo`` / ``glm demo``: pretrain a tiny GLM on the embedded corpus, then show it filling blanks.

`DEMO` is the run (a 2.0M-parameter GLM, the ``tiny`` corpus, 1500 steps); `demo` trains it with
`glm.train.train` and prints held-out blanks with the model's fills, exact match against the
most-frequent-answer baseline, and where the model, the loss curve and the metrics went.
benchmarks/demo.py records what it prints (benchmarks/results/demo_cpu.json, quoted by the docs).
"""
from __future__ import annotations

import dataclasses
import time

import torch

from .corpus import exact_match, first_word
from .errors import TrainingError
from .run_folder import checkpoints, load_checkpoint
from .train import TrainConfig, model_config_for, setting_changes, train

DEMO = TrainConfig(
    out_dir="runs/demo", model="tiny-glm",
    model_overrides={"hidden_size": 192, "num_layers": 4, "num_heads": 6, "num_kv_heads": 6, "head_dim": 32,
                     "ffn_hidden_size": 768},
    corpus_size="tiny", vocab_size=1000, seq_len=128, batch_size=32, steps=1500, lr=3e-3, warmup=100,
    eval_every=0, ckpt_every=500, eval_examples=160)


def earlier_run_of(cfg: TrainConfig) -> bool:
    """Whether ``cfg.out_dir``'s newest checkpoint was written by a run of ``cfg`` (up to its length:
    only `glm.train.FREE_FIELDS` may differ). A checkpoint that does not load (checksum, pickled code)
    is not."""
    ckpts = checkpoints(cfg.out_dir)
    if not ckpts:
        return False
    try:
        state = load_checkpoint(ckpts[-1], torch.device("cpu"), verify=cfg.verify)
        run, optimizer = setting_changes(state["config"], state["model_config"], cfg, model_config_for(cfg))
    except (TrainingError, ValueError):  # unreadable or refused: not provably ours
        return False
    return not run and set(optimizer) <= {"steps"}


def demo(cfg: TrainConfig = DEMO, show: int = 10) -> dict:
    """Pretrain a tiny GLM on the embedded corpus, then show held-out blanks, fills and answers.

    Rerunning the demo replaces an earlier demo run in ``cfg.out_dir`` (the same command rebuilds it);
    any other run there is refused as `train` refuses it."""
    t0 = time.perf_counter()
    if not cfg.resume and not cfg.overwrite and earlier_run_of(cfg):
        cfg = dataclasses.replace(cfg, overwrite=True)
    summary = train(cfg)
    print_summary(summary, cfg.steps, time.perf_counter() - t0, show)
    return summary


def print_summary(summary: dict, steps: int, seconds: float, show: int = 10) -> None:
    """What `demo` prints after training: ``show`` held-out blanks with the model's fill and the answer,
    exact match against the baseline, held-out loss, and the run's files."""
    print()
    print(f"pretrained a {summary['parameters'] / 1e6:.1f}M-parameter GLM for {steps} steps in {seconds:.0f} s "
          f"(blank infilling: [MASK] spans, [sMASK] sentences, [gMASK] suffixes)")
    print()
    print("held-out examples (the model never saw these sentences):")
    for (text, answer, kind), pred in list(zip(summary.get("examples", []), summary.get("predictions", [])))[:show]:
        mark = "ok " if exact_match(first_word(pred), answer) else "   "
        print(f"  {mark} [{kind}] {text}\n        model: {pred!r}   answer: {answer!r}")
    print()
    n = len(summary.get("predictions", []))
    print(f"held-out exact match on {n} blanks: {summary['exact_match_first_word']:.1%} on the fill's first word, "
          f"{summary['exact_match']:.1%} on the whole fill   "
          f"(most-frequent-answer baseline: {summary['baseline']:.1%})")
    print(f"held-out loss {summary.get('eval_loss', float('nan')):.3f} "
          f"(perplexity {summary.get('eval_ppl', float('nan')):.1f})")
    print(f"loss curve: {summary['plot']}\nmodel + tokenizer: {summary['model_dir']}\n"
          f"checkpoint: {summary['checkpoint']}\nmetrics: {summary['metrics']}")
