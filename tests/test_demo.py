"""`make demo`: what it prints, the objective mix it trains with, and blank fills that end at <eop>."""
import dataclasses
import os
import re

import pytest
import torch

import glm
from glm.demo import DEMO, demo, describe_mix, print_summary
from glm.errors import InputError
from glm.generate import eop_after_answer, infill_ids
from glm.train import model_config_for, prepare

# Special ids inside the tiny-glm vocabulary (160), as in test_infill.py.
MASK, SOP, EOP, CLS = 153, 156, 157, 158
ANSWER, OTHER = 42, 43


def _one_token_model(after_answer: int) -> glm.GLM:
    """A tiny GLM whose greedy fill of a blank is ANSWER and then ``after_answer``.

    Every block's output projections are zero, so each block passes its input through and the logits
    of a slot are the tied embedding matrix times the final LayerNorm of what enters the first block.
    A large block-position embedding dominates that input: block position 1 (the <sop> slot) points
    at ANSWER's embedding and block position 2 (the slot ANSWER is fed at) at ``after_answer``'s; a
    large final LayerNorm gain makes those logits far apart."""
    model = glm.GLM(glm.preset("tiny-glm")).eval()
    model.init_weights(seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("layers.") and (".out." in name or ".w_out." in name):
                p.zero_()
        emb = model.embed.weight
        emb.sub_(emb.mean(-1, keepdim=True))  # LayerNorm removes the mean: keep only the direction it keeps
        model.pos_embed.weight.zero_()
        model.block_pos_embed.weight.zero_()
        model.block_pos_embed.weight[1] = 100 * emb[ANSWER]
        model.block_pos_embed.weight[2] = 100 * emb[after_answer]
        model.final_norm.weight.mul_(100)  # logits peaked enough that the greedy token has probability ~1
    return model


def _fill(model: glm.GLM, max_span_tokens: int = 6):
    return infill_ids(model, [7, 19, MASK, 86], mask_ids=[MASK], sop_id=SOP, eop_id=EOP, cls_id=CLS,
                      eos_token_ids=(), max_span_tokens=max_span_tokens)


def test_infill_stops_at_eop_after_one_token():
    res = _fill(_one_token_model(after_answer=EOP))
    assert res.spans == [[ANSWER]] and res.complete == [True]
    assert res.tokens == [7, 19, ANSWER, 86]


def test_infill_without_eop_runs_to_the_cap_and_says_so():
    # The same model with <eop> never the most likely token: the span runs to max_span_tokens, incomplete.
    res = _fill(_one_token_model(after_answer=OTHER), max_span_tokens=4)
    assert res.spans[0][:2] == [ANSWER, OTHER] and len(res.spans[0]) == 4 and res.complete == [False]


class WordTokenizer:
    """Words split at spaces, each one id; "Paris." is one word, so that answer glues to its full stop."""
    vocab = {"the": 10, "capital": 11, "is": 12, ".": 13, "Paris": ANSWER, "Paris.": 44}
    mask_ids = {"MASK": MASK}
    sop_id, eop_id, cls_id = SOP, EOP, CLS

    def encode(self, text: str) -> list[int]:
        return [self.vocab[w] for w in text.split()]

    def encode_with_specials(self, text: str, continuation: bool = False) -> list[int]:
        return [MASK] if text == "[MASK]" else self.encode(text)

    def infill_prompt(self, ids) -> list[int]:
        return [CLS, *ids]


def test_eop_after_answer_is_the_models_probability_of_ending_the_blank():
    tok = WordTokenizer()
    assert eop_after_answer(_one_token_model(after_answer=EOP), tok, "the capital is [MASK] .", "Paris") > 0.99
    assert eop_after_answer(_one_token_model(after_answer=OTHER), tok, "the capital is [MASK] .", "Paris") < 0.01
    # Training would have blanked "Paris." whole: the blank before "." is not one the model saw.
    assert eop_after_answer(_one_token_model(after_answer=EOP), tok, "the capital is [MASK].", "Paris") is None
    with pytest.raises(InputError, match="exactly one blank"):
        eop_after_answer(_one_token_model(after_answer=EOP), tok, "the [MASK] is [MASK] .", "Paris")


def test_demo_trains_with_the_mix_it_states(tmp_path):
    # The shares the demo prints are those of the objective its run builds.
    cfg = dataclasses.replace(DEMO, out_dir=str(tmp_path / "demo"))
    objective = prepare(cfg, model_config_for(cfg)).collator.objective
    shown = [int(s) for s in re.findall(r"(\d+)% ", describe_mix(cfg))]
    assert shown == [round(100 * p) for p in (objective.bert_prob, objective.gap_sentence_prob,
                                              objective.generation_prob)]
    # The demo trains THUDM's published mix, the library default, and says so; another mix is named as such.
    assert cfg.mix is None and shown == [40, 30, 30] and "THUDM's published mix (GLM-10B)" in describe_mix(cfg)
    assert describe_mix(dataclasses.replace(DEMO, mix=(1.0, 0.0))).startswith("100% [MASK] spans, 0% ")
    assert "published mix is 40/30/30" in describe_mix(dataclasses.replace(DEMO, mix=(1.0, 0.0)))


def _summary(**kw) -> dict:
    s = {"parameters": 2_021_376, "exact_match": 0.3125, "exact_match_first_word": 0.375, "baseline": 0.15625,
         "eval_loss": 1.234, "eval_ppl": 3.43, "eop_after_answer": 0.6881, "answers_whole_tokens": 0.96875,
         "plot": "p.png", "model_dir": "m", "checkpoint": "c", "metrics": "x",
         "examples": [("Belia's favourite colour is [MASK].", "red", "fact"),
                      ("Halio lives in [MASK].", "Tirn", "fact")],
         "predictions": ["red", "Tirn. The pet of"]}
    return {**s, **kw}


def test_summary_prints_whole_fill_accuracy_and_baseline(capsys):
    print_summary(_summary(), DEMO, 600.0)
    out = capsys.readouterr().out
    assert re.search(r"31\.2% on the whole fill", out) and "37.5% on the fill's first word" in out
    assert "baseline: 15.6%" in out
    assert "6.2 points" in out  # right first word, then ran on: 37.5% - 31.2%
    assert "<eop> right after the right answer: 0.69" in out and "the 97% of blanks" in out
    # A fill is marked right only when the whole fill is the answer.
    lines = out.splitlines()
    red = next(i for i, ln in enumerate(lines) if "colour is [MASK]" in ln)
    tirn = next(i for i, ln in enumerate(lines) if "lives in [MASK]" in ln)
    assert lines[red].lstrip().startswith("ok") and not lines[tirn].lstrip().startswith("ok")
    assert describe_mix(DEMO) in out


@pytest.mark.slow
def test_real_demo_beats_the_baseline_on_whole_fills(tmp_path):
    s = demo(dataclasses.replace(DEMO, out_dir=str(tmp_path / "demo"), progress=False))
    assert s["exact_match"] > s["baseline"]


def test_finetune_demo_prints_before_after_and_baselines(tmp_path, capsys):
    # The demo's path end to end on a tiny pretrained model (1 step of the demo's own run, small sets):
    # the numbers it prints are the ones it returns; the real run is measured in docs/finetune.md.
    from glm.demo import FinetuneDemo, finetune_demo

    base_run = str(tmp_path / "demo")
    demo(dataclasses.replace(DEMO, out_dir=base_run, steps=2, ckpt_every=2, eval_examples=2, progress=False), show=0)
    cfg = FinetuneDemo(out_dir=str(tmp_path / "ft"), base_run=base_run, instructions=(8, 4), classification=(8, 8),
                       sft=dict(method="lora", steps=2, batch_size=4), cloze=dict(method="full", steps=2, batch_size=4),
                       progress=False)
    s = finetune_demo(cfg, show=2)
    out = capsys.readouterr().out
    assert f"held-out exact match on 4 questions: {s['instructions_after']:.1%} after fine-tuning, " \
           f"{s['instructions_before']:.1%} before" in out
    for name in ("zero-shot cloze (the base model)", "cloze, fine-tuned (full)", "classification head (full)",
                 "most-frequent-label baseline"):
        assert re.search(re.escape(name) + r"\s+\d+\.\d%", out), name
    assert s["baseline"] == 0.25 and out.count("before:") == 2
    assert os.path.isfile(os.path.join(cfg.out_dir, "instructions", "model", "adapter_config.json"))
