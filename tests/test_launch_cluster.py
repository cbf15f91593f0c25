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
