"""Forward+backward time of ONE adapted attention linear at the SD1.5 shapes: frozen, LoRA, peft HRA, ours.

Why one layer: it isolates the adapter's own cost from the rest of the UNet, so a regression in hra_diffusion's
layer shows up here first. All cells are timed in one process, round-robin (every round visits every shape and
mode, in a rotated order), and the median over rounds is reported, so slow drifts of the machine hit every cell alike.

    python benchmarks/hra_layer.py                      # CPU, float32, the default
    python benchmarks/hra_layer.py --device cuda --dtype bf16 --json hra_layer_gpu.json
    python benchmarks/hra_layer.py --plot docs/img/hra_layer_cpu.png
    python benchmarks/hra_layer.py --threads 1 --clock cpu    # a CPU shared with other jobs

A cell is one call of y = layer(x) and y.backward(g) on x (batch, tokens, d) with x.requires_grad (as inside a
UNet, where the input gradient flows on) and the base weight frozen; only the adapter's parameters get gradients.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hra_diffusion.cli import HelpFormatter  # noqa: E402
from hra_diffusion.config import HRAConfig  # noqa: E402
from hra_diffusion.layers import HRALayer  # noqa: E402

# (width d, tokens per image) of the SD1.5 self-attention linears at 512 px: 64x64, 32x32, 16x16, 8x8 latents
SHAPES = [(320, 4096), (640, 1024), (1280, 256), (1280, 64)]
MODES = ["frozen", "lora", "peft_hra", "ours"]
TARGET_VS_LORA = 1.10
TARGET_VS_PEFT_HRA = 0.5
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def make_layer(mode: str, d: int, r: int, device: str, dtype: torch.dtype) -> nn.Module:
    """The layer under test around a fresh frozen nn.Linear(d, d) (no bias, like to_q/to_k/to_v)."""
    torch.manual_seed(0)
    base = nn.Linear(d, d, bias=False)
    if mode == "frozen":
        layer = base
    elif mode == "lora":
        from peft import LoraConfig
        from peft.tuners.lora.layer import Linear as PeftLoraLinear

        config = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0)
        layer = PeftLoraLinear(base, "default", config=config, r=r, lora_alpha=r, lora_dropout=0.0)
        nn.init.normal_(layer.lora_B["default"].weight, std=0.01)  # as after a few steps (B = 0 at init)
    elif mode == "peft_hra":
        from peft import HRAConfig as PeftHRAConfig
        from peft.tuners.hra.layer import HRALinear as PeftHRALinear

        layer = PeftHRALinear(base, "default", config=PeftHRAConfig(r=r), r=r)
    elif mode == "ours":
        layer = HRALayer(base)
        layer.add_adapter("default", HRAConfig(r=r))
    else:
        raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
    base.weight.requires_grad_(False)
    return layer.to(device=device, dtype=dtype) if mode != "ours" else _ours_to(layer, device, dtype)


def _ours_to(layer: HRALayer, device: str, dtype: torch.dtype) -> HRALayer:
    """Base weight in the compute dtype, HRA vectors stay float32 (as add_hra + a mixed-precision trainer keep them)."""
    layer.base_layer.to(device=device, dtype=dtype)
    return layer.to(device=device)


def make_step(layer: nn.Module, d: int, tokens: int, batch: int, device: str, dtype: torch.dtype) -> Callable[[], None]:
    """One forward+backward, grads cleared before (set to None, like optimizer.zero_grad)."""
    x = torch.randn(batch, tokens, d, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(batch, tokens, d, device=device, dtype=dtype)
    params = [p for p in layer.parameters() if p.requires_grad]

    def step() -> None:
        x.grad = None
        for p in params:
            p.grad = None
        layer(x).backward(g)

    return step


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_calls(step: Callable[[], None], reps: int, device: str, clock: Callable[[], float]) -> float:
    """Seconds per call over ``reps`` back-to-back calls."""
    sync(device)
    start = clock()
    for _ in range(reps):
        step()
    sync(device)
    return (clock() - start) / reps


def run(args: argparse.Namespace) -> dict:
    dtype, clock = DTYPES[args.dtype], CLOCKS[args.clock]
    load_start = os.getloadavg()[0]
    cells = {}
    for d, tokens in SHAPES:
        for mode in args.modes:
            layer = make_layer(mode, d, args.r, args.device, dtype)
            step = make_step(layer, d, tokens, args.batch, args.device, dtype)
            for _ in range(2):  # warm-up: allocator, kernels, lazy inits
                step()
            once = time_calls(step, 1, args.device, clock)
            reps = max(1, min(50, round(args.cell_seconds / max(once, 1e-6))))
            cells[(d, tokens, mode)] = {"step": step, "reps": reps, "times": []}
    keys = list(cells)
    for rnd in range(args.rounds):
        shift = rnd % len(keys)
        for key in keys[shift:] + keys[:shift]:  # rotate the order so no cell always follows the same one
            cell = cells[key]
            cell["times"].append(time_calls(cell["step"], cell["reps"], args.device, clock))
        print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr)
    rows = []
    for d, tokens in SHAPES:
        row = {"d": d, "tokens": tokens, "batch": args.batch, "ms": {}}
        for mode in args.modes:
            row["ms"][mode] = 1e3 * statistics.median(cells[(d, tokens, mode)]["times"])
        rows.append(row)
    return {
        "device": args.device,
        "device_name": torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "r": args.r,
        "batch": args.batch,
        "rounds": args.rounds,
        "clock": args.clock,
        "load_avg_1min": [load_start, os.getloadavg()[0]],  # above the core count: other processes competed
        "rows": rows,
    }


def verdicts(result: dict) -> dict[str, bool | None]:
    """PASS/FAIL of each target; None when a needed mode was not measured."""
    out: dict[str, bool | None] = {}
    for name, other, limit in (("lora", "lora", TARGET_VS_LORA), ("peft_hra", "peft_hra", TARGET_VS_PEFT_HRA)):
        ratios = [row["ms"]["ours"] / row["ms"][other] for row in result["rows"] if {"ours", other} <= row["ms"].keys()]
        out[name] = all(q <= limit for q in ratios) if ratios else None
    return out


def markdown(result: dict) -> str:
    modes = [m for m in MODES if m in result["rows"][0]["ms"]]
    head = ["d", "tokens"] + [f"{m} ms" for m in modes]
    has = set(modes)
    if {"ours", "lora"} <= has:
        head.append("ours / LoRA")
    if {"ours", "peft_hra"} <= has:
        head.append("ours / peft-HRA")
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in result["rows"]:
        ms = row["ms"]
        cols = [str(row["d"]), str(row["tokens"])] + [f"{ms[m]:.2f}" for m in modes]
        if {"ours", "lora"} <= has:
            cols.append(f"{ms['ours'] / ms['lora']:.3f}")
        if {"ours", "peft_hra"} <= has:
            cols.append(f"{ms['ours'] / ms['peft_hra']:.3f}")
        lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Bar chart: each mode's time relative to LoRA per shape, with the 1.10 target line for ours.

    Log scale, because peft's HRA is 1x to 20x LoRA while the interesting gaps (ours vs LoRA) are a few percent.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    modes = [m for m in MODES if m in result["rows"][0]["ms"]]
    labels = [f"d={row['d']}, {row['tokens']} tokens" for row in result["rows"]]
    names = {
        "frozen": "frozen Linear (no adapter)",
        "lora": "LoRA r=8 (peft)",
        "peft_hra": "HRA r=8 (peft)",
        "ours": "HRA r=8 (ours)",
    }
    colors = {"frozen": "#9e9e9e", "lora": "#1f77b4", "peft_hra": "#d62728", "ours": "#2ca02c"}
    width = 0.8 / len(modes)
    fig, ax = plt.subplots(figsize=(10, 5.5))
    ratios_all = []
    for i, mode in enumerate(modes):
        xs = [j + (i - (len(modes) - 1) / 2) * width for j in range(len(labels))]
        ratios = [row["ms"][mode] / row["ms"]["lora"] for row in result["rows"]]
        ratios_all += ratios
        bars = ax.bar(xs, ratios, width, label=names[mode], color=colors[mode])
        box = {"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.85}
        ax.bar_label(bars, labels=[f"{q:.2f}" for q in ratios], fontsize=8, padding=2, bbox=box, zorder=3)
    ax.axhline(
        TARGET_VS_LORA, color="black", linestyle="--", linewidth=1, label=f"target: ours <= {TARGET_VS_LORA:.2f}x LoRA"
    )
    ax.set_yscale("log")
    top = max(ratios_all) * 1.6
    ticks = [t for t in (0.25, 0.5, 0.75, 1, 1.5, 2, 5, 10, 20, 50, 100) if min(ratios_all) * 0.8 <= t <= top]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_yticklabels([f"{t:g}x" for t in ticks])
    ax.set_ylim(min(ratios_all) * 0.8, top)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel(f"SD1.5 attention linear: width d, tokens per image (512 px), batch {result['batch']}")
    ax.set_ylabel("forward+backward time relative to LoRA (log scale; lower is better)")
    threads = f"{result['threads']} thread" + ("s" if result["threads"] != 1 else "")
    where = f"CPU, {threads}" if result["device"] == "cpu" else result["device_name"]
    clock = ", CPU time" if result["clock"] == "cpu" else ""
    ax.set_title(f"One adapted layer, r={result['r']}, {result['dtype']}: {where}{clock}, torch {result['torch']}")
    ax.legend(loc="upper left", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=15, help="round-robin rounds; the median over them is reported")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--batch", type=int, default=2, help="images per call (2: a CFG pair or a small train batch)")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument(
        "--clock",
        default="wall",
        choices=sorted(CLOCKS),
        help="wall: elapsed time (the default); cpu: this process's CPU time, which a busy machine inflates far less "
        "(use with --threads 1, CPU only)",
    )
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's, one per core)")
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    parser.add_argument("--cell-seconds", type=float, default=0.15, help="time per cell per round (sets the reps)")
    parser.add_argument("--json", metavar="OUT", help="write the raw numbers here")
    parser.add_argument("--plot", metavar="OUT.png", help="bar chart of the ratios against LoRA (needs --modes lora)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    result = run(args)
    threads = f"{result['threads']} thread" + ("s" if result["threads"] != 1 else "")
    where = f"{args.device}, {threads}" if args.device == "cpu" else result["device_name"]
    print(
        f"\nOne layer forward+backward, median {args.clock} ms over {args.rounds} rounds; batch {args.batch}, "
        f"r={args.r}, {args.dtype}, {where}, torch {torch.__version__}\n"
    )
    print(markdown(result))
    start, end = result["load_avg_1min"]
    print(f"\nmachine load average (1 min) at start / end: {start:.1f} / {end:.1f} on {os.cpu_count()} cores")
    verdict = verdicts(result)
    result["pass"] = verdict
    print()
    if verdict["lora"] is not None:
        print(f"target ours <= {TARGET_VS_LORA}x LoRA at every shape: {'PASS' if verdict['lora'] else 'FAIL'}")
    if verdict["peft_hra"] is not None:
        print(
            f"target ours <= {TARGET_VS_PEFT_HRA}x peft-HRA at every shape: {'PASS' if verdict['peft_hra'] else 'FAIL'}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.plot:
        plot(result, args.plot)


if __name__ == "__main__":
    main()
