import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mamlab.errors import MamlabError
from mamlab.runlog import RunLogError, RunLogger, read_metrics, run_metadata, write_json_atomic


def tb_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_jsonl_lines_parse(tmp_path):
    with RunLogger(tmp_path, tensorboard=False) as log:
        log.log(0, loss=1.5, acc=torch.tensor(0.25), n=np.int64(3), mode="train", ok=True)
        log.log(10, loss=float("nan"), grads=torch.tensor([1.0, 2.0]))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines[:1]] == [
        {"iteration": 0, "loss": 1.5, "acc": 0.25, "n": 3, "mode": "train", "ok": True}
    ]
    records = read_metrics(tmp_path)
    assert records[1]["iteration"] == 10 and records[1]["grads"] == [1.0, 2.0]
    assert records[1]["loss"] != records[1]["loss"]  # NaN survives
    assert read_metrics(tmp_path / "metrics.jsonl") == records


def test_tensorboard_has_the_scalars(tmp_path):
    with RunLogger(tmp_path) as log:
        for it in range(3):
            log.log(it, **{"train/loss": 1.0 / (it + 1)}, acc=torch.tensor(0.5 * it), note="text is skipped")
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    scalars = tb_scalars(tmp_path)
    assert set(scalars) == {"train/loss", "acc"}
    assert [s for s, _ in scalars["train/loss"]] == [0, 1, 2]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([1.0, 0.5, 1 / 3])
    assert [v for _, v in scalars["acc"]] == pytest.approx([0.0, 0.5, 1.0])


def test_truncated_last_line_is_tolerated_and_repaired(tmp_path):
    with RunLogger(tmp_path, tensorboard=False) as log:
        log.log(0, loss=1.0)
        log.log(1, loss=0.5)
    with open(tmp_path / "metrics.jsonl", "ab") as f:
        f.write(b'{"iteration": 2, "lo')  # a SIGKILL mid-write
    assert [r["iteration"] for r in read_metrics(tmp_path)] == [0, 1]
    with RunLogger(tmp_path, tensorboard=False) as log:  # appending cuts the partial line first
        log.log(2, loss=0.25)
    assert [r["iteration"] for r in read_metrics(tmp_path)] == [0, 1, 2]


def test_corrupt_line_in_the_middle_is_an_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"iteration": 0}\nGARBAGE\n{"iteration": 2}\n')
    with pytest.raises(RunLogError, match=r"metrics\.jsonl: line 2 is not valid JSON") as e:
        read_metrics(tmp_path)
    assert "\n" not in str(e.value) and isinstance(e.value, MamlabError)
    (tmp_path / "metrics.jsonl").write_text('{"iteration": 0}\n[1, 2]\n')
    with pytest.raises(RunLogError, match="line 2 is not an object with an integer 'iteration'"):
        read_metrics(tmp_path)
    with pytest.raises(RunLogError, match="cannot read metrics"):
        read_metrics(tmp_path / "missing")


def test_resume_drops_later_lines_and_tensorboard_steps(tmp_path):
    with RunLogger(tmp_path) as log:
        for it in range(10):
            log.log(it, loss=float(it))
    with RunLogger(tmp_path, resume_from_iteration=4) as log:
        assert [r["iteration"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3, 4]
        for it in range(5, 8):
            log.log(it, loss=100.0 + it)
    records = read_metrics(tmp_path)
    assert [r["iteration"] for r in records] == list(range(8))
    assert records[5]["loss"] == 105.0
    steps = tb_scalars(tmp_path)["loss"]
    assert [s for s, _ in steps] == list(range(8))  # the old steps 5..9 are purged
    assert steps[5][1] == 105.0


def test_closed_logger_and_bad_values(tmp_path):
    log = RunLogger(tmp_path, tensorboard=False)
    with pytest.raises(RunLogError, match="not JSON"):
        log.log(0, thing=object())
    with pytest.raises(RunLogError, match="iteration must be an int"):
        log.log(1.5, loss=1.0)
    log.close()
    log.close()
    with pytest.raises(RunLogError, match="closed"):
        log.log(1, loss=1.0)
    assert read_metrics(tmp_path) == []


def test_write_json_atomic(tmp_path, monkeypatch):
    path = tmp_path / "run.json"
    write_json_atomic(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_json_atomic(path, {"a": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # no temp file left
    with pytest.raises(RunLogError, match=r"run\.json: cannot write as JSON"):
        write_json_atomic(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}


def test_run_metadata(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # in case /tmp is in a repo
    meta = run_metadata(cwd=tmp_path)
    assert set(meta) == {
        "mamlab_version",
        "torch_version",
        "cuda_version",
        "python_version",
        "platform",
        "git_revision",
        "git_dirty",
        "timestamp",
    }
    assert meta["torch_version"] == torch.__version__ and meta["git_revision"] is None
    json.dumps(meta)
    if shutil.which("git"):
        git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
        subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
        subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], cwd=tmp_path, check=True)
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True)
        assert run_metadata(cwd=tmp_path)["git_revision"] == head.stdout.strip()
        assert run_metadata(cwd=tmp_path)["git_dirty"] is False
        (tmp_path / "edited.py").write_text("x = 1\n")
        assert run_metadata(cwd=tmp_path)["git_dirty"] is True
    monkeypatch.setenv("PATH", "")  # git missing: still no failure
    assert run_metadata(cwd=tmp_path)["git_revision"] is None


def test_run_lock_admits_one_holder(tmp_path) -> None:
    import os

    from mamlab.errors import MamlabError
    from mamlab.runlog import RunLock

    first = RunLock(tmp_path / "run").acquire()
    with pytest.raises(MamlabError, match=f"is being written by process {os.getpid()}; one process"):
        RunLock(tmp_path / "run").acquire()
    first.release()
    with RunLock(tmp_path / "run"):
        pass
    assert (tmp_path / "run" / ".lock").is_file()


def test_metadata_names_mamlab_s_own_revision(tmp_path, monkeypatch) -> None:
    from mamlab.runlog import run_metadata

    monkeypatch.chdir(tmp_path)  # not a repository: the revision is still mamlab's (None outside git)
    meta = run_metadata()
    assert {"git_revision", "git_dirty"} <= set(meta)
    assert "node" not in " ".join(meta) and all("host" not in k for k in meta)


def test_hyperparameters_go_to_the_hparams_and_text_tabs_of_the_run_itself(tmp_path):
    from tensorboard.plugins.hparams import plugin_data_pb2

    from mamlab.runlog import flatten_hparams

    options = {"task": "sinusoid", "run": {"meta_lr": 0.001, "task_chunk": None, "deterministic": True},
               "task_options": {"hidden": [8, 8]}}
    flat = flatten_hparams(options)
    assert flat == {"task": "sinusoid", "run/meta_lr": 0.001, "run/task_chunk": "None",
                    "run/deterministic": "True", "task_options/hidden": "[8, 8]"}
    with RunLogger(tmp_path, hparams=options, hparam_metrics=("loss",)) as log:
        log.log(1, loss=0.5)
    with RunLogger(tmp_path, resume_from_iteration=1, hparams=options) as log:
        log.log(2, loss=0.25)
    assert [p.parent.name for p in (tmp_path / "tensorboard").rglob("events.out.tfevents.*")] == \
        ["tensorboard"] * 2  # no separate run directory beside it (as SummaryWriter.add_hparams makes)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["run/meta_lr"].number_value == 0.001
    assert start.session_start_info.hparams["task_options/hidden"].string_value == "[8, 8]"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {h.name for h in experiment.hparam_infos} == set(flat)
    texts = acc.Tensors("config/text_summary")
    assert [t.step for t in texts] == [0, 1]  # a resumed run states its config at the resume point
    assert "| run/meta_lr | 0.001 |" in texts[0].tensor_proto.string_val[0].decode()
    assert [s for s, _ in tb_scalars(tmp_path)["loss"]] == [1, 2]


def test_lines_kept_from_tensorboard_are_in_the_jsonl_only(tmp_path):
    with RunLogger(tmp_path) as log:
        for it in range(6):
            log.log(it, loss=float(it), tensorboard=it % 3 == 0)
        with pytest.raises(RunLogError, match="tensorboard must be True or False, got 0.5"):
            log.log(6, tensorboard=0.5)
    assert [r["iteration"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3, 4, 5]
    assert [s for s, _ in tb_scalars(tmp_path)["loss"]] == [0, 3]
