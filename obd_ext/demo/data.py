"""The demo's data: scikit-learn's bundled 8x8 digits (no download), split per seed, with +-1 targets."""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

__all__ = ["Split", "load_data"]

# (images N x 1 x 8 x 8 in [0, 1], targets N x 10 of +-1, labels N)
Split = Tuple[Tensor, Tensor, Tensor]


def load_data(seed: int) -> Tuple[Split, Split]:
    """sklearn's 1797 8x8 digits, a stratified 70/30 split fixed by ``seed``, +-1 targets.

    The targets are +1 for the true class and -1 elsewhere: inside the range of the network's
    scaled tanh (:class:`obd_ext.models.ScaledTanh`), so the MSE has a minimum at finite weights.

    Returns:
        ``(train, test)``, each ``(images, targets, labels)``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, stratify=y, random_state=seed)

    def prep(a, b) -> Split:
        xt = torch.tensor(a / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
        t = -torch.ones(len(b), 10)
        t[torch.arange(len(b)), torch.tensor(b)] = 1.0
        return xt, t, torch.tensor(b)

    return prep(xtr, ytr), prep(xte, yte)
