"""data_prep.validate: the trainer's own checks on a dataset directory, the reference's table."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from data_prep import amazon, validate


def write_inter(directory, name, rows, header="userID\titemID\trating\ttimestamp\tx_label"):
    directory.mkdir(parents=True, exist_ok=True)
    lines = [header] + ["\t".join(str(v) for v in row) for row in rows]
    (directory / f"{name}.inter").write_text("\n".join(lines) + "\n")


def small_rows():
    """3 users x 4 items; per user 2 train, 1 valid, 1 test."""
    rows = []
    for u in range(3):
        for j, label in enumerate((0, 0, 1, 2)):
            rows.append((u, (u + j) % 4, 5.0, 1000 + j, label))
    return rows


def cli(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([sys.executable, "-m", "data_prep.validate", *map(str, args)],
                          capture_output=True, text=True, env=env)


def test_valid_directory_prints_the_reference_table(tmp_path, capsys):
    write_inter(tmp_path / "tiny", "tiny", small_rows())
    np.save(tmp_path / "tiny" / "text_feat.npy", np.eye(4, 6, dtype=np.float32))
    assert validate.main(["validate", str(tmp_path / "tiny") + "/"]) == 0
    out = capsys.readouterr().out
    blocks = out.split("\n\n")
    assert blocks[0].splitlines()[2:] == [
        "tiny", "The number of users: 3", "Average actions of users: 4.0", "The number of items: 4",
        "Average actions of items: 3.0", "The number of inters: 12", "The sparsity of the dataset: 0.0%"]
    assert blocks[1].splitlines() == [
        "====Training====", "tiny", "The number of users: 3", "Average actions of users: 2.0",
        "The number of items: 4", "Average actions of items: 1.5", "The number of inters: 6",
        "The sparsity of the dataset: 50.0%"]
    assert blocks[2].startswith("====Validation====\ntiny\nThe number of users: 3\n")
    assert "The number of inters: 3\n" in blocks[3] and blocks[3].startswith("====Testing====")
    assert "n_users=3 n_items=4" in out and "features text: [4, 6]" in out and out.endswith("valid\n")


def test_prepared_amazon_dataset_validates(tmp_path, capsys):
    rng = np.random.default_rng(1)
    lines = [f"A{u:03d},B{i:09d},{1 + (u + i) % 5}.0,{1_400_000_000 + 17 * u + i}"
             for u in range(40) for i in range(15) if rng.random() < 0.6]
    (tmp_path / "ratings.csv").write_text("\n".join(lines) + "\n")
    card = amazon.prepare(amazon.Options(out=str(tmp_path / "data" / "mini"), ratings=str(tmp_path / "ratings.csv")))
    assert validate.main(["validate", str(tmp_path / "data" / "mini")]) == 0
    out = capsys.readouterr().out
    after = card["after_filtering"]
    assert f"The number of users: {after['users']}\n" in out and f"The number of inters: {after['interactions']}\n" in out
    train = out.split("====Training====")[1]
    assert f"The number of inters: {card['split']['train']}\n" in train
    assert "features none" in out


@pytest.mark.parametrize("breakage, message", [
    ("x_label", r"mini\.inter:3: x_label is 7, expected 0 \(train\), 1 \(valid\) or 2 \(test\)"),
    ("header", r"mini\.inter:1: header has no column x_label"),
    ("features", r"image_feat\.npy: 3 feature rows, expected 4"),
    ("missing", r"dataset directory not found"),
])
def test_invalid_directory_exits_2_with_one_line(tmp_path, capsys, breakage, message):
    rows = small_rows()
    header = "userID\titemID\trating\ttimestamp\tx_label"
    if breakage == "x_label":
        rows[1] = rows[1][:4] + (7,)
    if breakage == "header":
        header = "userID\titemID\trating\ttimestamp\tlabel"
    if breakage != "missing":
        write_inter(tmp_path / "mini", "mini", rows, header)
    if breakage == "features":
        np.save(tmp_path / "mini" / "image_feat.npy", np.ones((3, 5), dtype=np.float32))
    assert validate.main(["validate", str(tmp_path / "mini")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err
    assert lines[0].startswith("error: ") and re.search(message, lines[0]), lines[0]


def test_command_line_exit_codes(tmp_path):
    write_inter(tmp_path / "good", "good", small_rows())
    proc = cli(tmp_path / "good")
    assert proc.returncode == 0 and "The number of inters: 12" in proc.stdout, proc.stderr
    write_inter(tmp_path / "bad", "bad", [(0, "x", 1.0, 1, 0)])
    proc = cli(tmp_path / "bad")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == f"error: {tmp_path / 'bad' / 'bad.inter'}:2: itemID is 'x', expected a non-negative integer"
    for args in ((), (tmp_path / "good", tmp_path / "bad")):  # usage errors: one line, exit 2
        proc = cli(*args)
        assert proc.returncode == 2 and proc.stdout == "", proc.stderr
        assert proc.stderr.strip().splitlines() == [
            f"error: expected one DATASET_DIR argument, got {len(args)}; usage: python -m data_prep.validate DATASET_DIR"]
    proc = cli("--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python -m data_prep.validate DATASET_DIR")
