"""Every golden case in ../shared/reference, produced by THUDM's / transformers' own code, to 1e-4."""
import json

import pytest
import torch
from conftest import FIXTURE_FAMILIES, reference_dir

import glm
from glm import positions
from glm.cli import main
from glm.parity import load_cases, run_parity

EXPECTED_FAMILY = {"glm": "glm", "chatglm-6b": "chatglm", "chatglm2-6b": "chatglm2", "chatglm3-6b": "chatglm3",
                   "glm-4-9b-chatglm": "glm4-chatglm", "glm-4-9b-chat-hf": "glm-hf", "glm-4-9b-0414": "glm4-hf"}


@pytest.fixture(scope="module", params=FIXTURE_FAMILIES)
def fixture(request):
    d = reference_dir(request.param)
    return request.param, d, glm.from_pretrained(d)


def test_family_detected(fixture):
    name, _, model = fixture
    assert model.config.family == EXPECTED_FAMILY[name]


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_every_case_within_atol(fixture, backend):
    name, d, model = fixture
    results = run_parity(model, cases=d, backend=backend)
    meta, _ = load_cases(d)
    assert len(results) == len(meta["cases"]) >= 2
    for r in results:
        assert r.atol == pytest.approx(1e-4)
        assert r.passed, f"{name}: {r.line()}"


def test_cases_cover_forward_and_decode():
    kinds = set()
    for fam in FIXTURE_FAMILIES:
        meta, _ = load_cases(reference_dir(fam))
        kinds |= {c["kind"] for c in meta["cases"]}
    assert kinds == {"forward", "decode"}


def test_harness_detects_a_wrong_model(tmp_path):
    """The harness must fail when the model is wrong: perturb one weight, expect FAIL and exit 1."""
    d = reference_dir("chatglm3-6b")
    model = glm.from_pretrained(d)
    with torch.no_grad():
        model.layers[0].mlp.w_out.weight.mul_(1.01)
    results = run_parity(model, cases=d)
    assert not any(r.passed for r in results)


def test_parity_cli(capsys):
    d = reference_dir("glm")
    assert main(["parity", d]) == 0
    out = capsys.readouterr().out
    assert "PASS  infill" in out and "PASS  decode" in out and "2 passed, 0 failed" in out


def test_parity_cli_fails_beyond_atol(capsys):
    d = reference_dir("chatglm-6b")
    assert main(["parity", d, "--atol", "1e-9"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_parity_cli_cases_flag(tmp_path, capsys):
    """--cases takes a cases file kept elsewhere (here: a copy holding only the decode case)."""
    from safetensors.torch import save_file

    d = reference_dir("chatglm2-6b")
    meta, tensors = load_cases(d)
    meta["cases"] = [c for c in meta["cases"] if c["kind"] == "decode"]
    (tmp_path / "only_decode.json").write_text(json.dumps(meta))
    save_file({k: v for k, v in tensors.items() if k.startswith("decode.")}, str(tmp_path / "only_decode.safetensors"))
    assert main(["parity", d, "--cases", str(tmp_path / "only_decode.json")]) == 0
    out = capsys.readouterr().out
    assert "decode" in out and "forward" not in out.split("\n")[0]


def test_loss_matches_reference():
    d = reference_dir("glm")
    model = glm.from_pretrained(d)
    meta, t = load_cases(d)
    with torch.no_grad():
        logits = model(t["infill.input_ids"], t["infill.position_ids"], prefix_len=t["infill.prefix_len"])
    loss = glm.lm_loss(logits, t["infill.labels"])
    assert abs(loss.item() - t["infill.loss"].item()) < 1e-4


def test_chatglm6b_derives_positions_and_prefix_like_its_reference():
    # Called without position_ids / prefix_len, ChatGLM-6B reads its prompt the reference's way
    # (context up to the bos, then the [gMASK] position with block positions 1, 2, ...: the prompt
    # convention glm/formats/chatglm6b.py registers), so
    # model(ids) and glm.generate(model, ids) reproduce the reference with no hand-built positions.
    d = reference_dir("chatglm-6b")
    model = glm.from_pretrained(d)
    meta, t = load_cases(d)
    for case in meta["cases"]:
        inp = {k: t[v] if isinstance(v, str) else v for k, v in case["inputs"].items()}
        pos, prefix = positions.derive(model.config, inp["input_ids"], inp["pad_left"])
        assert torch.equal(pos, inp["position_ids"]) and torch.equal(prefix, inp["prefix_len"])
        if case["kind"] == "forward":
            with torch.no_grad():
                got = model(inp["input_ids"], pad_left=inp["pad_left"])
            want, rows = t[case["outputs"]["logits"]], t[case["outputs"]["compare_mask"]]
            assert float((got - want)[rows].abs().max()) < meta["atol"]
        else:
            new = glm.generate(model, inp["input_ids"], pad_left=inp["pad_left"], max_new_tokens=inp["steps"],
                               eos_token_ids=())
            assert torch.equal(new, t[case["outputs"]["tokens"]])
