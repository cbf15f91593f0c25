"""Evaluation: loss by position against the unsharded model, passkey samples and scoring."""

from __future__ import annotations

import math

import pytest
import torch

from tests.harness import mesh, run_ranks

MODEL = {"vocab_size": 256, "dim": 32, "num_layers": 2, "num_heads": 2, "layout": "zigzag",
         "tokenwise_piece_tokens": 5}


def _source(length, index, positions):
    g = torch.Generator().manual_seed(100 + index)
    return torch.randint(0, 256, (1, length), generator=g)[:, positions]  # [1, N_local]


class Forced(torch.nn.Module):
    """A 'model' whose greedy predictions are the targets (right) or targets + 1 (wrong)."""

    def __init__(self, right: bool):
        super().__init__()
        self.right = right

    def forward(self, ids, targets, mask):
        return torch.zeros(()), targets if self.right else targets + 1


def _loss_by_position(rank, world, length, samples, buckets):
    import torch.nn.functional as F

    from seqshard.dist import Mesh
    from seqshard.models import build_model
    from seqshard.models.evaluate import bucket_edges, loss_by_position

    m = mesh() if world > 1 else Mesh.single()
    torch.manual_seed(0)
    model = build_model("transformer", MODEL, m).eval()
    reference = build_model("transformer", MODEL, Mesh.single()).eval()
    reference.load_state_dict(model.state_dict())
    got = loss_by_position(model, m, "zigzag", _source, length, samples, buckets, piece_tokens=5)
    # the unsharded per-position loss, bucketed by hand
    everything = torch.arange(length)
    losses = []
    with torch.no_grad():
        for index in range(samples):
            ids = _source(length, index, everything)
            logits = reference(ids)[0, :-1]  # [N - 1, V]
            losses.append(F.cross_entropy(logits, ids[0, 1:], reduction="none"))
    losses = torch.stack(losses)  # [samples, N - 1]
    edges = bucket_edges(length, buckets)
    assert [(r["start"], r["end"]) for r in got] == list(zip(edges[:-1], edges[1:]))
    for r in got:
        part = losses[:, r["start"]:r["end"]]
        assert r["tokens"] == part.numel()
        assert abs(r["loss"] - float(part.mean())) < 1e-5, (r, float(part.mean()))
    return [r["loss"] for r in got]


@pytest.mark.parametrize("world", [1, 2])
def test_loss_by_position_equals_the_unsharded_loss_bucketed(world):
    if world == 1:
        results = [_loss_by_position(0, 1, 24, 2, 4)]
    else:
        results = run_ranks(_loss_by_position, world, 24, 2, 4)
    assert all(r == results[0] for r in results)  # the same numbers on every rank
    assert all(math.isfinite(x) for x in results[0])


def test_bucket_edges_are_log_spaced_and_cover_every_scored_position():
    from seqshard.models.evaluate import bucket_edges

    assert bucket_edges(64, 4) == [0, 1, 4, 16, 63]
    assert bucket_edges(1024, 6) == [0, 1, 4, 16, 64, 256, 1023]
    assert bucket_edges(3, 8) == [0, 1, 2]  # short sequences merge buckets
    assert bucket_edges(10, 1) == [0, 9]
    # longer lengths continue the training length's grid, so the buckets line up
    assert bucket_edges(256, 4, base_length=64) == [0, 1, 4, 16, 63, 251, 255]
    assert bucket_edges(255, 8)[:4] == bucket_edges(1024, 8, base_length=255)[:4]
    with pytest.raises(ValueError, match="lengths >= 2, got 1"):
        bucket_edges(1, 4)


def test_passkey_sample_in_bytes():
    from seqshard.models.passkey import PasskeyTokens, passkey_shard

    tokens = PasskeyTokens.for_vocab(256)
    n = 128
    filler = torch.full((1, n), ord("."))
    ids, answer = passkey_shard(filler, torch.arange(n), n, 0.5, [3, 1, 4], tokens)
    text = bytes(ids[0].tolist())
    assert text.endswith(b" What is the pass key? The pass key is 314")
    needle = b"The pass key is 314. Remember it. "
    room = n - len(needle) - len(b" What is the pass key? The pass key is 314")
    assert text.index(needle) == round(0.5 * room)
    assert answer[0].nonzero().flatten().tolist() == [n - 4, n - 3, n - 2]  # predict 3, 1, 4
    with pytest.raises(ValueError, match="shorter than the needle"):
        passkey_shard(filler[:, :40], torch.arange(40), 40, 0.5, [3, 1, 4], tokens)
    with pytest.raises(ValueError, match="depth = 1.5"):
        passkey_shard(filler, torch.arange(n), n, 1.5, [3, 1, 4], tokens)
    small = PasskeyTokens.for_vocab(32)
    assert small.digits == tuple(range(10)) and max(small.intro) == 31
    with pytest.raises(ValueError, match="vocab_size = 8"):
        PasskeyTokens.for_vocab(8)


def _passkey_sharded(rank, world):
    from seqshard.dist import get_layout
    from seqshard.models.evaluate import passkey_accuracy, passkey_correct
    from seqshard.models.loss import next_token_targets
    from seqshard.models.passkey import PasskeyTokens, passkey_shard

    m, layout, n = mesh(), get_layout("zigzag"), 96
    tokens = PasskeyTokens.for_vocab(256)
    full_filler = torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(3))
    whole, whole_answer = passkey_shard(full_filler, torch.arange(n), n, 0.3, [9, 0, 7], tokens)
    positions = layout.positions(n, m.rank, m.size)
    ids, answer = passkey_shard(full_filler[:, positions], positions, n, 0.3, [9, 0, 7], tokens)
    # every rank's shard is the shard of the whole sample
    assert torch.equal(ids, layout.shard(whole, 1, m.rank, m.size))
    assert torch.equal(answer, layout.shard(whole_answer, 1, m.rank, m.size))
    targets = next_token_targets(ids, m, layout=layout)
    right = passkey_correct(targets, targets, answer, m)
    # wrong digits on the rank that holds the answer (rank 0 under zigzag): wrong on every rank
    wrong_pred = targets.clone()
    wrong_pred[answer] += 1
    held = bool(answer.any())
    wrong = passkey_correct(wrong_pred, targets, answer, m)
    outcomes = []
    for forced in (True, False):
        records = passkey_accuracy(Forced(forced), m, layout, _source, tokens, n, (0.0, 1.0),
                                   trials=2, digits=4, seed=0)
        outcomes.append([(r["depth"], r["accuracy"], r["samples"]) for r in records])
    return bool(right.all()), bool(wrong.any()), held, outcomes


def test_passkey_shards_and_scoring_on_two_zigzag_ranks():
    results = run_ranks(_passkey_sharded, 2)
    assert [held for _, _, held, _ in results] == [True, False]  # the answer sits on rank 0
    for right, wrong, _, (forced_right, forced_wrong) in results:
        assert right and not wrong
        assert forced_right == [(0.0, 1.0, 2), (1.0, 1.0, 2)]
        assert forced_wrong == [(0.0, 0.0, 2), (1.0, 0.0, 2)]


def test_eval_config_names_bad_values():
    from seqshard.models.evaluate import EvalConfig
    from seqshard.models.fill import fill

    assert fill(EvalConfig, {"lengths": [1, 2]}, "eval").lengths == (1, 2)
    with pytest.raises(ValueError, match=r"eval.lengths = \[1, 0\]"):
        fill(EvalConfig, {"lengths": [1, 0]}, "eval")
    with pytest.raises(ValueError, match="eval.passkey_depths"):
        fill(EvalConfig, {"passkey_depths": [0.5, 2.0]}, "eval")
    with pytest.raises(ValueError, match="eval.passkey_trials = 0"):
        fill(EvalConfig, {"passkey_trials": 0}, "eval")


def _evaluate_real_data(rank, world, text: str, bin_path: str):
    from seqshard.models import Trainer
    from seqshard.models.evaluate import EvalConfig, evaluate

    train = dict(batch_size=1, seq_len=32, steps=1, vocab_size=256, task="data",
                 layout="zigzag")
    small = dict(dim=16, num_layers=1, num_heads=2, vocab_size=256)
    cfg = EvalConfig(lengths=(1, 2), samples=1, buckets=3, passkey_lengths=(2, 4),
                     passkey_depths=(0.5,), passkey_trials=2, passkey_digits=3)
    on_text = evaluate(Trainer("transformer", small, train, mesh(), data={"path": text}), cfg)
    on_bin = evaluate(Trainer("transformer", small, dict(train, vocab_size=64), mesh(),
                              data={"path": bin_path, "heldout_fraction": 0.2}), cfg)
    return on_text, on_bin


def test_evaluation_reads_the_held_out_text_and_skips_passkeys_on_token_ids(tmp_path):
    import numpy as np

    text = tmp_path / "t.txt"
    text.write_bytes(b"def f(x):\n    return x + 1\n" * 800)  # ~22 KB: 1% held out > 64
    bin_path = tmp_path / "ids.bin"
    np.arange(4000, dtype=np.uint16).__mod__(60).tofile(bin_path)
    for on_text, on_bin in run_ranks(_evaluate_real_data, 2, str(text), str(bin_path)):
        loss = [r for r in on_text if r.get("metric") == "loss_by_position"]
        assert {r["length"]: 0 for r in loss} == {32: 0, 64: 0}
        assert sum(r["tokens"] for r in loss if r["length"] == 64) == 63
        assert all(math.isfinite(r["loss"]) for r in loss)
        (passkey,) = [r for r in on_text if r.get("metric") == "passkey"]
        assert (passkey["length"], passkey["samples"]) == (128, 2)
        assert [r for r in on_text if r["type"] == "eval_skipped"] == [{
            "type": "eval_skipped",
            "reason": "passkey at 2 x train.seq_len = 64 tokens skipped: a 3-digit key needs 77"}]
        assert on_bin[0]["type"] == "eval_skipped" and "tokenizer ids" in on_bin[0]["reason"]
        assert not [r for r in on_bin if r.get("metric") == "passkey"]
        assert [r for r in on_bin if r.get("metric") == "loss_by_position"]


WORDS = "[UNK] [EOS] The pass key is Remember it What the def return x f ( ) : + = . ?".split()


def _tokenizer(folder, digits="0123456789"):
    """A tiny word-level Hugging Face tokenizer saved in `folder` (built here, nothing
    downloaded): one id per word, punctuation mark and digit."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS + list(digits))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")
    fast.save_pretrained(str(folder))
    return str(folder)


def test_passkey_sample_in_a_tokenizers_ids(tmp_path):
    pytest.importorskip("transformers")
    from seqshard.models.passkey import PasskeyTokens, passkey_shard
    from seqshard.models.tokenizer import load_tokenizer

    tok = load_tokenizer(_tokenizer(tmp_path / "tok"))
    tokens = PasskeyTokens.for_tokenizer(tok)
    assert tokens.digits == tuple(tok.convert_tokens_to_ids(list("0123456789")))
    n = 60
    filler = torch.tensor([tok.encode("def f ( x ) : return x + 1 " * 6)[:n]])  # [1, 60]
    ids, answer = passkey_shard(filler, torch.arange(n), n, 0.5, [4, 0, 7], tokens)
    assert ids.shape == (1, n)  # exact in tokens: the overlays replace filler one for one
    text = tok.decode(ids[0].tolist())
    assert "The pass key is 4 0 7 . Remember it ." in text
    assert text.endswith("What is the pass key ? The pass key is 4 0 7")
    # scored by the key's ids: the positions whose next token is a key digit
    scored = answer[0].nonzero().flatten()
    assert scored.tolist() == [n - 4, n - 3, n - 2]
    assert ids[0, scored + 1].tolist() == [tokens.digits[d] for d in (4, 0, 7)]
    with pytest.raises(ValueError, match="id 30 >= the model's vocab_size = 16"):
        tokens.check_vocab(16, "the test tokenizer")
    no_seven = load_tokenizer(_tokenizer(tmp_path / "no7", digits="012345689"))
    with pytest.raises(ValueError, match="no single token for the digit '7'"):
        PasskeyTokens.for_tokenizer(no_seven)
    with pytest.raises(ValueError, match="eval.tokenizer '/nowhere' is not a folder"):
        from seqshard.models.evaluate import EvalConfig

        EvalConfig(tokenizer="/nowhere")


def _evaluate_tokenized(rank, world, bin_path: str, folder: str):
    from seqshard.models import Trainer
    from seqshard.models.evaluate import EvalConfig, evaluate, passkey_tokens
    from seqshard.models.passkey import PasskeyTokens
    from seqshard.models.tokenizer import load_tokenizer

    train = dict(batch_size=1, seq_len=32, steps=1, vocab_size=32, task="data", layout="zigzag")
    small = dict(dim=16, num_layers=1, num_heads=2, vocab_size=32)
    cfg = EvalConfig(lengths=(), passkey_lengths=(1, 2), passkey_depths=(0.0, 1.0),
                     passkey_trials=1, passkey_digits=3)
    out = {}
    for name, data, eval_tokenizer in (("data", {"tokenizer": folder}, ""),
                                       ("eval", {}, folder), ("none", {}, "")):
        trainer = Trainer("transformer", small, train, mesh(),
                          data={"path": bin_path, "heldout_fraction": 0.2, **data})
        tokens, _ = passkey_tokens(trainer, eval_tokenizer)
        expected = PasskeyTokens.for_tokenizer(load_tokenizer(folder))
        out[name] = (tokens == expected if tokens else None,
                     evaluate(trainer, EvalConfig(**{**cfg.__dict__, "tokenizer": eval_tokenizer})))
    return out


def test_evaluation_writes_passkeys_on_tokenized_data_in_the_tokenizers_ids(tmp_path):
    pytest.importorskip("transformers")
    from seqshard.launch.data_cmd import prepare

    folder = _tokenizer(tmp_path / "tok")
    text = tmp_path / "t.txt"
    text.write_text("def f ( x ) : return x + 1 = 2 . \n" * 200)
    bin_path = str(tmp_path / "ids.bin")
    prepare(str(text), bin_path, tokenizer=folder, progress=False)
    for out in run_ranks(_evaluate_tokenized, 2, bin_path, folder):
        for name in ("data", "eval"):  # the tokenizer named by [data], or by [eval]
            same, records = out[name]
            assert same
            passkey = [r for r in records if r.get("metric") == "passkey"]
            assert [(r["length"], r["depth"], r["samples"]) for r in passkey] == [
                (32, 0.0, 1), (32, 1.0, 1), (64, 0.0, 1), (64, 1.0, 1)]
            assert not [r for r in records if r["type"] == "eval_skipped"]
        same, records = out["none"]
        assert same is None and records[0]["type"] == "eval_skipped"
        assert "neither data.tokenizer nor eval.tokenizer" in records[0]["reason"]
