import torch

from mamlab.tasks.omniglot import pool as om_pool
from mamlab.tasks.omniglot.pool import load_characters

# the fixture's layout (conftest.py): drawings per character and characters per archive
D = 4
EVALUATION = 5


def test_cache_is_reused_and_keyed_by_source(omniglot_zips, tmp_path, monkeypatch):
    src = tmp_path / "images_evaluation.zip"
    src.write_bytes((omniglot_zips / "images_evaluation.zip").read_bytes())
    cache = tmp_path / "cache"
    first = load_characters(src, cache_dir=cache)
    files = list(cache.glob("*.safetensors"))
    assert len(files) == 1

    from safetensors import safe_open
    with safe_open(str(files[0]), framework="pt") as f:
        assert f.get_tensor("images").dtype == torch.uint8
        assert f.get_tensor("images").shape == (EVALUATION * D, 28, 28)
        assert f.get_tensor("labels").tolist() == [c for c in range(EVALUATION) for _ in range(D)]
        assert "Kannada/character01" in f.metadata()["names"]

    def boom(*a, **k):
        raise AssertionError("decoded a PNG although the cache was warm")

    monkeypatch.setattr(om_pool, "decode_png", boom)
    second = load_characters(src, cache_dir=cache)
    torch.testing.assert_close(first.images, second.images)
    assert first.names == second.names
    # another image size or a changed source is a new cache entry
    monkeypatch.undo()
    load_characters(src, image_size=20, cache_dir=cache)
    src.write_bytes(src.read_bytes())  # new mtime
    import os
    os.utime(src, ns=(1, 1))
    load_characters(src, cache_dir=cache)
    assert len(list(cache.glob("*.safetensors"))) == 3


def test_an_unwritable_cache_warns_and_leaves_no_temporary_file(omniglot_zips, tmp_path, monkeypatch):
    import pytest
    from safetensors import torch as st_torch

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(st_torch, "save_file", disk_full)
    cache = tmp_path / "cache"
    with pytest.warns(UserWarning, match="could not write the Omniglot cache .*No space left"):
        pool = load_characters(omniglot_zips / "images_evaluation.zip", cache_dir=cache)
    assert len(pool) == EVALUATION and list(cache.iterdir()) == []
