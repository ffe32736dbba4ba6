"""`python -m megatron_atlas.eval` on tiny models: every suite runs and is written, a native
checkpoint and its HF export score identically, and the cached scoring paths equal plain forwards."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from megatron_atlas.configs import compose, to_model_config, to_train_config
from megatron_atlas.data.documents import expand_inputs
from megatron_atlas.data.prepare import PrepareArgs, prepare
from megatron_atlas.eval.__main__ import main
from megatron_atlas.eval.lm import load_lm
from megatron_atlas.eval.perplexity import shard_document, sliding_perplexity, streaming_perplexity
from megatron_atlas.eval.scoring import _continuation_logprob
from megatron_atlas.eval.tasks import babilong_example
from megatron_atlas.hf.convert import export_hf
from megatron_atlas.model import build_model
from megatron_atlas.train.checkpoint import save_checkpoint

SMALL = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.memory.chunk=8",
         "model.attention.window=16"]


def _checkpoint(preset: str, root: Path, shards: Path) -> Path:
    cfg = compose(preset, "tiny", "tiny", SMALL + ["train.data.kind=shards", f"train.data.shards.path={shards}"])
    model_cfg, train_cfg = to_model_config(cfg), to_train_config(cfg)
    torch.manual_seed(0)
    model = build_model(model_cfg)
    yaml = OmegaConf.to_yaml({"model": model_cfg, "train": train_cfg})
    save_checkpoint(root / preset, 3, {"step": 3, "model": model.state_dict()}, yaml, 1)
    return root / preset


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    text = root / "text"
    text.mkdir()
    words = "the river crosses a quiet valley while the engine hums near the old harbor".split()
    for d in range(12):
        (text / f"d{d}.txt").write_text(" ".join(words[(d + i) % len(words)] for i in range(300)))
    shards = root / "shards"
    prepare(PrepareArgs(out_dir=str(shards), seq_len=64, vocab_size=256, val_fraction=0.5, seed=0,
                        samples_per_shard=16, workers=1), expand_inputs([text]), log=lambda s: None)
    runs = {p: _checkpoint(p, root / "runs", shards) for p in ("transformer", "titans")}
    export_hf(runs["transformer"], root / "hf_transformer", log=lambda *_: None)
    return root, shards, runs


def test_eval_cli_writes_every_suite_and_export_scores_like_native(setup, capsys):
    root, shards, runs = setup
    out = root / "out"
    argv = [str(runs["transformer"]), str(root / "hf_transformer"), "--out", str(out),
            "--suites", "ppl,long_ppl,niah,babilong,mqar", "--names", "native,exported",
            "--shards", str(shards), "--ppl-batches", "2", "--ppl-batch-size", "2", "--doc-tokens", "300",
            "--window", "128", "--stride", "64", "--lengths", "160,320", "--depths", "0.5",
            "--needles", "number,word", "--samples", "1", "--kv-pairs", "2,4", "--mqar-seq-len", "32",
            "--mqar-samples", "8", "--prefill-chunk", "96"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    # progress from the first second on: what runs, each model as it loads, each suite's grid
    assert printed.startswith("suites ppl, long_ppl, niah, babilong, mqar")
    assert f"loading {runs['transformer']}" in printed
    assert "niah: 4 cells x 1 samples at lengths 160,320" in printed
    data = json.loads((out / "results.json").read_text())
    assert set(data["models"]) == {"native", "exported"}
    native, exported = data["models"]["native"], data["models"]["exported"]
    suites = [r["suite"] for r in native["rows"]]
    assert suites.count("niah") == 2 * 2 and suites.count("babilong_qa1") == 2
    assert suites.count("babilong_qa2") == 2 and suites.count("mqar") == 2
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in native["rows"])
    for a, b in zip(native["rows"], exported["rows"]):
        assert a == b
    assert native["ppl"] == pytest.approx(exported["ppl"], rel=1e-6)
    for key in ("sliding", "streaming"):
        assert native["long_ppl"][key] == pytest.approx(exported["long_ppl"][key], rel=1e-6)
    assert math.isfinite(native["ppl"]["perplexity"]) and native["long_ppl"]["tokens"] == 300
    assert set(data["curves"]) == {"niah", "babilong_qa1", "babilong_qa2", "mqar"}
    assert (out / "accuracy.png").stat().st_size > 10_000


@pytest.mark.parametrize("preset", ["transformer", "titans"])
def test_streaming_and_single_window_perplexity_equal_one_forward(setup, preset):
    _, shards, runs = setup
    lm = load_lm(str(runs[preset]))
    lm.prefill_chunk = 50
    ids = shard_document(shards, "val", 200)
    assert ids.numel() == 201
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(lm.forward(ids[None, :-1])[0], ids[1:]).item()
    assert streaming_perplexity(lm, ids)["loss"] == pytest.approx(expected, abs=1e-5)
    assert sliding_perplexity(lm, ids, window=200, stride=200)["loss"] == pytest.approx(expected, abs=1e-5)
    # windows of 64 every 32: each target scored once, with at most 64 tokens of context
    sliding = sliding_perplexity(lm, ids, window=64, stride=32)
    assert sliding["tokens"] == 200 and math.isfinite(sliding["loss"])


def test_candidate_scores_equal_full_forward(setup):
    _, _, runs = setup
    lm = load_lm(str(runs["titans"]))
    lm.prefill_chunk = 40
    ex = babilong_example(lm.tokenizer, 150, "qa2", seed=0)
    logits, state = lm.prefill(torch.tensor([ex.prompt]))
    for cand in ex.candidates[:3]:
        ids = lm.encode(cand)
        full = torch.log_softmax(lm.forward(torch.tensor([ex.prompt + ids]))[0].float(), -1)
        expected = sum(float(full[len(ex.prompt) - 1 + i, t]) for i, t in enumerate(ids))
        assert _continuation_logprob(lm, logits[0, -1], state, ids) == pytest.approx(expected, abs=1e-4)


def test_eval_help_and_bad_suite(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())   # argparse wraps lines
    assert "babilong" in text
    # the defaults a bare run uses are visible in --help
    assert "(default: niah,babilong,mqar)" in text
    assert "(default: 1024,2048,4096,8192,16384,32768,65536)" in text
    with pytest.raises(SystemExit, match="unknown suite"):
        main(["x", "--out", "y", "--suites", "nope"])
