"""FLOPs of one training step of a Llama-shaped decoder (matmuls only, multiply-add = 2 FLOPs).

Per token, forward: 2·P_mm + 4·L·s·h, where P_mm = L·(4h² + 3h·i) + h·V are the weights used
in matmuls (attention q, k, v, o; MLP gate, up, down; LM head; embeddings and norms excluded) and
4·L·s·h is attention (QKᵀ and softmax·V over the full s × s square, causal mask not discounted,
as Megatron-LM counts it). Backward is twice the forward.

    model FLOPs/step    = 3 · T · (2·P_mm + 4·L·s·h) = 6·P_mm·T + 12·L·s·h·T      (T tokens)
    hardware FLOPs/step = model FLOPs + T · (2·P_layers + 4·L·s·h)   with recompute
                          (one more forward of the decoder layers; the head is not recomputed)

Model TFLOPS use model FLOPs (recompute not counted), so engines that recompute and engines that
do not are compared on the same work; hardware TFLOPS count the recompute.
"""

from __future__ import annotations

from dataclasses import dataclass

FORMULA = ("model FLOPs/step = 6*P_mm*T + 12*L*s*h*T (P_mm: matmul weights incl. LM head, no "
           "embeddings; T tokens; full s^2 attention); recompute not counted; hardware FLOPs add "
           "2*P_layers*T + 4*L*s*h*T when layers are recomputed")


@dataclass(frozen=True)
class StepFlops:
    model_flops: float
    hardware_flops: float


def step_flops(hidden: int, intermediate: int, layers: int, vocab: int, seq_len: int, tokens: int,
               recompute: bool) -> StepFlops:
    h, i, n_layers = hidden, intermediate, layers
    layer_mm = 4 * h * h + 3 * h * i
    attention = 4 * n_layers * seq_len * h  # per token, forward
    forward = 2 * (n_layers * layer_mm + h * vocab) + attention
    model = 3.0 * tokens * forward
    extra = tokens * (2 * n_layers * layer_mm + attention) if recompute else 0
    return StepFlops(model, model + extra)


def tflops(flops: float, seconds: float) -> float:
    return flops / seconds / 1e12 if seconds > 0 else 0.0
