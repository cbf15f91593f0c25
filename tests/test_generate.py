"""Greedy generation from a sharded prompt (`seqshard.models.generate`) against the unsharded
model's greedy decoding (its full forward recomputed for every token, argmax), token for
token, on 1, 2 and 4 gloo ranks; and the bad inputs that must raise on every rank."""

from __future__ import annotations

import pytest
import torch

from tests.common import assert_close
from tests.harness import mesh, run_ranks

TRANSFORMER = dict(vocab_size=53, dim=32, num_layers=2, num_heads=2, num_kv_heads=1,
                   init_std=0.1)
NEW_TOKENS = 6


def _reference_greedy(reference, ids: torch.Tensor, new_tokens: int, pad_to: int = 1):
    """Greedy ids [B, K] of the unsharded model, recomputing the whole sequence per token.
    pad_to: right-pad to a multiple (FIT's whole groups; causal, so padding changes nothing
    before it)."""
    out = []
    for _ in range(new_tokens):
        n = ids.shape[1]
        padded = torch.nn.functional.pad(ids, (0, -n % pad_to))
        out.append(reference(padded)[:, n - 1].argmax(-1))
        ids = torch.cat([ids, out[-1][:, None]], dim=1)
    return torch.stack(out, dim=1)


def _generate_cases(rank, world, cases):
    """Each case: (kind, config, degrees, prompt length N, batch); returns how many matched."""
    from seqshard.dist import Mesh, get_layout
    from seqshard.models import build_model
    from seqshard.models.generate import decode_step, generate, prefill

    matched = 0
    for i, (kind, config, degrees, n, batch) in enumerate(cases):
        m = mesh(**degrees)
        torch.manual_seed(i)
        sharded = build_model(kind, config, m)
        # contiguous: the reference runs every length, not only the layout's multiples
        reference = build_model(kind, dict(config, layout="contiguous"), Mesh.single())
        reference.load_state_dict(sharded.state_dict())
        vocab = sharded.config.vocab_size
        ids = torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(i))
        layout = get_layout(sharded.config.layout)
        streamed = []
        got = generate(sharded, layout.shard(ids, 1, m.rank, m.size), m, NEW_TOKENS,
                       on_token=lambda j, t: streamed.append(t))
        group = getattr(sharded.config, "group_size", 1)
        with torch.no_grad():
            want = _reference_greedy(reference, ids, NEW_TOKENS, group)
        tag = f"{kind} {config.get('layout', 'contiguous')} {config.get('strategy', '')} P={world}"
        assert torch.equal(got, want), f"{tag}: generated {got.tolist()} != {want.tolist()}"
        assert torch.equal(torch.stack(streamed, 1), got), f"{tag}: streamed tokens differ"
        # the logits themselves, step by step (a small error may not flip an argmax)
        full = torch.cat([ids, want], dim=1)
        with torch.no_grad():
            ref_logits = reference(torch.nn.functional.pad(full, (0, -full.shape[1] % group)))
        cache, logits = prefill(sharded, layout.shard(ids, 1, m.rank, m.size), n + NEW_TOKENS)
        for j in range(NEW_TOKENS):
            assert_close(f"{tag} logits at {n + j - 1}", ref_logits[:, n + j - 1], logits, 1e-4)
            logits = decode_step(sharded, want[:, j], cache)
        matched += 1
    return matched


TRANSFORMER_CASES = {
    1: [("transformer", TRANSFORMER, {}, 7, 2)],
    2: [("transformer", dict(TRANSFORMER, layout="contiguous", strategy="ring"), {}, 8, 2),
        ("transformer", dict(TRANSFORMER, layout="zigzag", strategy="ring"), {}, 12, 1),
        ("transformer", dict(TRANSFORMER, layout="striped", strategy="allgather"), {}, 6, 2),
        ("transformer", dict(TRANSFORMER, layout="zigzag", strategy="ulysses"),
         {"ulysses": 2}, 8, 1)],
    4: [("transformer", dict(TRANSFORMER, layout="zigzag", strategy="ring"), {}, 16, 2),
        ("transformer", dict(TRANSFORMER, layout="contiguous", strategy="hybrid"),
         {"ulysses": 2, "ring": 2}, 8, 1)],
}


@pytest.mark.parametrize("world", [1, 2, 4])
def test_transformer_greedy_matches_unsharded(world):
    cases = TRANSFORMER_CASES[world]
    assert run_ranks(_generate_cases, world, cases) == [len(cases)] * world


DELTANET = dict(vocab_size=53, dim=32, num_layers=3, num_heads=2, chunk_size=4, init_std=0.1)
# window 3 < the prompt, so decoding evicts keys; the hybrid mixes all three mixers
HYBRID = dict(DELTANET, attn_layers=(1,), window_layers=(2,), window=3)
DELTANET_CASES = {
    1: [("deltanet", DELTANET, {}, 7, 2), ("deltanet", HYBRID, {}, 6, 1)],
    2: [("deltanet", DELTANET, {}, 8, 2),
        ("deltanet", dict(HYBRID, use_gate=True, schedule="pass", strategy="allgather"), {}, 10, 1),
        ("deltanet", dict(DELTANET, use_short_conv=False, mixer_piece_tokens=2), {}, 8, 1),
        ("deltanet", dict(HYBRID, layout="zigzag", strategy="ring"), {}, 12, 1)],
    4: [("deltanet", HYBRID, {}, 12, 2),
        ("deltanet", dict(HYBRID, layout="striped", activation_checkpointing=True), {}, 16, 1),
        ("deltanet", dict(HYBRID, strategy="hybrid"), {"ulysses": 2, "ring": 2}, 16, 1)],
}


@pytest.mark.parametrize("world", [1, 2, 4])
def test_deltanet_greedy_matches_unsharded(world):
    cases = DELTANET_CASES[world]
    assert run_ranks(_generate_cases, world, cases) == [len(cases)] * world


FIT_LM = dict(vocab_size=53, dim=32, num_layers=2, num_heads=2, group_size=3, num_latents=2,
              init_std=0.1)
FIT_CASES = {  # 6 new tokens close two groups
    1: [("fit", FIT_LM, {}, 6, 2)],
    2: [("fit", FIT_LM, {}, 12, 2),
        ("fit", dict(FIT_LM, local_layers=2, global_layers=2, group_size=2), {}, 4, 1)],
    4: [("fit", FIT_LM, {}, 12, 1)],
}


@pytest.mark.parametrize("world", [1, 2, 4])
def test_fit_greedy_matches_unsharded(world):
    cases = FIT_CASES[world]
    assert run_ranks(_generate_cases, world, cases) == [len(cases)] * world


def _bad_generate(rank, world):
    """Each bad call raises ValueError on every rank (none hangs in a collective)."""
    from seqshard.models import build_model
    from seqshard.models.generate import decode_step, generate, prefill

    m = mesh()
    torch.manual_seed(0)
    model = build_model("transformer", TRANSFORMER, m)
    prompt = torch.randint(0, 53, (1, 4))  # N = 4 * world
    errors = []
    calls = {
        "prompt longer than max_len": lambda: generate(model, prompt, m, 2, max_len=4 * world - 1),
        "no room": lambda: generate(model, prompt, m, 3, max_len=4 * world + 2),
        # rank 1 passes a longer shard: the ranks disagree
        "disagree": lambda: generate(model, prompt if rank != 1 else prompt.repeat(1, 2), m, 2),
        "bad max_new_tokens": lambda: generate(model, prompt, m, 0),
    }
    fit = build_model("fit", FIT_LM, m)  # group_size 3 does not divide the shard of 4
    calls["fit groups"] = lambda: generate(fit, prompt, m, 2)
    for name, call in calls.items():
        if name == "disagree" and world == 1:
            continue
        with pytest.raises(ValueError) as err:
            call()
        errors.append((name, str(err.value)))
    # a cache used past the room it was made with raises on every rank too
    cache, logits = prefill(model, prompt, 4 * world + 1)
    decode_step(model, logits.argmax(-1), cache)
    with pytest.raises(ValueError, match="cache is full"):
        decode_step(model, logits.argmax(-1), cache)
    return errors


@pytest.mark.parametrize("world", [1, 2])
def test_bad_generate_input_raises_on_every_rank(world):
    results = run_ranks(_bad_generate, world)
    for errors in results:
        text = dict(errors)
        assert "longer than max_len" in text["prompt longer than max_len"]
        assert "runs out of room" in text["no room"]
        assert "max_new_tokens" in text["bad max_new_tokens"]
        assert "group_size=3" in text["fit groups"]
        if world > 1:
            assert "different arguments" in text["disagree"]
