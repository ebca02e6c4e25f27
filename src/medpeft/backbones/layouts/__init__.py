"""Published checkpoint layouts: how each family of foundation models is saved by its authors, and the
pure key/shape mapping from that layout onto the timm model medpeft builds.

A layout is told apart by its ``signature`` keys. Its ``convert`` maps the published keys onto keys that
timm's own checkpoint filter takes: timm's own names, or a layout that filter converts itself (MAE, Meta's
DINOv2 and DINOv3, OpenAI CLIP and open_clip timm trunks, whose ``convert`` only sets the image tower apart
from the text tower); every state dict then passes through timm's filter (position embeddings are
resampled there). Each layout is one file in this package that calls `register`.
"""

from medpeft.backbones.layouts.base import LAYOUTS, Layout, register

# Each layout file registers its layouts when imported (one line each).
from medpeft.backbones.layouts import timm_native  # noqa: F401,I001
from medpeft.backbones.layouts import hf_dinov2  # noqa: F401
from medpeft.backbones.layouts import clip  # noqa: F401
from medpeft.backbones.layouts import hf_siglip  # noqa: F401
from medpeft.backbones.layouts import dinov3  # noqa: F401
from medpeft.backbones.layouts import xrv  # noqa: F401

__all__ = ["LAYOUTS", "Layout", "register"]
