"""A small CNN trained on scikit-learn's 8x8 digits (seconds on 2 cores), exported to ONNX.

    python examples/digits_cnn.py            # trains, writes examples/digits_cnn.onnx + digit.npy

The model (conv-bn-relu x2, pool, dense) is the example model of the README and the
quantization/pruning benchmarks; the checked-in ONNX file was made by this script.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def load_digits_split(seed: int = 0):
    """(x_train, y_train, x_test, y_test): float32 NCHW [N,1,8,8] scaled to [0,1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(x))
    cut = int(0.8 * len(x))
    return x[idx[:cut]], y[idx[:cut]], x[idx[cut:]], y[idx[cut:]]


def make_model(width: int = 16):
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * 16, 64), nn.ReLU(),
        nn.Linear(64, 10),
    )


def train(model, x, y, epochs: int = 15, seed: int = 0, lr: float = 3e-3):
    import torch

    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            b = perm[i:i + 64]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xt[b]), yt[b])
            loss.backward()
            opt.step()
    model.eval()
    return model


def accuracy(predict, x, y) -> float:
    """Top-1 accuracy of ``predict(batch_of_one) -> logits`` over (x, y)."""
    hits = sum(int(np.argmax(predict(x[i:i + 1])) == y[i]) for i in range(len(x)))
    return hits / len(x)


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", default=str(HERE / "digits_cnn.onnx"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    xtr, ytr, xte, yte = load_digits_split()
    model = train(make_model(), xtr, ytr)
    with torch.no_grad():
        acc = accuracy(lambda b: model(torch.from_numpy(b)).numpy(), xte, yte)
    print(f"test top-1: {acc:.4f}")
    torch.onnx.export(model, (torch.from_numpy(xte[:1]),), args.o, input_names=["image"],
                      output_names=["logits"], opset_version=17, dynamo=False)
    import onnx

    m = onnx.load(args.o)
    m.ir_version = 8
    onnx.save(m, args.o)
    np.save(HERE / "digit.npy", xte[:1])
    print(f"wrote {args.o} and {HERE / 'digit.npy'} (label {yte[0]})")


if __name__ == "__main__":
    main()
