"""The driver: a short script of visible Ray calls.

    data     = read_shards(...)                               Ray Data
    contexts = fill_context_cache(...)   (data.cache_contexts) a task on the learner's resources
    workers  = [RolloutWorker actor] * n                      disaggregated only
    publisher, store = weight_sync(rt, workers)               object store | collective
    learner  = TorchTrainer(train_loop_per_worker, ...)       Ray Train + DeepSpeed
    learner.fit()    # trains, syncs weights to workers, checkpoints, exports
                     # (meanwhile a thread here draws the progress learner rank 0 reports)
    stop workers; evaluate the export (eval.at_end, a task); print where the results are

Faults (README "Faults and what happens"): a bad config or a recipe the cluster cannot
place fails in preflight, before Ray starts; rollout workers are restartable actors whose
`run` task is retried on the new process (it re-fetches the latest snapshot); the
learner group restarts from the last checkpoint up to runtime.max_failures times; a run
that fails ends its MLflow run as FAILED. On a cluster (dopsd_ray/nodes.py) the queues
and the WeightStore live on the driver's node, so a lost worker node takes none of them;
a rollout worker that does not come back within runtime.replacement_timeout_s after
losing its node fails the run with an error naming the resources no node has.
SIGTERM / SIGINT (`ray job stop`, Ctrl-C) stop it cleanly (stop.py): the learners
checkpoint the current step and return, the workers stop, the MLflow run ends KILLED and
RunStopped is raised; re-running the same train.run_name resumes.
"""

import math
import os
import time
from dataclasses import asdict

import ray
import yaml
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.util.queue import Queue

from .config import Config, RuntimeConfig
from .contexts import fill_context_cache
from .data.stream import read_shards, bundled_dataset_path, take_validation
from .evaluation_job import evaluate_run
from .families import base_model_path
from .jobenv import in_ray_job, init_ray, output_dir
from .checkpoint import RAY_TRAIN, checkpoint_uri
from .learner import ExperienceQueue, LearnerInputs, Snapshots, train_loop_per_worker
from .nodes import RolloutWatch, RolloutWorkersLost, may_run_elsewhere, on_driver_node
from .preview import validation_set
from .preflight import check_resources, check_storage_reach, preflight
from .progress import ProgressPrinter
from .rollout import RolloutWorker
from .stop import STOP_WAIT_ENV, RunStopped, StopFlag, StopSignals, StopWatch, fit, stop_wait_note
from .sync.collective import CollectivePublisher
from .sync.object_store import StorePublisher, WeightStore
from .storage import Storage
from .tracking import MlflowRun, mlflow_ui_command, tracking_uri
from .tracking_server import run_tracking


def placement(resources: dict[str, float]) -> dict:
    """Ray options that place a task or an actor on `resources` (runtime.*_resources)."""
    return {"num_cpus": resources.get("CPU", 0), "num_gpus": resources.get("GPU", 0),
            "resources": {k: v for k, v in resources.items() if k not in ("CPU", "GPU")}}


def weight_sync(rt: RuntimeConfig, workers: list) -> tuple:
    """The one place runtime.sync_transport is read: (the learner's WeightPublisher, the
    WeightStore rollout workers poll, or None when snapshots are pushed to them)."""
    if rt.sync_transport == "collective":  # learner rank 0 + workers as ranks 1..n
        # a sync waits up to startup_timeout_s for a restarting worker (it loads its models)
        return CollectivePublisher(workers, rt.sync_bucket_numel, timeout_s=rt.sync_timeout_s,
                                   restart_timeout_s=rt.startup_timeout_s), None
    store = ray.remote(WeightStore).options(**on_driver_node()).remote()
    return StorePublisher(store, timeout_s=rt.sync_timeout_s), store


def train(cfg: Config) -> dict:
    cfg.train.output_dir = output_dir(cfg.train.output_dir)  # workers may run elsewhere
    preflight(cfg)  # paths, and resources when Ray would start here: fails before any Ray work
    if not ray.is_initialized():
        init_ray()  # a local Ray, or the cluster named by RAY_ADDRESS (ray job submit)
    check_resources(cfg)  # against the cluster itself, before any actor or trainer starts
    spread = may_run_elsewhere(cfg)  # a learner or rollout worker may run on another node
    check_storage_reach(cfg)  # the driver and every node reach train.output_dir, before any weights load
    run = Storage(cfg.run_dir)  # a folder, a shared mount, or an object store
    model_path = base_model_path(cfg)
    config_yaml = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    run.write("config.yaml", config_yaml)
    if in_ray_job() and not os.environ.get(STOP_WAIT_ENV):
        print(stop_wait_note(), flush=True)
    # from here on, SIGTERM / SIGINT stop the run with a checkpoint
    with StopSignals() as signals, run_tracking(cfg, spread, ray.util.get_node_ip_address()) as uri:
        mlflow = MlflowRun.start_or_resume(cfg, uri)
        mlflow.log_text(config_yaml, "config.yaml")
        try:
            summary = run_pipeline(cfg, run, model_path, mlflow, signals)
        except BaseException:
            mlflow.end("KILLED" if signals.signum else "FAILED")
            raise
        mlflow.end("FINISHED")
    return summary


def run_pipeline(cfg: Config, run: Storage, model_path: str, mlflow: MlflowRun, signals: StopSignals) -> dict:
    """Data -> rollout workers -> learner -> export, inside the MLflow run `mlflow`."""

    # 1. data (in a fixed order, so runs with the same seeds see the same batches)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    dataset, data_stats = read_shards(cfg.data.path or bundled_dataset_path(), cfg)
    pairs = dataset  # every row once
    if cfg.data.repeats > 1:  # a handful of DreamBooth images: read once, fewer, longer epochs
        pairs = dataset.materialize()
        dataset = pairs.union(*[pairs] * (cfg.data.repeats - 1))
    validation = validation_set(cfg, take_validation(dataset, cfg))  # the sample grids' columns
    rt = cfg.runtime

    # 1b. every pair's contexts, computed once before training (learners and workers then free their encoders)
    contexts = fill_contexts(cfg, run, model_path, pairs, validation, mlflow) if cfg.data.cache_contexts else None

    # 2. the one place the run's mode is chosen: where the learners' micro-batches come from
    #    (the data stream, or rollout workers' experiences), and whom they publish snapshots to
    inputs = LearnerInputs(cfg.model_dump(mode="json"), model_path, validation=validation,
                           tracking=(mlflow.tracking_uri, mlflow.run_id), contexts=contexts)
    workers, runs, datasets, watch = [], [], {"train": dataset}, None
    if rt.mode == "disaggregated":
        workers, runs, publisher, queue = start_rollout(cfg, model_path, dataset, contexts)
        inputs.source, inputs.snapshots, datasets = ExperienceQueue(queue), Snapshots(publisher), {}
        # a worker that stays unreachable (its node lost, none to replace it) stops the learners
        watch = RolloutWatch(workers, queue, rt.num_learners, rt.rollout_resources, rt.replacement_timeout_s)
        watch.start()

    # 3. learner (rank 0 reports every step's progress into a queue the driver draws from,
    #    and watches the stop flag)
    inputs.progress = Queue(actor_options=on_driver_node())
    stop_flag = ray.remote(StopFlag).options(**on_driver_node()).remote()
    inputs.stop = StopWatch(stop_flag)
    trainer = learner_group(cfg, run, inputs, datasets)
    printer = ProgressPrinter(inputs.progress, cfg.train.log_every)  # draws while fit() blocks
    printer.start()
    start = time.perf_counter()
    try:
        result = fit(trainer, signals, stop_flag)  # returns early, with a checkpoint, on SIGTERM / SIGINT
    finally:
        printer.stop()
        inputs.progress.shutdown()
        if watch is not None:
            watch.stop()
        lost = watch.lost_workers if watch is not None else set()
        worker_stats = stop_workers(workers, runs, lost=lost)
        ray.kill(stop_flag)
    seconds = time.perf_counter() - start
    learner = result.return_value or {}  # rank 0's: {"step", "counters", "stopped", "interrupted", "node_id"}
    raise_if_stopped(cfg, result, learner, watch, signals, mlflow)
    summary = {
        "run_dir": run.uri,
        "export": run.name_uri("export"),  # the last export; intermediate ones in export/step_NNNNNN
        "samples": run.name_uri("samples"),  # the sample grids, step_NNNNNN.png
        "mlflow_tracking_uri": tracking_uri(cfg),  # the store (a server of the driver's serves it only while it runs)
        "mlflow_ui": mlflow_ui_command(cfg),
        "mlflow_run_id": mlflow.run_id,
        "checkpoint": checkpoint_uri(cfg, result.checkpoint),
        "final_metrics": result.metrics,
        "data": data_stats.as_dict(),
        "contexts": None if contexts is None else asdict(contexts),
        "rollout_workers": worker_stats,
        "rollout_restarts": learner.get("counters", {}).get("rollout_restarts", 0),
        "learner_node": learner.get("node_id"),  # rank 0's Ray node (rollout_workers' stats hold theirs)
        "seconds": seconds,
    }

    # 4. evaluation (eval.at_end): the export against the base, the job jobs/evaluate.py runs,
    #    as a task with the learner's resources (a GPU on real models), logged into this run
    if cfg.eval.at_end:
        summary["eval"] = evaluate_at_end(cfg, run, model_path, summary["export"], mlflow)
    return summary


def learner_group(cfg: Config, run: Storage, inputs: LearnerInputs, datasets: dict) -> TorchTrainer:
    """Ray Train's group of runtime.num_learners learner ranks (learner/loop.py), restarted from
    the last checkpoint up to runtime.max_failures times."""
    rt = cfg.runtime
    use_gpu = rt.learner_resources.get("GPU", 0) > 0
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"inputs": inputs},
        scaling_config=ScalingConfig(num_workers=rt.num_learners, use_gpu=use_gpu,
                                     resources_per_worker=dict(rt.learner_resources)),
        run_config=RunConfig(
            name=cfg.train.run_name, storage_path=run.name_uri(RAY_TRAIN),
            failure_config=FailureConfig(max_failures=rt.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets=datasets,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
    )
    return trainer


def raise_if_stopped(cfg: Config, result, learner: dict, watch, signals: StopSignals, mlflow: MlflowRun) -> None:
    """A run that did not finish raises, naming why and the last checkpoint: rollout workers lost,
    the learners gave up (non-finite steps), or a signal stopped it (no evaluation then)."""
    if watch is not None and watch.lost:
        raise RolloutWorkersLost(watch.lost)
    last = checkpoint_uri(cfg, result.checkpoint)
    if learner.get("stopped"):  # the learners gave up cleanly (non-finite steps), not a crash
        raise FloatingPointError(f"{learner['stopped']} Last checkpoint: "
                                 f"{last or 'none yet (no good step reached train.checkpoint_every)'}")
    if signals.signum:  # the learners stopped early, or had just finished
        mlflow.set_tag("dopsd.stopped_by", signals.name)
        when = "at step" if learner.get("interrupted") else "after the last step,"
        raise RunStopped(f"stopped by {signals.name} {when} {learner.get('step')}; last checkpoint: {last}. "
                         f"Re-run with train.run_name={cfg.train.run_name} to resume from it.", signals.signum)


def fill_contexts(cfg: Config, run: Storage, model_path: str, pairs, validation, mlflow: MlflowRun):
    """data.cache_contexts: every pair's contexts, and the text contexts of the grids' prompts
    (their pairs' teacher contexts are the data's), in a task on the learner's resources."""
    fill = ray.remote(fill_context_cache).options(**placement(cfg.runtime.learner_resources))
    prompts = validation.prompts if validation is not None else []
    contexts = ray.get(fill.remote(cfg.model_dump(mode="json"), model_path, pairs, run.name_uri("context_cache"),
                                   prompts))
    print(f"context cache: {contexts.entries} contexts, {contexts.computed} computed now, "
          f"{contexts.seconds:.1f} s", flush=True)
    mlflow.log_metrics({"contexts/entries": contexts.entries, "contexts/computed": contexts.computed,
                        "contexts/fill_seconds": contexts.seconds}, step=0)
    return contexts


def evaluate_at_end(cfg: Config, run: Storage, model_path: str, export: str, mlflow: MlflowRun) -> dict:
    task = ray.remote(evaluate_run).options(**placement({"CPU": 1, **cfg.runtime.learner_resources}))
    return ray.get(task.remote(cfg.model_dump(mode="json"), model_path, {cfg.train.run_name: export},
                               run.name_uri("eval"), mlflow, cfg.train.steps))


def start_rollout(cfg: Config, model_path: str, dataset, contexts, worker_class=RolloutWorker) -> tuple:
    """The rollout workers of a disaggregated run, producing: (workers, their `run` refs, the
    learner's WeightPublisher, the experience queue). `worker_class`: RolloutWorker or a
    subclass of it (benchmarks/ab.py's reads its statistics)."""
    rt = cfg.runtime
    queue = Queue(maxsize=rt.buffer_size, actor_options=on_driver_node())
    # a killed worker process is restarted, and its `run` task retried on the new one; four
    # threads: the roll-out loop, a collective receive, a join to a new group beside a stuck
    # receive, RolloutWatch's pings
    Worker = ray.remote(worker_class).options(
        max_concurrency=4, max_restarts=-1, max_task_retries=-1, **placement(rt.rollout_resources))
    workers = [Worker.remote(cfg.model_dump(mode="json"), model_path, i, contexts)
               for i in range(rt.num_rollout_workers)]
    publisher, store = weight_sync(rt, workers)
    # strictly on-policy: each snapshot makes just what the learners consume in one step
    # (grad_accum experiences per learner rank; the snapshot's version is the optimizer step)
    per_version = None if rt.max_staleness > 0 else math.ceil(
        rt.num_learners * cfg.train.grad_accum / rt.num_rollout_workers)
    splits = dataset.streaming_split(rt.num_rollout_workers)
    runs = [w.run.remote(split, store, queue, per_version) for w, split in zip(workers, splits)]
    return workers, runs, publisher, queue


def stop_workers(workers, runs, grace_s: float = 15.0, lost: set[int] = frozenset()) -> list[dict]:
    """Ask every rollout worker to stop, collect the stats of those that do, kill them all.

    A worker blocked in a read at a streaming_split epoch boundary (it waits for the
    other consumers) cannot see stop(): it is killed after `grace_s`, so the driver never
    hangs on a straggler and the workers' CPUs are free for the next run. Workers in `lost`
    (RolloutWatch gave up on them: no node to run on) are not waited for.
    """
    for w in workers:
        w.stop.remote()
    waiting = [r for i, r in enumerate(runs) if i not in lost]
    done, _ = ray.wait(waiting, num_returns=len(waiting), timeout=grace_s) if waiting else ([], [])
    stats = []
    for i, ref in enumerate(runs):
        if i in lost:
            stats.append({"stopped": "lost: no node to run on"})
            continue
        try:
            stats.append(ray.get(ref, timeout=0) if ref in done else {"stopped": "killed after grace period"})
        except Exception as err:  # a worker that failed: say so in the summary
            stats.append({"error": repr(err)})
    for w in workers:
        ray.kill(w, no_restart=True)
    return stats

