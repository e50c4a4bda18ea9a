"""What the benchmarks share: timing, the device ceilings they quote, and the JSON record they write.

Every record carries the device, torch version and git sha, a ``ceiling`` (what the device can do at
best for this workload, measured in the same run) and ``summary`` rows (ours vs the peer, measured in
the same run) that ``glm bench`` prints as one table.
"""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
# The committed records (quoted by the READMEs, shown on benchmarks/README.md) are replaced only on
# purpose (`glm bench SUITE --publish`, or --out naming this folder); any other run lands in the
# untracked results/local/, so trying a benchmark never rewrites what the docs quote.
PUBLISHED = os.path.join(HERE, "results")
LOCAL = os.path.join(PUBLISHED, "local")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_timed(fn, device: str, repeats: int) -> tuple[list[float], object]:
    """Wall times of ``repeats`` calls of ``fn`` after one warm-up call, and the last call's result."""
    out = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return times, out


def device_times(fn, device: str, repeats: int, min_sample_s: float = 5e-3) -> list[float]:
    """Seconds per call of ``fn``: ``repeats`` samples after warm-up calls (the first may compile), each the
    mean of enough back-to-back calls to last ``min_sample_s``; on CUDA timed by events around them.

    Unlike :func:`run_timed` it does not synchronise around every call, so a sub-millisecond GPU kernel
    is timed as the GPU runs it back to back, not as its launch latency plus a synchronisation."""
    fn()
    once = float("inf")
    for _ in range(3):  # the fastest of three, so one hiccup does not make every sample a single call
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        once = min(once, time.perf_counter() - t)
    inner = max(1, min(1000, math.ceil(min_sample_s / max(once, 1e-9))))
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / inner)
        else:
            t = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append((time.perf_counter() - t) / inner)
    return times


def best_time(fn, device: str, repeats: int) -> float:
    """Fastest of ``repeats`` calls of ``fn`` after one warm-up call."""
    return min(run_timed(fn, device, repeats)[0])


def matmul_peak(device: str, dtype: torch.dtype, n: int | None = None) -> float:
    """Measured dense matmul throughput (FLOP/s): the compute ceiling MFU and kernels are quoted against."""
    n = n or (4096 if device == "cpu" else 8192)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / best_time(lambda: a @ b, device, 5)


def copy_bandwidth(device: str, mb: int = 256) -> float:
    """Measured device copy bandwidth in GB/s (read + write): the ceiling for weight-streaming decode."""
    x = torch.empty(mb * 2**20 // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / best_time(lambda: y.copy_(x), device, 5) / 1e9


def disk_write_bandwidth(folder: str, mb: int = 256) -> float:
    """Measured sequential write + fsync bandwidth of ``folder``'s disk in GB/s: the converter's ceiling."""
    path = os.path.join(folder, ".glm-bench-disk")
    block = os.urandom(2**20)
    try:
        t = time.perf_counter()
        with open(path, "wb") as f:
            for _ in range(mb):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        return mb * 2**20 / (time.perf_counter() - t) / 1e9
    finally:
        if os.path.exists(path):
            os.remove(path)


def pyplot():
    """matplotlib.pyplot drawing off-screen, or None where matplotlib is not installed (the JSON record is
    the result; its plot is a view of it, so a benchmark without matplotlib still writes the record)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str, title: str | None = None, dpi: int = 120) -> None:
    """Writes ``fig`` to ``path`` and frees it (the scripts draw several records in one process)."""
    if title is not None:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    import matplotlib.pyplot as plt

    plt.close(fig)


def tensor_bytes(module: torch.nn.Module) -> dict[str, int]:
    """Bytes of each of ``module``'s parameters and buffers by name, a tensor shared under two names once."""
    seen, out = set(), {}
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if id(t) in seen or t.numel() == 0:
            continue
        seen.add(id(t))
        out[name] = t.numel() * t.element_size()
    return out


def model_bytes(module: torch.nn.Module) -> int:
    return sum(tensor_bytes(module).values())


def step_bytes(model, context: int, batch: int = 1) -> int:
    """Bytes one decode step of ``batch`` rows reads from a glm model: every tensor once (integers and scales
    as they are stored, for a quantized model), except the input embedding table, of which it gathers
    ``batch`` rows (a tied table is read whole as the output head), plus the KV cache of ``context`` tokens
    per row in the model's float dtype."""
    cfg = model.config
    sizes = tensor_bytes(model)
    table = sum(v for k, v in sizes.items() if k.startswith("embed."))
    total = sum(sizes.values())
    if not cfg.tie_word_embeddings:
        total += batch * table // cfg.vocab_size - table
    kv = 2 * cfg.num_layers * batch * cfg.num_kv_heads * context * cfg.head_dim * model.float_probe.element_size()
    return total + kv


def summary_row(case: str, ours: float, peer: float, unit: str, peer_name: str, higher_is_better: bool = True) -> dict:
    """One line of the table ``glm bench`` prints: ours vs the peer measured in the same run."""
    ratio = ours / peer if higher_is_better else peer / ours
    return {"case": case, "ours": ours, "peer": peer, "unit": unit, "peer_name": peer_name, "ratio": ratio}


def git_sha() -> str:
    """HEAD's short sha, with "+dirty" when tracked files differ from it: a copied working tree (the GPU
    machine gets one with an older .git) must not pass for the commit its .git names."""
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=HERE, capture_output=True, text=True,  # noqa: E731
                                        check=True).stdout.strip()
        sha = run("rev-parse", "--short", "HEAD")
        return sha + ("+dirty" if run("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    # The CPU model, as the speed of the CPU kernels (and `auto`'s choices) depend on it.
    from glm.tuning import cpu_model

    return f"cpu ({cpu_model()}, {platform.machine()}, {os.cpu_count()} cores)"


def write_record(out_dir: str, name: str, device: str, **fields) -> str:
    """``out_dir/name.json`` with the common provenance fields, written atomically."""
    from glm.files import atomic_write

    os.makedirs(out_dir, exist_ok=True)
    record = {"device": device_name(device), "torch": torch.__version__, "git_sha": git_sha(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **fields}
    path = os.path.join(out_dir, name + ".json")
    atomic_write(path, json.dumps(record, indent=2).encode())
    return path
