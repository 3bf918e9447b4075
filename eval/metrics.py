"""Metrics of the HRA paper: DINO, CLIP-I, CLIP-T and LPIPS for subject-driven generation, Canny IoU/F1 for control.

Each scorer loads its network once and scores lists of PIL images in batches, without gradients. Everything runs in
float32 on every device: half precision can move these scores in the third decimal, which is the precision the paper
reports, and the networks are cheap next to generating the images.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms
from tqdm.auto import tqdm

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

T = TypeVar("T")


class ModelLoadError(RuntimeError):
    """A metric network could not be loaded from disk or the network."""


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The given device, else CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _batches(items: Sequence[T], batch_size: int, desc: str) -> Iterator[Sequence[T]]:
    if not items:
        raise ValueError(f"{desc}: nothing to score (empty list)")
    starts = range(0, len(items), batch_size)
    for start in tqdm(starts, desc=desc, leave=False, disable=None):
        yield items[start : start + batch_size]


def _load_error(what: str, name: str, hint: str, cause: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"could not load the {what} {name!r}: it is not available locally and could not be downloaded "
        f"({type(cause).__name__}: {cause}). {hint}"
    )


class DINOScorer:
    """Subject fidelity: cosine of DINO ViT CLS tokens, which (unlike CLIP) separate instances of the same class."""

    def __init__(self, model: str = "facebook/dino-vits16", device: str | torch.device | None = None,
                 batch_size: int = 32) -> None:
        from transformers import AutoImageProcessor, AutoModel  # the scorers' libraries load when used, not on --help

        self.device = resolve_device(device)
        self.batch_size = batch_size
        folder = Path(model)
        try:
            self.model = AutoModel.from_pretrained(model).to(self.device).eval()
            has_processor = not folder.is_dir() or (folder / "preprocessor_config.json").is_file()
            self.processor = AutoImageProcessor.from_pretrained(model) if has_processor else None
        except OSError as error:
            raise _load_error("DINO model", model, "Pass --dino_model with a local copy (a folder written by "
                              "save_pretrained, or the Hugging Face snapshot folder).", error) from error
        # Without a processor: what facebook/dino-vits16's ViTImageProcessor does (a plain bilinear resize to the
        # input size, no crop), so a folder without preprocessor_config.json scores like the hub model.
        size = self.model.config.image_size
        self.transform = transforms.Compose([
            transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])

    def _pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        if self.processor is not None:
            return self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        return torch.stack([self.transform(image) for image in images])

    @torch.inference_mode()
    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """L2-normalized CLS tokens, one row per image (on CPU)."""
        rows = []
        for batch in _batches(images, self.batch_size, "DINO"):
            hidden = self.model(pixel_values=self._pixels(batch).to(self.device)).last_hidden_state
            rows.append(F.normalize(hidden[:, 0].float(), dim=-1).cpu())
        return torch.cat(rows)

    def similarity(self, real: Sequence[Image.Image], generated: Sequence[Image.Image]) -> torch.Tensor:
        """Cosine matrix of shape (len(generated), len(real))."""
        return self.embed(generated) @ self.embed(real).T


class CLIPScorer:
    """CLIP-I (image-image) and CLIP-T (image-prompt) cosines with an open_clip model or a transformers CLIP folder.

    `model` is an open_clip architecture name (with `pretrained` an open_clip tag, a local checkpoint file, or None
    for random weights in tests), or a local folder written by transformers' `CLIPModel.save_pretrained` with its
    tokenizer and image processor (the demo world's scorer, or a snapshot of openai/clip-vit-large-patch14);
    `pretrained` is then not used. Tags trained with QuickGELU (OpenAI's) get it automatically; for a local
    open_clip copy of OpenAI weights name the architecture `ViT-L-14-quickgelu`, since a file does not say which
    activation it was trained with.
    """

    def __init__(self, model: str = "ViT-L-14", pretrained: str | None = "openai",
                 device: str | torch.device | None = None, batch_size: int = 32) -> None:
        self.device = resolve_device(device)
        self.batch_size = batch_size
        if (Path(model) / "config.json").is_file():
            self._load_transformers(Path(model))
            return
        import open_clip

        quick_gelu = bool(pretrained) and open_clip.get_pretrained_cfg(model, pretrained).get("quick_gelu", False)
        try:
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(
                model, pretrained=pretrained, device=self.device, force_quick_gelu=quick_gelu)
            self.tokenizer = open_clip.get_tokenizer(model)
        except (OSError, RuntimeError, ValueError) as error:
            raise _load_error("CLIP model", f"{model} ({pretrained})", "Pass --clip_pretrained with a local "
                              "checkpoint file and --clip_model with its architecture (ViT-L-14-quickgelu for a "
                              "copy of OpenAI's ViT-L/14).", error) from error
        self.model.eval()
        self._encode_image, self._encode_text = self.model.encode_image, self.model.encode_text

    def _load_transformers(self, folder: Path) -> None:
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        try:
            model = CLIPModel.from_pretrained(folder).to(self.device).eval()
            processor = CLIPImageProcessor.from_pretrained(folder)
            tokenizer = CLIPTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"could not load the CLIP folder {str(folder)!r} ({type(error).__name__}: "
                                 f"{error}); it needs CLIPModel weights, a tokenizer and an image processor, as "
                                 "CLIPModel/CLIPTokenizer/CLIPImageProcessor.save_pretrained write them") from error
        self.model = model
        self.preprocess = lambda image: processor(images=image, return_tensors="pt")["pixel_values"][0]
        self.tokenizer = lambda texts: tokenizer(texts, padding="max_length", truncation=True,
                                                 max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        self._encode_image = lambda pixels: _features(model.get_image_features(pixel_values=pixels))
        self._encode_text = lambda ids: _features(model.get_text_features(input_ids=ids))

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """L2-normalized image embeddings, one row per image (on CPU)."""
        rows = []
        for batch in _batches(images, self.batch_size, "CLIP images"):
            pixels = torch.stack([self.preprocess(image) for image in batch]).to(self.device)
            rows.append(F.normalize(self._encode_image(pixels).float(), dim=-1).cpu())
        return torch.cat(rows)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalized text embeddings, one row per text (on CPU)."""
        rows = []
        for batch in _batches(texts, self.batch_size, "CLIP texts"):
            tokens = self.tokenizer(list(batch)).to(self.device)
            rows.append(F.normalize(self._encode_text(tokens).float(), dim=-1).cpu())
        return torch.cat(rows)

    def image_similarity(self, real: Sequence[Image.Image], generated: Sequence[Image.Image]) -> torch.Tensor:
        """CLIP-I cosine matrix of shape (len(generated), len(real))."""
        return self.embed_images(generated) @ self.embed_images(real).T

    def text_similarity(self, generated: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """CLIP-T: raw cosine (not x100) of each image with its own prompt, shape (len(generated),)."""
        if len(generated) != len(prompts):
            raise ValueError(f"CLIP-T needs one prompt per image: {len(generated)} images, {len(prompts)} prompts")
        return (self.embed_images(generated) * self.embed_texts(prompts)).sum(dim=-1)


def _features(output: torch.Tensor | Any) -> torch.Tensor:
    """transformers 4 returns the projected embeddings, 5 an output object holding them as `pooler_output`."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _square(image: Image.Image, size: int) -> Image.Image:
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    # Bilinear, as the reference evaluation resizes for LPIPS.
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BILINEAR)


class LPIPSScorer:
    """LPIPS distance between real and generated images; the paper reads it as diversity (higher = less copying).

    LPIPS compares feature maps position by position, so both images must share one size: each is center-cropped
    to a square and resized to `size` x `size` (default 512, SD1.5's output, so generated images are not resampled).
    `pretrained_backbone=False` uses a random VGG/AlexNet (lpips' `pnet_rand`) so tests run offline; its
    calibrated linear heads ship with lpips either way.
    """

    def __init__(self, net: str = "vgg", device: str | torch.device | None = None, pretrained_backbone: bool = True,
                 size: int = 512, batch_size: int = 8) -> None:
        if net not in ("vgg", "alex"):
            raise ValueError(f"LPIPS net must be 'vgg' or 'alex', not {net!r}")
        self.device = resolve_device(device)
        self.size = size
        self.batch_size = batch_size
        import lpips

        with warnings.catch_warnings():  # lpips calls torchvision's deprecated `pretrained=` argument
            warnings.filterwarnings("ignore", message=".*(pretrained|weights).*", category=UserWarning)
            try:
                self.model = lpips.LPIPS(net=net, pnet_rand=not pretrained_backbone, verbose=False)
            except OSError as error:
                raise _load_error("LPIPS backbone", f"torchvision {net}", "Put torchvision's ImageNet checkpoint "
                                  "in $TORCH_HOME/hub/checkpoints (default ~/.cache/torch/hub/checkpoints).",
                                  error) from error
        self.model = self.model.to(self.device).eval()

    def _tensor(self, image: Image.Image) -> torch.Tensor:
        array = np.asarray(_square(image, self.size), dtype=np.float32)
        return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0

    @torch.inference_mode()
    def distance(self, real: Sequence[Image.Image], generated: Sequence[Image.Image]) -> torch.Tensor:
        """LPIPS matrix of shape (len(generated), len(real))."""
        real_t = torch.stack([self._tensor(image) for image in real])
        gen_t = torch.stack([self._tensor(image) for image in generated])
        out = torch.empty(len(generated), len(real))
        pairs = [(g, r) for g in range(len(generated)) for r in range(len(real))]
        for batch in _batches(pairs, self.batch_size, "LPIPS"):
            g_idx = torch.tensor([g for g, _ in batch])
            r_idx = torch.tensor([r for _, r in batch])
            d = self.model(gen_t[g_idx].to(self.device), real_t[r_idx].to(self.device))
            out[g_idx, r_idx] = d.flatten().float().cpu()
        return out


def _rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    array = np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"edge maps need uint8 images, got {array.dtype}")
    return array


def edge_map(image: Image.Image | np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    """Canny edges (bool, H x W) of an RGB or grayscale uint8 image, the detector used to build canny conditions."""
    array = _rgb_array(image)
    gray = cv2.cvtColor(array, cv2.COLOR_RGB2GRAY) if array.ndim == 3 else array
    return cv2.Canny(gray, low, high) > 0


def edge_iou_f1(condition_edges: np.ndarray, generated_edges: np.ndarray) -> tuple[float, float]:
    """Pixel IoU = TP/(TP+FP+FN) and F1 = 2TP/(2TP+FP+FN) of two same-size edge maps.

    Two empty maps agree perfectly, so both scores are 1.0 there (the formulas would divide by zero).
    """
    if condition_edges.shape != generated_edges.shape:
        raise ValueError(f"edge maps differ in size: {condition_edges.shape} vs {generated_edges.shape}")
    cond, gen = condition_edges.astype(bool), generated_edges.astype(bool)
    tp = int(np.count_nonzero(cond & gen))
    fp = int(np.count_nonzero(gen & ~cond))
    fn = int(np.count_nonzero(cond & ~gen))
    if tp + fp + fn == 0:
        return 1.0, 1.0
    return tp / (tp + fp + fn), 2 * tp / (2 * tp + fp + fn)


def canny_iou_f1(source: Image.Image | np.ndarray, generated: Image.Image | np.ndarray, low: int = 100,
                 high: int = 200) -> tuple[float, float]:
    """Edge IoU/F1 between a control source image and a generated one, resized (bilinear) to the source's size."""
    height, width = _rgb_array(source).shape[:2]
    resized = cv2.resize(_rgb_array(generated), (width, height), interpolation=cv2.INTER_LINEAR)
    return edge_iou_f1(edge_map(source, low, high), edge_map(resized, low, high))
