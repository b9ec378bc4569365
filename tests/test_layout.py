"""The package layout: imports point one way (down the layers below), and no module is named like a package.

Every module under ``src/mamlab`` is parsed with ``ast``; nothing is imported or executed.

Layers, lowest first. A module may import from its own layer and the layers below it, never above.
Data flows: core → models, tasks → algorithms → experiments → config → train/evaluate → analysis
(+ report rendering) → cli.

    layer  top-level names under mamlab            what they are
    -----  --------------------------------------  ------------------------------------------------
      0    errors, stats, options, files           one-line errors, confidence intervals, typed options,
                                                   bounded reads of regular files
      1    core                                    pure tensor code: TaskBatch, parameter dicts, the
                                                   batched MLP, per-task losses, the execution engine
      2    models, tasks                           networks; task families
      3    algorithms                              the MetaAlgorithm contract, MAML, ANIL, ..., registry
      4    mamlab (the package's ``__init__``)     the public API: MAML, TaskBatch, models, tasks
      5    experiments                             a task family's options, defaults, model, loss
      6    config, presets                         run + task + algorithm options, validated; presets
      7    runtime, checkpoint, runlog,            running: training, evaluation, what they write
           train, evaluate
      8    report                                  rendering only: HTML page, plots, figures
      9    analysis, sweep                         studies (numbers) → sections (text) → pipeline,
                                                   which renders through report: analysis
                                                   produces the numbers, report only draws them,
                                                   so report sits below analysis
     10    cli, demo, __main__, launch             the command line, its entry point and the demo

Imports inside ``if TYPE_CHECKING:`` blocks are exempt (they never run); imports inside functions
count. A new top-level module or package must be added to ``LAYERS`` before this test passes.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "mamlab"

#: Top-level names under ``mamlab`` by layer, lowest first (see the table above).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "stats", "options", "files"),
    ("core",),
    ("models", "tasks"),
    ("algorithms",),
    ("mamlab",),
    ("experiments",),
    ("config", "presets"),
    ("runtime", "checkpoint", "runlog", "train", "evaluate"),
    ("report",),
    ("analysis", "sweep"),
    ("cli", "demo", "__main__", "launch"),
)
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def module_name(path: Path, root: Path = SRC) -> str:
    """``src/mamlab/analysis/pipeline.py`` → ``mamlab.analysis.pipeline`` (a package: its ``__init__``)."""
    parts = ("mamlab", *path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules(root: Path = SRC) -> dict[str, Path]:
    """Every module under ``root`` by dotted name."""
    return {module_name(p, root): p for p in sorted(root.rglob("*.py")) if "__pycache__" not in p.parts}


def top(name: str) -> str:
    """The layer key of a dotted ``mamlab`` name: ``mamlab.analysis.studies`` → ``analysis``."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "mamlab"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(node: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement in ``node``, at any depth, except under ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            found.append(child)
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for sub in child.orelse:
                found.extend(_import_nodes(ast.Module(body=[sub], type_ignores=[])))
        else:
            found.extend(_import_nodes(child))
    return found


def imported(module: str, source: str, is_package: bool, known: set[str]) -> list[tuple[int, str]]:
    """The ``mamlab`` modules ``module`` imports, as (line, dotted name).

    ``from mamlab.x import y`` counts as importing ``mamlab.x.y`` where that is a module (in
    ``known``), else ``mamlab.x``. Relative imports are resolved against ``module``'s package.
    """
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in _import_nodes(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "mamlab"]
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join(anchor + ([base] if base else []))
        if base.split(".")[0] != "mamlab":
            continue
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            out.append((node.lineno, sub if sub in known else base))
    return out


def violations(modules: dict[str, Path]) -> list[str]:
    """Every import that points up the layers, or touches a name ``LAYERS`` does not place."""
    known = set(modules)
    bad = []
    for name, path in modules.items():
        src_key = top(name)
        if src_key not in RANK:
            bad.append(f"{path}: mamlab.{src_key} is in no layer; add it to LAYERS in tests/test_layout.py")
            continue
        for line, target in imported(name, path.read_text(), path.name == "__init__.py", known):
            key = top(target)
            if key not in RANK:
                bad.append(f"{path}:{line}: imports {target}, which is in no layer of LAYERS")
            elif RANK[key] > RANK[src_key]:
                bad.append(
                    f"{path}:{line}: {name} (layer {RANK[src_key]}, {src_key}) imports {target} "
                    f"(layer {RANK[key]}, {key}): an upward edge"
                )
    return bad


def test_every_top_level_module_has_a_layer():
    names = {top(m) for m in all_modules()}
    assert names - set(RANK) == set(), "add these to LAYERS in tests/test_layout.py"


def test_imports_point_down_the_layers():
    bad = violations(all_modules())
    assert not bad, "\n".join(bad)


def test_no_module_is_named_like_a_package():
    modules = all_modules()
    packages = {n.rpartition(".")[2]: n for n, p in modules.items() if p.name == "__init__.py"}
    clashes = [
        f"{n} is named like the package {packages[n.rpartition('.')[2]]}"
        for n, p in modules.items()
        if p.name not in ("__init__.py", "__main__.py") and n.rpartition(".")[2] in packages
    ]
    assert not clashes, "\n".join(clashes)


# ---------------------------------------------------------------------- the checker itself
@pytest.fixture
def fake_tree(tmp_path: Path) -> Path:
    root = tmp_path / "mamlab"
    (root / "report").mkdir(parents=True)
    (root / "analysis").mkdir()
    for f in ("__init__.py", "errors.py", "config.py", "report/__init__.py", "report/html.py",
              "analysis/__init__.py", "analysis/studies.py"):
        (root / f).write_text("")
    return root


def test_the_checker_sees_upward_edges_inside_functions_and_relative_ones(fake_tree):
    (fake_tree / "errors.py").write_text("def f():\n    from mamlab.config import X\n")
    (fake_tree / "report" / "html.py").write_text("from ..analysis import studies\n")
    bad = violations(all_modules(fake_tree))
    assert len(bad) == 2
    assert "mamlab.errors (layer 0, errors) imports mamlab.config" in bad[0]
    assert "mamlab.report.html (layer 8, report) imports mamlab.analysis.studies" in bad[1]


def test_the_checker_exempts_type_checking_and_allows_downward_edges(fake_tree):
    (fake_tree / "errors.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from mamlab.config import X\n"
    )
    (fake_tree / "analysis" / "studies.py").write_text(
        "import mamlab.report.html\nfrom mamlab import errors\nfrom .. import config\n"
    )
    assert violations(all_modules(fake_tree)) == []


def test_the_checker_places_unknown_modules_nowhere(fake_tree):
    (fake_tree / "newthing.py").write_text("")
    bad = violations(all_modules(fake_tree))
    assert any("mamlab.newthing is in no layer" in b for b in bad)
