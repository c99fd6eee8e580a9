import os
import zlib

import numpy
import pytest
import torch

from helpers import TRITON_DEVICE

# Without a GPU, the Triton kernels run (and are tested) on Triton's CPU interpreter. It must
# be chosen before fastfusion, and so Triton, is imported.
if TRITON_DEVICE.type == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastfusion import _dispatch  # noqa: E402

# The suite runs thousands of tiny ops; on a loaded 2-core machine intra-op threads make
# each 5-10x slower (thread hand-offs) and tiny shapes never split across threads anyway.
torch.set_num_threads(1)


def pytest_report_header(config):
    # A log of the run then says where the Triton kernels were checked, and with what.
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    if TRITON_DEVICE.type == "cuda":
        where = f"compiled on {torch.cuda.get_device_name(TRITON_DEVICE)}"
    else:
        where = f"on the CPU, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}"
    return f"fastfusion: Triton tests {where}; torch {torch.__version__}, triton {triton_version}, numpy {numpy.__version__}"


@pytest.fixture(autouse=True)
def _restore_backend_state():
    """Every test starts and ends with the process-wide backend selection it found.

    There is no public getter, so this reads the dispatcher's private state; a test that
    leaves a ``fastfusion.backend`` context open is a bug in the test (or the library).
    """
    default, stack = _dispatch._State.default, list(_dispatch._State.stack)
    yield
    leaked = list(_dispatch._State.stack)
    _dispatch._State.default = default
    _dispatch._State.stack[:] = stack
    assert leaked == stack, f"backend context stack leaked: {leaked}"


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded from the test's id: fresh inputs per test, the same on every run."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
