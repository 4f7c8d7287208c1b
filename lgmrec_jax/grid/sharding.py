"""Which configs a shard trains, and how they fall into same-program groups.

A shard is a contiguous block of the grid's configs ordered by program, so same-shape configs stay in
one shard (and one compiled program) unless a program is larger than a shard; every shard computes
the same split from the whole grid, so no coordination is needed. Group ids hash their configs' ids:
a rerun finds the same groups and their checkpoints.
"""

from __future__ import annotations

import hashlib
import re

from lgmrec_jax.grid import GridError
from lgmrec_jax.grid.spec import Point


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` as (i, n), 0 <= i < n."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not match or int(match.group(2)) < 1 or int(match.group(1)) >= int(match.group(2)):
        raise GridError(f"--grid_shard is {text!r}, expected i/n with 0 <= i < n (e.g. 0/4)")
    return int(match.group(1)), int(match.group(2))


def shard_points(points: list[Point], index: int, count: int) -> list[Point]:
    """Shard ``index`` of ``count``: a contiguous block of the configs ordered by program.

    Programs are ordered by first appearance in the grid, configs within one by grid order, so
    same-shape configs stay together (and in one shard, unless a program is larger than a shard).
    """
    if count == 1:
        return list(points)
    from lgmrec_jax.grid.training import PER_CONFIG_KEYS

    rank: dict = {}

    def key(p: Point):
        shape = tuple(sorted((k, type(v).__name__, v) for k, v in p.overrides.items() if k not in PER_CONFIG_KEYS))
        return rank.setdefault(shape, len(rank)), p.index

    ordered = sorted(points, key=key)
    lo, hi = len(ordered) * index // count, len(ordered) * (index + 1) // count
    return sorted(ordered[lo:hi], key=lambda p: p.index)


def make_groups(points: list[Point], max_group: int) -> list[tuple[str, list[Point]]]:
    """Same-program configs (resolved points) in chunks of at most ``max_group``; ids are stable across
    reruns."""
    from lgmrec_jax.grid.training import program_key

    by_key: dict[str, list[Point]] = {}
    for p in points:
        by_key.setdefault(program_key(p.cfg), []).append(p)
    groups = []
    for members in by_key.values():
        for start in range(0, len(members), max_group):
            chunk = members[start:start + max_group]
            digest = hashlib.sha1("\n".join(p.cid for p in chunk).encode()).hexdigest()[:12]
            groups.append((f"group-{digest}", chunk))
    return groups
