"""Bounded reads of regular files: a FIFO or a device never hangs a command, a huge file is refused."""

import os
import threading
import zipfile
from pathlib import Path

import pytest

from mamlab.errors import MamlabError
from mamlab.files import read_regular, read_regular_text


def within(seconds: float, fn):
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it does not return in time."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "the read hung"
    if "error" in box:
        raise box["error"]
    return box.get("value")


def test_regular_files_are_read_whole(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"abc")
    assert read_regular(tmp_path / "a", 3) == b"abc"
    assert read_regular_text(tmp_path / "a", 10) == "abc"
    with pytest.raises(MamlabError, match="3 bytes, more than the 2 that a pointer can be"):
        read_regular(tmp_path / "a", 2, "a pointer")
    (tmp_path / "b").write_bytes(b"\xff\xfe")
    with pytest.raises(MamlabError, match="not UTF-8 text"):
        read_regular_text(tmp_path / "b", 10)
    with pytest.raises(FileNotFoundError):
        read_regular(tmp_path / "missing", 10)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_is_refused_at_once(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(MamlabError, match="not a regular file; expected a run configuration"):
        within(10, lambda: read_regular(tmp_path / "pipe", 10, "a run configuration"))
    with pytest.raises(MamlabError, match="not a regular file"):
        within(10, lambda: read_regular(Path("/dev/zero"), 10))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_special_files_in_a_run_are_one_line_errors(tmp_path: Path) -> None:
    from mamlab.checkpoint import latest_checkpoint, load_checkpoint
    from mamlab.config import resolve_config
    from mamlab.train import load_run, read_config, train

    config = resolve_config("sinusoid", None, {"iterations": 2, "meta_batch": 2, "shots": 2, "queries": 2,
                                               "hidden": [4], "val_every": 2, "checkpoint_every": 1})
    run = train(config, tmp_path / "run", progress=False, echo=lambda s: None).path
    latest = run / "checkpoints" / "latest"
    latest.unlink()
    os.mkfifo(latest)  # a FIFO where the pointer was: the newest checkpoint is found without it
    assert within(10, lambda: latest_checkpoint(run)).name == "iter_000002"
    weights = run / "checkpoints" / "iter_000002" / "weights.safetensors"
    weights.unlink()
    os.mkfifo(weights)
    with pytest.raises(MamlabError, match="weights.safetensors: not a regular file; expected checkpoint weights"):
        within(10, lambda: load_checkpoint(run / "checkpoints" / "iter_000002"))
    (run / "config.json").unlink()
    os.mkfifo(run / "config.json")
    with pytest.raises(MamlabError, match="config.json: not a regular file; expected a run configuration"):
        within(10, lambda: read_config(run))
    with pytest.raises(MamlabError, match="not a regular file"):
        within(10, lambda: load_run(run))


def test_a_zip_entry_that_expands_too_far_is_refused(tmp_path: Path) -> None:
    from mamlab.tasks.omniglot.archive import ArchiveReader

    bomb = tmp_path / "images_background_small1.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("images_background_small1/Greek/character01/0394_01.png", b"\0" * (8 << 20))
    assert bomb.stat().st_size < 100_000
    reader = ArchiveReader(bomb, "archive")
    with pytest.raises(MamlabError, match="expands to 8388608 bytes, more than an Omniglot file can be"):
        reader.read(reader.names[0])
