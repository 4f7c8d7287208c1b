"""A grid's configs: its sweep file loaded, expanded into Points, and each resolved into a config.

A sweep file is a Python file with ``sweep(add)`` or ``sweep(add, ctx)``; each ``add(key=value, ...)``
is the dataset's config with those keys. A grid is named by a path to such a file, or by a name that
the caller's ``grids_dir`` holds as ``<name>.py``; the library knows no directory of its own.
Expansion is cheap per config (a search grid has millions), so every shard expands the whole grid
and resolves only its own configs. Every error is a one-line GridError naming the file and line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import inspect
import json
import math
import os
import re
import traceback
from typing import Any, Optional

from lgmrec_jax.grid import GridError


@dataclasses.dataclass(frozen=True)
class GridContext:
    """What a grid's ``sweep(add, ctx)`` may look at."""

    dataset: str
    config_name: str  # baby / sports / clothing / tiny / default (lgmrec_jax.configs.config_name)
    base: Any  # the resolved base config (a copy; changing it changes nothing)


class Point:
    """One config of a grid (slots and lazy fields: a search grid has millions)."""

    __slots__ = ("index", "cid", "overrides", "seed", "given_label", "cfg")

    def __init__(self, index: int, cid: str, overrides: dict, seed: int, given_label: Optional[str] = None):
        self.index = index  # position in the grid's order
        self.cid = cid  # config id = directory name under configs/
        self.overrides = overrides  # the keys the grid set, seed included
        self.seed = seed
        self.given_label = given_label
        self.cfg = None  # the resolved ConfigDict (resolve())

    @property
    def setting_overrides(self) -> dict:
        return {k: v for k, v in self.overrides.items() if k != "seed"}

    @property
    def setting(self) -> str:
        """Canonical JSON of the overrides without the seed: the seeds of a setting share it."""
        return json.dumps(self.setting_overrides, sort_keys=True)

    @property
    def label(self) -> str:
        return self.given_label or slug(self.setting_overrides)

    def manifest(self) -> dict:
        return {"index": self.index, "cid": self.cid, "label": self.label, "overrides": self.overrides,
                "setting": self.setting, "seed": self.seed}


def available_grids(grids_dir: Optional[str]) -> list[str]:
    """The grid names ``grids_dir`` holds (its ``<name>.py`` files, those starting with _ left out)."""
    if not grids_dir or not os.path.isdir(grids_dir):
        return []
    return sorted(f[:-3] for f in os.listdir(grids_dir) if f.endswith(".py") and not f.startswith("_"))


def load_sweep(name: str, grids_dir: Optional[str] = None):
    """A grid's module: ``<grids_dir>/<name>.py`` by name, or the file at a path ending in .py."""
    if name.endswith(".py"):
        if not os.path.isfile(name):
            raise GridError(f"grid file {name} not found")
        path = name
    else:
        available = available_grids(grids_dir)
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or name not in available:
            raise GridError(f"unknown grid {name!r}; available: {', '.join(available)} "
                            f"(or a path to a .py file with a sweep(add) function)")
        path = os.path.join(grids_dir, f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_grid_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001  the user's file: say where, not a traceback
        raise GridError(f"grid file {path}: {where(err, path)}{type(err).__name__}: {err}") from None
    if not callable(getattr(module, "sweep", None)):
        raise GridError(f"grid {name!r} has no sweep(add) function")
    return module


def where(err: BaseException, path: str) -> str:
    """'line N: ' of the innermost frame of ``err`` in the file ``path`` (a syntax error's own line), or ''."""
    if isinstance(err, SyntaxError) and err.lineno:
        return f"line {err.lineno}: "
    line = None
    for frame, lineno in traceback.walk_tb(err.__traceback__):
        if os.path.abspath(frame.f_code.co_filename) == os.path.abspath(path):
            line = lineno
    return f"line {line}: " if line else ""


def grid_name(name: str) -> str:
    return os.path.basename(name)[:-3] if name.endswith(".py") else name


def fmt_value(value) -> str:
    if isinstance(value, float):
        return repr(value) if value != int(value) or abs(value) >= 1e16 else f"{value:.1f}"
    return str(value)


_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]")
_ITEM_TEXT: dict = {}


def _item_text(key: str, value) -> str:
    memo = (key, type(value), value)
    text = _ITEM_TEXT.get(memo)
    if text is None:
        text = _ITEM_TEXT[memo] = _UNSAFE.sub("_", f"{key}={fmt_value(value)}")
    return text


def slug(overrides: dict) -> str:
    """A readable, filesystem-safe id of a set of overrides (long ones end in a hash)."""
    if not overrides:
        return "base"
    text = ",".join([_item_text(k, overrides[k]) for k in sorted(overrides)])
    if len(text) > 100:
        text = f"{text[:80]}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"
    return text


def known_keys() -> set:
    from lgmrec_jax.configs import default

    return set(default.get_config().keys())


def base_config(dataset: str, overrides: Optional[dict] = None):
    """The dataset's config updated with the command line's --config.* overrides."""
    from lgmrec_jax import configs

    base = configs.for_dataset(dataset)
    for key, value in (overrides or {}).items():
        if key not in base:
            raise GridError(f"unknown config key {key!r} in the base overrides")
        try:
            base[key] = value
        except (TypeError, ValueError) as err:
            raise GridError(f"--config.{key}={value!r}: {err}") from None
    return base


def expand(name: str, dataset: str, base_cfg, seeds: Optional[list[int]] = None,
           grids_dir: Optional[str] = None) -> list[Point]:
    """Every config of grid ``name`` on ``dataset`` (unresolved: see :func:`resolve`); with ``seeds``,
    each config that sets no seed once per seed."""
    from lgmrec_jax import configs

    module = load_sweep(name, grids_dir)
    gname = grid_name(name)
    known = known_keys()
    added: list[tuple[dict, Optional[str]]] = []

    def add(label: Optional[str] = None, **overrides):
        unknown = sorted(set(overrides) - known)
        if unknown:
            note = getattr(module, "UNKNOWN_KEY_NOTE", "")
            raise GridError(f"grid {gname!r}: add({', '.join(f'{k}=...' for k in unknown)}) sets unknown config "
                            f"key(s) {', '.join(map(repr, unknown))}; known keys: {', '.join(sorted(known))}"
                            + (f" ({note})" if note else ""))
        infinite = [k for k, v in sorted(overrides.items()) if isinstance(v, float) and not math.isfinite(v)]
        if infinite:
            raise GridError(f"grid {gname!r}: add({infinite[0]}={overrides[infinite[0]]}) is not a finite number")
        added.append((overrides, label))

    ctx = GridContext(dataset, configs.config_name(dataset), base_cfg.copy_and_resolve_references())
    params = inspect.signature(module.sweep).parameters
    try:
        module.sweep(add, ctx) if len(params) >= 2 else module.sweep(add)
    except GridError:
        raise
    except Exception as err:  # noqa: BLE001  a bug in the grid's sweep(): where, not a traceback
        raise GridError(f"grid {gname!r}: sweep() failed: {where(err, module.__file__)}"
                        f"{type(err).__name__}: {err}") from None
    if not added:
        raise GridError(f"grid {gname!r} adds no config")
    points, seen = [], set()
    base_seed = int(base_cfg.seed)
    for overrides, label in added:
        runs = ([overrides] if "seed" in overrides or not seeds
                else [{**overrides, "seed": s} for s in seeds])
        for ov in runs:
            cid = slug(ov)
            if cid in seen:
                raise GridError(f"grid {gname!r} adds the config {cid!r} twice")
            seen.add(cid)
            points.append(Point(len(points), cid, ov, int(ov.get("seed", base_seed)), label))
    return points


def resolve(points: list[Point], base_cfg, name: str) -> list[Point]:
    """Sets each point's resolved config (base updated with its overrides) and validates it, its
    matmul precision against this backend included."""
    from lgmrec_jax import configs
    from lgmrec_jax.grid import training

    precisions_checked = set()
    for p in points:
        cfg = base_cfg.copy_and_resolve_references()
        for key, value in p.overrides.items():
            try:
                cfg[key] = value
            except (TypeError, ValueError) as err:
                raise GridError(f"grid {grid_name(name)!r}, config {p.cid}: {key}={value!r}: {err}") from None
        try:
            configs.validate(cfg)
            if cfg.matmul_precision not in precisions_checked:  # a search shard resolves thousands
                training.check_matmul_precision(cfg.matmul_precision)
                precisions_checked.add(cfg.matmul_precision)
        except configs.ConfigError as err:
            raise GridError(f"grid {grid_name(name)!r}, config {p.cid}: {err}") from None
        p.cfg = cfg
    return points


def swept_keys(points: list) -> list[str]:
    """Keys set by some config of the grid, other than the seed, in first-seen order."""
    keys = []
    for p in points:
        overrides = p.overrides if isinstance(p, Point) else p["overrides"]
        keys += [k for k in overrides if k != "seed" and k not in keys]
    return keys
