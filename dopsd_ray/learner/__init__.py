"""The learner, one room per job:

    loop.py        Learner: setup, the loop (train_step), checkpoints, exports, grids; train_loop_per_worker
    context.py     where a rank runs: Ray Train (RayTrainContext) or one plain process (LocalContext)
    sources.py     where micro-batches come from: the data stream (colocated) or the experience queue
    engine.py      DeepSpeed: its config, a backward per loss share, the step (no Ray)
    publishing.py  gathers, and snapshots for the rollout workers (disaggregated) or none
    reporter.py    everything rank 0 writes or tells: MLflow, progress, grids, exports
"""

from .engine import Engine, backward_micro, deepspeed_config, finish_step, peak_memory_bytes, release_stale_gathers
from .loop import Learner, LearnerInputs, StepResult, micro_mean, train_loop_per_worker
from .publishing import NoSnapshots, Snapshots
from .sources import DataStream, ExperienceQueue

__all__ = ["DataStream", "Engine", "ExperienceQueue", "Learner", "LearnerInputs", "NoSnapshots", "Snapshots",
           "StepResult", "backward_micro", "deepspeed_config", "finish_step", "micro_mean", "peak_memory_bytes",
           "release_stale_gathers", "train_loop_per_worker"]
