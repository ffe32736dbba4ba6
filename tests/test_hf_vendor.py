"""The vendoring pass: follows project imports in every form and rewrites them to relative imports of
flat sibling modules that import and run on their own, and that Hugging Face's loader collects."""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from megatron_atlas.hf.convert import ENTRY_MODULES
from megatron_atlas.hf.vendor import VendorError, vendor

FAKE = {
    "megatron_atlas/__init__.py": "",
    "megatron_atlas/hf/__init__.py": "",
    "megatron_atlas/hf/entry.py": """
        from megatron_atlas.model.lm import value
        from megatron_atlas.model import helpers as h
        import megatron_atlas.parallel.state as st
        from kernels.memory import KIND
        def result():
            from ..model.lm import lazy    # a relative, function-level import
            return value() + h.twice(1) + st.SIZE + len(KIND) + lazy()
        """,
    "megatron_atlas/model/__init__.py": "",
    "megatron_atlas/model/lm.py": """
        from .helpers import twice
        def value():
            return twice(10)
        def lazy():
            return 1000
        """,
    "megatron_atlas/model/helpers.py": "def twice(x):\n    return 2 * x\n",
    "megatron_atlas/model/unused.py": "raise RuntimeError('never vendored')\n",
    "megatron_atlas/parallel/__init__.py": "",
    "megatron_atlas/parallel/state.py": "SIZE = 100\n",
    "kernels/__init__.py": "",
    "kernels/memory/__init__.py": "from .types import KIND\n",
    "kernels/memory/types.py": "KIND = 'abc'\n",
}


def _fake_tree(root: Path) -> Path:
    for name, text in FAKE.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_vendored_fake_project_runs_without_the_project(tmp_path):
    src = _fake_tree(tmp_path / "src")
    out = tmp_path / "out" / "pkg"
    written = vendor(["megatron_atlas.hf.entry"], out, root=src)
    assert set(written) == {"entry.py", "megatron_atlas_model_lm.py", "megatron_atlas_model_helpers.py",
                            "megatron_atlas_parallel_state.py", "kernels_memory.py", "kernels_memory_types.py"}
    (out / "__init__.py").write_text("")
    code = "import pkg.entry as e; print(e.result())"
    run = subprocess.run([sys.executable, "-c", code], cwd=out.parent, capture_output=True, text=True,
                         timeout=60, env={"PYTHONPATH": str(out.parent)})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(20 + 2 + 100 + 3 + 1000)


def test_entry_imports_every_vendored_module_directly(tmp_path):
    """transformers copies only the files an entry file imports directly (local folders)."""
    from transformers.dynamic_module_utils import get_relative_imports

    out = tmp_path / "hf"
    written = vendor(ENTRY_MODULES, out)
    direct = set(get_relative_imports(str(out / "modeling_atlas.py")))
    assert {w[:-3] for w in written} - {"modeling_atlas"} <= direct
    for name in written:
        tree = ast.parse((out / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module.split(".")[0] not in ("megatron_atlas", "kernels"), (name, node.module)
            if isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] not in ("megatron_atlas", "kernels") for a in node.names), name


def test_bare_dotted_import_is_refused(tmp_path):
    src = _fake_tree(tmp_path / "src")
    (src / "megatron_atlas/hf/bad.py").write_text("import megatron_atlas.model.lm\n")
    with pytest.raises(VendorError, match="bad.py:1"):
        vendor(["megatron_atlas.hf.bad"], tmp_path / "out", root=src)
