"""The house rules: the product never imports the workbench (`medir_fast.lab`), and no module
imports itself back through others."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np

from .conftest import DATA, write_nifti

PACKAGE = Path(__file__).resolve().parents[1] / "medir_fast"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """The medir_fast modules `path` imports (at module level only, or anywhere)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("medir_fast")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("medir_fast"):
                found.add(target)
                found |= {f"{target}.{a.name}" for a in node.names if (PACKAGE.parent / f"{target}.{a.name}".replace(
                    ".", "/")).with_suffix(".py").exists() or (PACKAGE.parent / f"{target}.{a.name}".replace(".", "/")).is_dir()}
    return found


def _product_files() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if "lab" not in p.relative_to(PACKAGE).parts]


def test_product_code_never_imports_the_lab():
    """Only the command line may import the lab, inside the subcommands that are the lab's
    (train, eval, example), when they run."""
    for path in _product_files():
        lab = {m for m in _imports(path, top_level_only=False) if m.startswith("medir_fast.lab")}
        if path.name == "cli.py":
            assert not {m for m in _imports(path, top_level_only=True) if m.startswith("medir_fast.lab")}
            continue
        assert not lab, f"{path.relative_to(PACKAGE.parent)} imports {sorted(lab)}"


def test_no_import_cycle():
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        deps = set()
        for target in _imports(path, top_level_only=True):
            parts = target.split(".")
            deps |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}  # a package's __init__ runs first
        graph[name] = {d for d in deps if d != name and not name.startswith(d + ".")}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            assert state.get(dep) != 1, "import cycle: " + " -> ".join(trail[trail.index(dep):] + [dep])
            if dep not in state:
                visit(dep, trail + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert "medir_fast.lab.training" in graph and "medir_fast.kernels" in graph  # the walk saw the whole tree


def test_infer_loads_no_lab_module(tmp_path):
    src = write_nifti(tmp_path / "ct.nii.gz", np.random.default_rng(0).normal(40, 300, (20, 18, 2)).astype(np.float32))
    code = (
        "import sys\n"
        "from medir_fast.cli import main\n"
        f"rc = main(['infer', {str(src)!r}, '--task', 'ct_denoise', '--weights', {str(DATA / 'tiny_state_dict.pth')!r},"
        f" '-o', {str(tmp_path / 'o.nii.gz')!r}])\n"
        "print(rc, sorted(m for m in sys.modules if m.startswith('medir_fast.lab')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip().splitlines()[-1] == "0 []", proc.stdout + proc.stderr
