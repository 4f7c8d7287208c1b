"""Hostile datasets: MMRec directories that the loader (lgmrec_jax/data.py) must refuse, each with the
text its one-line DatasetError holds, and a valid but awkward copy of synthetic_tiny.

The cases are the contract of data.py's validation written as data; tests/test_reliability.py runs
each through the command line, and experiments/reliability.py counts them among its trials. No run
imports this module.
"""

from __future__ import annotations

import os
import pickle
import shutil
from typing import Callable, Optional

import numpy as np

HEADER = "userID\titemID\trating\ttimestamp\tx_label"
ROWS = ["0\t0\t5\t1\t0", "0\t1\t4\t2\t0", "0\t2\t4\t3\t1", "1\t1\t3\t4\t0", "1\t3\t3\t5\t2", "2\t4\t3\t6\t1"]


def write_toy(root: str, rows=ROWS, header=HEADER, raw: Optional[bytes] = None, v=None, t=None) -> str:
    """Writes <root>/toy/toy.inter (and feature files); returns the dataset name."""
    path = os.path.join(root, "toy")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "toy.inter"), "wb") as handle:
        handle.write(raw if raw is not None else ("\n".join([header] + list(rows)) + "\n").encode())
    for name, value in (("image_feat.npy", v), ("text_feat.npy", t)):
        if value is not None:
            np.save(os.path.join(path, name), value)
    return "toy"


def _with_file(name: str, content: Callable[[str], None]) -> Callable[[str], str]:
    def write(root: str) -> str:
        write_toy(root)
        content(os.path.join(root, "toy", name))
        return "toy"
    return write


def _features(value) -> Callable[[str], str]:
    return lambda root: write_toy(root, v=value)


def _one(shape, row, col, value):
    array = np.ones(shape)
    array[row, col] = value
    return array


def _pickle(path):
    with open(path, "wb") as handle:
        pickle.dump(np.ones((5, 3)), handle)


def _text(path):
    with open(path, "w") as handle:
        handle.write("0.1 0.2 0.3\n" * 5)


def _object_array(path):
    np.save(path, np.array([{"a": 1}] * 5, dtype=object), allow_pickle=True)


def _truncated_npy(path):
    np.save(path, np.ones((5, 3)))
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) - 20)


# (case, write(root) -> dataset name, text the one error line must hold)
HOSTILE = [
    ("missing column", lambda r: write_toy(r, header="userID\titemID\trating"), "toy.inter:1: header has no column x_label"),
    ("non-integer id", lambda r: write_toy(r, rows=ROWS[:2] + ["0\tabc\t1\t1\t0"]), "toy.inter:4: itemID is 'abc'"),
    ("float id", lambda r: write_toy(r, rows=ROWS[:2] + ["1.5\t0\t1\t1\t0"]), "toy.inter:4: userID is '1.5'"),
    ("negative id", lambda r: write_toy(r, rows=ROWS[:2] + ["-1\t0\t1\t1\t0"]), "toy.inter:4: userID is '-1'"),
    ("bad label", lambda r: write_toy(r, rows=ROWS[:2] + ["0\t3\t1\t1\t3"]), "toy.inter:4: x_label is 3"),
    ("short row", lambda r: write_toy(r, rows=ROWS[:2] + ["0\t3"]), "toy.inter:4: 2 tab-separated fields, expected 5"),
    ("no training rows", lambda r: write_toy(r, rows=["0\t0\t1\t1\t1", "0\t1\t1\t1\t2"]), "no row has x_label 0"),
    ("header only", lambda r: write_toy(r, rows=[]), "toy.inter: header only, no interaction rows"),
    ("empty file", lambda r: write_toy(r, raw=b""), "toy.inter: file is empty"),
    ("not UTF-8", lambda r: write_toy(r, raw=b"\xff\xfe\x00garbage"), "toy.inter: not UTF-8 text"),
    ("huge id", lambda r: write_toy(r, rows=ROWS + ["10000000000\t1\t1\t1\t0"]), "toy.inter: userID 10000000000 exceeds"),
    ("sparse ids", lambda r: write_toy(r, rows=ROWS + ["0\t50000000\t1\t1\t0"]),
     "toy.inter: itemID goes up to 50000000 but only 6 distinct ids occur"),
    ("ids beyond feature rows", lambda r: write_toy(r, rows=ROWS + ["1\t7\t1\t1\t0"], v=np.ones((5, 3))),
     "image_feat.npy: 5 feature rows, expected 8 (one per item id 0..7)"),
    ("features 1-D", _features(np.ones(5)), "image_feat.npy: shape (5,) is 1-D, expected 2-D"),
    ("features empty", _features(np.ones((5, 0))), "image_feat.npy: shape (5, 0) is empty"),
    ("features NaN", _features(_one((5, 3), 2, 1, np.nan)), "image_feat.npy: row 2 (item 2) has NaN or inf"),
    ("features inf", _features(_one((5, 3), 4, 0, np.inf)), "image_feat.npy: row 4 (item 4) has NaN or inf"),
    ("features 1e30", _features(_one((5, 3), 1, 2, 1e30)), "image_feat.npy: row 1 has a value of magnitude 1e+30"),
    ("features strings", _features(np.array([["a"] * 3] * 5)), "image_feat.npy: dtype <U1, expected a float array"),
    ("features pickle", _with_file("text_feat.npy", _pickle), "text_feat.npy: not a .npy array (a pickle)"),
    ("features object array", _with_file("image_feat.npy", _object_array), "image_feat.npy: holds pickled objects"),
    ("features text", _with_file("image_feat.npy", _text), "image_feat.npy: not a .npy array (no NumPy header)"),
    ("features truncated", _with_file("image_feat.npy", _truncated_npy), "image_feat.npy: not a readable .npy array"),
    ("features directory", _with_file("image_feat.npy", os.makedirs), "image_feat.npy: cannot be read (Is a directory)"),
    ("missing .inter", lambda r: (os.makedirs(os.path.join(r, "toy")), "toy")[1], "toy.inter: interaction file not found"),
    ("missing directory", lambda r: "absent", "absent: dataset directory not found"),
]


def hostile_copy(synthetic_dir: str, root: str, duplicates: int = 0, zero_image: bool = False) -> str:
    """synthetic_tiny rewritten with a UTF-8 BOM and Windows line endings (plus duplicate training rows,
    all-zero image features) as <root>/synthetic_tiny, so the CLI picks the same config; returns root."""
    src, dst = os.path.join(synthetic_dir, "synthetic_tiny"), os.path.join(root, "synthetic_tiny")
    os.makedirs(dst)
    with open(os.path.join(src, "synthetic_tiny.inter")) as handle:
        lines = handle.read().splitlines()
    lines += [line for line in lines[1:] if line.endswith("\t0")][:duplicates]
    with open(os.path.join(dst, "synthetic_tiny.inter"), "wb") as handle:
        handle.write(("\ufeff" + "\r\n".join(lines) + "\r\n").encode("utf-8"))
    image = np.load(os.path.join(src, "image_feat.npy"))
    np.save(os.path.join(dst, "image_feat.npy"), np.zeros_like(image) if zero_image else image)
    shutil.copy(os.path.join(src, "text_feat.npy"), os.path.join(dst, "text_feat.npy"))
    return root
