"""The Ray launcher: placement group, one worker actor per device, failure -> resume.

    driver (seqshard run)
      |- MetricsHub actor             workers push records; the driver drains it every poll_s
      |- placement group, N bundles   PACK: fill a node before the next
      '- WorkerActor x N              told rank, local rank, world size and rank 0's address;
                                      exports the torchrun variables and calls run_worker,
                                      the same entry as `seqshard worker` under torchrun

The driver waits on the workers' result refs. A dead actor (killed process, lost node) makes
its ref fail within about a second; a stalled collective raises CollectiveError in the worker
after mesh.collective_timeout_s. Either way the whole group is torn down (its process group is
wedged) and, up to launch.max_restarts times, a fresh group resumes from the newest intact
checkpoint. Errors that a restart cannot fix fail at once: `retryable` decides, in one place.
"""

from __future__ import annotations

import errno
import os

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from seqshard.dist import free_port

from . import ray_connect
from .allocator import jemalloc_env, running_allocator
from .config import JobConfig
from .records import Recorder, tensorboard_problem
from .worker import run_meta, train_config_steps

PLACEMENT_TIMEOUT_S = 120.0
_NOT_RETRYABLE = (ValueError, TypeError, KeyError, ImportError, AttributeError,
                  NotImplementedError)
# a filesystem that refuses a write (read-only, no permission, a file where a folder must be,
# full) refuses it again on the next attempt
_NOT_RETRYABLE_ERRNO = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR,
                        errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG}


def retryable(err: BaseException) -> bool:
    """Whether a fresh attempt could succeed where `err` (a worker's exception) failed: a dead
    peer or a timed-out collective, yes; bad input, a config mismatch, an unwritable output, no."""
    if isinstance(err, _NOT_RETRYABLE):
        return False
    return not (isinstance(err, OSError) and err.errno in _NOT_RETRYABLE_ERRNO)


class LaunchError(RuntimeError):
    """The job failed for good (restarts exhausted, or an error a restart cannot fix)."""


class WorkerFailure(Exception):
    def __init__(self, reason: str, retryable: bool):
        super().__init__(reason)
        self.retryable = retryable


@ray.remote(num_cpus=0)
class MetricsHub:
    """Mailbox between workers and the driver; outlives worker groups across restarts."""

    def __init__(self):
        self.items: list[dict] = []

    def push(self, record: dict) -> None:
        self.items.append(record)

    def drain(self) -> list[dict]:
        out, self.items = self.items, []
        return out


@ray.remote
class WorkerActor:
    """One rank. Holds no state between `run` calls; a restart makes fresh actors."""

    def node_info(self) -> dict:
        # the node's Ray IP: 127.0.0.1 under the embedded Ray, the interface the node joined
        # the cluster on otherwise; rank 0's TCPStore binds it (MASTER_ADDR) and nothing else
        ip = ray.util.get_node_ip_address()
        port = free_port(host=ip)  # used only if this actor becomes rank 0
        return {"ip": ip, "node": ray.get_runtime_context().get_node_id(),
                "pid": os.getpid(), "gpus": [str(g) for g in ray.get_gpu_ids()], "port": port,
                "allocator": running_allocator()}

    def run(self, cfg: JobConfig, env: dict, attempt: int, hub, evaluate=None,
            generate=None) -> dict:
        os.environ.update(env)
        if not env.get("CUDA_VISIBLE_DEVICES"):
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
        import torch

        torch.set_num_threads(max(1, int(cfg.launch.cpus_per_worker)))
        from .worker import run_worker

        return run_worker(cfg, attempt=attempt, report=lambda r: hub.push.remote(r),
                          evaluate=evaluate, generate=generate)


def assign_ranks(infos: list[dict]) -> list[dict]:
    """Rank order for actors on bundles 0..N-1: node by node (consecutive ranks share a node,
    which keeps Ulysses groups inside a node), each actor's local rank and visible GPUs."""
    nodes: list[str] = []
    for info in infos:
        if info["node"] not in nodes:
            nodes.append(info["node"])
    order = sorted(range(len(infos)), key=lambda i: (nodes.index(infos[i]["node"]), i))
    plan = []
    for rank, i in enumerate(order):
        same = [j for j in order if infos[j]["node"] == infos[i]["node"]]
        # every rank of a node sees the node's GPUs in local-rank order, so cuda:LOCAL_RANK is
        # its own device (what torchrun and deepspeed give a process, too)
        gpus = [g for j in same for g in infos[j]["gpus"]]
        plan.append({"bundle": i, "rank": rank, "local_rank": same.index(i),
                     "local_world": len(same), "node": infos[i]["node"], "gpus": gpus})
    return plan


class WorkerGroup:
    """A placement group and its N worker actors for one attempt."""

    def __init__(self, cfg: JobConfig):
        lc, world = cfg.launch, cfg.mesh.workers
        bundle = {"CPU": lc.cpus_per_worker}
        if lc.gpus_per_worker:
            bundle["GPU"] = lc.gpus_per_worker
        self.pg = placement_group([dict(bundle) for _ in range(world)], strategy=lc.placement)
        self.actors: list = []
        ready, _ = ray.wait([self.pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            self.teardown()
            raise WorkerFailure(
                f"could not place {world} workers x {bundle} ({lc.placement}) within "
                f"{PLACEMENT_TIMEOUT_S:.0f} s; the cluster has {ray.cluster_resources()}",
                retryable=False)
        # the allocator is chosen when a worker process starts: LD_PRELOAD in its environment
        runtime_env = {"env_vars": jemalloc_env()} if lc.allocator == "jemalloc" else None
        self.actors = [
            WorkerActor.options(
                num_cpus=lc.cpus_per_worker, num_gpus=lc.gpus_per_worker, max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=i),
                runtime_env=runtime_env,
            ).remote()
            for i in range(world)
        ]
        infos = ray.get([a.node_info.remote() for a in self.actors])
        without = [info for info in infos if runtime_env and info["allocator"] != "jemalloc"]
        if without:  # the loader skips a preload it cannot find, with only a line on stderr
            self.teardown()
            raise WorkerFailure(
                f"launch.allocator = 'jemalloc', but {len(without)} worker(s) started without "
                f"it (node {without[0]['ip']}, pid {without[0]['pid']}): is "
                f"{runtime_env['env_vars']['LD_PRELOAD']} on every node?", retryable=False)
        self.plan = assign_ranks(infos)
        rank0 = infos[self.plan[0]["bundle"]]
        self.master = (rank0["ip"], rank0["port"])
        self.infos = infos

    def start(self, cfg: JobConfig, attempt: int, hub, evaluate=None, generate=None) -> dict:
        """Start every rank (to evaluate `evaluate` = (step, checkpoint folder), or to run
        the generation spec `generate`, instead of training, when given); returns
        {result ref: rank}."""
        addr, port = self.master
        refs = {}
        for p in self.plan:
            env = {"RANK": str(p["rank"]), "LOCAL_RANK": str(p["local_rank"]),
                   "WORLD_SIZE": str(len(self.plan)), "LOCAL_WORLD_SIZE": str(p["local_world"]),
                   "MASTER_ADDR": addr, "MASTER_PORT": str(port),
                   "CUDA_VISIBLE_DEVICES": ",".join(p["gpus"])}
            refs[self.actors[p["bundle"]].run.remote(cfg, env, attempt, hub, evaluate,
                                                     generate)] = p["rank"]
        return refs

    def teardown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None


def _describe(err: BaseException) -> tuple[str, bool]:
    """(first useful line, retryable) of a worker's failure."""
    cause = getattr(err, "cause", None)
    if isinstance(err, ray.exceptions.RayTaskError) and cause is not None:
        return f"{type(cause).__name__}: {cause}", retryable(cause)
    if isinstance(err, ray.exceptions.RayActorError):
        return "worker process died (killed, crashed or its node was lost)", True
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", True


def _watch(refs: dict, hub, recorder: Recorder, poll_s: float) -> list[dict]:
    """Wait for every rank, streaming metrics; raise WorkerFailure on the first failure."""
    pending, results = list(refs), {}
    while pending:
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=poll_s)
        for record in ray.get(hub.drain.remote()):
            recorder.add(record)
        failures = {}
        for ref in ready:
            try:
                results[refs[ref]] = ray.get(ref)
            except Exception as err:  # noqa: BLE001 - every failure is reported below
                failures[refs[ref]] = err
        if failures:
            # give the peers a moment to fail too, so the report shows the root cause
            more, _ = ray.wait(pending, num_returns=len(pending), timeout=min(2.0, poll_s * 4))
            for ref in more:
                try:
                    ray.get(ref)
                except Exception as err:  # noqa: BLE001
                    failures[refs[ref]] = err
            described = {rank: _describe(e) for rank, e in sorted(failures.items())}
            # dead ranks first: they are the cause, their peers' collective errors the effect
            died = sorted(described, key=lambda r: (not isinstance(failures[r], ray.exceptions.RayActorError), r))
            reason = "; ".join(f"rank {r}: {described[r][0]}" for r in died)
            raise WorkerFailure(reason, retryable=all(d[1] for d in described.values()))
    return [results[r] for r in sorted(results)]


def launch(cfg: JobConfig, *, address: str | None = None, on_record=None,
           evaluate: tuple[int, str] | None = None, generate: dict | None = None) -> dict:
    """Run the job on Ray: start (or join) Ray, run workers, restart on failure.

    evaluate: (step, checkpoint folder) to load and evaluate on the job's mesh instead of
    training (`seqshard eval`); its records are added to the run's records and summary.
    generate: a `seqshard generate` spec (launch/generate_cmd.py's `plan`, plus "step" and
    "checkpoint"): every rank loads that checkpoint and generates; rank 0 streams each token
    as a "token" record (to `on_record` as it arrives) and its result holds "generated".

    Returns rank 0's result plus "status", "attempts", "nodes" (node id per rank), "out".
    Raises LaunchError when restarts are exhausted or the failure is not retryable.

    Example:
        >>> from seqshard.launch import config, ray_launcher
        >>> cfg = config.load("launch/configs/demo.toml")
        >>> result = ray_launcher.launch(cfg)        # local embedded Ray, 2 workers
    """
    address = address or cfg.launch.address or os.environ.get("RAY_ADDRESS") or None
    if cfg.log.tensorboard and tensorboard_problem():  # before Ray or any worker starts
        raise ValueError(tensorboard_problem())
    # embedded Ray on loopback only, or the cluster at `address` (ConnectionError naming it
    # within launch.connect_timeout_s when none answers)
    started = ray_connect.connect(cfg, address)
    try:
        recorder = Recorder(cfg.out_dir, run_meta(cfg, launcher="ray"), train_config_steps(cfg),
                            progress=cfg.launch.progress, tensorboard=cfg.log.tensorboard,
                            replay=evaluate is not None)
    except OSError as err:  # no records without the folder, and no attempt could write them
        if started:
            ray.shutdown()
        raise LaunchError(f"job {cfg.job.name!r} failed (not retryable): cannot write its "
                          f"output folder {cfg.out_dir}: {err}") from None
    if on_record is not None:
        add = recorder.add
        recorder.add = lambda r: (add(r), on_record(r))
    hub = MetricsHub.remote()
    attempt = 0
    try:
        while True:
            group = None
            try:
                group = WorkerGroup(cfg)
                recorder.event("placed", attempt=attempt,
                               nodes=len({p["node"] for p in group.plan}),
                               master=f"{group.master[0]}:{group.master[1]}")
                refs = group.start(cfg, attempt, hub, evaluate, generate)
                results = _watch(refs, hub, recorder, cfg.launch.poll_s)
                break
            except WorkerFailure as err:
                recorder.event("failure", attempt=attempt, reason=str(err))
                if not err.retryable or attempt >= cfg.launch.max_restarts:
                    why = ("not retryable" if not err.retryable
                           else f"gave up after {cfg.launch.max_restarts} restart(s)")
                    recorder.finish({"status": "failed", "attempts": attempt + 1, "error": str(err)})
                    raise LaunchError(f"job {cfg.job.name!r} failed ({why}): {err}") from None
                attempt += 1
                recorder.event("restart", attempt=attempt, reason=str(err).splitlines()[0][:200])
            finally:
                if group is not None:
                    group.teardown()
        nodes = {p["rank"]: p["node"] for p in group.plan}
        status = "evaluated" if evaluate else "generated" if generate else "completed"
        final = {"status": status, "attempts": attempt + 1,
                 **results[0],
                 "nodes": nodes, "out": str(cfg.out_dir)}
        final["summary"] = str(recorder.finish(final))
        final["ranks"] = results
        return final
    finally:
        ray.kill(hub)
        if started:
            ray.shutdown()
