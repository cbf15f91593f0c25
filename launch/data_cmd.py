"""`seqshard data prepare IN OUT.bin [--tokenizer DIR] [--dtype uint16|uint32]`.

Turns text (a file, or every non-hidden file of a folder, sorted) into the flat .bin of token
ids that `[data] path` memory-maps, once, with a progress bar. Without a tokenizer the ids are
the UTF-8 bytes, each file followed by the separator 0: the same stream as reading the text
directly, so both give the same batches. With `--tokenizer DIR` (a local Hugging Face
tokenizer; nothing is downloaded) each file's text is encoded and followed by the tokenizer's
EOS id when it has one (set `data.eos_id` to it for packed documents).
"""

from __future__ import annotations

import os

import numpy as np

from seqshard.models.sources import BIN_DTYPES, SEPARATOR, text_files
from seqshard.models.tokenizer import load_tokenizer

CHUNK = 1 << 24  # bytes read (and written) at a time for byte ids


def prepare(source: str, out: str, *, tokenizer: str = "", dtype: str = "uint16",
            progress: bool = True) -> dict:
    """Write `source`'s token ids to `out` (written beside it, then renamed into place).
    Returns {"tokens", "files", "vocab_size", "eos_id", "dtype"}."""
    if dtype not in BIN_DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {sorted(BIN_DTYPES)}")
    if not out.endswith(".bin"):
        raise ValueError(f"output {out!r} must end in .bin ([data] path reads *.bin as token ids)")
    files = text_files(source)
    tok = load_tokenizer(tokenizer, "--tokenizer") if tokenizer else None
    vocab = len(tok) if tok is not None else 256
    eos = (tok.eos_token_id if tok is not None else SEPARATOR)
    limit = np.iinfo(BIN_DTYPES[dtype]).max + 1
    if vocab > limit:
        raise ValueError(f"tokenizer {tokenizer!r} has {vocab} ids, more than {dtype} holds "
                         f"({limit}): use --dtype uint32")
    from tqdm import tqdm

    total = sum(os.path.getsize(f) for f in files)
    tokens, partial = 0, out + ".partial"
    with open(partial, "wb") as sink, tqdm(total=total, unit="B", unit_scale=True,
                                            desc=f"prepare {os.path.basename(out)}",
                                            disable=not progress) as bar:
        for path in files:
            for ids in _file_ids(path, tok, bar):
                np.asarray(ids, dtype=BIN_DTYPES[dtype]).tofile(sink)
                tokens += len(ids)
            if eos is not None:
                np.asarray([eos], dtype=BIN_DTYPES[dtype]).tofile(sink)
                tokens += 1
    os.replace(partial, out)
    return {"tokens": tokens, "files": len(files), "vocab_size": vocab, "eos_id": eos,
            "dtype": dtype}


def _file_ids(path: str, tok, bar):
    """The ids of one file, in pieces: bytes by CHUNK; a tokenizer encodes the whole text."""
    with open(path, "rb") as f:
        if tok is None:
            while chunk := f.read(CHUNK):
                bar.update(len(chunk))
                yield np.frombuffer(chunk, np.uint8)
            return
        data = f.read()
    bar.update(len(data))
    yield tok.encode(data.decode("utf-8", errors="replace"), add_special_tokens=False)


def cmd_data(args) -> int:
    info = prepare(args.input, args.output, tokenizer=args.tokenizer or "", dtype=args.dtype)
    eos = "none" if info["eos_id"] is None else info["eos_id"]
    print(f"wrote {info['tokens']} {info['dtype']} ids from {info['files']} file(s) to "
          f"{args.output} (vocabulary {info['vocab_size']}, separator id {eos}); train on it "
          f"with [data] path = \"{args.output}\", dtype = \"{info['dtype']}\" and "
          f"train.vocab_size >= {info['vocab_size']}")
    return 0


def _arguments(p) -> None:
    p.add_argument("action", choices=["prepare"], help="prepare: tokenize text into a .bin")
    p.add_argument("input", help="a text file, or a folder of text files")
    p.add_argument("output", help="the .bin file to write")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="a local Hugging Face tokenizer folder (default: UTF-8 bytes)")
    p.add_argument("--dtype", choices=sorted(BIN_DTYPES), default="uint16",
                   help="id type of the .bin (default uint16, as nanoGPT)")


cmd_data.add_arguments = _arguments


def register(command) -> None:
    """Add `seqshard data prepare` to the `seqshard` CLI's registry (launch/cli.py's `command`)."""
    command("data", "tokenize text once into a .bin of token ids (seqshard data prepare)")(cmd_data)
