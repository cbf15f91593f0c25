"""`seqshard sweep CONFIG --over KEY=V1,V2,... [--over ...] [--set KEY=VALUE ...] [--out DIR]`.

A sweep is the cross product of its --over lists; each point is one ordinary job (the same
checks, the same launcher, its own run folder OUT/<nn>_<values>/), run on one Ray instance
that the sweep starts (or joins) once: side by side when the cluster seats several points'
workers at once, else one after another (`[sweep] parallel = "auto" | N`, or --parallel;
launch/sweep_pack.py).

    KEY = section.key       any key `--set` takes (train.seq_len, train.strategy, mesh.ulysses)
    KEY = model             names [model.<name>] sub-tables of the config: each is a model
                            variant, its keys over the plain [model] keys; `kind` defaults to
                            the sub-table's name ([model.fit] is kind = "fit")

A config may list its own axes in a [sweep] table, `over = { "train.seq_len" = [1024, 2048],
model = ["transformer", "fit"] }` (or a [sweep.over] table with dotted keys); --over KEY
replaces that key's list, other keys stay. `parallel` in the same table: "auto" (the default)
runs as many points at once as fit, N at most N, 1 one after another; --parallel replaces it.

Before anything starts, every point's config goes through the job checks. A bad key or value
is a ValueError naming it (exit status 2): a value is bad when every point holding it fails
its check. A point that fails only in combination (a seq_len one model's layout cannot split)
is recorded as 'invalid' and the others run. A point whose job fails is recorded with its
error and the sweep goes on; the exit status is 1 when any point did not complete.

At the end (and after each point) the sweep writes OUT/sweep.md and OUT/sweep.json, and the
plots of launch/sweep_plots.py.
"""

from __future__ import annotations

import copy
import itertools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import config as job_config
from .sweep_pack import AUTO, parse_parallel

MODEL_AXIS = "model"
X_KEY = "train.seq_len"
"""The plots' x axis (log2): the sequence length N of each point."""


@dataclass
class Axis:
    key: str
    """'model' or 'section.key'."""
    values: list
    """Parsed values: TOML scalars / arrays, or bare words as strings."""


@dataclass
class Point:
    """One job of the sweep."""

    index: int
    values: dict
    """axis key -> this point's value, in axis order."""
    name: str
    """Its run folder's name under the sweep folder."""
    cfg: job_config.JobConfig | None = None
    error: str = ""
    """Why its config check failed ('' when it passed)."""
    label: str = ""
    """The plot line it belongs to: model, the other axes, the attention strategy."""
    result: dict = field(default_factory=dict)
    """After running: status, error, final_loss, tokens_per_s, peak_mem_bytes, wall_s."""


# --- parsing ------------------------------------------------------------------------------------

def split_values(raw: str) -> list[str]:
    """'1,2,[3,4],"a,b"' -> ['1', '2', '[3,4]', '"a,b"']: commas inside brackets or quotes
    belong to the value."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(raw):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(raw[start:i])
            start = i + 1
    parts.append(raw[start:])
    return [p.strip() for p in parts]


def parse_over(text: str) -> Axis:
    """'train.seq_len=1024,2048' -> Axis('train.seq_len', [1024, 2048]); values are read as
    TOML (as --set reads them), else kept as words. ValueError names the flag."""
    if "=" not in text:
        raise ValueError(f"--over {text!r}: expected KEY=V1,V2,... (e.g. train.seq_len=1024,2048)")
    key, raw = (s.strip() for s in text.split("=", 1))
    items = split_values(raw)
    if any(item == "" for item in items):
        raise ValueError(f"--over {text!r}: an empty value (two commas, or none after '=')")
    if key == MODEL_AXIS:
        return _checked(Axis(key, items), text)
    if key.count(".") != 1 or "" in key.split("."):
        raise ValueError(f"--over {text!r}: the key must be section.key (e.g. train.seq_len) "
                         f"or '{MODEL_AXIS}' for the [model.<name>] variants")
    values = [job_config.parse_override(f"{key}={item}")[2] for item in items]
    return _checked(Axis(key, values), text)


def _checked(axis: Axis, text: str) -> Axis:
    seen = [repr(v) for v in axis.values]
    twice = sorted({s for s in seen if seen.count(s) > 1})
    if twice:
        raise ValueError(f"--over {text!r}: value(s) {', '.join(twice)} listed twice")
    return axis


def merge_axes(from_config: list[Axis], from_flags: list[Axis]) -> list[Axis]:
    """The config's [sweep] axes with each --over KEY replacing that key's list (in place);
    new keys follow. The same key twice among the flags is a ValueError."""
    keys = [a.key for a in from_flags]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ValueError(f"--over {', '.join(twice)} given more than once: list every value in "
                         f"one --over KEY=V1,V2,...")
    flags = {a.key: a for a in from_flags}
    merged = [flags.pop(a.key, a) for a in from_config]
    return merged + list(flags.values())


def read_config(path: str | os.PathLike) -> tuple[dict, dict[str, dict], list[Axis]]:
    """A sweep TOML as (job tables without model variants or [sweep], {variant: its model
    keys}, the [sweep] table's axes)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    with open(path, "rb") as f:
        try:
            data = job_config.tomllib.load(f)
        except job_config.tomllib.TOMLDecodeError as err:
            raise ValueError(f"config file {str(path)!r} is not valid TOML: {err}") from None
    sweep = data.pop("sweep", {})
    unknown = sorted(set(sweep) - {"over", "parallel"})
    if unknown:
        raise ValueError(f"[sweep] key(s) {', '.join(unknown)} unknown; expected 'over', a table "
                         f"of KEY = [values], and 'parallel' (\"auto\" or N)")
    if "parallel" in sweep:
        parse_parallel(sweep["parallel"])
    over = sweep.get("over", {})
    if not isinstance(over, dict):
        raise ValueError(f"[sweep] over = {over!r}: expected a table of KEY = [values]")
    axes = []
    for key, values in _flat(over):
        if not isinstance(values, list) or not values:
            raise ValueError(f"[sweep] over.{key} = {values!r}: expected a non-empty list")
        # through the flag parser, so both spellings obey the same rules
        text = f"{key}=" + ",".join(_toml_value(v) if key != MODEL_AXIS else str(v) for v in values)
        axes.append(parse_over(text))
    model = dict(data.get("model", {}))
    variants = {name: dict(model.pop(name)) for name in list(model) if isinstance(model[name], dict)}
    data["model"] = model
    return data, variants, axes


def config_parallel(path: str | os.PathLike, flag: str | None = None):
    """The sweep's `parallel`: the --parallel flag, else the config's [sweep] parallel, else
    "auto"; ValueError naming a bad value."""
    if flag is not None:
        return parse_parallel(flag, "--parallel")
    with open(path, "rb") as f:
        sweep = job_config.tomllib.load(f).get("sweep", {})
    return parse_parallel(sweep.get("parallel", AUTO))


def _flat(over: dict) -> list[tuple[str, object]]:
    """[sweep.over] written with dotted keys (train.seq_len = [...]) nests one level: flatten."""
    items = []
    for key, values in over.items():
        if isinstance(values, dict):
            items += [(f"{key}.{sub}", v) for sub, v in values.items()]
        else:
            items.append((key, values))
    return items


def _toml_value(value) -> str:
    """A parsed TOML value written back as TOML (what `parse_override` reads)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


# --- the plan -----------------------------------------------------------------------------------

def plan(config_path, over: list[str] = (), sets: list[str] = (), out: str | None = None
         ) -> tuple[Path, list[Point]]:
    """The sweep folder and every point, each config checked; ValueError (before anything
    starts) for a bad flag, key or value. Points failing only in combination carry `.error`."""
    data, variants, config_axes = read_config(config_path)
    axes = merge_axes(config_axes, [parse_over(t) for t in over])
    swept = {a.key for a in axes}
    for text in sets:
        section, key, _ = job_config.parse_override(text)
        if f"{section}.{key}" in swept:
            raise ValueError(f"--set {text!r}: {section}.{key} is swept (--over or [sweep]); "
                             f"set it in one place")
    _check_variants(axes, variants)
    name = data.get("job", {}).get("name", "job")
    root = Path(out or data.get("job", {}).get("out")
                or os.path.join("runs", f"sweep-{name}-{time.strftime('%Y%m%d-%H%M%S')}")).resolve()
    combos = list(itertools.product(*(a.values for a in axes)))
    points = []
    for index, combo in enumerate(combos):
        values = dict(zip((a.key for a in axes), combo))
        point = Point(index, values, _folder_name(index, values, len(combos)))
        try:
            point.cfg = _point_config(data, variants, values, list(sets), root / point.name, name)
        except ValueError as err:
            point.error = str(err)
        point.label = _label(point, swept)
        points.append(point)
    _refuse_bad_values(axes, points)
    return root, points


def _check_variants(axes: list[Axis], variants: dict[str, dict]) -> None:
    model_axis = next((a for a in axes if a.key == MODEL_AXIS), None)
    if model_axis is None:
        if variants:
            raise ValueError(f"the config has model variants [model.{'], [model.'.join(variants)}]"
                             f": sweep them with --over model={','.join(variants)} (or name one)")
        return
    if not variants:
        raise ValueError("--over model=...: the config has no [model.<name>] sub-tables to choose "
                         "from; sweep a key instead, e.g. --over model.dim=64,128")
    missing = [v for v in model_axis.values if v not in variants]
    if missing:
        raise ValueError(f"--over model={','.join(model_axis.values)}: no [model.<name>] table for "
                         f"{', '.join(map(repr, missing))}; the config has {', '.join(variants)}")


def _folder_name(index: int, values: dict, count: int) -> str:
    parts = [str(v) if k == MODEL_AXIS else f"{k.split('.')[-1]}-{v}" for k, v in values.items()]
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in "_".join(parts))
    return f"{index:0{len(str(max(count - 1, 1)))}d}" + (f"_{safe}" if safe else "")


def _point_config(data: dict, variants: dict, values: dict, sets: list[str], out: Path,
                  name: str) -> job_config.JobConfig:
    """The point's checked JobConfig: [model] < its variant < the axes' values < --set."""
    data = copy.deepcopy(data)
    if MODEL_AXIS in values:
        variant = values[MODEL_AXIS]
        model = {**data.get("model", {}), **variants[variant]}
        model.setdefault("kind", variant)
        data["model"] = model
    for key, value in values.items():
        if key != MODEL_AXIS:
            section, k = key.split(".")
            data.setdefault(section, {})[k] = value
    cfg = job_config.build(data, sets)
    cfg.job.out = str(out)
    cfg.job.name = f"{name}-{out.name}"
    job_config.check_out_dir(cfg)
    from .worker import find_resume  # deferred: imports torch

    find_resume(cfg)  # another config's checkpoint in the point's folder: refuse now
    return cfg


def _label(point: Point, swept: set[str]) -> str:
    """Model (variant), the other axes' values and, for models with sharded attention whose
    strategy is not swept, the strategy: one plot line per label."""
    cfg = point.cfg
    model = point.values.get(MODEL_AXIS) or (cfg and (cfg.model.get("kind") or cfg.job.task))
    parts = [str(model)] if model else []
    parts += [f"{k}={v}" for k, v in point.values.items() if k not in (MODEL_AXIS, X_KEY)]
    if cfg and cfg.job.task == "train" and not swept & {"train.strategy", "model.strategy"}:
        from seqshard.models import merged_model_config

        kind = cfg.model["kind"]
        mc = merged_model_config(kind, {k: v for k, v in cfg.model.items() if k != "kind"},
                                 job_config.train_config(cfg), section="model")
        if getattr(mc, "strategy", None) and getattr(mc, "attn_layers", None) != ():
            parts.append(mc.strategy)  # FIT and pure DeltaNet have no sharded attention
    return " ".join(parts)


def _refuse_bad_values(axes: list[Axis], points: list[Point]) -> None:
    """A value that fails in every point holding it is a bad value, not a bad combination."""
    if all(p.error for p in points):  # a bad key, --set or base config: no value to blame
        raise ValueError(f"every point fails the job checks; {points[0].name}: {points[0].error}")
    for axis in axes:
        for value in axis.values:
            holding = [p for p in points if repr(p.values[axis.key]) == repr(value)]
            if all(p.error for p in holding):
                raise ValueError(f"--over {axis.key}={value}: {holding[0].error}")


# --- the command --------------------------------------------------------------------------------

def add_arguments(p) -> None:
    p.add_argument("config", help="sweep TOML (a job file, optionally with [model.<name>] "
                                  "variants and a [sweep] table), e.g. launch/configs/sweep_cpu.toml")
    p.add_argument("--over", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="sweep KEY over these values (repeatable: the cross product); KEY is "
                        "section.key, or 'model' for the config's [model.<name>] variants")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value in every point (repeatable)")
    p.add_argument("--out", help="sweep folder (default: job.out, else "
                                 "runs/sweep-<job.name>-<date>-<time>); one run folder per point")
    p.add_argument("--parallel", metavar="auto|N",
                   help="points run side by side: 'auto' (default, or [sweep] parallel) as many "
                        "as the Ray cluster's CPUs/GPUs seat, N at most N at once, 1 one after "
                        "another")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an "
                                     "embedded local Ray started once for the sweep)")


def cmd_sweep(args) -> int:
    from .sweep_run import run_sweep

    root, points = plan(args.config, args.over, args.overrides, args.out)
    parallel = config_parallel(args.config, args.parallel)
    command = " ".join(["seqshard sweep", args.config]
                       + [f"--over {t}" for t in args.over] + [f"--set {t}" for t in args.overrides]
                       + ([f"--out {args.out}"] if args.out else [])
                       + ([f"--parallel {args.parallel}"] if args.parallel else []))
    return run_sweep(root, points, address=args.address, command=command, parallel=parallel)


cmd_sweep.add_arguments = add_arguments


def register(command) -> None:
    """Add `seqshard sweep` to the `seqshard` CLI's registry (launch/cli.py's `command`)."""
    command("sweep", "run the cross product of --over values as jobs on one Ray instance; "
                     "writes sweep.md and plots against N")(cmd_sweep)
