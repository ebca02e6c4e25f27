"""The generated-image metrics against independent reference computations (scipy's matrix square root,
explicit loops), and memorisation flags a model that copies its training images and not one that does not."""

import numpy as np
import pytest
from scipy import linalg

from medpeft.generate.metrics import fid, kid, memorisation, nearest_cosine_distance, precision_recall


def features(n: int, d: int = 8, shift: float = 0.0, scale: float = 1.0, seed: int = 0) -> np.ndarray:
    """`n` samples of one correlated Gaussian in `d` dimensions (moved by `shift`, widened by `scale`)."""
    mixing = np.random.default_rng(100).normal(size=(d, d)) / np.sqrt(d)
    return (np.random.default_rng(seed).normal(size=(n, d)) * scale) @ mixing + shift + 2.0


def reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b, s_a, s_b = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(s_a @ s_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * root))


def reference_mmd(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]

    def k(a, b):
        return (float(a @ b) / d + 1) ** 3
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


@pytest.mark.parametrize("shift, scale", [(0.0, 1.0), (0.5, 1.0), (0.0, 2.0), (1.0, 0.5)])
def test_fid_equals_the_scipy_reference(shift, scale):
    real, generated = features(300, seed=1), features(250, shift=shift, scale=scale, seed=2)
    assert fid(real, generated) == pytest.approx(reference_fid(real, generated), abs=1e-4)
    assert fid(real, real) == pytest.approx(0, abs=1e-6)


def test_kid_equals_the_explicit_unbiased_mmd_and_averages_subsets():
    real, generated = features(40, seed=1), features(40, shift=0.3, seed=2)
    value, spread = kid(real, generated, subset_size=40)
    assert value == pytest.approx(reference_mmd(real, generated), abs=1e-4) and spread == 0.0
    same, _ = kid(features(400, seed=3), features(400, seed=4), subset_size=100, subsets=50)
    far, far_spread = kid(features(400, seed=3), features(400, shift=0.5, seed=4), subset_size=100, subsets=50)
    assert abs(same) < far and far_spread > 0


def test_precision_and_recall_equal_a_loop_and_separate_fidelity_from_diversity():
    real, generated = features(60, seed=1), features(50, shift=0.2, seed=2)

    def reference(points, centres, k=3):
        radii = [sorted(float(((c - o) ** 2).sum()) for o in centres)[k] for c in centres]
        return np.mean([any(((p - c) ** 2).sum() <= r for c, r in zip(centres, radii)) for p in points])
    assert precision_recall(real, generated) == pytest.approx((reference(generated, real), reference(real, generated)))

    real = features(400, seed=1)
    assert min(precision_recall(real, features(400, seed=2))) > 0.8  # the same distribution
    collapsed = np.repeat(real[:5], 80, axis=0) + 1e-3 * features(400, seed=3)  # a few modes only
    precision, recall = precision_recall(real, collapsed)
    assert precision > 0.9 and recall < 0.2
    assert precision_recall(real, features(400, shift=20.0, seed=2)) == (0.0, 0.0)


def test_memorisation_flags_a_model_that_copies_its_training_images_and_not_one_that_does_not():
    train, held_out = features(300, d=16, seed=1), features(200, d=16, seed=2)
    fresh = features(200, d=16, seed=3)  # new samples of the training distribution
    copies = train[:200] + 1e-4 * features(200, d=16, seed=4)  # the training images, "generated"
    honest = memorisation(train, fresh, held_out, fid_value=fid(train, fresh))
    copier = memorisation(train, copies, held_out, fid_value=fid(train, copies))
    assert copier["copied_share"] > 0.95 and honest["copied_share"] < 0.15
    assert copier["nearest_train_distance"] < 1e-6 < honest["nearest_train_distance"]
    assert copier["mifid"] > 100 * fid(train, copies) and copier["mifid"] > 100 * honest["mifid"]
    far = memorisation(train, fresh, held_out, fid_value=1.0, epsilon=0.01)  # farther than epsilon: no penalty
    assert far["mifid"] == 1.0
    np.testing.assert_allclose(nearest_cosine_distance(train[:3], train), 0, atol=1e-12)
