"""`seqshard generate CONFIG --prompt-file F --max-new-tokens K [--set KEY=VALUE ...]`.

Greedy generation from a trained run, on Ray like `seqshard run`: the job file names the run
(job.out, or --out), whose newest intact checkpoint is loaded on the job's mesh (refused if
another config wrote it; the load unpickles tensors and plain data only). Every rank runs
the model's greedy generation on the sharded prompt and rank 0 streams each token to the
driver, which prints it as it arrives: decoded text for a byte vocabulary (vocab_size 256),
else the token ids.

The prompt file is read as
- bytes (`--prompt-format bytes`; the default when the model's vocab_size is 256): every
  byte of the file is one token, as `seqshard data prepare` and the text corpora read text;
- token ids (`--prompt-format ids`; the default otherwise): whitespace-separated integers
  in [0, vocab_size), e.g. the output of the run's tokenizer.
Any length works: the longest prefix that shards evenly runs through the sharded prefill and
the rest is fed token by token (launch/generate_run.py). Prompt + new tokens may not exceed
--max-len, by default the run's train.seq_len (the length it was trained at).

Refused with exit status 2 before Ray starts: a run with no checkpoint, an empty prompt or one
too short to shard, ids outside the vocabulary, a prompt longer than the maximum. The records
of the generation (its tokens included) go to RUN/generate/ (or --gen-out), not into the run's
own records and summary.
"""

from __future__ import annotations

import codecs
import copy
import sys
from pathlib import Path

FORMATS = ("auto", "bytes", "ids")


def read_prompt(path: str, fmt: str, vocab_size: int) -> list[int]:
    """The prompt file's token ids (see the module docstring); ValueError naming the problem."""
    if fmt not in FORMATS:
        raise ValueError(f"--prompt-format {fmt!r}: expected one of {FORMATS}")
    if fmt == "auto":
        fmt = "bytes" if vocab_size == 256 else "ids"
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"--prompt-file {path}: {err.strerror or err}") from None
    if fmt == "bytes":
        ids = list(raw)
    else:
        words = raw.decode("utf-8", errors="replace").split()
        bad = [w for w in words if not w.lstrip("-").isdigit()]
        if bad:
            raise ValueError(f"--prompt-file {path}: {bad[0]!r} is not a token id (the ids "
                             f"format is whitespace-separated integers; --prompt-format "
                             f"bytes reads the file's bytes)")
        ids = [int(w) for w in words]
    if not ids:
        raise ValueError(f"--prompt-file {path} is empty: nothing to generate from")
    outside = [i for i in ids if not 0 <= i < vocab_size]
    if outside:
        raise ValueError(f"--prompt-file {path}: token {outside[0]} is outside the model's "
                         f"vocabulary [0, {vocab_size})")
    return ids


def configs(cfg):
    """(TrainConfig, the model's LMConfig) of a job, as its Trainer builds them."""
    from seqshard.models.config import make_train_config, merged_model_config

    tc = make_train_config(dict(cfg.train), "train")
    model = {k: v for k, v in cfg.model.items() if k != "kind"}
    return tc, merged_model_config(cfg.model["kind"], model, tc, "model")


def plan(cfg, prompt: list[int], max_new_tokens: int, max_len: int | None) -> dict:
    """The generation spec every rank runs: prompt ids, the prefix that shards evenly,
    max_new_tokens and max_len; ValueError naming the problem."""
    from .generate_run import shard_unit

    tc, model = configs(cfg)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {max_new_tokens!r} must be a positive integer")
    limit = tc.seq_len if max_len is None else max_len
    n = len(prompt)
    if n + max_new_tokens > limit:
        raise ValueError(f"the prompt has {n} tokens; with --max-new-tokens {max_new_tokens} "
                         f"that is more than the maximum {limit} ("
                         + ("--max-len" if max_len is not None else
                            "the run's train.seq_len; --max-len raises it") + ")")
    sp = cfg.mesh.shape().sp
    unit = shard_unit(model.layout, sp, getattr(model, "group_size", None))
    if n < unit:
        raise ValueError(f"the prompt has {n} tokens; sharded over {sp} ranks with the "
                         f"{model.layout} layout it needs at least {unit}")
    return {"prompt": prompt, "prefix": n // unit * unit, "max_new_tokens": max_new_tokens,
            "max_len": limit, "vocab_size": model.vocab_size}


class Printer:
    """Prints streamed token records as they arrive: text for bytes, ids otherwise."""

    def __init__(self, as_text: bool, stream=None):
        self.as_text = as_text
        self.stream = stream or sys.stdout
        self.ids: list[int] = []
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, record: dict) -> None:
        if record.get("type") != "token":
            return
        token = int(record["id"])
        self.ids.append(token)
        if self.as_text:
            self.stream.write(self._utf8.decode(bytes([token])))
        else:
            self.stream.write(f"{token} ")
        self.stream.flush()

    def end(self) -> None:
        if self.as_text:
            self.stream.write(self._utf8.decode(b"", final=True))
        self.stream.write("\n")
        self.stream.flush()


def cmd_generate(args) -> int:
    from .cli import _load, _shown
    from .worker import find_resume

    cfg = _load(args)  # ValueError before Ray starts
    if cfg.job.task != "train":
        raise ValueError(f"job.task = {cfg.job.task!r} has no model; seqshard generate needs "
                         f"a 'train' run")
    found = find_resume(cfg)  # refuses a checkpoint another config wrote
    if found is None:
        raise ValueError(f"{_shown(cfg.out_dir)} has no intact checkpoint in "
                         f"{_shown(cfg.checkpoint_dir)}: train it first (seqshard run)")
    step, folder = found
    prompt = read_prompt(args.prompt_file, args.prompt_format, configs(cfg)[1].vocab_size)
    spec = plan(cfg, prompt, args.max_new_tokens, args.max_len)
    spec.update(step=step, checkpoint=str(folder))
    job = copy.deepcopy(cfg)  # the generation's records go beside the run, not into it
    job.job.out = str(Path(args.gen_out).resolve() if args.gen_out else cfg.out_dir / "generate")
    job.launch.progress = False  # no training bar; the tokens are the output
    job.launch.max_restarts = 0  # a restart would stream the tokens again
    as_text = args.prompt_format == "bytes" or (args.prompt_format == "auto"
                                                and spec["vocab_size"] == 256)
    print(f"generating {spec['max_new_tokens']} tokens from {_shown(cfg.out_dir)} at step "
          f"{step} after a {len(spec['prompt'])}-token prompt", file=sys.stderr, flush=True)
    from .ray_launcher import LaunchError, launch

    printer = Printer(as_text)
    try:
        result = launch(job, address=args.address, on_record=printer, generate=spec)
    except LaunchError as err:
        printer.end()
        print(f"seqshard: {err}", file=sys.stderr)
        return 1
    printer.end()
    if result.get("generated") != printer.ids:  # a record lost on the way
        print(f"seqshard generate: the workers generated {result.get('generated')} but "
              f"{printer.ids} arrived", file=sys.stderr)
        return 1
    print(f"seqshard: output in {_shown(job.out_dir)}", file=sys.stderr)
    return 0


def _arguments(p) -> None:
    p.add_argument("config", help="the run's job TOML file (its job.out holds the checkpoints)")
    p.add_argument("--prompt-file", required=True, help="the prompt (see --prompt-format)")
    p.add_argument("--max-new-tokens", type=int, required=True, help="tokens to generate")
    p.add_argument("--prompt-format", default="auto", choices=FORMATS,
                   help="bytes: each byte a token; ids: whitespace-separated token ids; auto: "
                        "bytes when the model's vocab_size is 256, else ids")
    p.add_argument("--max-len", type=int, default=None,
                   help="the most tokens (prompt + new) to allow (default: train.seq_len)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set mesh.collective_timeout_s=600")
    p.add_argument("--out", help="the run's output folder (overrides job.out)")
    p.add_argument("--gen-out", help="where the generation's records go (default RUN/generate)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an "
                                     "embedded local Ray)")


cmd_generate.add_arguments = _arguments


def register(command) -> None:
    """Add `seqshard generate` to the `seqshard` CLI's registry (launch/cli.py's `command`)."""
    command("generate", "greedy generation from a trained run's newest checkpoint, streamed "
                        "token by token")(cmd_generate)
