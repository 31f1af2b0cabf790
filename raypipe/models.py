"""Plain torch models. No Ray here.

Networks train on standardized inputs (the data stage's statistics, applied by the ingest). For export,
`with_standardize` puts the same statistics in front as a fixed layer, so every model file and server
takes raw inputs.
"""

from __future__ import annotations

import torch
from torch import nn

from raypipe.config import ModelConfig
from raypipe.records import DataStats


class Standardize(nn.Module):
    """(x - mean) / std with fixed, non-trainable statistics. For images standardized per channel, one
    mean and std per channel are kept (not one per pixel), so an exported file does not carry C x H x W
    copies of C numbers."""

    def __init__(self, mean: list[float], std: list[float], image_shape: list[int] | None = None):
        super().__init__()
        mean_t, std_t = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        self.channels = 0
        if image_shape and len(image_shape) == 3:
            per_mean, per_std = mean_t.view(image_shape[0], -1), std_t.view(image_shape[0], -1)
            if bool((per_mean == per_mean[:, :1]).all() and (per_std == per_std[:, :1]).all()):
                mean_t, std_t, self.channels = per_mean[:, :1].clone(), per_std[:, :1].clone(), image_shape[0]
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.channels:
            return (x - self.mean) / self.std
        per_channel = x.reshape(x.shape[0], self.channels, -1)
        return ((per_channel - self.mean) / self.std).flatten(1)


def _mlp(cfg: ModelConfig, features: int, classes: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = features
    for hidden in cfg.hidden:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    return nn.Sequential(*layers, nn.Dropout(cfg.dropout), nn.Linear(width, classes))


def _cnn(cfg: ModelConfig, image_shape: list[int], classes: int) -> nn.Sequential:
    channels, height, width = image_shape
    layers: list[nn.Module] = [nn.Unflatten(1, (channels, height, width))]
    size = min(height, width)
    for out in cfg.channels:
        layers += [nn.Conv2d(channels, out, 3, padding=1), nn.ReLU()]
        channels = out
        # Halve the resolution after each block while it is larger than 4x4.
        if size > 4:
            layers.append(nn.MaxPool2d(2))
            size //= 2
    layers += [nn.AdaptiveAvgPool2d(2), nn.Flatten()]
    return nn.Sequential(*layers, nn.Dropout(cfg.dropout), nn.Linear(channels * 4, classes))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity (or 1x1 projection) shortcut."""

    def __init__(self, inp: int, out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(inp, out, 3, stride, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU(),
            nn.Conv2d(out, out, 3, 1, 1, bias=False), nn.BatchNorm2d(out),
        )
        self.shortcut = nn.Identity() if stride == 1 and inp == out else nn.Sequential(
            nn.Conv2d(inp, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def _resnet(cfg: ModelConfig, image_shape: list[int], classes: int) -> nn.Sequential:
    channels, height, width = image_shape
    stem = cfg.channels[0]
    layers: list[nn.Module] = [nn.Unflatten(1, (channels, height, width)),
                               nn.Conv2d(channels, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU()]
    width_in = stem
    for stage, out in enumerate(cfg.channels):
        for block in range(cfg.blocks):
            layers.append(BasicBlock(width_in, out, 2 if stage > 0 and block == 0 else 1))
            width_in = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(cfg.dropout), nn.Linear(width_in, classes)]
    return nn.Sequential(*layers)


def build(cfg: ModelConfig, stats: DataStats) -> nn.Module:
    """The network for `model.arch`, sized for the data set described by `data/stats.json`."""
    if cfg.arch == "mlp":
        return _mlp(cfg, stats.features, stats.num_classes)
    if not stats.is_image():
        raise ValueError(f"model.arch {cfg.arch} needs image data; this data set has flat features")
    return (_cnn if cfg.arch == "cnn" else _resnet)(cfg, stats.image_shape, stats.num_classes)


def with_standardize(model: nn.Module, stats: DataStats) -> nn.Module:
    """The model taking raw inputs: the train split's standardization as a fixed first layer."""
    standardize = Standardize(stats.standardize.mean, stats.standardize.std, stats.image_shape)
    return nn.Sequential(standardize, model).eval()
