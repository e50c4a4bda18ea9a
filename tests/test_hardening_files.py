"""Checkpoint files glm reads and writes: safetensors headers checked exactly as the safetensors library
checks them, no hang on FIFOs or devices, --overwrite that replaces only glm's own output, SIGTERM and
stale temp folders, permissions from the umask, per-file checksums, and bad --shard-size values.

Everything builds its own tiny checkpoints (no ../shared/reference needed)."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import stat
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
from glm.checkpoint import CHECKSUMS_NAME, CheckpointError, CheckpointReader, _read_safetensors_header
from glm.cli import main
from glm.files import atomic_write
from glm.hub import convert_checkpoint, save_pretrained

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARD = "50KB"


# ---------------------------------------------------------------------------------------------
# Helpers and fixtures



def tiny_model(preset: str = "tiny-glm4-hf", seed: int = 0) -> glm.GLM:
    model = glm.GLM(glm.preset(preset))
    model.init_weights(std=0.5, seed=seed)
    return model.eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """'hf': a release-format folder glm wrote (one file); 'glm': glm's format in shards; 'release': the
    hf folder without glm's record, as a download would be."""
    root = tmp_path_factory.mktemp("files")
    out = {"hf": str(root / "hf"), "glm": str(root / "glm"), "release": str(root / "release")}
    model = tiny_model()
    save_pretrained(model, out["hf"], format="hf")
    save_pretrained(model, out["glm"], format="glm", shard_size=SHARD)
    shutil.copytree(out["hf"], out["release"], ignore=shutil.ignore_patterns(CHECKSUMS_NAME))
    return out


def copy(src: str, tmp_path, name: str = "src") -> str:
    dst = str(tmp_path / name)
    shutil.copytree(src, dst)
    return dst


def litter(parent, name: str) -> list[str]:
    return sorted(n for n in os.listdir(parent) if n.startswith(name + ".tmp-") or n.startswith(name + ".old-"))


def split(raw: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join(header_text: bytes, data: bytes) -> bytes:
    header_text += b" " * (-len(header_text) % 8)
    return len(header_text).to_bytes(8, "little") + header_text + data


# ---------------------------------------------------------------------------------------------
# Safetensors headers: overlapping tensors, and parity with the library

def test_overlapping_tensors_are_refused(folders, tmp_path):
    """Two tensors sharing one byte range (the file otherwise exactly covered): safetensors refuses it;
    glm used to load both, the second with the first's weights, and convert wrote them back out."""
    d = copy(folders["release"], tmp_path)
    path = os.path.join(d, "model.safetensors")
    with open(path, "rb") as f:
        header, data = split(f.read())
    a, b = "model.layers.0.input_layernorm.weight", "model.layers.1.input_layernorm.weight"
    (b0, b1), size = header[b]["data_offsets"], header[b]["data_offsets"][1] - header[b]["data_offsets"][0]
    data = data[:b0] + data[b1:]  # drop b's bytes, close the gap, point b at a's bytes
    for name, info in header.items():
        if name != "__metadata__" and info["data_offsets"][0] >= b1:
            info["data_offsets"] = [o - size for o in info["data_offsets"]]
    header[b]["data_offsets"] = list(header[a]["data_offsets"])
    with open(path, "wb") as f:
        f.write(join(json.dumps(header).encode(), data))
    from safetensors import SafetensorError, safe_open
    with pytest.raises(SafetensorError):
        safe_open(path, framework="pt")

    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors header: tensor .* overlap"):
        glm.from_pretrained(d)
    dst = tmp_path / "out"
    with pytest.raises(CheckpointError, match="overlap"):
        convert_checkpoint(d, dst, to="glm")
    assert not dst.exists() and litter(tmp_path, "out") == []


class Raw(str):
    """A JSON token written as is (-0, 1e999, NaN, a lone surrogate escape)."""


def dump(v) -> str:
    """JSON text of ``v``, where a list of 2-tuples is an object (keys may repeat) and Raw is verbatim."""
    if isinstance(v, Raw):
        return str(v)
    if isinstance(v, list) and v and all(isinstance(p, tuple) for p in v):
        return "{" + ",".join(json.dumps(k) + ":" + dump(x) for k, x in v) + "}"
    if isinstance(v, list):
        return "[" + ",".join(dump(x) for x in v) + "]"
    return json.dumps(v)


LIB_DTYPES = ["BOOL", "F4", "F6_E2M3", "U8", "I8", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16", "BF16", "I32", "F32",
              "C64", "F64", "I64", "U64"]
JUNK = st.sampled_from([Raw("-0"), Raw("1e999"), Raw("NaN"), Raw("2.0"), Raw("1" + "0" * 25), Raw('"\\ud800"'),
                        -1, 0, 1, 2, 3, 4, 8, 12, 16, 2**63, 2**64 - 1, 2**64, None, True, "F32", "x", [], [0],
                        [0, 8], [2, 2], [[1]], [("k", 1)], [("F32", None)]])
BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
        "F16": 16, "BF16": 16, "I32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64}


@st.composite
def headers(draw):
    """A valid three-tensor safetensors file, then 1-3 random edits of its header or data section."""
    tensors = []
    offset = 0
    for i in range(3):
        dtype = draw(st.sampled_from(LIB_DTYPES))
        unit = 8 // math.gcd(8, BITS[dtype])  # elements per whole number of bytes (F4: 2, F6: 4)
        shape = draw(st.lists(st.integers(0, 4), max_size=2)) + [unit]
        count = math.prod(shape)
        nbytes = count * BITS[dtype] // 8
        tensors.append([f"t{i}", [("dtype", dtype), ("shape", shape), ("data_offsets", [offset, offset + nbytes])]])
        offset += nbytes
    meta = [("format", "pt")]
    data_len = offset
    pad_junk = b""
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["field", "offset", "swap", "shape", "dtype", "drop", "extra", "list-form",
                                    "dtype-map", "dup-field", "dup-name", "meta", "data", "header-tail", "depth"]))
        t = draw(st.sampled_from(tensors))
        fields = t[1] if isinstance(t[1], list) and t[1] and isinstance(t[1][0], tuple) else None
        if how == "field" and fields:
            i = draw(st.integers(0, len(fields) - 1))
            fields[i] = (fields[i][0], draw(JUNK))
        elif how == "offset" and fields:
            for i, (k, v) in enumerate(fields):
                if k == "data_offsets" and isinstance(v, list) and len(v) == 2 and all(isinstance(o, int) for o in v):
                    j = draw(st.integers(0, 1))
                    v = list(v)
                    v[j] = max(0, v[j] + draw(st.integers(-9, 9)))
                    fields[i] = (k, v)
        elif how == "swap":
            u = draw(st.sampled_from(tensors))
            if fields and isinstance(u[1], list) and u[1] and isinstance(u[1][0], tuple):
                a = dict(fields).get("data_offsets")
                b = dict(u[1]).get("data_offsets")
                t[1] = [(k, b if k == "data_offsets" else v) for k, v in fields]
                u[1] = [(k, a if k == "data_offsets" else v) for k, v in u[1]]
        elif how == "shape" and fields:
            t[1] = [(k, draw(st.lists(st.integers(0, 2**64 + 1), max_size=3)) if k == "shape" else v)
                    for k, v in fields]
        elif how == "dtype" and fields:
            t[1] = [(k, draw(st.sampled_from(LIB_DTYPES + ["F6_E3M2", "F8_E5M2FNUZ", "C128", "f32", "Q4"]))
                     if k == "dtype" else v) for k, v in fields]
        elif how == "drop" and fields:
            del fields[draw(st.integers(0, len(fields) - 1))]
        elif how == "extra" and fields:
            fields.insert(draw(st.integers(0, len(fields))), ("x", draw(JUNK)))
        elif how == "list-form" and fields:
            t[1] = [v for _, v in fields][: draw(st.integers(2, 4))]
        elif how == "dtype-map" and fields:
            t[1] = [(k, [(v, None)] if k == "dtype" and isinstance(v, str) else v) for k, v in fields]
        elif how == "dup-field" and fields:
            fields.append(draw(st.sampled_from(fields)))
        elif how == "dup-name":
            empty = [("dtype", "F32"), ("shape", [0]), ("data_offsets", [0, 0])]
            tensors.append([t[0], draw(st.sampled_from([t[1], empty]))])
        elif how == "meta":
            meta = draw(st.sampled_from([None, [], [("a", 1)], [("a", "b"), ("a", "c")], "x", [[1]], Raw("null")]))
        elif how == "data":
            data_len = max(0, data_len + draw(st.integers(-8, 8)))
        elif how == "header-tail":
            pad_junk = draw(st.sampled_from([b" ", b"\n\t", b"x", b"\0", b"}"]))
        elif how == "depth" and fields:
            depth = draw(st.integers(120, 130))
            fields.append(("deep", Raw("[" * depth + "]" * depth)))
    pairs = (([] if meta is None else [("__metadata__", meta if meta != [] else Raw("{}"))])
             + [(n, v) for n, v in tensors])
    text = dump(pairs).encode() + pad_junk
    return join(text, bytes(range(256)) * (data_len // 256) + bytes(data_len % 256))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(raw=headers())
def test_header_refused_iff_safetensors_refuses(raw, tmp_path):
    from safetensors import safe_open

    path = str(tmp_path / "m.safetensors")
    with open(path, "wb") as f:
        f.write(raw)
    try:
        with safe_open(path, framework="pt") as f:
            for k in f.keys():
                f.get_slice(k)
        library = None
    except Exception as e:  # SafetensorError
        library = str(e)
    try:
        _read_safetensors_header(path)
        ours = None
    except CheckpointError as e:
        ours = str(e)
    assert (library is None) == (ours is None), f"safetensors: {library}; glm: {ours}; header: {raw[8:300]!r}"


# ---------------------------------------------------------------------------------------------
# FIFOs and devices in a checkpoint folder: refused, never a hang

@pytest.mark.parametrize("target,where", [
    ("model.safetensors", "hf"), ("model.safetensors.index.json", "glm"), ("model-00002-of-00008.safetensors", "glm"),
    ("pytorch_model.bin", "release"), ("tokenizer.model", "hf"), (CHECKSUMS_NAME, "glm"),
])
@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_special_files_are_refused_without_hanging(target, where, kind, folders, tmp_path):
    d = copy(folders[where], tmp_path)
    path = os.path.join(d, target)
    if target == "pytorch_model.bin":
        os.remove(os.path.join(d, "model.safetensors"))
    if os.path.exists(path):
        os.remove(path)
    if kind == "fifo":
        os.mkfifo(path)
    else:
        os.symlink("/dev/zero", path)
    what = r"a FIFO \(named pipe\)" if kind == "fifo" else "a character device"
    dst = tmp_path / "out"
    with time_limit(20):
        if target != "tokenizer.model":  # from_pretrained does not read the tokenizer
            with pytest.raises(CheckpointError, match=f"{target}: is {what}, not a regular file"):
                glm.from_pretrained(d)
        with pytest.raises(CheckpointError, match=f"{target}: is {what}, not a regular file"):
            convert_checkpoint(d, dst, to="glm")
    assert not dst.exists() and litter(tmp_path, "out") == []


# ---------------------------------------------------------------------------------------------
# --overwrite replaces only what glm wrote

def test_overwrite_refuses_a_folder_glm_did_not_write(folders, tmp_path, capsys):
    dst = copy(folders["release"], tmp_path, "theirs")  # someone's model: config.json + weights, no record
    with open(os.path.join(dst, "README.md"), "w") as f:
        f.write("my notes")
    before = snapshot(dst)
    rc = main(["convert", folders["hf"], dst, "--overwrite", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "was not written by glm" in err
    with pytest.raises(FileExistsError, match="not written by glm"):
        save_pretrained(tiny_model(), dst, overwrite=True)
    assert snapshot(dst) == before and litter(tmp_path, "theirs") == []


def test_overwrite_refuses_glm_output_holding_other_files(folders, tmp_path):
    dst = copy(folders["glm"], tmp_path, "ours")
    with open(os.path.join(dst, "README.md"), "w") as f:
        f.write("results of the eval")
    os.mkdir(os.path.join(dst, "eval"))
    before = snapshot(dst)
    with pytest.raises(FileExistsError, match=r"holds 2 file\(s\) glm did not write: README.md, eval/"):
        convert_checkpoint(folders["hf"], dst, to="glm", overwrite=True)
    with pytest.raises(FileExistsError, match="README.md"):
        save_pretrained(tiny_model(), dst, overwrite=True)
    assert snapshot(dst) == before and litter(tmp_path, "ours") == []
    # Only glm's own files (weights, index, config, record, tokenizer files): replaced.
    os.remove(os.path.join(dst, "README.md"))
    os.rmdir(os.path.join(dst, "eval"))
    with open(os.path.join(dst, "tokenizer_config.json"), "w") as f:
        f.write("{}")
    save_pretrained(tiny_model(seed=1), dst, overwrite=True)
    assert sorted(os.listdir(dst)) == ["config.json", CHECKSUMS_NAME, "model.safetensors"]


def test_empty_folder_and_missing_parents_are_fine_but_a_file_is_not(folders, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    convert_checkpoint(folders["hf"], empty, to="glm")  # no --overwrite needed
    assert glm.from_pretrained(empty) is not None
    assert main(["convert", folders["hf"], str(tmp_path / "a" / "b" / "out"), "--quiet"]) == 0
    assert os.path.isfile(tmp_path / "a" / "b" / "out" / "model.safetensors")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        convert_checkpoint(folders["hf"], tmp_path / "file", to="glm", overwrite=True)
    assert (tmp_path / "file").read_text() == "x"


# ---------------------------------------------------------------------------------------------
# SIGTERM during a conversion, and temp folders left by killed writers

PAUSE_IN_SHARD = """
import sys, time
import glm.checkpoint as C
real, calls = C._write_safetensors_stream, []

def paused(path, entries, tensors, on_tensor=None):
    calls.append(path)
    if len(calls) == 3:  # two shards written, the third under way
        with open(path, "wb") as f:
            f.write(b"partial shard")
        open({marker!r}, "w").close()
        time.sleep(300)
    return real(path, entries, tensors, on_tensor)

C._write_safetensors_stream = paused
from glm.cli import main
sys.exit(main(["convert", {src!r}, {dst!r}, "--shard-size", "{shard}", "--overwrite", "--quiet"]))
"""


def run_and_signal(code: str, marker: str, sig: int) -> tuple[int, str]:
    """Run ``python -c code``; once it creates ``marker`` (paused mid-write), send ``sig``; its (rc, stderr)."""
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        start = time.monotonic()
        while not os.path.exists(marker):
            if proc.poll() is not None:
                pytest.fail(f"the child exited ({proc.returncode}) early:\n{proc.stderr.read().decode()[-3000:]}")
            if time.monotonic() - start > 120:
                pytest.fail("the child did not reach the write within 120 s")
            time.sleep(0.02)
        os.kill(proc.pid, sig)
        _, err = proc.communicate(timeout=60)
        return proc.returncode, err.decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _previous(folders, tmp_path) -> tuple[str, str, dict]:
    parent = tmp_path / "outs"
    parent.mkdir()
    dst = str(parent / "out")
    convert_checkpoint(folders["hf"], dst, to="glm", shard_size=SHARD)
    with open(os.path.join(dst, "generation_config.json"), "w") as f:
        f.write("previous run")
    return str(parent), dst, snapshot(dst)


def test_sigterm_mid_conversion_cleans_up(folders, tmp_path):
    parent, dst, before = _previous(folders, tmp_path)
    marker = str(tmp_path / "paused")
    code = PAUSE_IN_SHARD.format(marker=marker, src=folders["hf"], dst=dst, shard=SHARD)
    rc, err = run_and_signal(code, marker, signal.SIGTERM)
    assert rc == 143 and "glm convert: terminated" in err and "Traceback" not in err
    assert snapshot(dst) == before
    assert litter(parent, "out") == []


def test_a_later_run_clears_temp_folders_of_dead_writers(folders, tmp_path):
    parent, dst, before = _previous(folders, tmp_path)
    tag = glm.checkpoint._HOST_TAG
    stale = f"out.tmp-{_dead_pid()}-{tag}-k9"  # what a kill -9 mid-write leaves (the kill itself: test_reliability)
    os.makedirs(os.path.join(parent, stale))
    for name in ("model-00001-of-00008.safetensors", "model-00002-of-00008.safetensors", "config.json.tmp-x1"):
        with open(os.path.join(parent, stale, name), "wb") as f:
            f.write(b"partial")
    keep = [f"out.tmp-{os.getpid()}-{tag}-alive",  # a writer still running (this process)
            "out.tmp-abc123",  # no pid in the name: cannot tell whether its writer is gone
            f"out.tmp-{_dead_pid()}-{tag}-foreign",  # holds a file glm does not write
            f"out.tmp-{_dead_pid()}-0000beef-host"]  # written from another machine (a shared disk)
    for name in keep:
        os.makedirs(os.path.join(parent, name))
    with open(os.path.join(parent, keep[2], "notes.txt"), "w") as f:
        f.write("not glm's")
    convert_checkpoint(folders["hf"], dst, to="glm", shard_size=SHARD, overwrite=True)
    assert litter(parent, "out") == sorted(keep)
    assert not os.path.exists(os.path.join(dst, "generation_config.json"))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_later_run_restores_a_previous_version_stranded_between_renames(folders, tmp_path):
    parent, dst, before = _previous(folders, tmp_path)
    old = os.path.join(parent, f"out.old-{_dead_pid()}-{glm.checkpoint._HOST_TAG}-x1")
    os.makedirs(old)
    os.rename(dst, os.path.join(old, "x"))  # a kill -9 between the two final renames
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_checkpoint(folders["hf"], dst, to="glm")
    assert snapshot(dst) == before and litter(parent, "out") == []


# ---------------------------------------------------------------------------------------------
# Permissions follow the umask

@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_get_the_umask_permissions(umask, folders, tmp_path):
    old = os.umask(umask)
    try:
        dst = tmp_path / "out"
        convert_checkpoint(folders["hf"], dst, to="glm", shard_size=SHARD)
        new = tmp_path / "new.txt"
        atomic_write(str(new), b"x")
        kept = tmp_path / "kept.txt"
        kept.write_text("x")
        kept.chmod(0o600)
        atomic_write(str(kept), b"y")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(dst) == 0o777 & ~umask
    assert {n: mode(dst / n) for n in os.listdir(dst)} == {n: 0o666 & ~umask for n in os.listdir(dst)}
    assert mode(new) == 0o666 & ~umask and mode(kept) == 0o600  # a replaced file keeps its mode


# ---------------------------------------------------------------------------------------------
# Checksums of the weight files glm wrote

@pytest.mark.parametrize("where,file", [("glm", "model-00003-of-00008.safetensors"), ("hf", "model.safetensors")])
def test_flipped_bytes_in_weights_are_detected(where, file, folders, tmp_path, capsys):
    d = copy(folders[where], tmp_path)
    path = os.path.join(d, file)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 7)  # inside the tensor data: the header stays valid
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(CheckpointError, match=f"{file}: its bytes differ from those glm wrote"):
        glm.from_pretrained(d)
    assert main(["convert", d, str(tmp_path / "out"), "--quiet"]) == 2
    assert "its bytes differ" in capsys.readouterr().err and not (tmp_path / "out").exists()
    glm.from_pretrained(d, verify=False)  # the opt-out loads it as it is
    assert main(["convert", d, str(tmp_path / "out"), "--quiet", "--no-verify"]) == 0


def test_checksum_record_lists_every_weight_file(folders, tmp_path):
    with open(os.path.join(folders["glm"], CHECKSUMS_NAME)) as f:
        record = json.load(f)
    with CheckpointReader(folders["glm"]) as r:
        assert sorted(record["files"]) == sorted(r.files() + ["model.safetensors.index.json"])
    # a weight file the record does not list (replaced or added after glm wrote the folder)
    d = copy(folders["glm"], tmp_path)
    del record["files"]["model-00001-of-00008.safetensors"]
    with open(os.path.join(d, CHECKSUMS_NAME), "w") as f:
        json.dump(record, f)
    with pytest.raises(CheckpointError, match="model-00001-of-00008.safetensors: not among the files glm wrote"):
        convert_checkpoint(d, tmp_path / "out", to="hf")
    assert not (tmp_path / "out").exists()
    # a release folder from elsewhere has no record and loads as before
    assert glm.from_pretrained(folders["release"]) is not None


def test_renamed_tensors_are_copied_and_a_source_cut_short_meanwhile_is_an_error(folders, tmp_path, monkeypatch):
    """Tensors a conversion only renames are copied from memory maps of the source file, not loaded; a
    source cut short after it was checked must be a CheckpointError (reading a mapped page past the
    end of a file would kill the process with SIGBUS) and leave nothing behind."""
    real, copied = glm.checkpoint._copy_slice, []

    def spy(piece, out):
        copied.append(piece)
        return real(piece, out)

    monkeypatch.setattr(glm.checkpoint, "_copy_slice", spy)
    convert_checkpoint(folders["release"], tmp_path / "ok", to="glm")
    assert copied  # the embeddings, norms, MLP and output projections are renamed as they are
    ref, got = glm.from_pretrained(folders["release"]).state_dict(), glm.from_pretrained(tmp_path / "ok").state_dict()
    assert all(torch.equal(ref[k], got[k]) for k in ref)

    src = copy(folders["release"], tmp_path)

    def cut_short(piece, out):
        os.truncate(piece.path, piece.offset + 1)
        return real(piece, out)

    monkeypatch.setattr(glm.checkpoint, "_copy_slice", cut_short)
    with pytest.raises(CheckpointError, match="truncated while reading"):
        convert_checkpoint(src, tmp_path / "out", to="glm")
    assert sorted(os.listdir(tmp_path)) == ["ok", "src"]


# ---------------------------------------------------------------------------------------------
# --shard-size values

@pytest.mark.parametrize("size", ["infGB", "nanGB", "inf", "-1GB", "0", "1e400GB", "0.1B", float("inf"), True, None])
def test_bad_shard_sizes_are_one_clear_error(size, folders, tmp_path):
    with pytest.raises(ValueError, match="shard size"):
        convert_checkpoint(folders["hf"], tmp_path / "out", to="glm", shard_size=size)
    assert not (tmp_path / "out").exists()


def test_cli_inf_shard_size_is_one_line(folders, tmp_path, capsys):
    assert main(["convert", folders["hf"], str(tmp_path / "out"), "--shard-size", "infGB", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("glm convert: error: shard size 'infGB'") and err.count("\n") == 0
