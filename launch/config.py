"""Job configs: typed dataclasses filled from TOML, checked before any worker starts.

A job file has one table per dataclass below:

    [job]     name, task ("train" | "probe"), out folder, exactness check length
    [mesh]    workers and the degrees dp x ulysses x ring, backend, collective timeout
    [launch]  Ray resources, restarts, checkpoint cadence
    [model]   kind + the model's own config (passed to seqshard.models as a dict)
    [train]   the task's training config (models.TrainConfig for "train", ProbeConfig for "probe")
    [fault]   deliberate failures, for testing the restart path
    [data]    where training and evaluation tokens come from (models.DataConfig)
    [eval]    evaluation run at the end of training and by `seqshard eval` (models.EvalConfig)
    [log]     what the driver logs besides records.msgpack (TensorBoard, the progress line)

Unknown tables or keys, values of the wrong type and meshes that do not multiply to the worker
count raise ValueError naming the key or the degrees, so a typo never reaches a cluster.
`--set section.key=value` overrides go through the same checks.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seqshard.dist import MeshShape, get_layout
from seqshard.models import RecallTask, TrainConfig, merged_model_config, model_class
from seqshard.models.corpus import DataConfig, open_corpus
from seqshard.models.evaluate import EvalConfig
from seqshard.models.config import CONFIGS
from seqshard.models.fill import fill, suggest

from .allocator import ALLOCATORS, jemalloc_library

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as a package (declared for < 3.11)
    import tomli as tomllib

TASKS = ("train", "probe")


@dataclass
class JobSection:
    name: str = "job"
    """A short name; the default output folder is runs/<name>."""
    task: str = "train"
    """'train' trains a seqshard.models model with its Trainer; 'probe' is the launcher's own
    self-test (a sharded least-squares fit) that needs no model code."""
    out: str = ""
    """Output folder for records, summary, plot and checkpoints (default runs/<name>)."""
    exactness_seq_len: int = 0
    """After training, compare sharded vs unsharded loss/logits at this length (0: skip)."""


@dataclass
class MeshSection:
    workers: int = 1
    """Number of worker processes (one per device): the world size."""
    dp: int = 1
    """Data-parallel degree."""
    ulysses: int = 1
    """Ulysses (all-to-all) degree inside a sequence-parallel group."""
    ring: int = 0
    """Ring degree; 0 fills it in so that dp * ulysses * ring == workers."""
    backend: str = "auto"
    """'gloo', 'nccl' or 'auto' (NCCL where a worker sees a GPU, else gloo)."""
    collective_timeout_s: float = 120.0
    """A collective that waits longer than this fails, naming the rank and the op."""

    def shape(self) -> MeshShape:
        """The checked MeshShape (raises ValueError naming the degrees)."""
        return MeshShape.fit(
            self.workers, dp=self.dp, ulysses=self.ulysses, ring=self.ring or None
        )


@dataclass
class LaunchSection:
    address: str = ""
    """Ray cluster address; empty starts an embedded local Ray (RAY_ADDRESS also works)."""
    connect_timeout_s: float = 30.0
    """Give up joining the cluster at `address` after this many seconds, naming the address."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker actor (also its torch thread count, at least 1)."""
    gpus_per_worker: float = 0.0
    """GPUs per worker actor: 0 on CPU, 1 for one worker per GPU."""
    placement: str = "PACK"
    """Ray placement-group strategy: PACK (fill a node first), SPREAD, STRICT_PACK, STRICT_SPREAD."""
    max_restarts: int = 2
    """Restarts after a worker failure before the job fails for good."""
    checkpoint_every: int = 0
    """Save a checkpoint every this many steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept; older ones are pruned (at least 2, so a torn latest can fall back)."""
    poll_s: float = 0.5
    """How often the driver drains metrics and checks worker health."""
    progress: bool = True
    """Print a live progress line."""
    allocator: str = "system"
    """The workers' malloc: "system" (whatever the environment gives them, the C library's by
    default) or "jemalloc" (the libjemalloc.so that the ray wheel ships, preloaded into the
    workers, never purging freed pages: no page faults and little fragmentation in
    long-context CPU steps; launch/allocator.py). jemalloc is looked for at the driver's ray
    path on every node: a worker that starts without it fails the job, naming the path."""


@dataclass
class LogSection:
    tensorboard: bool = False
    """Also write TensorBoard event files beside records.msgpack (needs `tensorboard`)."""


@dataclass
class FaultSection:
    """Deliberate failures, for testing the failure path end to end (leave unset in real jobs)."""

    rank: int = -1
    """The rank that fails (-1: none) ..."""
    at_step: int = 0
    """... right after finishing this step (before its checkpoint) ..."""
    on_attempt: int = 0
    """... on this attempt only (0 = the first run), so the restarted job can finish ..."""
    mode: str = "kill"
    """... by 'kill' (SIGKILL itself: a crashed process) or 'stall' (sleep forever, so its
    peers' next collective times out after mesh.collective_timeout_s)."""


@dataclass
class ProbeConfig:
    """The 'probe' task: fit w in y = x w over one long sequence sharded across ranks."""

    steps: int = 10
    """Optimizer steps."""
    seq_len: int = 96
    """Global sequence length (tokens), split by the layout over the sp group."""
    dim: int = 6
    """Feature size of each token."""
    lr: float = 0.1
    """SGD learning rate."""
    seed: int = 0
    """Data and init seed; data for step s is a function of (seed, s, dp rank) only."""
    layout: str = "zigzag"
    """Sequence layout: contiguous, zigzag or striped."""


@dataclass
class JobConfig:
    """A whole job. `model` and `train` stay dicts: their schema belongs to seqshard.models."""

    job: JobSection = field(default_factory=JobSection)
    mesh: MeshSection = field(default_factory=MeshSection)
    launch: LaunchSection = field(default_factory=LaunchSection)
    fault: FaultSection = field(default_factory=FaultSection)
    log: LogSection = field(default_factory=LogSection)
    model: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)

    @property
    def out_dir(self) -> Path:
        return Path(self.job.out or os.path.join("runs", self.job.name)).resolve()

    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {"job": JobSection, "mesh": MeshSection, "launch": LaunchSection, "fault": FaultSection,
            "log": LogSection}
MODEL_SECTIONS = ("model", "train", "data", "eval")
"""Tables kept as dicts: their schemas belong to seqshard.models (checked in `validate`)."""


def parse_override(text: str) -> tuple[str, str, Any]:
    """'train.steps=10' -> ('train', 'steps', 10). The value is read as TOML, else a string."""
    if "=" not in text:
        raise ValueError(f"--set {text!r}: expected section.key=value")
    path, raw = text.split("=", 1)
    if path.count(".") != 1:
        raise ValueError(f"--set {text!r}: the key must be section.key, e.g. train.steps")
    section, key = path.strip().split(".")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare words like zigzag
    return section, key, value


def build(data: dict, overrides: list[str] = ()) -> JobConfig:
    """Check a parsed TOML document (plus overrides) and return the JobConfig."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for text in overrides:
        section, key, value = parse_override(text)
        data.setdefault(section, {})[key] = value
    allowed = set(SECTIONS) | set(MODEL_SECTIONS)
    unknown = sorted(set(data) - allowed)
    if unknown:
        named = ", ".join(f"[{u}]" + suggest(u, allowed, "[{}]") for u in unknown)
        raise ValueError(
            f"unknown config section(s) {named}; "
            f"expected {', '.join(f'[{a}]' for a in sorted(allowed))}"
        )
    parts = {name: fill(cls, data.get(name, {}), name) for name, cls in SECTIONS.items()}
    cfg = JobConfig(**parts, **{name: dict(data.get(name, {})) for name in MODEL_SECTIONS})
    validate(cfg)
    return cfg


def load(path: str | os.PathLike, overrides: list[str] = ()) -> JobConfig:
    """Read and check a TOML job file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    with open(path, "rb") as f:
        try:
            data = tomllib.load(f)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"config file {str(path)!r} is not valid TOML: {err}") from None
    return build(data, overrides)


def validate(cfg: JobConfig) -> None:
    """Everything that can be checked without starting a worker."""
    if cfg.job.task not in TASKS:
        raise ValueError(f"job.task = {cfg.job.task!r}: expected one of {TASKS}")
    if cfg.mesh.workers < 1:
        raise ValueError(f"mesh.workers = {cfg.mesh.workers}: must be >= 1")
    if cfg.mesh.ring < 0:
        raise ValueError(f"mesh.ring = {cfg.mesh.ring}: must be >= 0 (0 fills it in)")
    try:
        shape = cfg.mesh.shape()
    except ValueError as err:
        raise ValueError(
            f"impossible mesh: mesh.workers = {cfg.mesh.workers} with mesh.dp = {cfg.mesh.dp}, "
            f"mesh.ulysses = {cfg.mesh.ulysses}, mesh.ring = {cfg.mesh.ring}: {err}"
        ) from None
    if cfg.mesh.backend not in ("auto", "gloo", "nccl"):
        raise ValueError(f"mesh.backend = {cfg.mesh.backend!r}: expected auto, gloo or nccl")
    if cfg.mesh.collective_timeout_s <= 0:
        raise ValueError(f"mesh.collective_timeout_s = {cfg.mesh.collective_timeout_s}: must be > 0")
    lc = cfg.launch
    if lc.placement not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
        raise ValueError(f"launch.placement = {lc.placement!r}: expected PACK, SPREAD, "
                         f"STRICT_PACK or STRICT_SPREAD")
    for key in ("max_restarts", "checkpoint_every"):
        if getattr(lc, key) < 0:
            raise ValueError(f"launch.{key} = {getattr(lc, key)}: must be >= 0")
    if lc.keep_checkpoints < 2:
        raise ValueError(f"launch.keep_checkpoints = {lc.keep_checkpoints}: must be >= 2 so a "
                         f"torn latest checkpoint can fall back to the previous one")
    if lc.allocator not in ALLOCATORS:
        raise ValueError(f"launch.allocator = {lc.allocator!r}: expected one of {ALLOCATORS}")
    if lc.allocator == "jemalloc":
        try:  # before any worker starts
            jemalloc_library()
        except FileNotFoundError as err:
            raise ValueError(f"launch.allocator = 'jemalloc': {err}") from None
    if lc.cpus_per_worker <= 0 or lc.gpus_per_worker < 0:
        raise ValueError(f"launch.cpus_per_worker = {lc.cpus_per_worker}, launch.gpus_per_worker"
                         f" = {lc.gpus_per_worker}: need cpus > 0 and gpus >= 0")
    if not -1 <= cfg.fault.rank < cfg.mesh.workers:
        raise ValueError(f"fault.rank = {cfg.fault.rank}: outside -1..{cfg.mesh.workers - 1}")
    if cfg.fault.mode not in ("kill", "stall"):
        raise ValueError(f"fault.mode = {cfg.fault.mode!r}: expected 'kill' or 'stall'")
    train = train_config(cfg)
    steps, seq_len = train.steps, train.seq_len
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"train.steps = {steps!r}: must be a positive integer")
    layout = get_layout(train.layout)
    for key, n in (("train.seq_len", seq_len), ("job.exactness_seq_len", cfg.job.exactness_seq_len)):
        if isinstance(n, int) and n > 0 and n % layout.divisor(shape.sp) != 0:
            raise ValueError(
                f"{key} = {n} does not split over sp = ulysses {shape.ulysses} x ring "
                f"{shape.ring} = {shape.sp} ranks with the {layout.name} layout (needs a "
                f"multiple of {layout.divisor(shape.sp)})"
            )
    if cfg.job.task == "train":
        _validate_model(cfg, shape)
        data = fill(DataConfig, cfg.data, "data")
        fill(EvalConfig, cfg.eval, "eval")
        _validate_data(cfg, data)


def train_config(cfg: JobConfig):
    """The task's checked training config: ProbeConfig or models.TrainConfig."""
    if cfg.job.task == "probe":
        return fill(ProbeConfig, cfg.train, "train")
    return fill(TrainConfig, cfg.train, "train")


def _validate_model(cfg: JobConfig, shape: MeshShape) -> None:
    kind = cfg.model.get("kind")
    if not isinstance(kind, str):
        raise ValueError(f"model.kind = {kind!r}: name the model, e.g. 'transformer'")
    if kind not in CONFIGS:
        raise ValueError(f"model.kind = {kind!r}: expected one of {sorted(CONFIGS)}")
    values = {key: value for key, value in cfg.model.items() if key != "kind"}
    tc = train_config(cfg)
    _validate_task(tc)
    # the Trainer's own merge of [model] and [train] (layout, strategy), so we check what
    # runs; unknown keys are named as model.<key>
    mc = merged_model_config(kind, values, tc, section="model")
    supported = model_class(kind).supported_layouts
    if mc.layout not in supported:
        raise ValueError(f"train.layout = {mc.layout!r}: model.kind = {kind!r} runs on the "
                         f"{' / '.join(supported)} layout only")
    _validate_lengths(cfg, mc, shape)
    _validate_strategy(mc, shape)


def _validate_lengths(cfg: JobConfig, mc, shape: MeshShape) -> None:
    """The sequence lengths against the layout the model runs (set in [model] or [train]) and
    FIT's groups, which a rank's shard must hold whole: otherwise every worker fails at once."""
    layout = get_layout(mc.layout)
    for key, n in (("train.seq_len", train_config(cfg).seq_len),
                   ("job.exactness_seq_len", cfg.job.exactness_seq_len)):
        if not n:
            continue
        if n % layout.divisor(shape.sp):
            raise ValueError(f"{key} = {n} does not split over sp = {shape.sp} ranks with the "
                             f"{layout.name} layout of model.layout (needs a multiple of "
                             f"{layout.divisor(shape.sp)})")
        group = getattr(mc, "group_size", None)
        if group and (n // shape.sp) % group:
            raise ValueError(f"{key} = {n} gives each of the sp = {shape.sp} ranks "
                             f"{n // shape.sp} tokens, not a multiple of model.group_size = "
                             f"{group} (FIT's groups stay whole on a rank)")


def _validate_strategy(mc, shape: MeshShape) -> None:
    """The attention strategy that will run must use the mesh as the summary reports it."""
    strategy = getattr(mc, "strategy", None)
    if strategy is None or getattr(mc, "attn_layers", None) == ():
        return  # no sharded global attention in this model (FIT, pure DeltaNet)
    from types import SimpleNamespace

    from seqshard.ops.attention.sharded import resolve_strategy

    # resolve_strategy reads only these sizes of a Mesh; there is no Mesh before workers start
    sizes = SimpleNamespace(size=shape.sp, ulysses_size=shape.ulysses, ring_size=shape.ring)
    used = resolve_strategy(strategy, sizes, mc.num_heads)
    if used in ("ring", "allgather") and shape.ulysses > 1:
        why = (f" (what 'auto' picks as model.num_heads = {mc.num_heads} does not divide by "
               f"sp = {shape.sp})" if strategy == "auto" else "")
        raise ValueError(f"mesh.ulysses = {shape.ulysses} has no effect with strategy={used!r}"
                         f"{why}: K/V move over all {shape.sp} sp ranks; set train.strategy = "
                         f"'hybrid' or 'ulysses', or mesh.ulysses = 1")
    degree = {"ulysses": shape.sp, "hybrid": shape.ulysses}.get(used)
    if degree and mc.num_heads % degree:
        raise ValueError(f"model.num_heads = {mc.num_heads} is not divisible by the Ulysses "
                         f"degree {degree} (strategy={used!r}, mesh.ulysses = {shape.ulysses}, "
                         f"sp = {shape.sp}): Ulysses splits heads across ranks")


def _validate_data(cfg: JobConfig, data: DataConfig) -> None:
    """train.task = 'data': the corpus opens, its ids fit the vocabulary and each split holds
    a sequence (errors name the file and the number); packing needs a model that honours it."""
    tc = train_config(cfg)
    if tc.task != "data":
        return
    if data.packed and not model_class(cfg.model["kind"]).packs_documents:
        raise ValueError(f"data.packed = true: model.kind = {cfg.model['kind']!r} does not take "
                         f"packed documents (its recurrent or grouped mixers cross document "
                         f"boundaries); use 'transformer' or data.packed = false")
    open_corpus(data, tc.vocab_size, seq_len=tc.seq_len, batch_size=tc.batch_size)


def _validate_task(tc) -> None:
    """The synthetic recall task's own limits (the Trainer would find them only in a worker)."""
    if tc.task != "recall":
        return
    try:
        task = RecallTask(tc.vocab_size, tc.recall_pairs, tc.recall_queries)
    except ValueError as err:
        raise ValueError(f"train.recall_pairs = {tc.recall_pairs}, train.recall_queries = "
                         f"{tc.recall_queries}, train.vocab_size = {tc.vocab_size}: {err}") from None
    if tc.seq_len < task.min_len():
        raise ValueError(f"train.seq_len = {tc.seq_len} is shorter than the {task.min_len()} "
                         f"tokens the recall task needs (2 * pairs + 2 * queries)")


def resource_warnings(cfg: JobConfig, *, cpus: int, gpus: int) -> list[str]:
    """Lines to warn with when one machine (cpus, gpus) gets more workers than it can seat."""
    lc, n = cfg.launch, cfg.mesh.workers
    out = []
    for want, have, unit in ((n * lc.cpus_per_worker, cpus, "CPU"), (n * lc.gpus_per_worker, gpus, "GPU")):
        if want > have:
            per = lc.cpus_per_worker if unit == "CPU" else lc.gpus_per_worker
            out.append(f"{n} workers x {per} {unit} = {want} {unit}s, but this machine has "
                       f"{have} {unit}{'s' if have != 1 else ''}: they will share them (slower)"
                       + (", or never be placed" if unit == "GPU" else ""))
    return out


def check_out_dir(cfg: JobConfig) -> None:
    """ValueError unless the output folder (and its checkpoints folder) can be created there."""
    for path in (cfg.out_dir, cfg.checkpoint_dir):
        if path.exists() and not path.is_dir():
            raise ValueError(f"output folder {path} is not a folder (a file is there)")
    base = cfg.out_dir
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise ValueError(f"output folder {cfg.out_dir} cannot be made: {base} is not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"output folder {cfg.out_dir} cannot be written: no write access to {base}")


RESUMABLE_TRAIN_KEYS = ("steps",)
"""Train keys a resumed run may change: extending a run is what resuming is for."""


def resume_meta(cfg: JobConfig) -> dict:
    """What a checkpoint records of its job, to refuse resuming it under another job: the task,
    the model config, the train config (but train.steps), the data (train.task = 'data': the
    [data] section, the source and its token count) and the mesh sizes that shape the saved
    state (per-rank files, ZeRO shards). The ulysses / ring split may change: state is the same."""
    shape = cfg.mesh.shape()
    tc = train_config(cfg)
    train = dataclasses.asdict(tc)
    model = dict(cfg.model)
    kind = model.get("kind")
    if kind in CONFIGS:  # with defaults filled in, so spelling a default out is no change
        values = {key: value for key, value in model.items() if key != "kind"}
        model = {"kind": kind, **dataclasses.asdict(fill(CONFIGS[kind], values, "model"))}
    meta = {"task": cfg.job.task, "model": model,
            "train": {k: v for k, v in train.items() if k not in RESUMABLE_TRAIN_KEYS},
            "mesh": {"workers": shape.world_size, "dp": shape.dp}}
    if cfg.job.task == "train" and tc.task == "data":  # other tasks read no data
        meta["data"] = open_corpus(cfg.data, tc.vocab_size).fingerprint()
    return meta
