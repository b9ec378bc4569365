from pathlib import Path

import pytest
import torch

from mamlab.errors import MamlabError
from mamlab.tasks.base import TaskFamily
from mamlab.tasks.omniglot import splits as om_splits
from mamlab.tasks.omniglot.pool import CharacterPool
from mamlab.tasks.omniglot.splits import Omniglot

# the fixture's layout (conftest.py): drawings per character and characters per archive
BACKGROUND, EVALUATION, MINIMAL = 8, 5, 9  # minimal: Greek 2 + Latin 2 counted once + Balinese 3 + Tagalog 2


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _class_of(pool: CharacterPool, image: torch.Tensor) -> int:
    """The one class holding ``image`` (the fixture's runs repeat a drawing within a class)."""
    classes = {c for c, _ in (pool.images == image).flatten(2).all(-1).nonzero().tolist()}
    assert len(classes) == 1, classes
    return classes.pop()


@pytest.mark.parametrize("layout", ["zips", "folders"])
def test_minimal_split(layout, omniglot_zips, omniglot_folders, tmp_path):
    root = omniglot_zips if layout == "zips" else omniglot_folders
    o = Omniglot(root, "minimal", ways=5, cache_dir=tmp_path)
    train, test = o.pools["train"], o.pools["test"]
    assert len(train) == MINIMAL and len(set(train.names)) == MINIMAL
    assert test.images.shape == (3 * 20, 2, 28, 28) and test.group_names == ("run01", "run02", "run03")
    assert o.pools["validation"] is None
    batch = o.tasks("test", ways=20).sample(4, 1, 1, gen())
    assert batch.support_x.shape == (4, 20, 1, 28, 28)
    # a test task's classes are the 20 classes of one run
    runs = test.groups
    for t in range(4):
        classes = [_class_of(test, x) for x in batch.support_x[t, :, 0]]
        assert len(set(classes)) == 20 and len({int(runs[c]) for c in classes}) == 1


def test_background_split(omniglot_zips, tmp_path):
    o = Omniglot(omniglot_zips, "background", cache_dir=tmp_path)
    assert len(o.pools["train"]) == BACKGROUND and len(o.pools["test"]) == EVALUATION
    assert not set(o.pools["train"].names) & set(o.pools["test"].names)
    assert not o.tasks("test").rotation_classes


def test_vinyals_split(omniglot_zips, tmp_path):
    o = Omniglot(omniglot_zips, "vinyals", num_train=10, cache_dir=tmp_path)
    train, test = o.pools["train"], o.pools["test"]
    assert len(train) == 10 and len(test) == BACKGROUND + EVALUATION - 10
    assert not set(train.names) & set(test.names)
    assert o.tasks("train").num_classes == 40 and o.tasks("test").num_classes == 12  # rotations as classes
    again = Omniglot(omniglot_zips, "vinyals", num_train=10, cache_dir=tmp_path)
    assert again.pools["train"].names == train.names
    other = Omniglot(omniglot_zips, "vinyals", num_train=10, seed=1, cache_dir=tmp_path)
    assert other.pools["train"].names != train.names
    with pytest.raises(MamlabError, match="num_train=13 leaves no meta-test"):
        Omniglot(omniglot_zips, "vinyals", num_train=13, cache_dir=tmp_path)


def test_validation_split(omniglot_zips, tmp_path):
    o = Omniglot(omniglot_zips, "background", validation_fraction=0.25, seed=3, cache_dir=tmp_path)
    train, val = o.pools["train"], o.pools["validation"]
    assert len(val) == 2 and len(train) == BACKGROUND - 2
    assert not set(train.names) & set(val.names)
    again = Omniglot(omniglot_zips, "background", validation_fraction=0.25, seed=3, cache_dir=tmp_path)
    assert again.pools["validation"].names == val.names
    assert o.tasks("validation", ways=2).sample(3, 1, 1, gen()).support_x.shape == (3, 2, 1, 28, 28)
    with pytest.raises(MamlabError, match="no validation characters"):
        Omniglot(omniglot_zips, "background", cache_dir=tmp_path).tasks("validation")


def test_split_errors(omniglot_zips, tmp_path):
    with pytest.raises(MamlabError, match="unknown split 'omni'"):
        Omniglot(omniglot_zips, "omni")
    with pytest.raises(MamlabError, match="is not a folder"):
        Omniglot(tmp_path / "nowhere")
    (tmp_path / "images_background.zip").write_bytes((omniglot_zips / "images_background.zip").read_bytes())
    with pytest.raises(MamlabError, match="split 'background' needs images_evaluation ") as err:
        Omniglot(tmp_path, "background", cache_dir=tmp_path / "cache")
    assert str(tmp_path) in str(err.value)
    with pytest.raises(MamlabError, match="validation_fraction must be in"):
        Omniglot(omniglot_zips, validation_fraction=1.0)


def test_omniglot_samples_meta_training_tasks(omniglot_zips, tmp_path):
    o = Omniglot(omniglot_zips, "background", ways=4, rotate=True, cache_dir=tmp_path)
    assert isinstance(o, TaskFamily) and o.kind == "classification" and o.ways == 4
    b = o.sample(3, 1, 2, gen())
    assert b.support_x.shape == (3, 4, 1, 28, 28) and b.query_y.shape == (3, 8)
    assert o.tasks("train").rotate and not o.tasks("test").rotate


def test_affine_augments_training_tasks_only(omniglot_zips, tmp_path):
    plain = Omniglot(omniglot_zips, "background", ways=4, cache_dir=tmp_path)
    warped = Omniglot(omniglot_zips, "background", ways=4, affine=True, cache_dir=tmp_path)
    assert warped.tasks("train").affine and not warped.tasks("test").affine
    a, b = plain.sample(3, 1, 2, gen()), warped.sample(3, 1, 2, gen())
    assert torch.equal(a.support_y, b.support_y) and torch.equal(a.query_y, b.query_y)
    assert not torch.allclose(a.support_x, b.support_x)
    # the same drawings, distorted: each augmented image is closest to its own source image
    source, image = a.query_x.flatten(0, 1).flatten(1), b.query_x.flatten(0, 1).flatten(1)
    similarity = torch.nn.functional.normalize(image, dim=1) @ torch.nn.functional.normalize(source, dim=1).T
    off = (similarity.sum() - similarity.diagonal().sum()) / (len(similarity) ** 2 - len(similarity))
    assert float(similarity.diagonal().mean()) > 0.5 and float(similarity.diagonal().mean()) > float(off) + 0.2


def test_omniglot_download_flag(omniglot_zips, tmp_path, monkeypatch):
    fetched = []

    def fake(name, cache_dir):
        fetched.append(name)
        Path(cache_dir).mkdir(parents=True, exist_ok=True)  # as download() does
        target = Path(cache_dir) / f"{name}.zip"
        target.write_bytes((omniglot_zips / f"{name}.zip").read_bytes())
        return target

    monkeypatch.setattr(om_splits, "_download_archive", fake)
    o = Omniglot(tmp_path / "data", "background", download=True, cache_dir=tmp_path / "cache")
    assert fetched == ["images_background", "images_evaluation"] and len(o.pools["test"]) == EVALUATION


# ---------------------------------------------------------------------------------------------- real data


def test_real_minimal_split_has_242_characters(real_omniglot, tmp_path):
    o = Omniglot(real_omniglot, "minimal", ways=20, cache_dir=tmp_path)
    assert len(o.pools["train"]) == 242 and o.pools["train"].num_drawings == 20
    assert o.pools["test"].images.shape == (400, 2, 28, 28)
    assert o.tasks("test").sample(2, 1, 1, gen()).support_x.shape == (2, 20, 1, 28, 28)
