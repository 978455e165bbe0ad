"""Attention for your own models on fastjac's fast path.

- :func:`fastjac.nn.functional.scaled_dot_product_attention`: PyTorch's SDPA with forward-mode derivatives (every
  ``torch.func`` transform; k tangents share one softmax).
- :func:`fastjac.nn.attention.forward_ad`: a context manager routing ``torch.nn.functional.scaled_dot_product_attention``
  (however it was imported) to it, with the fused fast paths that bypass SDPA switched off.
"""

from . import attention, functional
from .attention import forward_ad
from .functional import scaled_dot_product_attention

__all__ = ["attention", "forward_ad", "functional", "scaled_dot_product_attention"]
