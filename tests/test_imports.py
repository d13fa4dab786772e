"""No import cycle: every module of lenx imports alone in a fresh interpreter, and all of them in any order; and no
cycle hides behind function-level imports.

A cycle of module-level imports shows only in some orders (the module that starts the cycle finds the other
half-initialised), so each module is imported first in an interpreter of its own, and the whole package in several
shuffled orders. A cycle through an import inside a function never fails an import (it fails, if ever, when the
function runs), so the import statements themselves are read too. New modules are found by pkgutil, so they are
covered without a change here.
"""

import ast
import importlib.util
import os
import pkgutil
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import lenx

ROOT = Path(lenx.__file__).resolve().parent.parent
# lenx.__main__ is `python -m lenx` itself (importing it runs the command line); it imports lenx.cli alone
MODULES = sorted(["lenx", *(m.name for m in pkgutil.walk_packages(lenx.__path__, "lenx.")
                            if not m.name.endswith(".__main__"))])
ORDERS = 3  # shuffled orders of the whole package, each in one fresh interpreter


def import_in_fresh_interpreter(names: list[str]) -> subprocess.CompletedProcess:
    """Import `names` in this order, each with importlib.import_module; every failure ends the process."""
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, env=env,
                          timeout=300)


def test_every_module_is_found():
    # a walk that found nothing would let every test below pass vacuously
    assert {"lenx.evaluate", "lenx.hf", "lenx.train", "lenx.positional.rope", "lenx.subject"} <= set(MODULES)


def test_every_module_imports_alone():
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # one interpreter per module, side by side
        done = dict(zip(MODULES, pool.map(lambda name: import_in_fresh_interpreter([name]), MODULES)))
    failed = {name: p.stderr[-2000:] for name, p in done.items() if p.returncode != 0}
    assert not failed, "\n".join(f"import {name} alone failed:\n{err}" for name, err in failed.items())


@pytest.mark.parametrize("seed", range(ORDERS))
def test_all_modules_import_in_any_order(seed):
    order = MODULES[:]
    random.Random(seed).shuffle(order)
    done = import_in_fresh_interpreter(order)
    assert done.returncode == 0, f"importing in the order {order} failed:\n{done.stderr[-3000:]}"


def lenx_imports(name: str) -> set[str]:
    """The lenx modules that module `name` imports anywhere in its source (module level or inside functions),
    its own parent packages left out (they are initialised before it, whatever it imports)."""
    path = Path(importlib.util.find_spec(name).origin)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found |= {f"{module}.{a.name}" if f"{module}.{a.name}" in MODULES else module for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m in MODULES and not name.startswith(m + ".") and m != name}


def test_no_cycle_hides_behind_function_level_imports():
    graph = {name: lenx_imports(name) for name in MODULES}

    def cycle_from(start: str, path: list[str]) -> list[str] | None:
        for nxt in sorted(graph[path[-1]]):
            if nxt == start:
                return path + [start]
            if nxt not in path and nxt > start:  # each cycle found once, from its smallest module
                found = cycle_from(start, path + [nxt])
                if found:
                    return found
        return None

    cycles = [c for c in (cycle_from(name, [name]) for name in MODULES) if c]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
