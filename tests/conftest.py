"""Shared test setup: nothing may wait on an unreachable host, and everything runs on 2 CPU cores."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tiny_config_kwargs():
    """A detector small enough to build, run and round-trip in well under a second."""
    return dict(cnn_widths=[4, 8, 8], head_hidden=[8], num_samples=8)


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is fastest, and 100x faster than two when another job holds the other core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
