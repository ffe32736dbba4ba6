"""Training loop: LR schedules, a short run that learns, and exact gradient accumulation."""
from __future__ import annotations

import json
import math

import pytest
import torch

from megatron_atlas.configs import compose, to_model_config, to_train_config
from megatron_atlas.data.synthetic import IGNORE_INDEX, MQARSource
from megatron_atlas.model import build_model
from megatron_atlas.train.__main__ import main
from megatron_atlas.train.loop import train, train_step
from megatron_atlas.train.optim import param_groups
from megatron_atlas.train.schedule import lr_factor


def test_cosine_warms_up_then_decays_to_the_floor():
    f = lambda step: lr_factor(step, 110, "cosine", warmup_steps=10, min_lr_ratio=0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(4) == pytest.approx(0.5) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(10 + 99 // 2) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 49 / 99)))
    assert f(109) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 109))


def test_wsd_holds_then_decays_linearly():
    f = lambda step: lr_factor(step, 100, "wsd", warmup_steps=10, min_lr_ratio=0.0, decay_fraction=0.2)  # noqa: E731
    assert f(0) == pytest.approx(0.1)
    assert f(10) == f(50) == f(79) == 1.0
    assert f(80) == pytest.approx(1 - 1 / 20) and f(89) == pytest.approx(0.5)
    assert f(99) == pytest.approx(0.0)


def test_constant_after_warmup():
    assert lr_factor(1, 100, "constant", warmup_steps=4) == pytest.approx(0.5)
    assert lr_factor(4, 100, "constant", warmup_steps=4) == lr_factor(99, 100, "constant", warmup_steps=4) == 1.0


def _tiny(preset: str = "dla", *overrides: str):
    cfg = compose(preset, "tiny", "tiny", ["train.micro_batch_size=8", "train.seq_len=64", *overrides])
    return to_model_config(cfg), to_train_config(cfg)


def test_weight_decay_spares_vectors():
    model = build_model(_tiny()[0])
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_short_run_lowers_the_loss_and_writes_metrics(tmp_path):
    model_cfg, cfg = _tiny("dla", "train.steps=30", "train.warmup_steps=5", "train.log_every=10",
                           "train.eval_every=15", f"train.out_dir={tmp_path}")
    lines: list[str] = []
    summary = train(model_cfg, cfg, log=lines.append)
    assert summary["final_loss"] < summary["first_loss"] - 0.3, summary
    assert any(line.startswith("step 10/30 | loss") and "tok/s" in line and "eta" in line for line in lines)
    assert lines[-1].startswith("done: 30 steps")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [15, 30]
    assert records[-1]["kind"] == "summary" and (tmp_path / "config.yaml").exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    board = EventAccumulator(str(tmp_path / "tensorboard"))
    board.Reload()
    train_losses = {r["step"]: r["loss"] for r in records if r["kind"] == "train"}
    logged = {e.step: e.value for e in board.Scalars("train/loss")}
    assert logged.keys() == train_losses.keys()
    assert all(abs(logged[s] - train_losses[s]) < 1e-5 for s in logged)
    assert [e.step for e in board.Scalars("eval/perplexity")] == [15, 30]


def test_gradient_accumulation_equals_one_big_batch():
    model_cfg, _ = _tiny("titans")
    source = MQARSource(4, 64, 256, 4, seed=0)
    (x0, y0), (x1, y1) = source.batch(0), source.batch(1)
    y1[:2] = IGNORE_INDEX   # unequal label counts: normalisation must be over the whole step
    grads, losses = [], []
    for micro_batches in ([(x0, y0), (x1, y1)], [(torch.cat([x0, x1]), torch.cat([y0, y1]))]):
        torch.manual_seed(0)
        model = build_model(model_cfg)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        result = train_step(model, optimizer, micro_batches, grad_clip=0.0)
        assert not result.skipped
        losses.append(float(result.loss))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_cli_reports_config_errors(capsys):
    assert main(["model=atlas", "size=tiny", "train.lr=fast"]) == 2
    assert "train.lr" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "model=NAME" in capsys.readouterr().out


class _NaNModel(torch.nn.Module):
    """Logits are nan on the calls listed in `bad_calls` (all calls if None)."""

    def __init__(self, vocab: int, bad_calls=None) -> None:
        super().__init__()
        self.logits = torch.nn.Embedding(vocab, vocab)
        self.bad_calls, self.calls = bad_calls, 0

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        bad = self.bad_calls is None or self.calls in self.bad_calls
        return self.logits(input_ids) * (float("nan") if bad else 1.0)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        return 0 if exclude_embeddings else self.logits.weight.numel()


def test_non_finite_steps_in_a_row_stop_the_run_without_updates(tmp_path, monkeypatch):
    model_cfg, cfg = _tiny("dla", "train.steps=5", "train.max_bad_steps=3", f"train.out_dir={tmp_path}")
    model = _NaNModel(model_cfg.vocab_size)
    before = model.logits.weight.detach().clone()
    monkeypatch.setattr("megatron_atlas.train.loop.build_model", lambda _: model)
    with pytest.raises(FloatingPointError, match="3 steps in a row"):
        train(model_cfg, cfg, log=lambda line: None)
    assert torch.equal(model.logits.weight, before)
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert (last["kind"], last["step"], last["in_a_row"]) == ("skipped", 3, 3)


@pytest.mark.parametrize("bad_step", [2, 4])   # a middle step, and the last one
def test_an_isolated_non_finite_step_is_skipped_and_counted(tmp_path, monkeypatch, bad_step):
    model_cfg, cfg = _tiny("dla", "train.steps=4", "train.eval_every=0", f"train.out_dir={tmp_path}")
    model = _NaNModel(model_cfg.vocab_size, bad_calls={bad_step})
    monkeypatch.setattr("megatron_atlas.train.loop.build_model", lambda _: model)
    summary = train(model_cfg, cfg, log=lambda line: None)
    assert summary["skipped_steps"] == 1 and len(summary["losses"]) == 3
    # the run still ends with its final evaluation and checkpoint
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [4]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-00000004"


def test_compiled_training_matches_eager(tmp_path):
    runs = []
    for compiled in (False, True):
        model_cfg, cfg = _tiny("transformer", "train.steps=3", "train.seq_len=32", "train.eval_every=0",
                               f"train.compile={compiled}", f"train.out_dir={tmp_path / str(compiled)}")
        runs.append(train(model_cfg, cfg, log=lambda line: None)["losses"])
    assert runs[0] == pytest.approx(runs[1], rel=1e-4)


@pytest.mark.parametrize("accum, layers", [(1, 1), (4, 1), (1, 3)])
def test_a_step_reads_the_host_once_whatever_the_micro_batches_and_parameters(accum, layers):
    """The loss and grad norm stay on the device; the one host read is the skip decision (a GPU
    sync per step, not per micro-batch or parameter)."""
    from tests.host_reads import count_host_reads
    model_cfg, _ = _tiny("titans", f"model.n_layers={layers}")
    model = build_model(model_cfg)
    optimizer = torch.optim.AdamW(model.parameters())
    source = MQARSource(2, 64, 256, 4, seed=0)
    with count_host_reads() as reads:
        result = train_step(model, optimizer, [source.batch(i) for i in range(accum)], grad_clip=1.0)
    assert sum(reads.values()) == 1 and all(k.startswith("megatron_atlas/train/loop.py") for k in reads), reads
    assert result.loss.dim() == 0 and not result.skipped
