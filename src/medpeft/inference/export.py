"""A finished run as a standalone model, usable without medpeft:

    model.safetensors + config.json  the method merged into plain timm weights, in timm's Hugging Face
                                     layout: ``timm.create_model("local-dir:<folder>", pretrained=True)``
    model.torchscript.pt             ``torch.jit.load``
    model.onnx                       ``onnxruntime.InferenceSession`` (dynamic batch dimension)
    export.json                      labels, task, calibration (temperatures), decision rule and thresholds,
                                     preprocessing, file sizes and each format's measured difference from
                                     the run's model

Every format outputs logits (B, K); export.json says what to apply (the temperatures, softmax or sigmoid,
thresholds on the calibrated probabilities).
A method that cannot merge (e.g. VPT, adapters) has no plain timm form: it gets TorchScript and ONNX only.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import timm
import torch
from torch import nn

from medpeft.backbones import count_parameters
from medpeft.engine.evaluation import temperature_record
from medpeft.errors import ExportError
from medpeft.files import atomic_directory, write_json_atomic
from medpeft.methods.registry import own_weights
from medpeft.version import __version__

MANIFEST = "export.json"
TORCHSCRIPT = "model.torchscript.pt"
ONNX = "model.onnx"
ONNX_OPSET = 18
TOLERANCE = 1e-4
"""Largest accepted |logit difference| between an exported format and the run's model."""


def export(run, out_dir) -> dict:
    """Write `run` (a medpeft.inference.Run) to the new folder `out_dir`, atomically; returns the manifest."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(f"{out_dir}: exists and is not empty; export to a new folder")
    size = run.config.model.img_size
    reference = run.model.cpu().eval()
    model, merge_note = _merged(run)
    if model is not None:
        model.to(memory_format=torch.contiguous_format)  # safetensors stores the default layout
    # batch 3: neither the trace's 1 nor ONNX's 2 (an example batch of 1 lets torch.export take it as fixed)
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(x)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(out_dir) as tmp:
        diffs = {}
        if model is not None and run.config.model.head_init != "text":
            diffs["safetensors"] = _save_timm(model, tmp, run, x, expected)
        elif model is not None:
            merge_note += ("; its text-initialised head (a fixed projection and normalisation before the "
                           "classifier) is no timm model: no model.safetensors")
        network = model if model is not None else reference  # not a copy: hooks may close over it
        diffs["torchscript"] = _save_torchscript(network, tmp / TORCHSCRIPT, x, expected)
        diffs["onnx"] = _save_onnx(network, tmp / ONNX, x, expected)
        manifest = {
            "run": str(run.path.resolve()), "method": run.spec.name, "backbone": run.config.model.name,
            "merged": model is not None, "merge_note": merge_note,
            "labels": run.labels, "task": run.config.data.task,
            "outputs": "logits (batch, labels): apply " + _activation(run) + (
                " to the logits divided by calibration.temperatures" if run.temperatures is not None else ""),
            "calibration": _calibration(run),
            "decision": {"rule": run.rule, "thresholds": run.thresholds,
                         "on": "calibrated probabilities" if run.temperatures is not None else "probabilities"},
            "preprocessing": run.preprocessing,
            "input": {"shape": ["batch", 3, size, size], "dtype": "float32"},
            "files": {p.name: p.stat().st_size for p in sorted(tmp.iterdir())},
            "parameters": count_parameters(network)[1],
            "max_abs_diff": diffs,
            "tolerance": TOLERANCE,
            "versions": {"medpeft": __version__, "torch": torch.__version__, "timm": timm.__version__},
        }
        write_json_atomic(tmp / MANIFEST, manifest)
    return manifest


def _calibration(run) -> dict | None:
    """The run's temperature scaling, as export.json states it (None for a run without calibration.json)."""
    if run.temperatures is None:
        return None
    return {"method": "temperature scaling, fitted on the run's val split",
            "apply": "divide the logits by the temperatures, then apply " + _activation(run),
            "temperatures": temperature_record(run.temperatures, run.labels, run.config.data.task)}


def _activation(run) -> str:
    return "softmax over the labels" if run.config.data.task == "multiclass" else "a sigmoid per label"


def _merged(run) -> tuple[nn.Module | None, str]:
    """(the plain timm model, a note), or (None, why not); run.model is left as it is."""
    spec = run.spec
    if spec.merge is own_weights:
        return copy.deepcopy(run.model).eval(), f"{spec.name} trains the backbone's own weights: nothing to merge"
    if spec.merge is not None:
        return spec.merge(copy.deepcopy(run.model)).eval(), f"{spec.name} merged into the backbone's weights"
    return None, (f"{spec.name} does not merge into plain weights ({spec.description}): no model.safetensors; "
                  f"TorchScript and ONNX hold the network with the method")


def _check(fmt: str, logits, expected: torch.Tensor) -> float:
    diff = (torch.as_tensor(logits).float() - expected).abs().max().item()
    if not diff <= TOLERANCE:
        raise ExportError(f"{fmt} export differs from the run's model by {diff:.3g} (more than {TOLERANCE:g}) "
                          f"in its logits")
    return diff


def _save_timm(model: nn.Module, folder: Path, run, x: torch.Tensor, expected: torch.Tensor) -> float:
    """model.safetensors + config.json (labels, preprocessing), then reload them through timm and compare."""
    from timm.models import save_for_hf

    config, size = run.config, run.config.model.img_size
    data_config = {"input_size": (3, size, size), "mean": list(config.data.mean), "std": list(config.data.std),
                   "crop_pct": 1.0, "crop_mode": "squash", "interpolation": "bilinear"}
    try:
        save_for_hf(model, str(folder), model_config={"label_names": run.labels}, safe_serialization=True,
                    data_config=data_config)
        reloaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    except Exception as e:
        raise ExportError(f"timm safetensors export failed: {type(e).__name__}: {_first_line(e)}") from None
    with torch.no_grad():
        return _check("timm safetensors", reloaded(x), expected)


def _save_torchscript(model: nn.Module, path: Path, x: torch.Tensor, expected: torch.Tensor) -> float:
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TracerWarnings on timm's shape asserts; the batch-3 check decides
            traced = torch.jit.trace(model, x[:1], check_trace=True)
            torch.jit.save(traced, str(path))
            out = torch.jit.load(str(path))(x)
    except Exception as e:
        raise ExportError(f"TorchScript export failed: {type(e).__name__}: {_first_line(e)}") from None
    return _check("TorchScript", out, expected)


def _save_onnx(model: nn.Module, path: Path, x: torch.Tensor, expected: torch.Tensor) -> float:
    try:
        import onnxruntime
        import onnxscript  # noqa: F401  (the dynamo exporter's dependency)
    except ImportError:
        raise ExportError("ONNX export needs onnx, onnxscript and onnxruntime: pip install 'medpeft[onnx]'") from None
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > 1.5 * 2**30  # protobuf's limit is 2 GiB
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x[:2],), str(path), input_names=["image"], output_names=["logits"],
                              dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=ONNX_OPSET,
                              external_data=big, verbose=False)
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        out = session.run(None, {"image": x.numpy()})[0]
    except Exception as e:
        raise ExportError(f"ONNX export failed: {type(e).__name__}: {_first_line(e)}") from None
    return _check("ONNX", out, expected)


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else ""
