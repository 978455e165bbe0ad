"""``attn_implementation="fastjac"`` for HuggingFace transformers: their SDPA path on fastjac's forward-mode SDPA.

    import fastjac.integrations.transformers as fjt
    fjt.register()                                   # once; idempotent
    config = transformers.BertConfig(..., attn_implementation="fastjac")
    layer = transformers.models.bert.modeling_bert.BertLayer(config)
    fj.lyapunov_spectrum(fj.as_step(layer), X, k=32, steps=100)

The registered function is transformers' own ``sdpa_attention_forward`` (same mask, GQA and causal handling) run
inside :func:`fastjac.nn.attention.forward_ad`, and the mask format is the "sdpa" one. Without registering,
``attn_implementation="sdpa"`` also works through fastjac's callable path, which enters forward_ad() by itself;
the registration makes the model usable with plain ``torch.func`` too, with no context manager.
"""

from __future__ import annotations

NAME = "fastjac"


def fastjac_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """transformers' attention-function signature: [B, H, L, E] query/key/value -> ([B, L, H, Ev], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from ..nn.attention import forward_ad

    with forward_ad():
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register(name: str = NAME) -> str:
    """Register ``attn_implementation=name`` ("fastjac") with transformers' AttentionInterface (and its mask
    format, the "sdpa" one, with AttentionMaskInterface). Returns the name. Needs ``pip install transformers``.

    Example:
        >>> import fastjac.integrations.transformers as fjt  # doctest: +SKIP
        >>> fjt.register()  # doctest: +SKIP
        'fastjac'
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name: expected a non-empty string, got {name!r}")
    try:
        from transformers import AttentionInterface
    except ImportError as e:
        raise ImportError(
            "fastjac.integrations.transformers.register: needs transformers "
            "(pip install transformers, or fastjac's 'thirdparty' extra)"
        ) from e
    AttentionInterface.register(name, fastjac_attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionMaskInterface.register(name, sdpa_mask)
    except ImportError:  # pragma: no cover - older transformers without a mask interface
        pass
    return name


__all__ = ["NAME", "fastjac_attention_forward", "register"]
