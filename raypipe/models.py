"""Plain torch models. No Ray here.

Every model starts with `Standardize`, holding the statistics fitted on the train split as buffers: the
checkpoint, the ONNX export and every server then take raw inputs and standardize them identically.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from raypipe.config import ModelConfig


class Standardize(nn.Module):
    """(x - mean) / std with fixed, non-trainable statistics."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


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
    for out in cfg.channels:
        layers += [nn.Conv2d(channels, out, 3, padding=1), nn.ReLU()]
        channels = out
    # Halve the resolution once for small images, twice for larger ones; then pool globally.
    layers += [nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(2), nn.Flatten()]
    return nn.Sequential(*layers, nn.Dropout(cfg.dropout), nn.Linear(channels * 4, classes))


def build(cfg: ModelConfig, stats: dict[str, Any]) -> nn.Module:
    """The network for `model.arch`, sized for the data set described by `data/stats.json`."""
    classes = stats["classes"]
    body = _mlp(cfg, stats["features"], classes) if cfg.arch == "mlp" else _cnn(cfg, stats["image_shape"], classes)
    return nn.Sequential(Standardize(**stats["standardize"]), body)
