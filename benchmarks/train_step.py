"""Steps/s and peak memory of the REAL training loop (hra_diffusion.train.train) on the SD1.5 UNet: HRA vs LoRA.

Why through the loop and not a bare forward/backward (that is unet_step.py): what a user pays per step also includes
the optimizer update, gradient clipping, the NaN guard, the per-step reseeding and all-reduce, logging and the
progress file. Both adapters go through the same harness; only the adapter differs:

- hra:  add_hra(unet, HRAConfig(r=8)) on to_q/to_k/to_v/to_out.0, the DreamBooth default;
- lora: unet.add_adapter(peft LoraConfig(r=8)) on the same layers, as diffusers' train_dreambooth_lora.py does.

The UNet has the real SD1.5 architecture with random weights (no hub access); random latents and text states stand
in for the frozen VAE and text encoder, and the loss regresses the noise at a random timestep.

    python benchmarks/train_step.py                                   # CPU: 256 px, batch 1, fp32 (~3 min idle)
    python benchmarks/train_step.py --resolution 512 --mixed_precision bf16 --steps 20   # a GPU
    python benchmarks/train_step.py --json train_step.json

Each mode runs in its own process, so its peak memory is its own: on CPU the process's peak RSS (ru_maxrss:
interpreter, libraries, the float32 UNet, activations, everything); on CUDA torch.cuda.max_memory_allocated. The two
processes live side by side and take their training steps in turn (a token file passed at the start of each step),
so a machine whose load drifts slows both alike. A step's time runs from the start of its loss to the start of the
next one: forward, backward, clipping, optimizer, logging and fetching the next batch; the median over the timed
steps is reported.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hra_diffusion.cli import HelpFormatter  # noqa: E402
from hra_diffusion.io import atomic_write  # noqa: E402
from hra_diffusion.testing.tiny import SD15_UNET_CONFIG  # noqa: E402

MODES = ("hra", "lora")
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TARGET_SPEED = 0.95  # HRA steps/s >= 0.95 x LoRA's


class RandomLatents(torch.utils.data.Dataset):
    """Fixed random (latents, text states) pairs: what the VAE and the frozen text encoder would hand the UNet."""

    def __init__(self, n: int, latent_size: int) -> None:
        gen = torch.Generator().manual_seed(0)
        self.items = [
            {
                "latents": torch.randn(4, latent_size, latent_size, generator=gen),
                "hidden": torch.randn(77, 768, generator=gen),
            }
            for _ in range(n)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


class Turns:
    """Step-level turn taking between the worker processes: one small file says whose turn it is ("hra", "lora"),
    or "done:<mode>" once a worker has left, after which the other runs on alone."""

    def __init__(self, path: Path, me: str) -> None:
        self.path, self.me = path, me
        self.started: float | None = None
        self.durations: list[float] = []

    def begin_step(self) -> None:
        """End the previous step (time it, hand the turn over), then wait for this process's next turn."""
        if self.started is not None:
            self.durations.append(time.perf_counter() - self.started)
            if not self._holder().startswith("done:"):
                self._write(next(m for m in MODES if m != self.me))
        while not (self._holder() == self.me or self._holder().startswith("done:")):
            time.sleep(0.001)
        self.started = time.perf_counter()

    def finish(self) -> None:
        self._write(f"done:{self.me}")

    def _holder(self) -> str:
        return self.path.read_text()

    def _write(self, text: str) -> None:
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))  # never read half written by the other


def worker(args: argparse.Namespace) -> dict:
    """One mode, in this process: build, train warmup + steps (+1 to close the last timed step) through train()."""
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from hra_diffusion import HRAConfig, add_hra
    from hra_diffusion.families.objectives import DDPMObjective
    from hra_diffusion.train import TrainSettings, TrainSpec, train
    from hra_diffusion.train.checkpointing import trainable_state
    from hra_diffusion.train.events import ProgressFile
    from hra_diffusion.train.runtime import make_accelerator

    out = Path(args.out_dir) / args.mode
    cfg = TrainSettings(
        pretrained_model_name_or_path="SD1.5 UNet config, random weights",
        output_dir=str(out),
        seed=0,
        train_batch_size=args.batch,
        max_train_steps=args.warmup + args.steps + 1,
        learning_rate=1e-4,
        checkpointing_steps=10**9,
        validation_steps=None,
        report_to="none",
        mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    accelerator = make_accelerator(cfg)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    unet.requires_grad_(False)
    if args.mode == "hra":
        add_hra(unet, HRAConfig(r=args.r, target_modules=tuple(TARGETS)))
    else:
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=args.r, lora_alpha=args.r, init_lora_weights="gaussian", target_modules=TARGETS))
    objective = DDPMObjective({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})
    turns = Turns(Path(args.turn_file), args.mode)

    def loss_fn(batch: dict, models: dict) -> tuple[torch.Tensor, dict]:
        turns.begin_step()
        noisy, timesteps, target, _ = objective.sample(batch["latents"])
        pred = models["unet"](noisy, timesteps, batch["hidden"]).sample.float()
        return F.mse_loss(pred, target.float()), {}

    def save_adapter(models: dict, path: Path, metadata: dict) -> Path:
        tensors = {k: v.to("cpu", copy=True).contiguous() for k, v in trainable_state(models["unet"]).items()}
        return atomic_write(path, lambda tmp: save_file(tensors, tmp))

    spec = TrainSpec(
        dataset=RandomLatents(cfg.max_train_steps * args.batch, args.resolution // 8),
        collate_fn=torch.utils.data.default_collate,
        models={"unet": unet},
        trainable=("unet",),
        loss_fn=loss_fn,
        save_adapter=save_adapter,
    )
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        train(accelerator, cfg, spec, ProgressFile(out / "progress.jsonl"))
    finally:
        turns.finish()
    timed = turns.durations[args.warmup : args.warmup + args.steps]
    events = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]
    result = {
        "mode": args.mode,
        "s_per_step": statistics.median(timed),
        "step_times": timed,
        "trainable_params": next(e["trainable_params"] for e in events if e["event"] == "start"),
        "device": str(accelerator.device),
        "threads": torch.get_num_threads(),
    }
    if accelerator.device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["peak_kind"] = "torch.cuda.max_memory_allocated"
    else:
        result["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        result["peak_kind"] = "ru_maxrss"
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=HelpFormatter
    )
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--mixed_precision", default="no", choices=("no", "fp16", "bf16"))
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", help=argparse.SUPPRESS)
    parser.add_argument("--turn-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.mode = args.worker
        print(json.dumps(worker(args)), flush=True)
        return 0

    shared = [f"--{k}={getattr(args, k)}" for k in ("resolution", "batch", "r", "steps", "warmup", "mixed_precision")]
    shared += ["--gradient_checkpointing"] if args.gradient_checkpointing else []
    with tempfile.TemporaryDirectory(prefix="train_step_") as tmp:
        turn_file = Path(tmp) / "turn"
        turn_file.write_text(MODES[0])
        procs = {
            mode: subprocess.Popen(
                [sys.executable, __file__, "--worker", mode, "--out-dir", tmp, "--turn-file", str(turn_file), *shared],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for mode in MODES
        }
        runs = {}
        for mode, proc in procs.items():
            stdout, stderr = proc.communicate()
            if proc.returncode != 0:
                for other in procs.values():
                    other.kill()
                raise SystemExit(f"{mode} worker failed:\n{stderr[-4000:]}")
            runs[mode] = json.loads(stdout.strip().splitlines()[-1])

    speed = runs["lora"]["s_per_step"] / runs["hra"]["s_per_step"]
    memory = runs["hra"]["peak_gib"] / runs["lora"]["peak_gib"]
    hra = runs["hra"]
    print(
        f"SD1.5 UNet, {args.resolution} px, batch {args.batch}, r={args.r}, mixed precision {args.mixed_precision}, "
        f"{hra['device']} ({platform.processor() or platform.machine()}, {hra['threads']} threads), median of "
        f"{args.steps} steps after {args.warmup}, modes taking turns; peak = {hra['peak_kind']}\n"
    )
    print("| adapter | trainable params | steps/s | s/step (median) | peak GiB |")
    print("| --- | --- | --- | --- | --- |")
    for mode, r in runs.items():
        print(
            f"| {mode} | {r['trainable_params']:,} | {1 / r['s_per_step']:.3f} | {r['s_per_step']:.2f} | "
            f"{r['peak_gib']:.2f} |"
        )
    print(f"\nHRA / LoRA: speed {speed:.3f}x (target >= {TARGET_SPEED}), peak memory {memory:.3f}x (target <= 1)")
    if args.json:
        summary = {
            "args": vars(args) | {"json": str(args.json)},
            "runs": runs,
            "speed_ratio": speed,
            "memory_ratio": memory,
        }
        args.json.write_text(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
