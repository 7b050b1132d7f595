"""Checks of the ``metrics`` config section that run in ``validate``, before any work (also under
``--dry-run``): the reference batch (``vfmbench.metrics.adm.check_reference``) and the IS protocol."""
from __future__ import annotations

from ..errors import UserError
from .adm import check_reference
from .image import SSIM_RANGES
from .inception_score import SPLIT_ORDERS


def check_metrics(cfg) -> None:
    """Raise ``UserError`` (exit 2) for a metrics setting that cannot work."""
    m = cfg.metrics
    if m.isc_split_order not in SPLIT_ORDERS:
        raise UserError(f"metrics.isc_split_order must be one of {', '.join(SPLIT_ORDERS)} "
                        f"(torch-fidelity / ADM evaluator), got {m.isc_split_order!r}")
    if m.isc_splits < 1:
        raise UserError(f"metrics.isc_splits must be at least 1, got {m.isc_splits}")
    if m.ssim_range not in SSIM_RANGES:
        raise UserError(f"metrics.ssim_range must be one of {', '.join(repr(r) for r in SSIM_RANGES)} "
                        f"(VFM-VAE: '[-1, 1]'), got {m.ssim_range!r}")
    check_reference(m.reference, cfg.run.stages)
