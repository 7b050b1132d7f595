"""CKNNA against the reference code's outputs (golden/cknna: platonic-rep AlignmentMetrics.cknna at
dcd76ba on fixed features; README section 4). The reference values are data; nothing here
recomputes them with a second copy of our own code."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import golden
from safetensors.torch import load_file

from vfmbench.metrics import cknna as ck

PAIRS = ("AB", "BA", "CD")


@pytest.fixture(scope="module")
def fx():
    d = golden("cknna")
    return load_file(str(d / "features.safetensors")), json.loads((d / "fixture.json").read_text())


def _ref(t, name: str) -> float:
    return float(t[name].reshape(-1)[0])


def test_settings_are_the_suites_defaults(fx):
    _, meta = fx
    assert meta["config"]["topk"] == ck.TOPK == 10
    assert ck.OUTLIER_Q == 0.95 and ck.EPS == 1e-6


@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("variant", ["raw", "vfmvae"])
def test_cknna_matches_reference_on_stored_float32_features(fx, variant, pair):
    t, meta = fx
    suffix = "" if variant == "raw" else "_vfmvae"
    a, b = t[pair[0] + suffix], t[pair[1] + suffix]
    value = ck.cknna(a, b)
    assert value == pytest.approx(_ref(t, f"cknna_{variant}_{pair}"), abs=1e-6)
    assert value == pytest.approx(meta["values"][f"{variant}/{pair}"]["cknna"], abs=1e-6)


@pytest.mark.parametrize("pair", PAIRS)
def test_cknna_matches_float64_reference_to_1e9(fx, pair):
    """Our code works in float64 throughout: raw features and our own preprocessing of them
    (remove_outliers q=0.95 exact + L2 rows) match the reference's float64 run to 1e-9."""
    t, _ = fx
    a, b = t[pair[0]].double(), t[pair[1]].double()
    assert ck.cknna(a, b) == pytest.approx(_ref(t, f"cknna64_raw_{pair}"), abs=1e-9)
    assert ck.cknna(ck.preprocess(a), ck.preprocess(b)) == pytest.approx(_ref(t, f"cknna64_vfmvae_{pair}"), abs=1e-9)


@pytest.mark.parametrize("name", "ABCD")
def test_preprocess_matches_reference_features(fx, name):
    t, _ = fx
    torch.testing.assert_close(ck.preprocess(t[name]), t[f"{name}_vfmvae"].double(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("pair", PAIRS)
def test_platonic_preprocessing_variant(fx, pair):
    """platonic-rep measure_alignment's default clamp (row-wise quantile, averaged) reproduces cknna_platonic_*."""
    t, _ = fx
    a, b = (ck.preprocess(t[c], exact=False) for c in pair)
    assert ck.cknna(a, b) == pytest.approx(_ref(t, f"cknna_platonic_{pair}"), abs=1e-6)


def test_order_matters_as_in_the_reference(fx):
    """cknna(A, B) != cknna(B, A): the row-wise kNN mask is not symmetrised. The difference itself matches."""
    t, _ = fx
    for variant, prep in (("raw", lambda x: x.double()), ("vfmvae", lambda x: ck.preprocess(x.double()))):
        a, b = prep(t["A"]), prep(t["B"])
        ours = ck.cknna(a, b) - ck.cknna(b, a)
        ref = _ref(t, f"cknna64_{variant}_AB") - _ref(t, f"cknna64_{variant}_BA")
        assert abs(ref) > 5e-6
        assert ours == pytest.approx(ref, abs=1e-9)


def test_the_epsilon_is_visible_at_this_tolerance(fx):
    """Without the reference's +1e-6 the unit-norm (vfmvae) values would miss by ~2.6e-4: the tests above see it."""
    t, meta = fx
    v = meta["values"]["vfmvae/AB"]
    assert abs(v["without_eps"] - _ref(t, "cknna_vfmvae_AB")) > 1e-4
    sims = v["sim_kl"] / (v["sim_kk"] * v["sim_ll"]) ** 0.5
    assert sims == pytest.approx(v["without_eps"], rel=1e-6)


def test_perturbed_input_fails_the_comparison(fx):
    """One changed feature row moves CKNNA away from the reference by more than the tolerance."""
    t, _ = fx
    a = t["A"].clone()
    a[0] = -a[0]
    assert abs(ck.cknna(a, t["B"]) - _ref(t, "cknna_raw_AB")) > 1e-5
    a = t["A_vfmvae"].clone()
    a[[3, 4]] = a[[4, 3]]  # two images' features swapped
    assert abs(ck.cknna(a, t["B_vfmvae"]) - _ref(t, "cknna_vfmvae_AB")) > 1e-5


def test_topk_below_two_is_rejected_like_the_reference(fx):
    t, _ = fx
    with pytest.raises(ValueError, match="topk"):
        ck.cknna(t["A"], t["B"], topk=1)
