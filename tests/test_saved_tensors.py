"""Saved activations swapped through the SSD (``scheduler.saved_tensors.SavedTensors``): each tensor
is written once however many autograd nodes save it, and comes back with its own strides."""

from __future__ import annotations

import torch

from offload.io import PosixBackend
from offload.store import SwapStore
from offload.tiers import Accountant, Tier
from scheduler import placement as placement_rules
from scheduler.placement import Placement, SavedOnce
from scheduler.plan import Plan
from scheduler.saved_tensors import SavedTensors


class _NoWeightViews:
    """The weight streamer's part in packing: no saved tensor here is a view of loaded weights."""

    def token(self, unit_index: int, t: torch.Tensor) -> None:
        return None


class _SeesStrides(torch.autograd.Function):
    """y = a * b; backward records the strides of the ``a`` it gets back from saving."""

    strides: list[tuple[int, ...]] = []

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
        a, b = ctx.saved_tensors
        _SeesStrides.strides.append(a.stride())
        return grad * b, grad * a


def _layer(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(x)  # saved by tanh's backward (its output) and by both matmuls below
    k = h.transpose(1, 2)  # a transposed view: dense, not contiguous
    return (h @ w + h @ w).sum() + _SeesStrides.apply(k, k.detach() + 1).sum()


def test_a_tensor_saved_by_several_nodes_is_written_once_and_keeps_its_strides(tmp_path, monkeypatch):
    monkeypatch.setattr(placement_rules, "SWAP_MIN_BYTES", 1)
    torch.manual_seed(0)
    x = torch.randn(2, 8, 16)
    w = torch.randn(16, 16, requires_grad=True)
    x_ref = x.clone().requires_grad_(True)
    expected = torch.autograd.grad(_layer(x_ref, w), [w, x_ref])  # in memory: strides as saved
    plan = Plan(activations=Tier.NVME, recompute=False)
    placement = Placement(plan, n_layers=4, compute_dtype="float32", state_dtype="float32", grads_kept=False,
                          on_gpu=False)
    acct = Accountant({})
    with SwapStore(tmp_path / "swap", PosixBackend(num_threads=2)) as store:
        acts = SavedTensors(placement, store, acct, torch.device("cpu"), _NoWeightViews())  # type: ignore[arg-type]
        (x_leaf,), _ = acts.enter(0, x, (), {})
        out = _layer(x_leaf, w)
        acts.exit(0, (out,))
        swapped = [(t.name, t.nbytes) for t in acts.calls[(0, 0)].swapped]
        x_back, out_back = acts.replay(0)
        got = torch.autograd.grad(out_back, [w, x_back])
        acts.release(0)
        acts.end_backward()
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert _SeesStrides.strides == [x.transpose(1, 2).stride()] * 2  # the transposed view came back transposed
    # h (saved by tanh, two matmuls and the transposed view's storage: distinct geometry), w (by
    # both matmuls), the transposed k and k + 1: each distinct tensor written once
    # tanh's output h is saved by tanh, by both matmuls (folded to 16 x 16) and as the transposed
    # k: one copy of its bytes; w by both matmuls: one copy; k + 1: one copy
    assert [nbytes for _, nbytes in swapped] == [1024, 1024, 1024]
    assert len({name for name, _ in swapped}) == 3
    assert acct.used_bytes[Tier.DEVICE] == 0


def test_saves_share_a_copy_only_over_the_same_memory_at_the_same_version():
    once = SavedOnce()
    t = torch.randn(4, 16)
    once.add(t, "first")
    assert once.get(t) == "first"
    assert once.get(t.view(8, 8)) == "first"  # another view of the same bytes
    assert once.get(t.t()) == "first"  # transposed: dense over the same bytes
    assert once.get(t[:2]) is None  # part of them
    assert once.get(t[:, :8]) is None  # with gaps: never shared
    once.add(t[:, :8], "gaps")
    assert once.get(t[:, :8]) is None
    assert once.get(t.double()) is None  # other bytes
    t.add_(1.0)  # changed in place after being saved: the next save needs its own copy
    assert once.get(t) is None
    once.clear()  # the layer's forward ended: nothing is held or matched
    assert once.get(t.view(8, 8)) is None
