"""Nodes: where the run's small actors live, and a rollout worker whose node is lost.

On a cluster laid out like cluster/aws.yaml the driver runs on the head, which has no
CPUs, learner ranks on learner nodes and rollout workers on rollout nodes (their
runtime.*_resources name the node types' custom resources). Any worker node may vanish
(spot preemption, a hardware fault), with its processes and its object store.

- The run's bookkeeping actors (the experience queue, the progress queue, the WeightStore,
  the data stream's drop counter) hold no model and need no CPU: `on_driver_node()` pins
  them to the driver's node, so they live exactly as long as the driver and no lost worker
  node takes the queued experiences or the snapshot refs with it. (Ray's default would put
  a 1-CPU actor on some worker node.)
- A rollout worker is a restartable actor: when its node is lost Ray starts it again on
  any node with runtime.rollout_resources free, one that remains or one an autoscaler
  adds. `RolloutWatch` (a thread in the driver) pings every worker; one that stays
  unreachable (not placed, or placed but still loading its model) for
  runtime.replacement_timeout_s is lost for good: the watch puts a `RolloutLost` into the
  experience queue for every learner rank, the learners stop cleanly (a learner restart
  would not bring a node back), and the driver raises `RolloutWorkersLost`, naming the
  resources no alive node has.
"""

import threading
import time

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .algorithms.steps import RolloutLost


class RolloutWorkersLost(RuntimeError):
    """Rollout workers that did not come back within runtime.replacement_timeout_s."""


def on_driver_node() -> dict:
    """Ray options for a bookkeeping actor: on the driver's node, with no CPU."""
    here = ray.get_runtime_context().get_node_id()
    return {"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(here, soft=False)}


def may_run_elsewhere(cfg) -> bool:
    """Could a learner rank or rollout worker of run `cfg` run on another node than the driver's?
    Yes when the cluster has other nodes, or when this node cannot host them (an autoscaler
    would add nodes that can). Then the driver's disk is not theirs (tracking_server.py,
    preflight.check_storage_reach)."""
    here = ray.get_runtime_context().get_node_id()
    alive = [n for n in ray.nodes() if n["Alive"]]
    if any(n["NodeID"] != here for n in alive):
        return True
    mine = next((n["Resources"] for n in alive if n["NodeID"] == here), {})
    return not all(all(mine.get(k, 0) >= v for k, v in need.items()) for need in cfg.runtime.process_resources)


def missing_resources(resources: dict[str, float]) -> dict[str, float]:
    """The part of `resources` (one process's, e.g. runtime.rollout_resources) that no alive
    node has in total; empty when some node could place it (perhaps once it is free)."""
    alive = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    if any(all(node.get(k, 0) >= v for k, v in resources.items()) for node in alive):
        return {}
    return {k: v for k, v in resources.items() if not any(node.get(k, 0) >= v for node in alive)} or dict(resources)


def lost_message(index: int, gone_s: float, timeout_s: float, resources: dict[str, float]) -> str:
    missing = missing_resources(resources)
    why = (f"no alive node has {missing} of runtime.rollout_resources={resources}: its node was lost and "
           "none replaced it; add a node with these resources (an autoscaler does when one of its node types "
           "has them), or lower runtime.num_rollout_workers" if missing else
           f"a node can place runtime.rollout_resources={resources}, but the worker was not back (placed "
           "and its model loaded) in time; raise runtime.replacement_timeout_s")
    return (f"rollout worker {index} has been unreachable for {gone_s:.0f} s "
            f"(runtime.replacement_timeout_s={timeout_s:g}): {why}")


class RolloutWatch(threading.Thread):
    """Pings the rollout workers (their `node_id` method) from the driver, every `poll_s`.

    A worker's clock starts once it has answered: its first start is not watched (a recipe no
    node can place fails in preflight, and the first snapshot waits runtime.startup_timeout_s).
    After that, a ping that stays unanswered for `timeout_s` makes the worker lost: `lost`
    holds the message, and `learners` RolloutLost notices go into the experience queue.
    """

    def __init__(self, workers: list, queue, learners: int, resources: dict[str, float], timeout_s: float,
                 poll_s: float = 1.0):
        super().__init__(daemon=True, name="rollout-watch")
        self.workers, self.queue, self.learners = workers, queue, learners
        self.resources, self.timeout_s, self.poll_s = dict(resources), timeout_s, poll_s
        self.lost: str | None = None
        self.lost_workers: set[int] = set()
        self.nodes: list[list[str]] = [[] for _ in workers]  # each worker's nodes, in the order seen
        self._done = threading.Event()

    def run(self) -> None:
        pings = {i: (w.node_id.remote(), None) for i, w in enumerate(self.workers)}  # i -> (ref, sent)
        while not self._done.wait(self.poll_s):
            now = time.monotonic()
            for i, (ref, sent) in list(pings.items()):
                ready, _ = ray.wait([ref], timeout=0)
                if ready:
                    try:
                        node = ray.get(ready[0])
                    except ray.exceptions.RayError:  # killed for good (the driver stops the workers)
                        del pings[i]
                        continue
                    if not self.nodes[i] or self.nodes[i][-1] != node:
                        self.nodes[i].append(node)
                    pings[i] = (self.workers[i].node_id.remote(), now)
                elif sent is not None and now - sent > self.timeout_s:
                    self.lost_workers.add(i)
                    self.lost = lost_message(i, now - sent, self.timeout_s, self.resources)
                    for _ in range(self.learners):  # every learner rank waits on the queue: one each
                        self.queue.put(RolloutLost(self.lost))
                    return

    def stop(self) -> None:
        self._done.set()
        self.join()
