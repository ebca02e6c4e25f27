"""Decode a single-frame chest X-ray DICOM file to an 8-bit grayscale array, the same way every time."""

from __future__ import annotations

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from medpeft.errors import DataError

# ITU-R BT.601 luma weights (the same as PIL's "L" conversion).
_LUMA = np.array([0.299, 0.587, 0.114])
# Beyond any stored value, so the window maps them to its output minimum and maximum.
_PROBE = np.array([-1e300, 1e300])


def _open(path: str) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path)
    except FileNotFoundError:
        raise DataError(f"{path}: DICOM file not found") from None
    except InvalidDicomError:
        pass  # no 128-byte preamble + "DICM": maybe an old bare data set, retried below
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not a readable DICOM file ({str(e).splitlines()[0]})") from None
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception:  # forced parsing of arbitrary bytes can fail in any way
        ds = None
    # A forced read accepts almost any bytes; only pixel data makes it a usable image.
    if ds is None or "PixelData" not in ds:
        raise DataError(f"{path}: not a DICOM file (expected a DICOM image with 'DICM' header)")
    if "TransferSyntaxUID" not in ds.get("file_meta", {}):
        implicit, little = ds.original_encoding
        syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        ds.ensure_file_meta()
        ds.file_meta.TransferSyntaxUID = syntax
    return ds


def read_header(path, keywords: list[str]) -> dict[str, str] | None:
    """The values of the data elements `keywords` ('' where absent) of the DICOM file at `path`, read without
    its pixel data (a file without the 'DICM' preamble is read whole, as read_dicom reads it); None for a
    missing file or one that read_dicom would refuse to open (the image check reports it)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=keywords)
    except InvalidDicomError:
        try:
            ds = _open(str(path))
        except DataError:
            return None
    except (OSError, ValueError, EOFError):
        return None
    return {keyword: str(ds.get(keyword) or "").strip() for keyword in keywords}


def _to_unit_range(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    # lo > hi is possible (negative RescaleSlope); the sign of the division keeps the orientation.
    if hi == lo:
        return np.zeros_like(x, dtype=np.float64)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


def read_dicom(path) -> np.ndarray:
    """DICOM file (one 2-D frame) -> uint8 array (H, W), 0 = black, 255 = white.

    Modality LUT (rescale slope/intercept), then the first VOI LUT or window (pydicom's DICOM
    definition) whose full output range maps to 0..255; without VOI, min-max of the image.
    MONOCHROME1 is inverted so that bone is bright. RGB (and YBR, which pydicom decodes to RGB)
    becomes BT.601 luminance scaled min-max, without modality/VOI steps; other photometric
    interpretations (e.g. PALETTE COLOR) raise DataError, as do missing, non-DICOM, pixel-less,
    multi-frame and undecodable (compressed without a plugin) files.
    """
    path = str(path)
    ds = _open(path)
    if "PixelData" not in ds:
        raise DataError(f"{path}: DICOM has no pixel data (PixelData missing)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:  # refuse before decoding a possibly large volume
        raise DataError(f"{path}: a volume of {frames} frames, expected one 2-D radiograph")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    color = int(ds.get("SamplesPerPixel", 1)) == 3
    if not color and photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DataError(f"{path}: photometric interpretation {photometric}, expected MONOCHROME1/2 or RGB")
    try:
        pixels = ds.pixel_array
    except Exception as e:  # the decoders raise RuntimeError/ValueError/NotImplementedError/...
        syntax = ds.file_meta.get("TransferSyntaxUID")
        what = f"compressed transfer syntax '{syntax.name}'" if syntax is not None and syntax.is_compressed else "pixel data"
        raise DataError(f"{path}: cannot decode {what} ({str(e).splitlines()[0]})") from None
    if pixels.ndim != (3 if color else 2):
        shape = "x".join(map(str, pixels.shape))
        if not color and pixels.ndim == 3:
            raise DataError(f"{path}: a volume of {pixels.shape[0]} frames, expected one 2-D radiograph")
        raise DataError(f"{path}: pixel array of shape {shape}, expected one 2-D radiograph")

    if color:
        gray = pixels[..., :3].astype(np.float64) @ _LUMA
        unit = _to_unit_range(gray, gray.min(), gray.max())
    else:
        values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)
        lut = ds.get("VOILUTSequence")
        if lut and "LUTDescriptor" in lut[0] and "LUTData" in lut[0]:
            # A LUT indexes integers; rounding first avoids pydicom truncating float input.
            voi = apply_voi_lut(np.rint(values).astype(np.int64), ds, index=0)
            entries, first = lut[0].LUTDescriptor[0] or 2**16, lut[0].LUTDescriptor[1]
            table = apply_voi_lut(np.arange(first, first + entries), ds, index=0)  # every LUT entry
            unit = _to_unit_range(voi.astype(np.float64), float(table.min()), float(table.max()))
        elif "WindowCenter" in ds and "WindowWidth" in ds:
            voi = apply_voi_lut(values, ds, index=0, prefer_lut=False)
            with np.errstate(over="ignore"):  # the SIGMOID function overflows harmlessly at the probes
                lo, hi = apply_voi_lut(_PROBE.copy(), ds, index=0, prefer_lut=False)
            unit = _to_unit_range(voi, lo, hi)
        else:
            unit = _to_unit_range(values, values.min(), values.max())
        if photometric == "MONOCHROME1":
            unit = 1.0 - unit
    return np.rint(unit * 255.0).astype(np.uint8)
