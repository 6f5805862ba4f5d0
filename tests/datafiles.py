"""Small data files the tests write themselves: MNIST-format IDX files, CSV tables, image folders."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import torch


def write_idx(raw: Path, prefix: str, n: int, seed: int, gz: bool = False) -> None:
    """Write an IDX image file (magic 2051) and label file (magic 2049), big-endian as in MNIST."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.arange(n, dtype=torch.uint8) % 10
    files = {
        f"{prefix}-images-idx3-ubyte": struct.pack(">IIII", 2051, n, 28, 28) + images.numpy().tobytes(),
        f"{prefix}-labels-idx1-ubyte": struct.pack(">II", 2049, n) + labels.numpy().tobytes(),
    }
    raw.mkdir(parents=True, exist_ok=True)
    for name, payload in files.items():
        if gz:
            (raw / f"{name}.gz").write_bytes(gzip.compress(payload))
        else:
            (raw / name).write_bytes(payload)


def make_mnist(root: Path, folder: str = "MNIST", gz: bool = False) -> Path:
    write_idx(root / folder / "raw", "train", 20, seed=1, gz=gz)
    write_idx(root / folder / "raw", "t10k", 10, seed=2, gz=gz)
    return root


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text.strip() + "\n")
    return path


def make_image_folder(root: Path, per_class: int = 3) -> Path:
    from PIL import Image

    for c, (name, color) in enumerate({"cat": (255, 0, 0), "dog": (0, 0, 255)}.items()):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            size = (10 + i, 12)  # different sizes: Resize must make them equal
            Image.new("RGB", size, color=tuple(v // (i + 1) for v in color)).save(root / name / f"{c}{i}.png")
    return root
