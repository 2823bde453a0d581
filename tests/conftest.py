import pytest
import torch

# The test models are tiny: one thread avoids threading overhead and contention on small machines.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
