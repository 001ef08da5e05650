"""The benchmarks run end to end at small sizes and refuse bad flags."""

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.parametrize(("argv", "message"), [
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--batch", "-2"], "--batch must be at least 1, got -2"),
    (["--preset", "huge"], "--preset: invalid choice: 'huge'"),
    (["--device", "tpu0"], "--device 'tpu0' is not a torch device"),
])
def test_train_real_refuses_bad_flags(argv, message, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setattr(sys, "argv", ["train_real.py", *argv])
    train_real = importlib.import_module("train_real")
    with pytest.raises(SystemExit) as exit_info:
        train_real.parse()
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cpu_generate_reports_images_per_second_against_a_revision():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cpu_generate.py"), "--batches", "1",
                          "--repeats", "1", "--rounds", "1", "--against", "HEAD"], capture_output=True, text=True,
                         env=ENV, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("batch   1:"))
    ours, theirs = (float(v) for v in re.findall(r"([0-9.]+) images/s", line))
    ratio = float(line.rsplit("ratio=", 1)[1])
    assert ours > 0 and theirs > 0 and ratio == pytest.approx(ours / theirs, abs=2e-3), line
    assert out.stdout.splitlines()[-1] == f"ratio={ratio:.3f}"
