"""The built-in synthetic datasets: deterministic, the preset's shapes, MMRec's split rule."""

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from lgmrec_jax import synthetic
from lgmrec_jax import data


def digest(directory):
    h = hashlib.sha256()
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as handle:
            h.update(name.encode() + handle.read())
    return h.hexdigest()


def test_deterministic_and_shaped(tmp_path):
    a = synthetic.generate_named("synthetic_tiny", str(tmp_path / "a"))
    b = synthetic.generate_named("synthetic_tiny", str(tmp_path / "b"))
    assert digest(a) == digest(b)
    preset = synthetic.PRESETS["tiny"]
    ds = data.load_dataset(str(tmp_path / "a"), "synthetic_tiny")
    assert (ds.n_users, ds.n_items) == (preset.n_users, preset.n_items)
    assert len(ds.train) + len(ds.valid) + len(ds.test) == preset.n_interactions
    assert ds.v_feat.shape == (preset.n_items, preset.image_dim)
    assert ds.t_feat.shape == (preset.n_items, preset.text_dim)
    np.testing.assert_allclose(np.linalg.norm(ds.t_feat, axis=1), 1.0, rtol=1e-5)
    assert (ds.v_feat >= 0).all()


def test_real_presets_match_benchmark_counts():
    counts = {k: (p.n_users, p.n_items, p.n_interactions) for k, p in synthetic.PRESETS.items()}
    assert counts["baby"] == (19445, 7050, 160792)
    assert counts["sports"] == (35598, 18357, 296337)
    assert counts["clothing"] == (39387, 23033, 278677)
    assert all(synthetic.PRESETS[p].image_dim == 4096 and synthetic.PRESETS[p].text_dim == 384
               for p in ("baby", "sports", "clothing"))


def test_split_rule_per_user():
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(4), [5, 9, 10, 23])
    labels = synthetic.mmrec_split_labels(rng, users)
    counts = {u: np.bincount(labels[users == u], minlength=3).tolist() for u in range(4)}
    assert counts == {0: [3, 1, 1], 1: [7, 1, 1], 2: [8, 1, 1], 3: [19, 2, 2]}


def test_rows_per_user_sum_exactly():
    counts = synthetic.rows_per_user(np.random.default_rng(1), 100, 1234, cap=40)
    assert counts.sum() == 1234 and counts.min() >= 5 and counts.max() <= 40


def test_features_carry_the_interaction_signal(tmp_path):
    """Items co-consumed by users are closer in text-feature space than random item pairs."""
    ds = data.load_dataset(str(tmp_path), "synthetic")
    t = ds.t_feat
    pairs = ds.train[np.argsort(ds.train[:, 0], kind="stable")]
    same_user = pairs[:-1, 0] == pairs[1:, 0]
    co = np.sum(t[pairs[:-1, 1][same_user]] * t[pairs[1:, 1][same_user]], axis=1).mean()
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, ds.n_items, 5000), rng.integers(0, ds.n_items, 5000)
    assert co > np.sum(t[a] * t[b], axis=1).mean() + 0.05


def cli(*args):
    return subprocess.run([sys.executable, "-m", "data_prep.synthetic", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli_writes_the_preset(tmp_path):
    proc = cli("--preset=tiny", f"--data_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tmp_path / "synthetic_tiny")
    assert sorted(os.listdir(tmp_path / "synthetic_tiny")) == ["image_feat.npy", "synthetic_tiny.inter",
                                                               "text_feat.npy"]


@pytest.mark.parametrize("case", ["bad_preset", "data_dir_is_a_file", "data_dir_under_a_file",
                                  "dataset_is_a_file", "positional"])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, case):
    (tmp_path / "file").write_text("not a directory\n")
    args, expected = ["--preset=tiny", f"--data_dir={tmp_path / 'out'}"], None
    if case == "bad_preset":
        args[0], expected = "--preset=nope", "error: bad flag: flag --preset=nope: value should be one of"
    elif case == "data_dir_is_a_file":
        args[1] = f"--data_dir={tmp_path / 'file'}"
        expected = f"error: {args[1]}: {tmp_path / 'file'} is a file, expected a directory"
    elif case == "data_dir_under_a_file":
        args[1] = f"--data_dir={tmp_path / 'file' / 'sub'}"
        expected = f"error: {args[1]}: cannot generate the dataset in {tmp_path / 'file' / 'sub'} (Not a directory)"
    elif case == "dataset_is_a_file":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "synthetic_tiny").write_text("")
        expected = f"error: {args[1]}: {tmp_path / 'out' / 'synthetic_tiny'} is a file, expected a directory"
    else:
        args.append("extra")
        expected = "error: unexpected arguments ['extra']"
    proc = cli(*args)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(expected), last
    leftovers = [p for p in (tmp_path.iterdir()) if p.name not in ("file", "out")]
    assert not leftovers and not [p for p in tmp_path.rglob("*") if p.name.startswith(".synthetic")]


def sampling_inputs(seed=3, n_users=50, n_items=40):
    rng = np.random.default_rng(seed)
    user_f, item_f = rng.normal(size=(n_users, 4)), rng.normal(size=(n_items, 4))
    popularity = rng.normal(0.0, 0.7, n_items)
    counts = synthetic.rows_per_user(rng, n_users, 400, cap=n_items // 2)
    while not rng.bit_generator.state["has_uint32"]:  # half a 64-bit value buffered by a 32-bit draw
        rng.integers(0, 5, dtype=np.uint32)
    return rng, (user_f, item_f, popularity, counts)


def test_threaded_sampling_is_the_one_thread_stream():
    """Blocks drawn on threads from advanced copies of the stream give the one-thread loop's pairs and
    leave the generator where it leaves it (the buffered half value included)."""
    rng_1, args = sampling_inputs()
    one_thread = synthetic.sample_interactions(rng_1, *args, workers=1, block=7)
    rng_3, args = sampling_inputs()
    threaded = synthetic.sample_interactions(rng_3, *args, workers=3, block=7)
    np.testing.assert_array_equal(threaded, one_thread)
    assert rng_3.bit_generator.state == rng_1.bit_generator.state
    assert rng_3.integers(0, 1 << 20, 8).tolist() == rng_1.integers(0, 1 << 20, 8).tolist()
    users, counts = one_thread[:, 0], args[3]
    assert np.array_equal(np.bincount(users, minlength=len(counts)), counts)  # each user's count
    assert all(len(set(one_thread[users == u, 1])) == c for u, c in enumerate(counts))  # no repeats


def test_a_shifted_stream_falls_back_to_one_thread(monkeypatch):
    """If a block's draws end anywhere but their count further on (numpy repeats a draw of exactly 0),
    every block is drawn again on one thread, from the state the sampling started in."""
    rng_1, args = sampling_inputs()
    one_thread = synthetic.sample_interactions(rng_1, *args, workers=1, block=7)
    real, calls = synthetic._stream_at, []

    def off_by_one_at_the_third_block_end(state, offset):
        calls.append(offset)
        return real(state, offset + (offset == 21 * 40))

    monkeypatch.setattr(synthetic, "_stream_at", off_by_one_at_the_third_block_end)
    rng_3, args = sampling_inputs()
    threaded = synthetic.sample_interactions(rng_3, *args, workers=3, block=7)
    assert 21 * 40 in calls
    np.testing.assert_array_equal(threaded, one_thread)
    assert rng_3.bit_generator.state == rng_1.bit_generator.state


def test_an_empty_dataset_directory_is_generated_into_and_a_foreign_one_left_alone(tmp_path):
    (tmp_path / "synthetic_tiny").mkdir()
    proc = cli("--preset=tiny", f"--data_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "synthetic_tiny" / "synthetic_tiny.inter").is_file()
    (tmp_path / "other" / "synthetic_tiny").mkdir(parents=True)
    (tmp_path / "other" / "synthetic_tiny" / "notes.txt").write_text("mine\n")
    proc = cli("--preset=tiny", f"--data_dir={tmp_path / 'other'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: --data_dir={tmp_path / 'other'}: cannot generate the dataset in {tmp_path / 'other' / 'synthetic_tiny'} "
        f"(holds files but no synthetic_tiny.inter: not a generated dataset, left as it is)")
    assert os.listdir(tmp_path / "other" / "synthetic_tiny") == ["notes.txt"]
    with pytest.raises(data.DatasetError, match="cannot generate the dataset there"):
        data.load_dataset(str(tmp_path / "other"), "synthetic_tiny")
    (tmp_path / "third" / "synthetic_tiny").mkdir(parents=True)
    assert data.load_dataset(str(tmp_path / "third"), "synthetic_tiny").n_users == synthetic.PRESETS["tiny"].n_users
