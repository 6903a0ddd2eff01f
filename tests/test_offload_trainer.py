"""``OffloadTrainer``: the same Trainer script, one line changed, against ``transformers.Trainer``.

Rows with ``labels`` (masked prompts, variable lengths), a collator that pads them, gradient
accumulation 2, warm-up, clipping, weight decay and an eval set: per-step losses to Trainer's
logged precision, final weights elementwise, ``evaluate()`` equal, a callback sees every log; the
engine's optimizer state goes through the SSD (a plan that puts every tensor group there).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    Qwen2Config,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from cli import OffloadArguments, OffloadEngine, OffloadTrainer
from cli.main import main
from cli.trainer import CHECKED_TRANSFORMERS
from offload.errors import OffloadError
from runs import PLAN
from test_trainer_peer import GA, MBS, SETTINGS, STEPS, VOCAB, _Losses, rows


def collate(features: list[dict]) -> dict[str, torch.Tensor]:
    """Right-pads a batch to its longest row (mask 0, label -100): the user's collator."""
    n = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), n, dtype=torch.long)
    labels = torch.full((len(features), n), -100)
    mask = torch.zeros(len(features), n, dtype=torch.long)
    for k, f in enumerate(features):
        m = len(f["input_ids"])
        ids[k, :m], labels[k, :m], mask[k, :m] = torch.tensor(f["input_ids"]), torch.tensor(f["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class _InOrder:
    """Trainer's sampler in order (the default shuffles with a generator of its own)."""

    def _get_train_sampler(self, train_dataset=None):  # noqa: ANN001, ANN202 - Trainer's signature
        return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)


class InOrderTrainer(_InOrder, Trainer):
    pass


class InOrderOffloadTrainer(_InOrder, OffloadTrainer):
    pass


class _StopAt(TrainerCallback):
    """Ends training after step ``n``, as a kill would (nothing saved after the last checkpoint)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN201
        if state.global_step >= self.n:
            control.should_training_stop = True


def make_checkpoint(tmp_path):
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, pad_token_id=0)
    path = tmp_path / "ckpt"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


def arguments(out, **extra) -> TrainingArguments:
    settings = {"save_strategy": "no", "optim": "adamw_torch", **SETTINGS, **extra}
    return TrainingArguments(output_dir=str(out), per_device_train_batch_size=MBS, gradient_accumulation_steps=GA,
                             max_steps=STEPS, logging_steps=1, report_to="none", use_cpu=True,
                             seed=0, dataloader_drop_last=True, disable_tqdm=True, per_device_eval_batch_size=4,
                             **settings)


def offload_arguments(tmp_path, layer_major: bool = False) -> OffloadArguments:
    plan = dataclasses.replace(PLAN, layer_major=layer_major)
    (tmp_path / "plan.json").write_text(plan.to_json())  # every tensor group through the SSD
    return OffloadArguments(cpu_memory_limit="24MB", optimizer_impl="torch", io_backend="posix",
                            plan=str(tmp_path / "plan.json"))


def test_the_transformers_version_was_checked():
    minor = ".".join(transformers.__version__.split(".")[:2])
    assert minor in CHECKED_TRANSFORMERS, f"OffloadTrainer's overrides were checked on {CHECKED_TRANSFORMERS}"


@pytest.mark.parametrize("layer_major", [False, True], ids=["micro-batch-major", "layer-major"])
def test_offload_trainer_matches_trainer(tmp_path, layer_major):
    ckpt = make_checkpoint(tmp_path)
    data, evals = rows(), rows()[:6]
    want_log = _Losses()
    reference = InOrderTrainer(model=AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32),
                               args=arguments(tmp_path / "ref"), train_dataset=data, eval_dataset=evals,
                               data_collator=collate, callbacks=[want_log])
    reference.train()
    want_eval = reference.evaluate()["eval_loss"]
    want = {k: v.detach().clone() for k, v in reference.model.named_parameters()}

    got_log = _Losses()
    trainer = InOrderOffloadTrainer(model=str(ckpt), args=arguments(tmp_path / "ours"), train_dataset=data,
                                    eval_dataset=evals, data_collator=collate, callbacks=[got_log],
                                    offload=offload_arguments(tmp_path, layer_major))
    try:
        trainer.train()
        got_eval = trainer.evaluate()["eval_loss"]
        trainer.save_model(str(tmp_path / "final"))
    finally:
        trainer.close()
    assert len(got_log.losses) == len(want_log.losses) == STEPS
    assert [round(x, 4) for x in got_log.losses] == [round(x, 4) for x in want_log.losses]
    assert abs(got_eval - want_eval) <= 1e-4
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "final", dtype=torch.float32)
    got = dict(final.named_parameters())
    assert got.keys() == want.keys()
    for name, w in want.items():
        bound = 2 * SETTINGS["learning_rate"] * STEPS if name.endswith("k_proj.bias") else 1e-5
        assert (got[name] - w).abs().max().item() <= bound, name
    assert (tmp_path / "ours" / "swap").is_dir()  # the state went through the swap store


def test_resume_from_checkpoint_equals_the_uninterrupted_run(tmp_path):
    ckpt = make_checkpoint(tmp_path)
    data = rows()

    def run(out, resume, stop=None) -> dict:
        log = _Losses()
        trainer = InOrderOffloadTrainer(model=str(ckpt), args=arguments(out, save_strategy="steps", save_steps=2),
                                        train_dataset=data, eval_dataset=data[:4], data_collator=collate,
                                        callbacks=[log] + ([_StopAt(stop)] if stop else []),
                                        offload=offload_arguments(tmp_path))
        try:
            if resume:  # a script run again: its evaluate() must neither wipe the checkpoints' snapshots
                with pytest.raises(OffloadError, match="already holds checkpoints"):  # nor start training fresh
                    trainer.evaluate()
            trainer.train(resume_from_checkpoint=resume)
            trainer.save_model(str(out / "final"))
        finally:
            trainer.close()
        return {"losses": log.losses, "weights": dict(AutoModelForCausalLM.from_pretrained(
            out / "final", dtype=torch.float32).named_parameters())}

    straight = run(tmp_path / "straight", None)
    run(tmp_path / "killed", None, stop=3)  # ends one step past checkpoint-2: the swap holds step 3's state
    resumed = run(tmp_path / "killed", True)  # the last checkpoint: step 2
    assert resumed["losses"] == straight["losses"][2:]
    for name, w in straight["weights"].items():
        assert torch.equal(resumed["weights"][name], w), name


def test_a_closed_trainer_does_not_start_again_from_the_base(tmp_path):
    from cli.config import ConfigError

    trainer = OffloadTrainer(model=str(make_checkpoint(tmp_path)), args=arguments(tmp_path / "ours"),
                             train_dataset=rows(), data_collator=collate, offload=offload_arguments(tmp_path))
    trainer.train()
    trainer.close()
    with pytest.raises(ConfigError, match="closed"):
        trainer.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final").exists()


def test_the_three_line_api(tmp_path):
    """The README's OffloadEngine example: a model instance, budgets and AdamW settings once."""
    ckpt = make_checkpoint(tmp_path)
    g = torch.Generator().manual_seed(5)
    batches = [[{"input_ids": torch.randint(0, VOCAB, (2, 12), generator=g)}] for _ in range(3)]
    ref = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.0, fused=True)
    for (b,) in batches:
        ref(input_ids=b["input_ids"], labels=b["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
    with OffloadEngine(AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32), output_dir=tmp_path / "api",
                       offload=offload_arguments(tmp_path)) as engine:
        for micro_batches in batches:
            engine.step(micro_batches, lr=1e-3)
        engine.save(tmp_path / "api-out")
    got = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "api-out", dtype=torch.float32).named_parameters())
    for name, w in ref.named_parameters():
        assert (got[name] - w).abs().max().item() <= 1e-5, name


def test_the_cli_says_in_one_line_why_it_cannot_resume_a_trainer_run(tmp_path, capsys):
    """Same engine, same checkpoint format: ``offload-train train`` on an OffloadTrainer run folder
    finds its checkpoint and names the setting that differs (the data: Trainer's loader is not the
    CLI's), exit 2."""
    import yaml


    ckpt = make_checkpoint(tmp_path)
    out = tmp_path / "run"
    trainer = InOrderOffloadTrainer(model=str(ckpt), args=arguments(out, save_strategy="steps", save_steps=2),
                                    train_dataset=rows(), data_collator=collate, offload=offload_arguments(tmp_path))
    try:
        trainer.train()
    finally:
        trainer.close()
    (tmp_path / "data.jsonl").write_text("".join(__import__("json").dumps(r) + "\n" for r in rows()))
    cfg = {"model": {"name_or_path": str(ckpt)}, "data": {"path": str(tmp_path / "data.jsonl"), "seq_len": 24},
           "train": {"output_dir": str(out), "max_steps": STEPS, "resume_from_checkpoint": "auto"},
           "offload": {"io_backend": "posix", "optimizer_impl": "torch"}}
    (tmp_path / "cli.yaml").write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert main(["train", str(tmp_path / "cli.yaml"), "--plan", str(tmp_path / "plan.json")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "checkpoints/step-" in err[0] and "data.path" in err[0], err


def test_offload_trainer_trains_a_peft_model_as_trainer_does(tmp_path):
    """A ``PeftModel`` instance: its adapters train on the frozen, streamed base, ``save_model``
    writes the adapter folder, equal to Trainer's on the same PEFT model."""
    import copy

    import peft

    ckpt = make_checkpoint(tmp_path)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    torch.manual_seed(3)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32), lora)
    twin = copy.deepcopy(model)
    reference = InOrderTrainer(model=twin, args=arguments(tmp_path / "ref"), train_dataset=rows(),
                               data_collator=collate)
    reference.train()
    want = {k: v.detach().clone() for k, v in twin.named_parameters() if "lora_" in k}
    trainer = InOrderOffloadTrainer(model=model, args=arguments(tmp_path / "ours"), train_dataset=rows(),
                                    data_collator=collate, offload=offload_arguments(tmp_path))
    try:
        trainer.train()
        trainer.save_model(str(tmp_path / "adapter"))
    finally:
        trainer.close()
    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32),
                                            tmp_path / "adapter")
    got = {k: v for k, v in loaded.named_parameters() if "lora_" in k}
    assert got.keys() == want.keys()
    assert max((got[k] - want[k]).abs().max().item() for k in want) <= 1e-5


def test_the_engine_api_says_what_is_wrong_with_its_input(tmp_path):
    from cli.config import ConfigError
    from scheduler.materialize import empty_model

    ckpt = make_checkpoint(tmp_path)
    with pytest.raises(ConfigError, match="meta device"):
        OffloadEngine(empty_model(AutoModelForCausalLM.from_pretrained(ckpt).config), output_dir=tmp_path / "m")
    with pytest.raises(ConfigError, match="offload= has unknown key.*cpu_memory_limt"):
        OffloadEngine(str(ckpt), output_dir=tmp_path / "d", offload={"cpu_memory_limt": "1GB"})
    with OffloadEngine(str(ckpt), output_dir=tmp_path / "api", offload=offload_arguments(tmp_path)) as engine:
        ids = torch.randint(0, VOCAB, (2, 8))
        with pytest.raises(ValueError, match=f"token id {VOCAB} outside the model's vocabulary"):
            engine.step([{"input_ids": torch.full((2, 8), VOCAB)}], lr=1e-3)
        for lr in (float("nan"), -1.0, "1e-3"):
            with pytest.raises(ValueError, match="learning rate must be a finite number"):
                engine.step([{"input_ids": ids}], lr=lr)
        with pytest.raises(ValueError, match="gradient_accumulation_steps=1: pass lists of 1"):
            engine.step([{"input_ids": ids}, {"input_ids": ids}], lr=1e-3)
        for step in (-1, "abc"):
            with pytest.raises(ValueError, match="the step must be an int"):
                engine.checkpoint(step)
        assert engine.step([{"input_ids": ids}], lr=1e-3).loss > 0  # the engine still steps after them
        from offload.errors import OffloadError

        with pytest.raises(OffloadError, match="in use by another offload-train run"):  # its run folder
            OffloadEngine(str(ckpt), output_dir=tmp_path / "api", offload=offload_arguments(tmp_path)).open()


@pytest.mark.parametrize(("change", "words"), [
    ({"optimizers": "sgd"}, "optimizers="),
    ({"optim": "sgd"}, "optim='sgd'"),
    ({"label_smoothing_factor": 0.1}, "label_smoothing_factor"),
    ({"compute_loss_func": lambda outputs, labels, num_items_in_batch=None: outputs.logits.mean()}, "custom loss"),
    ({"load_best_model_at_end": True, "eval_strategy": "steps", "save_strategy": "steps"}, "load_best_model_at_end"),
    ({"bfloat16": True}, "not float32"),
])
def test_what_the_engine_cannot_do_is_refused_not_ignored(tmp_path, change, words):
    from cli.config import ConfigError

    ckpt = make_checkpoint(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16 if "bfloat16" in change else torch.float32)
    extra = {k: v for k, v in change.items() if k in ("optim", "label_smoothing_factor", "load_best_model_at_end",
                                                      "eval_strategy", "save_strategy")}
    kwargs = {}
    if "optimizers" in change:
        kwargs["optimizers"] = (torch.optim.SGD(model.parameters(), lr=0.1), None)
    if "compute_loss_func" in change:
        kwargs["compute_loss_func"] = change["compute_loss_func"]
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        OffloadTrainer(model=model, args=arguments(tmp_path / "ours", **extra), train_dataset=rows(),
                       eval_dataset=rows()[:4], data_collator=collate, offload=offload_arguments(tmp_path), **kwargs)


def test_a_batch_without_labels_stops_as_trainer_does(tmp_path):
    def no_labels(features: list[dict]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in collate(features).items() if k != "labels"}

    trainer = OffloadTrainer(model=str(make_checkpoint(tmp_path)), args=arguments(tmp_path / "ours"),
                             train_dataset=rows(), data_collator=no_labels, offload=offload_arguments(tmp_path))
    try:
        with pytest.raises(ValueError, match="no labels"):
            trainer.train()
    finally:
        trainer.close()


def test_the_best_checkpoint_keeps_its_snapshot_through_trainers_rotation(tmp_path):
    """save_total_limit 1 with a best metric: Trainer keeps the best checkpoint-N (and rotates the
    others out, the last one too here); the engine's snapshots follow exactly (none of the kept
    ones deleted, the rotated ones gone), and the best one exports."""
    args = arguments(tmp_path / "ours", save_strategy="steps", save_steps=1, eval_strategy="steps", eval_steps=1,
                     save_total_limit=1, metric_for_best_model="eval_loss", greater_is_better=True)
    trainer = OffloadTrainer(model=str(make_checkpoint(tmp_path)), args=args, train_dataset=rows(),
                             eval_dataset=rows()[:4], data_collator=collate, offload=offload_arguments(tmp_path))
    try:
        trainer.train()
    finally:
        trainer.close()
    out = tmp_path / "ours"
    kept = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    best = int(trainer.state.best_model_checkpoint.rpartition("-")[2])
    assert best in kept
    assert sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*")) == kept
    assert main(["export", str(out / "checkpoints" / f"step-{best}"), str(tmp_path / "best")]) == 0
    assert main(["export", str(out / f"checkpoint-{best}"), str(tmp_path / "best-trainer")]) == 0  # its pointer
    got = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "best-trainer", dtype=torch.float32).named_parameters())
    for name, w in AutoModelForCausalLM.from_pretrained(tmp_path / "best", dtype=torch.float32).named_parameters():
        assert torch.equal(got[name], w), name


def test_evaluate_and_save_before_training_a_checkpoint_path(tmp_path):
    """A checkpoint's path, evaluated and saved before train(): Trainer's numbers on the loaded
    model, and the folder Trainer writes (weights, tokenizer, training_args.bin)."""
    from cli.data import load_tokenizer

    ckpt, tokenizer = make_checkpoint(tmp_path), load_tokenizer(None, None)
    reference = Trainer(model=AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32),
                        args=arguments(tmp_path / "ref"), eval_dataset=rows()[:6], data_collator=collate)
    trainer = OffloadTrainer(model=str(ckpt), args=arguments(tmp_path / "ours"), train_dataset=rows(),
                             eval_dataset=rows()[:6], data_collator=collate, processing_class=tokenizer,
                             offload=offload_arguments(tmp_path))
    try:
        assert abs(trainer.evaluate()["eval_loss"] - reference.evaluate()["eval_loss"]) <= 1e-5
        trainer.save_model(str(tmp_path / "saved"))
    finally:
        trainer.close()
    saved = tmp_path / "saved"
    assert (saved / "training_args.bin").is_file()
    assert len(transformers.AutoTokenizer.from_pretrained(saved)) == len(tokenizer)
    got = dict(AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).named_parameters())
    for name, w in AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).named_parameters():
        assert torch.equal(got[name], w), name
