"""Real-text data (models/corpus.py, models/sources.py): every source reads the bytes / ids on
disk, a rank's shard read equals the full batch sharded on every layout, sampling depends on
(seed, step, replica) only, the held-out split is never trained on, packed rows give their
documents' lengths, bad data fails with the file and the number, and a 2-rank Trainer trains
on a tiny .bin and resumes identically."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seqshard.dist import get_layout
from seqshard.models.corpus import DataConfig, open_corpus
from tests.harness import mesh, run_ranks


def _bin(tmp_path, ids, dtype="uint16", name="tokens.bin"):
    path = tmp_path / name
    np.asarray(ids, dtype=dtype).tofile(path)
    return str(path)


def _folder(tmp_path):
    root = tmp_path / "texts"
    (root / "sub").mkdir(parents=True)
    texts = {"a.txt": b"first file\n" * 7, "sub/b.py": b"print('b')\n" * 11,
             "c.md": "caf\u00e9 \u2603\n".encode() * 5}
    for name, data in texts.items():
        (root / name).write_bytes(data)
    (root / ".hidden").write_bytes(b"never read")
    # sorted by relative path, each file then one separator byte 0
    stream = b"".join(texts[n] + b"\0" for n in sorted(texts))
    return str(root), stream, [len(texts[n]) + 1 for n in sorted(texts)]


def _rows(corpus, split, b, n, **where):
    return [bytes(row) if corpus.vocab_size == 256 else row
            for row in corpus.batch(split, b, n, **where).tolist()]


def test_every_source_reads_what_is_on_disk(tmp_path):
    ids16 = np.arange(3000) % 997
    ids32 = (np.arange(3000) * 7919) % 100_003
    for ids, dtype, vocab in ((ids16, "uint16", 1000), (ids32, "uint32", 100_003)):
        corpus = open_corpus({"path": _bin(tmp_path, ids, dtype), "dtype": dtype}, vocab)
        for start, row in zip(corpus.starts("train", 3, 64, seed=1, step=2),
                              corpus.batch("train", 3, 64, seed=1, step=2)):
            assert row.dtype == torch.int64 and row.tolist() == ids[start: start + 64].tolist()
        assert corpus.read("heldout", 0, 5).tolist() == ids[-30:-25].tolist()

    text = tmp_path / "one.txt"
    text.write_bytes(b"abcdefghij" * 50)
    root, stream, _ = _folder(tmp_path)
    for path, want in ((str(text), b"abcdefghij" * 50 + b"\0"), (root, stream)):
        corpus = open_corpus({"path": path, "heldout_fraction": 0.1}, 256)
        assert corpus.vocab_size == 256
        assert corpus.num_tokens("train") + corpus.num_tokens("heldout") == len(want)
        starts = corpus.starts("train", 4, 40, seed=0, step=5)
        for start, row in zip(starts, _rows(corpus, "train", 4, 40, seed=0, step=5)):
            assert row == want[start: start + 40]

    stdlib = open_corpus({}, 256, seq_len=4096)
    assert stdlib.num_tokens("train") > 5_000_000, "the stdlib corpus should be tens of MB"
    row = bytes(stdlib.batch("train", 1, 4096, seed=0, step=0)[0].tolist())
    assert b"def " in row or b"import " in row or b"class " in row, row[:200]


def test_shard_reads_equal_the_full_batch_sharded(tmp_path):
    root, _, _ = _folder(tmp_path)
    sources = [open_corpus({"path": _bin(tmp_path, np.arange(5000) % 251)}, 256),
               open_corpus({"path": root, "heldout_fraction": 0.3}, 256)]
    n, where = 48, dict(seed=3, step=7, replica=1)
    for corpus in sources:
        for split in ("train", "heldout"):
            full = corpus.batch(split, 2, n, **where)  # [B, N]
            for name in ("contiguous", "zigzag", "striped"):
                layout = get_layout(name)
                for world in (1, 2, 4):
                    for rank in range(world):
                        got = corpus.batch(split, 2, n, positions=layout.positions(n, rank, world),
                                           **where)
                        want = layout.shard(full, 1, rank, world)
                        assert torch.equal(got, want), (corpus.name, split, name, world, rank)


def test_sampling_is_deterministic_and_heldout_is_disjoint(tmp_path):
    corpus = open_corpus({"path": _bin(tmp_path, np.arange(20_000) % 500),
                          "heldout_fraction": 0.05}, 512)
    train_len = corpus.num_tokens("train")
    assert train_len == 19_000 and corpus.num_tokens("heldout") == 1_000
    n = 100
    a = corpus.batch("train", 4, n, seed=0, step=3, replica=1)
    assert torch.equal(a, corpus.batch("train", 4, n, seed=0, step=3, replica=1))
    for other in (dict(seed=1, step=3, replica=1), dict(seed=0, step=4, replica=1),
                  dict(seed=0, step=3, replica=0)):
        assert not torch.equal(a, corpus.batch("train", 4, n, **other)), other
    train = [s for step in range(300) for s in corpus.starts("train", 4, n, seed=0, step=step)]
    held = [s for step in range(300) for s in corpus.starts("heldout", 4, n, seed=0, step=step)]
    assert max(train) + n <= train_len and min(train) >= 0
    assert min(held) >= train_len and max(held) + n <= 20_000
    assert max(train) > train_len - 3 * n, "sampling should reach the end of the train split"


def test_packed_doc_lens_follow_the_separators(tmp_path):
    root, stream, sizes = _folder(tmp_path)
    corpus = open_corpus({"path": root, "packed": True, "heldout_fraction": 0.1}, 256)
    ends = np.cumsum(sizes)  # a document ends after each file's separator byte
    n = 96
    for step in range(5):
        (start,) = corpus.starts("train", 1, n, seed=0, step=step)
        (lens,) = corpus.doc_lens("train", 1, n, seed=0, step=step)
        inside = [int(e) - start for e in ends if start < e < start + n]
        assert lens == np.diff([0, *inside, n]).tolist(), (start, lens)
        assert sum(lens) == n
    newline = open_corpus({"path": root, "packed": True, "eos_id": 10,
                           "heldout_fraction": 0.1}, 256)
    (lens,) = newline.doc_lens("train", 1, 40, seed=0, step=0)
    (row,) = _rows(newline, "train", 1, 40, seed=0, step=0)
    assert lens == [len(p) + 1 for p in row.split(b"\n")[:-1]] + (
        [len(row.split(b"\n")[-1])] if not row.endswith(b"\n") else [])


def test_bad_data_names_the_file_and_the_number(tmp_path):
    short = _bin(tmp_path, np.arange(50), name="short.bin")
    with pytest.raises(ValueError, match=r"'.*missing\.bin' does not exist"):
        open_corpus({"path": str(tmp_path / "missing.bin")}, 256)
    with pytest.raises(ValueError, match=r"'.*nowhere' does not exist"):
        open_corpus({"path": str(tmp_path / "nowhere")}, 256)
    with pytest.raises(ValueError, match=r"short\.bin' holds 50 tokens, shorter than one "
                                         r"sequence of train\.seq_len = 64"):
        open_corpus({"path": short}, 256, seq_len=64)
    with pytest.raises(ValueError, match=r"short\.bin': its heldout split .* holds 5 tokens, "
                                         r"fewer than one sequence of train\.seq_len = 16"):
        open_corpus({"path": short, "heldout_fraction": 0.1}, 256, seq_len=16)
    big = _bin(tmp_path, [1, 2, 70_000, 3], "uint32", name="big.bin")
    with pytest.raises(ValueError, match=r"big\.bin' holds token id 70000 \(at position 2\) "
                                         r">= vocab_size = 50000"):
        open_corpus({"path": big, "dtype": "uint32"}, 50_000)
    with pytest.raises(ValueError, match=r"odd\.bin' has 102 bytes, not a whole number of "
                                         r"uint32 ids"):
        open_corpus({"path": _bin(tmp_path, np.arange(51), name="odd.bin"),
                     "dtype": "uint32"}, 256)
    text = tmp_path / "t.txt"
    text.write_bytes(b"x" * 100)
    with pytest.raises(ValueError, match=r"t\.txt' is read as bytes .* needs vocab_size >= "
                                         r"256, got train\.vocab_size = 64"):
        open_corpus({"path": str(text)}, 64)
    with pytest.raises(ValueError, match=r"data\.packed = true needs train\.batch_size = 1, "
                                         r"got 2"):
        open_corpus({"path": str(text), "packed": True}, 256, batch_size=2)
    with pytest.raises(ValueError, match=r"seqshard data prepare .*t\.txt OUT\.bin"):
        open_corpus({"path": str(text), "tokenizer": str(tmp_path)}, 256)
    with pytest.raises(ValueError, match=r"data\.eos_id = 300 is not an id of '.*t\.txt' "
                                         r"\(vocab_size = 256\)"):
        open_corpus({"path": str(text), "packed": True, "eos_id": 300}, 512)
    with pytest.raises(ValueError, match=r"data\.dtype = 'int8'"):
        DataConfig(dtype="int8")
    with pytest.raises(ValueError, match=r"data\.heldout_fraction = 1\.5"):
        DataConfig(heldout_fraction=1.5)
    with pytest.raises(ValueError, match=r"unknown config key\(s\) data\.paht"):
        open_corpus({"paht": "x"}, 256)
    from seqshard.models import Trainer

    with pytest.raises(ValueError, match=r"train\.task = 'data' needs the \[data\] section"):
        Trainer("transformer", MODEL, TRAIN)  # refused before any process group or engine


MODEL = dict(dim=32, num_layers=2, num_heads=2)
TRAIN = dict(batch_size=1, seq_len=32, lr=1e-2, warmup_steps=1, steps=6, vocab_size=32,
             task="data", layout="zigzag", zero_stage=1)


def _train_on_bin(rank, world, path: str, directory: str):
    from seqshard.models import Trainer
    from seqshard.models.loss import sharded_lm_loss

    m = mesh()
    data = {"path": path, "packed": True, "eos_id": 0, "heldout_fraction": 0.2}
    straight = Trainer("transformer", MODEL, TRAIN, m, data=data)
    # the first step's loss equals an unsharded copy's on the full sequence, cut into the
    # same documents: the shard read and doc_lens are those of the full batch
    ids, _ = straight.global_batch(0)
    (lens,) = straight.corpus.doc_lens("train", 1, TRAIN["seq_len"], seed=0, step=0)
    from seqshard.dist import Mesh
    from seqshard.models import build_model

    torch.manual_seed(0)
    reference = build_model("transformer", straight.model_config, Mesh.single())
    want = float(sharded_lm_loss(reference(ids, doc_lens=lens), ids))
    curve = [straight.step()["loss"] for _ in range(3)]
    straight.save(directory)  # saving changes nothing: the run goes on as if unsaved
    curve += [straight.step()["loss"] for _ in range(3)]
    resumed = Trainer("transformer", MODEL, TRAIN, m, data=data)
    resumed.load(directory)
    continued = [resumed.step()["loss"] for _ in range(3)]
    other = Trainer("transformer", MODEL, TRAIN, m, data=dict(data, heldout_fraction=0.3))
    try:
        other.load(directory)
        refused = ""
    except ValueError as err:
        refused = str(err)
    return want, curve, continued, refused, lens


def test_two_rank_training_on_a_bin_resumes_identically(tmp_path):
    # documents of a repeated pattern separated by 0: learnable, so the loss must fall
    rng = np.random.default_rng(0)
    docs = [np.r_[np.arange(1, 1 + k) % 31 + 1, 0] for k in rng.integers(5, 20, 200)]
    path = _bin(tmp_path, np.concatenate(docs))
    (tmp_path / "ckpt").mkdir()
    for want, curve, continued, refused, lens in run_ranks(_train_on_bin, 2, path,
                                                           str(tmp_path / "ckpt")):
        assert len(lens) > 1, "the sequence should hold several documents"
        assert curve[0] == pytest.approx(want, abs=1e-5)
        assert curve[-1] < curve[0] - 0.3, curve
        assert continued == pytest.approx(curve[3:], abs=1e-6), (curve, continued)
        assert "trained on data" in refused and "heldout_fraction" in refused
