"""``make demo`` / ``glm demo``: pretrain a tiny GLM on the embedded corpus, then show it filling blanks.

`DEMO` is the run (a 1.9M-parameter GLM, the ``tiny`` corpus, 1500 steps, THUDM's published objective
mix); `demo` trains it with `glm.train.train` and prints held-out blanks with the model's fills, exact
match of the whole fill and of its first word against the most-frequent-answer baseline, and where the
model, the loss curve and the metrics went. benchmarks/demo.py records what it prints
(benchmarks/results/demo_cpu.json, quoted by the docs); docs/objective.md says why the run is set up
as it is, with the measurements.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Optional

import torch

from .cloze import ClozeTask
from .corpus import exact_match
from .data import Objective
from .errors import TrainingError
from .finetune import FinetuneConfig, classification_scores, finetune, load_labelled, respond
from .hub import from_pretrained
from .run_folder import checkpoints, load_checkpoint
from .tokenizer import load
from .toy_tasks import classification_set, classification_task, instruction_set, write_jsonl
from .train import TrainConfig, model_config_for, setting_changes, train

MODE_NAMES = ("[MASK] spans", "[sMASK] sentences", "[gMASK] suffixes")

# Two settings differ from original GLM's and the trainer's defaults; each is what lets a model this
# small, trained this briefly, close a blank with <eop> (measured in docs/objective.md, "A model this small"):
# - 2D RoPE instead of learned position tables: a Part B token sits at its mask's position and must
#   find the Part A tokens just before and after the mask to know where the blank ends. Rotary
#   positions make "one slot further" the same rotation everywhere; a learned table has to learn it
#   for each of its 129 rows apart, and 1500 steps are not enough.
# - A 550-piece BPE: with 1000 pieces, merges such as "住在伊巴" or "13." glue the answer to its
#   neighbours in the training text, so 63 of the 160 held-out blanks fall inside a token the model
#   only ever saw whole; at 550, 155 blanks are whole tokens as in training. Rows are ~1.8x longer,
#   so the batch is 16 to keep the run's length.
# The objective stays THUDM's mix (mix=None: 40% [MASK], 30% [sMASK], 30% [gMASK] batches).
DEMO = TrainConfig(
    out_dir="runs/demo", model="tiny-glm",
    model_overrides={"hidden_size": 192, "num_layers": 4, "num_heads": 6, "num_kv_heads": 6, "head_dim": 32,
                     "ffn_hidden_size": 768, "position_encoding": "rope_2d"},
    corpus_size="tiny", vocab_size=550, seq_len=128, batch_size=16, steps=1500, lr=3e-3, warmup=100,
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
    print_summary(summary, cfg, time.perf_counter() - t0, show)
    return summary


def describe_mix(cfg: TrainConfig) -> str:
    """The share of batches in each blank-infilling mode ``cfg`` trains with, and whether that is THUDM's
    published mix (the library's default, ``mix=None``)."""
    published = Objective()
    objective = published if cfg.mix is None else Objective(bert_prob=cfg.mix[0], gap_sentence_prob=cfg.mix[1])
    shares = (objective.bert_prob, objective.gap_sentence_prob, objective.generation_prob)
    modes = ", ".join(f"{round(100 * p)}% {name}" for p, name in zip(shares, MODE_NAMES))
    same = shares == (published.bert_prob, published.gap_sentence_prob, published.generation_prob)
    return f"{modes}: THUDM's published mix (GLM-10B)" if same else f"{modes}; THUDM's published mix is 40/30/30"


def print_summary(summary: dict, cfg: TrainConfig, seconds: float, show: int = 10) -> None:
    """What `demo` prints after training: ``show`` held-out blanks with the model's fill and the answer,
    exact match of the whole fill and of its first word against the baseline, held-out loss, and the
    run's files. A blank is marked ``ok`` only when the whole fill is the answer."""
    print()
    print(f"pretrained a {summary['parameters'] / 1e6:.1f}M-parameter GLM for {cfg.steps} steps in {seconds:.0f} s")
    print(f"blank infilling, batches drawn as {describe_mix(cfg)}")
    print()
    print("held-out examples (the model never saw these sentences):")
    for (text, answer, kind), pred in list(zip(summary.get("examples", []), summary.get("predictions", [])))[:show]:
        mark = "ok " if exact_match(pred, answer) else "   "
        print(f"  {mark} [{kind}] {text}\n        model: {pred!r}   answer: {answer!r}")
    print()
    n = len(summary.get("predictions", []))
    whole, first = summary["exact_match"], summary["exact_match_first_word"]
    print(f"held-out exact match on {n} blanks: {whole:.1%} on the whole fill, {first:.1%} on the fill's first word "
          f"(most-frequent-answer baseline: {summary['baseline']:.1%})")
    # Shown apart because a fill that runs past a right answer is an <eop> the model did not predict.
    print(f"fills with the right first word that ran on past the blank: {100 * (first - whole):.1f} points")
    if "eop_after_answer" in summary:
        print(f"probability of <eop> right after the right answer: {summary['eop_after_answer']:.2f} on average "
              f"(teacher-forced, over the {summary['answers_whole_tokens']:.0%} of blanks whose answer is whole "
              f"tokens of the tokenized text)")
    print(f"held-out loss {summary.get('eval_loss', float('nan')):.3f} "
          f"(perplexity {summary.get('eval_ppl', float('nan')):.1f})")
    print(f"loss curve: {summary['plot']}\nmodel + tokenizer: {summary['model_dir']}\n"
          f"checkpoint: {summary['checkpoint']}\nmetrics: {summary['metrics']}")


# ------------------------------------------------------------------------------------------------
# make demo-finetune: the demo model, fine-tuned on the embedded toy tasks

@dataclasses.dataclass
class FinetuneDemo:
    """`finetune_demo`'s settings: the pretrained demo run it starts from (trained first when missing),
    the toy sets' sizes and the two fine-tuning runs."""
    out_dir: str = "runs/demo-finetune"
    base_run: str = "runs/demo"
    seed: int = 0
    instructions: tuple[int, int] = (200, 60)  # train, held-out questions
    classification: tuple[int, int] = (200, 48)  # train, held-out sentences
    task: str = "topic"
    sft: dict = dataclasses.field(default_factory=lambda: dict(method="full", steps=300, batch_size=16, lr=1e-3,
                                                               warmup=20))
    cloze: dict = dataclasses.field(default_factory=lambda: dict(method="full", steps=100, batch_size=8, lr=1e-4))
    progress: bool = True


def _accuracy(model, tok, rows: list[dict]) -> tuple[float, list[str]]:
    replies = [respond(model, tok, r["messages"][0]["content"]) for r in rows]
    hits = sum(exact_match(reply, r["messages"][1]["content"]) for reply, r in zip(replies, rows))
    return hits / max(len(rows), 1), replies


def finetune_demo(cfg: Optional[FinetuneDemo] = None, show: int = 6) -> dict:
    """Fine-tune the pretrained demo model on the embedded toy instruction set (chat SFT) and on a toy
    classification task (GLM's cloze scoring and, for comparison, a head on the final hidden state);
    print answers before and after and held-out accuracy against the base model and the
    most-frequent-label baseline. Returns the numbers."""
    cfg = cfg or FinetuneDemo()
    t0 = time.perf_counter()
    base = os.path.join(cfg.base_run, "model")
    if not os.path.isfile(os.path.join(base, "config.json")):
        print(f"no pretrained demo model in {base}: training it first (make demo's run)")
        demo(dataclasses.replace(DEMO, out_dir=cfg.base_run, progress=cfg.progress), show=0)
    data = os.path.join(cfg.out_dir, "data")
    train_q, held_q = instruction_set(cfg.seed, *cfg.instructions)
    train_c, held_c = classification_set(cfg.seed, *cfg.classification, task=cfg.task)
    paths = {name: write_jsonl(rows, os.path.join(data, name + ".jsonl")) for name, rows in
             (("instructions", train_q), ("instructions_heldout", held_q), ("classification", train_c),
              ("classification_heldout", held_c))}
    model, tok = from_pretrained(base), load(base)
    before, before_replies = _accuracy(model, tok, held_q)
    toy = classification_task(cfg.task)
    task = ClozeTask(template=toy.template, labels=list(toy.labels), verbalizers=dict(toy.verbalizers))
    zero_shot = classification_scores(model, tok, task, load_labelled(paths["classification_heldout"], toy.labels))

    common = dict(base=base, progress=cfg.progress, seed=cfg.seed, overwrite=True, device="cpu")
    sft = finetune(FinetuneConfig(data=paths["instructions"], eval_data=paths["instructions_heldout"],
                                  out_dir=os.path.join(cfg.out_dir, "instructions"), task="sft", **cfg.sft, **common))
    after, after_replies = _accuracy(from_pretrained(sft["model_dir"]), tok, held_q)
    results = {}
    for kind in ("cloze", "head"):
        results[kind] = finetune(FinetuneConfig(
            data=paths["classification"], eval_data=paths["classification_heldout"],
            out_dir=os.path.join(cfg.out_dir, kind), task=kind, labels=toy.labels, template=toy.template,
            verbalizers=dict(toy.verbalizers), **cfg.cloze, **common))
    seconds = time.perf_counter() - t0

    print()
    print(f"instruction tuning ({cfg.sft['method']}, {cfg.sft['steps']} steps on {len(train_q)} questions); "
          f"held-out questions ask about items never fine-tuned on:")
    for r, b, a in list(zip(held_q, before_replies, after_replies))[:show]:
        print(f"  Q: {r['messages'][0]['content']}\n     before: {b!r}\n     after:  {a!r}   "
              f"answer: {r['messages'][1]['content']!r}")
    print(f"held-out exact match on {len(held_q)} questions: {after:.1%} after fine-tuning, {before:.1%} before")
    print()
    print(f"classification ({cfg.task}: {', '.join(toy.labels)}; {len(train_c)} training sentences, "
          f"{len(held_c)} held out), held-out accuracy:")
    rows = [("zero-shot cloze (the base model)", zero_shot["eval_accuracy"]),
            (f"cloze, fine-tuned ({cfg.cloze['method']})", results["cloze"]["eval_accuracy"]),
            (f"classification head ({cfg.cloze['method']})", results["head"]["eval_accuracy"]),
            ("most-frequent-label baseline", zero_shot["baseline"])]
    for name, acc in rows:
        print(f"  {name:<38s}{acc:6.1%}")
    print(f"\n{seconds:.0f} s; runs in {cfg.out_dir} (glm chat {sft['model_dir']} answers questions)")
    return {"instructions_before": before, "instructions_after": after, "zero_shot": zero_shot["eval_accuracy"],
            "cloze": results["cloze"]["eval_accuracy"], "head": results["head"]["eval_accuracy"],
            "baseline": zero_shot["baseline"], "seconds": seconds, "sft_eval_loss": sft.get("eval_loss")}
