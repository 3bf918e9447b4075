"""Image loading, folder validation, the DreamBooth/control datasets and the synthetic shapes set."""

from __future__ import annotations

import io
import json
import random
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, ImageOps

from hra_diffusion.data import ControlDataset, DreamBoothDataset, collate_control, collate_dreambooth
from hra_diffusion.images import ImageError, load_image, read_caption, require_images, scan_images
from hra_diffusion.synthetic import main as synthetic_main
from hra_diffusion.synthetic import make_shapes_dataset

FIXTURES = Path(__file__).parent / "fixtures" / "subjects"


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def write_truncated_jpeg(path: Path) -> Path:
    buf = io.BytesIO()
    noise_image(128, 128).save(buf, "JPEG", quality=90)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def write_png_header(path: Path, width: int, height: int) -> Path:
    """A PNG with a real header claiming ``width`` x ``height`` and almost no pixel data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)))
    return path


def opened_mode(path: Path) -> str:
    with Image.open(path) as img:
        return img.mode


def pixel(path: Path, xy: tuple[int, int] = (0, 0)) -> tuple[int, int, int]:
    img = load_image(path)
    assert img.mode == "RGB"
    return img.getpixel(xy)


# --------------------------------------------------------------------------------------------------------------------
# load_image: mode conversion


def test_rgba_composited_on_white(tmp_path):
    img = Image.new("RGBA", (3, 1))
    img.putdata([(255, 0, 0, 0), (255, 0, 0, 255), (0, 0, 0, 128)])
    img.save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (255, 0, 0)
    assert all(abs(c - 127) <= 1 for c in out.getpixel((2, 0)))


def test_la_and_palette_transparency(tmp_path):
    la = Image.new("LA", (2, 1))
    la.putdata([(0, 0), (0, 255)])
    la.save(tmp_path / "la.png")
    assert pixel(tmp_path / "la.png", (0, 0)) == (255, 255, 255)
    assert pixel(tmp_path / "la.png", (1, 0)) == (0, 0, 0)

    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 0, 255])
    pal.putdata([0, 1])
    pal.save(tmp_path / "p.png", transparency=0)
    assert pixel(tmp_path / "p.png", (0, 0)) == (255, 255, 255)
    assert pixel(tmp_path / "p.png", (1, 0)) == (0, 0, 255)


def test_grayscale_bilevel_cmyk(tmp_path):
    Image.new("L", (2, 2), 77).save(tmp_path / "l.png")
    assert pixel(tmp_path / "l.png") == (77, 77, 77)
    Image.new("1", (2, 2), 1).save(tmp_path / "one.png")
    assert pixel(tmp_path / "one.png") == (255, 255, 255)
    Image.new("CMYK", (2, 2), (0, 255, 255, 0)).save(tmp_path / "c.tif")
    assert pixel(tmp_path / "c.tif") == (255, 0, 0)
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)
    assert np.allclose(pixel(tmp_path / "c.jpg", (8, 8)), (255, 0, 0), atol=3)


def test_16bit_scaled_not_clipped(tmp_path):
    arr = np.array([[65535, 32768, 0, 257]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "g16.png")
    assert opened_mode(tmp_path / "g16.png").startswith("I")
    out = np.asarray(load_image(tmp_path / "g16.png"))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert abs(int(out[0, 1, 0]) - 128) <= 1
    assert out[0, 2, 0] == 0 and out[0, 3, 0] == 1

    Image.fromarray(arr.astype(np.int32)).save(tmp_path / "i32.tif")
    assert opened_mode(tmp_path / "i32.tif") == "I"
    assert np.asarray(load_image(tmp_path / "i32.tif"))[0, :, 0].tolist() == out[0, :, 0].tolist()


def test_float_image(tmp_path):
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "f.tif")
    assert np.asarray(load_image(tmp_path / "f.tif"))[0, :, 0].tolist() == [0, 128, 255]


def test_exif_orientation_applied(tmp_path):
    src = noise_image(48, 32)
    exif = src.getexif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    src.save(path, quality=95, exif=exif.tobytes())
    out = load_image(path)
    assert out.size == (32, 48)
    with Image.open(path) as raw:
        manual = raw.convert("RGB").transpose(Image.Transpose.ROTATE_270)
    assert np.array_equal(np.asarray(out), np.asarray(manual))


def test_webp_and_fixture_jpeg(tmp_path):
    noise_image(20, 10).save(tmp_path / "x.webp", lossless=True)
    assert np.array_equal(np.asarray(load_image(tmp_path / "x.webp")), np.asarray(noise_image(20, 10)))
    img = load_image(FIXTURES / "dog" / "00.jpg")
    assert img.mode == "RGB" and max(img.size) <= 96


# --------------------------------------------------------------------------------------------------------------------
# load_image: refusals


def test_bad_files_raise_image_error_naming_file(tmp_path):
    cases = {
        write_truncated_jpeg(tmp_path / "trunc.jpg"): "truncated",
        tmp_path / "notes.jpg": "not an image",
        tmp_path / "empty.png": "empty",
        tmp_path / "missing.jpg": "no such file",
        tmp_path / "folder.png": "directory",
    }
    (tmp_path / "notes.jpg").write_text("this is not a JPEG")
    (tmp_path / "empty.png").touch()
    (tmp_path / "folder.png").mkdir()
    for path, why in cases.items():
        with pytest.raises(ImageError) as info:
            load_image(path)
        assert path.name in str(info.value) and why in str(info.value)
        assert isinstance(info.value, ValueError)
    assert not ImageFile.LOAD_TRUNCATED_IMAGES


def test_pixel_limit_checked_before_decoding(tmp_path):
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    with pytest.raises(ImageError, match=r"big\.png.*100x100.*10,000.*5,000"):
        load_image(tmp_path / "big.png", max_pixels=5_000)
    assert load_image(tmp_path / "big.png", max_pixels=10_000).size == (100, 100)
    # Header-only files: decoding would allocate (and then fail on the missing data); the header must decide.
    header = write_png_header(tmp_path / "header.png", 5_000, 4_000)
    with pytest.raises(ImageError, match=r"header\.png: image is 5000x4000 = 20,000,000 pixels.*1,000,000"):
        load_image(header, max_pixels=1_000_000)
    bomb = write_png_header(tmp_path / "bomb.png", 100_000, 100_000)
    with pytest.raises(ImageError, match=r"bomb\.png.*decompression bomb"):
        load_image(bomb, max_pixels=10**11)


# --------------------------------------------------------------------------------------------------------------------
# Folders and captions


def make_mixed_folder(folder: Path) -> Path:
    folder.mkdir()
    noise_image(16, 16).save(folder / "b_good.jpg")
    noise_image(16, 16, 1).save(folder / "a_good.png")
    write_truncated_jpeg(folder / "c_trunc.jpg")
    (folder / "d_text.jpg").write_text("hello")
    (folder / "e_empty.webp").touch()
    for sidecar in ("a_good.txt", "b_good.caption", "meta.json", "metadata.jsonl", ".DS_Store", "Thumbs.db"):
        (folder / sidecar).write_text("x")
    (folder / "sub").mkdir()
    return folder


def test_scan_images_sorts_and_explains(tmp_path):
    folder = make_mixed_folder(tmp_path / "imgs")
    good, bad = scan_images(folder)
    assert [p.name for p in good] == ["a_good.png", "b_good.jpg"]
    assert [p.name for p, _ in bad] == ["c_trunc.jpg", "d_text.jpg", "e_empty.webp"]
    reasons = dict((p.name, r) for p, r in bad)
    assert "truncated" in reasons["c_trunc.jpg"] and "empty" in reasons["e_empty.webp"]


def test_require_images_warns_or_lists_every_bad_file(tmp_path):
    folder = make_mixed_folder(tmp_path / "imgs")
    with pytest.warns(UserWarning, match="3 unusable instance") as record:
        good = require_images(folder)
    assert len(good) == 2
    assert all(name in str(record[0].message) for name in ("c_trunc.jpg", "d_text.jpg", "e_empty.webp"))

    for name in ("a_good.png", "b_good.jpg"):
        (folder / name).unlink()
    with pytest.raises(ImageError) as info:
        require_images(folder, "class")
    message = str(info.value)
    assert "no usable class images" in message
    assert all(name in message for name in ("c_trunc.jpg", "d_text.jpg", "e_empty.webp"))

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "caption.txt").write_text("x")
    with pytest.raises(ImageError, match="contains no image files"):
        require_images(empty)
    with pytest.raises(ImageError, match="does not exist"):
        require_images(tmp_path / "nope")


def test_read_caption(tmp_path):
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        noise_image(8, 8).save(tmp_path / name)
    (tmp_path / "a.txt").write_text("  a photo of sks dog\n on grass \n", encoding="utf-8")
    (tmp_path / "b.caption").write_text("kohya caption")
    (tmp_path / "c.txt").write_text("   \n")
    assert read_caption(tmp_path / "a.jpg") == "a photo of sks dog on grass"
    assert read_caption(tmp_path / "b.jpg") == "kohya caption"
    assert read_caption(tmp_path / "c.jpg") is None
    assert read_caption(tmp_path / "d.jpg") is None


# --------------------------------------------------------------------------------------------------------------------
# DreamBoothDataset


@pytest.fixture
def subjects(tmp_path):
    dog = shutil.copytree(FIXTURES / "dog", tmp_path / "dog")
    teapot = shutil.copytree(FIXTURES / "teapot", tmp_path / "teapot")
    (dog / "01.txt").write_text("a photo of sks dog on a sofa")
    (dog / "02.jpg").unlink()
    return dog, teapot


def test_dreambooth_items_and_captions(subjects):
    dog, _ = subjects
    ds = DreamBoothDataset(dog, "a photo of sks dog", 32, center_crop=True)
    assert len(ds) == 2
    item = ds[0]
    assert set(item) == {"instance_images", "instance_size_crop", "instance_prompt"}
    x = item["instance_images"]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert -1.0 <= x.min() < 0 < x.max() <= 1.0
    assert [ds[i]["instance_prompt"] for i in range(2)] == ["a photo of sks dog", "a photo of sks dog on a sofa"]
    no_captions = DreamBoothDataset(dog, "a photo of sks dog", 32, use_captions=False)
    assert no_captions[1]["instance_prompt"] == "a photo of sks dog"


def test_dreambooth_size_crop_locates_the_crop(subjects):
    """SDXL's conditioning (original size, crop top-left) must say where the training pixels came from, counted in
    the flipped image when flipped (diffusers flips, then crops): recrop the original with it and compare."""
    dog, _ = subjects
    wide = dog.parent / "wide"
    wide.mkdir()
    load_image(dog / "00.jpg").resize((150, 96)).save(wide / "wide.png")  # landscape: crops move sideways
    ds = DreamBoothDataset(wide, "p", 24, random_flip=True, seed=7)
    original = load_image(ds.instance_paths[0])
    seen, lefts = set(), set()
    for epoch in range(10):
        ds.set_epoch(epoch)
        item = ds[0]
        height, width, top, left = item["instance_size_crop"]
        lefts.add(left)
        assert (height, width) == (original.height, original.width)
        scale = 24 / min(width, height)
        resized = original.resize((max(24, round(width * scale)), max(24, round(height * scale))), Image.LANCZOS)
        for flipped, frame in ((False, resized), (True, ImageOps.mirror(resized))):
            expected = torch.from_numpy(np.asarray(frame.crop((left, top, left + 24, top + 24)), dtype=np.float32))
            if torch.allclose(item["instance_images"], expected.permute(2, 0, 1) / 127.5 - 1, atol=1e-5):
                seen.add(flipped)
                break
        else:
            raise AssertionError(f"epoch {epoch}: the crop is not at (top, left) = {(top, left)}")
    assert seen == {False, True} and len(lefts) > 2, "flipped and plain draws at several offsets were checked"
    batch = collate_dreambooth([ds[0], ds[0]], False)
    assert batch["size_crop"].tolist() == [list(item["instance_size_crop"])] * 2


def test_dreambooth_determinism(subjects):
    dog, _ = subjects
    make = lambda: DreamBoothDataset(dog, "p", 24, random_flip=True, seed=7)  # noqa: E731
    a, b = make(), make()
    first = a[1]["instance_images"]
    random.seed(123)
    torch.manual_seed(123)
    np.random.seed(123)
    torch.rand(10)
    assert torch.equal(first, b[1]["instance_images"])
    assert torch.equal(first, a[1]["instance_images"])
    epochs = []
    for epoch in range(6):
        a.set_epoch(epoch)
        epochs.append(a[1]["instance_images"])
    assert any(not torch.equal(epochs[0], e) for e in epochs[1:])
    other_seed = DreamBoothDataset(dog, "p", 24, random_flip=True, seed=8)
    assert any(not torch.equal(a[i]["instance_images"], other_seed[i]["instance_images"]) for i in range(2))

    center = DreamBoothDataset(dog, "p", 24, center_crop=True)
    before = center[0]["instance_images"]
    center.set_epoch(3)
    assert torch.equal(before, center[0]["instance_images"])


def test_dreambooth_same_through_dataloader_workers(subjects):
    dog, _ = subjects
    ds = DreamBoothDataset(dog, "p", 16, random_flip=True, seed=3)
    ds.set_epoch(2)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=1, num_workers=2, collate_fn=lambda ex: collate_dreambooth(ex, False)
    )
    from_workers = torch.cat([batch["pixel_values"] for batch in loader])
    direct = torch.stack([ds[i]["instance_images"] for i in range(len(ds))])
    assert torch.equal(from_workers, direct)


def test_dreambooth_flip_mirrors_image(tmp_path):
    folder = tmp_path / "inst"
    folder.mkdir()
    noise_image(16, 16).save(folder / "x.png")
    ds = DreamBoothDataset(folder, "p", 16, center_crop=True, random_flip=True)
    unflipped = torch.from_numpy(np.asarray(noise_image(16, 16), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    seen = set()
    for epoch in range(16):
        ds.set_epoch(epoch)
        x = ds[0]["instance_images"]
        if torch.allclose(x, unflipped, atol=1e-6):
            seen.add("plain")
        elif torch.allclose(x, unflipped.flip(-1), atol=1e-6):
            seen.add("flipped")
    assert seen == {"plain", "flipped"}


def test_prior_preservation_and_collate(subjects):
    dog, teapot = subjects
    ds = DreamBoothDataset(dog, "sks dog", 16, class_dir=teapot, class_prompt="a teapot", center_crop=True)
    assert len(ds) == 3  # max(2 instance, 3 class)
    examples = [ds[i] for i in range(3)]
    assert torch.equal(examples[2]["instance_images"], examples[0]["instance_images"])  # indices wrap
    batch = collate_dreambooth(examples, with_prior_preservation=True)
    assert batch["pixel_values"].shape == (6, 3, 16, 16)
    assert batch["pixel_values"].is_contiguous()
    dog_prompts = ["sks dog", "a photo of sks dog on a sofa", "sks dog"]
    assert batch["prompts"] == dog_prompts + ["a teapot"] * 3
    for i, ex in enumerate(examples):
        assert torch.equal(batch["pixel_values"][i], ex["instance_images"])
        assert torch.equal(batch["pixel_values"][3 + i], ex["class_images"])
    plain = collate_dreambooth(examples, with_prior_preservation=False)
    assert plain["pixel_values"].shape == (3, 3, 16, 16) and plain["prompts"] == dog_prompts

    no_class = DreamBoothDataset(dog, "sks dog", 16)
    with pytest.raises(ValueError, match="class_dir"):
        collate_dreambooth([no_class[0]], with_prior_preservation=True)
    with pytest.raises(ValueError, match="class_prompt"):
        DreamBoothDataset(dog, "sks dog", 16, class_dir=teapot)


def test_dreambooth_fails_fast_on_bad_folder(tmp_path):
    folder = tmp_path / "inst"
    folder.mkdir()
    write_truncated_jpeg(folder / "broken.jpg")
    with pytest.raises(ImageError, match="broken.jpg"):
        DreamBoothDataset(folder, "p", 16)


# --------------------------------------------------------------------------------------------------------------------
# ControlDataset


def write_control_set(folder: Path, rows: list[dict], images: dict[str, Image.Image]) -> Path:
    folder.mkdir(exist_ok=True)
    for name, img in images.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        img.save(folder / name)
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


def test_control_alignment_under_crop_and_flip(tmp_path):
    # The condition is the image itself, so identical geometry means cond * 2 - 1 == pixels exactly.
    images = {f"img/{i}.png": noise_image(40, 24, i) for i in range(3)}
    rows = [{"image": f"img/{i}.png", "conditioning_image": f"img/{i}.png", "text": f"t{i}"} for i in range(3)]
    folder = write_control_set(tmp_path / "ctl", rows, images)
    ds = ControlDataset(folder, 16, center_crop=False, random_flip=True, seed=1)
    # Same seed without flipping draws the same crops (the flip is drawn after them).
    unflipped = ControlDataset(folder, 16, center_crop=False, seed=1)
    flips, crops = [], set()
    for epoch in range(4):
        ds.set_epoch(epoch)
        unflipped.set_epoch(epoch)
        for i in range(len(ds)):
            item, plain = ds[i], unflipped[i]["pixel_values"]
            cond = item["conditioning_pixel_values"]
            assert item["pixel_values"].shape == cond.shape == (3, 16, 16)
            assert 0.0 <= cond.min() and cond.max() <= 1.0
            assert torch.allclose(cond * 2 - 1, item["pixel_values"], atol=1e-6)
            flipped = torch.equal(item["pixel_values"], plain.flip(-1))
            assert flipped or torch.equal(item["pixel_values"], plain)
            flips.append(flipped)
            crops.add((i, plain.sum().item()))
    assert any(flips) and not all(flips)
    assert len(crops) > len(ds)  # random crops moved between epochs


def test_control_empty_prompts_and_collate(tmp_path):
    images = {f"{i}.png": noise_image(8, 8, i) for i in range(20)}
    rows = [{"file_name": f"{i}.png", "conditioning_image": f"{i}.png", "text": f"caption {i}"} for i in range(20)]
    folder = write_control_set(tmp_path / "ctl", rows, images)
    assert [ControlDataset(folder, 8)[i]["prompt"] for i in range(20)] == [f"caption {i}" for i in range(20)]
    assert {ControlDataset(folder, 8, proportion_empty_prompts=1.0)[i]["prompt"] for i in range(20)} == {""}
    half = ControlDataset(folder, 8, proportion_empty_prompts=0.5, seed=4)
    prompts = [half[i]["prompt"] for i in range(20)]
    assert 0 < prompts.count("") < 20
    assert prompts == [ControlDataset(folder, 8, proportion_empty_prompts=0.5, seed=4)[i]["prompt"] for i in range(20)]
    batch = collate_control([half[i] for i in range(4)])
    assert batch["pixel_values"].shape == batch["conditioning_pixel_values"].shape == (4, 3, 8, 8)
    assert batch["prompts"] == prompts[:4]


def test_control_conditioning_transform(tmp_path):
    images = {"a.png": noise_image(20, 12)}
    folder = write_control_set(tmp_path / "ctl", [{"image": "a.png", "text": "x"}], images)
    with pytest.raises(ValueError, match=r"no column 'conditioning_image'; columns present: image, text"):
        ControlDataset(folder, 8)
    ds = ControlDataset(folder, 8, conditioning_transform=ImageOps.invert, random_flip=True)
    item = ds[0]
    assert torch.allclose(item["conditioning_pixel_values"], 1 - (item["pixel_values"] + 1) / 2, atol=1e-6)


def test_control_errors(tmp_path):
    folder = tmp_path / "ctl"
    folder.mkdir()
    with pytest.raises(ValueError, match="metadata.jsonl not found"):
        ControlDataset(folder, 8)
    write_control_set(folder, [{"img": "a.png", "cond": "c.png", "caption": "x"}], {"a.png": noise_image(8, 8)})
    with pytest.raises(ValueError, match=r"no column 'image'; columns present: caption, cond, img"):
        ControlDataset(folder, 8)
    with pytest.raises(ValueError, match=r"no column 'text'"):
        ControlDataset(folder, 8, image_column="img")
    with pytest.raises(ValueError, match=r"1 referenced file\(s\) missing[\s\S]*c\.png"):
        ControlDataset(folder, 8, image_column="img", conditioning_image_column="cond", caption_column="caption")
    (folder / "metadata.jsonl").write_text('{"image": "a.png"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        ControlDataset(folder, 8)


# --------------------------------------------------------------------------------------------------------------------
# Synthetic shapes


def test_synthetic_dataset_roundtrip(tmp_path):
    out = make_shapes_dataset(tmp_path / "shapes", n=6, size=32, seed=5)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and set(rows[0]) == {"image", "conditioning_image", "text"}
    assert all(r["text"].startswith(("a ", "an ")) and r["text"].endswith(" background") for r in rows)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp dir renamed away

    with Image.open(out / rows[0]["conditioning_image"]) as cond:
        edges = np.asarray(cond)
    assert set(np.unique(edges)) <= {0, 255} and edges.any()

    ds = ControlDataset(out, 32)
    item = ds[0]
    assert item["pixel_values"].shape == (3, 32, 32) and item["prompt"] == rows[0]["text"]
    assert item["conditioning_pixel_values"].max() == 1.0

    again = make_shapes_dataset(tmp_path / "again", n=6, size=32, seed=5)
    other = make_shapes_dataset(tmp_path / "other", n=6, size=32, seed=6)
    same = [(out / r["image"]).read_bytes() == (again / r["image"]).read_bytes() for r in rows]
    assert all(same)
    assert (out / "metadata.jsonl").read_text() == (again / "metadata.jsonl").read_text()
    assert (out / "metadata.jsonl").read_text() != (other / "metadata.jsonl").read_text()

    with pytest.raises(FileExistsError):
        make_shapes_dataset(out, n=2)


def test_synthetic_cli(tmp_path, capsys):
    assert synthetic_main([str(tmp_path / "cli"), "--n", "3", "--size", "16"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    assert len(ControlDataset(tmp_path / "cli", 16)) == 3
