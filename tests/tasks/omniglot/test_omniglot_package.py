"""The package's public surface, the old omniglot_runs path, and imports that flow one way."""

import ast
import importlib
from pathlib import Path

import pytest

import mamlab.tasks.omniglot as omniglot
from mamlab.tasks.omniglot import oneshot

# what ``mamlab.tasks.omniglot`` offered when it was one module
OLD_NAMES = ["ARCHIVES", "Archive", "CharacterPool", "Omniglot", "OmniglotTasks", "SPLITS", "SPLIT_ARCHIVES",
             "decode_png", "default_cache_dir", "download", "load_characters", "resize_strokes", "safe_extract",
             "AFFINE_RANGES", "PARTS", "VINYALS_TRAIN", "affine_warp", "random_affine"]
# each module imports only modules before it
LAYERS = ["cache", "archive", "pool", "sampler", "oneshot", "splits"]


def test_package_reexports_the_old_names():
    assert set(OLD_NAMES) == set(omniglot.__all__)
    for name in OLD_NAMES:
        obj = getattr(omniglot, name)
        homes = [m for m in LAYERS if getattr(importlib.import_module(f"mamlab.tasks.omniglot.{m}"), name, None) is obj
                 and name in importlib.import_module(f"mamlab.tasks.omniglot.{m}").__all__]
        assert len(homes) == 1, (name, homes)


def test_omniglot_runs_is_the_oneshot_module():
    old = importlib.import_module("mamlab.tasks.omniglot_runs")
    for name in oneshot.__all__:
        assert getattr(old, name) is getattr(oneshot, name)
    from mamlab.tasks import OneShotRun, evaluate_runs, load_runs
    assert (OneShotRun, evaluate_runs, load_runs) == (oneshot.OneShotRun, oneshot.evaluate_runs, oneshot.load_runs)


@pytest.mark.parametrize("module", LAYERS)
def test_imports_flow_one_way(module):
    path = Path(omniglot.__file__).with_name(f"{module}.py")
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
    siblings = {m.removeprefix("mamlab.tasks.omniglot.") for m in imported if m.startswith("mamlab.tasks.omniglot.")}
    assert siblings <= set(LAYERS[:LAYERS.index(module)]), siblings
    assert "mamlab.tasks.omniglot" not in imported and "mamlab.tasks.omniglot_runs" not in imported
    assert set(importlib.import_module(f"mamlab.tasks.omniglot.{module}").__all__)
