"""Independent float64 definitions of every operator, written from the math in docs/design.md
(loops over index tuples and groups rather than the library's FFTs and einsums). They are
the expected values of the tests; none of them calls fastfusion."""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

F64 = torch.float64


def dense_sketch_matrix(hash: torch.Tensor, sign: torch.Tensor, out_dim: int) -> torch.Tensor:
    """S (n, d) with S[i, h(i)] = s(i): the count sketch is x @ S."""
    S = torch.zeros(len(hash), out_dim, dtype=F64)
    for i, (h, s) in enumerate(zip(hash.tolist(), sign.tolist())):
        S[i, int(h)] = float(s)
    return S


def explicit_tensor_sketch(xs, hashes, signs, d) -> torch.Tensor:
    """Count sketch of vec(x_1 (x) ... (x) x_M) with hash (sum_m h_m(i_m)) mod d and sign
    prod_m s_m(i_m), by brute force over every index tuple (numpy, float64)."""
    lead = tuple(xs[0].shape[:-1])
    cols = [x.detach().double().reshape(-1, x.shape[-1]).numpy() for x in xs]
    hs = [h.tolist() for h in hashes]
    ss = [s.tolist() for s in signs]
    out = np.zeros((cols[0].shape[0], d))
    for idx in itertools.product(*(range(len(h)) for h in hs)):
        bucket = sum(h[i] for h, i in zip(hs, idx)) % d
        sign = math.prod(s[i] for s, i in zip(ss, idx))
        out[:, int(bucket)] += sign * np.prod([c[:, i] for c, i in zip(cols, idx)], axis=0)
    return torch.from_numpy(out).reshape(lead + (d,))


def signed_sqrt_l2_oracle(z: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """sign(z) sqrt(|z| + eps), divided by max(its L2 norm over the last dim, eps)."""
    z = z.detach().to(F64)
    s = torch.sign(z) * torch.sqrt(z.abs() + eps)
    norm = torch.sqrt((s * s).sum(-1, keepdim=True))
    return s / torch.clamp(norm, min=eps)


def mfb_oracle(x, y, weight_x, bias_x, weight_y, bias_y, factor, *, mask=None, normalize=True, eps=1e-12):
    """MFB written out: z_j = sum_{i < k} e_{j*k + i} with e = (W_x x + b_x)(W_y y + b_y) mask."""
    x, y, weight_x, weight_y = (t.detach().double() for t in (x, y, weight_x, weight_y))
    proj_x = x @ weight_x.T + (0 if bias_x is None else bias_x.detach().double())
    proj_y = y @ weight_y.T + (0 if bias_y is None else bias_y.detach().double())
    expanded = proj_x * proj_y * (1 if mask is None else mask.double())
    out_dim = weight_x.shape[0] // factor
    z = torch.zeros(x.shape[:-1] + (out_dim,), dtype=F64)
    for j in range(out_dim):
        for i in range(factor):
            z[..., j] += expanded[..., j * factor + i]
    return signed_sqrt_l2_oracle(z, eps) if normalize else z


def _with_one(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.ones(x.shape[:-1] + (1,), dtype=F64), x.detach().double()], -1)


def tfn_oracle(xs, weight, bias):
    """Sum over every index tuple (i_1, ..., i_M) of W[:, flat] * prod_m x~_m[i_m], where
    x~_m = [1; x_m] and flat counts the tuples in lexicographic (modality-0-major) order."""
    padded = [_with_one(x) for x in xs]
    weight = weight.detach().double()
    out = torch.zeros(xs[0].shape[:-1] + (weight.shape[0],), dtype=F64)
    for flat, idx in enumerate(itertools.product(*(range(p.shape[-1]) for p in padded))):
        out += math.prod(p[..., i] for p, i in zip(padded, idx)).unsqueeze(-1) * weight[:, flat]
    return out if bias is None else out + bias.detach().double()


def lmf_oracle(xs, factors, weights, bias):
    """sum_r w_r prod_m (x~_m W_m[r]) + b, one rank and one modality at a time."""
    padded = [_with_one(x) for x in xs]
    weights = weights.detach().double().reshape(-1)
    out = torch.zeros(xs[0].shape[:-1] + (bias.shape[-1],), dtype=F64) + bias.detach().double().reshape(-1)
    for r in range(weights.shape[0]):
        term = weights[r]
        for p, w in zip(padded, factors):
            term = term * (p @ w[r].detach().double())
        out += term
    return out
