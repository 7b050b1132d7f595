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


@pytest.fixture(autouse=True)
def _hermetic_env(monkeypatch, session_cache, tmp_path_factory):
    monkeypatch.setenv("VFMBENCH_CACHE_DIR", str(session_cache))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.getbasetemp() / "torch-home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf-home"))
    # Only built-in plugins, whatever else is installed on the machine; tests that exercise
    # third-party loading set these themselves.
    monkeypatch.setenv("VFMBENCH_LOAD_PLUGINS", "")
    monkeypatch.delenv("VFMBENCH_DISABLE_PLUGINS", raising=False)


@pytest.fixture
def host():
    from vfmbench.plugins import get_plugin_manager

    return get_plugin_manager()
