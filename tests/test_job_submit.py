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


def test_ray_job_submit_runs_training(ray_head, tmp_path):
    env, address = ray_head["env"], ray_head["address"]
    output_dir = tmp_path / "outputs"
    submission_id = f"dopsd-test-{uuid.uuid4().hex[:8]}"
    submit = [
        "job", "submit", "--address", address, "--submission-id", submission_id,
        "--working-dir", str(ROOT),  # uploaded without the .gitignore'd paths (outputs/, caches)
        "--", "python", "jobs/train.py",
        "train.steps=2", f"train.output_dir={output_dir}", "train.run_name=submitted", "train.sample_every=1000",
    ]

    def logs() -> str:
        try:
            got = _ray(["job", "logs", "--address", address, submission_id], env, timeout=60)
            return got.stdout[-8000:] + got.stderr[-2000:]
        except subprocess.TimeoutExpired:
            return "(ray job logs timed out)"

    t0 = time.monotonic()
    try:
        result = _ray(submit, env, timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        _ray(["job", "stop", "--address", address, "--no-wait", submission_id], env, timeout=60)
        pytest.fail(f"`ray job submit` did not finish in {JOB_TIMEOUT_S}s; job logs:\n{logs()}\n"
                    f"submit stderr:\n{(err.stderr or b'')[-3000:]!r}")
    elapsed = time.monotonic() - t0
    submit_output = result.stdout + result.stderr

    code, body = _http_get(f"{address}/api/jobs/{submission_id}", ray_head["token"])
    job_status = json.loads(body).get("status") if code == 200 else None
    assert job_status == "SUCCEEDED", (
        f"job {submission_id} is {job_status} (HTTP {code}; submit rc {result.returncode}, {elapsed:.0f}s):\n"
        f"{body[:2000]}\n"
        f"--- job logs ---\n{logs()}\n--- submit output ---\n{submit_output[-4000:]}")
    assert result.returncode == 0, f"`ray job submit` exited {result.returncode}:\n{submit_output[-4000:]}"

    job_logs = logs()
    assert "dopsd-ray: done" in job_logs, f"no 'dopsd-ray: done' in the job logs:\n{job_logs}"

    run_dir = output_dir / "submitted"
    export = run_dir / "export"
    assert export.is_dir() and any(p.is_file() for p in export.rglob("*")), (
        f"no exported weights under {export}; run dir holds: "
        f"{sorted(str(p.relative_to(output_dir)) for p in output_dir.rglob('*'))[:50]}\n{job_logs}")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert Path(summary["export"]).resolve().is_relative_to(export.resolve()) or Path(summary["export"]) == export
    print(f"ray job submit -> SUCCEEDED in {elapsed:.0f}s")
