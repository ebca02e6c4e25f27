"""Specification tests for the synthetic chest-radiograph phantoms."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medpeft.data import phantoms
from medpeft.data.phantoms import FINDINGS, generate_phantoms

SIZE = 64


def _generate(out_dir, **kwargs):
    kwargs = {"n_patients": 20, "size": SIZE, "seed": 1, **kwargs}
    csv = generate_phantoms(out_dir, **kwargs)
    return csv, pd.read_csv(csv, keep_default_na=True)


def _images(csv, df):
    return np.stack([np.asarray(Image.open(csv.parent / p), dtype=float) for p in df["path"]])


def _band(rows, cols, size=SIZE):
    """Boolean mask selecting fractional row/column ranges, e.g. rows=(0.5, 0.75)."""
    mask = np.zeros((size, size), dtype=bool)
    for c0, c1 in cols:
        mask[int(rows[0] * size) : int(rows[1] * size), int(c0 * size) : int(c1 * size)] = True
    return mask


@pytest.fixture(scope="module")
def finding_effects(tmp_path_factory):
    """Per finding: (labels, pixel difference of finding-present minus finding-absent images).

    Same seed and difficulty 0, so both runs share anatomy and noise and differ only in the finding.
    """
    root = tmp_path_factory.mktemp("effects")
    common = {"n_patients": 24, "images_per_patient": (1, 1), "difficulty": 0.0, "seed": 7}
    csv0, df0 = _generate(root / "none", prevalence=0.0, **common)
    base = _images(csv0, df0)
    effects = {}
    for f in FINDINGS:
        csv, df = _generate(root / f, prevalence={f: 1.0}, **common)
        effects[f] = (df, _images(csv, df) - base)
    return effects


def test_same_seed_gives_byte_identical_csv_and_images(tmp_path):
    csv_a, df_a = _generate(tmp_path / "a", seed=3)
    csv_b, df_b = _generate(tmp_path / "b", seed=3)
    assert csv_a.read_bytes() == csv_b.read_bytes()
    for rel in df_a["path"]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_different_seed_gives_different_images_and_labels(tmp_path):
    csv_a, df_a = _generate(tmp_path / "a", seed=3)
    csv_b, df_b = _generate(tmp_path / "b", seed=4)
    assert csv_a.read_bytes() != csv_b.read_bytes()
    first = df_a["path"][0]
    assert first == df_b["path"][0]  # same file name, different content
    assert (tmp_path / "a" / first).read_bytes() != (tmp_path / "b" / first).read_bytes()


def test_csv_has_specified_columns_and_dtypes(tmp_path):
    csv, df = _generate(tmp_path, prevalence=0.5)
    assert csv == tmp_path / "labels.csv"
    assert list(df.columns) == ["path", "patient_id", *FINDINGS, "nodule_x", "nodule_y"]
    for f in FINDINGS:
        assert df[f].dtype.kind == "i" and set(df[f]) <= {0, 1}
    assert df["patient_id"].str.fullmatch(r"P\d{4}").all()
    assert df["path"].str.fullmatch(r"images/P\d{4}_\d\.png").all()
    has_nodule = df["nodule"] == 1
    assert has_nodule.any() and (~has_nodule).any()
    assert df.loc[~has_nodule, ["nodule_x", "nodule_y"]].isna().all().all()
    coords = df.loc[has_nodule, ["nodule_x", "nodule_y"]]
    assert coords.notna().all().all() and ((coords > 0) & (coords < SIZE - 1)).all().all()
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["labels.csv"]  # no temp file left behind


def test_images_exist_and_are_8bit_grayscale_of_requested_size(tmp_path):
    csv, df = _generate(tmp_path, n_patients=5, size=48)
    assert len(list((tmp_path / "images").glob("*.png"))) == len(df)
    for rel in df["path"]:
        with Image.open(tmp_path / rel) as img:
            assert img.format == "PNG" and img.mode == "L" and img.size == (48, 48)
            assert np.ptp(np.asarray(img)) > 100  # a picture, not a blank frame


def test_patients_have_between_lo_and_hi_images(tmp_path):
    _, df = _generate(tmp_path, n_patients=30, images_per_patient=(2, 3))
    counts = df.groupby("patient_id").size()
    assert len(counts) == 30 and set(counts) == {2, 3}
    _, single = _generate(tmp_path / "single", n_patients=10, images_per_patient=(1, 1))
    assert single["patient_id"].is_unique and len(single) == 10


def test_images_of_one_patient_share_anatomy_with_small_variation():
    rng = np.random.default_rng(0)
    patients = [phantoms._sample_patient(rng) for _ in range(40)]
    per_image = [[phantoms._sample_image(p, rng)[0] for _ in range(3)] for p in patients]
    for key in patients[0]:
        values = np.array([[a[key] for a in images] for images in per_image])
        assert np.allclose(values, np.array([p[key] for p in patients])[:, None], rtol=0.08), key
        assert values.std(axis=1, ddof=1).mean() < 0.7 * values.mean(axis=1).std(ddof=1), key


def test_observed_prevalence_is_near_requested(tmp_path):
    _, df = _generate(tmp_path, n_patients=150, images_per_patient=(2, 2), size=32, prevalence=0.3)
    assert len(df) == 300
    for f in FINDINGS:
        assert abs(df[f].mean() - 0.3) < 0.1, f


def test_dict_prevalence_sets_each_finding_and_zero_gives_no_positives(tmp_path):
    _, df = _generate(tmp_path, n_patients=40, size=32, prevalence={"nodule": 0.0, "cardiomegaly": 1.0})
    assert df["nodule"].sum() == 0 and df["nodule_x"].isna().all()
    assert (df["cardiomegaly"] == 1).all()
    assert df[["pleural_effusion", "consolidation", "pneumothorax"]].to_numpy().sum() == 0  # missing names: 0


def test_cardiomegaly_widens_the_heart_on_both_sides(finding_effects):
    _, diff = finding_effects["cardiomegaly"]
    mean = diff.mean(axis=0)
    assert mean[_band((0.5, 0.78), [(0.3, 0.45)])].mean() > 5  # right heart border (image left)
    assert mean[_band((0.5, 0.78), [(0.62, 0.8)])].mean() > 5  # left heart border (image right)
    assert np.abs(diff[:, : SIZE // 3]).max() == 0  # upper chest untouched


def test_pleural_effusion_brightens_the_lower_lateral_lung(finding_effects):
    _, diff = finding_effects["pleural_effusion"]
    mean = diff.mean(axis=0)
    assert mean[_band((0.55, 0.78), [(0.05, 0.35), (0.65, 0.95)])].mean() > 5
    assert np.abs(diff[:, : SIZE // 3]).max() == 0  # apices untouched


def test_nodule_brightens_a_small_disc_at_its_csv_coordinates(finding_effects):
    df, diff = finding_effects["nodule"]
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for d, (nx, ny) in zip(diff, df[["nodule_x", "nodule_y"]].to_numpy()):
        r2 = (xx - nx) ** 2 + (yy - ny) ** 2
        assert d[r2 <= 1.5**2].mean() > 15
        assert np.abs(d[r2 > 8**2]).max() == 0


def test_consolidation_brightens_a_patch_inside_the_lungs(finding_effects):
    _, diff = finding_effects["consolidation"]
    for d in diff:
        changed = d != 0
        assert d[changed].mean() > 4 and d.max() > 25
        assert 0.01 < changed.mean() < 0.2  # a patch, not the whole image


def test_pneumothorax_darkens_the_upper_lateral_lung(finding_effects):
    _, diff = finding_effects["pneumothorax"]
    per_image = np.array([d[_band((0.12, 0.6), [(0.05, 0.35), (0.65, 0.95)])].mean() for d in diff])
    assert (per_image < -1).all() and per_image.mean() < -3
    assert np.abs(diff[:, int(0.8 * SIZE) :]).max() == 0  # below the diaphragm untouched


def test_findings_are_subtler_at_high_difficulty(tmp_path):
    common = {"n_patients": 10, "images_per_patient": (1, 1), "difficulty": 1.0}
    base = _images(*_generate(tmp_path / "none", prevalence=0.0, **common))
    big = _images(*_generate(tmp_path / "big", prevalence={"cardiomegaly": 1.0}, **common))
    easy_base = _images(*_generate(tmp_path / "e0", prevalence=0.0, **{**common, "difficulty": 0.0}))
    easy_big = _images(*_generate(tmp_path / "e1", prevalence={"cardiomegaly": 1.0}, **{**common, "difficulty": 0.0}))
    assert 0 < np.abs(big - base).mean() < 0.7 * np.abs(easy_big - easy_base).mean()


def test_failed_generation_leaves_no_labels_csv(tmp_path, monkeypatch):
    _generate(tmp_path, n_patients=3)
    saved = []

    def failing_save(self, *args, **kwargs):
        if len(saved) == 2:
            raise OSError("disk full")
        saved.append(args[0])

    monkeypatch.setattr(phantoms.Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        _generate(tmp_path, n_patients=3)
    assert not (tmp_path / "labels.csv").exists()


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"prevalence": {"cardiomegally": 0.2}}, "cardiomegally"),
        ({"prevalence": 1.5}, "prevalence"),
        ({"prevalence": {"nodule": -0.1}}, "prevalence"),
        ({"difficulty": 1.2}, "difficulty"),
        ({"difficulty": -0.1}, "difficulty"),
        ({"size": 16}, "size"),
        ({"n_patients": 0}, "n_patients"),
        ({"images_per_patient": (3, 1)}, "images_per_patient"),
        ({"images_per_patient": (0, 2)}, "images_per_patient"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(tmp_path, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        generate_phantoms(tmp_path, **{"n_patients": 2, "size": 32, **kwargs})
    assert not (tmp_path / "labels.csv").exists()


def test_unknown_finding_message_lists_expected_names(tmp_path):
    with pytest.raises(ValueError, match="pleural_effusion"):
        generate_phantoms(tmp_path, prevalence={"effusion": 0.5})
