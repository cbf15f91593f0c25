"""Running a planned sweep: one Ray instance, the points one after another through the launcher.

The launcher joins a Ray that this process already started (ray_connect.connect does nothing
then), so the sweep starts or joins Ray once, sized for its largest point, and shuts it down
at the end only if it started it. A point whose job fails is recorded with the launcher's
error and the sweep goes on; sweep.md and sweep.json are rewritten after every point, so an
interrupted sweep still says what it measured.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from . import config as job_config
from . import sweep_report
from .sweep_plots import write_plots


def run_sweep(root: Path, points: list, *, address: str | None = None, command: str = "") -> int:
    """Run every checked point; 0 when all completed, 1 otherwise."""
    import ray

    from . import ray_connect
    from .ray_launcher import LaunchError, launch

    root.mkdir(parents=True, exist_ok=True)
    runnable = [p for p in points if not p.error]
    header = {"command": command, "started": sweep_report.now(), "machine": sweep_report.machine()}
    for p in points:
        if p.error:
            print(f"[sweep] {p.name}: invalid, not run: {p.error}", file=sys.stderr)
    print(f"[sweep] {len(runnable)} of {len(points)} point(s) to run; output in {root}", flush=True)
    sweep_report.write(root, points, header)
    biggest = max((p.cfg for p in runnable),
                  key=lambda c: c.mesh.workers * c.launch.cpus_per_worker)
    address = address or biggest.launch.address or os.environ.get("RAY_ADDRESS") or None
    if not address:
        for line in job_config.resource_warnings(biggest, cpus=os.cpu_count() or 1, gpus=_gpus()):
            print(f"seqshard sweep: warning: {line}", file=sys.stderr)
    started = ray_connect.connect(biggest, address)
    try:
        for i, p in enumerate(runnable, 1):
            print(f"[sweep] point {i}/{len(runnable)} {p.name}: {p.label}", flush=True)
            begin = time.perf_counter()
            try:
                launch(p.cfg, address=address)
                status, error = "completed", ""
            except KeyboardInterrupt:  # the table says which point was cut short, then stop
                p.result = {"status": "interrupted", "error": "interrupted (Ctrl-C)",
                            "wall_s": time.perf_counter() - begin,
                            **sweep_report.run_numbers(Path(p.cfg.job.out))}
                raise
            except LaunchError as err:
                status, error = "failed", str(err)
            except Exception as err:  # noqa: BLE001 - any point's failure is recorded, the sweep goes on
                status, error = "failed", f"{type(err).__name__}: {err}"
            p.result = {"status": status, "error": error, "wall_s": time.perf_counter() - begin,
                        **sweep_report.run_numbers(Path(p.cfg.job.out))}
            print(f"[sweep] {p.name}: {status} in {p.result['wall_s']:.1f} s"
                  + (f": {error}" if error else ""), flush=True)
            sweep_report.write(root, points, header)
    finally:
        if started:
            ray.shutdown()
        header.update(finished=sweep_report.now(), machine_end=sweep_report.machine())
        table = sweep_report.rows(points)
        plots = write_plots(root, table, title=root.name)
        path = sweep_report.write(root, points, header, plots)
    print(path.read_text())
    print(f"seqshard sweep: output in {root}")
    return 0 if all(p.result.get("status") == "completed" for p in points) else 1


def _gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
