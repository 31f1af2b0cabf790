"""The data stage's batch functions, as plain Python (no Ray)."""

import numpy as np
from sklearn.datasets import load_digits

from raypipe import data
from raypipe.config import AugmentConfig

SHAPE = [1, 8, 8]


def _digits(n=32):
    x = load_digits().data[:n].astype(np.float32)
    return {"x": x, "label": np.arange(n) % 10, "key": data.row_keys(x)}


def test_drop_nonfinite_drops_nan_and_inf_rows():
    batch = _digits(6)
    batch["x"][1, 3] = np.nan
    batch["x"][4, 0] = np.inf
    kept = data.drop_nonfinite(batch)
    assert len(kept["x"]) == 4 and list(kept["label"]) == [0, 2, 3, 5]


def test_row_keys_match_exactly_for_duplicates_only():
    x = _digits(4)["x"]
    x[3] = x[1]
    keys = data.row_keys(x)
    assert keys[1] == keys[3] and len(set(keys)) == 3


def test_split_is_stable_and_roughly_proportional():
    keys = data.row_keys(load_digits().data.astype(np.float32))
    first = data.split_of(keys, 0.15, 0.15, seed=0)
    assert (first == data.split_of(keys, 0.15, 0.15, seed=0)).all()
    assert (first[::-1] == data.split_of(keys[::-1], 0.15, 0.15, seed=0)).all()
    shares = {s: (first == s).mean() for s in data.SPLITS}
    assert 0.65 < shares["train"] < 0.75 and 0.1 < shares["val"] < 0.2 and 0.1 < shares["test"] < 0.2
    assert (first != data.split_of(keys, 0.15, 0.15, seed=1)).any()


def test_statistics_per_channel_and_per_feature():
    x = _digits(200)["x"]
    parts = [data.moments({"x": x[:120]}), data.moments({"x": x[120:]})]
    per_feature = data.combine_moments(parts, "feature", SHAPE)
    assert np.allclose(per_feature["mean"], x.mean(axis=0), atol=1e-4)
    constant = x.std(axis=0) < 1e-6
    assert np.allclose(np.array(per_feature["std"])[~constant], x.std(axis=0)[~constant], atol=1e-3)
    assert (np.array(per_feature["std"])[constant] == 1.0).all()
    per_channel = data.combine_moments(parts, "channel", SHAPE)
    assert np.allclose(per_channel["mean"], x.mean(), atol=1e-4) and np.allclose(per_channel["std"], x.std(), atol=1e-3)


def test_augmentation_depends_only_on_seed_epoch_and_row():
    batch, cfg = _digits(), AugmentConfig()
    once = data.augment(batch, cfg, SHAPE, seed=0, epoch=3)
    order = np.random.default_rng(1).permutation(len(batch["x"]))
    shuffled = data.augment({k: v[order] for k, v in batch.items()}, cfg, SHAPE, seed=0, epoch=3)
    assert np.allclose(shuffled, once[order])
    halves = np.concatenate([data.augment({k: v[:10] for k, v in batch.items()}, cfg, SHAPE, 0, 3),
                             data.augment({k: v[10:] for k, v in batch.items()}, cfg, SHAPE, 0, 3)])
    assert np.allclose(halves, once)
    assert not np.allclose(once, data.augment(batch, cfg, SHAPE, seed=0, epoch=4))
    assert not np.allclose(once, batch["x"])


def test_augmentation_keeps_digits_recognisable():
    batch = _digits()
    out = data.augment(batch, AugmentConfig(ops=["rotate"], max_degrees=10), SHAPE, 0, 0)
    corr = [np.corrcoef(a, b)[0, 1] for a, b in zip(out, batch["x"])]
    assert min(corr) > 0.8
    assert np.array_equal(data.augment(batch, AugmentConfig(ops=[]), SHAPE, 0, 0), batch["x"])
