"""`seqshard plan`: a cost model that predicts time, memory and traffic per rank for every
strategy and mesh split of an op, and picks the best one that fits.

For a point (family, impl, N, P = ulysses x ring, shape) the model counts, per rank and per
forward+backward of one layer:

- flops it runs in parallel with the other ranks (`flops_par`) and flops on a chain that
  crosses ranks one after the other (`flops_seq`, the delta rule's "pass" schedule);
- bytes it sends and messages it posts, inside a node (NVLink, shared memory) or across nodes
  (InfiniBand): a group of ranks is inside a node when it spans <= devices_per_node ranks
  (Ulysses groups are consecutive ranks, ring groups stride across them; see dist/mesh.py);
- python-level steps (ring steps, kernel calls) that cost a fixed overhead each;
- the bytes it holds at its peak (inputs, gradients, outputs, strategy buffers).

Time = flops / (flops x efficiency) + bytes / bandwidth + messages x latency
       + steps x step_overhead + call_overhead,
with ring traffic hidden under compute where the hardware overlaps (GPUs). On a CPU host each
rank is a one-thread process (`shared_cores` = C cores): P ranks running together each get
min(1, C/P) of a core; a rank on a serial chain (the others wait) gets a whole core.

The CPU profile is *calibrated* from measured runs (`calibrate`): the coefficients are a
non-negative least-squares fit of measured fwd+bwd times in relative error, and memory
multipliers per family are fitted the same way. GPU profiles carry datasheet numbers with
stated efficiencies (assumptions until a GPU run calibrates them).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field, replace

# The ring loop's head-group rule (HEAD_GROUPS, STREAM_MIN_BYTES, head_groups, head_slices),
# read from the op itself rather than mirrored: the planner counts what the op really does.
from seqshard.dist.agree import WIDTH as AGREE_BYTES
from seqshard.models.fill import fill
from seqshard.ops.attention import ring as ring_op

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as the tomli package (a dependency below 3.11)
    import tomli as tomllib

FAMILIES = ("attention", "delta_rule", "fit")
CANDIDATE_IMPLS = {"attention": ("ring", "ulysses", "hybrid", "allgather"),
                   "delta_rule": ("scan", "pass"), "fit": ("fit",)}


@dataclass(frozen=True)
class Hardware:
    """One kind of worker. Rates are per device (per host when shared_cores > 0)."""

    name: str
    flops: float                 # FLOP/s of one device (one core = one rank, for shared_cores)
    memory_bytes: float          # memory per device (of the whole host, for shared_cores)
    devices_per_node: int
    intra_bw: float              # bytes/s one device sends inside a node
    intra_latency: float         # s per message inside a node
    inter_bw: float              # bytes/s one device sends across nodes
    inter_latency: float         # s per message across nodes
    dtype_bytes: int = 2         # element size of activations
    mem_bw: float = 2e12         # bytes/s of elementwise passes (LSE merges, gradient sums,
                                 # all-to-all packing): memory-bound work beside the kernels
    msg_cpu: float = 0.0         # host CPU seconds a rank spends per message (gloo: its
                                 # syscalls and wake-ups; GPUs: in the latency)
    gather_slowdown: float = 1.0  # time per byte of all-gather / reduce-scatter relative to
                                  # point-to-point and all-to-all (gloo: measured ~2-4x)
    causal_tile: int = 128       # keys per tile of the fused kernel: a causal block computes
                                 # its diagonal tiles whole (ATen's CPU flash kernel: 512)
    shared_cores: float = 0      # > 0: ranks are 1-thread processes on a host with this many cores
    cores_by_world: dict = field(default_factory=dict)  # P -> cores the ranks of a P-rank run
                                 # really got (a calibration's measured condition, per window)
    overlap: bool = True         # ring traffic overlaps compute
    fused_chain: bool = False    # the delta rule's state chain is one native call per pass
                                 # (the CPU build of ops/delta_rule/fused_chain.c), not two
                                 # kernel calls per chunk
    step_overhead: float = 20e-6
    call_overhead: float = 50e-6
    process_bytes: float = 0.0   # memory a rank's runtime holds before any model exists (the
                                 # model-level plan's budget is memory_bytes less this): on
                                 # the CPU the interpreter, torch and DeepSpeed; on a GPU the
                                 # allocator's peak excludes the CUDA context, so 0 there
    # Fraction of `flops` each family's kernels reach. These defaults are what the GPU
    # profiles below use: assumptions set beside the datasheet rates (commit 35376f7,
    # 2026-11-25), never measured on any GPU (benchmarks/gpu_check.py would measure them).
    # A calibration (launch/perf/calibrate.py) replaces them with fitted rates.
    efficiency: dict = field(default_factory=lambda: {"attention": 0.45, "delta_rule": 0.25,
                                                      "fit": 0.35})
    memory_scale: dict = field(default_factory=lambda: {"attention": 1.0, "delta_rule": 1.0,
                                                        "fit": 1.0})
    note: str = ""


H100_NODE = Hardware(
    name="h100-nvlink-ib", flops=989e12, memory_bytes=80e9, devices_per_node=8,
    intra_bw=350e9, intra_latency=10e-6, inter_bw=45e9, inter_latency=25e-6, dtype_bytes=2,
    mem_bw=2.3e12,
    note="8 x H100 SXM per node, NVLink4 (900 GB/s bidirectional, ~350 GB/s achieved per "
         "direction), one 400 Gb/s NDR InfiniBand NIC per GPU (~45 GB/s achieved); bf16 dense "
         "989 TFLOP/s, HBM3 3.35 TB/s (~2.3 TB/s achieved by elementwise kernels); "
         "efficiencies are assumptions, not measured here")
H200_NODE = dataclasses.replace(
    H100_NODE, name="h200-nvlink-ib", memory_bytes=141e9, mem_bw=3.3e12,
    note="8 x H200 SXM per node: H100 compute and links, 141 GB HBM3e per GPU; efficiencies "
         "are assumptions, not measured here")
A100_NODE = Hardware(
    name="a100-nvlink-ib", flops=312e12, memory_bytes=80e9, devices_per_node=8,
    intra_bw=250e9, intra_latency=10e-6, inter_bw=22e9, inter_latency=25e-6, dtype_bytes=2,
    mem_bw=1.4e12,
    note="8 x A100 80GB SXM per node, NVLink3 (600 GB/s bidirectional, ~250 GB/s achieved), "
         "one 200 Gb/s HDR InfiniBand NIC per GPU (~22 GB/s achieved); bf16 dense 312 TFLOP/s; "
         "efficiencies are assumptions, not measured here")
CPU_DEFAULT = Hardware(
    name="cpu", flops=25e9, memory_bytes=8e9, devices_per_node=1 << 30, intra_bw=2e9,
    intra_latency=50e-6, inter_bw=2e9, inter_latency=50e-6, dtype_bytes=4, mem_bw=5e9,
    causal_tile=512, shared_cores=2, fused_chain=True,
    process_bytes=400 * 2**20,  # resident set of a rank with torch and DeepSpeed imported
    overlap=False, step_overhead=1e-3, call_overhead=1e-3,
    efficiency={"attention": 1.0, "delta_rule": 1.0, "fit": 1.0},
    note="uncalibrated placeholder; run `seqshard bench` and calibrate from its records")
HARDWARE = {"h100": H100_NODE, "h200": H200_NODE, "a100": A100_NODE, "cpu": CPU_DEFAULT}


def load_hardware(name_or_path: str) -> Hardware:
    """A built-in profile by name, or a TOML file whose keys are Hardware's fields."""
    if name_or_path in HARDWARE:
        return HARDWARE[name_or_path]
    if not name_or_path.endswith(".toml"):
        raise ValueError(f"hardware={name_or_path!r}: expected one of {sorted(HARDWARE)} or a "
                         f".toml file")
    with open(name_or_path, "rb") as f:
        data = tomllib.load(f)
    required = [f for f, spec in Hardware.__dataclass_fields__.items()
                if spec.default is spec.default_factory is dataclasses.MISSING]
    missing = [f for f in required if f not in data]
    if missing and set(data) <= set(Hardware.__dataclass_fields__):
        raise ValueError(f"{name_or_path}: missing hardware fields {missing}")
    try:
        return fill(Hardware, data)  # names unknown keys, with a spelling hint
    except ValueError as err:
        raise ValueError(f"{name_or_path}: {err}") from None


@dataclass
class Terms:
    """What one rank does for one fwd+bwd (see module doc); hardware-independent counts."""

    flops_par: float = 0.0
    flops_seq: float = 0.0
    bytes_intra: float = 0.0
    bytes_inter: float = 0.0
    msgs_intra: float = 0.0
    msgs_inter: float = 0.0
    overlappable_bytes: float = 0.0   # part of the bytes that travel during compute (ring)
    gather_bytes: float = 0.0         # part of the bytes sent by all-gather / reduce-scatter
    steps: float = 0.0                # kernel calls and ring steps, in parallel with the others
    steps_seq: float = 0.0            # ... and on a chain across ranks (delta rule "pass")
    copy_bytes: float = 0.0           # elementwise memory traffic beside the kernels
    mem_bytes: float = 0.0


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _send(t: Terms, nbytes: float, msgs: float, group_span: int, hw: Hardware,
          overlappable: bool = False, gather: bool = False) -> None:
    inside = group_span <= hw.devices_per_node
    if inside:
        t.bytes_intra += nbytes
        t.msgs_intra += msgs
    else:
        t.bytes_inter += nbytes
        t.msgs_inter += msgs
    if overlappable:
        t.overlappable_bytes += nbytes
    if gather:
        t.gather_bytes += nbytes


def _agree(t: Terms, checks: int, p: int, hw: Hardware) -> None:
    """`checks` argument checks through seqshard.dist.agree: each all-gathers one fixed-size
    row of facts, so every rank raises together on a bad input instead of hanging."""
    _send(t, checks * AGREE_BYTES * (p - 1), checks * (p - 1), p, hw, gather=True)


# --- per-family counts -------------------------------------------------------------------------
def attention_pieces(impl: str, p: int, u: int, r: int) -> tuple[int, float, float]:
    """(kernel calls, query rows merged, key rows accumulated) of the busiest rank's forward,
    rows in units of the rank's local length after any all-to-all (u * N / P).

    The layouts are the ones the strategies run (zigzag for ring, hybrid and all-gather,
    contiguous for Ulysses) and the counts are those of ops/attention/plan.py's plans;
    tests/test_planner.py checks them against the real plans for P <= 8. Ulysses (and one
    process) is one causal block covering every row: nothing to merge. A zigzag ring rank
    meets its own two chunks in 3 blocks and every other rank's in one coalesced block; the
    all-gather's last rank, whose chunks P-1 and P sit in the middle of the gathered keys,
    gets 2P+1 blocks; a hybrid step meets u members' 2 chunks each, which coalesce poorly.
    """
    if impl in ("sdpa", "seqshard", "ulysses", "ds_ulysses") or p == 1:
        return 1, 0.0, 0.0
    if impl == "ring":
        return p + 2, (p + 2) / 2, p + 0.5
    if impl == "allgather":
        return (2 * p + 1, p + 0.5, p + 0.5) if p > 2 else (4, 2.5, 2.0)
    if impl == "hybrid":  # the last ring index is the busiest
        k_rows = p + 0.5 - 1 / (2 * u)
        return 2 * u * u * r - (u - 1) * (u - 2), k_rows - (u - 2) / 2, k_rows
    raise ValueError(f"attention impl={impl!r}: expected ring, ulysses, hybrid, allgather, "
                     f"sdpa, seqshard or ds_ulysses")


def attention_terms(impl: str, s: dict, n: int, u: int, r: int, hw: Hardware) -> Terms:
    """ring / ulysses / hybrid / allgather (and the peers sdpa, seqshard, ds_ulysses), as
    ops/attention runs them: the ring forward passes whole K/V blocks; its backward fetches
    each remote block head group by head group and returns that group's fp32 dK/dV share
    straight to its owner (one blocking exchange per group and step); the Ulysses stage
    all-to-alls head group by head group (forward q, k, v, out; backward dO, q, k, v, out and
    the fp32 dq, dk, dv); all-gather gathers K/V once and reduce-scatters dK/dV."""
    p = u * r
    b, h, hkv, d, e = s["batch"], s["heads"], s["kv_heads"], s["head_dim"], hw.dtype_bytes
    _check(n % p == 0, f"attention: N={n} is not divisible by P={p}")
    if impl in ("ulysses", "ds_ulysses", "hybrid"):
        _check(h % u == 0, f"{impl}: heads={h} do not divide by the Ulysses degree {u}")
    fwd = 4.0 * b * h * n * n * d * (0.5 if s["causal"] else 1.0) / p
    if s["causal"]:
        # every query row sits on one causal diagonal block, whose last tile of keys is
        # computed whole: the whole sequence for Ulysses (and one process), a zigzag chunk of
        # N / 2P tokens for the others
        whole = impl in ("sdpa", "seqshard", "ulysses", "ds_ulysses") or p == 1
        diagonal = n if whole else n // (2 * p)
        fwd += 4.0 * b * h * (n // p) * d * min(diagonal, hw.causal_tile) / 2
    t = Terms(flops_par=fwd * 3.5)  # backward: 5 N^2 D products against forward's 2
    q_b = b * h * (n // p) * d * e
    kv_b = b * hkv * (n // p) * d * e
    g4 = 4 / e  # gradients travel and add up in fp32
    t.mem_bytes = 2 * (q_b + 2 * kv_b) + q_b  # inputs, their gradients, the output
    calls, q_rows, k_rows = attention_pieces(impl, p, u, r)
    ours = impl in ("ring", "ulysses", "hybrid")
    a2a = u if impl in ("ulysses", "ds_ulysses", "hybrid") else 1
    rep = a2a // math.gcd(hkv, a2a) if impl != "ds_ulysses" else 1  # kv heads copied to u
    kv_rep = kv_b * rep
    # the Ulysses stage's head groups, and the ring backward's slices of one group's heads
    groups = ring_op.head_groups(hkv * rep, u, kv_rep) if ours and u > 1 else 1
    slices = (len(ring_op.head_slices(b, hkv * rep // (groups * u), ring_op.HEAD_GROUPS))
              if ours and r > 1 else 1)
    t.steps = groups * calls * (1 + slices) + 2  # kernel calls both ways; the op both ways
    # LSE merges (forward) and dq, dk, dv sums (backward) run in fp32 over the rows the
    # blocks cover; one local length of all local heads is q_b (kv_rep) in fp32
    t.copy_bytes = 2 * q_rows * q_b * g4 + 2 * k_rows * kv_rep * g4
    if u > 1:
        if impl == "ds_ulysses":  # DeepSpeed: q, k, v, out and their gradients, whole
            moved = 2 * (2 * q_b + 2 * kv_b)
        else:  # forward q, k, v, out; backward dO, q, k, v, out and fp32 dq, dk, dv
            moved = (2 * q_b + 2 * kv_rep) + (3 * q_b + 2 * kv_rep) + (q_b + 2 * kv_rep) * g4
        a2a_calls = 8 if impl == "ds_ulysses" else 12 * groups
        _send(t, moved * (u - 1) / u, a2a_calls * (u - 1), u, hw)
        # head-sharded q, k, v, out (one group's at a time for ours, all at once for DeepSpeed)
        t.mem_bytes += (2 * q_b + 2 * kv_rep) * (1 if impl == "ds_ulysses" else 2 / groups)
        t.copy_bytes += 2 * moved  # packed before each all-to-all, unpacked after
        t.steps += a2a_calls
    if impl in ("ring", "hybrid") and r > 1:
        # forward: whole K, V blocks, r - 1 hops (posted before the step's compute); backward:
        # per remote step and head group, fetch K, V and return the fp32 dK, dV share
        _send(t, (r - 1) * 2 * kv_rep * (1 + 1 + g4), groups * (r - 1) * (1 + 2 * slices), p,
              hw, overlappable=True)
        t.mem_bytes += 4 * kv_rep / slices
        t.steps += groups * (r - 1) * (1 + 2 * slices)
        t.copy_bytes += max(0, r - 2) * 2 * kv_rep * g4  # shares added in (all but step 1)
    if impl in ("ring", "ulysses", "hybrid", "allgather") and p > 1:
        _agree(t, 1, p, hw)  # sharded_attention's check of its arguments
    if impl == "allgather" and p > 1:
        _send(t, 2 * 2 * kv_b * (p - 1), 4 * (p - 1), p, hw, gather=True)
        t.mem_bytes += 4 * kv_b * p
        # the gathered K, V written out, the fp32 dK, dV over the whole sequence summed back
        t.copy_bytes += 2 * p * kv_b + 2 * p * kv_b * g4
        t.steps += 4
    return t


# A fused chain's flop rate over the delta-rule family's (which the suite fits to the whole
# kernel's counted flops). Provenance: commit 9a73aff (2026-11-25), 2-core Xeon CPU VM, fp32,
# 8K tokens, B=1 H=2 D=64: the forward chain does 0.27 GFLOP in 2.7 ms (100 GFLOP/s), the
# kernel ~18 GFLOP/s of counted flops. With it the suite scored 72-74/80 points within 30%
# against 63-65 without. Calibration does not fit it (a fitted chain rate could not be told
# apart from the family's and scored 61/80), so it is a CPU constant.
FUSED_CHAIN_SPEEDUP = 5.0


def delta_rule_terms(impl: str, s: dict, n: int, u: int, r: int, hw: Hardware) -> Terms:
    """chunk (one process), pass (state handed rank to rank), scan (log2 P prefix scan).

    A shard's work splits in two: the state-free part (UT transform, W, U, the chunk-local
    attention: parallel on every rank) and the state chain (S -> P S + H chunk after chunk,
    and the outputs' Q S term: call-bound small products). "pass" runs the chains one rank
    after the other (forward, then backward the other way); "scan" runs them in parallel
    after composing the shard's affine map (middle ranks: two more products per chunk, each
    way) and a log2(P)-round scan of the maps (forward; backward scans A^T with the chain's
    gradient). At P = 2 no rank composes a map (sharded.py), so "scan" runs like "pass".
    Where the chains are fused (hw.fused_chain: one native call on the CPU) they make no
    kernel calls per chunk and their flops count at FUSED_CHAIN_SPEEDUP times the family's
    rate. (A fitted rate of their own cannot be told apart from the family's: the chain's
    flops grow with N like the rest.)
    """
    p = u * r
    b, h, dk, dv, c, e = s["batch"], s["heads"], s["dk"], s["dv"], s["chunk"], 4
    _check(n % p == 0, f"delta_rule: N={n} is not divisible by P={p}")
    n_local = n // p
    chunks = math.ceil(n_local / c)
    links = 0 if hw.fused_chain else chunks  # chain steps issued as separate kernel calls
    speed = FUSED_CHAIN_SPEEDUP if hw.fused_chain else 1.0  # chain flops per family flop
    free = 3.0 * b * h * n_local * (c * (6 * dk + 4 * dv) + c * c / 3)  # fwd + bwd (~2x fwd)
    chain = 3.0 * b * h * n_local * 6 * dk * dv / speed
    state_b = b * h * dk * dv * e
    inputs = b * h * n_local * (2 * dk + dv + 1) * e
    t = Terms(mem_bytes=2 * inputs + b * h * n_local * dv * e + chunks * state_b)
    if impl == "naive":
        _check(p == 1, f"delta_rule naive runs on one process, got P={p}")
        return replace(t, flops_par=3.0 * b * h * n * 4 * dk * dv, steps=2 * n)
    if impl == "chunk" or p == 1:
        return replace(t, flops_par=free + chain, steps=2 * 2 * links)
    # (delta_rule's optional argument check, check=True, is left out: the bench measures the
    # op itself, with check=False)
    if impl == "pass":
        # a middle rank sends one state forward and one gradient back
        _send(t, min(2, p - 1) * state_b, 2 * (p - 1), p, hw)
        return replace(t, flops_par=free, steps=2 * links, flops_seq=chain * p,
                       steps_seq=2 * links * p)
    _check(impl == "scan", f"delta_rule impl={impl!r}: expected naive, chunk, pass or scan")
    rounds = math.ceil(math.log2(p))
    pair_b = b * h * dk * (dk + dv) * e
    if p == 2:
        # sharded.py: rank 0 joins the scan after its chain (its map is a constant) and the
        # last rank's map is never read, so nobody composes one: the chains run one after
        # the other exactly as in "pass", with (zero) [A | B] pairs on the wire
        _send(t, scan_sends(p) * pair_b, 2 * rounds, p, hw)
        return replace(t, flops_par=free, steps=2 * links, flops_seq=chain * p,
                       steps_seq=2 * links * p)
    # a middle rank (the busiest) composes the map [A | B] through every chunk in forward: two
    # [C, Dk] x [Dk, Dk+Dv] products per chunk; in backward it first runs the chain's gradient
    # once with dS_end = 0 for its L (two [C, Dk] x [Dk, Dv] products per chunk)
    compose = 4.0 * b * h * n_local * dk * (dk + dv) / speed
    own_grad = 4.0 * b * h * n_local * dk * dv / speed
    _send(t, scan_sends(p) * pair_b, 2 * rounds, p, hw)
    t.mem_bytes += 2 * pair_b
    return replace(t, flops_par=free + chain + compose + own_grad,
                   steps=2 * 2 * links + 2 * links + 2 * links + 2 * 2 * rounds)


def scan_sends(p: int) -> int:
    """Pairs the busiest rank sends in a forward and a reverse exclusive scan over p ranks
    (round d: position i sends to i + 2^d when that exists; see dist.exclusive_scan)."""
    offsets = [1 << d for d in range(math.ceil(math.log2(p)))] if p > 1 else []
    return max(sum(r + o < p for o in offsets) + sum(r - o >= 0 for o in offsets)
               for r in range(p))


def fit_terms(impl: str, s: dict, n: int, u: int, r: int, hw: Hardware) -> Terms:
    """FIT: local layers in groups, latents gathered for the global layers (fit / naive)."""
    p = u * r
    b, d, g, m, depth, e = s["batch"], s["dim"], s["group_size"], s["latents"], s["depth"], 4
    _check(n % (p * g) == 0, f"fit: N={n} is not a multiple of P={p} x group_size={g}")
    ratio, causal = s.get("mlp_ratio", 4), 0.5 if s["causal"] else 1.0
    lin = 2 * (4 + 2 * ratio) * d * d  # q, k, v, o and the MLP, per token
    lat = m / g  # latents per token
    per_token = (lin + 4 * g * d * causal                  # local layer
                 + lat * (4 * d * d + 4 * g * d) + 4 * d * d  # read
                 + lat * (lin + 4 * (n / g) * m * d * causal)  # global layer over all latents
                 + 8 * d * d + lat * 4 * d * d + 4 * m * d)   # write
    n_local = n // p
    t = Terms(flops_par=3.0 * b * n_local * depth * per_token, steps=8 * depth)
    lat_b = b * (n_local // g) * m * d * e
    t.mem_bytes = b * n_local * d * e * depth * (10 + 2 * ratio) + lat_b * p * depth * 4
    if p > 1 and impl == "fit":
        # per block: each global layer all-gathers its input latents, and the causal write
        # gathers them once more (group g reads group g - 1, which may live on rank r - 1);
        # backward reduce-scatters each. Plus a check of the tokens per block and per stack.
        gathers = depth * (s.get("global_layers", 1) + (1 if s["causal"] else 0))
        _send(t, 2 * gathers * lat_b * (p - 1), 2 * gathers * (p - 1), p, hw, gather=True)
        _agree(t, depth + 1, p, hw)
    return t


_TERMS = {"attention": attention_terms, "delta_rule": delta_rule_terms, "fit": fit_terms}


def terms(family: str, impl: str, shape: dict, n: int, ulysses: int, ring: int,
          hw: Hardware) -> Terms:
    _check(family in _TERMS, f"family={family!r}: expected one of {FAMILIES}")
    _check(n >= 1 and ulysses >= 1 and ring >= 1,
           f"N={n}, ulysses={ulysses}, ring={ring} must be >= 1")
    return _TERMS[family](impl, shape, n, ulysses, ring, hw)


# --- time --------------------------------------------------------------------------------------
def features(t: Terms, p: int, hw: Hardware) -> dict:
    """The quantities time is linear in. On a shared CPU host every kind of work a rank does
    itself (flops, kernel calls, memory passes, copying bytes through gloo) runs at its share
    of a core, min(1, C / P); work on a chain across ranks (the others wait) at a whole core."""
    share = min(1.0, hw.cores_by_world.get(p, hw.shared_cores) / p) if hw.shared_cores else 1.0
    msgs = t.msgs_intra + t.msgs_inter
    return {"flops": t.flops_par / share + t.flops_seq,
            "bytes_intra": t.bytes_intra / share, "bytes_inter": t.bytes_inter / share,
            "gather_bytes": t.gather_bytes / share,
            "copy_bytes": t.copy_bytes / share, "msgs": t.msgs_intra + t.msgs_inter,
            "steps": t.steps / share + t.steps_seq, "call": 1.0 / share,
            "msg_cpu": msgs / share}


def work_features(t: Terms, p: int) -> dict:
    """What one rank itself computes (its CPU time, whatever it waits for): its own share
    of a chain across ranks, everything else whole; no messages (waiting costs no CPU)."""
    return {"flops": t.flops_par + t.flops_seq / p, "bytes": t.bytes_intra + t.bytes_inter,
            "gather_bytes": t.gather_bytes, "copy_bytes": t.copy_bytes,
            "steps": t.steps + t.steps_seq / p, "msgs": t.msgs_intra + t.msgs_inter,
            "call": 1.0}


@dataclass
class Prediction:
    family: str
    impl: str
    n: int
    world: int
    ulysses: int
    ring: int
    time_s: float
    compute_s: float
    comm_s: float
    mem_bytes: float
    sent_bytes: float
    fits: bool


def efficiency(hw: Hardware, family: str, impl: str, world: int = 2) -> float:
    """Fraction of `flops` a kernel reaches: the family's (every strategy of a family runs the
    same local kernel; what differs between strategies is counted, not fitted), or
    'family/impl' for a peer that is a different algorithm (the token-loop delta rule, the
    unsharded FIT oracle)."""
    return hw.efficiency.get(f"{family}/{impl}", hw.efficiency[family])


def predict(family: str, impl: str, shape: dict, n: int, ulysses: int, ring: int,
            hw: Hardware) -> Prediction:
    """Predicted fwd+bwd time, peak memory and bytes sent per rank for one configuration."""
    p = ulysses * ring
    t = terms(family, impl, shape, n, ulysses, ring, hw)
    f = features(t, p, hw)
    compute = (f["flops"] / (hw.flops * efficiency(hw, family, impl, p))
               + f["copy_bytes"] / hw.mem_bw)
    lat = (t.msgs_intra * hw.intra_latency + t.msgs_inter * hw.inter_latency
           + f["msg_cpu"] * hw.msg_cpu)
    extra = (hw.gather_slowdown - 1) * f["gather_bytes"]  # collectives slower per byte
    extra_bw = hw.intra_bw if t.bytes_inter == 0 else hw.inter_bw
    comm = f["bytes_intra"] / hw.intra_bw + f["bytes_inter"] / hw.inter_bw + lat + extra / extra_bw
    overhead = f["steps"] * hw.step_overhead + f["call"] * hw.call_overhead
    if hw.overlap and t.overlappable_bytes:
        bw = hw.intra_bw if t.bytes_inter == 0 else hw.inter_bw
        hidden = t.overlappable_bytes / bw
        total = max(compute, hidden) + (comm - hidden) + overhead
    else:
        total = compute + comm + overhead
    mem = t.mem_bytes * hw.memory_scale[family]
    need = mem * p if hw.shared_cores else mem  # ranks on one host share its memory
    return Prediction(family, impl, n, p, ulysses, ring, total, compute, comm, mem,
                      t.bytes_intra + t.bytes_inter, need <= hw.memory_bytes)


def work_time(family: str, impl: str, shape: dict, n: int, ulysses: int, ring: int,
              hw: Hardware) -> float:
    """Seconds one rank computes itself (its CPU time on a CPU host), waiting excluded: what
    `calibrate` fits first, from the ranks' measured CPU time."""
    p = ulysses * ring
    t = terms(family, impl, shape, n, ulysses, ring, hw)
    w = work_features(t, p)
    bw = hw.intra_bw if t.bytes_inter == 0 else hw.inter_bw
    return (w["flops"] / (hw.flops * efficiency(hw, family, impl, p))
            + w["copy_bytes"] / hw.mem_bw + (w["bytes"] + (hw.gather_slowdown - 1)
                                             * w["gather_bytes"]) / bw
            + w["steps"] * hw.step_overhead + w["msgs"] * hw.msg_cpu
            + w["call"] * hw.call_overhead)


def candidates(family: str, shape: dict, world: int) -> list[tuple[str, int, int]]:
    """(impl, ulysses, ring) for every strategy and mesh split that can run on `world` ranks."""
    _check(family in CANDIDATE_IMPLS, f"family={family!r}: expected one of {FAMILIES}")
    _check(world >= 1, f"world={world} must be >= 1")
    if family != "attention":
        return [(impl, 1, world) for impl in CANDIDATE_IMPLS[family]]
    out = [("ring", 1, world), ("allgather", 1, world)]
    for u in range(2, world + 1):
        if world % u == 0 and shape["heads"] % u == 0:
            out.append(("ulysses", u, 1) if u == world else ("hybrid", u, world // u))
    return out


def plan(family: str, shape: dict, n: int, world: int, hw: Hardware) -> list[Prediction]:
    """Every candidate's prediction, fitting ones first, fastest first.

    >>> llama = {"batch": 1, "heads": 32, "kv_heads": 8, "head_dim": 128, "causal": True}
    >>> best = plan("attention", llama, 1 << 20, 64, H100_NODE)[0]
    >>> best.impl, (best.ulysses, best.ring), best.fits, round(best.time_s, 2)
    ('ring', (1, 64), True, 1.16)
    """
    preds = [predict(family, impl, shape, n, u, r, hw)
             for impl, u, r in candidates(family, shape, world)]
    return sorted(preds, key=lambda x: (not x.fits, x.time_s))
