"""Reference architectures: the paper's MLP and VGG-style CNN, a LeNet-5-style CNN, a small ResNet.

Every model takes ``in_shape`` (C, H, W) and ``num_classes`` so the same name works on 8x8 digits,
28x28 MNIST and 32x32x3 CIFAR-10. The paper's networks (Li & Hao, ICML 2018) put a BatchNorm after
every weight layer and use no biases there: the BatchNorm supplies the per-channel scale and shift
that a ternary or binary layer lacks.

Example::

    from ternarize import zoo
    model = zoo.create("mlp", in_shape=(1, 28, 28), width=256)   # 784-256-256-256-10
    zoo.names()  # ['lenet', 'mlp', 'resnet', 'vgg']
"""

from __future__ import annotations

import math
import numbers

from torch import nn

from .errors import ConfigError


class MLP(nn.Sequential):
    """The paper's MNIST network: Flatten, then ``depth`` x [Linear(width, no bias) → BN → ReLU],
    then Linear(num_classes, no bias) → BN. Paper: 784-2048-2048-2048-10."""

    def __init__(self, in_shape=(1, 28, 28), num_classes=10, width=2048, depth=3):
        layers: list[nn.Module] = [nn.Flatten()]
        fan_in = math.prod(in_shape)
        for _ in range(depth):
            layers += [nn.Linear(fan_in, width, bias=False), nn.BatchNorm1d(width), nn.ReLU()]
            fan_in = width
        layers += [nn.Linear(fan_in, num_classes, bias=False), nn.BatchNorm1d(num_classes)]
        super().__init__(*layers)


class VGG(nn.Sequential):
    """The paper's CIFAR-10 network at a width multiplier:
    2x128C3-MP-2x256C3-MP-2x512C3-MP-1024FC-1024FC-10FC (``width=1``; SVHN used ``width=0.5``).
    Conv blocks are conv(same padding, no bias) → [maxpool 2] → BN → ReLU, as in the paper."""

    def __init__(self, in_shape=(3, 32, 32), num_classes=10, width=1.0, fc=1024):
        c, h, w = in_shape
        chans = [max(1, round(k * width)) for k in (128, 128, 256, 256, 512, 512)]
        layers: list[nn.Module] = []
        for i, out in enumerate(chans):
            layers.append(nn.Conv2d(c, out, 3, padding=1, bias=False))
            if i % 2 == 1:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            layers += [nn.BatchNorm2d(out), nn.ReLU()]
            c = out
        if h < 1 or w < 1:
            raise ConfigError(f"vgg needs inputs of at least 8x8 pixels, got {in_shape[1]}x{in_shape[2]}")
        fc = max(1, round(fc * width))
        layers += [nn.Flatten(),
                   nn.Linear(c * h * w, fc, bias=False), nn.BatchNorm1d(fc), nn.ReLU(),
                   nn.Linear(fc, fc, bias=False), nn.BatchNorm1d(fc), nn.ReLU(),
                   nn.Linear(fc, num_classes, bias=False), nn.BatchNorm1d(num_classes)]
        super().__init__(*layers)


class LeNet(nn.Sequential):
    """LeNet-5 style: 6C5-MP-16C5-MP-120FC-84FC-classes, with BatchNorm after each weight layer but the classifier.
    Both convolutions pad by 2, so 8x8 inputs work as well as 28x28 and 32x32."""

    def __init__(self, in_shape=(1, 28, 28), num_classes=10):
        c, h, w = in_shape
        if h < 4 or w < 4:
            raise ConfigError(f"lenet needs inputs of at least 4x4 pixels, got {h}x{w}")
        super().__init__(
            nn.Conv2d(c, 6, 5, padding=2, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=2, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * (h // 4) * (w // 4), 120, bias=False), nn.BatchNorm1d(120), nn.ReLU(),
            nn.Linear(120, 84, bias=False), nn.BatchNorm1d(84), nn.ReLU(),
            nn.Linear(84, num_classes),
        )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a residual add; a strided 1x1 conv + BN shortcut
    when the shape changes."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        self.relu2 = nn.ReLU()

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """A small CIFAR-style ResNet: 3x3 stem, three stages of ``blocks`` basic blocks at widths
    (w, 2w, 4w) with stride-2 downsampling between stages, global average pool, linear head.
    ``blocks=1`` gives ResNet-8, ``blocks=3`` ResNet-20 (He et al., 2016)."""

    def __init__(self, in_shape=(3, 32, 32), num_classes=10, width=16, blocks=1):
        super().__init__()
        c = in_shape[0]
        self.stem = nn.Sequential(nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        stages, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            for j in range(blocks):
                stages.append(BasicBlock(cin, cout, stride=2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.stages(self.stem(x)))))


_MODELS = {"mlp": MLP, "vgg": VGG, "lenet": LeNet, "resnet": ResNet}


def names() -> list[str]:
    """The zoo's model names."""
    return sorted(_MODELS)


def create(name: str, **kwargs) -> nn.Module:
    """Build zoo model ``name`` with keyword arguments (``in_shape``, ``num_classes``, and the
    model's own: ``width``/``depth`` for mlp, ``width``/``fc`` for vgg, ``width``/``blocks`` for resnet)."""
    try:
        cls = _MODELS[name]
    except KeyError:
        raise ConfigError(f"unknown zoo model {name!r}; choose one of {', '.join(names())}") from None
    _check_sizes(name, kwargs)
    try:
        model = cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"zoo model {name!r}: {e}") from None
    model.zoo_name = name
    return model


# per size argument: (whole number?, largest value): vgg's width is a multiplier, the others count
_SIZES = {"width": (True, 1 << 20), "depth": (True, 64), "fc": (True, 1 << 20), "blocks": (True, 64)}
_VGG_WIDTH_MAX = 1024.0


def _check_sizes(name: str, kwargs: dict) -> None:
    """Refuse a size argument that is not a positive (finite, whole where it counts) number in range,
    a ``num_classes`` below 1 and an ``in_shape`` that is not three positive whole numbers."""
    for key, value in kwargs.items():
        if key not in _SIZES:
            continue
        whole, top = (False, _VGG_WIDTH_MAX) if (name, key) == ("vgg", "width") else _SIZES[key]
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) \
            and 0 < value <= top and (not whole or float(value).is_integer())
        if not ok:
            kind, most = ("a whole number", f"{top:,}") if whole else ("a number", f"{top:g}")
            raise ConfigError(f"zoo model {name!r}: {key} must be {kind} above 0 and at most {most}, got {value!r}")
        if whole:
            kwargs[key] = int(value)
    if "num_classes" in kwargs:
        n = kwargs["num_classes"]
        if not (isinstance(n, numbers.Integral) and not isinstance(n, bool) and 1 <= n <= 1 << 20):
            raise ConfigError(f"zoo model {name!r}: num_classes must be a whole number from 1 to {1 << 20:,}, "
                              f"got {n!r}")
    if "in_shape" in kwargs:
        shape = kwargs["in_shape"]
        if not (isinstance(shape, (tuple, list)) and len(shape) == 3 and all(
                isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 1 for d in shape)
                and math.prod(shape) <= 1 << 32):
            raise ConfigError(f"zoo model {name!r}: in_shape must be (channels, height, width), three whole numbers "
                              f"of at least 1 whose product is at most {1 << 32:,}, got {shape!r}")
        kwargs["in_shape"] = tuple(int(d) for d in shape)


def classes() -> tuple[type, ...]:
    """Every class a zoo model is built from (the safe-loading allowlist uses these)."""
    return (*_MODELS.values(), BasicBlock)

