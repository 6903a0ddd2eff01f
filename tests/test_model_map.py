"""Finding decoder layers and cutting models into units, across model families."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

from scheduler.model_map import UnsupportedArchitecture, build_model_map

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
CONFIGS = {
    "llama": (LlamaConfig(**SMALL), "model.layers"),
    "mistral": (MistralConfig(**SMALL), "model.layers"),
    "qwen2": (Qwen2Config(**SMALL), "model.layers"),
    "gpt2": (GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=32,
                        bos_token_id=0, eos_token_id=0), "transformer.h"),
    "gpt_neox": (GPTNeoXConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                               num_attention_heads=4, max_position_embeddings=32), "gpt_neox.layers"),
}


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_every_parameter_in_exactly_one_unit(family):
    cfg, layers_path = CONFIGS[family]
    model = AutoModelForCausalLM.from_config(cfg)
    mm = build_model_map(model)
    assert mm.layers_path == layers_path
    assert [u.name for u in mm.units] == ["pre", "layer.0", "layer.1", "layer.2", "post"]
    names = [s.name for u in mm.units for s in u.params]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    for u in mm.units:  # offsets tile the unit's flat buffer
        offset = 0
        for s in u.params:
            assert s.offset == offset
            offset += s.numel
        assert offset == u.numel
    # The input embedding is in pre; layer parameters are in their layer.
    emb = model.get_input_embeddings().weight
    pre_names = {s.name for s in mm.pre.params}
    assert any(dict(model.named_parameters())[n] is emb for n in pre_names)
    assert all(s.name.startswith(f"{layers_path}.1.") for s in mm.units[2].params)


def test_tied_head_weight_belongs_to_pre():
    cfg, _ = CONFIGS["gpt2"]
    model = AutoModelForCausalLM.from_config(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight
    mm = build_model_map(model)
    assert "transformer.wte.weight" in {s.name for s in mm.pre.params}
    assert {s.name for s in mm.post.params} == {"transformer.ln_f.weight", "transformer.ln_f.bias"}


def test_untied_head_is_post():
    cfg, _ = CONFIGS["llama"]
    model = AutoModelForCausalLM.from_config(cfg)
    mm = build_model_map(model)
    assert {s.name for s in mm.post.params} == {"model.norm.weight", "lm_head.weight"}


def test_model_without_layers_is_refused():
    with pytest.raises(UnsupportedArchitecture, match="cannot find the decoder layers"):
        build_model_map(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_imports_go_one_way():
    """cli -> scheduler -> offload: offload never imports scheduler or cli; scheduler never cli."""
    root = Path(__file__).resolve().parents[1]
    forbidden = {"offload": ("scheduler", "cli"), "scheduler": ("cli",)}
    for package, banned in forbidden.items():
        for path in (root / package).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                mods = []
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    mods = [node.module]
                for mod in mods:
                    assert mod.split(".")[0] not in banned, f"{path.relative_to(root)} imports {mod}"
