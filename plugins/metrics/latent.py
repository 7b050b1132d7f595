"""Plugin: latent diffusability metrics (family ``latent``) as pure stages over
``vfmbench.metrics.latent*``: features -> statistics -> value.

Features of the ``latents`` metrics are one mapping built by ``vfmbench.latent_eval``:
``latents`` (val posterior means, per-channel standardised, [N, C, H, W] float64), ``labels`` [N],
``masks`` ([N, H, W] bool foreground at the latent grid, or None) and ``settings`` (k, VIV
iterations, TwoNN fraction, uniformity sizes, seed). The ``encoder`` metrics read per-image
equivariance errors ({'rotation', 'scale'}: arrays); iFID reads Inception pool features of the
decoded interpolations and of the val images (the ``distribution`` path of ``vfmbench.evaluate``).
"""
from __future__ import annotations

from functools import partial, wraps
from typing import Any, Mapping

import numpy as np

from vfmbench.hookspecs import hookimpl
from vfmbench.metrics.frechet import frechet_distance, gaussian_stats, low_rank_factor
from vfmbench.metrics.latent import NotApplicable, dct_energy, lnc, pool, sec, twonn, viv_per_class
from vfmbench.metrics.latent_spatial import spatial_structure, srss, uniformity
from vfmbench.specs import MetricSpec

ZHONG = "Zhong et al., Diffusing in the Right Space (2026, arXiv:2606.03578)"
IREPA = "iREPA (arXiv:2512.10794), End2End-Diffusion/iREPA metrics/spatial_metrics.py"
VAVAE = "Yao et al., VA-VAE / LightningDiT (arXiv:2501.01423), tools/latent_vis.py"
EQVAE = "Kouzelis et al., EQ-VAE (arXiv:2502.09509), App. B and C.3"
IFID = "Xu et al., Making rFID Predictive of Diffusion gFID (arXiv:2603.05630), evalvae.py"
SOURCE = "vfmbench.metrics.latent, latent_spatial, latent_model (implemented from diffusability.md)"
TIER1 = ("dataset", "split", "num_images", "classes", "latents", "normalisation", "seed")


def _applicable(stage):
    """Too few latents for a metric (k neighbours, classes of 2, a grid without distant pairs) is a
    skipped row (``NotApplicable``, with the reason), not a failed run."""
    @wraps(stage)
    def wrapped(f: Mapping[str, Any]) -> Any:
        try:
            return stage(f)
        except NotApplicable:
            raise
        except ValueError as e:
            raise NotApplicable(str(e)) from None

    return wrapped


@_applicable
def viv_stage(f: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return viv_per_class(f["latents"], f["labels"], int(f["settings"]["viv_iterations"]))


def viv_value(s: Mapping[str, Any], reference: Any = None) -> float:
    return float(np.mean(s["viv"]))


@_applicable
def lnc_stage(f: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {"lnc": np.float64(lnc(pool(f["latents"], f.get("masks")), f["labels"], int(f["settings"]["k"])))}


@_applicable
def sec_stage(f: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {"energy": dct_energy(f["latents"])}


def sec_value(s: Mapping[str, Any], reference: Any = None, rho: float = 0.5) -> float:
    return sec(s["energy"], rho)


def spatial_stage(f: Mapping[str, Any]) -> dict[str, np.ndarray]:
    try:
        return {k: np.float64(v) for k, v in spatial_structure(f["latents"]).items()}
    except ValueError as e:
        raise NotApplicable(str(e)) from None


def srss_stage(f: Mapping[str, Any]) -> dict[str, np.ndarray]:
    if f.get("masks") is None:
        raise NotApplicable("SRSS needs foreground masks (metrics.latent.masks)")
    st = f["settings"]
    try:
        out = srss(f["latents"], f["masks"], st["srss_min_fg"], st["srss_min_bg"])
    except ValueError as e:
        raise NotApplicable(str(e)) from None
    return {k: np.float64(v) for k, v in out.items()}


@_applicable
def twonn_stage(f: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.float64(v) for k, v in twonn(f["latents"], float(f["settings"]["twonn_fraction"])).items()}


@_applicable
def uniformity_stage(f: Mapping[str, Any]) -> dict[str, np.ndarray]:
    st = f["settings"]
    z = f["latents"]
    out = uniformity(z, points=min(int(st["uniformity_points"]), z.shape[0] * z.shape[2] * z.shape[3]),
                     repeats=int(st["uniformity_repeats"]), seed=int(st["seed"]))
    return {k: np.float64(v) for k, v in out.items()}


def pick(s: Mapping[str, Any], reference: Any = None, key: str = "") -> float:
    return float(s[key])


def equivariance_stage(f: Mapping[str, Any], group: str = "rotation") -> dict[str, np.ndarray]:
    if group not in f or len(f[group]) == 0:
        raise NotApplicable(f"no {group} transform applies at this resolution and downsampling")
    e = np.asarray(f[group], dtype=np.float64)
    return {"mean": np.float64(e.mean()), "count": np.int64(e.size)}


def ifid_stage(features: Any) -> dict[str, np.ndarray]:
    mu, sigma = gaussian_stats(features)
    out = {"mu": mu, "sigma": sigma}
    factor = low_rank_factor(features)
    if factor is not None:
        out["factor"] = factor
    return out


def ifid_value(stats: Mapping[str, Any], reference: Mapping[str, Any] | None) -> float:
    if reference is None:
        raise ValueError("iFID needs the val images' Inception statistics")
    return frechet_distance(stats["mu"], stats["sigma"], reference["mu"], reference["sigma"], stats.get("factor"), reference.get("factor")).value


def _latent(name: str, description: str, better_high: bool, stats, value, fields: tuple[str, ...], paper: str, **kw) -> MetricSpec:
    return MetricSpec(name=name, description=description, family="latent", higher_is_better=better_high, inputs=kw.pop("inputs", "latents"),
                      extractor=kw.pop("extractor", "tokenizer"), feature=kw.pop("feature", "posterior-mean"), stats=stats, value=value,
                      protocol_fields=fields, source=SOURCE, paper=paper, license="Apache-2.0", version="1", **kw)


def _specs() -> list[MetricSpec]:
    eq = ("dataset", "split", "num_images", "resolution", "transforms", "interpolation", "latents", "seed")
    return [
        _latent("viv", "Velocity Irreducible Variance, Kronecker flip-flop per class, per-dimension MEAN convention ((pi/2) mean sqrt(lambda)), mean over classes",
                False, viv_stage, viv_value, TIER1 + ("viv_iterations", "viv_convention"), ZHONG),
        _latent("lnc", "Latent neighbour consistency: share of the k cosine nearest neighbours (mean-centred pooled latents, self excluded) with the same label",
                True, lnc_stage, partial(pick, key="lnc"), TIER1 + ("k", "lnc_pooling"), ZHONG),
        _latent("sec-0.25", "Spectral energy concentration: energy share of orthonormal 2-D DCT bins with u+v > 0.25((H-1)+(W-1))",
                False, sec_stage, partial(sec_value, rho=0.25), TIER1 + ("sec_distance",), ZHONG),
        _latent("sec-0.5", "Spectral energy concentration: energy share of orthonormal 2-D DCT bins with u+v > 0.5((H-1)+(W-1))",
                False, sec_stage, partial(sec_value, rho=0.5), TIER1 + ("sec_distance",), ZHONG),
        _latent("lds", "Local-distant similarity: mean token cosine of grid 4-neighbours minus pairs at Manhattan distance >= 6",
                True, spatial_stage, partial(pick, key="lds"), TIER1, IREPA),
        _latent("cds", "Cosine decay slope: minus the slope of the mean token cosine against grid distance d = 1..8",
                True, spatial_stage, partial(pick, key="cds"), TIER1, IREPA),
        _latent("srss", "Spatial-region semantic separation: foreground anchors' cosine to d=1 foreground minus d>=6 background tokens (needs masks)",
                True, srss_stage, partial(pick, key="srss"), TIER1 + ("masks", "srss_min_fg", "srss_min_bg"), ZHONG + "; " + IREPA),
        _latent("twonn-id", "Intrinsic dimension of the flattened standardised latents, TwoNN (Facco et al. 2017), 90% of the r2/r1 ratios",
                False, twonn_stage, partial(pick, key="id"), TIER1 + ("twonn_fraction",), EQVAE + "; Facco et al., Sci. Rep. 7 (2017)"),
        _latent("uniformity-cv", "Density CV of t-SNE-embedded single-token vectors (Gaussian KDE), mean over repeats (slow; metrics.latent.uniformity)",
                False, uniformity_stage, partial(pick, key="cv"), TIER1 + ("uniformity_points", "uniformity_repeats", "tsne"), VAVAE),
        _latent("uniformity-gini", "Gini coefficient of the t-SNE KDE density of single-token vectors, mean over repeats (slow)",
                False, uniformity_stage, partial(pick, key="gini"), TIER1 + ("uniformity_points", "uniformity_repeats", "tsne"), VAVAE),
        _latent("uniformity-entropy", "Normalised entropy of the t-SNE KDE density of single-token vectors, mean over repeats (slow)",
                True, uniformity_stage, partial(pick, key="entropy"), TIER1 + ("uniformity_points", "uniformity_repeats", "tsne"), VAVAE),
        _latent("equivariance-rotation", "EQ-VAE equivariance error ||rot(E(x)) - E(rot x)||^2/||E(rot x)||^2, rotations pi/2, pi, 3pi/2 (posterior means)",
                False, partial(equivariance_stage, group="rotation"), partial(pick, key="mean"), eq, EQVAE, inputs="encoder", feature="equivariance"),
        _latent("equivariance-scale", "EQ-VAE equivariance error for downscaling by 0.25, 0.5, 0.75 (bilinear, antialiased; scales giving whole latent grids)",
                False, partial(equivariance_stage, group="scale"), partial(pick, key="mean"), eq, EQVAE, inputs="encoder", feature="equivariance"),
        _latent("ifid", "Interpolation FID: decoded slerps (alpha 0.5) of val latents with a train neighbour (top-10 cosine, softmax(-MSE) draw) vs the val images",
                False, ifid_stage, ifid_value, ("dataset", "split", "num_images", "reference", "extractor", "extractor_weights", "ifid_neighbours", "ifid_alpha", "latents", "seed"),
                IFID, inputs="distribution", extractor="inception", feature="pool"),
    ]


@hookimpl
def register_metrics(register):
    for spec in _specs():
        register(spec)
