"""The training loop, nanoGPT style: a few small functions that the entry point strings together.

    train(model_cfg, train_cfg)      build model, optimizer and data; step; log; evaluate; summarise
    train_step(...)                  one optimizer step over `grad_accum` micro-batches
    evaluate(...)                    mean loss and accuracy on held-out batches
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from omegaconf import OmegaConf

from megatron_atlas.data.sources import build_source, train_order_seed
from megatron_atlas.data.synthetic import IGNORE_INDEX, accuracy
from megatron_atlas.model import build_model, resolve_ffn_hidden
from megatron_atlas.model.config import ModelConfig
from megatron_atlas.parallel.grads import reduce_sequence_parallel_grads
from megatron_atlas.parallel.state import ParallelState
from megatron_atlas.train.backends import DeepSpeedBackend, NativeBackend, StepResult
from megatron_atlas.train.checkpoint import find_latest
from megatron_atlas.train.config import ParallelConfig, TrainConfig
from megatron_atlas.train.data import TrainStream, fresh_state, upgrade_state
from megatron_atlas.train.distributed import is_main_process, launched_world_size, setup_parallel, uses_deepspeed
from megatron_atlas.train.flops import mfu, training_flops_per_token
from megatron_atlas.train.loss import loss_sum
from megatron_atlas.train.metrics import (MetricsWriter, Progress, format_duration, format_rate,
                                          progress_line)
from megatron_atlas.train.prefetch import StepPrefetcher
from megatron_atlas.train.precision import AutocastFactory, autocast_for, configure_tf32
from megatron_atlas.train.recompute import checkpoint_blocks
from megatron_atlas.train.schedule import lr_at

Batch = tuple[torch.Tensor, torch.Tensor]


def _silent(line: str) -> None:
    """The log of ranks other than 0."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available; use train.device=cpu")
    return torch.device(name)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, micro_batches: Sequence[Batch],
               grad_clip: float, autocast: AutocastFactory = contextlib.nullcontext) -> StepResult:
    """Forward/backward every micro-batch, clip, step; the loss and the grad norm (before clipping)
    stay on the device.

    Each micro-batch's summed loss is divided by the labelled-token count of the whole step, so the
    accumulated gradient is exactly that of one batch holding all micro-batches, however the labels
    are spread over them. The optimizer does not step when the loss or the grad norm is not finite:
    that is the step's one host read.
    """
    n_labels = sum((labels != IGNORE_INDEX).sum() for _, labels in micro_batches).clamp(min=1)
    optimizer.zero_grad(set_to_none=True)
    total = None
    for input_ids, labels in micro_batches:
        with autocast():
            logits = model(input_ids)
        loss = loss_sum(logits, labels) / n_labels
        loss.backward()
        total = loss.detach() if total is None else total + loss.detach()
    max_norm = grad_clip if grad_clip > 0 else float("inf")   # inf: measure the norm, clip nothing
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    skipped = bool(~(torch.isfinite(grad_norm) & torch.isfinite(total)))
    if not skipped:   # a nan/inf step would poison every parameter; the caller counts it
        optimizer.step()
    return StepResult(total, grad_norm, skipped)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Sequence[Batch],
             autocast: AutocastFactory = contextlib.nullcontext) -> dict[str, float]:
    """Loss per labelled token and accuracy of the argmax prediction at the labelled positions."""
    was_training = model.training
    model.eval()
    loss, correct, count = 0.0, 0.0, 0
    for input_ids, labels in batches:
        with autocast():
            logits = model(input_ids)
        n = int((labels != IGNORE_INDEX).sum())
        loss += float(loss_sum(logits, labels))
        correct += accuracy(logits, labels) * n if n else 0.0
        count += n
    model.train(was_training)
    mean = loss / max(1, count)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "accuracy": correct / max(1, count)}


def _to(batch: Batch, device: torch.device) -> Batch:
    return batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)


def _resume_path(cfg: TrainConfig, out_dir: Path, log: Callable[[str], None]) -> Optional[Path]:
    """The checkpoint `cfg.resume` selects (None: start from step 0)."""
    if cfg.resume == "none":
        return None
    path = find_latest(out_dir) if cfg.resume == "auto" else Path(cfg.resume)
    if path is None:
        log(f"resume=auto: no checkpoint under {out_dir}; starting from step 0")
    return path


def _start_loader(cfg: TrainConfig, resumed: Optional[dict], path: Optional[Path]) -> dict:
    """Loader state to start from: the checkpoint's (checked against this run), or a fresh one."""
    if resumed is None:
        return fresh_state(cfg.data, seed=cfg.seed)
    loader = upgrade_state(resumed)
    expected = train_order_seed(cfg.data, cfg.seed)
    if loader["seed"] != expected:
        raise ValueError(f"checkpoint {path} was written with data order seed {loader['seed']}; this run "
                         f"has {expected} (train.seed / train.data.shards.seed), so the data order would "
                         f"not continue")
    return loader


class _FullLogits(torch.nn.Module):
    """Evaluation under TP: the model's vocab-sharded logits gathered into the full vocabulary."""

    def __init__(self, model: torch.nn.Module, parallel: ParallelState) -> None:
        super().__init__()
        self.model, self.parallel = model, parallel

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        from megatron_atlas.parallel.layers import gather_logits
        return gather_logits(self.model(input_ids), self.parallel)


class _NoMetrics:
    path = None

    def write(self, kind: str, **values) -> None:
        pass

    def close(self) -> None:
        pass


def _build_model(model_cfg: ModelConfig, parallel: ParallelState, device: torch.device) -> torch.nn.Module:
    if parallel.tp_size == 1 and parallel.cp_size == 1:
        return build_model(model_cfg).to(device)
    model = build_model(model_cfg, parallel=parallel).to(device)   # the tensor-parallel model
    reduce_sequence_parallel_grads(model, parallel)   # before any engine wraps it
    return model


def train(model_cfg: ModelConfig, cfg: TrainConfig, log: Callable[[str], None] = print,
          parallel_cfg: Optional[ParallelConfig] = None) -> dict:
    """Runs optimizer steps up to `cfg.steps` (from a checkpoint when resuming); returns the summary
    that is also logged and written. Under torchrun/srun every process calls this; rank 0 logs and
    writes metrics, every rank writes its part of the checkpoints."""
    pcfg = parallel_cfg or ParallelConfig()
    deepspeed = uses_deepspeed(pcfg, launched_world_size())
    parallel = setup_parallel(pcfg, deepspeed)
    if not is_main_process():
        log = _silent
    torch.manual_seed(cfg.seed)   # every rank builds the same full weights
    device = resolve_device(cfg.device)
    if device.type == "cuda" and torch.distributed.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device())
    configure_tf32(device, cfg.tf32)
    autocast = contextlib.nullcontext if deepspeed else autocast_for(device, cfg.precision)
    out_dir = Path(cfg.out_dir)
    config_yaml = OmegaConf.to_yaml({"model": model_cfg, "train": cfg, "parallel": pcfg})
    if is_main_process():
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(config_yaml)

    model = _build_model(model_cfg, parallel, device)
    if pcfg.activation_checkpointing:
        checkpoint_blocks(model)
    # counted before ZeRO-3 partitions the parameters
    n_params = sum(p.numel() for p in model.parameters()) if parallel.tp_size > 1 else model.num_parameters()
    n_params_body = model.num_parameters(exclude_embeddings=True)
    resume = _resume_path(cfg, out_dir, log)
    if deepspeed:
        if cfg.compile:
            log("train.compile is not applied under DeepSpeed (the engine wraps the eager model)")
        backend = DeepSpeedBackend(model, pcfg, cfg, parallel, device, resume, log)
    else:
        backend = NativeBackend(model, cfg, autocast, resume)
    start_step = backend.start_step
    if resume is not None:
        log(f"resumed from {resume} at step {start_step}")
    loader = _start_loader(cfg, backend.loader, resume)
    stream = TrainStream(cfg.data, loader, micro_batch_size=cfg.micro_batch_size, seq_len=cfg.seq_len,
                         model_vocab=model_cfg.vocab_size, dp_rank=parallel.dp_rank, dp_size=parallel.dp_size)
    eval_source = build_source(cfg.data, seed=cfg.data.eval_seed, split="eval", batch_size=cfg.micro_batch_size,
                               seq_len=cfg.seq_len, model_vocab=model_cfg.vocab_size)
    eval_batches = [_to(eval_source.batch(i), device) for i in range(cfg.data.eval_batches)]
    forward = backend.engine if deepspeed else backend.step_model
    eval_model = _FullLogits(forward, parallel) if parallel.tp_size > 1 else forward

    engine_desc = f"DeepSpeed ZeRO-{pcfg.zero_stage}" if deepspeed else "PyTorch"
    log(f"model {model_cfg.preset} (block {model_cfg.block}): {n_params / 1e6:.3f}M params"
        f"{' per TP rank' if parallel.tp_size > 1 else ''}, "
        f"{n_params_body / 1e6:.3f}M without embeddings | device "
        f"{device.type} | {engine_desc} {parallel.describe()} | {cfg.steps} steps x "
        f"{cfg.tokens_per_step * parallel.dp_size} tokens ({cfg.micro_batch_size} x {cfg.grad_accum} x "
        f"{cfg.seq_len}{f' x dp {parallel.dp_size}' if parallel.dp_size > 1 else ''}) | out {out_dir}")
    if start_step >= cfg.steps:
        log(f"nothing to do: the checkpoint is at step {start_step} and train.steps={cfg.steps}")
        return {"steps": cfg.steps, **evaluate(eval_model, eval_batches, autocast), "losses": []}
    tokens_per_step = cfg.tokens_per_step * parallel.dp_size
    flops_per_token = training_flops_per_token(resolve_ffn_hidden(model_cfg), cfg.seq_len)
    log(f"training FLOPs per token at seq_len {cfg.seq_len}: {flops_per_token / 1e6:,.2f} M "
        f"(6N would say {6 * n_params_body / 1e6:,.2f} M)")
    metrics = MetricsWriter(out_dir / "metrics.jsonl", append=start_step > 0,
                            tensorboard_dir=out_dir / "tensorboard" if cfg.tensorboard else None) \
        if is_main_process() else _NoMetrics()
    last_step = min(cfg.steps, cfg.exit_at_step) if cfg.exit_at_step > start_step else cfg.steps
    progress = Progress(last_step - start_step, tokens_per_step)
    result: dict[str, float] = {}
    record: dict[str, float] = {}
    bad_in_a_row = skipped = 0

    def step_batches(step: int) -> list[Batch]:   # a pure function of the step: built ahead by a thread
        first = (step - start_step) * cfg.grad_accum
        return [stream.batch(first + j) for j in range(cfg.grad_accum)]
    prefetch = StepPrefetcher(step_batches, range(start_step, last_step), device, cfg.prefetch_steps)
    try:
        for step in range(start_step, last_step):
            lr = lr_at(step, cfg)
            batches = prefetch.next()
            result = backend.step(batches, lr)
            done = step + 1
            finite = not result.skipped
            if finite:
                bad_in_a_row = 0
                progress.add(result.loss)   # read at the next report, not now
            else:   # no optimizer step was taken: the parameters are those before this batch
                loss, grad_norm = float(result.loss), float(result.grad_norm)
                bad_in_a_row, skipped = bad_in_a_row + 1, skipped + 1
                metrics.write("skipped", step=done, loss=loss, grad_norm=grad_norm, in_a_row=bad_in_a_row)
                log(f"step {done}: loss {loss}, grad norm {grad_norm}: skipped ({bad_in_a_row} in a row)")
                if bad_in_a_row >= cfg.max_bad_steps:
                    metrics.close()
                    raise FloatingPointError(
                        f"{bad_in_a_row} steps in a row with a non-finite loss or gradient (last: step {done}); "
                        f"stopping (train.max_bad_steps={cfg.max_bad_steps}). The last checkpoint is in "
                        f"{out_dir / 'checkpoints'}; try a lower train.lr or model.memory.max_lr")

            exiting = done == cfg.exit_at_step
            # a skipped step still reaches the evaluation and checkpoint that fall on it
            if finite and (done % cfg.log_every == 0 or done in (start_step + 1, cfg.steps) or exiting):
                record = progress.report()   # the interval's one host read of the losses
                grad_norm = float(result.grad_norm)
                record["mfu"] = mfu(flops_per_token, record["tokens_per_s"], cfg.peak_tflops)
                log(progress_line(done, cfg.steps, record["loss"], lr, grad_norm, record["tokens_per_s"],
                                  record["eta_s"], record["mfu"]))
                metrics.write("train", step=done, lr=lr, grad_norm=grad_norm, tokens=done * tokens_per_step,
                              flops=done * tokens_per_step * flops_per_token, **record)

            if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps or exiting:
                eval_start = time.perf_counter()
                result = evaluate(eval_model, eval_batches, autocast)
                progress.exclude(time.perf_counter() - eval_start)
                log(f"eval step {done} | loss {result['loss']:.4f} | ppl {result['perplexity']:.2f} | "
                    f"accuracy {result['accuracy']:.3f}")
                metrics.write("eval", step=done, **result)

            if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps or exiting:
                path = backend.save(out_dir, done, stream.state((done - start_step) * cfg.grad_accum),
                                    config_yaml, cfg.keep_last)
                log(f"checkpoint step {done} -> {path}")
            if exiting:
                log(f"train.exit_at_step={done}: stopping; continue with train.resume=auto")
                break
    finally:
        prefetch.close()

    # first: the first step's loss; final: the mean over the last logging interval (less noisy).
    elapsed = time.perf_counter() - progress.start
    first = progress.losses[0] if progress.losses else math.nan
    last = record.get("loss", math.nan)
    summary = {"steps": cfg.steps, "elapsed_s": elapsed, "first_loss": first, "final_loss": last,
               "eval_loss": result["loss"], "eval_accuracy": result["accuracy"],
               "tokens_per_s": len(progress.losses) * tokens_per_step / elapsed,
               "skipped_steps": skipped}
    metrics.write("summary", **summary)
    summary["losses"] = progress.losses   # per step, for callers; not written to the JSONL
    metrics.close()
    log(f"done: {cfg.steps} steps in {format_duration(elapsed)} | loss {first:.4f} -> {last:.4f} | "
        f"eval loss {result['loss']:.4f} accuracy {result['accuracy']:.3f} | "
        f"{format_rate(summary['tokens_per_s'])} tok/s | metrics {metrics.path}")
    return summary
