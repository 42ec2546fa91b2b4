"""ibflow: the exact gradient flow of linear networks and certificates of its implicit bias.

ibflow enables JAX's float64 mode on import (`jax_enable_x64`): the certificates
need it. Set the environment variable `IBFLOW_NO_X64=1` before importing to opt out.

With `IBFLOW_NO_X64=1` (float32) it sets `jax_default_matmul_precision` to `"highest"` unless it
was set already (by the environment variable `JAX_DEFAULT_MATMUL_PRECISION` or in code): on GPUs
JAX's default runs float32 products in TF32 (a 10-bit mantissa), whose rounding swamps the stiff
solver's error estimate. Measured on an NVIDIA H200, Fig. 7.1 grid in float32
(`benchmarks/gpu.py`): 2, 5 and 9 of 100 points converged at d = 1e3, 1e4, 1e5 with the default
precision, 100/100 with `"highest"`. With x64 (the default) ibflow's arrays are float64, whose
products are never reduced; the setting is left alone there because on the CPU it made the
Fig. 7.1 sweep's second call ~7 % slower (3.11–3.41 s against 2.93–3.17 s, 2 × 4 runs).
"""

import os as _os

import jax as _jax

if not _os.environ.get("IBFLOW_NO_X64"):
    _jax.config.update("jax_enable_x64", True)
elif _jax.config.jax_default_matmul_precision is None:
    _jax.config.update("jax_default_matmul_precision", "highest")

from ._certify import (
    Certificate as Certificate,
    NotCovered as NotCovered,
    certify as certify,
    certify_batch as certify_batch,
    implicit_potential as implicit_potential,
    named_potential as named_potential,
)
from ._data import population_error as population_error, sparse_regression as sparse_regression
from ._program_cache import enable_compilation_cache as enable_compilation_cache
from ._flow import (
    FlowSolution as FlowSolution,
    GradientFlowProblem as GradientFlowProblem,
    default_solver as default_solver,
    default_solver_tolerances as default_solver_tolerances,
    gradient_flow as gradient_flow,
)
from ._init import (
    conv_init as conv_init,
    diagonal_init as diagonal_init,
    fully_connected_init as fully_connected_init,
    layer_magnitudes as layer_magnitudes,
    leaky_relu_init as leaky_relu_init,
    linear_init as linear_init,
    scale_shape as scale_shape,
    tied_diagonal_init as tied_diagonal_init,
)
from ._classify import (
    MarginFlowSolution as MarginFlowSolution,
    MarginRecord as MarginRecord,
    margin_flow as margin_flow,
)
from ._losses import (
    AbstractLoss as AbstractLoss,
    AbstractMarginLoss as AbstractMarginLoss,
    ExponentialLoss as ExponentialLoss,
    LogisticLoss as LogisticLoss,
    SquareLoss as SquareLoss,
)
from ._networks import (
    AbstractNetwork as AbstractNetwork,
    ConvNet as ConvNet,
    DiagonalNet as DiagonalNet,
    FullyConnectedNet as FullyConnectedNet,
    LeakyReLUNeuron as LeakyReLUNeuron,
    Linear as Linear,
    TensorNet as TensorNet,
    TiedDiagonalNet as TiedDiagonalNet,
    as_tensor_net as as_tensor_net,
    orthogonal_tensor_net as orthogonal_tensor_net,
)
from ._potentials import (
    L2 as L2,
    AbstractPotential as AbstractPotential,
    DeepDiagonal as DeepDiagonal,
    FullyConnectedNeuron as FullyConnectedNeuron,
    LeakyReLUNeuronPotential as LeakyReLUNeuronPotential,
    LinearL2 as LinearL2,
    NTKMatrix as NTKMatrix,
    TiedDiagonal as TiedDiagonal,
    UntiedDiagonal as UntiedDiagonal,
    WeightedL2 as WeightedL2,
)
from ._reference import ReferenceSolution as ReferenceSolution, dual_newton as dual_newton, min_l1 as min_l1, min_l2 as min_l2
from ._results import RESULTS as RESULTS, status_word as status_word, status_words as status_words
from ._sweep import sweep as sweep
from ._structure import (
    hessian_map_violation as hessian_map_violation,
    predictor_metric as predictor_metric,
    tangent_metric_inverse as tangent_metric_inverse,
)
from ._solver import LinearlyImplicitExtrapolation as LinearlyImplicitExtrapolation

from ._flow import ReducedFlowProblem as ReducedFlowProblem, reducible as reducible

__version__ = "0.1.0"

# Imported on first use (PEP 562): the margin certificates (Clarabel, SciPy's optimisers) and the
# discrete optimisers (optax) cost ~0.45 s of start-up that `ibflow sweep` and `run` do not need.
_LAZY = {
    "MarginCertificate": "._margin",
    "NotSeparableError": "._margin",
    "certify_margin": "._margin",
    "check_separable": "._margin",
    "margin_geometry": "._margin",
    "max_margin": "._margin",
    "svm_l2": "._margin",
    "TrainSolution": "._train",
    "lanczos_top_eigenvalue": "._train",
    "make_optimizer": "._train",
    "sharpness": "._train",
    "stability_bound": "._train",
    "train": "._train",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

