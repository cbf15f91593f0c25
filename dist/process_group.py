"""Process-group start-up through DeepSpeed's comm or torch.distributed (gloo on CPU, NCCL on
CUDA).

This is the only place seqshard starts a process group. Everything else receives a
`Mesh` built on top of it. The environment follows torchrun's convention
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so the same worker code runs
under the Ray launcher, `deepspeed` and `torchrun`.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0


def default_backend() -> str:
    """NCCL when this process sees a CUDA device, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` now (for a rendezvous that starts right after)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def local_rank_env(rank: int, world: int, port: int, addr: str = "127.0.0.1") -> dict[str, str]:
    """The torchrun variables of `rank` in a group of `world` processes on this one machine.

    `os.environ.update(local_rank_env(r, P, port))` in each process, then `Mesh.from_env()`.
    """
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": addr, "MASTER_PORT": str(port)}


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise ValueError(
                f"environment variable {name} is not set; launch with torchrun, deepspeed or "
                f"`seqshard run`, or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT"
            )
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def select_cuda_device(backend: str) -> torch.device | None:
    """Make GPU number LOCAL_RANK this process's current CUDA device (before any CUDA work and
    before the group starts); None on a machine without CUDA.

    NCCL needs one GPU per rank: a LOCAL_RANK past the device count is a ValueError. gloo ranks
    may share GPUs (LOCAL_RANK modulo the count): the one-GPU check of sharded code runs two
    gloo ranks on GPU 0, the collectives staging through host memory.
    """
    if not torch.cuda.is_available():
        if backend == "nccl":
            raise ValueError("backend='nccl' needs a CUDA device, and this process sees none")
        return None
    count = torch.cuda.device_count()
    local = _env_int("LOCAL_RANK", 0)
    if backend == "nccl" and local >= count:
        raise ValueError(f"LOCAL_RANK={local} but this process sees {count} CUDA device(s): "
                         f"NCCL needs one GPU per rank (use gloo to share a GPU)")
    torch.cuda.set_device(local % count)
    return torch.device("cuda", local % count)


def init_process_group(
    backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, *, deepspeed: bool = True
) -> None:
    """Join the default process group from the environment, or adopt one already started.

    deepspeed=True goes through `deepspeed.comm.init_distributed`, so DeepSpeed's engine
    later finds the same group; on a machine without CUDA, DeepSpeed's CPU accelerator is
    selected (`DS_ACCELERATOR=cpu`) and the backend is gloo. deepspeed=False starts the group
    with torch.distributed alone and never imports DeepSpeed (a bare GPU box; DeepSpeed's
    engine adopts such a group too). On every path with CUDA, the current device is set from
    LOCAL_RANK first (`select_cuda_device`).

    A rank that never joins makes the others fail after `timeout_s` with a `RuntimeError`
    naming the rank, the world size and the rendezvous address, instead of hanging.
    """
    backend = backend or default_backend()
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend={backend!r}: expected 'gloo' or 'nccl'")
    if dist.is_initialized():
        if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
            select_cuda_device(str(dist.get_backend()))  # an adopted group: same device rule
        return
    if backend == "gloo" and not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    rank = _env_int("RANK")
    world_size = _env_int("WORLD_SIZE")
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world_size}")
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = _env_int("MASTER_PORT", 29500)
    os.environ.setdefault("MASTER_ADDR", addr)
    os.environ.setdefault("MASTER_PORT", str(port))
    select_cuda_device(backend)
    timeout = datetime.timedelta(seconds=timeout_s)
    init_method = f"tcp://{addr}:{port}"
    try:
        with _store_on(addr, port, rank, world_size, timeout):
            if deepspeed:
                import deepspeed.comm as ds_comm  # deferred: importing deepspeed costs ~1 s

                ds_comm.init_distributed(
                    dist_backend=backend,
                    auto_mpi_discovery=False,
                    distributed_port=port,
                    verbose=False,
                    timeout=timeout,
                    init_method=init_method,
                    rank=rank,
                    world_size=world_size,
                )
            else:
                dist.init_process_group(backend, init_method=init_method, timeout=timeout,
                                        rank=rank, world_size=world_size)
    except Exception as err:  # torch raises DistStoreError / RuntimeError on rendezvous timeout
        raise RuntimeError(
            f"rank {rank} of {world_size} could not join the process group at {addr}:{port} "
            f"within {timeout_s:.0f} s (backend {backend}): {err}"
        ) from err


@contextlib.contextmanager
def _store_on(addr: str, port: int, rank: int, world_size: int, timeout: datetime.timedelta):
    """On rank 0, host the rendezvous TCPStore on `addr` only, for the duration of the block.

    torch's own master store listens on every interface (`[::]:port`) whatever MASTER_ADDR
    says, so a local run would be reachable from the network. Rank 0 instead binds the socket
    itself on MASTER_ADDR and hands it to a multi-tenant TCPStore; the tcp:// rendezvous that
    follows in the same process reuses that server (same port, multi_tenant) and keeps it
    alive after the block. Where rank 0 cannot bind MASTER_ADDR (an address of another
    machine, torchrun's agent already hosting the store) torch's default store is used.
    """
    if rank != 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        yield
        return
    sock = None
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(max(128, world_size))
    except OSError:
        if sock is not None:
            sock.close()
        yield  # not an address of this machine: torch binds its usual way
        return
    store = dist.TCPStore(addr, port, world_size, is_master=True, timeout=timeout,
                          wait_for_workers=False, multi_tenant=True,
                          master_listen_fd=sock.detach())  # the store owns the fd now
    try:
        yield
    finally:
        del store  # the process group's own store holds the server from here on


def destroy_process_group() -> None:
    """Leave the default process group if one is running."""
    if dist.is_initialized():
        dist.destroy_process_group()
