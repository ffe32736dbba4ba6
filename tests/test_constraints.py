"""constraints.txt (the lock the README's set-up and .ci/run install from) against requirements.txt."""
from __future__ import annotations

from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent


def _lines(name: str) -> list[str]:
    return [l.split("#")[0].strip() for l in (REPO / name).read_text().splitlines() if l.split("#")[0].strip()]


def test_every_requirement_is_pinned_within_its_range_except_torch():
    pins = {}
    for line in _lines("constraints.txt"):
        name, _, version = line.partition("==")
        assert version, f"constraints.txt: {line!r} is not an exact pin"
        pins[canonicalize_name(name)] = Version(version)
    for line in _lines("requirements.txt"):
        req = Requirement(line)
        name = canonicalize_name(req.name)
        if name == "torch":   # installed first, CPU or CUDA build by the user's choice: never pinned here
            assert name not in pins
            continue
        assert name in pins, f"{req.name} is in requirements.txt but not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), (req.name, str(req.specifier), pins[name])


def test_ci_and_readme_install_through_the_constraints():
    assert "-c constraints.txt -r requirements.txt" in (REPO / ".ci" / "run").read_text()
    assert "-c constraints.txt -r requirements.txt" in (REPO / "README.md").read_text()


def test_torch_floor_has_the_apis_the_code_calls():
    # attention passes enable_gqa= to scaled_dot_product_attention, which torch 2.5 introduced
    (torch,) = [Requirement(l) for l in _lines("requirements.txt") if Requirement(l).name == "torch"]
    assert not torch.specifier.contains("2.4.1") and torch.specifier.contains("2.5.0")
