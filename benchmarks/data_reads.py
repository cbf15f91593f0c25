"""What reading real data costs a rank per step: one rank's shard of a sequence read straight
from the corpus (models/corpus.py) on each layout, and a packed row's doc_lens.

    python benchmarks/data_reads.py                    # N = 16K, P = 4, rank 1, 50 reads
    python benchmarks/data_reads.py --tokens 65536 --world 8

Sources: the default corpus (the Python stdlib's *.py as bytes, files read on demand) and a
synthetic 100 MB uint16 .bin (memory-mapped), written to a temporary folder and removed.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from seqshard.dist import get_layout
from seqshard.models.corpus import open_corpus


def _ms(fn, reps: int) -> float:
    start = time.perf_counter()
    for step in range(reps):
        fn(step)
    return 1e3 * (time.perf_counter() - start) / reps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--reps", type=int, default=50)
    args = p.parse_args()
    n, world = args.tokens, args.world
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ids.bin")
        np.random.default_rng(0).integers(0, 50_000, 50_000_000, dtype=np.uint16).tofile(path)
        for name, cfg, vocab in (("stdlib bytes", {"packed": True}, 256),
                                 ("100 MB .bin", {"path": path}, 50_304)):
            start = time.perf_counter()
            corpus = open_corpus(cfg, vocab, seq_len=n)
            print(f"{name}: open (index / max-id scan) {time.perf_counter() - start:.2f} s")
            for layout in ("contiguous", "zigzag", "striped"):
                pos = get_layout(layout).positions(n, 1, world)
                ms = _ms(lambda s: corpus.batch("train", 1, n, seed=0, step=s, positions=pos),
                         args.reps)
                print(f"  {layout:<10} rank 1 of {world}, N = {n}: {ms:.2f} ms per shard read")
            if corpus.cfg.packed:
                ms = _ms(lambda s: corpus.doc_lens("train", 1, n, seed=0, step=s), args.reps)
                print(f"  doc_lens of one row, N = {n}: {ms:.2f} ms")
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
