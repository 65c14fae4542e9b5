"""`ray job submit` against a real local Ray head with token authentication: jobs, two at
once, a clean stop (SIGINT to jobs/train.py, `ray job stop`), and a local Ray beside the head.

Starts `ray start --head --block` in its own process group, with its own temp dir (RAY_TMPDIR,
so its record of the last `ray start` is its own, not /tmp/ray's), its own HOME (where jobs put
a relative train.output_dir), free ports and a token file of its own (RAY_AUTH_TOKEN_PATH), so
it neither touches ~/.ray/auth_token nor collides with the Ray instances other tests start.
Teardown stops only this head: it signals the process group it started and then any
process left whose command line or working directory lies under its temp dir (the job
driver runs in its own session, in the unpacked working dir). `ray stop` is not used:
it stops every Ray process on the machine. Not conftest.local_ray: `ray job submit` needs
a head with a dashboard, started as its own process.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray")) if Path(sys.executable).with_name("ray").exists() else "ray"

HEAD_START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 420  # measured ~160 s on a busy 2-core machine

# slow: a Ray head of its own plus a whole job (about 2 minutes); .ci/run runs `pytest -m slow` too
pytestmark = [pytest.mark.slow, pytest.mark.timeout(HEAD_START_TIMEOUT_S + JOB_TIMEOUT_S + 180)]


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _client_env(root: Path) -> dict:
    """The environment of the head and of every client: token mode, our token file only, the
    head's temp root (RAY_TMPDIR) and home."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN_PATH"] = str(root / "auth_token")
    env["RAY_TMPDIR"] = str(root)  # Ray's temp dir is root/ray; `ray start` records itself there
    env["HOME"] = str(root / "home")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # `python` in jobs
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _http_get(url: str, token: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def _processes_under(path: str) -> list[int]:
    """Pids (not ours) whose command line or cwd lies under `path`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if path in cmdline or cwd.startswith(path):
            pids.append(int(entry.name))
    return pids


def _kill(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def _head_log(log_path: Path) -> str:
    return log_path.read_text(errors="replace")[-6000:] if log_path.exists() else "(no head log)"


@pytest.fixture(scope="module")
def ray_head():
    # A short path: Ray's unix sockets live under the temp dir (108-byte limit).
    root = Path(tempfile.mkdtemp(prefix="dopsd-ray-head-", dir="/tmp"))
    temp_dir = str(root / "ray")
    (root / "home").mkdir()
    token_path = root / "auth_token"
    token = uuid.uuid4().hex + uuid.uuid4().hex  # 256 bits, like `ray get-auth-token --generate`
    token_path.write_text(token)
    token_path.chmod(0o600)
    env = _client_env(root)

    (gcs_port, dashboard_port, client_port, agent_port, agent_grpc_port, runtime_env_port, metrics_port,
     node_manager_port, object_manager_port) = _free_ports(9)
    log_path = root / "ray_start.log"
    cmd = [
        RAY, "start", "--head", "--block",
        f"--port={gcs_port}", "--node-ip-address=127.0.0.1",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
        f"--ray-client-server-port={client_port}",
        f"--dashboard-agent-listen-port={agent_port}", f"--dashboard-agent-grpc-port={agent_grpc_port}",
        f"--runtime-env-agent-port={runtime_env_port}", f"--metrics-export-port={metrics_port}",
        f"--node-manager-port={node_manager_port}", f"--object-manager-port={object_manager_port}",
        "--num-cpus=6", "--num-gpus=0", f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]
    with open(log_path, "w") as log:
        head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while True:
            if head.poll() is not None:
                pytest.fail(f"`ray start --head` exited with {head.returncode}:\n{_head_log(log_path)}")
            try:
                status, _ = _http_get(f"{address}/api/jobs/", token)
            except OSError:
                status = None
            if status == 200:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"dashboard job server not up at {address} after {HEAD_START_TIMEOUT_S}s "
                            f"(last status {status}):\n{_head_log(log_path)}")
            time.sleep(1)
        print(f"\nray head up in {time.monotonic() - deadline + HEAD_START_TIMEOUT_S:.0f}s at {address}")
        yield {"address": address, "gcs": f"127.0.0.1:{gcs_port}", "env": env, "token": token, "root": root,
               "temp_dir": temp_dir}
    finally:
        # `ray start --block` stops its children (GCS, raylet, dashboard, ...) on SIGTERM.
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)
            try:
                head.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except OSError:
            pass
        head.wait()
        # Anything left of this head only: the job driver (own session, cwd in the unpacked
        # working dir) and any worker started with this temp dir's session arguments.
        leftovers = _processes_under(str(root))
        _kill(leftovers, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while leftovers and time.monotonic() < deadline:
            time.sleep(0.5)
            leftovers = _processes_under(str(root))
        _kill(leftovers, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


def _ray(args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_unauthenticated_dashboard_request_is_rejected(ray_head):
    status, body = _http_get(f"{ray_head['address']}/api/jobs/")
    assert status == 401, f"GET /api/jobs/ without a token returned {status}, expected 401:\n{body[:2000]}"
    status, _ = _http_get(f"{ray_head['address']}/api/jobs/", "0" * 64)
    assert status in (401, 403), f"GET /api/jobs/ with a wrong token returned {status}, expected 401/403"


TINY = ["--config", "configs/tiny.yaml", "train.sample_every=1000", "train.checkpoint_every=1000"]
# created once per cluster (named, detached, get_if_exists) and kept by design: Ray Train's run-state
# actor, Ray Data's stats actor and autoscaling coordinator. Not a run's strays.
CLUSTER_SINGLETONS = {"TrainStateActor", "_StatsActor", "_AutoscalingCoordinatorActor"}


def _api(ray_head, path: str):
    code, body = _http_get(f"{ray_head['address']}{path}", ray_head["token"])
    assert code == 200, f"GET {path}: HTTP {code}: {body[:1000]}"
    return json.loads(body)


def _job(ray_head, sid: str) -> dict:
    return _api(ray_head, f"/api/jobs/{sid}")


def _job_logs(ray_head, sid: str) -> str:
    return _api(ray_head, f"/api/jobs/{sid}/logs").get("logs", "")


def _wait(predicate, timeout: float, what: str, detail=lambda: ""):
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"{what} after {timeout:.0f}s\n{detail()}")
        time.sleep(1)


def _alive(ray_head) -> tuple[dict, set]:
    """The head's live actors {id: class name} and placement groups not removed, from its state API."""
    def rows(kind):
        got = _api(ray_head, f"/api/v0/{kind}?limit=10000&detail=0")
        return got["data"]["result"]["result"]
    actors = {a["actor_id"]: a["class_name"] for a in rows("actors") if a["state"] != "DEAD"}
    groups = {g["placement_group_id"] for g in rows("placement_groups") if g["state"] != "REMOVED"}
    return actors, groups


def _assert_nothing_left(ray_head, before: tuple[dict, set]) -> None:
    """Every actor and placement group the runs made is gone (Ray cleans a finished driver's up
    asynchronously: waited for), except the cluster's singletons."""
    left = None

    def clean() -> bool:
        nonlocal left
        actors, groups = _alive(ray_head)
        left = ({i: c for i, c in actors.items() if i not in before[0] and c not in CLUSTER_SINGLETONS},
                groups - before[1])
        return left == ({}, set())

    _wait(clean, 60, "actors or placement groups left", lambda: repr(left))


def _stopped_run(run_dir: Path, step: int, signal_name: str, text: str) -> str:
    """A run stopped cleanly at `step`: its newest checkpoint is that step's and complete, its
    MLflow run is KILLED and says by what. Returns the MLflow run id."""
    from mlflow.tracking import MlflowClient

    from dopsd_ray.checkpoint import STATE_FILE, check_checkpoint, checkpoint_dir_name

    checkpoints = sorted(p for p in (run_dir / "ray_train" / run_dir.name).glob("checkpoint_*") if p.is_dir())
    assert checkpoints and checkpoints[-1].name == checkpoint_dir_name(step), (checkpoints, text[-4000:])
    assert check_checkpoint(checkpoints[-1]) is None
    assert json.loads((checkpoints[-1] / STATE_FILE).read_text())["step"] == step
    run_id = (run_dir / "mlflow_run_id.txt").read_text().strip()
    run = MlflowClient(f"sqlite:///{run_dir}/mlflow.db").get_run(run_id)
    assert run.info.status == "KILLED", (run.info.status, text[-4000:])
    assert run.data.tags["dopsd.stopped_by"] == signal_name
    return run_id


def test_a_stop_checkpoints_ends_killed_leaves_nothing_and_a_rerun_resumes(ray_head, tmp_path):
    """SIGINT to `python jobs/train.py` (a driver on the head), then `ray job stop` (SIGTERM) of the
    same run re-submitted, with RAY_JOB_STOP_WAIT_TIME_S long enough for a checkpoint: each stops
    after the current step with a complete checkpoint there, ends its MLflow run KILLED, exits
    128 + the signal, and leaves no actor or placement group; the re-submission resumed from the
    SIGINT's checkpoint."""
    from mlflow.tracking import MlflowClient

    env, address = ray_head["env"], ray_head["address"]
    out = tmp_path / "out"
    run_dir = out / "stopped"
    args = [*TINY, f"train.output_dir={out}", "train.run_name=stopped", "train.steps=40"]
    before = _alive(ray_head)

    # 1. SIGINT (Ctrl-C) to the driver after step 3
    log = tmp_path / "driver.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "jobs/train.py", *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                env=env)  # no RAY_ADDRESS: ray.init() joins the head its RAY_TMPDIR records
    try:
        _wait(lambda: "step 3/40" in log.read_text() or proc.poll() is not None, JOB_TIMEOUT_S, "no step 3",
              lambda: log.read_text()[-4000:])
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert rc == 128 + signal.SIGINT, text[-4000:]
    first = int(re.search(r"stopped by SIGINT at step (\d+)", text).group(1))
    assert first >= 3
    run_id = _stopped_run(run_dir, first, "SIGINT", text)
    _assert_nothing_left(ray_head, before)

    # 2. re-submitted as a job: resumes there; `ray job stop` two steps later
    sid = f"dopsd-stop-{uuid.uuid4().hex[:8]}"
    submit = _ray(["job", "submit", "--address", address, "--submission-id", sid, "--no-wait",
                   "--working-dir", str(ROOT),
                   "--runtime-env-json", json.dumps({"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "120"}}),
                   "--", "python", "jobs/train.py", *args], env, timeout=120)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    def resumed_two_steps() -> bool:
        return (f"step {first + 2}/40" in _job_logs(ray_head, sid)
                or _job(ray_head, sid)["status"] not in ("PENDING", "RUNNING"))

    _wait(resumed_two_steps, JOB_TIMEOUT_S, f"no step {first + 2}", lambda: _job_logs(ray_head, sid)[-4000:])
    stop = _ray(["job", "stop", "--address", address, sid], env, timeout=200)
    logs = _job_logs(ray_head, sid)
    assert _job(ray_head, sid)["status"] == "STOPPED", (stop.stdout, stop.stderr, logs[-4000:])
    assert "note: `ray job stop`" not in logs  # the wait was set
    second = int(re.search(r"stopped by SIGTERM at step (\d+)", logs).group(1))  # not SIGKILLed
    assert second >= first + 2
    assert _stopped_run(run_dir, second, "SIGTERM", logs) == run_id  # the same MLflow run, KILLED again
    history = MlflowClient(f"sqlite:///{run_dir}/mlflow.db").get_metric_history(run_id, "learner/resumed_from_step")
    assert [m.value for m in history] == [first]
    _assert_nothing_left(ray_head, before)


def test_two_jobs_at_once_keep_apart_and_relative_outputs_outlive_them(ray_head):
    """Two `ray job submit` at once on one head: the default `python jobs/train.py` (the toy
    recipe, colocated) and a tiny disaggregated run (rollout workers, a weight store, queues).
    Both succeed, overlapping in time; each has its own run dir, MLflow store and run. Their
    relative train.output_dir (the default `outputs`) lands under ~/dopsd-ray on the head, not in
    the working dir Ray unpacked the job into (under its temp dir), and the jobs say where."""
    from mlflow.tracking import MlflowClient

    env, address = ray_head["env"], ray_head["address"]
    home = ray_head["root"] / "home"
    steps = {"toy": 2, "tiny-async": 3}
    jobs = {"toy": ["train.steps=2", "train.run_name=toy", "train.sample_every=1000"],
            "tiny-async": [*TINY, "train.steps=3", "train.run_name=tiny-async", "runtime.mode=disaggregated",
                           "runtime.num_rollout_workers=1"]}
    before = _alive(ray_head)
    sids = {}
    for name, args in jobs.items():
        sids[name] = f"dopsd-{name}-{uuid.uuid4().hex[:8]}"
        got = _ray(["job", "submit", "--address", address, "--submission-id", sids[name], "--no-wait",
                    "--working-dir", str(ROOT), "--", "python", "jobs/train.py", *args], env, timeout=120)
        assert got.returncode == 0, got.stdout + got.stderr
    t0 = time.monotonic()
    done = lambda: all(_job(ray_head, s)["status"] in ("SUCCEEDED", "FAILED", "STOPPED") for s in sids.values())
    _wait(done, JOB_TIMEOUT_S, "the jobs did not finish", lambda: "\n".join(
        f"--- {n} ---\n{_job_logs(ray_head, s)[-3000:]}" for n, s in sids.items()))
    print(f"two jobs at once: done in {time.monotonic() - t0:.0f}s")

    infos, run_ids = {}, set()
    for name, sid in sids.items():
        infos[name], logs = _job(ray_head, sid), _job_logs(ray_head, sid)
        assert infos[name]["status"] == "SUCCEEDED", f"{name}: {infos[name]}\n{logs[-6000:]}"
        assert "dopsd-ray: done" in logs
        run_dir = home / "dopsd-ray" / "outputs" / name
        assert f"outputs go to {run_dir.parent}" in logs, logs[:3000]
        assert not run_dir.is_relative_to(ray_head["temp_dir"])
        assert any(p.is_file() for p in (run_dir / "export").iterdir())
        assert json.loads((run_dir / "summary.json").read_text())["run_dir"] == str(run_dir)
        client = MlflowClient(f"sqlite:///{run_dir}/mlflow.db")
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert [(r.info.run_name, r.info.status) for r in runs] == [(name, "FINISHED")]
        logged = [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")]
        assert logged == list(range(1, steps[name] + 1))
        run_ids.add(runs[0].info.run_id)
    assert len(run_ids) == 2
    a, b = infos.values()
    assert a["start_time"] < b["end_time"] and b["start_time"] < a["end_time"], "the jobs did not overlap"
    _assert_nothing_left(ray_head, before)


LOCAL_RUN = """
import json, sys
from dopsd_ray.recipes import load_config
from dopsd_ray.driver import train
from dopsd_ray.jobenv import init_ray

init_ray(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)  # as conftest.local_ray
cfg = load_config("configs/tiny.yaml", ["train.steps=3", "train.sample_every=1000", "train.checkpoint_every=1000",
                                        f"train.output_dir={sys.argv[1]}", "train.run_name=beside"])
print("SUMMARY " + json.dumps(train(cfg), default=str))
"""


def test_a_local_ray_beside_a_ray_start_head_stays_apart(ray_head, tmp_path):
    """A test's Ray (conftest.local_ray: init_ray(address="local")) in a process whose machine
    record of the last `ray start` names the head (RAY_TMPDIR = the head's; RAY_ADDRESS unset,
    the same token): the run completes on its own Ray and the head sees no new job. Ray Train's
    placement group cleaner reads that record; without init_ray's RAY_ADDRESS for the workers it
    asks the head whether the run's controller lives, does not find it there, and removes the
    run's placement group mid-run. And with conftest's RAY_ADDRESS=local, a stale record (nothing
    listens where it points) does not stop a plain ray.init() from starting a local Ray."""
    # the machine record of the last `ray start` names the head (written here: `ray start` writes
    # it too, but with the node's IP or, under load, not yet when the fixture returns)
    record = ray_head["gcs"]
    (Path(ray_head["temp_dir"]) / "ray_current_cluster").write_text(record + "\n")
    jobs_before = len(_api(ray_head, "/api/jobs/"))
    env = {**ray_head["env"], "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # no RAY_ADDRESS
    done = subprocess.run([sys.executable, "-c", LOCAL_RUN, str(tmp_path / "out")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    output = done.stdout[-4000:] + done.stderr[-6000:]
    assert done.returncode == 0 and "SUMMARY " in done.stdout, output
    summary = json.loads(done.stdout.split("SUMMARY ", 1)[1])
    assert summary["checkpoint"].endswith("checkpoint_00000003"), output
    assert len(_api(ray_head, "/api/jobs/")) == jobs_before  # nothing joined the head

    stale = ray_head["root"] / "stale"  # short: Ray's unix sockets live under it
    (stale / "ray").mkdir(parents=True)
    (stale / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")
    assert os.environ["RAY_ADDRESS"] == "local"  # conftest's, for every test and the processes they start
    probe = subprocess.run(
        [sys.executable, "-c", "import ray; ray.init(num_cpus=1, include_dashboard=False); "
                               "print('GCS', ray.get_runtime_context().gcs_address)"],
        env={**os.environ, "RAY_TMPDIR": str(stale)}, capture_output=True, text=True, timeout=180)
    assert probe.returncode == 0 and "GCS " in probe.stdout, probe.stdout[-2000:] + probe.stderr[-4000:]
    assert ray_head["gcs"] not in probe.stdout and record not in probe.stdout
