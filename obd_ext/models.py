"""Reference networks of the four families the curvature engine must reach.

Used by the tests and the benchmarks (and handy for users trying obd_ext):
an MLP, LeNet-5, a small ResNet with basic blocks (BatchNorm, skip
connections, adaptive average pooling), and a GPT-style transformer with the
output head tied to the token embedding; and the paper's own small
constrained network of scaled tanh units (:func:`constrained_net`), which the
digits demo (``obd-ext demo``) prunes.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["mlp", "LeNet5", "BasicBlock", "SmallResNet", "GPT", "ScaledTanh", "constrained_net"]


def mlp(sizes=(784, 1024, 1024, 10), act=nn.ReLU) -> nn.Sequential:
    """Fully connected layers of the given widths, ``act`` between them (none after the last)."""
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


class LeNet5(nn.Module):
    """LeNet-5 on 28x28 inputs (padding 2 on the first convolution)."""

    def __init__(self, classes: int = 10, act=nn.Tanh):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), act(), nn.AvgPool2d(2),
            nn.Conv2d(6, 16, 5), act(), nn.AvgPool2d(2), nn.Flatten(),
        )
        self.classifier = nn.Sequential(nn.Linear(400, 120), act(), nn.Linear(120, 84), act(), nn.Linear(84, classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short = None
        if stride != 1 or c_in != c_out:
            self.short = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.short is None else self.short(x)))


class SmallResNet(nn.Module):
    """ResNet-18-like: a stem, pairs of basic blocks per stage, pooling, a linear head."""

    def __init__(self, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), classes: int = 10, in_ch: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU())
        layers, c = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                layers.append(BasicBlock(c, w, 2 if (j == 0 and i > 0) else 1))
                c = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d // self.heads))
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        att = torch.softmax(att.masked_fill(causal, float("-inf")), dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """A GPT-style decoder; ``tied`` makes the output head the token embedding (eq. 5)."""

    def __init__(self, vocab: int = 8192, d: int = 512, layers: int = 4, heads: int = 8, seq: int = 256,
                 tied: bool = True):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = None if tied else nn.Linear(d, vocab, bias=False)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        x = self.ln(x)
        logits = x @ self.tok.weight.t() if self.head is None else self.head(x)
        return logits.reshape(-1, logits.shape[-1])  # (B*T, V) rows for cross-entropy


class ScaledTanh(nn.Module):
    """LeCun's symmetric sigmoid f(a) = 1.7159 tanh(2a/3): f(+-1) = +-1, range +-1.7159.

    With +-1 targets inside the range the MSE has a minimum at finite weights;
    with plain tanh the targets are its asymptotes and training drives units
    into saturation without end (see the demo's notes in the README).
    """

    A, S = 1.7159, 2.0 / 3.0

    def forward(self, x: Tensor) -> Tensor:
        return self.A * torch.tanh(self.S * x)


def constrained_net() -> nn.Sequential:
    """The digits demo's network (LeCun, Denker & Solla 1989, section 2.3, scaled down to 8x8 inputs).

    Two shared-weight convolutional layers and two full layers, :class:`ScaledTanh` throughout,
    3,290 parameters; input ``N x 1 x 8 x 8``, output ``N x 10``.
    """
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), ScaledTanh(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1), ScaledTanh(), nn.Flatten(),
        nn.Linear(8 * 4 * 4, 20), ScaledTanh(),
        nn.Linear(20, 10), ScaledTanh(),
    )
