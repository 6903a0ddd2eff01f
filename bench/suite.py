"""The benchmark suites: one model, batch and step count each, the same for every engine."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Suite:
    """A Llama-shaped model (random init, fp32) trained for ``steps`` steps on fixed batches."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    batch: int
    seq_len: int
    steps: int  # step 0 is warm-up: medians use steps 1..steps-1
    learning_rate: float = 1e-3
    ram_budget_share: float = 0.25  # offload-train's DEVICE + HOST budget / fp32 training state
    device_share: float = 0.7  # DEVICE part of that budget (on a CPU box both are RAM)
    fio_size_bytes: int = 1 << 30
    zero_prefetch_bucket_numel: int = 5_000_000  # ZeRO-3 stage3_prefetch_bucket_size

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.seq_len

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


SUITES = {
    # 187M parameters, fp32 training state 2.99 GB: 4-7 minutes on a 2-core CPU box (measured).
    "quick": Suite("quick", hidden=1024, intermediate=2816, layers=12, heads=16, vocab=16000,
                   batch=2, seq_len=512, steps=4),
    # 374M parameters (Llama-2 vocabulary), fp32 training state 6.0 GB.
    "full": Suite("full", hidden=1024, intermediate=2816, layers=24, heads=16, vocab=32000,
                  batch=4, seq_len=512, steps=4),
    # 134M parameters, a 32k vocabulary and 512 tokens per step: the head is a quarter of the
    # compute and the optimizer state is amortised over few tokens (the small-batch regime).
    # (a quarter of the state leaves no room for the head's working memory at this vocabulary)
    "small": Suite("small", hidden=768, intermediate=2048, layers=12, heads=12, vocab=32000,
                   batch=1, seq_len=512, steps=4, ram_budget_share=0.35),
    # The GPU check (bench/gpu_check.sh): 704M parameters (fp32 weights 2.8 GB, training state
    # 11.3 GB) against a GPU memory budget of a quarter of the weights (DEVICE = 1/16 of the
    # state), the rest of the budget in RAM: states and most layers on the SSD.
    "gpu": Suite("gpu", hidden=1536, intermediate=4096, layers=24, heads=12, vocab=8000,
                 batch=2, seq_len=512, steps=4, ram_budget_share=0.25, device_share=0.25),
    # A few seconds per engine: for trying the harness itself.
    "tiny": Suite("tiny", hidden=256, intermediate=688, layers=4, heads=4, vocab=2048,
                  batch=2, seq_len=128, steps=3, fio_size_bytes=64 << 20,
                  # half the state: a quarter leaves the planner no room for the working memory of
                  # such a small model (embeddings, head and logits are most of it)
                  ram_budget_share=0.5,
                  # with prefetch, DeepSpeed 0.19.8 fails in step 1 on this model ("param 38
                  # already assigned swap buffer id 6", the LM head); without, it runs
                  zero_prefetch_bucket_numel=0),
}


def llama_config(suite: Suite):  # noqa: ANN201 - a transformers LlamaConfig
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=suite.vocab, hidden_size=suite.hidden, intermediate_size=suite.intermediate,
                       num_hidden_layers=suite.layers, num_attention_heads=suite.heads,
                       num_key_value_heads=suite.heads, max_position_embeddings=suite.seq_len,
                       tie_word_embeddings=False)


def make_batches(suite: Suite) -> list[dict[str, torch.Tensor]]:
    """The same token batches for every engine (seeded)."""
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, suite.vocab, (suite.batch, suite.seq_len), generator=g)}
            for _ in range(suite.steps)]


def llama_param_count(suite: Suite) -> int:
    """Parameters of the Llama model of ``suite`` (untied head, no biases)."""
    h, i = suite.hidden, suite.intermediate
    per_layer = 4 * h * h + 3 * h * i + 2 * h  # q, k, v, o; gate, up, down; two RMSNorms
    return suite.layers * per_layer + 2 * suite.vocab * h + h  # embeddings, head, final norm
