"""What a worker runs: the models' Trainer, or the launcher's own sharded self-test.

Both offer the Trainer contract of seqshard.models — `step() -> metrics`, `save(dir)`,
`load(dir)`, `exactness_check(seq_len) -> float` — plus `digest()`, a sha256 of the trained
state, so tests can prove that a resumed run ends bit-identical to an uninterrupted one.

The probe task fits w in y = x w by SGD where x is one long sequence [N, d] sharded by a
layout over the sp group: every rank computes the loss and gradient of its own shard, the
pieces are summed with all-reduce over sp (and averaged over dp), so the update equals the
unsharded one. It is small enough for tests and still exercises the layout, the collectives,
the process groups, checkpoints and resume exactly as a real model does.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch

from seqshard.dist import Mesh, all_reduce, get_layout
from seqshard.models.fill import fill

from .config import JobConfig, ProbeConfig


def make_task(cfg: JobConfig, mesh: Mesh):
    """The task object for this job on this rank."""
    if cfg.job.task == "probe":
        return ProbeTask(fill(ProbeConfig, cfg.train, "train"), mesh)
    return TrainTask(cfg, mesh)


def state_digest(tensors) -> str:
    """sha256 over the exact bytes of a sequence of tensors."""
    digest = hashlib.sha256()
    for tensor in tensors:
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(str((tuple(flat.shape), flat.dtype)).encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


class TrainTask:
    """seqshard.models.Trainer behind the task interface."""

    def __init__(self, cfg: JobConfig, mesh: Mesh):
        from seqshard.models import Trainer  # deferred: launch must import without models

        model_cfg = {k: v for k, v in cfg.model.items() if k != "kind"}
        # the [data] table is read when train.task = 'data' ({} = the default corpus)
        self.trainer = Trainer(cfg.model["kind"], model_cfg, dict(cfg.train), mesh,
                               data=dict(cfg.data))

    def step(self) -> dict:
        return dict(self.trainer.step())

    def save(self, directory: Path) -> None:
        self.trainer.save(str(directory))

    def load(self, directory: Path) -> None:
        self.trainer.load(str(directory))

    def exactness_check(self, seq_len: int) -> float:
        return float(self.trainer.exactness_check(seq_len))

    def evaluate(self, eval_config: dict) -> list[dict]:
        """The [eval] section's records (models/evaluate.py) on this rank's trainer."""
        from seqshard.models.evaluate import EvalConfig, evaluate
        from seqshard.models.fill import fill

        return evaluate(self.trainer, fill(EvalConfig, eval_config, "eval"))

    def digest(self) -> str:
        state = self.trainer.full_state_dict()  # full tensors, also under ZeRO-3
        return state_digest(state[name] for name in sorted(state))


class ProbeTask:
    """Sharded least squares: loss = mean over the global sequence of (x_t . w - y_t)^2."""

    def __init__(self, cfg: ProbeConfig, mesh: Mesh):
        self.cfg, self.mesh = cfg, mesh
        self.layout = get_layout(cfg.layout)
        self.layout.check(cfg.seq_len, mesh.size)
        self.w = torch.zeros(cfg.dim, dtype=torch.float64)  # fp64: bit-stable sums
        self.step_count = 0

    def _data(self, step: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The global batch of `step` for this dp replica; identical on every sp rank."""
        seed = self.cfg.seed * 1_000_003 + step * 1009 + self.mesh.dp_rank
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(seq_len, self.cfg.dim, generator=generator, dtype=torch.float64)  # [N, d]
        w_true = torch.linspace(-1.0, 1.0, self.cfg.dim, dtype=torch.float64)
        noise = torch.randn(seq_len, generator=generator, dtype=torch.float64)  # [N]
        y = x @ w_true + 0.01 * noise
        return x, y

    def _shard(self, t: torch.Tensor) -> torch.Tensor:
        return self.layout.shard(t, 0, self.mesh.rank, self.mesh.size)

    def _loss_and_grad(self, x_local, y_local, seq_len) -> tuple[torch.Tensor, torch.Tensor]:
        # this shard's share of the global mean; all-reduce over sp adds the shares up
        r = x_local @ self.w - y_local  # [N_local]
        loss = (r * r).sum() / seq_len
        grad = 2.0 * (x_local.T @ r) / seq_len  # [d]
        both = torch.cat([loss.view(1), grad])
        both = all_reduce(both, self.mesh.group, timeout=self.mesh.timeout)
        return both[0], both[1:]

    def step(self) -> dict:
        start = time.perf_counter()
        n = self.cfg.seq_len
        x, y = self._data(self.step_count, n)
        loss, grad = self._loss_and_grad(self._shard(x), self._shard(y), n)
        if self.mesh.dp_size > 1:  # each replica saw its own batch: average them
            both = torch.cat([loss.view(1), grad])
            both = all_reduce(both, self.mesh.dp_group, timeout=self.mesh.timeout) / self.mesh.dp_size
            loss, grad = both[0], both[1:]
        self.w -= self.cfg.lr * grad
        self.step_count += 1
        return {
            "step": self.step_count, "loss": float(loss),
            "tokens": n * self.mesh.dp_size, "seconds": time.perf_counter() - start,
            "peak_mem_bytes": 0, "accuracy": float("nan"),
        }

    def save(self, directory: Path) -> None:
        # every rank writes its own file, as DeepSpeed does; the manifest covers them all
        torch.save({"w": self.w, "step": self.step_count, "rank": self.mesh.global_rank},
                   Path(directory) / f"probe-rank{self.mesh.global_rank:05d}.pt")

    def load(self, directory: Path) -> None:
        # deferred: launch must import without models; weights-only, so a planted file raises
        # ValueError naming it instead of running code
        from seqshard.models.safe_load import load_weights_only, raise_on_every_rank

        path = Path(directory) / f"probe-rank{self.mesh.global_rank:05d}.pt"
        problem, state = "", None
        try:
            state = load_weights_only(path)
        except ValueError as err:
            problem = str(err)
        raise_on_every_rank(problem, self.mesh, f"checkpoint {str(directory)!r}")
        self.w, self.step_count = state["w"], state["step"]

    def exactness_check(self, seq_len: int) -> float:
        """|sharded loss - unsharded loss| on one batch (plus the gradients' max difference)."""
        x, y = self._data(10**6, seq_len)
        loss, grad = self._loss_and_grad(self._shard(x), self._shard(y), seq_len)
        r = x @ self.w - y
        ref_loss, ref_grad = (r * r).mean(), 2.0 * (x.T @ r) / seq_len
        return max(float((loss - ref_loss).abs()), float((grad - ref_grad).abs().max()))

    def digest(self) -> str:
        return state_digest([self.w, torch.tensor(self.step_count)])

    def evaluate(self, eval_config: dict) -> list[dict]:
        raise ValueError("job.task = 'probe' has no evaluation: [eval] needs job.task = 'train'")
