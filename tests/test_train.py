"""The Trainer through DeepSpeed's engine: a sharded step updates parameters exactly like a
single-process step on the gathered sequences (sp, dp and dp x sp; ZeRO 0-3), checkpoint ->
resume continues the loss curve identically, and the recall task is learned across shards."""

from __future__ import annotations

import math

import pytest
import torch

from tests.harness import mesh, run_ranks

MODEL = dict(dim=48, num_layers=2, num_heads=2, head_dim=24)
TRAIN = dict(batch_size=2, seq_len=24, lr=1e-2, warmup_steps=1, steps=4, weight_decay=0.1,
             grad_clip=0.5, vocab_size=32, recall_pairs=4, recall_queries=3)


def _reference_params(trainer, steps: int) -> dict:
    """Plain torch, one process: the same init, AdamW, schedule and clipping, every replica's
    full sequences, gradients averaged over replicas."""
    from seqshard.dist import Mesh
    from seqshard.models import build_model, recall_batch, sharded_lm_loss
    from seqshard.models.optim import make_optimizer

    tc = trainer.tc
    torch.manual_seed(tc.seed)
    model = build_model(trainer.kind, trainer.model_config, Mesh.single())
    optimizer, scheduler = make_optimizer(model, tc)
    replicas = trainer.mesh.dp_size
    for step in range(steps):
        optimizer.zero_grad()
        total = 0.0
        for replica in range(replicas):
            ids, mask = recall_batch(trainer.task, tc.batch_size, tc.seq_len, seed=tc.seed,
                                     step=step, replica=replica)
            total = total + sharded_lm_loss(model(ids), ids, loss_mask=mask) / replicas
        total.backward()
        if tc.grad_clip > 0:  # 0 = off, as in DeepSpeed
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        scheduler.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


def _engine_matches_reference(rank, world, degrees: dict, zero_stage: int, layout: str,
                              optimizer: str):
    from seqshard.models import Trainer

    m = mesh(**degrees)
    # SGD without clipping: the update is lr * gradient, so a wrong gradient scale (sum vs
    # mean over sp or dp) shows; AdamW and clipping are scale-invariant and would hide it
    extra = {"optimizer": "sgd", "grad_clip": 0.0, "lr": 0.5} if optimizer == "sgd" else {}
    config = dict(TRAIN, zero_stage=zero_stage, layout=layout, **extra)
    trainer = Trainer("transformer", MODEL, config, m)
    losses = [trainer.step()["loss"] for _ in range(2)]
    got = trainer.full_state_dict()
    want = _reference_params(trainer, 2)
    errors = {k: (got[k] - want[k]).abs().max().item() for k in want}
    moved = max((want[k] - v).abs().max().item() for k, v in _initial(trainer).items())
    return losses, max(errors.values()), moved


def _initial(trainer) -> dict:
    from seqshard.dist import Mesh
    from seqshard.models import build_model

    torch.manual_seed(trainer.tc.seed)
    return build_model(trainer.kind, trainer.model_config, Mesh.single()).state_dict()


@pytest.mark.parametrize("world,degrees,zero_stage,layout,optimizer", [
    (2, {}, 0, "zigzag", "sgd"),                # sp = 2
    (2, {"dp": 2}, 2, "contiguous", "sgd"),     # dp = 2
    (4, {"dp": 2}, 3, "zigzag", "sgd"),         # dp 2 x sp 2, ZeRO-3 partitions over all four
    (4, {"ulysses": 2}, 1, "striped", "adamw"),  # sp = 4 as 2 x 2 hybrid, AdamW + clipping
])
def test_engine_step_equals_single_process(world, degrees, zero_stage, layout, optimizer):
    results = run_ranks(_engine_matches_reference, world, degrees, zero_stage, layout, optimizer)
    # AdamW divides by sqrt(v): rounding in near-zero gradients moves a weight by up to ~lr
    tol = 2e-6 if optimizer == "sgd" else 1e-4
    for rank, (losses, err, moved) in enumerate(results):
        assert losses == pytest.approx(results[0][0], abs=1e-6), f"rank {rank}: other loss"
        assert moved > 1e-3, "the parameters did not move: the comparison would be vacuous"
        assert err < tol, f"rank {rank}: parameters differ from the single-process step by {err}"


def _resume(rank, world, directory: str):
    from seqshard.models import Trainer

    m = mesh()
    config = dict(TRAIN, zero_stage=1, steps=5)
    straight = Trainer("transformer", MODEL, config, m)
    curve = [straight.step()["loss"] for _ in range(5)]

    first = Trainer("transformer", MODEL, config, m)
    for _ in range(2):
        first.step()
    first.save(directory)
    resumed = Trainer("transformer", MODEL, config, m)
    resumed.load(directory)
    continued = [resumed.step()["loss"] for _ in range(3)]
    return curve, continued, resumed.step_count


def test_checkpoint_resume_continues_the_loss_curve(tmp_path):
    for curve, continued, step in run_ranks(_resume, 2, str(tmp_path)):
        assert step == 5
        assert continued == pytest.approx(curve[2:], abs=1e-6), (curve, continued)


def _exactness_and_options(rank, world):
    from seqshard.models import Trainer

    m = mesh()
    out = {}
    for kind, extra in (("transformer", {"layout": "zigzag"}),
                        ("transformer", {"dtype": "bf16", "activation_checkpointing": True})):
        trainer = Trainer(kind, MODEL, dict(TRAIN, **extra), m)
        metrics = trainer.step()
        out[str(extra)] = (trainer.exactness_check(16), metrics)
    return out


def test_exactness_check_and_bf16_checkpointed_step():
    for results in run_ranks(_exactness_and_options, 2):
        for name, (err, metrics) in results.items():
            assert err < 5e-5, f"{name}: sharded vs unsharded differ by {err}"
            assert math.isfinite(metrics["loss"]) and metrics["loss"] > 0
            assert metrics["tokens"] == TRAIN["batch_size"] * TRAIN["seq_len"]
            assert metrics["peak_mem_bytes"] > 0 and metrics["step"] == 1


def test_bad_configs_raise():
    from seqshard.models import make_config, make_train_config

    with pytest.raises(ValueError, match="zero_stage=5"):
        make_train_config({"zero_stage": 5})
    with pytest.raises(ValueError, match=r"unknown config key\(s\) stpes \(did you mean steps\?\)"):
        make_train_config({"stpes": 3})
    # the knob that named two things: the error names both new keys
    with pytest.raises(ValueError, match="piece_tokens .renamed: tokenwise_piece_tokens .*"
                                         "mixer_piece_tokens"):
        make_config("deltanet", {"piece_tokens": 3})
    with pytest.raises(ValueError, match="mixer_piece_tokens=-1"):
        make_config("deltanet", {"mixer_piece_tokens": -1})
    with pytest.raises(ValueError, match="strategy='spiral'"):
        make_config("transformer", {"strategy": "spiral"})
    with pytest.raises(ValueError, match="kind='rnn'"):
        make_config("rnn", {})


RECALL_MODEL = dict(dim=64, num_layers=2, num_heads=2, chunk_size=8)
RECALL_TRAIN = dict(batch_size=32, seq_len=32, lr=3e-3, warmup_steps=10, steps=200,
                    vocab_size=32, recall_pairs=4, recall_queries=4)


def _train_recall(rank, world):
    from seqshard.models import Trainer

    m = mesh()
    trainer = Trainer("deltanet", RECALL_MODEL, RECALL_TRAIN, m)
    # the evidence crosses the border: every key-value pair lives on rank 0, every query on 1
    ids, answers = trainer.global_batch(0)
    pairs_end = 2 * RECALL_TRAIN["recall_pairs"]
    owner = torch.arange(RECALL_TRAIN["seq_len"]) // (RECALL_TRAIN["seq_len"] // world)
    assert set(owner[:pairs_end].tolist()) == {0}
    assert set(owner[answers[0]].tolist()) == {world - 1}
    accuracy = [trainer.step()["accuracy"] for _ in range(RECALL_TRAIN["steps"])]
    return sum(accuracy[:10]) / 10, sum(accuracy[-20:]) / 20, trainer.task.chance()


def test_recall_is_learned_across_shards():
    for start, end, chance in run_ranks(_train_recall, 2):
        assert start < 2 * chance, f"untrained accuracy {start} is already far above chance"
        assert end > 0.6 and end > 2.4 * chance, f"recall accuracy {end} (chance {chance})"
