"""Running a planned sweep on one Ray instance: points one after another, or side by side.

The launcher joins a Ray that this process already started (ray_connect.connect does nothing
then), so the sweep starts or joins Ray once and shuts it down at the end only if it started
it. An embedded Ray is sized for the biggest point (with `parallel = N`, the N biggest).

Side by side (launch/sweep_pack.py decides when a point fits): each running point is one
`launch()` call in its own driver thread. Threads, not subprocesses, because `launch` already
is a self-contained driver over Ray's thread-safe API (its own placement group, actors and
metrics hub, its own Recorder writing only the point's run folder) and it joins the Ray this
process holds; subprocesses would each need to join the cluster by address (an embedded Ray
listens on loopback with no address to hand over) and would report back through files. The
main thread alone writes results and sweep.md/sweep.json: a point's thread only hands its
outcome over a queue. While points overlap, their progress lines are off (interleaved bars
read as noise); the sweep prints when each point starts and ends, and each run folder's
records and summary are as complete as a lone run's.

A point whose job fails is recorded with the launcher's error and the sweep goes on; every
point records when it started and ended. sweep.md and sweep.json are rewritten whenever a
point starts or ends, so an interrupted sweep still says what it measured. Ctrl-C marks the
points in flight 'interrupted' and disconnects from Ray, which removes their workers.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
import time
from pathlib import Path

from . import config as job_config
from . import sweep_report
from .sweep_pack import AUTO, Packer, embedded_cpus, need
from .sweep_plots import write_plots


def run_sweep(root: Path, points: list, *, address: str | None = None, command: str = "",
              parallel=AUTO) -> int:
    """Run every checked point, as many at once as `parallel` and the cluster allow; 0 when
    all completed, 1 otherwise."""
    import ray

    from . import ray_connect

    root.mkdir(parents=True, exist_ok=True)
    runnable = [p for p in points if not p.error]
    header = {"command": command, "started": sweep_report.now(), "machine": sweep_report.machine()}
    for p in points:
        if p.error:
            print(f"[sweep] {p.name}: invalid, not run: {p.error}", file=sys.stderr)
    print(f"[sweep] {len(runnable)} of {len(points)} point(s) to run; output in {root}", flush=True)
    sweep_report.write(root, points, header)
    biggest = max((p.cfg for p in runnable), key=lambda c: need(c)["CPU"])
    address = address or biggest.launch.address or os.environ.get("RAY_ADDRESS") or None
    started = False
    if not ray.is_initialized():
        if address:
            started = ray_connect.connect(biggest, address)
        else:
            cpus = embedded_cpus([p.cfg for p in runnable], parallel, os.cpu_count() or 1)
            for line in job_config.resource_warnings(biggest, cpus=os.cpu_count() or 1,
                                                     gpus=_gpus()):
                print(f"seqshard sweep: warning: {line}", file=sys.stderr)
            if cpus > (os.cpu_count() or 1) and parallel != AUTO and parallel > 1:
                print(f"seqshard sweep: warning: parallel = {parallel} points need {cpus} CPUs "
                      f"together, but this machine has {os.cpu_count()}: they will share them "
                      f"(slower)", file=sys.stderr)
            ray_connect.start_embedded(cpus)
            started = True
    packer = Packer(ray.cluster_resources(), parallel)
    at_once = packer.at_once([need(p.cfg) for p in runnable])
    side_by_side = at_once > 1
    header["parallel"] = (f"{parallel}: up to {at_once} "
                          f"point(s) at once on {packer.capacity['CPU']:g} CPUs, "
                          f"{packer.capacity['GPU']:g} GPUs")
    interrupted, threads = False, []
    with _no_auto_connect():  # until every thread is done with Ray
        try:
            _run_points(runnable, packer, address, side_by_side, root, points, header, threads)
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:
            running = [p for p in runnable if p.result.get("status") == "running"]
            for p in running:  # the table says which points were cut short
                p.result = _outcome(p, "interrupted", "interrupted (Ctrl-C)",
                                    p.result["start_s"], time.time())
            if started or (interrupted and running):  # disconnecting removes their workers
                ray.shutdown()
            deadline = time.monotonic() + 10.0
            for thread in threads:  # their launches fail fast once Ray is gone
                thread.join(timeout=max(0.0, deadline - time.monotonic()))
            header.update(finished=sweep_report.now(), machine_end=sweep_report.machine())
            table = sweep_report.rows(points)
            plots = write_plots(root, table, title=root.name)
            path = sweep_report.write(root, points, header, plots)
    print(path.read_text())
    print(f"seqshard sweep: output in {root}")
    return 0 if all(p.result.get("status") == "completed" for p in points) else 1


def _run_points(runnable: list, packer: Packer, address, side_by_side: bool, root: Path,
                points: list, header: dict, threads: list) -> None:
    """Start points in order as they fit; record each as it ends (main thread only)."""
    done: queue.Queue = queue.Queue()
    waiting = list(runnable)
    count = len(runnable)
    while waiting or packer.held:
        while waiting and packer.fits(need(waiting[0].cfg)):
            p = waiting.pop(0)
            if side_by_side:
                p.cfg.launch.progress = False  # overlapping bars would garble each other
            packer.start(p.index, need(p.cfg))
            begin = time.time()
            p.result = {"status": "running", "started": _clock(begin), "start_s": begin}
            print(f"[sweep] point {count - len(waiting)}/{count} {p.name}: {p.label} "
                  f"started", flush=True)
            threads.append(threading.Thread(target=_launch_point, args=(p, address, done),
                                            daemon=True, name=f"sweep-{p.name}"))
            threads[-1].start()
            sweep_report.write(root, points, header)
        p, status, error, begin, end = _next(done)
        packer.finish(p.index)
        p.result = _outcome(p, status, error, begin, end)
        print(f"[sweep] {p.name}: {status} in {p.result['wall_s']:.1f} s"
              + (f": {error}" if error else ""), flush=True)
        sweep_report.write(root, points, header)


@contextlib.contextmanager
def _no_auto_connect():
    """Ray starts a fresh local instance when an API is called while disconnected. After
    Ctrl-C the main thread disconnects while points' threads are still inside `launch`; their
    next Ray call must fail (ending the thread), not start a new Ray that keeps the process
    alive (seen by hand). The sweep always connects first, so it never needs the auto-start.
    Ray 2.60 reads the switch from this module attribute at each call."""
    from ray._private import auto_init_hook

    saved = auto_init_hook.enable_auto_connect
    auto_init_hook.enable_auto_connect = False
    try:
        yield
    finally:
        auto_init_hook.enable_auto_connect = saved


def _next(done: queue.Queue):
    """The next finished point; waits in short slices so Ctrl-C reaches the main thread."""
    while True:
        try:
            return done.get(timeout=0.5)
        except queue.Empty:
            continue


def _launch_point(p, address, done: queue.Queue) -> None:
    """One point's job (a driver thread); its outcome goes to `done`, never raised."""
    from .ray_launcher import LaunchError, launch

    begin = time.time()
    try:
        launch(p.cfg, address=address)
        status, error = "completed", ""
    except LaunchError as err:
        status, error = "failed", str(err)
    except BaseException as err:  # noqa: BLE001 - any point's failure is recorded, the sweep goes on
        status, error = "failed", f"{type(err).__name__}: {err}"
    done.put((p, status, error, begin, time.time()))


def _outcome(p, status: str, error: str, begin: float, end: float) -> dict:
    return {"status": status, "error": error, "wall_s": end - begin,
            "started": _clock(begin), "finished": _clock(end), "start_s": begin, "end_s": end,
            **sweep_report.run_numbers(Path(p.cfg.job.out))}


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t))


def _gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
