"""A training run's folder (``--out``): what `glm.train` keeps there and how it keeps it safe.

One run at a time holds the folder (`run_lock`). A new run claims it (`claim_run_folder`): a folder
holding another run is refused unless ``overwrite`` asks to delete that run, and ``--overwrite``
deletes only what the trainer wrote (`clear_run`). Trainer checkpoints are written atomically and
end with the sha256 of the bytes before them (``CHECKSUM_TAG``), checked before loading; they hold
plain data only and are read back with ``weights_only=True``, so a planted pickle cannot run code.
``metrics.jsonl`` gets one JSON record per line (`append_record`); `plot_metrics` draws it.

Nothing here knows what a run trains: `glm.train` passes the settings and the checkpoint's contents.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import pickle
from typing import Any, Iterator, Optional

try:
    import fcntl
except ImportError:  # Windows: runs are not locked there
    fcntl = None  # type: ignore[assignment]

import torch

from .checkpoint import foreign_files, written_by_glm
from .errors import FileKindError, TrainingError
from .files import atomic_write, ensure_regular, read_bounded, write_failed
from .tokenizer.load import MODEL_FILES

# What `train` writes at the top of out_dir, with the temp names it writes them under first.
RUN_FILES = ("metrics.jsonl", "metrics.jsonl.tmp", "loss.png", "loss.png.tmp.png", "train_text.txt",
             "train_text.txt.tmp")
TOKENIZER_RECORD = "glm_train_settings.json"  # beside a tokenizer the trainer trained: what it was trained with
LOCK_FILE = ".lock"

# ------------------------------------------------------------------------------------------------
# One run at a time


@contextlib.contextmanager
def run_lock(out_dir: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``out_dir/.lock`` (holding this process's id) for the block, so a
    second run into the same folder, from any process, fails at once instead of interleaving its
    checkpoints, pruning and metrics with this one. The file is removed on the way out, while still
    locked; a run that opened it just before then sees it is gone and locks the new one instead."""
    if fcntl is None:  # no flock on this platform
        yield
        return
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise TrainingError(f"{out_dir} exists and is not a folder; pass a folder for the run (--out)")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise TrainingError(f"{out_dir}: cannot create the run folder ({e.strerror or e}); pass a writable folder "
                            f"(--out)") from None
    path = os.path.join(out_dir, LOCK_FILE)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as e:
            raise TrainingError(f"{path}: cannot open the run folder's lock file ({e.strerror or e}); remove it "
                                f"if it is not glm's, then rerun") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            raise TrainingError(f"{out_dir} is in use by another glm train run (process {holder or 'unknown'} holds "
                                f"{path}); wait for it to finish, or use another out_dir (--out)") from None
        try:
            current = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(current, os.fstat(fd)):
            break
        os.close(fd)  # locked a file the previous holder had just removed
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        os.close(fd)


# ------------------------------------------------------------------------------------------------
# Claiming the folder: --overwrite deletes only what the trainer wrote

def _json_or_none(path: str) -> Any:
    try:
        return json.loads(read_bounded(path, what=os.path.basename(path)))
    except (OSError, ValueError):
        return None


# The tokenizer files the final save adds to OUT/model beside glm's checkpoint writer's files.
_TOKENIZER_FILES = ("tokenizer_config.json", *MODEL_FILES)


def model_folder_strangers(model_dir: str) -> list[str]:
    """The entries of ``model_dir`` (OUT/model) that the run's final save did not write, sorted; folders
    end in "/". Ours are what glm's checkpoint writer writes (config.json, weights, index, checksum
    record) and the tokenizer's files, in a folder that writer wrote; in any other folder nothing is
    ours. Empty when the folder is absent (or a link, which clear_run never follows)."""
    if not os.path.isdir(model_dir) or os.path.islink(model_dir):
        return []
    if not written_by_glm(model_dir):
        return [name + ("/" if os.path.isdir(os.path.join(model_dir, name)) else "")
                for name in sorted(os.listdir(model_dir))]
    return foreign_files(model_dir, carried=_TOKENIZER_FILES)


def refuse_strangers(model_dir: str) -> None:
    """TrainingError listing `model_folder_strangers` of ``model_dir``, if any: the final save replaces it."""
    strangers = model_folder_strangers(model_dir)
    if strangers:
        shown = ", ".join(strangers[:10]) + (f" and {len(strangers) - 10} more" if len(strangers) > 10 else "")
        raise TrainingError(f"{model_dir} holds files glm's trainer did not write ({shown}); the run's final save "
                            f"replaces that folder, so move them elsewhere first, or use another out_dir (--out)")


def claim_run_folder(out_dir: str, *, resume: bool, overwrite: bool, keep: Optional[str] = None,
                     is_main: bool = True) -> None:
    """Make sure ``out_dir`` holds no other run this one would mix with: without ``resume``, a folder
    with checkpoints is refused (keep-newest-K pruning goes by step number, so the old run's later
    checkpoints would outlive the new run's, and a later resume would continue the old run), unless
    ``overwrite`` asks to delete that run first (done by the main process; ``keep`` is a folder the
    run reads, as in `clear_run`). OUT/model holding files the trainer did not write is refused up
    front, since the final save replaces that folder."""
    ckpts = checkpoints(out_dir)
    if ckpts and not resume and not overwrite:
        raise TrainingError(f"{out_dir} already holds a run (checkpoints up to {os.path.basename(ckpts[-1])}); "
                            f"pass resume=True (--resume) to continue it, overwrite=True (--overwrite) to delete its "
                            f"checkpoints, metrics, tokenizer and model and start over, or use a new out_dir (--out)")
    refuse_strangers(os.path.join(out_dir, "model"))
    if overwrite and is_main:
        clear_run(out_dir, keep=keep)


def clear_run(out_dir: str, keep: Optional[str] = None) -> list[str]:
    """Delete what `train` writes into ``out_dir`` (checkpoints and their temp files, metrics, plot,
    tokenizer training text, the trainer's files in ``tokenizer/`` and ``model/``) and nothing else;
    ``keep`` (a folder this run reads, e.g. ``--tokenizer OUT/tokenizer``) is left alone. A ``model/``
    that holds anything else is a TrainingError before anything is deleted. Returns the deleted paths."""
    if not os.path.isdir(out_dir):
        return []
    kept = os.path.realpath(keep) if keep else None

    def ours(folder: str) -> bool:  # a real folder (never through a link), not the kept one nor one holding it
        real = os.path.realpath(folder)
        return (os.path.isdir(folder) and not os.path.islink(folder)
                and not (kept and (kept == real or kept.startswith(real + os.sep))))

    model_dir = os.path.join(out_dir, "model")
    if ours(model_dir):
        refuse_strangers(model_dir)
    gone = glob.glob(os.path.join(out_dir, "ckpt-*.pt")) + glob.glob(os.path.join(out_dir, "ckpt-*.pt.tmp-*"))
    gone += [os.path.join(out_dir, name) for name in RUN_FILES]
    gone = [p for p in gone if os.path.isfile(p)]
    for path in gone:
        os.remove(path)
    tok_dir = os.path.join(out_dir, "tokenizer")
    if ours(tok_dir):
        # Only the files the tokenizer trainer wrote (model file, config, our record); a folder that then
        # still holds something else is not ours to delete.
        names = [TOKENIZER_RECORD, "tokenizer_config.json"]
        tok_config = _json_or_none(os.path.join(tok_dir, "tokenizer_config.json"))
        if isinstance(tok_config, dict):
            names.append(os.path.basename(str(tok_config.get("model_file", ""))))
        for name in filter(None, names):
            for path in glob.glob(os.path.join(tok_dir, glob.escape(name))) + glob.glob(
                    os.path.join(tok_dir, glob.escape(name) + ".tmp-*")):
                os.remove(path)
                gone.append(path)
        if not os.listdir(tok_dir):
            os.rmdir(tok_dir)
    if ours(model_dir):
        # Deleting the old run's model now keeps a crashed new run from leaving it beside the new
        # run's metrics; refuse_strangers above made sure every file here is one the final save wrote.
        for name in os.listdir(model_dir):
            os.remove(os.path.join(model_dir, name))
            gone.append(os.path.join(model_dir, name))
        os.rmdir(model_dir)
        gone.append(model_dir)
    return gone


def remove_stale_temp_files(out_dir: str) -> list[str]:
    """Delete ``ckpt-*.pt.tmp-*`` files that a killed run (kill -9, power loss) left mid-write; they
    are never read (`checkpoints` only lists complete ``ckpt-*.pt``). Call only under `run_lock`."""
    stale = glob.glob(os.path.join(out_dir, "ckpt-*.pt.tmp-*"))
    for path in stale:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
    return stale


# ------------------------------------------------------------------------------------------------
# Trainer checkpoints: atomic, checksummed, keep-last-K, read back as plain data only

# The last bytes of every trainer checkpoint: this tag, the sha256 of all bytes before it (64 hex
# digits) and "\n". It goes into the temp file before the rename, so the digest is as atomic as the
# checkpoint; torch.load reads the zip archive in front of it and ignores what follows.
CHECKSUM_TAG = b"\nglm-sha256:"
CHECKSUM_TRAILER = len(CHECKSUM_TAG) + 64 + 1


def checkpoints(out_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(out_dir, "ckpt-*.pt")))


class _HashingWriter:
    """The file object torch.save writes to: hashes each byte on its way into ``f`` and keeps the first
    OSError the disk raised. torch's zip writer reports a failed write as a RuntimeError ("unexpected
    pos ...") when it then tries to close the archive; the kept OSError says what really happened."""

    def __init__(self, f) -> None:
        self.f, self.sha, self.error = f, hashlib.sha256(), None

    def write(self, data) -> int:
        try:
            n = self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise
        self.sha.update(data)
        return n

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as e:
            self.error = self.error or e
            raise


def save_checkpoint(out_dir: str, state: dict, step: int, keep_last: int) -> str:
    """Write ``ckpt-{step}.pt`` atomically (temp file + fsync + rename) with its sha256 at the end, then
    drop all but the last ``keep_last``. A failure (disk full, ...) leaves the earlier checkpoints as
    they were and is an OSError naming the file, whatever layer of torch.save met it."""
    path = os.path.join(out_dir, f"ckpt-{step:07d}.pt")

    def write(f) -> None:
        out = _HashingWriter(f)
        try:
            torch.save(state, out)
        except RuntimeError:
            if out.error is None:
                raise
            raise out.error from None
        f.write(CHECKSUM_TAG + out.sha.hexdigest().encode() + b"\n")

    try:
        atomic_write(path, write)
    except OSError as e:
        raise write_failed(e, path, f"the earlier checkpoints in {out_dir} are intact; free space (or lower "
                                    f"--keep-last), then rerun with --resume") from e
    for old in checkpoints(out_dir)[:-keep_last]:
        os.remove(old)
    return path


def verify_checkpoint(path: str) -> None:
    """Compare a trainer checkpoint's bytes with the sha256 recorded at its end; a TrainingError naming
    the file when the record is missing (cut short, not glm's) or does not match (flipped bytes)."""
    size = os.path.getsize(path)
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        tail = b""
        if size >= CHECKSUM_TRAILER:
            f.seek(size - CHECKSUM_TRAILER)
            tail = f.read(CHECKSUM_TRAILER)
        fix = "delete it to resume from the previous one, or pass verify=False (--no-verify) to load it anyway"
        if not (tail.startswith(CHECKSUM_TAG) and tail.endswith(b"\n")):
            raise TrainingError(f"{path}: cannot read this checkpoint (its sha256 record is missing: the file was "
                                f"cut short, or not written by glm's trainer); {fix}")
        f.seek(0)
        left = size - CHECKSUM_TRAILER
        while left > 0:
            chunk = f.read(min(left, 1 << 24))
            if not chunk:
                break
            sha.update(chunk)
            left -= len(chunk)
    if sha.hexdigest().encode() != tail[len(CHECKSUM_TAG):-1]:
        raise TrainingError(f"{path}: cannot read this checkpoint (its bytes differ from the sha256 recorded when "
                            f"glm wrote it: changed on disk or in a copy); {fix}")


# What a trainer checkpoint holds, with the type of each entry.
_STATE = {"model": dict, "optimizer": dict, "step": int, "torch_rng": torch.Tensor, "config": dict,
          "model_config": dict}


def load_checkpoint(path: str, device: torch.device, verify: bool = True) -> dict:
    """A trainer checkpoint, or a TrainingError naming the file and what to do.

    Only tensors and plain containers load (``weights_only=True``): a pickle that would build other
    objects, i.e. run code, is refused, as a file glm's trainer never writes."""
    try:
        ensure_regular(path, "trainer checkpoint")
    except FileKindError as e:
        raise TrainingError(f"{e}; or move it out of the run folder") from None
    if verify:
        verify_checkpoint(path)
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise TrainingError(f"{path}: cannot read this checkpoint (UnpicklingError: {str(e)[:200]}); delete it "
                                f"to resume from the previous one, or start over without --resume") from None
        raise TrainingError(f"{path}: refused: this file holds pickled objects other than tensors and plain data, "
                            f"which glm never loads because unpickling them can run code; glm's trainer did not "
                            f"write it, so move it out of the run folder") from None
    except Exception as e:  # truncated / corrupted: zip and EOF errors of many kinds
        raise TrainingError(f"{path}: cannot read this checkpoint ({type(e).__name__}: {e}); delete it to resume "
                            f"from the previous one, or start over without --resume") from None
    if not isinstance(state, dict) or not all(isinstance(state.get(k), t) and not isinstance(state.get(k), bool)
                                              for k, t in _STATE.items()):
        raise TrainingError(f"{path}: not a glm trainer checkpoint (needs {', '.join(_STATE)}); move it out of the "
                            f"run folder")
    return state


# ------------------------------------------------------------------------------------------------
# The metrics log: one JSON record per line

def parse_record(line: str) -> Optional[dict]:
    """One metrics.jsonl line, or None for a torn / foreign one."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) and line.endswith("\n") else None


def append_record(path: str, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def keep_records_until(path: str, step: int) -> None:
    """Keep the records of ``path`` up to ``step`` (the step a run continues from; 0 keeps none) and
    drop later ones, foreign lines and a line torn by a kill."""
    keep = []
    if step and os.path.exists(path):
        keep = [line for line in open(path, encoding="utf-8", errors="replace")
                if (rec := parse_record(line)) is not None and isinstance(rec.get("step"), int)
                and rec["step"] <= step]
    if keep:
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)
    elif os.path.exists(path):
        os.remove(path)


def plot_metrics(metrics_path: str, png_path: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [json.loads(line) for line in open(metrics_path, encoding="utf-8") if line.strip()]
    tr = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    ev = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if tr:
        ax.plot(*zip(*tr), lw=0.8, label="train loss")
    if ev:
        ax.plot(*zip(*ev), "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path
