"""Named benchmark shapes, per kernel and shape set.

Every kernel has one shape per set, named after the kernel (the rows of "Reference sizes" in
docs/design.md), so results stay comparable across commits and devices: the name says *what*
is measured, the set says at which size, and every result row records the sizes it actually
ran.

Sets:
- ``cuda``: the GPU sizes of docs/design.md.
- ``cpu``: the 2-core CPU sizes of docs/design.md.
- ``cpu-quick``: the CPU shapes shrunk (2-4x per dimension) so that ``--quick`` on two
  cores, torch.compile warm-up included, ends in under 3 minutes.
- ``tiny``: a few kilobytes per tensor, for testing the harness itself.

Size keys: B batch, T positions, n per-modality input dims, d sketch dim, o MFB output
dim, k MFB factor, rank LMF rank, h LMF/TFN output dim.
"""

from __future__ import annotations

from types import MappingProxyType

# Every set lists every kernel of KERNELS, in its order (a test holds it to that).
SHAPE_SETS = MappingProxyType({
    "cuda": dict(
        count_sketch=dict(B=8192, n=2048, d=16384),
        signed_sqrt_l2=dict(B=8192, d=16384),
        cbp_vec=dict(B=512, n=(2048, 2048), d=16384),
        cbp_seq=dict(B=32, T=784, n=(512, 512), d=8192),
        cbgp_vec=dict(B=512, n=(2048, 2048), d=16384),
        mfb=dict(B=4096, n=(2048, 1024), o=1000, k=5),
        lmf=dict(B=4096, n=(512, 1024, 768), rank=8, h=256),
        tfn=dict(B=4096, n=(32, 32, 64), h=128),
    ),
    "cpu": dict(
        count_sketch=dict(B=1024, n=1024, d=8192),
        signed_sqrt_l2=dict(B=1024, d=8192),
        cbp_vec=dict(B=64, n=(512, 1024), d=8192),
        cbp_seq=dict(B=8, T=49, n=(256, 256), d=4096),
        cbgp_vec=dict(B=64, n=(512, 1024), d=8192),
        mfb=dict(B=512, n=(512, 512), o=500, k=5),
        lmf=dict(B=1024, n=(32, 32, 64), rank=4, h=64),
        tfn=dict(B=256, n=(32, 32, 64), h=128),
    ),
    "cpu-quick": dict(
        count_sketch=dict(B=256, n=512, d=4096),
        signed_sqrt_l2=dict(B=256, d=4096),
        cbp_vec=dict(B=32, n=(256, 512), d=4096),
        cbp_seq=dict(B=4, T=49, n=(128, 128), d=2048),
        cbgp_vec=dict(B=32, n=(256, 512), d=4096),
        mfb=dict(B=128, n=(256, 256), o=250, k=5),
        lmf=dict(B=256, n=(32, 32, 64), rank=4, h=64),
        tfn=dict(B=64, n=(16, 16, 32), h=64),
    ),
    "tiny": dict(
        count_sketch=dict(B=4, n=16, d=32),
        signed_sqrt_l2=dict(B=4, d=32),
        cbp_vec=dict(B=4, n=(8, 12), d=32),
        cbp_seq=dict(B=2, T=3, n=(8, 12), d=31),
        cbgp_vec=dict(B=4, n=(8, 12), d=32),
        mfb=dict(B=4, n=(8, 12), o=6, k=3),
        lmf=dict(B=4, n=(3, 4, 5), rank=2, h=6),
        tfn=dict(B=4, n=(3, 4, 5), h=6),
    ),
})


# The benchmark kernels, in report order: the first set's (benchmarks.ops builds each).
KERNELS = tuple(SHAPE_SETS["cuda"])


def shape_set_for(device_type: str, quick: bool) -> str:
    """The set a CLI run uses: GPU sizes on CUDA (already fast), shrunk ones for a quick CPU run."""
    if device_type == "cuda":
        return "cuda"
    return "cpu-quick" if quick else "cpu"
