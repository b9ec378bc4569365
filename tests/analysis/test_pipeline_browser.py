"""A real generated analysis report loads in headless Chromium without errors and shows every figure.

Reuses the probe and the Chromium runner of ``tests/report/test_browser.py`` (loaded from its file:
the test folders are not packages). Skipped without Chromium unless ``MAMLAB_REQUIRE_BROWSER=1``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from mamlab.analysis.pipeline import analyze_runs
from mamlab.config import resolve_config
from mamlab.train import train

pytestmark = pytest.mark.browser


def _load_browser_helpers():
    path = Path(__file__).resolve().parents[1] / "report" / "test_browser.py"
    spec = importlib.util.spec_from_file_location("_mamlab_report_browser_helpers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


helpers = _load_browser_helpers()


@pytest.fixture(scope="module")
def chromium_binary() -> str:
    """The browser as tests/report/conftest.py finds it; skip (or fail under MAMLAB_REQUIRE_BROWSER=1)."""
    env = os.environ.get("MAMLAB_CHROMIUM")
    names = [env] if env else ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"]
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    if os.environ.get("MAMLAB_REQUIRE_BROWSER") == "1":
        pytest.fail("MAMLAB_REQUIRE_BROWSER=1 but " + helpers.SKIP_REASON)
    pytest.skip(helpers.SKIP_REASON)


@pytest.fixture(scope="module")
def analysis_report(tmp_path_factory) -> Path:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("analysis")
        for method in ("maml", "pretrain"):
            cfg = resolve_config("sinusoid", None, {"method": method, "iterations": 30, "hidden": [8, 8],
                                                    "checkpoint_every": 10, "val_every": 10, "val_tasks": 5})
            train(cfg, root / method, progress=False, echo=lambda s: None)
        return analyze_runs([root / "maml", root / "pretrain"], root / "report", tasks=20, steps=3,
                            echo=lambda s: None)
    finally:
        torch.set_num_threads(before)


def test_analysis_report_loads_and_shows_every_figure(chromium_binary, analysis_report, tmp_path):
    seen = helpers._probe(chromium_binary, analysis_report, tmp_path)
    results = json.loads((analysis_report.parent / "results.json").read_text())
    figures = [f for sec in results["sections"] for f in sec["figures"]]
    tables = [t for sec in results["sections"] for t in sec["tables"]]
    assert seen["errors"] == []
    assert seen["external"] == []  # self-contained: nothing fetched but data: URIs
    assert seen["title"] == results["title"]
    assert seen["tables"] == len(tables)
    assert len(seen["images"]) == len(figures) >= 12
    for image in seen["images"]:
        assert image["complete"] and not image["hidden"], image
        assert image["naturalWidth"] > 0 and image["naturalHeight"] > 0, image
        assert image["width"] > 300 and image["height"] > 150, image  # laid out at a readable size
