"""Hugging Face generate() on a prompt sharded over ranks (models.hf_cache.ShardedCache): greedy
tokens equal the unsharded eager model's for the tiny Llama, Qwen 2/3 and Mistral configs
(plus Qwen's window/global mix), on 1, 2 and 4 ranks, contiguous and zigzag; a too-long
prompt, a cache out of room and ranks that disagree raise on every rank."""

from __future__ import annotations

import pytest
import torch

from tests.harness import mesh, run_ranks
from tests.test_hf import _tiny_config

pytest.importorskip("transformers")

PROMPT = 24  # zigzag at P = 4 cuts it in runs of 3, shorter than every window
NEW = 6
STYLES = ["llama", "qwen", "qwen2", "mistral", "qwen_mix"]
LAYOUTS = ["contiguous", "zigzag"]


def _models(style: str, name: str):
    """(model on the registered sharded attention, unsharded eager copy), fp64 so that no
    rounding difference can flip a near-tie of the greedy argmax."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny_config(style), attn_implementation=name)
    reference = AutoModelForCausalLM.from_config(_tiny_config(style), attn_implementation="eager")
    reference.load_state_dict(model.state_dict())
    for m in (model, reference):
        m.double().eval()
        m.generation_config.eos_token_id = None  # always NEW tokens, never stopped early
    return model, reference


def _generate_cases(rank, world):
    from seqshard.models.hf import register_sharded_attention, shard_for_hf
    from seqshard.models.hf_cache import ShardedCache

    m = mesh()
    ids = torch.randint(0, 61, (2, PROMPT), generator=torch.Generator().manual_seed(7))
    results = {}
    for layout in LAYOUTS if world > 1 else LAYOUTS[:1]:  # one rank: every layout is in order
        name = register_sharded_attention(m, layout=layout, name=f"seqshard_gen_{layout}_{world}")
        for style in STYLES:
            model, reference = _models(style, name)
            ids_local, _ = shard_for_hf(ids, m, layout=layout)
            cache = ShardedCache(model, m, layout=layout, max_tokens=PROMPT + NEW)
            with torch.no_grad():
                out = model.generate(ids_local, cache=cache, max_new_tokens=NEW, do_sample=False)
                # the reference once (rank 0): the test compares every rank's tokens with it
                want = (reference.generate(ids, max_new_tokens=NEW, do_sample=False)
                        if rank == 0 else None)
            sizes = [layer.length for layer in cache.layers]
            if style in ("llama", "qwen", "qwen2"):  # full layers: buffers within max_tokens
                assert all(layer._k.shape[2] == cache.rank_capacity for layer in cache.layers)
            results[(style, layout)] = (out[:, ids_local.shape[1]:],
                                        None if want is None else want[:, PROMPT:], sizes)
    return results


@pytest.mark.parametrize("world", [1, 2, 4])
def test_greedy_generate_equals_unsharded(world):
    per_rank = run_ranks(_generate_cases, world)
    for rank, results in enumerate(per_rank):
        assert len(results) == len(STYLES) * (len(LAYOUTS) if world > 1 else 1)
        for (style, layout), (got, _, sizes) in results.items():
            want = per_rank[0][(style, layout)][1]
            where = f"{style} {layout} P={world} rank {rank}"
            assert got.shape == (2, NEW), where
            assert torch.equal(got, want), f"{where}: {got.tolist()} != {want.tolist()}"
            # the cache stays sharded: the prompt shard plus this rank's round-robin share of
            # the NEW - 1 decoded tokens that went through a forward
            full = PROMPT // world + len(range(rank, NEW - 1, world))
            if style == "mistral":  # a window of 7: the next query reads its own key and the
                # 6 before it, which is all any rank keeps
                assert sum(per_rank[r][(style, layout)][2][0] for r in range(world)) == 6, where
            elif style != "qwen_mix":
                assert sizes == [full] * len(sizes), (where, sizes)


def _bad_calls(rank, world):
    """Each bad call, and whether it raised ValueError (with which message) on this rank."""
    from seqshard.models.hf import register_sharded_attention, shard_for_hf
    from seqshard.models.hf_cache import ShardedCache

    m = mesh()
    name = register_sharded_attention(m, layout="zigzag", name=f"seqshard_gen_bad_{world}")
    model, _ = _models("llama", name)
    ids = torch.randint(0, 61, (1, PROMPT), generator=torch.Generator().manual_seed(3))
    ids_local, _ = shard_for_hf(ids, m, layout="zigzag")

    def attempt(max_tokens, new=NEW, local=ids_local, step=None):
        cache = ShardedCache(model, m, layout="zigzag", max_tokens=max_tokens)
        try:
            with torch.no_grad():
                if step is None:
                    model.generate(local, cache=cache, max_new_tokens=new, do_sample=False)
                else:  # a prefill, then one decode step with this rank's own token
                    model(input_ids=local, cache=cache)
                    model(input_ids=step, cache=cache)
        except ValueError as err:
            return str(err)
        return None

    return {
        "more than the cache's max_tokens": attempt(PROMPT - 1),
        "out of room": attempt(PROMPT + 2),
        "different arguments": attempt(PROMPT + NEW + rank),  # max_tokens differs per rank
        "input_ids": attempt(PROMPT + NEW, step=torch.tensor([[rank]])),  # different tokens
    }


@pytest.mark.parametrize("world", [1, 2])
def test_bad_generate_calls_raise_on_every_rank(world):
    for rank, raised in enumerate(run_ranks(_bad_calls, world)):
        for expected, message in raised.items():
            if world == 1 and expected in ("different arguments", "input_ids"):
                assert message is None, message  # one rank always agrees with itself
                continue
            assert message is not None and expected in message, (world, rank, expected, message)
