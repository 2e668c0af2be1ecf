"""Network architectures: the REDNet-style denoising autoencoder and the classifiers.

Every model takes NCHW images in [0, 1] with no mean/std normalisation. Models are built from
``(arch, config)`` pairs so that a checkpoint's JSON metadata is enough to rebuild one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


class REDNet(nn.Module):
    """Residual encoder-decoder denoiser (REDNet variant used by APuDAE).

    ``layers`` conv blocks then ``layers`` transposed-conv blocks of ``width`` channels (3x3).
    The first conv has stride 2 and the last transposed conv brings the image back to full
    size; every block is conv -> ReLU -> BatchNorm; every second encoder output is added to the
    mirrored decoder block; the output is ``relu(x + decoder(x))``. ``layers=15, width=64`` is
    the 30-layer CIFAR reference; smaller members suit 28x28 digits.

    Args:
        channels: image channels (1 or 3).
        layers: conv blocks on each side (>= 2).
        width: feature channels.
    Shapes: (N, channels, H, W) -> (N, channels, H, W) for any H, W >= 2.
    Example: ``REDNet(channels=1, layers=4, width=32)(torch.rand(8, 1, 28, 28))``
    """

    def __init__(self, channels: int = 3, layers: int = 15, width: int = 64) -> None:
        super().__init__()
        if layers < 2:
            raise ValueError(f"REDNet needs at least 2 layers a side, got {layers}")
        self.channels, self.layers, self.width = channels, layers, width
        self.encoder = nn.ModuleList()
        for i in range(layers):
            conv = nn.Conv2d(channels if i == 0 else width, width, 3, stride=2 if i == 0 else 1,
                             padding=1)
            self.encoder.append(nn.Sequential(conv, nn.ReLU(), nn.BatchNorm2d(width)))
        self.decoder = nn.ModuleList()
        for _ in range(layers - 1):
            self.decoder.append(nn.ModuleList([nn.ConvTranspose2d(width, width, 3, padding=1),
                                               nn.BatchNorm2d(width)]))
        self.head = nn.ConvTranspose2d(width, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        h = x
        for i, block in enumerate(self.encoder):
            h = block(h)
            if i % 2 == 1 and i < self.layers - 1:
                skips.append(h)
        for j, (deconv, norm) in enumerate(self.decoder):
            h = deconv(h)
            # Mirror of encoder block i = layers-2-j joins here, every second layer.
            mirror = self.layers - 2 - j
            if mirror % 2 == 1 and skips:
                h = h + skips.pop()
            h = norm(F.relu(h))
        out = self.head(h, output_size=x.shape[-2:])
        return F.relu(x + out)


class SmallCNN(nn.Module):
    """Classifier for small grayscale images (28x28 digits and clothes).

    Two conv -> ReLU -> max-pool stages (32, 64 channels) and a 128-unit hidden layer.
    Shapes: (N, channels, size, size) -> (N, classes) logits.
    """

    def __init__(self, channels: int = 1, classes: int = 10, size: int = 28) -> None:
        super().__init__()
        self.channels, self.classes, self.size = channels, classes, size
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * (size // 4) ** 2, 128), nn.ReLU(),
                                  nn.Linear(128, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18, CIFAR variant (3x3 stem, no max-pool), on [0, 1] inputs.

    Shapes: (N, channels, H, W) -> (N, classes) logits.
    """

    def __init__(self, channels: int = 3, classes: int = 10) -> None:
        super().__init__()
        self.channels, self.classes = channels, classes
        self.stem = nn.Sequential(nn.Conv2d(channels, 64, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(64), nn.ReLU())
        stages, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stages(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "rednet": REDNet,
    "small_cnn": SmallCNN,
    "resnet18_cifar": ResNet18,
}


def build_model(arch: str, config: dict[str, Any]) -> nn.Module:
    """Build an architecture by name from its JSON config (constructor keywords)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    try:
        return ARCHITECTURES[arch](**config)
    except TypeError as exc:
        raise ValueError(f"bad config for architecture {arch!r}: {exc}") from None


def model_config(model: nn.Module) -> dict[str, Any]:
    """The constructor keywords that rebuild ``model`` (inverse of :func:`build_model`)."""
    if isinstance(model, REDNet):
        return {"channels": model.channels, "layers": model.layers, "width": model.width}
    if isinstance(model, SmallCNN):
        return {"channels": model.channels, "classes": model.classes, "size": model.size}
    if isinstance(model, ResNet18):
        return {"channels": model.channels, "classes": model.classes}
    raise ValueError(f"no config known for {type(model).__name__}")


def arch_name(model: nn.Module) -> str:
    for name, cls in ARCHITECTURES.items():
        if type(model) is cls:
            return name
    raise ValueError(f"{type(model).__name__} is not a registered architecture")
