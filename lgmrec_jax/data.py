"""MMRec-format datasets: read, validate and split (SPEC §1).

A dataset is a directory ``<data_dir>/<name>/`` holding ``<name>.inter`` (tab-separated with a
header; ``userID``, ``itemID`` and ``x_label`` are read, other columns ignored) and optionally
``image_feat.npy`` / ``text_feat.npy`` (row r = item r, any float dtype, cast to float32).

Every problem with the input raises :class:`DatasetError` with one line naming the file, the line
or row, what was found and what was expected. Nothing here touches a device.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
from typing import Optional

import numpy as np

INTER_COLUMNS = ("userID", "itemID", "x_label")
FEATURE_FILES = {"v": "image_feat.npy", "t": "text_feat.npy"}
# Magnitude above which float32 overflows in the squared row norms of the projected features
# (|x| * |W| * D, squared); such files are rejected rather than trained into NaNs.
MAX_ABS_FEATURE = 1e15
# Ids index int32 arrays on the device, and every id up to the largest gets an embedding row: ids must
# fit int32, and a largest id far beyond the number of distinct ids (not 0..n-1 as MMRec expects) is
# rejected rather than allocated (1e12 ids would need terabytes).
MAX_ID = 2**31 - 2
MAX_ID_SPREAD = (100, 1_000_000)  # largest id + 1 may be at most 100 * distinct ids + 1e6


class DatasetError(ValueError):
    """Bad dataset input; the message is one self-contained line."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A loaded dataset; interaction arrays are (rows, 2) int64 [user, item] in file order."""

    name: str
    path: str
    n_users: int
    n_items: int
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    v_feat: Optional[np.ndarray]
    t_feat: Optional[np.ndarray]
    n_duplicate_train_rows: int = 0
    n_cold_start_rows_dropped: int = 0

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m, f in (("v", self.v_feat), ("t", self.t_feat)) if f is not None)

    def files(self) -> list[str]:
        names = [f"{self.name}.inter"] + [FEATURE_FILES[m] for m in self.modalities]
        return [os.path.join(self.path, n) for n in names]

    def checksums(self) -> dict[str, str]:
        return {os.path.basename(p): sha256_file(p) for p in self.files()}


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_inter(path: str) -> np.ndarray:
    """Reads the userID, itemID, x_label columns of a .inter file as an (n, 3) int64 array."""
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: interaction file not found (expected a tab-separated .inter file)")
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as err:
        raise DatasetError(f"{path}: cannot be read ({err.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")  # tolerates a UTF-8 byte-order mark
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: not UTF-8 text (byte {err.start}); expected a tab-separated .inter file") from None
    lines = text.splitlines()  # handles \n, \r\n and \r line endings alike
    if not lines or not lines[0].strip():
        raise DatasetError(f"{path}: file is empty; expected a header line with columns {', '.join(INTER_COLUMNS)}")
    header = [h.strip() for h in lines[0].split("\t")]
    missing = [c for c in INTER_COLUMNS if c not in header]
    if missing:
        raise DatasetError(
            f"{path}:1: header has no column {', '.join(missing)} (found {header!r}; expected tab-separated "
            f"columns including {', '.join(INTER_COLUMNS)})")
    twice = [c for c in INTER_COLUMNS if header.count(c) > 1]
    if twice:
        raise DatasetError(f"{path}:1: header has the column {twice[0]} {header.count(twice[0])} times, expected once")
    cols = [header.index(c) for c in INTER_COLUMNS]
    n_fields = len(header)
    body = lines[1:]
    while body and not body[-1].strip():
        body.pop()
    if not body:
        raise DatasetError(f"{path}: header only, no interaction rows")
    rows = [line.split("\t") for line in body]
    for lineno, fields in enumerate(rows, start=2):
        if len(fields) != n_fields:
            raise DatasetError(
                f"{path}:{lineno}: {len(fields)} tab-separated fields, expected {n_fields} as in the header")
    table = np.empty((len(rows), 3), dtype=np.int64)
    for j, (name, col) in enumerate(zip(INTER_COLUMNS, cols)):
        values = [fields[col] for fields in rows]
        # ASCII digits only: Python's int() would also read "1_0" as 10, "+3", or other scripts' digits.
        for lineno, value in enumerate(values, start=2):
            if not _DIGITS.fullmatch(value):
                raise DatasetError(f"{path}:{lineno}: {name} is {value.strip()!r}, expected a non-negative integer")
        try:
            table[:, j] = np.asarray(values, dtype=np.int64)
        except OverflowError:
            raise DatasetError(f"{path}: {name} has a value outside the int64 range") from None
    bad = np.flatnonzero((table[:, 2] < 0) | (table[:, 2] > 2))
    if bad.size:
        raise DatasetError(
            f"{path}:{bad[0] + 2}: x_label is {table[bad[0], 2]}, expected 0 (train), 1 (valid) or 2 (test)")
    return table


_DIGITS = re.compile(r"\s*[0-9]+\s*")


def read_features(path: str, n_items: int) -> Optional[np.ndarray]:
    """Loads an (n_items, D) feature file as float32, or None when the file is absent."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as handle:
            magic = handle.read(6)
    except OSError as err:
        raise DatasetError(f"{path}: cannot be read ({err.strerror}); expected a .npy file") from None
    if magic != b"\x93NUMPY":
        kind = "a pickle" if magic[:1] == b"\x80" else "no NumPy header"
        raise DatasetError(f"{path}: not a .npy array ({kind}); expected np.save output of a 2-D float array")
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as err:
        if "pickle" in str(err):
            raise DatasetError(f"{path}: holds pickled objects, expected a plain numeric .npy array") from None
        raise DatasetError(f"{path}: not a readable .npy array ({err})") from None
    except (OSError, EOFError) as err:
        raise DatasetError(f"{path}: not a readable .npy array ({err})") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiu":
        raise DatasetError(f"{path}: dtype {getattr(array, 'dtype', type(array))}, expected a float array")
    if array.ndim != 2:
        raise DatasetError(f"{path}: shape {array.shape} is {array.ndim}-D, expected 2-D (items, features)")
    if array.size == 0:
        raise DatasetError(f"{path}: shape {array.shape} is empty, expected ({n_items}, D) with D > 0")
    if array.shape[0] != n_items:
        raise DatasetError(
            f"{path}: {array.shape[0]} feature rows, expected {n_items} (one per item id 0..{n_items - 1})")
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise DatasetError(f"{path}: row {row} (item {row}) has NaN or inf values, expected finite numbers")
    too_big = np.abs(array).max(axis=1) > MAX_ABS_FEATURE
    if too_big.any():
        row = int(np.flatnonzero(too_big)[0])
        raise DatasetError(
            f"{path}: row {row} has a value of magnitude {np.abs(array[row]).max():.3g}, expected at most "
            f"{MAX_ABS_FEATURE:g} (larger values overflow float32 in the model)")
    return np.ascontiguousarray(array, dtype=np.float32)


def check_id_range(path: str, table: np.ndarray) -> None:
    for j, name in enumerate(INTER_COLUMNS[:2]):
        largest = int(table[:, j].max())
        if largest > MAX_ID:
            raise DatasetError(f"{path}: {name} {largest} exceeds {MAX_ID}, expected ids 0..n-1 (remap them)")
        distinct = len(np.unique(table[:, j]))
        if largest + 1 > MAX_ID_SPREAD[0] * distinct + MAX_ID_SPREAD[1]:
            raise DatasetError(f"{path}: {name} goes up to {largest} but only {distinct} distinct ids occur; "
                               f"expected ids 0..n-1 (every id up to the largest gets an embedding row; remap them)")


def split(table: np.ndarray):
    """Splits by x_label and drops valid/test rows of users with no training row (SPEC §1.4)."""
    pairs = [table[table[:, 2] == label][:, :2].copy() for label in range(3)]
    train = pairs[0]
    has_train = np.zeros(int(table[:, 0].max()) + 1, dtype=bool)
    has_train[train[:, 0]] = True
    dropped = 0
    for k in (1, 2):
        keep = has_train[pairs[k][:, 0]]
        dropped += int((~keep).sum())
        pairs[k] = pairs[k][keep]
    return pairs[0], pairs[1], pairs[2], dropped


def dataset_dir(data_dir: str, name: str) -> str:
    return os.path.abspath(os.path.join(data_dir, name))


def load_dataset(data_dir: str, name: str, generate_synthetic: bool = True) -> Dataset:
    """Loads ``<data_dir>/<name>``; ``synthetic*`` datasets are generated there on first use."""
    path = dataset_dir(data_dir, name)
    if generate_synthetic and name.startswith("synthetic") and not os.path.isfile(os.path.join(path, f"{name}.inter")):
        from lgmrec_jax import synthetic  # imported on first use: most runs read a dataset from disk

        try:
            synthetic.generate_named(name, data_dir)
        except ValueError as err:  # an unknown preset
            raise DatasetError(f"--dataset={name}: {err}") from None
        except OSError as err:
            raise DatasetError(f"{err.filename or data_dir}: cannot generate the dataset there "
                               f"({err.strerror}); choose another --data_dir") from None
    if not os.path.isdir(path):
        raise DatasetError(
            f"{path}: dataset directory not found (expected {name}/{name}.inter under --data_dir={data_dir})")
    inter_path = os.path.join(path, f"{name}.inter")
    table = read_inter(inter_path)
    check_id_range(inter_path, table)
    n_users = int(table[:, 0].max()) + 1  # SPEC §1.3: over all rows, before the split
    n_items = int(table[:, 1].max()) + 1
    train, valid, test, dropped = split(table)
    if len(train) == 0:
        raise DatasetError(f"{inter_path}: no row has x_label 0, expected a non-empty training split")
    if len(valid) == 0:
        raise DatasetError(f"{inter_path}: no row has x_label 1, expected a validation split (early stopping "
                           f"and the best epoch are chosen on it)")
    feats = {m: read_features(os.path.join(path, f), n_items) for m, f in FEATURE_FILES.items()}
    keys = train[:, 0] * n_items + train[:, 1]
    n_dup = len(keys) - len(np.unique(keys))
    if n_dup:
        logging.warning("%s: %d duplicate training rows kept; as in the reference, R counts them and the "
                        "normalised adjacency does not (SPEC §3.8 Q6)", inter_path, n_dup)
    return Dataset(name=name, path=path, n_users=n_users, n_items=n_items, train=train, valid=valid,
                   test=test, v_feat=feats["v"], t_feat=feats["t"], n_duplicate_train_rows=n_dup,
                   n_cold_start_rows_dropped=dropped)


def from_arrays(train, valid, test, n_users, n_items, v_feat=None, t_feat=None, name="arrays") -> Dataset:
    """A Dataset from in-memory pairs (goldens, tests); no cold-start filtering is applied."""
    as_pairs = lambda a: np.asarray(a, dtype=np.int64).reshape(-1, 2)
    as_feat = lambda f: None if f is None else np.asarray(f, dtype=np.float32)
    return Dataset(name=name, path="", n_users=int(n_users), n_items=int(n_items), train=as_pairs(train),
                   valid=as_pairs(valid), test=as_pairs(test), v_feat=as_feat(v_feat), t_feat=as_feat(t_feat))


def statistics(ds: Dataset) -> dict:
    """The statistics table the reference prints (SPEC §1.7)."""
    def block(pairs):
        n_u, n_i = len(np.unique(pairs[:, 0])), len(np.unique(pairs[:, 1]))
        sparsity = 1.0 - len(pairs) / (n_u * n_i) if n_u and n_i else 1.0
        return {"users": n_u, "items": n_i, "interactions": int(len(pairs)), "sparsity": sparsity}

    all_pairs = np.concatenate([ds.train, ds.valid, ds.test])
    total = block(all_pairs)
    total["sparsity"] = 1.0 - len(all_pairs) / (ds.n_users * ds.n_items)
    return {"n_users": ds.n_users, "n_items": ds.n_items, "all": total, "train": block(ds.train),
            "valid": block(ds.valid), "test": block(ds.test),
            "features": {m: list(f.shape) for m, f in (("image", ds.v_feat), ("text", ds.t_feat)) if f is not None}}
