"""What each benchmarked kernel computes, and the providers that compute it.

A :class:`Case` is one kernel at one shape, dtype and device: its floating inputs (all
differentiated in forward+backward mode, parameters included, as in training), its
integer buffers (hashes, signs) and ``bind(f)``, the case computed by an op function ``f``
with the fastfusion signature. The same binding runs the reference, its float64
oracle, torch.compile of the reference and every fastfusion backend, so all providers
compute the same thing from the same tensors.

Providers:
- ``eager``: the best plain-PyTorch way: the reference, or the fastest, measured in the same
  run, of the eager variants the kernel's declaration gives (for count sketch a scatter-add,
  the reference, a sparse matmul and a dense matmul with the (n, d) sketch matrix; building
  the matrices is setup, like drawing the hashes).
- ``compile``: ``torch.compile(fullgraph=True)`` of the reference (the scatter-add for
  count sketch).
- ``fastfusion``: the public function, backend "auto".
- one provider per concrete backend in ``fastfusion.available_backends(device)``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import torch
from torch import nn

import fastfusion
from fastfusion import testing

from .shapes import BENCHMARKS

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


def make_case(kernel: str, sizes: dict, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Case:
    """The case of ``kernel`` (a name of benchmarks.shapes.KERNELS) on ``device``, built by its
    declaration; on "meta" its floating inputs hold no values (the hashes and signs do, drawn
    as on any device, then moved)."""
    bench = BENCHMARKS[kernel]
    gen = None if device.type == "meta" else torch.Generator().manual_seed(seed)
    args, buffers, apply = bench.build(sizes, functools.partial(_randn, gen))
    args = tuple(a.to(device=device, dtype=dtype).requires_grad_() for a in args)
    buffers = tuple(b.to(device) for b in buffers)
    variants = {"reference": bench.reference}
    if bench.eager_variants is not None:
        variants = bench.eager_variants(buffers, sizes, dtype)
    return Case(kernel, dict(sizes), args, buffers, apply, bench.reference, bench.function, variants)


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
    """The op's exact plain-PyTorch formulations, each bound to the case: the reference and
    those its declaration adds (for compact bilinear pooling of two modalities, the Gram
    identity). benchmarks.roofline's floor is the cheapest of them."""
    found = {"reference": case.reference}
    extra = BENCHMARKS[case.kernel].formulations
    if extra is not None:
        found |= extra(case.sizes)
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
