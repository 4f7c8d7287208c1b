"""Checks a dataset directory with the trainer's own loader and prints its statistics.

    python -m data_prep.validate data/baby

DIR's basename is the dataset name and its parent the data_dir, exactly as the trainer resolves
``--data_dir``/``--dataset``; loading goes through ``lgmrec_jax.data.load_dataset`` (no synthetic
generation), so a directory that passes here loads in training. The table printed is the one
MMRec logs for the whole dataset and for each split (users, items, interactions, sparsity).
Exit status: 0 valid; 2 invalid or a usage error, with one ``error: ...`` line on stderr (for an
invalid directory, the loader's message).
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

from lgmrec_jax import data as data_lib

BLOCKS = (("all", None), ("train", "====Training===="), ("valid", "====Validation===="),
          ("test", "====Testing===="))


def format_block(name: str, block: dict) -> list[str]:
    """One MMRec RecDataset.__str__ block: counts, averages and sparsity over the block's own ids."""
    users, items, inters = block["users"], block["items"], block["interactions"]
    sparsity = 1.0 - inters / users / items if users and items else 1.0
    return [name,
            f"The number of users: {users}",
            f"Average actions of users: {inters / users if users else 0.0}",
            f"The number of items: {items}",
            f"Average actions of items: {inters / items if items else 0.0}",
            f"The number of inters: {inters}",
            f"The sparsity of the dataset: {sparsity * 100}%"]


def report(ds: data_lib.Dataset) -> str:
    """The statistics text for a loaded dataset."""
    stats = data_lib.statistics(ds)
    lines = [f"dataset {ds.name} at {ds.path}",
             f"n_users={stats['n_users']} n_items={stats['n_items']} (max id + 1 over all rows)"]
    for key, title in BLOCKS:
        lines += ([""] + [title] if title else []) + format_block(ds.name, stats[key])
    lines.append("")
    feats = stats["features"] or {"none": "no image_feat.npy or text_feat.npy"}
    lines += [f"features {k}: {v}" for k, v in feats.items()]
    if ds.n_cold_start_rows_dropped:
        lines.append(f"cold-start valid/test rows dropped: {ds.n_cold_start_rows_dropped}")
    if ds.n_duplicate_train_rows:
        lines.append(f"duplicate training rows: {ds.n_duplicate_train_rows}")
    return "\n".join(lines)


def validate(path: str) -> data_lib.Dataset:
    """Loads ``path`` as the trainer would; raises DatasetError when it is not a valid dataset."""
    path = os.path.abspath(path.rstrip("/\\") or path)
    return data_lib.load_dataset(os.path.dirname(path), os.path.basename(path), generate_synthetic=False)


USAGE = "usage: python -m data_prep.validate DATASET_DIR"


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) == 2 and argv[1] in ("-h", "--help", "--helpfull"):
        print(f"{USAGE}\n\n{__doc__.strip()}")
        return 0
    if len(argv) != 2:
        print(f"error: expected one DATASET_DIR argument, got {len(argv) - 1}; {USAGE}", file=sys.stderr)
        return 2
    try:
        ds = validate(argv[1])
    except data_lib.DatasetError as err:
        print("error: " + " ".join(str(err).split("\n")), file=sys.stderr)
        return 2
    print(report(ds))
    print("valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
