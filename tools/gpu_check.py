"""Everything that needs a GPU, checked and timed in one command (at most about 8 minutes on one H100/H200).

    python tools/gpu_check.py --out gpu_results          # writes gpu_results/gpu_check.json and .md

Sections, in order of importance (a global deadline, --budget-s, skips what is left and says so):
  1. kernels: every Triton kernel variant a shipped preset can reach, on bf16 inputs, against the
     PyTorch chunked path run in float64 on the same (bf16-rounded) inputs: relative error of the
     output, the final state and the gradients of q, k, v, every gate and every parameter. The
     chunked path at bf16 is measured the same way, so the two errors can be compared.
  2. training: a few steps of every preset at the 170M size, bf16 autocast, micro-batch 1 x T, with
     tokens/s, peak GPU memory and MFU (FLOPs from the model's own counter, against --peak-tflops).
  3. layer timing: one memory layer at 170M and 760M shapes, forward + backward at T = 4K and 16K,
     impl=triton (where covered) and impl=chunked, against causal attention on the same heads
     (FlashAttention-2 when installed, else SDPA).

Needs only PyTorch and Triton plus the project's pure-Python dependencies (omegaconf, ...), which a
bare GPU machine can take as wheels (docs/gpu_results.md says how this was run).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from kernels.memory import Gates, MemoryConfig, feature_dim, memory_forward, resolve_impl
from megatron_atlas.configs import compose, to_model_config
from megatron_atlas.model import build_model
from megatron_atlas.model.config import MemoryLayerConfig, ModelConfig
from megatron_atlas.model.memory_layer import MemoryLayer
from megatron_atlas.train.flops import mfu, training_flops_per_token
from megatron_atlas.train.loop import loss_sum

PRESETS = ["transformer", "titans", "omeganet", "dla", "atlas", "atlas_pp", "atlas_mag", "atlas_mal"]


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.start = time.monotonic()
        self.end = self.start + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


DEVICE = torch.device("cuda")   # --device cpu runs the same code small (--smoke) as a test of this script


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------- 1. kernels


KERNEL_CASES = [   # (kind, loss, window, chunk, degree, d_k, d_v, hidden, momentum): shapes the presets reach
    ("mlp", "l2", 1, 64, 1, 48, 48, 192, True),      # titans 170M/340M
    ("mlp", "dot", 1, 64, 1, 48, 48, 192, False),    # dla 170M/340M
    ("mlp", "l2", 4, 16, 2, 6, 6, 24, True),         # omeganet-like, degree 2 (small key width)
    ("linear", "l2", 1, 64, 1, 64, 64, 0, True),
    ("linear", "dot", 4, 32, 2, 8, 64, 0, True),
    ("linear", "l2", 1, 64, 1, 96, 96, 0, True),     # a 760M head width on the linear kernels
]


def _kernel_inputs(case, batch: int, length: int, heads: int, seed: int):
    kind, loss, window, chunk, degree, d_k, d_v, hidden, momentum = case
    gen = _generator(seed)
    rand = lambda *s: torch.rand(*s, generator=gen, device=DEVICE)  # noqa: E731
    randn = lambda *s: torch.randn(*s, generator=gen, device=DEVICE)  # noqa: E731
    q = F.normalize(randn(batch, length, heads, d_k), dim=-1)
    k = F.normalize(randn(batch, length, heads, d_k), dim=-1)
    v = randn(batch, length, heads, d_v)
    gates = Gates(0.9 + 0.1 * rand(batch, length, heads), 0.01 * rand(batch, length, heads),
                  (0.3 + 0.6 * rand(batch, length, heads)) if momentum else None,
                  0.2 + 0.8 * rand(batch, length, heads))
    width = feature_dim(d_k, degree)
    if kind == "linear":
        params = {"W": 0.3 * randn(heads, d_v, width)}
    else:
        params = {"W1": randn(heads, d_v, hidden) / hidden ** 0.5, "W2": randn(heads, hidden, width) / width ** 0.5}
    if degree > 1:
        params["a"] = 0.5 + rand(degree + 1)
    # the MLP kernels retain towards zero (anchored MLP memories run chunked); linear runs anchored
    cfg = MemoryConfig(kind=kind, rule="gd", loss=loss, window=window, chunk=chunk, degree=degree,
                       anchor=kind == "linear")
    return cfg, (q, k, v), gates, params


def _run_operator(cfg, qkv, gates, params, impl: str, dtype: torch.dtype):
    """Output, final weights and momenta, and every gradient (inputs cast to `dtype`, leaves made here)."""
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in qkv)
    gate_leaves = [None if g is None else g.detach().to(torch.float64 if dtype == torch.float64 else torch.float32)
                   .requires_grad_() for g in gates]
    param_leaves = {n: p.detach().to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()
                    for n, p in params.items()}
    y, state = memory_forward(q, k, v, Gates(*gate_leaves), param_leaves, cfg, impl=impl)
    finals = [state.weights[n] for n in cfg.weight_names] + [state.momentum[n] for n in cfg.weight_names]
    gen = _generator(7)
    probes = [torch.randn(t.shape, generator=gen, device=DEVICE, dtype=torch.float32) for t in [y] + finals]
    loss = sum((t.double() * p.double()).sum() for t, p in zip([y] + finals, probes))
    loss.backward()
    grads = {"q": q.grad, "k": k.grad, "v": v.grad}
    grads.update({name: g.grad for name, g in zip(("alpha", "eta", "theta", "g"), gate_leaves) if g is not None})
    grads.update({f"d{n}": p.grad for n, p in param_leaves.items()})
    return {"y": y.detach(), **{f"final{i}": t.detach() for i, t in enumerate(finals)}}, grads


def check_kernels(deadline: Deadline, length: int, cases=KERNEL_CASES) -> List[Dict]:
    rows = []
    for i, case in enumerate(cases):
        if deadline.left() < 0:
            rows.append({"case": str(case), "skipped": "deadline"})
            continue
        cfg, qkv, gates, params = _kernel_inputs(case, batch=2, length=length, heads=4, seed=i)
        low = tuple(x.to(torch.bfloat16) for x in qkv)   # both paths see the same bf16 inputs
        row = {"case": dict(zip(("kind", "loss", "window", "chunk", "degree", "d_k", "d_v", "hidden", "momentum"), case)),
               "auto_on_bf16": resolve_impl("auto", low[0], cfg, case[6])}
        try:
            truth_out, truth_grads = _run_operator(cfg, low, gates, params, "chunked", torch.float64)
        except Exception as error:   # a failure is a result, not the end of the check
            row["error"] = f"{type(error).__name__}: {error}"
            rows.append(row)
            continue
        for impl in ("triton", "chunked"):
            if impl == "triton" and row["auto_on_bf16"] != "triton":
                from kernels.memory.triton import unsupported_reason
                row[impl] = f"not covered: {unsupported_reason(cfg, low[0], case[6])}"
                continue
            try:
                start = time.perf_counter()
                out, grads = _run_operator(cfg, low, gates, params, impl, torch.bfloat16)
                _sync()
                row[impl] = {"seconds": time.perf_counter() - start,
                             "output_error": _rel(out["y"], truth_out["y"]),
                             "state_error": max(_rel(out[n], truth_out[n]) for n in out if n != "y"),
                             "grad_errors": {n: _rel(g, truth_grads[n]) for n, g in grads.items()}}
                row[impl]["worst_grad"] = max(row[impl]["grad_errors"].values())
            except Exception as error:
                row[impl] = f"{type(error).__name__}: {error}"
                row["traceback"] = traceback.format_exc(limit=6)
        rows.append(row)
        print(f"  [{time.monotonic() - deadline.start:.0f}s] kernels {i}: {json.dumps({k: v for k, v in row.items() if k != 'traceback'}, default=str)[:400]}",
              flush=True)
    return rows


# ----------------------------------------------------------------------------- 2. training


def _is_muon(model_cfg: ModelConfig) -> bool:
    """Whether the preset runs Newton-Schulz on every token (muon, or muon_block at ns_block 1)."""
    mem = model_cfg.memory
    return model_cfg.has_memory and (mem.rule == "muon" or (mem.rule == "muon_block" and mem.ns_block == 1))


def _peak_memory_gb() -> Optional[float]:
    return torch.cuda.max_memory_allocated() / 1e9 if DEVICE.type == "cuda" else None


def train_presets(deadline: Deadline, size: str, seq_len: int, muon_seq_len: int, steps: int, peak_tflops: float,
                  per_preset_s: float, presets: List[str]) -> List[Dict]:
    rows = []
    for preset in presets:
        row: Dict[str, object] = {"preset": preset, "size": size}
        if deadline.left() < 20:
            row["skipped"] = "deadline"
            rows.append(row)
            continue
        try:
            model_cfg = to_model_config(compose(preset, size, "default"))
            # the exact Muon rule orthogonalises every token's momentum: a shorter sequence keeps a
            # step within the time budget, and the table says which length each preset ran
            length = muon_seq_len if _is_muon(model_cfg) else seq_len
            model = build_model(model_cfg, device=DEVICE)
            cfg = model.cfg
            row.update(params=sum(p.numel() for p in model.parameters()), seq_len=length,
                       memory_impl=None if not cfg.has_memory else cfg.memory.impl,
                       rule=None if not cfg.has_memory else cfg.memory.rule)
            flops_per_token = training_flops_per_token(cfg, length)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95),
                                          fused=DEVICE.type == "cuda")
            tokens = torch.randint(0, cfg.vocab_size, (1, length + 1), generator=_generator(0), device=DEVICE)
            inputs, labels = tokens[:, :-1], tokens[:, 1:]
            if DEVICE.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times, losses = [], []
            started = time.monotonic()
            for step in range(steps):
                _sync()
                t0 = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
                    logits = model(inputs)
                loss = loss_sum(logits, labels) / labels.numel()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                _sync()
                times.append(time.perf_counter() - t0)
                losses.append(float(loss))
                if time.monotonic() - started > per_preset_s or deadline.left() < 10:
                    break
            timed = times[1:] or times   # the first step compiles kernels and warms the allocator
            step_s = sum(timed) / len(timed)
            tokens_per_s = length / step_s
            row.update(steps=len(times), step_seconds=times, losses=losses, tokens_per_s=tokens_per_s,
                       peak_memory_gb=_peak_memory_gb(),
                       flops_per_token=flops_per_token, mfu=mfu(flops_per_token, tokens_per_s, peak_tflops),
                       finite=all(math.isfinite(x) for x in losses))
            del model, optimizer
        except Exception as error:
            row["error"] = f"{type(error).__name__}: {error}"
            row["traceback"] = traceback.format_exc(limit=8)
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
        print(f"  [{time.monotonic() - deadline.start:.0f}s] train {preset}: {json.dumps({k: v for k, v in row.items() if k not in ('traceback',)}, default=str)[:500]}",
              flush=True)
    return rows


# ----------------------------------------------------------------------------- 3. layer timing


LAYER_SHAPES = {"170M": (768, 16), "760M": (1536, 16)}
LAYER_MEMORIES = {"titans": dict(kind="mlp", rule="gd", loss="l2", window=1, degree=1, momentum=True),
                  "linear": dict(kind="linear", rule="gd", loss="l2", window=1, degree=1, momentum=True)}


def _time(fn: Callable[[], None], repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up (device events on CUDA)."""
    fn()   # warm-up: compiles, allocator
    _sync()
    samples = []
    for _ in range(repeats):
        if DEVICE.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            _sync()
            samples.append(start.elapsed_time(stop) / 1e3)
        else:
            began = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - began)
    return sorted(samples)[len(samples) // 2]


def _attention_fn(heads: int, head_dim: int, length: int) -> Callable[[], None]:
    q, k, v = (torch.randn(1, heads, length, head_dim, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    try:
        from flash_attn import flash_attn_func   # [B, T, H, D]

        def run():
            out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
            out.sum().backward()
        run.backend = "flash-attn 2"
    except ImportError:
        def run():
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            out.sum().backward()
        run.backend = "sdpa"
    return run


def time_layers(deadline: Deadline, lengths: List[int], repeats: int, shapes=LAYER_SHAPES) -> List[Dict]:
    rows = []
    for size, (d_model, heads) in shapes.items():
        for name, memory in LAYER_MEMORIES.items():
            for length in lengths:
                row: Dict[str, object] = {"size": size, "memory": name, "T": length,
                                          "head_dim": d_model // heads}
                if deadline.left() < 15:
                    row["skipped"] = "deadline"
                    rows.append(row)
                    continue
                x = torch.randn(1, length, d_model, device=DEVICE, requires_grad=True)
                for impl in ("triton", "chunked"):
                    cfg = ModelConfig(d_model=d_model, n_heads=heads,
                                      memory=MemoryLayerConfig(chunk=64, impl=impl, **memory))
                    layer = MemoryLayer(cfg).to(DEVICE)
                    probe = torch.zeros(1, length, heads, cfg.mem_key_dim, device=DEVICE, dtype=torch.bfloat16)
                    reason = None
                    if impl == "triton":
                        from kernels.memory.triton import unsupported_reason
                        reason = unsupported_reason(layer.op_cfg, probe, cfg.resolved_head_dim)
                    if reason is not None:
                        row[impl] = f"not covered: {reason}"
                        continue

                    def run(layer=layer):
                        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
                            y, _ = layer(x)
                        y.float().square().mean().backward()
                    try:
                        row[impl] = _time(run, repeats)
                    except Exception as error:
                        row[impl] = f"{type(error).__name__}: {error}"
                    del layer
                attention = _attention_fn(heads, d_model // heads, length)
                row["attention"] = _time(attention, repeats)
                row["attention_backend"] = attention.backend
                if isinstance(row.get("triton"), float) and isinstance(row.get("chunked"), float):
                    row["triton_speedup_vs_chunked"] = row["chunked"] / row["triton"]
                rows.append(row)
                print(f"  [{time.monotonic() - deadline.start:.0f}s] layer {json.dumps(row, default=str)[:400]}", flush=True)
                if DEVICE.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- report


def _fmt(value, spec: str = ".3g") -> str:
    if isinstance(value, (int, float)):
        return format(value, spec)
    return "-" if value is None else str(value)


def markdown(result: Dict) -> str:
    env = result["environment"]
    lines = [f"# GPU check ({env['device']}, torch {env['torch']}, triton {env['triton']})", "",
             f"Measured {env['date']} by `python tools/gpu_check.py`; wall {result['wall_s']:.0f} s.", "",
             "## 1. Kernels vs the chunked path (bf16 inputs; errors relative to the float64 chunked path)", "",
             "| case | auto picks | triton out / state / worst grad | chunked(bf16) out / state / worst grad |",
             "|---|---|---|---|"]
    for row in result["kernels"]:
        case = row["case"]
        label = (", ".join(f"{k}={v}" for k, v in case.items()) if isinstance(case, dict) else case)
        cells = []
        for impl in ("triton", "chunked"):
            r = row.get(impl)
            cells.append(str(r or row.get("error", "-"))[:120] if not isinstance(r, dict) else
                         f"{r['output_error']:.1e} / {r['state_error']:.1e} / {r['worst_grad']:.1e}")
        lines.append(f"| {label} | {row.get('auto_on_bf16', '-')} | {cells[0]} | {cells[1]} |")
    lines += ["", f"## 2. Training at {result['args']['train_size']}, bf16 autocast, micro-batch 1", "",
              "| preset | rule | T | steps | s/step | tokens/s | peak GB | GFLOP/token | MFU | losses |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["training"]:
        if "error" in row or "skipped" in row:   # a failure is a row of the table too
            lines.append(f"| {row['preset']} | | | | | | | | | {row.get('error', row.get('skipped'))[:160]} |")
            continue
        step_s = sum(row["step_seconds"][1:] or row["step_seconds"]) / max(1, len(row["step_seconds"][1:] or row["step_seconds"]))
        lines.append(f"| {row['preset']} | {row['rule'] or '-'} | {row['seq_len']} | {row['steps']} | {step_s:.2f} | "
                     f"{row['tokens_per_s']:,.0f} | {_fmt(row['peak_memory_gb'], '.1f')} | {row['flops_per_token'] / 1e9:.1f} | "
                     f"{row['mfu']:.1%} | {' '.join(f'{x:.3f}' for x in row['losses'])} |")
    lines += ["", "## 3. One memory layer, fwd+bwd seconds (bf16 autocast), vs causal attention on the same heads", "",
              "| size | memory | T | triton | chunked | triton speed-up | attention (backend) |", "|---|---|---|---|---|---|---|"]
    for row in result["layers"]:
        lines.append(f"| {row['size']} | {row['memory']} | {row['T']} | {_fmt(row.get('triton'))} | "
                     f"{_fmt(row.get('chunked'))} | {_fmt(row.get('triton_speedup_vs_chunked'), '.2f')} | "
                     f"{_fmt(row.get('attention'))} ({row.get('attention_backend', row.get('skipped', '-'))}) |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("gpu_results"), help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--budget-s", type=float, default=420.0, help="deadline for the whole check; later work is skipped")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU for MFU (H100/H200 SXM: 989)")
    p.add_argument("--kernel-length", type=int, default=512)
    p.add_argument("--device", default="cuda", help="cuda; cpu only with --smoke, to test this script")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes everywhere (size=tiny, T=64-128, two kernel cases): a test of the script")
    p.add_argument("--train-size", default="170M")
    p.add_argument("--train-seq-len", type=int, default=4096)
    p.add_argument("--muon-seq-len", type=int, default=1024,
                   help="T for presets with the exact Muon rule (per-token Newton-Schulz)")
    p.add_argument("--train-steps", type=int, default=5)
    p.add_argument("--per-preset-s", type=float, default=30.0, help="stop a preset's steps after this long")
    p.add_argument("--presets", nargs="+", default=PRESETS)
    p.add_argument("--layer-lengths", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sections", nargs="+", default=["kernels", "training", "layers"],
                   choices=["kernels", "training", "layers"])
    args = p.parse_args(argv)
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device (--device cpu --smoke tests the script on a CPU)")
    kernel_cases, shapes = KERNEL_CASES, LAYER_SHAPES
    if args.smoke:
        kernel_cases, shapes = KERNEL_CASES[2:4], {"tiny": (64, 4)}
        args.kernel_length, args.train_size, args.train_seq_len, args.muon_seq_len = 64, "tiny", 64, 32
        args.train_steps, args.layer_lengths, args.repeats = 2, [128], 1
    import triton
    deadline = Deadline(args.budget_s)
    wall = time.monotonic()
    on_cuda = DEVICE.type == "cuda"
    result: Dict = {"environment": {"device": torch.cuda.get_device_name() if on_cuda else platform.processor() or "cpu",
                                    "capability": torch.cuda.get_device_capability() if on_cuda else None,
                                    "torch": torch.__version__, "triton": triton.__version__,
                                    "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
                    "args": {k: str(v) for k, v in vars(args).items()}, "kernels": [], "training": [], "layers": []}
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        result["wall_s"] = time.monotonic() - wall
        (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
        (args.out / "gpu_check.md").write_text(markdown(result))

    print(f"gpu_check: {result['environment']}", flush=True)
    if "kernels" in args.sections:
        result["kernels"] = check_kernels(deadline, args.kernel_length, kernel_cases)
        save()
    # the exact-Muon presets are the slowest to train: they go last, after the layer timings
    muon = [p for p in args.presets if _is_muon(to_model_config(compose(p, args.train_size, "default")))]
    if "training" in args.sections:
        result["training"] = train_presets(deadline, args.train_size, args.train_seq_len, args.muon_seq_len,
                                           args.train_steps, args.peak_tflops, args.per_preset_s,
                                           [p for p in args.presets if p not in muon])
        save()
    if "layers" in args.sections:
        result["layers"] = time_layers(deadline, args.layer_lengths, args.repeats, shapes)
        save()
    if "training" in args.sections:
        result["training"] += train_presets(deadline, args.train_size, args.train_seq_len, args.muon_seq_len,
                                            args.train_steps, args.peak_tflops, args.per_preset_s, muon)
    save()
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
