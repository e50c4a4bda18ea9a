"""Bad input: each a single clear error naming the file/field and the fix."""
import json
import os

import pytest
import torch
from conftest import copy_fixture, edit_json, reference_dir

import glm
from glm.checkpoint import CheckpointError
from glm.cli import main
from glm.config import ConfigError
from glm.errors import InputError, KeyMismatchError


def test_unknown_family_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ConfigError) as e:
        glm.GLMConfig.from_hf(str(tmp_path))
    msg = str(e.value)
    assert "config.json" in msg and "llama" in msg and "chatglm" in msg and "glm4" in msg


def test_missing_config(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        glm.from_pretrained(str(tmp_path))


def test_config_not_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        glm.GLMConfig.from_hf(str(tmp_path))


def test_config_missing_required_field(tmp_path):
    d = copy_fixture("chatglm2-6b", tmp_path)
    edit_json(os.path.join(d, "config.json"), lambda c: c.pop("ffn_hidden_size"))
    with pytest.raises(ConfigError, match="ffn_hidden_size"):
        glm.from_pretrained(d)


def test_missing_shard_named(tmp_path):
    d = copy_fixture("glm-4-9b-0414", tmp_path)
    os.remove(os.path.join(d, "model-00003-of-00004.safetensors"))
    with pytest.raises(CheckpointError, match="model-00003-of-00004.safetensors"):
        glm.from_pretrained(d)


def test_no_weights(tmp_path):
    d = copy_fixture("chatglm3-6b", tmp_path)
    os.remove(os.path.join(d, "model.safetensors"))
    with pytest.raises(CheckpointError, match="no weights found"):
        glm.from_pretrained(d)


def test_truncated_safetensors(tmp_path):
    d = copy_fixture("chatglm3-6b", tmp_path)
    p = os.path.join(d, "model.safetensors")
    size = os.path.getsize(p)
    with open(p, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(CheckpointError, match="truncated"):
        glm.from_pretrained(d)


def test_truncated_bin(tmp_path):
    d = copy_fixture("glm", tmp_path)
    p = os.path.join(d, "pytorch_model.bin")
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) // 2)
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        glm.from_pretrained(d)


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
    d = copy_fixture("chatglm3-6b", tmp_path)
    edit_json(os.path.join(d, "config.json"), lambda c: c.update(ffn_hidden_size=80))
    with pytest.raises(CheckpointError) as e:
        glm.from_pretrained(d)
    msg = str(e.value)
    assert "dense_h_to_4h.weight" in msg and "(192, 64)" in msg and "(160, 64)" in msg


def test_missing_and_unexpected_keys_listed(tmp_path):
    from safetensors.torch import load_file, save_file

    d = copy_fixture("chatglm3-6b", tmp_path)
    p = os.path.join(d, "model.safetensors")
    sd = load_file(p)
    sd["transformer.extra.weight"] = sd.pop("transformer.encoder.final_layernorm.weight")
    save_file(sd, p, metadata={"format": "pt"})
    with pytest.raises(KeyMismatchError) as e:
        glm.from_pretrained(d)
    msg = str(e.value)
    assert "transformer.encoder.final_layernorm.weight" in msg and "transformer.extra.weight" in msg


def test_index_lists_tensor_not_in_shard(tmp_path):
    d = copy_fixture("glm-4-9b-chatglm", tmp_path)
    idx = os.path.join(d, "model.safetensors.index.json")
    edit_json(idx, lambda c: c["weight_map"].update(
        {"transformer.output_layer.weight": "model-00001-of-00002.safetensors"}))
    with pytest.raises(CheckpointError, match="index"):
        glm.from_pretrained(d)


def test_unsupported_dtype_request():
    with pytest.raises(ValueError, match="dtype"):
        glm.from_pretrained(reference_dir("glm"), dtype="int8")


def test_token_id_out_of_vocab():
    model = glm.from_pretrained(reference_dir("chatglm2-6b"))
    with pytest.raises(InputError, match=r"token id 160 .*vocabulary \[0, 160\)"):
        model(torch.tensor([[1, 2, 160]]))
    with pytest.raises(InputError, match="token id -1"):
        model(torch.tensor([[1, -1]]))


def test_sequence_longer_than_positions():
    model = glm.from_pretrained(reference_dir("glm-4-9b-chat-hf"))  # 64 positions
    model(torch.zeros(1, 64, dtype=torch.long))  # exactly fits
    with pytest.raises(InputError, match="longer than the model's 64 positions"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_glm_2d_position_out_of_table():
    model = glm.from_pretrained(reference_dir("glm"))  # 65-row position tables
    pos = torch.zeros(1, 2, 3, dtype=torch.long)
    pos[0, 1, 2] = 65
    with pytest.raises(InputError, match="position id 65"):
        model(torch.tensor([[1, 2, 3]]), pos)


def test_wrong_position_shape():
    model = glm.from_pretrained(reference_dir("chatglm-6b"))
    with pytest.raises(InputError, match=r"\[B, 2, T\]"):
        model(torch.tensor([[1, 2, 3]]), torch.tensor([[0, 1, 2]]))


def test_float_input_ids():
    model = glm.from_pretrained(reference_dir("chatglm3-6b"))
    with pytest.raises(InputError, match="integer"):
        model(torch.tensor([[1.0, 2.0]]))


def test_cache_overflow():
    model = glm.from_pretrained(reference_dir("chatglm3-6b"))
    cache = model.new_cache(1, 4)
    model(torch.tensor([[1, 2, 3]]), cache=cache)
    with pytest.raises(ValueError, match="larger max_len"):
        model(torch.tensor([[4, 5]]), cache=cache)


def test_cache_of_another_dtype_is_named():
    model = glm.GLM(glm.preset("tiny-chatglm3")).to(torch.bfloat16)
    cache = model.new_cache(1, 8, dtype=torch.float32)
    with pytest.raises(InputError, match="the KV cache holds torch.float32 but the model computes in torch.bfloat16"):
        model(torch.tensor([[1, 2, 3]]), cache=cache)


def test_invalid_config_fields():
    cfg = glm.preset("tiny-glm-hf")
    with pytest.raises(ConfigError, match="num_kv_heads"):
        cfg.replace(num_kv_heads=3)
    with pytest.raises(ConfigError, match="family"):
        cfg.replace(family="llama")
    with pytest.raises(ConfigError, match="rotary_fraction"):
        cfg.replace(rotary_fraction=1.5)


def test_cli_error_is_one_line(tmp_path, capsys):
    d = copy_fixture("glm-4-9b-0414", tmp_path)
    os.remove(os.path.join(d, "model-00002-of-00004.safetensors"))
    assert main(["parity", d]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model-00002-of-00004.safetensors" in err and "Traceback" not in err


def test_structure_tensors_validated():
    model = glm.from_pretrained(reference_dir("chatglm-6b"))
    ids = torch.tensor([[3, 40, 50, 87, 72]])
    pos = torch.zeros(1, 2, 5, dtype=torch.long)
    with pytest.raises(InputError, match=r"pad_left must have shape \[1\] for input_ids \(1, 5\), got \(2,\)"):
        model(ids, pos, pad_left=torch.tensor([1, 0]))
    with pytest.raises(InputError, match=r"pad_left values must lie in \[0, 5\]"):
        model(ids, pos, pad_left=torch.tensor([9]))
    # A prefix cannot reach past the keys prefilled so far: prefill the whole prefix in one call.
    cache = model.new_cache(1, 10)
    with pytest.raises(InputError, match=r"prefix_len values must lie in \[0, 5\]"):
        model(ids, pos, prefix_len=torch.tensor([6]), cache=cache)


# ---------------------------------------------------------------------------------------------
# from_pretrained's keyword arguments, parity files and the CLI's edges

def test_from_pretrained_overrides_that_change_shapes_are_refused():
    with pytest.raises(ValueError, match=r"overriding \['num_layers'\] changes the model's tensor shapes"):
        glm.from_pretrained(reference_dir("chatglm3-6b"), num_layers=1)
    with pytest.raises(ValueError, match="not GLMConfig fields"):
        glm.from_pretrained(reference_dir("chatglm3-6b"), do_sample=True)
    with pytest.raises(ValueError, match="takes dtype=, not transformers' torch_dtype="):
        glm.from_pretrained(reference_dir("chatglm3-6b"), torch_dtype=torch.float16)


def test_from_pretrained_dtype_auto_keeps_the_stored_dtype():
    model = glm.from_pretrained(reference_dir("glm-4-9b-0414"), dtype="auto")
    assert model.embed.weight.dtype == torch.bfloat16


def _cases_copy(tmp_path, name: str, edit) -> str:
    src = reference_dir(name)
    dst = tmp_path / "cases"
    dst.mkdir()
    for f in ("cases.json", "cases.safetensors"):
        with open(os.path.join(src, f), "rb") as a, open(dst / f, "wb") as b:
            b.write(a.read())
    edit_json(dst / "cases.json", edit)
    return str(dst)


def test_parity_refuses_an_empty_cases_list(tmp_path, capsys):
    cases = _cases_copy(tmp_path, "chatglm3-6b", lambda c: c.update(cases=[]))
    assert main(["parity", reference_dir("chatglm3-6b"), "--cases", cases]) == 2
    assert "the 'cases' list is empty" in capsys.readouterr().err


def test_parity_names_a_vocabulary_mismatch(tmp_path):
    from glm.parity import run_parity

    model = glm.GLM(glm.preset("tiny-chatglm3").replace(vocab_size=200))  # the fixture has 160
    with pytest.raises(CheckpointError, match="the reference logits have 160 vocabulary entries, the model 200"):
        run_parity(model, cases=reference_dir("chatglm3-6b"))


def test_parity_rejects_a_non_positive_atol(capsys):
    assert main(["parity", reference_dir("chatglm3-6b"), "--atol", "-1"]) == 2
    assert "atol must be a finite number > 0" in capsys.readouterr().err


def test_arguments_after_double_dash_are_rejected_outside_bench(capsys):
    with pytest.raises(SystemExit) as e:
        main(["parity", reference_dir("chatglm3-6b"), "--", "--atol", "1"])
    assert e.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_convert_family_without_to_hf_is_an_error(tmp_path, capsys):
    assert main(["convert", reference_dir("glm-4-9b-chatglm"), str(tmp_path / "o"), "--family", "glm-hf"]) == 2
    assert "picks the release format of an hf output" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_ctrl_c_is_one_line(monkeypatch, capsys):
    import glm.cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(glm.cli, "cmd_parity", interrupted)
    assert main(["parity", reference_dir("chatglm3-6b")]) == 130
    err = capsys.readouterr().err
    assert "glm parity: interrupted" in err and "Traceback" not in err


@pytest.mark.parametrize("shard", ["/etc/passwd", "../model-00001-of-00004.safetensors", "..", ".",
                                   "sub/model-00001-of-00004.safetensors"])
def test_index_shard_names_must_stay_inside_the_folder(shard, tmp_path):
    # An index could otherwise make the loader open any file on the machine.
    src = copy_fixture("glm-4-9b-0414", tmp_path)
    index = os.path.join(src, "model.safetensors.index.json")

    def point_one_tensor_elsewhere(d):
        first = sorted(d["weight_map"])[0]
        d["weight_map"][first] = shard

    edit_json(index, point_one_tensor_elsewhere)
    with pytest.raises(CheckpointError, match="shard names must be plain file names inside"):
        glm.from_pretrained(src)
    assert main(["convert", src, str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_model_overrides_that_are_not_json_name_the_flag(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), "--model-overrides", "{bad"]) == 2
    err = capsys.readouterr().err
    assert "--model-overrides is not valid JSON" in err and "Traceback" not in err


def test_chatglm6b_empty_input_and_derived_positions_past_the_table():
    model = glm.from_pretrained(reference_dir("chatglm-6b"))
    assert model(torch.zeros(1, 0, dtype=torch.long)).shape == (1, 0, model.config.vocab_size)
    st = model.config.special_tokens
    ids = torch.tensor([[5, 6, st["[gMASK]"], model.config.bos_token_id] + [7] * 40])
    # ChatGLM-6B derives block positions 1..41 for this prompt itself; 40 more leave the table.
    with pytest.raises(InputError, match="outside the model's"):
        glm.generate(model, ids, max_new_tokens=40)


@pytest.mark.parametrize("backend", ["auto", "sdpa", "reference"])
def test_cache_in_the_autocast_dtype_is_accepted(backend):
    model = glm.GLM(glm.preset("tiny-chatglm3")).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    cache = model.new_cache(1, 8, dtype=torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(ids, backend=backend)[:, -1]
        model(ids[:, :4], cache=cache, backend=backend)
        step = model(ids[:, 4:], cache=cache, backend=backend)[:, -1]
    assert cache.length == 5
    assert float((step.float() - full.float()).abs().max()) < 0.1  # bf16 rounding, not another computation


def test_generate_under_autocast_with_the_default_cache():
    model = glm.GLM(glm.preset("tiny-chatglm3")).eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = glm.generate(model, ids, max_new_tokens=3, eos_token_ids=())
    assert out.shape == (1, 3)


def test_empty_call_into_a_cache_changes_nothing():
    model = glm.GLM(glm.preset("tiny-chatglm3")).eval()
    cache = model.new_cache(1, 8)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        assert model(torch.zeros(1, 0, dtype=torch.long), cache=cache).shape == (1, 0, model.config.vocab_size)
    assert cache.length == 3
