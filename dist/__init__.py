"""seqshard.dist: ranks and wires.

`Mesh` (who talks to whom), `Layout`s (how a sequence maps onto ranks), autograd-aware
collectives, layout-to-layout moves (`relayout`) and process-group start-up through
DeepSpeed's comm. Knows nothing about models.
"""

from .agree import agree, digest
from .collectives import (
    CollectiveError,
    RingComm,
    all_gather,
    all_reduce,
    all_to_all,
    exchange,
    exclusive_scan,
    heads_to_seq,
    reduce_scatter,
    ring_shift,
    seq_to_heads,
)
from .layout import (
    LAYOUTS,
    Block,
    Contiguous,
    Layout,
    Striped,
    Zigzag,
    get_layout,
    pad_to_multiple,
)
from .mesh import Mesh, MeshShape
from .process_group import (
    default_backend,
    destroy_process_group,
    free_port,
    init_process_group,
    local_rank_env,
)
from .rank_pool import RankDied, RankFailure, RankPool
from .relayout import RelayoutPlan, relayout, relayout_plan

__all__ = [
    "Block", "CollectiveError", "Contiguous", "LAYOUTS", "Layout", "Mesh", "MeshShape",
    "RankDied", "RankFailure", "RankPool", "RelayoutPlan", "RingComm", "Striped", "Zigzag",
    "all_gather", "agree", "all_reduce", "all_to_all", "default_backend",
    "destroy_process_group", "digest", "exchange", "exclusive_scan", "free_port", "get_layout",
    "heads_to_seq", "init_process_group", "local_rank_env", "pad_to_multiple",
    "reduce_scatter", "relayout", "relayout_plan", "ring_shift", "seq_to_heads",
]
