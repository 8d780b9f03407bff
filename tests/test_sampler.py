from collections import Counter

from datasets import Dataset
from torch.utils.data import ConcatDataset

from model_exploration.sampler import WeightedSourceBatchSampler, apportion, make_source_batch_sampler


def _sources(sizes, duplicates_every=0):
    out = []
    for s, n in enumerate(sizes):
        anchors = [f"s{s}-q{i % duplicates_every if duplicates_every else i}" for i in range(n)]
        out.append(Dataset.from_dict({"anchor": anchors, "positive": [f"s{s}-p{i}" for i in range(n)]}))
    return out


def _sampler(datasets, weights, batch_size=8, world_size=1, seed=0, same_source_global_batch=False):
    samplers = [make_source_batch_sampler(d, batch_size) for d in datasets]
    return WeightedSourceBatchSampler(
        ConcatDataset(datasets), samplers, weights, [f"s{i}" for i in range(len(datasets))], world_size, seed=seed,
        same_source_global_batch=same_source_global_batch,
    )  # fmt: skip


def _source_of(batch, datasets):
    bounds, total = [], 0
    for d in datasets:
        total += len(d)
        bounds.append(total)
    return next(i for i, b in enumerate(bounds) if batch[0] < b)


def test_apportion_is_exact():
    assert apportion(10, [1, 1, 2]) == [3, 2, 5]  # 2.5, 2.5, 5: the tie goes to the lower index
    assert apportion(7, [0.5, 0.25, 0.25]) == [3, 2, 2]  # 3.5, 1.75, 1.75: largest remainders first
    assert sum(apportion(1001, [3.3, 1.1, 7.7])) == 1001


def test_batches_follow_weight_times_size_and_oversampled_sources_wrap():
    datasets = _sources([80, 400])
    sampler = _sampler(datasets, weights=[5.0, 1.0])  # shares 400 : 400 -> half the batches each
    batches = list(sampler)
    assert len(batches) == len(sampler) == round((5 * 80 + 400) / 8)
    counts = Counter(_source_of(b, datasets) for b in batches)
    assert counts[0] == counts[1] == 50
    # source 0 is read five times over; each pass is a fresh shuffle, not a replay of the first
    passes = [b for b in batches if _source_of(b, datasets) == 0]
    first_pass, second_pass = passes[:10], passes[10:20]
    assert sorted(i for b in first_pass for i in b) == sorted(i for b in second_pass for i in b) == list(range(80))
    assert first_pass != second_pass


def test_no_duplicate_texts_in_a_batch_even_with_heavy_duplicates():
    datasets = _sources([200], duplicates_every=12)  # only 12 distinct anchors
    concat = ConcatDataset(datasets)
    for batch in _sampler(datasets, [1.0]):
        anchors = [concat[i]["anchor"] for i in batch]
        assert len(set(anchors)) == len(anchors)


def test_every_rank_gets_the_same_number_of_batches():
    datasets = _sources([203, 57, 91], duplicates_every=0)
    for world in (2, 3, 4):
        sampler = _sampler(datasets, [1.0, 3.0, 0.5], world_size=world)
        batches = list(sampler)
        assert len(batches) == len(sampler) and len(batches) % world == 0
        per_rank = [batches[r::world] for r in range(world)]  # accelerate's sharding of a batch sampler
        assert len({len(p) for p in per_rank}) == 1


def test_same_source_global_batch_deals_one_source_to_all_ranks_per_step():
    datasets = _sources([203, 57, 91])
    for world in (2, 4):
        mixed = [_source_of(b, datasets) for b in _sampler(datasets, [1.0, 3.0, 0.5], world_size=world)]
        sampler = _sampler(datasets, [1.0, 3.0, 0.5], world_size=world, same_source_global_batch=True)
        batches = list(sampler)
        sources = [_source_of(b, datasets) for b in batches]
        steps = [sources[i : i + world] for i in range(0, len(sources), world)]  # rank r takes batch i*W + r
        assert all(len(set(step)) == 1 for step in steps)
        assert any(len(set(mixed[i : i + world])) > 1 for i in range(0, len(mixed), world))  # not so by default
        assert len(batches) == len(sampler) and Counter(sources) == dict(enumerate(sampler.batches_per_source))
        # the ranks of one step get different pairs of the source (its next W batches)
        for i in range(0, len(batches), world):
            rows = [r for b in batches[i : i + world] for r in b]
            assert len(rows) == len(set(rows)) or sources[i] == 1  # source 1 (57 rows) wraps within a step


def test_order_is_a_function_of_seed_and_epoch():
    datasets = _sources([64, 64])
    a, b = _sampler(datasets, [1, 1], seed=3), _sampler(datasets, [1, 1], seed=3)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)


def test_small_and_duplicate_only_sources_form_smaller_batches():
    datasets = _sources([5, 64])
    batches = list(_sampler(datasets, [1.0, 1.0], batch_size=8))
    assert any(len(b) == 5 for b in batches)
    one_text = [Dataset.from_dict({"anchor": ["same"] * 20, "positive": ["same"] * 20})]
    assert all(len(b) == 1 for b in _sampler(one_text, [1.0], batch_size=4))
