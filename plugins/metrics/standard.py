"""Plugin: the standard tokenizer metrics (rFID, gFID, sFID, IS, KID, precision, recall, PSNR,
SSIM, LPIPS, linear-probe top-1/top-5) as pure stages over ``vfmbench.metrics``.

Features each metric consumes (``extractor``/``feature``):

* ``inception``/``pool`` [N, 2048], ``inception``/``logits`` [N, 1008] (logits_unbiased),
  ``inception``/``spatial`` [N, 2023] -- ``vfmbench.metrics.inception.InceptionFeatures``;
* ``pixels``/``psnr`` and ``pixels``/``ssim`` -- per-image scores from ``vfmbench.metrics.image``;
  ``lpips-vgg``/``lpips`` -- per-image ``LpipsVgg`` scores;
* ``tokenizer``/``latents`` -- a mapping with ``train_latents``, ``train_labels``, ``val_latents``,
  ``val_labels`` and optionally ``recipe`` (a ``ProbeRecipe``) and ``num_classes``.

``stats(features)`` returns a dict of numpy arrays (cacheable with ``StatsCache``);
``value(stats, reference_stats_or_None)`` returns a float, or a dict with ``value`` and the
metric's own protocol fields, which the evaluator writes into the row's protocol (so rows that
differ in them never share a leaderboard table): IS ``splits``, ``split_order``; KID ``subsets``,
``subset_size``; precision/recall ``k``, ``reference_images``. Distribution metrics compare the
candidate's statistics with the reference's, which are the same ``stats`` of the reference set.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from vfmbench.hookspecs import hookimpl
from vfmbench.metrics.frechet import StatsAccumulator, frechet_distance, gaussian_stats, low_rank_factor
from vfmbench.metrics.inception_score import SPLIT_ORDERS, inception_score
from vfmbench.metrics.kid import kernel_inception_distance
from vfmbench.metrics.precision_recall import NEIGHBOURHOOD, manifold_coverage, manifold_radii
from vfmbench.metrics.probe import ProbeRecipe, linear_probe
from vfmbench.specs import MetricSpec

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000

INCEPTION_SOURCE = "torch-fidelity 0.4 inception-v3-compat (TF Inception 2015-12-05 port), vfmbench.metrics"
INCEPTION_LICENSE = "Apache-2.0 (code and TF Inception weights)"
BASE_PROTOCOL = ("dataset", "split", "resolution", "num_images", "reference", "extractor", "extractor_weights")
GEN_PROTOCOL = ("sampler", "steps", "guidance", "cfg_scale", "cfg_interval", "timestep_shift", "label_sampling",
                "sample_precision", "diffusion_images")


def _require(reference: Mapping[str, Any] | None, keys: tuple[str, ...], metric: str) -> Mapping[str, Any]:
    if reference is None or any(k not in reference for k in keys):
        raise ValueError(f"{metric} needs reference statistics with {keys}")
    return reference


# -- Fréchet distances (rFID, gFID, sFID) --------------------------------------------------------


def gaussian_stage(features: Any) -> dict[str, np.ndarray]:
    """[N, D] features (or a ``StatsAccumulator`` already fed) -> {'mu', 'sigma'} in float64, plus
    'factor' (``low_rank_factor``) when N <= D, which makes the trace term an N x N problem."""
    mu, sigma = features.finalize() if isinstance(features, StatsAccumulator) else gaussian_stats(features)
    out = {"mu": mu, "sigma": sigma}
    factor = low_rank_factor(features)
    if factor is not None:
        out["factor"] = factor
    return out


def frechet_value(stats: Mapping[str, Any], reference: Mapping[str, Any] | None) -> float:
    """The distance between the candidate's and the reference's Gaussians."""
    ref = _require(reference, ("mu", "sigma"), "a Fréchet distance")
    return frechet_distance(stats["mu"], stats["sigma"], ref["mu"], ref["sigma"], stats.get("factor"), ref.get("factor")).value


# -- Inception Score -------------------------------------------------------------------------------


def is_stage(features: Any, splits: int = 10, split_order: str = "shuffled") -> dict[str, np.ndarray]:
    """[N, 1008] logits_unbiased -> {'mean', 'std', 'splits', 'shuffled'}: torch-fidelity's ISC
    convention (``shuffled``) or the ADM evaluator's consecutive chunks (``consecutive``)."""
    if split_order not in SPLIT_ORDERS:
        raise ValueError(f"IS split order must be one of {sorted(SPLIT_ORDERS)}, got {split_order!r}")
    shuffled = split_order == "shuffled"
    mean, std = inception_score(features, splits=splits, shuffle=shuffled)
    return {"mean": np.float64(mean), "std": np.float64(std), "splits": np.int64(splits), "shuffled": np.bool_(shuffled)}


def is_value(stats: Mapping[str, Any], reference: Mapping[str, Any] | None = None) -> dict[str, Any]:
    order = SPLIT_ORDERS["shuffled" if bool(stats.get("shuffled", True)) else "consecutive"]
    return {"value": float(stats["mean"]), "splits": int(stats["splits"]), "split_order": order}


# -- KID ---------------------------------------------------------------------------------------------


def features_stage(features: Any) -> dict[str, np.ndarray]:
    """KID keeps the features themselves: [N, D] float64."""
    f = features.detach().cpu().numpy() if hasattr(features, "detach") else features
    return {"features": np.asarray(f, dtype=np.float64)}


def kid_value(stats: Mapping[str, Any], reference: Mapping[str, Any] | None) -> dict[str, Any]:
    """Mean unbiased MMD^2 over 100 subsets of min(1000, N_ref, N) vectors (seed 2020)."""
    ref = _require(reference, ("features",), "KID")
    size = min(KID_SUBSET_SIZE, len(ref["features"]), len(stats["features"]))
    value = kernel_inception_distance(ref["features"], stats["features"], subsets=KID_SUBSETS, subset_size=size)[0]
    return {"value": value, "subsets": KID_SUBSETS, "subset_size": int(size)}


# -- precision / recall --------------------------------------------------------------------------


def manifold_stage(features: Any) -> dict[str, np.ndarray]:
    """[N, D] features -> {'features', 'radii'} (k = 3 nearest-neighbour radii)."""
    f = features_stage(features)["features"]
    return {"features": f, "radii": manifold_radii(f, NEIGHBOURHOOD)}


def _manifold_protocol(reference: Mapping[str, Any]) -> dict[str, Any]:
    return {"k": NEIGHBOURHOOD, "reference_images": int(len(reference["features"]))}


def precision_value(stats: Mapping[str, Any], reference: Mapping[str, Any] | None) -> dict[str, Any]:
    ref = _require(reference, ("features", "radii"), "precision")
    return {"value": manifold_coverage(stats["features"], ref["features"], ref["radii"]), **_manifold_protocol(ref)}


def recall_value(stats: Mapping[str, Any], reference: Mapping[str, Any] | None) -> dict[str, Any]:
    ref = _require(reference, ("features", "radii"), "recall")
    return {"value": manifold_coverage(ref["features"], stats["features"], stats["radii"]), **_manifold_protocol(ref)}


# -- per-image pair scores (PSNR, SSIM, LPIPS) ------------------------------------------------------


def mean_stage(scores: Any) -> dict[str, np.ndarray]:
    """[N] per-image scores -> {'mean', 'count'}."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.size == 0:
        raise ValueError("no per-image scores to average")
    return {"mean": np.float64(s.mean()), "count": np.int64(s.size)}


def mean_value(stats: Mapping[str, Any], reference: Mapping[str, Any] | None = None) -> float:
    return float(stats["mean"])


# -- linear probe -----------------------------------------------------------------------------------


def probe_stage(features: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """{'train_latents', 'train_labels', 'val_latents', 'val_labels'[, 'recipe', 'num_classes']} ->
    {'top1', 'train_top1'[, 'top5']} in percent."""
    res = linear_probe(
        features["train_latents"], features["train_labels"], features["val_latents"], features["val_labels"],
        features.get("recipe") or ProbeRecipe(), features.get("num_classes"),
    )
    return {k: np.float64(v) for k, v in res.items()}


def probe_top1_value(stats: Mapping[str, Any], reference: Mapping[str, Any] | None = None) -> float:
    return float(stats["top1"])


def probe_top5_value(stats: Mapping[str, Any], reference: Mapping[str, Any] | None = None) -> float:
    if "top5" not in stats:
        raise ValueError("probe top-5 needs more than 5 classes")
    return float(stats["top5"])


# ---------------------------------------------------------------------------------------------------

FID_PAPER = "Heusel et al., GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium, NeurIPS 2017 (arXiv:1706.08500)"
ADM_PAPER = "Dhariwal & Nichol, Diffusion Models Beat GANs on Image Synthesis, NeurIPS 2021 (arXiv:2105.05233), evaluations/evaluator.py"


def _specs() -> list[MetricSpec]:
    common = {"version": "1"}
    probe_protocol = ("dataset", "resolution", "train_images", "val_images", "pooling", "epochs", "lr",
                      "weight_decay", "batch_size", "optimizer", "standardise", "seed")
    return [
        MetricSpec(
            name="rfid", description="Reconstruction FID: Inception pool_3 Fréchet distance, reconstructions vs their inputs' reference statistics",
            family="reconstruction", higher_is_better=False, inputs="distribution", extractor="inception", feature="pool",
            stats=gaussian_stage, value=frechet_value, stats_kind="gaussian", protocol_fields=BASE_PROTOCOL,
            source=INCEPTION_SOURCE, paper=FID_PAPER, license=INCEPTION_LICENSE, **common,
        ),
        MetricSpec(
            name="gfid", description="Generation FID: Inception pool_3 Fréchet distance, decoded samples vs reference statistics",
            family="generation", higher_is_better=False, inputs="distribution", extractor="inception", feature="pool",
            stats=gaussian_stage, value=frechet_value, stats_kind="gaussian", protocol_fields=BASE_PROTOCOL + GEN_PROTOCOL,
            source=INCEPTION_SOURCE, paper=FID_PAPER, license=INCEPTION_LICENSE, **common,
        ),
        MetricSpec(
            name="sfid", description="Spatial FID: Fréchet distance of the ADM evaluator's mixed_6/conv features (first 7 channels, 2023-d)",
            family="generation", higher_is_better=False, inputs="distribution", extractor="inception", feature="spatial",
            stats=gaussian_stage, value=frechet_value, stats_kind="gaussian", protocol_fields=BASE_PROTOCOL + GEN_PROTOCOL,
            source=INCEPTION_SOURCE, paper="Nash et al., Generating Images with Sparse Representations, ICML 2021 (arXiv:2103.03841); " + ADM_PAPER,
            license=INCEPTION_LICENSE, **common,
        ),
        MetricSpec(
            name="is", description="Inception Score (softmax of logits_unbiased; metrics.isc_splits splits, shuffled with seed 2020 as torch-fidelity or consecutive as the ADM evaluator)",
            family="generation", higher_is_better=True, inputs="single", extractor="inception", feature="logits",
            stats=is_stage, value=is_value,
            protocol_fields=("dataset", "resolution", "num_images", "extractor", "extractor_weights", "splits", "split_order") + GEN_PROTOCOL,
            source=INCEPTION_SOURCE, paper="Salimans et al., Improved Techniques for Training GANs, NeurIPS 2016 (arXiv:1606.03498)",
            license=INCEPTION_LICENSE, **common,
        ),
        MetricSpec(
            name="kid", description="Kernel Inception Distance: unbiased MMD^2, cubic polynomial kernel, 100 subsets of min(1000, N), seed 2020",
            family="generation", higher_is_better=False, inputs="distribution", extractor="inception", feature="pool",
            stats=features_stage, value=kid_value, protocol_fields=BASE_PROTOCOL + ("subsets", "subset_size") + GEN_PROTOCOL,
            source=INCEPTION_SOURCE, paper="Bińkowski et al., Demystifying MMD GANs, ICLR 2018 (arXiv:1801.01401)",
            license=INCEPTION_LICENSE, **common,
        ),
        MetricSpec(
            name="precision", description="Improved precision: share of samples inside the reference's k=3 nearest-neighbour manifold (Inception pool_3)",
            family="generation", higher_is_better=True, inputs="distribution", extractor="inception", feature="pool",
            stats=manifold_stage, value=precision_value, protocol_fields=BASE_PROTOCOL + ("k", "reference_images") + GEN_PROTOCOL,
            source=INCEPTION_SOURCE, paper="Kynkäänniemi et al., Improved Precision and Recall Metric for Assessing Generative Models, NeurIPS 2019 (arXiv:1904.06991); " + ADM_PAPER,
            license=INCEPTION_LICENSE, **common,
        ),
        MetricSpec(
            name="recall", description="Improved recall: share of reference images inside the samples' k=3 nearest-neighbour manifold (Inception pool_3)",
            family="generation", higher_is_better=True, inputs="distribution", extractor="inception", feature="pool",
            stats=manifold_stage, value=recall_value, protocol_fields=BASE_PROTOCOL + ("k", "reference_images") + GEN_PROTOCOL,
            source=INCEPTION_SOURCE, paper="Kynkäänniemi et al., Improved Precision and Recall Metric for Assessing Generative Models, NeurIPS 2019 (arXiv:1904.06991); " + ADM_PAPER,
            license=INCEPTION_LICENSE, **common,
        ),
        MetricSpec(
            name="psnr", description="PSNR in dB per image, averaged (uint8 pairs as [0, 1] with data range 1 == [-1, 1] with data range 2)",
            family="reconstruction", higher_is_better=True, inputs="pairs", extractor="pixels", feature="psnr",
            stats=mean_stage, value=mean_value, protocol_fields=("dataset", "split", "resolution", "num_images", "pixel_data_range"),
            source="torchmetrics functional peak_signal_noise_ratio",
            paper="Huynh-Thu & Ghanbari, Scope of validity of PSNR in image/video quality assessment, Electronics Letters 2008",
            license="Apache-2.0", **common,
        ),
        MetricSpec(
            name="ssim", description="SSIM per image, averaged (torchmetrics: Gaussian window 11, sigma 1.5; metrics.ssim_range, VFM-VAE: [-1, 1], data range 2)",
            family="reconstruction", higher_is_better=True, inputs="pairs", extractor="pixels", feature="ssim",
            stats=mean_stage, value=mean_value, protocol_fields=("dataset", "split", "resolution", "num_images", "pixel_data_range", "ssim_range"),
            source="torchmetrics functional structural_similarity_index_measure",
            paper="Wang et al., Image Quality Assessment: From Error Visibility to Structural Similarity, IEEE TIP 2004",
            license="Apache-2.0", **common,
        ),
        MetricSpec(
            name="lpips", description="LPIPS-VGG (v0.1 linear weights) per image, averaged",
            family="reconstruction", higher_is_better=False, inputs="pairs", extractor="lpips-vgg", feature="lpips",
            stats=mean_stage, value=mean_value,
            protocol_fields=("dataset", "split", "resolution", "num_images", "extractor", "extractor_weights"),
            source="vfmbench.metrics.image.LpipsVgg over torchvision VGG16; linear weights bundled with torchmetrics",
            paper="Zhang et al., The Unreasonable Effectiveness of Deep Features as a Perceptual Metric, CVPR 2018 (arXiv:1801.03924)",
            license="BSD-2-Clause (LPIPS weights); VGG16 ImageNet weights: torchvision BSD-3-Clause", **common,
        ),
        MetricSpec(
            name="probe-top1", description="Linear-probe top-1 accuracy (%) on frozen, pooled, standardised latents (vfmbench recipe)",
            family="representation", higher_is_better=True, inputs="latents", extractor="tokenizer", feature="latents",
            stats=probe_stage, value=probe_top1_value, protocol_fields=probe_protocol,
            source="vfmbench.metrics.probe", paper="Alain & Bengio, Understanding intermediate layers using linear classifier probes, 2016 (arXiv:1610.01644)",
            license="Apache-2.0", **common,
        ),
        MetricSpec(
            name="probe-top5", description="Linear-probe top-5 accuracy (%) on frozen, pooled, standardised latents (more than 5 classes)",
            family="representation", higher_is_better=True, inputs="latents", extractor="tokenizer", feature="latents",
            stats=probe_stage, value=probe_top5_value, protocol_fields=probe_protocol,
            source="vfmbench.metrics.probe", paper="Alain & Bengio, Understanding intermediate layers using linear classifier probes, 2016 (arXiv:1610.01644)",
            license="Apache-2.0", **common,
        ),
    ]


@hookimpl
def register_metrics(register):
    for spec in _specs():
        register(spec)
