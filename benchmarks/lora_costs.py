"""What LoRA costs against full fine-tuning: peft's LoRA layers vs medpeft's lean ones, fp32 vs bf16.

    python benchmarks/lora_costs.py [--models vit_small_patch16_224] [--batches 16] [--precisions fp32,bf16]
                                    [--variants full,peft-qkv,lean-qkv,peft-all,lean-all] [--rounds 5]
                                    [--device cpu] [--out benchmarks/results] [--name lora_costs]

Variants: `full` fine-tuning; LoRA (r 8, alpha 16, dropout 0) on the fused qkv (`-qkv`) or on every
linear layer of the blocks (`-all`), with peft's own layers (`peft-`) or medpeft's (`lean-`, the
default of `method: lora`); `floor`: every weight frozen but the head, the class token trained (the
input gradients of every block, as LoRA needs them, at no cost for adapters: what LoRA's step would
take if its rank-r work were free); `@selective` / `@blocks` add `train.recompute` (e.g. `lean-all@selective`).
Every variant runs as `medpeft train` runs it with `train.accel: true` (medpeft.accel): the process keeps
freed memory for reuse, bf16 on the CPU takes timm's attention without the fused kernel, fp32 linear
layers on the CPU run oneDNN's kernel and LoRA layers are lean; a `~stock` suffix (e.g. `full~stock`)
runs it with none of these (`train.accel: false`), as torch, timm and peft do by default.
Random-init model, 14 labels, 224 px, one fixed batch; on the CPU 2 threads. A step is forward + BCE +
backward + AdamW (fused) over the trainable parameters, under bf16 autocast for bf16 (fp32 master weights).
  * time: each variant in its own worker process (--stepper), all alive at once; after warming up
    (`warm_up`: until the process stops faulting in new memory, 3-6 steps here), every round times one
    step of each variant in turn, --rounds times; "step ms" is the median, "step / full" the median of
    the rounds' ratios to full fine-tuning (a slow spell of the machine hits a round's variants alike).
  * memory: a fresh worker process per cell (this script with --cell). "train MB" = the optimiser
    state + the most a step holds at once beyond what lives at its start (activations, gradients,
    temporaries): on the CPU from torch's memory events under the profiler, on CUDA from the
    allocator's peak. On the CPU also ru_maxrss ("peak RSS": libraries and allocator caches included,
    so its ratios are closer to 1).
  * FLOPs: one forward + backward counted by torch FlopCounterMode (matmuls; attention as torch counts
    its CUDA kernels, the CPU's fused one included, whose backward recomputes q k^T); GFLOP/s =
    FLOPs / step time. The matmul peak of the dtype (the best square matmul, CPU: 1024-4096 on 2
    threads; CUDA: 4096-8192) is measured in every round by one more worker, in turn with the steps;
    "% of matmul peak" is the median of the rounds' step GFLOP/s over that round's peak.
  * inference: eval, no_grad, median of 5 forwards: unmerged, and merged (LoRA folded into W).
Writes NAME.json and NAME.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_backward_flop, sdpa_flop

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from method_costs import maxrss_mb, times_ms  # noqa: E402

from medpeft.accel.onednn import linear_op  # noqa: E402
from medpeft.engine.runtime import EMULATED_BF16, cpu_bf16_matmul, cpu_name  # noqa: E402

CLASSES, SIZE = 14, 224
# torch's FLOP counter counts its CUDA attention kernels but gives the CPU one 0 FLOPs: count it the same way
register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu, get_raw=True)(sdpa_flop)
register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward,
                      get_raw=True)(sdpa_backward_flop)
if linear_op() is not None:  # oneDNN's linear (fp32 on the CPU: medpeft.accel.onednn)
    @register_flop_formula(linear_op())
    def onednn_linear_flop(x_shape, *args, **kwargs) -> int:
        """default: (x, weight, bias, attr, ...); binary (the sum in its epilogue): (x, other, weight, bias, attr)."""
        w_shape = args[0] if isinstance(args[2], str) else args[1]
        return 2 * math.prod(x_shape[:-1]) * w_shape[0] * w_shape[1]
TARGETS = {"qkv": ["qkv"], "all": ["all_linear"]}


def peft_layers(model: torch.nn.Module) -> None:
    """Undo make_lean: peft's own LoRA layers, as peft.get_peft_model made them."""
    from peft.tuners.lora.layer import Linear as PeftLinear

    from medpeft.accel.lean_lora import LeanLinear, LeanSplitQKV
    from medpeft.backbones.layers import SplitQKV

    for module in model.modules():
        if type(module) is LeanLinear:
            module.__class__ = PeftLinear
        elif type(module) is LeanSplitQKV:
            module.__class__ = SplitQKV


def synced(fn, device: str):
    """`fn` followed by waiting for the device, so that wall-clock times hold on CUDA."""
    def call():
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return out
    return call


def matmul_gflops(dtype: torch.dtype, device: str, repeats: int = 5) -> float:
    """The best GFLOP/s of square matmuls in `dtype` (CPU: 1024-4096, AMX bf16 peaks at small sizes), by
    torch's matmul or by the linear layers' kernel (fp32 on the CPU: oneDNN's, see medpeft.accel.onednn)."""
    from medpeft.accel.onednn import linear

    best = 0.0
    for n in (1024, 2048, 4096) if device == "cpu" else (4096, 8192):
        a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
        for matmul in (torch.mm, linear):
            ms = min(times_ms(synced(lambda: matmul(a, b), device), repeats, warmup=1))
            best = max(best, 2 * n**3 / ms * 1000 / 1e9)
    return best


def step_peak_mb(step, device: str) -> float:
    """The most memory one call of `step` holds at once beyond what lives at its start (tensors the
    allocator hands out; on the CPU from the profiler's memory events): activations, gradients, temporaries."""
    from torch.profiler import ProfilerActivity, profile

    if device == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - start) / 2**20
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def build(model_name: str, variant: str, precision: str, device: str):
    """The model of `variant` on `device` as training runs it in `precision`, and its method's spec."""
    from medpeft import accel
    from medpeft.backbones import create_backbone
    from medpeft.config import ModelConfig, TrainConfig
    from medpeft.methods import get_method, method_config_from_dict
    from medpeft.train.recompute import apply_recompute

    torch.manual_seed(0)
    model, _ = create_backbone(ModelConfig(name=model_name, weights="random", img_size=SIZE, drop_path_rate=0.0),
                               num_classes=CLASSES)
    variant, _, stock = variant.partition("~")
    name, _, recompute = variant.partition("@")
    kind, _, targets = name.partition("-")
    method = {"full": "full", "floor": "linear_probe"}.get(kind, "lora")
    spec = get_method(method)
    config = method_config_from_dict({"name": method} if method != "lora" else
                                     {"name": "lora", "r": 8, "alpha": 16, "targets": TARGETS[targets]})
    model = spec.apply(model, config)
    if kind == "floor":  # the gradient goes back through every frozen block, to the class token
        model.cls_token.requires_grad_(True)
    # medpeft's speed-ups (train.accel) as training applies them; '~stock': torch's, timm's and peft's modules
    accel.apply(model, "vit", TrainConfig(precision=precision, device=device, accel=not stock), torch.device(device))
    if kind == "peft":
        peft_layers(model)
    apply_recompute(model, recompute or "none")
    return model.to(device).train(), spec


def trainer(model, batch: int, precision: str, device: str):
    """One training step of `model` on a fixed seeded batch, as a function."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, SIZE, SIZE, generator=g).to(device)
    y = (torch.rand(batch, CLASSES, generator=g) > 0.5).float().to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(x)
        F.binary_cross_entropy_with_logits(logits.float(), y).backward()
        opt.step()
    return synced(step, device), opt, x


def setup(device: str, variant: str = "") -> None:
    if device == "cpu":
        torch.set_num_threads(2)
    if not variant.endswith("~stock"):
        from medpeft.accel.memory import reuse_freed_memory

        reuse_freed_memory()


def warm_up(step, most: int = 10) -> None:
    """Run `step` until the process has memory for it: at least twice, then until a step faults in under
    4 MB of new pages (at most `most` steps). Until then the heap grows and every new page costs a fault."""
    settled = 4 * 2**20 // resource.getpagesize()
    for n in range(most):
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step()
        if n >= 1 and resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults < settled:
            return


PEAK = "matmul-peak"  # the worker that measures the matmul peak of the dtype in each round


def stepper(model_name: str, batch: int, precision: str, variant: str, device: str) -> None:
    """Serve timed steps of one variant: after warming up (`warm_up`) print "ready", then for each "step" line
    read from stdin time one training step and print its milliseconds (PEAK: the matmul peak, GFLOP/s)."""
    setup(device, variant)
    if variant == PEAK:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        step = lambda: matmul_gflops(dtype, device, repeats=3)  # noqa: E731
    else:
        timed = trainer(build(model_name, variant, precision, device)[0], batch, precision, device)[0]
        warm_up(timed)
        step = lambda: times_ms(timed, 1, warmup=0)[0]  # noqa: E731
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "step":
            print(step(), flush=True)


def timing(model_name: str, batch: int, precision: str, variants: list[str], rounds: int, device: str) -> dict:
    """Step times of every variant and the matmul peak (PEAK): each in its own process (as in training),
    all alive at once and stepped one after another per round, so that the machine's slow spells hit
    them alike."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    workers = {}
    for v in variants:  # one by one, each warm before the next starts
        workers[v] = subprocess.Popen([sys.executable, __file__, "--stepper", model_name, str(batch), precision, v,
                                       device], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        if workers[v].stdout.readline().strip() != "ready":
            raise SystemExit(f"the {v} stepper failed: {workers[v].wait()}")
    times = {v: [] for v in variants}
    try:
        for _ in range(rounds):
            for v, worker in workers.items():
                worker.stdin.write("step\n")
                worker.stdin.flush()
                times[v].append(float(worker.stdout.readline()))
    finally:
        for worker in workers.values():
            worker.stdin.close()
            worker.wait()
    return times


def cell(model_name: str, batch: int, precision: str, variant: str, device: str) -> dict:
    """Memory, FLOPs and inference times of one variant, in a fresh process."""
    from medpeft.backbones import count_parameters

    setup(device, variant)
    model, spec = build(model_name, variant, precision, device)
    trainable, _ = count_parameters(model)
    rss_build = maxrss_mb()
    step, opt, x = trainer(model, batch, precision, device)
    times_ms(step, 0, warmup=2)
    peak = maxrss_mb()
    state_mb = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                   if torch.is_tensor(t)) / 2**20
    step_mb = step_peak_mb(step, device)
    with FlopCounterMode(display=False) as counter:  # last: the counter keeps what recomputation would free
        step()
    flops = counter.get_total_flops()

    def infer(m):
        m.eval()
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            return statistics.median(times_ms(synced(lambda: m(x), device), 5))

    lora, recompute = not variant.startswith("full") and "@" not in variant, "@" in variant
    infer_ms = infer(model)
    merged_ms = infer(spec.merge(model)) if lora and not recompute else None
    return dict(model=model_name, batch=batch, precision=precision, variant=variant, device=device,
                trainable=trainable, rss_build_mb=rss_build, peak_rss_mb=peak if device == "cpu" else None,
                optimizer_state_mb=state_mb, step_peak_mb=step_mb, train_mb=state_mb + step_mb,
                train_flops=flops, infer_ms=infer_ms, infer_merged_ms=merged_ms)


def worker(*args) -> dict:
    command = [sys.executable, __file__, *map(str, args)]
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
        step, flops = r["step_ratio"], r["train_flops"] / full["train_flops"]
        merged = "" if r["infer_merged_ms"] is None else f"{r['infer_merged_ms']:.1f}"
        rss = ("| |" if r["peak_rss_mb"] is None else
               f"| {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / full['peak_rss_mb']:.2f} |")
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['precision']} | {r['variant']} | {r['step_ms']:.1f} | {step:.2f} | "
            f"{flops:.2f} | {step / flops:.2f} | {r['gflop_per_s']:.0f} | "
            f"{100 * r['peak_share']:.0f}% | {r['train_mb']:.0f} | "
            f"{r['train_mb'] / full['train_mb']:.2f} {rss} {r['infer_ms']:.1f} | {merged} |")
    return lines


def main() -> None:
    if sys.argv[1:2] == ["--cell"]:
        model, batch, precision, variant, device = sys.argv[2:7]
        print(json.dumps(cell(model, int(batch), precision, variant, device)))
        return
    if sys.argv[1:2] == ["--stepper"]:
        model, batch, precision, variant, device = sys.argv[2:7]
        stepper(model, int(batch), precision, variant, device)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="vit_small_patch16_224")
    parser.add_argument("--batches", default="16")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--variants", default="full,peft-qkv,lean-qkv,peft-all,lean-all")
    parser.add_argument("--rounds", type=int, default=5, help="timed steps of each variant, in turn")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--name", default="lora_costs", help="file name of the results (.json, .md)")
    args = parser.parse_args()
    if args.device == "cpu" and "bf16" in args.precisions.split(",") and not cpu_bf16_matmul():
        raise SystemExit(f"bf16: {EMULATED_BF16}; measure fp32 only (--precisions fp32)")
    variants = args.variants.split(",")
    if "full" not in variants:
        variants.insert(0, "full")
    results = []
    for model in args.models.split(","):
        for batch in map(int, args.batches.split(",")):
            for precision in args.precisions.split(","):
                start = time.perf_counter()
                times = timing(model, batch, precision, [*variants, PEAK], args.rounds, args.device)
                for variant in variants:
                    r = worker("--cell", model, batch, precision, variant, args.device)
                    r.update(step_ms_rounds=times[variant], step_ms=statistics.median(times[variant]),
                             step_ratio=statistics.median(t / f for t, f in zip(times[variant], times["full"])))
                    r["gflop_per_s"] = r["train_flops"] / r["step_ms"] / 1e6
                    r["matmul_peak_rounds"] = times[PEAK]
                    r["matmul_peak_gflop_per_s"] = statistics.median(times[PEAK])
                    r["peak_share"] = statistics.median(r["train_flops"] / t / 1e6 / peak
                                                        for t, peak in zip(times[variant], times[PEAK]))
                    results.append(r)
                    print(f"{model} batch {batch} {precision} {variant}: {r['step_ms']:.1f} ms/step "
                          f"({r['step_ratio']:.2f} x full), train {r['train_mb']:.0f} MB", flush=True)
                print(f"({time.perf_counter() - start:.0f} s)", flush=True)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"{cpu_name()}, 2 threads"
    meta = {"command": " ".join(sys.argv), "torch": torch.__version__, "platform": platform.platform(), "device": device}
    from medpeft.files import write_json_atomic, write_text_atomic

    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / f"{args.name}.json", {**meta, "results": results})
    lines = [f"# LoRA costs against full fine-tuning: peft's layers vs lean, fp32 vs bf16 ({device})", "",
             f"`{meta['command']}`, torch {meta['torch']}. step ms: the median of {args.rounds} rounds, each timing "
             "one step of every variant in turn (a process per variant, all alive); step / full: the median of the rounds' ratios. Ratios are "
             "to full fine-tuning of the same model, batch and precision. time / FLOP ratio 1.00 = the step saves "
             "time exactly in proportion to the FLOPs it saves. train MB = optimiser state + a step's peak "
             "allocation beyond what lives at its start (fresh process per cell). Matmul peak, median of the rounds: "
             + ", ".join(sorted({f"{r['precision']} {r['matmul_peak_gflop_per_s']:.0f} GFLOP/s" for r in results}))
             + ".", "", *table(results)]
    write_text_atomic(args.out / f"{args.name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
