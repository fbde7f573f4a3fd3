import os

import pytest


def pytest_configure(config):
    """Under pytest-xdist, each worker's torch takes its share of the cores, not all of them: eight
    workers each running 16 threads on 16 cores spent the GPU machine's time switching threads.
    Configs a user tuned on this GPU (`steerfast tune`) are not the tests' business: the table."""
    os.environ["STEERFAST_TUNED"] = "0"
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` are skipped, not failed, where torch sees no CUDA device."""
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch  # only when a gpu test was collected: keeps build-only runs fast

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture
def seed():
    """A fresh seed per test, printed so a failure can be replayed with STEERFAST_TEST_SEED."""
    import torch

    s = int(os.environ["STEERFAST_TEST_SEED"]) if "STEERFAST_TEST_SEED" in os.environ else torch.seed()
    torch.manual_seed(s)
    print(f"seed {s} (replay: STEERFAST_TEST_SEED={s})")
    return s
