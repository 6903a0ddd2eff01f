"""CPU AdamW over flat buffers (master weights, gradient, exp_avg, exp_avg_sq): fp32, or bf16
for pure bf16 training (torch implementation only).

Two implementations with one call shape, ``step(params, grads, exp_avg, exp_avg_sq, step, lr)``:

- ``torch``: ``torch.optim.adamw.adamw(..., fused=True)`` on CPU tensors (no compilation);
- ``deepspeed``: DeepSpeed's ``cpu_adam`` op (AVX2/AVX512, OpenMP), JIT-compiled on first use
  (about a minute, then cached under ~/.cache/torch_extensions).

Both are decoupled-weight-decay AdamW with bias correction, the math of ``torch.optim.AdamW``.
Hyper-parameters other than lr are fixed per instance; lr comes with each call so any scheduler
works. ``step`` is the 1-based optimizer step of these buffers. The update is in place.

``choose_impl("auto")`` measures both on this machine: speed, and how much a concurrent Python
thread still runs during the step (the thread that launches GPU work must not starve).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch.optim.adam import adam as _torch_adam

log = logging.getLogger(__name__)

IMPL_NAMES = ("auto", "torch", "deepspeed")


@dataclass(frozen=True)
class AdamWConfig:
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0


class FlatAdamW(Protocol):
    name: str

    def step(self, params: torch.Tensor, grads: torch.Tensor, exp_avg: torch.Tensor,
             exp_avg_sq: torch.Tensor, step: int, lr: float, weight_decay: float | None = None) -> None:
        """One AdamW step in place; ``weight_decay`` overrides the config's (0 for the parameters
        Trainer exempts: biases and normalization weights)."""
        ...

    def close(self) -> None: ...


def _check(params: torch.Tensor, grads: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
           dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> None:
    """All four: contiguous CPU tensors of one dtype from ``dtypes``, of one length."""
    if params.dtype not in dtypes:
        raise ValueError(f"params are {params.dtype}; this AdamW takes {', '.join(map(str, dtypes))}")
    for name, t in (("params", params), ("grads", grads), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.dtype != params.dtype or t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {params.dtype} CPU tensor, got {t.dtype} on {t.device}")
        if t.numel() != params.numel():
            raise ValueError(f"{name} has {t.numel()} elements, params {params.numel()}")


class TorchFusedAdamW:
    """``torch.optim.adamw`` functional kernel with ``fused=True`` on CPU."""

    name = "torch"

    def __init__(self, config: AdamWConfig) -> None:
        self.config = config

    def step(self, params: torch.Tensor, grads: torch.Tensor, exp_avg: torch.Tensor,
             exp_avg_sq: torch.Tensor, step: int, lr: float, weight_decay: float | None = None) -> None:
        # bf16 buffers: pure bf16 training, the kernel's math in fp32 and each result rounded
        # to bf16, as torch.optim.AdamW(fused=True) does for a bf16 model in memory
        _check(params, grads, exp_avg, exp_avg_sq, (torch.float32, torch.bfloat16))
        # The fused kernel increments the step tensor before using it.
        step_t = torch.tensor(float(step - 1), dtype=torch.float32)
        _torch_adam(
            [params], [grads], [exp_avg], [exp_avg_sq], [], [step_t],
            fused=True, decoupled_weight_decay=True, amsgrad=False,
            beta1=self.config.betas[0], beta2=self.config.betas[1], lr=lr,
            weight_decay=self.config.weight_decay if weight_decay is None else weight_decay,
            eps=self.config.eps, maximize=False,
        )

    def close(self) -> None:
        pass


_ds_ids = itertools.count(1_000_000)  # well clear of DeepSpeedCPUAdam's own counter


def _fp32_beta_shortfall(beta: float) -> float:
    """(1 - beta) in float64 minus what DeepSpeed's kernel uses: 1 - beta, both in fp32."""
    return float(1.0 - beta) - float(np.float32(1.0) - np.float32(beta))


class DeepSpeedFlatAdamW:
    """DeepSpeed's ``cpu_adam`` op called directly on flat buffers (no torch.optim wrapper)."""

    name = "deepspeed"

    def __init__(self, config: AdamWConfig) -> None:
        self.config = config
        self._op = None
        self._id = next(_ds_ids)
        # what the kernel's fp32 (1 - beta) leaves out of each moment (see ``step``)
        self._shortfall = tuple(_fp32_beta_shortfall(b) for b in config.betas)

    def _load(self):  # noqa: ANN202 - the op module has no type
        if self._op is None:
            from deepspeed.ops.op_builder import CPUAdamBuilder

            t0 = time.perf_counter()
            op = CPUAdamBuilder().load(verbose=False)
            if time.perf_counter() - t0 > 5:
                log.info("compiled DeepSpeed cpu_adam in %.0f s (cached from now on)", time.perf_counter() - t0)
            b1, b2 = self.config.betas
            op.create_adam(self._id, 1e-3, b1, b2, self.config.eps, self.config.weight_decay, True, False)
            self._op = op
        return self._op

    def step(self, params: torch.Tensor, grads: torch.Tensor, exp_avg: torch.Tensor,
             exp_avg_sq: torch.Tensor, step: int, lr: float, weight_decay: float | None = None) -> None:
        _check(params, grads, exp_avg, exp_avg_sq)
        op = self._load()
        b1, b2 = self.config.betas
        decay = self.config.weight_decay if weight_decay is None else weight_decay
        op.adam_update(self._id, step, lr, b1, b2, self.config.eps, decay, True,
                       params, grads, exp_avg, exp_avg_sq)
        # The kernel takes (1 - beta) in fp32 from an fp32 beta: 0.00099998713 for beta2 = 0.999,
        # 1.3e-5 short of torch's 0.001 (2.4e-7 for beta1 = 0.9, which still adds up past 1e-6
        # over steps). Add the missing share of g and g^2 to the moments so they equal
        # torch.optim.AdamW's: two more passes over the buffers, the price of the same math. The
        # weights' update already used the kernel's moments: a difference below their fp32 resolution.
        d1, d2 = self._shortfall
        if d1:
            exp_avg.add_(grads, alpha=d1)
        if d2:
            exp_avg_sq.addcmul_(grads, grads, value=d2)

    def close(self) -> None:
        if self._op is not None:
            self._op.destroy_adam(self._id)
            self._op = None


def make_adamw(impl: str, config: AdamWConfig) -> FlatAdamW:
    if impl == "torch":
        return TorchFusedAdamW(config)
    if impl == "deepspeed":
        return DeepSpeedFlatAdamW(config)
    raise ValueError(f"unknown optimizer_impl {impl!r}; choose one of {', '.join(IMPL_NAMES)}")


@dataclass(frozen=True)
class AdamWMeasurement:
    impl: str
    params_per_s: float
    thread_share: float  # iterations/s of a pure-Python thread during the step / alone


def measure_impl(impl: str, numel: int = 8_000_000, repeats: int = 3) -> AdamWMeasurement:
    """Speed of one implementation, and the share of progress a concurrent Python thread keeps."""
    opt = make_adamw(impl, AdamWConfig(weight_decay=0.01))
    g = torch.Generator().manual_seed(0)
    p, grad = torch.randn(numel, generator=g), torch.randn(numel, generator=g)
    m, v = torch.zeros(numel), torch.zeros(numel)
    try:
        opt.step(p, grad, m, v, 1, 1e-3)  # warm-up (and JIT load)
        alone = _python_rate(0.2)
        stop = threading.Event()
        counts = [0]

        def spin() -> None:
            while not stop.is_set():
                counts[0] += 1

        thread = threading.Thread(target=spin, daemon=True)
        thread.start()
        t0 = time.perf_counter()
        for i in range(repeats):
            opt.step(p, grad, m, v, i + 2, 1e-3)
        elapsed = time.perf_counter() - t0
        stop.set()
        thread.join()
        during = counts[0] / elapsed
    finally:
        opt.close()
    return AdamWMeasurement(impl, numel * repeats / elapsed, min(during / alone, 1.0))


def _python_rate(duration_s: float) -> float:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < duration_s:
        n += 1
    return n / duration_s


def choose_impl(requested: str = "auto", min_thread_share: float = 0.25) -> tuple[str, list[AdamWMeasurement]]:
    """Resolve ``auto``: the fastest implementation that leaves a concurrent Python thread at
    least ``min_thread_share`` of its speed; if none does, the one that starves it least."""
    if requested not in IMPL_NAMES:
        raise ValueError(f"unknown optimizer_impl {requested!r}; choose one of {', '.join(IMPL_NAMES)}")
    if requested != "auto":
        return requested, []
    results = []
    for impl in ("torch", "deepspeed"):
        try:
            results.append(measure_impl(impl, numel=16_000_000, repeats=5))
        except Exception as err:  # noqa: BLE001 - an unusable impl is skipped, and said so
            log.warning("optimizer_impl %s is not usable here: %s", impl, err)
    if not results:
        raise RuntimeError("no CPU AdamW implementation works on this machine")
    fair = [r for r in results if r.thread_share >= min_thread_share]
    best = max(fair, key=lambda r: r.params_per_s) if fair else max(results, key=lambda r: r.thread_share)
    for r in results:
        log.info("cpu adam %-9s %7.1f M params/s, concurrent thread keeps %3.0f%%",
                 r.impl, r.params_per_s / 1e6, 100 * r.thread_share)
    log.info("optimizer_impl auto -> %s", best.impl)
    return best.impl, results
