"""Training and inference cost of every registered PEFT method on a ViT (CPU, fp32).

    python benchmarks/method_costs.py [--steps 5] [--model vit_small_patch16_224] [--methods full,lora]
                                      [--out benchmarks/results]

Each method runs in its own fresh worker process (this script with ``--method NAME``, which prints one
JSON line), so the peak memory is per method. Setup: random-init --model, 14 classes,
drop_path 0, the method's default config, batch 16 at 224 px, torch.set_num_threads(2), one fixed
seeded batch with random multi-label targets.
  * step: forward + BCE-with-logits + backward + AdamW step over the trainable parameters;
    2 warm-up steps, then the median of --steps timed steps.
  * memory: ru_maxrss of the worker after building + applying the method ("build") and after the
    steps ("peak"); "train increment" = peak - build.
  * FLOPs: one training step (forward + backward, the optimizer excluded) counted with
    torch.utils.flop_counter.FlopCounterMode, i.e. the matmul / conv / attention FLOPs autograd
    actually runs (frozen weights get no weight-gradient matmul, and no activation gradient flows
    below the first trainable parameter); elementwise ops are not counted. Reported / full's count.
  * adapter size: spec.save(model, tmpdir), summed *.safetensors sizes.
  * inference: eval, no_grad, batch 16, median of 5 after 2 warm-ups; unmerged, and merged
    (spec.merge(model)) where the method merges.
The parent runs "full" first, then the rest, then "full" again (the faster "full" is the reference:
the machine may be shared), and writes methods.json (raw figures, machine, command) and methods.md
(the table with ratios to full fine-tuning from the same run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

MODEL, BATCH, SIZE, CLASSES = "vit_small_patch16_224", 16, 224, 14  # MODEL: the default of --model
ROOT = Path(__file__).resolve().parents[1]


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def times_ms(fn, repeats: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(round((time.perf_counter() - t0) * 1000, 1))
    return times


def worker(name: str, steps: int, model_name: str) -> dict:
    from medpeft.backbones import count_parameters, create_backbone
    from medpeft.config import ModelConfig
    from medpeft.methods import get_method, method_config_from_dict

    torch.set_num_threads(2)
    torch.manual_seed(0)
    spec = get_method(name)
    model, _ = create_backbone(ModelConfig(name=model_name, weights="random", img_size=SIZE, drop_path_rate=0.0),
                               num_classes=CLASSES)
    _, backbone_params = count_parameters(model)
    config = method_config_from_dict({"name": name})
    hooks = spec.hooks  # e.g. AdaLoRA: the run length, a loss term and a step after each optimiser step
    if hooks is not None:
        config = hooks.configure(config, steps + 3)
    model = spec.apply(model, config)
    trainable, total = count_parameters(model)
    rss_build = maxrss_mb()

    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 3, SIZE, SIZE, generator=g)
    y = (torch.rand(BATCH, CLASSES, generator=g) > 0.5).float()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    done = []

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        (loss if hooks is None else loss + hooks.loss(model)).backward()
        opt.step()
        if hooks is not None:
            hooks.after_step(model, len(done))
        done.append(1)

    model.train()
    with FlopCounterMode(display=False) as counter:  # first warm-up step, counted
        step()
    train_flops = counter.get_total_flops()
    load_start = os.getloadavg()[0]
    step_times = times_ms(step, steps, warmup=1)
    peak = maxrss_mb()

    with tempfile.TemporaryDirectory() as tmp:
        spec.save(model, Path(tmp))
        adapter_bytes = sum(f.stat().st_size for f in Path(tmp).rglob("*.safetensors"))

    def infer(m):
        m.eval()
        with torch.no_grad():
            return statistics.median(times_ms(lambda: m(x), 5))

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(x)
    forward_flops = counter.get_total_flops()
    infer_ms = infer(model)
    infer_merged_ms = infer(spec.merge(model)) if spec.merge is not None else None
    return dict(method=name, trainable=trainable, total_params=total, backbone_params=backbone_params,
                trainable_pct=100 * trainable / backbone_params, adapter_bytes=adapter_bytes,
                step_ms=statistics.median(step_times), step_times_ms=step_times,
                load_avg_1min=[load_start, os.getloadavg()[0]], rss_build_mb=rss_build, peak_rss_mb=peak,
                train_increment_mb=peak - rss_build, train_flops=train_flops, forward_flops=forward_flops,
                infer_ms=infer_ms, infer_merged_ms=infer_merged_ms)


def run_worker(name: str, steps: int, model_name: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--method", name, "--steps", str(steps),
           "--model", model_name]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        lines = proc.stdout.strip().splitlines()
        if proc.returncode == 0 and lines:
            result = json.loads(lines[-1])
        else:
            err = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            result = dict(method=name, error=err)
    except subprocess.TimeoutExpired:
        result = dict(method=name, error="timed out after 900 s")
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    return result


def ratio(r: dict, full: dict | None, key: str) -> float | None:
    if not full or "error" in full or "error" in r or not full.get(key) or r.get(key) is None:
        return None
    return r[key] / full[key]


def fmt(v, spec: str = ".0f") -> str:
    return "—" if v is None else format(v, spec)


def table(results: list[dict]) -> str:
    fulls = [r for r in results if r["method"].startswith("full") and "error" not in r]
    full = min(fulls, key=lambda r: r["step_ms"], default=None)  # the less disturbed of the two runs
    head = ["method", "trainable", "trainable %", "adapter KB", "step ms", "step / full", "train FLOPs / full",
            "time / FLOP ratio",
            "peak MB", "peak / full", "train incr. MB", "incr. / full", "infer ms", "infer ms merged"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['method']} | failed: {r['error'].replace('|', '/')} |" + " |" * (len(head) - 2))
            continue
        rows.append("| " + " | ".join([
            r["method"], f"{r['trainable']:,}", f"{r['trainable_pct']:.3g}", f"{r['adapter_bytes'] / 1024:,.0f}",
            fmt(r["step_ms"]), fmt(ratio(r, full, "step_ms"), ".2f"), fmt(ratio(r, full, "train_flops"), ".2f"),
            fmt(ratio(r, full, "step_ms") / ratio(r, full, "train_flops") if ratio(r, full, "step_ms") else None,
                ".2f"),
            fmt(r["peak_rss_mb"]), fmt(ratio(r, full, "peak_rss_mb"), ".2f"),
            fmt(r["train_increment_mb"]), fmt(ratio(r, full, "train_increment_mb"), ".2f"),
            fmt(r["infer_ms"]), fmt(r["infer_merged_ms"])]) + " |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", help="worker mode: measure one method, print one JSON line")
    ap.add_argument("--methods", help="comma-separated subset (default: every registered method)")
    ap.add_argument("--steps", type=int, default=5, help="timed training steps per method")
    ap.add_argument("--model", default=MODEL, help="timm ViT name; results go to methods[_MODEL].json/.md")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    args = ap.parse_args()
    if args.method:
        print(json.dumps(worker(args.method, args.steps, args.model)))
        return

    import peft
    import timm
    from medpeft.methods import list_methods

    names = args.methods.split(",") if args.methods else [s.name for s in list_methods()]
    # The reference goes first and, as a check on drift / load from other processes, last again.
    names = ["full"] + [n for n in names if n != "full"] + ["full"]
    results = []
    for name in names:
        r = run_worker(name, args.steps, args.model)
        if name == "full" and len(results) > 1:
            r["method"] = "full (repeat)"
        results.append(r)
        print(f"{r['method']}: " + (f"failed: {r['error']}" if "error" in r else
                             f"step {r['step_ms']:.0f} ms, peak {r['peak_rss_mb']:.0f} MB") + f" ({r['wall_s']} s)",
              flush=True)
    machine = dict(cpu_count=os.cpu_count(), threads=2, platform=platform.platform(),
                   processor=platform.processor(), python=platform.python_version(), torch=torch.__version__,
                   timm=timm.__version__, peft=peft.__version__)
    command = "python benchmarks/method_costs.py " + " ".join(sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "methods" if args.model == MODEL else f"methods_{args.model}"
    (args.out / f"{stem}.json").write_text(json.dumps(dict(
        model=args.model, batch=BATCH, img_size=SIZE, num_classes=CLASSES, dtype="float32", device="cpu",
        steps=args.steps, command=command, machine=machine, results=results), indent=2) + "\n")
    md = (f"# PEFT method costs: {args.model}, batch {BATCH}, {SIZE} px, CPU fp32, {machine['cpu_count']} cores "
          f"(2 threads)\n\n`{command}` — torch {machine['torch']}, timm {machine['timm']}, peft {machine['peft']}, "
          f"{machine['platform']}\n\n"
          f"Step: median of {args.steps} steps (fwd + BCE + bwd + AdamW) after 2 warm-ups. Peak = worker ru_maxrss "
          "after the steps; train incr. = peak - ru_maxrss after building + applying. Train FLOPs: one fwd + bwd "
          "counted by torch FlopCounterMode (matmul/conv/attention only, optimizer excluded). trainable % is of "
          "the bare backbone's parameters. Ratios are to `full` in this run (measured first and last; the "
          "faster of the two is the reference). time / FLOP ratio = (step / full) / (train FLOPs / full): 1.00 "
          "means the method saves time exactly in proportion to the FLOPs it saves; above 1, its step costs more "
          "than its FLOPs explain (unfused extra ops, elementwise work the counter omits).\n\n" + table(results) + "\n")
    (args.out / f"{stem}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
