"""What a training run will cost before it starts: FLOPs per token and peak memory per GPU.

FLOPs come from `flops.training_flops_per_token` (the model's own ops, counted on the meta device).
Memory is simulated the same way, without allocating anything: one block's forward and backward,
and the LM head with the loss, run on the meta device while a dispatch mode tracks the bytes of
every live tensor (a tensor is live until its last Python reference goes; saved-tensor hooks keep
autograd's saved tensors visible as references). From those, a step's peak is

    weights, AdamW moments (12 bytes per parameter) + the bf16 weight casts under autocast
    + max(end of the forward: the activations every block keeps + the head's and loss's peak,
          backward: the activations still kept + one block's forward-and-backward peak + fp32 gradients)

where a block keeps its saved tensors (without checkpointing) or only its input (per-block
checkpointing: the block's forward runs again inside its backward). tests/test_cost.py checks the
estimate against a measured CPU run (within 25%).
"""
from __future__ import annotations

import contextlib
import weakref
import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_atlas.model.blocks import Block
from megatron_atlas.model.config import ModelConfig
from megatron_atlas.train.loss import loss_sum

GIB = 1024 ** 3


class _FusedAttentionMemory(torch.autograd.Function):
    """Stands in for scaled_dot_product_attention while simulating: on the meta device SDPA takes its
    math path and keeps the T x T probabilities, which the fused kernels a GPU (and the CPU) run
    never keep; they save q, k, v, the output and one log-sum-exp per query."""

    @staticmethod
    def forward(ctx, q, k, v, lse):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None


@contextlib.contextmanager
def _fused_attention_memory():
    plain = F.scaled_dot_product_attention

    def simulated(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is not None:   # masked calls (short sequences, decoding) keep their real cost
            return plain(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                         enable_gqa=enable_gqa)
        return _FusedAttentionMemory.apply(q, k, v, q.new_empty(q.shape[:-1], dtype=torch.float32))

    F.scaled_dot_product_attention = simulated
    try:
        yield
    finally:
        F.scaled_dot_product_attention = plain


class LiveBytes(TorchDispatchMode):
    """Tracks the bytes of the storages that tensors created under it keep alive, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, int] = {}      # storage -> live tensors referring to it
        self.sizes: dict[int, int] = {}
        self.live = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.live -= self.sizes.pop(key)
            del self.refs[key]

    def _track(self, t: torch.Tensor) -> None:
        key = t.untyped_storage()._cdata
        if key not in self.refs:
            self.refs[key], self.sizes[key] = 0, t.untyped_storage().nbytes()
            self.live += self.sizes[key]
            self.peak = max(self.peak, self.live)
        self.refs[key] += 1
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def reset_peak(self) -> None:
        self.peak = self.live


@dataclass
class Phase:
    kept: int     # bytes still live when the forward ends (what autograd keeps, the output)
    peak: int     # the most bytes live at once during forward and backward


def simulate(run_forward: Callable[[], torch.Tensor]) -> Phase:
    """Forward (kept bytes measured at its end), then backward of the result, on the meta device."""
    mode = LiveBytes()
    keep = []   # autograd's saved tensors, as Python references the mode can see
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t), _fused_attention_memory(), mode:
        out = run_forward()
        keep.append(out)
        kept = mode.live
        out.backward(torch.empty_like(out))
        del out, keep
    return Phase(kept, mode.peak)


@dataclass
class MemoryEstimate:
    """Bytes per GPU at the peak of a training step (micro-batch `batch` x `seq_len` tokens)."""

    parameters: int
    weights: int                   # fp32 weights and their bf16 casts under autocast
    moments: int                   # the two fp32 AdamW moments
    gradients: int                 # fp32 parameter gradients
    end_of_forward: int            # activations kept by every block + the head and loss's peak
    during_backward: int           # activations still kept + one block's peak
    per_layer_kept: int            # what one block keeps for its backward (without checkpointing)

    @property
    def weights_and_optimizer(self) -> int:
        return self.weights + self.moments

    @property
    def total(self) -> int:
        return self.weights_and_optimizer + max(self.end_of_forward, self.during_backward + self.gradients)


def estimate_training_memory(cfg: ModelConfig, seq_len: int, batch: int = 1, checkpointing: bool = True,
                             bf16: bool = True, parameters: Optional[int] = None) -> MemoryEstimate:
    """The peak memory of one training step of `cfg` (ffn_hidden resolved), per GPU without TP/ZeRO."""
    return estimates(cfg, seq_len, batch, bf16, parameters)[checkpointing]


def estimates(cfg: ModelConfig, seq_len: int, batch: int = 1, bf16: bool = True,
              parameters: Optional[int] = None) -> dict[bool, MemoryEstimate]:
    """{checkpointing: estimate} for both settings, from one simulation."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    tokens = seq_len + cfg.n_persist
    with torch.device("meta"):
        block = Block(cfg, cfg.ffn_hidden).to(dtype)
        head = torch.nn.Linear(cfg.d_model, cfg.vocab_size, bias=False).to(dtype)
        labels = torch.zeros(batch, seq_len, dtype=torch.long)
        layer = simulate(lambda: block(torch.empty(batch, tokens, cfg.d_model, dtype=dtype, requires_grad=True))[0])
        loss = simulate(lambda: loss_sum(head(torch.empty(batch, seq_len, cfg.d_model, dtype=dtype,
                                                           requires_grad=True)), labels))
        if parameters is None:
            from megatron_atlas.model import build_model
            parameters = build_model(cfg).num_parameters()
    residual = batch * tokens * cfg.d_model * 4           # the fp32 residual stream at a block input
    out = {}
    for checkpointing in (True, False):
        per_layer = residual if checkpointing else layer.kept
        out[checkpointing] = MemoryEstimate(
            parameters, parameters * (4 + (2 if bf16 else 0)), 8 * parameters, 4 * parameters,
            end_of_forward=cfg.n_layers * per_layer + loss.peak,
            during_backward=(cfg.n_layers - 1) * per_layer + layer.peak + residual, per_layer_kept=layer.kept)
    return out


class MemoryBudgetError(ValueError):
    """A run's estimated memory per GPU exceeds `train.memory_budget_gb`; the message names the keys."""


def per_gpu_bytes(estimate: MemoryEstimate, tp: int = 1, dp: int = 1, zero_stage: int = 0) -> int:
    """The estimate spread over a layout, roughly: TP shards weights and activations; ZeRO shards
    the moments over DP (stage >= 1), the gradients (>= 2) and the weights (3)."""
    weights = estimate.weights / (dp if zero_stage >= 3 else 1)
    moments = estimate.moments / (dp if zero_stage >= 1 else 1)
    grads = estimate.gradients / (dp if zero_stage >= 2 else 1)
    activations = max(estimate.end_of_forward, estimate.during_backward + grads) - grads
    return int((weights + moments + grads + activations) / tp)


def check_memory_budget(estimate: MemoryEstimate, budget_gb: float, *, tp: int = 1, dp: int = 1, zero_stage: int = 0,
                        checkpointing: bool = False) -> float:
    """The estimated GiB per GPU; raises MemoryBudgetError when it exceeds `budget_gb` (> 0)."""
    needed = per_gpu_bytes(estimate, tp, dp, zero_stage) / GIB
    if budget_gb > 0 and needed > budget_gb:
        hints = ["train.micro_batch_size (with train.grad_accum to keep the batch)", "train.seq_len"]
        if not checkpointing:
            hints.insert(0, "parallel.activation_checkpointing=true")
        hints += ["parallel.tp", "parallel.zero_stage", "model.memory.chunk / model.memory.ns_block"]
        raise MemoryBudgetError(
            f"this run needs about {needed:.1f} GiB per GPU by its estimate (weights and AdamW "
            f"{per_gpu_bytes(dataclasses.replace(estimate, end_of_forward=0, during_backward=0), tp, dp, zero_stage) / GIB:.1f} GiB, "
            f"the rest activations), over train.memory_budget_gb={budget_gb:g}; lower it with "
            + ", ".join(hints) + " (tools/cost.py prints the estimate for other settings)")
    return needed
