"""The data stage's batch functions, as plain Python (no Ray)."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from raypipe import data, datagen, models
from raypipe.config import AugmentConfig, ModelConfig, OutlierConfig
from tests.conftest import data_stats

SHAPE = [1, 8, 8]


def _digits(n=32):
    x = load_digits().data[:n].astype(np.float32)
    return {"x": x, "label": np.arange(n) % 10, "key": data.row_keys(x)}


def _images(n=16, seed=0):
    batch = datagen.synth_images({"id": np.arange(n)}, (32, 32, 3), 10, seed)
    x = batch["image"].transpose(0, 3, 1, 2).reshape(n, -1)
    return {"x": x, "label": batch["label"], "key": data.row_keys(x)}


def test_clean_batch_drops_nonfinite_and_unknown_labels_and_tags_duplicates():
    x = load_digits().data[:6].astype(np.float32)
    x[1, 3], x[4, 0] = np.nan, np.inf
    x[5] = x[0]
    labels = np.array(["0", "1", "2", "9", "4", "0"])
    out = data.clean_batch({"x": x, "label_raw": labels}, classes=["0", "1", "2", "3", "4", "5"],
                           dup_keys=data.row_keys(x[:1]), bounds=None, val=0.15, test=0.15, seed=0)
    assert list(out["label"]) == [0, 2, 0]  # rows 0, 2, 5: NaN, inf and the unknown label "9" are gone
    assert list(out["dup"]) == [True, False, True]
    assert set(out["split"]) <= set(data.SPLITS)


def test_row_keys_match_exactly_for_duplicates_only():
    x = _digits(4)["x"]
    x[3] = x[1]
    keys = data.row_keys(x)
    assert keys.dtype == np.int64 and keys[1] == keys[3] and len(set(keys)) == 3


def test_split_is_stable_and_roughly_proportional():
    keys = data.row_keys(load_digits().data.astype(np.float32))
    first = data.split_of(keys, 0.15, 0.15, seed=0)
    assert (first == data.split_of(keys, 0.15, 0.15, seed=0)).all()
    assert (first[::-1] == data.split_of(keys[::-1], 0.15, 0.15, seed=0)).all()
    shares = {s: (first == s).mean() for s in data.SPLITS}
    assert 0.65 < shares["train"] < 0.75 and 0.1 < shares["val"] < 0.2 and 0.1 < shares["test"] < 0.2
    assert (first != data.split_of(keys, 0.15, 0.15, seed=1)).any()


def test_first_of_group_is_deterministic():
    group = {"x": np.zeros((3, 2)), "label": np.array([4, 1, 7]), "key": np.array([5, 5, 5])}
    assert list(data.first_of_group(group)["label"]) == [1]


@pytest.mark.parametrize("method", ["zscore", "iqr"])
def test_outlier_bounds_cut_extremes_but_not_constant_features(method):
    rng = np.random.default_rng(0)
    sample = np.column_stack([rng.normal(0, 1, 5000), np.zeros(5000)])
    low, high = data.outlier_bounds(sample, OutlierConfig(method=method))
    assert -6 < low[0] < -2 and 2 < high[0] < 6
    assert np.isinf(low[1]) and np.isinf(high[1])
    x = np.array([[0.0, 5.0], [50.0, 0.0]], dtype=np.float32)
    out = data.clean_batch({"x": x, "label_raw": np.array(["a", "a"])}, ["a"], np.array([], np.int64),
                           (low, high), 0.15, 0.15, 0)
    assert list(out["split"] == "outlier") == [False, True] and out["x"][0, 1] == 5.0


def test_statistics_per_channel_and_per_feature():
    x = _digits(200)["x"]
    parts = [data.moments({"x": x[:120]}), data.moments({"x": x[120:]})]
    per_feature = data.combine_moments(parts, "feature", SHAPE)
    assert np.allclose(per_feature.mean, x.mean(axis=0), atol=1e-4)
    constant = x.std(axis=0) < 1e-6
    assert np.allclose(np.array(per_feature.std)[~constant], x.std(axis=0)[~constant], atol=1e-3)
    assert (np.array(per_feature.std)[constant] == 1.0).all()
    per_channel = data.combine_moments(parts, "channel", SHAPE)
    assert np.allclose(per_channel.mean, x.mean(), atol=1e-4) and np.allclose(per_channel.std, x.std(), atol=1e-3)
    rgb = _images(40)["x"]
    stats = data.combine_moments([data.moments({"x": rgb})], "channel", [3, 32, 32])
    means = np.array(stats.mean).reshape(3, -1)
    assert np.allclose(means[:, 0], rgb.reshape(40, 3, -1).mean(axis=(0, 2)), atol=1e-3)
    assert (means == means[:, :1]).all()


@pytest.mark.parametrize("ops", [["crop"], ["flip"], ["rotate"], ["noise"], ["cutout"],
                                 ["crop", "flip", "rotate", "noise", "cutout"]])
def test_augmentation_depends_only_on_seed_epoch_and_row(ops):
    batch, cfg, shape = _images(), AugmentConfig(ops=ops, crop_padding=4, max_degrees=15, noise_std=8), [3, 32, 32]
    once = data.augment(batch, cfg, shape, seed=0, epoch=3)
    order = np.random.default_rng(1).permutation(len(batch["x"]))
    shuffled = data.augment({k: v[order] for k, v in batch.items()}, cfg, shape, seed=0, epoch=3)
    assert np.allclose(shuffled, once[order])
    halves = np.concatenate([data.augment({k: v[:5] for k, v in batch.items()}, cfg, shape, 0, 3),
                             data.augment({k: v[5:] for k, v in batch.items()}, cfg, shape, 0, 3)])
    assert np.allclose(halves, once)
    assert not np.allclose(once, data.augment(batch, cfg, shape, seed=0, epoch=4))
    assert not np.allclose(once, batch["x"])


def test_whole_pixel_ops_move_pixels_exactly():
    batch = _images(64)
    flipped = data.augment(batch, AugmentConfig(ops=["flip"]), [3, 32, 32], 0, 0).reshape(64, 3, 32, 32)
    original = batch["x"].reshape(64, 3, 32, 32).astype(np.float32)
    mirrored = [np.array_equal(f, o[..., ::-1]) for f, o in zip(flipped, original)]
    unchanged = [np.array_equal(f, o) for f, o in zip(flipped, original)]
    assert all(m or u for m, u in zip(mirrored, unchanged)) and 10 < sum(mirrored) < 54
    cut = data.augment(batch, AugmentConfig(ops=["cutout"], cutout_size=8), [3, 32, 32], 0, 0).reshape(64, 3, 32, 32)
    zeroed = (cut == 0).all(axis=1).sum(axis=(1, 2)) - (original == 0).all(axis=1).sum(axis=(1, 2))
    assert (zeroed <= 64).all() and (zeroed > 0).mean() > 0.9


def test_augmentation_keeps_digits_recognisable():
    batch = _digits()
    out = data.augment(batch, AugmentConfig(ops=["rotate"], max_degrees=10), SHAPE, 0, 0)
    corr = [np.corrcoef(a, b)[0, 1] for a, b in zip(out, batch["x"])]
    assert min(corr) > 0.8
    assert np.array_equal(data.augment(batch, AugmentConfig(ops=[]), SHAPE, 0, 0), batch["x"])


def test_exported_standardize_matches_the_ingest():
    batch = _digits(16)
    fitted = data.combine_moments([data.moments(batch)], "channel", SHAPE)
    stats = data_stats(SHAPE, mean=fitted.mean, std=fitted.std)
    net = models.build(ModelConfig(hidden=[8]), stats).eval()
    with torch.no_grad():
        trained_on = net(torch.from_numpy(data.standardize(batch["x"], stats.standardize)))
        served = models.with_standardize(net, stats)(torch.from_numpy(batch["x"]))
    assert torch.allclose(trained_on, served, atol=1e-5)
    x, y = data.IngestCollate(stats, None, 0, 0)({"x": batch["x"], "label": batch["label"]})
    assert torch.allclose(net(x), trained_on, atol=1e-5) and y.dtype == torch.int64


def test_synthetic_images_are_deterministic_and_class_dependent():
    a, b = datagen.synth_images({"id": np.arange(200)}, (32, 32, 3), 10, 0), \
        datagen.synth_images({"id": np.arange(200)}, (32, 32, 3), 10, 0)
    assert np.array_equal(a["image"], b["image"]) and a["image"].dtype == np.uint8
    assert set(a["label"]) == set(range(10))
    means = np.array([a["image"][a["label"] == c].mean(axis=(0, 1, 2)) for c in range(10)])
    assert np.ptp(means, axis=0).max() > 5


@pytest.mark.parametrize("size", [3, 4, 7, 8])
def test_cutout_removes_exactly_a_size_by_size_square(size):
    batch = _images(64)
    batch["x"] = np.ones_like(batch["x"])
    cut = data.augment(batch, AugmentConfig(ops=["cutout"], cutout_size=size), [3, 32, 32], 0, 0)
    zeroed = (cut.reshape(64, 3, 32, 32) == 0).all(axis=1).sum(axis=(1, 2))
    # Clipped at a border a hole is smaller; among 64 random centres many lie well inside.
    assert zeroed.max() == size * size and (zeroed == size * size).mean() > 0.5


def test_noise_works_on_images_larger_than_its_bank():
    big = {"x": np.zeros((2, (1 << 20) + 64), dtype=np.uint8), "key": np.array([1, 2])}
    out = data.augment(big, AugmentConfig(ops=["noise"], noise_std=1.0), [1, 1, (1 << 20) + 64], 0, 0)
    assert out.shape == big["x"].shape and 0.9 < out.std() < 1.1 and not np.allclose(out[0], out[1])


@pytest.mark.parametrize("seed", [-1, 300_000_000, 2**70])
def test_every_integer_seed_works(seed):
    from raypipe.config import Config

    word = Config(seed=seed).rng_seed()
    assert 0 <= word < 2**32 and word == Config(seed=seed).rng_seed()
    keys = np.arange(1000, dtype=np.int64)
    assert set(data.split_of(keys, 0.15, 0.15, word)) == {"train", "val", "test"}
    batch, cfg = _images(), AugmentConfig(ops=["crop", "noise", "cutout"], crop_padding=2, noise_std=4)
    assert np.isfinite(data.augment(batch, cfg, [3, 32, 32], word, 1)).all()
    # The hash of the counter-based generator takes any integer too.
    assert data._uniforms(keys, seed, 0, 2).shape == (1000, 2)
    assert Config(seed=7).rng_seed() == 7  # seeds in range are kept, so existing runs reproduce
