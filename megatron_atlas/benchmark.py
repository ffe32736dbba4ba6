"""What the benchmark scripts (tools/bench_*.py) share: timing of forward+backward passes, the
environment header that makes a CPU figure reproducible, and the machine's own matmul rate.

Methodology: every measurement builds the module and a random input once, runs `warmup` untimed
passes, then reports the median of `repeats` timed passes (and the fastest: on a shared CPU it is
the better estimate of the uncontended cost). The loss is mean(y^2), so the backward reaches every
parameter and the input. The device is synchronised around each pass.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn

MALLOC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "LD_PRELOAD")


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
        return {"name": self.name, "batch": self.batch, "length": self.length, "seconds": self.seconds,
                "median_s": self.median, "min_s": self.best, "tokens_per_s": self.tokens_per_s}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fwd_bwd(name: str, module: nn.Module, x: Tensor, warmup: int, repeats: int) -> Tuple[Timing, Tensor]:
    """`warmup` untimed, then `repeats` timed passes of forward + mean(y^2).backward(); last y."""
    timing = Timing(name, x.shape[0], x.shape[1])
    y = None
    for i in range(warmup + repeats):
        module.zero_grad(set_to_none=True)
        x.grad = None
        synchronize(x.device)
        start = time.perf_counter()
        out = module(x)
        y = out[0] if isinstance(out, tuple) else out
        y.float().square().mean().backward()
        synchronize(x.device)
        if i >= warmup:
            timing.seconds.append(time.perf_counter() - start)
    return timing, y.detach()


def random_input(batch: int, length: int, d_model: int, device: torch.device, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    # requires_grad: in a model the layer's input gradient is always needed by the layers below
    return torch.randn(batch, length, d_model, generator=gen).to(device).requires_grad_()


def print_timing(t: Timing) -> None:
    print(f"  {t.name:<34} B={t.batch} T={t.length:<6} {t.median * 1e3:10.1f} ms/pass "
          f"{t.tokens_per_s:10,.0f} tok/s  (median of {len(t.seconds)}; min {t.best * 1e3:.1f} ms)")


def verdict(value: float, target: float, at_least: bool) -> str:
    ok = value >= target if at_least else value <= target
    return f"{'meets' if ok else 'MISSES'} target {'>=' if at_least else '<='} {target:g}"


def malloc_settings() -> str:
    """The allocator settings of this process, as set in its environment ("default" if none)."""
    return " ".join(f"{n}={os.environ[n]}" for n in MALLOC_VARIABLES if n in os.environ) or "default"


def flush_to_zero_on() -> bool:
    """Whether this thread flushes subnormal floats (torch.set_flush_denormal); the memory operator's
    CPU workers always do, whatever this says."""
    return float((torch.tensor([1e-39]) * 1.0001).item()) == 0.0


def environment(device: torch.device) -> Dict[str, object]:
    env: Dict[str, object] = {"torch": torch.__version__, "python": platform.python_version(),
                              "threads": torch.get_num_threads(), "device": str(device),
                              "cpu": platform.processor() or platform.machine(),
                              # other processes distort CPU timings; this shows how busy it was
                              "loadavg_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
                              # glibc returns large freed blocks to the OS unless told otherwise, and
                              # re-faulting them costs titans-pytorch much of its CPU time
                              "malloc": malloc_settings(), "flush_to_zero": flush_to_zero_on()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def print_header(tool: str, device: torch.device, warmup: int, repeats: int) -> Dict[str, object]:
    env = environment(device)
    print(f"{tool}: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    print(f"  warmup={warmup} repeats={repeats}, loss=mean(y^2), times are the median of the repeats")
    return env


def matmul_rate(shapes: Sequence[Tuple[int, int, int, int]], device: torch.device, repeats: int = 20) -> float:
    """GFLOP/s of batched fp32 matmuls [batch, m, k] @ [batch, k, n] of the given shapes, all threads:
    the ceiling a layer built from such products can reach on this machine."""
    flops, seconds = 0.0, 0.0
    for batch, m, k, n in shapes:
        a, b = torch.randn(batch, m, k, device=device), torch.randn(batch, k, n, device=device)
        torch.bmm(a, b)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            torch.bmm(a, b)
        synchronize(device)
        seconds += time.perf_counter() - start
        flops += 2.0 * batch * m * k * n * repeats
    return flops / seconds / 1e9


def counted_flops(build: Callable[[], nn.Module], shape: Sequence[int]) -> int:
    """FLOPs of one forward+backward pass of the module `build()` makes, on an input of `shape`,
    by torch's FLOP counter on the meta device (on CPU the memory recurrence runs on worker
    threads, which a thread-local counter would not see)."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        module = build()
        x = torch.empty(*shape, requires_grad=True)
        with FlopCounterMode(display=False) as counter:
            out = module(x)
            y = out[0] if isinstance(out, tuple) else out
            y.float().square().mean().backward()
    return counter.get_total_flops()


def add_run_arguments(parser) -> None:
    """The options every benchmark takes: device, threads, warm-up and timed passes, seed, JSON."""
    from pathlib import Path
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's; 1 is steadier on a shared CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per measurement (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes before timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")


def start_run(tool: str, args) -> Tuple[torch.device, Dict[str, object]]:
    """Applies add_run_arguments' options and prints the header: (device, environment)."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    return device, print_header(tool, device, args.warmup, args.repeats)


def add_layer_arguments(parser) -> None:
    """The memory layer a benchmark times: the defaults (d 256, 4 heads of 64, MLP memory x4, gd,
    chunk 64), or --preset at --size."""
    g = parser.add_argument_group("the layer (the defaults, or a preset at a size)")
    g.add_argument("--preset", default=None, help="e.g. atlas, titans (with --size)")
    g.add_argument("--size", default="170M")
    g.add_argument("--d-model", type=int, default=256)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--kind", default="mlp", choices=("linear", "mlp", "gated_mlp"))
    g.add_argument("--rule", default="gd", choices=("gd", "muon", "muon_block"))
    g.add_argument("--loss", default="l2", choices=("l2", "dot"))
    g.add_argument("--window", type=int, default=1)
    g.add_argument("--chunk", type=int, default=64)
    g.add_argument("--degree", type=int, default=1)
    g.add_argument("--expansion", type=int, default=4)
    g.add_argument("--no-momentum", action="store_true")


def layer_config(args):
    """The ModelConfig of add_layer_arguments' options (memory impl=chunked)."""
    from megatron_atlas.configs import compose, to_model_config
    from megatron_atlas.model.config import MemoryLayerConfig, ModelConfig
    if args.preset:
        return to_model_config(compose(args.preset, args.size, overrides=["model.memory.impl=chunked"]))
    memory = MemoryLayerConfig(kind=args.kind, rule=args.rule, loss=args.loss, window=args.window, chunk=args.chunk,
                               degree=args.degree, expansion=args.expansion, momentum=not args.no_momentum,
                               impl="chunked")
    return ModelConfig(d_model=args.d_model, n_heads=args.heads, memory=memory).validate()
