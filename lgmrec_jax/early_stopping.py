"""Early stopping exactly as the reference (SPEC §4.6).

The valid metric is compared after rounding to 4 decimals (the metric dicts already hold rounded
values); only a strict improvement resets the counter, and training stops once the counter exceeds
``stopping_step`` (21 non-improving evaluations for 20). The reported result is the test dict saved
at the best validation epoch.
"""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass
class EarlyStopping:
    stopping_step: int
    best: float = -1.0
    best_epoch: int = -1
    counter: int = 0
    best_valid: Optional[dict] = None
    best_test: Optional[dict] = None

    def update(self, epoch: int, value: float, valid: dict, test: dict) -> bool:
        """Records one evaluation; returns True when training should stop."""
        value = round(float(value), 4)
        if value > self.best:
            self.best, self.best_epoch, self.counter = value, epoch, 0
            self.best_valid, self.best_test = dict(valid), dict(test)
        else:
            self.counter += 1
        return self.should_stop

    @property
    def should_stop(self) -> bool:
        return self.counter > self.stopping_step

    @property
    def patience_left(self) -> int:
        return self.stopping_step - self.counter

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> "EarlyStopping":
        return cls(**state)
