"""Decode-once image cache: exact pixels, reuse without decoding, keys, workers, failure cleanup."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import medpeft.data.cache as cache_module
from medpeft.data.cache import ImageCache, build_cache, cache_key, open_cache
from medpeft.data.images import load_grayscale
from medpeft.errors import DataError

SIZE = 24
# cache_key(["a"], ["a.png"], 224) for FORMAT_VERSION 1: must only change with a format bump.
_KEY_A = "1f8f6a14895cde0a"


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    """30 small PNGs of varied shape and bit depth: (image_ids, paths)."""
    root = tmp_path_factory.mktemp("pngs")
    rng = np.random.default_rng(0)
    ids, paths = [], []
    for i in range(30):
        h, w = 30 + i, 50 - i
        if i % 3 == 0:
            image = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
        elif i % 3 == 1:
            image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        else:
            image = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))
        path = root / f"img{i:02d}.png"
        image.save(path)
        ids.append(f"id{i:02d}")
        paths.append(str(path))
    return ids, paths


def expected(path, size=SIZE):
    return np.asarray(load_grayscale(path).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None))


def test_cached_pixels_equal_decode_then_bilinear_resize(pngs, tmp_path):
    ids, paths = pngs
    cache = build_cache(ids, paths, SIZE, tmp_path)
    assert len(cache) == len(paths) and cache.image_ids == ids
    for i, path in enumerate(paths):
        assert cache[i].shape == (SIZE, SIZE) and cache[i].dtype == np.uint8
        np.testing.assert_array_equal(cache[i], expected(path))
    assert cache.index_of("id07") == 7


def test_second_build_reuses_cache_without_decoding(pngs, tmp_path, monkeypatch):
    ids, paths = pngs
    first = build_cache(ids, paths, SIZE, tmp_path)

    def fail(path):
        raise AssertionError(f"decoded {path} again")

    monkeypatch.setattr(cache_module, "load_grayscale", fail)
    second = build_cache(ids, paths, SIZE, tmp_path)
    assert second.key == first.key == cache_key(ids, paths, SIZE)
    assert second.path == first.path == tmp_path / first.key
    np.testing.assert_array_equal(np.asarray(second[5]), np.asarray(first[5]))
    assert [p.name for p in tmp_path.iterdir()] == [first.key]


def test_key_is_stable_and_changes_with_size_paths_ids_or_order(pngs):
    ids, paths = pngs
    key = cache_key(ids, paths, SIZE)
    assert len(key) == 16 and key == cache_key(list(ids), list(paths), SIZE)
    others = {
        cache_key(ids, paths, SIZE + 1),
        cache_key(ids, paths[:-1] + [paths[-1] + ".other"], SIZE),
        cache_key(ids[:-1], paths[:-1], SIZE),
        cache_key(ids[:-1] + ["renamed"], paths, SIZE),
        cache_key(ids[::-1], paths[::-1], SIZE),
    }
    assert key not in others and len(others) == 5


def test_known_key_value_does_not_drift_between_processes():
    # A fixed value: a key computed with Python's randomised hash() would differ per process.
    assert cache_key(["a"], ["a.png"], 224) == cache_key(("a",), ("a.png",), 224)
    assert cache_key(["a"], ["a.png"], 224) == _KEY_A


def test_two_workers_write_the_same_bytes_as_one(pngs, tmp_path):
    ids, paths = pngs
    one = build_cache(ids, paths, SIZE, tmp_path / "w1", workers=1)
    two = build_cache(ids, paths, SIZE, tmp_path / "w2", workers=2)
    assert one.key == two.key
    assert (one.path / "images.u8").read_bytes() == (two.path / "images.u8").read_bytes()


def test_corrupt_image_raises_data_error_naming_file_and_leaves_nothing(pngs, tmp_path):
    ids, paths = pngs
    bad = tmp_path / "images" / "broken.png"
    bad.parent.mkdir()
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    cache_dir = tmp_path / "cache"
    for workers in (1, 2):
        with pytest.raises(DataError, match="broken.png"):
            build_cache(ids + ["bad"], paths + [str(bad)], SIZE, cache_dir, workers=workers)
        assert list(cache_dir.iterdir()) == []


def test_truncated_images_file_raises_data_error_on_open(pngs, tmp_path):
    ids, paths = pngs
    cache = build_cache(ids[:4], paths[:4], SIZE, tmp_path)
    data = cache.path / "images.u8"
    del cache
    data.write_bytes(data.read_bytes()[:-10])
    with pytest.raises(DataError, match="images.u8"):
        open_cache(data.parent)
    with pytest.raises(DataError, match="images.u8"):
        build_cache(ids[:4], paths[:4], SIZE, tmp_path)


def test_missing_index_raises_data_error(tmp_path):
    with pytest.raises(DataError, match="index.json"):
        open_cache(tmp_path)


def test_cached_images_are_read_only(pngs, tmp_path):
    ids, paths = pngs
    cache = build_cache(ids[:3], paths[:3], SIZE, tmp_path)
    assert isinstance(open_cache(cache.path), ImageCache)
    with pytest.raises(ValueError):
        cache[0][0, 0] = 1
    assert not cache[1].flags.writeable


def test_empty_dataset_gives_empty_cache(tmp_path):
    cache = build_cache([], [], SIZE, tmp_path)
    assert len(cache) == 0 and open_cache(cache.path).image_ids == []


def test_losing_a_build_race_discards_own_copy_and_opens_the_winners(pngs, tmp_path, monkeypatch):
    ids, paths = pngs[0][:3], pngs[1][:3]
    fill = cache_module._fill

    def fill_while_another_process_finishes_first(images, *args):
        monkeypatch.setattr(cache_module, "_fill", fill)
        winner = build_cache(ids, paths, SIZE, tmp_path)
        (winner.path / "winner").touch()
        fill(images, *args)

    monkeypatch.setattr(cache_module, "_fill", fill_while_another_process_finishes_first)
    cache = build_cache(ids, paths, SIZE, tmp_path)
    assert (cache.path / "winner").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [cache.key]
    np.testing.assert_array_equal(np.asarray(cache[2]), expected(paths[2]))


def test_dicom_images_are_cached_like_load_grayscale_decodes_them(tmp_path):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    rng = np.random.default_rng(1)
    paths = []
    for i in range(3):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(tmp_path / f"x{i}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 40, 36, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = rng.integers(0, 4096, (40, 36), dtype=np.uint16).tobytes()
        ds.save_as(ds.filename, enforce_file_format=True)
        paths.append(ds.filename)
    cache = build_cache(["a", "b", "c"], paths, SIZE, tmp_path / "cache", workers=2)
    for i, path in enumerate(paths):
        np.testing.assert_array_equal(cache[i], expected(path))
    assert cache.index_of("c") == 2
    with pytest.raises(KeyError, match="missing"):
        cache.index_of("missing")
