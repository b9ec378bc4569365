"""A run's configuration in three parts: run options, task options, algorithm options.

* **Run options** (``RUN_OPTIONS``) apply to every run: iterations, meta-batch, shots, the meta
  learning rate, seeds, checkpoints, device, precision.
* **Task options** are declared by the task family (``mamlab.experiments``): sinusoid ranges,
  Omniglot's data and N-way, the model's size.
* **Algorithm options** are declared by the algorithm (``mamlab.algorithms.registry``): the inner
  step size, inner steps, first order, ANIL's head.

Values come, lowest first, from the options' defaults, the task's papers' settings, a TOML file
(``--config``, or a packaged preset, ``--preset``) and command-line flags. A key that belongs to
another task or algorithm than the chosen ones is a one-line error. ``config.json`` in a run
directory holds ``{"format": 2, "task", "algorithm", "run", "task_options", "algorithm_options"}``;
the flat files of mamlab 0.1.0 still load.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from mamlab.algorithms.registry import ALGORITHMS, algorithm_spec
from mamlab.core.execution import EXECUTIONS
from mamlab.errors import MamlabError
from mamlab.experiments import TASKS, task_spec
from mamlab.options import Option, check_options

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["TrainConfig", "RUN_OPTIONS", "RESUMABLE_OPTIONS", "SCHEDULES", "PRECISIONS", "CONFIG_FORMAT",
           "META_OPTIMIZERS",
           "resolve_config", "load_toml", "meta_lr_at", "presets", "load_preset", "option_owner"]

CONFIG_FORMAT = 2
SCHEDULES = ("constant", "cosine", "linear")
META_OPTIMIZERS = ("adam", "sgd")
PRECISIONS = ("fp32", "tf32", "bf16")

RUN_OPTIONS: tuple[Option, ...] = (
    Option("iterations", "int", 70000, "meta-training iterations", positive=True),
    Option("meta_batch", "int", 25, "tasks per meta-batch", positive=True),
    Option("shots", "int", 10, "support examples per task (per class for classification)", positive=True),
    Option("queries", "int", 10, "query examples per task (per class for classification)", positive=True),
    Option("meta_lr", "float", 0.001, "β, Adam's learning rate", positive=True),
    Option("meta_optimizer", "str", "adam", "the outer loop's optimizer: adam, or plain sgd (Reptile's "
           "θ ← θ + β(φ̄ − θ))", choices=META_OPTIMIZERS),
    Option("lr_schedule", "str", "constant", "meta learning rate over the run: constant, cosine or linear "
           "(from β down to 0)", choices=SCHEDULES),
    Option("seed", "int", 0, "seed of the initialization, the task stream and validation tasks",
           positive="nonnegative"),
    Option("execution", "str", "auto", "how tasks run: auto, batched (MLPs), conv (Conv4-like nets: one task "
           "at a time on the CPU, grouped convolutions on CUDA), vmap or loop", choices=EXECUTIONS),
    Option("task_chunk", "int", None, "tasks run together on the batched, vmap and conv paths (bounds "
           "memory; default: all, or one on the CPU's conv path)",
           positive=True, nullable=True),
    Option("val_every", "int", 1000, "validate every N iterations", positive=True),
    Option("val_tasks", "int", 100, "validation tasks", positive=True),
    Option("checkpoint_every", "int", 1000, "checkpoint every N iterations", positive=True),
    Option("skip_nonfinite", "bool", False, "skip meta-batches with a non-finite loss or gradient "
           "instead of stopping"),
    Option("deterministic", "bool", False, "use torch's deterministic algorithms"),
    Option("device", "str", "auto", "auto (a GPU when there is one), cpu, cuda or cuda:N"),
    Option("precision", "str", "fp32", "fp32, tf32 (CUDA matmuls in TF32) or bf16 (autocast)",
           choices=PRECISIONS),
    Option("cuda_graph", "bool", False, "CUDA only: capture the meta-gradient as a CUDA graph once and "
           "replay it (the same kernels without their launch cost; mamlab.core.graphs)"),
    Option("train_tasks", "int", None, "meta-train on a fixed pool of M tasks instead of a fresh task "
           "each time (default: fresh tasks)", positive=True, nullable=True),
    Option("train_examples", "int", None, "examples N of each pool task (per class for classification), "
           "from which support and query sets are drawn; needs train_tasks (default shots + queries)",
           positive=True, nullable=True),
)
_RUN = {o.name: o for o in RUN_OPTIONS}
#: Run options that ``mamlab train --resume`` may change; the others are fixed by the run.
RESUMABLE_OPTIONS = ("iterations", "device", "precision", "val_every", "checkpoint_every", "execution",
                     "task_chunk", "cuda_graph")


def option_owner(key: str) -> list[str]:
    """Where a key belongs: ``["run"]``, ``["task sinusoid"]``, ``["algorithm maml", ...]`` or ``[]``."""
    if key in _RUN:
        return ["run"]
    owners = [f"task {n}" for n, s in TASKS.items() if any(o.name == key for o in s.options)]
    owners += [f"algorithm {n}" for n, s in ALGORITHMS.items() if any(o.name == key for o in s.options)]
    return owners


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved as ``config.json`` in the run directory.

    Run options are attributes; the chosen task's and algorithm's options live in
    ``task_options`` and ``algorithm_options`` and read as attributes too (``config.ways``,
    ``config.inner_lr``) when the task or algorithm has them.
    """

    task: str = "sinusoid"
    algorithm: str = "maml"
    iterations: int = 70000
    meta_batch: int = 25
    shots: int = 10
    queries: int = 10
    meta_lr: float = 0.001
    meta_optimizer: str = "adam"
    lr_schedule: str = "constant"
    seed: int = 0
    execution: str = "auto"
    task_chunk: int | None = None
    val_every: int = 1000
    val_tasks: int = 100
    checkpoint_every: int = 1000
    skip_nonfinite: bool = False
    deterministic: bool = False
    device: str = "auto"
    precision: str = "fp32"
    cuda_graph: bool = False
    train_tasks: int | None = None
    train_examples: int | None = None
    task_options: dict[str, Any] = field(default_factory=dict)
    algorithm_options: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        # only called when normal lookup fails: the task's and the algorithm's options
        if name.startswith("__") or name in ("task_options", "algorithm_options"):
            raise AttributeError(name)
        for part in ("task_options", "algorithm_options"):
            values = self.__dict__.get(part, {})
            if name in values:
                return values[name]
        raise AttributeError(f"{name!r} is not an option of task {self.__dict__.get('task')!r} "
                             f"or algorithm {self.__dict__.get('algorithm')!r}")

    @property
    def method(self) -> str:
        """How the network was trained, in mamlab 0.1.0's words: ``"pretrain"`` or ``"maml"``."""
        return "pretrain" if self.algorithm == "pretrain" else "maml"

    def run_options(self) -> dict[str, Any]:
        """The run options as a dict."""
        return {o.name: getattr(self, o.name) for o in RUN_OPTIONS}

    def to_dict(self) -> dict[str, Any]:
        """The configuration as a JSON-ready dict (the ``config.json`` format)."""
        return {"format": CONFIG_FORMAT, "task": self.task, "algorithm": self.algorithm,
                "run": self.run_options(), "task_options": dict(self.task_options),
                "algorithm_options": dict(self.algorithm_options)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> TrainConfig:
        """Build from a ``config.json`` dict (format 2, or mamlab 0.1.0's flat one) and validate."""
        if "format" not in values:
            return _from_v0(values, source)
        if values.get("format") != CONFIG_FORMAT:
            raise MamlabError(f"{source}: config format {values.get('format')!r} is not supported; "
                              f"this mamlab reads format {CONFIG_FORMAT} and mamlab 0.1.0's")
        unknown = sorted(set(values) - {"format", "task", "algorithm", "run", "task_options",
                                         "algorithm_options"})
        if unknown:
            raise MamlabError(f"{source}: unknown key {unknown[0]!r}")
        for part in ("run", "task_options", "algorithm_options"):
            if not isinstance(values.get(part, {}), dict):
                raise MamlabError(f"{source}: {part} must be a table of options")
        return _build(values.get("task"), values.get("algorithm"), values.get("run", {}),
                      values.get("task_options", {}), values.get("algorithm_options", {}), source)

    def validate(self) -> TrainConfig:
        """Check every option (one-line MamlabError on the first bad value); return self."""
        checked = _build(self.task, self.algorithm, self.run_options(), self.task_options,
                         self.algorithm_options, "config")
        self.__dict__.update(checked.__dict__)
        return self

    def with_options(self, **values: Any) -> TrainConfig:
        """A copy with some options changed, wherever they belong (run, task or algorithm)."""
        run, task, algo = self.run_options(), dict(self.task_options), dict(self.algorithm_options)
        for key, value in values.items():
            target = run if key in _RUN else task if key in task else algo if key in algo else None
            if target is None:
                raise MamlabError(f"{key!r} is not an option of task {self.task!r} or algorithm "
                                  f"{self.algorithm!r}")
            target[key] = value
        return _build(self.task, self.algorithm, run, task, algo, "config")


def _build(task: Any, algorithm: Any, run: Mapping[str, Any], task_options: Mapping[str, Any],
           algorithm_options: Mapping[str, Any], source: str) -> TrainConfig:
    if not isinstance(task, str):
        raise MamlabError(f"{source}: task must be one of {', '.join(TASKS)}, got {task!r}")
    spec = task_spec(task)
    if not isinstance(algorithm, str):
        raise MamlabError(f"{source}: algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
    algo = algorithm_spec(algorithm)
    run_values = check_options(run, RUN_OPTIONS, "a run", source)
    task_values = check_options(task_options, spec.options, f"task {task!r}", source)
    algo_values = check_options(algorithm_options, algo.options, f"algorithm {algorithm!r}", source)
    spec.check(task_values)
    _check_pool(run_values, source)
    config = TrainConfig(task=task, algorithm=algorithm, task_options=task_values,
                         algorithm_options=algo_values, **run_values)
    _check_device_name(config.device, source)
    return config


def _check_pool(run: Mapping[str, Any], source: str) -> None:
    """``train_examples`` needs ``train_tasks`` and must hold a support and a query set."""
    examples, draws = run.get("train_examples"), run.get("shots", 10) + run.get("queries", 10)
    if examples is None:
        return
    if run.get("train_tasks") is None:
        raise MamlabError(f"{source}: train_examples = {examples} needs train_tasks (the pool size M); "
                          "without it every task is fresh")
    if examples < draws:
        raise MamlabError(f"{source}: train_examples = {examples} is less than shots + queries = {draws}; "
                          f"use train_examples >= {draws}")


def _check_device_name(device: str, source: str) -> None:
    """The form of a device name (whether it exists here is checked when a run starts)."""
    ok = device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())
    if not ok:
        prefix = f"{source}: " if source else ""
        raise MamlabError(f"{prefix}device must be auto, cpu, cuda or cuda:N, got {device!r}")


def _from_v0(values: Mapping[str, Any], source: str) -> TrainConfig:
    """mamlab 0.1.0's flat ``config.json``: every task's keys, ``method`` and ``first_order``."""
    values = dict(values)
    task = values.get("task", "sinusoid")
    method = values.pop("method", "maml")
    if method not in ("maml", "pretrain"):
        raise MamlabError(f"{source}: unknown method {method!r}; allowed: maml, pretrain")
    spec = task_spec(task)
    task_keys = {o.name for o in spec.options}
    algorithm = "pretrain" if method == "pretrain" else "maml"
    algo_keys = {o.name for o in algorithm_spec(algorithm).options}
    run = {k: v for k, v in values.items() if k in _RUN}
    task_options = {k: v for k, v in values.items() if k in task_keys}
    algorithm_options = {k: v for k, v in values.items() if k in algo_keys}
    return _build(task, algorithm, run, task_options, algorithm_options, source)


def meta_lr_at(config: TrainConfig, iteration: int) -> float:
    """The meta learning rate β of iteration ``iteration`` (1-based) under ``config.lr_schedule``."""
    if config.lr_schedule == "cosine":
        return config.meta_lr * 0.5 * (1.0 + math.cos(math.pi * (iteration - 1) / config.iterations))
    if config.lr_schedule == "linear":
        return config.meta_lr * (1.0 - (iteration - 1) / config.iterations)
    return config.meta_lr


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file; a missing or malformed file gives a one-line error naming it."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise MamlabError(f"config file {str(p)!r} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise MamlabError(f"config file {str(p)!r} is not valid TOML: {str(e).splitlines()[0]}") from None


def presets() -> dict[str, str]:
    """The packaged presets: name → the first line of its description."""
    out = {}
    for entry in sorted(resources.files("mamlab.presets").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            lines = entry.read_text().splitlines()
            out[entry.name[:-5]] = lines[0].lstrip("# ").strip() if lines else ""
    return out


def load_preset(name: str) -> dict[str, Any]:
    """The values of a packaged preset (``mamlab train --preset NAME``)."""
    available = presets()
    if name not in available:
        raise MamlabError(f"unknown preset {name!r}; allowed: {', '.join(available)}")
    return tomllib.loads(resources.files("mamlab.presets").joinpath(f"{name}.toml").read_text())


def _flatten(values: Mapping[str, Any], source: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any],
                                                               dict[str, Any]]:
    """Split file values into (top-level, run, task, algorithm) parts; flat keys go to top-level."""
    top = {k: v for k, v in values.items() if k not in ("run", "task_options", "algorithm_options", "format")}
    parts = []
    for part in ("run", "task_options", "algorithm_options"):
        v = values.get(part, {})
        if not isinstance(v, dict):
            raise MamlabError(f"{source}: [{part}] must be a table of options")
        parts.append(dict(v))
    return top, parts[0], parts[1], parts[2]


def resolve_config(task: str, file_values: Mapping[str, Any] | None = None,
                   overrides: Mapping[str, Any] | None = None, source: str = "config",
                   algorithm: str | None = None) -> TrainConfig:
    """Defaults, the task's papers' settings, a file's values, then explicit overrides, validated.

    Args:
        task: the task family's name.
        file_values: values from a TOML file or preset: flat keys, and/or ``[run]``,
            ``[task_options]``, ``[algorithm_options]`` tables (a ``config.json`` also works).
        overrides: flat keys from the command line (``None`` values are ignored). ``method =
            "pretrain"`` (mamlab 0.1.0's key) means ``algorithm = "pretrain"``.
        source: names the file in error messages.
        algorithm: the algorithm (else the file's or the override's, else ``"maml"``).
    """
    file_values = dict(file_values or {})
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    spec = task_spec(task)
    top, run, task_opts, algo_opts = _flatten(file_values, source)
    file_task = top.pop("task", task)
    if file_task != task:
        raise MamlabError(f"{source}: task {file_task!r} does not match the command's task {task!r}")
    for values, where in ((top, f"{source}: "), (overrides, "")):
        if "method" in values:  # mamlab 0.1.0's key
            method = values.pop("method")
            if method not in ("maml", "pretrain"):
                raise MamlabError(f"{where}unknown method {method!r}; allowed: maml, pretrain")
            values.setdefault("algorithm", method)
    name = algorithm or overrides.pop("algorithm", None) or top.pop("algorithm", None) or "maml"
    top.pop("algorithm", None)
    if not isinstance(name, str):
        raise MamlabError(f"{source}: algorithm must be a name, got {name!r}")
    algo = algorithm_spec(name)
    task_keys = {o.name for o in spec.options}
    algo_keys = {o.name for o in algo.options}

    def route(values: Mapping[str, Any], where: str) -> None:
        for key, value in values.items():
            if key in _RUN:
                run[key] = value
            elif key in task_keys:
                task_opts[key] = value
            elif key in algo_keys:
                algo_opts[key] = value
            else:
                owners = option_owner(key)
                if owners:
                    raise MamlabError(f"{where}option {key!r} applies to {' and '.join(owners)}, not to task "
                                      f"{task!r} with algorithm {name!r}")
                raise MamlabError(f"{where}unknown option {key!r}; the options of task {task!r} with "
                                  f"algorithm {name!r} are listed by mamlab train {task} --algorithm {name} "
                                  "--print-config")

    route(top, f"{source}: ")
    file_run, file_task_opts, file_algo_opts = dict(run), dict(task_opts), dict(algo_opts)
    run, task_opts, algo_opts = {}, {}, {}
    route(overrides, "")
    # task options first: the papers' defaults depend on them (Omniglot's N-way)
    task_values = check_options({**file_task_opts, **task_opts}, spec.options, f"task {task!r}", source)
    defaults = spec.defaults(task_values)
    run_defaults = {k: v for k, v in defaults.items() if k in _RUN}
    algo_defaults = {k: v for k, v in defaults.items() if k in algo_keys}
    return _build(task, name, {**run_defaults, **file_run, **run}, task_values,
                  {**algo_defaults, **file_algo_opts, **algo_opts}, source)
