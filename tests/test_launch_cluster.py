"""Multi-node placement on a simulated Ray cluster (ray.cluster_utils.Cluster: two raylets on
this machine, one CPU each), so a 2-worker job must put one rank on each node."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")

from ray.cluster_utils import Cluster  # noqa: E402

from seqshard.launch import config  # noqa: E402
from seqshard.launch.ray_launcher import launch  # noqa: E402
from seqshard.launch.records import read_records  # noqa: E402

PROBE = """
[job]
name = "two-nodes"
task = "probe"
exactness_seq_len = 40
[mesh]
workers = 2
[launch]
placement = "PACK"
progress = false
checkpoint_every = 2
[train]
steps = 4
seq_len = 36
dim = 5
layout = "zigzag"
"""


@pytest.fixture
def two_node_cluster():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    if ray.is_initialized():
        ray.shutdown()
    cluster.shutdown()


def test_workers_placed_on_both_nodes(two_node_cluster, tmp_path):
    path = tmp_path / "probe.toml"
    path.write_text(PROBE)
    cfg = config.load(path)
    cfg.job.out = str(tmp_path / "out")
    result = launch(cfg, address=two_node_cluster.address)  # as `seqshard run --address`
    assert not ray.is_initialized()  # the driver leaves the cluster it joined
    assert result["status"] == "completed" and result["steps"] == 4
    nodes = {n.node_id for n in two_node_cluster.list_all_nodes()}
    assert len(nodes) == 2
    assert set(result["nodes"].values()) == nodes  # rank 0 on one node, rank 1 on the other
    assert result["exactness"] < 1e-12  # fp64 probe: sharded == unsharded up to rounding
    assert [r["digest"] for r in result["ranks"]] == [result["digest"]] * 2
    placed = [r for r in read_records(tmp_path / "out") if r.get("event") == "placed"]
    assert placed[0]["nodes"] == 2


# --- `--address` to a cluster that is not there fails within launch.connect_timeout_s ---------

import socket  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

from seqshard.dist import free_port  # noqa: E402


def _probe_cfg(tmp_path, timeout_s: float):
    path = tmp_path / "probe.toml"
    path.write_text(PROBE)
    cfg = config.load(path, [f"launch.connect_timeout_s={timeout_s}"])
    cfg.job.out = str(tmp_path / "out")
    return cfg


def _fails_naming(cfg, address: str, bound_s: float) -> str:
    start = time.monotonic()
    with pytest.raises(ConnectionError) as err:
        launch(cfg, address=address)
    elapsed = time.monotonic() - start
    assert elapsed < bound_s, f"took {elapsed:.0f} s"
    assert not ray.is_initialized()
    assert address in str(err.value)
    return str(err.value)


def test_address_where_nothing_listens_fails_fast(tmp_path):
    address = f"127.0.0.1:{free_port()}"  # closed again: nothing listens there
    msg = _fails_naming(_probe_cfg(tmp_path, 5), address, bound_s=60)
    assert "no Ray cluster at" in msg


def test_address_of_a_server_that_is_not_ray_fails_fast(tmp_path):
    accepted = []
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))  # loopback only
        server.listen(4)
        server.settimeout(30)
        address = f"127.0.0.1:{server.getsockname()[1]}"

        def accept_and_stay_silent():  # a plain TCP service: reads, never answers
            try:
                conn, _ = server.accept()
                accepted.append(conn)
            except OSError:
                pass

        thread = threading.Thread(target=accept_and_stay_silent, daemon=True)
        thread.start()
        msg = _fails_naming(_probe_cfg(tmp_path, 3), address, bound_s=60)
        for conn in accepted:
            conn.close()
    assert "is not a Ray GCS" in msg and accepted  # it did reach the impostor


def test_connect_timeout_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="connect_timeout_s = 0"):
        launch(_probe_cfg(tmp_path, 0), address="127.0.0.1:1")
