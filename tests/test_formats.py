"""The release-format registry (`glm.formats`): lookup, detection, each format's config.json round trip,
a format registered from outside glm working end to end, and the docs table of formats."""
from __future__ import annotations

import ast
import json
import os
import pathlib
import re

import pytest
import torch
from conftest import FIXTURE_FAMILIES, reference_dir

import glm
from glm import config as config_module
from glm import formats
from glm.errors import ConfigError, FormatError
from glm.formats.chatglm2 import ChatGLM2Format
from glm.formats.layout import Mapping
from glm.hub import convert_checkpoint
from glm.tokenizer import FAMILIES as TOKENIZER_FAMILIES
from glm.tokenizer import canonical_family

ROOT = pathlib.Path(__file__).resolve().parent.parent
ARCHITECTURE = ROOT / "docs" / "architecture.md"
# Fixture folder -> the family its config.json is.
FIXTURE_FAMILY = {"glm": "glm", "chatglm-6b": "chatglm", "chatglm2-6b": "chatglm2", "chatglm3-6b": "chatglm3",
                  "glm-4-9b-chatglm": "glm4-chatglm", "glm-4-9b-chat-hf": "glm-hf", "glm-4-9b-0414": "glm4-hf"}
# What a config.json round trip may drop: provenance, and ids a release's config.json has no key for.
NOT_IN_EVERY_SCHEMA = {"name", "special_tokens", "pad_token_id", "bos_token_id", "eos_token_ids"}


@pytest.fixture
def registry_restored():
    """Whatever a test registers is gone afterwards (the registry and the families GLMConfig accepts)."""
    saved_formats, saved_families = dict(formats.FORMATS), dict(config_module.FAMILIES)
    yield
    for d, saved in ((formats.FORMATS, saved_formats), (config_module.FAMILIES, saved_families)):
        d.clear()
        d.update(saved)


def test_get_unknown_family_lists_the_known_ones():
    assert formats.get("chatglm3").family == "chatglm3"
    with pytest.raises(ConfigError, match=r"unknown family 'llama'; known: glm, chatglm, chatglm2, chatglm3, "
                                          r"glm4-chatglm, glm-hf, glm4-hf"):
        formats.get("llama")


def test_every_family_is_a_registered_format():
    assert list(formats.FORMATS) == list(glm.FAMILIES)
    for family, fmt in formats.FORMATS.items():
        assert fmt.family == family and glm.FAMILIES[family] == fmt.description
        assert fmt.tokenizer_family in TOKENIZER_FAMILIES
        assert canonical_family(family, "test") == fmt.tokenizer_family
    assert [f for f, fmt in formats.FORMATS.items() if fmt.labels_are_next_tokens] == ["glm"]


@pytest.mark.parametrize("folder", FIXTURE_FAMILIES)
def test_detect_recognises_each_fixture(folder):
    with open(os.path.join(reference_dir(folder), "config.json")) as f:
        hf = json.load(f)
    assert [fmt.family for fmt in formats.FORMATS.values() if fmt.matches(hf)] == [FIXTURE_FAMILY[folder]]
    assert formats.detect(hf).family == FIXTURE_FAMILY[folder]


def test_no_format_recognises_a_file_names_what_each_needs():
    with pytest.raises(ConfigError, match=re.escape(
            "x/config.json: cannot tell which GLM family this is (model_type='llama', architectures=[]); "
            "supported: original GLM (model_type 'glm', num_layers), ChatGLM-6B/2/3 and GLM-4 chatglm format "
            "(model_type 'chatglm'), transformers Glm (model_type 'glm', num_hidden_layers) and Glm4 "
            "(model_type 'glm4')")):
        formats.detect({"model_type": "llama"}, "x/config.json")


@pytest.mark.parametrize("family", list(formats.FORMATS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_config_round_trips_through_each_format(family, dtype):
    """config_to_hf then config_from_hf gives the same architecture back, and writing that again gives
    the same config.json (so nothing written is lost on reading)."""
    cfg = glm.preset(f"tiny-{family}")
    hf = formats.config_to_hf(cfg, dtype)
    assert formats.detect(hf).family == family
    back = formats.config_from_hf(json.loads(json.dumps(hf)))
    for f in set(cfg.to_dict()) - NOT_IN_EVERY_SCHEMA - {"rope_inv_freq_dtype"}:
        assert getattr(back, f) == getattr(cfg, f), f
    assert formats.config_to_hf(back, dtype) == hf
    assert glm.GLMConfig.from_hf(hf) == back


@pytest.mark.parametrize("family", list(formats.FORMATS))
def test_mappings_round_trip_a_tiny_model(family):
    """Each format's table writes every glm tensor and reads it back bit for bit."""
    model = glm.GLM(glm.preset(f"tiny-{family}"))
    model.init_weights(std=0.3, seed=0)
    sd = model.state_dict()
    table = formats.mappings(model.config)
    assert sorted(n for mp in table for n in mp.glm) == sorted(sd)
    stored = {}
    for mp in table:
        stored.update(zip(mp.hf, mp.to_hf(*(sd[n] for n in mp.glm))))
    for mp in table:
        for name, t in zip(mp.glm, mp.to_glm(*(stored[n] for n in mp.hf))):
            assert torch.equal(t, sd[name]), name


def test_register_refuses_a_family_twice(registry_restored):
    with pytest.raises(ConfigError, match="'chatglm3' is registered already"):
        formats.register(formats.get("chatglm3"))


def test_retarget_names_what_cannot_be_written():
    cfg = glm.preset("tiny-chatglm")
    with pytest.raises(FormatError, match="a chatglm model cannot be written in the glm-hf format"):
        formats.retarget(cfg, "glm-hf", torch.float32)
    with pytest.raises(FormatError, match="no release format for family 'llama'"):
        formats.retarget(cfg, "llama", torch.float32)


# ---------------------------------------------------------------------------------------------
# A family added from outside glm: one Format, registered; nothing else edited

class ToyFormat(ChatGLM2Format):
    """ChatGLM3's computation under another model_type and another key prefix."""

    def __init__(self):
        super().__init__("toy-chatglm", "a renamed ChatGLM3 (test)", "chatglm3", "toy/chatglm")
        self.recognised_by = "Toy (model_type 'toy')"

    def matches(self, hf):
        return hf.get("model_type") == "toy"

    def config_to_hf(self, cfg, dtype):
        return {**super().config_to_hf(cfg, dtype), "model_type": "toy"}

    def mappings(self, cfg, dtype=torch.float32, keys=None, hf_config=None):
        prefixed = lambda names: tuple(n.replace("transformer.", "toy.", 1) for n in names)  # noqa: E731
        return [Mapping(mp.glm, prefixed(mp.hf), mp.to_glm, mp.to_hf)
                for mp in super().mappings(cfg, dtype, keys, hf_config)]


def test_a_registered_format_loads_saves_and_converts(registry_restored, tmp_path):
    formats.register(ToyFormat())
    assert "toy-chatglm" in glm.FAMILIES and canonical_family("toy-chatglm", "test") == "chatglm3"
    model = glm.GLM(glm.preset("tiny-chatglm3").replace(family="toy-chatglm")).eval()
    model.init_weights(std=0.3, seed=0)
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids)

    toy = tmp_path / "toy"
    model.save_pretrained(str(toy), format="hf")
    with open(toy / "config.json") as f:
        assert json.load(f)["model_type"] == "toy"
    with glm.CheckpointReader(str(toy)) as reader:
        assert reader.keys() and all(k.startswith("toy.") for k in reader.keys())
    with torch.no_grad():
        assert torch.equal(glm.from_pretrained(str(toy))(ids), want)

    # Through glm's own format and back; and a ChatGLM3 release converted into the new format (which
    # takes the families its base class takes).
    convert_checkpoint(str(toy), str(tmp_path / "g"), to="glm")
    convert_checkpoint(str(tmp_path / "g"), str(tmp_path / "back"), to="hf")
    c3 = glm.GLM(model.config.replace(family="chatglm3"))
    c3.load_state_dict(model.state_dict())
    c3.save_pretrained(str(tmp_path / "c3"), format="hf")
    convert_checkpoint(str(tmp_path / "c3"), str(tmp_path / "from-c3"), to="hf", family="toy-chatglm")
    for folder in ("g", "back", "from-c3"):
        loaded = glm.from_pretrained(str(tmp_path / folder))
        assert loaded.config.family == "toy-chatglm"
        with torch.no_grad():
            assert torch.equal(loaded(ids), want), folder


# ---------------------------------------------------------------------------------------------
# Nothing outside glm/formats branches on a family name; the docs list the formats

def _family_branches(path: pathlib.Path) -> list[str]:
    """Comparisons of something named ``family`` with a registered family name (``x.family == "glm"``,
    ``family in ("chatglm2", ...)``) in a module."""
    names = set(formats.FORMATS)
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        about_family = any(isinstance(s, ast.Attribute) and s.attr == "family" or
                           isinstance(s, ast.Name) and s.id in ("family", "fam") for s in sides)
        consts = [c.value for s in sides for c in ast.walk(s) if isinstance(c, ast.Constant)]
        if about_family and any(isinstance(c, str) and c in names for c in consts):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_no_module_outside_formats_branches_on_a_family_name():
    modules = [p for p in (ROOT / "glm").glob("*.py") if p.name != "presets.py"]
    found = [hit for p in modules for hit in _family_branches(p)]
    assert not found, "ask glm.formats (or the format's registered hooks) instead of naming a family:\n" + \
        "\n".join(found)


def _formats_table() -> list[list[str]]:
    text = ARCHITECTURE.read_text(encoding="utf-8")
    section = text[text.index("## 7. Adding a family"):]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert cells and cells[0][:3] == ["family", "module", "tokenizer"], cells[:1]
    return [r for r in cells[1:] if not set("".join(r)) <= set("-: ")]


def test_architecture_lists_exactly_the_registered_formats():
    rows = _formats_table()
    assert [r[0].strip("`") for r in rows] == list(formats.FORMATS)
    for row in rows:
        fmt = formats.get(row[0].strip("`"))
        module = fmt.__class__.__module__.replace(".", "/") + ".py"
        assert row[1].strip("`") == module, row
        assert row[2].strip("`") == fmt.tokenizer_family, row
        assert row[3] == fmt.description, row
