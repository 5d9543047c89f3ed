"""Target oracle: supervised on the target-train labels, the upper bound every table needs."""

from __future__ import annotations

from torch import Tensor

from methods.base import Batch, Method, cross_entropy, register


@register
class TargetOracle(Method):
    """Supervised cross-entropy on labelled target-train images; the source batch is not used.

    It sees the same target images as the adaptation methods (``target_train``), with their labels,
    and is evaluated on the same ``target_test``.
    """

    name = "target_oracle"
    uses_target_labels = True

    def step(self, source: Batch, target: Batch, step: int) -> dict[str, Tensor]:
        return {"target_ce": cross_entropy(self.model(target.image), target.label)}
