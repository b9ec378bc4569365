"""``mamlab demo``: MAML against the pretrain baseline on sinusoids, from training to Figure 2."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mamlab.config import resolve_config
from mamlab.errors import check_positive
from mamlab.evaluate import EvalResult, eval_generator, evaluate_model
from mamlab.report.figures import sinusoid_adaptation_figure
from mamlab.stats import paired_difference_ci
from mamlab.tasks import Sinusoid
from mamlab.train import Run, train

__all__ = ["run_demo", "DEMO_ITERATIONS", "fresh_directory"]

#: Iterations per model in the demo: a few minutes on 2 CPU cores (the paper trains 70,000).
DEMO_ITERATIONS = 10000
EVAL_STEPS = (0, 1, 5, 10)


def fresh_directory(base: Path) -> Path:
    """``base`` if it is absent or empty, else ``base-2``, ``base-3``, ...: never overwrite a run."""
    candidate, n = base, 1
    while candidate.exists() and (not candidate.is_dir() or any(candidate.iterdir())):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def _figure(runs: dict[str, Run], path: Path, seed: int) -> Path:
    """Finn et al. Figure 2: one held-out sinusoid, K=5 and K=10, before and after 1 and 10 steps."""
    family = Sinusoid()
    gen = eval_generator(seed)
    task = family.sample_tasks(1, gen)
    grid = torch.linspace(-5, 5, 200).view(1, -1, 1)
    truth = family.function(task, grid)
    panels = []
    for shots in (5, 10):
        sx = family.inputs(1, shots, gen)
        sy = family.function(task, sx)
        for name, run in runs.items():
            algorithm = run.algorithm  # adapts as trained: SGD at the run's inner_lr for both here
            device = next(algorithm.parameters()).device
            preds, params, done = {}, None, 0
            for steps in (0, 1, 10):
                params = algorithm.adapt(sx.to(device), sy.to(device), steps=steps - done, start=params)
                done = steps
                preds[steps] = algorithm.predict(params, grid.to(device))[0, :, 0].cpu().numpy()
            panels.append({"title": f"{name}, K={shots}", "support_x": sx[0, :, 0].numpy(),
                           "support_y": sy[0, :, 0].numpy(), "predictions": preds})
    return sinusoid_adaptation_figure(path, grid[0, :, 0].numpy(), truth[0, :, 0].numpy(), panels,
                                      title="Adapting to a held-out sinusoid (α = 0.01)")


def comparison_table(results: dict[str, EvalResult]) -> str:
    """A text table of mean query MSE ± 95% CI per method and step, with the paired difference."""
    names = list(results)
    steps = results[names[0]].steps
    head = f"{'steps':>5}" + "".join(f"  {n + ' MSE (95% CI)':>26}" for n in names)
    if len(names) == 2:
        head += f"  {names[1] + ' − ' + names[0] + ' (paired)':>30}"
    lines = [head]
    for s in steps:
        line = f"{s:>5}"
        for n in names:
            m = results[n].losses[s]
            line += f"  {float(m.mean()):>17.3f} ± {_ci(m):<6.3f}"
        if len(names) == 2:
            d, ci = paired_difference_ci(results[names[1]].losses[s], results[names[0]].losses[s])
            line += f"  {d:>21.3f} ± {ci:<6.3f}"
        lines.append(line)
    return "\n".join(lines)


def _ci(values: torch.Tensor) -> float:
    from mamlab.stats import mean_ci

    return mean_ci(values)[1]


def run_demo(out: str | Path | None = None, iterations: int | None = None, seed: int = 0,
             progress: bool = False, echo: Callable[[str], None] = print,
             device: str = "auto") -> dict[str, Any]:
    """Train MAML and the pretrain baseline on sinusoids, evaluate both, plot, and report.

    ``device`` (auto, cpu, cuda or cuda:N) is where both train, are evaluated and analysed.

    Returns:
        A dict with the output directory, the evaluation summaries and the paths written.
    """
    iterations = DEMO_ITERATIONS if iterations is None else iterations
    check_positive("iterations", iterations, integer=True)
    out_dir = fresh_directory(Path(out) if out is not None else Path("mamlab-demo"))
    echo(f"mamlab demo: MAML vs pretraining on sinusoids, {iterations} iterations each -> {out_dir}")
    common = {"iterations": iterations, "seed": seed, "device": device, "val_every": max(1, iterations // 10),
              "checkpoint_every": max(1, iterations // 10)}
    runs: dict[str, Run] = {}
    t0 = time.perf_counter()
    for name, method in (("MAML", "maml"), ("pretrained", "pretrain")):
        config = resolve_config("sinusoid", None, common, algorithm=method)
        runs[name] = train(config, out_dir / method, progress=progress, echo=echo)
    train_time = time.perf_counter() - t0
    echo("evaluating both on the same 600 held-out tasks (5-shot, α = 0.01) ...")
    results = {name: evaluate_model(run.algorithm, run.config, shots=5, steps=EVAL_STEPS, num_tasks=600,
                                     seed=seed) for name, run in runs.items()}
    table = comparison_table(results)
    echo("\nmean query MSE on 600 held-out sinusoid tasks, 5 support points, after k inner steps:")
    echo(table)
    figure = _figure(runs, out_dir / "figure2.png", seed)
    summary = {
        "iterations": iterations, "seed": seed, "train_seconds": round(train_time, 1),
        "results": {name: r.to_dict() for name, r in results.items()},
        "paired_difference": {
            str(s): dict(zip(("mean", "ci95"), paired_difference_ci(results["pretrained"].losses[s],
                                                                    results["MAML"].losses[s]),
                             strict=True))
            for s in EVAL_STEPS
        },
    }
    (out_dir / "comparison.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "comparison.txt").write_text(table + "\n")
    echo(f"\nFigure 2 (predictions before and after adaptation): {figure}")
    outputs: dict[str, Any] = {"out": out_dir, "figure": figure, "summary": summary, "runs": runs}
    try:
        from mamlab.analysis import analyze_runs
    except ImportError:  # the analysis report is optional for the demo
        return outputs
    report = analyze_runs([out_dir / "maml", out_dir / "pretrain"], out_dir / "report", progress=progress,
                          echo=echo, device=device)
    echo(f"generalization report: {report}")
    outputs["report"] = report
    return outputs


