"""The offload-train command, run as a user runs it (a subprocess)."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, timeout=600)


def test_demo_trains_and_the_loss_falls(tmp_path):
    proc = run_cli("demo", "--steps", "20", "--nvme-path", str(tmp_path / "swap"))
    assert proc.returncode == 0, proc.stderr
    losses = [float(line.split("loss")[1].split()[0]) for line in proc.stdout.splitlines()
              if line.startswith("step")]
    assert len(losses) >= 2
    assert losses[-1] < losses[0] - 0.5
    assert (tmp_path / "swap" / "manifest.json").exists()


def test_unwritable_nvme_path_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = run_cli("demo", "--steps", "1", "--nvme-path", str(blocker / "swap"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "not writable" in lines[0]


def test_help_lists_commands():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for command in ("train", "plan", "profile", "export", "demo"):
        assert command in proc.stdout


def test_profile_values_are_checked():
    from scheduler.profile import HardwareProfile

    good = {"machine": "m", "nvme_path": "/s", "io_backend": "posix", "ssd_read_gbps": 1.0, "ssd_write_gbps": 1.0,
            "h2d_gbps": None, "d2h_gbps": None, "cpu_adam_params_per_s": {"torch": 1e8},
            "matmul_tflops": {"float32": 0.1}, "ram_available_bytes": 1, "vram_free_bytes": None,
            "disk_free_bytes": 1, "measured_at": "t", "io_compute_s_per_gb": 0.2}
    import json

    assert HardwareProfile.from_json(json.dumps(good)).io_compute_s_per_gb == 0.2
    assert HardwareProfile.from_json(json.dumps({**good, "io_compute_s_per_gb": None})).io_compute_s_per_gb is None
    with pytest.raises(ValueError, match="io_compute_s_per_gb"):
        HardwareProfile.from_json(json.dumps({**good, "io_compute_s_per_gb": -1}))
    assert HardwareProfile.from_json(json.dumps(good)).ssd_mixed_gbps is None  # older or hand-written
    assert HardwareProfile.from_json(json.dumps({**good, "ssd_mixed_gbps": 1.5})).ssd_mixed_gbps == 1.5
    for key in ("ssd_mixed_gbps", "ssd_beside_compute_gbps"):
        for bad in (0, -1.0, "fast"):
            with pytest.raises(ValueError, match=key):
                HardwareProfile.from_json(json.dumps({**good, key: bad}))


def test_profile_measures_and_caches(tmp_path):
    import json
    import os

    # a fresh profile cache; DeepSpeed's compiled ops stay in the user's cache (no rebuild)
    env = {**os.environ, "OFFLOAD_TRAIN_CACHE": str(tmp_path / "cache" / "offload-train")}
    proc = subprocess.run([sys.executable, "-m", "cli", "profile", "--nvme-path", str(tmp_path / "ssd"),
                           "--size", "64MiB", "--io-backend", "posix"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    cached = list((tmp_path / "cache" / "offload-train").glob("profile-*.json"))
    assert len(cached) == 1
    profile = json.loads(cached[0].read_text())
    assert profile["ssd_read_gbps"] > 0 and profile["ssd_write_gbps"] > 0 and profile["ssd_mixed_gbps"] > 0
    assert profile["cpu_adam_params_per_s"]["torch"] > 0
    assert profile["matmul_tflops"]["float32"] > 0 and profile["checksum_gbps"] > 0
    if profile["h2d_gbps"] is None:  # no GPU: the compute the store's threads take is measured
        assert profile["io_compute_s_per_gb"] >= 0 and (profile["ssd_beside_compute_gbps"] or 0) > 0
    assert not any(p.name.startswith(".profile-") for p in (tmp_path / "ssd").iterdir())  # cleaned up
