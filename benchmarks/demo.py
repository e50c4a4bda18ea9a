"""The `make demo` run as a record: held-out blank-infilling exact match, baseline and loss of glm.demo.DEMO.

Runs ``glm.demo.demo`` with its default config (the same 2.0M-parameter GLM, corpus, steps and seed
as `make demo`) in a temporary folder and writes ``demo_<device>.json``: exact match on the fill's
first word and on the whole fill, the most-frequent-answer baseline (the peer: what a model that
always answers the commonest answer scores), held-out loss and perplexity, steps, seconds, CPU
model, torch version and git sha. The README and docs/training.md quote the CPU record, and a test
checks every number they quote against it, so rerun this after a change to the objective or the
trainer and quote what it prints.

    python benchmarks/demo.py [--device cpu|cuda] [--steps 1500] [--out benchmarks/results/local]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import tempfile

from common import LOCAL, summary_row, write_record


def cpu_model() -> str:
    """The CPU's marketing name (``model name`` in /proc/cpuinfo on Linux), else what platform says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> None:
    from glm.demo import DEMO, demo

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--steps", type=int, default=DEMO.steps,
                    help=f"training steps (default {DEMO.steps}, as make demo)")
    ap.add_argument("--eval-examples", type=int, default=DEMO.eval_examples,
                    help=f"held-out blanks scored (default {DEMO.eval_examples}, as make demo)")
    ap.add_argument("--out", default=LOCAL, help="folder for JSON + PNG")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="glm-bench-demo-") as tmp:
        cfg = dataclasses.replace(DEMO, out_dir=os.path.join(tmp, "demo"), device=args.device, steps=args.steps,
                                  eval_examples=args.eval_examples, ckpt_every=min(DEMO.ckpt_every, args.steps))
        s = demo(cfg)
        name = f"demo_{args.device}"
        results = {"exact_match_first_word": s["exact_match_first_word"], "exact_match": s["exact_match"],
                   "baseline": s["baseline"], "eval_loss": s.get("eval_loss"), "eval_ppl": s.get("eval_ppl"),
                   "blanks": len(s.get("predictions", [])), "steps": cfg.steps, "parameters": s["parameters"],
                   "seconds": s["seconds"],
                   # whether the model learned where a blank ends (see glm.generate.eop_after_answer)
                   **{k: s[k] for k in ("eop_after_answer", "answers_whole_tokens") if k in s}}
        config = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "out_dir"}
        path = write_record(args.out, name, args.device, benchmark="demo", cpu_model=cpu_model(), config=config,
                            results=results,
                            summary=[summary_row("held-out exact match, fill's first word",
                                                 100 * s["exact_match_first_word"], 100 * s["baseline"], "%",
                                                 "most-frequent-answer baseline"),
                                     summary_row("held-out exact match, whole fill", 100 * s["exact_match"],
                                                 100 * s["baseline"], "%", "most-frequent-answer baseline")])
        if s.get("plot"):
            shutil.copyfile(s["plot"], os.path.join(args.out, name + ".png"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
