"""Grids: many configs of one dataset, trained as few compiled programs, each with a single run's files.

  spec      sweep files (``sweep(add)``), their configs (Point), resolved and validated
  sharding  a shard's configs, and same-program groups
  manifest  a grid's workdir: grid.json, another grid refused, --restart
  training  the one place that calls the training code (lgmrec_jax.group, run, engine)
  runner    run_grid(GridOptions): a shard of a grid, run or resumed
  tables    results.csv and results.md (mean and std over seeds, selection by validation)
  plots     a PNG per swept key (matplotlib, optional)
  merge     the shards of a grid joined into one set of tables

The package imports none of its modules: ``from lgmrec_jax.grid import runner``.
"""


class GridError(ValueError):
    """A grid cannot be expanded, run or merged; the message is one line for the user."""
