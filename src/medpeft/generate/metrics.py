"""Distribution metrics of generated images, on features (N, D) from a feature extractor (for X-rays: a
chest X-ray encoder, not Inception): fidelity and diversity (FID, KID, precision / recall) and
memorisation (distance to the nearest training image, the share of copies, MiFID).

All take float arrays of features, one row per image; distances between features are Euclidean for
precision / recall and cosine (1 - cosine similarity) for memorisation.
"""

from __future__ import annotations

import numpy as np


def fid(real: np.ndarray, generated: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to the two sets (Heusel et al. 2017):
    |mu_r - mu_g|² + Tr(S_r + S_g - 2 (S_r S_g)^½), with unbiased covariances. Tr (S_r S_g)^½ is the sum of
    the square roots of the eigenvalues of S_r^½ S_g S_r^½ (symmetric, positive semi-definite)."""
    real, generated = np.asarray(real, np.float64), np.asarray(generated, np.float64)
    mu_r, mu_g = real.mean(0), generated.mean(0)
    s_r, s_g = np.cov(real, rowvar=False), np.cov(generated, rowvar=False)
    values, vectors = np.linalg.eigh(s_r)
    root_r = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = np.linalg.eigvalsh(root_r @ s_g @ root_r)
    trace_root = np.sqrt(np.clip(middle, 0, None)).sum()
    return float(((mu_r - mu_g) ** 2).sum() + np.trace(s_r) + np.trace(s_g) - 2 * trace_root)


def _polynomial_mmd(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² with the kernel k(a, b) = (a·b / d + 1)³."""
    d, m, n = x.shape[1], len(x), len(y)
    k_xx, k_yy, k_xy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
    return float((k_xx.sum() - np.trace(k_xx)) / (m * (m - 1)) + (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
                 - 2 * k_xy.mean())


def kid(real: np.ndarray, generated: np.ndarray, subset_size: int = 1000, subsets: int = 100,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al. 2018) on these features: the unbiased polynomial-kernel
    MMD², averaged over `subsets` random pairs of subsets of min(subset_size, len of each set) images
    (seeded); returns (mean, standard deviation over the subsets). One subset of every image when both
    sets are no larger than `subset_size` (the MMD² of the whole sets; std 0)."""
    real, generated = np.asarray(real, np.float64), np.asarray(generated, np.float64)
    m = min(subset_size, len(real), len(generated))
    if m == len(real) == len(generated):
        return _polynomial_mmd(real, generated), 0.0
    rng = np.random.default_rng(seed)
    values = [_polynomial_mmd(real[rng.choice(len(real), m, replace=False)],
                              generated[rng.choice(len(generated), m, replace=False)]) for _ in range(subsets)]
    return float(np.mean(values)), float(np.std(values))


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.clip((a ** 2).sum(1)[:, None] + (b ** 2).sum(1)[None, :] - 2 * a @ b.T, 0, None)


def precision_recall(real: np.ndarray, generated: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): each set's manifold is the union of balls
    around its samples, of radius the distance to the k-th nearest other sample of the set. Precision: the
    share of generated samples inside the real manifold; recall: the share of real samples inside the
    generated one."""
    real, generated = np.asarray(real, np.float64), np.asarray(generated, np.float64)

    def radii(x: np.ndarray) -> np.ndarray:
        return np.sort(_squared_distances(x, x), axis=1)[:, k]  # column 0 is the sample itself

    def inside(points: np.ndarray, centres: np.ndarray) -> float:
        return float((_squared_distances(points, centres) <= radii(centres)[None, :]).any(1).mean())

    return inside(generated, real), inside(real, generated)


def nearest_cosine_distance(samples: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per sample, 1 - the largest cosine similarity to any reference sample (0: the same direction)."""
    def unit(x):
        x = np.asarray(x, np.float64)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    return 1 - (unit(samples) @ unit(reference).T).max(1)


def memorisation(train: np.ndarray, generated: np.ndarray, held_out: np.ndarray, fid_value: float,
                 quantile: float = 0.05, epsilon: float = 0.1) -> dict:
    """How much the generated images copy the training images, in feature space:

    - ``nearest_train_distance``: the mean over generated samples of the cosine distance to the nearest
      training image (the memorisation distance of MiFID);
    - ``copy_threshold``: the `quantile` of the same distance for real held-out images (never trained
      on): what "as close as an unseen real image gets" means for this data and extractor;
    - ``copied_share``: the share of generated samples closer to a training image than that threshold
      (about `quantile` for a model that does not copy, towards 1 for one that does);
    - ``mifid``: MiFID (Bai et al. 2021): FID / d, d the memorisation distance where it is below
      `epsilon`, else FID.
    """
    generated_distance = nearest_cosine_distance(generated, train)
    threshold = float(np.quantile(nearest_cosine_distance(held_out, train), quantile))
    distance = float(generated_distance.mean())
    return {"nearest_train_distance": distance, "copy_threshold": threshold,
            "copied_share": float((generated_distance < threshold).mean()),
            "mifid": fid_value / max(distance, 1e-12) if distance < epsilon else fid_value, "mifid_epsilon": epsilon}
