"""The training loop: streams -> mLSTM forward under autocast -> scaled backward -> clip -> Adam.

`Trainer.train()` reads top to bottom; construction lives in `build_*` helpers and the state
that a checkpoint must carry lives in `TrainerState`, the streams and the hidden state.
"""

from __future__ import annotations

import dataclasses
import math
import random
import signal
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from . import __version__
from . import checkpoint as ckpt
from .cell import select_cell
from .checkpoint import Checkpointer, should_save
from .config import ConfigError, TrainConfig, config_to_dict
from .corpus import CorpusError
from .distributed import DistContext
from .evaluate import Evaluator, should_evaluate
from .hardware import model_flops_utilization, peak_flops
from .metrics import NullMetrics, TrainerMetrics
from .model import MLSTM
from .precision import AUTOCAST_DTYPES, MixedPrecision
from .recurrent_matmul import choose_kind
from .report import JsonlLog, ProgressDisplay, StepStats
from .schedule import build_schedule
from .shard_source import open_source
from .storage import RetryPolicy, open_store
from .streams import RowStreams

Hidden = tuple[torch.Tensor, torch.Tensor]


@dataclass(kw_only=True, slots=True)
class TrainerState:
    """Counters a checkpoint carries besides the tensors."""

    step: int = 0
    """Optimizer steps attempted (overflowed ones included)."""
    updates: int = 0
    """Updates actually applied; the LR schedule advances with these only."""
    tokens_seen: int = 0
    """Characters trained on by the whole job."""
    skipped: int = 0
    """Steps skipped because fp16 gradients overflowed."""


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop checks, so it can checkpoint before exiting."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame: object) -> None:
        self.requested = True


def build_model(config: TrainConfig, device: torch.device) -> MLSTM:
    torch.manual_seed(config.seed)  # same initial weights on every rank and every run
    m = config.model
    model = MLSTM(vocab_size=m.vocab_size, embed_dim=m.embed_dim, hidden_size=m.hidden_size,
                  cuda_graphs=config.cuda_graphs)
    return model.to(device)


def build_optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Adam:
    """Adam, fused where torch has the fused kernel (CPU and CUDA).

    Fused: one kernel updates every parameter (on CPU 6x faster than the default per-tensor loop at
    H=1024: 5.7 vs 34 ms), and it skips a step with inf/NaN gradients on the device, so neither
    GradScaler nor :func:`step_unless_nonfinite` has to read a flag back to the host first.
    """
    o = config.optim
    params = list(model.parameters())
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.Adam(params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused or None)


def step_unless_nonfinite(optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor) -> None:
    """``optimizer.step()``, skipped when the gradient norm is inf or NaN (fp32/bf16 runs: no scaler).

    A fused optimizer gets the verdict as a device tensor in ``found_inf``, the attribute GradScaler
    uses to make fused optimizers skip on the device; any other optimizer needs it on the host.
    """
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = (~torch.isfinite(grad_norm)).to(torch.float32)  # type: ignore[attr-defined]
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf  # type: ignore[attr-defined]
    elif math.isfinite(float(grad_norm)):
        optimizer.step()


def describe_compute(config: TrainConfig, device: torch.device) -> str:
    """One line naming the kernels this run's time loops will use, so a slow run shows why in its log.

    A forced ``MLSTM_CELL``/``MLSTM_RECURRENT_MATMUL`` that cannot run here raises ConfigError now,
    before the first step, rather than inside it.
    """
    dtype = AUTOCAST_DTYPES.get(config.precision.mode, torch.float32)  # the loops' dtype under autocast
    hidden = config.model.hidden_size
    cell = select_cell(device, dtype).name
    matmul = choose_kind(device, dtype, (hidden, hidden), config.data.seq_len)
    threads = torch.get_num_threads()
    where = f"{device}, {threads} thread{'s' if threads > 1 else ''}" if device.type == "cpu" else str(device)
    graphs = ", CUDA graphs on" if config.cuda_graphs and device.type == "cuda" else ""
    return f"compute: {where}, {config.precision.mode}; mLSTM cell {cell}, recurrent matmuls {matmul}{graphs}"


def build_ddp(model: MLSTM, config: TrainConfig, ctx: DistContext) -> DistributedDataParallel | None:
    if not ctx.distributed:
        return None
    ddp = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    if config.precision.mode == "fp16":
        # Halve the all-reduce traffic: gradients travel as fp16 and are averaged back into fp32.
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    return ddp


def build_streams(config: TrainConfig, ctx: DistContext) -> RowStreams:
    d = config.data
    source = open_source(d.path, "train", val_fraction=d.val_fraction, workers=d.fetch_workers,
                         retry_seconds=config.retry_seconds)
    if source is None:
        raise CorpusError(f"dataset {d.path} has no train shards; prepare it with at least one train shard")
    return RowStreams(source, global_rows=d.batch_size * ctx.world_size, seq_len=d.seq_len,
                      rank=ctx.rank, world_size=ctx.world_size, prefetch_steps=d.prefetch_steps)


def build_evaluator(config: TrainConfig, ctx: DistContext) -> Evaluator | None:
    """Validation on the held-out split, or None when evaluation is off or the data has no val split."""
    d = config.data
    if config.eval.every == 0:
        return None
    source = open_source(d.path, "val", val_fraction=d.val_fraction, workers=d.fetch_workers,
                         retry_seconds=config.retry_seconds)
    if source is None:
        return None
    return Evaluator(source, rows=config.eval.rows, seq_len=d.seq_len, ctx=ctx, max_steps=config.eval.max_steps)


def build_metrics(config: TrainConfig, ctx: DistContext) -> TrainerMetrics | NullMetrics:
    if config.metrics.port == 0:
        return NullMetrics()
    metrics = TrainerMetrics(job=config.metrics.job, rank=ctx.rank, node=ctx.node)
    # Several ranks share a pod: each serves on the base port plus its local rank.
    metrics.serve(config.metrics.host, config.metrics.port + ctx.local_rank)
    metrics.set_build_info(
        version=__version__, precision=config.precision.mode, hidden_size=config.model.hidden_size, world_size=ctx.world_size
    )
    return metrics


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Trains one process's share of the job; rank 0 also checkpoints, logs and draws progress."""

    def __init__(self, config: TrainConfig, ctx: DistContext, *, metrics: TrainerMetrics | NullMetrics | None = None) -> None:
        self.config = config
        self.ctx = ctx
        self.model = build_model(config, ctx.device)
        self.ddp = build_ddp(self.model, config, ctx)
        self.optimizer = build_optimizer(config, self.model)
        self.precision = MixedPrecision(config.precision, ctx.device.type)
        self.global_batch = config.data.batch_size * ctx.world_size
        self.schedule = build_schedule(config.optim, self.global_batch)
        self.streams = build_streams(config, ctx)
        self.evaluator = build_evaluator(config, ctx)
        self.checkpointer = Checkpointer(
            config.checkpoint.dir, keep=config.checkpoint.keep,
            store=open_store(config.checkpoint.dir, retry=RetryPolicy(max_seconds=config.retry_seconds)),
        )
        self.peak_flops = peak_flops(ctx.device, config.precision.mode)
        self.metrics = metrics if metrics is not None else build_metrics(config, ctx)
        self.log = JsonlLog(config.metrics.log_jsonl if ctx.is_main else "")
        self.state = TrainerState()
        self.hidden: Hidden = self.model.init_state(config.data.batch_size, device=ctx.device)
        self.stop = StopSignal()
        self._saved_step = -1
        self._step_ema = 0.0

    # ----------------------------------------------------------------------------------------
    def train(self, *, show_progress: bool = True) -> TrainerState:
        """Resume if a checkpoint exists, then train until `optim.steps` or a stop signal."""
        self.stop.install()
        display = ProgressDisplay(self.config.optim.steps, start_step=0, enabled=show_progress and self.ctx.is_main)
        try:
            with display:
                self.resume(display)
                # Checked before step 1 (a forced kernel that cannot run stops here), shown after it.
                compute = describe_compute(self.config, self.ctx.device)
                while self.state.step < self.config.optim.steps and not self.stop_requested():
                    stats = self.train_step()
                    if compute and self.ctx.is_main:  # so an error in step 1 stays the only line
                        display.log(compute)
                    compute = ""
                    if self._evaluation_due():
                        stats.val_bpc = self.evaluate(display)
                    self.report(stats, display)
                    if should_save(self.state.step, self.config.checkpoint.every):
                        self.save(display)
                self.save(display)  # the final state, or the state at SIGTERM
        finally:
            self.stop.uninstall()
            self.log.close()
        return self.state

    def train_step(self) -> StepStats:
        """One optimizer step over the next batch of every row stream."""
        started = time.perf_counter()
        batch = self.streams.next_batch()
        data_wait = time.perf_counter() - started
        inputs, targets, reset = (t.to(self.ctx.device, non_blocking=True) for t in (batch.inputs, batch.targets, batch.reset))

        lr = self.schedule(self.state.updates)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        with self.precision.autocast():
            logits, hidden = (self.ddp or self.model)(inputs, self.hidden, reset)
        # The model hands back fp32 logits under autocast: softmax and loss stay in fp32.
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        # Truncated BPTT: the next batch starts from this state but gradients stop here.
        self.hidden = (hidden[0].detach(), hidden[1].detach())

        self.optimizer.zero_grad(set_to_none=True)
        scaler = self.precision.scaler
        scaler.scale(loss).backward()
        scaler.unscale_(self.optimizer)  # true-unit gradients before clipping
        clip = self.config.optim.grad_clip or math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if scaler.is_enabled():
            scaler.step(self.optimizer)  # skips the update itself when it found inf/NaN
            scaler.update()  # halves the scale on overflow, doubles after growth_interval clean steps
        else:
            step_unless_nonfinite(self.optimizer, norm)
        # The step's host sync: loss and gradient norm read back together, after the update is queued.
        loss_value, grad_norm = torch.stack([loss.detach().float(), norm.detach().float()]).tolist()
        overflow = not math.isfinite(grad_norm)

        self.state.step += 1
        self.state.updates += 0 if overflow else 1
        self.state.skipped += 1 if overflow else 0
        self.state.tokens_seen += batch.tokens * self.ctx.world_size
        return self._stats(loss_value, lr, grad_norm, batch.epoch, time.perf_counter() - started, data_wait)

    # ----------------------------------------------------------------------------------------
    def _stats(self, loss: float, lr: float, grad_norm: float, epoch: int, seconds: float, data_wait: float) -> StepStats:
        # A smoothed step time keeps tokens/s and the ETA steady on a noisy machine.
        self._step_ema = seconds if self._step_ema == 0 else 0.9 * self._step_ema + 0.1 * seconds
        steps_left = self.config.optim.steps - self.state.step
        return StepStats(
            step=self.state.step, loss=loss, lr=lr, tokens=self.state.tokens_seen,
            tokens_per_s=self.global_batch * self.config.data.seq_len / self._step_ema,
            loss_scale=self.precision.loss_scale, grad_norm=grad_norm, skipped=self.state.skipped, epoch=epoch, world_size=self.ctx.world_size,
            step_seconds=seconds, data_wait_seconds=data_wait,
            progress=self.state.step / self.config.optim.steps, eta_seconds=steps_left * self._step_ema,
        )

    def _evaluation_due(self) -> bool:
        step = self.state.step
        return self.evaluator is not None and (should_evaluate(step, self.config.eval.every) or step == self.config.optim.steps)

    def evaluate(self, display: ProgressDisplay) -> float:
        """Validation bits per character (collective under DDP: every rank evaluates its rows)."""
        assert self.evaluator is not None
        result = self.evaluator.run(self.model, self.precision)
        display.log(f"step {self.state.step}: validation {result.bpc:.3f} bits/char over {result.chars:,} characters")
        return result.bpc

    def report(self, stats: StepStats, display: ProgressDisplay) -> None:
        rank_tokens = self.config.data.batch_size * self.config.data.seq_len
        # MFU per device: ranks step in lockstep, so each does 1/world_size of the job's tokens/s.
        mfu = model_flops_utilization(self.model.flops_per_token(), stats.tokens_per_s / self.ctx.world_size, self.peak_flops)
        self.metrics.record_step(stats, rank_tokens=rank_tokens, mfu=mfu)
        if stats.val_bpc is not None:
            self.metrics.record_validation(stats.val_bpc)
        self.log.write(stats.log_record())
        if stats.step % self.config.metrics.log_every == 0 or stats.step == self.config.optim.steps:
            display.update(stats)

    # ----------------------------------------------------------------------------------------
    def stop_requested(self) -> bool:
        """A stop signal on any rank stops every rank at the same step (else the others hang)."""
        if not self.ctx.distributed:
            return self.stop.requested
        flag = torch.tensor([float(self.stop.requested)], device=self.ctx.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _gather(self, value: Any) -> list[Any]:
        """Every rank's `value` on rank 0 (a list there, [] elsewhere); [value] without DDP."""
        if not self.ctx.distributed:
            return [value]
        gathered: list[Any] | None = [None] * self.ctx.world_size if self.ctx.is_main else None
        dist.gather_object(value, gathered, dst=0)
        return gathered or []

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything needed to continue exactly where this step left off (collective under DDP)."""
        data = self._gather(self.streams.state_dict())
        hidden = self._gather(tuple(t.cpu() for t in self.hidden))
        return {
            ckpt.MODEL: self.model.state_dict(),
            ckpt.OPTIMIZER: self.optimizer.state_dict(),
            ckpt.SCALER: self.precision.scaler.state_dict(),
            ckpt.TRAINER: dataclasses.asdict(self.state),
            ckpt.DATA: data,
            ckpt.HIDDEN: hidden,
            ckpt.RNG: rng_state(),
            ckpt.CONFIG: config_to_dict(self.config),
        }

    def save(self, display: ProgressDisplay) -> None:
        """Every rank contributes its streams and hidden state; rank 0 writes the checkpoint."""
        if self.state.step == self._saved_step:
            return
        state = self.checkpoint_state()
        self._saved_step = self.state.step
        if self.ctx.is_main:
            display.log(f"saved checkpoint {self.checkpointer.save(self.state.step, state)}")

    def resume(self, display: ProgressDisplay) -> None:
        """Continue from the latest checkpoint in the checkpoint directory, if there is one."""
        folder = self.checkpointer.latest()
        if folder is None:
            return
        state = self.checkpointer.load(folder, map_location=self.ctx.device)
        self._check_compatible(state[ckpt.CONFIG], self.checkpointer.store.url(folder))
        self.model.load_state_dict(state[ckpt.MODEL])
        self.optimizer.load_state_dict(state[ckpt.OPTIMIZER])
        self.precision.scaler.load_state_dict(state[ckpt.SCALER])
        self.state = TrainerState(**state[ckpt.TRAINER])
        self.metrics.resume_from(self.state.skipped)
        saved_world = len(state[ckpt.DATA])
        # Same world size: this rank's own cursor and state; otherwise any cursor re-derives the rows.
        mine = self.ctx.rank if saved_world == self.ctx.world_size else 0
        self.streams.load_state_dict(state[ckpt.DATA][mine])
        if self.streams.resharded:
            display.log(f"world size changed from {saved_world} to {self.ctx.world_size} since the checkpoint: "
                        "rows re-derived, hidden states reset")
        else:
            self.hidden = tuple(t.to(self.ctx.device) for t in state[ckpt.HIDDEN][mine])  # type: ignore[assignment]
        restore_rng_state(state[ckpt.RNG])
        self._saved_step = self.state.step
        display.log(f"resumed from {self.checkpointer.store.url(folder)} at step {self.state.step}")

    def _check_compatible(self, saved: dict[str, Any], path: object) -> None:
        for name, value in saved["model"].items():
            current = getattr(self.config.model, name)
            if current != value:
                raise ConfigError(
                    f"model.{name} is {current} but the checkpoint {path} was trained with {value}; "
                    "use the same model settings or another --checkpoint-dir"
                )
