"""`Mesh`: who talks to whom. Built once and passed explicitly to every sharded op.

Ranks are laid out as [dp, ring, ulysses] with ulysses innermost, so a Ulysses group (the
all-to-all, bandwidth-hungry one) is a run of consecutive ranks, i.e. usually one node:

    global_rank = dp_index * sp + ring_index * ulysses + ulysses_index
    sp_rank     =                 ring_index * ulysses + ulysses_index

The sequence is sharded over the sp group (size sp = ulysses * ring) by a `Layout`.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .process_group import DEFAULT_TIMEOUT_S, init_process_group


@dataclass(frozen=True)
class MeshShape:
    """The degrees of parallelism; the one object that checks they fit the world size.

    dp: data-parallel replicas, each holding one whole sequence-parallel group.
    ulysses: Ulysses (all-to-all) degree inside a sequence-parallel group.
    ring: ring degree across Ulysses groups. sp = ulysses * ring.
    """

    dp: int = 1
    ulysses: int = 1
    ring: int = 1

    def __post_init__(self) -> None:
        for name in ("dp", "ulysses", "ring"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"mesh degree {name}={value!r} must be a positive integer")

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    @property
    def world_size(self) -> int:
        return self.dp * self.sp

    @classmethod
    def fit(
        cls, world_size: int, *, dp: int = 1, ulysses: int = 1, ring: int | None = None
    ) -> "MeshShape":
        """Fill in `ring` (when None) so that dp * ulysses * ring == world_size."""
        if world_size % (dp * ulysses) != 0:
            raise ValueError(
                f"world size {world_size} is not divisible by dp={dp} x ulysses={ulysses}"
            )
        if ring is None:
            ring = world_size // (dp * ulysses)
        shape = cls(dp=dp, ulysses=ulysses, ring=ring)
        if shape.world_size != world_size:
            raise ValueError(
                f"dp={dp} x ulysses={ulysses} x ring={ring} = {shape.world_size} "
                f"!= world size {world_size}"
            )
        return shape

    def coords(self, global_rank: int) -> tuple[int, int, int]:
        """(dp_index, ring_index, ulysses_index) of a global rank."""
        dp_index, sp_rank = divmod(global_rank, self.sp)
        ring_index, ulysses_index = divmod(sp_rank, self.ulysses)
        return dp_index, ring_index, ulysses_index

    def group_ranks(self) -> dict[str, list[list[int]]]:
        """Global rank lists of every sp, ulysses, ring and dp group, in a fixed order."""
        sp, u, r = self.sp, self.ulysses, self.ring
        groups: dict[str, list[list[int]]] = {"sp": [], "ulysses": [], "ring": [], "dp": []}
        for d in range(self.dp):
            base = d * sp
            groups["sp"].append(list(range(base, base + sp)))
            for ri in range(r):
                groups["ulysses"].append(list(range(base + ri * u, base + ri * u + u)))
            for ui in range(u):
                groups["ring"].append([base + ri * u + ui for ri in range(r)])
        for s in range(sp):
            groups["dp"].append([d * sp + s for d in range(self.dp)])
        return groups


@dataclass(frozen=True)
class Mesh:
    """The process groups a sharded op talks over, and where this rank sits in them.

    `size` and `rank` are the SEQUENCE-PARALLEL size and rank: how many shards one sequence
    is cut into, and which shard this rank holds (what every sharded op and layout wants).
    The whole job is `world_size` ranks (dp x sp), this one being `global_rank`.

    `group` is the sequence-parallel group (None when running on one process). For the 2-D
    hybrid, `ulysses_group` spans consecutive sp ranks and `ring_group` strides across them.
    Build with `Mesh.single()`, `Mesh.new(...)` (process group already running) or
    `Mesh.from_env(...)` (join from RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT).
    """

    shape: MeshShape
    rank: int  # sequence-parallel rank: this rank's place in its sp group (0 .. size - 1)
    device: torch.device
    backend: str
    timeout: datetime.timedelta
    global_rank: int = 0  # rank in the whole job: 0 .. world_size - 1
    group: dist.ProcessGroup | None = None
    ulysses_group: dist.ProcessGroup | None = None
    ring_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None
    _ranks: dict = field(default_factory=dict, repr=False, compare=False)

    # --- sizes and coordinates -------------------------------------------------------------
    @property
    def size(self) -> int:
        """Sequence-parallel size (ulysses x ring): the number of shards of one sequence.
        Not the world size (`world_size`, which also counts the dp replicas)."""
        return self.shape.sp

    @property
    def ulysses_size(self) -> int:
        return self.shape.ulysses

    @property
    def ring_size(self) -> int:
        return self.shape.ring

    @property
    def dp_size(self) -> int:
        return self.shape.dp

    @property
    def ulysses_rank(self) -> int:
        return self.rank % self.shape.ulysses

    @property
    def ring_rank(self) -> int:
        return self.rank // self.shape.ulysses

    @property
    def dp_rank(self) -> int:
        """Which data-parallel replica (sp group) this rank belongs to."""
        return self.global_rank // self.shape.sp

    @property
    def world_size(self) -> int:
        """Every rank of the job: dp x sp (`global_rank` is this rank's place in it)."""
        return self.shape.world_size

    def ranks(self, which: str) -> list[int]:
        """Global ranks of this rank's 'sp', 'ulysses', 'ring' or 'dp' group."""
        return list(self._ranks[which])

    # --- constructors ------------------------------------------------------------------------
    @classmethod
    def single(cls, device: str | torch.device = "cpu") -> "Mesh":
        """A one-process mesh: sharded ops reduce to their single-device forms."""
        return cls(
            shape=MeshShape(),
            rank=0,
            device=torch.device(device),
            backend="none",
            timeout=datetime.timedelta(seconds=DEFAULT_TIMEOUT_S),
            _ranks={"sp": [0], "ulysses": [0], "ring": [0], "dp": [0]},
        )

    @classmethod
    def new(
        cls,
        *,
        dp: int = 1,
        ulysses: int = 1,
        ring: int | None = None,
        timeout_s: float | None = None,
        device: str | torch.device | None = None,
    ) -> "Mesh":
        """Build a mesh over the running default process group.

        Every rank must call this with the same degrees, in the same order relative to other
        group creations (torch requires all ranks to create every group).
        """
        if not dist.is_initialized():
            raise RuntimeError(
                "Mesh.new needs a running process group; use Mesh.from_env() to start one"
            )
        world = dist.get_world_size()
        shape = MeshShape.fit(world, dp=dp, ulysses=ulysses, ring=ring)
        backend = dist.get_backend()
        timeout = datetime.timedelta(seconds=timeout_s or DEFAULT_TIMEOUT_S)
        me = dist.get_rank()
        mine: dict[str, dist.ProcessGroup | None] = {}
        my_ranks: dict[str, list[int]] = {}
        for kind, rank_lists in shape.group_ranks().items():
            for ranks in rank_lists:
                # every rank creates every group; keep the one we belong to
                pg = dist.new_group(ranks, timeout=timeout, backend=backend)
                if me in ranks:
                    mine[kind] = pg
                    my_ranks[kind] = ranks
        if device is None:
            if backend == "nccl":
                device = torch.device("cuda", torch.cuda.current_device())
            else:
                device = torch.device("cpu")
        return cls(
            shape=shape,
            rank=me % shape.sp,
            device=torch.device(device),
            backend=backend,
            timeout=timeout,
            global_rank=me,
            group=mine["sp"],
            ulysses_group=mine["ulysses"],
            ring_group=mine["ring"],
            dp_group=mine["dp"],
            _ranks=my_ranks,
        )

    @classmethod
    def from_env(
        cls,
        *,
        dp: int = 1,
        ulysses: int = 1,
        ring: int | None = None,
        backend: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> "Mesh":
        """Join (or adopt) the process group from the environment and build the mesh."""
        init_process_group(backend=backend, timeout_s=timeout_s)
        return cls.new(dp=dp, ulysses=ulysses, ring=ring, timeout_s=timeout_s)

    def describe(self) -> str:
        s = self.shape
        return (
            f"Mesh(rank {self.global_rank}/{s.world_size}: dp {self.dp_rank}/{s.dp}, "
            f"sp {self.rank}/{s.sp} = ring {self.ring_rank}/{s.ring} x "
            f"ulysses {self.ulysses_rank}/{s.ulysses}, {self.backend} on {self.device})"
        )
