"""What LoRA costs against full fine-tuning: peft's LoRA layers vs medpeft's lean ones, fp32 vs bf16.

    python benchmarks/lora_costs.py [--models vit_small_patch16_224] [--batches 16] [--precisions fp32,bf16]
                                    [--variants full,peft-qkv,lean-qkv,peft-all,lean-all] [--steps 3]
                                    [--out benchmarks/results]

Variants: `full` fine-tuning; LoRA (r 8, alpha 16, dropout 0) on the fused qkv (`-qkv`) or on every
linear layer of the blocks (`-all`), with peft's own layers (`peft-`) or medpeft's (`lean-`, the
default of `method: lora`); `@selective` / `@blocks` add `train.recompute` (e.g. `lean-all@selective`). Each cell (model x batch x precision x variant) runs in a fresh worker
process (this script with --cell), random-init model, 14 labels, 224 px, one fixed batch, 2 threads:
  * step: forward + BCE + backward + AdamW over the trainable parameters, under bf16 autocast for
    bf16 (fp32 master weights); the median of --steps timed steps after 2 warm-ups.
  * memory: "train MB" = the optimiser state + the most a step holds at once beyond what lives at its
    start (torch's memory events under the profiler: activations, gradients, temporaries), i.e. what
    training adds to holding the model, as the allocator sees it. Also ru_maxrss after the timed steps
    ("peak RSS": libraries and allocator caches included, so its ratios are closer to 1).
  * FLOPs: one forward + backward counted by torch FlopCounterMode (matmul / attention); GFLOP/s =
    FLOPs / step time, against the best square matmul (1024-4096) of the dtype on 2 threads,
    measured once per dtype after the cells.
  * inference: eval, no_grad, median of 5 forwards: unmerged, and merged (LoRA folded into W).
Cells run in order full, the LoRA variants, then full again, --repeats times over; each cell's fastest
run is kept (the machine may be shared). The table gives every figure as a ratio to full fine-tuning
of the same model, batch and precision.
Writes lora_costs.json and lora_costs.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from method_costs import maxrss_mb, times_ms  # noqa: E402

CLASSES, SIZE = 14, 224
TARGETS = {"qkv": ["qkv"], "all": ["all_linear"]}


def peft_layers(model: torch.nn.Module) -> None:
    """Undo make_lean: peft's own LoRA layers, as peft.get_peft_model made them."""
    from peft.tuners.lora.layer import Linear as PeftLinear

    from medpeft.backbones.layers import SplitQKV
    from medpeft.methods.lean_lora import LeanLinear, LeanSplitQKV

    for module in model.modules():
        if type(module) is LeanLinear:
            module.__class__ = PeftLinear
        elif type(module) is LeanSplitQKV:
            module.__class__ = SplitQKV


def matmul_gflops(dtype: torch.dtype) -> float:
    """The best GFLOP/s of square matmuls of 1024, 2048 and 4096 in `dtype` (AMX bf16 peaks at small sizes)."""
    best = 0.0
    for n in (1024, 2048, 4096):
        a, b = (torch.randn(n, n, dtype=dtype) for _ in range(2))
        best = max(best, 2 * n**3 / min(times_ms(lambda: a @ b, 5, warmup=1)) * 1000 / 1e9)
    return best


def step_peak_mb(step) -> float:
    """The most memory one call of `step` holds at once beyond what lives at its start (tensors the
    allocator hands out, from the profiler's memory events): activations, gradients, temporaries."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def cell(model_name: str, batch: int, precision: str, variant: str, steps: int) -> dict:
    from medpeft.backbones import count_parameters, create_backbone
    from medpeft.config import ModelConfig
    from medpeft.methods import get_method, method_config_from_dict

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model, _ = create_backbone(ModelConfig(name=model_name, weights="random", img_size=SIZE, drop_path_rate=0.0),
                               num_classes=CLASSES)
    from medpeft.train.recompute import apply_recompute

    name, _, recompute = variant.partition("@")
    kind, _, targets = name.partition("-")
    method = "full" if kind == "full" else "lora"
    spec = get_method(method)
    config = method_config_from_dict({"name": "full"} if method == "full" else
                                     {"name": "lora", "r": 8, "alpha": 16, "targets": TARGETS[targets]})
    model = spec.apply(model, config)
    if kind == "peft":
        peft_layers(model)
    apply_recompute(model, recompute or "none")
    trainable, _ = count_parameters(model)
    rss_build = maxrss_mb()

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, SIZE, SIZE, generator=g)
    y = (torch.rand(batch, CLASSES, generator=g) > 0.5).float()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(x)
        F.binary_cross_entropy_with_logits(logits.float(), y).backward()
        opt.step()

    model.train()
    step_ms = statistics.median(times_ms(step, steps, warmup=2))
    peak = maxrss_mb()
    state_mb = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                   if torch.is_tensor(t)) / 2**20
    step_mb = step_peak_mb(step)
    with FlopCounterMode(display=False) as counter:  # last: the counter keeps what recomputation would free
        step()
    flops = counter.get_total_flops()

    def infer(m):
        m.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            return statistics.median(times_ms(lambda: m(x), 5))

    infer_ms = infer(model)
    merged_ms = infer(spec.merge(model)) if method == "lora" and not recompute else None
    return dict(model=model_name, batch=batch, precision=precision, variant=variant, trainable=trainable,
                step_ms=step_ms, rss_build_mb=rss_build, peak_rss_mb=peak, rss_train_mb=peak - rss_build,
                optimizer_state_mb=state_mb, step_peak_mb=step_mb, train_mb=state_mb + step_mb,
                train_flops=flops, gflop_per_s=flops / step_ms / 1e6,
                infer_ms=infer_ms, infer_merged_ms=merged_ms)


def run_cell(*args) -> dict:
    command = [sys.executable, __file__, "--cell", *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> list[str]:
    lines = ["| model | batch | precision | variant | step ms | step / full | FLOPs / full | time / FLOP ratio | "
             "GFLOP/s | % of matmul peak | train MB | train / full | peak RSS MB | RSS / full | infer ms | "
             "merged ms |", "|" + "---|" * 16]
    for r in results:
        full = next(f for f in results if f["variant"] == "full" and
                    (f["model"], f["batch"], f["precision"]) == (r["model"], r["batch"], r["precision"]))
        step, flops = r["step_ms"] / full["step_ms"], r["train_flops"] / full["train_flops"]
        merged = "" if r["infer_merged_ms"] is None else f"{r['infer_merged_ms']:.0f}"
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['precision']} | {r['variant']} | {r['step_ms']:.0f} | {step:.2f} | "
            f"{flops:.2f} | {step / flops:.2f} | {r['gflop_per_s']:.0f} | "
            f"{100 * r['gflop_per_s'] / r['matmul_peak_gflop_per_s']:.0f}% | {r['train_mb']:.0f} | "
            f"{r['train_mb'] / full['train_mb']:.2f} | {r['peak_rss_mb']:.0f} | "
            f"{r['peak_rss_mb'] / full['peak_rss_mb']:.2f} | {r['infer_ms']:.0f} | {merged} |")
    return lines


def main() -> None:
    if sys.argv[1:2] == ["--cell"]:
        model, batch, precision, variant, steps = sys.argv[2:7]
        print(json.dumps(cell(model, int(batch), precision, variant, int(steps))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="vit_small_patch16_224")
    parser.add_argument("--batches", default="16")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--variants", default="full,peft-qkv,lean-qkv,peft-all,lean-all")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="passes over the cells (the fastest is kept)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    variants = args.variants.split(",")
    order = variants + (["full"] if "full" in variants else [])
    best = {}  # (model, batch, precision, variant) -> the cell with the fastest step, over the repeats
    for model in args.models.split(","):
        for batch in map(int, args.batches.split(",")):
            for precision in args.precisions.split(","):
                for repeat in range(args.repeats):
                    for variant in order:
                        start = time.perf_counter()
                        r = run_cell(model, batch, precision, variant, args.steps)
                        key = (model, batch, precision, variant)
                        steps = best.get(key, {}).get("step_ms_repeats", []) + [r["step_ms"]]
                        if key not in best or r["step_ms"] < best[key]["step_ms"]:
                            best[key] = r
                        best[key]["step_ms_repeats"] = steps
                        print(f"{model} batch {batch} {precision} {variant}: {r['step_ms']:.0f} ms/step, "
                              f"train {r['train_mb']:.0f} MB ({time.perf_counter() - start:.0f} s)", flush=True)
    results = list(best.values())
    torch.set_num_threads(2)  # the peak on the cells' threads, measured once per dtype on the quiet machine
    peaks = {p: matmul_gflops(torch.bfloat16 if p == "bf16" else torch.float32) for p in args.precisions.split(",")}
    for r in results:
        r["matmul_peak_gflop_per_s"] = peaks[r["precision"]]
    meta = {"command": " ".join(sys.argv), "torch": torch.__version__, "platform": platform.platform()}
    from medpeft.train.rundir import write_json_atomic, write_text_atomic

    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "lora_costs.json", {**meta, "results": results})
    lines = ["# LoRA costs against full fine-tuning: peft's layers vs lean, fp32 vs bf16 (CPU, 2 threads)", "",
             f"`{meta['command']}`, torch {meta['torch']}. Each cell: the fastest of its runs. Ratios are to full "
             "fine-tuning of the same model, batch and precision. time / FLOP ratio 1.00 = the step saves time exactly "
             "in proportion to the FLOPs it saves. train MB = optimiser state + a step's peak allocation (profiler).", "",
             *table(results)]
    write_text_atomic(args.out / "lora_costs.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
