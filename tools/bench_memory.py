"""Forward+backward throughput of one memory layer: chunked vs reference, scaling, titans-pytorch.

    python tools/bench_memory.py                       # everything, CPU, fp32
    python tools/bench_memory.py --quick --skip-reference --json /tmp/bench.json
    python tools/bench_memory.py --device cuda --repeats 5

Sections (each prints its figures and the target it is judged against):
  1. `MemoryLayer` with impl=chunked vs impl=reference at one length (default T=2048), same weights
     and input, and the speed ratio (target: chunked >= 10x reference).
  2. chunked at T = 1K .. 16K: time per fwd+bwd, tokens/s and time(8K)/time(2K) (target <= 4.5,
     i.e. close to linear in T).
  3. ours vs `titans_pytorch.NeuralMemory` at a matched configuration (target: ours >= 5x). Needs
     `pip install -r requirements-bench.txt`; without it the section prints a note and is skipped.
  4. the memory operator alone (linear and MLP memory, gd, bf16 inputs, 16 heads, d_k = d_v = 64): impl=triton
     vs impl=chunked at T=8K (target: triton >= 3x), and triton vs FlashAttention-2 causal fwd+bwd
     at T=16K on the same shape (target: triton at least as fast). Needs CUDA; on any device it
     also prints each Triton kernel variant's registers, spill stack and shared memory for sm_80 and
     sm_90, compiled ahead of time (`--kernel-resources all` for every launchable variant).

Methodology: fp32; every measurement builds the module and a random input once, runs `--warmup`
untimed fwd+bwd passes, then reports the median of `--repeats` timed passes (the reference runs
`--reference-repeats` passes and no warm-up: it is a token loop whose first pass is no colder than
the others, and it takes minutes). The loss is mean(y^2), so backward reaches every parameter and
the input. The thread count is torch's default unless --threads is given; the device is
synchronised around each timed pass. Each line also shows the fastest pass, and the header the
1-minute load average: on a shared CPU, other processes (and thread oversubscription) can slow
single passes several-fold.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a checkout, uninstalled

from megatron_atlas.model.config import MemoryLayerConfig, ModelConfig  # noqa: E402
from megatron_atlas.model.memory_layer import MemoryLayer  # noqa: E402

TARGET_CHUNKED_VS_REFERENCE = 10.0
TARGET_SCALING_8K_OVER_2K = 4.5
TARGET_OURS_VS_TITANS = 5.0
TARGET_TRITON_VS_CHUNKED = 3.0
TARGET_TRITON_VS_FLASH = 1.0

# The matched comparison (section 3) is fixed by design; only its length and batch are options.
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


# ----------------------------------------------------------------------------- measurement


@dataclass
class Timing:
    """Seconds per fwd+bwd pass of one module on one input shape."""

    name: str
    batch: int
    length: int
    seconds: List[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def tokens_per_s(self) -> float:
        return self.batch * self.length / self.median

    def as_dict(self) -> Dict[str, object]:
        return {"name": self.name, "batch": self.batch, "length": self.length,
                "seconds": self.seconds, "median_s": self.median, "min_s": self.best,
                "tokens_per_s": self.tokens_per_s}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fwd_bwd(name: str, module: nn.Module, x: Tensor, warmup: int, repeats: int
                 ) -> Tuple[Timing, Tensor]:
    """`warmup` untimed, then `repeats` timed passes of forward + mean(y^2).backward(); last y."""
    timing = Timing(name, x.shape[0], x.shape[1])
    y = None
    for i in range(warmup + repeats):
        module.zero_grad(set_to_none=True)
        x.grad = None
        synchronize(x.device)
        start = time.perf_counter()
        y = module(x)[0]   # our layer and NeuralMemory both return (output, state)
        y.float().square().mean().backward()
        synchronize(x.device)
        if i >= warmup:
            timing.seconds.append(time.perf_counter() - start)
    return timing, y.detach()


def random_input(batch: int, length: int, d_model: int, device: torch.device, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    # requires_grad: in a model the layer's input gradient is always needed by the layers below
    return torch.randn(batch, length, d_model, generator=gen).to(device).requires_grad_()


def build_ours(cfg: ModelConfig, device: torch.device, seed: int) -> MemoryLayer:
    torch.manual_seed(seed)
    return MemoryLayer(cfg.validate()).to(device)


def with_impl(cfg: ModelConfig, impl: str) -> ModelConfig:
    return dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, impl=impl))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def format_length(length: int) -> str:
    return f"{length // 1024}K" if length % 1024 == 0 else str(length)


def print_timing(t: Timing) -> None:
    # the min is shown too: on a shared machine it is the better estimate of the uncontended cost
    print(f"  {t.name:<34} B={t.batch} T={t.length:<6} {t.median * 1e3:10.1f} ms/pass "
          f"{t.tokens_per_s:10,.0f} tok/s  (median of {len(t.seconds)}; min {t.best * 1e3:.1f} ms)")


def verdict(value: float, target: float, at_least: bool) -> str:
    ok = value >= target if at_least else value <= target
    return f"{'meets' if ok else 'MISSES'} target {'>=' if at_least else '<='} {target:g}"


# ----------------------------------------------------------------------------- configuration


def layer_config(args: argparse.Namespace) -> ModelConfig:
    """The config of sections 1 and 2 (defaults: d 256, 4 heads, MLP memory, gd, chunk 64)."""
    memory = MemoryLayerConfig(kind=args.kind, rule=args.rule, loss=args.loss, window=args.window,
                               chunk=args.chunk, degree=args.degree, expansion=args.expansion,
                               momentum=not args.no_momentum, impl="chunked")
    return ModelConfig(d_model=args.d_model, n_heads=args.heads, memory=memory).validate()


def titans_matched_config() -> ModelConfig:
    """Our side of section 3."""
    memory = MemoryLayerConfig(kind="mlp", rule="gd", loss="l2", window=1, degree=1,
                               chunk=TITANS_CHUNK, expansion=TITANS_EXPANSION, momentum=True,
                               impl="chunked")
    return ModelConfig(d_model=TITANS_D_MODEL, n_heads=TITANS_HEADS, memory=memory).validate()


def describe(cfg: ModelConfig) -> Dict[str, object]:
    mem = cfg.memory
    return {"d_model": cfg.d_model, "n_heads": cfg.n_heads, "head_dim": cfg.resolved_head_dim,
            "key_dim": cfg.mem_key_dim, "kind": mem.kind, "rule": mem.rule, "loss": mem.loss,
            "window": mem.window, "chunk": mem.chunk, "degree": mem.degree,
            "expansion": mem.expansion, "momentum": mem.momentum, "max_lr": mem.max_lr,
            "conv_width": mem.conv_width}


def print_config(title: str, config: Dict[str, object]) -> None:
    print(f"  {title}: " + ", ".join(f"{k}={v}" for k, v in config.items()))


# ----------------------------------------------------------------------------- sections


def bench_impls(args: argparse.Namespace, cfg: ModelConfig, device: torch.device
                ) -> Dict[str, object]:
    """Section 1: chunked vs reference on the same weights and input."""
    length = args.length
    print(f"\n[1] MemoryLayer fwd+bwd, chunked vs reference, T={length}")
    print_config("config", {**describe(cfg), "batch": args.batch, "dtype": "fp32"})
    x = random_input(args.batch, length, cfg.d_model, device, args.seed)
    chunked_layer = build_ours(with_impl(cfg, "chunked"), device, args.seed)
    chunked, y_chunked = time_fwd_bwd("ours chunked", chunked_layer, x, args.warmup, args.repeats)
    print_timing(chunked)
    result: Dict[str, object] = {"config": describe(cfg), "chunked": chunked.as_dict()}
    if args.skip_reference:
        print("  reference skipped (--skip-reference)")
        return result
    reference_layer = build_ours(with_impl(cfg, "reference"), device, args.seed)
    reference_layer.load_state_dict(chunked_layer.state_dict())
    reference, y_reference = time_fwd_bwd("ours reference (token loop)", reference_layer, x,
                                          0, args.reference_repeats)
    print_timing(reference)
    ratio = reference.median / chunked.median
    # a sanity check that both timed the same function: the chunked form is exact up to rounding
    max_diff = (y_chunked - y_reference).abs().max().item()
    print(f"  speed-up chunked / reference: {ratio:.1f}x  "
          f"({verdict(ratio, TARGET_CHUNKED_VS_REFERENCE, True)})")
    print(f"  max |y_chunked - y_reference| = {max_diff:.2e}")
    result.update(reference=reference.as_dict(), speedup=ratio, max_abs_diff=max_diff)
    return result


def bench_scaling(args: argparse.Namespace, cfg: ModelConfig, device: torch.device
                  ) -> Dict[str, object]:
    """Section 2: chunked time vs length (linear in T is the goal)."""
    print(f"\n[2] chunked fwd+bwd vs length, B={args.batch}")
    layer = build_ours(cfg, device, args.seed)
    rows: List[Timing] = []
    for length in args.lengths:
        x = random_input(args.batch, length, cfg.d_model, device, args.seed)
        timing, _ = time_fwd_bwd(f"chunked T={format_length(length)}", layer, x,
                                 args.warmup, args.repeats)
        rows.append(timing)
        print_timing(timing)
    result: Dict[str, object] = {"config": describe(cfg), "rows": [t.as_dict() for t in rows]}
    by_length = {t.length: t.median for t in rows}
    if 2048 in by_length and 8192 in by_length:
        ratio = by_length[8192] / by_length[2048]
        print(f"  time(8K) / time(2K) = {ratio:.2f}  (4.00 = linear; "
              f"{verdict(ratio, TARGET_SCALING_8K_OVER_2K, False)})")
        result["ratio_8k_over_2k"] = ratio
    else:
        print("  time(8K) / time(2K): needs both 2048 and 8192 in --lengths")
    return result


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
    print(f"\n[3] ours vs titans-pytorch NeuralMemory, fwd+bwd, B={batch} T={length}")
    version, why = titans_version()
    if version is None:
        # pin torch so that pip does not swap the installed build for another one
        print(f"  NOTE: titans-pytorch is not importable ({why}); section skipped. "
              "Install it with\n"
              f"        pip install -c <(echo torch=={torch.__version__.split('+')[0]}) "
              "-r requirements-bench.txt")
        return {"skipped": why}
    cfg = titans_matched_config()
    print_config("ours", {**describe(cfg), "batch": batch, "dtype": "fp32"})
    print(f"  titans-pytorch {version}: NeuralMemory(")
    for key, value in titans_constructor(args.titans_batch_sizes[0]).items():
        print(f"      {key}={value},")
    print("  )" + (f"  also timed with batch_size in {args.titans_batch_sizes[1:]}"
                   if len(args.titans_batch_sizes) > 1 else ""))
    x = random_input(batch, length, cfg.d_model, device, args.seed)
    ours_module = build_ours(cfg, device, args.seed)
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
    print(f"  parameters: ours {count_parameters(ours_module):,}, "
          f"titans-pytorch {count_parameters(titans_module):,}")
    print("  known semantic differences:")
    for line in TITANS_DIFFERENCES:
        print(f"    - {line}")
    constructor = titans_constructor(args.titans_batch_sizes[0])
    return {"titans_pytorch_version": version, "ours_config": describe(cfg),
            "titans_constructor": {k: str(v) for k, v in constructor.items()},
            "ours": ours.as_dict(), "titans": rows, "speedup": rows[0]["speedup_ours"],
            "differences": list(TITANS_DIFFERENCES)}


def time_op(name: str, run, inputs: Sequence[Tensor], warmup: int, repeats: int) -> Timing:
    """Like time_fwd_bwd for a function of several [B, T, ...] inputs returning y (or (y, state))."""
    timing = Timing(name, inputs[0].shape[0], inputs[0].shape[1])
    for i in range(warmup + repeats):
        for x in inputs:
            x.grad = None
        synchronize(inputs[0].device)
        start = time.perf_counter()
        y = run(*inputs)
        y = y[0] if isinstance(y, tuple) else y
        y.float().square().mean().backward()
        synchronize(inputs[0].device)
        if i >= warmup:
            timing.seconds.append(time.perf_counter() - start)
    return timing


def memory_op_inputs(length: int, device: torch.device, kind: str = "linear", heads: int = 16,
                     dim: int = 64, expansion: int = 4, dtype: torch.dtype = torch.bfloat16,
                     seed: int = 0):
    """q, k, v [1, T, H, d] (bf16, unit-norm keys), gates, and the weights of a `kind` memory
    (linear W [H, d, d]; mlp W1 [H, d, expansion*d], W2 [H, expansion*d, d])."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=gen).to(device)

    q, k = (nn.functional.normalize(torch.randn(1, length, heads, dim, generator=gen), dim=-1)
            .to(device, dtype).requires_grad_() for _ in range(2))
    v = torch.randn(1, length, heads, dim, generator=gen).to(device, dtype).requires_grad_()
    gates = [(0.9 + 0.1 * rand(1, length, heads)).requires_grad_(),
             (0.1 * rand(1, length, heads)).requires_grad_(),
             (0.5 + 0.4 * rand(1, length, heads)).requires_grad_(),
             rand(1, length, heads).requires_grad_()]
    shapes = [(dim, dim)] if kind == "linear" else [(dim, expansion * dim), (expansion * dim, dim)]
    weights = [(0.1 * torch.randn(heads, *shape, generator=gen)).to(device).requires_grad_()
               for shape in shapes]
    return [q, k, v, *gates, *weights]


def kernel_resources(which: str) -> List[Dict[str, object]]:
    """Registers, spill stack and shared memory of the Triton kernels, compiled for sm_80, sm_90."""
    from kernels.memory import MemoryConfig
    from kernels.memory.triton.linear import all_linear_metas, linear_launch_configs, linear_meta
    from kernels.memory.triton.mlp import all_mlp_metas, mlp_launch_configs, mlp_meta
    from kernels.newton_schulz.triton_ns import all_launch_configs, launch_config
    from kernels.triton_support import compile_ahead, compiled_stats
    if which == "all":
        configs = [c for dtype, meta in all_linear_metas() for c in linear_launch_configs(dtype, meta)]
        configs += [c for dtype, meta in all_mlp_metas() for c in mlp_launch_configs(dtype, meta)]
        configs += all_launch_configs()
    else:   # the production shape d = 64 at every chunk size, bf16, with and without a window
        configs = []
        for chunk in (16, 32, 64):
            for window in (1, 4):
                meta = linear_meta(MemoryConfig("linear", "gd", "l2", window, chunk), 64, torch.bfloat16)
                configs += [c for c in linear_launch_configs(torch.bfloat16, meta) if "save=0" not in c.name]
            for window in sorted({1, min(chunk + 1, 65 - chunk)}):   # MLP: c - 1 <= b, b + c - 1 <= 64
                meta = mlp_meta(MemoryConfig("mlp", "gd", "l2", window, chunk), 64, 64, torch.bfloat16)
                configs += [c for c in mlp_launch_configs(torch.bfloat16, meta) if "save=0" not in c.name]
        configs += [launch_config(64, 64), launch_config(64, 128)]
    rows = []
    print(f"  {'kernel variant':<58} {'sm':>3} {'warps':>5} {'stages':>6} {'regs':>5} "
          f"{'spill B':>7} {'smem KiB':>8}")
    for config in configs:
        for capability in (80, 90):
            stats = compiled_stats(compile_ahead(config, capability))
            row = {"kernel": config.name, "sm": capability, "num_warps": config.num_warps,
                   "num_stages": config.num_stages, "registers": stats.registers,
                   "spill_stack_bytes": stats.stack_bytes, "shared_bytes": stats.shared_bytes}
            rows.append(row)
            print(f"  {config.name:<58} {capability:>3} {config.num_warps:>5} {config.num_stages:>6} "
                  f"{stats.registers!s:>5} {stats.stack_bytes!s:>7} {stats.shared_bytes / 1024:8.1f}",
                  flush=True)
    return rows


def bench_triton(args: argparse.Namespace, device: torch.device) -> Dict[str, object]:
    """Section 4: the fused Triton memory operator vs the chunked form and FlashAttention-2."""
    from kernels.memory import Gates, MemoryConfig, memory_forward
    print("\n[4] memory operator fwd+bwd: triton vs chunked, and vs FlashAttention-2")
    result: Dict[str, object] = {}
    chunk = args.chunk if args.chunk in (16, 32, 64) else 64
    configs = {kind: MemoryConfig(kind, "gd", "l2", window=1, chunk=chunk) for kind in ("linear", "mlp")}
    print_config("config", {"kinds": "linear, mlp (hidden 4 x 64)", "rule": "gd", "loss": "l2",
                            "chunk": chunk, "heads": 16, "d_k": 64, "d_v": 64,
                            "dtype": "bf16 in, fp32 state"})
    if device.type != "cuda":
        print("  no CUDA device: Triton timings not measured (open figures); targets are triton >= "
              f"{TARGET_TRITON_VS_CHUNKED:g}x chunked at T=8K and >= FlashAttention-2 at T=16K")
    else:
        def op(kind: str, impl: str):
            names = configs[kind].weight_names
            return lambda q, k, v, a, e, t, g, *w: memory_forward(
                q, k, v, Gates(a, e, t, g), dict(zip(names, w)), configs[kind], impl=impl)

        for kind in configs:
            inputs = memory_op_inputs(args.triton_length, device, kind)
            timings = {impl: time_op(f"{kind} memory op {impl}", op(kind, impl), inputs, args.warmup,
                                     args.repeats) for impl in ("triton", "chunked")}
            for t in timings.values():
                print_timing(t)
            ratio = timings["chunked"].median / timings["triton"].median
            print(f"  {kind}: speed-up triton / chunked: {ratio:.2f}x "
                  f"({verdict(ratio, TARGET_TRITON_VS_CHUNKED, True)})")
            result[kind] = {**{impl: t.as_dict() for impl, t in timings.items()},
                            "speedup_vs_chunked": ratio}
            long_inputs = memory_op_inputs(args.triton_flash_length, device, kind)
            triton_long = time_op(f"{kind} memory op triton", op(kind, "triton"), long_inputs,
                                  args.warmup, args.repeats)
            print_timing(triton_long)
            result[kind]["triton_long"] = triton_long.as_dict()
        try:
            from flash_attn import flash_attn_func
        except ImportError:
            print("  flash-attn not installed (pip install -r requirements-gpu.txt): comparison skipped")
        else:
            long_inputs = memory_op_inputs(args.triton_flash_length, device)
            flash = time_op("flash-attn 2 causal", lambda q, k, v: flash_attn_func(q, k, v, causal=True),
                            long_inputs[:3], args.warmup, args.repeats)
            print_timing(flash)
            result["flash"] = flash.as_dict()
            for kind in configs:
                ratio = flash.median / result[kind]["triton_long"]["median_s"]
                print(f"  {kind} triton vs FlashAttention-2: {ratio:.2f}x "
                      f"({verdict(ratio, TARGET_TRITON_VS_FLASH, True)})")
                result[kind]["speedup_vs_flash"] = ratio
    if args.kernel_resources != "none":
        print(f"  compiled kernel resources ({args.kernel_resources}; ahead of time, no GPU needed):")
        result["kernel_resources"] = kernel_resources(args.kernel_resources)
    return result


# ----------------------------------------------------------------------------- driver


MALLOC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "LD_PRELOAD")


def malloc_settings() -> str:
    """The allocator settings of this process, as set in its environment ("default" if none)."""
    settings = [f"{name}={os.environ[name]}" for name in MALLOC_VARIABLES if name in os.environ]
    return " ".join(settings) or "default"


def environment(device: torch.device) -> Dict[str, object]:
    env: Dict[str, object] = {"torch": torch.__version__, "python": platform.python_version(),
                              "threads": torch.get_num_threads(), "device": str(device),
                              "platform": platform.platform(),
                              # other processes distort CPU timings; this shows how busy it was
                              "loadavg_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
                              # glibc returns large freed blocks to the OS unless told otherwise, and
                              # re-faulting them dominates titans-pytorch's CPU time (README)
                              "malloc": malloc_settings()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def batch_size_arg(text: str) -> Optional[int]:
    return None if text.lower() == "none" else int(text)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads; default: leave torch's default (all cores). 1 is "
                        "steadier on a CPU shared with other jobs")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per measurement (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes before timing")
    p.add_argument("--reference-repeats", type=int, default=1,
                   help="timed passes of the slow reference (no warm-up)")
    p.add_argument("--quick", action="store_true",
                   help="smaller sizes: T=512 for [1], T up to 4K for [2], T=1024 for [3]")
    p.add_argument("--skip-reference", action="store_true", help="section 1 without the reference")
    p.add_argument("--skip-scaling", action="store_true", help="leave out section 2")
    p.add_argument("--skip-titans", action="store_true", help="leave out section 3")
    p.add_argument("--skip-triton", action="store_true", help="leave out section 4")
    p.add_argument("--kernel-resources", default="representative",
                   choices=("representative", "all", "none"),
                   help="section 4: which Triton kernel variants to compile for sm_80/sm_90 and report "
                        "registers, spills and shared memory of (all: every launchable one, slow)")
    p.add_argument("--triton-length", type=int, default=8192, help="T of the triton vs chunked timing")
    p.add_argument("--triton-flash-length", type=int, default=16384,
                   help="T of the triton vs FlashAttention-2 timing")
    p.add_argument("--json", type=Path, default=None,
                   help="also write the figures to this JSON file")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("layer config of sections 1 and 2")
    g.add_argument("--d-model", type=int, default=256)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--kind", default="mlp", choices=("linear", "mlp", "gated_mlp"))
    g.add_argument("--rule", default="gd", choices=("gd", "muon"))
    g.add_argument("--loss", default="l2", choices=("l2", "dot"))
    g.add_argument("--window", type=int, default=1)
    g.add_argument("--chunk", type=int, default=64)
    g.add_argument("--degree", type=int, default=1)
    g.add_argument("--expansion", type=int, default=4)
    g.add_argument("--no-momentum", action="store_true")
    g.add_argument("--batch", type=int, default=1)
    g.add_argument("--length", type=int, default=2048, help="T of section 1")
    g.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384],
                   help="T values of section 2")
    t = p.add_argument_group("titans-pytorch comparison (section 3; the layer shape is fixed)")
    t.add_argument("--titans-batch", type=int, default=2)
    t.add_argument("--titans-length", type=int, default=4096)
    t.add_argument("--titans-batch-sizes", type=batch_size_arg, nargs="+", default=[None, 64],
                   help="NeuralMemory batch_size values to time; the first is the headline. none = "
                        "all gradients at the initial weights (its default); 64 = weights updated "
                        "after every chunk, so gradients are at chunk-start weights like ours")
    args = p.parse_args(argv)
    if args.quick:
        args.length = min(args.length, 512)
        args.lengths = [n for n in args.lengths if n <= 4096]
        args.titans_length = min(args.titans_length, 1024)
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = environment(device)
    print("bench_memory: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    print(f"  warmup={args.warmup} repeats={args.repeats} "
          f"reference_repeats={args.reference_repeats} fp32, loss=mean(y^2), "
          "times are the median of the repeats")
    cfg = layer_config(args)
    results: Dict[str, object] = {"environment": env,
                                  "args": {k: str(v) for k, v in vars(args).items()}}
    results["impls"] = bench_impls(args, cfg, device)
    if not args.skip_scaling:
        results["scaling"] = bench_scaling(args, cfg, device)
    if not args.skip_titans:
        results["titans"] = bench_titans(args, device)
    if not args.skip_triton:
        results["triton"] = bench_triton(args, device)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.json}")
    return results


if __name__ == "__main__":
    main()
