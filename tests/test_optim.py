"""CPU AdamW over flat fp32 buffers against torch.optim.AdamW, elementwise, state included."""

from __future__ import annotations

import pytest
import torch

from offload.optim import AdamWConfig, choose_impl, make_adamw, measure_impl

IMPLS = ["torch", "deepspeed"]

# DeepSpeed's kernel computes (1 - beta) in fp32 from an fp32 beta (0.00099998713 instead of
# 0.001 for beta2 = 0.999); DeepSpeedFlatAdamW adds the missing share back to the moments.
TOLERANCE = {"torch": {"params": 1e-6, "exp_avg": 1e-6, "exp_avg_sq": 1e-6},
             "deepspeed": {"params": 1e-6, "exp_avg": 1e-6, "exp_avg_sq": 1e-6}}


def assert_relative(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-6) -> None:
    """Every element within ``rel`` of the tensor's scale: |a - e| <= rel * max|e| (elementwise).

    Plain per-element relative error is meaningless for the elements that pass through zero;
    the scale of the whole buffer is the right yardstick for fp32 rounding.
    """
    scale = expected.abs().max().item()
    err = (actual - expected).abs()
    worst = int(err.argmax())
    assert err.max().item() <= rel * scale, (
        f"element {worst}: {actual[worst].item()} vs {expected[worst].item()} (scale {scale})")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("numel", [1, 7, 4097, 100_003])
@pytest.mark.parametrize(("betas", "weight_decay"), [((0.9, 0.999), 0.0), ((0.9, 0.95), 0.1)])
def test_matches_torch_adamw_for_20_steps(impl, numel, betas, weight_decay):
    g = torch.Generator().manual_seed(numel)
    p0 = torch.randn(numel, generator=g)
    ref = torch.nn.Parameter(p0.clone())
    ref_opt = torch.optim.AdamW([ref], lr=1e-3, betas=betas, eps=1e-8, weight_decay=weight_decay)
    opt = make_adamw(impl, AdamWConfig(betas=betas, eps=1e-8, weight_decay=weight_decay))
    params, m, v = p0.clone(), torch.zeros(numel), torch.zeros(numel)
    try:
        for step in range(1, 21):
            grad = torch.randn(numel, generator=g)
            lr = 1e-3 * (1 + step % 3)  # a schedule: lr comes with each call
            for group in ref_opt.param_groups:
                group["lr"] = lr
            ref.grad = grad.clone()
            ref_opt.step()
            opt.step(params, grad.clone(), m, v, step, lr)
    finally:
        opt.close()
    state = ref_opt.state[ref]
    tol = TOLERANCE[impl]
    assert_relative(params, ref.detach(), tol["params"])
    assert_relative(m, state["exp_avg"], tol["exp_avg"])
    assert_relative(v, state["exp_avg_sq"], tol["exp_avg_sq"])


@pytest.mark.parametrize("impl", IMPLS)
def test_rejects_wrong_buffers(impl):
    opt = make_adamw(impl, AdamWConfig())
    n = 16
    with pytest.raises(ValueError, match="float16; this AdamW takes torch.float32"):
        opt.step(torch.zeros(n, dtype=torch.float16), torch.zeros(n), torch.zeros(n), torch.zeros(n), 1, 1e-3)
    with pytest.raises(ValueError, match="grads must be a contiguous torch.float32"):  # dtypes must agree
        opt.step(torch.zeros(n), torch.zeros(n, dtype=torch.bfloat16), torch.zeros(n), torch.zeros(n), 1, 1e-3)
    with pytest.raises(ValueError, match="elements"):
        opt.step(torch.zeros(n), torch.zeros(n + 1), torch.zeros(n), torch.zeros(n), 1, 1e-3)
    with pytest.raises(ValueError, match="contiguous"):
        opt.step(torch.zeros(2 * n)[::2], torch.zeros(n), torch.zeros(n), torch.zeros(n), 1, 1e-3)
    opt.close()


def test_torch_impl_takes_bf16_buffers_like_torch_adamw():
    """Pure bf16 training: flat bf16 buffers give torch.optim.AdamW(fused=True)'s bf16 results."""
    g = torch.Generator().manual_seed(3)
    n = 1001
    p0 = torch.randn(n, generator=g).to(torch.bfloat16)
    param = torch.nn.Parameter(p0.clone())
    ref = torch.optim.AdamW([param], lr=1e-2, weight_decay=0.1, fused=True)
    opt = make_adamw("torch", AdamWConfig(weight_decay=0.1))
    flat, m, v = p0.clone(), torch.zeros(n, dtype=torch.bfloat16), torch.zeros(n, dtype=torch.bfloat16)
    for step in range(1, 6):
        grad = torch.randn(n, generator=g).to(torch.bfloat16)
        param.grad = grad.clone()
        ref.step()
        opt.step(flat, grad, m, v, step, 1e-2)
    assert torch.equal(flat, param.detach())
    assert torch.equal(m, ref.state[param]["exp_avg"]) and torch.equal(v, ref.state[param]["exp_avg_sq"])


def test_measurement_and_auto_choice():
    m = measure_impl("torch", numel=1_000_000, repeats=2)
    assert m.params_per_s > 0 and 0 < m.thread_share <= 1
    chosen, results = choose_impl("auto")
    assert chosen in IMPLS and {r.impl for r in results} <= set(IMPLS)
    fair = [r for r in results if r.thread_share >= 0.25]
    if fair:  # the rule: fastest among those that leave a concurrent thread a quarter of its speed
        assert chosen == max(fair, key=lambda r: r.params_per_s).impl
    assert choose_impl("torch") == ("torch", [])
    with pytest.raises(ValueError, match="optimizer_impl"):
        choose_impl("sgd")
