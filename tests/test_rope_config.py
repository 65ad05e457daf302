"""Config variants: rope scaling (llama3, linear), classic vs transformers-5 rope config keys,
tied embeddings, head_dim, sharded checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.conftest import make_checkpoint
from tests.helpers import (
    copy_checkpoint,
    edit_json,
    generate_ids,
    greedy,
    hf_greedy,
    hf_model,
    make_llm,
    random_prompts,
)

# Long enough to pass original_max_position_embeddings=64 of the llama3 scaling.
PROMPTS = random_prompts((5, 20, 47, 70, 100), seed=30)

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
LINEAR = {"rope_type": "linear", "factor": 2.0}


def engine_greedy(path, **kwargs) -> list[list[int]]:
    with make_llm(path, **kwargs) as llm:
        return generate_ids(llm, PROMPTS, greedy(32))


@pytest.fixture(scope="module")
def rope_ckpts(tmp_path_factory):
    """name -> checkpoint made by transformers with that rope scaling and rope_theta=500."""
    out = {}
    for name, scaling in (("llama3", LLAMA3), ("linear", LINEAR)):
        out[name] = make_checkpoint(tmp_path_factory.mktemp(f"rope-{name}"), "llama",
                                    rope_parameters={**scaling, "rope_theta": 500.0})
    return out


@pytest.mark.parametrize("name", ["llama3", "linear"])
def test_rope_scaling_matches_transformers(rope_ckpts, name):
    path = rope_ckpts[name]
    saved = json.loads((path / "config.json").read_text())["rope_parameters"]
    assert saved["rope_type"] == name and saved["rope_theta"] == 500.0
    with make_llm(path) as llm:
        mc = llm.config.model_config
        assert mc.rope_theta == 500.0 and mc.rope_scaling["rope_type"] == name
        got = generate_ids(llm, PROMPTS, greedy(32))
    assert got == hf_greedy(path, PROMPTS, 32)


def _classic(d):
    """transformers-4 keys: rope_theta and rope_scaling at the top level."""
    params = d.pop("rope_parameters")
    d["rope_theta"] = params.pop("rope_theta")
    if params.get("rope_type", "default") != "default":
        d["rope_scaling"] = params


def _classic_old_type_key(d):
    _classic(d)
    d["rope_scaling"]["type"] = d["rope_scaling"].pop("rope_type")


def _rope_parameters(d):
    """transformers-5 keys: everything inside rope_parameters, no classic keys."""
    params = dict(d.pop("rope_parameters", None) or {})
    params["rope_theta"] = d.pop("rope_theta", params.get("rope_theta", 10000.0))
    params.update(d.pop("rope_scaling", None) or {"rope_type": "default"})
    d["rope_parameters"] = params


@pytest.mark.parametrize("name", ["llama3", "linear"])
def test_classic_and_rope_parameters_forms_agree(rope_ckpts, tmp_path, name):
    src = rope_ckpts[name]
    classic = copy_checkpoint(src, tmp_path / "classic")
    edit_json(classic / "config.json", _classic)
    cfg = json.loads((classic / "config.json").read_text())
    assert "rope_parameters" not in cfg and cfg["rope_theta"] == 500.0
    modern = copy_checkpoint(classic, tmp_path / "modern")
    edit_json(modern / "config.json", _rope_parameters)
    cfg = json.loads((modern / "config.json").read_text())
    assert "rope_theta" not in cfg and "rope_scaling" not in cfg
    assert cfg["rope_parameters"]["rope_theta"] == 500.0
    want = hf_greedy(src, PROMPTS, 32)
    assert engine_greedy(classic) == want
    assert engine_greedy(modern) == want
    if name == "linear":  # the old "type" key instead of "rope_type"
        old = copy_checkpoint(src, tmp_path / "old")
        edit_json(old / "config.json", _classic_old_type_key)
        assert engine_greedy(old) == want


def test_rope_settings_change_the_output(rope_ckpts, tmp_path):
    """Sanity check for the tests above: with the rope keys gone (theta 10000, no scaling)
    the same weights give another continuation, so a dropped key would be noticed."""
    src = rope_ckpts["llama3"]
    plain = copy_checkpoint(src, tmp_path / "plain")
    edit_json(plain / "config.json", lambda d: d.pop("rope_parameters"))
    assert engine_greedy(plain) != hf_greedy(src, PROMPTS, 32)


def test_classic_theta_without_scaling(llama_dir, tmp_path):
    # Only rope_theta at the top level (the usual transformers-4 llama config).
    path = copy_checkpoint(llama_dir, tmp_path / "theta")
    edit_json(path / "config.json", _classic)
    cfg = json.loads((path / "config.json").read_text())
    assert "rope_parameters" not in cfg and "rope_scaling" not in cfg
    assert engine_greedy(path) == hf_greedy(llama_dir, PROMPTS, 32)


def test_tied_embeddings(ckpt):
    path = ckpt("llama", tie_word_embeddings=True)
    model = hf_model(str(path))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert engine_greedy(path) == hf_greedy(path, PROMPTS, 32)


@pytest.mark.parametrize("arch, head_dim", [("llama", 16), ("llama", 48), ("qwen3", 48),
                                            ("llama", 8)])
def test_head_dim(ckpt, arch, head_dim):
    path = ckpt(arch, head_dim=head_dim)
    with make_llm(path) as llm:
        assert llm.config.model_config.head_dim == head_dim
        got = generate_ids(llm, PROMPTS, greedy(32))
    assert got == hf_greedy(path, PROMPTS, 32)


def test_sharded_checkpoint(llama_dir, tmp_path):
    path = tmp_path / "sharded"
    hf_model(str(llama_dir)).save_pretrained(path, max_shard_size="20KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(llama_dir / name, path / name)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and not (path / "model.safetensors").exists()
    got = engine_greedy(path)
    assert got == engine_greedy(llama_dir)
    assert got == hf_greedy(llama_dir, PROMPTS, 32)


def test_sharded_checkpoint_missing_shard(llama_dir, tmp_path):
    from fleetllm.errors import ModelLoadError

    path = tmp_path / "sharded"
    hf_model(str(llama_dir)).save_pretrained(path, max_shard_size="20KB")
    shutil.copy(llama_dir / "tokenizer.json", path / "tokenizer.json")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (path / victim).unlink()
    with pytest.raises(ModelLoadError, match=victim.replace(".", r"\.")):
        make_llm(path)


def test_bfloat16_dtype_override(llama_dir):
    """dtype='bfloat16' on a float32 checkpoint runs the model in bfloat16."""
    with make_llm(llama_dir, dtype="bfloat16") as llm:
        assert llm.config.model_config.dtype == "bfloat16"
        dtypes = llm.collective_rpc(
            lambda w: {p.dtype for p in w.model_runner.model.parameters()})[0]
        assert dtypes == {torch.bfloat16}
        got = generate_ids(llm, PROMPTS, greedy(4))
    want = hf_greedy(llama_dir, PROMPTS, 4)
    assert sum(g[:2] == w[:2] for g, w in zip(got, want)) >= len(PROMPTS) - 1
