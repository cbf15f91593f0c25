"""The documented multi-node path, end to end with the Ray CLI on this one machine: a head
node (`ray start --head`), a second node joining it by IP:PORT with token auth, and
`seqshard run CONFIG --address IP:PORT` placing one of its 2 workers on each node.

Every Ray process here is started by this test with --block (so it stays our child) and is
ended by its pid in a finally; `ray stop` is avoided because it stops every Ray on the machine,
other test runs' included.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

from seqshard.dist import free_port  # noqa: E402
from seqshard.launch.records import read_records  # noqa: E402

BIN = Path(sys.executable).parent
PROBE = """
[job]
name = "cli-two-nodes"
task = "probe"
[mesh]
workers = 2
[launch]
placement = "SPREAD"
progress = false
poll_s = 0.2
connect_timeout_s = 30
[train]
steps = 2
seq_len = 12
"""


# Ports `ray start` claims for fixed components whatever --port says: the client server, the
# dashboard, the dashboard agent's HTTP port, and the worker port range. A head --port on one of
# them makes `ray start` refuse ("trying to use a port number ... used by other components").
RAY_FIXED_PORTS = {10001, 8265, 52365, *range(10002, 20000)}


def _head_port() -> int:
    """A free port that none of Ray's fixed-port components wants (free_port() can return
    52365, the dashboard agent's default: that once failed this test on CI)."""
    while (port := free_port()) in RAY_FIXED_PORTS:
        pass
    return port


def _wait_listening(port: int, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, (f"ray start exited with {proc.returncode}:\n"
                                     + log.read_text(errors="replace")[-3000:])
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"the Ray head did not listen on 127.0.0.1:{port} within {timeout_s} s")


def _end(procs: list[subprocess.Popen], temp_dir: str) -> None:
    """SIGTERM each `ray start --block` (it then stops its node's processes), then kill by pid
    whatever this test's nodes left behind (their command lines name our temp dir)."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    for p in psutil.process_iter(["pid", "cmdline"]):
        if any(temp_dir in arg for arg in (p.info["cmdline"] or [])):
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


def test_two_node_cli_cluster_with_token_auth(tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="rcli", dir="/tmp")  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # the documented token setup: token mode on every node and on the driver, one shared token
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0")
    port = _head_port()
    address = f"127.0.0.1:{port}"
    config = tmp_path / "probe.toml"
    config.write_text(PROBE)
    head_log = tmp_path / "ray_head.log"
    procs: list[subprocess.Popen] = []
    try:
        procs.append(subprocess.Popen(
            [BIN / "ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
             "--num-cpus=1", "--include-dashboard=false", f"--temp-dir={temp_dir}", "--block"],
            env=env, stdout=head_log.open("w"), stderr=subprocess.STDOUT))
        _wait_listening(port, procs[0], head_log, timeout_s=60)
        procs.append(subprocess.Popen(
            [BIN / "ray", "start", f"--address={address}", "--num-cpus=1", "--block"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        # the job waits for its placement group, so it also waits for the second node
        run = subprocess.run(
            [BIN / "seqshard", "run", str(config), "--address", address,
             "--out", str(tmp_path / "out")],
            env=env, capture_output=True, text=True, timeout=150)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert "**completed**" in run.stdout
        final = [r for r in read_records(tmp_path / "out") if r["type"] == "final"][-1]
        assert final["status"] == "completed" and final["steps"] == 2
        assert len(set(final["nodes"].values())) == 2  # one worker on each node
    finally:
        _end(procs, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
