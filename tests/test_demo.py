"""The demo's pipeline at toy scale: phantoms -> MAE pretraining -> study of methods x fractions -> report."""

from __future__ import annotations

import pandas as pd
import yaml
from rich.console import Console

from medpeft import demo
from medpeft.pretrain import MAE_CHECKPOINT
from medpeft.engine import rundir


def test_demo_pretrains_then_compares_methods_across_label_fractions(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "PATIENTS", 40)
    monkeypatch.setattr(demo, "IMAGE_SIZE", 32)
    monkeypatch.setattr(demo, "ENCODER", {"name": "vit_tiny_patch16_224", "img_size": 32,
                                          "kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8}})
    monkeypatch.setattr(demo, "MAE", {**demo.MAE, "decoder_embed_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2})
    monkeypatch.setattr(demo, "PRETRAIN", {**demo.PRETRAIN, "epochs": 2, "batch_size": 16})
    monkeypatch.setattr(demo, "METHODS", {k: demo.METHODS[k] for k in ("scratch", "lora")})
    monkeypatch.setattr(demo, "FRACTIONS", [0.5, 1.0])
    monkeypatch.setattr(demo, "EPOCHS", {0.5: 1, 1.0: 1})
    console = Console(record=True, width=400)
    comparison = demo.run_demo(tmp_path / "demo", jobs=2, console=console)

    assert comparison["method"].tolist() == ["scratch", "lora"]
    for fraction in ("50%", "100%"):
        assert comparison[f"phantoms {fraction}:mean"].between(0, 100).all()
    out = tmp_path / "demo"
    assert rundir.is_complete(out / "mae") and (out / "study" / "report" / "report.html").is_file()
    # Fine-tuning started from the MAE encoder, except training from scratch.
    weights = {p.parent.name: yaml.safe_load(p.read_text())["model"]["weights"]
               for p in (out / "study" / "runs").glob("*/config.yaml")}
    assert len(weights) == 4
    for name, value in weights.items():
        assert value == (str(out / "mae" / MAE_CHECKPOINT) if "__lora__" in name else "random"), name
    text = console.export_text()
    rows = {line.split()[1]: line for line in text.splitlines() if line.startswith("│")}
    for _, row in comparison.iterrows():  # the console table shows the report's numbers
        assert f"{row['phantoms 50%:mean']:.1f} │ {row['phantoms 100%:mean']:.1f}" in rows[row["method"]]
    assert text.rstrip().splitlines()[-1].startswith(f"report: {out / 'study' / 'report' / 'report.html'}")

    # A second run reuses everything and prints the same table.
    again = demo.run_demo(tmp_path / "demo", jobs=2, console=Console(quiet=True))
    pd.testing.assert_frame_equal(again, comparison)
