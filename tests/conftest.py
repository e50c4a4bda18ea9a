import importlib
import json
import os
import shutil
import signal
import sys
from contextlib import contextmanager

import pytest
import torch

# GLM_REFERENCE_DIR points elsewhere, e.g. on a GPU machine that has a copy but no ../shared.
REFERENCE_DIR = os.environ.get("GLM_REFERENCE_DIR") or os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference"))
FIXTURE_FAMILIES = ["glm", "chatglm-6b", "chatglm2-6b", "chatglm3-6b", "glm-4-9b-chatglm",
                    "glm-4-9b-chat-hf", "glm-4-9b-0414"]

# Two CPU cores in CI: keep torch from oversubscribing them.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def reference_dir(folder: str) -> str:
    """Path of a shared golden fixture; skips the test with a clear message when absent."""
    path = os.path.join(REFERENCE_DIR, folder, "tiny")
    if not os.path.isdir(path):
        pytest.skip(f"golden fixtures not found at {path} (the repo expects ../shared/reference beside it)")
    return path


@pytest.fixture(autouse=True, scope="session")
def _tuning_cache(tmp_path_factory):
    """`auto` attention's calibration cache (glm.tuning) in a temporary folder, never in ~, and measuring
    off, so every test sees the static rule whatever the machine measures (tests/test_tuning.py turns it
    on where it tests it). Subprocesses inherit both."""
    saved = {k: os.environ.get(k) for k in ("GLM_CACHE_DIR", "GLM_TUNING")}
    os.environ["GLM_CACHE_DIR"] = str(tmp_path_factory.mktemp("glm-cache"))
    os.environ["GLM_TUNING"] = "off"
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture
def bench_script(monkeypatch):
    """Imports a benchmarks/ script as a module: benchmarks/ is a folder of scripts, not a package, so the
    folder goes on sys.path for the test and every module imported from it is forgotten after."""
    monkeypatch.syspath_prepend(BENCHMARKS)
    before = set(sys.modules)
    yield importlib.import_module
    for name in set(sys.modules) - before:
        if os.path.abspath(getattr(sys.modules[name], "__file__", None) or "").startswith(BENCHMARKS + os.sep):
            del sys.modules[name]


def char_model_folder(root, text: str, name: str = "model", family: str = "chatglm2", **config):
    """A model folder under ``root``: a character tokenizer of ``family`` (chatglm2, chatglm3, ...) trained on
    ``text`` and a randomly initialised ``tiny-{family}`` model (``config``: fields to change) whose vocabulary
    covers it. Returns (folder, tokenizer)."""
    import glm
    from glm.tokenizer import train

    corpus = root / f"{name}-corpus.txt"
    corpus.write_text(text, encoding="utf-8")
    tok = train([str(corpus)], str(root / f"{name}-tok"), None, family, model_type="char")
    cfg = glm.preset(f"tiny-{family}")
    model = glm.GLM(cfg.replace(vocab_size=max(tok.vocab_size, cfg.vocab_size), **config))
    model.init_weights(seed=0)
    folder = str(root / name)
    model.save_pretrained(folder)
    tok.save(folder)
    return folder, tok


def copy_fixture(name: str, tmp_path) -> str:
    """A writable copy of a shared fixture folder (for tests that break it on purpose)."""
    dst = tmp_path / f"src-{name}"
    shutil.copytree(reference_dir(name), dst)
    return str(dst)


def edit_json(path: str, fn) -> None:
    with open(path) as f:
        d = json.load(f)
    fn(d)
    with open(path, "w") as f:
        json.dump(d, f)


def snapshot(folder) -> dict[str, bytes]:
    """Every file below ``folder`` (relative path -> bytes): to prove a failed write changed nothing."""
    out = {}
    for root, _, files in os.walk(folder):
        for fn in files:
            path = os.path.join(root, fn)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


class Hang(BaseException):
    """Raised by `time_limit` (a BaseException, so no `except Exception` in the library swallows it)."""


@contextmanager
def time_limit(seconds: float):
    """Fail with `Hang` if the block runs longer than ``seconds`` (SIGALRM): a reader that blocks (a FIFO
    in open()) fails its test instead of hanging the suite, and the hypothesis deadline only judges
    examples that return."""
    def on_alarm(*_):
        raise Hang(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models: their ops take microseconds, so a second thread buys
    nothing, and when the other core is busy every op waits on the thread barrier (measured ~7 ms an op)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
