"""The alpha sweep (weight of the global hypergraph embedding; SPEC §4.5).

The reference's lists: 0.0, 0.1, ..., 1.0, plus 0.01 and 0.05 on sports and clothing (also used
for their synthetic presets). All values share one program.
"""

BASE = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
SMALL = (0.01, 0.05)  # sports and clothing only


def values(config_name: str) -> tuple:
    return tuple(sorted(BASE + (SMALL if config_name in ("sports", "clothing") else ())))


def sweep(add, ctx):
    for value in values(ctx.config_name):
        add(alpha=value)
