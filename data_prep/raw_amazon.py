"""Readers for the raw Amazon review files (McAuley et al., 2014 and 2018 releases).

Each reader turns one file into Python/NumPy data and reports a problem as one line naming the file and
line (or byte offset): it stops (:class:`RawInputError`) or, when asked, is skipped and counted
(:class:`BadLines`). Formats: ``ratings_<Category>.csv``; review JSON lines (2014 and 2018); metadata
(2014 Python literals, read with ``ast.literal_eval``; 2018 JSON); ``image_features_<Category>.b``
(a 10-byte ASIN, then D float32). Any file may be gzip-compressed (recognised by its magic bytes).
"""

from __future__ import annotations

import array
import ast
import dataclasses
import gzip
import json
import math
import os
import re
import zlib
from typing import Iterator, Optional

import numpy as np
from absl import logging

PROGRESS_EVERY = 500_000  # rows between progress lines on the long reads
IMAGE_ASIN_BYTES = 10
IMAGE_DIM = 4096
GZIP_MAGIC = b"\x1f\x8b"


class PrepError(ValueError):
    """A problem that stops data preparation; the message is one self-contained line."""


class RawInputError(PrepError):
    """Malformed raw input; the message names the file and the line number or byte offset."""


class BadLines:
    """Reports malformed lines: raises by default, or skips and counts them (``--skip_bad_lines``)."""

    MAX_EXAMPLES = 20  # the dataset card keeps the first few messages, not millions

    def __init__(self, skip: bool):
        self.skip = skip
        self.counts: dict[str, int] = {}
        self.examples: list[str] = []

    def report(self, path: str, lineno: int, why: str) -> None:
        message = f"{path}:{lineno}: {why}"
        if not self.skip:
            raise RawInputError(message)
        self.counts[path] = self.counts.get(path, 0) + 1
        if len(self.examples) < self.MAX_EXAMPLES:
            self.examples.append(message)
            logging.warning("skipped bad line: %s", message)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _is_gzip(path: str) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == GZIP_MAGIC


def open_lines(path: str, bad: BadLines) -> Iterator[tuple[int, str]]:
    """Yields (1-based line number, text without the newline) from a plain or gzip file.

    Lines are decoded one at a time so that a bad byte is reported with its line number; a
    truncated gzip stream is always an error (what follows the cut is unknowable, so skipping
    cannot be honest about it).
    """
    if not os.path.isfile(path):
        raise PrepError(f"{path}: file not found")
    opener = gzip.open if _is_gzip(path) else open
    lineno = 0
    with opener(path, "rb") as handle:
        try:
            for lineno, raw in enumerate(handle, start=1):
                try:
                    text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a BOM is no part of an id
                except UnicodeDecodeError as err:
                    bad.report(path, lineno, f"not UTF-8 text (byte {err.start} of the line)")
                    continue
                yield lineno, text.rstrip("\r\n")
        except (EOFError, gzip.BadGzipFile, zlib.error) as err:
            raise RawInputError(f"{path}:{lineno + 1}: gzip stream is truncated or corrupt ({err})") from None


@dataclasses.dataclass
class RawInteractions:
    """Interactions as read: string ids coded by first appearance, one entry per kept row."""

    user_codes: array.array = dataclasses.field(default_factory=lambda: array.array("q"))
    item_codes: array.array = dataclasses.field(default_factory=lambda: array.array("q"))
    ratings: array.array = dataclasses.field(default_factory=lambda: array.array("d"))
    timestamps: array.array = dataclasses.field(default_factory=lambda: array.array("q"))
    user_names: dict = dataclasses.field(default_factory=dict)  # raw id -> code
    item_names: dict = dataclasses.field(default_factory=dict)
    lines_read: int = 0
    blank_lines: int = 0
    incomplete_rows: int = 0  # rows with an empty user, item, rating or timestamp (SPEC §8 dropna)

    def add(self, user: str, item: str, rating: float, timestamp: int) -> None:
        self.user_codes.append(self.user_names.setdefault(user, len(self.user_names)))
        self.item_codes.append(self.item_names.setdefault(item, len(self.item_names)))
        self.ratings.append(rating)
        self.timestamps.append(timestamp)

    def __len__(self) -> int:
        return len(self.user_codes)


def _number(text, kind, what: str):
    """Parses a rating (float) or timestamp (int); returns an error string instead of raising."""
    try:
        value = kind(text)
    except (TypeError, ValueError, OverflowError):
        return None, f"{what} is {text!r}, expected a number"
    if isinstance(value, float) and not math.isfinite(value):
        return None, f"{what} is {text!r}, expected a finite number"
    return value, None


def _log_progress(path: str, lineno: int, what: str) -> None:
    if lineno % PROGRESS_EVERY == 0:
        logging.info("%s: %d %s read", os.path.basename(path), lineno, what)


def read_ratings_csv(path: str, bad: BadLines) -> RawInteractions:
    """Reads a 2014 ratings-only CSV (``user,item,rating,timestamp``; no header, no quoting)."""
    out = RawInteractions()
    for lineno, line in open_lines(path, bad):
        out.lines_read = lineno
        _log_progress(path, lineno, "rating rows")
        if not line.strip():
            out.blank_lines += 1
            continue
        fields = line.split(",")
        if len(fields) != 4:
            bad.report(path, lineno, f"{len(fields)} comma-separated fields, expected 4 (user,item,rating,timestamp)")
            continue
        user, item, rating_text, time_text = (f.strip() for f in fields)
        if not (user and item and rating_text and time_text):
            out.incomplete_rows += 1  # dropped like pandas dropna, counted in the card
            continue
        rating, err = _number(rating_text, float, "rating")
        timestamp, err2 = _number(time_text, _int_text, "timestamp")
        if err or err2:
            bad.report(path, lineno, err or err2)
            continue
        out.add(user, item, rating, timestamp)
    return out


def _int_text(text: str) -> int:
    """An integer timestamp, also from '1388275200.0' (how pandas may have re-written a file)."""
    value = float(text) if any(c in text for c in ".eE") else int(text)
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(text)
        value = int(value)
    return value


REVIEW_KEYS = ("reviewerID", "asin", "overall", "unixReviewTime")


def read_reviews_json(path: str, bad: BadLines) -> RawInteractions:
    """Reads review JSON lines (2014 or 2018): one object per line with the REVIEW_KEYS."""
    out = RawInteractions()
    for lineno, line in open_lines(path, bad):
        out.lines_read = lineno
        _log_progress(path, lineno, "review lines")
        if not line.strip():
            out.blank_lines += 1
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            bad.report(path, lineno, f"not a JSON object ({err.msg} at column {err.colno})")
            continue
        if not isinstance(record, dict):
            bad.report(path, lineno, f"a JSON {type(record).__name__}, expected an object")
            continue
        values = [record.get(k) for k in REVIEW_KEYS]
        if any(v is None or v == "" for v in values):
            out.incomplete_rows += 1
            continue
        user, item = values[0], values[1]
        if not isinstance(user, str) or not isinstance(item, str):
            bad.report(path, lineno, "reviewerID and asin must be strings")
            continue
        rating, err = _number(values[2], float, "overall")
        timestamp, err2 = _number(values[3], _int_value, "unixReviewTime")
        if err or err2:
            bad.report(path, lineno, err or err2)
            continue
        out.add(user, item, rating, timestamp)
    return out


def _int_value(value) -> int:
    if isinstance(value, bool):
        raise ValueError(value)
    return _int_text(value) if isinstance(value, str) else _int_text(repr(value))


# The asin of a metadata line, found without parsing the whole line: most lines of a category's
# metadata are for items outside the 5-core, and ast.literal_eval on all of them takes many minutes.
_ASIN_RE = re.compile(r"""["']asin["']\s*:\s*["']([^"']*)["']""")


def parse_meta_line(text: str):
    """One metadata record: JSON (2018) or a Python literal (2014), never evaluated as code."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    return ast.literal_eval(text)  # literals only: no names, calls or attribute access


@dataclasses.dataclass
class MetaResult:
    records: list  # item id -> metadata dict, or None where the file has no line for the item
    lines_read: int = 0
    duplicates: int = 0


def read_meta(path: str, wanted: dict, bad: BadLines) -> MetaResult:
    """Metadata for the items in ``wanted`` (asin -> item id), in item-id order.

    Lines whose asin (found by a cheap pattern) is not wanted are not parsed further; every other
    line must parse to a dict with an ``asin``. The first line of a repeated asin wins.
    """
    result = MetaResult(records=[None] * len(wanted))
    for lineno, line in open_lines(path, bad):
        result.lines_read = lineno
        _log_progress(path, lineno, "metadata lines")
        if not line.strip():
            continue
        match = _ASIN_RE.search(line)
        if match and match.group(1) not in wanted:
            continue
        try:
            record = parse_meta_line(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError) as err:
            bad.report(path, lineno, f"not a JSON or Python-literal record ({type(err).__name__})")
            continue
        if not isinstance(record, dict) or not isinstance(record.get("asin"), str):
            bad.report(path, lineno, "record has no 'asin' string field")
            continue
        item = wanted.get(record["asin"])
        if item is None:
            continue
        if result.records[item] is not None:
            result.duplicates += 1
            continue
        result.records[item] = record
    return result


def _text(value) -> str:
    """A metadata field as the reference saw it after fillna(' '): missing or empty -> ' '."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return " "
    if isinstance(value, (list, tuple)):  # 2018 descriptions are lists of paragraphs
        value = " ".join(str(v) for v in value)
    value = str(value)
    return value if value else " "


def first_category_path(meta: dict) -> list:
    """The first category path: 2014 ``categories`` is a list of paths, 2018 ``category`` one path."""
    cats = meta.get("categories")
    if cats is None:
        cats = meta.get("category")
    if not isinstance(cats, (list, tuple)) or not cats:
        return []  # the reference only adds categories when they evaluate to a list
    first = cats[0]
    path = first if isinstance(first, (list, tuple)) else cats
    return [str(c) for c in path]


def item_sentence(meta: Optional[dict]) -> str:
    """The text encoded for one item (SPEC §8 step 4).

    title + ' ' + brand + ' ' + (each string of the first category path + ' ') + description,
    missing fields as a single space, newlines as spaces. An item without metadata gives the
    sentence of four missing fields.
    """
    meta = meta or {}
    sentence = _text(meta.get("title")) + " " + _text(meta.get("brand")) + " "
    sentence += "".join(c + " " for c in first_category_path(meta))
    sentence += _text(meta.get("description"))
    return sentence.replace("\n", " ")


@dataclasses.dataclass
class ImageResult:
    features: np.ndarray  # (n_items, dim) float32; rows of missing items hold the mean vector
    missing: list  # item ids without a record, ascending
    records_read: int = 0
    duplicates: int = 0


def read_image_features(path: str, wanted: dict, dim: int = IMAGE_DIM) -> ImageResult:
    """Image vectors for the items in ``wanted`` (asin -> item id) from a McAuley ``.b`` file.

    Items with no record get the mean of the found items' vectors (SPEC §8, "following LATTICE").
    A repeated asin keeps its last record, as the reference's dict did. A record cut short by the
    end of the file is an error naming its byte offset.
    """
    if not os.path.isfile(path):
        raise PrepError(f"{path}: file not found")
    record_bytes = IMAGE_ASIN_BYTES + 4 * dim
    found = np.zeros((len(wanted), dim), dtype=np.float32)
    seen = np.zeros(len(wanted), dtype=bool)
    result = ImageResult(features=found, missing=[])
    opener = gzip.open if _is_gzip(path) else open
    with opener(path, "rb") as handle:
        offset = 0
        while True:
            record = handle.read(record_bytes)
            if not record:
                break
            if len(record) < record_bytes:
                raise RawInputError(
                    f"{path}: truncated image record at byte offset {offset}: {len(record)} bytes, expected "
                    f"{record_bytes} (a {IMAGE_ASIN_BYTES}-byte ASIN and {dim} float32)")
            try:
                asin = record[:IMAGE_ASIN_BYTES].decode("ascii").strip()
            except UnicodeDecodeError:
                raise RawInputError(
                    f"{path}: record at byte offset {offset} does not start with an ASCII ASIN "
                    f"(wrong --image_feature_dim, or not an image feature file)") from None
            item = wanted.get(asin)
            if item is not None:
                result.duplicates += int(seen[item])
                found[item] = np.frombuffer(record, dtype="<f4", offset=IMAGE_ASIN_BYTES)
                seen[item] = True
            offset += record_bytes
            result.records_read += 1
            if result.records_read % (PROGRESS_EVERY // 5) == 0:
                logging.info("%s: %d image records read", os.path.basename(path), result.records_read)
    if not seen.any():
        raise PrepError(f"{path}: no item of the dataset has an image record ({result.records_read} records read)")
    if not np.isfinite(found[seen]).all():
        row = int(np.flatnonzero(seen & ~np.isfinite(found).all(axis=1))[0])
        raise RawInputError(f"{path}: the record of item {row} holds NaN or inf values")
    mean = found[seen].astype(np.float64).mean(axis=0)
    found[~seen] = mean.astype(np.float32)
    result.missing = np.flatnonzero(~seen).tolist()
    return result
