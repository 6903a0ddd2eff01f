"""The run configuration: loading, defaults, validation messages, overrides, round trip, sizes."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from cli.config import (
    AUTO_MEMORY_FRACTION,
    ConfigError,
    DataConfig,
    ModelConfig,
    OffloadConfig,
    RunConfig,
    TrainConfig,
    config_from_dict,
    dump_yaml,
    load_config,
    parse_size,
    resolve_memory_limit,
)
from offload.errors import OffloadError, format_bytes

FULL_YAML = """\
model:
  name_or_path: /models/tiny-llama
  dtype: bfloat16
  state_dtype: bfloat16
  trust_remote_code: true
data:
  path: corpus.jsonl
  tokenizer: /models/tok
  seq_len: 1024
  shuffle: false
  packing: false
  text_field: content
train:
  output_dir: runs/a
  max_steps: 100
  num_train_epochs: 2
  micro_batch_size: 4
  gradient_accumulation_steps: 8
  learning_rate: 1e-4
  lr_scheduler_type: cosine
  warmup_steps: 0.1
  weight_decay: 0.01
  adam_beta1: 0.8
  adam_beta2: 0.95
  adam_epsilon: 1.0e-6
  max_grad_norm: 0
  seed: 7
  logging_steps: 5
  save_steps: 0
  save_total_limit: 2
  resume_from_checkpoint: auto
  nan_policy: skip
offload:
  nvme_path: /nvme/swap
  gpu_memory_limit: 20GiB
  cpu_memory_limit: 64 GB
  io_backend: posix
  optimizer_impl: torch
  engine: reference
  recompute: false
  prefetch_depth: 2
  trace: true
  io_threads: 4
"""


def minimal() -> dict[str, Any]:
    return {
        "model": {"config": {"model_type": "llama", "hidden_size": 64}},
        "data": {"path": "corpus.txt"},
        "train": {"output_dir": "runs/x"},
    }


def write(tmp_path: Path, content: str | dict[str, Any], name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return path


def with_value(section: str, key: str, value: Any) -> dict[str, Any]:
    d = minimal()
    d.setdefault(section, {})[key] = value
    return d


def error_of(d: Any, source: str = "config.yaml") -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(d, source)
    return one_line(info.value)


def one_line(err: BaseException) -> str:
    message = str(err)
    assert "\n" not in message and "\r" not in message, message
    assert message == message.strip() and message
    return message


# ---------------------------------------------------------------------------------------------
# Valid configs


def test_full_config_loads_with_the_right_types(tmp_path):
    cfg = load_config(write(tmp_path, FULL_YAML))
    assert cfg.model == ModelConfig(name_or_path="/models/tiny-llama", dtype="bfloat16", state_dtype="bfloat16",
                                    trust_remote_code=True)
    assert cfg.data == DataConfig(path="corpus.jsonl", tokenizer="/models/tok", seq_len=1024,
                                  shuffle=False, packing=False, text_field="content")
    t = cfg.train
    assert (t.output_dir, t.max_steps, t.micro_batch_size, t.gradient_accumulation_steps) == ("runs/a", 100, 4, 8)
    assert t.num_train_epochs == 2.0 and type(t.num_train_epochs) is float
    assert t.learning_rate == 1e-4 and type(t.learning_rate) is float  # YAML read "1e-4" as a string
    assert (t.lr_scheduler_type, t.warmup_steps, t.weight_decay) == ("cosine", 0.1, 0.01)
    assert (t.adam_beta1, t.adam_beta2, t.adam_epsilon, t.max_grad_norm) == (0.8, 0.95, 1e-6, 0.0)
    assert type(t.max_grad_norm) is float
    assert (t.seed, t.logging_steps, t.save_steps, t.save_total_limit) == (7, 5, 0, 2)
    assert (t.resume_from_checkpoint, t.nan_policy) == ("auto", "skip")
    assert cfg.offload == OffloadConfig(
        nvme_path="/nvme/swap", gpu_memory_limit="20GiB", cpu_memory_limit="64 GB", io_backend="posix",
        optimizer_impl="torch", engine="reference", recompute=False, prefetch_depth=2, trace=True,
        io_threads=4)
    assert cfg.offload_nvme_path == Path("/nvme/swap")
    assert cfg.model.torch_dtype is __import__("torch").bfloat16


def test_defaults(tmp_path):
    cfg = load_config(write(tmp_path, minimal()))
    assert cfg.model == ModelConfig(config={"model_type": "llama", "hidden_size": 64})
    assert cfg.model.dtype == "float32" and cfg.model.trust_remote_code is False
    assert cfg.data == DataConfig(path="corpus.txt")
    assert (cfg.data.tokenizer, cfg.data.seq_len, cfg.data.shuffle, cfg.data.packing,
            cfg.data.text_field) == (None, 512, True, True, "text")
    t = cfg.train
    assert t == TrainConfig(output_dir="runs/x")
    assert (t.max_steps, t.num_train_epochs, t.micro_batch_size, t.gradient_accumulation_steps) == (-1, 1.0, 1, 1)
    assert (t.learning_rate, t.lr_scheduler_type, t.warmup_steps, t.weight_decay) == (5e-5, "linear", 0, 0.0)
    assert (t.adam_beta1, t.adam_beta2, t.adam_epsilon, t.max_grad_norm) == (0.9, 0.999, 1e-8, 1.0)
    assert (t.seed, t.logging_steps, t.save_steps, t.save_total_limit) == (42, 10, 500, None)
    assert (t.resume_from_checkpoint, t.nan_policy) == (None, "stop")
    o = cfg.offload
    assert o == OffloadConfig()
    assert (o.nvme_path, o.gpu_memory_limit, o.cpu_memory_limit) == (None, "auto", "auto")
    assert (o.io_backend, o.optimizer_impl, o.engine, o.recompute) == ("auto", "auto", "native", "auto")
    assert (o.prefetch_depth, o.trace, o.io_threads) == ("auto", False, 8)
    assert cfg.offload_nvme_path == Path("runs/x") / "swap"


def test_empty_sections_mean_defaults():
    d = minimal()
    d["offload"] = None
    assert config_from_dict(d, "c.yaml").offload == OffloadConfig()


def test_ints_are_accepted_for_floats_and_numeric_strings_too():
    cfg = config_from_dict(with_value("train", "learning_rate", 1), "c.yaml")
    assert cfg.train.learning_rate == 1.0 and type(cfg.train.learning_rate) is float
    cfg = config_from_dict(with_value("train", "adam_epsilon", "1e-6"), "c.yaml")
    assert cfg.train.adam_epsilon == 1e-6


def test_integer_memory_limit_is_bytes_kept_as_a_string():
    cfg = config_from_dict(with_value("offload", "cpu_memory_limit", 4096), "c.yaml")
    assert cfg.offload.cpu_memory_limit == "4096"


def test_resume_true_means_auto_and_false_means_none():
    assert config_from_dict(with_value("train", "resume_from_checkpoint", True), "c").train.resume_from_checkpoint == "auto"
    assert config_from_dict(with_value("train", "resume_from_checkpoint", False), "c").train.resume_from_checkpoint is None
    assert config_from_dict(with_value("train", "resume_from_checkpoint", "runs/x/ckpt-5"), "c").train.resume_from_checkpoint == "runs/x/ckpt-5"


@pytest.mark.parametrize(("warmup", "total", "expected"), [(0, 100, 0), (0.1, 100, 10), (0.05, 30, 2), (20, 100, 20)])
def test_warmup_steps_below_one_are_a_ratio(warmup, total, expected):
    assert TrainConfig(output_dir="o", warmup_steps=warmup).num_warmup_steps(total) == expected


def test_a_bare_no_is_the_eval_strategy_no(tmp_path):
    """YAML reads ``eval_strategy: no`` as false: it means the documented value ``no``."""
    text = "model: {config: {model_type: llama}}\ndata: {path: corpus.txt}\ntrain: {output_dir: runs/x, eval_strategy: no}\n"
    assert load_config(write(tmp_path, text)).train.eval_strategy == "no"


def test_lr_scheduler_kwargs_are_a_mapping(tmp_path):
    doc = minimal()
    doc["train"].update(lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1})
    assert load_config(write(tmp_path, doc)).train.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    doc["train"]["lr_scheduler_kwargs"] = [0.1]
    with pytest.raises(ConfigError, match="train.lr_scheduler_kwargs"):
        load_config(write(tmp_path, doc))


def test_config_dict_is_not_shared_with_the_input():
    d = minimal()
    cfg = config_from_dict(d, "c.yaml")
    d["model"]["config"]["hidden_size"] = 128
    assert cfg.model.config == {"model_type": "llama", "hidden_size": 64}


# ---------------------------------------------------------------------------------------------
# Names: unknown sections and keys, missing keys, model source


def test_unknown_key_names_it_and_suggests_the_closest(tmp_path):
    path = write(tmp_path, with_value("train", "learning_rat", 1e-4))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert one_line(info.value) == f"unknown key 'train.learning_rat' in {path}; did you mean 'learning_rate'?"


def test_unknown_key_is_reported_before_missing_required_keys():
    d = minimal()
    d["train"] = {"ouput_dir": "o"}
    assert "unknown key 'train.ouput_dir'" in error_of(d) and "'output_dir'" in error_of(d)


def test_unknown_key_without_close_match_lists_valid_keys():
    message = error_of(with_value("data", "zzzz", 1))
    assert "unknown key 'data.zzzz' in config.yaml" in message and "text_field" in message


def test_unknown_section_suggests_the_closest():
    d = minimal()
    d["trainer"] = {}
    assert error_of(d) == "unknown section 'trainer' in config.yaml; did you mean 'train'?"


def test_section_that_is_not_a_mapping():
    d = minimal()
    d["data"] = ["corpus.txt"]
    message = error_of(d)
    assert "section 'data'" in message and "mapping" in message and "a list" in message


@pytest.mark.parametrize(("section", "key"), [("data", "path"), ("train", "output_dir")])
def test_missing_required_key(section, key):
    d = minimal()
    del d[section][key]
    message = error_of(d)
    assert f"{section}.{key} is required" in message and "config.yaml" in message and "e.g." in message


def test_missing_data_section_reports_data_path():
    d = minimal()
    del d["data"]
    assert "data.path is required" in error_of(d)


@pytest.mark.parametrize("model", [{}, None, {"dtype": "float32"}])
def test_neither_name_or_path_nor_config(model):
    d = minimal()
    d["model"] = model
    message = error_of(d)
    assert "model.name_or_path" in message and "model.config" in message and "config.yaml" in message


def test_both_name_or_path_and_config():
    d = minimal()
    d["model"]["name_or_path"] = "/models/x"
    message = error_of(d)
    assert "both" in message and "keep one" in message


def test_model_config_needs_a_known_model_type():
    d = minimal()
    d["model"]["config"]["model_type"] = "lama"
    assert "did you mean 'llama'?" in error_of(d)
    del d["model"]["config"]["model_type"]
    assert "model.config.model_type" in error_of(d)


def test_model_config_must_be_a_mapping():
    d = minimal()
    d["model"]["config"] = "llama"
    message = error_of(d)
    assert "model.config in config.yaml must be a mapping" in message and "'llama'" in message


def test_top_level_must_be_a_mapping():
    assert "top level" in error_of(["model"], "c.yaml")


# ---------------------------------------------------------------------------------------------
# Values: types, ranges, choices


BAD_VALUES = [
    # (section, key, value, words the message must hold besides the key and the value)
    ("data", "seq_len", "512", "an integer"),
    ("data", "seq_len", 512.0, "an integer"),
    ("data", "seq_len", True, "an integer"),  # bool is not an int
    ("data", "seq_len", 0, ">= 1"),
    ("data", "seq_len", -5, ">= 1"),
    ("data", "shuffle", "yes please", "true or false"),
    ("data", "shuffle", 1, "true or false"),
    ("data", "path", 12, "string"),
    ("data", "path", "", "string"),
    ("data", "text_field", None, "string"),
    ("model", "trust_remote_code", "no way", "true or false"),
    ("train", "max_steps", 0, "-1"),
    ("train", "max_steps", -2, "-1"),
    ("train", "max_steps", False, "-1"),
    ("train", "num_train_epochs", 0, "> 0"),
    ("train", "num_train_epochs", "abc", "a number"),
    ("train", "micro_batch_size", 0, ">= 1"),
    ("train", "micro_batch_size", True, "an integer"),
    ("train", "gradient_accumulation_steps", -1, ">= 1"),
    ("train", "learning_rate", 0, "> 0"),
    ("train", "learning_rate", -1e-4, "> 0"),
    ("train", "learning_rate", True, "a number"),  # bool is not a number either
    ("train", "learning_rate", "fast", "a number"),
    ("train", "learning_rate", float("nan"), "a number"),
    ("train", "learning_rate", float("inf"), "a number"),
    ("train", "learning_rate", [1e-4], "a number"),
    ("train", "warmup_steps", -1, ">= 0"),
    ("train", "warmup_steps", 1.5, "whole number"),
    ("train", "weight_decay", -0.1, ">= 0"),
    ("train", "adam_beta1", 1.0, "< 1"),
    ("train", "adam_beta2", -0.1, ">= 0"),
    ("train", "adam_epsilon", 0, "> 0"),
    ("train", "max_grad_norm", -1, ">= 0"),
    ("train", "seed", -1, ">= 0"),
    ("train", "seed", 2**32, "< 4294967296"),
    ("train", "seed", "42", "an integer"),
    ("train", "logging_steps", 0, ">= 1"),
    ("train", "save_steps", -1, ">= 0"),
    ("train", "save_total_limit", 0, ">= 1"),
    ("train", "resume_from_checkpoint", 3, "string"),
    ("offload", "nvme_path", 5, "string"),
    ("offload", "recompute", "sometimes", "auto, true or false"),
    ("offload", "prefetch_depth", -1, ">= 0 or auto"),
    ("offload", "prefetch_depth", True, ">= 0 or auto"),
    ("offload", "trace", "on", "true or false"),
    ("offload", "io_threads", 0, ">= 1"),
]


@pytest.mark.parametrize(("section", "key", "value", "words"), BAD_VALUES)
def test_bad_value_names_key_rule_and_value(section, key, value, words):
    message = error_of(with_value(section, key, value))
    assert message.startswith(f"{section}.{key} in config.yaml must be "), message
    assert words in message
    shown = ("true" if value else "false") if isinstance(value, bool) else "null" if value is None else repr(value)
    assert f"got {shown}" in message, message


def test_wrong_type_message_shows_the_type_and_an_example():
    assert error_of(with_value("data", "seq_len", "big")) == (
        "data.seq_len in config.yaml must be an integer >= 1, got 'big' (a string); "
        "e.g. seq_len: 512 (the default)")


@pytest.mark.parametrize(("section", "key", "value", "choices", "suggestion"), [
    ("model", "dtype", "bf16", "float32, bfloat16, float16", "'bfloat16'"),
    ("train", "lr_scheduler_type", "cosin", "linear, cosine", "'cosine'"),
    ("train", "nan_policy", "ignore", "stop, skip", None),
    ("offload", "io_backend", "kvkio", "auto, kvikio, posix, aio", "'kvikio'"),
    ("offload", "optimizer_impl", "deepspeeed", "auto, deepspeed, torch", "'deepspeed'"),
    ("offload", "engine", "naive", "native, reference", "'native'"),
    ("offload", "engine", 3, "native, reference", None),
])
def test_bad_choice_lists_the_valid_ones(section, key, value, choices, suggestion):
    message = error_of(with_value(section, key, value))
    assert message.startswith(f"{section}.{key} in config.yaml must be one of {choices}"), message
    assert f"got {value!r}" in message
    if suggestion:
        assert message.endswith(f"did you mean {suggestion}?")


@pytest.mark.parametrize("value", ["8 GX", "lots", "GB", "-1GB", "0", "0.5", "1.5.2G", "", True, [8]])
def test_bad_memory_limit(value):
    message = error_of(with_value("offload", "gpu_memory_limit", value))
    assert message.startswith("offload.gpu_memory_limit in config.yaml must be 'auto' or a size"), message
    assert "e.g. '8GB'" in message


def test_constructing_in_python_validates_too():
    with pytest.raises(ConfigError, match=r"^train\.learning_rate must be a number > 0, got -1"):
        TrainConfig(output_dir="o", learning_rate=-1)
    with pytest.raises(ConfigError, match="model.name_or_path"):
        ModelConfig()


def test_config_error_is_an_offload_error_and_pickles():
    err = ConfigError("a\nb")
    assert isinstance(err, OffloadError) and str(err) == "a b"
    assert str(pickle.loads(pickle.dumps(err))) == "a b"


# ---------------------------------------------------------------------------------------------
# Files


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert "config file not found" in one_line(info.value) and "nope.yaml" in str(info.value)


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


@pytest.mark.parametrize(("text", "line"), [
    ("model:\n  name_or_path: x\n data: 3\n", 3),
    ("train: {output_dir: o\n", 2),
    ("data:\n  path: 'unclosed\n", 3),
    ("\tmodel: 1\n", 1),
])
def test_invalid_yaml_is_one_line_with_the_line_number(tmp_path, text, line):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = one_line(info.value)
    assert message.startswith(f"invalid YAML in {path} at line {line},"), message


def test_duplicate_key_is_an_error_with_its_line(tmp_path):
    path = write(tmp_path, "data:\n  path: a\n  seq_len: 8\n  seq_len: 16\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "at line 4" in one_line(info.value) and "'seq_len' is given twice" in str(info.value)


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    text = ("model: {config: {model_type: llama}}\n"
            "data:\n  <<: {seq_len: 8, path: a}\n  seq_len: 16\n"
            "train: {output_dir: o}\n")
    assert load_config(write(tmp_path, text)).data == DataConfig(path="a", seq_len=16)


@pytest.mark.parametrize("text", ["", "\n", "# just a comment\n", "---\n"])
def test_empty_file(tmp_path, text):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert "is empty" in one_line(info.value)


@pytest.mark.parametrize(("text", "got"), [("- model\n- data\n", "a list"), ("just text\n", "a string")])
def test_top_level_not_a_mapping(tmp_path, text, got):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    message = one_line(info.value)
    assert "mapping of sections" in message and got in message


def test_non_utf8_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_bytes(b"data:\n  path: \xff\xfe\n")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(path)


# ---------------------------------------------------------------------------------------------
# --set overrides


def test_overrides_parse_values_as_yaml(tmp_path):
    path = write(tmp_path, minimal())
    cfg = load_config(path, [
        "train.learning_rate=1e-4", "train.max_steps=3", "data.shuffle=false",
        "offload.prefetch_depth=2", "offload.recompute=true", "train.save_total_limit=null",
        "data.path=/data/my corpus.txt", "offload.gpu_memory_limit=8GiB",
    ])
    assert cfg.train.learning_rate == 1e-4 and cfg.train.max_steps == 3
    assert cfg.data.shuffle is False and cfg.data.path == "/data/my corpus.txt"
    assert cfg.offload.prefetch_depth == 2 and cfg.offload.recompute is True
    assert cfg.offload.gpu_memory_limit == "8GiB"


def test_overrides_reach_inside_model_config(tmp_path):
    path = write(tmp_path, minimal())
    cfg = load_config(path, ["model.config.hidden_size=128", "model.config.rope_scaling.factor=2.0",
                             "model.config.layer_types=[full, sliding]"])
    assert cfg.model.config == {"model_type": "llama", "hidden_size": 128, "rope_scaling": {"factor": 2.0},
                                "layer_types": ["full", "sliding"]}
    with pytest.raises(ConfigError, match="has no 'extra'"):  # a key LlamaConfig does not know
        load_config(path, ["model.config.extra={a: 1}"])


def test_overrides_can_switch_the_model_source(tmp_path):
    path = write(tmp_path, minimal())
    cfg = load_config(path, ["model.config=null", "model.name_or_path=/models/x"])
    assert cfg.model == ModelConfig(name_or_path="/models/x")


def test_override_creates_a_missing_section(tmp_path):
    d = minimal()
    del d["train"]
    cfg = load_config(write(tmp_path, d), ["train.output_dir=runs/y"])
    assert cfg.train.output_dir == "runs/y"


def test_overrides_do_not_change_the_last_file_value_silently(tmp_path):
    path = write(tmp_path, with_value("data", "seq_len", 64))
    assert load_config(path, ["data.seq_len=32", "data.seq_len=16"]).data.seq_len == 16


@pytest.mark.parametrize(("override", "words"), [
    ("train.learning_rat=1", "unknown key 'train.learning_rat' in --set train.learning_rat=1; did you mean 'learning_rate'?"),
    ("trian.seed=1", "unknown section 'trian' in --set trian.seed=1; did you mean 'train'?"),
    ("train.seed", "expected section.key=value"),
    ("seed=3", "expected section.key=value"),
    ("train..seed=3", "expected section.key=value"),
    ("train.seed.x=3", "train.seed is not a mapping"),
    ("train.seed=[1,", "invalid YAML in --set train.seed=[1,"),
    ("train.seed=abc", "train.seed (from --set) must be an integer >= 0 and < 4294967296, got 'abc'"),
    ("model.name_or_path=/m", "both model.name_or_path and model.config"),
    ("model.config=7", "model.config (from --set) must be a mapping"),
])
def test_bad_override(tmp_path, override, words):
    path = write(tmp_path, minimal())
    with pytest.raises(ConfigError) as info:
        load_config(path, [override])
    assert words in one_line(info.value)


def test_value_errors_from_the_file_name_the_file_even_with_overrides(tmp_path):
    path = write(tmp_path, with_value("data", "seq_len", -1))
    with pytest.raises(ConfigError, match=f"^data.seq_len in {path} must be"):
        load_config(path, ["train.seed=3"])


def test_nested_override_on_a_non_mapping_value(tmp_path):
    d = minimal()
    d["model"]["config"]["rope_scaling"] = 3
    with pytest.raises(ConfigError, match="not a mapping") as info:
        load_config(write(tmp_path, d), ["model.config.rope_scaling.factor=2"])
    one_line(info.value)


# ---------------------------------------------------------------------------------------------
# Round trip


def test_to_dict_is_plain_and_round_trips_through_yaml(tmp_path):
    cfg = load_config(write(tmp_path, FULL_YAML))
    d = cfg.to_dict()
    assert list(d) == ["model", "data", "train", "offload"]
    assert d["offload"]["gpu_memory_limit"] == "20GiB" and d["offload"]["nvme_path"] == "/nvme/swap"
    text = dump_yaml(cfg)
    assert yaml.safe_load(text) == d
    again = load_config(write(tmp_path, text, "again.yaml"))
    assert again == cfg
    assert again is not cfg and again.model is not cfg.model


@pytest.mark.parametrize("overrides", [[], ["train.learning_rate=3e-4", "offload.recompute=auto",
                                            "train.warmup_steps=0.05", "train.adam_epsilon=1e-12"]])
def test_defaults_round_trip(tmp_path, overrides):
    cfg = load_config(write(tmp_path, minimal()), overrides)
    assert config_from_dict(yaml.safe_load(dump_yaml(cfg)), "dump") == cfg
    assert cfg.to_dict()["offload"]["nvme_path"] is None  # resolved only by offload_nvme_path


def test_to_dict_does_not_share_state():
    cfg = config_from_dict(minimal(), "c")
    d = cfg.to_dict()
    d["model"]["config"]["hidden_size"] = 1
    assert cfg.model.config["hidden_size"] == 64


def test_run_config_positional():
    parts = config_from_dict(minimal(), "c")
    assert RunConfig(parts.model, parts.data, parts.train, parts.offload) == parts
    assert copy.deepcopy(parts) == parts


# ---------------------------------------------------------------------------------------------
# Sizes


@pytest.mark.parametrize(("text", "expected"), [
    ("1024", 1024),
    (1024, 1024),
    ("1B", 1),
    ("8GB", 8 * 10**9),
    ("8gb", 8 * 10**9),
    ("8 GiB", 8 * 2**30),
    ("8G", 8 * 2**30),
    ("8g", 8 * 2**30),
    ("512MiB", 512 * 2**20),
    ("512MB", 512 * 10**6),
    ("512M", 512 * 2**20),
    ("64k", 64 * 1024),
    ("64K", 64 * 1024),
    ("64KB", 64_000),
    ("64KiB", 65_536),
    ("1.5TB", 1_500_000_000_000),
    ("1.5TiB", 3 * 2**39),
    ("1.5 T", 3 * 2**39),
    ("2PB", 2 * 10**15),
    ("2PiB", 2 * 2**50),
    (".5K", 512),
    ("1.K", 1024),
    ("0.3KB", 300),
    ("1.0", 1),
    ("  16 MiB  ", 16 * 2**20),
    ("+3k", 3072),
    ("1.0000000001KiB", 1024),  # fractions of a byte round down
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", " ", "GB", "abc", "8 GX", "8 Gbit", "1.5", "0.5B", "0", "0GB", "-1GB", "-3",
                                  "1e9", "1,024", "8 G B", "1.2.3", ".", True, None, 1.5, 0, -7])
def test_parse_size_rejects_with_a_quoted_value_and_an_example(text):
    with pytest.raises(ConfigError) as info:
        parse_size(text)
    message = one_line(info.value)
    assert "e.g. '8GB'" in message
    if isinstance(text, str):
        assert repr(text) in message


UNITS = {"": 1, "B": 1, "K": 2**10, "k": 2**10, "KiB": 2**10, "KB": 10**3, "M": 2**20, "MiB": 2**20,
         "MB": 10**6, "G": 2**30, "GiB": 2**30, "GB": 10**9, "T": 2**40, "TiB": 2**40, "TB": 10**12,
         "P": 2**50, "PiB": 2**50, "PB": 10**15}


@given(n=st.integers(min_value=1, max_value=10**18), unit=st.sampled_from(sorted(UNITS)),
       space=st.sampled_from(["", " "]))
def test_parse_size_of_formatted_integers_round_trips(n, unit, space):
    assert parse_size(f"{n}{space}{unit}") == n * UNITS[unit]
    assert parse_size(f"{n}{space}{unit.lower()}") == n * UNITS[unit]


@given(n=st.integers(min_value=1, max_value=2**60))
def test_parse_size_reads_format_bytes(n):
    # format_bytes keeps 2 decimals of its unit: back within half a hundredth of that unit, plus
    # the byte lost rounding down (exact below 1 KiB)
    unit = 1
    while unit < 2**40 and n >= unit * 1024:
        unit *= 1024
    back = parse_size(format_bytes(n))
    assert back == n if unit == 1 else abs(back - n) <= 0.005 * unit + 1


def test_resolve_memory_limit():
    assert AUTO_MEMORY_FRACTION == 0.8
    assert resolve_memory_limit("auto", 10 * 2**30) == 8 * 2**30
    assert resolve_memory_limit("4GiB", 10 * 2**30) == 4 * 2**30
    assert resolve_memory_limit("4096", 1) == 4096
    with pytest.raises(ConfigError, match="cannot parse size 'lots'"):
        resolve_memory_limit("lots", 1)


def test_pure_bf16_states_narrow_the_optimizer_and_refuse_deepspeed():
    base = {"model": {"config": {"model_type": "llama"}, "dtype": "bfloat16", "state_dtype": "bfloat16"},
            "data": {"path": "corpus.jsonl"}, "train": {"output_dir": "runs/x"}}
    cfg = config_from_dict(base)
    assert cfg.model.state_dtype == "bfloat16" and cfg.optimizer_impl == "torch"  # auto -> torch
    assert config_from_dict({**base, "model": {**base["model"], "state_dtype": "float32"}}).optimizer_impl == "auto"
    with pytest.raises(ConfigError, match="offload.optimizer_impl deepspeed.* takes float32 optimizer states only") as err:
        config_from_dict({**base, "offload": {"optimizer_impl": "deepspeed"}})
    assert "\n" not in str(err.value)
    # the in-memory reference engine trains in one dtype: a bf16 model with fp32 states is not it
    mixed = {**base, "model": {**base["model"], "state_dtype": "float32"}, "offload": {"engine": "reference"}}
    with pytest.raises(ConfigError, match="offload.engine reference.* trains in one dtype"):
        config_from_dict(mixed)
    assert config_from_dict({**base, "offload": {"engine": "reference"}}).offload.engine == "reference"
