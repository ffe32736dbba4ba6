"""impl="triton" against the token-loop reference, run by Triton's CPU interpreter.

Triton picks interpreter or compiler when a kernel module is imported (TRITON_INTERPRET=1 read at
`@triton.jit` time), so the comparisons run in one subprocess that sets the variable before any
import: this file doubles as that script (`python tests/test_triton_memory.py CASE...` prints a
JSON dict of relative errors per case). The pytest process itself never imports the kernels.

The reference runs in float64 on the same (fp32-representable or bf16-rounded) inputs; the
Triton path runs in fp32 (state and accumulation), so the bound is fp32 rounding, 1e-4 relative.
"""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 1800


class Case(NamedTuple):
    kind: str = "linear"
    loss: str = "l2"
    window: int = 1
    chunk: int = 16
    degree: int = 1
    momentum: bool = True
    length: int = 37
    d_k: int = 4
    d_v: int = 4
    dtype: str = "float32"
    batch: int = 1
    d_hidden: int = 40          # mlp: three hidden blocks of the kernels' loop, the last partial
    lr_scale: float = 1.0       # scales eta: longer MLP cases diverge (to 1e165) at the default draw
    anchor: bool = True         # anchored retention: the linear path runs it exactly on the kernels'
                                # rule; the MLP kernels retain towards zero (anchor=False)

    @property
    def name(self) -> str:
        return "-".join(str(x) for x in self)


LINEAR_CASES = [
    Case("linear", "l2", 1, 16, 1),
    Case("linear", "dot", 3, 16, 2),
    Case("linear", "l2", 3, 16, 1, momentum=False),
    Case("linear", "dot", 1, 16, 2, momentum=False),
    Case("linear", "l2", 2, 32, 2, length=45),
    Case("linear", "dot", 1, 64, 1, length=70),       # partial last chunk, b = 64
    Case("linear", "l2", 17, 16, 1, length=40),       # the widest window covered: c - 1 = b
    Case("linear", "l2", 3, 16, 1, d_k=6, d_v=40),    # d_v over several v-blocks, d_k != d_v
    Case("linear", "l2", 2, 16, 1, length=32, batch=2),   # T a multiple of b; batch > 1
    Case("linear", "l2", 2, 16, 2, dtype="bfloat16"),
    Case("linear", "dot", 3, 32, 1, dtype="float16"),
    Case("linear", "l2", 2, 16, 2, anchor=False),
    Case("linear", "dot", 1, 32, 1, anchor=False, dtype="bfloat16"),
]
MLP_CASES = [
    Case("mlp", "l2", 1, 16, 1),                      # d_k == d_v: the residual r + W1 gelu(W2 u)
    Case("mlp", "dot", 3, 16, 2, length=40),
    Case("mlp", "l2", 2, 16, 1, momentum=False, d_v=6),   # no residual
    Case("mlp", "dot", 1, 16, 1, momentum=False, d_hidden=16),   # exactly one hidden block
    Case("mlp", "l2", 3, 32, 2, length=45, d_k=3, d_v=12),
    Case("mlp", "l2", 17, 16, 1, length=40, d_hidden=70),  # c - 1 = b; five hidden blocks
    Case("mlp", "l2", 2, 16, 1, length=32, batch=2),
    Case("mlp", "l2", 2, 16, 2, dtype="bfloat16"),
    Case("mlp", "dot", 3, 32, 1, dtype="float16"),
]
MLP_CASES = [case._replace(anchor=False) for case in MLP_CASES]
DEFAULT_CASES = LINEAR_CASES + MLP_CASES
# (the MLP kernels cover b + c - 1 <= 64: window 5 only with b < 64; at eta / 20 every MLP case
# stays bounded, |y| <= 1.8, while the default eta lets the inner loop diverge)
SLOW_CASES = [Case(kind, loss, window, chunk, degree, momentum, length=80, d_k=6, d_v=24,
                   lr_scale=1.0 if kind == "linear" else 0.05, anchor=kind == "linear")
              for kind, loss, window, chunk, degree, momentum in itertools.product(
                  ["linear", "mlp"], ["l2", "dot"], [1, 5], [16, 32, 64], [1, 2], [True, False])
              if kind == "linear" or chunk + window - 1 <= 64]
# fp32 rounding against float64; 16-bit inputs are rounded once more inside (features cast back)
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 5e-3}


# ----------------------------------------------------------------------------- subprocess side


def _errors(case: Case) -> Dict[str, float]:
    import torch

    from kernels.memory import Gates, MemoryConfig, memory_forward
    from tests.memory_cases import leaves, make_inputs, relative_error

    cfg = MemoryConfig(case.kind, "gd", case.loss, case.window, case.chunk, case.degree, anchor=case.anchor)
    dtype = getattr(torch, case.dtype)
    # one draw in float64, rounded to the Triton input dtype; the reference sees the rounded values
    q, k, v, gates, params = make_inputs(cfg, batch=case.batch, length=case.length, heads=2, d_k=case.d_k,
                                         d_v=case.d_v, d_hidden=case.d_hidden, momentum=case.momentum,
                                         seed=3)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    gates = gates._replace(eta=gates.eta * case.lr_scale)
    gates = Gates(*[None if x is None else x.to(dtype) for x in gates])
    params = {n: w.to(dtype) for n, w in params.items()}
    probe = torch.randn(case.batch, case.length, 2, case.d_v, generator=torch.Generator().manual_seed(7),
                        dtype=torch.float64)

    def run(impl: str, to: torch.dtype):
        tensors = [x.detach().to(to) for x in (q, k, v)]
        wide = torch.float64 if to == torch.float64 else torch.float32   # gates, params: exact
        g = Gates(*[None if x is None else x.detach().to(wide) for x in gates])
        p = {n: w.detach().to(wide) for n, w in params.items()}
        inputs = leaves(*tensors, g, p)
        y, state = memory_forward(*tensors, g, p, cfg, impl=impl)
        objective = (y.double() * probe).sum()
        for name in cfg.weight_names:
            objective = (objective + state.weights[name].double().sum()
                         + state.momentum[name].double().pow(2).sum())
        return y, state, torch.autograd.grad(objective, inputs)

    y_ref, s_ref, g_ref = run("reference", torch.float64)
    y, s, g = run("triton", dtype)
    names = ["q", "k", "v"] + [f"gate_{n}" for n, x in gates._asdict().items() if x is not None] \
        + [f"param_{n}" for n in params]
    errors = {"y": relative_error(y.double(), y_ref)}
    for name in cfg.weight_names:
        errors[f"state_{name}"] = relative_error(s.weights[name].double(), s_ref.weights[name])
        errors[f"momentum_{name}"] = relative_error(s.momentum[name].double(), s_ref.momentum[name])
    errors.update({f"grad_{n}": relative_error(a.double(), b) for n, a, b in zip(names, g, g_ref)})
    return errors


def _state_passing_errors() -> Dict[str, float]:
    """Two Triton calls with the state handed over equal one call (split on a chunk boundary)."""
    import torch

    from kernels.memory import Gates, MemoryConfig, memory_forward
    from tests.memory_cases import make_inputs, relative_error

    errors = {}
    for kind in ("linear", "mlp"):
        cfg = MemoryConfig(kind, "gd", "l2", window=3, chunk=16, degree=2, anchor=kind == "linear")
        q, k, v, gates, params = make_inputs(cfg, batch=1, length=40, dtype=torch.float32)
        whole, _ = memory_forward(q, k, v, gates, params, cfg, impl="triton")
        cut = lambda x, part: None if x is None else (x[:, :16] if part == 0 else x[:, 16:])  # noqa: E731
        first, state = memory_forward(cut(q, 0), cut(k, 0), cut(v, 0), Gates(*[cut(x, 0) for x in gates]),
                                      params, cfg, impl="triton")
        second, _ = memory_forward(cut(q, 1), cut(k, 1), cut(v, 1), Gates(*[cut(x, 1) for x in gates]),
                                   params, cfg, state=state, impl="triton")
        errors[kind] = relative_error(torch.cat([first, second], dim=1), whole)
    return errors


MODEL_PRESETS = ("titans", "omeganet", "dla")   # the presets whose memory Triton covers (mlp, gd)


def _model_errors(preset: str) -> Dict[str, float]:
    """A tiny LM with memory.impl=triton equals impl=chunked: logits and every parameter's gradient."""
    import torch

    from megatron_atlas.configs import compose, to_model_config
    from megatron_atlas.model import build_model
    from tests.memory_cases import relative_error

    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    runs = {}
    for impl in ("chunked", "triton"):
        torch.manual_seed(0)
        # the MLP kernels retain towards zero: the presets' anchored retention runs chunked
        model = build_model(to_model_config(compose(preset, "tiny", "tiny", [f"model.memory.impl={impl}",
                                                                          "model.memory.anchor=false"])))
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        runs[impl] = (logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    (ref_logits, ref_grads), (logits, grads) = runs["chunked"], runs["triton"]
    assert grads.keys() == ref_grads.keys()
    errors = {"logits": relative_error(logits, ref_logits)}
    errors.update({f"grad_{n}": relative_error(grads[n], g) for n, g in ref_grads.items()})
    return errors


def _newton_schulz_errors() -> Dict[str, float]:
    import torch

    from kernels.newton_schulz import newton_schulz
    from kernels.newton_schulz.triton_ns import newton_schulz_triton
    from tests.memory_cases import relative_error

    errors = {}
    for shape in [(3, 5, 12), (2, 20, 7), (2, 2, 16, 16)]:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        x64, x32 = x.clone().requires_grad_(), x.float().requires_grad_()
        probe = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        ref, out = newton_schulz(x64, 5), newton_schulz_triton(x32, 5)
        (g_ref,) = torch.autograd.grad((ref * probe).sum(), x64)
        (g,) = torch.autograd.grad((out.double() * probe).sum(), x32)
        label = "x".join(map(str, shape))
        errors[f"{label}_out"] = relative_error(out.double(), ref)
        errors[f"{label}_grad"] = relative_error(g.double(), g_ref)
    return errors


def _main(names: List[str]) -> None:
    cases = {c.name: c for c in DEFAULT_CASES + SLOW_CASES}
    results = {}
    for name in names:
        if name == "state_passing":
            results[name] = _state_passing_errors()
        elif name.startswith("model_"):
            results[name] = _model_errors(name.removeprefix("model_"))
        elif name == "newton_schulz":
            results[name] = _newton_schulz_errors()
        else:
            results[name] = _errors(cases[name])
        print(f"done {name}", file=sys.stderr, flush=True)
    print(json.dumps(results))


# ----------------------------------------------------------------------------- pytest side


def run_interpreted(names: List[str]) -> Dict[str, Dict[str, float]]:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, __file__, *names], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def default_results():
    return run_interpreted([c.name for c in DEFAULT_CASES] + ["state_passing", "newton_schulz"]
                           + [f"model_{p}" for p in MODEL_PRESETS])


def _assert_close(errors: Dict[str, float], tolerance: float) -> None:
    assert errors, "no quantities compared"
    bad = {k: v for k, v in errors.items() if not v < tolerance}
    assert not bad, f"relative errors above {tolerance}: {bad}"


@pytest.mark.parametrize("case", DEFAULT_CASES, ids=lambda c: c.name)
def test_triton_equals_reference(default_results, case):
    errors = default_results[case.name]
    # y, every state matrix and its momentum; the gradients of q, k, v, alpha, eta, g (and theta),
    # of every weight matrix (and of the feature coefficients a)
    matrices = 1 if case.kind == "linear" else 2
    assert len(errors) == 1 + 2 * matrices + 3 + 3 + int(case.momentum) + matrices + int(case.degree > 1)
    _assert_close(errors, TOLERANCE[case.dtype])


def test_triton_state_passing(default_results):
    assert set(default_results["state_passing"]) == {"linear", "mlp"}
    _assert_close(default_results["state_passing"], 1e-5)


@pytest.mark.parametrize("preset", MODEL_PRESETS)
def test_triton_model_equals_chunked(default_results, preset):
    errors = default_results[f"model_{preset}"]
    assert len(errors) > 10, errors      # logits and the gradients of every parameter
    _assert_close(errors, 1e-4)


def test_triton_newton_schulz_equals_reference(default_results):
    _assert_close(default_results["newton_schulz"], 1e-4)


@pytest.mark.slow
def test_triton_equals_reference_all_options():
    results = run_interpreted([c.name for c in SLOW_CASES])
    for kind in ("linear", "mlp"):
        errors = [e for c in SLOW_CASES if c.kind == kind for e in results[c.name].values()]
        print(f"{kind}: {len(errors)} compared quantities, worst relative error {max(errors):.2e}")
    for case in SLOW_CASES:
        _assert_close(results[case.name], TOLERANCE[case.dtype])


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _main(sys.argv[1:])
