"""One training step of the real SD1.5 (or SDXL) UNet, random weights: frozen, LoRA r=8, peft HRA r=8, our HRA r=8.

Why the whole UNet: the layer benchmark (hra_layer.py) isolates the adapter, this one shows what a user pays per
training step, and peak memory, which only a full model shows (peft's HRA keeps dense d x d matrices per layer).

    python benchmarks/unet_step.py                                  # CPU: 256 px, batch 1, float32
    python benchmarks/unet_step.py --resolution 512 --dtype bf16    # a GPU
    python benchmarks/unet_step.py --modes lora ours --steps 5 --json unet.json
    python benchmarks/unet_step.py --threads 1 --clock cpu          # a CPU shared with other jobs
    python benchmarks/unet_step.py --arch sdxl --resolution 1024 --dtype bf16   # SDXL on a GPU

A step: grads set to None, forward at a random timestep with random text states (77 x 768), loss = MSE to a random
target, backward. No optimizer update (the adapters' update is negligible next to the UNet). In "frozen" mode the
UNet has no trainable parameter and the latents require grad, so backward runs through the whole network; in the
adapter modes only the adapters are trainable and the latents do not require grad, as in real training.

Each mode runs in its own subprocess, so that its peak memory is its own: on CPU the peak RSS of that process
(ru_maxrss: interpreter, libraries, the 3.4 GB float32 UNet, activations and autograd buffers, nothing subtracted);
on CUDA torch.cuda.max_memory_allocated over the timed steps (weights included). The subprocesses stay alive
together and take their steps in turn (rotating order), so that a busy machine slows every mode alike. peft's HRA
(2.4x LoRA's time and memory on CPU) runs alone afterwards, so its ratio to LoRA is not interleaved.
CPU memory needed: about 4.5 GiB per mode alive at once (13.5 GiB for the three fast modes), then about 10.5 GiB for
peft's HRA; a mode that does not fit in the RAM free at its start is skipped, with a warning.

Separate processes hold separately allocated models, and where a model lands in memory moved its step time by
+-4% on the development CPU, even between two identical copies. So the time target is judged on a paired run: ONE
UNet carrying both adapters (peft's LoRA around each target layer, ours around the frozen Linear inside it), the
steps alternating between them (the other one disabled), and the median of the per-pair ratios. --no-paired skips it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hra_diffusion.cli import HelpFormatter  # noqa: E402
from hra_diffusion.testing.tiny import SD15_UNET_CONFIG, SDXL_UNET_CONFIG  # noqa: E402

MODES = ["frozen", "lora", "hra_peft", "ours"]
# UNet config, text-state width, pooled width (SDXL's added "text_time" conditioning), label, memory vs SD1.5
ARCHS = {
    "sd15": (SD15_UNET_CONFIG, 768, None, "SD1.5", 1.0),
    "sdxl": (SDXL_UNET_CONFIG, 2048, 1280, "SDXL", 3.0),
}
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TARGET_TIME_VS_LORA = 1.05
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_unet(mode: str, r: int, device: str, dtype: torch.dtype, arch: str = "sd15") -> torch.nn.Module:
    """The UNet with random weights, base frozen, the adapter of ``mode`` on q/k/v/out of every attention."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**ARCHS[arch][0]).to(device=device, dtype=dtype).train()
    unet.requires_grad_(False)
    if mode == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=TARGETS)
        inject_adapter_in_model(config, unet)
    elif mode == "hra_peft":
        from peft import HRAConfig as PeftHRAConfig
        from peft import inject_adapter_in_model

        inject_adapter_in_model(PeftHRAConfig(r=r, target_modules=TARGETS), unet)
    elif mode == "ours":
        from hra_diffusion import HRAConfig, add_hra

        add_hra(unet, HRAConfig(r=r, target_modules=tuple(TARGETS)))
    elif mode == "paired":  # LoRA around each target layer, our HRA around the frozen Linear inside it
        from peft import LoraConfig, inject_adapter_in_model

        from hra_diffusion import HRAConfig, add_hra

        inject_adapter_in_model(LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=TARGETS), unet)
        add_hra(unet, HRAConfig(r=r, target_modules=r".*(to_q|to_k|to_v|to_out\.0)\.base_layer"))
        for name, param in unet.named_parameters():  # add_hra froze everything else, LoRA included
            param.requires_grad_("lora_" in name or "hra_u" in name)
    elif mode != "frozen":
        raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
    return unet


def paired_switch(unet: torch.nn.Module) -> Callable[[str], None]:
    """For the paired model: a function that makes "lora" or "ours" the only adapter computing.

    The disabled one forwards straight to its base layer, a few microseconds of Python per layer in both modes.
    """
    from peft.tuners.lora.layer import LoraLayer

    from hra_diffusion import hra_layers

    loras = [m for m in unet.modules() if isinstance(m, LoraLayer)]
    ours = [layer for _, layer in hra_layers(unet)]

    def switch(adapter: str) -> None:
        for m in loras:
            m._disable_adapters = adapter != "lora"
        for layer in ours:
            layer.enabled = adapter == "ours"

    return switch


def worker(args: argparse.Namespace) -> None:
    """Runs in the subprocess: builds the model, says READY, then obeys the parent's commands on stdin.

    "step": one step, answers "TIME <seconds>". "reset_peak": after warm-up (CUDA only; ru_maxrss cannot be reset),
    answers "OK". "peak": answers "RESULT <json>" (peak memory, trainable parameters) and exits.
    """
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # the "keep in float32" notice on .to(dtype), once per worker
    device, dtype = args.device, DTYPES[args.dtype]
    cuda = device.startswith("cuda")
    unet = build_unet(args.worker, args.r, device, dtype, args.arch)
    _, text_width, pooled_width, _, _ = ARCHS[args.arch]
    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    latent = args.resolution // 8
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(args.batch, 4, latent, latent, generator=gen).to(device, dtype)
    target = torch.randn(args.batch, 4, latent, latent, generator=gen).to(device, dtype)
    text = torch.randn(args.batch, 77, text_width, generator=gen).to(device, dtype)
    timesteps = torch.randint(0, 1000, (args.batch,), generator=gen).to(device)
    added = None
    if pooled_width:  # SDXL: pooled text embedding and size conditioning (original, crop, target)
        size = [args.resolution, args.resolution, 0, 0, args.resolution, args.resolution]
        added = {
            "text_embeds": torch.randn(args.batch, pooled_width, generator=gen).to(device, dtype),
            "time_ids": torch.tensor([size] * args.batch, device=device, dtype=dtype),
        }
    if args.worker == "frozen":
        latents.requires_grad_(True)
    params = [p for p in unet.parameters() if p.requires_grad]
    switch = paired_switch(unet) if args.worker == "paired" else None

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
        out = unet(latents, timesteps, encoder_hidden_states=text, added_cond_kwargs=added).sample
        torch.nn.functional.mse_loss(out.float(), target.float()).backward()
        if cuda:
            torch.cuda.synchronize()
        return clock() - start

    print("READY", flush=True)
    for command in sys.stdin:
        if command.startswith("step"):
            print(f"TIME {step(command[4:].strip())}", flush=True)
        elif command.strip() == "reset_peak":
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            print("OK", flush=True)
        elif command.strip() == "peak":
            if cuda:
                peak = torch.cuda.max_memory_allocated() / 2**30
            else:
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
            print("RESULT " + json.dumps({"peak_gib": peak, "trainable": trainable}), flush=True)
            return


class Worker:
    """The parent's handle on one mode's subprocess."""

    def __init__(self, mode: str, args: argparse.Namespace) -> None:
        options = {"--worker": mode, "--device": args.device, "--dtype": args.dtype, "--resolution": args.resolution}
        options["--arch"] = args.arch
        options.update(
            {"--batch": args.batch, "--r": args.r, "--threads": torch.get_num_threads(), "--clock": args.clock}
        )
        cmd = [sys.executable, __file__] + [str(item) for pair in options.items() for item in pair]
        self.mode = mode
        self.times: list[float] = []
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ask(None, "READY")

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


def memory_needed_gib(mode: str, args: argparse.Namespace) -> float:
    """Rough peak RSS of a CPU worker, float32: 4.4 GiB at 256 px batch 1, 6.7 at 512; peft's HRA 10.3 at 256 px
    (SD1.5; SDXL's UNet is three times larger)."""
    scale = args.batch * (args.resolution / 256) ** 2
    return ARCHS[args.arch][4] * (11.0 + 1.5 * scale if mode == "hra_peft" else 4.2 + 0.6 * scale)


def memory_available_gib() -> float:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) / 2**20


def affordable(modes: list[str], args: argparse.Namespace, warn: bool = True) -> list[str]:
    """The modes that fit in the memory free now, together; the others are left out, with a warning if ``warn`` (the
    OOM killer would pick a victim among every process on the machine, not only this benchmark)."""
    if args.device.startswith("cuda") or args.no_memory_check or not os.path.exists("/proc/meminfo"):
        return modes
    kept, free = [], memory_available_gib()
    for mode in modes:
        need = memory_needed_gib(mode, args)
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
    workers = [Worker(mode, args) for mode in modes]
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
    """LoRA against ours on ONE UNet, steps alternating (LoRA, ours), (ours, LoRA), ...

    Separate processes hold separately allocated copies of the 3.4 GB model, and where those land in memory moved a
    mode's step time by +-4% here, even between two identical copies (measured). One model carrying both adapters
    removes that, so the median of the per-pair ratios is the time figure the target is judged on.
    """
    w = Worker("paired", args)
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


def markdown(results: dict[str, dict], cuda: bool) -> str:
    mem = "peak CUDA memory (GiB)" if cuda else "peak RSS (GiB)"
    head = ["mode", "trainable params", "s / step (median)", "steps", mem, "time / LoRA", "memory / LoRA"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    names = {
        "frozen": "frozen (input grads only)",
        "lora": "LoRA r=8 (peft)",
        "hra_peft": "HRA r=8 (peft)",
        "ours": "HRA r=8 (ours)",
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    parser.add_argument("--arch", default="sd15", choices=sorted(ARCHS), help="the UNet architecture")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode, after --warmup")
    parser.add_argument("--peft-hra-steps", type=int, default=2, help="timed steps for peft's HRA (slow on CPU)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--resolution", type=int, default=256, help="pixels; latents are resolution / 8")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="wall: elapsed time (the default); cpu: each worker's CPU time, which a busy machine inflates far less "
        "(use with --threads 1, CPU only)",
    )
    parser.add_argument("--threads", type=int, help="CPU threads per mode (default: torch's, one per core)")
    parser.add_argument("--json", metavar="OUT", help="write the raw numbers here")
    parser.add_argument(
        "--no-memory-check", action="store_true", help="start every mode even if free RAM looks too small for it"
    )
    parser.add_argument(
        "--no-paired",
        dest="paired",
        action="store_false",
        help="skip the paired LoRA-vs-ours timing on one UNet (the time target then uses the separate processes)",
    )
    parser.add_argument("--worker", choices=MODES + ["paired"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.worker:
        worker(args)
        return
    cuda = args.device.startswith("cuda")
    # peft's HRA is slow and large: it runs alone, after them, with fewer steps
    load_start = os.getloadavg()[0]
    fast, results = [m for m in args.modes if m != "hra_peft"], {}
    while fast:  # interleaved in groups that fit in memory together (one group on a GPU or a large machine)
        group = affordable(fast, args, warn=False)
        if not group:
            affordable(fast, args)  # says why each one left is skipped
            break
        results.update(run_interleaved(group, args.steps, args))
        fast = [m for m in fast if m not in group]
    if "hra_peft" in args.modes and affordable(["hra_peft"], args):
        results.update(run_interleaved(["hra_peft"], args.peft_hra_steps, args))
    results = {mode: results[mode] for mode in args.modes if mode in results}
    paired = None
    if args.paired and {"lora", "ours"} <= set(args.modes) and affordable(["paired"], args):
        paired = run_paired(args.steps, args)
    threads = torch.get_num_threads()
    where = torch.cuda.get_device_name() if cuda else f"CPU, {threads} thread" + ("s" if threads != 1 else "")
    latent = args.resolution // 8
    print(
        f"\n{ARCHS[args.arch][3]} UNet training step (forward+backward, {args.clock} time), {args.resolution} px "
        f"({latent}x{latent} latents), batch {args.batch}, {args.dtype}, {where}, torch {torch.__version__}\n"
    )
    print(markdown(results, cuda))
    load = [load_start, os.getloadavg()[0]]
    print(f"\nmachine load average (1 min) at start / end: {load[0]:.1f} / {load[1]:.1f} on {os.cpu_count()} cores")
    if paired:
        lora_s, ours_s = (statistics.median(paired["times"][a]) for a in ("lora", "ours"))
        print(
            f"\npaired, one UNet carrying both adapters, {len(paired['ratios'])} alternating pairs: LoRA {lora_s:.2f} "
            f"s/step, ours {ours_s:.2f} s/step, ours / LoRA {paired['ratio']:.3f} (median of the per-pair ratios)"
        )
    if {"ours", "lora"} <= results.keys():
        ours, lora = results["ours"], results["lora"]
        separate = statistics.median(ours["times"]) / statistics.median(lora["times"])
        time_ratio, how = (paired["ratio"], "paired") if paired else (separate, "separate processes")
        mem_ok = ours["peak_gib"] <= lora["peak_gib"]
        time_ok = time_ratio <= TARGET_TIME_VS_LORA
        print(
            f"\ntarget ours <= {TARGET_TIME_VS_LORA}x LoRA time: {'PASS' if time_ok else 'FAIL'} ({time_ratio:.3f}x "
            f"{how}; separate processes: {separate:.3f}x)"
        )
        print(
            f"target ours <= LoRA peak memory: {'PASS' if mem_ok else 'FAIL'} "
            f"({ours['peak_gib']:.2f} vs {lora['peak_gib']:.2f} GiB)"
        )
    if args.json:
        meta = {
            "device": args.device,
            "device_name": where,
            "arch": args.arch,
            "torch": torch.__version__,
            "dtype": args.dtype,
            "resolution": args.resolution,
            "batch": args.batch,
            "r": args.r,
            "clock": args.clock,
            "load_avg_1min": load,  # above the core count: other processes competed
        }
        Path(args.json).write_text(json.dumps({**meta, "results": results, "paired": paired}, indent=2))


if __name__ == "__main__":
    main()
