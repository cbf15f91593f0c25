"""Connecting the driver to Ray: a private embedded instance on loopback, or a cluster by address.

    connect(cfg, address)   -> True when this call started or joined Ray (the caller shuts it down)
      no address            an embedded Ray whose every socket is on 127.0.0.1, dashboard off
      "HOST:PORT" / "ray://HOST:PORT" / "auto"
                            the cluster's GCS must answer within launch.connect_timeout_s, else
                            ConnectionError naming the address (ray.init alone waits forever)

Token auth (RAY_AUTH_MODE=token and the cluster's token) comes from the environment, see
launch/README.md: an explicit address never turns it on by itself in Ray 2.60.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time

import ray

LOOPBACK = "127.0.0.1"

# HTTP/2 client preface + an empty SETTINGS frame; every gRPC server (the GCS, the Ray Client
# server) answers with a SETTINGS frame of its own before any request is made
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_H2_SETTINGS = 0x04


def connect(cfg, address: str | None) -> bool:
    """Start or join Ray for `cfg` unless this process already is connected."""
    if ray.is_initialized():
        return False
    if address:
        join(address, cfg.launch.connect_timeout_s)
    else:
        need = cfg.mesh.workers * cfg.launch.cpus_per_worker
        start_embedded(max(os.cpu_count() or 1, int(need + 0.999)))
    return True


def start_embedded(num_cpus: int) -> None:
    """A local Ray reachable from this machine only: node IP, GCS, raylet, object manager,
    agents and workers on 127.0.0.1, no dashboard."""
    with _keep_loopback_node_ip():
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 dashboard_host=LOOPBACK, _node_ip_address=LOOPBACK, log_to_driver=True)
    ip = ray.util.get_node_ip_address()
    if ip != LOOPBACK:  # a Ray release that changed the rule below: refuse to run exposed
        ray.shutdown()
        raise RuntimeError(f"the embedded Ray came up on node IP {ip}, not {LOOPBACK}; it "
                           f"would listen beyond loopback (see launch/README.md)")


@contextlib.contextmanager
def _keep_loopback_node_ip():
    """Ray 2.60 on Linux replaces a loopback node IP by the machine's routable one
    (services.resolve_ip_for_localhost), and its gRPC servers listen on every interface unless
    the node IP is 127.0.0.1. The rewrite is skipped when ray_constants.ENABLE_RAY_CLUSTER is
    off (Ray's single-machine mode, read once at import from RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER);
    switch it off only while this one-node instance starts. Its processes get the node IP on
    their command lines, so they keep 127.0.0.1 after the switch is restored."""
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def join(address: str, timeout_s: float) -> None:
    """Join the cluster at `address`, or raise ConnectionError naming it within ~timeout_s."""
    if timeout_s <= 0:
        raise ValueError(f"launch.connect_timeout_s = {timeout_s}: must be > 0")
    probe_gcs(address, timeout_s)
    ray.init(address=address, log_to_driver=True)


def dialled(address: str) -> str:
    """HOST:PORT that ray.init will dial for `address`: it resolves "auto" to the cluster
    running on this machine and rewrites a loopback host to this machine's routable IP; a
    ray:// (Ray Client) address is dialled as written."""
    if address.startswith("ray://"):
        return address[len("ray://"):]
    from ray._private import services

    try:
        target = services.canonicalize_bootstrap_address(address)
    except Exception as err:  # noqa: BLE001 - Ray raises ValueError / ConnectionError / bare Exception
        raise ConnectionError(f"Ray address {address!r}: {err}") from None
    if target is None:
        raise ConnectionError(f"Ray address {address!r}: no running Ray cluster found on this "
                              f"machine (start one with launch/scripts/ray_cluster.sh head)")
    return target


def probe_gcs(address: str, timeout_s: float) -> None:
    """Raise ConnectionError unless a gRPC server (Ray's GCS) answers at `address` within
    ~timeout_s: nothing listening, a firewall that drops packets and a server that is not Ray
    all fail here instead of hanging ray.init. The address as written is tried first, then the
    one Ray will really dial where that differs (a loopback host, "auto")."""
    deadline = time.monotonic() + timeout_s
    target = dialled(address)
    written = address.removeprefix("ray://")
    for hostport in dict.fromkeys(a for a in (written, target) if a != "auto"):
        where = address if hostport == written else f"{address} (dialled by Ray as {hostport})"
        _answers_grpc(hostport, where, max(0.1, deadline - time.monotonic()), timeout_s)


def _answers_grpc(hostport: str, where: str, left_s: float, timeout_s: float) -> None:
    host, _, port = hostport.rpartition(":")
    try:
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=left_s)
    except (OSError, ValueError) as err:
        raise ConnectionError(f"no Ray cluster at {where}: could not connect within "
                              f"{timeout_s:g} s ({err}); is the head running and the port "
                              f"open? (launch.connect_timeout_s)") from None
    with sock:
        head, reason = b"", "it closed the connection"
        try:
            sock.settimeout(left_s)
            sock.sendall(_H2_PREFACE)
            while len(head) < 9:  # an HTTP/2 frame header
                chunk = sock.recv(9 - len(head))
                if not chunk:
                    break
                head += chunk
        except OSError as err:
            reason = "no answer" if isinstance(err, TimeoutError) else f"{err}"
        if len(head) == 9:
            reason = "it answered, not in gRPC"
        if len(head) < 9 or head[3] != _H2_SETTINGS:
            raise ConnectionError(f"no Ray cluster at {where}: a TCP server listens there but it "
                                  f"is not a Ray GCS ({reason} within {timeout_s:g} s)")
