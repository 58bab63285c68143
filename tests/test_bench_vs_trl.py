"""benchmarks/bench_vs_trl.py --check: cptlab's SDPO loss and TRL's SDPOTrainer.compute_loss on one batch.

TRL is not a cptlab dependency (benchmarks/trl_requirements.txt): without it this module is skipped."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("datasets")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sdpo_loss_and_gradient_equal_trl_sdpo_trainer_on_the_same_batch(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_vs_trl.py"), "--check", "--prompts", "4",
                           "--group-size", "4", "--max-new-tokens", "12", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    check = json.loads(out.read_text())["check"]
    assert 0 < check["distilled_rows"] < check["rows"]  # some rows distilled, some not: the normalisers differ
    assert check["ratio_same_maths"]["loss"] == pytest.approx(1.0, abs=1e-5)
    assert check["ratio_same_maths"]["grad_norm"] == pytest.approx(1.0, abs=1e-5)
    # as each side runs, the losses differ by the normalisation alone here (equal lengths: B / distilled rows)
    assert check["ratio_as_each_side_runs"]["loss"] == pytest.approx(check["rows"] / check["distilled_rows"], rel=1e-4)
