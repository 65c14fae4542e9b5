"""benchmarks/ab.py: its statistics, its arithmetic, its summary of raw rounds, and one small run."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.ab import summarize  # noqa: E402
from benchmarks.ab_stats import forward_equivalents, outliers, paired, quantile, summary  # noqa: E402


def test_paired_ratios_are_per_round_with_quartiles():
    a, b = [2.0, 4.0, 6.0, 8.0, 30.0], [1.0, 2.0, 3.0, 2.0, 3.0]
    p = paired(a, b)
    assert p["ratios"] == [2.0, 2.0, 2.0, 4.0, 10.0]
    assert p["median"] == 2.0 and p["max"] == 10.0 and p["mean"] == pytest.approx(4.0)
    assert p["q25"] == pytest.approx(np.percentile(p["ratios"], 25))
    assert p["q75"] == pytest.approx(np.percentile(p["ratios"], 75))
    assert p["iqr"] == pytest.approx(p["q75"] - p["q25"])
    # pairing matters: the ratio of medians (6/2 = 3) is not the median of the ratios
    assert summary(a)["median"] / summary(b)["median"] != p["median"]
    with pytest.raises(ValueError, match="equal, non-empty"):
        paired([1.0, 2.0], [1.0])


def test_quantile_matches_numpy():
    values = [0.3, 0.1, 0.9, 0.4, 0.7, 0.2]
    for q in (0.0, 0.25, 0.5, 0.75, 1.0):
        assert quantile(values, q) == pytest.approx(np.percentile(values, q * 100))


def test_outliers_are_rounds_above_three_times_the_median():
    assert outliers([1.0, 1.1, 0.9, 1.0, 3.5]) == [4]
    assert outliers([1.0, 1.0, 3.0]) == []  # exactly 3x is not above
    assert outliers([1.0, 1.0, 1.0, 2.0], factor=1.5) == [3]


def test_forward_equivalents_per_mode():
    sft = forward_equivalents("sft", 4)
    assert (sft["total"], sft["per_state"]) == (3, 3)
    col = forward_equivalents("colocated", 4)  # 4 roll-out forwards reused + 4 backwards (8) + 4 teacher
    assert (col["learner"], col["rollout"], col["per_state"]) == (16, 0, 4)
    dis = forward_equivalents("disaggregated", 4)  # + the roll-out again on the worker
    assert (dis["learner"], dis["rollout"], dis["per_state"]) == (16, 4, 5)
    roll = forward_equivalents("async_rollout", 4)  # the teacher moves to the worker, same total
    assert (roll["learner"], roll["rollout"], roll["total"]) == (12, 8, 20)
    sub = forward_equivalents("colocated", 4, m=2)  # 2 of 4 states trained: 4 + 2 * 2 + 2
    assert (sub["total"], sub["states"]) == (10, 2)
    with pytest.raises(ValueError, match="not one of"):
        forward_equivalents("pipeline", 4)
    with pytest.raises(ValueError, match="trained states"):
        forward_equivalents("colocated", 4, m=5)


def _row(step_s, images=1, states=1, **extra):
    row = {"step_s": step_s, "waited_s": 0.0, "rollout_s": 0.0, "sync_s": 0.0, "sync_bytes": 0, "fetch_s": 0.0,
           "gc_s": 0.0, "images": images, "states": states, "step_peak_bytes": None}
    return {**row, **extra}


def test_summary_pairs_rounds_and_explains_outliers():
    bare = {"fwd_bwd_b_s": 0.1, "fwd_bwd_kb_s": 0.4, "fwd_b_s": 0.03, "teacher_fwd_b_s": 0.03}
    sft = [0.1, 0.2, 0.1, 0.1, 0.1]
    dopsd = [0.5, 1.0, 0.5, 0.5, 3.0]  # round 4: a GC pause, only here
    rounds = [{"sft": _row(s), "dopsd_colocated": _row(d, states=4, gc_s=1.4 if i == 4 else 0.0), "bare": bare}
              for i, (s, d) in enumerate(zip(sft, dopsd))]
    state = {"total": 1000}
    peaks = {"sft": {"step_peak_bytes": 100}, "dopsd_colocated": {"step_peak_bytes": 100}}
    job = {"rounds": rounds, "memory_rounds": [peaks, peaks], "bursts": {},
           "memory_state": {"sft": state, "dopsd_colocated": {"total": 1200}}}
    out = summarize({"1": job}, warmup=1, k=4)
    pair = out["device_seconds"]["dopsd_colocated/sft"]
    # per trained state, per round: 1.25, 1.25, 1.25, 7.5 (round 0 is warm-up)
    assert pair["per_state"]["ratios"] == pytest.approx([1.25, 1.25, 1.25, 7.5])
    assert pair["per_state"]["median"] == pytest.approx(1.25)
    assert pair["arithmetic_per_state"] == pytest.approx(4 / 3)
    assert pair["met"]
    assert out["per_step"]["dopsd_colocated/sft"]["median"] == pytest.approx(5.0)
    # the colocated limit: K x (forward+backward + teacher forward) = 0.52 s; steps 1.0, 0.5, 0.5, 3.0
    assert out["limit"]["dopsd_colocated"]["learner"]["median"] == pytest.approx(0.75 / 0.52)
    (o,) = out["outliers"]
    assert (o["arm"], o["round"]) == ("dopsd_colocated", 4) and "Python GC" in o["why"]
    assert out["memory"]["world1"]["dopsd_over_sft"]["lora_z3_timing_arms"] == pytest.approx(1300 / 1100)


@pytest.mark.slow  # ~90 s on the shared 2-core machine (Ray, Ray Train, 2 DeepSpeed engines, a rollout actor)
def test_ab_smoke(tmp_path):
    """The harness end to end at a tiny size (Ray Train + DeepSpeed, a real rollout worker)."""
    out = tmp_path / "ab.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ab.py"), "--dim", "64", "--layers", "1",
                    "--arms", "sft,dopsd_onpolicy", "--rounds", "1", "--warmup", "0", "--ranks", "1",
                    "--no-memory", "--burst", "0", "--work-dir", str(tmp_path), "--out", str(out)],
                   check=True, cwd=ROOT, timeout=300)
    res = json.loads(out.read_text())
    (row,) = res["jobs"]["1"]["rounds"]
    assert row["dopsd_onpolicy"]["states"] == 4 and row["sft"]["states"] == 1
    assert row["dopsd_onpolicy"]["rollout_s"] > 0 and row["dopsd_onpolicy"]["raw_transfer_s"] > 0
    assert row["dopsd_onpolicy"]["sync_bytes"] > 0 and row["sft"]["sync_bytes"] == 0
    assert "dopsd_onpolicy/sft" in res["summary"]["device_seconds"]


def test_time_to_quality_takes_the_first_export_that_reaches_both_targets_and_the_table_names_every_seed():
    from benchmarks.ab import readme_table
    from benchmarks.quality import first_reached

    base_prior = 0.96
    points = [{"step": 10, "device_s": 2.0, "concept": 0.97, "prior": 0.90},  # concept, but the prior fell
              {"step": 15, "device_s": 3.0, "concept": 0.96, "prior": 0.93},  # 0.93 >= 0.95 x 0.96
              {"step": 5, "device_s": 1.0, "concept": 0.50, "prior": 0.96},
              {"step": 20, "device_s": 4.0, "concept": 1.00, "prior": 0.96}]
    assert first_reached(points, base_prior)["step"] == 15
    assert first_reached(points[2:3], base_prior) is None

    def run(method, seed, reached):
        return {"method": method, "seed": seed, "reached": reached and {"step": reached[0], "device_s": reached[1]}}
    quality = {"ratio_dopsd_over_sft": 4.0, "args": {"export_every": 5},
               "reached": {"dopsd": {"device_s_median": 8.0, "seeds": 2}, "sft": {"device_s_median": 2.0, "seeds": 2}},
               "runs": {"dopsd-1": run("dopsd", 1, None), "dopsd-0": run("dopsd", 0, (15, 8.0)),
                        "sft-0": run("sft", 0, (10, 2.0)), "sft-1": run("sft", 1, (15, 2.5))},
               "dopsd_at_sft_device_s": {"device_s": 2.0, "points": [None, {"concept": 0.25}]}}
    res = {"summary": {"device_seconds": {}, "limit": {}, "sync": {}, "memory": {}, "scaling": {}, "per_step": None}}
    (row,) = [r for r in readme_table(res, quality).splitlines() if "to quality" in r]
    assert "4.00" in row and "D-OPSD 8.0 s: 8.0 s (step 15), not reached" in row
    assert "SFT 2.0 s: 2.0 s (step 10), 2.5 s (step 15)" in row and "concept 0.25" in row


def test_memory_table_lists_the_memory_arms_in_megabytes():
    from benchmarks.ab import memory_table

    arm = {"weights": 100e6, "fp32_masters": 10e6, "adamw": 20e6, "ema_shadow": 5e6, "frozen_modules": 0.5e6,
           "total": 135.5e6, "step_peak": 40e6, "per_rank": 175.5e6}
    res = {"summary": {"memory": {"world2": {"arms": {"mem_dopsd_lora_z3": arm, "dopsd_colocated": arm}}}}}
    rows = memory_table(res).splitlines()[2:]
    assert rows == ["| 2 | dopsd_lora_z3 | 100.0 | 10.0 | 20.0 | 5.0 | 0.5 | 135.5 | 40.0 | 175.5 |"]
