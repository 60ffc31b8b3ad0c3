"""Triton kernels for MEMatte's routed path: the router, gather + LayerNorm, scatter +
residual, varlen (per-image) attention and the policy-masked attention of training; and
ViTMatte's global attention with decomposed relative position.

Each public function takes the arguments and returns what the function of the same name in
:mod:`mematte_kernels.reference` does, and calls a ``torch.library`` custom op
(``mematte::<name>``) so that models using them stay ``torch.compile``-able. Varlen and
policy attention are differentiable (their backward kernels are ops of their own). Under
``TRITON_INTERPRET=1`` the kernels run on CPU tensors in Triton's interpreter.
"""

from ._common import INTERPRET

if INTERPRET:
    from . import _interpreter

    _interpreter.apply()

from . import varlen_attention_backward  # noqa: F401  (registers varlen_attention's autograd)
from .gather_scatter import gather_layernorm, scatter_residual_
from .policy_attention import policy_attention
from .relpos_attention import global_attention, relpos_attention
from .router import router_scores
from .varlen_attention import varlen_attention

__all__ = [
    "gather_layernorm",
    "global_attention",
    "policy_attention",
    "relpos_attention",
    "router_scores",
    "scatter_residual_",
    "varlen_attention",
]
