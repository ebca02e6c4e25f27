"""The foundation models users hold, by name (timm's ``pretrained_cfg`` idea, for medical imaging).

Each entry knows the timm architecture its weights load into, the layouts its authors publish them in,
and its preprocessing; a run names it (``model: {name: rad-dino, weights: /data/rad-dino}``) and the
entry's preprocessing becomes the default of ``model.img_size``, ``data.mean`` and ``data.std`` (any of
them can still be set). ``medpeft models`` prints this table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
# torchxrayvision feeds 1-channel images scaled to [-1024, 1024]: (x - 0.5) / (1 / 2048) for x in [0, 1].
XRV_STD = (1 / 2048,) * 3


@dataclass(frozen=True)
class FoundationModel:
    name: str
    architecture: str
    """The timm model the weights load into."""
    layouts: tuple[str, ...]
    """Published layouts the weights may come in (medpeft.backbones.layouts), the first the usual one."""
    img_size: int
    """The resolution it was trained at (pixels, square)."""
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    preprocessing: str
    """Its own input pipeline, in words: channels, value range, resize and crop."""
    licence: str
    paper: str
    hub: str | None = None
    """Hugging Face hub id of the published weights (None: published elsewhere)."""
    kwargs: dict = field(default_factory=dict)
    """Extra timm.create_model arguments."""
    global_pool: str | None = None
    drop_path_rate: float | None = None
    """None keeps model.drop_path_rate's default; 0 for CNNs trained without stochastic depth."""
    text: bool = False
    """A vision-language model whose text tower is published with it: model.head_init 'text' and
    zero-shot evaluation apply."""

    def config_defaults(self) -> dict:
        """The run-config values this entry supplies (under whatever the user sets)."""
        model = {"img_size": self.img_size, "kwargs": dict(self.kwargs)}
        if self.global_pool is not None:
            model["global_pool"] = self.global_pool
        if self.drop_path_rate is not None:
            model["drop_path_rate"] = self.drop_path_rate
        return {"model": model, "data": {"mean": list(self.mean), "std": list(self.std)}}


_DINO_CROP = "RGB; resize the short side, centre crop"
_XRV_INPUT = ("1 gray channel in [-1024, 1024] (repeated into RGB, the first conv's weight split over the 3 "
              "channels); centre crop, resize")
_XRV_PAPER = "Cohen et al. 2022, MIDL (arXiv 2111.00595)"
CATALOGUE: dict[str, FoundationModel] = {entry.name: entry for entry in (
    FoundationModel(
        "rad-dino", "vit_base_patch14_dinov2", ("hf-dinov2", "meta-dinov2"), 518, (0.5307,) * 3, (0.2583,) * 3,
        f"{_DINO_CROP} to 518", "MSRLA",
        "Perez-Garcia et al. 2025, Nat. Mach. Intell. (arXiv 2401.10815)", hub="microsoft/rad-dino"),
    FoundationModel(
        "dinov2-vitb14", "vit_base_patch14_dinov2", ("meta-dinov2", "hf-dinov2"), 518, IMAGENET_MEAN,
        IMAGENET_STD, f"{_DINO_CROP} to 518 (224 works: position embeddings are resampled)", "Apache-2.0",
        "Oquab et al. 2024, TMLR (arXiv 2304.07193)", hub="facebook/dinov2-base"),
    FoundationModel(
        "dinov2-vitb14-reg", "vit_base_patch14_reg4_dinov2", ("meta-dinov2", "hf-dinov2"), 518,
        IMAGENET_MEAN, IMAGENET_STD, f"{_DINO_CROP} to 518", "Apache-2.0",
        "Darcet et al. 2024, ICLR (arXiv 2309.16588)", hub="facebook/dinov2-with-registers-base"),
    FoundationModel(
        # With the query and value biases Meta publishes (the _qkvb variant: the published file as it is,
        # whatever their values); the class token, as DINOv3 and transformers' pooler_output.
        "dinov3-vitb16", "vit_base_patch16_dinov3_qkvb", ("hf-dinov3", "meta-dinov3", "timm"), 256,
        IMAGENET_MEAN, IMAGENET_STD, "RGB; resize to 256 (RoPE: any multiple of 16)", "DINOv3 License (Meta)",
        "Simeoni et al. 2025 (arXiv 2508.10104)", hub="facebook/dinov3-vitb16-pretrain-lvd1689m",
        global_pool="token"),
    FoundationModel(
        "biomedclip", "vit_base_patch16_224", ("open-clip-timm",), 224, CLIP_MEAN, CLIP_STD,
        "RGB; resize the short side to 224, centre crop", "MIT",
        "Zhang et al. 2023, NEJM AI 2025 (arXiv 2303.00915)",
        hub="microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", text=True),
    FoundationModel(
        # CheXzero's own Normalize((101.48761,) * 3, (83.43944,) * 3) on 0-255 pixels (its train.py and
        # zero_shot.py), over 255 to 4 digits; not CLIP's normalisation.
        "chexzero", "vit_base_patch32_clip_quickgelu_224", ("openai-clip",), 224, (0.398,) * 3, (0.3272,) * 3,
        "1 channel repeated to RGB; long side resized to 320 and zero-padded square, then resized to 224 "
        "(bicubic)", "see its repository (MIT or Apache-2.0 + Commons Clause)",
        "Tiu et al. 2022, Nat. Biomed. Eng. (weights: github.com/rajpurkarlab/CheXzero)", text=True),
    # MedSigLIP's vision tower is SigLIP so400m at 448 px (model card: "400M parameter vision encoder",
    # 448x448): hidden 1152, 27 layers, 16 heads, MLP 4304, patch 14, MAP head, as in the config.json of
    # google/siglip-so400m-patch14-384 and timm's vit_so400m_patch14_siglip_384 (mlp_ratio 3.7362 -> 4304).
    # transformers' SigLIP MLPs use gelu_pytorch_tanh (SiglipVisionConfig.hidden_act), timm's exact GELU
    # unless told: act_layer gelu_tanh gives transformers' features.
    FoundationModel(
        "medsiglip-448", "vit_so400m_patch14_siglip_384", ("hf-siglip",), 448, HALF, HALF,
        "RGB; resize to 448, scale to [-1, 1]", "Health AI Developer Foundations terms",
        "Sellergren et al. 2025, MedGemma technical report (arXiv 2507.05201)", hub="google/medsiglip-448",
        kwargs={"act_layer": "gelu_tanh"}, text=True),
    FoundationModel(
        "siglip-vitb16", "vit_base_patch16_siglip_224", ("hf-siglip",), 224, HALF, HALF,
        "RGB; resize to 224, scale to [-1, 1]", "Apache-2.0", "Zhai et al. 2023, ICCV (arXiv 2303.15343)",
        hub="google/siglip-base-patch16-224", kwargs={"act_layer": "gelu_tanh"}, text=True),
    FoundationModel(
        "xrv-densenet121-all", "densenet121", ("xrv-module",), 224, HALF, XRV_STD, f"{_XRV_INPUT} to 224", "Apache-2.0",
        f"{_XRV_PAPER}; weights densenet121-res224-all", drop_path_rate=0.0),
    FoundationModel(
        "xrv-resnet50-all", "resnet50", ("xrv-resnet",), 512, HALF, XRV_STD, f"{_XRV_INPUT} to 512", "Apache-2.0",
        f"{_XRV_PAPER}; weights resnet50-res512-all", drop_path_rate=0.0),
    FoundationModel(
        "mrm", "vit_base_patch16_224", ("mae",), 224, IMAGENET_MEAN, IMAGENET_STD,
        "RGB (gray repeated), resize to 224", "see its repository",
        "Zhou et al. 2023, ICLR (arXiv 2301.13155); weights MRM.pth from github.com/RL4M/MRM-pytorch",
        global_pool="avg"),
    FoundationModel(
        "cxr-mae", "vit_base_patch16_224", ("mae",), 224, IMAGENET_MEAN, IMAGENET_STD,
        "RGB (gray repeated), resize to 224", "see its repository",
        "the MAE ViT-B/16 of MED-PEFT, Lian et al. 2024 (arXiv 2401.12215); weights CXR_MAE.pth from "
        "github.com/RL4M/MED-PEFT", global_pool="avg"),
    FoundationModel(
        "medical-mae-vits16", "vit_small_patch16_224", ("mae",), 224, (0.5056,) * 3, (0.252,) * 3,
        "RGB (gray repeated), resize to 224", "see its repository",
        "Xiao et al. 2023, WACV (arXiv 2210.12843); github.com/lambert-x/medical_mae vit-s_CXR_0.3M_mae.pth",
        global_pool="avg"),
    FoundationModel(
        "medical-mae-vitb16", "vit_base_patch16_224", ("mae",), 224, (0.5056,) * 3, (0.252,) * 3,
        "RGB (gray repeated), resize to 224", "see its repository",
        "Xiao et al. 2023, WACV (arXiv 2210.12843); github.com/lambert-x/medical_mae vit-b_CXR_0.5M_mae.pth",
        global_pool="avg"),
)}


def catalogue_rows() -> list[dict]:
    """One plain row per entry, in catalogue order: what `medpeft models` prints and the README lists."""
    return [{"name": e.name, "architecture": e.architecture, "resolution": e.img_size,
             "normalisation": _normalisation(e), "layouts": list(e.layouts), "preprocessing": e.preprocessing,
             "hub": e.hub, "licence": e.licence, "paper": e.paper} for e in CATALOGUE.values()]


_NAMED = {(IMAGENET_MEAN, IMAGENET_STD): "ImageNet", (CLIP_MEAN, CLIP_STD): "CLIP", (HALF, HALF): "[-1, 1]",
          (HALF, XRV_STD): "[-1024, 1024]"}


def _normalisation(entry: FoundationModel) -> str:
    """The input normalisation in words: a named convention, or the (gray) mean and std."""
    if (entry.mean, entry.std) in _NAMED:
        return _NAMED[entry.mean, entry.std]
    mean, std = (", ".join(map(str, dict.fromkeys(values))) for values in (entry.mean, entry.std))
    return f"mean {mean}, std {std}"


def entry_of(name: str) -> FoundationModel | None:
    """The catalogue entry named `name`, or None for a plain timm model name."""
    return CATALOGUE.get(name)
