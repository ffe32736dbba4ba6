"""Copy the model's source files into a Hugging Face folder as flat sibling modules.

`trust_remote_code` loading must not need this project installed, and a second hand-kept copy of
the model code would drift. So at export time the entry files (the HF configuration and modeling
wrappers) and every project module they import, transitively (found by walking the import graph
with `ast`), are written next to each other under flat names:

    megatron_atlas/model/lm.py        -> megatron_atlas_model_lm.py
    kernels/memory/__init__.py        -> kernels_memory.py
    megatron_atlas/hf/modeling_atlas.py (an entry) -> modeling_atlas.py

and every import of a project module is rewritten to a relative import of its flat name
(`from .megatron_atlas_model_lm import AtlasLM`). Hugging Face's dynamic-module loader copies exactly
the files an entry file imports as `from .NAME import ...` (for a local folder only the direct
ones, not recursively: transformers 4.57 `get_cached_module_file`), so each entry file also gets one
such line for every vendored module it reaches, and the whole graph travels with it. Parent packages' `__init__` files are only vendored when a module imports the package
itself (their import side effects are not needed by the model code).
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

REPO_ROOT = Path(__file__).resolve().parents[2]
PROJECT_PACKAGES = ("megatron_atlas", "kernels")


class VendorError(RuntimeError):
    """An import in the vendored sources has a form the rewriter cannot express relatively."""


@dataclass
class _Module:
    name: str          # dotted name, e.g. megatron_atlas.model.lm
    path: Path
    is_package: bool


def _is_project(name: str) -> bool:
    return name.split(".")[0] in PROJECT_PACKAGES


def _find_module(name: str, root: Path) -> Optional[_Module]:
    base = root.joinpath(*name.split("."))
    if base.with_suffix(".py").is_file():
        return _Module(name, base.with_suffix(".py"), False)
    if (base / "__init__.py").is_file():
        return _Module(name, base / "__init__.py", True)
    return None


def _require_module(name: str, root: Path, where: str) -> _Module:
    module = _find_module(name, root)
    if module is None:
        raise VendorError(f"{where}: imports {name!r}, which is not a module under {root}")
    return module


def _absolute(module: _Module, node: ast.ImportFrom) -> str:
    """The absolute module name an ImportFrom refers to (relative levels resolved)."""
    if node.level == 0:
        return node.module or ""
    package = module.name if module.is_package else module.name.rpartition(".")[0]
    parts = package.split(".")
    if node.level - 1 > len(parts) - 1:
        raise VendorError(f"{module.path}:{node.lineno}: relative import goes above the top package")
    base = ".".join(parts[:len(parts) - (node.level - 1)])
    return f"{base}.{node.module}" if node.module else base


def _project_imports(module: _Module, root: Path) -> List[Tuple[ast.stmt, List[Tuple[_Module, Optional[str], Optional[str]]]]]:
    """For each import statement that names project modules: (node, [(module, imported name, alias)]).

    The name is None for `from pkg import (names...)` / `import pkg as x` of a module itself; for
    `from pkg import sub` where `sub` is a submodule, the entry is (sub module, None, alias or sub).
    """
    tree = ast.parse(module.path.read_text(encoding="utf-8"), str(module.path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = _absolute(module, node)
            if not _is_project(target):
                continue
            where = f"{module.path}:{node.lineno}"
            parent = _require_module(target, root, where)
            entries: List[Tuple[_Module, Optional[str], Optional[str]]] = []
            for alias in node.names:
                if alias.name == "*":
                    raise VendorError(f"{where}: star imports are not supported")
                sub = _find_module(f"{target}.{alias.name}", root) if parent.is_package else None
                if sub is not None:
                    entries.append((sub, None, alias.asname or alias.name))
                else:
                    entries.append((parent, alias.name, alias.asname))
            found.append((node, entries))
        elif isinstance(node, ast.Import):
            names = [a for a in node.names if _is_project(a.name)]
            if not names:
                continue
            where = f"{module.path}:{node.lineno}"
            if len(names) != len(node.names) or any(a.asname is None for a in names):
                raise VendorError(f"{where}: write `import {names[0].name} as NAME` or `from ... import` "
                                  "for project modules (a bare dotted import cannot become relative)")
            found.append((node, [(_require_module(a.name, root, where), None, a.asname) for a in names]))
    return found


def flat_name(name: str, entries: Dict[str, str]) -> str:
    return entries.get(name, name.replace(".", "_"))


def _rewrite_import(entries_of_node, indent: str, flat) -> List[str]:
    lines = []
    by_module: Dict[str, List[str]] = {}
    for module, name, alias in entries_of_node:
        if name is None:
            # a whole module under a local name: the `from .X import __name__` line is what makes
            # Hugging Face's loader (which only follows `from .X import`) copy the file
            target = flat(module.name)
            lines.append(f"{indent}from .{target} import __name__ as _vendored_{target}")
            lines.append(f"{indent}from . import {target} as {alias}")
        else:
            by_module.setdefault(flat(module.name), []).append(name if alias is None else f"{name} as {alias}")
    for target, names in by_module.items():
        lines.insert(0, f"{indent}from .{target} import {', '.join(names)}")
    return lines


def _rewrite_source(module: _Module, root: Path, flat) -> str:
    source = module.path.read_text(encoding="utf-8")
    lines = source.splitlines(keepends=False)
    edits = []
    for node, entries in _project_imports(module, root):
        first, last = node.lineno - 1, node.end_lineno - 1
        prefix, suffix = lines[first][:node.col_offset], lines[last][node.end_col_offset:]
        if prefix.strip() or suffix.strip() and not suffix.strip().startswith("#"):
            raise VendorError(f"{module.path}:{node.lineno}: put project imports on their own lines")
        edits.append((first, last, _rewrite_import(entries, prefix, flat)))
    for first, last, new in sorted(edits, reverse=True):
        lines[first:last + 1] = new
    header = f"# Vendored from {module.path.relative_to(root)} by megatron_atlas.hf.vendor; do not edit.\n"
    return header + "\n".join(lines) + "\n"


def _closure_imports(entry: str, root: Path, flat_of: Dict[str, str]) -> str:
    reached = [flat_of[m.name] for m in collect([entry], root)[1:]]
    lines = ["", "# Every vendored module this file reaches, imported directly so that Hugging Face's loader",
             "# copies each of them next to this file (it follows only direct relative imports)."]
    lines += [f"from .{name} import __name__ as _vendored_{name}  # noqa: E402,F401" for name in reached]
    return "\n".join(lines) + "\n"


def collect(entries: Iterable[str], root: Path = REPO_ROOT) -> List[_Module]:
    """The entry modules and every project module they import, transitively (entries first)."""
    order: List[_Module] = []
    seen: Dict[str, _Module] = {}
    stack = [_require_module(name, root, "entry") for name in entries]
    while stack:
        module = stack.pop(0)
        if module.name in seen:
            continue
        seen[module.name] = module
        order.append(module)
        for _, imported in _project_imports(module, root):
            stack.extend(m for m, _, _ in imported if m.name not in seen)
    return order


def vendor(entries: Sequence[str], out_dir: Path, root: Path = REPO_ROOT) -> List[str]:
    """Write the entry modules (under their last name component) and their project imports (under
    flat names) into `out_dir`; returns the file names written."""
    entry_names = {name: name.rpartition(".")[2] for name in entries}
    modules = collect(entries, root)
    flat_of = {m.name: flat_name(m.name, entry_names) for m in modules}
    clashes = {f for f in flat_of.values() if list(flat_of.values()).count(f) > 1}
    if clashes:
        raise VendorError(f"flat module names clash: {sorted(clashes)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for module in modules:
        text = _rewrite_source(module, root, lambda name: flat_of[name])
        if module.name in entry_names:
            text += _closure_imports(module.name, root, flat_of)
        (out_dir / f"{flat_of[module.name]}.py").write_text(text, encoding="utf-8")
        written.append(f"{flat_of[module.name]}.py")
    return written
