"""Weight-only quantization benchmark: batch-1 decode tokens/s of glm fp32 / INT8 / INT4 on CPU against
transformers fp32 and PyTorch's own weight-only ops on the same integers; peak RSS of loading a checkpoint
quantized; held-out loss of the pretrained demo model under each scheme.

Decode. Two GLM-4-shaped models with random weights (N(0, 0.02)): the 122M model of benchmarks/decode.py and
a ~1B one (hidden 2048, 20 layers, 16 heads over 2 KV heads of 128, SwiGLU 5632, vocab 32000). Each is built
once; every variant below reads the same weights:

- glm fp32; glm INT8 per row, INT4 group 32 and INT4 per row (`glm.quantize`, whose layers call
  glm::int8_linear / glm::int4_linear at decode);
- transformers' GlmForCausalLM in fp32 (the decode benchmark's peer, same weights);
- aten: glm's INT8 / INT4-g32 model with each quantized layer swapped for a wrapper (`AtenInt8Linear`,
  `AtenInt4Linear` below) that calls PyTorch's weight-only ops on the same integers and scales:
  ``aten._weight_int8pack_mm(x, w int8 [N, K], scales [N])`` and, as gpt-fast does on CPU,
  ``aten._convert_weight_to_int4pack_for_cpu`` + ``aten._weight_int4pack_mm_for_cpu``. Their int4 format is
  unsigned with a zero point, ``w = (u - 8) * scale + zero``: glm's symmetric ``q`` in [-7, 7] becomes
  ``u = q + 8`` with ``zero = 0``, so the weights are the same numbers; the run checks that on the first and
  last block's layers (unit vectors through the op give back glm's dequantized columns exactly, random rows
  the product to within fp32 rounding).

Decode speed is the time per generated token after the first (the prefill is not counted): each token's
arrival is stamped (glm's `stream` yields each as it is chosen; transformers' generate gets a streamer). All
variants of a shape are built first and timed in ``--repeats`` rounds, each once per round, after a warm-up;
each keeps its best round. The machine may be shared: a run waits for a second in which other processes
leave the cores idle, and one during which they were busy is run again (``--quiet-wait``, ``--reruns``,
within ``--patience`` seconds for the whole run); the record keeps how busy they were. With glm's dispatch,
both glm's and the aten layers run their op for up to 8 rows and dequantize + F.linear for the prompt. The
bytes a decode step streams are counted from the tensors each variant holds (every tensor once, one row of
the input embedding, the KV cache at the mean context), and set against the best copy bandwidth measured in
the same run (before and after each shape).

Loading. The ~1B model is saved (glm's format, fp32 safetensors) to a temporary folder; then a fresh
process per scheme runs ``glm.from_pretrained(folder)``, ``quantize="int8"`` and ``quantize="int4",
group_size=32`` and reports its VmHWM (peak resident memory) and the loaded model's bytes.

Quality. When ``runs/demo/model`` exists (`make demo`), the held-out loss of glm.train's ``evaluate`` over
every held-out batch of the demo run (``eval_iters="all"``) for fp32 / INT8 row / INT8 g32 / INT4 row / INT4
g32 / INT4 g64, and the share of those targets whose argmax matches fp32's; otherwise the record says it is
absent.

Goals, printed beside the ratios and never asserted: INT8 >= 2.5x and INT4 >= 4x glm fp32 decode; each >= 1.2x
PyTorch's weight-only op with the same bits.

    python benchmarks/quantize.py [--shapes bench-120m,bench-1b] [--new-tokens 32] [--new-tokens-1b 12]
                                  [--repeats 3] [--threads 2] [--quiet-wait 30] [--reruns 3] [--patience 300]
                                  [--no-load]
                                  [--demo runs/demo] [--out benchmarks/results/local]
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from common import HERE, LOCAL, copy_bandwidth, model_bytes, pyplot, save_figure, step_bytes, summary_row, write_record
from decode import bench_config, build_models
from torch import Tensor, nn

import glm
from glm.demo import DEMO
from glm.errors import GLMError
from glm.quant import KERNEL_MAX_ROWS, LAYER_MODULES, QuantLinear, dequantize, unpack_int4
from glm.train import evaluate, heldout_batches, prepare

REPO = os.path.dirname(HERE)
SHAPES = ("bench-120m", "bench-1b")
# The decode variants, in the order they are measured and plotted: (key, label, bits, group size).
GLM_SCHEMES = (("int8", "glm INT8 row", 8, None), ("int4_g32", "glm INT4 g32", 4, 32),
               ("int4_row", "glm INT4 row", 4, None))
LABELS = {"fp32": "glm fp32", "hf": "transformers fp32", **{k: label for k, label, _, _ in GLM_SCHEMES},
          "aten_int8": "aten int8pack (row)", "aten_int4_g32": "aten int4pack g32"}
# The aten variant that shares each glm scheme's integers.
ATEN_OF = {"int8": "aten_int8", "int4_g32": "aten_int4_g32"}
QUALITY_SCHEMES = (("fp32", None, None), ("INT8 row", 8, None), ("INT8 g32", 8, 32), ("INT4 row", 4, None),
                   ("INT4 g32", 4, 32), ("INT4 g64", 4, 64))
LOAD_SCHEMES = (("fp32", None, None), ("int8", "int8", None), ("int4_g32", "int4", 32))
GOALS = {"int8": 2.5, "int4_g32": 4.0, "int4_row": 4.0}  # x glm fp32 decode
ATEN_GOAL = 1.2
# innerKTiles tiles the packed weight for the CUDA kernel; the CPU packing takes the argument and returns the same
# bytes for every value (checked on torch 2.13), so any is right. 2 as in gpt-fast's CPU path.
INNER_K_TILES = 2
VERDICT = {True: "met", False: "NOT met", None: "not judged (smoke run)"}


def config_1b():
    """A ~1B GLM-4-shaped model: hidden 2048, 20 layers, GQA 16 / 2 heads of 128, SwiGLU 5632, vocab 32000."""
    return glm.preset("tiny-glm-hf").replace(vocab_size=32000, hidden_size=2048, num_layers=20, num_heads=16,
                                             num_kv_heads=2, head_dim=128, ffn_hidden_size=5632,
                                             max_positions=2048, name="bench-1b")


def shape_config(shape: str, small: bool):
    if small:
        return bench_config(small=True)
    return config_1b() if shape == "bench-1b" else bench_config(shape="bench-120m")


# ---------------------------------------------------------------------------------------------
# PyTorch's weight-only ops behind glm's quantized layers

class AtenInt8Linear(nn.Module):
    """A per-row INT8 `QuantLinear` whose decode product is ``aten._weight_int8pack_mm`` on the same int8
    ``[N, K]`` integers and row scales; past `KERNEL_MAX_ROWS` rows (the prompt) it dequantizes, as glm does."""

    def __init__(self, q: QuantLinear):
        super().__init__()
        if q.bits != 8 or q.group_size is not None:
            raise ValueError("aten._weight_int8pack_mm takes one scale per output row (8 bits, group_size None)")
        self.in_features = q.in_features
        self.register_buffer("qweight", q.qweight)  # shared with glm's layer, not copied
        self.register_buffer("scales", q.scales.reshape(-1).float())
        self.bias = q.bias

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] <= KERNEL_MAX_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.qweight, self.scales)
            y = y if self.bias is None else y + self.bias
        else:
            y = F.linear(x2, dequantize(self.qweight, self.scales, 8, None, x.dtype), self.bias)
        return y.reshape(*x.shape[:-1], y.shape[-1])


class AtenInt4Linear(nn.Module):
    """A grouped INT4 `QuantLinear` whose decode product is ``aten._weight_int4pack_mm_for_cpu`` on its
    integers, repacked into aten's unsigned format (``u = q + 8``, zero point 0: the same weights). The glm
    layer is kept, unregistered, for the prompt's rows (dequantize + F.linear, as glm does)."""

    def __init__(self, q: QuantLinear):
        super().__init__()
        if q.bits != 4 or q.group_size is None:
            raise ValueError("aten._weight_int4pack_mm_for_cpu takes grouped scales (4 bits, a group size)")
        self.in_features, self.group_size = q.in_features, q.group_size
        unsigned = unpack_int4(q.qweight).to(torch.int32) + 8  # [N, K] in [1, 15]
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned, INNER_K_TILES))
        scales = q.scales.float().t().contiguous()  # [K / group, N]
        self.register_buffer("scales_and_zeros", torch.stack([scales, torch.zeros_like(scales)], dim=-1).contiguous())
        self.bias = q.bias
        self._glm = (q,)  # a tuple: not a submodule, so its bytes are not counted as this layer's

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] <= KERNEL_MAX_ROWS:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self.packed, self.group_size,
                                                           self.scales_and_zeros)
            y = y if self.bias is None else y + self.bias
        else:
            q = self._glm[0]
            y = F.linear(x2, dequantize(q.qweight, q.scales, 4, q.group_size, x.dtype), self.bias)
        return y.reshape(*x.shape[:-1], y.shape[-1])


def quantized_layers(model: glm.GLM) -> Iterator[tuple[str, nn.Module]]:
    for i, block in enumerate(model.layers):
        for name in LAYER_MODULES:
            yield f"layers.{i}.{name}", block.get_submodule(name)


def aten_model(fp32: glm.GLM, quantized: glm.GLM, wrap: Callable[[QuantLinear], nn.Module]) -> glm.GLM:
    """A GLM over ``fp32``'s tensors whose projections are ``wrap(layer)`` of ``quantized``'s layers (their
    integers shared, not copied)."""
    model = sharing_copy(fp32)
    for name, layer in quantized_layers(quantized):
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, wrap(layer))
    return model


def check_same_weights(model: glm.GLM, glm_layers: dict[str, QuantLinear], columns: int = 16) -> int:
    """Check that aten's layers hold glm's dequantized weights W, on the four projections of the first and the
    last block (every layer is converted by the same code, and the op is too slow to check all of a 1B model):
    unit vectors e_k through the op give column k of W exactly, for ``columns`` columns (both nibbles of the
    first and last byte, the rest spread over the groups); and 8 random rows x give x @ W.T to within fp32
    summation error, so a misplaced nibble anywhere would show. Returns the number of layers checked; raises
    AssertionError on the first difference."""
    last = len(model.layers) - 1
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for name, aten_mod in quantized_layers(model):
        if int(name.split(".")[1]) not in (0, last):
            continue
        q = glm_layers[name]
        K = q.in_features
        w = dequantize(q.qweight, q.scales, q.bits, q.group_size, torch.float32)
        spread = torch.linspace(0, K - 1, columns - 4).round().long()
        cols = torch.unique(torch.cat([torch.tensor([0, 1, K - 2, K - 1]), spread]))
        units = torch.zeros(len(cols), K)
        units[torch.arange(len(cols)), cols] = 1.0
        got = torch.cat([weight_only(aten_mod, units[i:i + KERNEL_MAX_ROWS])
                         for i in range(0, len(cols), KERNEL_MAX_ROWS)])
        if not torch.equal(got, w[:, cols].t()):
            raise AssertionError(f"{name}: aten's op does not hold glm's weights (max |diff| "
                                 f"{(got - w[:, cols].t()).abs().max().item():.3g} on unit vectors); the "
                                 f"conversion is wrong")
        x = torch.randn(KERNEL_MAX_ROWS, K, generator=gen)
        err = (weight_only(aten_mod, x).double() - x.double() @ w.double().t()).abs()
        # fp32 accumulation over K terms: well under 1e-4 of sum |x||w| (a wrong weight is O(1) of it).
        if not bool((err <= 1e-4 * (x.abs() @ w.abs().t()).double() + 1e-30).all()):
            raise AssertionError(f"{name}: aten's op does not hold glm's weights (random rows differ by up to "
                                 f"{err.max().item():.3g}); the conversion is wrong")
        checked += 1
    return checked


def weight_only(mod: nn.Module, x: Tensor) -> Tensor:
    """``mod``'s product without its bias: ``x @ W.T``."""
    bias, mod.bias = mod.bias, None
    try:
        return mod(x)
    finally:
        mod.bias = bias


# ---------------------------------------------------------------------------------------------
# Decode timing and bytes

class TokenStamps:
    """A transformers streamer that stamps each generated token's arrival (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value) -> None:
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self) -> None:
        pass


def glm_stamps(model: glm.GLM, ids: Tensor, n: int) -> tuple[list[float], Tensor]:
    stamps, toks = [], []
    for tok in glm.stream(model, ids, max_new_tokens=n, cuda_graphs=False, eos_token_ids=()):
        stamps.append(time.perf_counter())
        toks.append(tok)
    return stamps, torch.stack(toks, dim=1)


def hf_stamps(ref, ids: Tensor, n: int) -> tuple[list[float], Tensor]:
    streamer = TokenStamps()
    with torch.no_grad():
        out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                           min_new_tokens=n, pad_token_id=0, eos_token_id=None, streamer=streamer)
    return streamer.times, out[:, ids.shape[1]:]


# The machine may be shared: a neighbour keeping one of 2 cores busy halves a 2-thread decode. Each timed run
# waits (up to --quiet-wait seconds) for a second in which other processes keep at most BUSY_LIMIT cores busy,
# and a run during which they kept more busy is run again (up to --reruns times), while the run's --patience
# (seconds of waiting and repeated runs, all together) lasts.
BUSY_LIMIT = 0.25


def neighbour_window() -> Callable[[], float]:
    """Opens a window; the function returned gives the CPU cores that other processes kept busy since (all busy
    time in /proc/stat minus this process's own), 0 where /proc/stat is missing."""
    clock = os.sysconf("SC_CLK_TCK")

    def sample() -> tuple[float, float, float]:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:9]]
        except OSError:
            v = [0] * 8
        own = os.times()
        # user nice system idle iowait irq softirq steal: busy = all but idle and iowait
        return (sum(v) - v[3] - v[4]) / clock, own.user + own.system, time.perf_counter()

    start = sample()

    def cores() -> float:
        end = sample()
        return max(0.0, (end[0] - start[0] - (end[1] - start[1])) / max(end[2] - start[2], 1e-9))

    return cores


def wait_for_quiet(limit_s: float) -> float:
    """Seconds waited (at most about ``limit_s``) for a second in which neighbours kept <= BUSY_LIMIT cores busy."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit_s:
        window = neighbour_window()
        time.sleep(1.0)
        if window() <= BUSY_LIMIT:
            break
    return time.perf_counter() - t0


@dataclasses.dataclass
class Patience:
    """What a run may spend on a busy machine: ``budget_s`` seconds of waiting and repeated runs in all, at most
    ``wait_s`` of waiting before one timed run and ``reruns`` repeats of it."""
    budget_s: float
    wait_s: float
    reruns: int

    def wait(self) -> float:
        """Waits for a quiet second within the limits; the seconds waited."""
        limit = min(self.wait_s, self.budget_s)
        waited = wait_for_quiet(limit) if limit > 0 else 0.0
        self.budget_s -= waited
        return waited


def measured_bandwidth(patience: Patience) -> float:
    """Copy bandwidth (GB/s, common.copy_bandwidth) measured after waiting for a quiet second."""
    patience.wait()
    return copy_bandwidth("cpu")


def timed_run(run: Callable[[int], tuple[list[float], Tensor]], n: int,
              patience: Patience) -> tuple[float, Tensor, dict]:
    """Seconds per decode step (the tokens after the first) of one run of ``n`` tokens, its tokens, and how busy
    the neighbours were: ``neighbour_cores`` during it, ``rerun`` (runs not counted because they were busier than
    BUSY_LIMIT), ``waited_s`` for quiet before it; both within ``patience``."""
    rerun, waited = 0, 0.0
    while True:
        waited += patience.wait()
        window = neighbour_window()
        t0 = time.perf_counter()
        stamps, toks = run(n)
        busy = window()
        if busy <= BUSY_LIMIT or rerun >= patience.reruns or patience.budget_s <= 0:
            return (stamps[-1] - stamps[0]) / (len(stamps) - 1), toks, \
                {"neighbour_cores": busy, "rerun": rerun, "waited_s": waited}
        patience.budget_s -= time.perf_counter() - t0
        rerun += 1


def sharing_copy(model: glm.GLM) -> glm.GLM:
    """A second GLM over the same tensors (no copy): `glm.quantize` on it leaves ``model`` as it was."""
    with torch.device("meta"):
        clone = glm.GLM(model.config)
    clone.load_state_dict(model.state_dict(), assign=True, strict=True)
    clone.reset_buffers("cpu")
    return clone.eval()


def bench_shape(shape: str, args, bandwidth: float, save_to: Optional[str], patience: Patience) -> dict:
    """Every decode variant of one shape; saves the fp32 model to ``save_to`` first when given."""
    cfg = shape_config(shape, args.small)
    n = args.new_tokens_1b if shape == "bench-1b" and not args.small else args.new_tokens
    t0 = time.perf_counter()
    fp32, ref = build_models(cfg, "cpu", torch.float32)
    cfg = fp32.config
    print(f"\n[{shape}] {cfg.num_parameters / 1e6:.0f}M parameters, built with transformers' copy in "
          f"{time.perf_counter() - t0:.1f} s; prompt {args.prompt}, {n} new tokens, best of {args.repeats}",
          flush=True)
    if save_to is not None:
        t0 = time.perf_counter()
        fp32.save_pretrained(save_to)
        print(f"  saved fp32 checkpoint for the load test in {time.perf_counter() - t0:.1f} s", flush=True)
    ids = torch.randint(3, cfg.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    context = args.prompt + n // 2
    # Every variant is built first (the quantized ones share fp32's unquantized tensors, the aten ones the glm
    # layers' integers), then timed in rounds, each variant once per round: a slow spell of the machine then
    # falls on all of them alike, and each keeps its best round.
    models: dict[str, nn.Module] = {"fp32": fp32, "hf": ref}
    checked: dict[str, int] = {}
    for key, _, bits, group in GLM_SCHEMES:
        models[key] = glm.quantize(sharing_copy(fp32), bits, group)
        aten_key = ATEN_OF.get(key)
        if aten_key is not None:
            models[aten_key] = aten_model(fp32, models[key], AtenInt8Linear if bits == 8 else AtenInt4Linear)
            checked[aten_key] = check_same_weights(models[aten_key], dict(quantized_layers(models[key])))
    order = ["fp32", "hf", *[k for scheme in GLM_SCHEMES for k in (scheme[0], ATEN_OF.get(scheme[0])) if k]]

    def run_of(key: str) -> Callable[[int], tuple[list[float], Tensor]]:
        stamps = hf_stamps if key == "hf" else glm_stamps
        return lambda k, model=models[key]: stamps(model, ids, k)

    for key in order:
        run_of(key)(2)  # warm-up
    best: dict[str, tuple[float, Tensor, dict]] = {}
    reruns = {key: 0 for key in order}
    waited = {key: 0.0 for key in order}
    for r in range(args.repeats):
        for key in order:
            per_token, toks, noise = timed_run(run_of(key), n, patience)
            reruns[key] += noise["rerun"]
            waited[key] += noise["waited_s"]
            if key not in best or per_token < best[key][0]:
                best[key] = (per_token, toks, noise)
        print(f"  round {r + 1}, best so far (tok/s): " + ", ".join(f"{key} {1 / best[key][0]:.2f}" for key in order),
              flush=True)

    variants: dict[str, dict] = {}
    for key in order:
        per_token, _, noise = best[key]
        # transformers' model holds the same weights as glm fp32: the same bytes per step (same cache too).
        sb = step_bytes(fp32 if key == "hf" else models[key], context)
        rate = 1.0 / per_token
        variants[key] = {"label": LABELS[key], "tokens_per_s": rate, "step_bytes": sb,
                         "model_bytes": model_bytes(models[key]),
                         "GBps": sb * rate / 1e9, "of_bandwidth": sb * rate / 1e9 / bandwidth,
                         "neighbour_cores": noise["neighbour_cores"], "reruns": reruns[key],
                         "waited_s": waited[key]}
        if key in checked:
            variants[key]["weights_checked_layers"] = checked[key]
        v = variants[key]
        print(f"  {v['label']:22} {rate:8.2f} tok/s   {sb / 1e6:8.1f} MB/token   {v['GBps']:6.2f} GB/s "
              f"({v['of_bandwidth']:.0%} of copy bandwidth)   neighbours {v['neighbour_cores']:.2f} cores, "
              f"{v['reruns']} rerun(s), waited {v['waited_s']:.0f} s", flush=True)
    tokens = {key: best[key][1] for key in order}

    base = variants["fp32"]["tokens_per_s"]
    for v in variants.values():
        v["vs_glm_fp32"] = v["tokens_per_s"] / base
        v["bytes_ratio_vs_fp32"] = variants["fp32"]["step_bytes"] / v["step_bytes"]
    for key, aten_key in ATEN_OF.items():
        variants[key]["vs_aten"] = variants[key]["tokens_per_s"] / variants[aten_key]["tokens_per_s"]
    agree = {"glm fp32 vs transformers": float((tokens["fp32"] == tokens["hf"]).float().mean()),
             **{f"{LABELS[k]} vs {LABELS[a]}": float((tokens[k] == tokens[a]).float().mean())
                for k, a in ATEN_OF.items()}}
    models.clear()
    del fp32, ref
    gc.collect()
    return {"shape": cfg.name, "parameters": cfg.num_parameters, "config": cfg.to_dict(), "prompt": args.prompt,
            "new_tokens": n, "mean_context": context, "variants": variants, "greedy_agreement": agree}


# ---------------------------------------------------------------------------------------------
# Loading: peak RSS of from_pretrained with and without quantize=, each in its own process

LOAD_CHILD = r"""
import json, sys, time
import glm
from glm.hub import peak_rss

def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))

folder, scheme, group = sys.argv[1], sys.argv[2], sys.argv[3]
before = rss()
t = time.perf_counter()
kw = {} if scheme == "fp32" else {"quantize": scheme, "group_size": None if group == "row" else int(group)}
model = glm.from_pretrained(folder, **kw)
seconds = time.perf_counter() - t
seen, nbytes = set(), 0
for x in [*model.parameters(), *model.buffers()]:
    if id(x) not in seen:
        seen.add(id(x))
        nbytes += x.numel() * x.element_size()
print(json.dumps({"peak_rss": peak_rss(), "rss_before_load": before, "model_bytes": nbytes, "seconds": seconds}))
"""


def load_peaks(folder: str, threads: int) -> dict:
    file_bytes = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
                     if f.endswith(".safetensors"))
    out = {"checkpoint_bytes": file_bytes, "schemes": {}}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    print(f"\nloading the {file_bytes / 1e9:.2f} GB fp32 checkpoint, one fresh process per scheme", flush=True)
    for key, scheme, group in LOAD_SCHEMES:
        # From the repository root: `-c` puts the working folder first on sys.path, and benchmarks/ holds scripts.
        run = subprocess.run([sys.executable, "-c", LOAD_CHILD, folder, scheme or "fp32", str(group or "row")],
                             capture_output=True, text=True, env=env, cwd=REPO)
        if run.returncode != 0:
            raise SystemExit(f"quantize benchmark: loading {folder} with {key} failed:\n{run.stderr}")
        r = json.loads(run.stdout.strip().splitlines()[-1])
        out["schemes"][key] = r
        print(f"  {key:9} peak RSS {r['peak_rss'] / 1e9:6.2f} GB (process before loading "
              f"{r['rss_before_load'] / 1e9:.2f} GB), model {r['model_bytes'] / 1e9:.2f} GB, {r['seconds']:.1f} s",
              flush=True)
    return out


# ---------------------------------------------------------------------------------------------
# Quality on the pretrained demo model

def demo_quality(run_dir: str) -> dict:
    model_dir = os.path.join(run_dir, "model")
    if not os.path.isdir(model_dir):
        return {"skipped": f"{model_dir} does not exist (it is made by `make demo`); quality not measured"}
    cfg = dataclasses.replace(DEMO, out_dir=run_dir, eval_iters="all", progress=False)
    base = glm.from_pretrained(model_dir)
    try:
        prep = prepare(cfg, base.config)
    except GLMError as e:
        return {"skipped": f"{run_dir}: its held-out set could not be rebuilt ({e})"}
    not_text = torch.tensor(sorted(prep.collator.special.not_text))
    cpu = torch.device("cpu")

    @torch.no_grad()
    def argmax(model: glm.GLM) -> Tensor:
        picks = []
        for b in heldout_batches(prep, cfg):
            logits = model(**b.model_inputs(), logits_at=b.loss_mask)
            text = ~torch.isin(b.targets[b.loss_mask], not_text)
            picks.append(logits.argmax(-1)[text])
        return torch.cat(picks)

    rows, ref = [], None
    print(f"\nquality: {model_dir}, every held-out batch of the demo run", flush=True)
    for label, bits, group in QUALITY_SCHEMES:
        model = base if bits is None else glm.quantize(sharing_copy(base), bits, group)
        ev = evaluate(model, prep, cfg, cpu, max_examples=0)
        picks = argmax(model)
        ref = picks if ref is None else ref
        row = {"scheme": label, "bits": bits, "group_size": group, "eval_loss": ev["eval_loss"],
               "targets": ev["eval_targets"], "argmax_agreement": float((picks == ref).float().mean())}
        row["vs_fp32"] = row["eval_loss"] / rows[0]["eval_loss"] - 1 if rows else 0.0
        rows.append(row)
        print(f"  {label:9} held-out loss {row['eval_loss']:.4f} ({row['vs_fp32']:+.2%}), argmax agreement with "
              f"fp32 {row['argmax_agreement']:.1%} over {row['targets']} text targets", flush=True)
    return {"model": os.path.relpath(model_dir, REPO), "rows": rows}


# ---------------------------------------------------------------------------------------------

def goal_lines(shape: dict, smoke: bool) -> list[dict]:
    v = shape["variants"]
    out = []
    for key, goal in GOALS.items():
        ratio = v[key]["vs_glm_fp32"]
        out.append({"shape": shape["shape"], "goal": f"{LABELS[key]} >= {goal}x glm fp32", "ratio": ratio,
                    "bytes_ratio": v[key]["bytes_ratio_vs_fp32"], "met": None if smoke else ratio >= goal})
    for key, aten_key in ATEN_OF.items():
        ratio = v[key]["vs_aten"]
        out.append({"shape": shape["shape"], "goal": f"{LABELS[key]} >= {ATEN_GOAL}x {LABELS[aten_key]}",
                    "ratio": ratio, "met": None if smoke else ratio >= ATEN_GOAL})
    return out


def print_table(shape: dict, goals: list[dict]) -> None:
    v = shape["variants"]
    print(f"\n[{shape['shape']}] {'variant':22} {'tok/s':>8} {'vs fp32':>8} {'bytes fp32/x':>12} {'GB/s':>6} "
          f"{'of copy':>7}")
    for r in v.values():
        print(f"{'':{len(shape['shape']) + 3}}{r['label']:22} {r['tokens_per_s']:8.2f} {r['vs_glm_fp32']:7.2f}x "
              f"{r['bytes_ratio_vs_fp32']:11.2f}x {r['GBps']:6.2f} {r['of_bandwidth']:7.0%}")
    for g in goals:
        extra = f" (bytes allow {g['bytes_ratio']:.2f}x)" if "bytes_ratio" in g else ""
        print(f"  goal {g['goal']}: {g['ratio']:.2f}x{extra}: {VERDICT[g['met']]}")
    print("  greedy tokens agree: " + "; ".join(f"{k} {a:.0%}" for k, a in shape["greedy_agreement"].items()))


def plot(path: str, shapes: list[dict], loads: Optional[dict]) -> None:
    plt = pyplot()
    if plt is None:
        return
    panels = len(shapes) + (1 if loads else 0)
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 3.8), squeeze=False)
    for ax, s in zip(axes[0], shapes):
        keys = list(s["variants"])
        vals = [s["variants"][k]["tokens_per_s"] for k in keys]
        colors = ["tab:gray" if k in ("fp32", "hf") else "tab:red" if k.startswith("aten") else "tab:blue"
                  for k in keys]
        bars = ax.bar(range(len(keys)), vals, color=colors)
        for b, k in zip(bars, keys):
            ax.annotate(f"{s['variants'][k]['vs_glm_fp32']:.2f}x", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(keys)), [s["variants"][k]["label"] for k in keys], rotation=35, ha="right",
                      fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("decode tokens / s (batch 1)")
        ax.set_title(f"{s['shape']} ({s['parameters'] / 1e6:.0f}M), ratio to glm fp32", fontsize=9)
    if loads:
        ax = axes[0][-1]
        keys = list(loads["schemes"])
        x = range(len(keys))
        ax.bar([i - 0.2 for i in x], [loads["schemes"][k]["peak_rss"] / 1e9 for k in keys], 0.4, label="peak RSS")
        ax.bar([i + 0.2 for i in x], [loads["schemes"][k]["model_bytes"] / 1e9 for k in keys], 0.4,
               label="model bytes")
        ax.set_xticks(list(x), [f"from_pretrained {k}" for k in keys], rotation=20, ha="right", fontsize=7)
        ax.set_ylabel("GB")
        ax.set_title(f"loading {loads['shape']} ({loads['checkpoint_bytes'] / 1e9:.1f} GB fp32 file)", fontsize=9)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu",), help="the CPU kernels' benchmark: cpu only")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"models to decode with (default {','.join(SHAPES)})")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens (default 16)")
    ap.add_argument("--new-tokens", type=int, default=32, help="generated tokens per run (default 32)")
    ap.add_argument("--new-tokens-1b", type=int, default=12, help="generated tokens per run of bench-1b (default 12)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of timed runs, each variant once a round "
                                                           "(default 3)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--quiet-wait", type=float, default=30.0,
                    help="seconds each timed run may wait for other processes to leave the cores idle (default 30)")
    ap.add_argument("--reruns", type=int, default=3,
                    help="times a timed run is repeated because other processes were busy during it (default 3)")
    ap.add_argument("--patience", type=float, default=300.0,
                    help="seconds the whole run may spend waiting for quiet and repeating disturbed runs; past it "
                         "every run counts as it went, with how busy the machine was recorded (default 300)")
    ap.add_argument("--no-load", action="store_true", help="skip the peak-RSS loading test")
    ap.add_argument("--demo", default=os.path.join(REPO, "runs", "demo"),
                    help="the demo run whose model/ the quality section evaluates (default runs/demo)")
    ap.add_argument("--small", action="store_true", help="a 2M-parameter model for every shape (smoke runs)")
    ap.add_argument("--smoke", action="store_true", help="a smoke run (glm bench --quick): goals are not judged")
    ap.add_argument("--out", default=LOCAL)
    args = ap.parse_args(argv)

    import transformers

    torch.set_num_threads(args.threads)
    shapes_wanted = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in shapes_wanted if s not in SHAPES]
    if unknown:
        raise SystemExit(f"quantize benchmark: unknown shape(s) {unknown}; choose from {', '.join(SHAPES)}")
    if args.small:  # one 2M model stands for every shape
        shapes_wanted = shapes_wanted[:1]
    if not hasattr(torch.ops.glm, "int8_linear"):
        raise SystemExit("quantize benchmark: glm's CPU kernels are not built (glm::int8_linear missing); build "
                         "them first (pip install -e .)")
    load_shape = shapes_wanted[-1] if not args.no_load else None
    # The ceiling is the best copy bandwidth of the run: measured (in a quiet second) before and after each shape.
    patience = Patience(args.patience, args.quiet_wait, args.reruns)
    bandwidths = [measured_bandwidth(patience)]
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}; "
          f"measured copy bandwidth {bandwidths[0]:.1f} GB/s", flush=True)

    shapes, loads = [], None
    with tempfile.TemporaryDirectory(prefix="glm-bench-quantize-") as tmp:
        folder = os.path.join(tmp, "fp32")
        for shape in shapes_wanted:
            shapes.append(bench_shape(shape, args, max(bandwidths), folder if shape == load_shape else None,
                                      patience))
            bandwidths.append(measured_bandwidth(patience))
        bandwidth = max(bandwidths)
        print(f"\ncopy bandwidth over the run: {', '.join(f'{b:.1f}' for b in bandwidths)} GB/s; ceiling "
              f"{bandwidth:.1f} GB/s", flush=True)
        for s in shapes:
            for v in s["variants"].values():
                v["of_bandwidth"] = v["GBps"] / bandwidth
        if load_shape is not None:
            loads = {"shape": shapes[-1]["shape"], **load_peaks(folder, args.threads)}
    quality = demo_quality(args.demo)
    if "skipped" in quality:
        print(f"\nquality: {quality['skipped']}")

    goals = []
    for s in shapes:
        g = goal_lines(s, args.smoke)
        goals += g
        print_table(s, g)
    if loads:
        fp = loads["schemes"]["fp32"]["peak_rss"]
        print(f"\nloading {loads['shape']}: " + "; ".join(
            f"{k} peak RSS {r['peak_rss'] / 1e9:.2f} GB ({r['peak_rss'] / fp:.2f}x fp32's)"
            for k, r in loads["schemes"].items()))

    summary = []
    for s in shapes:
        v = s["variants"]
        tag = f"{s['shape']} decode b1"
        summary.append(summary_row(f"{tag}, glm fp32 vs transformers", v["fp32"]["tokens_per_s"],
                                   v["hf"]["tokens_per_s"], "tokens/s", "transformers GlmForCausalLM fp32"))
        for key, _, _, _ in GLM_SCHEMES:
            summary.append(summary_row(f"{tag}, {LABELS[key]} vs fp32", v[key]["tokens_per_s"],
                                       v["fp32"]["tokens_per_s"], "tokens/s", "glm fp32"))
        for key, aten_key in ATEN_OF.items():
            summary.append(summary_row(f"{tag}, {LABELS[key]} vs aten", v[key]["tokens_per_s"],
                                       v[aten_key]["tokens_per_s"], "tokens/s", LABELS[aten_key]))
    if loads:
        fp = loads["schemes"]["fp32"]
        for key in ("int8", "int4_g32"):
            summary.append(summary_row(f"{loads['shape']} from_pretrained quantize={key} peak RSS",
                                       loads["schemes"][key]["peak_rss"] / 1e9, fp["peak_rss"] / 1e9, "GB",
                                       "from_pretrained fp32", higher_is_better=False))
    if "rows" in quality:
        fp = quality["rows"][0]
        for row in quality["rows"][1:]:
            summary.append(summary_row(f"demo model, {row['scheme']}: held-out argmax agreement with fp32 "
                                       f"(loss {row['eval_loss']:.4f} vs {fp['eval_loss']:.4f}, "
                                       f"{row['vs_fp32']:+.2%})", 100 * row["argmax_agreement"], 100.0, "%",
                                       "glm fp32"))

    name = "quantize_cpu"
    path = write_record(args.out, name, "cpu", benchmark="quantize", transformers=transformers.__version__,
                        threads=torch.get_num_threads(), smoke=args.smoke, ceiling_GBps=bandwidth,
                        copy_bandwidth_samples_GBps=bandwidths, patience_left_s=patience.budget_s,
                        ceiling={"value": bandwidth, "unit": "GB/s", "what": "measured copy bandwidth"},
                        decode=shapes, load=loads, quality=quality, goals=goals, summary=summary)
    plot(os.path.join(args.out, name + ".png"), shapes, loads)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
