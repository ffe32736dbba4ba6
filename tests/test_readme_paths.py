"""The README's Hugging Face paths, run as written there (paths substituted, run lengths cut):
train -> `tools/convert_to_hf.py` -> the loading snippet -> `tools/convert_from_hf.py` -> training
continues from the export -> `python -m megatron_atlas.eval` on the export."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
SHORT = ["train.steps=2", "train.eval_every=0", "train.log_every=1", "train.tensorboard=false",
         "model.memory.chunk=8"]


def readme_command(prefix: str) -> list[str]:
    """The README line that starts with `prefix`, split into argv, its trailing comment dropped."""
    for line in README.splitlines():
        if line.strip().startswith(prefix):
            return shlex.split(line.split("#")[0])
    raise AssertionError(f"the README has no command starting with {prefix!r}")


def readme_python(start: str) -> str:
    """The ```python block of the README whose first line is `start`."""
    for block in re.findall(r"```python\n(.*?)```", README, flags=re.S):
        if block.startswith(start):
            return block
    raise AssertionError(f"the README has no python block starting with {start!r}")


def run(argv: list[str], paths: dict, cwd: Path, extra: tuple = ()) -> str:
    argv = [paths.get(a, a) for a in argv] + list(extra)
    if argv[0] == "python":
        argv[0] = sys.executable
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (argv, done.stdout[-2000:], done.stderr[-4000:])
    return done.stdout + done.stderr


def test_readme_hf_export_load_continue_and_eval(tmp_path):
    paths = {"runs/atlas-tiny": str(tmp_path / "runs" / "atlas-tiny"), "hf/atlas-tiny": str(tmp_path / "hf"),
             "runs/atlas-cont": str(tmp_path / "runs" / "atlas-cont"), "runs/eval": str(tmp_path / "eval")}
    train = readme_command("python -m megatron_atlas.train model=atlas size=tiny train=tiny train.out_dir=")
    run(train[:6], paths, REPO, SHORT + [f"train.out_dir={paths['runs/atlas-tiny']}"])

    run(readme_command("python tools/convert_to_hf.py runs/atlas-tiny hf/atlas-tiny"), paths, REPO)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["max_position_embeddings"] == 128 and (tmp_path / "hf" / "README.md").is_file()

    snippet = readme_python("from transformers import AutoModelForCausalLM, AutoTokenizer\nmodel =")
    script = tmp_path / "snippet.py"
    script.write_text(snippet.replace("hf/atlas-tiny", paths["hf/atlas-tiny"]) +
                      "\nassert out.shape[0] == 2 and out.shape[1] > batch.input_ids.shape[1]\nprint('generated')\n")
    assert "generated" in run(["python", str(script)], paths, tmp_path)

    run(readme_command("python tools/convert_from_hf.py hf/atlas-tiny runs/atlas-cont"), paths, REPO)
    cont = readme_command("python -m megatron_atlas.train model=atlas size=tiny train=tiny train.out_dir=runs/atlas-cont")
    cont = [a.replace("runs/atlas-cont", paths["runs/atlas-cont"]) for a in cont]
    out = run(cont, paths, REPO, SHORT)
    assert "resumed from" in out
    records = [json.loads(l) for l in (tmp_path / "runs" / "atlas-cont" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]

    evaluate = readme_command("python -m megatron_atlas.eval runs/atlas-tiny runs/transformer-tiny")
    evaluate = [a for a in evaluate if a != "runs/transformer-tiny"]
    evaluate.insert(3, "hf/atlas-tiny")
    run(evaluate, paths, REPO, ["--kv-pairs", "2", "--mqar-samples", "4", "--mqar-seq-len", "32"])
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    native, exported = results["models"].values()
    assert native["rows"] == exported["rows"]   # the export scores as the checkpoint it came from
