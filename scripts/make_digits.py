"""Build src/trainer/assets/digits.npz from scikit-learn's copy of the UCI optical digits.

Run once (scikit-learn needed only here, never at runtime):

    python scripts/make_digits.py

The output holds `images` (1797, 8, 8) uint8 with values 0..16 and `labels` (1797,) uint8 with
values 0..9, exactly as in `sklearn/datasets/data/digits.csv.gz` (64 pixel columns, then the label).
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np
import sklearn.datasets

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "trainer" / "assets" / "digits.npz"


def load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 8, 8) and labels (N,) as uint8, read from the CSV that scikit-learn ships."""
    source = Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz"
    with gzip.open(source, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    images, labels = table[:, :64], table[:, 64]
    assert images.min() >= 0 and images.max() <= 16 and set(np.unique(labels)) == set(range(10))
    return images.reshape(-1, 8, 8).astype(np.uint8), labels.astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output file (default: {DEFAULT_OUT})")
    out = parser.parse_args().out
    images, labels = load_sklearn_digits()
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, images=images, labels=labels)
    print(f"wrote {out}: {len(images)} images {images.shape[1:]}, {out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
