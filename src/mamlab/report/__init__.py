"""The report: figures (PNG, matplotlib Agg) and a self-contained HTML page with results.json."""

from mamlab.report.html import Cell, Figure, Section, Table, format_value, write_report
from mamlab.report.plots import DPI, PALETTE, bar_chart_ci, layer_bar_chart, line_plot_ci, method_colors

__all__ = [
    "Cell",
    "Figure",
    "Section",
    "Table",
    "format_value",
    "write_report",
    "DPI",
    "PALETTE",
    "bar_chart_ci",
    "layer_bar_chart",
    "line_plot_ci",
    "method_colors",
]
