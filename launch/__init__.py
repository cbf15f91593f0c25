"""seqshard.launch: jobs. The `seqshard` command, configs, Ray worker actors, checkpoints.

- `config`: typed job configs from TOML (`load`, `build`), checked before any worker starts.
- `ray_launcher.launch(cfg)`: run a job on Ray with restarts and resume.
- `worker.run_worker(cfg)`: one rank of a job; the same entry under Ray, torchrun, deepspeed.
- `checkpoint`: atomic checkpoints with a msgpack manifest of sha256 checksums.
- `records`: a job's progress line, msgpack records, summary.md, loss plot.

The performance subsystem (`seqshard bench`, `seqshard plan`, the cost-model planner) lives in
its own package, `perf`.
"""
