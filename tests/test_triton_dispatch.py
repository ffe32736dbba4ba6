"""The impl="auto" rule: Triton for covered options on CUDA, the chunked form otherwise, no errors;
impl="triton" on an uncovered option names it. No GPU here: a CUDA input is stood in for by a
meta-device tensor whose `is_cuda` is patched, and the coverage check by the device rule."""
from __future__ import annotations

import pytest
import torch

from kernels.memory import MemoryConfig, memory_forward, resolve_impl
from kernels.memory import dispatch
from kernels.memory import triton as triton_entry
from kernels.newton_schulz import dispatch as ns_dispatch
from kernels.newton_schulz import newton_schulz, newton_schulz_auto
from kernels.triton_support import SHARED_MEMORY_PER_BLOCK, DeviceLimits
from tests.memory_cases import make_inputs

COVERED = MemoryConfig("linear", "gd", "l2", window=3, chunk=32, degree=1)
COVERED_MLP = MemoryConfig("mlp", "gd", "dot", window=1, chunk=64, degree=1, anchor=False)
UNCOVERED = {
    "kind='gated_mlp'": MemoryConfig("gated_mlp", "gd", "l2", chunk=16),
    "rule='muon'": MemoryConfig("linear", "muon", "l2", chunk=16),
    "chunk=8": MemoryConfig("linear", "gd", "l2", chunk=8),
    "window=18": MemoryConfig("linear", "gd", "l2", window=18, chunk=16),
    "state_dtype=torch.float64": MemoryConfig("linear", "gd", "l2", chunk=16, state_dtype=torch.float64),
    "feature width D=153": MemoryConfig("linear", "gd", "l2", chunk=16, degree=2),
    # the MLP kernels hold a chunk's tiles whole: at most 64 window tokens, lifted keys, values
    "window tokens per chunk b + c - 1=65": MemoryConfig("mlp", "gd", "l2", window=2, chunk=64, anchor=False),
    # the MLP kernels retain towards zero; anchored retention runs chunked
    "anchor=True with kind='mlp'": MemoryConfig("mlp", "gd", "l2", window=1, chunk=16),
}


class FakeCuda(torch.Tensor):
    """A tensor that reports itself as CUDA; the dispatch rule reads only is_cuda, dtype and shape."""

    @property
    def is_cuda(self):  # noqa: D401
        return True


def _q(d_k: int = 16, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.zeros(1, 4, 2, d_k, dtype=dtype).as_subclass(FakeCuda)


@pytest.fixture
def compiled_device(monkeypatch):
    """Pretend the kernels can run on the (fake) CUDA tensor: the device rule is replaced, and the
    device's shared memory is taken to fit (test_shared_memory_of_the_device_decides checks it)."""
    monkeypatch.setattr(triton_entry, "device_reason", lambda kernel, tensor: None)
    monkeypatch.setattr(triton_entry, "device_limits", lambda device: DeviceLimits(90, SHARED_MEMORY_PER_BLOCK[90]))
    monkeypatch.setattr(triton_entry, "device_fit_reason", lambda cfg, width, d_v, dtype, limits: None)


@pytest.mark.parametrize("capability,covered", [(90, True), (86, False)])
def test_shared_memory_of_the_device_decides(monkeypatch, capability, covered):
    """The MLP backward at b = 64, D = d_v = 64 needs about 150 KiB of shared memory: it fits an A100
    or H100, not an sm_86 / sm_89 GPU (99 KiB), where auto falls back instead of failing at launch."""
    monkeypatch.setattr(triton_entry, "device_reason", lambda kernel, tensor: None)
    limits = DeviceLimits(capability, SHARED_MEMORY_PER_BLOCK[capability])
    monkeypatch.setattr(triton_entry, "device_limits", lambda device: limits)
    cfg = MemoryConfig("mlp", "gd", "l2", window=1, chunk=64, degree=1, anchor=False)
    q = _q(d_k=64, dtype=torch.float32)
    assert resolve_impl("auto", q, cfg, d_v=64) == ("triton" if covered else "chunked")
    if not covered:
        with pytest.raises(ValueError, match=f"shared memory: mlp_gd_bwd .* sm_{capability} allows 99 KiB"):
            resolve_impl("triton", q, cfg, d_v=64)
    if not covered:   # a small MLP memory fits even the smallest budget
        assert resolve_impl("auto", _q(d_k=16), MemoryConfig("mlp", "gd", "l2", chunk=16, anchor=False), d_v=16) == "triton"


def test_auto_picks_triton_on_cuda_for_covered_options(compiled_device):
    assert resolve_impl("auto", _q(), COVERED) == "triton"
    assert resolve_impl("auto", _q(dtype=torch.float32), COVERED) == "triton"
    assert resolve_impl("auto", _q(), COVERED_MLP) == "triton"


def test_mlp_value_width_decides_coverage(compiled_device):
    """d_v is not visible in q: memory_forward passes it, and a wide one falls back / is named."""
    assert resolve_impl("auto", _q(), COVERED_MLP, d_v=64) == "triton"
    assert resolve_impl("auto", _q(), COVERED_MLP, d_v=96) == "chunked"
    with pytest.raises(ValueError, match="value width d_v=96"):
        resolve_impl("triton", _q(), COVERED_MLP, d_v=96)
    # the linear kernels tile d_v across programs: any width
    assert resolve_impl("auto", _q(), COVERED, d_v=96) == "triton"


def test_mlp_mixed_precision_limit_at_chunk_64(compiled_device):
    """16-bit inputs with fp32 degree-2 features at b = 64 stop at D, d_v <= 32 (shared memory)."""
    cfg = MemoryConfig("mlp", "gd", "l2", window=1, chunk=64, degree=2, anchor=False)
    assert resolve_impl("auto", _q(d_k=6), cfg, d_v=6) == "triton"            # D = 28
    assert resolve_impl("auto", _q(d_k=8), cfg, d_v=8) == "chunked"           # D = 45
    assert resolve_impl("auto", _q(d_k=8, dtype=torch.float32), cfg, d_v=8) == "triton"
    with pytest.raises(ValueError, match="chunk=64 and torch.bfloat16"):
        resolve_impl("triton", _q(d_k=8), cfg, d_v=8)


def test_mlp_lifted_width_decides_coverage(compiled_device):
    """Degree 2 on d_k = 10 lifts to D = 66: the linear kernels cover it, the MLP kernels do not."""
    lifted = dict(window=1, chunk=16, degree=2)
    assert resolve_impl("auto", _q(d_k=10), MemoryConfig("linear", "gd", "l2", **lifted)) == "triton"
    with pytest.raises(ValueError, match="lifted key width D=66"):
        resolve_impl("triton", _q(d_k=10), MemoryConfig("mlp", "gd", "l2", anchor=False, **lifted), d_v=10)


@pytest.mark.parametrize("option", list(UNCOVERED))
def test_auto_falls_back_for_uncovered_options(compiled_device, option):
    assert resolve_impl("auto", _q(), UNCOVERED[option]) == "chunked"


@pytest.mark.parametrize("option", list(UNCOVERED))
def test_explicit_triton_names_the_uncovered_option(compiled_device, option):
    with pytest.raises(ValueError, match="impl='triton' does not cover") as error:
        resolve_impl("triton", _q(), UNCOVERED[option])
    assert option in str(error.value)


def test_auto_falls_back_for_float64_inputs(compiled_device):
    assert resolve_impl("auto", _q(dtype=torch.float64), COVERED) == "chunked"


def test_auto_on_cpu_is_chunked_and_runs():
    cfg = COVERED
    q, k, v, gates, params = make_inputs(cfg, length=9, dtype=torch.float32)
    assert resolve_impl("auto", q, cfg) == "chunked"
    y_auto, _ = memory_forward(q, k, v, gates, params, cfg, impl="auto")
    y_chunked, _ = memory_forward(q, k, v, gates, params, cfg, impl="chunked")
    assert torch.equal(y_auto, y_chunked)


def test_explicit_triton_on_cpu_without_interpreter_names_the_device():
    q = torch.zeros(1, 4, 2, 16)
    with pytest.raises(ValueError, match="device cpu"):
        resolve_impl("triton", q, COVERED)


def test_unknown_impl_is_rejected():
    with pytest.raises(ValueError, match="impl='fast'"):
        resolve_impl("fast", _q(), COVERED)


def test_dispatch_reports_missing_triton(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_unsupported_reason",
                        lambda q, cfg, d_v=None: "triton unavailable (no module named triton)")
    assert resolve_impl("auto", _q(), COVERED) == "chunked"
    with pytest.raises(ValueError, match="triton unavailable"):
        resolve_impl("triton", _q(), COVERED)


def test_newton_schulz_auto_on_cpu_is_the_reference():
    x = torch.randn(3, 8, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(newton_schulz_auto(x, 5), newton_schulz(x, 5))


def test_newton_schulz_auto_uses_triton_for_cuda_tensors(monkeypatch):
    from kernels.newton_schulz import triton_ns
    calls = []
    monkeypatch.setattr(triton_ns, "newton_schulz_auto", lambda m, steps: calls.append(m.shape) or m)
    x = torch.zeros(2, 8, 8).as_subclass(FakeCuda)
    ns_dispatch.newton_schulz_auto(x, 5)
    assert calls == [torch.Size([2, 8, 8])]
