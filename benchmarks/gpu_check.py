"""One command for the first GPU machine: every mode through the real driver in bf16, with checks.

    python benchmarks/gpu_check.py                          # cuda when there is one, else cpu
    python benchmarks/gpu_check.py --device cpu             # what CI runs (tests/test_gpu_check.py)
    python benchmarks/gpu_check.py --device cpu --full      # every family in every mode on CPU too (~6 min)
    python benchmarks/gpu_check.py --device cuda --out benchmarks/results/gpu_check-cuda.json

A few minutes on one GPU; about 4 on a 2-core CPU. It runs, in this order:

1. EMA check (in process, no Ray): the tiny Z-Image's LoRA weights in bf16 (make_weights +
   EmaTeacher), torch AdamW steps on a simple loss, and an fp32 reference EMA of the student
   kept beside it: the bf16 teacher must be that reference rounded to bf16 within 1 bf16 ulp,
   and must have moved.
2. Device check (in process): Experiences made on the device with make_experience (D-OPSD with
   the teacher on the learner, with teacher targets, SFT; both tiny families): exp.to("cpu")
   leaves every tensor (tensors_in) on the CPU, exp.to(device) puts every one on the device.
3. Step times (before any Ray process shares the machine): SFT and D-OPSD side by side with the
   learner's in-process loss function (colocated_loss with a backward per state + AdamW step), bf16, on a
   transformer of Z-Image's real width (dim 3840, 30 heads of 128, cap_feat_dim 2560) with fewer
   layers (2 + 1 refiner), at 512 x 512 px images (64 x 64 latents), on GPU; on CPU a small width
   (dim 64: the real one is far too slow there), recorded in the JSON.
4. Driver runs: the tiny families (zimage = configs/tiny.yaml; flux2_klein with the overrides of
   tests/test_reliability.py) in bf16 through dopsd_ray.driver.train, a few steps in each mode:
       colocated        runtime.mode=colocated
       disaggregated    on-policy: runtime.mode=disaggregated runtime.max_staleness=0
       async_rollout    runtime.max_staleness=1 runtime.teacher_targets=rollout
       collective       disaggregated on-policy with runtime.sync_transport=collective
   (--device cpu by default: every mode on zimage, colocated and disaggregated on flux2_klein;
   --full for all), every disaggregated run with runtime.debug_check_sync=true (each trained
   experience's weights must be exactly the learner's snapshot of its version). Read back from
   MLflow: per-step losses, staleness, learner step seconds, learner peak memory
   (memory/peak_gb_rank0); rollout workers: their stats, and a sampled peak RSS (see memory_report).
   Asserted: colocated and disaggregated on-policy give the same losses, and so do object store
   and collective (same seeds and data order; bf16 tolerance, see LOSS_RTOL).
   Placement: cpu: everything on CPUs. 2+ GPUs: one whole GPU per learner and per rollout worker.
   1 GPU: the object-store modes give the learner and the rollout worker 0.5 GPU each (Ray packs
   them on the one GPU); the collective transport is skipped, because preflight refuses it there
   (NCCL ranks may not share a GPU, and CPU rollout workers cannot join an NCCL group): the
   refusals themselves are recorded in the JSON.

Writes benchmarks/results/gpu_check-<device>.json (device name, versions, date, every figure),
prints progress lines and a summary table, and exits non-zero (AssertionError) when a check
fails, after writing the JSON.
"""

import argparse
import datetime
import gc
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.bench_model import count_parameters, init_ray, make_transformer, write_result  # noqa: E402
from dopsd_ray.config import ConfigError  # noqa: E402
from dopsd_ray.recipes import load_config  # noqa: E402

TINY = ROOT / "configs" / "tiny.yaml"
FAMILIES = {
    "zimage": [],
    "flux2_klein": ["model.family=flux2_klein", "model.max_sequence_length=160", "algorithm.training_sigmas=inference"],
}
MODES = {
    "colocated": ["runtime.mode=colocated"],
    "disaggregated": ["runtime.mode=disaggregated", "runtime.max_staleness=0", "runtime.debug_check_sync=true"],
    "async_rollout": ["runtime.mode=disaggregated", "runtime.max_staleness=1", "runtime.teacher_targets=rollout",
                      "runtime.debug_check_sync=true"],
    "collective": ["runtime.mode=disaggregated", "runtime.max_staleness=0", "runtime.sync_transport=collective",
                   "runtime.debug_check_sync=true"],
}
ON_POLICY = ("disaggregated", "collective")
# --device cpu runs this subset unless --full or --modes says otherwise: all 8 runs take ~6 min on a
# 2-core machine (about 40 s each, nearly all Ray Train / DeepSpeed start-up), these 6 about 4. Every
# mode still runs (on zimage), and flux2_klein gets the colocated / on-policy pair.
CPU_DEFAULT = {"zimage": list(MODES), "flux2_klein": ["colocated", "disaggregated"]}
CPU_SKIP = "not run with --device cpu by default (keeps the CI run near 4 minutes on 2 cores); --full runs it"
# Modes whose per-step losses must agree (same seeds, same data order, same weights at every version).
LOSS_PAIRS = [("colocated", "disaggregated"), ("disaggregated", "collective")]
# In fp32 these agree to rel 1e-4 (tests/test_runtime.py). In bf16 they do not agree bit for bit:
# the colocated learner rolls out with its DeepSpeed-wrapped module in grad mode, the rollout worker
# with its own copy under no_grad, and different (equally valid) kernels round bf16 activations
# differently; bf16 keeps 8 significant bits (unit roundoff 2^-8 = 3.9e-3), so a loss that is a
# squared difference of bf16 velocities moves by a few of those. 2e-2 is ~5 bf16 roundoffs: far
# below what a wrong snapshot or a wrong batch would do, above kernel rounding (measured on a CPU:
# 2e-3 to 5e-3 at steps 1-3; object store vs collective: bit for bit).
LOSS_RTOL = 2e-2
CAPTIONS = ["a red fox sitting in fresh snow, morning light, shallow depth of field",
            "a ceramic teapot with blue glaze on a wooden table next to a window"]

START = time.perf_counter()


def log(message: str) -> None:
    print(f"[gpu_check {time.perf_counter() - START:6.1f}s] {message}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gpu_check-<device>.json)")
    p.add_argument("--steps", type=int, default=3, help="training steps per driver run")
    p.add_argument("--families", default=",".join(FAMILIES), help=f"comma list of {', '.join(FAMILIES)}")
    p.add_argument("--modes", default=None, help=f"comma list of {', '.join(MODES)} for every family "
                   "(default: all of them; with --device cpu: every mode on zimage, colocated and "
                   "disaggregated on flux2_klein, unless --full)")
    p.add_argument("--full", action="store_true", help="--device cpu: every family in every mode")
    p.add_argument("--loss-rtol", type=float, default=LOSS_RTOL, help="relative tolerance of the loss pairs")
    p.add_argument("--work-dir", default=str(ROOT / "outputs" / "gpu_check"))
    p.add_argument("--timing-repeats", type=int, default=None, help="timed steps per algorithm (gpu 5, cpu 3)")
    p.add_argument("--timing-warmup", type=int, default=None, help="untimed steps first (gpu 2, cpu 1)")
    args = p.parse_args(argv)
    for name, value, known in (("--families", args.families, FAMILIES), ("--modes", args.modes or "", MODES)):
        unknown = [x for x in value.split(",") if x and x not in known]
        if unknown:
            p.error(f"unknown {name} {unknown}; known: {', '.join(known)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device (is the CUDA build of torch installed?)")
    return args


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict:
    import deepspeed
    import diffusers
    import peft
    import ray
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "ray": ray.__version__, "deepspeed": deepspeed.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def tiny_family(family_name: str, device: str, work: Path, *overrides):
    """(cfg, family) of a tiny random family in bf16, on `device` (built once under `work`)."""
    from dopsd_ray.families import build_tiny, load_family

    cfg = load_config(TINY, [*FAMILIES[family_name], "model.dtype=bfloat16", *overrides])
    path = build_tiny(cfg.model, work / f"tiny_{family_name}", cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    return cfg, load_family(cfg.model, path, device=device)


# -- 1. the EMA teacher in bf16 ------------------------------------------------------------------


def ordered_bits(x: torch.Tensor) -> torch.Tensor:
    """bf16 values as integers whose differences count ulps (sign-magnitude -> two's complement)."""
    bits = x.to(torch.bfloat16).view(torch.int16).to(torch.int32)
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in bf16 ulps between two tensors (both rounded to bf16)."""
    return int((ordered_bits(a) - ordered_bits(b)).abs().max().item()) if a.numel() else 0


def ema_check(device: str, work: Path, steps: int = 40, decay: float = 0.999, lr: float = 0.05) -> dict:
    """The bf16 teacher follows an fp32 reference EMA of the student, rounded once to bf16.

    decay 0.999 and lr 0.05: per step the EMA moves a thousandth of the student's distance, below
    half a bf16 ulp for most weights, so a bf16 EMA (`t.lerp_(s, 1 - decay)` in bf16) would round
    most updates away; the fp32 shadow must not. The naive bf16 EMA is run beside it for contrast.
    """
    from dopsd_ray.families import lora_targets
    from dopsd_ray.weights import EmaTeacher, make_weights

    cfg, family = tiny_family("zimage", device, work)
    weights = make_weights(family.transformer, cfg.lora, lora_targets("zimage"))
    ema = EmaTeacher(weights)
    students, teachers = weights.trainable_parameters(), weights.teacher_parameters()
    dtypes = sorted({str(p.dtype) for p in students + teachers})
    initial = [t.detach().clone() for t in teachers]
    reference = [t.detach().float().clone() for t in teachers]  # the teacher starts equal to the student
    naive = [t.detach().clone() for t in teachers]  # a bf16-only EMA, for contrast
    optimizer = torch.optim.AdamW(students, lr=lr)
    context = family.student_context(CAPTIONS[:1])
    losses = []
    for step in range(steps):
        x = torch.randn(family.latent_shape(1, 32, 32), generator=torch.Generator().manual_seed(step)).to(device)
        loss = family.velocity(weights.model, x, torch.tensor(0.75), context).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(decay)
        with torch.no_grad():
            reference = [decay * r + (1 - decay) * s.detach().float() for r, s in zip(reference, students)]
            for n, s in zip(naive, students):
                n.lerp_(s.detach(), 1 - decay)
        losses.append(loss.item())
    synchronize(device)
    teacher_vs_reference = max(ulps(t, r) for t, r in zip(teachers, reference))
    naive_vs_reference = max(ulps(n, r) for n, r in zip(naive, reference))
    moved_elements = sum(int((t != i).sum()) for t, i in zip(teachers, initial))
    # where the fp32 EMA has moved by at least one bf16 step but the bf16-only EMA is still at its start
    naive_stuck = sum(int(((n == i) & (r.to(torch.bfloat16) != i)).sum()) for n, r, i in zip(naive, reference, initial))
    reference_moved_ulps = max(ulps(r, i) for r, i in zip(reference, initial))
    total = sum(t.numel() for t in teachers)
    result = {
        "family": "zimage (tiny)", "device": device, "dtypes": dtypes, "steps": steps, "decay": decay, "lr": lr,
        "teacher_tensors": len(teachers), "teacher_elements": total,
        "teacher_vs_fp32_reference_max_ulps": teacher_vs_reference,
        "teacher_elements_moved": moved_elements,
        "reference_moved_max_ulps": reference_moved_ulps,
        "naive_bf16_ema_vs_reference_max_ulps": naive_vs_reference,
        "naive_bf16_ema_elements_stuck_at_start": naive_stuck,
        "losses_first_last": [losses[0], losses[-1]],
        "finite": all(math.isfinite(v) for v in losses) and all(bool(torch.isfinite(t).all()) for t in teachers),
    }
    result["checks"] = {
        "bf16_weights": dtypes == ["torch.bfloat16"],
        "teacher_within_1_ulp_of_fp32_reference": teacher_vs_reference <= 1,
        "teacher_moved": moved_elements > 0 and reference_moved_ulps > 1,
        "finite": result["finite"],
    }
    result["passed"] = all(result["checks"].values())
    return result


# -- 2. no tensor on the wrong device ----------------------------------------------------------


def device_check(device: str, work: Path) -> dict:
    """Experiences made on `device`: .to("cpu") puts every tensor on the CPU (what rollout workers
    queue), .to(device, non_blocking=True) every one on the device (what the learner does)."""
    from dopsd_ray.algorithms.schedules import training_sigmas
    from dopsd_ray.algorithms.steps import Batch, make_experience
    from dopsd_ray.families import lora_targets
    from dopsd_ray.tensors import tensors_in
    from dopsd_ray.weights import make_weights

    target = torch.empty(0, device=device).device  # "cuda" -> cuda:<current>
    out = {"device": str(target), "cases": {}}
    for family_name in FAMILIES:
        for kind, overrides, with_targets in (("dopsd", [], False), ("dopsd_targets", [], True),
                                              ("sft", ["algorithm.name=sft"], False)):
            cfg, family = tiny_family(family_name, device, work, *overrides)
            weights = make_weights(family.transformer, cfg.lora, lora_targets(family_name))
            side = family.pixel_multiple * 2
            images = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(0)) * 2 - 1
            batch = Batch(images, list(CAPTIONS), ["a", "b"])
            algo = cfg.algorithm
            sigmas = training_sigmas(algo.training_sigmas, family, side, side, algo.inference_steps)
            exp = make_experience(family, weights, batch, sigmas, algo, 0, with_targets)
            made = list(tensors_in(exp))
            on_cpu = list(tensors_in(exp.to("cpu")))
            back = list(tensors_in(exp.to("cpu").to(device, non_blocking=True)))
            synchronize(device)
            case = {
                "tensors": len(made),
                "devices_as_made": sorted({str(t.device) for t in made}),
                "devices_after_to_cpu": sorted({str(t.device) for t in on_cpu}),
                "devices_after_to_device": sorted({str(t.device) for t in back}),
                "values_kept": len(back) == len(made) and all(
                    torch.equal(a.cpu(), b.cpu()) for a, b in zip(made, back)),
            }
            case["passed"] = (len(made) >= 4 and len(on_cpu) == len(made) == len(back)
                              and all(t.device.type == "cpu" for t in on_cpu)
                              and all(t.device == target for t in back) and case["values_kept"])
            out["cases"][f"{family_name}/{kind}"] = case
            del family, weights, exp
    out["passed"] = all(c["passed"] for c in out["cases"].values())
    return out


# -- 4. the driver in every mode ---------------------------------------------------------------


def selection(args) -> dict[str, list[str]]:
    """{family: modes to run}."""
    families = args.families.split(",")
    if args.modes:
        return {f: args.modes.split(",") for f in families}
    if args.device == "cuda" or args.full:
        return {f: list(MODES) for f in families}
    return {f: CPU_DEFAULT[f] for f in families}


def gpu_count(device: str) -> int:
    """GPUs Ray can place on (the cluster's under RAY_ADDRESS), or 0 on CPU."""
    if device != "cuda":
        return 0
    import ray

    return int(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else torch.cuda.device_count()


def placement(device: str, gpus: int) -> dict:
    """Per mode: the resource overrides, or why the mode is skipped on this machine."""
    from dopsd_ray.preflight import check_placement

    if device == "cpu":
        plan = {m: {"overrides": ["runtime.torch_threads=1"]} for m in MODES}
        return {"gpus": 0, "decision": "cpu: learner and rollout workers on CPUs (the default resources)",
                "modes": plan}
    if gpus < 1:
        raise RuntimeError("--device cuda, but Ray sees no GPU to place the learner on")
    whole = ["runtime.learner_resources={CPU: 1, GPU: 1}", "runtime.rollout_resources={CPU: 1, GPU: 1}"]
    if gpus >= 2:
        return {"gpus": gpus, "decision": f"{gpus} GPUs: one whole GPU per learner and per rollout worker",
                "modes": {m: {"overrides": whole} for m in MODES}}
    half = ["runtime.learner_resources={CPU: 1, GPU: 0.5}", "runtime.rollout_resources={CPU: 1, GPU: 0.5}"]
    # Ask preflight itself about the collective transport on one GPU: both ways of fitting it
    # (two half GPUs; a whole GPU for the learner and CPU rollout workers) must be refused.
    refusals = {}
    for name, overrides in (("half_gpu_each", half),
                            ("cpu_rollout", ["runtime.learner_resources={CPU: 1, GPU: 1}",
                                             "runtime.rollout_resources={CPU: 1}", "runtime.allow_cpu_rollout=true"])):
        cfg = load_config(TINY, [*MODES["collective"], *overrides])
        try:
            check_placement(cfg)
            refusals[name] = None
        except ConfigError as err:
            refusals[name] = str(err)
    modes = {"colocated": {"overrides": ["runtime.learner_resources={CPU: 1, GPU: 1}"]},
             "disaggregated": {"overrides": half}, "async_rollout": {"overrides": half}}
    if all(refusals.values()):
        modes["collective"] = {"skipped": "one GPU: preflight refuses runtime.sync_transport=collective with "
                                          "fractional GPUs (NCCL ranks may not share a GPU) and with CPU rollout "
                                          "workers (they cannot join an NCCL group); see preflight_refusals"}
    else:  # preflight would let one of them through: run it that way
        name = next(k for k, v in refusals.items() if v is None)
        modes["collective"] = {"overrides": half if name == "half_gpu_each" else
                               ["runtime.learner_resources={CPU: 1, GPU: 1}", "runtime.rollout_resources={CPU: 1}",
                                "runtime.allow_cpu_rollout=true"]}
    return {"gpus": gpus, "decision": "1 GPU: object-store modes with GPU 0.5 each for the learner and the rollout "
                                      "worker (Ray packs them on the one GPU); collective: "
                                      + ("skipped (refused by preflight)" if "skipped" in modes["collective"]
                                         else "run as preflight allows"),
            "modes": modes, "preflight_refusals": refusals}


class RolloutMemorySampler:
    """Peak host RSS of the rollout worker processes (and, on GPUs, their used GPU memory per
    nvidia-smi), sampled while a run goes on: the driver's worker stats carry no memory figure.
    A sampled peak is a lower bound of the true one."""

    def __init__(self, cuda: bool, every_s: float = 0.5):
        self.cuda, self.every_s = cuda, every_s
        self.rss: dict[int, int] = {}
        self.gpu_mib: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._before = {pid for pid, _ in self._scan()}  # earlier runs' workers may still be exiting
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)

    @staticmethod
    def _scan() -> list[tuple[int, int]]:
        """(pid, RSS bytes) of every ray::RolloutWorker process on this machine."""
        try:
            import psutil
        except ImportError:
            return []
        found = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                if "RolloutWorker" in " ".join(proc.info["cmdline"] or []):
                    found.append((proc.pid, proc.memory_info().rss))
            except (psutil.Error, OSError):
                continue
        return found

    def _loop(self):
        tick = 0
        while not self._stop.is_set():
            pids = []
            for pid, rss in self._scan():
                if pid not in self._before:
                    pids.append(pid)
                    self.rss[pid] = max(self.rss.get(pid, 0), rss)
            if self.cuda and pids and tick % 4 == 0:
                for pid, mib in nvidia_smi_used_mib().items():
                    if pid in pids:
                        self.gpu_mib[pid] = max(self.gpu_mib.get(pid, 0.0), mib)
            tick += 1
            self._stop.wait(self.every_s)

    def result(self) -> dict:
        return {"sampled_peak_rss_gb": round(max(self.rss.values()) / 1e9, 3) if self.rss else None,
                "sampled_peak_gpu_used_gb": round(max(self.gpu_mib.values()) * 2**20 / 1e9, 3) if self.gpu_mib else None,
                "processes_seen": len(self.rss)}


def nvidia_smi_used_mib() -> dict[int, float]:
    """{pid: used GPU MiB} of compute processes (empty where nvidia-smi cannot say, e.g. PID namespaces)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        return {int(pid): float(mib) for pid, mib in (line.split(",") for line in out.strip().splitlines() if line)}
    except Exception:
        return {}


def metric(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def driver_run(family: str, mode: str, overrides: list[str], args, out_dir: Path) -> dict:
    from mlflow.tracking import MlflowClient

    from dopsd_ray.driver import train

    name = f"{family}-{mode}-{int(time.time() * 1000)}"  # a new run each time: a re-used name would resume
    cfg = load_config(TINY, [
        *FAMILIES[family], *MODES[mode], *overrides, "model.dtype=bfloat16",
        f"train.output_dir={out_dir}", f"train.run_name={name}", f"train.steps={args.steps}",
        "train.sample_every=1000000", "train.checkpoint_every=1000000", "runtime.max_failures=0",
        "runtime.sync_timeout_s=120", f"tracking.tracking_uri=sqlite:///{out_dir}/mlflow.db"])
    started = time.perf_counter()
    with RolloutMemorySampler(args.device == "cuda") as sampler:
        summary = train(cfg)
    client = MlflowClient(summary["mlflow_tracking_uri"])
    run_id = summary["mlflow_run_id"]
    losses = metric(client, run_id, "loss")
    peak = [v for _, v in metric(client, run_id, "memory/peak_gb_rank0")]
    step_s = [v for _, v in metric(client, run_id, "learner/step_seconds")]
    sync_checked = metric(client, run_id, "count/sync_checked")
    workers = summary["rollout_workers"]
    return {
        "run_name": name, "mlflow_run_id": run_id, "mlflow_tracking_uri": summary["mlflow_tracking_uri"],
        "learner_resources": dict(cfg.runtime.learner_resources),
        "rollout_resources": dict(cfg.runtime.rollout_resources) if cfg.runtime.mode == "disaggregated" else None,
        "steps": [s for s, _ in losses], "losses": [v for _, v in losses],
        "staleness": [v for _, v in metric(client, run_id, "staleness")],
        "sync_checked": sync_checked[-1][1] if sync_checked else None,
        "learner_peak_gb": max(peak) if peak else None,
        "learner_step_seconds": step_s,
        "sync_seconds": [v for _, v in metric(client, run_id, "sync/seconds")],
        "rollout_workers": workers,
        "rollout_worker_memory": ({**sampler.result(), "in_driver_stats": any(
            "mem" in k for w in workers for k in w)} if workers else None),
        "run_seconds": summary["seconds"], "wall_seconds": time.perf_counter() - started,
    }


def driver_runs(args, chosen: dict[str, list[str]], work: Path) -> tuple[dict, dict]:
    """(placement, runs): every selected family and mode through dopsd_ray.driver.train."""
    import ray

    out_dir = work / "runs"
    out_dir.mkdir(parents=True, exist_ok=True)
    started_ray = not ray.is_initialized()
    if started_ray:
        init_ray()  # a local Ray (num_cpus=max(4, cores)), or the cluster's under RAY_ADDRESS
    runs = {}
    try:
        plan = placement(args.device, gpu_count(args.device))
        log(f"placement: {plan['decision']}")
        for family, selected in chosen.items():
            runs[family] = {}
            for mode in MODES:
                entry = plan["modes"][mode] if mode in selected else {"skipped": CPU_SKIP if args.device == "cpu"
                                                                      and not args.modes else "not in --modes"}
                if "skipped" in entry:
                    log(f"{family} / {mode}: skipped ({entry['skipped']})")
                    runs[family][mode] = {"skipped": entry["skipped"]}
                    continue
                log(f"{family} / {mode}: driver run, {args.steps} steps, bf16 ...")
                try:
                    runs[family][mode] = driver_run(family, mode, entry["overrides"], args, out_dir)
                    r = runs[family][mode]
                    log(f"{family} / {mode}: losses {', '.join(f'{v:.6g}' for v in r['losses'])} "
                        f"(run {r['run_seconds']:.1f}s)")
                except Exception as err:  # record it, go on with the other modes, fail at the end
                    traceback.print_exc()
                    runs[family][mode] = {"error": f"{type(err).__name__}: {err}"}
                    log(f"{family} / {mode}: FAILED: {type(err).__name__}: {err}")
    finally:
        if started_ray:
            ray.shutdown()
    return plan, runs


def run_assertions(runs: dict, steps: int, rtol: float) -> list[dict]:
    checks = []

    def check(name, passed, detail):
        checks.append({"name": name, "passed": bool(passed), "detail": detail})

    for family, by_mode in runs.items():
        for mode, r in by_mode.items():
            if "skipped" in r:
                continue
            where = f"{family}/{mode}"
            if "error" in r:
                check(f"{where}: run finished", False, r["error"])
                continue
            ok = r["steps"] == list(range(1, steps + 1)) and all(math.isfinite(v) and v > 0 for v in r["losses"])
            check(f"{where}: {steps} finite positive losses", ok, {"steps": r["steps"], "losses": r["losses"]})
            if mode in ON_POLICY:
                check(f"{where}: on-policy (staleness 0 at every step)",
                      len(r["staleness"]) == steps and all(v == 0 for v in r["staleness"]), r["staleness"])
                worker = (r["rollout_workers"] or [{}])[0]
                check(f"{where}: the rollout worker holds the final snapshot (version {steps})",
                      worker.get("version") == steps, worker)
            if mode == "async_rollout":
                check(f"{where}: staleness <= 1", len(r["staleness"]) == steps and max(r["staleness"]) <= 1,
                      r["staleness"])
            if mode != "colocated":
                check(f"{where}: every trained experience's weights = the learner's snapshot (debug_check_sync)",
                      r["sync_checked"] == steps, {"count/sync_checked": r["sync_checked"]})
        for a, b in LOSS_PAIRS:
            ra, rb = by_mode.get(a), by_mode.get(b)
            name = f"{family}: {a} and {b} give the same losses (rel {rtol:g})"
            if ra is None or rb is None or "skipped" in ra or "skipped" in rb:
                why = (ra or {}).get("skipped") or (rb or {}).get("skipped") or "not run (--modes)"
                checks.append({"name": name, "passed": None, "skipped": why})
                continue
            if "error" in ra or "error" in rb:
                check(name, False, "a run failed")
                continue
            rel = [abs(x - y) / max(abs(x), abs(y), 1e-30) for x, y in zip(ra["losses"], rb["losses"])]
            ok = ra["steps"] == rb["steps"] == list(range(1, steps + 1)) and max(rel, default=math.inf) <= rtol
            check(name, ok, {a: ra["losses"], b: rb["losses"], "max_rel_diff": max(rel, default=None),
                             "bit_for_bit": ra["losses"] == rb["losses"]})
    return checks


# -- 3. step times at Z-Image's width ----------------------------------------------------------

# Z-Image-Turbo's transformer: dim 3840, 30 heads of 128, cap_feat_dim 2560 (its Qwen3-4B hidden size),
# axes_lens (1536, 512, 512); 30 layers and 2 refiner layers, here 2 and 1.
TIMING = {
    "cuda": dict(dim=3840, head_dim=128, cap_feat_dim=2560, axes_lens=(1536, 512, 512), layers=2, refiner_layers=1,
                 size=512, lora_rank=64, lora_alpha=128.0, max_sequence_length=512, teacher_max_sequence_length=1024,
                 vlm_min_pixels=512 * 512, vlm_max_pixels=768 * 768),
    "cpu": dict(dim=64, head_dim=32, cap_feat_dim=32, axes_lens=(256, 128, 128), layers=2, refiner_layers=1,
                size=64, lora_rank=8, lora_alpha=16.0, max_sequence_length=64, teacher_max_sequence_length=128,
                vlm_min_pixels=1024, vlm_max_pixels=4096),
}


def timing_family(spec: dict, device: str, work: Path):
    """A ZImageFamily with the bench transformer at spec's width, a 2-layer random Qwen3 text encoder
    of hidden cap_feat_dim (the transformer's caption width) and a tiny teacher VLM sharing it; the
    VAE, tokenizer and scheduler of the tiny pipeline. The encoders are small: the cost that differs
    between SFT and D-OPSD is the transformer's."""
    from diffusers import ZImagePipeline
    from transformers import Qwen3Config, Qwen3Model

    from dopsd_ray.families import build_tiny
    from dopsd_ray.families.vlm import build_tiny_vlm
    from dopsd_ray.families.zimage import ZImageFamily

    dtype = torch.bfloat16
    base = build_tiny(load_config(TINY).model, work / "tiny_zimage")
    pipe = ZImagePipeline.from_pretrained(str(base), dtype=dtype)
    tokenizer = pipe.tokenizer
    text_config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=spec["cap_feat_dim"], intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    vlm_dir = work / f"teacher_vlm_h{spec['cap_feat_dim']}"
    if not (vlm_dir / "config.json").is_file():
        build_tiny_vlm(text_config, tokenizer, vlm_dir, seed=1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        text_encoder = Qwen3Model(text_config)
    transformer = make_transformer(spec["dim"], spec["layers"], spec["refiner_layers"], seed=0,
                                   head_dim=spec["head_dim"], cap_feat_dim=spec["cap_feat_dim"],
                                   axes_lens=spec["axes_lens"])
    return ZImageFamily(
        transformer=transformer.to(device=device, dtype=dtype), vae=pipe.vae.to(device),
        text_encoder=text_encoder.to(device=device, dtype=dtype), tokenizer=tokenizer, scheduler=pipe.scheduler,
        teacher_vlm_path=str(vlm_dir), max_sequence_length=spec["max_sequence_length"],
        teacher_max_sequence_length=spec["teacher_max_sequence_length"],
        vlm_min_pixels=spec["vlm_min_pixels"], vlm_max_pixels=spec["vlm_max_pixels"])


def step_times(device: str, work: Path, warmup: int, repeats: int) -> dict:
    """SFT and D-OPSD (the recipe: K=4, colocated_loss) side by side: loss + backward + AdamW step."""
    from dopsd_ray.algorithms.schedules import RECIPE_4STEP
    from dopsd_ray.algorithms.steps import Batch, colocated_loss
    from dopsd_ray.config import AlgorithmConfig, LoraSettings
    from dopsd_ray.families.zimage import LORA_TARGETS
    from dopsd_ray.weights import make_weights

    spec = TIMING[device]
    family = timing_family(spec, device, work)
    parameters = count_parameters(family.transformer)
    weights = make_weights(family.transformer, LoraSettings(rank=spec["lora_rank"], alpha=spec["lora_alpha"]),
                           LORA_TARGETS)
    trainable = weights.trainable_parameters()
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    sigmas = torch.tensor(RECIPE_4STEP, dtype=torch.float32)
    images = torch.rand(1, 3, spec["size"], spec["size"], generator=torch.Generator().manual_seed(0)) * 2 - 1
    batch = Batch(images, CAPTIONS[:1], ["bench-0"])
    algos = {"sft": AlgorithmConfig(name="sft"), "dopsd": AlgorithmConfig(name="dopsd")}
    times = {n: [] for n in algos}
    peak = {n: 0 for n in algos}
    trained = {}
    cuda = device == "cuda"
    for r in range(warmup + repeats):
        for n, algo in algos.items():  # interleaved: load from elsewhere falls on both alike
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            synchronize(device)
            t0 = time.perf_counter()
            loss, metrics = colocated_loss(family, weights, batch, sigmas, algo,
                                           lambda share, last: share.backward())  # per state, as the learner
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            synchronize(device)
            if r >= warmup:
                times[n].append(time.perf_counter() - t0)
                if cuda:
                    peak[n] = max(peak[n], torch.cuda.max_memory_allocated())
            trained[n] = metrics["trained_states"]
        log(f"step times: round {r + 1}/{warmup + repeats}" + (" (warm-up)" if r < warmup else ""))
    rows = [{"algorithm": n, "median_s": statistics.median(t), "max_s": max(t), "min_s": min(t), "repeats": len(t),
             "trained_states": trained[n], "peak_gpu_gb": peak[n] / 1e9 if cuda else None} for n, t in times.items()]
    ratio = rows[1]["median_s"] / rows[0]["median_s"]
    width = {k: (list(v) if isinstance(v, tuple) else v) for k, v in spec.items()}
    return {"width": width, "real_zimage_width": spec["dim"] == 3840, "dtype": "bfloat16", "device": device,
            "transformer_parameters": parameters, "trainable_parameters": sum(p.numel() for p in trainable),
            "what": "colocated_loss (the learner's function, a backward per trained state) + torch AdamW step; batch 1, K=4 recipe "
                    "sigmas for D-OPSD; median / max over the repeats after the warm-up",
            "rows": rows, "dopsd_over_sft": ratio}


# -- main --------------------------------------------------------------------------------------


def memory_report(runs: dict, device: str) -> dict:
    learner, rollout = {}, {}
    for family, by_mode in runs.items():
        for mode, r in by_mode.items():
            if "losses" not in r:
                continue
            learner[f"{family}/{mode}"] = r["learner_peak_gb"]
            if r["rollout_worker_memory"] is not None:
                rollout[f"{family}/{mode}"] = r["rollout_worker_memory"]
    return {
        "learner_peak_gb": learner,
        "learner_source": "MLflow memory/peak_gb_rank0, max over the steps ("
                          + ("torch.cuda.max_memory_allocated on the learner's GPU" if device == "cuda"
                             else "peak RSS of the learner process") + ")",
        "rollout_workers": rollout,
        "rollout_source": "the driver's summary['rollout_workers'] stats hold no memory figure (only sync_seconds, "
                          "sync_bytes, snapshots, version, restarted; in_driver_stats says whether any key looked "
                          "like one); sampled_peak_rss_gb is this script's psutil sample of the ray::RolloutWorker "
                          "processes' host RSS every 0.5 s (a lower bound of the peak, not GPU memory); "
                          "sampled_peak_gpu_used_gb is nvidia-smi's per-process used memory (CUDA context and the "
                          "caching allocator included), null where nvidia-smi cannot see the worker's pid",
    }


def print_summary(result: dict) -> None:
    print("\n== gpu_check summary:", result["device"]["name"], f"({result['device']['requested']})")
    print(f"{'family/mode':28s} {'losses':42s} {'peak GB':>8s} {'step s':>8s} {'run s':>7s}")
    for family, by_mode in result["runs"].items():
        for mode, r in by_mode.items():
            name = f"{family}/{mode}"
            if "losses" not in r:
                print(f"{name:28s} {('SKIPPED: ' + r['skipped'][:60]) if 'skipped' in r else 'ERROR: ' + r['error'][:60]}")
                continue
            losses = " ".join(f"{v:.5g}" for v in r["losses"])
            step = statistics.median(r["learner_step_seconds"]) if r["learner_step_seconds"] else float("nan")
            peak = r["learner_peak_gb"] if r["learner_peak_gb"] is not None else float("nan")
            print(f"{name:28s} {losses:42s} {peak:8.3f} {step:8.3f} {r['run_seconds']:7.1f}")
    st = result.get("step_times")
    if st and "rows" in st:
        w = st["width"]
        print(f"\nstep times, bf16, dim {w['dim']} ({w['dim'] // w['head_dim']} heads of {w['head_dim']}), "
              f"{w['layers']} layers + {w['refiner_layers']} refiner, {w['size']} px, LoRA r{w['lora_rank']}:")
        for row in st["rows"]:
            peak = f"  peak {row['peak_gpu_gb']:.2f} GB" if row["peak_gpu_gb"] else ""
            print(f"  {row['algorithm']:6s} median {row['median_s']:.4f} s  max {row['max_s']:.4f} s  "
                  f"({row['trained_states']} trained states){peak}")
        print(f"  D-OPSD / SFT: {st['dopsd_over_sft']:.2f}x")
    print("\nchecks:")
    for c in result["assertions"]:
        status = "SKIP" if c["passed"] is None else ("ok" if c["passed"] else "FAIL")
        print(f"  [{status:4s}] {c['name']}" + (f" ({c['skipped'][:80]})" if c["passed"] is None else ""))


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    work = Path(args.work_dir) / device
    work.mkdir(parents=True, exist_ok=True)
    chosen = selection(args)
    out = args.out or str(ROOT / "benchmarks" / "results" / f"gpu_check-{device}.json")
    warmup = args.timing_warmup if args.timing_warmup is not None else (2 if device == "cuda" else 1)
    repeats = args.timing_repeats if args.timing_repeats is not None else (5 if device == "cuda" else 3)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "device": {"requested": device, "name": device_name(device), "gpus": gpu_count(device),
                   "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "versions": versions(), "args": vars(args), "loss_rtol": args.loss_rtol,
    }
    log(f"device {result['device']['name']} ({device}, {result['device']['gpus']} GPUs); torch "
        f"{result['versions']['torch']}, ray {result['versions']['ray']}, deepspeed {result['versions']['deepspeed']}")
    errors = []

    def section(name, fn):
        log(f"{name} ...")
        try:
            value = fn()
        except Exception as err:
            traceback.print_exc()
            errors.append(f"{name}: {type(err).__name__}: {err}")
            return {"error": f"{type(err).__name__}: {err}", "passed": False}
        log(f"{name}: " + ("passed" if value.get("passed", True) else "FAILED"))
        return value

    result["ema_check"] = section("EMA check", lambda: ema_check(device, work))
    result["device_check"] = section("device check", lambda: device_check(device, work))
    # before the driver runs: with nothing else on the machine (on a CPU, Ray's processes would share it)
    result["step_times"] = section("step times", lambda: step_times(device, work, warmup, repeats))
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    result["selection"] = chosen
    try:
        result["placement"], result["runs"] = driver_runs(args, chosen, work)
    except Exception as err:  # Ray did not start, or no placement: no run at all
        traceback.print_exc()
        errors.append(f"driver runs: {type(err).__name__}: {err}")
        result["placement"], result["runs"] = {"error": f"{type(err).__name__}: {err}"}, {}
    result["assertions"] = run_assertions(result["runs"], args.steps, args.loss_rtol)
    if not result["runs"]:
        result["assertions"].append({"name": "driver runs started", "passed": False,
                                     "detail": result["placement"].get("error")})
    result["assertions"] += [
        {"name": "EMA: bf16 teacher = fp32 reference EMA rounded to bf16 (<= 1 ulp), and it moved",
         "passed": bool(result["ema_check"].get("passed")), "detail": result["ema_check"].get("checks")
         or result["ema_check"].get("error")},
        {"name": "device: Experience.to('cpu') / .to(device) move every tensor",
         "passed": bool(result["device_check"].get("passed")),
         "detail": {k: c["passed"] for k, c in result["device_check"].get("cases", {}).items()}
         or result["device_check"].get("error")},
    ]
    result["memory"] = memory_report(result["runs"], device)
    result["assertions"].append({"name": "step times measured", "passed": "rows" in result["step_times"],
                                 "detail": result["step_times"].get("error")})
    result["seconds"] = time.perf_counter() - START
    failed = [c["name"] for c in result["assertions"] if c["passed"] is False]
    result["passed"] = not failed
    result["failed"] = failed
    print_summary(result)
    write_result(result, out, "gpu_check")
    log(f"done in {result['seconds']:.0f} s")
    if failed:
        raise AssertionError("gpu_check failed:\n  " + "\n  ".join(failed + errors))
    return 0


if __name__ == "__main__":
    sys.exit(main())
