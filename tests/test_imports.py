"""The package's import rules, checked on every module found on disk (no hand-kept list):

* sub-packages form one import direction: ``core`` < ``learn`` < ``infer`` < ``io`` < ``report`` < ``training`` <
  ``data``, ``models`` < ``cli``; a module imports only from its own level or below;
* no import circle between modules (function-level imports included);
* only ``training``, ``data`` and ``cli`` import Lightning, statically and at run time;
* the old flat module paths still resolve, to the same module objects.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import gsm_lightning

PKG = Path(gsm_lightning.__file__).parent

#: sub-package (or top-level module) -> level; a module may import modules of its level or lower
LEVELS = {"_compat": 0, "core": 0, "learn": 1, "infer": 2, "io": 3, "report": 4, "training": 5, "data": 6,
          "models": 6, "cli": 7, "__main__": 8, "": 8}
LIGHTNING_ALLOWED = {"training", "data", "cli", "__main__", ""}


def _modules() -> dict[str, Path]:
    """Every module of the package (dotted name -> file), found by walking the source tree."""
    found = {"gsm_lightning": PKG / "__init__.py"}
    for info in pkgutil.walk_packages([str(PKG)], prefix="gsm_lightning."):
        spec = importlib.util.find_spec(info.name)
        assert spec is not None and spec.origin, info.name
        found[info.name] = Path(spec.origin)
    return found


MODULES = _modules()


def _concern(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(name: str, path: Path) -> tuple[set[str], set[str]]:
    """(package modules, external modules) that ``name`` imports anywhere in its source."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    inner, outer = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                (inner if alias.name.startswith("gsm_lightning") else outer).add(alias.name)
            continue
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 0:
            if (node.module or "").startswith("gsm_lightning"):
                inner.add(node.module)
            else:
                outer.add(node.module or "")
            continue
        base = package.split(".")
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
        inner.add(target)
        for alias in node.names:  # ``from . import x`` names a submodule
            if f"{target}.{alias.name}" in MODULES:
                inner.add(f"{target}.{alias.name}")
    inner = {m for m in inner if m in MODULES and m != name}
    return inner, outer


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_every_module_has_a_level():
    unknown = sorted(n for n in MODULES if _concern(n) not in LEVELS)
    assert not unknown, f"add these to LEVELS (and docs/ARCHITECTURE.md): {unknown}"
    assert len(MODULES) > 30  # the walk found the sub-packages' modules


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down(name):
    level = LEVELS[_concern(name)]
    upward = sorted(m for m in GRAPH[name][0] if m != "gsm_lightning" and LEVELS[_concern(m)] > level)
    assert not upward, f"{name} (level {level}) imports higher-level modules {upward}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_lightning_only_in_the_lightning_layer(name):
    if _concern(name) in LIGHTNING_ALLOWED:
        return
    bad = {m.split(".")[0] for m in GRAPH[name][1]} & {"lightning", "pytorch_lightning", "lightning_utilities"}
    assert not bad, f"{name} imports {sorted(bad)}; only training/, data/ and cli may import Lightning"


def test_no_import_cycles():
    """Depth-first search over the module graph; package ``__init__`` files that only re-export their children are
    edges too, except the root package, which every module's import runs first anyway."""
    edges = {n: {m for m in deps if m != "gsm_lightning"} for n, (deps, _) in GRAPH.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(edges[n]):
            if state.get(m) == 1 and not (m == n.rpartition(".")[0] or n == m.rpartition(".")[0]):
                return stack[stack.index(m):] + [m]
            if m not in state:
                cycle = visit(m)
                if cycle:
                    return cycle
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state:
            cycle = visit(n)
            assert cycle is None, f"import circle: {' -> '.join(cycle)}"


def test_the_level_check_can_fail(tmp_path):
    """The parser behind the checks sees an upward relative import (so the parametrised test above can fail)."""
    path = tmp_path / "fake.py"
    path.write_text("from ..training.module import GSMModule\nimport lightning\n")
    inner, outer = _imports("gsm_lightning.core.fake", path)
    assert inner == {"gsm_lightning.training.module"} and outer == {"lightning"}


def _lightning_loaded_by(modules: list[str]) -> list[str]:
    """The Lightning modules a fresh interpreter has loaded after importing ``modules``."""
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return [m for m in out.stdout.strip().splitlines()[-1].split(",") if m] if out.stdout.strip() else []


def test_plain_modules_do_not_load_lightning_at_run_time():
    plain = [n for n in MODULES if _concern(n) not in LIGHTNING_ALLOWED and not n.endswith("__main__")]
    assert _lightning_loaded_by(plain) == []


def test_the_check_sees_lightning():
    """The check above can fail: importing the Lightning module does load Lightning."""
    assert "lightning" in _lightning_loaded_by(["gsm_lightning.training.module"])


def test_old_flat_paths_are_the_new_modules():
    from gsm_lightning import _compat

    for old, new in _compat.MOVED.items():
        assert importlib.import_module(f"gsm_lightning.{old}") is importlib.import_module(f"gsm_lightning.{new}"), old
    from gsm_lightning.callbacks.structure_monitor import StructureMonitor

    from gsm_lightning.training.callbacks import StructureMonitor as New

    assert StructureMonitor is New
    from gsm_lightning.module import GSMModule

    from gsm_lightning.training.module import GSMModule as NewModule

    assert GSMModule is NewModule
