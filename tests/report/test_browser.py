"""Render the report in headless Chromium: it loads without errors and every figure is displayed.

Needs a Chromium binary (Debian: ``apt-get install -y chromium``); skipped when none is found,
unless ``MAMLAB_REQUIRE_BROWSER=1`` (set it in CI), which turns a missing browser into a failure.
The report itself has no JavaScript, so the test renders a copy of ``index.html`` with a small
probe script injected at the top of <head>; on ``load`` the probe writes what it saw (image sizes,
error events, non-data: resources) into the DOM as JSON, and ``--dump-dom`` hands it back.
"""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

pytestmark = pytest.mark.browser
SKIP_REASON = "no Chromium found (install the Debian package `chromium`, or set MAMLAB_CHROMIUM)"

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--mute-audio"]

PROBE = """<script>
window.__mamlabErrors = [];
window.addEventListener("error", function (e) {
  var t = e.target;
  window.__mamlabErrors.push(t && t !== window && t.tagName
    ? "failed to load " + t.tagName + " " + String(t.src || t.href || "").slice(0, 40)
    : "script error: " + e.message);
}, true);
window.addEventListener("load", function () {
  var images = Array.prototype.map.call(document.images, function (im) {
    var box = im.getBoundingClientRect(), style = getComputedStyle(im);
    return {naturalWidth: im.naturalWidth, naturalHeight: im.naturalHeight, complete: im.complete,
            width: box.width, height: box.height, alt: im.alt,
            hidden: style.display === "none" || style.visibility === "hidden"};
  });
  var external = performance.getEntriesByType("resource").map(function (r) { return r.name; })
    .filter(function (name) { return !/^data:/.test(name); });
  var out = document.createElement("pre");
  out.id = "mamlab-probe";
  out.textContent = JSON.stringify({images: images, errors: window.__mamlabErrors, external: external,
    title: document.title, tables: document.querySelectorAll("table").length});
  document.body.appendChild(out);
});
</script>"""


@pytest.fixture
def browser(chromium: str | None) -> str:
    """The Chromium binary; skips the test when there is none, fails it if MAMLAB_REQUIRE_BROWSER=1."""
    if chromium is None:
        if os.environ.get("MAMLAB_REQUIRE_BROWSER") == "1":
            pytest.fail("MAMLAB_REQUIRE_BROWSER=1 but " + SKIP_REASON)
        pytest.skip(SKIP_REASON)
    return chromium


def _chromium(binary: str, args: list[str], timeout: float = 90.0) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="mamlab-chromium-") as profile:
        return subprocess.run([binary, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=timeout, check=False)


def _probe(binary: str, page: Path, work_dir: Path) -> dict:
    """Load ``page`` (a copy with the probe injected, in ``work_dir``) and return the probe's findings.

    The copy may live elsewhere because the report's figures are data: URIs, not relative files.
    """
    source = page.read_text(encoding="utf-8")
    assert source.count("<head>") == 1
    probed = work_dir / f"probe-{page.name}"
    probed.write_text(source.replace("<head>", "<head>\n" + PROBE, 1), encoding="utf-8")
    result = _chromium(binary, ["--virtual-time-budget=10000", "--dump-dom", probed.as_uri()])
    match = re.search(r'<pre id="mamlab-probe">(.*?)</pre>', result.stdout, re.S)
    assert match, f"probe output missing (rc={result.returncode}); stderr: {result.stderr[-2000:]}"
    return json.loads(html.unescape(match.group(1)))


def test_report_loads_without_errors_and_shows_every_figure(browser, sample_report, tmp_path):
    seen = _probe(browser, sample_report, tmp_path)
    assert seen["errors"] == []
    assert seen["external"] == []  # nothing fetched but data: URIs
    assert seen["tables"] == 3
    assert seen["title"].startswith("Generalization report <script>")  # escaped text, shown as text
    assert len(seen["images"]) == 3
    for image in seen["images"]:
        assert image["complete"] and not image["hidden"], image
        assert image["naturalWidth"] == 768 and image["naturalHeight"] > 0, image
        assert image["width"] > 300 and image["height"] > 150, image  # laid out at a readable size


def test_probe_detects_a_broken_figure(browser, tmp_path):
    # The check above can fail: a corrupt image is reported with naturalWidth 0 and an error event.
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><head><title>b</title></head><body>'
                    '<img alt="ok" src="data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJ'
                    'AAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==">'
                    '<img alt="broken" src="data:image/png;base64,bm90IGEgcG5n"></body></html>',
                    encoding="utf-8")
    seen = _probe(browser, page, tmp_path)
    assert [im["naturalWidth"] for im in seen["images"]] == [1, 0]
    assert len(seen["errors"]) == 1 and "IMG" in seen["errors"][0]


def test_screenshot_of_the_report_is_not_blank(browser, sample_report, tmp_path):
    shot = tmp_path / "screenshot.png"
    result = _chromium(browser, ["--window-size=1100,3400", f"--screenshot={shot}", sample_report.as_uri()])
    assert shot.is_file(), f"no screenshot (rc={result.returncode}); stderr: {result.stderr[-2000:]}"
    image = imread(shot)[..., :3]
    assert image.shape[:2] == (3400, 1100)
    rows_with_ink = (image.std(axis=(1, 2)) > 0.01).sum()
    assert rows_with_ink > 1500  # text, three figures and three tables fill much of the page
    assert np.abs(image[:, :40] - 1.0).max() < 0.01  # margins stay white: the layout is centred
