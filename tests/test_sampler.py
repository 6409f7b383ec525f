"""Episode sampling from a class data set, and the sinusoid task family."""
from __future__ import annotations

import math

import pytest
import torch

from metakit.data import ClassDataset, EpisodeError, EpisodeSampler, SinusoidSampler, check_episode


def make_dataset(sizes: list[int], seed: int = 0, name: str = "synthetic") -> ClassDataset:
    """Random uint8 images ``[M, 1, 4, 4]`` whose pixels (0, 0) and (0, 1) spell the row index.

    Rows are not sorted by class: targets are shuffled.
    """
    g = torch.Generator().manual_seed(seed)
    targets = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    targets = targets[torch.randperm(len(targets), generator=g)]
    m = len(targets)
    images = torch.randint(0, 256, (m, 1, 4, 4), generator=g, dtype=torch.uint8)
    rows = torch.arange(m)
    images[:, 0, 0, 0] = (rows % 256).to(torch.uint8)
    images[:, 0, 0, 1] = (rows // 256).to(torch.uint8)
    return ClassDataset(images, targets, [f"c{c}" for c in range(len(sizes))], name=name)


def row_ids(x: torch.Tensor) -> torch.Tensor:
    """Row index of each image in ``x [..., 1, 4, 4]`` (floats in [0, 1])."""
    px = (x[..., 0, 0, :2] * 255).round().long()
    return px[..., 0] + 256 * px[..., 1]


@pytest.fixture(scope="module")
def equal():
    return make_dataset([20] * 30)


@pytest.fixture(scope="module")
def unequal():
    return make_dataset([3, 25, 8, 20, 5, 12, 30, 9, 15, 10], seed=1, name="unequal")


def check_tasks(ds: ClassDataset, batch, N: int, K: int, Q: int) -> list[dict[int, int]]:
    """Assert the episode invariants; return each task's label -> class map."""
    maps = []
    sx, sy, qx, qy = batch.support_x, batch.support_y, batch.query_x, batch.query_y
    for b in range(sx.shape[0]):
        s_rows, q_rows = row_ids(sx[b]), row_ids(qx[b])
        # the pixels are those of the named rows: the images are the data set's, scaled to [0, 1]
        assert torch.equal((sx[b] * 255).round().to(torch.uint8), ds.images[s_rows])
        assert torch.equal((qx[b] * 255).round().to(torch.uint8), ds.images[q_rows])
        every = torch.cat([s_rows, q_rows])
        assert every.unique().numel() == N * (K + Q)  # support and query disjoint, no repeats
        assert torch.bincount(sy[b], minlength=N).tolist() == [K] * N
        assert torch.bincount(qy[b], minlength=N).tolist() == [Q] * N
        label_class = {}
        for rows, ys in ((s_rows, sy[b]), (q_rows, qy[b])):
            for r, y in zip(rows.tolist(), ys.tolist()):
                c = int(ds.targets[r])
                assert label_class.setdefault(y, c) == c  # one class per label
        assert sorted(label_class) == list(range(N))
        assert len(set(label_class.values())) == N  # different labels, different classes
        maps.append(label_class)
    return maps


def test_shapes(equal):
    batch = EpisodeSampler(equal, ways=5, shots=2, queries=3, meta_batch_size=4, seed=0).sample()
    assert batch.support_x.shape == (4, 10, 1, 4, 4)
    assert batch.query_x.shape == (4, 15, 1, 4, 4)
    assert batch.support_y.shape == (4, 10) and batch.query_y.shape == (4, 15)
    assert batch.support_x.dtype == torch.float32 and batch.support_y.dtype == torch.int64
    assert batch.ways == 5 and batch.meta_batch_size == 4
    assert 0 <= batch.support_x.min() and batch.query_x.max() <= 1
    assert batch.support_x.max() > 0.9  # scaled to [0, 1], not left in 0..255 or squashed
    other = EpisodeSampler(equal, ways=3, shots=1, queries=1, meta_batch_size=4, seed=0).sample(7)
    assert other.support_x.shape == (7, 3, 1, 4, 4) and other.query_y.shape == (7, 3)


@pytest.mark.parametrize("N,K,Q", [(5, 1, 15), (5, 5, 5), (30, 1, 19), (2, 10, 10)])
def test_episode_invariants(equal, N, K, Q):
    batch = EpisodeSampler(equal, ways=N, shots=K, queries=Q, meta_batch_size=20, seed=1).sample()
    check_tasks(equal, batch, N, K, Q)


def test_all_classes_and_examples_are_drawn(equal):
    batch = EpisodeSampler(equal, ways=5, shots=1, queries=1, meta_batch_size=200, seed=2).sample()
    rows = torch.cat([row_ids(batch.support_x).flatten(), row_ids(batch.query_x).flatten()])
    assert equal.targets[rows].unique().numel() == 30
    assert rows.unique().numel() > 0.8 * len(equal)  # 2000 draws of 600 rows: nearly all seen


def test_label_order_is_random(equal):
    batch = EpisodeSampler(equal, ways=5, shots=1, queries=1, meta_batch_size=50, seed=3).sample()
    maps = check_tasks(equal, batch, 5, 1, 1)
    increasing = [all(m[i] < m[i + 1] for i in range(4)) for m in maps]
    assert not all(increasing)  # label 0 is not always the smallest class, etc.
    # the labels in the order the support rows come out are not always 0, 1, ..., N-1
    orders = {tuple(batch.support_y[b].tolist()) for b in range(50)}
    assert len(orders) > 10
    # every label is used for many different classes
    for label in range(5):
        assert len({m[label] for m in maps}) > 10


def test_seeds(equal):
    def stream(seed, n=3):
        s = EpisodeSampler(equal, ways=5, shots=1, queries=5, meta_batch_size=4, seed=seed)
        return [s.sample() for _ in range(n)]

    def same(a, b):
        return all(torch.equal(getattr(x, f), getattr(y, f)) for x, y in zip(a, b)
                   for f in ("support_x", "support_y", "query_x", "query_y"))

    assert same(stream(5), stream(5))
    assert not same(stream(5), stream(6))
    first = stream(5)
    assert not torch.equal(first[0].support_x, first[1].support_x)  # the stream moves on


def test_state_dict_resumes(equal, unequal):
    for ds in (equal, unequal):
        a = EpisodeSampler(ds, ways=3, shots=2, queries=3, meta_batch_size=4, seed=11)
        for _ in range(2):
            a.sample()
        state = a.state_dict()
        expected = [a.sample() for _ in range(3)]
        b = EpisodeSampler(ds, ways=3, shots=2, queries=3, meta_batch_size=4, seed=999)
        b.load_state_dict(state)
        for want in expected:
            got = b.sample()
            assert torch.equal(got.support_x, want.support_x) and torch.equal(got.query_y, want.query_y)
        # the saved state is a snapshot: sampling on did not change it
        c = EpisodeSampler(ds, ways=3, shots=2, queries=3, meta_batch_size=4, seed=0)
        c.load_state_dict(state)
        assert torch.equal(c.sample().query_x, expected[0].query_x)


def test_iter(equal):
    s = EpisodeSampler(equal, ways=2, shots=1, queries=1, meta_batch_size=3, seed=0)
    it = iter(s)
    assert next(it).support_x.shape == (3, 2, 1, 4, 4)


def test_too_many_ways(equal):
    with pytest.raises(EpisodeError, match=r"only 30 classes.*ways <= 30"):
        EpisodeSampler(equal, ways=31, shots=1, queries=1)
    EpisodeSampler(equal, ways=30, shots=1, queries=1)  # the limit itself is fine


def test_too_many_examples(equal):
    with pytest.raises(EpisodeError, match=r"10 \+ 11 = 21.*<= 20"):
        EpisodeSampler(equal, ways=5, shots=10, queries=11)
    EpisodeSampler(equal, ways=5, shots=10, queries=10)


@pytest.mark.parametrize("field,kwargs", [
    ("ways", dict(ways=0)), ("ways", dict(ways=-2)), ("shots", dict(shots=0)), ("queries", dict(queries=-1)),
    ("meta_batch_size", dict(meta_batch_size=0)), ("ways", dict(ways=2.5)),
])
def test_non_positive_numbers(equal, field, kwargs):
    args = dict(ways=5, shots=1, queries=1, meta_batch_size=1) | kwargs
    with pytest.raises(EpisodeError, match=field):
        EpisodeSampler(equal, **args)
    with pytest.raises(EpisodeError, match=field):
        check_episode(equal, **args)


def test_unequal_sizes_draw_only_big_enough_classes(unequal):
    eligible = {c for c, n in enumerate(unequal.counts.tolist()) if n >= 10}
    assert len(eligible) == 6
    batch = EpisodeSampler(unequal, ways=4, shots=3, queries=7, meta_batch_size=100, seed=0).sample()
    maps = check_tasks(unequal, batch, 4, 3, 7)
    drawn = {c for m in maps for c in m.values()}
    assert drawn == eligible


def test_equal_eligible_sizes_among_small_classes():
    ds = make_dataset([20] * 8 + [5] * 6, seed=2)  # the eligible ones are equal: the fast path
    batch = EpisodeSampler(ds, ways=5, shots=2, queries=4, meta_batch_size=60, seed=0).sample()
    maps = check_tasks(ds, batch, 5, 2, 4)
    assert {c for m in maps for c in m.values()} == set(range(8))


def test_unequal_sizes_limit_in_message(unequal):
    # sizes 30, 25, 20, 15, 12, 10, ...: four classes have at most 15 examples each
    with pytest.raises(EpisodeError, match=r"only 3 of 10 classes.*<= 15 or fewer ways"):
        EpisodeSampler(unequal, ways=4, shots=6, queries=10)
    EpisodeSampler(unequal, ways=4, shots=5, queries=10)  # 15 is possible
    with pytest.raises(EpisodeError, match="<= 30"):
        EpisodeSampler(unequal, ways=1, shots=20, queries=11)



# ---------------------------------------------------------------- within-alphabet episodes

def grouped_dataset(group_sizes: list[int], per_class: int = 20) -> ClassDataset:
    """Classes named ``a{g}/c{c}``: group ``g`` (an "alphabet") holds ``group_sizes[g]`` classes."""
    names = [f"a{g}/c{c}" for g, n in enumerate(group_sizes) for c in range(n)]
    base = make_dataset([per_class] * len(names), seed=2, name="grouped")
    return ClassDataset(base.images, base.targets, names, name="grouped")


def task_groups(ds: ClassDataset, batch, N: int, K: int, Q: int) -> list[set[str]]:
    return [{ds.class_names[c].split("/")[0] for c in m.values()} for m in check_tasks(ds, batch, N, K, Q)]


def test_within_group_tasks_share_one_group():
    # groups of 3 classes are too small for 5 ways and must never be drawn
    ds = grouped_dataset([8, 3, 6, 5, 3, 10])
    sampler = EpisodeSampler(ds, ways=5, shots=1, queries=2, meta_batch_size=300, seed=0, within_group=1.0)
    groups = task_groups(ds, sampler.sample(), 5, 1, 2)
    assert all(len(g) == 1 for g in groups)
    drawn = {next(iter(g)) for g in groups}
    assert drawn == {"a0", "a2", "a3", "a5"}  # every group with >= 5 classes, no smaller one


def test_within_group_fraction():
    ds = grouped_dataset([6] * 40)  # 40 groups: a random 5-way task lies in one group with p < 1e-5
    sampler = EpisodeSampler(ds, ways=5, shots=1, queries=1, meta_batch_size=2000, seed=1, within_group=0.3)
    share = sum(len(g) == 1 for g in task_groups(ds, sampler.sample(), 5, 1, 1)) / 2000
    assert 0.26 < share < 0.34  # 0.3 +- 4 standard deviations
    plain = EpisodeSampler(ds, ways=5, shots=1, queries=1, meta_batch_size=2000, seed=1)
    assert sum(len(g) == 1 for g in task_groups(ds, plain.sample(), 5, 1, 1)) < 5


def test_within_group_is_seeded_and_resumes():
    ds = grouped_dataset([8, 7, 9])
    a = EpisodeSampler(ds, ways=5, shots=1, queries=1, meta_batch_size=4, seed=3, within_group=0.5)
    b = EpisodeSampler(ds, ways=5, shots=1, queries=1, meta_batch_size=4, seed=3, within_group=0.5)
    a.sample()
    state = a.state_dict()
    b.load_state_dict(state)
    assert torch.equal(a.sample().query_x, b.sample().query_x)


def test_within_group_bad_requests():
    ds = grouped_dataset([4, 3])
    with pytest.raises(EpisodeError, match=r"largest group \(alphabet\).* has 4 classes.*ways <= 4"):
        EpisodeSampler(ds, ways=5, shots=1, queries=1, within_group=0.5)
    with pytest.raises(EpisodeError, match=r"in \[0, 1\]"):
        EpisodeSampler(ds, ways=2, shots=1, queries=1, within_group=1.5)


# ---------------------------------------------------------------- sinusoids

def fit(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Least-squares A, phi of ``y = A sin(x - phi)`` per task; x, y ``[B, n, 1]``; also the residual."""
    x, y = x[..., 0].double(), y[..., 0].double()
    feats = torch.stack([torch.sin(x), torch.cos(x)], -1)  # [B, n, 2]
    coef = torch.linalg.lstsq(feats, y.unsqueeze(-1)).solution[..., 0]  # [B, 2]: A cos phi, -A sin phi
    amp = coef.norm(dim=-1)
    phase = torch.atan2(-coef[:, 1], coef[:, 0])
    resid = (feats @ coef.unsqueeze(-1))[..., 0] - y
    return amp, phase, resid.abs().amax(-1)


def test_sinusoid_shapes():
    batch = SinusoidSampler(shots=10, queries=15, meta_batch_size=8, seed=0).sample()
    assert batch.support_x.shape == batch.support_y.shape == (8, 10, 1)
    assert batch.query_x.shape == batch.query_y.shape == (8, 15, 1)
    assert batch.ways is None and not batch.is_classification
    assert SinusoidSampler(5, 5, 8).sample(3).query_y.shape == (3, 5, 1)


def test_sinusoid_ranges_and_consistency():
    batch = SinusoidSampler(shots=10, queries=20, meta_batch_size=400, seed=1).sample()
    for x in (batch.support_x, batch.query_x):
        assert x.min() >= -5 and x.max() <= 5
        assert x.min() < -4.9 and x.max() > 4.9  # the whole input range is used
    for y in (batch.support_y, batch.query_y):
        assert y.abs().max() <= 5
    amp, phase, resid = fit(batch.support_x, batch.support_y)
    assert resid.max() < 1e-4  # the support points lie on one sinusoid
    assert amp.min() >= 0.1 - 1e-4 and amp.max() <= 5 + 1e-4
    assert phase.min() >= -1e-4 and phase.max() <= math.pi + 1e-4
    assert amp.min() < 0.3 and amp.max() > 4.8  # A ~ U[0.1, 5]
    assert phase.min() < 0.1 and phase.max() > math.pi - 0.1  # phi ~ U[0, pi]
    # the query points of a task lie on the sinusoid fitted to its support points
    q_amp, q_phase, _ = fit(batch.query_x, batch.query_y)
    assert torch.allclose(q_amp, amp, atol=1e-3) and torch.allclose(q_phase, phase, atol=1e-3)
    pred = amp[:, None] * torch.sin(batch.query_x[..., 0].double() - phase[:, None])
    assert (pred - batch.query_y[..., 0]).abs().max() < 1e-3
    # tasks differ from each other
    assert amp.unique().numel() == 400


def test_sinusoid_seeds_and_state():
    def take(s, n=2):
        return [s.sample() for _ in range(n)]

    a, b = take(SinusoidSampler(5, 5, 4, seed=3)), take(SinusoidSampler(5, 5, 4, seed=3))
    assert all(torch.equal(x.support_y, y.support_y) and torch.equal(x.query_x, y.query_x) for x, y in zip(a, b))
    c = take(SinusoidSampler(5, 5, 4, seed=4))
    assert not torch.equal(a[0].support_y, c[0].support_y)
    s = SinusoidSampler(5, 5, 4, seed=3)
    s.sample()
    state = s.state_dict()
    want = s.sample()
    t = SinusoidSampler(5, 5, 4, seed=0)
    t.load_state_dict(state)
    assert torch.equal(t.sample().query_y, want.query_y)


def test_sinusoid_bad_numbers():
    with pytest.raises(EpisodeError, match="shots"):
        SinusoidSampler(shots=0)
    with pytest.raises(EpisodeError, match="queries"):
        SinusoidSampler(queries=-3)
