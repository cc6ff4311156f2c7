import os

import pytest
import torch

# Without a GPU, Triton kernels run in the interpreter. Triton reads this at kernel
# decoration time, so it must be set before any moeprec kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The suite is thousands of tiny ops: OpenMP's thread start-up costs more than it saves on them,
# and `make test` runs one pytest-xdist worker per core instead.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
