"""Export of a finished run: merged timm safetensors loadable without medpeft, TorchScript, ONNX, manifest."""

import dataclasses
import json
import subprocess
import sys

import onnxruntime
import pytest
import torch
from conftest import TINY_VIT
from safetensors.torch import load_file

import medpeft
from medpeft.config import config_from_dict
from medpeft.inference import export as export_module
from medpeft.errors import ExportError

TINY_RESNET = {"name": "resnet50", "weights": "random", "img_size": 32, "drop_path_rate": 0.0,
               "kwargs": {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64], "stem_width": 8, "base_width": 16}}
LORA = {"name": "lora", "r": 4, "alpha": 8}
MEAN, STD = [0.45, 0.45, 0.45], [0.27, 0.27, 0.27]  # unlike any timm default

# Runs with medpeft and peft made unimportable: only timm (and torch) may rebuild the exported model.
TIMM_ALONE = """
import json, sys
sys.modules["medpeft"] = None
sys.modules["peft"] = None
import timm, torch
model = timm.create_model("local-dir:" + sys.argv[1], pretrained=True).eval()
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[2])), sys.argv[3])
print(json.dumps({"labels": model.pretrained_cfg["label_names"], "data": timm.data.resolve_data_config({}, model=model),
                  "parameters": sum(p.numel() for p in model.parameters())}))
"""


@pytest.fixture(scope="module")
def exported(squares_csv, tmp_path_factory):
    """(run, manifest, export folder) of a 1-epoch run per (method, model), trained and exported once."""
    cache = {}

    def get(method: dict, model: dict = TINY_VIT):
        key = json.dumps([method, model], sort_keys=True)
        if key not in cache:
            root = tmp_path_factory.mktemp("export")
            torch.manual_seed(0)
            medpeft.train(config_from_dict({
                "model": dict(model), "method": method, "output_dir": str(root / "run"),
                "data": {"csv": str(squares_csv), "patient_column": "patient", "labels": ["bright", "dark"],
                         "mean": MEAN, "std": STD, "split": {"val_fraction": 0.25, "test_fraction": 0.25, "seed": 0}},
                "train": {"epochs": 1, "batch_size": 8, "lr": 0.003}}), quiet=True)
            run = medpeft.load_run(root / "run")
            cache[key] = run, run.export(root / "export"), root / "export"
        return cache[key]

    return get


def inputs(seed: int = 1) -> torch.Tensor:
    """Batch 4: neither the trace's batch (1), ONNX's example (2) nor export's own check (3)."""
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def logits(run, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return run.model(x)


def with_timm_alone(folder, x, tmp_path) -> tuple[torch.Tensor, dict]:
    torch.save(x, tmp_path / "x.pt")
    args = [str(folder), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")]
    done = subprocess.run([sys.executable, "-c", TIMM_ALONE, *args], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return torch.load(tmp_path / "y.pt"), json.loads(done.stdout.strip().splitlines()[-1])


def assert_torchscript_and_onnx_match(folder, x, expected) -> None:
    torch.testing.assert_close(torch.jit.load(str(folder / "model.torchscript.pt"))(x), expected, rtol=0, atol=1e-4)
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert isinstance(session.get_inputs()[0].shape[0], str)  # a named dynamic batch dimension
    for batch in (x, x[:1]):
        out = session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(out), expected[:len(batch)], rtol=0, atol=1e-4)


@pytest.mark.parametrize("targets", [["qkv"], ["q", "v"]])
def test_merged_lora_loads_with_timm_alone_and_every_format_matches_the_run(exported, targets, tmp_path):
    run, manifest, folder = exported({**LORA, "targets": targets})
    x = inputs()
    expected = logits(run, x)
    assert manifest["merged"] is True and set(manifest["max_abs_diff"]) == {"safetensors", "torchscript", "onnx"}
    assert all(0 <= d <= 1e-4 for d in manifest["max_abs_diff"].values())
    keys = set(load_file(str(folder / "model.safetensors")))
    assert "blocks.0.attn.qkv.weight" in keys and not any("lora" in k or "base_layer" in k for k in keys)

    out, loaded = with_timm_alone(folder, x, tmp_path)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-4)
    assert loaded["labels"] == ["bright", "dark"]
    assert loaded["data"] == {"input_size": [3, 32, 32], "interpolation": "bilinear", "mean": MEAN,
                              "std": STD, "crop_pct": 1.0, "crop_mode": "squash"}
    assert_torchscript_and_onnx_match(folder, x, expected)
    # Export merged a copy: the run's model still holds its adapter (and split qkv for q/v).
    assert any(".lora_A." in name for name, _ in run.model.named_parameters())
    assert any(".qkv.q." in name for name, _ in run.model.named_modules()) == (targets == ["q", "v"])


def test_a_method_that_cannot_merge_exports_torchscript_and_onnx_only(exported):
    run, manifest, folder = exported({"name": "vpt_shallow", "tokens": 4})
    assert sorted(p.name for p in folder.iterdir()) == ["export.json", "model.onnx", "model.torchscript.pt"]
    assert manifest["merged"] is False and "vpt_shallow does not merge" in manifest["merge_note"]
    assert set(manifest["max_abs_diff"]) == {"torchscript", "onnx"}
    assert manifest["parameters"] == sum(p.numel() for p in run.model.parameters())  # the prompts included
    x = inputs()
    assert_torchscript_and_onnx_match(folder, x, logits(run, x))


@pytest.mark.parametrize("method", [{"name": "lora", "r": 2, "targets": ["convs"]}, {"name": "full"}])
def test_cnn_run_exports_and_loads_with_timm_alone(exported, method, tmp_path):
    run, manifest, folder = exported(method, TINY_RESNET)
    x = inputs()
    expected = logits(run, x)
    assert manifest["merged"] is True and manifest["backbone"] == "resnet50"
    if method["name"] == "full":  # the trained model is timm's own: counts as merged
        assert "nothing to merge" in manifest["merge_note"]
    out, loaded = with_timm_alone(folder, x, tmp_path)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-4)
    assert loaded["parameters"] == manifest["parameters"]
    assert_torchscript_and_onnx_match(folder, x, expected)


@pytest.mark.parametrize("model", [TINY_VIT, TINY_RESNET], ids=["vit", "cnn"])
def test_a_probe_on_standardised_features_folds_its_batchnorm_into_the_head(exported, model, tmp_path):
    """linear_probe with norm: true trains a head behind a BatchNorm without affine parameters; its running
    statistics are saved with the run, and export folds them into the head: timm alone gives the run's logits."""
    run, manifest, folder = exported({"name": "linear_probe", "norm": True}, model)
    norm = run.model.get_classifier()[0]
    assert isinstance(norm, torch.nn.BatchNorm1d) and int(norm.num_batches_tracked) > 0
    assert not torch.equal(norm.running_var, torch.ones_like(norm.running_var))  # statistics of the features
    x = inputs()
    expected = logits(run, x)
    out, loaded = with_timm_alone(folder, x, tmp_path)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-4)
    assert manifest["merged"] is True and loaded["parameters"] == manifest["parameters"]


def test_the_probe_s_standardisation_is_refused_with_a_text_head():
    from types import SimpleNamespace

    from medpeft.errors import ConfigError
    from medpeft.methods.linear_probe import LinearProbeConfig

    model = SimpleNamespace(name="biomedclip-vitb16", family="vit", head_init="text")
    with pytest.raises(ConfigError, match=r"^method.norm: true would rescale .* set method.norm: false$"):
        LinearProbeConfig(norm=True).check_model(model)
    LinearProbeConfig(norm=False).check_model(model)


@pytest.mark.parametrize("name", ["siglip-vitb16", "dinov3-vitb16"])
def test_catalogue_models_export_and_load_with_timm_alone(exported, name, tmp_path):
    """SigLIP's MAP head (its latent expanded to the batch) and DINOv3's RoPE Eva, with their entries' kwargs."""
    model = {"name": name, "weights": "random", "img_size": 32, "drop_path_rate": 0.0,
             "kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2}}
    run, manifest, folder = exported(LORA, model)
    x = inputs()
    expected = logits(run, x)
    assert set(manifest["max_abs_diff"]) == {"safetensors", "torchscript", "onnx"}
    out, _ = with_timm_alone(folder, x, tmp_path)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-4)
    assert_torchscript_and_onnx_match(folder, x, expected)


def test_manifest_describes_the_files_model_and_decision(exported):
    run, manifest, folder = exported({**LORA, "targets": ["qkv"]})
    assert json.loads((folder / "export.json").read_text()) == manifest
    assert manifest["files"] == {p.name: p.stat().st_size for p in folder.iterdir() if p.name != "export.json"}
    assert set(manifest["files"]) == {"config.json", "model.safetensors", "model.torchscript.pt", "model.onnx"}
    weights = load_file(str(folder / "model.safetensors"))
    assert manifest["parameters"] == sum(t.numel() for t in weights.values()) == 32290  # ViT: no buffers
    assert manifest["labels"] == run.labels and manifest["task"] == "multilabel" and "sigmoid" in manifest["outputs"]
    assert manifest["decision"] == {"rule": "youden", "thresholds": run.thresholds, "on": "calibrated probabilities"}
    assert set(run.thresholds) == {"bright", "dark"}
    assert manifest["preprocessing"] == run.preprocessing and manifest["method"] == "lora"
    assert manifest["versions"]["medpeft"] == medpeft.__version__
    assert manifest["run"] == str(run.path.resolve())


def test_export_refuses_a_non_empty_folder_and_leaves_it_untouched(exported, tmp_path):
    run, _, _ = exported({**LORA, "targets": ["qkv"]})
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"taken: exists and is not empty") as error:
        run.export(taken)
    assert "\n" not in str(error.value)
    assert [p.name for p in taken.iterdir()] == ["notes.txt"] and (taken / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_a_format_that_fails_or_differs_leaves_nothing_behind(exported, tmp_path, monkeypatch):
    run, _, _ = exported({**LORA, "targets": ["qkv"]})
    merge = run.spec.merge

    def wrong_merge(model):
        merged = merge(model)
        with torch.no_grad():
            merged.head.bias.add_(1e-2)
        return merged

    with pytest.raises(ExportError, match=r"timm safetensors export differs from the run's model by 0\.01") as error:
        export_module.export(dataclasses.replace(run, spec=dataclasses.replace(run.spec, merge=wrong_merge)),
                             tmp_path / "out")
    assert "\n" not in str(error.value)

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operator\nwith details")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(ExportError, match=r"^ONNX export failed: RuntimeError: unsupported operator$"):
        run.export(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
