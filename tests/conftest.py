"""Test setup: offline, CPU, hermetic caches (no user cache or weights are read)."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory):
    """A cache folder shared by the whole session (smoke Inception weights are generated once)."""
    return tmp_path_factory.mktemp("vfmbench-cache")


@pytest.fixture(scope="session", autouse=True)
def _hermetic_env(session_cache, tmp_path_factory):
    """Session-wide, so that module-scoped fixtures (end-to-end runs) see it too."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VFMBENCH_CACHE_DIR", str(session_cache))
        mp.setenv("TORCH_HOME", str(tmp_path_factory.getbasetemp() / "torch-home"))
        mp.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf-home"))
        # Only built-in plugins, whatever else is installed on the machine; tests that exercise
        # third-party loading set these themselves.
        mp.setenv("VFMBENCH_LOAD_PLUGINS", "")
        mp.delenv("VFMBENCH_DISABLE_PLUGINS", raising=False)
        yield


@pytest.fixture
def host():
    from vfmbench.plugins import get_plugin_manager

    return get_plugin_manager()


@pytest.fixture
def one_thread():
    """One intra-op torch thread for the test, restored after: small tensors run faster so, and
    stay robust when other jobs share the cores. A module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
