"""Learning-rate schedule shared by the generator's training, the zoo builder and the fine-tuning budget."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total: int, warmup: int, floor: float = 0.0) -> float:
    """Multiplier of the peak learning rate at `step` of a `total`-step run: linear warm-up over
    `warmup` steps, then cosine decay from 1 to `floor` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
