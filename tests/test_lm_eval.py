"""lm-evaluation-harness (`--model hf`) on a tiny exported model, offline, over local tasks
(tests/lm_eval_tasks/): multiple choice, loglikelihood_rolling and generate_until at batch size 2.
Each number lm-eval reports is checked against the model run directly: choice log-likelihoods,
rolling log-likelihoods in windows of the trained length (max_position_embeddings, not lm-eval's
default 2048), and generations of left-padded batches against each prompt generated alone."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from megatron_atlas.configs import compose, to_model_config, to_train_config
from megatron_atlas.data.tokenizer import train_bpe
from megatron_atlas.hf.convert import export_hf
from megatron_atlas.model import build_model
from megatron_atlas.train.checkpoint import save_checkpoint

TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"
TRAINED_LENGTH = 48
SMALL = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.memory.chunk=8",
         "model.attention.window=16", "model.vocab_size=320", f"train.seq_len={TRAINED_LENGTH}"]
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
WORDS = "the river crosses a quiet valley while the engine hums near the old harbor".split()


def _write_tasks(root: Path) -> Path:
    data = root / "data"
    data.mkdir()
    rows = {
        "mc.jsonl": [{"question": f"Where does the {w}", "choices": ["go", "valley", "harbor"], "answer": i % 3}
                     for i, w in enumerate(WORDS[:5])],
        "docs.jsonl": [{"text": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(160 + 60 * i))}
                       for i in range(2)],
        "gen.jsonl": [{"prompt": " ".join(WORDS[:n]), "target": WORDS[n]} for n in (2, 5, 3, 7)],
    }
    for name, records in rows.items():
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    tasks = root / "tasks"
    tasks.mkdir()
    for yaml in TASKS.glob("*.yaml"):
        (tasks / yaml.name).write_text(yaml.read_text().replace("DATA_DIR", str(data)))
    return tasks


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    import lm_eval   # in requirements.txt: a missing install is an error here, never a skip
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    root = tmp_path_factory.mktemp("lmeval")
    tokenizer = root / "tokenizer.json"
    train_bpe([" ".join(WORDS) * 30], vocab_size=300).save(tokenizer)
    cfg = compose("atlas_mag", "tiny", "tiny", SMALL)
    model_cfg, train_cfg = to_model_config(cfg), to_train_config(cfg)
    torch.manual_seed(0)
    native = build_model(model_cfg).eval()
    save_checkpoint(root / "run", 1, {"step": 1, "model": native.state_dict()},
                    OmegaConf.to_yaml({"model": model_cfg, "train": train_cfg}), 1)
    folder = export_hf(root / "run", root / "hf", tokenizer=str(tokenizer), log=lambda *_: None)
    tasks = _write_tasks(root)
    with pytest.MonkeyPatch.context() as env:   # no hub, no network: everything is local
        for name, value in {**OFFLINE, "HF_DATASETS_CACHE": str(root / "datasets")}.items():
            env.setenv(name, value)
        lm = HFLM(pretrained=str(folder), trust_remote_code=True, batch_size=2, dtype="float32", device="cpu")
        results = lm_eval.simple_evaluate(model=lm, tasks=["atlas_local_mc", "atlas_local_rolling", "atlas_local_gen"],
                                          task_manager=TaskManager(include_path=str(tasks)),
                                          log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0)
        yield lm, native, results, folder, tasks


def _logprob(native, context: list, continuation: list) -> float:
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logp = torch.log_softmax(native(ids[:, :-1])[0].double(), -1)
    return sum(float(logp[len(context) - 1 + i, t]) for i, t in enumerate(continuation))


def test_multiple_choice_loglikelihoods_are_the_models(evaluated):
    lm, native, results = evaluated[:3]
    samples = results["samples"]["atlas_local_mc"]
    assert len(samples) == 5 and 0.0 <= results["results"]["atlas_local_mc"]["acc,none"] <= 1.0
    for sample in samples:
        assert len(sample["arguments"]) == 3   # one request per choice
        for (context, continuation), response in zip(sample["arguments"], sample["resps"]):
            expected = _logprob(native, *lm._encode_pair(context, continuation))
            assert response[0][0] == pytest.approx(expected, abs=1e-4)


def test_rolling_loglikelihood_uses_windows_of_the_trained_length(evaluated):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    lm, native, results = evaluated[:3]
    assert lm.max_length == TRAINED_LENGTH
    for sample in results["samples"]["atlas_local_rolling"]:
        ids = lm.tok_encode(sample["arguments"][0][0])
        assert len(ids) > 2 * TRAINED_LENGTH   # several windows
        windows = map(make_disjoint_window, get_rolling_token_windows(
            token_list=ids, prefix_token=lm.prefix_token_id, max_seq_len=TRAINED_LENGTH, context_len=1))
        expected = sum(_logprob(native, list(ctx), list(cont)) for ctx, cont in windows)
        assert sample["resps"][0][0] == pytest.approx(expected, abs=1e-3)
    assert results["results"]["atlas_local_rolling"]["bits_per_byte,none"] > 0


def test_generate_until_with_left_padded_batches_equals_each_prompt_alone(evaluated):
    lm, _, results = evaluated[:3]
    samples = results["samples"]["atlas_local_gen"]
    lengths = {len(lm.tok_encode(s["arguments"][0][0])) for s in samples}
    assert len(samples) == 4 and len(lengths) == 4   # batches of 2 prompts of different lengths: padded
    for sample in samples:
        prompt = sample["arguments"][0][0]
        ids = torch.tensor([lm.tok_encode(prompt)])
        with torch.no_grad():
            out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        text = lm.tok_decode(out[0, ids.shape[1]:].tolist())
        expected = text.split("\n")[0]
        assert sample["resps"][0][0] == expected


def test_the_lm_eval_command_line_gives_the_same_generations(evaluated, tmp_path):
    """The README's `lm_eval --model hf ...` call, in a fresh process."""
    import subprocess
    import sys

    _, _, results, folder, tasks = evaluated
    env = {**os.environ, **OFFLINE, "HF_DATASETS_CACHE": str(tmp_path / "datasets"),
           "HF_MODULES_CACHE": str(tmp_path / "modules")}
    done = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                           f"pretrained={folder},trust_remote_code=True,dtype=float32", "--tasks", "atlas_local_gen",
                           "--include_path", str(tasks), "--batch_size", "2", "--device", "cpu",
                           "--output_path", str(tmp_path / "out"), "--log_samples"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    samples = [json.loads(line) for f in (tmp_path / "out").rglob("samples_atlas_local_gen_*.jsonl")
               for line in f.read_text().splitlines()]
    assert len(samples) == 4
    api = {s["doc_id"]: s["resps"] for s in results["samples"]["atlas_local_gen"]}
    assert all(s["resps"] == api[s["doc_id"]] for s in samples)
