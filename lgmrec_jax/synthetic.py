"""The built-in ``synthetic`` datasets, generated deterministically from a seed (no download).

Latent user and item factors drive both the interactions and the two feature modalities, so the
multimodal signal is real: an item's image and text features are noisy views of the same factors
that decide who interacts with it. The split is MMRec's per-user rule (SPEC §8 step 2).

Presets (``synthetic_<preset>``; plain ``synthetic`` is the default dataset):
  tiny        test-sized
  default     sized so the default run trains to early stopping in minutes on two CPU cores
  baby, sports, clothing   the real datasets' user, item and interaction counts, 4096/384-d features

    python -m data_prep.synthetic --preset=baby --data_dir=./data   # or: load_dataset generates on first use
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import errno
import os
import shutil
import tempfile
import threading
import time
from typing import Optional

import numpy as np
from absl import flags, logging

from lgmrec_jax.cli import fail


@dataclasses.dataclass(frozen=True)
class Preset:
    n_users: int
    n_items: int
    n_interactions: int
    image_dim: int = 4096
    text_dim: int = 384
    n_factors: int = 16
    seed: int = 0


PRESETS = {
    "tiny": Preset(60, 45, 600, image_dim=24, text_dim=12, n_factors=4),
    "default": Preset(3000, 1200, 30000, image_dim=256, text_dim=64),
    "baby": Preset(19445, 7050, 160792),
    "sports": Preset(35598, 18357, 296337),
    "clothing": Preset(39387, 23033, 278677),
}
MIN_ROWS_PER_USER = 5  # the benchmarks are 5-core
AFFINITY = 2.5  # strength of the factor term against popularity in the interaction logits


def preset_for(name: str) -> Preset:
    key = "default" if name == "synthetic" else name.removeprefix("synthetic_")
    if key not in PRESETS:
        raise ValueError(f"unknown synthetic dataset {name!r}; expected synthetic or synthetic_<preset> with "
                         f"preset in {sorted(PRESETS)}")
    return PRESETS[key]


def rows_per_user(rng, n_users: int, total: int, cap: int) -> np.ndarray:
    """At least 5 rows per user, a heavy tail like real data, summing exactly to ``total``."""
    extra = total - MIN_ROWS_PER_USER * n_users
    if extra < 0:
        raise ValueError(f"{total} interactions cannot give {n_users} users {MIN_ROWS_PER_USER} rows each")
    weights = rng.lognormal(0.0, 1.0, n_users)
    counts = MIN_ROWS_PER_USER + np.floor(extra * weights / weights.sum()).astype(np.int64)
    counts = np.minimum(counts, cap)
    short = total - counts.sum()
    while short > 0:  # hand out the remainder one row at a time to users below the cap
        room = np.flatnonzero(counts < cap)
        take = rng.choice(room, size=min(short, len(room)), replace=False)
        counts[take] += 1
        short = total - counts.sum()
    return counts


def sample_interactions(rng, user_f, item_f, popularity, counts, workers: Optional[int] = None,
                        block: int = 2048) -> np.ndarray:
    """Each user's items without replacement, by Gumbel top-k on factor affinity + popularity.

    One Gumbel draw per user and item (0.9 billion at Clothing's shapes: most of the generation),
    drawn on ``workers`` threads (default: the usable CPUs). Each block of ``block`` users draws
    from its own copy of ``rng``'s PCG64 stream advanced to where a one-thread loop would be, and
    ``rng`` is left where that loop would leave it, so the dataset does not depend on the thread
    count (a block whose draws used more of the stream than their count, which numpy's rejection of
    a uniform of exactly 0 does once in 2**53 draws, sends the whole sampling back to one thread).
    The logits stay per ``block`` rows: a BLAS product's rows depend on how many rows it is given.
    """
    n_users, n_items = len(user_f), len(item_f)
    scale = AFFINITY / np.sqrt(user_f.shape[1])
    starts = range(0, n_users, block)
    workers = usable_cpus() if workers is None else workers
    progress = _Progress(len(starts), f"Gumbel top-k of {n_users} users x {n_items} items")

    def block_logits(start):
        return scale * user_f[start:start + block] @ item_f.T + popularity

    def top_items(start, logits):
        pairs = _top_items(logits, start, counts[start:start + len(logits)])
        progress.step()
        return pairs

    if workers <= 1 or not isinstance(rng.bit_generator, np.random.PCG64):
        pairs = []
        for start in starts:
            logits = block_logits(start)
            logits += rng.gumbel(size=logits.shape)
            pairs.append(top_items(start, logits))
        return np.concatenate(pairs)

    state = rng.bit_generator.state

    def draw_and_select(start, logits):
        bits = _stream_at(state, start * n_items)
        logits += np.random.Generator(bits).gumbel(size=logits.shape)
        if bits.state != _stream_at(state, start * n_items + logits.size).state:
            raise _StreamShifted
        return top_items(start, logits)

    # A block in flight holds its logits, its draws and argpartition's copies: about 4 of its size.
    in_flight = max(1, min(workers, _available_bytes() // 2 // (4 * 8 * block * n_items)))
    try:
        pairs = _ordered_map(draw_and_select, ((s, block_logits(s)) for s in starts), in_flight)
    except _StreamShifted:
        logging.info("a rejected Gumbel draw shifted the stream: sampling again on one thread")
        rng.bit_generator.state = state
        return sample_interactions(rng, user_f, item_f, popularity, counts, workers=1, block=block)
    end = _stream_at(state, n_users * n_items).state
    end["has_uint32"], end["uinteger"] = state["has_uint32"], state["uinteger"]  # advance() clears them
    rng.bit_generator.state = end
    return np.concatenate(pairs)


def _top_items(logits, first_user: int, counts) -> np.ndarray:
    """(user, item) rows: each user's ``counts[u]`` largest logits, largest first."""
    depth = int(counts.max())
    top = np.argpartition(-logits, depth - 1, axis=1)[:, :depth]
    order = np.argsort(-np.take_along_axis(logits, top, axis=1), axis=1)
    top = np.take_along_axis(top, order, axis=1)
    users = np.repeat(np.arange(first_user, first_user + len(counts)), counts)
    return np.stack([users, top[np.arange(depth) < counts[:, None]]], axis=1)


class _StreamShifted(Exception):
    """A block's Gumbel draws used more of the PCG64 stream than one value each."""


def _stream_at(state: dict, offset: int) -> np.random.PCG64:
    bits = np.random.PCG64()
    bits.state = state
    return bits.advance(offset)


def _ordered_map(fn, args, in_flight: int) -> list:
    """``[fn(*a) for a in args]`` on ``in_flight`` threads, pulling ``args`` only as a thread frees."""
    results, pending = [], collections.deque()
    with concurrent.futures.ThreadPoolExecutor(in_flight) as pool:
        for a in args:
            if len(pending) == in_flight:
                results.append(pending.popleft().result())
            pending.append(pool.submit(fn, *a))
        results.extend(f.result() for f in pending)
    return results


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _available_bytes() -> int:
    """MemAvailable from /proc/meminfo; elsewhere, no limit (threads are then bounded by CPUs)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


class _Progress:
    """A log line at a tenth of ``total`` steps when 5 s have passed since the last (large presets take
    minutes; Baby's two seconds say nothing)."""

    def __init__(self, total: int, what: str):
        self.total, self.what, self.done = total, what, 0
        self.start = self.last = time.monotonic()
        self.lock = threading.Lock()

    def step(self):
        with self.lock:
            self.done += 1
            now = time.monotonic()
            if self.done * 10 // self.total > (self.done - 1) * 10 // self.total and now - self.last >= 5:
                self.last = now
                logging.info("synthetic: %s: %d%% after %.0f s", self.what, 100 * self.done // self.total,
                             now - self.start)


def mmrec_split_labels(rng, users: np.ndarray) -> np.ndarray:
    """x_label per row: each user's rows in random order, n<10 -> n-2/1/1, else 80/10/10 (SPEC §8)."""
    labels = np.zeros(len(users), dtype=np.int64)
    order = np.lexsort((rng.random(len(users)), users))  # users ascending, random within a user
    bounds = np.flatnonzero(np.diff(users[order])) + 1
    for group in np.split(order, bounds):
        n = len(group)
        if n < 10:
            n_valid, n_test = 1, 1
        else:
            vt = int(np.floor(0.2 * n))
            n_valid = vt // 2
            n_test = vt - n_valid
        labels[group[n - n_valid - n_test: n - n_test]] = 1
        labels[group[n - n_test:]] = 2
    return labels


def features(rng, item_f, dim: int, nonnegative: bool) -> np.ndarray:
    """A noisy random view of the item factors; image-like (non-negative) or text-like (unit rows)."""
    mixing = rng.normal(size=(item_f.shape[1], dim)) / np.sqrt(item_f.shape[1])
    x = item_f @ mixing + 0.5 * rng.normal(size=(len(item_f), dim))
    if nonnegative:
        return np.maximum(x, 0.0).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def generate(preset: Preset, out_dir: str, name: str) -> str:
    """Writes ``out_dir/name.inter`` and the feature files atomically; returns out_dir."""
    rng = np.random.default_rng(preset.seed)
    user_f = rng.normal(size=(preset.n_users, preset.n_factors))
    item_f = rng.normal(size=(preset.n_items, preset.n_factors))
    popularity = rng.normal(0.0, 0.7, preset.n_items)
    counts = rows_per_user(rng, preset.n_users, preset.n_interactions, cap=preset.n_items // 2)
    logging.info("synthetic %s: sampling %d interactions for %d users", name, counts.sum(), preset.n_users)
    pairs = sample_interactions(rng, user_f, item_f, popularity, counts)
    last_item = preset.n_items - 1
    if not (pairs[:, 1] == last_item).any():  # n_items is max id + 1: make sure the last id occurs
        user_rows = np.flatnonzero(pairs[:, 0] == pairs[np.argmax(counts[pairs[:, 0]]), 0])
        pairs[user_rows[-1], 1] = last_item
    labels = mmrec_split_labels(rng, pairs[:, 0])
    ratings = rng.integers(1, 6, len(pairs))
    timestamps = rng.integers(1_300_000_000, 1_400_000_000, len(pairs))
    image = features(rng, item_f, preset.image_dim, nonnegative=True)
    text = features(rng, item_f, preset.text_dim, nonnegative=False)

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=parent)
    try:
        table = np.stack([pairs[:, 0], pairs[:, 1], ratings, timestamps, labels], axis=1)
        np.savetxt(os.path.join(tmp, f"{name}.inter"), table, fmt="%d", delimiter="\t",
                   header="userID\titemID\trating\ttimestamp\tx_label", comments="")
        np.save(os.path.join(tmp, "image_feat.npy"), image)
        np.save(os.path.join(tmp, "text_feat.npy"), text)
        os.rename(tmp, out_dir)  # atomic: a crash never leaves a half-written dataset
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isdir(out_dir):
            raise
    return out_dir


def generate_named(name: str, data_dir: str) -> str:
    out_dir = os.path.join(os.path.abspath(data_dir), name)
    if os.path.isfile(os.path.join(out_dir, f"{name}.inter")):
        return out_dir  # generated before (generate() writes the whole directory at once)
    if os.path.isdir(out_dir):
        if os.listdir(out_dir):
            raise FileExistsError(errno.EEXIST, f"holds files but no {name}.inter: not a generated dataset, "
                                                f"left as it is", out_dir)
        os.rmdir(out_dir)  # an empty directory: generate() moves the dataset into its place
    logging.info("generating the built-in dataset %s into %s", name, out_dir)
    return generate(preset_for(name), out_dir, name)


def define_flags() -> None:
    """--preset and --data_dir, for the command line only: the trainer owns --data_dir."""
    flags.DEFINE_enum("preset", "default", sorted(PRESETS), "Which synthetic preset to generate.")
    flags.DEFINE_string("data_dir", "./data", "Directory that receives the dataset folder.")


def main(argv):
    """``python -m data_prep.synthetic``: generates one preset, prints its directory."""
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]!r}; every input is a --flag")
    preset, data_dir = flags.FLAGS.preset, flags.FLAGS.data_dir
    name = "synthetic" if preset == "default" else f"synthetic_{preset}"
    out_dir = os.path.join(os.path.abspath(data_dir), name)
    for path in (data_dir, out_dir):  # checked before the minutes of generation a large preset takes
        if os.path.exists(path) and not os.path.isdir(path):
            fail(f"--data_dir={data_dir}: {path} is a file, expected a directory (or a path to create)")
    try:
        print(generate_named(name, data_dir))
    except OSError as err:
        fail(f"--data_dir={data_dir}: cannot generate the dataset in {err.filename or data_dir} "
             f"({err.strerror or err})")

