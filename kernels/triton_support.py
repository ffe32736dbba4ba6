"""What every Triton kernel module here needs: is Triton importable, is it interpreting, and the
ahead-of-time compile of one launch configuration (used by tests and tools/bench_memory.py).

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
