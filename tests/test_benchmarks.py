"""The training-step benchmark runs end to end at the debug size and refuses bad flags."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "USE_FLAX": "0"}


def run_train_real(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_real.py"), *args], capture_output=True,
                          text=True, env=ENV, timeout=120)


def test_train_real_reports_the_three_steps_at_debug_size():
    out = run_train_real("--preset", "debug", "--steps", "1", "--rounds", "1", "--device", "cpu")
    assert out.returncode == 0, out.stderr[-3000:]
    for row in ("(a) trainer, cached targets", "(c) trainer, targets on the fly", "(b) original's step"):
        line = next((x for x in out.stdout.splitlines() if x.startswith(row)), None)
        assert line is not None, out.stdout
        samples_s, ms, gflop = (float(v) for v in line[len(row):].split()[:3])
        assert samples_s > 0 and ms > 0 and gflop > 0, line
        assert line.endswith("GiB"), line  # the peak resident memory of the timed steps
    ratios = re.findall(r"ratio \(a\)/\((b|c)\) step time = ([0-9.]+)", out.stdout)
    assert [key for key, _ in ratios] == ["b", "c"] and all(float(v) > 0 for _, v in ratios), out.stdout
    assert "MFU: not defined" in out.stdout, out.stdout


def test_train_real_refuses_a_zero_step_count():
    out = run_train_real("--preset", "debug", "--steps", "0", "--device", "cpu")
    assert out.returncode == 2
    assert "--steps must be at least 1, got 0" in out.stderr


def test_train_real_refuses_an_unknown_preset_and_device():
    out = run_train_real("--preset", "huge")
    assert out.returncode == 2 and "--preset: invalid choice: 'huge'" in out.stderr
    out = run_train_real("--device", "tpu0")
    assert out.returncode == 2 and "--device 'tpu0' is not a torch device" in out.stderr
