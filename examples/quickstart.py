"""Prune a small digit classifier with OBD saliency, and compare with magnitude.

Trains a 64-32-10 tanh MLP on scikit-learn's bundled 8x8 digits (no download),
estimates the diagonal curvature as the empirical Fisher (the sum over samples
of squared per-sample gradients, via torch.func), and deletes the weights of
lowest saliency s = h w^2 / 2 over the whole model at once with
obd_ext.prune_global_. Magnitude pruning is the same call with h = 1.

Run: python examples/quickstart.py [--sparsity 0.7] [--seed 0]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn
from torch.func import functional_call, grad, vmap

import obd_ext


def load_digits_split(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, stratify=y, random_state=seed)
    return xtr, ytr, xte, yte


def train(model, x, y, epochs=60):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        for i in range(0, len(x), 128):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 128]), y[i:i + 128]).backward()
            opt.step()


def fisher_diagonal(model, x, y):
    """Sum over samples of squared per-sample gradients, one tensor per parameter."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return nn.functional.cross_entropy(functional_call(model, p, (xi[None],)), yi[None], reduction="sum")

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return {k: (g * g).sum(0) for k, g in per_sample.items()}


@torch.no_grad()
def evaluate(model, x, y):
    out = model(x)
    return nn.functional.cross_entropy(out, y).item(), (out.argmax(1) == y).float().mean().item()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sparsity", type=float, default=0.7, help="fraction of weights to delete")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    obd_ext.check_sparsity(args.sparsity)
    torch.manual_seed(args.seed)
    xtr, ytr, xte, yte = load_digits_split(args.seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    train(model, xtr, ytr)
    base_loss, base_acc = evaluate(model, xtr, ytr)
    _, base_test = evaluate(model, xte, yte)
    h = fisher_diagonal(model, xtr, ytr)
    names = [n for n, _ in model.named_parameters() if n.endswith("weight")]
    print(f"dense: train loss {base_loss:.4f}, train acc {base_acc:.3f}, test acc {base_test:.3f}")
    print(f"pruning {args.sparsity:.0%} of {sum(model.get_parameter(n).numel() for n in names)} weights globally")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for criterion in ("obd", "magnitude"):
        model.load_state_dict(state)
        weights = [model.get_parameter(n) for n in names]
        curv = [h[n] if criterion == "obd" else torch.ones_like(h[n]) for n in names]
        sel = obd_ext.prune_global_(weights, curv, sparsity=args.sparsity, names=names)
        loss, acc = evaluate(model, xtr, ytr)
        _, test = evaluate(model, xte, yte)
        per_layer = ", ".join(f"{n}: {int((~m).sum())}/{m.numel()}" for n, m in zip(names, sel.masks))
        # The Fisher is summed over samples and the loss is a mean: divide by N.
        predicted = f", OBD predicted +{sel.predicted_increase / len(xtr):.4f}" if criterion == "obd" else ""
        print(f"{criterion:>9}: train loss {loss:.4f} (+{loss - base_loss:.4f}{predicted}), "
              f"train acc {acc:.3f}, test acc {test:.3f}; deleted {per_layer}")


if __name__ == "__main__":
    main()
