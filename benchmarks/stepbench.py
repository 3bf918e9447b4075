"""The machinery unet_step.py and transformer_step.py share: one training step of a whole denoiser per mode, each
mode in its own worker process, the modes taking their steps in turn, and a paired run on one model.

Why workers: each mode's peak memory over the timed steps is then its own: on CPU the peak RSS of that process
(interpreter, libraries, weights, activations and autograd buffers, nothing subtracted), on CUDA
torch.cuda.max_memory_allocated (weights included). The workers stay alive together and take their steps in turn
(rotating order), so that a busy machine slows every mode alike; peft's HRA (slow and large) runs alone afterwards.
A mode that does not fit in the memory free at its start is left for a later group, or skipped with a warning.

Why paired: separately allocated copies of a multi-GB model land differently in memory, and that moved a mode's step
time by +-4% on the development CPU even between two identical copies. So the time target is judged on ONE model
carrying both adapters (peft's LoRA around each target layer, ours around the frozen Linear inside it), the steps
alternating between them (the other one disabled), and the median of the per-pair ratios.

A script defines its architectures (``Arch``) and options and calls ``main``; a worker is the same script, run with
the parent's command line plus ``--worker MODE``, so it builds exactly the parent's model.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hra_diffusion.cli import HelpFormatter  # noqa: E402

MODES = ["frozen", "lora", "hra_peft", "ours"]
TARGET_TIME_VS_LORA = 1.05
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Arch:
    """What a benchmark needs to know of one denoiser architecture."""

    label: str  # "SD1.5 UNet"
    build: Callable[[argparse.Namespace], nn.Module]  # random weights, float32, on the current default device
    inputs: Callable[[argparse.Namespace, torch.Generator], dict[str, Tensor]]  # forward kwargs, on CPU
    latents: str  # the input the output matches in shape; it requires grad in "frozen" mode
    targets: tuple[str, ...]  # the adapted layers (suffix match)
    memory_gib: Callable[[str, argparse.Namespace], float]  # rough peak memory of a worker of a mode, GiB
    setting: Callable[[argparse.Namespace], str]  # the resolution etc., for the report's title


def adapt(model: nn.Module, mode: str, r: int, targets: tuple[str, ...]) -> None:
    """Freeze ``model`` and put the adapter of ``mode`` on ``targets``; "paired" puts peft's LoRA around each target
    layer and our HRA around the frozen Linear inside it, both trainable."""
    model.requires_grad_(False)
    if mode in ("lora", "paired"):
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=list(targets))
        inject_adapter_in_model(config, model)
    if mode == "hra_peft":
        from peft import HRAConfig as PeftHRAConfig
        from peft import inject_adapter_in_model

        inject_adapter_in_model(PeftHRAConfig(r=r, target_modules=list(targets)), model)
    elif mode == "ours":
        from hra_diffusion import HRAConfig, add_hra

        add_hra(model, HRAConfig(r=r, target_modules=targets))
    elif mode == "paired":
        from hra_diffusion import HRAConfig, add_hra

        inner = r".*\.(" + "|".join(re.escape(t) for t in targets) + r")\.base_layer"
        add_hra(model, HRAConfig(r=r, target_modules=inner))
        for name, param in model.named_parameters():  # add_hra froze everything else, LoRA included
            param.requires_grad_("lora_" in name or "hra_u" in name)
    elif mode not in ("frozen", "lora"):
        raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")


def paired_switch(model: nn.Module) -> Callable[[str], None]:
    """For the paired model: a function that makes "lora" or "ours" the only adapter computing.

    The disabled one forwards straight to its base layer, a few microseconds of Python per layer in both modes.
    """
    from peft.tuners.lora.layer import LoraLayer

    from hra_diffusion import hra_layers

    loras = [m for m in model.modules() if isinstance(m, LoraLayer)]
    ours = [layer for _, layer in hra_layers(model)]

    def switch(adapter: str) -> None:
        for m in loras:
            m._disable_adapters = adapter != "lora"
        for layer in ours:
            layer.enabled = adapter == "ours"

    return switch


def to_device(value: Tensor | dict, device: str, dtype: torch.dtype) -> Tensor | dict:
    """Inputs (possibly nested, like SDXL's added_cond_kwargs) onto ``device``, floating ones in ``dtype``."""
    if isinstance(value, dict):
        return {k: to_device(v, device, dtype) for k, v in value.items()}
    return value.to(device, dtype) if value.is_floating_point() else value.to(device)


def worker(args: argparse.Namespace, arch: Arch) -> None:
    """Runs in the subprocess: builds the model, says READY, then obeys the parent's commands on stdin.

    "step": one step, answers "TIME <seconds>". "reset_peak": after warm-up, answers "OK". "peak": answers
    "RESULT <json>" (peak memory, trainable parameters) and exits.
    """
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # the "keep in float32" notice on .to(dtype), once per worker
    device, dtype = args.device, DTYPES[args.dtype]
    cuda = device.startswith("cuda")
    torch.manual_seed(0)
    with torch.device(device):  # random init where the model runs: on a GPU, seconds instead of minutes
        model = arch.build(args)
    model = model.to(device=device, dtype=dtype).train()  # .to(device) too: buffers made from numpy stay on CPU
    adapt(model, args.worker, args.r, arch.targets)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    gen = torch.Generator().manual_seed(0)
    inputs = to_device(arch.inputs(args, gen), device, dtype)
    latents = inputs[arch.latents]
    target = torch.randn(latents.shape, generator=gen).to(device, dtype)
    if args.worker == "frozen":
        latents.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    switch = paired_switch(model) if args.worker == "paired" else None
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    def step(adapter: str) -> float:
        if switch:
            switch(adapter)
        for p in params:
            p.grad = None
        latents.grad = None
        if cuda:
            torch.cuda.synchronize()
        start = clock()
        out = model(**inputs).sample
        torch.nn.functional.mse_loss(out.float(), target.float()).backward()
        if cuda:
            torch.cuda.synchronize()
        return clock() - start

    print("READY", flush=True)
    for command in sys.stdin:
        if command.startswith("step"):
            print(f"TIME {step(command[4:].strip())}", flush=True)
        elif command.strip() == "reset_peak":
            reset_peak(cuda)
            print("OK", flush=True)
        elif command.strip() == "peak":
            print("RESULT " + json.dumps({"peak_gib": peak_gib(cuda), "trainable": trainable}), flush=True)
            return


def reset_peak(cuda: bool) -> None:
    """Start the peak memory anew after warm-up, so it is the training steps' and not the model build's (building
    SD3's transformer on CPU peaks above its training steps). On CPU: Linux's clear_refs resets the RSS high-water
    mark; where that is refused, the peak keeps the build."""
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_gib(cuda: bool) -> float:
    if cuda:
        return torch.cuda.max_memory_allocated() / 2**30
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Worker:
    """The parent's handle on one mode's subprocess: the same script and command line, plus ``--worker MODE``."""

    def __init__(self, mode: str) -> None:
        """Starts the worker; ``ready`` waits until it has built its model (so that several build at once)."""
        threads = ["--threads", str(torch.get_num_threads())]  # the parent's, so both follow --threads alike
        cmd = [sys.executable, sys.argv[0], *sys.argv[1:], *threads, "--worker", mode]
        self.mode = mode
        self.times: list[float] = []
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ready(self) -> Worker:
        self.ask(None, "READY")
        return self

    def ask(self, command: str | None, answer: str) -> str:
        if command is not None:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(answer):
                return line[len(answer) :].strip()
        raise RuntimeError(f"mode {self.mode}: the worker died (exit code {self.proc.wait()}); see its stderr above")

    def step(self, timed: bool = True, adapter: str = "") -> float:
        seconds = float(self.ask(f"step {adapter}", "TIME "))
        if timed:
            self.times.append(seconds)
        return seconds

    def finish(self) -> dict:
        result = json.loads(self.ask("peak", "RESULT "))
        self.proc.wait()
        median = statistics.median(self.times)
        print(f"{self.mode}: {median:.2f} s/step, peak {result['peak_gib']:.2f} GiB", file=sys.stderr)
        return {"mode": self.mode, "times": self.times, **result}


def memory_available_gib(device: str) -> float | None:
    """Free memory where the workers will run: the GPU's, or the machine's RAM (None where it cannot be read)."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0] / 2**30
    if not os.path.exists("/proc/meminfo"):
        return None
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) / 2**20


def affordable(modes: list[str], args: argparse.Namespace, arch: Arch, warn: bool = True) -> list[str]:
    """The modes that fit in the memory free now, together; the others are left out, with a warning if ``warn``
    (on CPU the OOM killer would pick a victim among every process on the machine, not only this benchmark)."""
    free = None if args.no_memory_check else memory_available_gib(args.device)
    if free is None:
        return modes
    kept = []
    for mode in modes:
        need = arch.memory_gib(mode, args)
        if need + 1.0 <= free:  # and leave a GiB to everyone else
            kept.append(mode)
            free -= need
        elif warn:
            print(
                f"skipping {mode}: needs about {need:.1f} GiB, {free:.1f} GiB available now "
                "(--no-memory-check to run it anyway)",
                file=sys.stderr,
            )
    return kept


def run_interleaved(modes: list[str], steps: int, args: argparse.Namespace) -> dict[str, dict]:
    """All ``modes`` alive at once, one step each in turn (rotating order), so machine noise hits them alike."""
    workers = [w.ready() for w in [Worker(mode) for mode in modes]]
    for _ in range(args.warmup):
        for w in workers:
            w.step(timed=False)
    for w in workers:
        w.ask("reset_peak", "OK")
    for i in range(steps):
        for w in workers[i % len(workers) :] + workers[: i % len(workers)]:
            w.step()
        print(f"step {i + 1}/{steps}: " + ", ".join(f"{w.mode} {w.times[-1]:.2f} s" for w in workers), file=sys.stderr)
    return {w.mode: w.finish() for w in workers}


def run_paired(steps: int, args: argparse.Namespace) -> dict:
    """LoRA against ours on ONE model, steps alternating (LoRA, ours), (ours, LoRA), ..."""
    w = Worker("paired").ready()
    for adapter in ("lora", "ours") * args.warmup:
        w.step(timed=False, adapter=adapter)
    times: dict[str, list[float]] = {"lora": [], "ours": []}
    for i in range(steps):
        for adapter in ("lora", "ours") if i % 2 == 0 else ("ours", "lora"):
            times[adapter].append(w.step(timed=False, adapter=adapter))
        print(
            f"paired step {i + 1}/{steps}: lora {times['lora'][-1]:.2f} s, ours {times['ours'][-1]:.2f} s",
            file=sys.stderr,
        )
    w.ask("peak", "RESULT ")
    w.proc.wait()
    ratios = [o / lo for lo, o in zip(times["lora"], times["ours"])]
    return {"times": times, "ratios": ratios, "ratio": statistics.median(ratios)}


def markdown(results: dict[str, dict], cuda: bool, r: int) -> str:
    mem = "peak CUDA memory (GiB)" if cuda else "peak RSS (GiB)"
    head = ["mode", "trainable params", "s / step (median)", "steps", mem, "time / LoRA", "memory / LoRA"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    names = {
        "frozen": "frozen (input grads only)",
        "lora": f"LoRA r={r} (peft)",
        "hra_peft": f"HRA r={r} (peft)",
        "ours": f"HRA r={r} (ours)",
    }
    lora = results.get("lora")
    for mode, res in results.items():
        t = statistics.median(res["times"])
        row = [names[mode], f"{res['trainable']:,}", f"{t:.2f}", str(len(res["times"])), f"{res['peak_gib']:.2f}"]
        if lora:
            row += [f"{t / statistics.median(lora['times']):.3f}", f"{res['peak_gib'] / lora['peak_gib']:.3f}"]
        else:
            row += ["-", "-"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def parser(description: str, archs: dict[str, Arch], default_arch: str) -> argparse.ArgumentParser:
    """The options every step benchmark has; a script adds its own (resolution, depth, ...) before ``main``."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    p.add_argument("--arch", default=default_arch, choices=sorted(archs), help="the architecture")
    p.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    p.add_argument("--steps", type=int, default=5, help="timed steps per mode, after --warmup")
    p.add_argument("--peft-hra-steps", type=int, default=2, help="timed steps for peft's HRA (slow on CPU)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--r", type=int, default=8)
    p.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="wall: elapsed time (the default); cpu: each worker's CPU time, which a busy machine inflates far less "
        "(use with --threads 1, CPU only)",
    )
    p.add_argument("--threads", type=int, help="CPU threads per mode (default: torch's, one per core)")
    p.add_argument("--json", metavar="OUT", help="write the raw numbers here")
    p.add_argument("--markdown", metavar="OUT", help="write the report (table, ratios, verdicts) here")
    p.add_argument(
        "--no-memory-check", action="store_true", help="start every mode even if the free memory looks too small for it"
    )
    p.add_argument(
        "--no-paired",
        dest="paired",
        action="store_false",
        help="skip the paired LoRA-vs-ours timing on one model (the time target then uses the separate processes)",
    )
    p.add_argument("--worker", choices=MODES + ["paired"], help=argparse.SUPPRESS)
    return p


def main(args: argparse.Namespace, archs: dict[str, Arch]) -> None:
    """Run the benchmark the parsed ``args`` describe (or, with --worker, be one of its workers)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    arch = archs[args.arch]
    if args.worker:
        worker(args, arch)
        return
    cuda = args.device.startswith("cuda")
    load_start = os.getloadavg()[0]
    fast, results = [m for m in args.modes if m != "hra_peft"], {}
    while fast:  # interleaved in groups that fit in memory together (one group on a large GPU or machine)
        group = affordable(fast, args, arch, warn=False)
        if not group:
            affordable(fast, args, arch)  # says why each one left is skipped
            break
        results.update(run_interleaved(group, args.steps, args))
        fast = [m for m in fast if m not in group]
    if "hra_peft" in args.modes and affordable(["hra_peft"], args, arch):
        results.update(run_interleaved(["hra_peft"], args.peft_hra_steps, args))
    results = {mode: results[mode] for mode in args.modes if mode in results}
    paired = None
    if args.paired and {"lora", "ours"} <= set(args.modes) and affordable(["paired"], args, arch):
        paired = run_paired(args.steps, args)
    threads = torch.get_num_threads()
    where = torch.cuda.get_device_name() if cuda else f"CPU, {threads} thread" + ("s" if threads != 1 else "")
    load = [load_start, os.getloadavg()[0]]
    text = [
        f"{arch.label} training step (forward+backward, {args.clock} time), {arch.setting(args)}, batch {args.batch}, "
        f"{args.dtype}, {where}, torch {torch.__version__}",
        markdown(results, cuda, args.r),
        f"machine load average (1 min) at start / end: {load[0]:.1f} / {load[1]:.1f} on {os.cpu_count()} cores",
    ]
    if paired:
        lora_s, ours_s = (statistics.median(paired["times"][a]) for a in ("lora", "ours"))
        text.append(
            f"paired, one model carrying both adapters, {len(paired['ratios'])} alternating pairs: LoRA {lora_s:.2f} "
            f"s/step, ours {ours_s:.2f} s/step, ours / LoRA {paired['ratio']:.3f} (median of the per-pair ratios)"
        )
    verdict = {}
    if {"ours", "lora"} <= results.keys():
        ours, lora = results["ours"], results["lora"]
        separate = statistics.median(ours["times"]) / statistics.median(lora["times"])
        time_ratio, how = (paired["ratio"], "paired") if paired else (separate, "separate processes")
        verdict = {
            "time_vs_lora": time_ratio <= TARGET_TIME_VS_LORA,
            "memory_vs_lora": ours["peak_gib"] <= lora["peak_gib"],
        }
        text.append(
            f"target ours <= {TARGET_TIME_VS_LORA}x LoRA time: {'PASS' if verdict['time_vs_lora'] else 'FAIL'} "
            f"({time_ratio:.3f}x {how}; separate processes: {separate:.3f}x)\n"
            f"target ours <= LoRA peak memory: {'PASS' if verdict['memory_vs_lora'] else 'FAIL'} "
            f"({ours['peak_gib']:.2f} vs {lora['peak_gib']:.2f} GiB)"
        )
    print("\n\n" + "\n\n".join(text))
    if args.markdown:
        Path(args.markdown).write_text("\n\n".join(text) + "\n")
    if args.json:
        skip = {"json", "markdown", "worker", "modes", "no_memory_check", "paired"}
        meta = {k: v for k, v in vars(args).items() if k not in skip}
        meta.update({"label": arch.label, "device_name": where, "torch": torch.__version__, "load_avg_1min": load})
        out = {**meta, "results": results, "paired": paired, "pass": verdict}
        Path(args.json).write_text(json.dumps(out, indent=2))
