"""Run by tests/test_deepspeed_guard.py under torchrun (2 gloo processes, DS_ACCELERATOR=cpu):
`python -m torch.distributed.run --nproc_per_node 2 tests/deepspeed_step_worker.py OUT_DIR`.

- guard, ZeRO-0/1/2/3: a normal step, then a step whose gradient is nan in one parameter of the
  no-decay group on rank 1 only (the decay group is finite everywhere), then a normal step again.
  Records whether any parameter (gathered under ZeRO-3) changed in each step, and what the step
  reported.
- host reads, ZeRO-0 and 2: the project-side host reads of one step for 1 and 4 micro-batches and
  for 1 and 3 layers.
Each rank writes OUT_DIR/rank-R.json.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from megatron_atlas.configs import compose, to_model_config, to_train_config  # noqa: E402
from megatron_atlas.data.synthetic import MQARSource  # noqa: E402
from megatron_atlas.model import build_model  # noqa: E402
from megatron_atlas.train.config import ParallelConfig  # noqa: E402
from megatron_atlas.train.deepspeed_engine import build_engine, deepspeed_step  # noqa: E402
from megatron_atlas.train.distributed import setup_parallel  # noqa: E402
from tests.host_reads import count_host_reads  # noqa: E402

CPU = torch.device("cpu")


def _configs(accum: int, layers: int = 1):
    cfg = compose("titans", "tiny", "tiny", ["train.seq_len=32", "train.micro_batch_size=2", f"train.grad_accum={accum}",
                                              "train.lr=1e-2", "train.grad_clip=1.0", f"model.n_layers={layers}"])
    return to_model_config(cfg), to_train_config(cfg)


def _engine(stage: int, parallel, accum: int, layers: int = 1):
    model_cfg, cfg = _configs(accum, layers)
    torch.manual_seed(0)
    return build_engine(build_model(model_cfg), ParallelConfig(zero_stage=stage), cfg, parallel, CPU)


def _batches(parallel, step: int, accum: int):
    source = MQARSource(2, 32, 256, 2, seed=100 * step + parallel.dp_rank)
    return [source.batch(j) for j in range(accum)]


def _weights(engine, stage: int) -> dict:
    import deepspeed
    params = dict(engine.module.named_parameters())
    if stage == 3:
        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {n: p.detach().clone() for n, p in params.items()}
    return {n: p.detach().clone() for n, p in params.items()}


def _changed(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[n], b[n]) for n in a)


def guard(stage: int, parallel) -> dict:
    engine, optimizer = _engine(stage, parallel, accum=2)
    target = engine.module.norm.weight
    assert target.dim() == 1   # in the no-decay group
    record, before = {}, _weights(engine, stage)
    for step in range(3):
        hook = target.register_hook(lambda g: g * float("nan")) if step == 1 and parallel.dp_rank == 1 else None
        result = deepspeed_step(engine, optimizer, _batches(parallel, step, 2), parallel, lr=1e-2)
        if hook is not None:
            hook.remove()
        after = _weights(engine, stage)
        record[step] = {"changed": _changed(before, after), "skipped": result.skipped,
                        "grad_norm": float(result.grad_norm), "loss": float(result.loss)}
        before = after
    return record


def host_reads(stage: int, parallel) -> dict:
    out = {}
    for accum, layers in ((1, 1), (4, 1), (1, 3)):
        engine, optimizer = _engine(stage, parallel, accum, layers)
        deepspeed_step(engine, optimizer, _batches(parallel, 0, accum), parallel, lr=1e-3)   # warm-up
        with count_host_reads() as reads:
            deepspeed_step(engine, optimizer, _batches(parallel, 1, accum), parallel, lr=1e-3)
        out[f"accum{accum}-layers{layers}"] = dict(reads)
    return out


def main(out_dir: Path) -> None:
    parallel = setup_parallel(ParallelConfig(zero_stage=1), deepspeed=True)
    result = {"guard": {stage: guard(stage, parallel) for stage in (0, 1, 2, 3)},
              "host_reads": {stage: host_reads(stage, parallel) for stage in (0, 2)}}
    (out_dir / f"rank-{parallel.dp_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
