"""Every Triton kernel compiles ahead of time for sm_80 and sm_90, with no GPU.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` runs the whole pipeline down to
a cubin (ptxas is bundled with Triton). The default suite compiles a representative set: the
smallest and the production-sized variant of each kernel, fp32 and bf16; `-m slow` compiles every
variant a covered call can launch with (`all_linear_metas`, `all_mlp_metas`, `all_launch_configs`)
for both targets.
Compiling needs kernels decorated without TRITON_INTERPRET, which is how pytest imports them here
(the interpreter tests set it only in their own subprocess).
"""
from __future__ import annotations

import pytest
import torch

from kernels.memory import MemoryConfig
from kernels.memory.triton.linear import all_linear_metas, linear_launch_configs, linear_meta
from kernels.memory.triton.mlp import all_mlp_metas, mlp_launch_configs, mlp_meta
from kernels.newton_schulz.triton_ns import all_launch_configs, launch_config
from kernels.triton_support import (SHARED_MEMORY_PER_BLOCK, DeviceLimits, compile_ahead, compiled_stats,
                                    interpreted, shared_memory_reason)

TARGETS = (80, 90)
SMALL_SHARED_TARGETS = (86, 89)   # A10 / A40 / L4 / L40S / RTX: 99 KiB per block


def _representative():
    small = linear_meta(MemoryConfig("linear", "gd", "l2", window=2, chunk=16), 16, torch.float32)
    large = linear_meta(MemoryConfig("linear", "gd", "dot", window=1, chunk=64), 64, torch.bfloat16)
    configs = linear_launch_configs(torch.float32, small)[::2] + linear_launch_configs(torch.bfloat16, large)[::2]
    # the MLP kernels' smallest variant, and the two with the most shared memory: fp32 at b = 64,
    # and 16-bit values with fp32 (lifted) features at N = 64
    mlp_small = mlp_meta(MemoryConfig("mlp", "gd", "dot", window=1, chunk=16), 16, 16, torch.float16)
    mlp_large = mlp_meta(MemoryConfig("mlp", "gd", "l2", window=1, chunk=64), 64, 64, torch.float32)
    mlp_lifted = mlp_meta(MemoryConfig("mlp", "gd", "l2", window=33, chunk=32, degree=2), 64, 64,
                          torch.bfloat16)
    configs += mlp_launch_configs(torch.float16, mlp_small)[::2] + mlp_launch_configs(torch.float32, mlp_large)[::2]
    configs += mlp_launch_configs(torch.bfloat16, mlp_lifted)[2:]
    return configs + [launch_config(16, 16)]


def _check_compiles(config, capability: int) -> None:
    assert not interpreted(config.kernel), "kernels were imported under TRITON_INTERPRET=1"
    compiled = compile_ahead(config, capability)
    assert compiled.asm.get("cubin"), f"{config.name}: no cubin for sm_{capability}"
    assert f".target sm_{capability}" in compiled.asm["ptx"]
    stats = compiled_stats(compiled)
    # a block that does not fit in the target's shared memory could never launch there
    assert stats.shared_bytes <= SHARED_MEMORY_PER_BLOCK[capability], (config.name, stats)
    return stats


@pytest.mark.parametrize("capability", TARGETS)
@pytest.mark.parametrize("config", _representative(), ids=lambda c: c.name.replace(" ", "_"))
def test_kernel_compiles(config, capability):
    _check_compiles(config, capability)


@pytest.mark.parametrize("capability", SMALL_SHARED_TARGETS)
def test_small_shared_memory_gpus_get_only_variants_that_fit(capability):
    """On sm_86 / sm_89 the coverage rule (with the device's 99 KiB) admits a variant only if it
    compiles for that target within the budget; the MLP kernels' largest one is refused there."""
    limits = DeviceLimits(capability, SHARED_MEMORY_PER_BLOCK[capability])
    admitted = refused = 0
    for config in _representative():
        reason = shared_memory_reason([config], limits)
        if reason is None:
            _check_compiles(config, capability)
            admitted += 1
        else:
            assert "mlp_gd_bwd" in reason and f"sm_{capability} allows 99 KiB" in reason, reason
            refused += 1
    assert admitted >= 6 and refused >= 1, (admitted, refused)


def _every_launch_configuration():
    configs = [c for dtype, meta in all_linear_metas() for c in linear_launch_configs(dtype, meta)]
    configs += [c for dtype, meta in all_mlp_metas() for c in mlp_launch_configs(dtype, meta)]
    return configs + all_launch_configs()


@pytest.mark.slow
@pytest.mark.parametrize("capability", TARGETS)
@pytest.mark.parametrize("config", _every_launch_configuration(), ids=lambda c: c.name.replace(" ", "_"))
def test_every_launch_configuration_compiles(config, capability):
    _check_compiles(config, capability)
