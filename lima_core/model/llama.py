"""LLaMA, from scratch, numerically equal to Hugging Face `LlamaForCausalLM`.

RMSNorm in fp32 cast back before the weight; rotate-half RoPE on HF's q/k layout (with LLaMA
3.1's "llama3" frequency scaling); grouped-query attention; SwiGLU; tied or untied head.
Training extras from LIMA: residual dropout on each sublayer's output, its rate linear in depth
from 0 at the bottom layer to `p_top` at the last, masks from a counter-based RNG keyed by
(seed, layer, sublayer) so a recomputed forward (activation checkpointing) reproduces them.

The forward takes packed rows (`cu_seqlens` marks example boundaries, positions restart per
example) or plain `[batch, seq]` ids. It knows nothing of sharding, checkpointing or kernel
choice: those are applied from outside (parallelize.py; dispatch.py picks an implementation by the
`kernels` string the model passes through).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lima_core.model import dispatch
from lima_core.model.attention import attention
from lima_core.model.shapes import ModelConfig


def rope_inv_freq(cfg: ModelConfig, device=None) -> torch.Tensor:
    """Rotary inverse frequencies [head_dim // 2], with llama3 scaling when configured."""
    exponents = torch.arange(0, cfg.head_dim, 2, dtype=torch.int64, device=device).float() / cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** exponents)
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    # LLaMA 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between
    # interpolated smoothly in 1/wavelength.
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
              / (s.high_freq_factor - s.low_freq_factor))
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    in_band = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(in_band, blended, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos and sin [*positions.shape, head_dim] for rotate-half RoPE, computed in fp32."""
    freqs = positions.float()[..., None] * inv_freq.float()  # [..., head_dim // 2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [..., head_dim]
    return emb.cos().to(dtype), emb.sin().to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, cfg: ModelConfig, kernels: str):
        super().__init__()
        self.eps, self.kernels = cfg.norm_eps, kernels
        self.weight = nn.Parameter(torch.ones(cfg.dim))

    def forward(self, x):
        return dispatch.rms_norm(x, self.weight, self.eps, self.kernels)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, kernels: str):
        super().__init__()
        self.kernels = kernels
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen, cache):
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.n_heads, self.head_dim)  # [b, s, h, d]
        k = self.wk(x).view(b, s, self.n_kv_heads, self.head_dim)  # [b, s, hkv, d]
        v = self.wv(x).view(b, s, self.n_kv_heads, self.head_dim)  # [b, s, hkv, d]
        q = dispatch.rotary(q, cos, sin, self.kernels)
        k = dispatch.rotary(k, cos, sin, self.kernels)
        key_mask = None
        if cache is not None:
            k, v = cache.update(k, v)  # [b, cached + s, hkv, d]
            key_mask = cache.key_mask(k.shape[1])  # [b, cached + s], or None without padding
        y = attention(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, key_mask=key_mask)  # [b, s, h, d]
        return self.wo(y.reshape(b, s, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w_gate = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w_up = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w_down = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, kernels: str):
        super().__init__()
        self.layer_id, self.kernels = layer_id, kernels
        self.attn_norm = RMSNorm(cfg, kernels)
        self.attn = Attention(cfg, kernels)
        self.mlp_norm = RMSNorm(cfg, kernels)
        self.mlp = MLP(cfg)
        self.dropout = 0.0
        """This layer's residual dropout rate; set by Llama.set_residual_dropout."""

    def forward(self, x, cos, sin, cu_seqlens=None, max_seqlen=None, dropout_seed=None, cache=None):
        p = self.dropout if self.training and dropout_seed is not None else 0.0
        seeds = ((dispatch.mix_seed(dropout_seed, self.layer_id, 0), dispatch.mix_seed(dropout_seed, self.layer_id, 1))
                 if p else (0, 0))
        attn_out = self.attn(self.attn_norm(x), cos, sin, cu_seqlens, max_seqlen, cache)
        # One pass: the new residual h and its normalized copy for the MLP.
        h, normed = dispatch.dropout_add_rms_norm(attn_out, x, self.mlp_norm.weight, p, seeds[0], self.mlp_norm.eps,
                                             self.kernels)
        return dispatch.dropout_add(self.mlp(normed), h, p, seeds[1], self.kernels)


class Head(nn.Module):
    """The output projection: logits, or given labels the loss through the fused linear +
    cross-entropy (no [tokens, vocab] logits on the kernel path). A tied head reads the
    embedding's weight when it is called (FSDP may have put a gathered view in its place)."""

    def __init__(self, cfg: ModelConfig, kernels: str, tied: nn.Embedding | None = None):
        super().__init__()
        self.kernels = kernels
        self.tied = (tied,) if tied is not None else ()  # a tuple, so the embedding is not registered twice
        if tied is None:
            self.weight = nn.Parameter(torch.empty(cfg.vocab_size, cfg.dim))

    def matrix(self) -> torch.Tensor:
        """[vocab, dim]: the head's own weight, or the embedding's when tied."""
        return self.tied[0].weight if self.tied else self.weight

    def forward(self, x, labels=None):
        """x [b, s, dim] -> logits [b, s, vocab]; with labels [b, s] -> (summed fp32 loss, target count)."""
        if labels is None:
            return F.linear(x, self.matrix())
        return dispatch.linear_cross_entropy(x.flatten(0, 1), self.matrix(), labels.flatten(), kernels=self.kernels)


class Llama(nn.Module):
    """kernels: "triton" (lima_kernels), "torch" (plain-torch references) or "auto" (triton on CUDA)."""

    def __init__(self, cfg: ModelConfig, kernels: str = "auto"):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i, kernels) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg, kernels)
        self.output = Head(cfg, kernels, tied=self.tok_embeddings if cfg.tie_embeddings else None)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None):
        """Random initialisation as transformers does it (see init_stds), from one generator."""
        stds = self.init_stds()
        for name, p in self.named_parameters():
            if stds[name] is None:
                p.fill_(1.0)
            else:
                p.normal_(0.0, stds[name], generator=generator)
        self.init_buffers()

    def init_stds(self) -> dict[str, float | None]:
        """Each parameter's initialisation: N(0, init_std) for linear, embedding and head
        weights; None for norm weights, which start at one."""
        stds = {}
        for prefix, module in self.named_modules():
            for name, _ in module.named_parameters(recurse=False):
                key = f"{prefix}.{name}" if prefix else name
                stds[key] = None if isinstance(module, RMSNorm) else self.cfg.init_std
        return stds

    def init_buffers(self):
        """Recompute non-persistent buffers (after building on the meta device)."""
        self.inv_freq = rope_inv_freq(self.cfg, device=self.tok_embeddings.weight.device)

    def set_residual_dropout(self, p_top: float):
        """LIMA's ramp: layer l of L drops with rate p_top * l / (L - 1)."""
        n = len(self.layers)
        for block in self.layers:
            block.dropout = p_top * block.layer_id / (n - 1) if n > 1 else p_top

    def forward(self, tokens, labels=None, *, positions=None, cu_seqlens=None, max_seqlen=None,
                dropout_seed=None, cache=None):
        """tokens [b, s] -> logits [b, s, vocab], or with labels [b, s] (-100 = ignore) ->
        (sum of token losses in fp32, number of target tokens).

        Packed rows: b == 1, `cu_seqlens` [n + 1] int32 marks the examples, `positions` [1, s]
        restart at 0 in each. `dropout_seed` (an int) turns residual dropout on in training mode.
        """
        if positions is None:
            start = 0 if cache is None else cache.length
            positions = torch.arange(start, start + tokens.shape[1], device=tokens.device).expand_as(tokens)
        x = self.tok_embeddings(tokens)  # [b, s, dim]
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)  # [b, s, head_dim]
        for block in self.layers:
            x = block(x, cos, sin, cu_seqlens, max_seqlen, dropout_seed,
                      None if cache is None else cache.layer(block.layer_id))
        if cache is not None:
            cache.advance(tokens.shape[1])
        return self.output(self.norm(x), labels)

    @torch.no_grad()
    def resize_vocab(self, vocab_size: int):
        """Grow the embedding (and head) to vocab_size rows; new rows are the mean of the old ones,
        so a new special token starts as an average token rather than noise."""
        old = self.cfg.vocab_size
        if vocab_size <= old:
            return
        def grown(weight):
            extra = weight.float().mean(0, keepdim=True).expand(vocab_size - old, -1).to(weight.dtype)
            return nn.Parameter(torch.cat([weight, extra]), requires_grad=weight.requires_grad)
        self.tok_embeddings.weight = grown(self.tok_embeddings.weight)
        self.tok_embeddings.num_embeddings = vocab_size
        if not self.output.tied:
            self.output.weight = grown(self.output.weight)
        self.cfg.vocab_size = vocab_size
