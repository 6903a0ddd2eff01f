"""``offload-train plan``: the table, plan.json with predictions, replay with ``--plan``, large
models planned from their config and a profile file alone, infeasible jobs as one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_cli_train import read_metrics, run_cli, tiny_config, write_config, write_texts

from cli.data import load_tokenizer
from cli.main import main
from runs import one_line_error
from scheduler.plan import Plan

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "configs" / "examples"


def plan_cli(config: Path, out: Path, profile: Path, *sets: str) -> tuple[int, str, str]:
    args = [a for s in sets for a in ("--set", s)]
    proc = run_cli("plan", str(config), "--profile", str(profile), "--set", f"train.output_dir={out}", *args)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize(("config", "profile", "params", "state", "sets"), [
    ("llama3-70b.yaml", "workstation-24gb.json", "70.55B", "fp32", ()),
    # pure bf16 (6 B/param of optimizer state) fits the 2 TB SSD; fp32 states need the 8 TB one
    ("gpt3-175b.yaml", "workstation-24gb.json", "174.60B", "bfloat16", ()),
    ("gpt3-175b.yaml", "workstation-24gb-8tb.json", "174.60B", "fp32",
     ("model.state_dtype=float32", "train.save_steps=100", "train.save_total_limit=1")),
])
def test_large_models_are_planned_from_config_and_profile(tmp_path, config, profile, params, state, sets):
    code, out, err = plan_cli(EXAMPLES / config, tmp_path / "run", EXAMPLES / profile, *sets)
    assert code == 0, err
    assert f"{params} parameters" in out
    for text in (f"{state} master + Adam states", "ssd_read", "cpu_adam", "predicted step:", "bottleneck:"):
        assert text in out
    saved = json.loads((tmp_path / "run" / "plan.json").read_text())
    plan = Plan.from_dict(saved)
    predicted = saved["predicted"]
    assert predicted["step_s"] > 0 and predicted["bottleneck"]
    assert predicted["peak_bytes"]["device"] <= plan.device_budget_bytes
    assert predicted["peak_bytes"]["nvme"] <= json.loads((EXAMPLES / profile).read_text())["disk_free_bytes"]


def test_a_model_too_large_for_the_ssd_is_one_line_with_the_shortfall(tmp_path):
    code, out, err = plan_cli(EXAMPLES / "gpt3-175b.yaml", tmp_path / "run", EXAMPLES / "workstation-24gb.json",
                              "model.state_dtype=float32")
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err
    assert "short" in lines[0] and "offload.nvme_path" in lines[0]
    assert "pure bfloat16" in lines[0]  # the other way to fit: half the optimizer bytes


def test_a_kept_checkpoint_that_does_not_fit_names_save_total_limit(tmp_path):
    code, _, err = plan_cli(EXAMPLES / "gpt3-175b.yaml", tmp_path / "run", EXAMPLES / "workstation-24gb.json",
                            "train.save_steps=100", "train.save_total_limit=1")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "checkpoints keep 1 versions" in err and "save_total_limit" in err


@pytest.mark.parametrize(("change", "expected"), [
    ({"ssd_read_gbps": None, "ram_available_bytes": None}, "missing keys"),
    ({"ssd_write_gbps": "fast"}, "ssd_write_gbps must be a positive number"),
    ({"matmul_tflops": {}}, "matmul_tflops must map names"),
    ({"disk_free_bytes": 1.5e12}, "disk_free_bytes must be a whole number"),
    ({"speed": 1}, "unknown keys ['speed']"),
])
def test_bad_profile_file_is_one_line_error(tmp_path, change, expected):
    fields = json.loads((EXAMPLES / "workstation-24gb.json").read_text())
    for key, value in change.items():
        if value is None:
            fields.pop(key)
        else:
            fields[key] = value
    bad = tmp_path / "profile.json"
    bad.write_text(json.dumps(fields))
    code, _, err = plan_cli(EXAMPLES / "llama3-70b.yaml", tmp_path / "run", bad)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err


def test_hand_written_profile_may_leave_out_the_checksum_rate(tmp_path):
    fields = json.loads((EXAMPLES / "workstation-24gb.json").read_text())
    del fields["checksum_gbps"]
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(fields))
    code, out, err = plan_cli(EXAMPLES / "llama3-70b.yaml", tmp_path / "run", path)
    assert code == 0, err
    assert "checksum" not in out.split("resource")[1]  # no CRC time counted


def test_saved_plan_replays_exactly(tmp_path):
    vocab = len(load_tokenizer(None, None))
    data = write_texts(tmp_path / "train.jsonl")
    cfg = write_config(tmp_path, "run", {"config": tiny_config(vocab)}, data, max_steps=2)
    assert main(["plan", str(cfg)]) == 0
    planned = json.loads((tmp_path / "run" / "plan.json").read_text())
    replay = dict(planned, prefetch_depth=2, turn_keep=1)  # a hand-edited plan is taken as it is
    (tmp_path / "edited.json").write_text(json.dumps(replay))
    assert main(["train", str(cfg), "--plan", str(tmp_path / "edited.json")]) == 0
    used = Plan.from_dict(json.loads((tmp_path / "run" / "plan.json").read_text()))
    assert used == Plan.from_dict(replay)
    assert len(read_metrics(tmp_path / "run")) == 2


def _planned_tiny_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """A one-step tiny run's config, planned: its plan saved as ``planned.json``; output cleared."""
    vocab = len(load_tokenizer(None, None))
    data = write_texts(tmp_path / "train.jsonl")
    cfg = write_config(tmp_path, "run", {"config": tiny_config(vocab)}, data, max_steps=1)
    assert main(["plan", str(cfg)]) == 0
    (tmp_path / "planned.json").write_text((tmp_path / "run" / "plan.json").read_text())
    capsys.readouterr()
    return cfg


def test_a_replayed_plan_is_held_to_the_configs_memory_limit(tmp_path, capsys):
    """A plan made for more RAM than the config now allows stops before training, in one line
    that names the limit and the way out; at the limit it was made for it replays silently."""
    cfg = _planned_tiny_run(tmp_path, capsys)
    argv = ["train", str(cfg), "--plan", str(tmp_path / "planned.json")]
    assert main([*argv, "--set", "offload.cpu_memory_limit=8MB"]) == 2
    line = one_line_error(capsys)
    assert "offload.cpu_memory_limit" in line and "drop --plan" in line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert main(argv) == 0
    assert "--plan" not in capsys.readouterr().out  # no warning about the plan
    assert len(read_metrics(tmp_path / "run")) == 1


def test_a_hand_written_plan_without_budgets_gets_the_configs(tmp_path):
    vocab = len(load_tokenizer(None, None))
    data = write_texts(tmp_path / "train.jsonl")
    cfg = write_config(tmp_path, "run", {"config": tiny_config(vocab)}, data, max_steps=1)
    (tmp_path / "hand.json").write_text(json.dumps({"weights": "nvme", "optimizer": "nvme", "grads": "nvme",
                                                    "activations": "nvme", "chunk_numel": 16384}))
    assert main(["train", str(cfg), "--plan", str(tmp_path / "hand.json")]) == 0
    used = Plan.from_dict(json.loads((tmp_path / "run" / "plan.json").read_text()))
    if torch.cuda.is_available():  # gpu_memory_limit 16MB and cpu_memory_limit 24MB, each its own
        assert (used.device_budget_bytes, used.host_budget_bytes) == (16_000_000, 24_000_000)
    else:  # both are the RAM the config's 24MB bounds, split
        assert used.device_budget_bytes + used.host_budget_bytes == 24_000_000
    assert used.chunk_numel == 16384


@pytest.mark.parametrize(("budgets", "words"), [
    ({"host_budget_bytes": 4_000_000}, None),  # the other one from the config: the rest of its RAM
    ({"device_budget_bytes": "16GB"}, "device_budget_bytes must be a positive whole number of bytes"),
    ({"host_budget_bytes": None}, "host_budget_bytes"),
])
def test_a_plan_naming_one_budget_or_a_bad_one(tmp_path, capsys, budgets, words):
    vocab = len(load_tokenizer(None, None))
    data = write_texts(tmp_path / "train.jsonl")
    cfg = write_config(tmp_path, "run", {"config": tiny_config(vocab)}, data, max_steps=1)
    (tmp_path / "hand.json").write_text(json.dumps({"weights": "nvme", "optimizer": "nvme", "grads": "nvme",
                                                    "activations": "nvme", "chunk_numel": 16384, **budgets}))
    capsys.readouterr()
    code = main(["train", str(cfg), "--plan", str(tmp_path / "hand.json")])
    if words is not None:
        assert code == 2 and words in one_line_error(capsys)
        return
    assert code == 0
    used = Plan.from_dict(json.loads((tmp_path / "run" / "plan.json").read_text()))
    assert used.host_budget_bytes == 4_000_000
    if not torch.cuda.is_available():
        assert used.device_budget_bytes == 20_000_000


def test_a_replayed_plan_too_small_for_this_model_warns(tmp_path, capsys):
    """A plan made for a tiny model, replayed on one whose layers outgrow its budgets: a warning
    before training, then either a run within the budgets or one line naming the budget."""
    cfg = _planned_tiny_run(tmp_path, capsys)
    code = main(["train", str(cfg), "--plan", str(tmp_path / "planned.json"), "--set",
                 "model.config.hidden_size=512", "--set", "model.config.intermediate_size=2048",
                 "--set", "offload.cpu_memory_limit=2GB"])
    captured = capsys.readouterr()
    assert "its predicted peak passes its budgets" in captured.out
    assert code == 0 or (code == 2 and "budget" in captured.err and len(captured.err.strip().splitlines()) == 1)


def test_accumulation_amortises_the_ssd_on_the_70b_workstation(tmp_path):
    """Layer-major accumulation: 16 micro-batches per step move what one does, so the predicted
    tokens/s grow at least 8x; ``advice:`` names the accumulation where the search stopped."""
    tokens_per_s = {}
    for ga in (1, 16):
        code, out, err = plan_cli(EXAMPLES / "llama3-70b.yaml", tmp_path / f"ga{ga}", EXAMPLES / "workstation-24gb.json",
                                  f"train.gradient_accumulation_steps={ga}")
        assert code == 0, err
        saved = json.loads((tmp_path / f"ga{ga}" / "plan.json").read_text())
        assert saved["layer_major"] == (ga > 1)
        tokens_per_s[ga] = ga * 4096 / saved["predicted"]["step_s"]
        advice = [line for line in out.splitlines() if line.startswith("advice: ")]
        assert len(advice) == 1 and "gradient_accumulation_steps" in advice[0]
    assert tokens_per_s[16] >= 8 * tokens_per_s[1]


def test_advice_finds_where_compute_takes_over():
    """A fast SSD and a slow GPU: compute sets the pace from a small accumulation on; the
    advice is the smallest one whose plan says so (the one below it is not compute-bound)."""
    from dataclasses import replace

    from transformers import LlamaConfig

    from cli.budgets import load_profile_file
    from scheduler.batch_advice import advise_batch, compute_bound
    from scheduler.model_shape import shape_from_config
    from scheduler.planner import Budgets, choose_plan
    from scheduler.workload import Workload

    shape = shape_from_config(LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                          num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4))
    profile = replace(load_profile_file(EXAMPLES / "workstation-24gb.json"), matmul_tflops={"bfloat16": 20.0})
    wl = Workload(micro_batch=1, seq_len=2048, compute_dtype="bfloat16")
    budgets = Budgets(device_bytes=8 * 10**9, host_bytes=4 * 10**9, nvme_bytes=10**12)
    current = choose_plan(shape, wl, budgets, profile)
    advice = advise_batch(shape, wl, budgets, profile, current)
    assert not compute_bound(current)
    assert advice.grad_accum is not None and advice.grad_accum > 1 and compute_bound(advice.choice)
    below = choose_plan(shape, replace(wl, grad_accum=advice.grad_accum - 1), budgets, profile)
    assert not compute_bound(below) or not below.plan.layer_major
    assert "compute-bound from" in advice.line()
