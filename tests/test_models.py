"""Models, precision choice and the learning-rate schedule, as plain Python (no Ray)."""

import numpy as np
import pytest
import torch

from raypipe import compress, models
from raypipe.config import ModelConfig
from raypipe.predict import OnnxModel
from raypipe.train import lr_factor, resolve_precision
from tests.conftest import data_stats

IMAGES = data_stats([3, 32, 32], mean=120.0, std=60.0)


@pytest.mark.parametrize("arch", ["mlp", "cnn", "resnet"])
def test_every_arch_trains_a_step_and_exports(arch):
    torch.manual_seed(0)
    net = models.build(ModelConfig(arch=arch, channels=[8, 16], hidden=[32]), IMAGES)
    x, y = torch.randn(8, 3072), torch.randint(0, 10, (8,))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    served = models.with_standardize(net, IMAGES)
    raw = np.random.default_rng(0).uniform(0, 255, (4, 3072)).astype(np.float32)
    onnx = OnnxModel(compress.export_onnx(served, 3072))
    with torch.no_grad():
        expected = served(torch.from_numpy(raw)).numpy()
    assert np.allclose(onnx.logits(raw), expected, atol=1e-4)


def test_image_archs_refuse_flat_features():
    with pytest.raises(ValueError, match="needs image data"):
        models.build(ModelConfig(arch="resnet"), data_stats([5], mean=0.0, std=1.0, num_classes=2))


def test_auto_precision():
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"


def test_learning_rate_warms_up_then_decays():
    values = [lr_factor(p, epochs=10, warmup_epochs=1) for p in np.linspace(0, 10, 101)]
    peak = int(np.argmax(values))
    assert values[0] < 0.05 and 9 <= peak <= 11 and values[-1] < 1e-6
    assert all(a <= b for a, b in zip(values[:peak], values[1 : peak + 1]))
    assert all(a >= b for a, b in zip(values[peak:], values[peak + 1 :]))



class _RunsCode:
    """Unpickling this runs a shell command: what a hostile checkpoint in a shared bucket would hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    import pickle

    from raypipe import train
    from raypipe.config import Config
    from raypipe.storage import RunPaths

    marker = tmp_path / "pwned"
    run = tmp_path / "runs" / "r"
    (run / "checkpoints/best").mkdir(parents=True)
    torch.save({"model": {}, "epoch": 1, "payload": _RunsCode(marker)}, run / train.BEST_CHECKPOINT)
    paths = RunPaths.open(str(run))
    with pytest.raises(pickle.UnpicklingError):
        train.load_model(Config(), IMAGES, paths, train.BEST_CHECKPOINT)
    assert not marker.exists()


def test_best_is_restored_when_a_worker_was_lost_before_copying_it(tmp_path):
    """Rank 0 copies an improved checkpoint to best/ after reporting it; lost in between, the resumed
    run finds its latest checkpoint is the best and best/ older: keep_best copies it then."""
    import io

    from raypipe import train
    from raypipe.storage import RunPaths

    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    paths = RunPaths.open(str(run))

    def checkpoint(epoch):
        buffer = io.BytesIO()
        torch.save({"model": {}, "epoch": epoch, "best": {"epoch": epoch, "val_accuracy": 0.5}}, buffer)
        return buffer.getvalue()

    best = train.BEST_CHECKPOINT
    train.keep_best(paths, best, checkpoint(2), 2)
    train.keep_best(paths, best, checkpoint(3), 3)  # the resumed epoch-3 checkpoint, best but never copied
    assert torch.load(run / best, weights_only=True)["epoch"] == 3
    before = (run / best).stat().st_ino
    train.keep_best(paths, best, checkpoint(3), 3)  # already there: not written again (a write renames a new file in)
    assert (run / best).stat().st_ino == before
