"""The test oracle: FIT on the whole sequence on one device, written as plain masked attention.

Nothing here reshapes tokens into groups or calls SDPA: every attention is softmax(q k^T /
sqrt(d) + mask) v over the *flat* sequence, and the group structure lives only in explicit
boolean masks built from each position's group index. It reads the weights of a `FIT`
module, so the fast / sharded forms and this one share parameters and gradients.

    tokens  i:    group(i) = i // n, slot(i) = i % n
    latents a:    group(a) = a // m, slot(a) = a % m
    local   i->j: group(i) == group(j)           (and j <= i when causal)
    read    a->j: group(a) == group(j)
    global  a->b: always                         (group(b) <= group(a) when causal)
    write   i->b: group(b) == group(i) - shift   over [m zero latents of group -1] + latents,
                  shift = 1 when causal, else 0
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def naive_attention(attn, xq: torch.Tensor, xkv: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """xq [B, L, D], xkv [B, S, D], allowed bool [L, S] -> [B, L, D], with `attn`'s weights."""
    b, length, dim = xq.shape
    h, d = attn.num_heads, attn.head_dim
    q = F.linear(xq, attn.q.weight, attn.q.bias)  # [B, L, D]
    kv = F.linear(xkv, attn.kv.weight, attn.kv.bias)  # [B, S, 2D]: keys then values
    k, v = kv[..., :dim], kv[..., dim:]
    q, k, v = (t.reshape(b, -1, h, d).transpose(1, 2) for t in (q, k, v))  # [B, h, *, d]
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # [B, h, L, S]
    scores = scores.masked_fill(~allowed, float("-inf"))
    o = torch.softmax(scores, dim=-1) @ v  # [B, h, L, d]
    return F.linear(o.transpose(1, 2).reshape(b, length, dim), attn.out.weight, attn.out.bias)


def naive_norm(norm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def naive_self_layer(layer, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Pre-norm self-attention + MLP over x [B, L, D] under `allowed` [L, L]."""
    h = naive_norm(layer.norm1, x)
    x = x + naive_attention(layer.attn, h, h, allowed)
    h = naive_norm(layer.norm2, x)
    h = F.linear(F.gelu(F.linear(h, layer.mlp.fc1.weight, layer.mlp.fc1.bias)),
                 layer.mlp.fc2.weight, layer.mlp.fc2.bias)
    return x + h


def naive_cross_layer(layer, x: torch.Tensor, context: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """x + attention(norm(x) -> norm(context)) under `allowed` [L, S]; no MLP."""
    return x + naive_attention(layer.attn, naive_norm(layer.norm_q, x),
                               naive_norm(layer.norm_kv, context), allowed)


def naive_sinusoid(group: torch.Tensor, dim: int) -> torch.Tensor:
    """int [T] -> [T, dim]: column j < ceil(dim/2) is sin(g w_j), the rest cos(g w_(j-half)),
    with w_j = 10000^(-j / half)."""
    half = (dim + 1) // 2
    j = torch.arange(dim)
    w = torch.pow(10000.0, -(j % half).double() / half)  # [dim]
    angle = group[:, None].double() * w  # [T, dim]
    return torch.where(j < half, torch.sin(angle), torch.cos(angle))


def naive_block(block, x: torch.Tensor, latents: torch.Tensor, group_size: int):
    """One FIT block on the whole sequence: x [B, N, D], latents [B, T*m, D] (group-major)."""
    n, m, causal = group_size, block.num_latents, block.causal
    tok = torch.arange(x.shape[1]) // n  # group of each token
    lat = torch.arange(latents.shape[1]) // m  # group of each latent
    local = tok[:, None] == tok[None, :]
    if causal:
        local &= torch.arange(x.shape[1])[:, None] >= torch.arange(x.shape[1])[None, :]
    for layer in block.local_layers:
        x = naive_self_layer(layer, x, local)
    latents = naive_cross_layer(block.read, latents, x, lat[:, None] == tok[None, :])
    glob = (lat[None, :] <= lat[:, None]) if causal else torch.ones(len(lat), len(lat), dtype=torch.bool)
    for layer in block.global_layers:
        latents = naive_self_layer(layer, latents, glob)
    # write over m zero latents of a virtual group -1 followed by the real latents
    zeros = latents.new_zeros(latents.shape[0], m, latents.shape[2])
    source = torch.cat([zeros, latents], dim=1)  # [B, (T+1)*m, D]
    src = torch.cat([torch.full((m,), -1), lat])
    shift = 1 if causal else 0
    x = naive_cross_layer(block.write, x, source, src[None, :] == tok[:, None] - shift)
    return x, latents


def naive_fit(fit, x: torch.Tensor) -> torch.Tensor:
    """The whole FIT stack on a whole sequence x [B, N, D] -> [B, N, D], with fit's weights."""
    b, length, dim = x.shape
    n, m = fit.group_size, fit.num_latents
    num_groups = length // n
    x = x + fit.token_pos[torch.arange(length) % n]
    slot = torch.arange(num_groups * m) % m
    group = torch.arange(num_groups * m) // m
    latents = fit.latent_slots[slot] + naive_sinusoid(group, dim).to(x.dtype)  # [T*m, D]
    latents = latents.expand(b, -1, -1)
    for block in fit.blocks:
        x, latents = naive_block(block, x, latents, n)
    return x
