"""`seqshard data prepare` and the [data] checks of a job config: a prepared .bin gives the same
batches as reading the text, a local tokenizer (built offline here) encodes each file and its
EOS, and bad data stops `seqshard run` before any worker starts, naming the file and the number;
resuming under other data is refused through resume_meta."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from launch import config
from launch.cli import main
from seqshard.models.corpus import open_corpus


def _texts(tmp_path):
    root = tmp_path / "texts"
    (root / "d").mkdir(parents=True)
    (root / "one.txt").write_text("hello world foo bar\n" * 20)
    (root / "d" / "two.txt").write_text("foo baz hello\n" * 15)
    return root


def test_prepare_bytes_gives_the_same_batches_as_the_text(tmp_path, capsys):
    root = _texts(tmp_path)
    out = tmp_path / "texts.bin"
    assert main(["data", "prepare", str(root), str(out)]) == 0
    assert f"to {out}" in capsys.readouterr().out
    from_bin = open_corpus({"path": str(out), "packed": True}, 256)
    from_text = open_corpus({"path": str(root), "packed": True}, 256)
    assert from_bin.num_tokens("train") == from_text.num_tokens("train")
    where = dict(seed=2, step=1)
    assert torch.equal(from_bin.batch("train", 3, 64, **where),
                       from_text.batch("train", 3, 64, **where))
    assert from_bin.doc_lens("train", 1, 256, **where) == from_text.doc_lens("train", 1, 256,
                                                                             **where)
    # a missing input or a wrong suffix is exit 2 with the path named
    assert main(["data", "prepare", str(tmp_path / "nope"), str(out)]) == 2
    assert "nope' does not exist" in capsys.readouterr().err
    assert main(["data", "prepare", str(root), str(tmp_path / "x.npy")]) == 2
    assert "x.npy' must end in .bin" in capsys.readouterr().err


def test_prepare_with_a_local_tokenizer(tmp_path):
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator(["hello world foo bar baz"],
                              trainers.WordLevelTrainer(special_tokens=["[UNK]", "[EOS]"]))
    folder = tmp_path / "tok"
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]",
                            eos_token="[EOS]").save_pretrained(folder)
    root = _texts(tmp_path)
    out = str(tmp_path / "words.bin")
    from launch.data_cmd import prepare

    info = prepare(str(root), out, tokenizer=str(folder), progress=False)
    ids = np.fromfile(out, dtype=np.uint16)
    vocab = words.get_vocab()
    eos = vocab["[EOS]"]
    want = [vocab[w] for w in ("foo baz hello " * 15).split()] + [eos] + \
        [vocab[w] for w in ("hello world foo bar " * 20).split()] + [eos]
    assert ids.tolist() == want  # d/two.txt sorts before one.txt
    assert info == {"tokens": len(want), "files": 2, "vocab_size": len(vocab), "eos_id": eos,
                    "dtype": "uint16"}
    corpus = open_corpus({"path": out, "tokenizer": str(folder), "packed": True,
                          "eos_id": eos, "heldout_fraction": 0.2}, 64)
    assert corpus.vocab_size == len(vocab) and sum(corpus.doc_lens("train", 1, 40, seed=0, step=0)[0]) == 40
    with pytest.raises(ValueError, match=r"words\.bin' holds token id 6 .* >= vocab_size = 5"):
        open_corpus({"path": out}, 5)


def _job(tmp_path, **data):
    return {"job": {"out": str(tmp_path / "run")}, "mesh": {"workers": 2},
            "model": {"kind": "transformer", "dim": 32, "num_heads": 2},
            "train": {"task": "data", "seq_len": 64, "vocab_size": 256, "steps": 2},
            "data": data}


def test_bad_data_stops_the_job_before_workers_start(tmp_path, capsys):
    text = tmp_path / "small.txt"
    text.write_bytes(b"a few bytes of text\n" * 3)  # 61 bytes: shorter than one sequence
    with pytest.raises(ValueError, match=r"small\.txt' holds 61 tokens, shorter than one "
                                         r"sequence of train\.seq_len = 64"):
        config.build(_job(tmp_path, path=str(text)))
    ids = tmp_path / "ids.bin"
    np.arange(300, dtype=np.uint16).tofile(ids)
    with pytest.raises(ValueError, match=r"ids\.bin' holds token id 299 \(at position 299\) "
                                         r">= vocab_size = 256"):
        config.build(_job(tmp_path, path=str(ids)))
    job = _job(tmp_path, packed=True)
    job["model"]["kind"] = "deltanet"
    with pytest.raises(ValueError, match=r"data\.packed = true: model\.kind = 'deltanet' does "
                                         r"not take packed documents"):
        config.build(job)
    job = _job(tmp_path, packed=True)
    job["train"]["batch_size"] = 2
    with pytest.raises(ValueError, match=r"needs train\.batch_size = 1, got 2"):
        config.build(job)
    # the CLI: exit 2 with the message, before Ray (no output folder is made)
    toml = tmp_path / "job.toml"
    toml.write_text(f'[job]\nout = "{tmp_path / "run"}"\n[model]\nkind = "transformer"\n'
                    f'[train]\ntask = "data"\nvocab_size = 256\nseq_len = 64\n'
                    f'[data]\npath = "{tmp_path / "missing.bin"}"\n')
    assert main(["run", str(toml)]) == 2
    assert "missing.bin' does not exist" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_resume_meta_records_the_data(tmp_path):
    ids = tmp_path / "ids.bin"
    np.arange(3000, dtype=np.uint16).tofile(ids)
    job = _job(tmp_path, path=str(ids), dtype="uint16", heldout_fraction=0.1)
    job["train"]["vocab_size"] = 3000
    meta = config.resume_meta(config.build(job))
    assert meta["data"]["source"] == str(ids) and meta["data"]["tokens"] == 3000
    job["data"]["heldout_fraction"] = 0.5
    assert config.resume_meta(config.build(job))["data"] != meta["data"]
    job["train"]["task"] = "recall"  # no data read: no data recorded (old checkpoints resume)
    assert "data" not in config.resume_meta(config.build(job))
