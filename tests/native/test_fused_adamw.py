"""Tests of the fused AdamW op (csrc/, lima_core/native/adamw.py).

CPU: 100 steps against torch.optim.AdamW; the 16-bit copy against torch's own rounding (nearest
even) and against the definition of stochastic rounding (unbiased, between the two neighbours,
reproducible); bf16 moments against fp32 ones; torch.library.opcheck; argument errors; the
optimizer's state. GPU (`-m gpu`): the CUDA kernel against the CPU kernel, bit for bit.
"""

from copy import deepcopy

import pytest
import torch

from lima_core.native import adamw as fused_adamw
from lima_core.native.adamw import FusedAdamW

SHAPES = [(1,), (7,), (1023,), (4097,), (33, 65)]
HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def _op(param, grad, exp_avg, exp_avg_sq, copy=None, *, step=1, seed=None, **hyper):
    torch.ops.lima.fused_adamw_(param, grad, exp_avg, exp_avg_sq, copy, step=step, seed=seed, **{**HYPER, **hyper})


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


@pytest.fixture(autouse=True)
def _needs_op(request):
    if not fused_adamw.available() and request.node.name != "test_extension_is_built":
        pytest.skip(fused_adamw.unavailable_reason())


def test_extension_is_built():  # the one failure (with the reason) when the build is missing
    assert fused_adamw.available(), fused_adamw.unavailable_reason()


@pytest.mark.parametrize("betas,weight_decay", [((0.9, 0.95), 0.1), ((0.3, 0.999), 0.01)],
                         ids=["lima", "lerp-from-grad"])  # 1 - beta1 >= 0.5 takes lerp's other branch
def test_matches_torch_adamw(betas, weight_decay):
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) for s in SHAPES]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    ref = [torch.nn.Parameter(t.clone()) for t in init]
    opt = FusedAdamW(ours, lr=1e-3, betas=betas, eps=1e-8, weight_decay=weight_decay)
    opt_ref = torch.optim.AdamW(ref, lr=1e-3, betas=betas, eps=1e-8, weight_decay=weight_decay, foreach=False)
    steps = 100
    for i in range(steps):
        lr = 1e-3 - 9e-4 * i / (steps - 1)  # the trainer's schedule sets the lr of every step
        opt.param_groups[0]["lr"] = opt_ref.param_groups[0]["lr"] = lr
        for a, b in zip(ours, ref):
            g = torch.randn(a.shape, generator=gen) * 3.0
            a.grad, b.grad = g.clone(), g
        opt.step()
        opt_ref.step()

    def rel(x, y):
        return float(((x - y).abs() / y.abs().clamp_min(1e-30)).max())

    def norm_rel(x, y):
        return float((x - y).double().norm() / y.double().norm())

    print(f"\n100 steps vs torch.optim.AdamW: param relative error "
          f"{max(norm_rel(a.data, b.data) for a, b in zip(ours, ref)):.1e} "
          f"(2-norm), {max(rel(a.data, b.data) for a, b in zip(ours, ref)):.1e} (worst element); exp_avg_sq "
          f"{max(rel(opt.state[a]['exp_avg_sq'], opt_ref.state[b]['exp_avg_sq']) for a, b in zip(ours, ref)):.1e}, "
          f"exp_avg bit-equal: "
          f"{all(torch.equal(opt.state[a]['exp_avg'], opt_ref.state[b]['exp_avg']) for a, b in zip(ours, ref))}")
    for a, b in zip(ours, ref):
        s, r = opt.state[a], opt_ref.state[b]
        # torch's CPU sqrt is off by an ulp in ~16% of elements (ours is correctly rounded): each
        # step's update (|update| <~ lr) may differ by ~2^-23 of itself, <= steps * lr * 2^-22 in all.
        torch.testing.assert_close(a.data, b.data, rtol=1e-6, atol=steps * 1e-3 * 2**-22)
        # exp_avg can cancel to ~0 from O(1) terms: allow an ulp of those terms (FMA use differs by build).
        torch.testing.assert_close(s["exp_avg"], r["exp_avg"], rtol=1e-6, atol=2**-22)
        torch.testing.assert_close(s["exp_avg_sq"], r["exp_avg_sq"], rtol=1e-6, atol=0.0)  # positive: relative
        assert int(s["step"]) == steps


def test_bf16_grad_is_upcast():
    gen = torch.Generator().manual_seed(1)
    grad = torch.randn(4097, generator=gen).bfloat16()
    p = torch.randn(4097, generator=gen)
    outs = []
    for g in (grad, grad.float()):
        state = [p.clone(), torch.full_like(p, 0.1), torch.full_like(p, 0.2)]
        _op(state[0], g, state[1], state[2], step=3)
        outs.append(state)
    for a, b in zip(*outs):
        assert torch.equal(_bits(a), _bits(b))


def _edge_values() -> torch.Tensor:
    """Random fp32 bit patterns (every exponent), exact ties, subnormals and overflow bounds; no NaN."""
    gen = torch.Generator().manual_seed(2)
    bits = torch.randint(-2**31, 2**31, (1 << 16,), dtype=torch.int64, generator=gen).to(torch.int32)
    ties = (torch.randint(0, 2**15, (4096,), dtype=torch.int32, generator=gen) << 16) | 0x8000  # bf16 ties
    ties16 = (torch.randint(0x3880, 0x4780, (4096,), dtype=torch.int32, generator=gen) << 16) | 0x1000  # fp16
    x = torch.cat([bits.view(torch.float32), ties.view(torch.float32), ties16.view(torch.float32),
                   torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 65504.0, 65519.996, 65520.0, 65536.0,
                                 2.0**-24, 2.0**-25, 1.5 * 2.0**-25, 2.0**-14, 1e-45, -3e-39, 3.4e38])])
    return x[~x.isnan()]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_copy_rounds_to_nearest_even(dtype):
    # Edge values: lr = 0 leaves param bit for bit as it is, so the copy is its rounding.
    x = _edge_values()
    p, copy = x.clone(), torch.empty(x.shape, dtype=dtype)
    _op(p, torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p), copy, lr=0.0, weight_decay=0.0)
    assert torch.equal(_bits(p), _bits(x))
    assert torch.equal(_bits(copy), _bits(x.to(dtype)))
    # Real steps: after each, the copy is the new master rounded.
    gen = torch.Generator().manual_seed(3)
    master = torch.nn.Parameter(torch.randn(4097, generator=gen))
    copy = torch.empty(4097, dtype=dtype)
    opt = FusedAdamW([master], lr=1e-2, weight_decay=0.1, copies={master: copy})
    for _ in range(5):
        master.grad = torch.randn(4097, generator=gen)
        opt.step()
        assert torch.equal(_bits(copy), _bits(master.detach().to(dtype)))


def _neighbours(x: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The representable values of `dtype` just below and above |x| (sign of x), as fp32."""
    near = x.to(dtype)
    up = near.float().abs() < x.abs()  # nearest is below |x|: the other one is the next magnitude up
    other = _bits(near) + torch.where(up, 1, -1).to(torch.int16)  # sign-magnitude: +-1 moves |value|
    other = torch.where(near.float() == x, _bits(near), other).view(dtype)
    lo = torch.where(up, near, other).float()
    hi = torch.where(up, other, near).float()
    return lo, hi


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_unbiased(dtype):
    gen = torch.Generator().manual_seed(4)
    scale = 2.0 ** torch.randint(-30 if dtype == torch.float16 else -60, 15, (512,), generator=gen)
    values = torch.randn(512, generator=gen) * scale  # fp16: down into its subnormals
    values[:8] = values[:8].to(dtype).float()  # exactly representable: always themselves
    repeats, seeds = 64, 200
    x = values.repeat_interleave(repeats)  # [512 * 64]: each value at 64 element indices
    lo, hi = _neighbours(x, dtype)
    total = torch.zeros(x.shape, dtype=torch.float64)
    zeros = torch.zeros_like(x)
    for seed in range(seeds):
        copy = torch.empty(x.shape, dtype=dtype)
        _op(x.clone(), zeros, zeros.clone(), zeros.clone(), copy, lr=0.0, weight_decay=0.0, seed=seed)
        y = copy.float()
        assert bool(((y == lo) | (y == hi)).all()), "stochastic rounding left the two neighbours"
        total += y.double()
    n = repeats * seeds
    mean = total.view(512, repeats).sum(1) / n
    gap = (hi - lo).view(512, repeats)[:, 0].double().abs()
    frac = ((values.double() - lo.view(512, repeats)[:, 0].double()).abs() / gap).nan_to_num(0.0)
    stderr = gap * (frac * (1 - frac) / n).sqrt()
    # 5 standard errors of the mean of n Bernoulli(frac) roundings; + 2^-20 of a gap for fp16
    # subnormals, whose probabilities are exact to 2^-24 only (csrc/adamw.h).
    bound = 5 * stderr + gap * 2.0**-20
    z = ((mean - values.double()).abs() / stderr.clamp_min(1e-300))[stderr > 0]
    print(f"\n{dtype} stochastic rounding over {n} draws a value: "
          f"worst |mean - value| = {float(z.max()):.2f} standard errors")
    assert bool(((mean - values.double()).abs() <= bound).all())


def test_stochastic_rounding_is_reproducible():
    x = torch.randn(4097, generator=torch.Generator().manual_seed(5))

    def rounded(seed, step=1):
        copy = torch.empty(x.shape, dtype=torch.bfloat16)
        zeros = torch.zeros_like(x)
        _op(x.clone(), zeros, zeros.clone(), zeros.clone(), copy, lr=0.0, weight_decay=0.0, seed=seed, step=step)
        return _bits(copy)

    assert torch.equal(rounded(7), rounded(7))
    assert not torch.equal(rounded(7), rounded(8))
    assert not torch.equal(rounded(7, step=1), rounded(7, step=2))


def test_bf16_moments_track_fp32_moments():
    # beta2 = 0.999: each late step moves exp_avg_sq by ~0.1%, under half a bf16 ulp (0.2-0.4%);
    # round-to-nearest lags behind (a bias), stochastic rounding follows without one.
    gen = torch.Generator().manual_seed(6)
    init = torch.randn(4097, generator=gen)
    ours, ref = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    kw = dict(lr=1e-3, betas=(0.9, 0.999), weight_decay=0.1)
    opt16 = FusedAdamW([ours], moment_dtype=torch.bfloat16, **kw)
    opt32 = FusedAdamW([ref], **kw)
    for _ in range(100):
        g = torch.randn(4097, generator=gen) * (1 + 0.5 * torch.rand(4097, generator=gen))
        ours.grad, ref.grad = g.clone(), g
        opt16.step()
        opt32.step()
    s16, s32 = opt16.state[ours], opt32.state[ref]
    assert s16["exp_avg"].dtype == s16["exp_avg_sq"].dtype == torch.bfloat16
    v16, v32 = s16["exp_avg_sq"].double(), s32["exp_avg_sq"].double()
    rel = (v16 - v32) / v32
    # Each store adds a zero-mean error of std <= 2^-8 |v| (half a bf16 ulp); 100 steps at
    # beta2 ~ 1 keep them all: std <= sqrt(100) * 2^-8 ~ 4% per element (1.3% seen).
    assert rel.abs().max() < 0.25
    # Unbiased: the mean error is within 5 standard errors of 0 (RNE's lag is ~7 here).
    assert abs(rel.mean()) < 5 * rel.std() / rel.numel() ** 0.5
    m16, m32 = s16["exp_avg"].double(), s32["exp_avg"].double()
    # exp_avg crosses zero, so measure against its scale: beta1 = 0.9 keeps ~1/(1 - 0.9^2) stores
    # of error, std ~ 2^-8 * sqrt(5.3) ~ 1% of the scale; 15% is > 10 std.
    assert (m16 - m32).abs().max() < 0.15 * m32.pow(2).mean().sqrt()
    # Each update then differs by ~1% of lr: a random walk of ~0.1 lr after 100 steps (0.06 seen).
    torch.testing.assert_close(ours.data, ref.data, rtol=0, atol=kw["lr"])


def _sample(case: str):
    gen = torch.Generator().manual_seed(8)
    n = 1029
    p = torch.randn(n, generator=gen)
    grad = torch.randn(n, generator=gen)
    mdtype = torch.bfloat16 if "bf16-moments" in case else torch.float32
    m = torch.randn(n, generator=gen).to(mdtype)
    v = torch.rand(n, generator=gen).to(mdtype)
    copy = None
    if "bf16-grad" in case:
        grad = grad.bfloat16()
    if "copy" in case:
        copy = torch.empty(n, dtype=torch.float16 if "fp16" in case else torch.bfloat16)
    kwargs = dict(HYPER, step=5, seed=3 if "sr" in case else None)
    return (p, grad, m, v, copy), kwargs


@pytest.mark.parametrize("case", ["fp32", "bf16-grad-bf16-copy-sr", "bf16-moments-fp16-copy"])
def test_opcheck(case):
    args, kwargs = _sample(case)
    torch.library.opcheck(torch.ops.lima.fused_adamw_.default, args, kwargs)


def _bad(name):
    (p, grad, m, v, copy), kwargs = _sample("fp32")
    bad = {
        "param-dtype": lambda: dict(param=p.double()),
        "grad-dtype": lambda: dict(grad=grad.half()),
        "grad-size": lambda: dict(grad=grad[:-1]),
        "exp_avg-contiguous": lambda: dict(exp_avg=torch.zeros(2 * p.numel())[::2]),
        "exp_avg_sq-dtype": lambda: dict(exp_avg_sq=v.bfloat16()),
        "param_copy-dtype": lambda: dict(param_copy=torch.empty(p.numel())),
        "param_copy-size": lambda: dict(param_copy=torch.empty(3, dtype=torch.bfloat16)),
        "shared-memory": lambda: dict(exp_avg_sq=m),
        "step": lambda: dict(step=0),
        "beta1": lambda: dict(beta1=1.0),
    }[name]()
    args = dict(param=p, grad=grad, exp_avg=m, exp_avg_sq=v, param_copy=copy)
    kwargs.update({k: bad.pop(k) for k in list(bad) if k in kwargs})
    args.update(bad)
    return list(args.values()), kwargs


@pytest.mark.parametrize("name,match", [
    ("param-dtype", "param must be float32"),
    ("grad-dtype", "grad must be float32 or bfloat16"),
    ("grad-size", "grad has 1028 elements, param has 1029"),
    ("exp_avg-contiguous", "exp_avg must be contiguous"),
    ("exp_avg_sq-dtype", "exp_avg and exp_avg_sq must have the same dtype"),
    ("param_copy-dtype", "param_copy must be bfloat16 or float16"),
    ("param_copy-size", "param_copy has 3 elements"),
    ("shared-memory", "exp_avg and exp_avg_sq share memory"),
    ("step", "step must be >= 1"),
    ("beta1", r"beta1 must be in \[0, 1\)"),
])
def test_clear_errors(name, match):
    args, kwargs = _bad(name)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.lima.fused_adamw_(*args, **kwargs)


def test_optimizer_state_dict_round_trip():
    gen = torch.Generator().manual_seed(9)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(7,), (5, 3)]]
    grads = [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(6)]

    def run(opt, ps, steps):
        for g in steps:
            for p, gi in zip(ps, g):
                p.grad = gi.clone()
            opt.step()

    for moment_dtype in (torch.float32, torch.bfloat16):
        straight = [torch.nn.Parameter(p.detach().clone()) for p in params]
        opt = FusedAdamW(straight, moment_dtype=moment_dtype, seed=1)
        run(opt, straight, grads)

        first = [torch.nn.Parameter(p.detach().clone()) for p in params]
        opt1 = FusedAdamW(first, moment_dtype=moment_dtype, seed=1)
        run(opt1, first, grads[:3])
        saved = deepcopy(opt1.state_dict())  # as if saved and loaded
        assert all(isinstance(v, torch.Tensor) for s in saved["state"].values() for v in s.values())
        resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
        opt2 = FusedAdamW(resumed, moment_dtype=moment_dtype, seed=1)
        opt2.load_state_dict(saved)
        run(opt2, resumed, grads[3:])
        for a, b in zip(straight, resumed):
            assert torch.equal(a, b)
        assert opt2.state[resumed[0]]["exp_avg"].dtype == moment_dtype


def test_state_dict_loads_into_torch_adamw():
    """The fallback when the extension is missing resumes from our state."""
    gen = torch.Generator().manual_seed(12)
    ours = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(7,), (5, 3)]]
    opt = FusedAdamW(ours, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(3):
        for p in ours:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt_ref = torch.optim.AdamW(ref, foreach=False)
    opt_ref.load_state_dict(deepcopy(opt.state_dict()))  # as if saved and loaded
    for a, b in zip(ours, ref):
        a.grad = torch.randn(a.shape, generator=gen)
        b.grad = a.grad.clone()
    opt.step()
    opt_ref.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)  # one step: torch's sqrt ulp only
        assert int(opt_ref.state[b]["step"]) == 4


def test_optimizer_bf16_grads_and_bad_params():
    gen = torch.Generator().manual_seed(10)
    a, b = (torch.nn.Parameter(torch.randn(33, generator=gen)) for _ in range(2))
    b.data.copy_(a.data)
    g = torch.randn(33, generator=gen).bfloat16()
    oa, ob = FusedAdamW([a]), FusedAdamW([b])
    oa.step(grads={a: g})
    b.grad = g.float()
    ob.step()
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="parameter 0 must be contiguous float32"):
        FusedAdamW([torch.nn.Parameter(torch.zeros(4, 4).t())])
    with pytest.raises(ValueError, match="parameter 0 must be contiguous float32"):
        FusedAdamW([torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))])


# ---- CUDA (run on the GPU machine: pytest -m gpu) ---------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])  # vector loads, scalar loads
@pytest.mark.parametrize("case", ["fp32", "fp32-bf16-copy", "fp32-fp16-copy-sr", "bf16-grad-bf16-copy-sr",
                                  "bf16-moments-fp16-copy", "bf16-grad-bf16-moments-bf16-copy-sr"])
def test_cuda_matches_cpu_bitwise(case, offset):
    args, kwargs = _sample(case)
    n = 1_000_003  # more elements than one grid-stride round on any GPU, and a ragged tail
    args = tuple(None if t is None else t.repeat(n // t.numel() + 1)[:n].contiguous() for t in args)

    def on_cuda(t):  # a copy `offset` elements into a buffer: misaligned for vector loads when 1
        if t is None:
            return None
        out = torch.empty(t.numel() + offset, dtype=t.dtype, device="cuda")[offset:]
        out.copy_(t)
        return out

    cpu = tuple(None if t is None else t.clone() for t in args)
    cuda = tuple(on_cuda(t) for t in args)
    for step in (1, 2, 3):
        torch.ops.lima.fused_adamw_(*cpu, **dict(kwargs, step=step))
        torch.ops.lima.fused_adamw_(*cuda, **dict(kwargs, step=step))
    for a, b in zip(cpu, cuda):
        if a is not None:
            assert torch.equal(_bits(a), _bits(b.cpu()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_torch_adamw():
    gen = torch.Generator().manual_seed(11)
    init = [torch.randn(s, generator=gen).cuda() for s in SHAPES]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    ref = [torch.nn.Parameter(t.clone()) for t in init]
    opt = FusedAdamW(ours, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    opt_ref = torch.optim.AdamW(ref, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)
    for _ in range(100):
        for a, b in zip(ours, ref):
            g = torch.randn(a.shape, generator=gen).cuda()
            a.grad, b.grad = g.clone(), g
        opt.step()
        opt_ref.step()
    for a, b in zip(ours, ref):
        # Where nvcc contracts torch's kernels into FMAs is the compiler's choice: a few ulps.
        torch.testing.assert_close(a.data, b.data, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.state[a]["exp_avg"], opt_ref.state[b]["exp_avg"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.state[a]["exp_avg_sq"], opt_ref.state[b]["exp_avg_sq"], rtol=1e-5, atol=0.0)
