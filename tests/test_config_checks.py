"""model.config keys against the transformers config class, ``~`` in path keys, ``--set`` corner
cases (keys inside lr_scheduler_kwargs, string keys given YAML numbers/dates/booleans, ' #' in a
value, TrainingArguments names) and the README line of model.trust_remote_code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from cli.config import ConfigError, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]

MODEL_TYPES = ["llama", "gpt2", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
               "phi", "phi3", "gpt_neox", "mistral", "olmo", "olmo2", "opt", "falcon", "gptj", "bloom",
               "starcoder2", "deepseek_v3", "granite", "cohere", "stablelm", "gpt_bigcode"]


def run_dict(model_config: dict[str, Any], **sections: dict[str, Any]) -> dict[str, Any]:
    d: dict[str, Any] = {"model": {"config": model_config}, "data": {"path": "corpus.txt"},
                         "train": {"output_dir": "runs/x"}}
    for name, values in sections.items():
        d.setdefault(name, {}).update(values)
    return d


def error_of(d: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(d, "config.yaml")
    message = str(info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------
# model.config keys


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_every_key_of_a_real_config_is_accepted(model_type):
    from transformers import CONFIG_MAPPING

    fields = CONFIG_MAPPING[model_type]().to_dict()
    fields["model_type"] = model_type
    cfg = config_from_dict(run_dict(fields))
    assert cfg.model.config == fields


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_a_misspelled_key_is_refused_with_the_closest_one(model_type):
    from transformers import CONFIG_MAPPING

    fields = CONFIG_MAPPING[model_type]().to_dict()
    key = next(k for k in ("hidden_size", "n_embd", "d_model", "num_hidden_layers", "n_layer", "vocab_size")
               if k in fields)
    typo = key[:-1] + key[-1] * 2 + "x"  # e.g. hidden_sizeex
    message = error_of(run_dict({"model_type": model_type, typo: 8}))
    assert message.startswith(f"unknown key 'model.config.{typo}' in config.yaml"), message
    assert message.endswith(f"did you mean {key!r}?"), message


@pytest.mark.parametrize(("typo", "meant"), [("hiden_size", "hidden_size"), ("hidden_sise", "hidden_size"),
                                            ("num_hidden_layer", "num_hidden_layers")])
def test_repro_typos_in_a_llama_config(typo, meant):
    message = error_of(run_dict({"model_type": "llama", "vocab_size": 4096, typo: 64}))
    assert message == (f"unknown key 'model.config.{typo}' in config.yaml: LlamaConfig (model_type llama) "
                       f"has no {typo!r}; did you mean {meant!r}?")


def test_a_key_with_nothing_close_points_at_the_config_class():
    message = error_of(run_dict({"model_type": "llama", "zzzzqqq": 1}))
    assert "LlamaConfig" in message and "documentation" in message


@pytest.mark.parametrize(("model_type", "fields"), [
    ("llama", {"torch_dtype": "bfloat16", "dtype": "bfloat16", "rope_theta": 500000.0,
               "rope_scaling": {"rope_type": "linear", "factor": 2.0}, "attn_implementation": "sdpa",
               "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": [2, 3], "pad_token_id": 0,
               "architectures": ["LlamaForCausalLM"], "transformers_version": "4.44.0", "use_cache": False,
               "initializer_range": 0.02, "max_length": 20}),
    ("mixtral", {"output_router_logits": True, "router_aux_loss_coef": 0.01, "num_experts": 4}),
    ("gpt2", {"n_embd": 64, "n_layer": 2, "n_head": 4, "hidden_size": 64, "num_hidden_layers": 2}),
    ("gemma", {"hidden_activation": "gelu_pytorch_tanh", "rope_parameters": {"rope_type": "default",
                                                                             "rope_theta": 10000.0}}),
])
def test_common_and_legacy_keys_are_accepted(model_type, fields):
    config_from_dict(run_dict({"model_type": model_type, **fields}))


def test_a_model_config_key_typo_from_set_names_set(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(run_dict({"model_type": "llama", "hidden_size": 64})))
    with pytest.raises(ConfigError, match=r"^unknown key 'model.config.num_hidden_layer' \(from --set\)"):
        load_config(path, ["model.config.num_hidden_layer=1"])


def test_the_shipped_configs_still_load():
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        load_config(path)


# ---------------------------------------------------------------------------------------------
# ~ in path keys


def test_tilde_is_expanded_in_every_path_key(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    d = run_dict({"model_type": "llama"}, data={"path": "~/c.txt", "tokenizer": "~/tok", "eval_path": "~/e.txt"},
                 train={"output_dir": "~/runs/x", "resume_from_checkpoint": "~/runs/x/step-2"},
                 offload={"nvme_path": "~/swap"}, peft={"adapter_name_or_path": "~/adapter"})
    cfg = config_from_dict(d)
    home = str(tmp_path)
    assert cfg.data.path == f"{home}/c.txt" and cfg.data.tokenizer == f"{home}/tok"
    assert cfg.data.eval_path == f"{home}/e.txt"
    assert cfg.train.output_dir == f"{home}/runs/x"
    assert cfg.train.resume_from_checkpoint == f"{home}/runs/x/step-2"
    assert cfg.offload.nvme_path == f"{home}/swap" and cfg.offload_nvme_path == tmp_path / "swap"
    assert cfg.peft is not None and cfg.peft.adapter_name_or_path == f"{home}/adapter"
    d = {"model": {"name_or_path": "~/m"}, "data": {"path": "c.txt"}, "train": {"output_dir": "runs/x"}}
    assert config_from_dict(d).model.name_or_path == f"{home}/m"


def test_tilde_from_set_and_auto_resume_are_kept_right(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(run_dict({"model_type": "llama"})))
    cfg = load_config(path, ["offload.nvme_path=~/swap", "train.output_dir=~/run",
                             "train.resume_from_checkpoint=auto"])
    assert cfg.offload.nvme_path == f"{tmp_path}/swap" and cfg.train.output_dir == f"{tmp_path}/run"
    assert cfg.train.resume_from_checkpoint == "auto"
    assert config_from_dict(cfg.to_dict()) == cfg


# ---------------------------------------------------------------------------------------------
# --set corner cases


@pytest.fixture
def config_path(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(run_dict({"model_type": "llama"}, train={"lr_scheduler_type": "cosine_with_min_lr"})))
    return path


def test_set_reaches_inside_lr_scheduler_kwargs(config_path):
    cfg = load_config(config_path, ["train.lr_scheduler_kwargs.min_lr_rate=0.1"])
    assert cfg.train.lr_scheduler_kwargs == {"min_lr_rate": 0.1}


@pytest.mark.parametrize(("override", "key", "value"), [
    ("train.output_dir=2024-01-01", "output_dir", "2024-01-01"),
    ("train.output_dir=123", "output_dir", "123"),
    ("train.output_dir=1e3", "output_dir", "1e3"),
    ("data.text_field=yes", "text_field", "yes"),
    ("data.text_field=true", "text_field", "true"),
    ("data.tokenizer=2024", "tokenizer", "2024"),
    ("train.output_dir=runs/exp #2", "output_dir", "runs/exp #2"),
    ("train.output_dir='runs/exp #3'", "output_dir", "runs/exp #3"),
    ("train.resume_from_checkpoint=true", "resume_from_checkpoint", "auto"),
    ("train.resume_from_checkpoint=false", "resume_from_checkpoint", None),
    ("data.tokenizer=null", "tokenizer", None),
    ("train.eval_strategy=no", "eval_strategy", "no"),
])
def test_set_string_keys_take_the_text(config_path, override, key, value):
    cfg = load_config(config_path, [override])
    section = override.split(".")[0]
    assert getattr(getattr(cfg, section), key) == value


@pytest.mark.parametrize("override", ["train.seed=3 #x", "train.output_dir='a' #x",
                                      "model.config.hidden_size=64 #x", "train.lr_scheduler_kwargs.min_lr_rate=0.1 #x"])
def test_set_never_cuts_a_comment_silently(config_path, override):
    with pytest.raises(ConfigError, match="YAML reads ' #' as the start of a comment"):
        load_config(config_path, [override])


def test_a_string_key_given_a_date_in_the_file_says_to_quote_it():
    message = error_of(run_dict({"model_type": "llama"}, train={"output_dir": yaml.safe_load("2024-01-01")}))
    assert message.startswith("train.output_dir in config.yaml must be a non-empty string"), message
    assert message.endswith("quote it, e.g. output_dir: '2024-01-01'"), message
    message = error_of(run_dict({"model_type": "llama"}, data={"text_field": True}))
    assert message.endswith("quote it, e.g. text_field: 'true'"), message


@pytest.mark.parametrize(("key", "words"), [
    ("per_device_train_batch_size", "did you mean 'micro_batch_size'"),
    ("warmup_ratio", "'warmup_steps'"),
    ("bf16", "model.dtype: bfloat16"),
    ("optim", "offload.optimizer_impl"),
])
def test_training_arguments_names_point_at_the_project_key(config_path, key, words):
    with pytest.raises(ConfigError) as info:
        load_config(config_path, [f"train.{key}=1"])
    assert f"unknown key 'train.{key}'" in str(info.value) and words in str(info.value)
    message = error_of(run_dict({"model_type": "llama"}, train={key: 1}))
    assert words in message and "per_device_eval_batch_size" not in message


def test_readme_documents_trust_remote_code():
    model_row = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| `model` |"))
    assert "`trust_remote_code`" in model_row
