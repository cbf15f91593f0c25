"""What a benchmark point runs: seqshard's sharded ops and their peers, on this rank's shard.

`build(spec, mesh)` returns a `Workload`: `make_inputs()` allocates this rank's inputs (they
count towards peak memory) and `run(inputs, backward)` does one forward (under no_grad) or one
forward + backward. Peers run side by side in the same sweep:

    family      impl         what runs                                           ranks
    attention   sdpa         torch scaled_dot_product_attention on the whole N  1
    attention   naive        ops.attention.naive: the [N, N] scores materialised 1
    attention   seqshard     sharded_attention with one process (fused kernel)  1
    attention   ring | ulysses | hybrid | allgather   sharded_attention         P
    attention   ds_ulysses   deepspeed.sequence.layer.DistributedAttention      P
    delta_rule  naive        the token-by-token recurrence (ops.delta_rule.naive) 1
    delta_rule  chunk        delta_rule with one process (chunkwise WY)         1
    delta_rule  scan | pass  delta_rule sharded, prefix scan / state passing    P
    fit         naive        the unsharded FIT oracle (ops.fit.naive)           1
    fit         fit          FIT on this rank's groups, latents gathered        P
    model       transformer | deltanet | fit   one LM training step (loss + backward)   P

A spec is a dict with family, impl, n, world, ulysses, ring and shape (see results.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

SINGLE_ONLY = {("attention", "sdpa"), ("attention", "naive"), ("attention", "seqshard"), ("delta_rule", "naive"),
               ("delta_rule", "chunk"), ("fit", "naive")}
IMPLS = {
    "attention": ("sdpa", "naive", "seqshard", "ring", "ulysses", "hybrid", "allgather", "ds_ulysses"),
    "delta_rule": ("naive", "chunk", "scan", "pass"),
    "fit": ("naive", "fit"),
    "model": ("transformer", "deltanet", "fit"),
}


@dataclass
class Workload:
    make_inputs: Callable[[], tuple]
    run: Callable[[tuple, bool], None]


def check_spec(spec: dict) -> None:
    """ValueError for a point that cannot run (before any rank starts it)."""
    family, impl, n, world = spec["family"], spec["impl"], spec["n"], spec["world"]
    if family not in IMPLS or impl not in IMPLS[family]:
        raise ValueError(f"family={family!r} impl={impl!r}: expected one of {IMPLS}")
    if (family, impl) in SINGLE_ONLY and world != 1:
        raise ValueError(f"{family}/{impl} is a single-process peer; got world={world}")
    if n % world != 0:
        raise ValueError(f"n={n} is not divisible by world={world}")
    shape = spec["shape"]
    if family == "attention" and impl in ("ulysses", "ds_ulysses", "hybrid"):
        degree = world if impl != "hybrid" else spec["ulysses"]
        if shape["heads"] % degree or shape["kv_heads"] % degree:
            raise ValueError(f"{impl}: heads={shape['heads']}, kv_heads={shape['kv_heads']} "
                             f"must divide by the Ulysses degree {degree}")
    if impl == "hybrid" and (spec["ulysses"] < 2 or spec["ring"] < 2):
        raise ValueError(f"hybrid needs ulysses >= 2 and ring >= 2, got "
                         f"{spec['ulysses']} x {spec['ring']}")
    if family == "fit" and (n // world) % shape["group_size"]:
        raise ValueError(f"fit: n/world={n // world} is not a multiple of "
                         f"group_size={shape['group_size']}")


def _leaves(*shapes, device=None) -> tuple:
    return tuple(torch.randn(*s, device=device).requires_grad_() for s in shapes)


def _clear_grads(tensors) -> None:
    for t in tensors:
        t.grad = None


def _runner(forward: Callable[[tuple], torch.Tensor], params=()) -> Callable:
    """One forward (no_grad) or forward + backward of sum(out) (gradients of every input)."""

    def run(inputs: tuple, backward: bool) -> None:
        if not backward:
            with torch.no_grad():
                forward(inputs)
            return
        _clear_grads(inputs)
        _clear_grads(params)
        forward(inputs).sum().backward()

    return run


# --- attention -------------------------------------------------------------------------------
def _attention(spec: dict, mesh) -> Workload:
    s, impl, world = spec["shape"], spec["impl"], spec["world"]
    b, h, hkv, d, causal = s["batch"], s["heads"], s["kv_heads"], s["head_dim"], s["causal"]
    n_local = spec["n"] // world
    if impl == "ds_ulysses":
        return _ds_ulysses(b, h, hkv, d, n_local, causal, mesh)

    def make_inputs():
        return _leaves((b, h, n_local, d), (b, hkv, n_local, d), (b, hkv, n_local, d),
                       device=mesh.device)

    if impl == "sdpa":
        def forward(x):
            return torch.nn.functional.scaled_dot_product_attention(
                *x, is_causal=causal, enable_gqa=h != hkv)
    elif impl == "naive":
        # vanilla multi-head attention: the seed paper's "attention scale-up" baseline
        from seqshard.ops.attention.naive import naive_attention

        def forward(x):
            return naive_attention(*x, causal=causal)[0]
    else:
        from seqshard.ops.attention import sharded_attention

        strategy = "ring" if impl == "seqshard" else impl
        # zigzag balances causal work over a ring; after Ulysses' all-to-all every rank holds
        # the whole sequence (for its heads), so contiguous is balanced there and cuts fewer
        # pieces (DeepSpeed's Ulysses runs contiguous too)
        layout = s.get("layout") or ("zigzag" if causal and world > 1 and impl != "ulysses"
                                     else "contiguous")
        use_mesh = None if world == 1 else mesh

        def forward(x):
            return sharded_attention(*x, use_mesh, causal=causal, layout=layout,
                                     strategy=strategy)
    return Workload(make_inputs, _runner(forward))


def _ds_ulysses(b, h, hkv, d, n_local, causal, mesh) -> Workload:
    from deepspeed.sequence.layer import DistributedAttention

    def local_attn(q, k, v, *args, **kwargs):
        # DeepSpeed hands over [N, B, H/P, D]; SDPA wants [B, H, N, D]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])
        return out.permute(2, 0, 1, 3)

    attn = DistributedAttention(local_attn, mesh.group, scatter_idx=2, gather_idx=0)

    def make_inputs():  # DeepSpeed's layout: [N_local, B, H, D]
        return _leaves((n_local, b, h, d), (n_local, b, hkv, d), (n_local, b, hkv, d),
                       device=mesh.device)

    return Workload(make_inputs, _runner(lambda x: attn(*x, batch_dim_idx=1)))


# --- delta rule ------------------------------------------------------------------------------
def _delta_rule(spec: dict, mesh) -> Workload:
    s, impl, world = spec["shape"], spec["impl"], spec["world"]
    b, h, dk, dv, chunk = s["batch"], s["heads"], s["dk"], s["dv"], s["chunk"]
    n_local = spec["n"] // world

    def make_inputs():
        return _leaves((b, h, n_local, dk), (b, h, n_local, dk), (b, h, n_local, dv),
                       (b, h, n_local), device=mesh.device)  # q, k, v, beta logits

    def prepare(x):
        # the layer's own preprocessing: unit-norm keys/queries, beta in (0, 1)
        q, k, v, beta_logit = x
        return (torch.nn.functional.normalize(q, dim=-1),
                torch.nn.functional.normalize(k, dim=-1), v, torch.sigmoid(beta_logit))

    if impl == "naive":
        from seqshard.ops.delta_rule.naive import naive_delta_rule

        def forward(x):
            return naive_delta_rule(*prepare(x))[0]
    else:
        from seqshard.ops.delta_rule import delta_rule

        use_mesh = None if world == 1 else mesh
        schedule = "scan" if impl == "chunk" else impl

        def forward(x):
            # check=False: the input scan for NaN is a safety net, not part of the op's cost
            return delta_rule(*prepare(x), mesh=use_mesh, schedule=schedule, chunk_size=chunk,
                              check=False)[0]
    return Workload(make_inputs, _runner(forward))


# --- FIT -------------------------------------------------------------------------------------
def _fit(spec: dict, mesh) -> Workload:
    from seqshard.ops.fit import FIT

    s, impl, world = spec["shape"], spec["impl"], spec["world"]
    torch.manual_seed(0)  # every rank holds the same weights
    module = FIT(s["dim"], s["heads"], s["group_size"], s["latents"], depth=s["depth"],
                 causal=s["causal"]).to(mesh.device)
    n_local = spec["n"] // world
    params = tuple(module.parameters())

    def make_inputs():
        return _leaves((s["batch"], n_local, s["dim"]), device=mesh.device)

    if impl == "naive":
        from seqshard.ops.fit.naive import naive_fit

        def forward(x):
            return naive_fit(module, x[0])
    else:
        use_mesh = None if world == 1 else mesh

        def forward(x):
            return module(x[0], use_mesh)
    return Workload(make_inputs, _runner(forward, params))


# --- whole models ----------------------------------------------------------------------------
def _model(spec: dict, mesh) -> Workload:
    from seqshard.models import build_model
    from seqshard.models.loss import sharded_lm_loss

    s, world = spec["shape"], spec["world"]
    torch.manual_seed(0)
    config = {k: v for k, v in s.items() if k != "batch"}
    use_mesh = None if world == 1 else mesh
    model = build_model(spec["impl"], config, use_mesh).to(mesh.device)
    n_local = spec["n"] // world
    params = tuple(model.parameters())

    def make_inputs():
        return (torch.randint(0, s["vocab_size"], (s["batch"], n_local), device=mesh.device),)

    def run(inputs, backward):
        if not backward:
            with torch.no_grad():
                model(inputs[0])
            return
        _clear_grads(params)
        loss = sharded_lm_loss(model(inputs[0]), inputs[0], use_mesh)
        loss.backward()

    return Workload(make_inputs, run)


_BUILDERS = {"attention": _attention, "delta_rule": _delta_rule, "fit": _fit, "model": _model}


def build(spec: dict, mesh) -> Workload:
    check_spec(spec)
    return _BUILDERS[spec["family"]](spec, mesh)
