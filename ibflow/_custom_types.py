"""Type aliases shared across ibflow (jaxtyping annotations, diffrax style)."""

from typing import TypeAlias

from jaxtyping import Array, ArrayLike, Bool, Float, Int

RealScalarLike: TypeAlias = float | int | Float[ArrayLike, ""]
FloatScalar: TypeAlias = Float[Array, ""]
BoolScalar: TypeAlias = Bool[Array, ""]
IntScalar: TypeAlias = Int[Array, ""]
Data: TypeAlias = Float[Array, "N d"]
Labels: TypeAlias = Float[Array, " N"]
Vector: TypeAlias = Float[Array, " d"]
