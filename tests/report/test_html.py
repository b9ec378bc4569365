import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from mamlab.errors import MamlabError
from mamlab.report import (
    Figure,
    Section,
    Table,
    bar_chart_ci,
    format_value,
    layer_bar_chart,
    line_plot_ci,
    method_colors,
    write_report,
)
from mamlab.stats import Estimate


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _parse(path: Path) -> _Tags:
    parser = _Tags()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def test_format_value():
    assert format_value(Estimate(0.12345, 0.00421, 10)) == "0.123 ± 0.004"
    assert format_value((0.5, 0.25), digits=2) == "0.50 ± 0.25"
    assert format_value(3) == "3"
    assert format_value(0.5) == "0.500"
    assert format_value(1.5e-7) == "1.50e-07"
    assert format_value(float("nan")) == "n/a" and format_value(None) == "n/a"
    assert format_value("text") == "text"
    with pytest.raises(MamlabError, match="table cell"):
        format_value([1, 2, 3])


def test_report_is_self_contained_and_escapes_text(sample_report, sample_spec):
    out = sample_report.parent
    page = sample_report.read_text(encoding="utf-8")
    tags = _parse(sample_report)
    # No script of any kind, and the hostile text arrives as text, not markup.
    assert not [t for t, _ in tags.tags if t in ("script", "iframe", "object", "embed", "link")]
    assert not [t for t, _ in tags.tags if t == "b"]
    assert sample_spec["hostile"] in "".join(tags.text)
    assert "&lt;script&gt;" in page
    # No external resource: every src is a data: URI; links stay local.
    srcs = [a["src"] for t, a in tags.tags if "src" in a]
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    hrefs = [a["href"] for t, a in tags.tags if t == "a"]
    assert not [h for h in hrefs if re.match(r"^[a-z]+://", h) or h.startswith("//")]
    assert not re.search(r"url\(|@import|https?://", page.split("<style>")[1].split("</style>")[0])
    # Each embedded figure is identical to the PNG saved next to index.html.
    files = sorted(p.name for p in out.glob("*.png"))
    assert files == ["cka_layers.png", "final_loss.png", "loss_vs_steps.png"]
    for src, href in zip(srcs, [h for h in hrefs if h.endswith(".png")], strict=True):
        assert base64.b64decode(src.split(",", 1)[1]) == (out / href).read_bytes()
    imgs = [a for t, a in tags.tags if t == "img"]
    assert all(a.get("alt") for a in imgs)
    assert page.count("<figcaption>") == 3 and page.count("<caption>") == 3


def test_results_json_holds_every_number_in_the_tables(sample_report, sample_spec):
    data = json.loads((sample_report.parent / "results.json").read_text(encoding="utf-8"))
    page = sample_report.read_text(encoding="utf-8")
    assert data["results"]["seed"] == 0
    assert set(data["results"]["final"]) == set(sample_spec["methods"])
    tables = [t for s in data["sections"] for t in s["tables"]]
    assert [t["number"] for t in tables] == [1, 2, 3]
    shown = 0
    for table in tables:
        for row in table["rows"]:
            for cell in row:
                if isinstance(cell, dict):  # an estimate: the page shows "mean ± ci"
                    assert f"{cell['mean']:.3f} ± {cell['ci']:.3f}" in page
                    shown += 1
                elif isinstance(cell, float):
                    assert f"{cell:.3f}" in page
                    shown += 1
                elif isinstance(cell, int):
                    assert f">{cell}</td>" in page
                    shown += 1
    assert shown == 3 * 2 + 5 * 3 + 1  # table 1: 3 × (estimate, n); table 2: 5 × 3; table 3: 1
    assert tables[2]["rows"][1] == ["missing", None]
    # The summary lines' numbers are there too.
    assert data["summary"][0].startswith("MAML final loss: ")


def test_figures_are_labelled_pngs(tmp_path):
    colors = method_colors(["b", "a"])
    assert colors == method_colors(["a", "b", "a"])  # order- and duplicate-independent
    line = line_plot_ci(tmp_path / "l.png", [1, 2, 3], {"a": ([1.0, 0.5, 0.2], [0.1, 0.1, 0.05])},
                        xlabel="shots", ylabel="accuracy", title="t", logx=True)
    bar = bar_chart_ci(tmp_path / "sub" / "b.png", {"a": (0.5, 0.1), "b": (-0.2, 0.05)}, ylabel="Δ",
                       title="t")
    layer = layer_bar_chart(tmp_path / "c.png", ["l1", "l2"], {"a": [0.9, 0.5], "b": [0.8, 0.2]},
                            errors={"a": [0.01, 0.02]}, ylabel="CKA", title="t")
    for path in (line, bar, layer):
        image = imread(path)
        assert image.shape[1] == 768  # 6.4 in at 120 dpi
        assert image[..., :3].std() > 0.05  # not blank
    # A method's colour is used in its plot: the bar for "a" has pixels of that colour.
    rgb = np.array([int(colors["a"][i:i + 2], 16) / 255 for i in (1, 3, 5)])
    image = imread(bar)[..., :3]
    assert (np.abs(image - rgb).max(axis=-1) < 0.02).sum() > 500


def _drawn(monkeypatch) -> list:
    """The matplotlib figures the plot functions save, in order."""
    from mamlab.report import plots

    figs, save = [], plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (figs.append(fig), save(fig, path))[1])
    return figs


def test_step_axes_have_integer_ticks(tmp_path, monkeypatch):
    figs = _drawn(monkeypatch)
    for integer_x in (False, True):
        line_plot_ci(tmp_path / f"{integer_x}.png", [0, 1, 2, 3], {"a": ([1.0, 0.5, 0.3, 0.2], [0.1] * 4)},
                     xlabel="inner SGD steps", ylabel="loss", title="t", integer_x=integer_x)
    default, integer = (f.axes[0].get_xticks() for f in figs)
    assert any(t != round(t) for t in default)  # matplotlib's own choice: half steps
    assert all(t == round(t) for t in integer) and len(integer) >= 4


def test_bar_chart_marks_reference_lines_in_the_legend(tmp_path, monkeypatch):
    figs = _drawn(monkeypatch)
    layer_bar_chart(tmp_path / "s.png", ["MAML", "ANIL"], {"support": [12.0, 3.0]}, ylabel="eigenvalue",
                    title="t", ylim=None, hlines={"2/α = 200 (α = 0.01)": 200.0})
    ax = figs[0].axes[0]
    assert [(line.get_label(), line.get_ydata()[0]) for line in ax.lines] == [("2/α = 200 (α = 0.01)", 200.0)]
    assert "2/α = 200 (α = 0.01)" in [t.get_text() for t in figs[0].legends[0].get_texts()]
    with pytest.raises(MamlabError, match="hlines"):
        layer_bar_chart(tmp_path / "x.png", ["a"], {"s": [1.0]}, ylabel="y", title="t",
                        hlines={"2/α": float("inf")})


@pytest.mark.parametrize("call, match", [
    (lambda p: line_plot_ci(p / "x.png", [1, 2], {}, xlabel="x", ylabel="y", title="t"), "series is empty"),
    (lambda p: line_plot_ci(p / "x.png", [1, 2], {"a": ([1.0], [0.1])}, xlabel="x", ylabel="y", title="t"),
     "2 values"),
    (lambda p: line_plot_ci(p / "x.jpg", [1], {"a": ([1.0], [0.1])}, xlabel="x", ylabel="y", title="t"),
     r"\.png"),
    (lambda p: bar_chart_ci(p / "x.png", {"a": (float("nan"), 0.1)}, ylabel="y", title="t"), "finite"),
    (lambda p: bar_chart_ci(p / "x.png", {"a": 0.5}, ylabel="y", title="t"), "pair"),
    (lambda p: bar_chart_ci(p / "x.png", {"a": (0.5, 0.1)}, ylabel="y", title="t", colors={"b": "red"}),
     "no entry"),
    (lambda p: layer_bar_chart(p / "x.png", ["l1"], {"a": [0.1, 0.2]}, ylabel="y", title="t"), "1 values"),
    (lambda p: layer_bar_chart(p / "x.png", [], {"a": []}, ylabel="y", title="t"), "layers is empty"),
])
def test_plot_bad_input_raises_mamlab_error(tmp_path, call, match):
    with pytest.raises(MamlabError, match=match):
        call(tmp_path)


def test_write_report_places_figures_and_dedupes_names(tmp_path):
    a = bar_chart_ci(tmp_path / "a" / "fig.png", {"x": (1.0, 0.1)}, ylabel="y", title="a")
    b = bar_chart_ci(tmp_path / "b" / "fig.png", {"x": (2.0, 0.1)}, ylabel="y", title="b")
    index = write_report(tmp_path / "out", "T", [], [Section("S", figures=[Figure(a, "A"), Figure(b, "B")])],
                         {"tensor": torch.tensor([1.0, float("inf")]), "np": np.float32(0.5)})
    assert sorted(p.name for p in index.parent.glob("*.png")) == ["fig-2.png", "fig.png"]
    assert (index.parent / "fig.png").read_bytes() == a.read_bytes()
    assert (index.parent / "fig-2.png").read_bytes() == b.read_bytes()
    data = json.loads((index.parent / "results.json").read_text())
    assert data["results"] == {"tensor": [1.0, None], "np": 0.5}
    # Writing again over the same folder reuses the files instead of piling up copies.
    write_report(tmp_path / "out", "T", [], [Section("S", figures=[Figure(a, "A"), Figure(b, "B")])])
    assert len(list(index.parent.glob("*.png"))) == 2


@pytest.mark.parametrize("kwargs, match", [
    ({"title": 3}, "title must be a string"),
    ({"summary_lines": "one line"}, "summary_lines"),
    ({"sections": [{"title": "S"}]}, "sections must be a list"),
    ({"results": [1, 2]}, "results must be a dict"),
    ({"results": {"f": object()}}, "not JSON-serializable"),
    ({"sections": [Section("S", figures=[Figure("/nonexistent.png", "c")])]}, "does not exist"),
    ({"sections": [Section("S", tables=[Table("t", ["a", "b"], [[1]])])]}, "row 0 has 1 cells"),
    ({"sections": [Section("S", tables=[Table("t", ["a"], [[{"x": 1}]])])]}, "table cell"),
    ({"sections": [Section("S", tables=[Table("t", [], [])])]}, "no columns"),
])
def test_write_report_bad_input_raises_before_writing(tmp_path, kwargs, match):
    args = {"title": "T", "summary_lines": [], "sections": [], "results": None} | kwargs
    with pytest.raises(MamlabError, match=match):
        write_report(tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()


def test_non_png_figure_is_rejected(tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"GIF89a not a png")
    with pytest.raises(MamlabError, match="not a PNG"):
        write_report(tmp_path / "out", "T", [], [Section("S", figures=[Figure(fake, "c")])])
