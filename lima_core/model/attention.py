"""Causal attention over packed variable-length rows, never padding.

Backends, first available wins (docs/design.md, decision 5):
1. the `flash_attn` package's varlen function (FlashAttention 3 interface, else 2), on CUDA;
2. PyTorch's own FlashAttention varlen kernel, `torch.nn.attention.varlen.varlen_attn`, on CUDA;
3. `scaled_dot_product_attention` with a block-diagonal causal mask: the CPU path and the
   reference the others are tested against.

Shapes: q [b, s, h, d]; k, v [b, sk, hkv, d] with h a multiple of hkv (grouped-query);
packed rows have b == 1 and `cu_seqlens` [n + 1] (int32, cumulative example lengths).
Without `cu_seqlens` each row is one sequence; when sk > s (a KV cache) the queries are the
last s positions. Batched decoding of prompts of different lengths (lima_core.inference.decode) pads
them on the left and passes `key_mask` [b, sk] (False: a padding slot no query may see but its
own, so no row is ever all masked).
"""

from __future__ import annotations

import functools
import importlib
import inspect

import torch
import torch.nn.functional as F


@functools.cache
def _flash_attn_varlen():
    """flash_attn's varlen function, FA3 interface first; None when not installed."""
    for module in ("flash_attn_interface", "flash_attn"):
        try:
            return importlib.import_module(module).flash_attn_varlen_func
        except (ImportError, AttributeError):
            continue
    return None


@functools.cache
def _torch_varlen():
    """torch's varlen_attn and the keyword that makes it causal; None before torch 2.9."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    # torch 2.11 spells causality is_causal=True; later versions a (-1, 0) window.
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    return varlen_attn, causal, "enable_gqa" in params


def attention(q, k, v, cu_seqlens=None, max_seqlen=None, key_mask=None):
    """Causal attention; see the module docstring for shapes. Returns [b, s, h, d]."""
    if cu_seqlens is not None and q.is_cuda:
        return varlen_attention(q, k, v, cu_seqlens, max_seqlen)
    return sdpa_attention(q, k, v, cu_seqlens, key_mask)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen):
    """FlashAttention varlen kernels on CUDA (flash_attn, else torch's own)."""
    b, s, h, d = q.shape
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())  # host sync; callers pass it
    q, k, v = (t.reshape(b * s, t.shape[2], d) for t in (q, k, v))  # [tokens, heads, d]
    flash = _flash_attn_varlen()
    if flash is not None:
        out = flash(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True)
        out = out[0] if isinstance(out, tuple) else out  # FA3 returns (out, lse)
    elif (tv := _torch_varlen()) is not None:
        varlen_attn, causal, has_gqa = tv
        if h != k.shape[1] and not has_gqa:
            k, v = (t.repeat_interleave(h // t.shape[1], dim=1) for t in (k, v))
        gqa = {"enable_gqa": True} if has_gqa and h != k.shape[1] else {}
        out = varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **causal, **gqa)
    else:
        return sdpa_attention(*(t.view(b, s, t.shape[1], d) for t in (q, k, v)), cu_seqlens)
    return out.view(b, s, h, d)


def sdpa_attention(q, k, v, cu_seqlens=None, key_mask=None):
    """The reference: SDPA, with a block-diagonal causal mask for packed rows."""
    s, sk = q.shape[1], k.shape[1]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, heads, s, d]
    gqa = q.shape[1] != k.shape[1]
    if cu_seqlens is not None:
        mask = packed_causal_mask(cu_seqlens, s)  # [s, s]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    elif sk == s and key_mask is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        # The queries are the last s of sk positions: query i sees keys up to sk - s + i.
        mask = torch.ones(s, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - s)
        if key_mask is not None:  # [b, 1, s, sk]: padding hidden from every query but its own
            own = torch.arange(sk, device=q.device)[None, :] == torch.arange(sk - s, sk, device=q.device)[:, None]
            mask = mask & (key_mask[:, None, None, :] | own)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return out.transpose(1, 2)  # [b, s, heads, d]


def packed_causal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Boolean [total, total] mask: token i attends to j when both are in one example and j <= i."""
    idx = torch.arange(total, device=cu_seqlens.device)
    example = torch.searchsorted(cu_seqlens[1:].to(idx.dtype), idx, right=True)  # [total]
    same = example[:, None] == example[None, :]
    return same & (idx[None, :] <= idx[:, None])
