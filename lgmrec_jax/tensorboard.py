"""Optional TensorBoard events beside a run's metrics.jsonl (config.tensorboard, the [tensorboard] extra)."""

from __future__ import annotations

import shutil

from lgmrec_jax.workdir import RunError


class TensorBoard:
    """Optional TensorBoard events beside metrics.jsonl (``config.tensorboard``, [tensorboard] extra).

    The event file is rewritten from the run's history on every start, so a resumed run has no
    duplicate or missing points.
    """

    SCALARS = ("recall@20", "ndcg@20")

    def __init__(self, logdir: str, history: list):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise RunError("config.tensorboard=True needs tensorboardX: pip install -e '.[tensorboard]'") from None
        shutil.rmtree(logdir, ignore_errors=True)
        self.writer = SummaryWriter(logdir)
        for row in history:
            self.write(row)

    def write(self, row: dict) -> None:
        epoch = row["epoch"]
        for part, value in row["loss"].items():
            self.writer.add_scalar(f"loss/{part}", value, epoch)
        for split in ("valid", "test"):
            for metric in self.SCALARS:
                if metric in row.get(split, {}):
                    self.writer.add_scalar(f"{split}/{metric}", row[split][metric], epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
