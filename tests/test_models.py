"""Each language model, sharded on 1, 2 and 4 gloo ranks, against the same model run unsharded
on the gathered sequence: loss, this rank's logits and every parameter gradient (summed over
the sp group, as the Trainer does)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.common import assert_close
from tests.harness import mesh, run_ranks

TOL = {"loss": 2e-5, "logits": 5e-5, "grad": 5e-5}


def _compare_model(kind: str, config: dict, m, *, batch: int, seq_len: int, seed: int) -> int:
    """Sharded vs unsharded model of `kind`; returns the number of gradients compared."""
    from seqshard.dist import Mesh, get_layout
    from seqshard.models import build_model, sharded_lm_loss

    layout = get_layout(config.get("layout", "contiguous"))
    torch.manual_seed(seed)
    sharded = build_model(kind, config, m)
    reference = build_model(kind, config, Mesh.single())
    reference.load_state_dict(sharded.state_dict())
    vocab = sharded.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    ids_local = layout.shard(ids, 1, m.rank, m.size)

    logits = sharded(ids_local)  # [B, N_local, V]
    loss = sharded_lm_loss(logits, ids_local, m, layout=layout)
    loss.backward()
    full_logits = reference(ids)  # [B, N, V]
    full_loss = sharded_lm_loss(full_logits, ids)
    full_loss.backward()

    tag = f"{kind} P={m.size} {layout.name} {config.get('strategy', '')}"
    assert_close(f"{tag} loss", full_loss.detach(), loss.detach(), TOL["loss"])
    assert_close(f"{tag} logits", layout.shard(full_logits.detach(), 1, m.rank, m.size),
                 logits.detach(), TOL["logits"])
    ref_params = dict(reference.named_parameters())
    compared = 0
    for name, p in sharded.named_parameters():
        assert p.grad is not None, f"{tag}: {name} got no gradient"
        grad = p.grad.clone()
        if m.size > 1:
            dist.all_reduce(grad, group=m.group)  # the exact gradient is the sum over sp
        assert_close(f"{tag} grad {name}", ref_params[name].grad, grad, TOL["grad"])
        compared += 1
    return compared


TRANSFORMER = dict(vocab_size=61, dim=96, num_layers=2, num_heads=2, num_kv_heads=1,
                   head_dim=48)


def _transformer_cases(rank, world, cases):
    counts = []
    for degrees, layout, strategy, seq_len in cases:
        m = mesh(**degrees)
        config = dict(TRANSFORMER, layout=layout, strategy=strategy)
        counts.append(_compare_model("transformer", config, m, batch=2, seq_len=seq_len,
                                     seed=len(counts)))
    return counts


def test_transformer_one_rank():
    counts = run_ranks(_transformer_cases, 1, [({}, "contiguous", "auto", 13)])
    assert counts[0][0] == 2 + 2 * 9 + 1  # embed, head, final norm + 9 per block


def test_transformer_two_ranks():
    cases = [({}, "contiguous", "ring", 14), ({}, "zigzag", "ring", 20),
             ({}, "striped", "allgather", 18), ({"ulysses": 2}, "zigzag", "ulysses", 12)]
    counts = run_ranks(_transformer_cases, 2, cases)
    assert all(c == [21] * len(cases) for c in counts)


def test_transformer_four_ranks():
    cases = [({}, "zigzag", "ring", 24), ({"ulysses": 2, "ring": 2}, "contiguous", "hybrid", 20)]
    counts = run_ranks(_transformer_cases, 4, cases)
    assert all(c == [21] * len(cases) for c in counts)


DELTANET = dict(vocab_size=61, dim=96, num_layers=2, num_heads=2, head_dim=48, chunk_size=4)
FIT_LM = dict(vocab_size=61, dim=96, num_layers=2, num_heads=2, group_size=3, num_latents=2)


def _recurrent_cases(rank, world, cases):
    counts = []
    for kind, config, seq_len in cases:
        counts.append(_compare_model(kind, config, mesh(), batch=2, seq_len=seq_len,
                                     seed=len(counts)))
    return counts


RECURRENT = [
    ("deltanet", DELTANET, 28),
    ("deltanet", dict(DELTANET, attn_layers=(1,), use_gate=True, schedule="pass",
                      activation_checkpointing=True), 18),
    ("fit", FIT_LM, 24),
    ("fit", dict(FIT_LM, activation_checkpointing=True), 12),
    ("transformer", dict(TRANSFORMER, layout="zigzag", activation_checkpointing=True), 16),
]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_deltanet_fit_and_checkpointing(world):
    cases = RECURRENT if world < 4 else RECURRENT[::2]
    for counts in run_ranks(_recurrent_cases, world, cases):
        assert len(counts) == len(cases) and min(counts) > 10


def _bad_inputs(rank, world):
    from seqshard.models import build_model

    with pytest.raises(ValueError, match="layout='zigzag'"):  # FIT's groups: contiguous only
        build_model("fit", dict(FIT_LM, layout="zigzag"), mesh())
    fit = build_model("fit", FIT_LM, mesh())
    with pytest.raises(ValueError, match="group_size=3"):
        fit(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids must be"):
        fit(torch.zeros(4, dtype=torch.long))
    return True


def test_bad_inputs_raise():
    assert run_ranks(_bad_inputs, 2) == [True, True]


def _loss_path_cases(rank, world, cases):
    """The models' loss path (head + loss in pieces, MLPs / FIT group-local parts in pieces,
    recomputed in backward) against the plain path of an unsharded copy: loss, predictions,
    every parameter gradient."""
    from seqshard.dist import Mesh, get_layout
    from seqshard.models import build_model, next_token_targets, sharded_lm_loss

    m = mesh()
    compared = []
    for seed, (kind, config, seq_len) in enumerate(cases):
        layout = get_layout(config.get("layout", "contiguous"))
        torch.manual_seed(seed)
        sharded = build_model(kind, config, m)
        reference = build_model(kind, dict(config, tokenwise_piece_tokens=8192), Mesh.single())
        reference.load_state_dict(sharded.state_dict())
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, sharded.config.vocab_size, (2, seq_len), generator=gen)
        mask = torch.rand(2, seq_len, generator=gen) > 0.3  # loss on some positions only
        ids_local, mask_local = (layout.shard(t, 1, m.rank, m.size) for t in (ids, mask))

        targets = next_token_targets(ids_local, m, layout=layout)
        loss, predictions = sharded(ids_local, targets, mask_local)  # [], [B, N_local]
        loss.backward()
        full_logits = reference(ids)  # [B, N, V]
        full_loss = sharded_lm_loss(full_logits, ids, loss_mask=mask)
        full_loss.backward()

        tag = f"{kind} P={m.size} pieces={config['tokenwise_piece_tokens']}"
        assert_close(f"{tag} loss", full_loss.detach(), loss.detach(), TOL["loss"])
        local_logits = layout.shard(full_logits.detach(), 1, m.rank, m.size)
        chosen = local_logits.gather(-1, predictions[..., None])[..., 0]  # [B, N_local]
        assert_close(f"{tag} predictions are argmax", local_logits.amax(-1), chosen, TOL["logits"])
        ref_params = dict(reference.named_parameters())
        for name, p in sharded.named_parameters():
            grad = p.grad.clone()
            if m.size > 1:
                dist.all_reduce(grad, group=m.group)
            assert_close(f"{tag} grad {name}", ref_params[name].grad, grad, TOL["grad"])
        compared.append(len(ref_params))

    from seqshard.models.tokenwise import in_pieces, lm_loss_in_pieces

    with pytest.raises(ValueError, match="piece_tokens=0"):
        in_pieces(torch.nn.Identity(), torch.zeros(1, 4, 8), 0)
    with pytest.raises(ValueError, match=r"hidden \(1, 5, 8\) does not match"):
        lm_loss_in_pieces(torch.zeros(1, 5, 8), torch.nn.Linear(8, 3), torch.zeros(1, 4).long())
    return compared


PIECE_CASES = [
    # pieces of 3 tokens: odd, so pieces end inside a shard and the last one is short
    ("deltanet", dict(DELTANET, tokenwise_piece_tokens=3, activation_checkpointing=True), 26),
    ("deltanet", dict(DELTANET, tokenwise_piece_tokens=5, attn_layers=(0,)), 22),
    # FIT pieces of one group (tokenwise_piece_tokens < group_size) and of two groups
    ("fit", dict(FIT_LM, tokenwise_piece_tokens=2, activation_checkpointing=True), 24),
    ("fit", dict(FIT_LM, tokenwise_piece_tokens=6), 24),
    ("transformer", dict(TRANSFORMER, layout="zigzag", tokenwise_piece_tokens=3), 20),
]


@pytest.mark.parametrize("world", [1, 2])
def test_loss_path_in_pieces_equals_plain_path(world):
    for counts in run_ranks(_loss_path_cases, world, PIECE_CASES):
        assert len(counts) == len(PIECE_CASES) and min(counts) > 10


def _lm_with_disagreeing_shards(rank, world, kind):
    from seqshard.models import build_model

    torch.manual_seed(0)
    model = build_model(kind, dict(TRANSFORMER, layout="contiguous"), mesh())
    ids = torch.zeros(1, 6 + 2 * rank, dtype=torch.long)  # rank 1 holds 8 tokens, rank 0 6
    try:
        model(ids)
    except ValueError as err:
        return str(err)
    return "no error"


def test_lm_ranks_that_disagree_raise_on_every_rank():
    # the model checks its token shards once per forward; its attention layers skip their
    # own checks, so without the model's check one rank would hang or read garbage
    said = run_ranks(_lm_with_disagreeing_shards, 2, "transformer")
    for text in said:
        assert "ranks were called with different arguments" in text, text
        assert "input_ids=(1, 8) (rank 0: (1, 6))" in text, text


def _packed_documents(rank, world, doc_lens):
    """Packed TransformerLM on `world` ranks (zigzag) vs each document run alone, unsharded."""
    from seqshard.dist import Mesh, get_layout
    from seqshard.models import build_model

    m, layout = mesh(), get_layout("zigzag")
    torch.manual_seed(0)
    config = dict(TRANSFORMER, layout="zigzag", strategy="ring")
    sharded = build_model("transformer", config, m)
    reference = build_model("transformer", TRANSFORMER, Mesh.single())  # contiguous
    reference.load_state_dict(sharded.state_dict())
    ids = torch.randint(0, 61, (2, sum(doc_lens)), generator=torch.Generator().manual_seed(1))
    logits = sharded(layout.shard(ids, 1, m.rank, m.size), doc_lens=doc_lens)
    alone = torch.cat([reference(part) for part in ids.split(list(doc_lens), 1)], 1)
    assert_close(f"packed P={world}", layout.shard(alone, 1, m.rank, m.size).detach(),
                 logits.detach(), TOL["logits"])
    said = []
    for kind, lens in (("deltanet", doc_lens),
                       ("transformer", doc_lens if rank == 0 else (sum(doc_lens),))):
        model = build_model(kind, dict(DELTANET if kind == "deltanet" else TRANSFORMER), m)
        try:
            model(layout.shard(ids, 1, m.rank, m.size), doc_lens=lens)
            said.append("no error")
        except ValueError as err:
            said.append(str(err))
    return said


def test_packed_documents_match_each_document_alone():
    # TransformerLM honours doc_lens on a sharded zigzag sequence; a model whose mixers carry
    # context across documents refuses them; ranks passing different doc_lens both raise
    for world in (1, 2):
        said = run_ranks(_packed_documents, world, (5, 9, 6))
        for refused, disagree in said:
            assert "DeltaNetLM does not take doc_lens" in refused, refused
            if world > 1:
                assert "ranks were called with different arguments" in disagree, disagree


def test_loss_path_saves_no_whole_shard_tensor_outside_checkpoints():
    """With activation checkpointing, the DeltaNet LM's loss path saves for the whole shard only
    the inputs of blocks 1.. (1 KB a token each at C = 256 in fp32): the final norm runs inside
    the loss pieces (its output and saved input are not kept), and the embedding is recomputed
    from the ids inside block 0's checkpoint."""
    from seqshard.models import build_model, next_token_targets

    torch.manual_seed(0)
    config = dict(DELTANET, activation_checkpointing=True, tokenwise_piece_tokens=5)
    model = build_model("deltanet", config, mesh_single())
    ids = torch.randint(0, DELTANET["vocab_size"], (2, 16))
    whole = ids.numel() * DELTANET["dim"]  # elements of one [B, N_local, C] tensor
    saved = []

    def pack(t):
        if t.numel() >= whole:
            saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = model(ids, next_token_targets(ids))
    # the checkpoints' inputs go through the hooks too: one per block but the first, whose
    # input (the embedding) is recomputed from the ids
    assert saved == [(2, 16, DELTANET["dim"])] * (DELTANET["num_layers"] - 1), \
        f"whole-shard tensors saved besides the blocks' inputs: {saved}"
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def mesh_single():
    from seqshard.dist import Mesh

    return Mesh.single()
