"""What ``benchmarks/gpu_check.sh`` wrote, as the README's tables and the "Speed near the hardware"
issue's targets, each met, missed or not measured.

The GPU call brings back a folder (``speed-CASE.json``, ``scale.json``, ``device_check.json``,
``log.txt``); this script reads it on any machine, so the tables in the README come from one
command anyone can rerun on those files, and no number is copied by hand::

    python benchmarks/gpu_report.py OUT                 # markdown on stdout
    python benchmarks/gpu_report.py OUT --json v.json   # and the verdicts as JSON

The targets (ratios against learn2learn measured in the same run, as the issue asks):

* ``sinusoid``: a mamlab implementation at least 50x learn2learn, 25 tasks;
* ``conv4``: a mamlab implementation at least 20x learn2learn with a peak of at most 2 GB (2e9
  bytes of ``torch.cuda.max_memory_allocated``, the stricter reading of "GB"), 32 tasks;
* ``scale``: 1,024 Conv4 tasks in one meta-batch ran;
* ``omniglot20``: ``mamlab train omniglot`` 20-way 1-shot, 5 steps, second order, meta-batch 16 at
  a median meta-iteration of at most 0.091 s / 3 (the issue's baseline, a third of it);
* ``long_inner_loops``: with ``recompute``, 20 inner steps at most 3x the peak memory of 1 step;
* ``cuda_graphs_exact``: every CUDA-graph replay's float64 meta-gradient within 1e-10 (relative)
  of the eager one.

A target whose file or row is missing is "not measured"; the report never fills one in.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["Verdict", "load", "case_table", "scale_table", "long_inner_loops", "verdicts", "report", "main"]

OMNIGLOT_BASELINE_S = 0.091
PEAK_LIMIT_BYTES = 2e9
TARGET_RATIOS = {"sinusoid": 50.0, "conv4": 20.0}


@dataclass(frozen=True)
class Verdict:
    """One target: ``met`` is True or False, or None when it was not measured; ``evidence`` says why."""

    target: str
    met: bool | None
    evidence: str


def load(out: Path) -> dict[str, Any]:
    """The files of ``out`` that exist: ``{"speed": {case: report}, "scale", "device", "log"}``."""
    data: dict[str, Any] = {"speed": {}}
    for path in sorted(out.glob("speed-*.json")):
        report = json.loads(path.read_text())
        data["speed"].update(report.get("cases", {}))
        data.setdefault("meta", {k: report.get(k) for k in ("torch", "device", "device_name")})
    if (out / "scale.json").is_file():
        data["scale"] = json.loads((out / "scale.json").read_text()).get("scale", {})
    if (out / "device_check.json").is_file():
        data["device"] = json.loads((out / "device_check.json").read_text())
    if (out / "log.txt").is_file():
        data["log"] = (out / "log.txt").read_text()
    return data


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _ratio(a: float, b: float | None) -> str:
    return f"{a / b:.2f}" if b else "-"


def _ok(row: dict[str, Any] | None) -> bool:
    return bool(row) and "it_s" in row


def case_table(case: dict[str, Any]) -> str:
    """A markdown table of one ``speed.py`` case: it/s, ratios to the loop and learn2learn, peak
    memory, and (for profiled rows) device operations per iteration and the GPU's busy share."""
    rows = case["results"]
    loop, l2l = (rows.get(k) if _ok(rows.get(k)) else None for k in ("loop", "learn2learn"))
    profiled = any("profile" in r for r in rows.values())
    head = "| implementation | it/s | × loop | × learn2learn | peak memory | peak × loop |"
    rule = "|---|---:|---:|---:|---:|---:|"
    if profiled:
        head += " ops / it | GPU busy / it |"
        rule += "---:|---:|"
    lines = [f"{case['desc']}, {case['tasks']} tasks, {case['steps']} inner step(s); median of {case['iters']} "
             f"meta-iterations after {case['warmup']} warm-up", "", head, rule]
    for impl, r in rows.items():
        if not _ok(r):
            lines.append(f"| {impl} | {r.get('skipped', 'no result')} |" + " |" * (4 + 2 * profiled))
            continue
        line = (f"| {impl} | {r['it_s']:.2f} | {_ratio(r['it_s'], loop and loop['it_s'])} | "
                f"{_ratio(r['it_s'], l2l and l2l['it_s'])} | {_gb(r['peak_bytes'])} | "
                f"{_ratio(r['peak_bytes'], loop and loop['peak_bytes'])} |")
        if profiled:
            p = r.get("profile") or {}
            if "ops_per_it" in p:
                busy = "-" if p.get("busy_s") is None else \
                    f"{p['busy_s'] * 1e3:.3f} ms ({p['busy_s'] / r['median_s']:.0%})"
                line += f" {p['ops_per_it']:.0f} | {busy} |"
            else:
                line += f" {p.get('error', '')} | |"
        lines.append(line)
    profiles = {impl: r["profile"] for impl, r in rows.items() if "kind" in (r.get("profile") or {})}
    if profiles:
        kinds = sorted({p["kind"] for p in profiles.values()})
        lines += ["", f"ops: {', '.join(kinds)}, per meta-iteration under torch.profiler; GPU busy: the union of "
                      "their intervals, and its share of the timed iteration. The top ones, per meta-iteration:", ""]
        for impl, p in profiles.items():
            top = "; ".join(f"`{name[:60]}` {t * 1e3:.3f} ms ({n:.0f}x)" for name, t, n in p["top"][:3])
            lines.append(f"- {impl}: {top}")
    return "\n".join(lines)


def scale_table(scale: dict[str, dict[str, Any]]) -> str:
    """A markdown table: Conv4 tasks per second and peak memory by meta-batch size, per implementation."""
    impls = list(scale)
    sizes = sorted({int(s) for rows in scale.values() for s in rows})
    lines = ["| tasks | " + " | ".join(f"{i} tasks/s | {i} peak" for i in impls) + " |",
             "|---:|" + "---:|---:|" * len(impls)]
    for size in sizes:
        cells = []
        for impl in impls:
            r = scale[impl].get(str(size)) or scale[impl].get(size)  # type: ignore[call-overload]
            if _ok(r):
                cells += [f"{size * r['it_s']:.1f}", _gb(r["peak_bytes"])]
            else:
                cells += ["out of memory" if r and r.get("oom") else (r or {}).get("skipped", "-"), ""]
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


_LONG_ROW = re.compile(r"^(\w+)\s+(\d+)\s+(True|False)\s+([\d.]+)\s+([\d.]+)(?:\s+([\d.]+))?\s*$")


def long_inner_loops(log: str) -> list[dict[str, Any]]:
    """The rows ``benchmarks/long_inner_loops.py`` printed in ``log`` (its step of ``gpu_check.sh``)."""
    section = log.split("=== long-inner-loops:", 1)[1].split("\n=== ", 1)[0] if "=== long-inner-loops:" in log \
        else ""
    rows = []
    for line in section.splitlines():
        m = _LONG_ROW.match(line.strip())
        if m:
            rows.append({"case": m[1], "steps": int(m[2]), "recompute": m[3] == "True", "s_per_it": float(m[4]),
                         "saved_mib": float(m[5]), "cuda_mib": None if m[6] is None else float(m[6])})
    return rows


def _best(rows: dict[str, Any], ok: Any = lambda r: True) -> tuple[str, dict[str, Any]] | None:
    """The fastest mamlab implementation of ``rows`` that passes ``ok``."""
    found = [(impl, r) for impl, r in rows.items() if impl.startswith("mamlab") and _ok(r) and ok(r)]
    return max(found, key=lambda kv: kv[1]["it_s"]) if found else None


def _ratio_verdict(data: dict[str, Any], case: str) -> Verdict:
    target = TARGET_RATIOS[case]
    name = f"{case}: >= {target:g}x learn2learn" + (", peak <= 2 GB" if case == "conv4" else "")
    rows = data["speed"].get(case, {}).get("results")
    if not rows or not _ok(rows.get("learn2learn")):
        return Verdict(name, None, "learn2learn was not measured" if rows else f"no speed-{case}.json")
    l2l = rows["learn2learn"]["it_s"]
    fits = (lambda r: r["peak_bytes"] <= PEAK_LIMIT_BYTES) if case == "conv4" else (lambda r: True)
    best = _best(rows, fits)
    if not any(impl.startswith("mamlab") for impl in rows):
        return Verdict(name, None, "no mamlab implementation was measured (the step cut short?)")
    if best is None:
        return Verdict(name, False, "no mamlab implementation ran" + (" within 2 GB" if case == "conv4" else ""))
    impl, r = best
    return Verdict(name, r["it_s"] / l2l >= target,
                   f"{impl}: {r['it_s']:.2f} it/s = {r['it_s'] / l2l:.1f}x learn2learn ({l2l:.2f} it/s), "
                   f"peak {_gb(r['peak_bytes'])}")


def verdicts(data: dict[str, Any]) -> list[Verdict]:
    """Every target of the issue, from the files ``load`` read."""
    out = [_ratio_verdict(data, "sinusoid"), _ratio_verdict(data, "conv4")]

    name = "scale: 1,024 Conv4 tasks in one meta-batch"
    tried = {impl: r for impl, rows in (data.get("scale") or {}).items() for s, r in rows.items() if int(s) == 1024}
    ran = {impl: r for impl, r in tried.items() if _ok(r)}
    if not tried:
        out.append(Verdict(name, None, "no scale.json" if "scale" not in data else "1,024 tasks were not tried"))
    else:
        why = {i: "out of memory" if r.get("oom") else r.get("skipped", "no result") for i, r in tried.items()
               if i not in ran}
        out.append(Verdict(name, bool(ran), "; ".join(
            [f"{i}: {1024 * r['it_s']:.1f} tasks/s, peak {_gb(r['peak_bytes'])}" for i, r in ran.items()]
            + [f"{i}: {w}" for i, w in why.items()])))

    limit = OMNIGLOT_BASELINE_S / 3
    omni = (data.get("device") or {}).get("omniglot_speed")
    timed = {k: v["median_s"] for k, v in (omni or {}).items()
             if k.startswith("second") and isinstance(v, dict) and v.get("exit") == 0 and v.get("median_s")}
    if timed:
        variant = min(timed, key=timed.__getitem__)
        out.append(Verdict(f"omniglot20: median meta-iteration <= {limit:.4f} s (0.091 s / 3)",
                           timed[variant] <= limit,
                           f"mamlab train omniglot, {variant}: {timed[variant]:.4f} s, "
                           f"{OMNIGLOT_BASELINE_S / timed[variant]:.2f}x the speed of the 0.091 s baseline"))
    else:
        out.append(Verdict("omniglot20: median meta-iteration <= 0.0303 s (0.091 s / 3)", None,
                           "no second-order omniglot run in device_check.json"))

    rows = long_inner_loops(data.get("log", ""))
    evidence, met = [], None
    for case in sorted({r["case"] for r in rows}):
        by_steps = {r["steps"]: r for r in rows if r["case"] == case and r["recompute"]}
        if 1 in by_steps and 20 in by_steps:
            key = "cuda_mib" if by_steps[1]["cuda_mib"] is not None else "saved_mib"
            ratio = by_steps[20][key] / by_steps[1][key]
            met = (met is not False) and ratio <= 3
            measure = "torch.cuda.max_memory_allocated" if key == "cuda_mib" else "saved tensors"
            evidence.append(f"{case}: {ratio:.2f}x ({measure})")
    out.append(Verdict("long_inner_loops: recompute, 20 steps <= 3x the peak memory of 1 step", met,
                       "; ".join(evidence) or "no long-inner-loops table in log.txt"))

    name = "cuda_graphs_exact: replays = eager calls, float64, 1e-10"
    graphs = (data.get("device") or {}).get("cuda_graphs")
    values = graphs.get("float64_max_relative", {}) if isinstance(graphs, dict) else {}
    if not graphs:
        out.append(Verdict(name, None, "no cuda_graphs in device_check.json"))
    elif not values:
        out.append(Verdict(name, False, f"the step failed: {str(graphs.get('error', graphs))[:300]}"))
    else:
        failed = {k: v for k, v in values.items() if not isinstance(v, (int, float)) or v > 1e-10}
        numbers = [v for v in values.values() if isinstance(v, (int, float))]
        worst = f", worst {max(numbers):.1e}" if numbers else ""
        out.append(Verdict(name, not failed, f"{len(values)} cases{worst}" + (f"; failed: {failed}" if failed else "")))
    return out


def report(data: dict[str, Any]) -> str:
    """The whole markdown report: the verdicts, then each table."""
    meta = data.get("meta") or {}
    parts = [f"GPU: {meta.get('device_name', '?')}, torch {meta.get('torch', '?')}", "", "| target | met | evidence |",
             "|---|---|---|"]
    for v in verdicts(data):
        met = "not measured" if v.met is None else ("yes" if v.met else "**no**")
        parts.append(f"| {v.target} | {met} | {v.evidence} |")
    for case, body in data["speed"].items():
        parts += ["", f"### {case}", "", case_table(body)]
    if data.get("scale"):
        parts += ["", "### scale (Conv4 5-way 1-shot, 15 queries)", "", scale_table(data["scale"])]
    omni = (data.get("device") or {}).get("omniglot_speed") or {}
    timed = {k: v for k, v in omni.items() if isinstance(v, dict) and "median_s" in v}
    if timed:
        parts += ["", "### mamlab train omniglot, 20-way 1-shot, 5 steps, meta-batch 16", "",
                  "| variant | exit | median s/it | s/it (closing line) |", "|---|---:|---:|---:|"]
        for k, v in timed.items():
            median = "-" if v.get("median_s") is None else f"{v['median_s']:.4f}"
            closing = "-" if v.get("s_per_iteration") is None else f"{v['s_per_iteration']:.4f}"
            parts.append(f"| {k} | {v.get('exit')} | {median} | {closing} |")
    rows = long_inner_loops(data.get("log", ""))
    if rows:
        parts += ["", "### long inner loops", "", "| case | steps | recompute | s/it | saved MiB | CUDA peak MiB |",
                  "|---|---:|---|---:|---:|---:|"]
        for r in rows:
            cuda = "-" if r["cuda_mib"] is None else f"{r['cuda_mib']:.2f}"
            parts.append(f"| {r['case']} | {r['steps']} | {r['recompute']} | {r['s_per_it']:.4f} | "
                         f"{r['saved_mib']:.2f} | {cuda} |")
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (2 for a folder with none of gpu_check.sh's files)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the folder gpu_check.sh wrote (OUT)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the verdicts to FILE")
    args = parser.parse_args(argv)
    if not args.out.is_dir():
        print(f"gpu_report.py: error: {args.out} is not a folder; give the OUT that gpu_check.sh wrote",
              file=sys.stderr)
        return 2
    data = load(args.out)
    if not (data["speed"] or "scale" in data or "device" in data or "log" in data):
        print(f"gpu_report.py: error: {args.out} holds none of gpu_check.sh's files (speed-*.json, scale.json, "
              "device_check.json, log.txt)", file=sys.stderr)
        return 2
    sys.stdout.write(report(data))
    if args.json:
        args.json.write_text(json.dumps([asdict(v) for v in verdicts(data)], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
