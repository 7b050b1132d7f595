"""The worked examples of docs/plugins.md run: every complete snippet loads as a plugin next to the
built-ins and its components pass the contract checks (the tokenizer and VFM examples are abridged
from examples/, which have their own tests)."""
from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import torch

from vfmbench import testing
from vfmbench.config import DataConfig
from vfmbench.plugins import get_plugin_manager

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
PRELUDE = "from vfmbench.hookspecs import hookimpl\nfrom vfmbench.specs import *\n"


def _snippets(monkeypatch) -> dict[str, types.ModuleType]:
    out = {}
    for i, code in enumerate(re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)):
        if "@hookimpl" not in code:
            continue  # not a plugin (e.g. a test calling vfmbench.testing)
        mod = types.ModuleType(f"doc_snippet_{i}")
        monkeypatch.setitem(sys.modules, mod.__name__, mod)  # dataclasses look their module up
        exec(compile(PRELUDE + code, f"docs/plugins.md snippet {i}", "exec"), mod.__dict__)
        hooks = [k for k in vars(mod) if k.startswith("register_") or k == "results_written"]
        out["+".join(hooks)] = mod
    return out


def test_worked_examples_run(tmp_path, monkeypatch, one_thread):
    snippets = _snippets(monkeypatch)
    complete = {k: m for k, m in snippets.items() if k not in ("register_tokenizers", "register_vfms")}
    assert set(complete) == {"register_decoders", "register_diffusion_models", "register_datasets", "register_extractors+register_metrics",
                             "register_presets", "register_stages", "results_written"}
    host = get_plugin_manager(extra_plugins=[(f"doc-{i}", m) for i, m in enumerate(complete.values())])
    assert not host.failed, {n: p.error for n, p in host.failed.items()}
    testing.check_decoder(host.decoders.get("pixel-shuffle"), latent_channels=4, downsample=8)
    testing.check_extractor(host.extractors.get("abs-error"), host)
    testing.check_metric(host.metrics.get("mae"), host)
    testing.check_stage(host.stages.get("latent-norm"), host)
    ds = host.datasets.get("stripes").factory(DataConfig(resolution=16), "val")
    x, y = ds[5]
    assert x.dtype == torch.uint8 and x.shape == (3, 16, 16) and y == 1 and len(ds) == 64 and ds.cache_id
    model = host.diffusion.get("tiny-velocity").factory(None, (4, 8, 8), 4)
    loss, logs = model.phase_loss("diffusion", torch.randn(2, 4, 8, 8), torch.tensor([0, 4]), 0)
    loss.backward()
    assert loss.ndim == 0 and logs["loss"] > 0 and model.net[0].weight.grad is not None
    from vfmbench.resolution import resolve_run

    r = resolve_run(host, [dict(host.presets.get("stripes-smoke").values), {"run": {"out": str(tmp_path)}}])
    assert r.components["dataset"].name == "stripes" and r.cfg.data.resolution == 32
    host.pm.hook.results_written(run_dir=tmp_path, rows=[{"metric": "psnr", "value": 20.0, "family": "reconstruction"}])
    assert (tmp_path / "summary.json").read_text() == '{"psnr": 20.0, "run": "%s"}' % tmp_path.name
