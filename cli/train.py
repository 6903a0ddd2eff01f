"""``offload-train train CONFIG``: the training loop around an engine, and the run folder.

Run folder (``train.output_dir``): ``config.yaml`` (resolved), ``plan.json``, ``metrics.jsonl``
(one JSON object per logged step), ``checkpoints/step-N`` (resumable), ``final/`` (Hugging Face
format), ``tokenizer/`` (when the run has one). Semantics are those of the Hugging Face Trainer for
causal LM: labels = input_ids unless the data gives its own, a step's loss is its token-loss sum
over the step's targets (``num_items_in_batch``), the scheduler steps once per optimizer step, a
seed fixes the run.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cli import checkpoint as ckpt_io
from cli.export import DTYPES, read_model_extras, write_hf_model, write_model_extras
from offload.errors import CorruptionError, OffloadError, OutOfSpaceError, first_line, format_bytes

if TYPE_CHECKING:
    from scheduler.engine import Engine

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """Everything a run needs, built from the config before any weight is touched."""

    cfg: Any
    run_dir: Path
    hf_config: Any
    tokenizer: Any
    dataset: Any
    model: Any
    initializer: Any
    dtype: torch.dtype
    device: torch.device
    evaluator: Any = None  # cli.evaluation.Evaluator, or None (train.eval_strategy: no)
    optimizer_impl: str | None = None  # the CPU AdamW kernel make_engine chose (checkpoints record it)


def load_model_config(cfg: Any) -> Any:
    """The Hugging Face config of ``model``: from a checkpoint directory or from ``model.config``."""
    from transformers import AutoConfig

    m = cfg.model
    if m.name_or_path is not None:
        path = Path(m.name_or_path)
        if not (path / "config.json").exists():
            raise OffloadError(f"model.name_or_path: {path} is not a Hugging Face checkpoint directory "
                               f"(no config.json); give a local directory saved with save_pretrained")
        return AutoConfig.from_pretrained(path, trust_remote_code=m.trust_remote_code)
    fields = dict(m.config)
    model_type = fields.pop("model_type", None)
    if not model_type:
        raise OffloadError("model.config needs a model_type (e.g. llama, qwen2, gpt2)")
    try:
        return AutoConfig.for_model(model_type, **fields)
    except Exception as err:  # ValueError, or huggingface_hub's strict-dataclass validation errors
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise OffloadError(f"model.config: {lines[-1] if lines else type(err).__name__}") from None


POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
ROTARY_KEYS = ("rope_parameters", "rope_theta", "rope_scaling", "rotary_dim", "rotary_pct", "rotary_emb_base")


def check_positions(seq_len: int, hf_config: Any) -> None:
    """``data.seq_len`` within the positions the model has: past a learned position table, one
    line naming both (its lookup would index past the end); past what rotary positions were
    trained for, a warning (longer contexts are a choice: context extension, rope scaling)."""
    text = hf_config.get_text_config()
    for key in POSITION_KEYS:
        limit = getattr(text, key, None)
        if not isinstance(limit, int) or limit <= 0 or seq_len <= limit:
            continue
        if any(getattr(text, k, None) is not None for k in ROTARY_KEYS):
            print(f"offload-train: warning: data.seq_len {seq_len} is longer than the model's {key} ({limit}): "
                  f"its rotary positions go past what it was trained for")
            return
        raise OffloadError(f"data.seq_len {seq_len} is longer than the model's {key} ({limit}), the end of its "
                           f"position table; lower data.seq_len to {limit} or less")


def build_context(cfg: Any) -> RunContext:
    from cli.data import tokenizer_policy
    from cli.data_cache import load_cached

    run_dir = Path(cfg.train.output_dir)
    m = cfg.model
    hf_config = load_model_config(cfg)
    check_positions(cfg.data.seq_len, hf_config)
    vocab = getattr(hf_config, "vocab_size", None)
    policy = tokenizer_policy(cfg.data.tokenizer, m.name_or_path, vocab)
    dataset = load_cached(cfg.data.path, policy.for_text, cfg.data.seq_len, packing=cfg.data.packing,
                          text_field=cfg.data.text_field, vocab_size=vocab,
                          pad_token_id=getattr(hf_config, "pad_token_id", None), sft=sft_options(cfg))
    tokenizer = dataset.tokenizer or policy.available  # saved with the run and in final/, if any
    from cli.evaluation import build_evaluator

    evaluator = build_evaluator(cfg, dataset.tokenizer or policy.for_text, vocab,
                                getattr(hf_config, "pad_token_id", None))
    model, initializer = build_model(cfg, hf_config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return RunContext(cfg, run_dir, hf_config, tokenizer, dataset, model, initializer, DTYPES[m.dtype], device,
                      evaluator)


def build_model(cfg: Any, hf_config: Any) -> tuple[Any, Any]:
    """(empty model, initializer): the checkpoint's tensors unit by unit, or random init; with a
    ``peft`` section the model carries PEFT's adapters on its frozen base."""
    from scheduler.hf_checkpoint import CheckpointInit
    from scheduler.materialize import RandomInit, empty_model

    m = cfg.model
    torch.manual_seed(cfg.train.seed)
    # the compute dtype before the model is built: the buffers it computes from the config (RoPE
    # tables, Gemma's embedding scale) are made in it, as from_pretrained(dtype=...) makes them,
    # not in the checkpoint's dtype; and what checkpoints and final/ are written in
    hf_config.dtype = DTYPES[m.dtype]
    model = empty_model(hf_config, trust_remote_code=m.trust_remote_code)
    model.config.dtype = DTYPES[m.dtype]
    if m.name_or_path:
        initializer: Any = CheckpointInit(m.name_or_path, model)
        initializer.check_ties()
        initializer.load_buffers()
        read_model_extras(model, Path(m.name_or_path))  # generation config: sampling settings, eos ids
    else:
        initializer = RandomInit(model)
    if cfg.peft is not None:  # LoRA: the base becomes frozen parameters, the adapters PEFT's
        from cli.lora import LoraInit, apply_lora, base_name, random_init_name

        model, adapters = apply_lora(model, cfg.peft)
        initializer = (LoraInit(initializer, adapters, base_name) if m.name_or_path
                       else LoraInit(RandomInit(model), adapters, random_init_name))
    return model, initializer


def make_plan(ctx: RunContext, plan_path: str | None, profile_path: str | None = None,
              total_steps: int | None = None) -> tuple[Any, dict[str, Any]]:
    """(plan, what plan.json holds): replayed from ``--plan``, or chosen by the planner."""
    from cli.budgets import fit_replayed_plan, plan_job
    from scheduler.model_shape import shape_from_model
    from scheduler.plan import Plan
    from scheduler.plan_report import plan_record

    if plan_path is not None:
        try:
            saved = json.loads(Path(plan_path).read_text())
            plan = Plan.from_dict(saved)
        except (OSError, ValueError, TypeError, AttributeError) as err:
            raise OffloadError(f"--plan {plan_path}: cannot use it ({err})") from None
        plan = fit_replayed_plan(ctx.cfg, plan, saved, shape_from_model(ctx.model, ctx.hf_config), ctx.device,
                                 plan_path, total_steps)
        return plan, {**saved, **plan.to_dict()}
    choice = plan_job(ctx.cfg, ctx.hf_config, shape_from_model(ctx.model, ctx.hf_config), ctx.device,
                      profile_path, total_steps).choice
    est = choice.estimate
    print(f"plan: predicted {est.step_s:.2f} s/step, bottleneck {est.bottleneck} (offload-train plan shows "
          f"the placement)")
    return choice.plan, plan_record(choice)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_train(cfg: Any, plan_path: str | None = None, profile_path: str | None = None) -> int:
    from cli.run_lock import RunLock

    # The run folder is this process's from here to the end: a second train on it stops in one
    # line before it reads or writes anything there.
    with RunLock(Path(cfg.train.output_dir)):
        return _run_train_locked(cfg, plan_path, profile_path)


def _run_train_locked(cfg: Any, plan_path: str | None, profile_path: str | None) -> int:
    from cli import swap
    from cli.data import steps_per_epoch
    from offload import SwapStore, make_backend
    from offload.tiers import Tier
    from scheduler.model_map import build_model_map

    ctx = build_context(cfg)
    t = cfg.train
    run_dir = ctx.run_dir
    ga = t.gradient_accumulation_steps
    per_epoch = steps_per_epoch(ctx.dataset, t.micro_batch_size, ga)
    if per_epoch < 1:
        raise OffloadError(f"the data gives {len(ctx.dataset)} sequences: fewer than one optimizer step of "
                           f"{t.micro_batch_size} x {ga}; add data or lower train.micro_batch_size")
    total_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * per_epoch)
    schedule = _LrSchedule(t, total_steps)
    data_fingerprint = ctx.dataset.fingerprint()  # once: checkpoints carry it, a resume compares
    resume = _resume_point(cfg, run_dir, schedule, data_fingerprint)

    plan, record = make_plan(ctx, plan_path, profile_path, total_steps)
    units = build_model_map(ctx.model).units
    fingerprint = ckpt_io.model_fingerprint(ctx.hf_config.to_dict(), units)
    if resume.fingerprint is not None and resume.fingerprint != fingerprint:
        raise OffloadError(f"checkpoint {resume.ckpt.path} was made with another model or config; "
                           f"resume with the run's own config, or start fresh")
    states_on_nvme = cfg.offload.engine != "reference" and plan.optimizer == Tier.NVME
    # The swap store holds the optimizer states (or, for engines that keep them in RAM, the
    # copies checkpoints are made of); a checkpoint is a snapshot of it.
    store = SwapStore(cfg.offload_nvme_path, make_backend(cfg.offload.io_backend, cfg.offload.io_threads))
    store.open()
    closing: list[Any] = []
    try:  # the store's lock is held: no other run uses this swap
        newer = _newer_checkpoints(run_dir, resume)
        start = swap.prepare_store(store, run_dir, resume.ckpt, units, plan.chunk_numel if states_on_nvme else None)
        if newer:
            check_resumable_before_newer(resume.ckpt, newer, store.root)
        engine = make_engine(ctx, plan, store, start, resume.update, closing, saved_impl=resume.optimizer_impl)
        with engine:
            versions = swap.checkpoint_versions(resume.step, total_steps, t.save_steps, t.save_total_limit)
            swap.check_checkpoint_room(store, units, versions, states_on_nvme,
                                       itemsize=DTYPES[cfg.model.state_dtype].itemsize)
            # every start-up check has passed: only now is the run folder written
            _start_run_folder(ctx, store, resume, newer, record)
            state = {"fingerprint": fingerprint, "data_fingerprint": data_fingerprint}
            try:
                return _loop(ctx, engine, schedule, resume, total_steps, per_epoch, state, store)
            except OutOfSpaceError as err:
                last = ckpt_io.list_checkpoints(run_dir)
                kept = f"checkpoint {last[-1].path.name} is intact" if last else "no checkpoint was written yet"
                raise OffloadError(f"{err}; training stopped and {kept}: free space, then rerun with "
                                   f"train.resume_from_checkpoint: auto") from None
    except CorruptionError as err:
        raise OffloadError(ckpt_io.recovery_advice(str(err), run_dir, store.root)) from None
    finally:
        store.close()
        for resource in closing:
            resource.close()


def _newer_checkpoints(run_dir: Path, resume: _ResumePoint) -> list[Any]:
    """The checkpoints after the one resumed from: a branch this resume abandons. They must go:
    training on from its step cuts ``metrics.jsonl`` back to it and saves checkpoints of the same
    names (``step-M`` replaced), rotation by ``save_total_limit`` would keep the stale newer ones
    and delete the fresh ones (it keeps the highest steps), and ``auto`` would resume a stale one
    after a crash. They go only once the start-up checks have passed."""
    if resume.ckpt is None:
        return []
    return [c for c in ckpt_io.list_checkpoints(run_dir) if c.step > resume.step]


def check_resumable_before_newer(ckpt: Any, newer: list[Any], store_root: Path) -> None:
    """A resume from an older checkpoint drops the newer ones: first every extent of the one
    resumed from must read back whole, else nothing is dropped and the error names the newest
    one that verifies."""
    if ckpt_io.verifies(ckpt):
        return
    good = next((c for c in reversed(newer) if _in_store_and_verifies(c, store_root)), None)
    advice = (f"{good.path.name} verifies: resume from it with train.resume_from_checkpoint: {good.path}"
              if good is not None else "resume from another checkpoint")
    raise OffloadError(f"checkpoint {ckpt.path} fails its checksums (its swap data is damaged), so the newer "
                       f"{', '.join(c.path.name for c in newer)} were kept; {advice}")


def _in_store_and_verifies(ckpt: Any, store_root: Path) -> bool:
    try:
        in_store = ckpt_io.CheckpointUnits(ckpt.path).nvme_path == store_root.resolve()
    except OffloadError:
        return False
    return in_store and ckpt_io.verifies(ckpt)


def _start_run_folder(ctx: RunContext, store: Any, resume: _ResumePoint, newer: list[Any],
                      plan_record: dict[str, Any]) -> None:
    """What a started run writes into its folder, once every start-up check has passed: the newer
    checkpoints of an abandoned branch dropped (said in one line; their snapshots let go in the
    store), the metrics of the steps that run again cut, config.yaml, tokenizer/ and plan.json."""
    from cli.config import dump_yaml

    run_dir = ctx.run_dir
    if newer:
        print(f"offload-train: resuming from step {resume.step} drops the newer checkpoints "
              f"{', '.join(c.path.name for c in newer)} (training on from {resume.ckpt.path.name} rewrites them)")
        for c in newer:
            ckpt_io.remove_checkpoint(c, store)  # its snapshot's extents become free for new versions
    _truncate_metrics(run_dir, resume.step)  # the steps after the checkpoint (all, if none) run again
    (run_dir / "config.yaml").write_text(dump_yaml(ctx.cfg))
    if ctx.tokenizer is not None:
        ctx.tokenizer.save_pretrained(run_dir / "tokenizer")
    (run_dir / "plan.json").write_text(json.dumps(plan_record, indent=2))


class _LrSchedule:
    """The learning-rate schedule: transformers' schedulers drive a one-parameter optimizer."""

    def __init__(self, t: Any, total_steps: int) -> None:
        from transformers import get_scheduler

        self.holder = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=t.learning_rate)
        try:
            self.scheduler = get_scheduler(t.lr_scheduler_type, self.holder,
                                           num_warmup_steps=t.num_warmup_steps(total_steps),
                                           num_training_steps=total_steps,
                                           scheduler_specific_kwargs=dict(t.lr_scheduler_kwargs))
        except (ValueError, TypeError) as err:  # an argument the schedule needs, missing or unknown
            raise OffloadError(f"train.lr_scheduler_type {t.lr_scheduler_type}: {first_line(err)}; give its arguments in "
                               f"train.lr_scheduler_kwargs (e.g. min_lr_rate: 0.1, num_decay_steps: 10)") from None

    @property
    def lr(self) -> float:
        return self.holder.param_groups[0]["lr"]

    def step(self) -> None:
        self.holder.step()  # no-op (no gradients); keeps torch's scheduler-order check quiet
        self.scheduler.step()


@dataclass
class _LogWindow:
    """The steps since the last metrics record. Checkpoints carry it, so a resumed run logs the
    averages an uninterrupted one logs."""

    losses: list[float] = field(default_factory=list)  # of the steps whose update was not skipped
    tokens: int = 0
    time_s: float = 0.0
    skipped: int = 0

    def add(self, result: Any) -> None:
        """One step's ``StepResult``."""
        self.tokens += result.tokens
        self.time_s += result.step_time_s
        if result.skipped:
            self.skipped += 1
        else:
            self.losses.append(result.loss)


@dataclass
class _ResumePoint:
    """Where a run starts: step 0, or a checkpoint's step, data position and counters."""

    step: int = 0
    position: Any = None  # cli.data.DataPosition
    ckpt: Any = None  # the checkpoint resumed from
    fingerprint: str | None = None
    update: Any = None  # scheduler.settings.UpdateState
    log_window: _LogWindow = field(default_factory=_LogWindow)  # the steps since the last record
    optimizer_impl: str | None = None  # the CPU AdamW kernel the checkpoint was trained with, if recorded


def _resume_point(cfg: Any, run_dir: Path, schedule: _LrSchedule, data_fingerprint: str) -> _ResumePoint:
    from cli.clean import CLEANED_FILE
    from cli.data import DataPosition
    from scheduler.settings import UpdateState

    t = cfg.train
    ckpt = ckpt_io.resolve_resume(run_dir, t.resume_from_checkpoint)
    if ckpt is None and (run_dir / CLEANED_FILE).exists():
        raise OffloadError(f"{run_dir} was cleaned (offload-train clean): nothing is left to resume and final/ "
                           f"holds the trained model; train into another train.output_dir to start again")
    if ckpt is None and ckpt_io.list_checkpoints(run_dir):
        raise OffloadError(f"{run_dir} already holds checkpoints of an earlier run; set "
                           f"train.resume_from_checkpoint: auto to continue it, or choose another output_dir")
    if ckpt is None:
        return _ResumePoint(position=DataPosition(0, 0), update=UpdateState())
    state = ckpt_io.read_trainer_state(ckpt)
    step = state["step"]
    for _ in range(step):  # the schedule of *this* config, advanced to the step reached
        schedule.step()
    _check_resume_keys(cfg, state, ckpt.path)
    if state.get("data_fingerprint", data_fingerprint) != data_fingerprint:
        print(f"offload-train: warning: the data at {cfg.data.path} changed since {ckpt.path} was written "
              f"(its sequences differ): the run goes on from batch {state['data_position']['batch_index']} "
              f"of epoch {state['data_position']['epoch']} of the new data")
    print(f"resuming from {ckpt.path} (step {step})")
    update = UpdateState(optimizer_step=state.get("optimizer_step", step), loss_scale=state.get("loss_scale"),
                         good_steps=state.get("good_steps", 0))
    return _ResumePoint(step, DataPosition(**state["data_position"]), ckpt, state.get("fingerprint"), update,
                        _LogWindow(**state.get("log_window", {})), state.get("optimizer_impl"))


def make_engine(ctx: RunContext, plan: Any, store: Any, start: Any, update: Any, closing: list[Any],
                saved_impl: str | None = None) -> Engine:
    """The engine ``offload.engine`` names (a ``scheduler.engine.Engine``); resources it needs
    closed after it are appended to ``closing``. ``saved_impl``: the CPU AdamW kernel the
    checkpoint resumed from was trained with (see ``optimizer_impl``)."""
    from offload import AdamWConfig, make_adamw
    from scheduler.executor import StreamingExecutor, TrainSettings
    from scheduler.reference import ReferenceEngine
    from scheduler.trace import Tracer

    cfg, t = ctx.cfg, ctx.cfg.train
    settings = TrainSettings(adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_epsilon=t.adam_epsilon,
                             weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
                             compute_dtype=ctx.dtype, state_dtype=DTYPES[cfg.model.state_dtype],
                             gradient_accumulation_steps=t.gradient_accumulation_steps, nan_policy=t.nan_policy,
                             no_decay=no_decay_names(ctx.model))
    if cfg.offload.engine == "reference":
        from scheduler.materialize import materialize_in_memory

        if cfg.offload.trace:
            print("offload-train: note: offload.trace records the streaming engine's timeline; the reference "
                  "engine (offload.engine: reference) writes none")
        model = materialize_in_memory(ctx.model, ctx.initializer)  # same start as the native engine
        return ReferenceEngine(model, settings, device=ctx.device, resume=start.resume, update_state=update)
    config = AdamWConfig(betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon, weight_decay=t.weight_decay)
    impl, adamw = optimizer_impl(cfg.optimizer_impl, saved_impl, config, make_adamw)
    closing.append(adamw)
    ctx.optimizer_impl = impl
    return StreamingExecutor(ctx.model, plan, store, adamw, settings, device=ctx.device,
                             initializer=ctx.initializer, resume=start.resume, update_state=update,
                             tracer=Tracer() if cfg.offload.trace else None, state_in_store=start.state_in_store)


def optimizer_impl(requested: str, saved: str | None, config: Any, make: Any) -> tuple[str, Any]:
    """(kernel name, its FlatAdamW): the CPU AdamW kernel a run steps with. The two kernels differ
    in the last bits, so a resumed run keeps the one its checkpoint (``saved``) was trained with:
    with ``auto`` it is used again, not chosen anew by timing; when it cannot be made here, or the
    config names the other one, one line warns that the resume may differ in the last bits."""
    from offload import choose_impl

    if saved is not None and requested == "auto":
        try:
            adamw = make(saved, config)
            getattr(adamw, "_load", lambda: None)()  # deepspeed's kernel loads (builds) lazily: now
            return saved, adamw
        except Exception as err:  # noqa: BLE001 - e.g. deepspeed missing or its kernel not building here
            print(f"offload-train: warning: the checkpoint was trained with optimizer_impl {saved}, which is "
                  f"not usable here ({first_line(err)}); the resume uses another CPU AdamW kernel and may "
                  f"differ from an uninterrupted run in the last bits")
    elif saved is not None and requested != saved:
        print(f"offload-train: warning: the checkpoint was trained with optimizer_impl {saved}, this config "
              f"names {requested}: the resume may differ from an uninterrupted run in the last bits (set "
              f"offload.optimizer_impl: {saved} or auto to keep it)")
    try:
        impl, _ = choose_impl(requested)
    except RuntimeError as err:
        raise OffloadError(f"offload.optimizer_impl: {err}; install deepspeed or use torch") from None
    try:
        return impl, make(impl, config)
    except Exception as err:  # noqa: BLE001 - an explicit kernel that cannot be made here
        raise OffloadError(f"offload.optimizer_impl {impl}: not usable here ({first_line(err)}); "
                           f"install deepspeed or use torch") from None


def _loop(ctx: RunContext, engine: Engine, schedule: _LrSchedule, resume: _ResumePoint, total_steps: int,
          per_epoch: int, fingerprints: dict[str, str], store: Any) -> int:
    """The training loop; ``fingerprints`` (the model's, the data's) go into every checkpoint."""
    from tqdm import tqdm

    from cli.metrics_log import MetricsLog

    t, run_dir = ctx.cfg.train, ctx.run_dir
    ga = t.gradient_accumulation_steps
    metrics_log = MetricsLog(run_dir, t.report_to, first_step=resume.step + 1).open()
    takes_loss_kwargs = accepts_loss_kwargs(ctx.model)  # checked once, not every step
    start_step = resume.step
    batches = _batch_stream(ctx, resume.position)
    t_start = time.perf_counter()
    tokens_total, window = 0, resume.log_window
    bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
               disable=None, mininterval=1.0)  # no bar when stdout is not a terminal
    try:
        step = start_step
        while step < total_steps:
            micro = [next(batches) for _ in range(ga)]
            seed_everything(t.seed + step)  # per-step RNG (dropout): a resumed run draws the same
            lr = schedule.lr
            tracing = engine.tracer.enabled and step + 1 == total_steps  # offload.trace: the last step
            if tracing:
                engine.tracer.start()
            result = engine.train_step(with_step_targets([b for b, _ in micro], takes_loss_kwargs), lr)
            if tracing:
                engine.synchronize()  # the step's optimizer updates finish inside the timeline
                engine.tracer.stop()
                print(f"timeline of step {step + 1} written to {engine.tracer.write(run_dir / 'trace.json')}")
            schedule.step()
            step += 1
            next_position = micro[-1][1]
            tokens_total += result.tokens
            window.add(result)
            bar.update(1)
            bar.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{result.tokens / result.step_time_s:.0f}")
            if step % t.logging_steps == 0 or step == total_steps:
                record = _metrics_record(engine, step, lr, result, window)
                metrics_log.write(record)
                tqdm.write(f"step {step}/{total_steps}  loss {record['loss']:.4f}  lr {lr:.3g}  "
                           f"{record['tokens_per_s']:.0f} tok/s")
                window = _LogWindow()
            if ctx.evaluator is not None and ctx.evaluator.due(step):
                eval_loss = ctx.evaluator.run(engine)
                metrics_log.write({"step": step, "eval_loss": eval_loss})
                tqdm.write(f"step {step}/{total_steps}  eval_loss {eval_loss:.4f}")
                bar.set_postfix(loss=f"{result.loss:.4f}", eval_loss=f"{eval_loss:.4f}")
            if (t.save_steps and step % t.save_steps == 0) or step == total_steps:
                _save(ctx, engine, store, step, next_position, schedule.scheduler,
                      {**fingerprints, "log_window": asdict(window)})
    finally:
        bar.close()
        metrics_log.close()
    engine.synchronize()
    final = _write_final(ctx, engine)
    m = engine.metrics()
    elapsed = time.perf_counter() - t_start
    print(f"done: {total_steps - start_step} steps in {elapsed:.1f} s, {tokens_total} tokens "
          f"({tokens_total / max(elapsed, 1e-9):.0f} tok/s); peak device {format_bytes(m['peak_device_bytes'])}, "
          f"peak host {format_bytes(m['peak_host_bytes'])}; SSD read {format_bytes(m['io_read_bytes'])}, "
          f"written {format_bytes(m['io_write_bytes'])}; model in {final}")
    from cli.clean import tree_bytes

    print(f"the swap at {store.root} holds {format_bytes(tree_bytes(store.root))} (live state and checkpoint versions): "
          f"offload-train clean {run_dir} shows what can go")
    return 0


def sft_options(cfg: Any) -> Any:
    from cli.sft import SftOptions

    return SftOptions(cfg.data.completion_only_loss, cfg.data.assistant_only_loss)


def no_decay_names(model: Any) -> frozenset[str]:
    """Parameters Trainer trains without weight decay (biases, normalization weights), by
    transformers' own rule (``Trainer.get_decay_parameter_names``; it reads names only)."""
    from transformers import Trainer

    decay = set(Trainer.get_decay_parameter_names(None, model))  # type: ignore[arg-type]
    return frozenset(n for n, _ in model.named_parameters() if n not in decay)


def accepts_loss_kwargs(model: Any) -> bool:
    """Whether the model's forward takes ``num_items_in_batch`` (Trainer's test, as it makes it)."""
    import inspect

    accepts = getattr(model, "accepts_loss_kwargs", None)
    if accepts is None:
        params = inspect.signature(model.forward).parameters.values()
        accepts = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)
    return bool(accepts)


def with_step_targets(micro_batches: list[dict[str, torch.Tensor]], accepts: bool) -> list[dict[str, torch.Tensor]]:
    """Trainer's loss: each micro-batch gets ``num_items_in_batch``, the targets of the whole step
    (labels that are not -100, past the first position: a causal LM shifts them), so the step's
    loss is its token-loss sum over them, padding and masks included. Models whose forward takes
    no loss kwargs (``accepts``, from ``accepts_loss_kwargs``) keep the mean of micro-batch means,
    as Trainer does for them."""
    if not accepts:
        return micro_batches
    n_items = sum(b["labels"][..., 1:].ne(-100).sum() for b in micro_batches)
    if int(n_items) == 0:
        raise OffloadError("an optimizer step's micro-batches hold no target tokens (every label is -100): "
                           "drop the rows whose labels are all -100 (they teach nothing), or raise "
                           "train.micro_batch_size or gradient_accumulation_steps so every step holds targets")
    return [{**b, "num_items_in_batch": n_items} for b in micro_batches]


def _batch_stream(ctx: RunContext, position: Any):  # noqa: ANN202 - generator
    """Micro-batches forever, epoch after epoch, each with the position just after it."""
    from cli.data import DataPosition, iterate_batches

    cfg = ctx.cfg
    epoch, index = position.epoch, position.batch_index
    while True:
        it = iterate_batches(ctx.dataset, cfg.train.micro_batch_size, cfg.train.seed, epoch,
                             shuffle=cfg.data.shuffle, start=DataPosition(epoch, index))
        for batch in it:
            index += 1
            yield batch, DataPosition(epoch, index)
        epoch, index = epoch + 1, 0


def _metrics_record(engine: Engine, step: int, lr: float, result: Any, window: _LogWindow) -> dict[str, Any]:
    m = engine.metrics()
    return {
        "step": step,
        "loss": sum(window.losses) / len(window.losses) if window.losses else float("nan"),
        "lr": lr,
        "grad_norm": result.grad_norm,
        "step_time_s": result.step_time_s,
        "tokens_per_s": window.tokens / window.time_s if window.time_s > 0 else 0.0,
        "skipped": result.skipped,  # this step's update was skipped (train.nan_policy: skip)
        "skipped_steps": window.skipped,  # steps skipped since the previous record
        "peak_device_bytes": m["peak_device_bytes"],
        "peak_host_bytes": m["peak_host_bytes"],
        "io_read_bytes": m["io_read_bytes"],
        "io_write_bytes": m["io_write_bytes"],
    }


def _save(ctx: RunContext, engine: Engine, store: Any, step: int, position: Any, scheduler: Any,
          extra_state: dict[str, Any]) -> None:
    state = {"step": step, "data_position": {"epoch": position.epoch, "batch_index": position.batch_index},
             "scheduler": scheduler.state_dict(), "lr": scheduler.get_last_lr()[0], **extra_state}
    save_engine_checkpoint(ctx, engine, store, step, state)


def save_engine_checkpoint(ctx: RunContext, engine: Engine, store: Any, step: int, state: dict[str, Any],
                           rotate: bool = True) -> Path:
    """``checkpoints/step-N``: a snapshot of the engine's optimizer state (written into the store
    first when the engine keeps it in RAM), ``state`` with the engine's counters and the resume
    keys, the config and the model's extras. A failed write names the step in one line.
    ``rotate``: the oldest beyond ``train.save_total_limit`` go (else the caller removes them)."""
    from cli.swap import write_states

    state = {**state, **engine.update_state().to_dict(),  # optimizer_step lags `step` by the skipped steps
             "resume_keys": resume_keys(ctx.cfg)}
    if ctx.optimizer_impl is not None:  # the CPU AdamW kernel: a resume keeps it (bit for bit)
        state["optimizer_impl"] = ctx.optimizer_impl
    t_start_s = time.perf_counter()
    try:
        extents = engine.optimizer_state_extents()
        # states the engine keeps in RAM (all, or the units the plan keeps there) are written
        # into the store first
        in_ram = None if extents is None else {u.name for u, kinds in extents if kinds is None}
        written = {u.name: (u, kinds) for u, kinds in write_states(store, engine.unit_states(in_ram))}
        units = list(written.values()) if extents is None else [
            (u, kinds) if kinds is not None else written[u.name] for u, kinds in extents]
        path = ckpt_io.save_checkpoint(ctx.run_dir, step, store, units, state, ctx.hf_config,
                                       ctx.cfg.train.save_total_limit if rotate else None,
                                       write_extras=lambda d: write_model_extras(ctx.model, d))
    except OSError as err:
        raise OffloadError(f"cannot write checkpoint step-{step} under {ctx.run_dir / 'checkpoints'} "
                           f"({err.strerror or err}); the previous checkpoints are intact: free space "
                           f"and resume with train.resume_from_checkpoint: auto") from None
    log.info("checkpoint %s written in %.3f s", path, time.perf_counter() - t_start_s)
    return path


RESUME_KEYS = ("data.path", "data.seq_len", "data.packing", "data.shuffle", "data.text_field", "model.dtype",
               "model.state_dtype", "data.completion_only_loss", "data.assistant_only_loss",
               "train.micro_batch_size", "train.gradient_accumulation_steps", "train.seed")
"""Config keys a run cannot change when it resumes: the data position and the batches depend on them."""
RESUME_KEY_DEFAULTS = {"model.state_dtype": "float32", "data.completion_only_loss": None,
                       "data.assistant_only_loss": False}
"""What a checkpoint written before a resume key existed was made with."""


def resume_keys(cfg: Any) -> dict[str, Any]:
    d = cfg.to_dict()
    return {key: d[key.split(".")[0]].get(key.split(".")[1]) for key in RESUME_KEYS}


def _check_resume_keys(cfg: Any, state: dict[str, Any], ckpt_path: Path) -> None:
    saved = state.get("resume_keys") or {}
    now = resume_keys(cfg)
    for key, value in now.items():
        if key not in saved and key in RESUME_KEY_DEFAULTS:  # saved before the key existed
            saved = {**saved, key: RESUME_KEY_DEFAULTS[key]}
        if key in saved and saved[key] != value:
            raise OffloadError(f"checkpoint {ckpt_path} was made with {key} = {saved[key]!r}, this config has "
                               f"{value!r}: resume with the run's own config, or start a new output_dir")


def _truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop the metrics of steps after ``step`` (a resumed run logs them again), atomically."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a crash
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)


def _write_final(ctx: RunContext, engine: Engine) -> Path:
    """``final/``: the model in the hub layout, or with a ``peft`` section the adapter folder."""
    return write_model(ctx.model, engine, ctx.run_dir / "final", ctx.dtype, ctx.tokenizer)


def write_model(model: Any, engine: Engine, out: Path, dtype: torch.dtype, tokenizer: Any = None) -> Path:
    """The trained model in the hub layout, unit by unit; a PEFT model: its adapter folder (the
    adapters only are read: the frozen base is not)."""
    if not hasattr(model, "peft_config"):
        return write_hf_model(out, _named_masters(engine), len(engine.units), model, dtype, tokenizer)
    from cli.lora import save_adapter

    trained = ((s.name, master[s.offset : s.offset + s.numel].view(s.shape))
               for u, master in engine.unit_masters() for s in u.params)
    save_adapter(model, out, trained)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def _named_masters(engine: Engine):  # noqa: ANN202 - generator
    for unit, slots, flat in engine.unit_weights():  # the Adam states are not needed: not read
        yield unit.name, slots, flat


def run_plan(cfg: Any, profile_path: str | None = None) -> int:
    """``offload-train plan``: the plan ``train`` would use, as a table, written to plan.json.

    Needs the model config and the batch shape only: no data, no weights.
    """
    from cli.budgets import batch_advice, plan_job
    from scheduler.materialize import empty_model
    from scheduler.model_shape import shape_from_model
    from scheduler.plan_report import format_report, plan_record

    hf_config = load_model_config(cfg)
    check_positions(cfg.data.seq_len, hf_config)  # as train checks them: plan what train would run
    model = empty_model(hf_config, trust_remote_code=cfg.model.trust_remote_code)
    if cfg.peft is not None:  # adapters on a frozen base: their shapes are what the plan needs
        from cli.lora import apply_lora

        model, _ = apply_lora(model, cfg.peft, init=False)
    shape = shape_from_model(model, hf_config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    job = plan_job(cfg, hf_config, shape, device, profile_path)
    choice = job.choice
    print(format_report(choice, shape, job.workload, job.budgets, job.profile, job.timing))
    print(batch_advice(job, cfg))
    run_dir = Path(cfg.train.output_dir)
    if (run_dir / "config.yaml").exists() or ckpt_io.list_checkpoints(run_dir):
        # a run's plan.json records what it trained with: another plan does not replace it
        print(f"plan not written: {run_dir} holds a run, whose plan.json stays as it is (give another "
              f"train.output_dir to keep this plan)")
        return 0
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "plan.json").write_text(json.dumps(plan_record(choice), indent=2))
    print(f"plan written to {run_dir / 'plan.json'}")
    return 0
