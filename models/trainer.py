"""Trainer: one sharded language model trained through DeepSpeed's engine.

Gradient bookkeeping (why the loss is scaled by sp before backward): every rank's loss term is
its share of its replica's mean loss (see loss.py), so the exact gradient of a replica is the
SUM over its sp ranks of their gradients, and the step wants the MEAN over dp replicas.
DeepSpeed averages gradients over its whole data-parallel world, which here is every rank
(dp x sp; ZeRO also partitions over all of them). Its average is
    (1 / (dp sp)) sum_ranks g_rank = (1 / dp) sum_replicas (1 / sp) g_replica,
so backpropagating sp * loss gives exactly (1 / dp) sum_replicas g_replica.

Data: every rank of a replica builds the same global batch from (seed, step, replica) and keeps
its shard (train.task = 'data': reads only its shard from the corpus, models/corpus.py), so
the data position is just the step counter; `save` / `load` store it with the
DeepSpeed checkpoint (model, optimizer, LR schedule) so a resumed run continues identically.

The optimizer and LR schedule live in optim.py, DeepSpeed's config in engine_config.py, the
one-rank process group for a Trainer without a launcher in bootstrap.py, the config merge in
config.py and the peak-memory probe in seqshard.dist.memory.
"""

from __future__ import annotations

import os
import re
import time

import torch

from seqshard.dist import Mesh, all_gather, all_reduce, get_layout
from seqshard.dist.memory import peak_bytes, reset_peak

from .bootstrap import ensure_single_process_group
from .build import build_model
from .config import LMConfig, TrainConfig, make_train_config, merged_model_config
from .corpus import DataConfig, open_corpus
from .data import RecallTask, random_batch, recall_batch
from .engine_config import deepspeed_config
from .loss import next_token_targets, sharded_accuracy, sharded_lm_loss
from .optim import make_optimizer
from .safe_load import check_checkpoint, install_safe_engine, raise_on_every_rank

_TAG = re.compile(r"^step\d+$")  # the tags `save` writes; anything else in `latest` is refused


class Trainer:
    """Owns the model, the DeepSpeed engine, the layout and the synthetic data.

    Example (2 ranks, e.g. under `torchrun --nproc-per-node 2`):
        mesh = Mesh.from_env(ulysses=1)
        trainer = Trainer("transformer", {"dim": 64, "num_heads": 2},
                          {"seq_len": 256, "steps": 10}, mesh)
        for _ in range(10):
            print(trainer.step())
    """

    def __init__(self, kind: str, model_config: dict | LMConfig,
                 train_config: TrainConfig | dict, mesh: Mesh | None = None,
                 data: DataConfig | dict | None = None):
        """data: the [data] section, read when train_config's task is 'data'."""
        import deepspeed  # deferred: importing deepspeed costs about a second

        self.tc = tc = make_train_config(train_config)
        if tc.task == "data" and data is None:  # never train silently on the default corpus
            raise ValueError("train.task = 'data' needs the [data] section: pass "
                             "Trainer(..., data=...) ({} for the default stdlib corpus)")
        if mesh is None or mesh.world_size == 1:
            ensure_single_process_group()
        self.mesh = mesh or Mesh.single()
        self.kind = kind
        self.model_config = merged_model_config(kind, model_config, tc)
        self.layout = get_layout(self.model_config.layout)  # the train config's, or the model's
        self.layout.check(tc.seq_len, self.mesh.size)
        self.task = RecallTask(tc.vocab_size, tc.recall_pairs, tc.recall_queries)
        if tc.task == "recall" and tc.seq_len < self.task.min_len():
            raise ValueError(f"seq_len={tc.seq_len} < {self.task.min_len()} needed by the "
                             f"recall task (2 * pairs + 2 * queries)")
        self.corpus = None
        if tc.task == "data":  # checked here too: a Trainer need not come from the launcher
            self.corpus = open_corpus(data, tc.vocab_size, seq_len=tc.seq_len,
                                      batch_size=tc.batch_size)
        torch.manual_seed(tc.seed)  # identical initial weights on every rank
        model = build_model(kind, self.model_config, self.mesh).to(self.mesh.device)
        optimizer, scheduler = make_optimizer(model, tc)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(tc))
        install_safe_engine(self.engine)  # resume loads tensors and plain data, never code
        self.step_count = 0
        if (tc.dtype == "bf16" and self.mesh.device.type == "cuda"
                and not torch.cuda.is_bf16_supported()):
            raise ValueError(f"dtype='bf16' but {torch.cuda.get_device_name()} has no bf16; "
                             f"use dtype='fp32'")
        self.autocast = torch.autocast(self.mesh.device.type, dtype=torch.bfloat16,
                                       enabled=tc.dtype == "bf16")

    # --- data --------------------------------------------------------------------------------
    def global_batch(self, step: int, seq_len: int | None = None):
        """(ids [B, N], mask [B, N]) of this replica at `step`, before sharding."""
        tc = self.tc
        seq_len = seq_len or tc.seq_len
        if tc.task == "data":
            ids = self.corpus.batch("train", tc.batch_size, seq_len, seed=tc.seed, step=step,
                                    replica=self.mesh.dp_rank)
            return ids, torch.ones_like(ids, dtype=torch.bool)
        if tc.task == "recall":
            return recall_batch(self.task, tc.batch_size, seq_len, seed=tc.seed, step=step,
                                replica=self.mesh.dp_rank)
        return random_batch(tc.vocab_size, tc.batch_size, seq_len, seed=tc.seed, step=step,
                            replica=self.mesh.dp_rank)

    def local_batch(self, step: int):
        """(ids [B, N_local], mask [B, N_local], doc_lens or None): this rank's shard of the
        batch at `step`. Real data is read shard-only, straight from the corpus."""
        tc = self.tc
        if tc.task != "data":
            ids, mask = self.global_batch(step)
            return self.shard(ids), self.shard(mask), None
        where = dict(seed=tc.seed, step=step, replica=self.mesh.dp_rank)
        positions = self.layout.positions(tc.seq_len, self.mesh.rank, self.mesh.size)
        ids = self.corpus.batch("train", tc.batch_size, tc.seq_len, positions=positions, **where)
        doc_lens = None
        if self.corpus.cfg.packed:  # batch_size is 1 (open_corpus checked): one list
            doc_lens = self.corpus.doc_lens("train", 1, tc.seq_len, **where)[0]
        ids = ids.to(self.mesh.device)
        return ids, torch.ones_like(ids, dtype=torch.bool), doc_lens

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        return self.layout.shard(x, 1, self.mesh.rank, self.mesh.size).to(self.mesh.device)

    def _dp_mean(self, value: float) -> float:
        """The mean of `value` over the dp replicas (a timed collective: a dead or stalled
        replica raises CollectiveError instead of hanging)."""
        total = all_reduce(torch.tensor([value], dtype=torch.float64), self.mesh.dp_group,
                           timeout=self.mesh.timeout)
        return float(total) / self.mesh.dp_size

    # --- training ----------------------------------------------------------------------------
    def step(self) -> dict:
        """One optimizer step. Returns step, loss (global mean), accuracy, lr, tokens, seconds,
        peak_mem_bytes; loss and accuracy are the same on every rank."""
        reset_peak(self.mesh.device)
        start = time.perf_counter()
        ids, mask, doc_lens = self.local_batch(self.step_count)  # [B, N_local]
        targets = next_token_targets(ids, self.mesh, layout=self.layout)
        self.engine.train()
        with self.autocast:
            # the loss path of the model: head + loss in pieces, no [N_local, V] logits
            if doc_lens is None:
                loss, predictions = self.engine(ids, targets, mask)
            else:
                loss, predictions = self.engine(ids, targets, mask, doc_lens=doc_lens)
        self.engine.backward(loss * self.mesh.size)  # see the module docstring
        lr = self.engine.get_lr()[0]
        self.engine.step()
        accuracy = sharded_accuracy(predictions, targets, mask, self.mesh)
        self.step_count += 1
        return {
            "step": self.step_count,
            "loss": self._dp_mean(float(loss.detach())),
            "accuracy": self._dp_mean(accuracy),
            "lr": lr,
            "tokens": self.tc.batch_size * self.tc.seq_len * self.mesh.dp_size,
            "seconds": time.perf_counter() - start,
            "peak_mem_bytes": peak_bytes(self.mesh.device),
        }

    # --- checkpoints -------------------------------------------------------------------------
    def save(self, directory: str) -> None:
        """Write a DeepSpeed checkpoint plus our step (= data position) and RNG states."""
        if not os.path.isdir(directory):
            raise ValueError(f"checkpoint directory {directory!r} does not exist")
        state = {"step": self.step_count, "torch_rng": torch.get_rng_state(),
                 "kind": self.kind, "seed": self.tc.seed, "data": self._data_fingerprint()}
        self.engine.save_checkpoint(directory, tag=f"step{self.step_count}", client_state=state)

    def load(self, directory: str) -> None:
        """Resume from the latest checkpoint in `directory` (written by `save`).

        Nothing in the folder is unpickled beyond tensors and plain data: a tampered file
        raises ValueError naming it, on every rank, before any rank starts DeepSpeed's load
        (whose collectives would otherwise wait on the rank that failed)."""
        problem, tag = "", None
        try:
            tag = self._latest_tag(directory)
            check_checkpoint(os.path.join(directory, tag))
        except ValueError as err:
            problem = str(err)
        raise_on_every_rank(problem, self.mesh, f"checkpoint {directory!r}")
        path, state = self.engine.load_checkpoint(directory, tag=tag)
        if path is None:
            raise ValueError(f"no DeepSpeed checkpoint found in {directory!r}")
        if state.get("kind") != self.kind or state.get("seed") != self.tc.seed:
            raise ValueError(f"checkpoint in {directory!r} is for kind={state.get('kind')!r} "
                             f"seed={state.get('seed')!r}, not {self.kind!r} seed={self.tc.seed}")
        if state.get("data") != self._data_fingerprint():
            raise ValueError(f"checkpoint in {directory!r} was trained on data "
                             f"{state.get('data')}, not {self._data_fingerprint()}")
        self.step_count = int(state["step"])
        torch.set_rng_state(state["torch_rng"])

    def _data_fingerprint(self) -> dict | None:
        return None if self.corpus is None else self.corpus.fingerprint()

    @staticmethod
    def _latest_tag(directory: str) -> str:
        """The tag in DeepSpeed's `latest` file, checked to be one `save` writes (so a planted
        `latest` cannot point the load at a path outside the folder)."""
        latest = os.path.join(directory, "latest")
        if not os.path.isfile(latest):
            raise ValueError(f"no DeepSpeed checkpoint found in {directory!r} (no 'latest' file)")
        with open(latest) as f:
            tag = f.read().strip()
        if not _TAG.match(tag):
            raise ValueError(f"{latest!r} names tag {tag[:80]!r}; expected step<N> as written "
                             f"by Trainer.save")
        return tag

    # --- checks ------------------------------------------------------------------------------
    def full_state_dict(self) -> dict:
        """The model's parameters as full tensors (gathered from ZeRO-3 partitions)."""
        module = self.engine.module
        if self.tc.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters())):
                return {k: v.detach().clone() for k, v in module.state_dict().items()}
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def exactness_check(self, seq_len: int) -> float:
        """Max abs difference of loss and logits between the sharded model and an unsharded copy
        run on the gathered sequence (fp32, random tokens, this step's weights; max over ranks)."""
        self.layout.check(seq_len, self.mesh.size)
        ids, _ = random_batch(self.tc.vocab_size, 1, seq_len, seed=self.tc.seed,
                              step=-1 - self.step_count, replica=self.mesh.dp_rank)
        ids_local = self.shard(ids)
        self.engine.eval()
        logits = self.engine(ids_local).float()  # [1, N_local, V]
        loss = sharded_lm_loss(logits, ids_local, self.mesh, layout=self.layout)
        reference = build_model(self.kind, self.model_config, Mesh.single()).to(self.mesh.device)
        reference.load_state_dict(self.full_state_dict())
        full_logits = reference(ids.to(self.mesh.device)).float()  # [1, N, V]
        full_loss = sharded_lm_loss(full_logits, ids.to(self.mesh.device))
        error = max(float((loss - full_loss).abs()),
                    float((logits - self.shard(full_logits)).abs().max()))
        # the max over every rank: over this sp group, then over the dp replicas (timed
        # collectives; each is a no-op on a group of one)
        errors = torch.tensor([error], dtype=torch.float64)
        for group in (self.mesh.group, self.mesh.dp_group):
            errors = all_gather(errors.amax().reshape(1), 0, group, timeout=self.mesh.timeout)
        return float(errors.amax())
