"""Forward+backward time and peak memory of ONE adapted linear at real model shapes: frozen, LoRA, peft HRA, ours.

Why one layer: it isolates the adapter's own cost from the rest of the model, so a regression in hra_diffusion's
layer shows up here first. All cells are timed in one process, round-robin (every round visits every shape, rank and
mode, in a rotated order), and the median over rounds is reported, so slow drifts of the machine hit every cell alike.

    python benchmarks/hra_layer.py                                  # SD1.5 shapes, r=8, CPU float32
    python benchmarks/hra_layer.py --shapes sd35 flux --ranks 8,32 --batch 1 --rounds 5
    python benchmarks/hra_layer.py --shapes all --ranks 8,32 --device cuda --dtype bf16 --json hra_layer_gpu.json
    python benchmarks/hra_layer.py --threads 1 --clock cpu          # a CPU shared with other jobs

A cell is one call of y = layer(x) and y.backward(g) on x (batch, tokens, d_in) with x.requires_grad (as inside a
model, where the input gradient flows on) and the base weight frozen; only the adapter's parameters get gradients.
Its memory is the peak of what one such call allocates beyond what was allocated before it: the output, the tensors
saved for backward, the gradients, temporaries. On CUDA torch.cuda.max_memory_allocated; on CPU the same figure,
summed from the allocation events that torch's profiler records during one call (``profile_memory=True``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hra_diffusion.cli import HelpFormatter  # noqa: E402
from hra_diffusion.config import HRAConfig  # noqa: E402
from hra_diffusion.layers import HRALayer  # noqa: E402


@dataclass(frozen=True)
class Shape:
    """One adapted linear of a model: where it sits, its widths, the tokens per image it sees."""

    family: str
    where: str
    d_in: int
    d_out: int
    tokens: int
    bias: bool  # SD1.5's to_q/k/v have none, the MMDiT linears have one


# SD1.5 self-attention linears at 512 px: 64x64, 32x32, 16x16, 8x8 latents
SD15 = [Shape("sd15", f"attn, {s}x{s} latents", d, d, s * s, False) for d, s in ((320, 64), (640, 32), (1280, 16))]
SD15.append(Shape("sd15", "attn, 8x8 latents", 1280, 1280, 64, False))
# SD3.5-medium: 24 heads x 64 = 1536; 1024 px = 64x64 patches (4096 tokens), text 77 CLIP + 256 T5 = 333 tokens
SD35 = [
    Shape("sd35", "attn, image 1024 px", 1536, 1536, 4096, True),
    Shape("sd35", "add_*_proj, text 77+256", 1536, 1536, 333, True),
    Shape("sd35", "attn, image 512 px", 1536, 1536, 1024, True),
]
# FLUX.1: 24 heads x 128 = 3072; text 512 T5 tokens; single blocks see image and text tokens together
FLUX = [
    Shape("flux", "attn, image 1024 px", 3072, 3072, 4096, True),
    Shape("flux", "add_*_proj, text 512", 3072, 3072, 512, True),
    Shape("flux", "single block attn, 4096+512", 3072, 3072, 4608, True),
    Shape("flux", "attn, image 512 px", 3072, 3072, 1024, True),
]
# apart, because on a CPU one call of it costs as much as all of FLUX's attention cells together
FLUX_MLP = [Shape("flux", "MLP up, image 1024 px", 3072, 12288, 4096, True)]
SHAPES = {"sd15": SD15, "sd35": SD35, "flux": FLUX, "flux-mlp": FLUX_MLP}
MODES = ["frozen", "lora", "peft_hra", "ours"]
TARGET_TIME_VS_LORA = 1.05
TARGET_MEMORY_VS_LORA = 1.0
TARGET_VS_PEFT_HRA = 0.5
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def make_layer(mode: str, shape: Shape, r: int, device: str, dtype: torch.dtype) -> nn.Module:
    """The layer under test around a fresh frozen nn.Linear of ``shape``."""
    torch.manual_seed(0)
    base = nn.Linear(shape.d_in, shape.d_out, bias=shape.bias)
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
    base.requires_grad_(False)
    if mode == "ours":  # base in the compute dtype, HRA vectors stay float32 (as add_hra + mixed precision keep them)
        base.to(device=device, dtype=dtype)
        return layer.to(device=device)
    return layer.to(device=device, dtype=dtype)


class Cell:
    """One (shape, mode, rank) of the table: its layer, its input and output gradient, its measurements."""

    def __init__(self, layer: nn.Module, shape: Shape, batch: int, device: str, dtype: torch.dtype) -> None:
        self.layer = layer
        self.x = torch.randn(batch, shape.tokens, shape.d_in, device=device, dtype=dtype, requires_grad=True)
        self.g = torch.randn(batch, shape.tokens, shape.d_out, device=device, dtype=dtype)
        self.params = [p for p in layer.parameters() if p.requires_grad]
        self.reps = 1
        self.times: list[float] = []
        self.peak_mib = float("nan")

    def clear(self) -> None:
        """Gradients set to None, like optimizer.zero_grad."""
        self.x.grad = None
        for p in self.params:
            p.grad = None

    def call(self) -> None:
        self.layer(self.x).backward(self.g)

    def step(self) -> None:
        self.clear()
        self.call()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_calls(cell: Cell, reps: int, device: str, clock: Callable[[], float]) -> float:
    """Seconds per call over ``reps`` back-to-back calls."""
    sync(device)
    start = clock()
    for _ in range(reps):
        cell.step()
    sync(device)
    return (clock() - start) / reps


def peak_call_mib(cell: Cell, device: str) -> float:
    """MiB that one call allocates at its peak, beyond what was allocated before it (gradients cleared first)."""
    if device.startswith("cuda"):
        cell.step()  # a first call allocates cuBLAS's workspace, which is no layer's own
        cell.clear()
        sync(device)
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        cell.call()
        sync(device)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    from torch.profiler import ProfilerActivity, profile

    cell.clear()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        cell.call()
    with tempfile.TemporaryDirectory() as tmp:  # the trace's [memory] events carry each allocation's signed size
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    # frees of blocks allocated before profiling are not recorded, so the running sum starts from the call's start
    allocated = peak = 0
    for event in sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"]):
        allocated += event["args"]["Bytes"]
        peak = max(peak, allocated)
    return peak / 2**20


def cell_keys(shapes: list[Shape], modes: list[str], ranks: list[int]) -> list[tuple[int, str, int]]:
    """(shape index, mode, r); the frozen layer does not depend on r, so it has one cell per shape (r = 0)."""
    return [
        (i, mode, r) for i in range(len(shapes)) for mode in modes for r in ([0] if mode == "frozen" else ranks)
    ]


def selected_shapes(args: argparse.Namespace) -> list[Shape]:
    return [shape for name in args.shapes for shape in SHAPES[name]]


def make_cell(key: tuple[int, str, int], shapes: list[Shape], args: argparse.Namespace) -> Cell:
    i, mode, r = key
    dtype = DTYPES[args.dtype]
    return Cell(make_layer(mode, shapes[i], r, args.device, dtype), shapes[i], args.batch, args.device, dtype)


def run(args: argparse.Namespace) -> dict:
    clock = CLOCKS[args.clock]
    shapes = selected_shapes(args)
    load_start = os.getloadavg()[0]
    cells: dict[tuple[int, str, int], Cell] = {}
    for key in cell_keys(shapes, args.modes, args.ranks):
        cell = make_cell(key, shapes, args)
        cell.peak_mib = peak_call_mib(cell, args.device)  # also the warm-up: allocator, kernels, lazy inits
        once = time_calls(cell, 1, args.device, clock)
        cell.reps = max(1, min(50, round(args.cell_seconds / max(once, 1e-6))))
        cells[key] = cell
        shape, mode, r = shapes[key[0]], key[1], key[2]
        print(f"ready: {shape.family} {shape.where} {mode} r={r}: {1e3 * once:.1f} ms", file=sys.stderr)
    keys = list(cells)
    for rnd in range(args.rounds):
        shift = rnd % len(keys)
        for key in keys[shift:] + keys[:shift]:  # rotate the order so no cell always follows the same one
            cell = cells[key]
            cell.times.append(time_calls(cell, cell.reps, args.device, clock))
        print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr)
    rows = []
    for i, shape in enumerate(shapes):
        for r in args.ranks:
            row = {**asdict(shape), "batch": args.batch, "r": r, "ms": {}, "mib": {}}
            for mode in args.modes:
                cell = cells[(i, mode, 0 if mode == "frozen" else r)]
                row["ms"][mode] = 1e3 * statistics.median(cell.times)
                row["mib"][mode] = cell.peak_mib
            rows.append(row)
    cuda = args.device.startswith("cuda")
    return {
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "ranks": args.ranks,
        "batch": args.batch,
        "rounds": args.rounds,
        "clock": args.clock,
        "memory": "torch.cuda.max_memory_allocated" if cuda else "torch.profiler allocation events",
        "load_avg_1min": [load_start, os.getloadavg()[0]],  # above the core count: other processes competed
        "rows": rows,
    }


def profile_ops(args: argparse.Namespace, top: int = 12) -> str:
    """Where each cell's time goes, on CPU: its costliest ops by self CPU time per call, grouped by input shapes.

    Why: the table says how much an adapter costs over the frozen layer; this says which products of it (or which
    fixed per-call work: the r x r factors, the Python of autograd Functions) that is.
    """
    from torch.profiler import ProfilerActivity, profile

    shapes, out = selected_shapes(args), []
    for key in cell_keys(shapes, args.modes, args.ranks):
        cell = make_cell(key, shapes, args)
        for _ in range(3):
            cell.step()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(args.profile):
                cell.step()
        events = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in events) / args.profile
        shape, mode, r = shapes[key[0]], key[1], key[2]
        out += [
            f"{shape.family} {shape.where} ({shape.d_in} -> {shape.d_out}, {shape.tokens} tokens), {mode} r={r}: "
            f"{total / 1e3:.2f} ms self CPU time per call",
            "| op | input shapes | us per call | calls per call |\n| --- | --- | --- | --- |",
        ]
        for e in events[:top]:
            shapes_text = ", ".join(str(tuple(s)) for s in e.input_shapes if s)
            per_call = e.self_cpu_time_total / args.profile
            out[-1] += f"\n| {e.key} | {shapes_text} | {per_call:.1f} | {e.count / args.profile:g} |"
    return "\n\n".join(out)


def ratio(row: dict, field: str, mode: str, other: str) -> float | None:
    values = row[field]
    return values[mode] / values[other] if {mode, other} <= values.keys() else None


# name, what is compared, the field, the baseline mode, the limit
TARGETS = [
    ("time_vs_lora", f"ours <= {TARGET_TIME_VS_LORA}x LoRA's time", "ms", "lora", TARGET_TIME_VS_LORA),
    ("memory_vs_lora", "ours <= LoRA's peak memory", "mib", "lora", TARGET_MEMORY_VS_LORA),
    ("time_vs_peft_hra", f"ours <= {TARGET_VS_PEFT_HRA}x peft-HRA's time", "ms", "peft_hra", TARGET_VS_PEFT_HRA),
]


def verdicts(result: dict) -> dict[str, dict]:
    """Per target: pass (None when a needed mode was not measured) and the cells that miss it."""
    out = {}
    for name, _, field, other, limit in TARGETS:
        ratios = [(row, ratio(row, field, "ours", other)) for row in result["rows"]]
        ratios = [(row, q) for row, q in ratios if q is not None]
        misses = [f"{row['family']} {row['where']} r={row['r']}: {q:.3f}" for row, q in ratios if q > limit]
        out[name] = {"pass": not misses if ratios else None, "misses": misses}
    return out


def markdown(result: dict, field: str) -> str:
    """The time (``field`` "ms") or memory ("mib") table, with ours' ratios to LoRA and to peft's HRA."""
    modes = [m for m in MODES if m in result["rows"][0][field]]
    unit = "ms" if field == "ms" else "MiB"
    head = ["model", "layer", "d_in -> d_out", "tokens", "r"] + [f"{m} {unit}" for m in modes]
    others = [(m, label) for m, label in (("lora", "ours / LoRA"), ("peft_hra", "ours / peft-HRA")) if m in modes]
    if "ours" in modes:
        head += [label for _, label in others]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in result["rows"]:
        values = row[field]
        cols = [row["family"], row["where"], f"{row['d_in']} -> {row['d_out']}", str(row["tokens"]), str(row["r"])]
        cols += [f"{values[m]:.2f}" if field == "ms" else f"{values[m]:.1f}" for m in modes]
        if "ours" in modes:
            cols += [f"{ratio(row, field, 'ours', m):.3f}" for m, _ in others]
        lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Bar chart: each mode's time relative to LoRA per shape and rank, with the target line for ours.

    Log scale, because peft's HRA is 1x to 20x LoRA while the interesting gaps (ours vs LoRA) are a few percent.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    rows = result["rows"]
    modes = [m for m in MODES if m in rows[0]["ms"]]
    labels = [f"{row['family']} {row['d_in']}->{row['d_out']}\n{row['tokens']} tok, r={row['r']}" for row in rows]
    names = {"frozen": "frozen Linear", "lora": "LoRA (peft)", "peft_hra": "HRA (peft)", "ours": "HRA (ours)"}
    colors = {"frozen": "#9e9e9e", "lora": "#1f77b4", "peft_hra": "#d62728", "ours": "#2ca02c"}
    width = 0.8 / len(modes)
    fig, ax = plt.subplots(figsize=(max(10, 1.1 * len(rows)), 5.5))
    ratios_all = []
    for i, mode in enumerate(modes):
        xs = [j + (i - (len(modes) - 1) / 2) * width for j in range(len(rows))]
        ratios = [row["ms"][mode] / row["ms"]["lora"] for row in rows]
        ratios_all += ratios
        bars = ax.bar(xs, ratios, width, label=names[mode], color=colors[mode])
        box = {"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.85}
        ax.bar_label(bars, labels=[f"{q:.2f}" for q in ratios], fontsize=7, padding=2, bbox=box, zorder=3, rotation=90)
    ax.axhline(
        TARGET_TIME_VS_LORA, color="black", linestyle="--", linewidth=1, label=f"target: ours <= {TARGET_TIME_VS_LORA}x"
    )
    ax.set_yscale("log")
    top = max(ratios_all) * 2.2
    ticks = [t for t in (0.25, 0.5, 0.75, 1, 1.5, 2, 5, 10, 20, 50, 100) if min(ratios_all) * 0.8 <= t <= top]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_yticklabels([f"{t:g}x" for t in ticks])
    ax.set_ylim(min(ratios_all) * 0.8, top)
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel(f"adapted linear: model, d_in -> d_out, tokens per image, rank; batch {result['batch']}")
    ax.set_ylabel("forward+backward time relative to LoRA (log scale; lower is better)")
    threads = f"{result['threads']} thread" + ("s" if result["threads"] != 1 else "")
    where = f"CPU, {threads}" if result["device"] == "cpu" else result["device_name"]
    clock = ", CPU time" if result["clock"] == "cpu" else ""
    ax.set_title(f"One adapted layer, {result['dtype']}: {where}{clock}, torch {result['torch']}")
    ax.legend(loc="upper left", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ranks(text: str) -> list[int]:
    return [int(r) for r in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["sd15"], choices=[*SHAPES, "all"], help="which models' linears")
    parser.add_argument("--ranks", type=ranks, default=[8], help="comma-separated ranks, e.g. 8,32")
    parser.add_argument("--rounds", type=int, default=15, help="round-robin rounds; the median over them is reported")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--batch", type=int, default=2, help="images per call (2: a CFG pair or a small train batch)")
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
    parser.add_argument(
        "--profile", type=int, metavar="CALLS", help="instead of timing: profile CALLS calls of each cell (CPU ops)"
    )
    parser.add_argument("--json", metavar="OUT", help="write the raw numbers here")
    parser.add_argument("--markdown", metavar="OUT", help="write the tables and verdicts here")
    parser.add_argument("--plot", metavar="OUT.png", help="bar chart of the ratios against LoRA (needs --modes lora)")
    args = parser.parse_args()
    args.shapes = list(SHAPES) if "all" in args.shapes else args.shapes
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.profile:
        print(profile_ops(args))
        return

    result = run(args)
    threads = f"{result['threads']} thread" + ("s" if result["threads"] != 1 else "")
    where = f"{args.device}, {threads}" if args.device == "cpu" else result["device_name"]
    start, end = result["load_avg_1min"]
    result["pass"] = verdicts(result)
    text = [
        f"One layer forward+backward, median {args.clock} ms over {args.rounds} rounds; batch {args.batch}, "
        f"{args.dtype}, {where}, torch {torch.__version__}",
        markdown(result, "ms"),
        f"Peak memory one call allocates (MiB; {result['memory']})",
        markdown(result, "mib"),
        f"machine load average (1 min) at start / end: {start:.1f} / {end:.1f} on {os.cpu_count()} cores",
    ]
    for name, label, *_ in TARGETS:
        verdict = result["pass"][name]
        if verdict["pass"] is not None:
            misses = f" (misses: {'; '.join(verdict['misses'])})" if verdict["misses"] else ""
            text.append(f"target {label} in every cell: {'PASS' if verdict['pass'] else 'FAIL'}{misses}")
    print("\n\n" + "\n\n".join(text))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.markdown:
        Path(args.markdown).write_text("\n\n".join(text) + "\n")
    if args.plot:
        plot(result, args.plot)


if __name__ == "__main__":
    main()
