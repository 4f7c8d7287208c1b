"""Test setup: four fake CPU devices (set before jax is imported) and the ../shared fixtures."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import socket  # noqa: E402

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")


def read_jsonl(path) -> list:
    import json

    with open(path) as handle:
        return [json.loads(line) for line in handle]


def free_port() -> int:
    """A free localhost port, for a jax.distributed coordinator."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def shared_path(*parts: str) -> str:
    """A file under ../shared, or a skip saying why it is absent."""
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        pytest.skip(f"{path} is absent: the reference material in ../shared is not checked out beside the repo")
    return path


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    """A data_dir holding the generated synthetic_tiny dataset."""
    from lgmrec_jax.data import load_dataset

    data_dir = str(tmp_path_factory.mktemp("data"))
    load_dataset(data_dir, "synthetic_tiny")
    return data_dir
