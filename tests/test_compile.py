"""torch.compile(fullgraph=True) of every module and of the functional ops, and
torch.library.opcheck of every fastfusion:: custom op (schema, fake kernel, autograd
registration, AOT dispatch with dynamic shapes).

Compiling dominates the suite's run time: shapes are tiny and each test compiles once.
"""

import pytest
import torch
from torch.library import opcheck

import fastfusion as ff
from fastfusion._custom_op import SPECS

from helpers import assert_rel_close, randn, random_hashes_signs

F64 = torch.float64


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def assert_same_forward_and_backward(eager_fn, compiled_fn, inputs, params, gen):
    """Outputs and the gradients w.r.t. ``inputs`` and ``params`` agree to float64 rounding."""
    leaves = list(inputs) + list(params)
    out_eager = eager_fn(*inputs)
    out_compiled = compiled_fn(*inputs)
    assert_rel_close(out_compiled, out_eager, 1e-12, "output")
    cotangent = randn(gen, *out_eager.shape)
    grads_eager = torch.autograd.grad(out_eager, leaves, cotangent)
    grads_compiled = torch.autograd.grad(out_compiled, leaves, cotangent)
    for i, (gc, ge) in enumerate(zip(grads_compiled, grads_eager)):
        assert_rel_close(gc, ge, 1e-12, f"grad {i}")


MODULES = {
    "cbp": (lambda: ff.CompactBilinearPooling([5, 4], 7), (3,)),
    "cbp_sum_m3": (lambda: ff.CompactBilinearPooling([5, 4, 3], 7, pool="sum"), (2, 3)),
    "cbgp_mean": (lambda: ff.GatedCompactBilinearPooling([5, 4], 7, pool="mean"), (2, 3)),
    "cbgp_sigmoid": (lambda: ff.GatedCompactBilinearPooling([5, 4], 7, gate="sigmoid", normalize=False), (3,)),
    "mfb": (lambda: ff.FactorizedBilinearPooling([5, 4], 3, factor=2).eval(), (3,)),
    "lmf_m3": (lambda: ff.LowRankFusion([5, 4, 3], 6, rank=2), (3,)),
    "tfn": (lambda: ff.TensorFusion([5, 4], 6), (3,)),
}


@pytest.mark.parametrize("name", MODULES)
def test_compiled_module_matches_eager(gen, name):
    factory, lead = MODULES[name]
    module = factory().double()
    in_dims = module.in_dims
    xs = [randn(gen, *lead, n, requires_grad=True) for n in in_dims]
    compiled = torch.compile(module, fullgraph=True)
    assert_same_forward_and_backward(module, compiled, xs, list(module.parameters()), gen)


def test_compiled_module_new_batch_size(gen):
    # A second batch size recompiles (or reuses a dynamic graph): the fake kernels must
    # give the right shapes either way.
    module = ff.CompactBilinearPooling([5, 4], 7, pool="mean").double()
    compiled = torch.compile(module, fullgraph=True)
    for batch, positions in [(2, 3), (5, 4)]:
        xs = [randn(gen, batch, positions, n) for n in (5, 4)]
        assert_rel_close(compiled(*xs), module(*xs), 1e-12)


def functional_cases(gen):
    (h0, h1), (s0, s1) = random_hashes_signs(gen, [5, 4], 7)
    return {
        "count_sketch": (lambda x: ff.count_sketch(x, h0, s0, 7, backend="torch"), [randn(gen, 3, 5, requires_grad=True)]),
        "tensor_sketch_pooled": (
            lambda x, y: ff.tensor_sketch([x, y], [h0, h1], [s0, s1], 7, pool_dim=1, pool="mean", backend="torch"),
            [randn(gen, 2, 3, 5, requires_grad=True), randn(gen, 2, 3, 4, requires_grad=True)],
        ),
        "compact_bilinear_pooled_gram": (
            lambda x, y: ff.compact_bilinear([x, y], [h0, h1], [s0, s1], 7, pool_dim=1, algorithm="gram", backend="torch"),
            [randn(gen, 2, 3, 5, requires_grad=True), randn(gen, 2, 3, 4, requires_grad=True)],
        ),
        "compact_bilinear_gated": (
            lambda x, y, g: ff.compact_bilinear([x, y], [h0, h1], [s0, s1], 7, gate=g, backend="torch"),
            [randn(gen, 3, 5, requires_grad=True), randn(gen, 3, 4, requires_grad=True), (torch.rand(3, 7, generator=gen, dtype=F64) + 0.5).requires_grad_()],
        ),
        "signed_sqrt_l2": (lambda z: ff.signed_sqrt_l2(z, backend="torch"), [randn(gen, 3, 6, requires_grad=True)]),
        "factorized_bilinear": (
            lambda x, y, wx, wy, m: ff.factorized_bilinear(x, y, wx, None, wy, None, 2, dropout_mask=m, backend="torch"),
            [randn(gen, 3, 5, requires_grad=True), randn(gen, 3, 4, requires_grad=True), randn(gen, 6, 5, requires_grad=True),
             randn(gen, 6, 4, requires_grad=True), torch.full((3, 6), 2.0, dtype=F64)],
        ),
        "low_rank_fusion": (
            lambda x, y, f0, f1, w, b: ff.low_rank_fusion([x, y], [f0, f1], w, b, backend="torch"),
            [randn(gen, 3, 5, requires_grad=True), randn(gen, 3, 4, requires_grad=True), randn(gen, 2, 6, 3, requires_grad=True),
             randn(gen, 2, 5, 3, requires_grad=True), randn(gen, 1, 2, requires_grad=True), randn(gen, 1, 3, requires_grad=True)],
        ),
        "tensor_fusion": (
            lambda x, y, w, b: ff.tensor_fusion([x, y], w, b, backend="torch"),
            [randn(gen, 3, 5, requires_grad=True), randn(gen, 3, 4, requires_grad=True), randn(gen, 3, 30, requires_grad=True),
             randn(gen, 3, requires_grad=True)],
        ),
    }  # fmt: skip


FUNCTIONAL_CASES = tuple(functional_cases(torch.Generator()))  # the names; each test builds its own inputs


def test_every_public_function_has_a_compiled_case():
    # A case is named after its public function, with or without a suffix saying what it varies.
    public = {name for name in ff.ops.EXPORTS if not name.endswith("_reference")}
    covered = {p for p in public for case in FUNCTIONAL_CASES if case == p or case.startswith(f"{p}_")}
    assert covered == public, f"no torch.compile case for {sorted(public - covered)}"


@pytest.mark.parametrize("name", FUNCTIONAL_CASES)
def test_compiled_functional_op_matches_eager(gen, name):
    fn, inputs = functional_cases(gen)[name]
    differentiable = [t for t in inputs if t.requires_grad]
    compiled = torch.compile(fn, fullgraph=True)
    out_eager = fn(*inputs)
    out_compiled = compiled(*inputs)
    assert_rel_close(out_compiled, out_eager, 1e-12, "output")
    cotangent = randn(gen, *out_eager.shape)
    for i, (gc, ge) in enumerate(
        zip(torch.autograd.grad(out_compiled, differentiable, cotangent), torch.autograd.grad(out_eager, differentiable, cotangent))
    ):
        assert_rel_close(gc, ge, 1e-12, f"grad {i}")


# --------------------------------------------------------------------------- opcheck


def opcheck_cases(gen):
    """(op, args) for every forward and backward custom op, with the concrete backend "torch"."""
    (h0, h1), (s0, s1) = random_hashes_signs(gen, [5, 4], 7)
    x, y = randn(gen, 3, 5, requires_grad=True), randn(gen, 3, 4, requires_grad=True)
    xt, yt = randn(gen, 3, 2, 5, requires_grad=True), randn(gen, 3, 2, 4, requires_grad=True)
    gate = (torch.rand(3, 7, generator=gen, dtype=F64) + 0.5).requires_grad_()
    wx, bx, wy, by = (randn(gen, *s, requires_grad=True) for s in [(6, 5), (6,), (6, 4), (6,)])
    mask = torch.full((3, 6), 2.0, dtype=F64)
    factors = [randn(gen, 2, 6, 3, requires_grad=True), randn(gen, 2, 5, 3, requires_grad=True)]
    lmf_w, lmf_b = randn(gen, 2, requires_grad=True), randn(gen, 3, requires_grad=True)
    tfn_w, tfn_b = randn(gen, 3, 30, requires_grad=True), randn(gen, 3, requires_grad=True)
    g7, g6, g3 = randn(gen, 3, 7), randn(gen, 3, 2), randn(gen, 3, 3)
    ops = torch.ops.fastfusion
    d = lambda ts: [t.detach() for t in ts]  # noqa: E731  (the backward ops have no autograd)
    return {
        "count_sketch": (ops.count_sketch, (x, h0, s0, 7, "torch")),
        "count_sketch_backward": (ops.count_sketch_backward, (g7, h0, s0, "torch")),
        "compact_bilinear": (
            ops.compact_bilinear, ([xt, yt], [h0, h1], [s0, s1], 7, False, None, False, 1e-12, "fft", False, "torch")),
        "compact_bilinear_mean_gated": (
            ops.compact_bilinear, ([xt, yt], [h0, h1], [s0, s1], 7, True, gate, True, 1e-12, "fft", True, "torch")),
        "compact_bilinear_gram_mean_gated": (
            ops.compact_bilinear, ([xt, yt], [h0, h1], [s0, s1], 7, True, gate, True, 1e-12, "gram", True, "torch")),
        "compact_bilinear_backward": (
            ops.compact_bilinear_backward,
            (g7, [], d([xt, yt]), [h0, h1], [s0, s1], 7, True, gate.detach(), True, 1e-12, "fft", "torch")),
        "compact_bilinear_gram_backward": (
            ops.compact_bilinear_backward,
            (g7, [], d([xt, yt]), [h0, h1], [s0, s1], 7, False, gate.detach(), True, 1e-12, "gram", "torch")),
        "signed_sqrt_l2": (ops.signed_sqrt_l2, (x, 1e-12, "torch")),
        "signed_sqrt_l2_backward": (ops.signed_sqrt_l2_backward, (randn(gen, 3, 5), x.detach(), 1e-12, "torch")),
        "factorized_bilinear": (ops.factorized_bilinear, (x, y, wx, bx, wy, by, 3, mask, True, 1e-12, True, "torch")),
        "factorized_bilinear_no_bias": (ops.factorized_bilinear, (x, y, wx, None, wy, None, 2, None, False, 1e-12, False, "torch")),
        "factorized_bilinear_backward": (
            ops.factorized_bilinear_backward, (g6, [], *d([x, y, wx, bx, wy, by]), 3, mask, True, 1e-12, "torch")),
        "low_rank_fusion": (ops.low_rank_fusion, ([x, y], factors, lmf_w, lmf_b, True, "torch")),
        "low_rank_fusion_backward": (ops.low_rank_fusion_backward, (g3, [], d([x, y]), d(factors), lmf_w.detach(), lmf_b.detach(), "torch")),
        "tensor_fusion": (ops.tensor_fusion, ([x, y], tfn_w, tfn_b, 1, True, "torch")),
        "tensor_fusion_no_bias": (ops.tensor_fusion, ([x, y], tfn_w, None, 1, False, "torch")),
        "tensor_fusion_backward": (ops.tensor_fusion_backward, (g3, [], d([x, y]), tfn_w.detach(), None, 1, "torch")),
    }  # fmt: skip


OPCHECK_CASES = [
    "count_sketch", "count_sketch_backward", "compact_bilinear", "compact_bilinear_mean_gated",
    "compact_bilinear_gram_mean_gated", "compact_bilinear_backward", "compact_bilinear_gram_backward",
    "signed_sqrt_l2", "signed_sqrt_l2_backward", "factorized_bilinear", "factorized_bilinear_no_bias",
    "factorized_bilinear_backward", "low_rank_fusion", "low_rank_fusion_backward", "tensor_fusion", "tensor_fusion_no_bias",
    "tensor_fusion_backward",
]  # fmt: skip


def test_every_op_and_its_backward_has_an_opcheck_case():
    # OPCHECK_CASES names ops by hand: a new op (a spec) must join it, forward and backward.
    assert {op for name in SPECS for op in (name, f"{name}_backward")} <= set(OPCHECK_CASES)


def cast_floats(args, dtype):
    """The same arguments with every floating tensor (also inside lists) in ``dtype``."""
    if isinstance(args, (list, tuple)):
        return type(args)(cast_floats(a, dtype) for a in args)
    if isinstance(args, torch.Tensor) and args.is_floating_point():
        return args.detach().to(dtype).requires_grad_(args.requires_grad)
    return args


@pytest.mark.parametrize("case", OPCHECK_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_opcheck(gen, case, dtype):
    # bfloat16: the kernels compute in float32 and must return what the fake kernels
    # promise, the input's dtype.
    op, args = opcheck_cases(gen)[case]
    opcheck(op, cast_floats(args, dtype))
