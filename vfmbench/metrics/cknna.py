"""CKNNA and SE-CKNNA: mutual-kNN kernel alignment between two feature sets (platonic-rep's
CKNNA as the VFM-VAE alignment study uses it).

Algorithm (rows of A and B describe the same N images):

1. ``preprocess``: clamp every entry to +-q, then L2-normalise the rows (platonic-rep
   ``remove_outliers`` + ``F.normalize``). With ``exact=True`` (the VFM-VAE alignment pipeline) q is
   the element at index ``int(0.95 * numel)`` of the sorted |x| over the whole tensor (no
   interpolation); with ``exact=False`` (platonic-rep's ``measure_alignment`` default) q is the mean
   over rows of each row's 0.95 quantile of |x| (linear interpolation). Callers apply it
   (``layer_table`` does); ``cknna`` itself takes features as they are.
2. K = A A^T, L = B B^T. For a kernel X, M_X is the row-wise top-k mask: M_X[i, j] = 1 when j is
   among the k largest X[i, :] with the diagonal excluded (not a symmetric matrix).
3. sim(X, Y) = HSIC_u(M ⊙ X, M ⊙ Y) with M = M_X ⊙ M_Y and HSIC_u the unbiased HSIC of Song et al.
   (2012) on zero-diagonal matrices:
   [tr(X~Y~) + 1'X~1 1'Y~1 / ((m-1)(m-2)) - 2 1'X~Y~1 / (m-2)] / (m(m-3)).
4. CKNNA = sim(K, L) / (sqrt(sim(K, K) sim(L, L)) + 1e-6), the 1e-6 as in the reference code
   (with unit-norm rows, where sim values are ~1e-3, it lowers the value by ~2.6e-4 relative);
   sim(K, K) uses K's own mask M_K (not the joint mask), which gives ~0 for independent features.
   When sim(K, K) sim(L, L) is not positive (degenerate features, e.g. constant rows) the value is
   0.0: no alignment is measurable (the reference returns NaN or sim(K, L) / 1e-6 there).

Because M_X is not symmetric, CKNNA(A, B) and CKNNA(B, A) differ slightly on random data; this is
the reference algorithm's behaviour and is kept. Checked against the reference's outputs
(platonic-rep ``AlignmentMetrics.cknna`` at dcd76ba) in ``tests/test_golden_cknna.py``.

The implementation never builds the N x N kernels: the top-k indices are found in row blocks and
every HSIC term is evaluated on the at most N*k entries of the mask, so N = 10 000 with 1024-d
features runs in seconds and little memory. SE-CKNNA is the mean CKNNA over a set of transforms.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

TOPK = 10
OUTLIER_Q = 0.95
EPS = 1e-6  # added to the denominator's square root, as platonic-rep does
ROW_BLOCK = 2048


def _as_float64_2d(x: Any) -> torch.Tensor:
    if not torch.is_tensor(x):
        x = torch.as_tensor(np.asarray(x))
    x = x.detach().to("cpu", torch.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {tuple(x.shape)}")
    return x


def outlier_threshold(x: torch.Tensor, q: float = OUTLIER_Q, exact: bool = True) -> float:
    """platonic-rep ``remove_outliers``' clamp value: the sorted |x| at index ``int(q * numel)``
    (``exact``), else the mean over rows of the row-wise ``q`` quantile of |x|."""
    a = x.abs().numpy()
    if exact:
        flat = np.sort(a, axis=None)
        return float(flat[min(int(q * flat.size), flat.size - 1)])
    return float(np.quantile(a, q, axis=1).mean())


def preprocess(x: Any, q: float = OUTLIER_Q, exact: bool = True) -> torch.Tensor:
    """Clamp to +-``outlier_threshold``, then L2-normalise rows (float64); see the module docstring."""
    x = _as_float64_2d(x)
    if q < 1:  # the reference skips the clamp for q == 1
        t = outlier_threshold(x, q, exact)
        x = x.clamp(-t, t)
    return F.normalize(x, dim=1)


def _topk_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """[N, k] indices of each row's k largest entries of x x^T, the diagonal excluded."""
    n = x.shape[0]
    out = torch.empty((n, k), dtype=torch.long)
    for r0 in range(0, n, ROW_BLOCK):
        block = x[r0 : r0 + ROW_BLOCK] @ x.T
        rows = torch.arange(block.shape[0])
        block[rows, rows + r0] = float("-inf")
        out[r0 : r0 + ROW_BLOCK] = torch.topk(block, k, dim=1).indices
    return out


def _mask_entries(idx_x: torch.Tensor, idx_y: torch.Tensor | None, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of M = M_X ⊙ M_Y, sorted by the flat index rows * n + cols."""
    k = idx_x.shape[1]
    flat_x = (torch.arange(n).repeat_interleave(k) * n + idx_x.reshape(-1)).numpy()
    if idx_y is None:
        flat = np.sort(flat_x)
    else:
        flat_y = (torch.arange(n).repeat_interleave(idx_y.shape[1]) * n + idx_y.reshape(-1)).numpy()
        flat = np.intersect1d(flat_x, flat_y, assume_unique=True)
    return flat // n, flat % n


def _hsic_unbiased_sparse(rows: np.ndarray, cols: np.ndarray, kv: np.ndarray, lv: np.ndarray, n: int) -> float:
    """HSIC_u of two n x n matrices that are zero except at the (off-diagonal) entries (rows, cols)."""
    flat = rows * n + cols
    # tr(K~ L~) = sum_ij K~_ij L~_ji: pairs whose transposed entry is in the mask too
    tflat = cols * n + rows
    pos = np.searchsorted(flat, tflat)
    pos_c = np.minimum(pos, len(flat) - 1)
    hit = (pos < len(flat)) & (flat[pos_c] == tflat)
    trace = float((kv[hit] * lv[pos_c[hit]]).sum())
    sum_k, sum_l = float(kv.sum()), float(lv.sum())
    # 1' K~ L~ 1 = sum_j (column sums of K~)_j (row sums of L~)_j
    colsum_k = np.bincount(cols, weights=kv, minlength=n)
    rowsum_l = np.bincount(rows, weights=lv, minlength=n)
    cross = float(colsum_k @ rowsum_l)
    m = n
    return (trace + sum_k * sum_l / ((m - 1) * (m - 2)) - 2.0 * cross / (m - 2)) / (m * (m - 3))


def _kernel_values(x: torch.Tensor, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    r, c = torch.from_numpy(rows), torch.from_numpy(cols)
    return (x[r] * x[c]).sum(dim=1).numpy()


def cknna(a: Any, b: Any, topk: int = TOPK) -> float:
    """CKNNA between feature sets ``a`` [N, Da] and ``b`` [N, Db] (rows paired); see the module docstring."""
    a, b = _as_float64_2d(a), _as_float64_2d(b)
    n = a.shape[0]
    if b.shape[0] != n:
        raise ValueError(f"the two feature sets must describe the same images: {n} and {b.shape[0]} rows")
    if n < 4 or not 2 <= topk < n:
        raise ValueError(f"CKNNA needs N >= 4 and 2 <= topk < N (as the reference), got N={n}, topk={topk}")
    idx_k, idx_l = _topk_indices(a, topk), _topk_indices(b, topk)

    def sim(x: torch.Tensor, y: torch.Tensor, idx_x: torch.Tensor, idx_y: torch.Tensor | None) -> float:
        rows, cols = _mask_entries(idx_x, idx_y, n)
        if rows.size == 0:
            return 0.0
        return _hsic_unbiased_sparse(rows, cols, _kernel_values(x, rows, cols), _kernel_values(y, rows, cols), n)

    s_kl = sim(a, b, idx_k, idx_l)
    s_kk = sim(a, a, idx_k, None)
    s_ll = sim(b, b, idx_l, None)
    denom = s_kk * s_ll
    if not denom > 0:
        return 0.0
    return float(s_kl / (np.sqrt(denom) + EPS))


def se_cknna(pairs: Sequence[tuple[Any, Any]], topk: int = TOPK) -> float:
    """SE-CKNNA: the mean CKNNA over (a, b) pairs, one pair per transform of the images."""
    if not pairs:
        raise ValueError("se_cknna needs at least one (a, b) pair")
    return float(np.mean([cknna(a, b, topk) for a, b in pairs]))


def layer_table(
    clean: Mapping[Hashable, tuple[Any, Any]],
    transformed: Mapping[Hashable, Sequence[tuple[Any, Any]]] | None = None,
    topk: int = TOPK,
    preprocess_inputs: bool = True,
) -> list[dict[str, Any]]:
    """One row per layer: CKNNA of the clean (reference, model) pair, and SE-CKNNA over the
    layer's transformed pairs when given. Features are ``preprocess``ed first unless told not to."""
    prep = preprocess if preprocess_inputs else _as_float64_2d
    rows = []
    for layer, (ref, feat) in clean.items():
        row: dict[str, Any] = {"layer": layer, "cknna": cknna(prep(ref), prep(feat), topk), "se_cknna": None,
                               "num_transforms": 0, "num_images": int(_as_float64_2d(ref).shape[0]), "topk": topk}
        tpairs = (transformed or {}).get(layer)
        if tpairs:
            row["se_cknna"] = se_cknna([(prep(r), prep(f)) for r, f in tpairs], topk)
            row["num_transforms"] = len(tpairs)
        rows.append(row)
    return rows


def plot_layer_table(rows: Sequence[Mapping[str, Any]], path: str | Path, title: str = "CKNNA vs layer") -> Path:
    """Save a PNG of CKNNA (and SE-CKNNA where present) against the layer; written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    layers = [r["layer"] for r in rows]
    numeric = all(isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) for x in layers)
    xs = list(layers) if numeric else list(range(len(layers)))
    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(xs, [r["cknna"] for r in rows], marker="o", label="CKNNA")
    se = [(x, r["se_cknna"]) for x, r in zip(xs, rows) if r.get("se_cknna") is not None]
    if se:
        ax.plot([x for x, _ in se], [v for _, v in se], marker="s", label="SE-CKNNA")
    if not numeric:
        ax.set_xticks(xs)
        ax.set_xticklabels([str(x) for x in layers], rotation=45, ha="right")
    ax.set_xlabel("layer")
    ax.set_ylabel("alignment")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path
