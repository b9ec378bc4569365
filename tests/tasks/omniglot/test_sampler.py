import pytest
import torch

from mamlab.errors import MamlabError
from mamlab.tasks.base import TaskBatch, TaskFamily
from mamlab.tasks.omniglot.pool import CharacterPool, load_characters
from mamlab.tasks.omniglot.sampler import OmniglotTasks, affine_warp, random_affine


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pool(omniglot_zips, tmp_path_factory):
    return load_characters(omniglot_zips / "images_background.zip",
                           cache_dir=tmp_path_factory.mktemp("cache"))


def _locate(pool: CharacterPool, image: torch.Tensor, rotations=(0,)) -> tuple[int, int]:
    """(class, drawing) of ``image`` in the pool, trying each rotation; asserts it is found once."""
    hits = []
    for r in rotations:
        rotated = torch.rot90(pool.images, r, dims=(-2, -1))
        eq = (rotated == image).flatten(2).all(-1).nonzero().tolist()
        hits += [(c + r * len(pool), d) for c, d in eq]
    assert len(hits) == 1, hits
    return tuple(hits[0])


def test_sample_shapes_labels_and_protocol(pool):
    tasks = OmniglotTasks(pool, ways=3)
    assert isinstance(tasks, TaskFamily) and tasks.kind == "classification"
    b = tasks.sample(6, shots=2, queries=2, generator=gen())
    assert isinstance(b, TaskBatch)
    assert b.support_x.shape == (6, 6, 1, 28, 28) and b.query_x.shape == (6, 6, 1, 28, 28)
    assert b.support_y.dtype == torch.int64 and b.query_y.dtype == torch.int64
    assert b.support_x.dtype == torch.float32
    assert b.support_y[0].tolist() == [0, 0, 1, 1, 2, 2] and b.query_y[0].tolist() == [0, 0, 1, 1, 2, 2]


def test_sample_is_a_valid_episode(pool):
    b = OmniglotTasks(pool, ways=4).sample(10, shots=1, queries=3, generator=gen(1))
    for t in range(10):
        support = [_locate(pool, x[0]) for x in b.support_x[t]]
        query = [_locate(pool, x[0]) for x in b.query_x[t]]
        classes = [c for c, _ in support]
        assert len(set(classes)) == 4  # N distinct classes
        for (c, _), y in zip(query, b.query_y[t].tolist(), strict=True):
            assert c == classes[y]  # query label j is support class j
        assert len(set(support + query)) == 4 * 4  # distinct drawings


def test_sample_is_seeded_and_varies(pool):
    tasks = OmniglotTasks(pool, ways=5)
    a, b = tasks.sample(4, 1, 3, gen(7)), tasks.sample(4, 1, 3, gen(7))
    torch.testing.assert_close(a.query_x, b.query_x)
    c = tasks.sample(4, 1, 3, gen(8))
    assert not torch.equal(a.query_x, c.query_x)
    # every class gets drawn over many tasks
    many = tasks.sample(200, 1, 1, gen(9))
    seen = {_locate(pool, x[0])[0] for x in many.support_x[:40].flatten(0, 1)}
    assert seen == set(range(len(pool)))


def test_within_groups(pool):
    b = OmniglotTasks(pool, ways=3, within_groups=True).sample(20, 1, 1, gen())
    for t in range(20):
        groups = {int(pool.groups[_locate(pool, x[0])[0]]) for x in b.support_x[t]}
        assert len(groups) == 1
    # Korean has only 2 characters: 3-way tasks come from Greek or Latin only
    with pytest.raises(MamlabError, match="ways=4 exceeds the largest group of the pool \\(3 classes\\)"):
        OmniglotTasks(pool, ways=4, within_groups=True)


@pytest.mark.parametrize("mode", ["rotation_classes", "rotate"])
def test_rotations(pool, mode):
    tasks = OmniglotTasks(pool, ways=5, **{mode: True})
    if mode == "rotation_classes":
        assert tasks.num_classes == 4 * len(pool)
    b = tasks.sample(8, 1, 2, gen(2))
    rotated = 0
    for t in range(8):
        support = [_locate(pool, x[0], rotations=(0, 1, 2, 3)) for x in b.support_x[t]]
        query = [_locate(pool, x[0], rotations=(0, 1, 2, 3)) for x in b.query_x[t]]
        classes = [c for c, _ in support]
        for (c, _), y in zip(query, b.query_y[t].tolist(), strict=True):
            assert c == classes[y]  # a class keeps one rotation across its support and query
        rotated += sum(c >= len(pool) for c in classes)
    assert rotated > 0


def test_sampler_errors(pool):
    with pytest.raises(MamlabError, match="ways=9 exceeds the 8 classes available"):
        OmniglotTasks(pool, ways=9)
    tasks = OmniglotTasks(pool, ways=2)
    with pytest.raises(MamlabError, match="shots \\+ queries = 5 exceeds the 4 drawings per class"):
        tasks.sample(2, 1, 4)
    with pytest.raises(MamlabError, match="shots must be"):
        tasks.sample(2, 0, 1)
    assert OmniglotTasks(pool, ways=9, rotation_classes=True).sample(1, 1, 1, gen()).num_tasks == 1


# ---------------------------------------------------------------------------------------------- augmentation


def test_affine_warp_matches_exact_pixel_operations():
    x = torch.rand(3, 1, 28, 28, generator=gen())
    none, ones = torch.zeros(3, 2), torch.ones(3, 2)
    zero = torch.zeros(3)
    assert torch.allclose(affine_warp(x, zero, none, ones, none), x, atol=1e-5)
    right = torch.zeros_like(x)
    right[..., 2:] = x[..., :-2]  # 2 pixels right, zeros come in
    assert torch.allclose(affine_warp(x, zero, none, ones, torch.tensor([[2.0, 0.0]] * 3)), right, atol=1e-5)
    up = torch.zeros_like(x)
    up[..., :-3, :] = x[..., 3:, :]
    assert torch.allclose(affine_warp(x, zero, none, ones, torch.tensor([[0.0, -3.0]] * 3)), up, atol=1e-5)
    quarter = affine_warp(x, torch.full((3,), torch.pi / 2), none, ones, none)
    assert torch.allclose(quarter, torch.rot90(x, 1, dims=(-2, -1)), atol=1e-5)  # counter-clockwise
    mirrored = affine_warp(x, zero, none, torch.tensor([[-1.0, 1.0]] * 3), none)
    assert torch.allclose(mirrored, torch.flip(x, dims=(-1,)), atol=1e-5)


def test_random_affine_is_seeded_per_image_and_in_range():
    x = torch.zeros(64, 1, 28, 28)
    x[..., 10:18, 10:18] = 1.0  # a centred square
    a, b = random_affine(x, gen(1)), random_affine(x, gen(1))
    assert torch.equal(a, b) and not torch.equal(a, random_affine(x, gen(2)))
    assert len({tuple(img.flatten().tolist()) for img in a}) == 64  # each image its own map
    ink = a.sum((1, 2, 3)) / x[0].sum()  # area changes by |det| = scale_x*scale_y*(1 - shear_x*shear_y)
    assert bool((ink > 0.8 * 0.8 * (1 - 0.09) - 0.05).all()) and bool((ink < 1.2 * 1.2 + 0.05).all())
    # the centre of mass moves by at most the shift plus what the linear part does to an off-centre grid
    ys = torch.arange(28.0).view(1, 28, 1)
    centre = (a[:, 0] * ys).sum((1, 2)) / a[:, 0].sum((1, 2))
    assert bool(((centre - 13.5).abs() < 2.6).all())
