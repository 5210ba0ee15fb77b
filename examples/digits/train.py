"""Train the example model shipped in this folder: a small CNN for scikit-learn's 8x8 digits.

    pip install scikit-learn && python examples/digits/train.py [--data-only]

Writes digits_cnn.onnx (logits and predicted digit, dynamic batch), samples.npz (16 held-out
images under key "image", their labels under "label") and digits_data.npz: the split it trains on,
as the 8x8 pixel values 0..16 of scikit-learn's digits (an image is pixels / 16, as float32):
"train_pixels"/"train_label" (1500 images: calibration data for INT8 builds) and
"test_pixels"/"test_label" (297 held-out images). ``--data-only`` writes digits_data.npz alone,
the same split again (torch's seeded permutation), without training.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(64, 10))

    def forward(self, image: torch.Tensor):
        logits = self.head(self.features(image))
        return logits, logits.argmax(dim=1)


def main(data_only: bool = False) -> None:
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x))
    x, y = x[perm], y[perm]
    xtr, ytr, xte, yte = x[:1500], y[:1500], x[1500:], y[1500:]
    pixels = d.images[perm.numpy()].astype(np.uint8)[:, None]  # 0..16, the values x was made from
    np.savez_compressed(os.path.join(HERE, "digits_data.npz"), train_pixels=pixels[:1500],
                        train_label=ytr.numpy(), test_pixels=pixels[1500:], test_label=yte.numpy())
    if data_only:
        return
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(30):
        model.train()
        for i in range(0, len(xtr), 64):
            loss = nn.functional.cross_entropy(model(xtr[i:i + 64])[0], ytr[i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(xte)[1] == yte).float().mean().item()
    print(f"held-out accuracy: {acc:.3f} on {len(xte)} images")
    torch.onnx.export(model, (xte[:2],), os.path.join(HERE, "digits_cnn.onnx"), input_names=["image"],
                      output_names=["logits", "digit"], dynamic_axes={"image": {0: "batch"}},
                      opset_version=17, dynamo=False)
    np.savez(os.path.join(HERE, "samples.npz"), image=xte[:16].numpy(), label=yte[:16].numpy())


if __name__ == "__main__":
    main(data_only="--data-only" in sys.argv[1:])
