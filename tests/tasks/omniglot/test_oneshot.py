import zipfile

import pytest
import torch

from mamlab.errors import MamlabError
from mamlab.tasks.omniglot.oneshot import (
    evaluate_runs,
    load_runs,
    modified_hausdorff_classifier,
    modified_hausdorff_distance,
    pixel_nearest_neighbour,
    runs_pool,
    stroke_points,
)
from mamlab.tasks.omniglot.sampler import OmniglotTasks


@pytest.fixture(scope="module")
def runs(omniglot_zips):
    return load_runs(omniglot_zips / "all_runs.zip")


def test_load_runs(runs, omniglot_zips, omniglot_folders):
    assert [r.name for r in runs] == ["run01", "run02", "run03"]
    r = runs[0]
    assert r.train_images.shape == (20, 1, 28, 28) and r.test_images.shape == (20, 1, 28, 28)
    assert r.train_images.dtype == torch.float32 and r.train_images.max() == 1
    assert r.train_raw.shape == (20, 105, 105) and r.train_raw.dtype == torch.bool
    assert r.train_files[0] == "class01.png" and r.test_files[0] == "item01.png"
    # test_labels follow class_labels.txt
    with zipfile.ZipFile(omniglot_zips / "all_runs.zip") as zf:
        lines = zf.read("run01/class_labels.txt").decode().split("\n")
    first_class = lines[0].split()[1].split("/")[-1]
    assert r.train_files[int(r.test_labels[0])] == first_class
    assert sorted(r.test_labels.tolist()) == list(range(20))
    # the fixture's test image is its class's training image: raw images agree
    assert torch.equal(r.test_raw, r.train_raw[r.test_labels])
    folder = load_runs(omniglot_folders / "all_runs")
    torch.testing.assert_close(folder[1].test_images, runs[1].test_images)
    assert torch.equal(folder[1].test_labels, runs[1].test_labels)


def test_harness_scores(runs):
    perfect = evaluate_runs(runs, pixel_nearest_neighbour)
    assert perfect["errors"] == [0.0, 0.0, 0.0] and perfect["mean"] == 0.0 and perfect["runs"] == 3
    zeros = evaluate_runs(runs, lambda tx, ty, qx: torch.zeros(len(qx), dtype=torch.long))
    assert zeros["mean"] == pytest.approx(95.0) and zeros["ci95"] == pytest.approx(0.0)
    seen = {}

    def spy(tx, ty, qx):
        seen.update(train=tx.shape, labels=ty.tolist(), test=qx.shape)
        return ty[torch.randperm(20, generator=torch.Generator().manual_seed(len(seen)))]

    raw = evaluate_runs(runs[:1], spy, raw=True)
    assert seen == {"train": (20, 1, 105, 105), "labels": list(range(20)), "test": (20, 1, 105, 105)}
    assert 0 <= raw["mean"] <= 100
    with pytest.raises(MamlabError, match="classify returned \\(3,\\) labels for run run01"):
        evaluate_runs(runs, lambda tx, ty, qx: torch.zeros(3))
    with pytest.raises(MamlabError, match="at least one run"):
        evaluate_runs([], pixel_nearest_neighbour)


def test_ci95_is_normal_interval_over_runs(runs):
    wrong = {"run01": 0, "run02": 2, "run03": 4}

    def classify_with_errors(tx, ty, qx):
        run = next(r for r in runs if torch.equal(r.train_images, tx))
        pred = run.test_labels.clone()
        pred[: wrong[run.name]] = (pred[: wrong[run.name]] + 1) % 20
        return pred

    out = evaluate_runs(runs, classify_with_errors)
    assert out["errors"] == pytest.approx([0.0, 10.0, 20.0])
    assert out["mean"] == pytest.approx(10.0)
    assert out["ci95"] == pytest.approx(1.96 * 10.0 / 3 ** 0.5)


def test_modified_hausdorff():
    a = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 4.0]])
    # A->B: mean(0, 0) = 0; B->A: mean(0, 0, 3) = 1
    assert modified_hausdorff_distance(a, b) == pytest.approx(1.0)
    assert modified_hausdorff_distance(b, a) == pytest.approx(1.0)
    assert modified_hausdorff_distance(a, a[:0]) == float("inf")
    img = torch.zeros(5, 5)
    img[1, 1] = img[3, 3] = 1
    assert stroke_points(img).tolist() == [[-1.0, -1.0], [1.0, 1.0]]  # centred, as the authors' demo


def test_modified_hausdorff_classifier(runs):
    r = runs[0]
    # 6 classes, images subsampled 4x so the point sets stay small and the test fast
    train = r.train_raw[:6, ::4, ::4].float().unsqueeze(1)
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    pred = modified_hausdorff_classifier(train, torch.arange(6), train[order])
    assert pred.tolist() == order.tolist()


def test_runs_pool(runs):
    pool = runs_pool(runs)
    assert pool.images.shape == (60, 2, 28, 28) and pool.group_names == ("run01", "run02", "run03")
    assert pool.names[0] == "run01/class01" and pool.groups.tolist() == [0] * 20 + [1] * 20 + [2] * 20
    r = runs[1]
    c = int(r.test_labels[5])
    torch.testing.assert_close(pool.images[20 + c, 0], r.train_images[c, 0])
    torch.testing.assert_close(pool.images[20 + c, 1], r.test_images[5, 0])
    b = OmniglotTasks(pool, ways=20, within_groups=True).sample(5, 1, 1, torch.Generator().manual_seed(0))
    assert b.support_x.shape == (5, 20, 1, 28, 28)
    with pytest.raises(MamlabError, match="ways=21 exceeds the largest group of the pool \\(20 classes\\)"):
        OmniglotTasks(pool, ways=21, within_groups=True)


def test_not_a_runs_archive(omniglot_zips, tmp_path):
    with pytest.raises(MamlabError, match="not the Omniglot one-shot runs archive"):
        load_runs(omniglot_zips / "images_background.zip")
    with pytest.raises(MamlabError, match="does not exist"):
        load_runs(tmp_path / "all_runs.zip")
    bad = tmp_path / "bad_runs.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("run01/class_labels.txt", "only-one-field\n")
    with pytest.raises(MamlabError, match="expected '<test image> <training image>'"):
        load_runs(bad)
    for content, message in ((b"\xff\xfe\x00", "class_labels.txt: not UTF-8 text"),
                             (b"\n\n", "class_labels.txt: empty; expected")):
        with zipfile.ZipFile(bad, "w") as zf:
            zf.writestr("run01/class_labels.txt", content)
        with pytest.raises(MamlabError, match=message) as e:
            load_runs(bad)
        assert "\n" not in str(e.value)


def test_real_runs_pixel_nearest_neighbour(real_omniglot):
    runs = load_runs(real_omniglot / "all_runs.zip")
    assert len(runs) == 20 and all(sorted(r.test_labels.tolist()) == list(range(20)) for r in runs)
    out = evaluate_runs(runs, pixel_nearest_neighbour)
    assert 70 < out["mean"] < 90  # measured 79.0%: pixels alone do poorly
