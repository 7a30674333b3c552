"""torch.library registration: opcheck on every custom op, and a compiled block that calls
all of them without graph breaks (fullgraph=True)."""

import pytest
import torch

import lima_kernels
from lima_kernels.ops.dropout_add import _dropout_add_op, _dropout_bwd_op
from lima_kernels.ops.linear_cross_entropy import _linear_cross_entropy_op
from lima_kernels.ops.rms_norm import (
    _dropout_add_rms_norm_bwd_op,
    _dropout_add_rms_norm_fwd_op,
    _rms_norm_bwd_op,
    _rms_norm_fwd_op,
)
from lima_kernels.ops.rotary import _rotary_op


def _t(*shape, grad=False, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def _cases():
    z = _t(5, 24)
    return {
        "rms_norm_fwd": (_rms_norm_fwd_op, (_t(5, 24, grad=True), _t(24, grad=True), 1e-6)),
        "rms_norm_bwd": (_rms_norm_bwd_op, (_t(5, 24), _t(5, 24), _t(24), torch.rand(5) + 0.5)),
        "rotary": (_rotary_op, (_t(2, 3, 2, 8, grad=True), _t(2, 3, 8), _t(2, 3, 8), False)),
        "rotary_bwd_flag": (_rotary_op, (_t(1, 4, 1, 16, grad=True), _t(1, 4, 16), _t(1, 4, 16), True)),
        "dropout_add": (_dropout_add_op, (_t(40, grad=True), _t(40, grad=True), 0.25, 7, 3)),
        "dropout_bwd": (_dropout_bwd_op, (_t(40), 0.25, 7, 3, torch.float32)),
        "dropout_add_rms_norm_fwd": (
            _dropout_add_rms_norm_fwd_op,
            (_t(5, 24, grad=True), _t(5, 24, grad=True), _t(24, grad=True), 0.25, 7, 3, 1e-6),
        ),
        "dropout_add_rms_norm_bwd": (
            _dropout_add_rms_norm_bwd_op,
            (_t(5, 24), _t(5, 24), z, _t(24), torch.rand(5) + 0.5, 0.25, 7, 3, torch.float32, torch.float32),
        ),
        "dropout_add_rms_norm_bwd_no_dz": (
            _dropout_add_rms_norm_bwd_op,
            (None, _t(5, 24), z, _t(24), torch.rand(5) + 0.5, 0.0, 7, 3, torch.float32, torch.float32),
        ),
        "linear_cross_entropy": (
            _linear_cross_entropy_op,
            (_t(9, 16, grad=True), _t(30, 16, grad=True), torch.tensor([1, 2, -100, 4, 5, 6, 7, 29, 0]),
             -100, True, True, 4),
        ),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_opcheck(name):
    op, args = _cases()[name]
    torch.library.opcheck(op, args)


def test_compiled_block_has_no_graph_breaks():
    """One LLaMA-like sublayer chain through every public op, compiled with fullgraph=True
    (a graph break raises) on the aot_eager backend (no C++ toolchain needed), and checked
    against eager."""
    torch.manual_seed(0)
    tokens, heads, hd, hidden, vocab = 6, 2, 8, 16, 20
    w_norm = _t(hidden, grad=True)
    w_q = _t(hidden, heads * hd, grad=True)
    w_o = _t(heads * hd, hidden, grad=True)
    w_head = _t(vocab, hidden, grad=True)
    x = _t(tokens, hidden, grad=True)
    pos = torch.tensor([0, 1, 2, 0, 1, 2])
    freqs = pos[:, None].float() * torch.rand(hd // 2)  # [tokens, hd / 2]
    emb = torch.cat((freqs, freqs), -1)  # [tokens, hd]
    cos, sin = emb.cos(), emb.sin()
    labels = torch.tensor([3, -100, 5, 7, -100, 1])

    def step(x):
        h = lima_kernels.rms_norm(x, w_norm, 1e-6)
        q = (h @ w_q).view(tokens, heads, hd)  # [T, H*D] -> [T, H, D]
        q = lima_kernels.rotary(q, cos, sin)
        attn = q.reshape(tokens, heads * hd) @ w_o  # [T, H, D] -> [T, H*D] -> [T, hidden]
        res, normed = lima_kernels.dropout_add_rms_norm(attn, x, w_norm, 0.2, 5, 0, 1e-6)
        res = lima_kernels.dropout_add(normed, res, 0.1, 5, tokens * hidden)
        loss, n = lima_kernels.linear_cross_entropy(res, w_head, labels)
        return loss / n

    params = (x, w_norm, w_q, w_o, w_head)
    eager = torch.autograd.grad(step(x), params)
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(x), params)
    for a, b in zip(got, eager):
        # Same kernels on the same inputs; aot_eager runs the same ops: identical bits.
        assert torch.equal(a, b)
