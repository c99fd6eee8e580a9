"""What each benchmarked kernel computes, and the providers that compute it.

A :class:`Case` is one kernel at one shape, dtype and device: its floating inputs (all
differentiated in forward+backward mode, parameters included, as in training), its
integer buffers (hashes, signs) and ``bind(f)``, the case computed by an op function ``f``
with the fastfusion signature. The same binding runs the reference, its float64
oracle, torch.compile of the reference and every fastfusion backend, so all providers
compute the same thing from the same tensors.

Providers:
- ``eager``: the best plain-PyTorch way. For count sketch that is the fastest, measured
  in the same run, of a scatter-add (the reference), a sparse matmul and a dense matmul
  with the (n, d) sketch matrix; building the matrices is setup, like drawing the hashes.
- ``compile``: ``torch.compile(fullgraph=True)`` of the reference (the scatter-add for
  count sketch).
- ``fastfusion``: the public function, backend "auto".
- one provider per concrete backend in ``fastfusion.available_backends(device)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Callable

import torch
from torch import nn

import fastfusion
from fastfusion import _custom_op, reference, testing

from .shapes import KERNELS

MODES = ("forward", "forward+backward")
# Reference-based providers; the fastfusion backends follow them.
BASELINES = ("eager", "compile")


@dataclasses.dataclass
class Case:
    kernel: str
    sizes: dict
    args: tuple[torch.Tensor, ...]
    buffers: tuple[torch.Tensor, ...]
    apply: Callable[..., torch.Tensor]  # apply(op_function, buffers, *args)
    reference: Callable
    fused: Callable
    eager_variants: dict[str, Callable]  # name -> op function with the reference's signature

    def bind(self, op_function: Callable) -> Callable[..., torch.Tensor]:
        """``fn(*args)`` computing this case with ``op_function``."""
        return functools.partial(self.apply, op_function, self.buffers)


def _randn(gen: torch.Generator | None, *shape: int, scale: float = 1.0) -> torch.Tensor:
    # Drawn on the CPU so that every device benchmarks the same numbers; without a generator,
    # for a meta case, only the shape exists.
    if gen is None:
        return torch.empty(shape, dtype=torch.float64, device="meta")
    return torch.randn(shape, generator=gen, dtype=torch.float64) * scale


def _sketch_buffers(in_dims, out_dim):
    """Hashes and signs as the modules draw them (seed 0)."""
    drawn = fastfusion.draw_hashes_and_signs(in_dims, out_dim, seed=0)
    return [h for h, _ in drawn], [s for _, s in drawn]


def _count_sketch_variants(hash: torch.Tensor, sign: torch.Tensor, out_dim: int, dtype: torch.dtype) -> dict:
    """The plain-PyTorch ways to count-sketch, each with the reference's signature."""
    n = hash.numel()
    if hash.device.type == "meta":  # sparse tensors have no meta kernels: the dense ways only
        sketch = torch.empty(n, out_dim, dtype=dtype, device="meta")
        return {"index_add": reference.count_sketch_reference, "dense_mm": lambda x, hash, sign, out_dim: x @ sketch}
    rows = torch.arange(n, device=hash.device)
    # (d, n) so that the sparse operand comes first, the layout torch.sparse.mm differentiates.
    sketch_t = torch.sparse_coo_tensor(
        torch.stack([hash, rows]), sign.to(dtype), (out_dim, n), check_invariants=True
    ).coalesce()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        sketch_t_csr = sketch_t.to_sparse_csr()
    sketch = sketch_t.to_dense().t().contiguous()
    return {
        "index_add": reference.count_sketch_reference,
        "sparse_mm": lambda x, hash, sign, out_dim: torch.sparse.mm(sketch_t_csr, x.t()).t(),
        "dense_mm": lambda x, hash, sign, out_dim: x @ sketch,
    }


# Builders: sizes, generator -> (floating inputs, integer buffers, apply(f, buffers, *args)).
# apply gets the buffers as an argument, never captures them, so that make_case alone
# places every tensor on the device.

def _count_sketch(s, gen):
    hashes, signs = _sketch_buffers([s["n"]], s["d"])
    args = (_randn(gen, s["B"], s["n"]),)
    return args, (hashes[0], signs[0]), lambda f, b, x: f(x, b[0], b[1], s["d"])


def _signed_sqrt_l2(s, gen):
    return (_randn(gen, s["B"], s["d"]),), (), lambda f, b, z: f(z)


def _compact_bilinear(pooled: bool, gated: bool):
    def build(s, gen):
        lead = (s["B"], s["T"]) if pooled else (s["B"],)
        hashes, signs = _sketch_buffers(s["n"], s["d"])
        args = tuple(_randn(gen, *lead, n) for n in s["n"])
        if gated:
            args += (_randn(gen, s["B"], s["d"]),)  # gate logits
        m = len(hashes)

        def apply(f, b, *args):
            gate = torch.softmax(args[-1], dim=-1) if gated else None
            return f(list(args[:m]), list(b[:m]), list(b[m:]), s["d"], pool_dim=1 if pooled else None, gate=gate)

        return args, (*hashes, *signs), apply

    return build


def _mfb(s, gen):
    (n_x, n_y), hidden = s["n"], s["o"] * s["k"]
    args = (
        _randn(gen, s["B"], n_x),
        _randn(gen, s["B"], n_y),
        _randn(gen, hidden, n_x, scale=n_x**-0.5),
        _randn(gen, hidden, scale=n_x**-0.5),
        _randn(gen, hidden, n_y, scale=n_y**-0.5),
        _randn(gen, hidden, scale=n_y**-0.5),
    )
    return args, (), lambda f, b, *a: f(*a, s["k"])


def _lmf(s, gen):
    dims, rank, h = s["n"], s["rank"], s["h"]
    xs = tuple(_randn(gen, s["B"], n) for n in dims)
    factors = tuple(_randn(gen, rank, n + 1, h, scale=(2 / (n + 1 + h)) ** 0.5) for n in dims)
    args = xs + factors + (_randn(gen, rank, scale=rank**-0.5), _randn(gen, h, scale=0.1))
    m = len(dims)
    return args, (), lambda f, b, *a: f(list(a[:m]), list(a[m : 2 * m]), a[2 * m], a[2 * m + 1])


def _tfn(s, gen):
    fused_dim = math.prod(n + 1 for n in s["n"])
    xs = tuple(_randn(gen, s["B"], n) for n in s["n"])
    args = xs + (_randn(gen, s["h"], fused_dim, scale=fused_dim**-0.5), _randn(gen, s["h"], scale=0.1))
    m = len(s["n"])
    return args, (), lambda f, b, *a: f(list(a[:m]), a[m], a[m + 1])


_CBP = (reference.compact_bilinear_reference, fastfusion.compact_bilinear)
# kernel -> (build, reference, fastfusion function)
_KERNELS: dict[str, tuple[Callable, Callable, Callable]] = {
    "count_sketch": (_count_sketch, reference.count_sketch_reference, fastfusion.count_sketch),
    "signed_sqrt_l2": (_signed_sqrt_l2, reference.signed_sqrt_l2_reference, fastfusion.signed_sqrt_l2),
    "cbp_vec": (_compact_bilinear(pooled=False, gated=False), *_CBP),
    "cbp_seq": (_compact_bilinear(pooled=True, gated=False), *_CBP),
    "cbgp_vec": (_compact_bilinear(pooled=False, gated=True), *_CBP),
    "mfb": (_mfb, reference.factorized_bilinear_reference, fastfusion.factorized_bilinear),
    "lmf": (_lmf, reference.low_rank_fusion_reference, fastfusion.low_rank_fusion),
    "tfn": (_tfn, reference.tensor_fusion_reference, fastfusion.tensor_fusion),
}
if set(_KERNELS) != set(KERNELS):
    raise RuntimeError(f"benchmarks.ops builds {sorted(_KERNELS)} but benchmarks.shapes has shapes for {sorted(KERNELS)}")

# kernel -> the fastfusion op it exercises (for fastfusion.selected_backend): the public
# function's name is its op's (fastfusion._custom_op.SPECS).
OP_FAMILY = {kernel: fused.__name__ for kernel, (_, _, fused) in _KERNELS.items()}
if not set(OP_FAMILY.values()) <= set(_custom_op.SPECS):
    raise RuntimeError(f"benchmarks.ops exercises {sorted(set(OP_FAMILY.values()))}, not all of them ops")


def make_case(kernel: str, sizes: dict, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Case:
    """The case on ``device``; on "meta" its floating inputs hold no values (the hashes and
    signs do, drawn as on any device, then moved)."""
    build, ref, fused = _KERNELS[kernel]
    gen = None if device.type == "meta" else torch.Generator().manual_seed(seed)
    args, buffers, apply = build(sizes, gen)
    args = tuple(a.to(device=device, dtype=dtype).requires_grad_() for a in args)
    buffers = tuple(b.to(device) for b in buffers)
    variants = {"reference": ref}
    if kernel == "count_sketch":
        variants = _count_sketch_variants(buffers[0], buffers[1], sizes["d"], dtype)
    return Case(kernel, dict(sizes), args, buffers, apply, ref, fused, variants)


def providers(device_type: str) -> tuple[str, ...]:
    """Provider names, "eager" first. A fastfusion backend named "eager" would be the
    reference itself, which the eager provider covers."""
    return BASELINES + ("fastfusion",) + tuple(b for b in fastfusion.available_backends(device_type) if b != "eager")


def forward_fn(case: Case, provider: str, *, compile_backend: str = "inductor") -> Callable[..., torch.Tensor]:
    """``fn(*case.args) -> output`` for a provider other than "eager" (see eager_fns)."""
    if provider == "compile":
        # Dynamo caches compiled code per Python code object, and every case shares
        # ``apply``'s: without a reset, later cases would hit the recompile limit and
        # silently run eagerly.
        torch._dynamo.reset()
        # fullgraph: a graph break in the reference fails this provider loudly instead of
        # quietly timing a fragmented compile.
        return torch.compile(case.bind(case.reference), backend=compile_backend, fullgraph=True)
    backend = None if provider == "fastfusion" else provider
    return case.bind(functools.partial(case.fused, backend=backend))


def formulations(case: Case) -> dict[str, Callable[..., torch.Tensor]]:
    """The op's exact plain-PyTorch formulations, each bound to the case: the reference and, for
    compact bilinear pooling of two modalities, the Gram identity (fastfusion.ops.compact_bilinear).
    benchmarks.roofline's floor is the cheapest of them."""
    found = {"reference": case.reference}
    if OP_FAMILY[case.kernel] == "compact_bilinear" and len(case.sizes["n"]) == 2:
        found["gram"] = functools.partial(fastfusion.compact_bilinear, backend="eager", algorithm="gram")
    return {name: case.bind(f) for name, f in found.items()}


def eager_fns(case: Case) -> dict[str, Callable[..., torch.Tensor]]:
    """The eager provider's candidates; the CLI keeps the fastest."""
    return {name: case.bind(f) for name, f in case.eager_variants.items()}


def runner(case: Case, fn: Callable[..., torch.Tensor], mode: str, grad_out: torch.Tensor) -> Callable[[], tuple]:
    """A no-argument callable running one ``mode`` step of ``fn`` on the case's inputs.

    "forward" runs under no_grad (inference) and returns (output,). "forward+backward"
    returns (output, *input gradients) from autograd.grad, so nothing accumulates into
    ``.grad`` between calls; every input is differentiated, parameters included. It is a
    training step: each call first marks every input as modified in place, as new data and an
    optimizer step would leave them (a version bump, no kernel), so that nothing a provider
    caches per version of its inputs (fastfusion's copy of the LMF factors) is reused across
    steps.
    """
    args = case.args
    if mode == "forward":

        def run():
            with torch.no_grad():
                return (fn(*args),)

    else:

        def run():
            for a in args:
                torch.autograd.graph.increment_version(a)
            out = fn(*args)
            return (out, *torch.autograd.grad(out, args, grad_out))

    return run


class _Apply(nn.Module):
    def __init__(self, case: Case, op_function: Callable):
        super().__init__()
        self.fn = case.bind(op_function)

    def forward(self, *args):
        return self.fn(*args)


def flops(case: Case) -> dict[str, int]:
    """FLOPs of one step per mode (fastfusion.flops' convention), counted on the reference.

    fvcore traces the forward only. The backward is counted by its adjoint math: every
    contraction here has both operands differentiated, which takes two contractions of the
    same size; every transform's adjoint is one transform of the same length; the adjoint
    of a scatter-add is a gather, which counts 0.
    """
    from fastfusion.flops import count_flops_by_kind

    kinds = count_flops_by_kind(_Apply(case, case.reference), tuple(a.detach() for a in case.args))
    forward = sum(kinds.values())
    return {"forward": forward, "forward+backward": forward + 2 * kinds["contraction"] + kinds["fft"]}


def min_bytes(case: Case, output: torch.Tensor) -> dict[str, int]:
    """Minimum memory traffic of one step per mode: every input read once and the output
    written once; forward+backward adds the output gradient read and every input's written."""
    out = output.numel() * case.args[0].element_size()
    forward = sum(t.nbytes for t in case.args + case.buffers) + out
    return {"forward": forward, "forward+backward": forward + out + sum(t.nbytes for t in case.args)}


def oracle(case: Case, seed: int = 1) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, ...]]]:
    """The output gradient to backpropagate, and per mode what ``runner`` returns, computed
    by the reference in float64 on the same inputs."""
    args64 = tuple(a.detach().double().requires_grad_() for a in case.args)
    out = case.bind(case.reference)(*args64)
    grad_out = _randn(torch.Generator().manual_seed(seed), *out.shape).to(out.device)
    grads = torch.autograd.grad(out, args64, grad_out)
    out = out.detach()
    return grad_out.to(case.args[0].dtype), {"forward": (out,), "forward+backward": (out, *grads)}


def rel_err(results: tuple[torch.Tensor, ...], oracle: tuple[torch.Tensor, ...]) -> float:
    """max over the output and the gradients of ||result - oracle|| / ||oracle||
    (fastfusion.testing.rel_err of each)."""
    return max(testing.rel_err(r, o) for r, o in zip(results, oracle))
