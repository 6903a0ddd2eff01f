"""The reference engine: plain in-memory PyTorch training with the same interface as
``StreamingExecutor``, for comparison (``offload.engine: reference``).

The whole model, its gradients and torch AdamW (fused) states live in memory; clipping is
``clip_grad_norm_``; the loss of each micro-batch is divided by the accumulation count.
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection, Iterator

import torch
from torch import nn

from scheduler.model_inputs import eval_loss_sum, model_inputs
from scheduler.model_map import ModelMap, ParamSlot, Unit, build_model_map, with_frozen
from scheduler.settings import NonFiniteError, ResumeState, StepResult, TrainSettings, UpdateState
from scheduler.trace import Tracer


class ReferenceEngine:
    """Implements ``scheduler.engine.Engine``."""

    def __init__(self, model: nn.Module, settings: TrainSettings, device: torch.device | None = None,
                 resume: ResumeState | None = None, start_step: int = 0,
                 update_state: UpdateState | None = None) -> None:
        self.model = model
        self.settings = settings
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.resume = resume
        self.optimizer_step = update_state.optimizer_step if update_state is not None else start_step
        self.tracer = Tracer(enabled=False)  # nothing streams: no timeline to record
        self.map: ModelMap | None = None
        self.opt: torch.optim.AdamW | None = None
        self._peak_bytes = 0

    def __enter__(self) -> ReferenceEngine:
        self.start()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        self.model.to(device=self.device)
        for p in self.model.parameters():  # buffers (RoPE tables) keep their dtype, as with
            p.data = p.data.to(self.settings.compute_dtype)  # from_pretrained(dtype=...)
        self.model.train()
        self.map = build_model_map(self.model)
        s = self.settings
        named = list(self.model.named_parameters())  # Trainer's two groups: decayed, exempt
        groups = [{"params": [p for n, p in named if n not in s.no_decay], "weight_decay": s.weight_decay},
                  {"params": [p for n, p in named if n in s.no_decay], "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=0.0,
                                     betas=(s.adam_beta1, s.adam_beta2), eps=s.adam_epsilon,
                                     fused=s.compute_dtype in (torch.float32, torch.bfloat16))
        if self.resume is not None:
            self._load(self.resume)

    def close(self) -> None:
        self.opt = None

    @property
    def units(self) -> tuple[Unit, ...]:
        assert self.map is not None
        return self.map.units

    def _params(self) -> dict[str, nn.Parameter]:
        return dict(self.model.named_parameters())

    def _load(self, resume: ResumeState) -> None:
        assert self.opt is not None
        params = self._params()
        for u in self.units:
            master, exp_avg, exp_avg_sq = resume(u)
            for s in u.params:
                p = params[s.name]
                sl = slice(s.offset, s.offset + s.numel)
                with torch.no_grad():
                    p.copy_(master[sl].view(s.shape))
                self.opt.state[p] = {"step": torch.tensor(float(self.optimizer_step)),
                                     "exp_avg": exp_avg[sl].view(s.shape).to(p.device, p.dtype).clone(),
                                     "exp_avg_sq": exp_avg_sq[sl].view(s.shape).to(p.device, p.dtype).clone()}

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]], lr: float) -> StepResult:
        assert self.opt is not None
        t0 = time.perf_counter()
        total, tokens = 0.0, 0
        for batch in micro_batches:
            kwargs = {k: v.to(self.device) for k, v in batch.items()}
            kwargs.setdefault("labels", kwargs["input_ids"])
            loss = self.model(**kwargs, use_cache=False).loss.float()
            if "num_items_in_batch" not in batch:  # else the model divides by the step's targets
                loss = loss / len(micro_batches)
            value = float(loss.detach())
            if not math.isfinite(value):
                self.opt.zero_grad(set_to_none=True)
                if self.settings.nan_policy == "stop":
                    raise NonFiniteError(f"loss is {value} at optimizer step {self.optimizer_step + 1}")
                return StepResult(float("nan"), None, True, tokens, time.perf_counter() - t0)
            loss.backward()
            total += value
            tokens += int(batch["input_ids"].numel())
        grad_norm = None
        if self.settings.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.max_grad_norm))
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.optimizer_step += 1
        return StepResult(total, grad_norm, False, tokens, time.perf_counter() - t0)

    def synchronize(self) -> None:
        pass

    @torch.no_grad()
    def evaluate(self, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
        """(sum of token losses, target tokens) of a forward in eval mode: ``StreamingExecutor.evaluate``."""
        labels = batch.get("labels", batch["input_ids"]).to(self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model(**model_inputs(self.model, batch, self.device))
        finally:
            self.model.train(was_training)
        loss_sum, n_targets, router = eval_loss_sum(self.model, out, labels)
        return float(loss_sum) + n_targets * router, n_targets

    def unit_states(self, names: Collection[str] | None = None
                    ) -> Iterator[tuple[Unit, torch.Tensor, torch.Tensor, torch.Tensor]]:
        assert self.opt is not None
        params = self._params()
        for u in self.units:
            if names is not None and u.name not in names:
                continue
            flats = [torch.zeros(u.numel, dtype=self.settings.state_dtype) for _ in range(3)]
            for s in u.params:
                p = params[s.name]
                sl = slice(s.offset, s.offset + s.numel)
                flats[0][sl] = p.detach().reshape(-1).cpu()
                state = self.opt.state.get(p, {})
                for k, key in ((1, "exp_avg"), (2, "exp_avg_sq")):
                    if key in state:
                        flats[k][sl] = state[key].reshape(-1).cpu()
            yield u, flats[0], flats[1], flats[2]

    def unit_masters(self) -> Iterator[tuple[Unit, torch.Tensor]]:
        for u, master, _, _ in self.unit_states():
            yield u, master

    def unit_weights(self) -> Iterator[tuple[Unit, list[ParamSlot], torch.Tensor]]:
        params = self._params()
        for u, master in self.unit_masters():
            frozen = torch.cat([params[s.name].detach().reshape(-1).cpu() for s in u.frozen]) if u.frozen else None
            yield u, *with_frozen(u, master, frozen)

    def optimizer_state_extents(self) -> None:
        """In memory: checkpoints copy ``unit_states()`` into the swap store."""
        return None

    def update_state(self) -> UpdateState:
        return UpdateState(optimizer_step=self.optimizer_step, loss_scale=1.0)

    def master_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.model.named_parameters()}

    def metrics(self) -> dict[str, int]:
        n_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return {"peak_device_bytes": 4 * n_bytes, "peak_host_bytes": 0, "io_read_bytes": 0,
                "io_write_bytes": 0, "h2d_bytes": 0, "d2h_bytes": 0}
