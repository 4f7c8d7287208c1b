"""A grid's figures: valid and test Recall@20 against each swept key, error bars over seeds.

Plots are optional (matplotlib is the ``plot`` extra; the caller checks it is there). A key is drawn
as a slice through the best setting (the other swept keys held at its values) where that slice has two
values or more; a grid whose keys cannot be drawn one at a time (the ablation: one off value per
switch) gets one figure of its settings instead.
"""

from __future__ import annotations

import os
import re
from typing import Optional

from lgmrec_jax.grid.spec import fmt_value


def save_recall_plot(fig, ax, path: str, title: str) -> None:
    import matplotlib.pyplot as plt

    ax.set_ylabel("Recall@20")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_param(settings: list[dict], param: str, best: Optional[dict], path: str, title: str) -> bool:
    """valid/test Recall@20 against one swept parameter, error bars over seeds; False if not plottable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = best["overrides"] if best else {}
    with_param = [s for s in settings if param in s["overrides"] and s["valid_recall@20"][0] is not None]
    # A slice through the best setting: the other swept keys held at its values.
    sliced = [s for s in with_param
              if all(s["overrides"].get(k) == v for k, v in others.items() if k != param)]
    chosen = sliced if len({fmt_value(s["overrides"][param]) for s in sliced}) >= 2 else with_param
    points: dict[str, list] = {}
    for s in chosen:
        points.setdefault(fmt_value(s["overrides"][param]), []).append(s)
    if len(points) < 2:
        return False
    values = [group[0]["overrides"][param] for group in points.values()]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    order = sorted(range(len(values)), key=lambda i: values[i]) if numeric else list(range(len(values)))
    groups = [list(points.values())[i] for i in order]
    xs = [values[i] for i in order] if numeric else list(range(len(order)))
    fig, ax = plt.subplots(figsize=(6, 4))
    for column, name, marker in (("valid_recall@20", "valid", "o"), ("test_recall@20", "test", "s")):
        # Several settings per value (no slice possible): the best by mean valid recall@20.
        picked = [max(g, key=lambda s: s["valid_recall@20"][0]) for g in groups]
        ys = [s[column][0] for s in picked]
        errs = [s[column][1] or 0.0 for s in picked]
        ax.errorbar(xs, ys, yerr=errs, marker=marker, capsize=3, label=f"{name} Recall@20")
    if numeric:
        positive = [v for v in xs if v > 0]
        if positive and max(positive) / min(positive) >= 50:
            if min(xs) > 0:
                ax.set_xscale("log", base=2 if all(float(v).is_integer() for v in xs) else 10)
            else:
                ax.set_xscale("symlog", linthresh=min(positive))
    else:
        ax.set_xticks(xs)
        ax.set_xticklabels([fmt_value(values[i]) for i in order])
    ax.set_xlabel(param)
    save_recall_plot(fig, ax, path, title)
    return True


def plot_settings(settings: list[dict], path: str, title: str) -> bool:
    """valid/test Recall@20 per setting (by label), for grids whose parameters cannot be plotted
    one at a time (the ablation: each switch has one off value)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [s for s in settings if s["valid_recall@20"][0] is not None]
    if len(shown) < 2:
        return False
    xs = list(range(len(shown)))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(shown)), 4))
    for offset, (column, name, marker) in zip((-0.1, 0.1), (("valid_recall@20", "valid", "o"),
                                                            ("test_recall@20", "test", "s"))):
        ax.errorbar([x + offset for x in xs], [s[column][0] for s in shown],
                    yerr=[s[column][1] or 0.0 for s in shown], fmt=marker, capsize=3, label=f"{name} Recall@20")
    ax.set_xticks(xs)
    ax.set_xticklabels([s["label"] for s in shown], rotation=30 if len(shown) > 5 else 0, ha="right"
                       if len(shown) > 5 else "center")
    save_recall_plot(fig, ax, path, title)
    return True


def write_plots(manifest: dict, settings: list[dict], best: Optional[dict], out_dir: str) -> list[str]:
    """One PNG per swept parameter that can be drawn, else (up to 40 settings) settings.png; returns
    the paths written. ``settings`` and ``best`` as lgmrec_jax.grid.tables computes them."""
    written = []
    for param in manifest["swept"]:
        path = os.path.join(out_dir, f"{re.sub(r'[^A-Za-z0-9_.-]', '_', param)}.png")
        n_seeds = max(len(s["rows"]) for s in settings)
        title = f"{manifest['grid']} on {manifest['dataset']}" + (
            f" (mean ± std over {n_seeds} seeds)" if n_seeds > 1 else "")
        if plot_param(settings, param, best, path, title):
            written.append(path)
    if not written and len(settings) <= 40:  # no parameter could be plotted on its own
        path = os.path.join(out_dir, "settings.png")
        if plot_settings(settings, path, f"{manifest['grid']} on {manifest['dataset']}"):
            written.append(path)
    return written
