"""Synthetic chest-radiograph phantoms (PA view) for the built-in demo and the tests.

Anatomy is drawn in canonical coordinates x, y in [-1, 1] (x towards the image right,
y downwards; the patient's left is on the image right) and mapped to pixels through a
small random similarity transform. Intensities are unitless densities until the end,
where they become 8-bit grey levels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from medpeft.files import write_text_atomic

FINDINGS = ("cardiomegaly", "pleural_effusion", "nodule", "consolidation", "pneumothorax")
_MIN_SIZE = 32


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D float array; sigma in pixels."""
    r = max(1, int(3 * sigma + 0.5))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    for _ in range(2):  # blur along axis 0, transpose, repeat: both axes done
        p = np.pad(img, ((r, r), (0, 0)), mode="reflect")
        img = sum(w * p[i : i + img.shape[0]] for i, w in enumerate(k)).T
    return img


def _lung_mask(x, y, side: int, a: dict) -> np.ndarray:
    """Boolean mask of one lung (side -1: image left, +1: image right) at canonical x, y."""
    dia = a["dia"] - (0.04 if side < 0 else 0.0)  # the patient's right hemidiaphragm sits higher
    t = np.clip((y - a["lung_top"]) / (dia - a["lung_top"]), 0, 1)
    s_lat = side * (x - side * a["lung_cx"]) / (a["lung_w"] * (0.7 + 0.3 * t))  # lungs widen downwards
    top = a["lung_top"] + 0.3 * (s_lat + 0.2) ** 2  # rounded apex, slightly medial
    bottom = dia - a["dome"] * (1 - s_lat**2)  # diaphragm dome, deep lateral costophrenic angle
    return (np.abs(s_lat) < 1) & (y > top) & (y < bottom)


def _lung_point(a: dict, side: int, s_lat: float, t: float) -> tuple[float, float]:
    """Canonical (x, y) of lung-relative coordinates: s_lat in [-1, 1] medial->lateral, t in [0, 1] apex->base."""
    y = a["lung_top"] + t * (a["dia"] - a["lung_top"])
    return side * (a["lung_cx"] + s_lat * a["lung_w"] * (0.7 + 0.3 * t)), y


def _pneumothorax(x, y, lung: np.ndarray, side: int, a: dict, frac: float):
    """Masks (air gap, visible pleural line) of a pneumothorax taking `frac` of the lung's extent."""
    # the collapsed lung is the lung shrunk towards the hilum; the gap between is air without vessels
    hx, hy = _lung_point(a, side, -0.5, 0.85)
    k = 1 - frac
    collapsed = _lung_mask(hx + (x - hx) / k, hy + (y - hy) / k, side, a)
    gap = lung & ~collapsed & (y < hy)  # upright patient: air collects at the apex and lateral wall
    c = collapsed
    edge = c & ~(np.roll(c, 1, 0) & np.roll(c, -1, 0) & np.roll(c, 1, 1) & np.roll(c, -1, 1))
    return gap, edge & (_blur(gap.astype(float), 1.0) > 0.05)  # only the edge that faces the gap


def _sample_patient(rng: np.random.Generator) -> dict:
    """Patient-level anatomy, lengths in canonical units (1 = half the image width)."""
    u = rng.uniform
    return dict(body_w=u(0.86, 0.96), body_h=u(1.08, 1.16), lung_cx=u(0.40, 0.45), lung_w=u(0.29, 0.33),
                lung_top=u(-0.74, -0.66), dia=u(0.50, 0.60), dome=u(0.15, 0.21), heart_w=u(0.27, 0.31),
                heart_h=u(0.29, 0.33), heart_cx=u(0.07, 0.11), rib_gap=u(0.14, 0.17))


def _sample_image(patient: dict, rng: np.random.Generator) -> tuple[dict, dict]:
    """Per-image anatomy jitter, pose and exposure, plus the parameters of every finding.

    Finding parameters are drawn whether or not the finding is present, so the random
    stream (hence anatomy and noise) does not depend on the labels.
    """
    a = {k: v * (1 + 0.015 * rng.standard_normal()) for k, v in patient.items()}
    a.update(shift=rng.uniform(-0.04, 0.04, 2), angle=rng.uniform(-0.06, 0.06), scale=rng.uniform(0.93, 1.03),
             gain=rng.uniform(0.85, 1.15), offset=rng.uniform(-0.05, 0.05))
    sides, u = rng.choice([-1, 1], size=4), rng.uniform
    f = dict(eff_side=sides[0], eff_depth=u(0.8, 1.2),
             nod_side=sides[1], nod_at=(u(-0.5, 0.6), u(0.25, 0.7)), nod_r=u(0.06, 0.09),  # 2-3 cm on a 35-cm film
             con_side=sides[2], con_at=(u(-0.4, 0.5), u(0.3, 0.75)), con_r=u(0.15, 0.2),
             ptx_side=sides[3], ptx_frac=u(0.8, 1.2))
    return a, f


def _render(a: dict, f: dict, present: dict, size: int, difficulty: float, rng: np.random.Generator):
    """Render one image. Returns (uint8 array of shape (size, size), nodule centre (x, y) in pixels or None)."""
    noise = rng.standard_normal((3, size, size))  # drawn first and always: stream independent of findings
    e = 1.0 - 0.6 * difficulty  # effect size of every finding
    px = (np.arange(size) + 0.5) * 2 / size - 1
    c, s = np.cos(a["angle"]), np.sin(a["angle"])
    u, v = [(g - sh) / a["scale"] for g, sh in zip(np.meshgrid(px, px), a["shift"])]
    x, y = c * u + s * v, -s * u + c * v  # pixel grid -> canonical coordinates (inverse pose)

    body = (np.abs(x) / a["body_w"]) ** 3 + ((y - 0.3) / a["body_h"]) ** 4 < 1
    body |= (np.abs(x) < 0.2) & (y < -0.5)  # neck
    body = body * (1 - 0.35 * (x / a["body_w"]) ** 2)  # the chest is thinner, hence darker, laterally
    hw, hh = a["heart_w"], a["heart_h"]
    if present["cardiomegaly"]:
        hw, hh = hw * (1 + 0.5 * e), hh * (1 + 0.1 * e)
    hy = a["dia"] - 0.45 * hh  # heart rests on the diaphragm
    heart = ((x - a["heart_cx"]) / hw) ** 2 + ((y - hy) / hh) ** 2 < 1
    heart |= (x - 0.1) ** 2 + (y - hy + hh + 0.06) ** 2 < 0.055**2  # aortic knob
    d = np.abs(x) - 0.08  # distance from the spine; posterior ribs leave it and curve down laterally
    r = (y + 0.35 * d - 0.9 * d**2 - a["lung_top"] + 0.05) / a["rib_gap"]
    cage = (d > 0) & (r > 0) & (r < 9) & (y < a["dia"]) & (np.abs(x) < a["lung_cx"] + a["lung_w"] + 0.06)
    ribs = (0.5 + 0.5 * np.cos(2 * np.pi * r)) ** 6 * cage
    clav = (np.abs(y + 0.6 + 0.15 * np.abs(x)) < 0.03) & (np.abs(x) > 0.08) & (np.abs(x) < 0.65)
    spine = (np.abs(x) < 0.07) * (0.8 + 0.2 * np.cos(2 * np.pi * y / 0.11))  # vertebrae and disc spaces
    bubble = ((x - 0.35) / 0.08) ** 2 + ((y - a["dia"] - 0.12) / 0.05) ** 2 < 1  # gastric air under left dome

    lung, opacity = np.zeros((2, size, size))
    ptx = line = np.zeros((size, size), dtype=bool)
    for side in (-1, 1):
        m = _lung_mask(x, y, side, a) & (body > 0)
        if present["pleural_effusion"] and side == f["eff_side"]:
            # fluid rises along the lateral wall (meniscus), blunting the costophrenic angle
            s_lat = np.clip(side * (x - side * a["lung_cx"]) / a["lung_w"], 0, 1)
            depth = (0.32 - 0.2 * difficulty) * f["eff_depth"] + 0.15 * s_lat**2
            opacity += (0.5 + 0.45 * e) * (m & (y > a["dia"] - depth * (a["dia"] - a["lung_top"])))
        if present["pneumothorax"] and side == f["ptx_side"]:
            ptx, line = _pneumothorax(x, y, m, side, a, (0.2 + 0.15 * e) * f["ptx_frac"])
            line &= ~heart
        lung += m
    if present["consolidation"]:
        cx, cy = _lung_point(a, f["con_side"], *f["con_at"])
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / f["con_r"] ** 2)
        opacity += 0.8 * e * np.clip(blob * (1 + 0.5 * _blur(noise[1], size / 40) * size / 20), 0, 1)
    air = lung * (1 - heart) * (1 - np.clip(opacity, 0, 1))
    vessels = np.clip(_blur(noise[0], size / 160), 0, None)  # lung markings, only where lung tissue is
    heart_above_dome = heart * (y < a["dia"] - a["dome"])  # below the dome it merges with the abdomen
    dens = (0.55 * body + 0.08 * spine + 0.07 * ribs + 0.12 * clav + 0.05 * heart_above_dome - 0.15 * bubble
            - 0.36 * air + 0.18 * air * ~ptx * vessels - (0.03 + 0.07 * e) * ptx * air + 0.2 * e * line)
    nodule_xy = None
    if present["nodule"]:
        nx, ny = _lung_point(a, f["nod_side"], *f["nod_at"])
        dens += 0.5 * e * np.exp(-(((x - nx) ** 2 + (y - ny) ** 2) / f["nod_r"] ** 2) ** 2)
        pose = a["scale"] * np.array([c * nx - s * ny, s * nx + c * ny]) + a["shift"]  # forward pose
        nodule_xy = tuple(float(q) for q in (pose + 1) * size / 2 - 0.5)  # pixel centres at integers
    img = _blur(dens, 0.9 * size / 128)  # soft tissue edges, not vector-graphics steps
    grain = _blur(noise[2], 0.5) * 1.6  # film grain is slightly correlated; rescale to ~unit std
    img = a["offset"] + 0.1 + a["gain"] * img + (0.01 + 0.04 * difficulty) * grain
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8), nodule_xy


def _check_args(n_patients, images_per_patient, size, prevalence, difficulty) -> np.ndarray:
    """Validate the arguments of generate_phantoms; return prevalence as a float array in FINDINGS order."""
    if not isinstance(n_patients, (int, np.integer)) or n_patients < 1:
        raise ValueError(f"n_patients must be an int >= 1, got {n_patients!r}")
    ipp = images_per_patient
    if (not isinstance(ipp, (tuple, list)) or len(ipp) != 2 or not all(isinstance(i, (int, np.integer)) for i in ipp)
            or not 1 <= ipp[0] <= ipp[1]):
        raise ValueError(f"images_per_patient must be a pair (lo, hi) of ints with 1 <= lo <= hi, got {ipp!r}")
    if not isinstance(size, (int, np.integer)) or size < _MIN_SIZE:
        raise ValueError(f"size must be an int >= {_MIN_SIZE} pixels, got {size!r}")
    if not isinstance(difficulty, (int, float)) or not 0 <= difficulty <= 1:
        raise ValueError(f"difficulty must be a number in [0, 1], got {difficulty!r}")
    if isinstance(prevalence, dict):
        unknown = [k for k in prevalence if k not in FINDINGS]
        if unknown:
            raise ValueError(f"prevalence has unknown finding {unknown[0]!r}; expected names from {FINDINGS}")
        values = [prevalence.get(k, 0.0) for k in FINDINGS]
    else:
        values = [prevalence] * len(FINDINGS)
    for name, p in zip(FINDINGS, values):
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 <= p <= 1:
            raise ValueError(f"prevalence for {name} must be a number in [0, 1], got {p!r}")
    return np.array(values, dtype=float)


def generate_phantoms(out_dir, n_patients=200, images_per_patient=(1, 3), size=128, prevalence=0.3,
                      difficulty=0.5, seed=0) -> Path:
    """Write a synthetic chest-radiograph data set and return the path of its labels.csv.

    Writes `size` x `size` 8-bit grayscale PNGs to out_dir/images/ and, last and atomically,
    out_dir/labels.csv with columns path (relative to out_dir), patient_id, one 0/1 column per
    name in FINDINGS, and nodule_x, nodule_y (nodule centre in pixels, empty without a nodule).
    Each patient gets between images_per_patient[0] and [1] images sharing its anatomy.
    prevalence: probability of each finding, a float or {finding: float} (missing names: 0).
    difficulty: 0 = obvious findings, 1 = subtle findings in noisier images.
    The same seed gives byte-identical files.
    """
    prev = _check_args(n_patients, images_per_patient, size, prevalence, difficulty)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "labels.csv"
    csv_path.unlink(missing_ok=True)  # a stale CSV must not describe a half-rewritten folder

    rng = np.random.default_rng(seed)
    counts = rng.integers(images_per_patient[0], images_per_patient[1] + 1, size=n_patients)
    labels = rng.random((int(counts.sum()), len(FINDINGS))) < prev
    width = max(4, len(str(n_patients)))
    rows = []
    for p, (count, prng) in enumerate(zip(counts, rng.spawn(n_patients)), start=1):
        patient, pid = _sample_patient(prng), f"P{p:0{width}d}"
        for j, irng in enumerate(prng.spawn(int(count)), start=1):
            present = dict(zip(FINDINGS, labels[len(rows)]))
            img, nod = _render(*_sample_image(patient, irng), present, size, float(difficulty), irng)
            rel = f"images/{pid}_{j}.png"
            Image.fromarray(img).save(out_dir / rel)
            rows.append({"path": rel, "patient_id": pid, **{k: int(present[k]) for k in FINDINGS},
                         "nodule_x": round(nod[0], 2) if nod else None,
                         "nodule_y": round(nod[1], 2) if nod else None})

    df = pd.DataFrame(rows, columns=["path", "patient_id", *FINDINGS, "nodule_x", "nodule_y"])
    write_text_atomic(csv_path, df.to_csv(index=False))
    return csv_path
