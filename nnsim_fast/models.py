"""Residual networks for the demo and for real 32x32 data, a training loop and a weight cache.

:class:`SmallResNet` mirrors the layout of the ResNets the seed paper compares (a stem, a stack
of residual blocks, global pooling and a linear head), shrunk to 8x8 inputs so that a few dozen
models train on a laptop CPU in minutes.  :func:`resnet18_cifar` is the paper's own network
shape, ResNet-18 for 32x32 images (CIFAR-10/100, SVHN), with an optional smaller width.

Both expose their residual stages as direct children listed in ``model.block_names``
(``block1`` ... for SmallResNet, ``layer1`` ... ``layer4`` for ResNet), so
``sketch_model(model, data, layers=model.block_names)`` probes every stage output, and
``model.features(x)`` returns those outputs.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "BasicBlock", "SmallResNet", "ResNet", "resnet18_cifar", "TrainConfig", "train_classifier",
    "accuracy", "predict", "load_or_train",
]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a residual connection (He et al., 2016).

    The shortcut is the identity when shape is kept, otherwise a strided 1x1 convolution with
    batch norm.  Output: ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class _BlockNet(nn.Module):
    """Stem, residual stages named in ``block_names``, global average pool, linear head.

    The layout both demo networks share, so that the demo can probe, pool and count their
    layers the same way.  Subclasses build ``stem`` and the stages, then call
    :meth:`_finish`.
    """

    block_names: List[str]

    def _finish(self, num_classes: int, width: int, convs_per_stage: Sequence[int]) -> None:
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(width, num_classes)
        # stem conv + the convs of every block; shortcut convs sit off the main path
        self._main_path_convs = 1 + sum(convs_per_stage)

    def features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Every stage's output map for a batch ``x`` (no gradients are tracked by this call)."""
        out: Dict[str, torch.Tensor] = {}
        h = self.stem(x)
        for name in self.block_names:
            h = getattr(self, name)(h)
            out[name] = h
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for name in self.block_names:
            h = getattr(self, name)(h)
        return self.head(self.pool(h))

    def main_path_depth(self) -> int:
        """Weight layers on the input-to-logits path minus one (L of the Fisher-Rao norm)."""
        return self._main_path_convs         # the convs, plus the head, minus one


def _check_num_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")


class SmallResNet(_BlockNet):
    """Stem conv, ``len(channels)`` residual blocks, global average pool, linear head.

    Args:
        num_classes: outputs of the head (logits), >= 1.
        channels: output channels of each block; the first block's width is also the stem's.
            Default ``(16, 16, 32, 32)``: four blocks.
        strides: stride of each block (default: 2 where the width grows, else 1).  With 8x8
            inputs and the defaults, blocks 1-2 give 16x8x8 maps and blocks 3-4 32x4x4.
        in_channels: input image channels.

    Direct children: ``stem``, ``block1`` ... ``blockK``, ``pool``, ``head``.
    """

    def __init__(self, num_classes: int, channels: Sequence[int] = (16, 16, 32, 32),
                 strides: Optional[Sequence[int]] = None, in_channels: int = 1) -> None:
        super().__init__()
        _check_num_classes(num_classes)
        channels = [int(c) for c in channels]
        if not channels or min(channels) < 1:
            raise ValueError(f"channels must be a non-empty list of positive widths, got {channels}")
        if strides is None:
            strides = [1] + [2 if b > a else 1 for a, b in zip(channels, channels[1:])]
        if len(strides) != len(channels):
            raise ValueError(f"strides must name one stride per block: {len(channels)} blocks, "
                             f"got {len(strides)} strides")
        self.num_classes = num_classes
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(channels[0]), nn.ReLU())
        width = channels[0]
        for index, (out_channels, stride) in enumerate(zip(channels, strides), start=1):
            self.add_module(f"block{index}", BasicBlock(width, out_channels, int(stride)))
            width = out_channels
        self.block_names = [f"block{i}" for i in range(1, len(channels) + 1)]
        self._finish(num_classes, width, [2] * len(channels))


class ResNet(_BlockNet):
    """A ResNet for 32x32 images (He et al., 2016), the shape the seed paper compares.

    A 3x3 stem convolution (no max-pool: the inputs are small), four stages of
    :class:`BasicBlock` whose widths double from ``width`` while the maps halve (strides
    1, 2, 2, 2), global average pooling and a linear head.  With ``blocks=(2, 2, 2, 2)`` and
    ``width=64`` this is ResNet-18 as used on CIFAR (11.2M parameters for 10 classes);
    smaller widths keep the depth and shape at a fraction of the cost.

    Direct children: ``stem``, ``layer1`` ... ``layer4`` (each an ``nn.Sequential`` of blocks,
    the names torchvision uses), ``pool``, ``head``.
    """

    def __init__(self, num_classes: int, blocks: Sequence[int] = (2, 2, 2, 2), width: int = 64,
                 in_channels: int = 3) -> None:
        super().__init__()
        _check_num_classes(num_classes)
        blocks = [int(b) for b in blocks]
        if len(blocks) != 4 or min(blocks) < 1:
            raise ValueError(f"blocks must give four positive block counts, got {blocks}")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive int, got {width!r}")
        self.num_classes = num_classes
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        channels = width
        for stage, count in enumerate(blocks):
            out_channels = width * 2 ** stage
            stride = 1 if stage == 0 else 2
            layers = [BasicBlock(channels, out_channels, stride)]
            layers += [BasicBlock(out_channels, out_channels) for _ in range(count - 1)]
            self.add_module(f"layer{stage + 1}", nn.Sequential(*layers))
            channels = out_channels
        self.block_names = [f"layer{i}" for i in range(1, 5)]
        self._finish(num_classes, channels, [2 * count for count in blocks])


def resnet18_cifar(num_classes: int = 10, width: int = 64, in_channels: int = 3) -> ResNet:
    """ResNet-18 for 32x32 inputs (CIFAR-10/100, SVHN): :class:`ResNet` with two blocks per
    stage.  ``width`` is the first stage's channel count (64 in the original)."""
    return ResNet(num_classes, (2, 2, 2, 2), width, in_channels)


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters; their hash names cached weights (see :func:`load_or_train`).

    Adam with a cosine-decayed learning rate, mini-batches drawn in an order fixed by the
    model's seed, cross-entropy loss.
    """

    epochs: int = 6
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    channels: Tuple[int, ...] = (16, 16, 32, 32)

    def digest(self, extra: Optional[Dict[str, object]] = None) -> str:
        """A short hash of this config (and ``extra``, e.g. the data's identity)."""
        payload = {**asdict(self), **(extra or {})}
        text = json.dumps(payload, sort_keys=True, default=list)
        return hashlib.sha1(text.encode("utf-8")).hexdigest()[:10]


def _batches(n: int, batch_size: int, generator: torch.Generator) -> List[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    return list(order.split(batch_size))


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: TrainConfig,
                     seed: int) -> List[float]:
    """Train ``model`` in place on ``(x, y)``; returns the mean training loss of each epoch.

    The mini-batch order comes from a generator seeded with ``seed``; the model's initial
    weights are whatever it was built with (seed ``torch.manual_seed`` before building it).
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of samples, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr,
                                 weight_decay=config.weight_decay)
    steps = config.epochs * ((x.shape[0] + config.batch_size - 1) // config.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    losses: List[float] = []
    model.train()
    for _ in range(config.epochs):
        total, count = 0.0, 0
        for rows in _batches(x.shape[0], config.batch_size, generator):
            logits = model(x[rows])
            loss = F.cross_entropy(logits, y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * rows.numel()
            count += rows.numel()
        losses.append(total / max(count, 1))
    model.eval()
    return losses


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Predicted classes (int64 ``[N]``) of ``model`` in eval mode."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(chunk).argmax(dim=1) for chunk in x.split(batch_size)])
    finally:
        model.train(was_training)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``x`` classified as ``y``, in [0, 1]."""
    return float((predict(model, x) == y).double().mean())


def _atomic_save(state: Dict[str, torch.Tensor], path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".weights-", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.chmod(tmp, 0o644)        # mkstemp's 0600 would hide the cache from other users
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_or_train(task_name: str, num_classes: int, x: torch.Tensor, y: torch.Tensor,
                  config: TrainConfig, seed: int, cache_dir: Optional[str],
                  data_tag: str = "", build: Optional[Callable[[], nn.Module]] = None
                  ) -> Tuple[nn.Module, bool, str]:
    """A trained model, from ``cache_dir`` when an identical one was trained before.

    The model is ``build()`` (default: ``SmallResNet(num_classes, channels=config.channels)``),
    built right after ``torch.manual_seed(seed)``.  The cache file is
    ``{task}_seed{seed}_{hash}.pt`` where the hash covers ``config``, ``num_classes``, the
    training set size and ``data_tag`` (which must also name the architecture when ``build``
    is given); a state dict that fails to load (older layout, truncated file) is retrained
    and overwritten.

    Returns:
        ``(model in eval mode, trained_now, path)``; ``path`` is "" without a cache.
    """
    if build is None:
        def build() -> nn.Module:
            return SmallResNet(num_classes, channels=config.channels)
    digest = config.digest({"task": task_name, "classes": num_classes, "n": int(x.shape[0]),
                            "data": data_tag})
    path = (os.path.join(cache_dir, f"{task_name}_seed{seed}_{digest}.pt")
            if cache_dir is not None else "")
    torch.manual_seed(seed)
    model = build()
    if path and os.path.exists(path):
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            model.eval()
            return model, False, path
        except Exception:  # any unreadable or mismatched file: train afresh and overwrite
            torch.manual_seed(seed)
            model = build()
    train_classifier(model, x, y, config, seed)
    if path:
        _atomic_save(model.state_dict(), path)
    model.eval()
    return model, True, path
