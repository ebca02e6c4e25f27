"""torchxrayvision's chest X-ray classifiers as its authors publish them (github.com/mlmed/torchxrayvision
releases, read by ``xrv.models.DenseNet`` / ``xrv.models.ResNet``), onto timm's ``densenet121`` /
``resnet50``.

``xrv-module``: a DenseNet file (``*-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt``) is the
whole ``torchxrayvision.models.DenseNet`` saved with ``torch.save(model)``. Saved before torch 1.6, it
is in torch's legacy format, which records each module class as a persistent id that
``torch.load(weights_only=True)`` refuses whatever its allow-list. `read` unpickles it with an
allow-list of exactly the globals such a file names: torch's module classes, tensor rebuilders and
containers, and torchxrayvision's four module classes by name, onto a placeholder that only holds the
submodules and tensors it is given (torchxrayvision need not be installed). Any other global is refused
before anything is looked up or called: no code from the file runs.

``xrv-resnet``: the ResNet-50 file (``...-resnet50-test512-e400-state.pt``) is the state_dict of
torchvision's ``resnet50`` with a 1-channel ``conv1`` (``xrv.models.ResNet`` holds it under ``model.``).

Both take one gray channel in [-1024, 1024], timm's models three: a 1-channel first convolution's
weight is repeated over 3 channels and divided by 3, so that a gray image repeated into 3 channels
gives the same output. Every other backbone key is already timm's (timm's DenseNet and ResNet keep
torchvision's names); ``op_threshs`` (the operating points xrv rescales its 18 outputs by) is dropped and
the 18-output classifier is left to the head logic.
"""

from __future__ import annotations

import pickle
import types
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from medpeft.backbones.layouts.base import Layout, register, renamed
from medpeft.errors import CheckpointError


try:  # what modules saved by torch < 1.5 hold as their _backend: a no-op function, absent from some torch builds
    from torch.nn.backends.thnn import _get_thnn_function_backend
except ImportError:  # a file naming it is then refused, naming it
    _get_thnn_function_backend = None


class _Stored(nn.Module):
    """Stands in for a torchxrayvision module class: holds the submodules, parameters and buffers that
    its pickle gives it, and none of torchxrayvision's code."""


_ALLOWED = {
    **{f"torchxrayvision.models.{name}": _Stored for name in ("DenseNet", "_DenseBlock", "_DenseLayer", "_Transition")},
    **{f"{obj.__module__}.{obj.__qualname__}": obj for obj in (
        nn.Sequential, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.Linear, OrderedDict,
        torch._utils._rebuild_tensor_v2, torch._utils._rebuild_parameter,
        *([_get_thnn_function_backend] if _get_thnn_function_backend else []),
    )},
    "__builtin__.set": set,  # Module._non_persistent_buffers_set, as pickle protocol 2 names it
}
"""Every global a torchxrayvision DenseNet file may name (torch names its storage types itself)."""


class _Refused(pickle.UnpicklingError):
    """A global outside the allow-list; the message is its dotted name."""


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        found = _ALLOWED.get(f"{module}.{name}")
        if found is None:
            raise _Refused(f"{module}.{name}")
        return found


# torch.load's pickle_module (the legacy format reads its header values with `load`).
_RESTRICTED = types.SimpleNamespace(__name__=__name__, Unpickler=_Unpickler,
                                    load=lambda file, **kwargs: _Unpickler(file, **kwargs).load())


def read(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a torchxrayvision file: a whole pickled module's state_dict, or a state_dict."""
    try:
        with warnings.catch_warnings():
            # The legacy format saved each module class's source, which differs from the placeholder's.
            warnings.simplefilter("ignore", torch.serialization.SourceChangeWarning)
            obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RESTRICTED)
    except _Refused as e:
        raise CheckpointError(f"{path}: refused to unpickle {e}: a torchxrayvision file holds only its model's "
                              f"module classes and tensors, and anything else could run code") from None
    except Exception as e:  # a damaged file can fail anywhere in the unpickler
        first = next(iter(str(e).splitlines()), "")
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {first})") from None
    return obj.state_dict() if isinstance(obj, nn.Module) else obj


def _gray_stem(conv: str):
    """A converter that spreads the 1-channel first convolution `conv` over 3 channels and drops op_threshs."""

    def convert(state_dict: dict) -> tuple[dict, list[str]]:
        state_dict = dict(state_dict)
        if state_dict[conv].shape[1] == 1:  # a timm / torchvision state_dict has 3 already
            state_dict[conv] = state_dict[conv].repeat(1, 3, 1, 1) / 3
        return renamed(state_dict, [(r"op_threshs", "")])

    return convert


register(Layout(
    name="xrv-module",
    description="torchxrayvision DenseNet saved whole with torch.save(model) (densenet121-res224-*: features.*, "
                "classifier)",
    signature=("features.conv0.weight", "features.denseblock1.denselayer1.conv1.weight"),
    convert=_gray_stem("features.conv0.weight"),
    read=read,
))
register(Layout(
    name="xrv-resnet",
    description="torchxrayvision ResNet's torchvision resnet50 state_dict (resnet50-res512-all: 1-channel conv1, fc)",
    signature=("conv1.weight", "layer1.0.conv1.weight"),
    prefixes=("", "model."),
    convert=_gray_stem("conv1.weight"),
))
