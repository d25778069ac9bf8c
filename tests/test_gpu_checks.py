"""The prepared GPU-check script runs on a CPU too: its correctness checks (device scores against float64
CPU scores, hook gradients against a single-example backward loop) must pass here, timings skipped."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_checks  # noqa: E402
from reference import FLOAT32_TOL  # noqa: E402


def test_gpu_checks_pass_on_cpu(tmp_path):
    code = gpu_checks.main(["--device", "cpu", "--quick", "--models", "minilm", "--skip-timings",
                            "--out", str(tmp_path)])
    result = json.loads((tmp_path / "gpu_checks.json").read_text())
    assert code == 0 and result["failed"] == []
    assert set(result["estimators"]["methods"]) == {"datainf", "exact", "identity", "lissa"}
    grads = result["gradients"]["minilm"]
    # float32 model: hooks vs loop within the float32 bound of tests/reference.py (FLOAT32_TOL); a leaked
    # padding position or a missed module call is O(1e-2) or more
    assert grads["max_rel_error_vs_loop"] < FLOAT32_TOL and grads["bfloat16_min_cosine"] > 0.9
    # the projected path: float32 hooks against float64 CPU gradients projected explicitly (same bound)
    assert result["projection"]["minilm"]["max_rel_error_vs_float64"] < FLOAT32_TOL
    assert set(result["stores"]["dtypes"]) == {"float32", "float16", "bfloat16"}
    assert all(e["ok"] for r in result["stores"]["dtypes"].values() for e in r.values())
