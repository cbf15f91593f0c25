"""A local run listens on loopback only: the embedded Ray (GCS, raylet, object manager, agents,
workers) and rank 0's TCPStore must not be reachable from another machine.

The probe job runs on an embedded Ray; at its first step record (workers alive, process group
up) the driver lists the listening TCP sockets of itself and every descendant process.
"""

from __future__ import annotations

import ipaddress

import pytest

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

from seqshard.launch import config  # noqa: E402
from seqshard.launch.ray_launcher import launch  # noqa: E402

PROBE = """
[job]
name = "loopback"
task = "probe"
[mesh]
workers = 2
[launch]
progress = false
poll_s = 0.2
[train]
steps = 3
seq_len = 12
"""


def _listening() -> list[tuple[str, int, int, str]]:
    """(ip, port, pid, process name) of every LISTEN socket of this process and its descendants."""
    me = psutil.Process()
    found = []
    for proc in [me, *me.children(recursive=True)]:
        try:
            conns, name = proc.net_connections(kind="tcp"), proc.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue  # exited between listing and asking
        found += [(c.laddr.ip, c.laddr.port, proc.pid, name) for c in conns
                  if c.status == psutil.CONN_LISTEN]
    return found


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    # Ray's gRPC servers report ::ffff:127.0.0.1 (IPv4-mapped), which 3.11 does not call loopback
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr.is_loopback or (mapped is not None and mapped.is_loopback)


def test_embedded_run_listens_on_loopback_only(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not ray.is_initialized()
    path = tmp_path / "probe.toml"
    path.write_text(PROBE)
    cfg = config.load(path)
    cfg.job.out = str(tmp_path / "out")
    seen: list = []

    def on_record(record):
        if record.get("type") == "step" and not seen:
            seen.append(_listening())

    result = launch(cfg, on_record=on_record)
    assert result["status"] == "completed"
    assert seen, "no step record reached the driver"
    sockets = seen[0]
    assert sockets  # at least the GCS and the raylet listen
    exposed = [s for s in sockets if not _is_loopback(s[0])]
    assert not exposed, f"listening beyond loopback: {exposed}"
    assert len({pid for _, _, pid, _ in sockets}) >= 4  # driver, GCS, raylet, workers seen
