"""An MLflow tracking server of the driver's own, for runs whose processes are on other nodes.

The default store (tracking.tracking_uri: SQLite on the driver's disk) is a file that only the
driver's node sees. When learner rank 0 or a rollout worker may run on another node (a cluster
of more than one node, or a job on a named cluster), the driver serves that store:

    with run_tracking(cfg, on_cluster=True) as uri:    # http://<driver node ip>:<port>
        ...                                            # every process logs through `uri`

`mlflow server` runs as a child process of the driver with the SQLite store on the driver's
disk and `--serve-artifacts` into run_dir/mlartifacts (a folder, or the run's object store),
and stops when the run ends (or when the driver dies: it gets SIGTERM then). When run_dir is
an object store, the store file is copied there at the end, server or not (and fetched from
there when a relaunch on a fresh head finds none). A tracking URI that is configured
(MLFLOW_TRACKING_URI, tracking.tracking_uri) is used as it is.
"""

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from .config import Config
from .storage import Storage
from .tracking import STORE_FILE, artifacts_destination, configured_uri, local_store, tracking_uri

START_TIMEOUT_S = 120.0
PR_SET_PDEATHSIG = 1  # prctl(2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the MLflow tracking server exited ({process.returncode}): see {log}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise RuntimeError(f"the MLflow tracking server did not answer within {timeout_s:.0f} s: see {log}")


def _die_with_parent() -> None:
    """In the server's process before exec: its own session, and SIGTERM when the driver dies
    (even by SIGKILL), so no server outlives its run (Linux; elsewhere the session only)."""
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


class TrackingServer:
    """`mlflow server` for run `cfg` on this node, reachable at `uri` from every node."""

    def __init__(self, cfg: Config, host_ip: str):
        self.folder = local_store(cfg)
        port = _free_port()
        self.uri = f"http://{host_ip}:{port}"
        self.log = self.folder / "mlflow_server.log"
        command = [sys.executable, "-m", "mlflow", "server", "--host", "0.0.0.0", "--port", str(port),
                   "--workers", "1", "--backend-store-uri", tracking_uri(cfg),
                   "--serve-artifacts", "--artifacts-destination", artifacts_destination(cfg),
                   "--allowed-hosts", "*"]
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        _wait_healthy(self.uri, self.process, self.log, START_TIMEOUT_S)

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextmanager
def run_tracking(cfg: Config, on_cluster: bool, host_ip: str = "127.0.0.1"):
    """Yields the tracking URI every process of the run uses: the configured one, the default
    local store, or (on_cluster and the default store) a TrackingServer's address. With the
    default store and an object-store run dir, the store file is fetched from the run dir when
    this node has none (a relaunch on a fresh head) and copied back there at the end."""
    if configured_uri(cfg):
        yield configured_uri(cfg)
        return
    run, folder = Storage(cfg.run_dir), local_store(cfg)
    if not run.local and not (folder / STORE_FILE).exists() and run.is_file(STORE_FILE):
        run.fetch_file(STORE_FILE, folder / STORE_FILE)
    try:
        if not on_cluster:
            yield tracking_uri(cfg)
            return
        server = TrackingServer(cfg, host_ip)
        print(f"MLflow: serving {tracking_uri(cfg)} to the cluster's nodes at {server.uri}", flush=True)
        try:
            yield server.uri
        finally:
            server.close()
    finally:
        if not run.local and (folder / STORE_FILE).exists():  # the store's file beside the run's other files
            run.put_file(folder / STORE_FILE, STORE_FILE)
