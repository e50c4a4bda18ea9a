"""Reliability sweep: faults and bad input that docs/reliability.md lists, beyond tests/test_errors.py.

* kill -9 in the middle of a trainer checkpoint and of `glm convert` (a real SIGKILL of a child
  process, paused mid-write): the destination is the previous complete version (or, in the one
  instant between two renames, both complete versions sit beside it), the source is untouched, and a
  rerun / --resume finishes; resumed training is bit-identical to an uninterrupted run.
* disk full (ENOSPC part-way through a write): one OSError naming the destination and what to do,
  the previous output intact, no temp files left behind.
* unsupported dtype / device requests, a config of another family, corrupt trainer checkpoints.
* hypothesis fuzzing of the config and checkpoint loaders with random bytes and random JSON: only
  the library's own exceptions (ConfigError, CheckpointError, KeyMismatchError), each naming the
  file, never a crash, a hang or a huge allocation.

Everything here builds its own tiny checkpoints, so nothing skips when ../shared/reference is absent.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import snapshot, time_limit
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import glm
import glm.checkpoint
from glm.checkpoint import CheckpointError, CheckpointReader
from glm.config import ConfigError
from glm.corpus import DataError, read_documents
from glm.devices import check_device
from glm.errors import KeyMismatchError, TrainingError
from glm.formats import config_to_hf
from glm.hub import convert_checkpoint, save_pretrained
from glm.run_folder import checkpoints
from glm.train import TrainConfig, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIB_ERRORS = (ConfigError, CheckpointError, KeyMismatchError)
FUZZ = dict(deadline=2000, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
HF_PRESETS = ["tiny-glm", "tiny-chatglm", "tiny-chatglm3", "tiny-glm-hf", "tiny-glm4-hf"]
SHARD = "50KB"  # the ~330 KB tiny checkpoints come out in 7 shards


# ---------------------------------------------------------------------------------------------
# Helpers



def litter(parent, name: str) -> list[str]:
    return sorted(n for n in os.listdir(parent) if n.startswith(name + ".tmp-") or n.startswith(name + ".old-"))


def tiny_model(preset: str, seed: int = 0) -> glm.GLM:
    model = glm.GLM(glm.preset(preset))
    model.init_weights(std=0.5, seed=seed)
    return model.eval()


def assert_lib_error(e: BaseException, where: str) -> None:
    """The library's own exception, with a message that names ``where`` (a file or folder)."""
    assert isinstance(e, LIB_ERRORS), f"{type(e).__name__} escaped: {e!r}"
    msg = str(e)
    assert msg.strip() and where in msg, f"message does not name {where}: {msg}"


def loads_or_fails_clearly(d) -> None:
    """Reading every tensor of folder ``d`` and building the model either works or raises one of the
    library's own errors naming ``d`` — within 10 s."""
    for load in (read_everything, glm.from_pretrained):
        try:
            with time_limit(10):
                load(d)
        except LIB_ERRORS as e:
            assert_lib_error(e, d)


def run_until(code: str, marker: str, timeout: float = 120.0) -> None:
    """Run ``python -c code``; once it creates ``marker`` (it is then paused mid-write), SIGKILL it."""
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    start = time.monotonic()
    try:
        while not os.path.exists(marker):
            if proc.poll() is not None:
                out, err = proc.communicate()
                pytest.fail(f"the child exited ({proc.returncode}) before reaching the write:\n{err.decode()[-3000:]}")
            if time.monotonic() - start > timeout:
                pytest.fail(f"the child did not reach the write within {timeout} s")
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


# ---------------------------------------------------------------------------------------------
# Fixtures: tiny checkpoints written by glm itself (release formats and glm's format)

@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """preset -> a release-format folder of a tiny random model; 'glm-format' -> glm's own format."""
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for name in HF_PRESETS:
        out[name] = str(root / name)
        save_pretrained(tiny_model(name), out[name], format="hf")
    out["glm-format"] = str(root / "glm-format")
    save_pretrained(tiny_model("tiny-glm4-hf"), out["glm-format"], format="glm", shard_size=SHARD)
    return out


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A module-wide scratch folder (hypothesis examples reuse it: no function-scoped tmp_path)."""
    return tmp_path_factory.mktemp("scratch")


def fresh(scratch, name: str, like: str | None = None) -> str:
    d = os.path.join(scratch, name)
    shutil.rmtree(d, ignore_errors=True)
    if like is not None:
        shutil.copytree(like, d)
    else:
        os.makedirs(d)
    return d


# ---------------------------------------------------------------------------------------------
# Fuzz: config.json

# JSON junk: the wrong types for every field (strings for ints, lists, objects), negative and huge
# numbers, NaN / Infinity (Python's json writes and reads them), nesting.
SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
           | st.sampled_from([0, -1, 1, 2, 3, 64, 2**31, 2**62, 2**63, 10**30])
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
JUNK = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
# The values that break naive parsing, tried often: wrong types, zero / negative / huge / non-finite.
NASTY = st.sampled_from([None, True, False, "", "x", "64", [], [1], ["a"], {}, {"a": 1}, 0, -1, -64, 1.5, 2**31,
                         2**62, 2**63, 10**30, 1e300, float("inf"), float("-inf"), float("nan")])
VALUES = NASTY | JUNK
DELETE = object()


def base_configs() -> dict[str, dict]:
    return {name: config_to_hf(glm.preset(name), torch.float32) for name in HF_PRESETS}


BASE_CONFIGS = base_configs()
# Keys that steer family detection or parsing, whether or not the preset's config has them.
EXTRA_KEYS = ["model_type", "architectures", "_name_or_path", "padded_vocab_size", "vocab_size", "layernorm_epsilon",
              "rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor", "kv_channels", "head_dim",
              "multi_query_attention", "multi_query_group_num", "inner_hidden_size", "eos_token_id", "pad_token_id",
              "bos_token_id", "mask_token_id", "rope_ratio", "num_key_value_heads", "position_encoding_2d"]


@st.composite
def mutated_config(draw) -> tuple[str, dict]:
    """A real release config.json with a few fields replaced by junk or deleted."""
    preset = draw(st.sampled_from(HF_PRESETS))
    cfg = json.loads(json.dumps(BASE_CONFIGS[preset]))
    keys = st.sampled_from(sorted(set(cfg) | set(EXTRA_KEYS))) | st.text(max_size=8)
    for key, value in draw(st.lists(st.tuples(keys, VALUES | st.just(DELETE)), min_size=1, max_size=4)):
        if value is DELETE:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    return preset, cfg


@settings(max_examples=60, **FUZZ)
@given(data=st.binary(max_size=300))
def test_fuzz_config_bytes(data, scratch):
    d = fresh(scratch, "cfg-bytes")
    with open(os.path.join(d, "config.json"), "wb") as f:
        f.write(data)
    with time_limit(10), pytest.raises(ConfigError) as e:
        glm.GLMConfig.from_hf(d)
    assert_lib_error(e.value, "config.json")


@settings(max_examples=40, **FUZZ)
@given(value=JUNK)
def test_fuzz_config_any_json(value, scratch):
    """Any JSON document at all (a list, a number, an object of junk) as config.json."""
    d = fresh(scratch, "cfg-json")
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(value, f)
    try:
        with time_limit(10):
            glm.GLMConfig.from_hf(d)
    except LIB_ERRORS as e:
        assert_lib_error(e, "config.json")


@settings(max_examples=300, **FUZZ)
@given(case=mutated_config())
def test_fuzz_config_fields(case, scratch):
    """Release configs with wrong types, negative / huge / NaN values and missing fields: a valid
    GLMConfig or a ConfigError naming the file; the same from the parsed dict."""
    _, cfg = case
    d = fresh(scratch, "cfg-fields")
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    for arg, where in ((d, "config.json"), (cfg, "config")):
        try:
            with time_limit(10):
                out = glm.GLMConfig.from_hf(arg)
        except LIB_ERRORS as e:
            assert_lib_error(e, where)
        else:
            assert isinstance(out, glm.GLMConfig)
            out.validate()


@settings(max_examples=100, **FUZZ)
@given(case=mutated_config())
def test_fuzz_from_pretrained_config(case, folders, scratch):
    """The same mutated config.json beside real weights: a model, or the library's error naming the
    folder (a config of impossible sizes, e.g. 2**62 features or 10**30 layers, fails before
    anything is built or allocated)."""
    preset, cfg = case
    d = os.path.join(scratch, "fp-" + preset)
    if not os.path.isdir(d):
        shutil.copytree(folders[preset], d)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    try:
        with time_limit(10):
            model = glm.from_pretrained(d)
    except LIB_ERRORS as e:
        assert_lib_error(e, d)
    else:
        assert isinstance(model, glm.GLM)


@settings(max_examples=40, **FUZZ)
@given(edits=st.lists(st.tuples(st.sampled_from(sorted(glm.preset("tiny-glm4-hf").to_dict()) + ["bogus"]),
                                VALUES | st.just(DELETE)), min_size=1, max_size=3),
       top=st.sampled_from(["config", "hf_config", "glm_format_version", None]), top_value=VALUES)
def test_fuzz_glm_format_config(edits, top, top_value, folders, scratch):
    """glm's own format: junk in the stored GLMConfig fields or in the top-level keys."""
    d = os.path.join(scratch, "fp-glm-format")
    if not os.path.isdir(d):
        shutil.copytree(folders["glm-format"], d)
    with open(os.path.join(folders["glm-format"], "config.json")) as f:
        raw = json.load(f)
    for key, value in edits:
        if value is DELETE:
            raw["config"].pop(key, None)
        else:
            raw["config"][key] = value
    if top is not None:
        raw[top] = top_value
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(raw, f)
    try:
        with time_limit(10):
            glm.from_pretrained(d)
    except LIB_ERRORS as e:
        assert_lib_error(e, d)


def test_deeply_nested_json_is_a_clear_error(folders, tmp_path):
    """json's C parser raises RecursionError past ~1000 levels: config, index and header say so."""
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "config.json").write_text(deep)
    with pytest.raises(ConfigError, match="nested too deeply"):
        glm.GLMConfig.from_hf(str(tmp_path))

    d = str(tmp_path / "sharded")
    shutil.copytree(folders["glm-format"], d)
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        f.write(deep)
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: not a valid index"):
        CheckpointReader(d)

    d = str(tmp_path / "single")
    shutil.copytree(folders["tiny-chatglm3"], d)
    header = deep.encode()
    with open(os.path.join(d, "model.safetensors"), "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors header \(not JSON\)"):
        glm.from_pretrained(d)


@pytest.mark.parametrize("field,value,message", [
    ("num_attention_heads", 0, "'num_attention_heads' must be a positive integer"),  # was ZeroDivisionError
    ("hidden_size", float("inf"), "'hidden_size' must be an integer, got inf"),  # was OverflowError
    ("rope_parameters", [1], "'rope_parameters' must be an object"),  # was AttributeError
    ("eos_token_id", ["a"], "'eos_token_id' must be an integer"),
    ("pad_token_id", "x", "'pad_token_id' must be an integer"),  # was accepted silently
    ("rms_norm_eps", "1e-5", "'rms_norm_eps' must be a finite number"),
])
def test_config_field_errors_name_the_field(field, value, message, tmp_path):
    cfg = dict(BASE_CONFIGS["tiny-glm-hf"], **{field: value})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=message) as e:
        glm.GLMConfig.from_hf(str(tmp_path))
    assert str(tmp_path / "config.json") in str(e.value) and "fix it in config.json" in str(e.value)


def test_family_detection_tolerates_odd_types():
    """Junk in the keys that pick the family is a ConfigError, not a TypeError/AttributeError."""
    with pytest.raises(ConfigError, match="cannot tell which GLM family"):
        glm.GLMConfig.from_hf({"model_type": "glm", "architectures": [1, None]})
    with pytest.raises(ConfigError, match="'hidden_size' is required"):
        glm.GLMConfig.from_hf({"model_type": "chatglm", "padded_vocab_size": "x", "layernorm_epsilon": []})


def test_config_of_another_family_on_these_weights(folders, tmp_path):
    """A transformers-Glm config.json beside ChatGLM3 weights: every mismatched tensor listed."""
    d = str(tmp_path / "m")
    shutil.copytree(folders["tiny-chatglm3"], d)
    (tmp_path / "m" / "config.json").write_text(json.dumps(BASE_CONFIGS["tiny-glm-hf"]))
    with pytest.raises(KeyMismatchError, match="Check that config.json belongs to these weights") as e:
        glm.from_pretrained(d)
    assert "model.embed_tokens.weight" in str(e.value) and "transformer.encoder" in str(e.value)


def test_layer_count_beyond_the_weights_fails_fast(folders, tmp_path):
    """num_layers = 10**9 used to spend minutes (and gigabytes) building a layout before failing."""
    d = str(tmp_path / "m")
    shutil.copytree(folders["tiny-chatglm3"], d)
    (tmp_path / "m" / "config.json").write_text(json.dumps(dict(BASE_CONFIGS["tiny-chatglm3"], num_layers=10**9)))
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match="says 1000000000 layers but the checkpoint holds only"):
        glm.from_pretrained(d)
    assert time.perf_counter() - t0 < 5


# ---------------------------------------------------------------------------------------------
# Fuzz: weight files

def _st_file(folder) -> str:
    return os.path.join(folder, "model.safetensors")


def _split(raw: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(header: dict, data: bytes) -> bytes:
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    return len(hb).to_bytes(8, "little") + hb + data


def read_everything(folder: str) -> None:
    with CheckpointReader(folder) as r:
        for name in r.keys():
            r.meta(name)
            r.get(name)


@settings(max_examples=60, **FUZZ)
@given(data=st.binary(max_size=400), as_index=st.booleans())
def test_fuzz_random_bytes_as_weights(data, as_index, folders, scratch):
    """Random bytes as model.safetensors or as model.safetensors.index.json."""
    d = fresh(scratch, "w-bytes", like=folders["tiny-chatglm3"])
    target = os.path.join(d, "model.safetensors.index.json" if as_index else "model.safetensors")
    with open(target, "wb") as f:
        f.write(data)
    loads_or_fails_clearly(d)


@settings(max_examples=30, **FUZZ)
@given(data=st.binary(max_size=400))
def test_fuzz_random_bytes_as_bin(data, folders, scratch):
    d = fresh(scratch, "w-bin", like=folders["tiny-chatglm3"])
    os.remove(_st_file(d))
    with open(os.path.join(d, "pytorch_model.bin"), "wb") as f:
        f.write(data)
    with time_limit(10), pytest.raises(CheckpointError) as e:
        glm.from_pretrained(d)
    assert_lib_error(e.value, "pytorch_model.bin")


@settings(max_examples=40, **FUZZ)
@given(index=st.dictionaries(st.sampled_from(["weight_map", "metadata", "x"]),
                             VALUES | st.dictionaries(st.text(max_size=30), VALUES, max_size=4), max_size=3))
def test_fuzz_index_json(index, folders, scratch):
    """Random JSON objects as the shard index (weight_map of junk, shard names that are not strings)."""
    d = fresh(scratch, "w-index", like=folders["glm-format"])
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    loads_or_fails_clearly(d)


HEADER_FIELDS = ["dtype", "shape", "data_offsets", None]  # None: replace the whole entry


@settings(max_examples=80, **FUZZ)
@given(how=st.sampled_from(["truncate", "flip", "header-field", "header-bytes"]), pos=st.integers(0, 10**9),
       junk_bytes=st.binary(min_size=1, max_size=16), field=st.sampled_from(HEADER_FIELDS), value=VALUES,
       pick=st.integers(0, 10**6))
def test_fuzz_corrupted_safetensors(how, pos, junk_bytes, field, value, pick, folders, scratch):
    """A real safetensors file, truncated, with bytes overwritten, or with junk in a header entry
    (missing dtype, a shape of strings, offsets past the end, negative or NaN numbers, ...)."""
    d = fresh(scratch, "w-corrupt", like=folders["tiny-chatglm3"])
    with open(_st_file(d), "rb") as f:
        raw = f.read()
    header, data = _split(raw)
    if how == "truncate":
        raw = raw[:pos % len(raw)]
    elif how == "flip":
        at = pos % len(raw)
        raw = raw[:at] + junk_bytes + raw[at + len(junk_bytes):]
    elif how == "header-bytes":
        at = 8 + pos % (len(raw) - len(data) - 8)  # inside the JSON header
        raw = raw[:at] + junk_bytes + raw[at + len(junk_bytes):]
    else:
        names = sorted(k for k in header if k != "__metadata__")
        name = names[pick % len(names)]
        if field is None:
            header[name] = value
        else:
            header[name][field] = value
        raw = _join(header, data)
    with open(_st_file(d), "wb") as f:
        f.write(raw)
    loads_or_fails_clearly(d)


@pytest.mark.parametrize("shape,offsets,message", [
    ([2**28, 2**30], [0, 2**60], "truncated safetensors file"),  # 2**60 bytes claimed, offsets consistent
    ([2**30, 2**30], [0, 256], "declares 256 bytes for shape"),  # offsets small, shape huge
    ([2**62], [0, 256], "declares 256 bytes for shape"),  # size overflows int64 in torch
    ([-1], [0, 256], "not a list of non-negative integers"),
    ([64], [256, 0], "not \\[begin, end\\]"),
])
@pytest.mark.parametrize("sharded", [False, True])
def test_huge_tensor_claim_rejected_before_allocating(shape, offsets, message, sharded, folders, tmp_path, monkeypatch):
    """A header claiming a 2**60-byte tensor is rejected from the header alone: no torch.empty of
    more bytes than the file holds (single files are checked on open, shards on first use)."""
    src = folders["glm-format" if sharded else "tiny-chatglm3"]
    d = str(tmp_path / "m")
    shutil.copytree(src, d)
    with CheckpointReader(d) as r:
        name, file = r.keys()[0], r.file_of(r.keys()[0])
    path = os.path.join(d, file)
    with open(path, "rb") as f:
        header, data = _split(f.read())
    header[name] = {"dtype": "F32", "shape": shape, "data_offsets": offsets}
    with open(path, "wb") as f:
        f.write(_join(header, data))
    size = os.path.getsize(path)

    real_empty, biggest = torch.empty, [0]

    def spy(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.device.type == "cpu":
            biggest[0] = max(biggest[0], t.numel() * t.element_size())
        return t

    monkeypatch.setattr(torch, "empty", spy)
    for load in (read_everything, glm.from_pretrained):
        with pytest.raises(CheckpointError, match=message) as e:
            load(d)
        assert file in str(e.value) and name in str(e.value)
    assert biggest[0] <= size


# ---------------------------------------------------------------------------------------------
# Fuzz: the corpus reader

@settings(max_examples=40, **FUZZ)
@given(data=st.binary(max_size=300), ext=st.sampled_from([".txt", ".jsonl"]), mode=st.sampled_from(["lines", "file"]))
def test_fuzz_corpus_files(data, ext, mode, scratch):
    """Random bytes as a text or JSONL corpus: documents (strings) or a DataError naming the file."""
    d = fresh(scratch, "corpus")
    p = os.path.join(d, "c" + ext)
    with open(p, "wb") as f:
        f.write(data)
    try:
        with time_limit(10):
            docs = read_documents([p], mode=mode)
    except DataError as e:
        assert p in str(e)
    else:
        assert docs and all(isinstance(t, str) and t.strip() for t in docs)


# ---------------------------------------------------------------------------------------------
# Unsupported dtype / device requests

@pytest.mark.parametrize("dtype", ["int8", "float64", "fp8", torch.int8, torch.float64, [1], 5])
def test_unsupported_dtype_is_one_clear_error(dtype, folders):
    with pytest.raises(ValueError, match=r"dtype .* is not supported; use .*float32"):
        glm.from_pretrained(folders["tiny-glm-hf"], dtype=dtype)


@pytest.mark.parametrize("device,message", [
    ("nonsense", "is not a torch device; use 'cpu', 'cuda' or 'cuda:N'"),
    ("cuda:x", "is not a torch device"),
    (3.5, "is not a torch device"),
])
def test_device_that_is_not_a_device(device, message, folders):
    with pytest.raises(ValueError, match=message):
        glm.from_pretrained(folders["tiny-glm-hf"], device=device)


def test_unavailable_device_is_one_clear_error(folders, tmp_path):
    """cuda without CUDA (or a cuda index past the last GPU): a ValueError before any loading or
    writing, not torch's 'Torch not compiled with CUDA enabled' from deep inside."""
    device = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    message = "this machine has" if torch.cuda.is_available() else "CUDA is not available on this machine"
    with pytest.raises(ValueError, match=message):
        glm.from_pretrained(folders["tiny-glm-hf"], device=device)
    with pytest.raises(ValueError, match=message):
        check_device(device)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        train(TrainConfig(out_dir=str(out), device=device, progress=False))
    assert not out.exists()
    assert check_device("cpu") == torch.device("cpu")
    if not torch.backends.mps.is_available():
        with pytest.raises(ValueError, match="'mps' was requested but mps is not available"):
            check_device("mps")


# ---------------------------------------------------------------------------------------------
# Disk full and kill -9 during `glm convert`

@pytest.fixture
def convert_setup(folders, tmp_path):
    """A release-format source, and DST holding a complete previous conversion plus a carried file."""
    src = str(tmp_path / "src")
    shutil.copytree(folders["tiny-glm4-hf"], src)
    parent = tmp_path / "outs"
    parent.mkdir()
    dst = str(parent / "out")
    convert_checkpoint(src, dst, to="glm", shard_size=SHARD)
    with open(os.path.join(dst, "generation_config.json"), "w") as f:  # a file glm writes: --overwrite replaces it
        f.write("previous run")
    return src, dst, snapshot(src), snapshot(dst)


class DiskFull:
    """A writable file that fails with ENOSPC once ``budget[0]`` bytes have been written (shared
    across files), after writing the part that fits, like a filling disk."""

    def __init__(self, f, budget: list[int]):
        self.f, self.budget = f, budget

    def write(self, b) -> int:
        n = memoryview(b).nbytes
        if n > self.budget[0]:
            self.f.write(memoryview(b).cast("B")[: self.budget[0]])
            self.budget[0] = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.budget[0] -= n
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_disk_full_during_convert_keeps_previous_output(convert_setup, monkeypatch):
    src, dst, src_before, dst_before = convert_setup
    budget = [120_000]  # fills up in the third of seven shards, mid-tensor

    def full_open(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        return DiskFull(f, budget) if "w" in mode else f

    monkeypatch.setattr(glm.checkpoint, "open", full_open, raising=False)
    with pytest.raises(OSError) as e:
        convert_checkpoint(src, dst, to="glm", shard_size=SHARD, overwrite=True)
    monkeypatch.undo()
    msg = str(e.value)
    assert e.value.errno == errno.ENOSPC and budget[0] == 0
    assert "No space left on device" in msg and f"writing {dst} failed" in msg and "left as it was" in msg
    assert snapshot(dst) == dst_before and snapshot(src) == src_before
    assert litter(os.path.dirname(dst), "out") == []  # the temp folder is removed
    convert_checkpoint(src, dst, to="glm", shard_size=SHARD, overwrite=True)  # space freed: a rerun works
    assert not os.path.exists(os.path.join(dst, "generation_config.json"))
    glm.from_pretrained(dst)


def test_unwritable_destination_parent_is_one_clear_error(folders, tmp_path, monkeypatch):
    parent = tmp_path / "ro"
    parent.mkdir()
    if os.geteuid() == 0:  # root writes into read-only folders: refuse the temp folder instead
        import tempfile

        def denied(*args, **kwargs):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(parent))

        monkeypatch.setattr(tempfile, "mkdtemp", denied)
    parent.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match=r"Permission denied: writing .*ro/out failed; check that .*ro is "
                                                  r"writable"):
            convert_checkpoint(folders["tiny-glm-hf"], parent / "out", to="glm")
    finally:
        parent.chmod(0o700)
    assert os.listdir(parent) == []


PAUSE_IN_SHARD = """
import sys, time
import glm.checkpoint as C
real, calls = C._write_safetensors_stream, []

def paused(path, entries, tensors, on_tensor=None):
    calls.append(path)
    if len(calls) == 3:  # two shards written; the third half-written when the kill comes
        with open(path, "wb") as f:
            f.write(b"partial shard")
            f.flush()
        open({marker!r}, "w").close()
        time.sleep(300)
    return real(path, entries, tensors, on_tensor)

C._write_safetensors_stream = paused
from glm.cli import main
sys.exit(main(["convert", {src!r}, {dst!r}, "--to", "glm", "--shard-size", "{shard}", "--overwrite", "--quiet"]))
"""


def test_kill9_during_convert_keeps_previous_output(convert_setup, tmp_path):
    src, dst, src_before, dst_before = convert_setup
    marker = str(tmp_path / "paused")
    run_until(PAUSE_IN_SHARD.format(marker=marker, src=src, dst=dst, shard=SHARD), marker)
    assert snapshot(dst) == dst_before, "DST changed although the conversion never finished"
    assert snapshot(src) == src_before
    # A SIGKILL cannot clean up: the half-written temp folder stays beside DST, by design under a
    # name no loader reads (docs/reliability.md). Nothing at DST refers to it.
    left = litter(os.path.dirname(dst), "out")
    assert len(left) == 1 and left[0].startswith("out.tmp-")
    glm.from_pretrained(dst)  # the previous version still loads
    convert_checkpoint(src, dst, to="glm", shard_size=SHARD, overwrite=True)  # a rerun succeeds
    ref, got = glm.from_pretrained(src).state_dict(), glm.from_pretrained(dst).state_dict()
    assert all(torch.equal(ref[k], got[k]) for k in ref)


PAUSE_BETWEEN_RENAMES = """
import os, sys, time
real, calls = os.rename, []

def paused(a, b):
    calls.append((a, b))
    if len(calls) == 2:  # 1: old DST -> DST.old-*/x done; 2: DST.tmp-* -> DST not yet
        open({marker!r}, "w").close()
        time.sleep(300)
    return real(a, b)

os.rename = paused
from glm.cli import main
sys.exit(main(["convert", {src!r}, {dst!r}, "--to", "glm", "--shard-size", "{shard}", "--overwrite", "--quiet"]))
"""


def test_kill9_between_the_two_renames_loses_nothing(convert_setup, tmp_path):
    """The one instant where DST is absent: the previous output sits complete in DST.old-*/x and
    the new one complete in DST.tmp-*; moving either into place recovers (or rerun)."""
    src, dst, src_before, dst_before = convert_setup
    marker = str(tmp_path / "paused")
    run_until(PAUSE_BETWEEN_RENAMES.format(marker=marker, src=src, dst=dst, shard=SHARD), marker)
    parent = os.path.dirname(dst)
    assert not os.path.exists(dst)
    old = [n for n in litter(parent, "out") if n.startswith("out.old-")]
    new = [n for n in litter(parent, "out") if n.startswith("out.tmp-")]
    assert len(old) == 1 and len(new) == 1
    assert snapshot(os.path.join(parent, old[0], "x")) == dst_before
    ref, got = glm.from_pretrained(src).state_dict(), glm.from_pretrained(os.path.join(parent, new[0])).state_dict()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert snapshot(src) == src_before
    os.rename(os.path.join(parent, old[0], "x"), dst)  # the documented recovery
    assert snapshot(dst) == dst_before


# ---------------------------------------------------------------------------------------------
# Trainer: disk full, kill -9 during a checkpoint, corrupt / foreign checkpoints

TINY = dict(model="tiny-glm", vocab_size=500, batch_size=4, seq_len=64, corpus_size="tiny", eval_every=0,
            eval_examples=0, progress=False, lr=3e-3, warmup=1, steps=6, ckpt_every=2, keep_last=3, device="cpu")


def losses(out_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def same_final_weights(a: str, b: str) -> bool:
    fa = torch.load(checkpoints(a)[-1], weights_only=False)["model"]
    fb = torch.load(checkpoints(b)[-1], weights_only=False)["model"]
    return sorted(fa) == sorted(fb) and all(torch.equal(fa[k], fb[k]) for k in fa)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """An uninterrupted 6-step run with checkpoints at 2, 4, 6 (and its tokenizer, reused below)."""
    out = str(tmp_path_factory.mktemp("full"))
    train(TrainConfig(out_dir=out, **TINY))
    return out


def copy_run(full: str, dst) -> str:
    """The full run's checkpoints and metrics (no final model) in a new folder."""
    dst = str(dst)
    os.makedirs(dst)
    for name in os.listdir(full):
        if name.startswith("ckpt-") or name == "metrics.jsonl":
            shutil.copy(os.path.join(full, name), dst)
    return dst


def test_disk_full_during_trainer_checkpoint(full_run, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    tok = os.path.join(full_run, "tokenizer")
    real = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 4:
            f.write(b"\0" * 1000)  # part of it fits
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError) as e:
        train(TrainConfig(out_dir=out, tokenizer=tok, **TINY))
    monkeypatch.undo()
    msg = str(e.value)
    assert e.value.errno == errno.ENOSPC and "No space left on device" in msg
    assert os.path.join(out, "ckpt-0000004.pt") in msg and "--resume" in msg and "intact" in msg
    assert sorted(os.listdir(out)) == ["ckpt-0000002.pt", "metrics.jsonl"]  # no temp file, no half checkpoint
    assert torch.load(os.path.join(out, "ckpt-0000002.pt"), weights_only=False)["step"] == 2
    train(TrainConfig(out_dir=out, tokenizer=tok, resume=True, **TINY))  # space freed: resume
    assert losses(out) == losses(full_run) and same_final_weights(out, full_run)


PAUSE_IN_CHECKPOINT = """
import json, os, sys, time, torch
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))  # as tests/conftest.py: same arithmetic
from glm.train import TrainConfig, train
real = torch.save

def paused(obj, f, *args, **kwargs):
    if isinstance(obj, dict) and obj.get("step") == 4:
        f.write(b"half a checkpoint" * 1000)
        f.flush()
        open({marker!r}, "w").close()
        time.sleep(300)
    return real(obj, f, *args, **kwargs)

torch.save = paused
train(TrainConfig(**json.loads({cfg!r})))
"""


def test_kill9_during_trainer_checkpoint_then_resume_is_bit_identical(full_run, tmp_path):
    out = str(tmp_path / "run")
    tok = os.path.join(full_run, "tokenizer")
    marker = str(tmp_path / "paused")
    cfg = json.dumps(dict(out_dir=out, tokenizer=tok, **TINY))
    run_until(PAUSE_IN_CHECKPOINT.format(marker=marker, cfg=cfg), marker)
    names = sorted(os.listdir(out))
    assert [os.path.basename(p) for p in checkpoints(out)] == ["ckpt-0000002.pt"]  # no half ckpt-0000004.pt
    stale = [n for n in names if n.startswith("ckpt-0000004.pt.tmp-")]
    assert len(stale) == 1, names  # the killed write's temp file, under a name resume never reads
    assert torch.load(checkpoints(out)[-1], weights_only=False)["step"] == 2
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"step": 5, "loss": 4.2')  # a metrics line torn by a kill (no newline)

    train(TrainConfig(out_dir=out, tokenizer=tok, resume=True, **TINY))
    assert not any(".tmp-" in n for n in os.listdir(out))  # resume removed the stale temp file
    a, b = losses(full_run), losses(out)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert a == b, [(s, a[s], b[s]) for s in a if a[s] != b[s]]  # bit-identical, not approximately
    assert same_final_weights(out, full_run)


def test_resume_from_a_corrupt_checkpoint(full_run, tmp_path):
    out = copy_run(full_run, tmp_path / "run")
    tok = os.path.join(full_run, "tokenizer")
    last = os.path.join(out, "ckpt-0000006.pt")
    with open(last, "r+b") as f:  # damaged outside glm (a copy cut short, a bad disk)
        f.truncate(os.path.getsize(last) // 2)
    with pytest.raises(TrainingError, match=r"ckpt-0000006\.pt: cannot read this checkpoint .* delete it to resume"):
        train(TrainConfig(out_dir=out, tokenizer=tok, resume=True, **TINY))
    os.remove(last)  # the fix the message gives
    train(TrainConfig(out_dir=out, tokenizer=tok, resume=True, **TINY))
    assert losses(out) == losses(full_run) and same_final_weights(out, full_run)


def test_resume_with_other_model_settings(full_run, tmp_path):
    out = copy_run(full_run, tmp_path / "run")
    tok = os.path.join(full_run, "tokenizer")
    before = snapshot(out)
    with pytest.raises(TrainingError, match=r"ckpt-0000006\.pt: this checkpoint was written for another model"):
        train(TrainConfig(out_dir=out, tokenizer=tok, resume=True, model_overrides={"num_layers": 1}, **TINY))
    assert snapshot(out) == before
