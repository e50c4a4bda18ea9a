"""The trainer against hostile and unlucky input: planted pickles, options that would train wrongly,
resumes with other settings, --overwrite beside a user's files, two runs on one folder, a resume
with no checkpoint, impossible batch sizes, a disk full inside torch.save, flipped bytes, logs."""
import dataclasses
import errno
import io
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import snapshot

from glm.cli import main
from glm.corpus import generate_corpus
from glm.demo import DEMO, demo, earlier_run_of
from glm.errors import TrainingError
from glm.run_folder import checkpoints, load_checkpoint, run_lock, save_checkpoint
from glm.tokenizer import train as train_tokenizer
from glm.train import (
    FREE_FIELDS,
    OPTIMIZER_FIELDS,
    RESOLVED_FIELDS,
    RUN_FIELDS,
    TrainConfig,
    _progress_every,
    check_memory,
    model_config_for,
    train,
)

TINY = dict(model="tiny-glm", vocab_size=500, batch_size=4, seq_len=64, corpus_size="tiny", eval_every=0,
            eval_examples=0, progress=False, lr=3e-3, warmup=1, steps=2, ckpt_every=1, keep_last=3, device="cpu")


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> str:
    """A tokenizer for the tiny corpus, trained directly (a fraction of a second)."""
    folder = tmp_path_factory.mktemp("tok")
    text = folder / "text.txt"
    text.write_text("\n".join(generate_corpus(seed=0, size="tiny").train), encoding="utf-8")
    train_tokenizer([str(text)], str(folder / "tok"), 500, "glm", model_type="bpe")
    return str(folder / "tok")


@pytest.fixture(scope="module")
def other_tok(tok) -> str:
    """Another tokenizer trained on the same text (600 ids)."""
    folder = os.path.dirname(tok)
    train_tokenizer([os.path.join(folder, "text.txt")], os.path.join(folder, "other"), 600, "glm", model_type="bpe")
    return os.path.join(folder, "other")


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tok) -> str:
    """A finished 2-step run: checkpoints at steps 1 and 2, metrics, OUT/model."""
    out = str(tmp_path_factory.mktemp("base") / "run")
    train(TrainConfig(out_dir=out, tokenizer=tok, **TINY))
    return out


def copy_of(base_run: str, tmp_path) -> str:
    out = str(tmp_path / "run")
    shutil.copytree(base_run, out)
    return out


def metrics(out: str) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"), encoding="utf-8")]


# ------------------------------------------------------------------------------------------------
# No code runs from a checkpoint

class _Planted:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):  # unpickling this creates the marker folder: code from the file ran
        return os.makedirs, (self.marker,)


def plant(out: str, marker: str) -> str:
    """A ckpt-*.pt whose pickle runs code, with a valid checksum: only weights_only stops it."""
    state = {"model": _Planted(marker), "optimizer": {}, "step": 1, "torch_rng": torch.get_rng_state(),
             "config": {}, "model_config": {}}
    os.makedirs(out, exist_ok=True)
    return save_checkpoint(out, state, 1, keep_last=1)


def test_a_planted_pickle_never_runs(tmp_path):
    out, marker = str(tmp_path / "run"), str(tmp_path / "code-ran")
    path = plant(out, marker)
    with pytest.raises(TrainingError, match=r"ckpt-0000001\.pt: refused: .*pickled objects.*can run code"):
        train(TrainConfig(out_dir=out, resume=True, **TINY))
    with pytest.raises(TrainingError, match=r"refused"):
        load_checkpoint(path, torch.device("cpu"), verify=False)
    assert not earlier_run_of(dataclasses.replace(DEMO, out_dir=out))
    with pytest.raises(TrainingError, match=r"already holds a run"):  # `glm demo --out` that folder
        demo(dataclasses.replace(DEMO, out_dir=out))
    assert not os.path.exists(marker)
    torch.load(path, weights_only=False)  # the plant is live: the unsafe load runs it
    assert os.path.isdir(marker)


# ------------------------------------------------------------------------------------------------
# Every numeric option checked up front

BAD = [("grad_clip", -1.0), ("grad_clip", 0.0), ("grad_clip", math.nan), ("lr", 0.0), ("lr", math.inf),
       ("lr", math.nan), ("lr", True), ("min_lr_ratio", 1.5), ("min_lr_ratio", math.nan), ("warmup", -1),
       ("warmup", 2.5), ("weight_decay", -0.1), ("weight_decay", math.inf), ("betas", (0.9, 1.0)),
       ("betas", (0.9,)), ("betas", (math.nan, 0.9)), ("eval_every", -1), ("ckpt_every", -5), ("eval_examples", -1),
       ("seed", -1), ("seed", 2**64), ("steps", 0), ("steps", True), ("batch_size", 2.0), ("keep_last", 0),
       ("mix", (0.8, 0.5)), ("mix", (-0.1, 0.2)), ("mix", 0.4), ("progress", "false"), ("resume", 1),
       ("data", "notes.txt"), ("data", []), ("corpus_size", "huge"), ("tokenizer", ""), ("out_dir", "")]


@pytest.mark.parametrize("name,value", BAD, ids=[f"{n}={v!r}" for n, v in BAD])
def test_every_field_is_checked(name, value, tmp_path):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{name}\b"):
        train(TrainConfig(**{**TINY, "out_dir": str(tmp_path / "run"), name: value}))
    assert not (tmp_path / "run").exists()


def test_no_clipping_is_inf():
    TrainConfig(grad_clip=math.inf).validate()  # documented: inf turns clipping off


@pytest.mark.parametrize("value", ["-1", "0", "nan"])
def test_cli_grad_clip_out_of_range_is_one_line(value, tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), "--grad-clip", value, "--steps", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--grad-clip" in err and err.count("\n") == 1 and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------
# Resume: the run's settings or a clear refusal

def test_every_field_has_one_resume_rule():
    groups = RUN_FIELDS + RESOLVED_FIELDS + OPTIMIZER_FIELDS + FREE_FIELDS
    assert sorted(groups) == sorted(f.name for f in dataclasses.fields(TrainConfig))


CHANGES = [({"model_overrides": {"rope_base": 500.0}},
            r"model_config\.rope_base: 10000\.0 in the checkpoint, 500\.0 now"),
           ({"model_overrides": {"norm_eps": 1e-6}}, r"model_config\.norm_eps: 1e-05 in the checkpoint, 1e-06 now"),
           ({"model_overrides": {"rotary_fraction": 0.25}}, r"model_config\.rotary_fraction"),
           ({"objective": "causal"}, r"objective: 'glm' in the checkpoint, 'causal' now"),
           ({"batch_size": 8}, r"batch_size: 4 in the checkpoint, 8 now"),
           ({"seq_len": 48}, r"seq_len: 64 in the checkpoint, 48 now"),
           ({"seed": 1}, r"seed: 0 in the checkpoint, 1 now"),
           ({"mix": (0.5, 0.5)}, r"mix: None in the checkpoint, \[0\.5, 0\.5\] now"),
           ({"corpus_size": "small"}, r"corpus_size: 'tiny' in the checkpoint, 'small' now"),
           ({"grad_accum": 2}, r"grad_accum: 1 in the checkpoint, 2 now"),
           ({"tokenizer": "OTHER"}, r"tokenizer: the run trained with a tokenizer of sha256 \w{12}\.\.\., but "
                                    r".*other has \w{12}\.\.\.\); resume with the run's tokenizer"),
           ({"lr": 0.5},
            r"other optimizer settings \(lr: 0\.003 in the checkpoint, 0\.5 now\).*--allow-optimizer-change"),
           ({"grad_clip": math.inf}, r"grad_clip: 1\.0 in the checkpoint, inf now"),
           ({"steps": 1}, r"already at step 2, past steps=1")]


@pytest.mark.parametrize("change,message", CHANGES, ids=[next(iter(c)) + str(i) for i, (c, _) in enumerate(CHANGES)])
def test_resume_refuses_other_settings(base_run, tok, other_tok, tmp_path, change, message):
    out = copy_of(base_run, tmp_path)
    before = snapshot(out)
    change = {k: other_tok if v == "OTHER" else v for k, v in change.items()}
    with pytest.raises(TrainingError, match=r"ckpt-0000002\.pt: .*" + message):
        train(TrainConfig(out_dir=out, resume=True, **{**TINY, "tokenizer": tok, **change}))
    assert snapshot(out) == before  # nothing rewritten, and the lock file is gone again


def test_allowed_optimizer_change_is_applied_and_recorded(base_run, tok, tmp_path):
    out = copy_of(base_run, tmp_path)
    moved = shutil.copytree(tok, tmp_path / "moved-tok")  # the run's tokenizer in another folder: the same run
    kw = {**TINY, "tokenizer": str(moved), "steps": 3, "weight_decay": 0.05, "betas": (0.8, 0.9), "lr": 1e-3,
          "eval_every": 7, "keep_last": 2}  # eval_every, keep_last and steps need no flag
    train(TrainConfig(out_dir=out, resume=True, allow_optimizer_change=True, **kw))
    events = [r for r in metrics(out) if r.get("event") == "settings_changed"]
    assert events == [{"step": 2, "event": "settings_changed",
                       "changes": {"lr": {"from": 0.003, "to": 0.001}, "weight_decay": {"from": 0.1, "to": 0.05},
                                   "betas": {"from": [0.9, 0.95], "to": [0.8, 0.9]}, "steps": {"from": 2, "to": 3}}}]
    groups = load_checkpoint(checkpoints(out)[-1], torch.device("cpu"))["optimizer"]["param_groups"]
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0  # not the checkpoint's 0.1
    assert all(tuple(g["betas"]) == (0.8, 0.9) for g in groups)
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2, 3]


# ------------------------------------------------------------------------------------------------
# --overwrite and the final save never delete a user's files in OUT/model

def test_overwrite_refuses_unknown_files_in_model(base_run, tok, tmp_path):
    out = copy_of(base_run, tmp_path)
    for name in ("notes.txt", "eval_results.json"):
        (tmp_path / "run" / "model" / name).write_text("mine")
    before = snapshot(out)
    want = r"run/model holds files glm's trainer did not write \(eval_results\.json, notes\.txt\)"
    with pytest.raises(TrainingError, match=want):
        train(TrainConfig(out_dir=out, overwrite=True, **{**TINY, "tokenizer": tok}))
    assert snapshot(out) == before  # nothing deleted: not the checkpoints, not the model, not the notes
    for name in os.listdir(out):
        if name.startswith("ckpt-"):
            os.remove(os.path.join(out, name))
    before = snapshot(out)
    with pytest.raises(TrainingError, match=want):  # a new run would replace OUT/model at its end: refused now
        train(TrainConfig(out_dir=out, **{**TINY, "tokenizer": tok}))
    assert snapshot(out) == before


def test_a_file_put_into_model_during_the_run_is_kept(base_run, tok, tmp_path):
    out = copy_of(base_run, tmp_path)
    notes = os.path.join(out, "model", "notes.txt")

    def drop_notes(step, _loss):
        with open(notes, "w") as f:
            f.write("mine")

    with pytest.raises(TrainingError, match=r"model holds files glm's trainer did not write \(notes\.txt\)"):
        train(TrainConfig(out_dir=out, resume=True, **{**TINY, "tokenizer": tok, "steps": 3}), on_step=drop_notes)
    assert open(notes).read() == "mine"
    assert os.path.basename(checkpoints(out)[-1]) == "ckpt-0000003.pt"  # the run itself is kept


# ------------------------------------------------------------------------------------------------
# One run per folder at a time

HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, b"4242\\n")
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_run_on_the_folder_is_refused(tmp_path, tok):
    out = str(tmp_path / "run")
    os.makedirs(out)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, os.path.join(out, ".lock")], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"locked\n"
        with pytest.raises(TrainingError, match=r"run is in use by another glm train run \(process 4242 holds"):
            train(TrainConfig(out_dir=out, **{**TINY, "tokenizer": tok}))
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert os.listdir(out) == [".lock"]  # the refused run wrote nothing


def test_the_lock_is_released_on_errors(tmp_path):
    out = str(tmp_path / "run")
    with pytest.raises(KeyError):
        with run_lock(out):
            with pytest.raises(TrainingError, match="in use by another glm train run"):
                with run_lock(out):
                    pass
            raise KeyError("boom")
    assert os.listdir(out) == []
    with run_lock(out):  # free again
        assert os.listdir(out) == [".lock"]


# ------------------------------------------------------------------------------------------------
# Resume with no checkpoint, progress lines in a log

def test_resume_without_a_checkpoint_drops_the_dead_runs_metrics(tmp_path, tok, capsys):
    out = tmp_path / "run"
    out.mkdir()
    dead = [{"step": s, "loss": 9.0} for s in (1, 2, 3)]  # logged by a run killed before its first checkpoint
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dead))
    train(TrainConfig(out_dir=str(out), resume=True, **{**TINY, "tokenizer": tok, "steps": 1, "progress": True}))
    rows = metrics(str(out))
    assert [r["step"] for r in rows if "loss" in r] == [1] and rows[0]["loss"] != 9.0
    err = capsys.readouterr().err  # not a terminal: one plain line per step of this short run
    assert err.startswith("train: step 1/1 (100%)  loss ") and "tokens/s" in err


def test_progress_line_spacing():
    assert [_progress_every(n) for n in (1, 2, 50, 1500, 10**6)] == [1, 1, 5, 100, 100]


# ------------------------------------------------------------------------------------------------
# Memory, disk full inside torch.save, flipped bytes, bad devices

def test_a_batch_beyond_memory_is_refused_up_front(tmp_path, capsys):
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), **{**TINY, "batch_size": 10**8})
    with pytest.raises(TrainingError, match=r"batch_size 100000000 x seq_len 64 .*needs at least \d+\.\d GiB of "
                                            r"memory per step, but \d+\.\d GiB is available; lower batch_size"):
        train(cfg)
    assert main(["train", "--out", str(tmp_path / "run"), "--batch-size", str(10**8), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--grad-accum" in err and err.count("\n") == 1 and not (tmp_path / "run").exists()
    check_memory(DEMO, model_config_for(DEMO), torch.device("cpu"))  # the demo fits


class _FullDisk(io.FileIO):
    """A file on a disk that fills up after ``room`` bytes (the OS raises ENOSPC)."""
    room = 3000

    def write(self, data):
        if self.tell() + len(memoryview(data)) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def test_disk_full_inside_torch_save_is_the_documented_oserror(tmp_path, monkeypatch):
    out = str(tmp_path)
    state = {"model": {"w": torch.ones(4000)}, "step": 1}
    save_checkpoint(out, {"model": {"w": torch.ones(3)}, "step": 1}, 1, keep_last=2)
    before = snapshot(out)
    real = os.fdopen
    # torch's zip writer meets the OSError while writing and raises its own RuntimeError ("unexpected
    # pos ...") when it then closes the archive.
    monkeypatch.setattr(os, "fdopen", lambda fd, mode="r", *a, **k: io.BufferedWriter(_FullDisk(fd, "wb"))
                        if "w" in mode else real(fd, mode, *a, **k))
    with pytest.raises(OSError) as e:
        save_checkpoint(out, state, 2, keep_last=2)
    monkeypatch.undo()
    assert not isinstance(e.value, RuntimeError) and e.value.errno == errno.ENOSPC
    assert "No space left on device: writing " in str(e.value) and "ckpt-0000002.pt" in str(e.value)
    assert "intact" in str(e.value) and snapshot(out) == before  # no temp file, the earlier checkpoint as it was


def full_state(step: int) -> dict:
    return {"model": {"w": torch.arange(1000, dtype=torch.float32)}, "optimizer": {}, "step": step,
            "torch_rng": torch.get_rng_state(), "config": {}, "model_config": {}}


def test_flipped_bytes_in_a_checkpoint_are_detected(tmp_path):
    path = save_checkpoint(str(tmp_path), full_state(1), 1, keep_last=2)
    assert torch.equal(load_checkpoint(path, torch.device("cpu"))["model"]["w"], torch.arange(1000.0))
    data = bytearray(open(path, "rb").read())
    i = data.find(torch.tensor([500.0]).numpy().tobytes())
    data[i] ^= 1  # the lowest bit of one weight: loads fine, silently wrong
    open(path, "wb").write(bytes(data))
    with pytest.raises(TrainingError, match=r"ckpt-0000001\.pt: cannot read this checkpoint \(its bytes differ from "
                                            r"the sha256 .*--no-verify"):
        load_checkpoint(path, torch.device("cpu"))
    w = load_checkpoint(path, torch.device("cpu"), verify=False)["model"]["w"]  # the opt-out
    assert w[500] != 500.0
    open(path, "wb").write(bytes(data[:-5]))  # cut short: no checksum record left
    with pytest.raises(TrainingError, match=r"its sha256 record is missing"):
        load_checkpoint(path, torch.device("cpu"))


def test_cli_flags_reach_the_config():
    from glm.cli import _train_config, build_parser

    args = build_parser().parse_args(["train", "--no-verify", "--allow-optimizer-change", "--grad-clip", "inf"])
    cfg = _train_config(args)
    assert cfg.verify is False and cfg.allow_optimizer_change is True and cfg.grad_clip == math.inf


def test_rows_too_short_for_the_objective(tmp_path, tok):
    with pytest.raises(TrainingError, match=r"seq_len 3 leaves no room for a document token .* at least 5"):
        train(TrainConfig(out_dir=str(tmp_path / "run"), **{**TINY, "tokenizer": tok, "seq_len": 3}))
    with pytest.raises(ValueError, match=r"TrainConfig.seq_len \(--seq-len\) must be an integer >= 2, got 1"):
        train(TrainConfig(out_dir=str(tmp_path / "run"), **{**TINY, "tokenizer": tok, "seq_len": 1}))


@pytest.mark.parametrize("argv,want", [(["--device", "meta"], "'meta' holds shapes but no data"),
                                       (["--steps", "0"], "TrainConfig.steps (--steps) must be an integer >= 1")])
def test_bad_device_and_demo_steps_are_one_line(argv, want, tmp_path, capsys):
    cmd = "demo" if argv[0] == "--steps" else "train"
    assert main([cmd, "--out", str(tmp_path / "run"), *argv]) == 2
    err = capsys.readouterr().err
    assert want in err and err.count("\n") == 1 and not (tmp_path / "run").exists()


def test_out_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "run").write_text("not a folder")
    assert main(["train", "--out", str(tmp_path / "run"), "--steps", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "run exists and is not a folder" in err and err.count("\n") == 1
