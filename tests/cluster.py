"""A multi-node Ray cluster on this machine, for the tests of lost nodes (tests/test_nodes.py).

ray.cluster_utils.Cluster starts each node as its own raylet with its own object store,
as separate machines would have: objects cross between them through the object managers.
The layout is cluster/aws.yaml's: a head with no CPUs (the driver runs there, nothing is
scheduled on it), learner nodes and rollout nodes told apart by a custom resource, which
the recipe asks for in runtime.learner_resources / runtime.rollout_resources.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

LEARNER, ROLLOUT = "learner_node", "rollout_node"  # the node types' custom resources
NODE_CPUS = 2  # a node's CPUs: one for its learner rank or rollout worker, one for Ray Data tasks
OBJECT_STORE_BYTES = 150 * 1024**2  # per node: tiny models need little, and the machine is shared


class NodeCluster:
    """A head (CPU 0) this process is connected to as the driver, plus nodes added by type."""

    def __init__(self):
        # the GCS declares a node dead after 3 missed 1 s health checks (Ray's default: 5 of 3 s)
        health = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
        self.cluster = Cluster(initialize_head=True, head_node_args=dict(
            num_cpus=0, object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False, _system_config=health))
        ray.init(address=self.cluster.address, log_to_driver=False)
        self.head_id = ray.get_runtime_context().get_node_id()
        self.nodes = {}  # node id -> (kind, ray._private.node.Node)

    def add(self, kind: str) -> str:
        """Start a node of `kind` (LEARNER or ROLLOUT); returns its node id."""
        node = self.cluster.add_node(num_cpus=NODE_CPUS, resources={kind: 1},
                                     object_store_memory=OBJECT_STORE_BYTES, wait=False)
        self.nodes[node.node_id] = (kind, node)
        # this node alone: Cluster.wait_for_nodes also waits for removed nodes to be declared dead
        deadline = time.monotonic() + 120
        while not any(n["NodeID"] == node.node_id and n["Alive"] for n in ray.nodes()):
            assert time.monotonic() < deadline, f"the {kind} node did not join within 120 s"
            time.sleep(0.2)
        return node.node_id

    def add_own_disk(self, kind: str, hidden: list[Path], env: dict | None = None) -> str:
        """Start a node of `kind` as its own machine's disk would be: in a mount namespace of its
        own (`unshare --mount`) with an empty private tmpfs over each folder in `hidden`, so it
        sees none of the files the head (and every other node) keeps there. `env`: the node's
        environment on top of this process's (credentials, an S3 endpoint). Its processes (the
        raylet, its workers, what they start) are one process group; returns its node id."""
        known = {n["NodeID"] for n in ray.nodes()}
        mounts = " && ".join(f"mkdir -p {d} && mount -t tmpfs tmpfs {d}" for d in map(str, hidden))
        start = " ".join([sys.executable, "-m", "ray.scripts.scripts", "start", f"--address={self.cluster.address}",
                          f"--num-cpus={NODE_CPUS}", f"--resources='{json.dumps({kind: 1})}'",
                          f"--object-store-memory={OBJECT_STORE_BYTES}", "--block"])
        process = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                    f"{mounts} && exec {start}"], env={**os.environ, **(env or {})},
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 120
        while True:
            new = [n for n in ray.nodes() if n["Alive"] and n["NodeID"] not in known and n["Resources"].get(kind)]
            if new:
                break
            assert process.poll() is None, f"the {kind} node's `ray start` exited ({process.returncode})"
            assert time.monotonic() < deadline, f"the {kind} node did not join within 120 s"
            time.sleep(0.2)
        self.nodes[new[0]["NodeID"]] = (kind, process)
        return new[0]["NodeID"]

    def remove(self, node_id: str) -> None:
        """Take a node away at once, processes and object store with it (spot preemption)."""
        _, node = self.nodes.pop(node_id)
        if isinstance(node, subprocess.Popen):  # a node with its own disk: its whole process group
            try:
                os.killpg(node.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            node.wait()
        else:
            self.cluster.remove_node(node, allow_graceful=False)

    def of_kind(self, kind: str) -> list[str]:
        return [i for i, (k, _) in self.nodes.items() if k == kind]

    def remove_all(self) -> None:
        for node_id in list(self.nodes):
            self.remove(node_id)

    def shutdown(self) -> None:
        ray.shutdown()
        self.cluster.shutdown()
