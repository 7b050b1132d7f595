"""CKNNA / SE-CKNNA: properties, and equality with a deliberately naive loop implementation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vfmbench.metrics import cknna as ck


def _naive_cknna(a, b, topk):
    """Loops over plain Python lists: kernels, row-wise top-k masks, unbiased HSIC term by term."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    n = len(a)
    K = [[float(np.dot(a[i], a[j])) for j in range(n)] for i in range(n)]
    L = [[float(np.dot(b[i], b[j])) for j in range(n)] for i in range(n)]

    def knn(X):
        m = [[0.0] * n for _ in range(n)]
        for i in range(n):
            others = sorted((j for j in range(n) if j != i), key=lambda j: -X[i][j])
            for j in others[:topk]:
                m[i][j] = 1.0
        return m

    def hsic(X, Y):
        Xt = [[0.0 if i == j else X[i][j] for j in range(n)] for i in range(n)]
        Yt = [[0.0 if i == j else Y[i][j] for j in range(n)] for i in range(n)]
        tr = sum(Xt[i][j] * Yt[j][i] for i in range(n) for j in range(n))
        sx = sum(map(sum, Xt))
        sy = sum(map(sum, Yt))
        cross = sum(Xt[i][j] * Yt[j][l] for i in range(n) for j in range(n) if Xt[i][j] for l in range(n))
        return (tr + sx * sy / ((n - 1) * (n - 2)) - 2 * cross / (n - 2)) / (n * (n - 3))

    def sim(X, Y, MX, MY):
        M = [[MX[i][j] * MY[i][j] for j in range(n)] for i in range(n)]
        return hsic([[M[i][j] * X[i][j] for j in range(n)] for i in range(n)],
                    [[M[i][j] * Y[i][j] for j in range(n)] for i in range(n)])

    mk, ml = knn(K), knn(L)
    return sim(K, L, mk, ml) / (np.sqrt(sim(K, K, mk, mk) * sim(L, L, ml, ml)) + 1e-6)  # the reference's +1e-6


def _pair(seed, n=48, da=12, db=6, noise=0.7):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, da, generator=g, dtype=torch.float64)
    b = a @ torch.randn(da, db, generator=g, dtype=torch.float64) + noise * torch.randn(n, db, generator=g, dtype=torch.float64)
    return a, b


@pytest.mark.parametrize("seed,topk", [(0, 5), (1, 10)])
def test_cknna_equals_naive_implementation(seed, topk):
    a, b = _pair(seed)
    fast = ck.cknna(a, b, topk)
    assert fast == pytest.approx(_naive_cknna(a.numpy(), b.numpy(), topk), rel=1e-10)
    assert 0.05 < fast < 1.0


def test_cknna_self_symmetry_and_independence():
    a, b = _pair(2, n=256)
    assert ck.cknna(a, a, 10) == pytest.approx(1.0, abs=1e-6)  # 1 - 1e-6 / sim(K, K): the reference's epsilon
    # the row-wise kNN mask is not symmetric, so 1'K~L~1 != 1'L~K~1: about 1-2 % here (n=256, k=10)
    ab, ba = ck.cknna(a, b, 10), ck.cknna(b, a, 10)
    assert ab == pytest.approx(ba, rel=3e-2)
    indep = ck.cknna(a, torch.randn(256, 6, generator=torch.Generator().manual_seed(9), dtype=torch.float64), 10)
    assert abs(indep) < 0.15 < ab


def test_cknna_invariances():
    a, b = _pair(3)
    base = ck.cknna(a, b, 5)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=torch.Generator().manual_seed(4), dtype=torch.float64))
    # scale invariance holds up to the reference's +1e-6 in the denominator
    assert ck.cknna(3.7 * a, b, 5) == pytest.approx(base, rel=1e-6)
    assert ck.cknna(a, 10.0 * b, 5) == pytest.approx(base, rel=1e-6)
    assert ck.cknna(a, 0.01 * b, 5) < base - 1e-4  # tiny kernels: the fixed 1e-6 weighs more, as in the reference
    assert ck.cknna(a @ q, b, 5) == pytest.approx(base, rel=1e-10)


def test_cknna_row_blocks_and_degenerate(monkeypatch):
    a, b = _pair(5, n=40)
    full = ck.cknna(a, b, 5)
    monkeypatch.setattr(ck, "ROW_BLOCK", 7)
    assert ck.cknna(a, b, 5) == pytest.approx(full, rel=1e-12)
    assert ck.cknna(a, torch.zeros(40, 3), 5) == 0.0  # all-zero features: no kernel to align
    with pytest.raises(ValueError):
        ck.cknna(a, b[:39], 5)
    with pytest.raises(ValueError):
        ck.cknna(a, b, 40)


def test_preprocess_clamps_at_exact_percentile_and_normalises():
    x = torch.randn(50, 9, generator=torch.Generator().manual_seed(6), dtype=torch.float64) ** 3
    q = np.sort(np.abs(x.numpy()).ravel())[int(0.95 * 450)]  # remove_outliers(exact=True): no interpolation
    clipped = np.clip(x.numpy(), -q, q)
    expected = clipped / np.linalg.norm(clipped, axis=1, keepdims=True)
    out = ck.preprocess(x)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(out.norm(dim=1).numpy(), 1.0, rtol=1e-12)
    assert (np.abs(x.numpy()) > q).sum() > 0  # the clamp did something


def test_se_cknna_table_and_plot(tmp_path):
    pairs = [_pair(s) for s in (10, 11, 12)]
    se = ck.se_cknna(pairs, 5)
    assert se == pytest.approx(np.mean([ck.cknna(a, b, 5) for a, b in pairs]), rel=1e-12)
    clean = {0: _pair(13), 4: _pair(14, noise=3.0)}
    rows = ck.layer_table(clean, {4: pairs}, topk=5)
    assert [r["layer"] for r in rows] == [0, 4]
    assert rows[0]["se_cknna"] is None and rows[1]["num_transforms"] == 3
    assert rows[0]["cknna"] == pytest.approx(ck.cknna(ck.preprocess(clean[0][0]), ck.preprocess(clean[0][1]), 5))
    assert rows[1]["se_cknna"] == pytest.approx(ck.se_cknna([(ck.preprocess(a), ck.preprocess(b)) for a, b in pairs], 5))
    png = ck.plot_layer_table(rows, tmp_path / "plots" / "cknna.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in png.parent.iterdir()] == ["cknna.png"]  # no temporary file left
    ck.plot_layer_table([{"layer": "block.1", "cknna": 0.1}, {"layer": "block.2", "cknna": 0.2}], tmp_path / "names.png")
