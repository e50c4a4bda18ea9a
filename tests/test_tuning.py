"""`auto` attention by shape: the machine-local calibration cache (glm.tuning) and the choice it drives.

conftest points the cache at a temporary folder and turns measuring off for the rest of the suite; each
test here starts from an empty cache and an empty in-process memory, and turns measuring on where it
tests it. No test asserts a timing: measurements are replaced by injected tables or fake measures,
and the one real measurement is only checked for its form."""
from __future__ import annotations

import importlib
import json
import os

import pytest
import torch

import glm
from glm import kernels, tuning
from glm.attention import auto_backend, calibration_key

# The module (the package exports the function glm.attention under the same name).
attention_module = importlib.import_module("glm.attention")

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="the C++ kernels are not built")


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("GLM_TUNING", "on")
    tuning.forget()
    tuning.set_enabled(None)
    yield tmp_path / "cache"
    tuning.forget()
    tuning.set_enabled(None)


def qkv(B=2, n=4, g=4, T=24, d=16, grad=False):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, n, T, d, generator=gen).requires_grad_(grad)
    k = torch.randn(B, g, T, d, generator=gen).requires_grad_(grad)
    v = torch.randn(B, g, T, d, generator=gen).requires_grad_(grad)
    return q, k, v


def test_choose_measures_once_then_remembers_and_caches(fresh_cache):
    calls = []

    def measure():
        calls.append(1)
        return {"fused": 2.0, "sdpa": 1.0}

    assert tuning.choose("k1", measure) == "sdpa"
    assert tuning.choose("k1", measure) == "sdpa"
    assert len(calls) == 1
    record = json.loads((fresh_cache / tuning.FILE_NAME).read_text())
    assert record["machine"] == tuning.machine()
    assert record["entries"]["k1"]["choice"] == "sdpa"
    assert record["entries"]["k1"]["seconds"] == {"fused": 2.0, "sdpa": 1.0}
    # A new process (simulated: the memory forgotten) reads the cache instead of measuring.
    tuning.forget()
    assert tuning.choose("k1", lambda: pytest.fail("measured again despite the cache")) == "sdpa"


def test_a_choice_never_changes_within_a_process(fresh_cache):
    assert tuning.choose("k", lambda: {"fused": 1.0, "sdpa": 2.0}) == "fused"
    # Another process rewrites the cache with the opposite finding: this process keeps its choice.
    path = fresh_cache / tuning.FILE_NAME
    record = json.loads(path.read_text())
    record["entries"]["k"]["choice"] = "sdpa"
    path.write_text(json.dumps(record))
    assert tuning.choose("k", lambda: pytest.fail("measured")) == "fused"
    assert tuning.lookup("k") == "fused"


@pytest.mark.parametrize("content", [b"{not json", b"\x00\xff garbage", b"[]", b'{"format": 1}',
                                     b'{"format": 1, "machine": {}, "entries": {"k": {"choice": "sdpa"}}}',
                                     b'{"format": 99, "machine": null, "entries": {}}'])
def test_corrupt_or_foreign_cache_is_ignored_and_rewritten(fresh_cache, content):
    fresh_cache.mkdir(parents=True)
    path = fresh_cache / tuning.FILE_NAME
    path.write_bytes(content)
    assert tuning.lookup("k") is None  # nothing trusted from it, and no error
    assert tuning.choose("k", lambda: {"fused": 1.0, "sdpa": 3.0}) == "fused"
    record = json.loads(path.read_text())
    assert record["machine"] == tuning.machine() and set(record["entries"]) == {"k"}


def test_cache_from_another_build_is_ignored(fresh_cache):
    tuning.choose("k", lambda: {"fused": 1.0, "sdpa": 3.0})
    tuning.forget()
    saved = dict(tuning._builds)
    try:
        tuning.register_build("glm.kernels._C", "rebuilt")
        assert tuning.lookup("k") is None
    finally:
        tuning._builds.clear()
        tuning._builds.update(saved)
        tuning.forget()
    assert tuning.lookup("k") == "fused"  # the original build's entry is still there


def test_measuring_off_means_no_measurement_and_no_file(fresh_cache, monkeypatch):
    monkeypatch.setenv("GLM_TUNING", "off")
    assert not tuning.enabled()
    assert tuning.choose("k", lambda: pytest.fail("measured while off")) is None
    assert not (fresh_cache / tuning.FILE_NAME).exists()
    tuning.set_enabled(True)  # the API wins over the environment
    assert tuning.choose("k", lambda: {"fused": 1.0, "sdpa": 3.0}) == "fused"


def test_failed_measurement_falls_back_and_is_not_retried(fresh_cache):
    calls = []

    def broken():
        calls.append(1)
        raise RuntimeError("cannot run this shape")

    assert tuning.choose("k", broken) is None
    assert tuning.choose("k", broken) is None
    assert len(calls) == 1
    assert not (fresh_cache / tuning.FILE_NAME).exists()


def test_unwritable_cache_folder_is_not_an_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("GLM_CACHE_DIR", str(blocker / "glm"))
    tuning.forget()
    assert tuning.choose("k", lambda: {"fused": 1.0, "sdpa": 3.0}) == "fused"
    assert tuning.lookup("k") == "fused"


def test_cache_dir_default_and_override(monkeypatch, tmp_path):
    monkeypatch.delenv("GLM_CACHE_DIR")
    assert tuning.cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "glm")
    monkeypatch.setenv("GLM_CACHE_DIR", str(tmp_path))
    assert tuning.cache_path() == os.path.join(str(tmp_path), tuning.FILE_NAME)


# ------------------------------------------------------------------------------------------------
# auto_backend


@needs_kernels
@pytest.mark.parametrize("winner", ["sdpa", "fused"])
def test_auto_follows_the_injected_table(winner, monkeypatch):
    q, k, v = qkv(grad=True)
    monkeypatch.setattr(attention_module, "_measure", lambda *a, **kw: pytest.fail("measured despite the table"))
    for train in (True, False):
        key = calibration_key(q, k, causal=True, train=train)
        tuning.inject({key: winner})
    assert auto_backend(q, k, v, causal=True) == winner
    with torch.no_grad():
        assert auto_backend(q, k, v, causal=True) == winner
    # The attention call runs the backend the table names.
    ran = []
    spy = lambda *a, **kw: ran.append(winner) or attention_module.reference_attention(*a, **kw)  # noqa: E731
    monkeypatch.setitem(attention_module.BACKENDS, winner, spy)
    attention_module.attention(q, k, v, causal=True)
    assert ran == [winner]


@needs_kernels
def test_buckets_separate_what_differs():
    q, k, _ = qkv(T=24)
    q64, k64, _ = qkv(T=64)
    q33, k33, _ = qkv(T=33)
    keys = {calibration_key(q, k, causal=True, train=False), calibration_key(q, k, causal=True, train=True),
            calibration_key(q64, k64, causal=True, train=False),
            calibration_key(q, k, causal=True, prefix_len=torch.tensor([3, 4]), train=False),
            calibration_key(q.double(), k.double(), causal=True, train=False)}
    assert len(keys) == 5
    # Lengths round up to a power of two (decode lengths up to 16 are their own bucket).
    assert calibration_key(q33, k33, causal=True, train=False) == calibration_key(q64, k64, causal=True, train=False)
    one, _, _ = qkv(T=1)
    two, _, _ = qkv(T=2)
    assert calibration_key(one, k, causal=True, train=False) != calibration_key(two, k, causal=True, train=False)


@needs_kernels
def test_auto_measures_a_new_bucket_once(fresh_cache, monkeypatch):
    q, k, v = qkv(T=40)
    calls = []

    def fake_measure(*args, **kwargs):
        calls.append(kwargs)
        return {"fused": 5.0, "sdpa": 1.0}

    monkeypatch.setattr(attention_module, "_measure", fake_measure)
    assert auto_backend(q, k, v, causal=True) == "sdpa"
    assert auto_backend(q, k, v, causal=True) == "sdpa"
    assert len(calls) == 1 and calls[0]["train"] is False and calls[0]["kind"] == "causal"


@needs_kernels
def test_auto_uses_the_static_rule_when_measuring_is_off(monkeypatch):
    monkeypatch.setenv("GLM_TUNING", "off")
    monkeypatch.setattr(attention_module, "_measure", lambda *a, **kw: pytest.fail("measured while off"))
    q, k, v = qkv()
    assert auto_backend(q, k, v, causal=True) == "fused"


def test_auto_never_picks_a_backend_that_cannot_take_the_tensors(monkeypatch):
    monkeypatch.setattr(attention_module, "_measure", lambda *a, **kw: pytest.fail("measured"))
    q, k, v = qkv()
    # float64 is outside the fused kernels' dtypes: sdpa whatever a table says.
    tuning.inject({calibration_key(q.double(), k.double(), causal=True, train=False): "fused"})
    assert auto_backend(q.double(), k.double(), v.double(), causal=True) == "sdpa"


@needs_kernels
def test_real_measurement_records_both_backends(fresh_cache):
    """One real calibration of a small bucket: an entry with both timings and the faster one chosen (its
    value is the machine's business, not the test's)."""
    q, k, v = qkv(B=1, T=16, grad=True)
    choice = auto_backend(q, k, v, causal=True, prefix_len=torch.tensor([5]))
    assert choice in ("fused", "sdpa")
    entry = json.loads((fresh_cache / tuning.FILE_NAME).read_text())["entries"]
    key = calibration_key(q, k, causal=True, prefix_len=torch.tensor([5]), train=True)
    assert entry[key]["choice"] == choice == min(entry[key]["seconds"], key=entry[key]["seconds"].get)
    assert set(entry[key]["seconds"]) == {"fused", "sdpa"}


@needs_kernels
def test_model_forward_uses_the_calibrated_choice(monkeypatch):
    """A model's default backend ('auto') runs what the table says for its shape."""
    model = glm.GLM(glm.preset("tiny-glm4-chatglm"))
    ids = torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(0))
    ran = []
    for name in ("fused", "sdpa"):
        fn = attention_module.BACKENDS[name]
        monkeypatch.setitem(attention_module.BACKENDS, name,
                            lambda *a, _n=name, _fn=fn, **kw: ran.append(_n) or _fn(*a, **kw))
    monkeypatch.setattr(attention_module, "_measure", lambda *a, **kw: {"fused": 9.0, "sdpa": 1.0})
    with torch.no_grad():
        model(ids)
    assert set(ran) == {"sdpa"}


@needs_kernels
def test_a_bucket_too_big_to_time_quickly_keeps_the_static_rule(fresh_cache):
    # One row of one KV head at T = 4096 is far over the calibration budget: nothing is timed.
    q, k, v = qkv(B=1, n=1, g=1, T=4096, d=64)
    assert attention_module._measure(q, k, causal=True, kind="causal", train=False) == {}
    assert auto_backend(q, k, v, causal=True) == "fused"
    assert not (fresh_cache / tuning.FILE_NAME).exists()
