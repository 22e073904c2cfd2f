"""Image backbones in plain torch (torchvision is not installable here).

Shared by the reward model (its image branch) and the classifiers (counterfactual guidance), so a
classifier trained on real images can initialise the reward model's image branch — the first probe
of the feedback method found that this, not the architecture, decided whether the reward model
learned anything (FINDINGS.md).

Every backbone maps ``(B, C, H, W)`` images to ``(B, out_features)`` pooled features; the heads
(``→ 1000`` for the reward model, ``→ num_classes`` for a classifier) live with their owners.

Names: ``small_cnn`` (tiny, for tests and the demo), ``resnet18``, ``resnet50`` (the
counterfactual paper's classifiers) and ``resnext50`` (ResNeXt-50 32x4d, the feedback paper's
reward backbone). No pretrained weights exist offline: all start from random initialisation.
"""

from __future__ import annotations

from typing import Final

import torch
from torch import Tensor, nn

from clinisynth_server.errors import InvalidArgument

BACKBONES: Final[tuple[str, ...]] = ("small_cnn", "resnet18", "resnet50", "resnext50")


class Backbone(nn.Module):
    """A feature trunk: declares ``out_features`` so the heads built on it are typed."""

    out_features: int


class SmallCNN(Backbone):
    """Four conv stages (stride 2 after the first), BatchNorm, global average pool.

    BatchNorm, not Group/InstanceNorm: per-sample normalisation of the first stage would erase
    global intensity, which is often the finding (brightness, density). Use in eval mode for
    scoring and guidance so that results do not depend on batch composition.
    """

    def __init__(self, in_channels: int, width: int = 16) -> None:
        super().__init__()
        chans = (width, width * 2, width * 4, width * 4)
        layers: list[nn.Module] = []
        prev = in_channels
        for i, c in enumerate(chans):
            layers += [
                nn.Conv2d(prev, c, 3, stride=1 if i == 0 else 2, padding=1),
                nn.BatchNorm2d(c),
                nn.SiLU(),
            ]
            prev = c
        self.features = nn.Sequential(*layers)
        self.out_features = prev

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x).mean(dim=(2, 3))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int, groups: int, base_width: int
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(inplanes, planes * self.expansion, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    """ResNet / ResNeXt bottleneck: 1×1 → grouped 3×3 → 1×1 (×4), as in torchvision."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int, groups: int, base_width: int
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(inplanes, planes * self.expansion, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


def _downsample(inplanes: int, outplanes: int, stride: int) -> nn.Module | None:
    if stride == 1 and inplanes == outplanes:
        return None
    return nn.Sequential(
        nn.Conv2d(inplanes, outplanes, 1, stride, bias=False), nn.BatchNorm2d(outplanes)
    )


class ResNet(Backbone):
    """torchvision-layout ResNet / ResNeXt trunk without the final fc (features only)."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        in_channels: int,
        groups: int = 1,
        width_per_group: int = 64,
        base_planes: int = 64,
    ) -> None:
        super().__init__()
        self.inplanes = base_planes
        self.groups, self.base_width = groups, width_per_group
        self.conv1 = nn.Conv2d(in_channels, base_planes, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_planes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages = []
        for i, n in enumerate(layers):
            stages.append(self._make_layer(block, base_planes * 2**i, n, 1 if i == 0 else 2))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_features = base_planes * 8 * block.expansion
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # Zero-init the last norm of each residual branch: every block starts as identity.
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, n: int, stride: int
    ) -> nn.Sequential:
        blocks = [block(self.inplanes, planes, stride, self.groups, self.base_width)]
        self.inplanes = planes * block.expansion
        blocks += [
            block(self.inplanes, planes, 1, self.groups, self.base_width) for _ in range(n - 1)
        ]
        return nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(x.mean(dim=(2, 3)), 1)


def build_backbone(name: str, in_channels: int, width: int = 16) -> Backbone:
    """Build a feature backbone by name; ``width`` only applies to ``small_cnn``.

    The returned module has an ``out_features`` attribute (its feature dimension).
    """
    if name == "small_cnn":
        return SmallCNN(in_channels, width)
    if name == "resnet18":
        return ResNet(BasicBlock, (2, 2, 2, 2), in_channels)
    if name == "resnet50":
        return ResNet(Bottleneck, (3, 4, 6, 3), in_channels)
    if name == "resnext50":
        return ResNet(Bottleneck, (3, 4, 6, 3), in_channels, groups=32, width_per_group=4)
    raise InvalidArgument.for_field(
        "backbone", f"unknown backbone {name!r}; valid: {', '.join(BACKBONES)}"
    )
