"""Source-only training: the lower bound of every adaptation table."""

from __future__ import annotations

from torch import Tensor

from methods.base import Batch, Method, cross_entropy, register


@register
class SourceOnly(Method):
    """Supervised cross-entropy on labelled source images; the target batch is not used."""

    name = "source_only"

    def step(self, source: Batch, target: Batch, step: int) -> dict[str, Tensor]:
        return {"source_ce": cross_entropy(self.model(source.image), source.label)}
