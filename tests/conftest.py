import os

# Triton kernels run in the interpreter on CPU tensors; must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import lorakern  # noqa: E402


@pytest.fixture(params=lorakern.available_isas())
def isa(request):
    """Run the test once per ISA path this CPU supports, restoring the default after."""
    before = lorakern.active_isa()
    lorakern.set_isa(request.param)
    yield request.param
    lorakern.set_isa(before)


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(torch.seed() % (2**31))
