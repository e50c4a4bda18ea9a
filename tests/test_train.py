"""The trainer end to end on tiny models: learning, bit-identical resume, the NaN guard, DDP on gloo."""
import dataclasses
import json
import os
import random
import shutil

import pytest
import torch
import torch.multiprocessing as mp

import glm
from glm.cli import main
from glm.errors import InputError, TrainingError
from glm.run_folder import checkpoints
from glm.train import TrainConfig, lr_at, train

TINY = dict(model="tiny-glm", vocab_size=500, batch_size=8, seq_len=96, corpus_size="tiny", eval_examples=10,
            progress=False, lr=3e-3, warmup=5)


def losses(out_dir):
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """Train the tokenizer once; the runs below load it (and so share ids)."""
    out = str(tmp_path_factory.mktemp("tok-run"))
    train(TrainConfig(out_dir=out, steps=1, eval_every=0, ckpt_every=0, **TINY))
    return os.path.join(out, "tokenizer")


def test_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(100, cfg) == pytest.approx(0.1)
    assert lr_at(55, cfg) == pytest.approx(0.55)


def test_short_run_learns(tmp_path, tokenizer_dir):
    s = train(TrainConfig(out_dir=str(tmp_path), steps=60, eval_every=60, ckpt_every=0, tokenizer=tokenizer_dir,
                          **TINY))
    ls = losses(str(tmp_path))
    first, last = sum(ls[i] for i in range(1, 6)) / 5, sum(ls[i] for i in range(56, 61)) / 5
    assert first > 5.5 and last < first - 1.2, (first, last)  # ~6.1 -> ~4.5 in 60 steps
    assert s["eval_loss"] < first and os.path.exists(s["plot"]) and os.path.isdir(s["model_dir"])
    assert 0.0 <= s["exact_match"] <= 1.0 and len(s["predictions"]) == 10


def test_kill_and_resume_is_bit_identical(tmp_path, tokenizer_dir):
    kw = dict(steps=12, eval_every=0, ckpt_every=4, keep_last=2, tokenizer=tokenizer_dir, **TINY)
    full = str(tmp_path / "full")
    train(TrainConfig(out_dir=full, **kw))
    cut = str(tmp_path / "cut")

    def kill(step, _loss):
        if step == 10:
            raise KeyboardInterrupt  # after the step-8 checkpoint, before step 12's

    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(out_dir=cut, **kw), on_step=kill)
    assert [os.path.basename(p) for p in checkpoints(cut)] == ["ckpt-0000004.pt", "ckpt-0000008.pt"]
    train(TrainConfig(out_dir=cut, resume=True, **kw))
    a, b = losses(full), losses(cut)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]]
    fa = torch.load(checkpoints(full)[-1], weights_only=True)["model"]
    fb = torch.load(checkpoints(cut)[-1], weights_only=True)["model"]
    assert all(torch.equal(fa[k], fb[k]) for k in fa)


def test_nan_loss_stops_with_last_good_checkpoint(tmp_path, tokenizer_dir, monkeypatch):
    import glm.train as T

    real = T.loss_sum

    def poisoned(model, batch, autocast, device):
        out = real(model, batch, autocast, device)
        return out * float("nan") if poisoned.calls >= 6 else out

    poisoned.calls = 0

    def count(step, loss):
        poisoned.calls = step

    monkeypatch.setattr(T, "loss_sum", poisoned)
    with pytest.raises(TrainingError, match=r"step 7: the loss is nan.*ckpt-0000006.pt"):
        train(TrainConfig(out_dir=str(tmp_path), steps=10, eval_every=0, ckpt_every=2, tokenizer=tokenizer_dir,
                          **TINY), on_step=count)
    state = torch.load(checkpoints(str(tmp_path))[-1], weights_only=True)
    assert state["step"] == 6 and all(torch.isfinite(v).all() for v in state["model"].values())


def _ddp_worker(rank: int, world: int, store_file: str, cfg: TrainConfig) -> None:
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # A file store rather than env:// (a TCP store served by rank 0): no rank depends on another
    # process staying alive through its own teardown (CI once saw rank 1 abort in gloo at exit).
    # train() finds the group initialised and uses it.
    torch.distributed.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world)
    try:
        train(cfg)
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_two_processes_match_single_process(tmp_path, tokenizer_dir):
    kw = dict(steps=6, eval_every=0, ckpt_every=0, tokenizer=tokenizer_dir, device="cpu", **TINY)
    single = str(tmp_path / "single")
    train(TrainConfig(out_dir=single, **kw))
    ddp = str(tmp_path / "ddp")
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "ddp_store"), TrainConfig(out_dir=ddp, **kw)), nprocs=2,
                       start_method="spawn")
    a, b = losses(single), losses(ddp)
    assert sorted(a) == sorted(b)
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-5, abs=1e-5), (s, a[s], b[s])
    assert a[6] != a[1]  # it trained


def test_cli_train_bad_data(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["train", "--out", str(tmp_path / "run"), "--data", str(empty), "--steps", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "empty.txt" in err and err.count("\n") == 1


def test_logits_at_equals_the_full_logits_there():
    """Projecting only the loss positions (the trainer's loss_sum) gives the full forward's logits
    there, and the same loss and gradients as masking the full logits."""
    model = glm.GLM(glm.preset("tiny-glm")).eval()
    model.init_weights(std=0.1, seed=0)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=gen)
    pick = torch.rand(2, 20, generator=gen) < 0.3
    kw = dict(prefix_len=torch.tensor([8, 12]))
    full = model(ids, **kw)
    part = model(ids, **kw, logits_at=pick)
    assert part.shape == (int(pick.sum()), model.config.vocab_size)
    torch.testing.assert_close(part, full[pick], atol=1e-6, rtol=1e-6)
    targets = torch.randint(0, model.config.vocab_size, (2, 20), generator=gen)
    grads = []
    for logits, tgt in ((full.flatten(0, 1), targets.masked_fill(~pick, -100).flatten()), (part, targets[pick])):
        model.zero_grad()
        torch.nn.functional.cross_entropy(logits.float(), tgt, ignore_index=-100, reduction="sum").backward(
            retain_graph=True)
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    for k, g in grads[0].items():
        torch.testing.assert_close(grads[1][k], g, atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="logits_at must be a bool"):
        model(ids, logits_at=pick.long())


def snapshot(folder) -> dict:
    return {os.path.relpath(os.path.join(d, f), folder): os.path.getmtime(os.path.join(d, f))
            for d, _, files in os.walk(folder) for f in files}


@pytest.fixture
def old_run(tmp_path, tokenizer_dir):
    """A copy of the fixture's run folder (its tokenizer, model, metrics), its checkpoint renamed to a step
    later than the runs below write: an earlier, longer run."""
    src = os.path.dirname(tokenizer_dir)
    out = str(tmp_path / "run")
    shutil.copytree(src, out)
    (old,) = checkpoints(out)
    os.rename(old, os.path.join(out, "ckpt-0000020.pt"))
    return out


def test_existing_run_needs_resume_or_overwrite(old_run, tokenizer_dir):
    """A new run into a folder that holds checkpoints is refused: keep-newest-K pruning would keep the
    old run's later checkpoints and delete the new run's. overwrite=True clears the old run first."""
    before = snapshot(old_run)
    kw = dict(TINY, steps=2, eval_every=0, ckpt_every=1, keep_last=1)
    with pytest.raises(TrainingError, match=r"already holds a run \(checkpoints up to ckpt-0000020.pt\); pass "
                                            r"resume=True \(--resume\).*overwrite=True \(--overwrite\)"):
        train(TrainConfig(out_dir=old_run, **kw))
    assert snapshot(old_run) == before  # nothing touched
    with pytest.raises(ValueError, match="not both"):
        train(TrainConfig(out_dir=old_run, resume=True, overwrite=True, **kw))
    s = train(TrainConfig(out_dir=old_run, tokenizer=tokenizer_dir, overwrite=True, **kw))
    assert ([os.path.basename(p) for p in checkpoints(old_run)] == ["ckpt-0000002.pt"]
            == [os.path.basename(s["checkpoint"])])
    assert sorted(losses(old_run)) == [1, 2]


def test_clear_run_deletes_only_what_the_trainer_wrote(old_run):
    from glm.run_folder import clear_run

    for extra in ("notes.txt", "metrics.jsonl.bak", os.path.join("tokenizer", "mine.txt")):
        open(os.path.join(old_run, extra), "w").close()
    open(os.path.join(old_run, "ckpt-0000030.pt.tmp-abc"), "w").close()  # left by a killed write
    clear_run(old_run, keep=os.path.join(old_run, "model", "config.json"))  # a file in model/ is being read
    left = sorted(snapshot(old_run))
    assert left == sorted(["notes.txt", "metrics.jsonl.bak", os.path.join("tokenizer", "mine.txt"),
                           *[os.path.join("model", f) for f in os.listdir(os.path.join(old_run, "model"))]])
    clear_run(old_run)
    assert sorted(os.listdir(old_run)) == ["metrics.jsonl.bak", "notes.txt", "tokenizer"]


@pytest.mark.parametrize("record", [True, False])
def test_reused_tokenizer_must_match_the_request(old_run, record):
    """OUT/tokenizer from an earlier run is reused only when trained as asked (before: --vocab-size 800
    silently got the old 500-id tokenizer); a folder without the settings record is checked by its size."""
    from glm.run_folder import TOKENIZER_RECORD

    record_file = os.path.join(old_run, "tokenizer", TOKENIZER_RECORD)
    assert os.path.exists(record_file)
    if not record:
        os.remove(record_file)
    want = r"tokenizer was trained with vocab_size=500, but this run asks for vocab_size=800; .*--tokenizer"
    # A resume meets the checkpoint's record of the run first, which names the same change.
    with pytest.raises(TrainingError, match=r"ckpt-0000020.pt: .* \(vocab_size: 500 in the checkpoint, 800 now\)"):
        train(TrainConfig(out_dir=old_run, resume=True, **dict(TINY, vocab_size=800)))
    for name in os.listdir(old_run):
        if name.startswith("ckpt-"):
            os.remove(os.path.join(old_run, name))
    with pytest.raises(TrainingError, match=want):  # no checkpoint: a fresh run, same tokenizer check
        train(TrainConfig(out_dir=old_run, **dict(TINY, vocab_size=800)))
    if record:
        with pytest.raises(TrainingError, match=r"corpus_size='tiny'.*corpus_size='small'"):
            train(TrainConfig(out_dir=old_run, **dict(TINY, corpus_size="small")))


def test_model_overrides_errors_and_max_positions(tmp_path, tokenizer_dir):
    with pytest.raises(ValueError, match=r"model_overrides sets vocab_size.*--vocab-size"):
        train(TrainConfig(out_dir=str(tmp_path / "a"), model_overrides={"vocab_size": 50}, **TINY))
    with pytest.raises(ValueError, match=r"unknown GLMConfig fields \['hiden_size'\]"):
        train(TrainConfig(out_dir=str(tmp_path / "a"), model_overrides={"hiden_size": 64}, **TINY))
    with pytest.raises(ValueError, match=r"max_positions 50.*seq_len 96 need an int of at least 96"):
        train(TrainConfig(out_dir=str(tmp_path / "a"), model_overrides={"max_positions": 50}, **TINY))
    with pytest.raises(ValueError, match="must be a dict"):
        train(TrainConfig(out_dir=str(tmp_path / "a"), model_overrides=["num_layers"], **TINY))
    assert not (tmp_path / "a").exists()
    s = train(TrainConfig(out_dir=str(tmp_path / "b"), model_overrides={"max_positions": 200}, steps=1, eval_every=0,
                          tokenizer=tokenizer_dir, **TINY))
    assert glm.from_pretrained(s["model_dir"]).config.max_positions == 200  # before: a TypeError


def test_cli_model_overrides_vocab_size_is_one_clear_line(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), "--model-overrides", '{"vocab_size": 50}', "--steps", "1",
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--vocab-size" in err and err.count("\n") == 1


def test_progress_bar_only_on_a_terminal(tmp_path, tokenizer_dir, capsys, monkeypatch):
    import glm.train as T

    kw = dict(TINY, progress=True, steps=2, eval_every=0, ckpt_every=0, tokenizer=tokenizer_dir)
    train(TrainConfig(out_dir=str(tmp_path / "log"), **kw))
    err = capsys.readouterr().err  # stderr is a pipe / log here: plain progress lines, no bar
    assert "\r" not in err and "100%|" not in err and err.startswith("train: step 1/2")
    monkeypatch.setattr(T, "_is_terminal", lambda stream: True)
    train(TrainConfig(out_dir=str(tmp_path / "tty"), **kw))
    assert "train: 100%" in capsys.readouterr().err


def test_chatglm6b_tokenizer_documents_end_in_end_token(tmp_path):
    """The trainer on a ChatGLM-6B tokenizer (eos = <eop> = the span end) ends documents with </s>."""
    from glm.data import end_of_text_id
    from glm.presets import preset
    from glm.tokenizer import train as train_tokenizer
    from glm.train import prepare

    corpus = tmp_path / "c.txt"
    words = "the quick brown fox jumps over a lazy dog 你好 世界 模型 语言 数据".split()
    r = random.Random(0)
    corpus.write_text("\n".join(" ".join(r.choice(words) for _ in range(12)) for _ in range(500)), encoding="utf-8")
    tok = train_tokenizer([str(corpus)], str(tmp_path / "tok"), 400, "chatglm")
    prep = prepare(TrainConfig(out_dir=str(tmp_path / "run"), tokenizer=str(tmp_path / "tok"), **TINY),
                   preset("tiny-chatglm"))
    special = prep.collator.special
    assert special.eos == end_of_text_id(tok) != tok.eop_id and special.eop == tok.eop_id


def test_demo_replaces_only_an_earlier_demo_run(old_run):
    """`make demo` twice works: the demo overwrites a run of its own settings (any length), nothing else."""
    from glm.demo import earlier_run_of

    same = TrainConfig(out_dir=old_run, steps=1, eval_every=0, ckpt_every=0, **TINY)  # the fixture's run
    assert earlier_run_of(same) and earlier_run_of(dataclasses.replace(same, steps=1500))
    assert not earlier_run_of(dataclasses.replace(same, lr=1e-3))
    assert not earlier_run_of(dataclasses.replace(same, out_dir=os.path.dirname(old_run)))  # no checkpoint


def test_ctrl_c_while_saving_a_checkpoint_leaves_no_temp_file(tmp_path):
    from glm.run_folder import save_checkpoint

    save_checkpoint(str(tmp_path), {"step": 1, "w": torch.ones(3)}, 1, keep_last=2)

    class Interrupting(dict):
        def __reduce_ex__(self, protocol):  # torch.save pickles this mid-write
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(str(tmp_path), {"step": 2, "w": torch.ones(1000), "x": Interrupting()}, 2, keep_last=2)
    assert sorted(os.listdir(tmp_path)) == ["ckpt-0000001.pt"]
    assert torch.load(tmp_path / "ckpt-0000001.pt", weights_only=True)["step"] == 1


def test_overwrite_never_follows_links_out_of_the_run(old_run, tmp_path):
    from glm.run_folder import clear_run

    elsewhere = tmp_path / "mine"
    elsewhere.mkdir()
    shutil.move(os.path.join(old_run, "tokenizer"), str(elsewhere / "tok"))
    shutil.move(os.path.join(old_run, "model"), str(elsewhere / "model"))
    os.symlink(elsewhere / "tok", os.path.join(old_run, "tokenizer"))
    os.symlink(elsewhere / "model", os.path.join(old_run, "model"))
    before = snapshot(elsewhere)
    clear_run(old_run)
    assert snapshot(elsewhere) == before  # the link targets are the user's, untouched
    assert checkpoints(old_run) == []


def test_overwrite_retrains_a_tokenizer_without_the_record(old_run):
    # --overwrite deletes the run's tokenizer (here from before the record existed) so the new run
    # trains its own instead of silently reusing the old one.
    from glm.run_folder import TOKENIZER_RECORD, clear_run

    record = os.path.join(old_run, "tokenizer", TOKENIZER_RECORD)
    if os.path.exists(record):
        os.remove(record)
    clear_run(old_run)
    assert not os.path.exists(os.path.join(old_run, "tokenizer", "tokenizer_config.json"))


def test_optimizer_is_fused_adamw_and_steps_as_the_plain_one():
    # The fused kernel is a speed choice only: from the same weights and gradients, one step moves every
    # parameter as the per-tensor AdamW does. (Over several steps the two drift apart through the key
    # biases, whose exact gradient is zero: Adam scales their rounding noise up to full steps.)
    from glm.train import make_optimizer

    cfg = TrainConfig(out_dir="unused", betas=(0.9, 0.99), weight_decay=0.1, lr=1e-2)
    models = [glm.GLM(glm.preset("tiny-glm4-chatglm")) for _ in range(2)]
    for m in models:
        m.init_weights(seed=3)
    fused, plain = make_optimizer(models[0], cfg), make_optimizer(models[1], cfg)
    assert fused.defaults["fused"] is True
    for group in plain.param_groups:
        group["fused"] = False
    ids = torch.randint(0, 100, (2, 12))
    for m, opt in zip(models, (fused, plain)):
        m(ids).float().square().mean().backward()
        opt.step()
    for (name, a), b, before in zip(models[0].named_parameters(), models[1].parameters(), _initial(models[0])):
        assert not torch.equal(a, before), f"{name} did not move"
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-4 * cfg.lr), name


def _initial(model):
    fresh = glm.GLM(model.config)
    fresh.init_weights(seed=3)
    return list(fresh.parameters())
