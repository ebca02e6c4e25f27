"""read_dicom: files written here with pydicom; expected values computed by hand or from the DICOM formulas."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, generate_uid

from medpeft.data.dicom import read_dicom, read_header
from medpeft.errors import DataError

DX_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
GRADIENT = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 300 + 100)  # 100 .. 3400, 12-bit


def make_dataset(pixels, photometric="MONOCHROME2", bits_stored=12, syntax=ExplicitVRLittleEndian, **elements):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = DX_SOP_CLASS
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape[-2], pixels.shape[-1]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def write_dicom(path, pixels, **kwargs):
    make_dataset(pixels, **kwargs).save_as(path, enforce_file_format=True)
    return path


def linear_window(x, center, width):
    """DICOM PS3.3 C.11.2.1.2.1 ('LINEAR') scaled to 0..255."""
    x = np.asarray(x, dtype=np.float64)
    y = ((x - (center - 0.5)) / (width - 1) + 0.5)
    y[x <= center - 0.5 - (width - 1) / 2] = 0.0
    y[x > center - 0.5 + (width - 1) / 2] = 1.0
    return np.rint(y * 255).astype(np.uint8)


def test_monochrome2_without_voi_is_min_max_scaled(tmp_path):
    out = read_dicom(write_dicom(tmp_path / "a.dcm", GRADIENT))
    expected = np.rint((GRADIENT - 100.0) / 3300.0 * 255.0).astype(np.uint8)
    assert out.dtype == np.uint8 and out.shape == (3, 4)
    np.testing.assert_array_equal(out, expected)
    assert out[0, 0] == 0 and out[-1, -1] == 255
    assert out[0, 1] == 23  # (400-100)/3300*255 = 23.18


def test_monochrome1_is_inverted_so_high_values_are_dark(tmp_path):
    mono2 = read_dicom(write_dicom(tmp_path / "m2.dcm", GRADIENT))
    mono1 = read_dicom(write_dicom(tmp_path / "m1.dcm", GRADIENT, photometric="MONOCHROME1"))
    np.testing.assert_array_equal(mono1, 255 - mono2)
    assert mono1[-1, -1] == 0 and mono1[0, 0] == 255


def test_window_center_width(tmp_path):
    pixels = np.array([[0, 1000, 1548, 2048], [2300, 2548, 3000, 4095]], dtype=np.uint16)
    out = read_dicom(write_dicom(tmp_path / "w.dcm", pixels, WindowCenter=2048, WindowWidth=1000))
    np.testing.assert_array_equal(out, linear_window(pixels, 2048, 1000))
    assert (out[0, :3] == 0).all()  # at or below the window
    assert (out[1, 1:] == 255).all()  # above the window
    assert out[0, 3] == 128  # centre: (0.5/999 + 0.5) * 255 = 127.63
    assert out[1, 0] == 192  # ((2300 - 2047.5) / 999 + 0.5) * 255 = 191.95


def test_rescale_is_applied_before_the_window(tmp_path):
    # rescaled = 2 * stored - 1024; the window [-1000, 1000] is in rescaled units
    pixels = np.array([[0, 12, 262, 512], [612, 762, 1012, 4095]], dtype=np.uint16)
    path = write_dicom(
        tmp_path / "r.dcm", pixels, RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=0, WindowWidth=2000
    )
    out = read_dicom(path)
    rescaled = 2.0 * pixels - 1024.0
    np.testing.assert_array_equal(out, linear_window(rescaled, 0, 2000))
    assert out[0, 0] == 0 and out[1, 3] == 255
    assert out[0, 3] == 128  # stored 512 -> 0, the window centre
    assert out[0, 2] == 64  # stored 262 -> -500: (-499.5/1999 + 0.5) * 255 = 63.78


def test_voi_lut_sequence_output_range_maps_to_0_255(tmp_path):
    pixels = np.array([[0, 10, 11, 12], [13, 14, 20, 4000]], dtype=np.uint16)
    item = Dataset()
    item.add_new(0x00283002, "US", [5, 10, 16])  # LUT Descriptor: 5 entries, first maps stored 10
    item.add_new(0x00283006, "US", [1000, 1500, 2000, 2500, 3000])  # LUT Data
    out = read_dicom(write_dicom(tmp_path / "lut.dcm", pixels, VOILUTSequence=[item]))
    # LUT outputs 1000 1000 1500 2000 / 2500 3000 3000 3000, range [1000, 3000] -> 0..255
    np.testing.assert_array_equal(out, np.array([[0, 0, 64, 128], [191, 255, 255, 255]], dtype=np.uint8))



def test_voi_output_range_is_not_stretched_to_the_image(tmp_path):
    # Every pixel inside the window / LUT: the output keeps the window's (LUT's) scale, not the image's min-max.
    pixels = np.array([[2048, 2300]], dtype=np.uint16)
    out = read_dicom(write_dicom(tmp_path / "w.dcm", pixels, WindowCenter=2048, WindowWidth=1000))
    np.testing.assert_array_equal(out, [[128, 192]])
    item = Dataset()
    item.add_new(0x00283002, "US", [5, 10, 16])
    item.add_new(0x00283006, "US", [1000, 1500, 2000, 2500, 3000])
    out = read_dicom(write_dicom(tmp_path / "lut.dcm", np.array([[11, 12]], dtype=np.uint16), VOILUTSequence=[item]))
    np.testing.assert_array_equal(out, [[64, 128]])

def test_same_file_twice_is_identical_uint8_hw(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 4096, size=(5, 7), dtype=np.uint16)
    path = write_dicom(tmp_path / "n.dcm", pixels, photometric="MONOCHROME1", WindowCenter=2000, WindowWidth=3000)
    first, second = read_dicom(path), read_dicom(str(path))
    assert first.dtype == np.uint8 and first.shape == (5, 7)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first, 255 - linear_window(pixels, 2000, 3000))


def test_constant_image_is_all_zeros(tmp_path):
    out = read_dicom(write_dicom(tmp_path / "c.dcm", np.full((2, 3), 700, dtype=np.uint16)))
    np.testing.assert_array_equal(out, np.zeros((2, 3), dtype=np.uint8))


def test_rgb_becomes_bt601_luminance(tmp_path):
    rgb = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [255, 255, 255]]], dtype=np.uint8)
    ds = make_dataset(np.zeros((2, 2), dtype=np.uint16), photometric="RGB")
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
    ds.PixelData = rgb.tobytes()
    ds.save_as(tmp_path / "rgb.dcm", enforce_file_format=True)
    # luminance 76.245 149.685 / 29.07 255 -> min-max over [29.07, 255]
    expected = np.rint((np.array([[76.245, 149.685], [29.07, 255.0]]) - 29.07) / (255.0 - 29.07) * 255)
    np.testing.assert_array_equal(read_dicom(tmp_path / "rgb.dcm"), expected.astype(np.uint8))


def test_bare_data_set_without_preamble_is_read(tmp_path):
    ds = make_dataset(GRADIENT)
    del ds.file_meta
    ds.save_as(tmp_path / "bare.dcm", implicit_vr=True, little_endian=True)
    assert not (tmp_path / "bare.dcm").read_bytes()[128:132] == b"DICM"
    np.testing.assert_array_equal(
        read_dicom(tmp_path / "bare.dcm"), np.rint((GRADIENT - 100.0) / 3300.0 * 255.0).astype(np.uint8)
    )


def test_header_is_read_without_pixels_from_a_file_read_dicom_opens(tmp_path):
    keywords = ["PatientSex", "PatientAge", "ViewPosition"]
    path = write_dicom(tmp_path / "a.dcm", GRADIENT, PatientSex="F", PatientAge="058Y")
    assert read_header(path, keywords) == {"PatientSex": "F", "PatientAge": "058Y", "ViewPosition": ""}
    ds = make_dataset(GRADIENT, ViewPosition="AP")
    del ds.file_meta
    ds.save_as(tmp_path / "bare.dcm", implicit_vr=True, little_endian=True)
    assert read_header(tmp_path / "bare.dcm", keywords) == {"PatientSex": "", "PatientAge": "", "ViewPosition": "AP"}
    (tmp_path / "notes.dcm").write_text("patient notes, not an image\n" * 20)
    assert read_header(tmp_path / "notes.dcm", keywords) is None
    assert read_header(tmp_path / "nope.dcm", keywords) is None


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.dcm: .*not found"):
        read_dicom(tmp_path / "nope.dcm")


def test_text_file_is_not_dicom(tmp_path):
    path = tmp_path / "notes.dcm"
    path.write_text("patient notes, not an image\n" * 20)
    with pytest.raises(DataError, match=r"notes\.dcm: not a DICOM file"):
        read_dicom(path)


def test_dicom_without_pixel_data(tmp_path):
    ds = make_dataset(GRADIENT)
    del ds.PixelData
    ds.save_as(tmp_path / "empty.dcm", enforce_file_format=True)
    with pytest.raises(DataError, match=r"empty\.dcm: DICOM has no pixel data \(PixelData missing\)"):
        read_dicom(tmp_path / "empty.dcm")


def test_multi_frame_is_refused(tmp_path):
    volume = np.stack([GRADIENT] * 3)
    path = write_dicom(tmp_path / "ct.dcm", volume, NumberOfFrames=3)
    with pytest.raises(DataError, match=r"ct\.dcm: a volume of 3 frames, expected one 2-D radiograph"):
        read_dicom(path)


def test_undecodable_compressed_pixel_data(tmp_path):
    ds = make_dataset(GRADIENT, syntax=JPEGLSLossless)
    ds.PixelData = encapsulate([b"\xff\xd8 not a real JPEG-LS stream \xff\xd9"])
    ds.save_as(tmp_path / "jls.dcm", enforce_file_format=True)
    with pytest.raises(DataError, match=r"jls\.dcm: cannot decode compressed transfer syntax 'JPEG-LS Lossless"):
        read_dicom(tmp_path / "jls.dcm")
