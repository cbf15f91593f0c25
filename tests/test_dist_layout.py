"""Layouts and mesh shapes: pure functions, checked without processes."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqshard.dist import (
    Contiguous,
    MeshShape,
    Striped,
    Zigzag,
    get_layout,
    pad_to_multiple,
)

LAYOUT_NAMES = ["contiguous", "zigzag", "striped"]


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(LAYOUT_NAMES),
    world=st.integers(1, 4),
    units=st.integers(1, 9),
    feature=st.integers(1, 3),
)
def test_shard_round_trip(name, world, units, feature):
    layout = get_layout(name)
    seq_len = units * layout.divisor(world)
    x = torch.randn(2, seq_len, feature)
    shards = [layout.shard(x, 1, r, world) for r in range(world)]
    for r, shard in enumerate(shards):
        # a shard holds exactly the tokens at its positions
        assert shard.shape == (2, seq_len // world, feature)
        assert torch.equal(shard, x[:, layout.positions(seq_len, r, world)])
    # every position is held exactly once; reordering the concatenation restores x
    perm = layout.permutation(seq_len, world)
    assert torch.equal(torch.sort(perm).values, torch.arange(seq_len))
    restored = torch.cat(shards, 1).index_select(1, torch.argsort(perm))
    assert torch.equal(restored, x)


def test_positions_by_hand():
    assert Contiguous().positions(8, 1, 2).tolist() == [4, 5, 6, 7]
    assert Zigzag().positions(8, 0, 2).tolist() == [0, 1, 6, 7]
    assert Zigzag().positions(8, 1, 2).tolist() == [2, 3, 4, 5]
    assert Striped().positions(8, 1, 2).tolist() == [1, 3, 5, 7]


def _mask_from_blocks(blocks, n_local):
    mask = torch.zeros(n_local, n_local, dtype=torch.bool)
    for b in blocks:
        if b.kind == "full":
            piece = torch.ones(b.q_len, b.k_len, dtype=torch.bool)
        elif b.kind == "causal":
            piece = torch.ones(b.q_len, b.k_len, dtype=torch.bool).tril()
        else:
            piece = torch.ones(b.q_len, b.k_len, dtype=torch.bool).tril(-1)
        region = mask[b.q_start : b.q_start + b.q_len, b.k_start : b.k_start + b.k_len]
        assert not region.any(), "blocks overlap"
        region |= piece
    return mask


@pytest.mark.parametrize("name", LAYOUT_NAMES)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_causal_blocks_match_positions(name, world):
    layout = get_layout(name)
    seq_len = 3 * layout.divisor(world)
    n_local = seq_len // world
    for q_rank in range(world):
        q_pos = layout.positions(seq_len, q_rank, world)
        for k_rank in range(world):
            k_pos = layout.positions(seq_len, k_rank, world)
            expected = q_pos[:, None] >= k_pos[None, :]
            blocks = layout.causal_blocks(seq_len, q_rank, k_rank, world)
            assert torch.equal(_mask_from_blocks(blocks, n_local), expected), (q_rank, k_rank)


@pytest.mark.parametrize("name", LAYOUT_NAMES)
def test_non_dividing_length_names_the_values(name):
    layout = get_layout(name)
    divisor = layout.divisor(4)
    with pytest.raises(ValueError) as err:
        layout.shard(torch.zeros(1, divisor + 1), 1, 0, 4)
    text = str(err.value)
    assert f"sequence length {divisor + 1}" in text
    assert "4 ranks" in text and f"multiple of {divisor}" in text and name in text


def test_unknown_layout():
    with pytest.raises(ValueError, match="'diagonal'"):
        get_layout("diagonal")


def test_pad_to_multiple_then_shard():
    x = torch.arange(10.0).reshape(1, 10)
    padded, mask = pad_to_multiple(x, 1, Zigzag().divisor(2))
    assert padded.shape == (1, 12)
    assert mask.tolist() == [True] * 10 + [False] * 2
    assert torch.equal(padded[0, :10], x[0])
    assert float(padded[0, 10:].abs().sum()) == 0.0
    same, full_mask = pad_to_multiple(x, 1, 5)
    assert same is x and bool(full_mask.all())
    with pytest.raises(ValueError, match="multiple=0"):
        pad_to_multiple(x, 1, 0)


def test_mesh_shape_groups_2x2():
    groups = MeshShape(dp=1, ulysses=2, ring=2).group_ranks()
    assert groups["sp"] == [[0, 1, 2, 3]]
    assert groups["ulysses"] == [[0, 1], [2, 3]]
    assert groups["ring"] == [[0, 2], [1, 3]]
    assert groups["dp"] == [[0], [1], [2], [3]]


def test_mesh_shape_with_data_parallel():
    shape = MeshShape.fit(8, dp=2, ulysses=2)
    assert (shape.dp, shape.ulysses, shape.ring, shape.sp) == (2, 2, 2, 4)
    groups = shape.group_ranks()
    assert groups["sp"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert groups["dp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert shape.coords(6) == (1, 1, 0)


def test_mesh_shape_bad_degrees():
    with pytest.raises(ValueError, match="world size 6 is not divisible by dp=1 x ulysses=4"):
        MeshShape.fit(6, ulysses=4)
    with pytest.raises(ValueError, match=r"dp=1 x ulysses=2 x ring=3 = 6 != world size 4"):
        MeshShape.fit(4, ulysses=2, ring=3)
    with pytest.raises(ValueError, match="ulysses=0"):
        MeshShape(ulysses=0)
