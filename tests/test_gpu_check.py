"""benchmarks/gpu_check.py on the CPU, as CI runs it, so the GPU machine's one command cannot rot.

It starts its own local Ray (a subprocess: never a second Ray beside a test module's) and takes
about 4 minutes on a 2-core machine.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODES = ["colocated", "disaggregated", "async_rollout", "collective"]


@pytest.mark.slow  # about 4 minutes: run by `python -m pytest -m slow` (.ci/run runs it)
def test_gpu_check_runs_every_mode_and_its_checks_pass_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--out", str(out),
         "--work-dir", str(tmp_path / "work")],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    result = json.loads(out.read_text())

    assert result["passed"] is True and result["failed"] == []
    assert result["device"]["requested"] == "cpu" and result["device"]["name"]
    assert {"torch", "ray", "deepspeed"} <= result["versions"].keys() and result["date"]

    # every mode ran on zimage; flux2_klein ran the colocated / on-policy pair (the CPU default)
    runs = result["runs"]
    ran = {(f, m) for f, by_mode in runs.items() for m, r in by_mode.items() if "losses" in r}
    assert {("zimage", m) for m in MODES} | {("flux2_klein", "colocated"), ("flux2_klein", "disaggregated")} <= ran
    for family, mode in ran:
        r = runs[family][mode]
        assert r["steps"] == [1, 2, 3] and all(math.isfinite(v) and v > 0 for v in r["losses"]), (family, mode)
        assert r["learner_peak_gb"] > 0, (family, mode)  # memory/peak_gb_rank0 from MLflow
        if mode != "colocated":
            assert r["sync_checked"] == 3 and r["rollout_workers"], (family, mode)
            assert r["rollout_worker_memory"]["in_driver_stats"] is False
    assert result["placement"]["decision"].startswith("cpu")

    # the assertions, each with its result: the loss pairs among them
    checks = {c["name"]: c for c in result["assertions"]}
    assert all(c["passed"] is not False for c in checks.values())
    pairs = [c for name, c in checks.items() if "give the same losses" in name]
    assert {c["name"] for c in pairs if c["passed"]} >= {
        f"zimage: colocated and disaggregated give the same losses (rel {result['loss_rtol']:g})",
        f"zimage: disaggregated and collective give the same losses (rel {result['loss_rtol']:g})",
        f"flux2_klein: colocated and disaggregated give the same losses (rel {result['loss_rtol']:g})",
    }
    for c in pairs:
        if c["passed"]:
            assert c["detail"]["max_rel_diff"] <= result["loss_rtol"]

    ema = result["ema_check"]
    assert ema["passed"] and ema["teacher_vs_fp32_reference_max_ulps"] <= 1 and ema["teacher_elements_moved"] > 0
    assert ema["dtypes"] == ["torch.bfloat16"]

    device = result["device_check"]
    assert device["passed"] and len(device["cases"]) == 6
    assert all(c["devices_after_to_cpu"] == ["cpu"] and c["devices_after_to_device"] == ["cpu"]
               for c in device["cases"].values())

    times = result["step_times"]
    assert [row["algorithm"] for row in times["rows"]] == ["sft", "dopsd"]
    assert all(0 < row["median_s"] <= row["max_s"] for row in times["rows"])
    assert times["width"]["dim"] == 64 and times["real_zimage_width"] is False and times["dopsd_over_sft"] > 1

    assert result["memory"]["learner_peak_gb"] and "no memory figure" in result["memory"]["rollout_source"]
