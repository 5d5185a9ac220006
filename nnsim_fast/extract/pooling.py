"""From a layer's per-sample output (and its gradient) to one row vector per sample.

* ``[B]`` and ``[B, d]`` outputs are taken as they are.
* ``[B, T, D]`` outputs are token sequences (the transformer layout: tokens,
  then the hidden size): pooled over the TOKEN axis by ``tokens``, never over
  the hidden axis --
  ``"mean"`` (default) the mean of the real tokens (the batch's
  ``attention_mask`` removes padding), ``"first"`` the first token (a ``[CLS]``
  or class token), ``"flatten"`` every position (padding zeroed; needs one
  sequence length for all batches).
* ``[B, C, ...]`` outputs with two or more spatial axes (conv maps) follow
  ``spatial``: ``"flatten"`` (default) keeps every position, ``"mean"``
  averages over positions.

Gradients are pooled to match the pooled feature.  When a feature is a mean
over positions, ``f = sum_t w_t h_t`` with weights summing to 1, the gradient
that belongs to it is the derivative of the loss along a shift of that mean:
moving every (real) position by the same ``delta`` moves ``f`` by ``delta``,
and the loss by ``sum_t g_t . delta``.  So the matching gradient is the SUM of
the positions' gradients, not their mean -- the same rule for token means and
spatial means.  Taking the first token or every position takes the gradients
at the same positions.  Padded positions never contribute: with a mask, a
representation does not depend on how far a batch was padded.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["pool"]


def pool(t: Tensor, *, gradient: bool, spatial: str, tokens: str, mask: Optional[Tensor],
         layer: str) -> Tensor:
    """``t`` (an output or its gradient) as a ``[B, d]`` matrix (see the module docstring)."""
    if t.dim() == 1:
        return t.unsqueeze(1)
    if t.dim() == 2:
        return t
    if t.dim() == 3:
        return _pool_tokens(t, gradient, tokens, _token_mask(t, mask, tokens, layer))
    if spatial == "flatten":
        return t.reshape(t.shape[0], -1)
    dims = tuple(range(2, t.dim()))
    return t.sum(dim=dims) if gradient else t.mean(dim=dims)


def _pool_tokens(t: Tensor, gradient: bool, tokens: str, mask: Optional[Tensor]) -> Tensor:
    if tokens == "first":
        return t[:, 0]
    if mask is not None:
        # where(), not a product: padded positions may hold inf or nan.
        t = torch.where(mask.unsqueeze(2), t, torch.zeros((), dtype=t.dtype, device=t.device))
    if tokens == "flatten":
        return t.reshape(t.shape[0], -1)
    summed = t.sum(dim=1)
    if gradient:
        return summed
    count = t.shape[1] if mask is None else mask.sum(dim=1, keepdim=True).clamp_min(1).to(t.dtype)
    return summed / count


def _token_mask(t: Tensor, mask: Optional[Tensor], tokens: str, layer: str) -> Optional[Tensor]:
    """The batch's padding mask as bool ``[B, T]`` on ``t``'s device, or None (no padding)."""
    if mask is None:
        return None
    if mask.dim() != 2 or mask.shape[0] != t.shape[0]:
        raise ValueError(f"attention_mask must be [batch, tokens] = [{t.shape[0]}, T], got shape "
                         f"{tuple(mask.shape)}")
    mask = mask.to(device=t.device) != 0
    if bool(mask.all()):
        return None
    if mask.shape[1] != t.shape[1]:
        if tokens == "first":
            return None
        raise ValueError(
            f"layer {layer!r} gives {t.shape[1]} tokens per sample but the batch's attention_mask "
            f"has {mask.shape[1]} positions, so its padding cannot be masked out; probe layers "
            "whose outputs line up with the input tokens, or use tokens='first'")
    if tokens == "first" and not bool(mask[:, 0].all()):
        raise ValueError(f"layer {layer!r}: tokens='first' reads position 0, which is padding "
                         "for some samples (left padding); pad on the right or use tokens='mean'")
    return mask
