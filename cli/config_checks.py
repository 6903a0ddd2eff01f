"""Checks of ``cli/config.py`` that need more than a dataclass field: the keys inside
``model.config`` against the transformers config class of its ``model_type``, Hugging Face
TrainingArguments names that the project spells otherwise, and YAML comments in ``--set`` values.

Each function returns what is wrong (or None); ``cli/config.py`` words and raises the ConfigError.
"""

from __future__ import annotations

import difflib
import inspect
import logging
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import yaml

COMMON_MODEL_KEYS = frozenset({
    "model_type", "architectures", "dtype", "torch_dtype", "tie_word_embeddings", "tie_encoder_decoder",
    "attn_implementation", "_attn_implementation", "experts_implementation", "rope_scaling",
    "rope_parameters", "rope_theta", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
    "decoder_start_token_id", "output_router_logits", "router_aux_loss_coef", "use_cache",
    "output_attentions", "output_hidden_states", "return_dict", "is_encoder_decoder", "is_decoder",
    "add_cross_attention", "chunk_size_feed_forward", "id2label", "label2id", "num_labels",
    "problem_type", "tokenizer_class", "prefix", "task_specific_params", "finetuning_task",
    "pruned_heads", "transformers_version", "_name_or_path", "name_or_path", "use_bfloat16",
    "quantization_config", "initializer_range", "gradient_checkpointing", "_commit_hash",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens", "torchscript", "auto_map", "base_model_tp_plan",
    "base_model_pp_plan", "_attn_implementation_autoset", "use_return_dict",
    "hidden_activation",  # in the config.json of Gemma checkpoints on the Hub, unused since transformers 5
})
"""PretrainedConfig's common attributes (and legacy names that it still reads, or that config.json
files of the Hub hold): always accepted."""


def config_class(model_type: str) -> Any:
    """The transformers config class of ``model_type``, or None."""
    from transformers import CONFIG_MAPPING

    try:
        return CONFIG_MAPPING[model_type]
    except Exception:  # an unknown type is reported by ModelConfig; a broken import by transformers
        return None


@lru_cache(maxsize=64)
def known_model_keys(model_type: str) -> frozenset[str] | None:
    """Keys the config class of ``model_type`` knows: its default instance's attributes and
    ``to_dict()``, its ``__init__`` parameters (whole MRO), its ``attribute_map`` and sub-configs,
    and PretrainedConfig's common ones. None when the class cannot be found."""
    cls = config_class(model_type)
    if cls is None:
        return None
    from transformers import PretrainedConfig

    known = set(COMMON_MODEL_KEYS)
    for klass in (PretrainedConfig, cls):
        try:
            with _quiet():
                instance = klass()
            known |= set(instance.to_dict()) | set(vars(instance))
        except Exception:  # a class that needs arguments: its signature below still counts
            pass
    for klass in inspect.getmro(cls):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            params = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):
            continue
        known |= {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self"}
        known |= set(getattr(klass, "attribute_map", None) or {})
        known |= set(getattr(klass, "sub_configs", None) or {})
    return frozenset(known)


class _quiet:
    """Silence transformers' logger while probing config classes."""

    def __enter__(self) -> None:
        self._logger = logging.getLogger("transformers")
        self._level = self._logger.level
        self._logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        self._logger.setLevel(self._level)


def _consumed(model_type: str, key: str, value: Any) -> bool:
    """True when the config class takes ``key`` itself (a legacy name it converts, a kwarg it pops):
    only a key it does not know is kept as a plain attribute of that name."""
    cls = config_class(model_type)
    try:
        with _quiet():
            instance = cls(**{key: value})
    except Exception:  # the value is refused: transformers says why when the model is built
        return True
    return key not in vars(instance)


def unknown_model_key(fields: Mapping[str, Any]) -> tuple[str, str | None] | None:
    """The first key of ``model.config`` that its model_type's config class does not know, with
    the closest known key (or None); None when every key is known or the class is not found."""
    model_type = fields.get("model_type")
    known = known_model_keys(model_type) if isinstance(model_type, str) else None
    if known is None:
        return None
    for key, value in fields.items():
        if key in known or _consumed(model_type, key, value):
            continue
        public = sorted(k for k in known if not k.startswith("_"))
        close = difflib.get_close_matches(key, public, n=1, cutoff=0.6)
        return key, (close[0] if close else None)
    return None


KEY_HINTS: dict[str, str] = {
    "train.per_device_train_batch_size": "did you mean 'micro_batch_size' (sequences per forward/backward, "
                                         "what TrainingArguments calls per_device_train_batch_size)?",
    "train.train_batch_size": "did you mean 'micro_batch_size' (sequences per forward/backward)?",
    "train.batch_size": "did you mean 'micro_batch_size' (sequences per forward/backward)?",
    "train.warmup_ratio": "use 'warmup_steps': a value below 1 is a ratio of the total optimizer steps",
    "train.bf16": "the compute dtype is model.dtype: set model.dtype: bfloat16",
    "train.fp16": "the compute dtype is model.dtype: set model.dtype: float16",
    "train.optim": "the optimizer is always AdamW; offload.optimizer_impl picks its CPU kernel "
                   "(auto, deepspeed, torch)",
    "train.gradient_checkpointing": "recomputation is offload.recompute (auto, true, false)",
    "train.lr": "did you mean 'learning_rate'?",
}
"""Hints for Hugging Face names (TrainingArguments) whose meaning the project spells otherwise."""


def key_hint(section: str, key: object) -> str | None:
    return KEY_HINTS.get(f"{section}.{key}")


def comment_cut(text: str) -> bool:
    """True when YAML would drop part of ``text`` as a comment (``runs/exp #2`` reads as ``runs/exp``)."""
    stripped = text.strip()
    if "#" not in stripped:
        return False
    try:
        node = yaml.compose(stripped, Loader=yaml.SafeLoader)
    except yaml.YAMLError:  # _parse_yaml reports the syntax
        return False
    end = 0 if node is None else node.end_mark.index
    return bool(stripped[end:].strip())


def is_plain_text(text: str) -> bool:
    """A value written without quotes, brackets or braces (YAML's plain scalar)."""
    stripped = text.strip()
    return bool(stripped) and stripped[0] not in "'\"[{&*!|>%@`"
