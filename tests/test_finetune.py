"""`glm finetune`: the loop over every method and task, resume, the result folders and how they load, the CLI."""
import dataclasses
import io
import json
import os
import re
import shutil

import pytest
import torch

import glm
from glm.cli import FINETUNE_FLAGS, _finetune_config, build_parser, main
from glm.errors import ArgumentError, DataError, TrainingError
from glm.finetune import FinetuneConfig, batch_indices, finetune, load_classifier, sft_loss_sum
from glm.sft import load_jsonl
from glm.tokenizer import train as train_tokenizer

TEXT = ("Belia lives in Tirn. Belia's favourite colour is red. Halio lives in Ybar. Halio's favourite colour is "
        "green. The weather is good. The weather is bad. Question: answer: yes no good bad 1 2 3 4 5 6 7 8 9.\n") * 40


def _base(tmp_path_factory, family: str, preset: str, fmt: str) -> str:
    """A tiny random model of ``preset`` with a trained tokenizer of ``family``, saved in ``fmt``."""
    root = tmp_path_factory.mktemp(f"base-{preset}")
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    tok_dir = str(root / "tok")
    tok = train_tokenizer([str(corpus)], tok_dir, 200, family, model_type="bpe", byte_fallback=False)
    cfg = glm.preset(preset).replace(vocab_size=max(tok.vocab_size, glm.preset(preset).vocab_size))
    model = glm.GLM(cfg)
    model.init_weights(seed=1)
    out = str(root / "model")
    model.save_pretrained(out, format=fmt)
    tok.save(out)
    return out


@pytest.fixture(scope="module")
def chatglm2_base(tmp_path_factory):
    return _base(tmp_path_factory, "chatglm2", "tiny-chatglm2", "hf")


@pytest.fixture(scope="module")
def glm_base(tmp_path_factory):
    return _base(tmp_path_factory, "glm", "tiny-glm", "glm")


def _jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return str(path)


def _chat_rows(n: int = 12) -> list[dict]:
    people = [("Belia", "Tirn", "red"), ("Halio", "Ybar", "green")]
    rows = []
    for i in range(n):
        name, town, colour = people[i % 2]
        q, a = (f"Where does {name} live?", town) if i % 4 < 2 else (f"{name}'s favourite colour?", colour)
        rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return rows


def _labelled(n: int = 16) -> list[dict]:
    return [{"text": f"The weather is {'good' if i % 2 else 'bad'}.", "label": "yes" if i % 2 else "no"}
            for i in range(n)]


def _cfg(base, tmp_path, **kw) -> FinetuneConfig:
    data = _jsonl(tmp_path / "train.jsonl", _chat_rows())
    defaults = dict(base=base, data=data, eval_data=data, out_dir=str(tmp_path / "run"), steps=8, batch_size=4,
                    max_source_len=32, max_target_len=16, progress=False, device="cpu")
    return FinetuneConfig(**{**defaults, **kw})


def _losses(out_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_batches_cover_every_example_once_per_epoch():
    seen = [i for step in range(5) for i in batch_indices(10, 4, step, seed=3)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert seen[:10] != seen[10:20]  # a new order each epoch
    assert batch_indices(10, 4, 2, seed=3) == batch_indices(10, 4, 2, seed=3)


@pytest.mark.parametrize("method", ["lora", "ptuning", "full"])
def test_each_method_learns_and_its_result_loads_as_trained(chatglm2_base, tmp_path, method):
    cfg = _cfg(chatglm2_base, tmp_path, method=method, steps=12, lr={"full": 3e-3, "lora": 2e-2}.get(method))
    s = finetune(cfg)
    losses = _losses(cfg.out_dir)
    assert losses[12] < losses[1]
    assert s["eval_loss"] < losses[1]
    base_params = sum(p.numel() for p in glm.from_pretrained(chatglm2_base).parameters())
    if method == "full":
        assert s["trainable_parameters"] == base_params
    else:
        assert 0 < s["trainable_parameters"] < base_params / 4
    # The run folder loads as the trained model (adapter or prefix found and put on its base), with the
    # held-out loss the run reported.
    record = json.load(open(os.path.join(s["model_dir"], "glm_finetune.json")))
    assert record["method"] == method and os.path.isdir(record["base"])
    loaded = glm.from_pretrained(cfg.out_dir)
    tok = glm.tokenizer.load(s["model_dir"])
    rows = load_jsonl(cfg.eval_data, tok, loaded.config.family, max_source_len=32, max_target_len=16)
    with torch.no_grad():
        total, count = sft_loss_sum(loaded, rows, tok, torch.device("cpu"))
    assert float(total) / count == pytest.approx(s["eval_loss"], rel=1e-5)


def test_lora_and_ptuning_leave_the_base_weights_untouched(chatglm2_base, tmp_path):
    before = glm.from_pretrained(chatglm2_base).state_dict()
    for method in ("lora", "ptuning"):
        os.makedirs(tmp_path / method)
        cfg = _cfg(chatglm2_base, tmp_path / method, method=method, steps=3)
        finetune(cfg)
        loaded = glm.from_pretrained(cfg.out_dir)
        sd = loaded.state_dict()
        assert len(sd) > len(before)  # the adapters or the prefix came with it
        for name, t in before.items():
            assert torch.equal(sd[name], t), name
        if method == "lora":
            merged = glm.lora.remove(loaded)
            changed = [n for n, t in merged.state_dict().items() if not torch.equal(t, before[n])]
            assert changed and all(".attn." in n for n in changed)


def test_resume_is_bit_identical(chatglm2_base, tmp_path):
    # A run killed after its step-4 checkpoint, resumed: steps 5-8 repeat the uninterrupted run's losses
    # (LoRA dropout on, so torch's RNG state matters too).
    whole = _cfg(chatglm2_base, tmp_path, method="lora", lora_dropout=0.1, steps=8, ckpt_every=4,
                 out_dir=str(tmp_path / "whole"))
    finetune(whole)
    want = _losses(whole.out_dir)
    killed = str(tmp_path / "killed")
    shutil.copytree(whole.out_dir, killed)
    os.remove(os.path.join(killed, "ckpt-0000008.pt"))
    shutil.rmtree(os.path.join(killed, "model"))
    finetune(dataclasses.replace(whole, out_dir=killed, resume=True))
    assert _losses(killed) == want


def test_resume_with_other_settings_is_refused(chatglm2_base, tmp_path):
    cfg = _cfg(chatglm2_base, tmp_path, steps=2)
    finetune(cfg)
    with pytest.raises(TrainingError, match="lora_r"):
        finetune(dataclasses.replace(cfg, steps=4, resume=True, lora_r=4))
    with pytest.raises(TrainingError, match="already holds a run"):
        finetune(cfg)


def test_cloze_and_head_classifiers_learn_and_load(glm_base, tmp_path):
    data = _jsonl(tmp_path / "cls.jsonl", _labelled())
    for task in ("cloze", "head"):
        cfg = FinetuneConfig(base=glm_base, data=data, eval_data=data, out_dir=str(tmp_path / task), task=task,
                             method="full", lr=3e-3, labels=("yes", "no"), template="{text} Good? [MASK].",
                             steps=30, batch_size=8, progress=False, device="cpu")
        s = finetune(cfg)
        assert s["eval_accuracy"] > s["baseline"]
        probs = load_classifier(cfg.out_dir)(["The weather is good.", "The weather is bad."])
        assert probs[0]["yes"] > probs[0]["no"] and probs[1]["no"] > probs[1]["yes"]


def test_bad_inputs_write_nothing(chatglm2_base, tmp_path):
    cfg = _cfg(chatglm2_base, tmp_path)
    with pytest.raises(ArgumentError, match="labels"):
        finetune(dataclasses.replace(cfg, task="cloze"))
    with pytest.raises(ArgumentError, match="method"):
        finetune(dataclasses.replace(cfg, method="adapter"))
    with pytest.raises(ArgumentError, match="data"):
        finetune(dataclasses.replace(cfg, data=str(tmp_path / "missing.jsonl")))
    bad = _jsonl(tmp_path / "bad.jsonl", [{"text": "x", "label": "maybe"}])
    with pytest.raises(DataError, match=r"bad.jsonl line 1: label .maybe."):
        finetune(dataclasses.replace(cfg, data=bad, eval_data=None, task="cloze", labels=("yes", "no")))
    assert not os.path.exists(os.path.join(cfg.out_dir, "model"))
    assert not [n for n in os.listdir(cfg.out_dir) if n.startswith("ckpt")] if os.path.isdir(cfg.out_dir) else True


def test_merge_lora_writes_a_plain_checkpoint(chatglm2_base, tmp_path):
    cfg = _cfg(chatglm2_base, tmp_path, steps=3)
    finetune(cfg)
    adapted = glm.from_pretrained(cfg.out_dir)
    ids = torch.randint(0, 100, (1, 9))
    want = adapted(ids)
    for fmt in ("glm", "hf"):
        assert main(["merge-lora", cfg.out_dir, str(tmp_path / fmt), "--format", fmt]) == 0
        merged = glm.from_pretrained(str(tmp_path / fmt))
        assert not glm.lora.lora_parameters(merged)
        torch.testing.assert_close(merged(ids), want, rtol=1e-5, atol=1e-5)
    assert main(["merge-lora", chatglm2_base, str(tmp_path / "nope")]) == 2
    assert not os.path.exists(tmp_path / "nope")


def test_generate_and_chat_take_the_run_folder(chatglm2_base, tmp_path, capsys, monkeypatch):
    cfg = _cfg(chatglm2_base, tmp_path, steps=2)
    finetune(cfg)
    assert main(["generate", cfg.out_dir, "--prompt", "Where does Belia live?", "--max-new-tokens", "3"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("Where does Belia live?\n"))
    assert main(["chat", cfg.out_dir, "--max-new-tokens", "3"]) == 0
    assert "glm> " in capsys.readouterr().out


def test_every_finetune_flag_reaches_the_config(tmp_path):
    argv = ["finetune", "BASE", "--data", "d.jsonl", "--out", "o", "--method", "ptuning", "--task", "cloze",
            "--tokenizer", "t", "--max-source-len", "7", "--max-target-len", "5", "--labels", "a", "b",
            "--verbalizers", "x", "y", "--template", "{text} [MASK]!", "--lora-r", "3", "--lora-alpha", "5",
            "--lora-dropout", "0.2", "--lora-targets", "q_proj", "--lora-mlp", "--pre-seq-len", "4",
            "--prefix-projection", "--prefix-hidden-size", "9", "--prefix-dropout", "0.1", "--steps", "11",
            "--batch-size", "2", "--lr", "0.5", "--warmup", "1", "--min-lr-ratio", "0.3", "--weight-decay", "0.01",
            "--betas", "0.8", "0.9", "--grad-clip", "2", "--eval-every", "3", "--ckpt-every", "4", "--keep-last", "1",
            "--seed", "5", "--device", "cpu", "--dtype", "bfloat16", "--quantize", "int4", "--group-size", "16",
            "--resume"]
    args = build_parser().parse_args(argv)
    cfg = _finetune_config(args)
    defaults = FinetuneConfig(base="", data="", out_dir="")
    # --overwrite excludes --resume (the config refuses both): parsed on its own.
    cfg.overwrite = _finetune_config(build_parser().parse_args(argv[:-1] + ["--overwrite"])).overwrite
    for name in FINETUNE_FLAGS:
        assert getattr(cfg, name) != getattr(defaults, name), f"--{name.replace('_', '-')} did not reach the config"
    assert cfg.verbalizers == {"a": "x", "b": "y"} and cfg.betas == (0.8, 0.9)
    # Left out, every flag keeps the dataclass's default; the help says that default.
    plain = _finetune_config(build_parser().parse_args(["finetune", "B", "--data", "d", "--out", "o"]))
    assert dataclasses.replace(plain, base="", data="", out_dir="") == defaults
    sub = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "finetune")[1]
    for action in sub._actions:
        m = re.search(r"\(default (\S+?)\)", action.help or "")
        if m and action.dest in FINETUNE_FLAGS:
            assert m.group(1) == f"{getattr(defaults, action.dest):g}" if not isinstance(
                getattr(defaults, action.dest), str) else m.group(1) == getattr(defaults, action.dest), action.dest


def test_cli_finetune_reports_bad_input_in_one_line(tmp_path, capsys):
    assert main(["finetune", str(tmp_path), "--data", str(tmp_path / "no.jsonl"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--data" in err


def test_saving_a_model_with_unmerged_adapters_or_a_prefix_is_refused(tmp_path):
    model = glm.GLM(glm.preset("tiny-chatglm2"))
    glm.lora.apply(model, glm.lora.LoraConfig(r=2))
    with pytest.raises(ArgumentError, match="LoRA adapters"):
        model.save_pretrained(str(tmp_path / "a"))
    glm.lora.merge(model)
    model.save_pretrained(str(tmp_path / "merged"))  # merged: the weights hold the update
    prefixed = glm.GLM(glm.preset("tiny-chatglm2"))
    glm.ptuning.apply(prefixed, glm.ptuning.PrefixConfig(pre_seq_len=2))
    with pytest.raises(ArgumentError, match="P-tuning prefix"):
        prefixed.save_pretrained(str(tmp_path / "p"))
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "p")
