"""Layer-sensitivity criteria: cheap per-layer scores (higher = more sensitive).

Every criterion has the signature::

  scores = criterion(loss_fn, params, batches, *, layers=None, key=None, **opts)

with ``loss_fn(params, batch) -> scalar`` the mean loss over a batch, ``params``
a Flax params pytree, ``batches`` a sequence of batches (gradients and
Hessians are averaged over them, each batch weighted equally) and ``layers``
``None`` or regex patterns over layer paths (``safer_jax.core.layers``). Each
criterion acts on the layers' kernels; second-order ones on the Hessian block
of one kernel at a time. Data-free criteria accept ``loss_fn=batches=None``.

The expensive criteria (fisher, hessian_trace, hawq_v2, top_eigenvalue,
corruption_pga, integrated_gradients) run their cheap setting by default and
the full one with ``setting='full'`` (:mod:`safer_jax.criteria.settings`).
"""

from safer_jax.criteria._common import clear_compiled
from safer_jax.criteria._common import mean_loss
from safer_jax.criteria._common import mean_value_and_grads
from safer_jax.criteria.confidence import trace_ranking
from safer_jax.criteria.corruption import PGAResult
from safer_jax.criteria.corruption import corruption_first_order
from safer_jax.criteria.corruption import dual_norm
from safer_jax.criteria.corruption import pga_corruption
from safer_jax.criteria.corruption import project
from safer_jax.criteria.curvature import TraceEstimate
from safer_jax.criteria.curvature import hutchinson_trace
from safer_jax.criteria.data_free import param_count
from safer_jax.criteria.data_free import quant_error
from safer_jax.criteria.data_free import quant_sq_error
from safer_jax.criteria.data_free import random
from safer_jax.criteria.data_free import spectral_norm
from safer_jax.criteria.data_free import weight_norm
from safer_jax.criteria.gradient import fisher_diagonal
from safer_jax.criteria.gradient import grad_norm
from safer_jax.criteria.gradient import sum_sq_grads
from safer_jax.criteria.gradient import taylor
from safer_jax.criteria.gradient import taylor_abs
from safer_jax.criteria.integrated import integrated_gradients_attributions
from safer_jax.criteria.integrated import quadrature
from safer_jax.criteria.registry import CRITERIA
from safer_jax.criteria.registry import compute_all
from safer_jax.criteria.registry import get_criterion
from safer_jax.criteria.settings import SETTINGS

# The expensive criteria as the registry serves them: cheap by default, ``setting='full'``.
corruption_pga = CRITERIA["corruption_pga"]
fisher = CRITERIA["fisher"]
hawq_v2 = CRITERIA["hawq_v2"]
hessian_trace = CRITERIA["hessian_trace"]
integrated_gradients = CRITERIA["integrated_gradients"]
top_eigenvalue = CRITERIA["top_eigenvalue"]

__all__ = [
    "CRITERIA",
    "PGAResult",
    "SETTINGS",
    "TraceEstimate",
    "clear_compiled",
    "compute_all",
    "corruption_first_order",
    "corruption_pga",
    "dual_norm",
    "fisher",
    "fisher_diagonal",
    "get_criterion",
    "grad_norm",
    "hawq_v2",
    "hessian_trace",
    "hutchinson_trace",
    "integrated_gradients",
    "integrated_gradients_attributions",
    "mean_loss",
    "mean_value_and_grads",
    "param_count",
    "pga_corruption",
    "project",
    "quadrature",
    "quant_error",
    "quant_sq_error",
    "random",
    "spectral_norm",
    "sum_sq_grads",
    "taylor",
    "taylor_abs",
    "top_eigenvalue",
    "trace_ranking",
    "weight_norm",
]
