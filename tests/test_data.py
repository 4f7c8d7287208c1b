"""Dataset loading: counts, split and cold-start rule, features, and every bad-input message."""

import os
import pickle

import numpy as np
import pytest

from lgmrec_jax import data

HEADER = "userID\titemID\trating\ttimestamp\tx_label"
GOOD_ROWS = ["0\t0\t5\t1\t0", "0\t1\t4\t2\t0", "0\t2\t4\t3\t1", "1\t1\t3\t4\t0", "1\t3\t3\t5\t2",
             "2\t4\t3\t6\t1"]  # user 2 has no training row: its valid row is dropped


def write_dataset(root, name="toy", rows=GOOD_ROWS, header=HEADER, v=None, t=None, raw=None):
    path = os.path.join(root, name)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, f"{name}.inter"), "wb") as handle:
        handle.write(raw if raw is not None else ("\n".join([header] + rows) + "\n").encode())
    for fname, value in (("image_feat.npy", v), ("text_feat.npy", t)):
        if value is not None:
            np.save(os.path.join(path, fname), value)
    return str(root)


def test_counts_split_and_cold_start(tmp_path):
    root = write_dataset(tmp_path, v=np.ones((5, 3), np.float64), t=np.ones((5, 2), np.float32))
    ds = data.load_dataset(root, "toy")
    assert (ds.n_users, ds.n_items) == (3, 5)  # max id + 1 over all rows, before the split
    np.testing.assert_array_equal(ds.train, [[0, 0], [0, 1], [1, 1]])
    np.testing.assert_array_equal(ds.valid, [[0, 2]])
    np.testing.assert_array_equal(ds.test, [[1, 3]])
    assert ds.n_cold_start_rows_dropped == 1
    assert ds.v_feat.dtype == np.float32 and ds.modalities == ("v", "t")


def test_features_optional(tmp_path):
    ds = data.load_dataset(write_dataset(tmp_path, t=np.ones((5, 2))), "toy")
    assert ds.modalities == ("t",) and ds.v_feat is None


def test_windows_line_endings_and_bom(tmp_path):
    raw = ("\ufeff" + "\r\n".join([HEADER] + GOOD_ROWS) + "\r\n").encode("utf-8")
    ds = data.load_dataset(write_dataset(tmp_path, raw=raw), "toy")
    assert len(ds.train) == 3 and ds.n_items == 5


BAD_INTER = [
    ("missing column", {"header": "userID\titemID\trating"}, "toy.inter:1: header has no column x_label"),
    ("non-integer id", {"rows": GOOD_ROWS[:2] + ["0\tabc\t1\t1\t0"]}, "toy.inter:4: itemID is 'abc'"),
    ("float id", {"rows": GOOD_ROWS[:2] + ["1.5\t0\t1\t1\t0"]}, "toy.inter:4: userID is '1.5'"),
    ("negative id", {"rows": GOOD_ROWS[:2] + ["-1\t0\t1\t1\t0"]}, "toy.inter:4: userID is '-1'"),
    ("underscored id", {"rows": GOOD_ROWS[:2] + ["1_0\t0\t1\t1\t0"]}, "toy.inter:4: userID is '1_0'"),
    ("signed id", {"rows": GOOD_ROWS[:2] + ["+3\t0\t1\t1\t0"]}, "toy.inter:4: userID is '+3'"),
    ("non-ascii digit", {"rows": GOOD_ROWS[:2] + ["0\t\u0663\t1\t1\t0"]}, "toy.inter:4: itemID is '\u0663'"),
    ("huge id", {"rows": GOOD_ROWS[:2] + ["99999999999999999999\t0\t1\t1\t0"]}, "userID has a value outside the int64"),
    ("bad label", {"rows": GOOD_ROWS[:2] + ["0\t3\t1\t1\t3"]}, "toy.inter:4: x_label is 3, expected 0 (train)"),
    ("short row", {"rows": GOOD_ROWS[:2] + ["0\t3"]}, "toy.inter:4: 2 tab-separated fields, expected 5"),
    ("empty training split", {"rows": ["0\t0\t1\t1\t1", "0\t1\t1\t1\t2"]}, "no row has x_label 0"),
    ("no validation split", {"rows": ["0\t0\t1\t1\t0", "0\t1\t1\t1\t2"]}, "toy.inter: no row has x_label 1"),
    ("column twice", {"header": "userID\titemID\tuserID\tx_label"}, "toy.inter:1: header has the column userID 2 times"),
    ("header only", {"rows": []}, "header only, no interaction rows"),
    ("empty file", {"raw": b""}, "file is empty"),
    ("not utf-8", {"raw": b"\xff\xfe\x00garbage"}, "not UTF-8 text"),
]


@pytest.mark.parametrize("case,kwargs,message", BAD_INTER, ids=[c[0] for c in BAD_INTER])
def test_bad_interactions(tmp_path, case, kwargs, message):
    root = write_dataset(tmp_path, **kwargs)
    with pytest.raises(data.DatasetError) as err:
        data.load_dataset(root, "toy")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def bad_feature_cases():
    nan = np.ones((5, 3), np.float32)
    nan[2, 1] = np.nan
    inf = np.ones((5, 3))
    inf[4, 0] = np.inf
    huge = np.ones((5, 3))
    huge[1, 2] = 1e30
    return [
        ("wrong rows", np.ones((4, 3)), "image_feat.npy: 4 feature rows, expected 5"),
        ("1-D", np.ones(5), "is 1-D, expected 2-D"),
        ("empty", np.ones((5, 0)), "is empty, expected (5, D)"),
        ("nan", nan, "row 2 (item 2) has NaN or inf"),
        ("inf", inf, "row 4 (item 4) has NaN or inf"),
        ("overflowing", huge, "row 1 has a value of magnitude 1e+30"),
        ("strings", np.array([["a"] * 3] * 5), "expected a float array"),
    ]


@pytest.mark.parametrize("case,value,message", bad_feature_cases(), ids=[c[0] for c in bad_feature_cases()])
def test_bad_features(tmp_path, case, value, message):
    root = write_dataset(tmp_path, v=value)
    with pytest.raises(data.DatasetError) as err:
        data.load_dataset(root, "toy")
    assert message in str(err.value) and "image_feat.npy" in str(err.value)


def test_pickled_and_text_feature_files(tmp_path):
    root = write_dataset(tmp_path)
    target = os.path.join(root, "toy", "image_feat.npy")
    np.save(target, np.array([{"a": 1}] * 5, dtype=object), allow_pickle=True)
    with pytest.raises(data.DatasetError, match="holds pickled objects"):
        data.load_dataset(root, "toy")
    with open(target, "wb") as handle:
        pickle.dump(np.ones((5, 3)), handle)
    with pytest.raises(data.DatasetError, match=r"not a .npy array \(a pickle\)"):
        data.load_dataset(root, "toy")
    with open(target, "w") as handle:
        handle.write("1 2 3\n")
    with pytest.raises(data.DatasetError, match=r"not a .npy array \(no NumPy header\)"):
        data.load_dataset(root, "toy")


def test_missing_directory_and_file(tmp_path):
    with pytest.raises(data.DatasetError, match="dataset directory not found"):
        data.load_dataset(str(tmp_path), "absent")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(data.DatasetError, match=r"empty\.inter: interaction file not found"):
        data.load_dataset(str(tmp_path), "empty")


def test_all_zero_features_are_accepted(tmp_path):
    ds = data.load_dataset(write_dataset(tmp_path, v=np.zeros((5, 3))), "toy")
    assert not ds.v_feat.any()


def test_duplicates_kept_and_counted(tmp_path):
    ds = data.load_dataset(write_dataset(tmp_path, rows=GOOD_ROWS + ["0\t0\t5\t1\t0"]), "toy")
    assert ds.n_duplicate_train_rows == 1 and len(ds.train) == 4
