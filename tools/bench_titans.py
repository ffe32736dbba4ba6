"""Ours against titans-pytorch's NeuralMemory at a matched configuration, forward+backward on CPU.

    pip install -c <(echo torch==$(python -c "import torch; print(torch.__version__.split('+')[0])")) -r requirements-bench.txt
    python tools/bench_titans.py                           # d 384, 4 heads of 96, chunk 64, MLP x4, B=2, T=4096
    MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184 python tools/bench_titans.py

The two implementations do not compute the same rule (the differences are printed); the header
prints the allocator settings, which move titans-pytorch's time several-fold on glibc.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from megatron_atlas.benchmark import add_run_arguments, print_timing, random_input, start_run, time_fwd_bwd, verdict
from megatron_atlas.model.config import MemoryLayerConfig, ModelConfig
from megatron_atlas.model.memory_layer import MemoryLayer

TARGET_OURS_VS_TITANS = 2.0
TITANS_D_MODEL, TITANS_HEADS, TITANS_HEAD_DIM, TITANS_CHUNK, TITANS_EXPANSION = 384, 4, 96, 64, 4

TITANS_DIFFERENCES = (
    "update granularity: titans-pytorch applies ONE update per chunk (the sum of the chunk's "
    "per-token gradients, each weighted by its per-token lr); its momentum and decay gates are "
    "per chunk, from mean-pooled chunk inputs. Ours applies the per-token rule inside the dual "
    "form: every token t has its own weights W_t and per-token alpha, eta, theta gates.",
    "linearisation point: with batch_size=None (its default, the headline row) titans-pytorch "
    "takes every gradient of the sequence at the initial weights W0, so chunks do not depend on "
    "each other; ours takes a chunk's gradients at that chunk's start weights, which carry all "
    "earlier updates (titans-pytorch's batch_size=chunk_size, timed as the second row).",
    "read timing: titans-pytorch reads token t with the weights after the last completed chunk "
    "(chunks shifted by one token), so a token mostly does not see its own chunk's updates; ours "
    "reads token t with W_t, which includes the updates of tokens <= t.",
    "layer extras: ours has a causal depthwise short conv (width 4) on q, k, v and a full-width "
    "sigmoid output gate Linear(d, H*d_v); titans-pytorch has no conv and a per-head scalar "
    "sigmoid gate Linear(d, H) (always on for heads > 1). q/k: ours L2-normalises, titans-pytorch "
    "uses RMSNorm with a learned per-head scale (qk_rmsnorm=True). Ours has the Omega window gate "
    "g (window 1: a per-token loss weight); titans-pytorch has none.",
    "gradients: titans-pytorch gets per-chunk inner gradients from torch.func vmap(grad) "
    "(autograd, differentiated twice in backward); ours uses hand-derived rank-one factors.",
    "initialisation of gate biases and memory weights differs (no effect on speed).",
)

def titans_matched_config() -> ModelConfig:
    """Our side of the comparison: Titans' rule (gd with momentum, l2, window 1, MLP x4)."""
    memory = MemoryLayerConfig(kind="mlp", rule="gd", loss="l2", window=1, degree=1, chunk=TITANS_CHUNK,
                               expansion=TITANS_EXPANSION, momentum=True, impl="chunked")
    return ModelConfig(d_model=TITANS_D_MODEL, n_heads=TITANS_HEADS, memory=memory).validate()


class ResidualMemoryMLP(nn.Module):
    """u + MLP(u) in titans-pytorch's model slot: our `mlp` memory (residual, no LayerNorm)."""

    def __init__(self, dim: int, expansion: float):
        super().__init__()
        from titans_pytorch import MemoryMLP
        # MemoryMLP(depth=2): x @ W1 -> gelu -> @ W2, hidden = expansion * dim, erf GELU like ours
        self.mlp = MemoryMLP(dim, depth=2, expansion_factor=expansion)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(x)


def half_squared_error(pred: Tensor, target: Tensor) -> Tensor:
    """Our l2 inner loss 0.5 ||M(k) - v||^2 (titans-pytorch's default is the mean over d)."""
    return 0.5 * (pred - target).pow(2).sum(dim=-1)


def titans_constructor(batch_size: Optional[int]) -> Dict[str, object]:
    """NeuralMemory keyword arguments matching our layer; printed verbatim by section 3."""
    return {
        "dim": TITANS_D_MODEL, "heads": TITANS_HEADS, "dim_head": TITANS_HEAD_DIM,
        "chunk_size": TITANS_CHUNK,
        "model": f"ResidualMemoryMLP({TITANS_HEAD_DIM}, expansion={TITANS_EXPANSION})",
        "mem_model_norm_add_residual": False,   # its default wraps the MLP in LayerNorm + residual
        "store_memory_loss_fn": "half_squared_error",
        "momentum": True, "momentum_order": 1, "learned_momentum_combine": False,
        "default_step_transform_max_lr": MemoryLayerConfig.max_lr,   # eta = sigmoid(.) * 0.1
        "per_head_learned_parameters": True,    # ours: per-head initial memory weights
        "pre_rmsnorm": False,                   # ours has no input norm inside the layer
        "post_rmsnorm": True,                   # ours: per-head RMSNorm on the memory output
        "qk_rmsnorm": True,                     # ours: L2-normalised q, k
        "activation": "nn.SiLU()",              # ours: SiLU on q, k, v
        "batch_size": batch_size,               # None: one weight set for all gradients (default)
        "attn_pool_chunks": False, "per_parameter_lr_modulation": False,
        "accept_weight_residual": False, "spectral_norm_surprises": False,
        "max_grad_norm": None, "gated_transition": False, "num_kv_per_token": 1,
        "qkv_receives_diff_views": False, "store_with_lookahead_value": False,
        "use_accelerated_scan": False,          # its accelerated scan is a CUDA-only Triton kernel
    }


def build_titans(batch_size: Optional[int], device: torch.device, seed: int) -> nn.Module:
    from titans_pytorch import NeuralMemory
    kwargs = titans_constructor(batch_size)
    kwargs.update(model=ResidualMemoryMLP(TITANS_HEAD_DIM, TITANS_EXPANSION),
                  store_memory_loss_fn=half_squared_error, activation=nn.SiLU())
    torch.manual_seed(seed)
    return NeuralMemory(**kwargs).to(device)


def titans_version() -> Tuple[Optional[str], str]:
    """(version, "") when titans-pytorch imports, else (None, why not)."""
    try:
        from importlib.metadata import version
        import titans_pytorch  # noqa: F401
        return version("titans-pytorch"), ""
    except Exception as error:   # not installed, or installed but broken (e.g. a dependency)
        return None, f"{type(error).__name__}: {error}"


def bench_titans(args: argparse.Namespace, device: torch.device) -> Dict[str, object]:
    """Section 3: ours vs titans_pytorch.NeuralMemory at a matched configuration."""
    batch, length = args.titans_batch, args.titans_length
    print(f"\nours vs titans-pytorch NeuralMemory, fwd+bwd, B={batch} T={length}")
    version, why = titans_version()
    if version is None:
        # pin torch so that pip does not swap the installed build for another one
        print(f"  NOTE: titans-pytorch is not importable ({why}); section skipped. "
              "Install it with\n"
              f"        pip install -c <(echo torch=={torch.__version__.split('+')[0]}) "
              "-r requirements-bench.txt")
        return {"skipped": why}
    cfg = titans_matched_config()
    print(f"  ours: {cfg.memory}, d_model {cfg.d_model}, {cfg.n_heads} heads, B={batch}, fp32")
    print(f"  titans-pytorch {version}: NeuralMemory(")
    for key, value in titans_constructor(args.titans_batch_sizes[0]).items():
        print(f"      {key}={value},")
    print("  )" + (f"  also timed with batch_size in {args.titans_batch_sizes[1:]}"
                   if len(args.titans_batch_sizes) > 1 else ""))
    x = random_input(batch, length, cfg.d_model, device, args.seed)
    torch.manual_seed(args.seed)
    ours_module = MemoryLayer(cfg).to(device)
    ours, _ = time_fwd_bwd("ours chunked", ours_module, x, args.warmup, args.repeats)
    print_timing(ours)
    rows: List[Dict[str, object]] = []
    for batch_size in args.titans_batch_sizes:
        titans_module = build_titans(batch_size, device, args.seed)
        titans, _ = time_fwd_bwd(f"titans-pytorch (batch_size={batch_size})", titans_module, x,
                                 args.warmup, args.repeats)
        print_timing(titans)
        rows.append({"batch_size": batch_size, **titans.as_dict(),
                     "speedup_ours": titans.median / ours.median})
    for row in rows:
        ratio = row["speedup_ours"]
        print(f"  speed-up ours / titans-pytorch (batch_size={row['batch_size']}): {ratio:.2f}x  "
              f"({verdict(ratio, TARGET_OURS_VS_TITANS, True)})")
    print(f"  parameters: ours {sum(p.numel() for p in ours_module.parameters()):,}, "
          f"titans-pytorch {sum(p.numel() for p in titans_module.parameters()):,}")
    print("  known semantic differences:")
    for line in TITANS_DIFFERENCES:
        print(f"    - {line}")
    constructor = titans_constructor(args.titans_batch_sizes[0])
    return {"titans_pytorch_version": version, "ours_config": dataclasses.asdict(cfg.memory),
            "titans_constructor": {k: str(v) for k, v in constructor.items()},
            "ours": ours.as_dict(), "titans": rows, "speedup": rows[0]["speedup_ours"],
            "differences": list(TITANS_DIFFERENCES)}


def batch_size_arg(text: str) -> Optional[int]:
    return None if text.lower() == "none" else int(text)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_run_arguments(p)
    p.add_argument("--titans-batch", type=int, default=2)
    p.add_argument("--titans-length", type=int, default=4096)
    p.add_argument("--titans-batch-sizes", type=batch_size_arg, nargs="+", default=[None],
                   help="NeuralMemory batch_size values to time; the first is the headline. none = all "
                        "gradients at the initial weights (its default); 64 = weights updated after every chunk")
    args = p.parse_args(argv)
    device, env = start_run("bench_titans", args)
    result = {"environment": env, **bench_titans(args, device)}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
