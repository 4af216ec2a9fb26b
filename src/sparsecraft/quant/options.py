"""The quantisation settings a method takes (a base of its typed ``Options``)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..patterns import NM, Group, Pattern
from .grid import QuantSpec, parse_quantize
from .tensor import SPARSE_GROUPS

__all__ = ["QuantOptions", "check_quant_layer"]


def check_quant_layer(spec: QuantSpec, cols: int, pattern: Pattern, element_pruned: bool, layer: str = "") -> None:
    """ConfigError naming ``layer`` when ``spec`` and ``pattern`` cannot quantise a weight with
    ``cols`` input columns: g must divide it, a pattern unit (M of N:M, G of group:G) must
    divide g, quantised group sparsity needs G in 8, 16, and asymmetric grids cannot hold
    element-wise pruned weights (``element_pruned``) at exactly 0."""
    spec.check_width(cols, layer)
    unit = pattern.m if isinstance(pattern, NM) else pattern.size if isinstance(pattern, Group) else 1
    if spec.group % unit:
        raise ConfigError(f"layer '{layer}': pattern {pattern} does not tile quantisation groups of "
                          f"{spec.group} ({unit} does not divide {spec.group})")
    if isinstance(pattern, Group) and pattern.size not in SPARSE_GROUPS:
        raise ConfigError(f"layer '{layer}': quantised group sparsity needs G in "
                          f"{', '.join(map(str, SPARSE_GROUPS))}, got {pattern}")
    if not spec.symmetric and element_pruned and not isinstance(pattern, Group):
        raise ConfigError(f"layer '{layer}': asymmetric grids cannot hold pruned weights at exactly 0; use "
                          f"symmetric quantisation or a group:G pattern (not {pattern})")


@dataclass(frozen=True)
class QuantOptions:
    """``quantize``: ``"int4"`` or ``"int8"`` (None: no quantisation); ``group``: weights per
    grid along the input dimension (32, 64, 128); ``symmetric``: grid kind (see
    :mod:`sparsecraft.quant.grid`); ``embeddings``: also quantise the token embedding (and an
    output head tied to it) round-to-nearest with the same grid: None quantises it when the
    model has one the group divides (and says so in the log), True insists, False never;
    ``"int8"`` or ``"int4"`` insists with that many bits (same group and grid kind): the
    tied embedding is the largest tensor of a small model and the one quantisation hurts
    most, so formats such as llama.cpp's Q4 keep it at 8 bits. ``embeddings_solver``: an
    embedding tied to the output head is quantised by the method's error-compensating solver
    (GPTQ on the Hessian of the head's inputs, from one more pass over the calibration data
    once the layers are quantised) instead of round to nearest: None does so when the method
    has such a solver and the head is tied, True insists, False rounds to nearest."""

    quantize: str | None = None
    group: int = 64
    symmetric: bool = True
    embeddings: bool | str | None = None
    embeddings_solver: bool | None = None

    def spec(self) -> QuantSpec | None:
        """The grid every quantised layer gets, or None without ``quantize``."""
        if self.quantize is None:
            return None
        return QuantSpec(parse_quantize(self.quantize), self.group, self.symmetric)

    def embedding_spec(self) -> QuantSpec | None:
        """The grid of the token embedding (None without ``quantize``)."""
        spec = self.spec()
        if spec is None or not isinstance(self.embeddings, str):
            return spec
        return QuantSpec(parse_quantize(self.embeddings), self.group, self.symmetric)

    def check_quant(self, owner: str) -> None:
        try:
            self.spec()
            QuantSpec(4, self.group, self.symmetric)  # group and symmetric even without quantize
            if isinstance(self.embeddings, str):
                if self.quantize is None:
                    raise ConfigError(f"option embeddings={self.embeddings!r} needs the option quantize")
                try:
                    self.embedding_spec()
                except ConfigError as e:
                    raise ConfigError(f"option embeddings: {e}") from None
            if self.embeddings_solver and (self.quantize is None or self.embeddings is False):
                raise ConfigError("option embeddings_solver=true needs the token embedding quantised (the option "
                                  "quantize, and embeddings not false)")
        except ConfigError as e:
            raise ConfigError(f"{owner}: {e}") from None
