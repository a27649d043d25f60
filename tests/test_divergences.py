"""Tests of kd.divergences against independent test vectors (docs/spec.md sections 1 and 5)
and properties that every divergence must have."""

from __future__ import annotations

import math

import pytest
import torch

from kd import divergences as D
from kd.divergences import (
    JSD,
    TVD,
    ForwardKL,
    ReverseKL,
    SkewForwardKL,
    SkewReverseKL,
    forward_kl,
    jsd,
    reduce,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    tvd,
)
from kd.signals import compute_dtype

@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # tiny tensors: intra-op threads only add contention on a shared machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


P_T = [0.7, 0.2, 0.1]
P_S = [0.2, 0.5, 0.3]


def _log64(p: list[float]) -> torch.Tensor:
    return torch.tensor(p, dtype=torch.float64).log()


# (id, function, shape params, module factory)
CASES = [
    ("forward_kl", forward_kl, {}, lambda **kw: ForwardKL(**kw)),
    ("reverse_kl", reverse_kl, {}, lambda **kw: ReverseKL(**kw)),
    ("jsd_0", jsd, {"beta": 0.0}, lambda **kw: JSD(beta=0.0, **kw)),
    ("jsd_0.1", jsd, {"beta": 0.1}, lambda **kw: JSD(beta=0.1, **kw)),
    ("jsd_0.5", jsd, {"beta": 0.5}, lambda **kw: JSD(beta=0.5, **kw)),
    ("jsd_0.9", jsd, {"beta": 0.9}, lambda **kw: JSD(beta=0.9, **kw)),
    ("jsd_1", jsd, {"beta": 1.0}, lambda **kw: JSD(beta=1.0, **kw)),
    ("skew_fkl_0.1", skew_forward_kl, {"alpha": 0.1}, lambda **kw: SkewForwardKL(alpha=0.1, **kw)),
    ("skew_rkl_0.1", skew_reverse_kl, {"alpha": 0.1}, lambda **kw: SkewReverseKL(alpha=0.1, **kw)),
    ("skew_rkl_0.5", skew_reverse_kl, {"alpha": 0.5}, lambda **kw: SkewReverseKL(alpha=0.5, **kw)),
    ("tvd", tvd, {}, lambda **kw: TVD(**kw)),
]
IDS = [c[0] for c in CASES]
FNS = [pytest.param(c[1], c[2], id=c[0]) for c in CASES]


def _rand(shape, seed, scale=2.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _rand_mask(shape, seed):
    g = torch.Generator().manual_seed(seed + 1000)
    m = torch.rand(shape, generator=g) > 0.35
    m.view(-1)[0] = True  # at least one valid position
    return m


# --------------------------------------------------------------- docs/spec.md section 5


def test_gkd_vectors_float64():
    s, t = _log64(P_S), _log64(P_T)
    assert forward_kl(s, t).item() == pytest.approx(0.583815, abs=2e-6)
    assert reverse_kl(s, t).item() == pytest.approx(0.537176, abs=2e-6)
    for beta, expected in [(0.1, 0.050995), (0.5, 0.132918), (0.9, 0.047864)]:
        assert jsd(s, t, beta=beta).item() == pytest.approx(expected, abs=2e-6), beta


def test_gkd_vectors_near_endpoints_float64():
    s, t = _log64(P_S), _log64(P_T)
    out = jsd(s, t, beta=1e-4)
    assert out.dtype == torch.float64
    assert out.item() / 1e-4 == pytest.approx(0.583737, abs=1e-5)
    assert jsd(s, t, beta=1 - 1e-4).item() / 1e-4 == pytest.approx(0.537116, abs=1e-5)


def test_gkd_vectors_float32():
    s, t = _log64(P_S).float(), _log64(P_T).float()
    assert forward_kl(s, t).dtype == torch.float32
    assert forward_kl(s, t).item() == pytest.approx(0.583815, abs=1e-5)
    assert reverse_kl(s, t).item() == pytest.approx(0.537176, abs=1e-5)
    assert jsd(s, t, beta=0.5).item() == pytest.approx(0.132918, abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_jsd_endpoints_equal_kl_exactly(dtype):
    s, t = _rand((3, 4, 9), 0, dtype=dtype), _rand((3, 4, 9), 1, dtype=dtype)
    for red in D.REDUCTIONS:
        assert torch.equal(jsd(s, t, beta=0.0, reduction=red), forward_kl(s, t, reduction=red))
        assert torch.equal(jsd(s, t, beta=1.0, reduction=red), reverse_kl(s, t, reduction=red))
        # also at an integer-typed beta coming from a config
        assert torch.equal(jsd(s, t, beta=1, reduction=red), reverse_kl(s, t, reduction=red))


@pytest.mark.parametrize("beta", [0.0, 1e-4, 0.1, 0.5, 0.9, 1 - 1e-4, 1.0])
def test_jsd_identical_is_zero(beta):
    z = _log64(P_T)
    assert jsd(z, z, beta=beta).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_disjoint_one_hots(beta):
    s = torch.tensor([20.0, -20.0], dtype=torch.float64)
    t = torch.tensor([-20.0, 20.0], dtype=torch.float64)
    # disjoint supports: KL(P||M) = -log(beta), KL(Q||M) = -log(1-beta)
    expected = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
    assert jsd(s, t, beta=beta).item() == pytest.approx(expected, abs=1e-4)
    if beta == 0.5:
        assert jsd(s, t, beta=beta).item() == pytest.approx(math.log(2), abs=1e-4)
        # same in float32
        assert jsd(s.float(), t.float()).item() == pytest.approx(math.log(2), abs=1e-4)


# --------------------------------------------------------------- docs/spec.md section 1


def test_hinton_vector_temperature_2():
    z_s = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64, requires_grad=True)
    z_t = torch.tensor([[3.0, 2.0, 1.0]], dtype=torch.float64)
    kl = forward_kl(z_s, z_t, temperature=2.0)
    assert kl.item() == pytest.approx(0.320157, abs=2e-6)
    loss = 2.0**2 * kl
    assert loss.item() == pytest.approx(1.280627, abs=2e-6)
    loss.backward()
    torch.testing.assert_close(
        z_s.grad, torch.tensor([[-0.640313, 0.0, 0.640313]], dtype=torch.float64), atol=2e-6, rtol=0
    )


def test_temperature_divides_both_logits():
    s, t = _rand((5, 7), 2), _rand((5, 7), 3)
    for _, fn, kw, _m in CASES:
        torch.testing.assert_close(fn(s, t, temperature=3.0, **kw), fn(s / 3.0, t / 3.0, **kw))


# --------------------------------------------------------------------------- skew KL, TVD


def test_tvd_hand_vector():
    assert tvd(_log64(P_S), _log64(P_T)).item() == pytest.approx(0.5, abs=1e-12)
    # 0.5 * (|.5-.25| + |.5-.75|)
    s = torch.tensor([0.5, 0.5], dtype=torch.float64).log()
    t = torch.tensor([0.25, 0.75], dtype=torch.float64).log()
    assert tvd(s, t).item() == pytest.approx(0.25, abs=1e-12)


def test_skew_alpha_zero_equals_kl():
    s, t = _rand((4, 6), 4), _rand((4, 6), 5)
    assert torch.equal(skew_forward_kl(s, t, alpha=0.0), forward_kl(s, t))
    assert torch.equal(skew_reverse_kl(s, t, alpha=0.0), reverse_kl(s, t))


@pytest.mark.parametrize("alpha", [0.1, 0.5])
def test_skew_hand_values(alpha):
    p, q = P_T, P_S  # P = teacher, Q = student
    mix_f = [alpha * pi + (1 - alpha) * qi for pi, qi in zip(p, q)]
    expected_f = sum(pi * math.log(pi / mi) for pi, mi in zip(p, mix_f))
    mix_r = [alpha * qi + (1 - alpha) * pi for pi, qi in zip(p, q)]
    expected_r = sum(qi * math.log(qi / mi) for qi, mi in zip(q, mix_r))
    s, t = _log64(P_S), _log64(P_T)
    assert skew_forward_kl(s, t, alpha=alpha).item() == pytest.approx(expected_f, abs=1e-10)
    assert skew_reverse_kl(s, t, alpha=alpha).item() == pytest.approx(expected_r, abs=1e-10)
    if alpha == 0.1:  # numbers computed by hand: mix_f = [.25, .47, .28], mix_r = [.65, .23, .12]
        assert expected_f == pytest.approx(0.446889, abs=1e-6)
        assert expected_r == pytest.approx(0.427420, abs=1e-6)


# --------------------------------------------------------------------------- properties


@pytest.mark.parametrize("fn,kw", FNS)
def test_zero_on_identical(fn, kw):
    z = _rand((3, 5, 11), 6, scale=4.0)
    assert fn(z, z.clone(), **kw).abs().item() < 1e-6
    assert fn(z, z.clone(), reduction="none", **kw).abs().max().item() < 1e-6


@pytest.mark.parametrize("fn,kw", FNS)
def test_non_negative(fn, kw):
    for seed, scale in [(7, 1.0), (8, 5.0), (9, 15.0)]:
        s, t = _rand((4, 6, 13), seed, scale), _rand((4, 6, 13), seed + 50, scale)
        vals = fn(s, t, reduction="none", **kw)
        assert vals.shape == (4, 6)
        assert (vals >= -1e-6).all()
        assert vals.max().item() > 1e-3


@pytest.mark.parametrize("fn,kw", FNS)
def test_masked_positions_change_neither_value_nor_gradient(fn, kw):
    shape = (3, 5, 8)
    mask = _rand_mask(shape[:-1], 10)
    assert (~mask).any()
    s0, t0 = _rand(shape, 11), _rand(shape, 12)

    def run(s_val, t_val, reduction):
        s = s_val.clone().requires_grad_(True)
        t = t_val.clone().requires_grad_(True)
        out = fn(s, t, mask, temperature=1.5, reduction=reduction, **kw)
        out.sum().backward()
        return out.detach(), s.grad, t.grad

    bad_values = [_rand(shape, 13, 30.0), torch.full(shape, float("nan")), torch.full(shape, float("inf"))]
    for reduction in D.REDUCTIONS:
        ref = run(s0, t0, reduction)
        assert torch.isfinite(ref[0]).all()
        assert (ref[1][~mask] == 0).all() and (ref[2][~mask] == 0).all()
        if reduction == "none":
            assert (ref[0][~mask] == 0).all()
        for bad in bad_values:
            s1 = torch.where(mask.unsqueeze(-1), s0, bad)
            t1 = torch.where(mask.unsqueeze(-1), t0, -bad)
            got = run(s1, t1, reduction)
            for a, b in zip(ref, got):
                assert torch.equal(a, b), reduction


@pytest.mark.parametrize("fn,kw", FNS)
def test_mean_is_sum_over_count(fn, kw):
    shape = (4, 6, 9)
    s, t = _rand(shape, 14), _rand(shape, 15)
    mask = _rand_mask(shape[:-1], 16)
    torch.testing.assert_close(fn(s, t, mask, **kw), fn(s, t, mask, reduction="sum", **kw) / mask.sum())
    torch.testing.assert_close(fn(s, t, **kw), fn(s, t, reduction="sum", **kw) / 24)
    # 0/1 integer masks behave like bool masks
    torch.testing.assert_close(fn(s, t, mask.long(), **kw), fn(s, t, mask, **kw))


@pytest.mark.parametrize("fn,kw", FNS)
def test_seq_mean_by_hand(fn, kw):
    shape = (4, 5, 7)
    s, t = _rand(shape, 17), _rand(shape, 18)
    mask = _rand_mask(shape[:-1], 19)
    mask[2] = False  # a sequence without valid positions is skipped
    vals = fn(s, t, reduction="none", **kw).tolist()
    per_seq = []
    for b in range(shape[0]):
        valid = [vals[b][i] for i in range(shape[1]) if mask[b, i]]
        if valid:
            per_seq.append(sum(valid) / len(valid))
    expected = sum(per_seq) / len(per_seq)
    assert fn(s, t, mask, reduction="seq_mean", **kw).item() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    # without a mask: mean of per-sequence means == plain mean (equal lengths)
    torch.testing.assert_close(fn(s, t, reduction="seq_mean", **kw), fn(s, t, **kw))


@pytest.mark.parametrize("fn,kw", FNS)
def test_bf16_inputs_give_fp32_loss_and_finite_grads(fn, kw):
    shape = (2, 3, 16)
    s = _rand(shape, 20, 8.0, torch.bfloat16).requires_grad_(True)
    t = _rand(shape, 21, 8.0, torch.bfloat16)
    mask = _rand_mask(shape[:-1], 22)
    out = fn(s, t, mask, temperature=2.0, **kw)
    assert out.dtype == torch.float32
    out.backward()
    assert s.grad.dtype == torch.bfloat16 and torch.isfinite(s.grad).all()
    # the upcast is exact, so the loss equals the fp32 loss of the same values
    assert torch.equal(out.detach(), fn(s.detach().float(), t.float(), mask, temperature=2.0, **kw))


@pytest.mark.parametrize("dtype,expected", [(torch.float16, torch.float32), (torch.float32, torch.float32), (torch.float64, torch.float64)])
def test_compute_dtype(dtype, expected):
    s, t = _rand((2, 5), 23, dtype=dtype), _rand((2, 5), 24, dtype=dtype)
    for _, fn, kw, _m in CASES:
        assert fn(s, t, **kw).dtype == expected
    assert compute_dtype(s, t.double()) == torch.float64


@pytest.mark.parametrize("fn,kw", FNS)
def test_neg_inf_logits_in_both_models(fn, kw):
    # vocabulary padding rows set to -inf in both models
    s0, t0 = _rand((3, 6), 25), _rand((3, 6), 26)
    pad = torch.full((3, 2), float("-inf"))
    for dtype in (torch.float32, torch.float64):
        s = torch.cat([s0, pad], -1).to(dtype).requires_grad_(True)
        t = torch.cat([t0, pad], -1).to(dtype).requires_grad_(True)
        out = fn(s, t, temperature=0.7, **kw)
        assert torch.isfinite(out)
        out.backward()
        assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()
        assert (s.grad[:, 6:] == 0).all()
        # same value as on the sliced (true) vocabulary
        torch.testing.assert_close(out.detach(), fn(s0.to(dtype), t0.to(dtype), temperature=0.7, **kw))


def test_neg_inf_teacher_only_forward_kl():
    # teacher puts zero mass where the student does not: forward KL stays finite
    s = torch.tensor([[0.0, 1.0, 2.0]], requires_grad=True)
    t = torch.tensor([[float("-inf"), 1.0, 2.0]])
    for fn, kw in [(forward_kl, {}), (jsd, {"beta": 0.5}), (skew_forward_kl, {"alpha": 0.1}), (tvd, {})]:
        s.grad = None
        out = fn(s, t, **kw)
        out.backward()
        assert torch.isfinite(out) and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("fn,kw", FNS)
def test_all_masked_gives_zero_not_nan(fn, kw):
    s = _rand((2, 3, 5), 27).requires_grad_(True)
    t = _rand((2, 3, 5), 28)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    for reduction in ("mean", "sum", "seq_mean"):
        out = fn(s, t, mask, reduction=reduction, **kw)
        assert out.item() == 0.0
        (g,) = torch.autograd.grad(out, s)
        assert (g == 0).all()


def test_leading_shapes():
    s, t = _rand((5,), 29), _rand((5,), 30)  # a single position
    assert forward_kl(s, t, reduction="none").shape == ()
    s, t = _rand((2, 3, 4, 5), 31), _rand((2, 3, 4, 5), 32)
    assert jsd(s, t, reduction="none").shape == (2, 3, 4)
    assert jsd(s, t, reduction="seq_mean").shape == ()


# --------------------------------------------------------------------------- reduce


def test_reduce_hand_values():
    v = torch.tensor([[1.0, 2.0, float("nan")], [float("inf"), 5.0, 6.0], [7.0, 8.0, 9.0]], requires_grad=True)
    m = torch.tensor([[True, True, False], [False, False, False], [False, True, True]])
    assert reduce(v, m, "sum").item() == 1 + 2 + 8 + 9
    assert reduce(v, m, "mean").item() == pytest.approx(20 / 4)
    assert reduce(v, m, "seq_mean").item() == pytest.approx((1.5 + 8.5) / 2)
    none = reduce(v, m, "none")
    assert torch.equal(none, torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [0.0, 8.0, 9.0]]))
    (g,) = torch.autograd.grad(reduce(v, m, "mean"), v)
    assert torch.equal(g, m.float() / 4)
    (g,) = torch.autograd.grad(reduce(v, m, "seq_mean"), v)
    assert torch.equal(g, torch.tensor([[0.25, 0.25, 0.0], [0.0, 0.0, 0.0], [0.0, 0.25, 0.25]]))
    assert reduce(torch.tensor([1.0, 2.0, 3.0])).item() == 2.0
    assert reduce(torch.zeros(0)).item() == 0.0


# --------------------------------------------------------------------------- errors


def test_shape_mismatch_error_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 5\).*\(2, 6\).*slice"):
        forward_kl(torch.zeros(2, 5), torch.zeros(2, 6))


@pytest.mark.parametrize("fn,kw", FNS)
def test_input_errors(fn, kw):
    s, t = torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match=r"\(2, 4\)"):
        fn(s, t, torch.ones(2, 4, dtype=torch.bool), **kw)
    for bad_t in (0.0, -1.0):
        with pytest.raises(ValueError, match=rf"temperature must be > 0 \(got {bad_t}\)"):
            fn(s, t, temperature=bad_t, **kw)
    with pytest.raises(ValueError, match=r"'avg'.*'mean'.*'seq_mean'"):
        fn(s, t, reduction="avg", **kw)
    with pytest.raises(ValueError, match="seq_mean"):
        fn(torch.zeros(3, 4), torch.zeros(3, 4), reduction="seq_mean", **kw)


@pytest.mark.parametrize("beta", [-0.1, 1.5, float("nan")])
def test_bad_beta(beta):
    with pytest.raises(ValueError, match=rf"beta must be in \[0, 1\] \(got {beta}\)"):
        jsd(torch.zeros(2, 3), torch.zeros(2, 3), beta=beta)
    with pytest.raises(ValueError, match=rf"got {beta}"):
        JSD(beta=beta)


@pytest.mark.parametrize("alpha", [-0.1, 1.0, 2.0])
def test_bad_alpha(alpha):
    z = torch.zeros(2, 3)
    for fn, cls in [(skew_forward_kl, SkewForwardKL), (skew_reverse_kl, SkewReverseKL)]:
        with pytest.raises(ValueError, match=rf"alpha must be in \[0, 1\) \(got {alpha}\)"):
            fn(z, z, alpha=alpha)
        with pytest.raises(ValueError, match=rf"got {alpha}"):
            cls(alpha=alpha)


def test_bad_reduction_in_module_init():
    for factory in [c[3] for c in CASES]:
        with pytest.raises(ValueError, match="'batchmean'"):
            factory(reduction="batchmean")


# --------------------------------------------------------------------------- modules


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_modules_equal_functions(case):
    _, fn, kw, factory = case
    shape = (3, 4, 10)
    s, t = _rand(shape, 33), _rand(shape, 34)
    mask = _rand_mask(shape[:-1], 35)
    for reduction in D.REDUCTIONS:
        module = factory(reduction=reduction)
        assert isinstance(module, D.Divergence) and isinstance(module, torch.nn.Module)
        assert torch.equal(
            module(s, t, mask, temperature=1.7), fn(s, t, mask, temperature=1.7, reduction=reduction, **kw)
        )
        assert torch.equal(module(s, t), fn(s, t, reduction=reduction, **kw))


def test_module_names_and_repr():
    assert [ForwardKL.name, ReverseKL.name, JSD.name, SkewForwardKL.name, SkewReverseKL.name, TVD.name] == [
        "forward_kl",
        "reverse_kl",
        "jsd",
        "skew_forward_kl",
        "skew_reverse_kl",
        "tvd",
    ]
    assert repr(JSD(beta=0.9)) == "JSD(beta=0.9, reduction='mean')"
    assert repr(SkewReverseKL(alpha=0.2, reduction="seq_mean")) == "SkewReverseKL(alpha=0.2, reduction='seq_mean')"
    assert repr(ForwardKL(reduction="sum")) == "ForwardKL(reduction='sum')"
    with pytest.raises(TypeError):
        D.Divergence()  # abstract


def test_hydra_instantiate():
    hydra_utils = pytest.importorskip("hydra.utils")
    module = hydra_utils.instantiate({"_target_": "kd.divergences.JSD", "beta": 0.1})
    assert isinstance(module, JSD) and module.beta == 0.1
    with pytest.raises(Exception, match=r"got 1\.5"):
        hydra_utils.instantiate({"_target_": "kd.divergences.JSD", "beta": 1.5})
