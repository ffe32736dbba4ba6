"""What every Triton kernel module here needs: is Triton importable, is it interpreting, and the
ahead-of-time compile of one launch configuration (used by tests and kernels/memory/triton/resources.py).

Triton decides at `@triton.jit` decoration time whether a kernel is compiled or interpreted
(TRITON_INTERPRET=1, read when the kernel module is imported), so `interpreted(kernel)` asks the
kernel object itself rather than the environment.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Dict, Optional

try:
    import triton
    import triton.language as tl  # noqa: F401  (re-exported for the kernel modules)
    HAS_TRITON = True
except ImportError:  # a CPU-only install: every Triton path reports itself as not covered
    tl = None
    HAS_TRITON = False

    class triton:  # noqa: N801 - stands in for the module
        """Lets kernel modules import without Triton (an HF export imports every vendored module);
        nothing launches a kernel when HAS_TRITON is False."""

        @staticmethod
        def jit(fn=None, **options):
            return fn if fn is not None else (lambda f: f)

# Names of tl.dot input precisions: exact fp32 for fp32 inputs, tf32 tensor cores for 16-bit ones.
IEEE, TF32 = "ieee", "tf32"


def interpreted(kernel) -> bool:
    """True when `kernel` was decorated under TRITON_INTERPRET=1 (it then runs on CPU tensors)."""
    return type(kernel).__name__ == "InterpretedFunction"


def device_reason(kernel, tensor) -> Optional[str]:
    """Why `kernel` cannot run on `tensor`'s device, or None when it can."""
    if not HAS_TRITON:
        return "triton is not installed"
    if tensor.is_cuda:
        return None if not interpreted(kernel) else "TRITON_INTERPRET=1 with a CUDA tensor"
    if interpreted(kernel):
        return None
    return f"device {tensor.device} (Triton needs CUDA, or TRITON_INTERPRET=1 for the CPU interpreter)"


def next_pow2(n: int, floor: int = 16) -> int:
    """Smallest power of two >= max(n, floor); tl.dot needs every block dimension >= 16."""
    return max(floor, 1 << max(0, (n - 1).bit_length()))


TRITON_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@dataclass(frozen=True)
class LaunchConfig:
    """One compiled variant of a kernel: its pointer dtypes, constexprs and warps."""

    name: str                       # a label for tables, e.g. "linear_fwd bf16 b=64 N=64 D=64 V=32"
    kernel: object                  # the @triton.jit function
    signature: Dict[str, str]       # argument name -> "*fp32" | "i32" | "constexpr"
    constexprs: Dict[str, object] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 1


@dataclass(frozen=True)
class CompiledStats:
    registers: Optional[int]   # per thread, from the cubin (None if cuobjdump is missing)
    stack_bytes: Optional[int]  # per-thread stack frame: registers spilled to local memory
    shared_bytes: int           # dynamic shared memory per block (metadata.shared)


def _cuobjdump() -> Optional[str]:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else None


def _resource_usage(cubin: bytes) -> Dict[str, int]:
    """REG and STACK of the kernel in `cubin`, read with the cuobjdump bundled with Triton."""
    tool = _cuobjdump()
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    usage = {}
    for token in text.split():
        key, _, value = token.partition(":")
        if key in ("REG", "STACK") and value.isdigit():
            usage[key] = int(value)
    return usage


def compile_ahead(config: LaunchConfig, capability: int):
    """Compile `config` for sm_<capability> without a GPU; returns Triton's compiled kernel."""
    try:   # in a try block so that an HF export (which vendors this file) does not require triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as err:
        raise RuntimeError("compiling kernels ahead of time needs triton installed") from err

    source = ASTSource(fn=config.kernel, signature=config.signature, constexprs=config.constexprs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})


def compiled_stats(compiled) -> CompiledStats:
    usage = _resource_usage(compiled.asm["cubin"]) if "cubin" in compiled.asm else {}
    return CompiledStats(usage.get("REG"), usage.get("STACK"), compiled.metadata.shared)


# Opt-in shared memory per block by compute capability (CUDA programming guide, "Technical
# Specifications"), for when torch does not report it. sm_86 / sm_89 (A10, A40, L4, L40S, RTX 30xx
# and 40xx) allow far less than an A100 or H100.
SHARED_MEMORY_PER_BLOCK = {70: 96 * 1024, 75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024,
                           89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024, 120: 99 * 1024}


@dataclass(frozen=True)
class DeviceLimits:
    capability: int      # e.g. 86 for sm_86
    shared_bytes: int    # dynamic shared memory one block may opt into


def device_limits(device) -> DeviceLimits:
    """The limits of the CUDA device a kernel would launch on."""
    import torch
    props = torch.cuda.get_device_properties(device)
    capability = props.major * 10 + props.minor
    shared = getattr(props, "shared_memory_per_block_optin", 0) or SHARED_MEMORY_PER_BLOCK.get(capability, 48 * 1024)
    return DeviceLimits(capability, int(shared))


_shared_needed: Dict[tuple, int] = {}


def shared_bytes_needed(config: LaunchConfig, capability: int) -> int:
    """Shared memory one block of `config` takes on sm_<capability>, compiled ahead of time once."""
    key = (config.name, capability)
    if key not in _shared_needed:
        _shared_needed[key] = compile_ahead(config, capability).metadata.shared
    return _shared_needed[key]


def shared_memory_reason(configs, limits: DeviceLimits) -> Optional[str]:
    """None when every variant in `configs` fits the device's shared memory, else the first that does not."""
    for config in configs:
        needed = shared_bytes_needed(config, limits.capability)
        if needed > limits.shared_bytes:
            return (f"shared memory: {config.name} needs {needed / 1024:.0f} KiB per block, "
                    f"sm_{limits.capability} allows {limits.shared_bytes / 1024:.0f} KiB")
    return None
