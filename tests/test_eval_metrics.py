"""Metrics and the folder scorer, on tiny random-weight models built from configs (no downloads)."""

import json
import math

import numpy as np
import pytest
import torch
from eval_helpers import noise_image, register_tiny_clip, save_tiny_dino
from PIL import Image

from eval.images import list_images
from eval.metrics import (
    CLIPScorer,
    DINOScorer,
    LPIPSScorer,
    ModelLoadError,
    canny_iou_f1,
    edge_iou_f1,
    edge_map,
)
from eval.score import load_prompts, main, markdown_table, score_folders


def solid_image(color: tuple[int, int, int], size: int = 48) -> Image.Image:
    return Image.new("RGB", (size, size), color)


@pytest.fixture(scope="module")
def dino_dirs(tmp_path_factory):
    """The same tiny DINO-architecture ViT saved twice: bare, and with an image processor."""
    return {"bare": save_tiny_dino(tmp_path_factory.mktemp("dino_bare")),
            "processor": save_tiny_dino(tmp_path_factory.mktemp("dino_proc"), with_processor=True)}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return register_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def clip_scorer(tiny_clip):
    torch.manual_seed(0)
    return CLIPScorer(tiny_clip, pretrained=None, device="cpu")


@pytest.mark.parametrize("variant", ["bare", "processor"])
def test_dino_identical_images_score_one(dino_dirs, variant):
    scorer = DINOScorer(dino_dirs[variant], device="cpu", batch_size=2)
    assert (scorer.processor is not None) == (variant == "processor")
    images = [noise_image(0), noise_image(1, (80, 64)), noise_image(2)]
    embeddings = scorer.embed(images)
    assert embeddings.shape == (3, 48)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(3))
    sim = scorer.similarity(images[:2], images)
    assert sim.shape == (3, 2)
    assert abs(sim[0, 0].item() - 1) < 1e-5 and abs(sim[1, 1].item() - 1) < 1e-5
    assert sim[2].max() < 1 - 1e-4


def test_clip_identical_images_score_one(clip_scorer):
    images = [noise_image(0), noise_image(1)]
    sim = clip_scorer.image_similarity(images, images)
    assert sim.shape == (2, 2)
    torch.testing.assert_close(sim.diagonal(), torch.ones(2), atol=1e-5, rtol=0)
    clip_t = clip_scorer.text_similarity(images, ["a qwe dog", "a qwe dog in the snow"])
    assert clip_t.shape == (2,) and clip_t.abs().max() <= 1 + 1e-6
    with pytest.raises(ValueError, match="one prompt per image"):
        clip_scorer.text_similarity(images, ["only one"])


def test_clip_t_is_raw_cosine_of_each_image_with_its_prompt(clip_scorer, monkeypatch):
    image_vectors = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), dim=1)
    text_vectors = torch.nn.functional.normalize(torch.tensor([[1.0, 1.0], [0.0, 1.0]]), dim=1)
    monkeypatch.setattr(clip_scorer, "embed_images", lambda images: image_vectors)
    monkeypatch.setattr(clip_scorer, "embed_texts", lambda texts: text_vectors)
    clip_t = clip_scorer.text_similarity([noise_image(0), noise_image(1)], ["first", "second"])
    torch.testing.assert_close(clip_t, torch.tensor([1 / math.sqrt(2), 1 / math.sqrt(2)]))


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_identical_images_are_zero(net):
    scorer = LPIPSScorer(net, device="cpu", pretrained_backbone=False, size=64, batch_size=4)
    real = [noise_image(0), noise_image(1, (96, 64))]
    generated = [noise_image(0), noise_image(1, (96, 64)), noise_image(2)]
    d = scorer.distance(real, generated)
    assert d.shape == (3, 2)
    assert d[0, 0].item() == pytest.approx(0, abs=1e-6) and d[1, 1].item() == pytest.approx(0, abs=1e-6)
    assert d[0, 1] > 0 and d[2].min() > 0


def test_lpips_rejects_unknown_net():
    with pytest.raises(ValueError, match="vgg"):
        LPIPSScorer("squeeze", pretrained_backbone=False)


def test_edge_iou_f1_hand_computed():
    a = np.zeros((4, 4), bool)
    a[0, :] = True  # 4 condition edge pixels
    b = np.zeros((4, 4), bool)
    b[0, :2] = True
    b[3, 3] = True  # 3 generated pixels: TP 2, FP 1, FN 2
    assert edge_iou_f1(a, a) == (1.0, 1.0)
    assert edge_iou_f1(a, ~a) == (0.0, 0.0)
    iou, f1 = edge_iou_f1(a, b)
    assert iou == pytest.approx(2 / 5) and f1 == pytest.approx(4 / 7)
    empty = np.zeros((4, 4), bool)
    assert edge_iou_f1(empty, empty) == (1.0, 1.0)
    with pytest.raises(ValueError, match="size"):
        edge_iou_f1(a, np.zeros((5, 4), bool))


def test_canny_resizes_generated_to_condition_size():
    array = np.zeros((64, 64, 3), np.uint8)
    array[16:48, 16:48] = 255
    source = Image.fromarray(array)
    edges = edge_map(source)
    assert edges.dtype == bool and edges.shape == (64, 64) and edges.any()
    assert canny_iou_f1(source, source) == (1.0, 1.0)
    assert canny_iou_f1(source, source.resize((128, 128), Image.Resampling.NEAREST)) == (1.0, 1.0)
    assert canny_iou_f1(source, Image.new("RGB", (64, 64))) == (0.0, 0.0)


def test_model_load_errors_name_the_model_and_the_flag(tmp_path, tiny_clip):
    with pytest.raises(ModelLoadError, match="DINO model.*--dino_model"):
        DINOScorer(str(tmp_path / "no-such-model"), device="cpu")
    with pytest.raises(ModelLoadError, match="CLIP model.*--clip_pretrained"):
        CLIPScorer(tiny_clip, pretrained=str(tmp_path / "missing.pt"), device="cpu")


def write_folder(folder, images):
    folder.mkdir(parents=True)
    for name, image in images.items():
        image.save(folder / name)
    return folder


RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)
FAKE_VECTORS = {RED: [1.0, 0.0, 0.0], GREEN: [0.0, 1.0, 0.0], BLUE: [0.0, 0.0, 1.0], YELLOW: [1.0, 1.0, 0.0]}


def fake_embed(self, images):
    """Unit vector chosen by the image's color, so the expected cosines can be computed by hand."""
    return torch.nn.functional.normalize(torch.tensor([FAKE_VECTORS[im.getpixel((0, 0))] for im in images]), dim=1)


def test_score_folders_aggregate_is_mean_pairwise_cosine(tmp_path, dino_dirs, tiny_clip, monkeypatch):
    monkeypatch.setattr(DINOScorer, "embed", fake_embed)
    monkeypatch.setattr(CLIPScorer, "embed_images", fake_embed)
    real = write_folder(tmp_path / "real", {"a.png": solid_image(RED), "b.png": solid_image(GREEN)})
    generated = write_folder(tmp_path / "gen", {"0.png": solid_image(RED), "1.png": solid_image(BLUE),
                                                "2.png": solid_image(YELLOW)})
    report = score_folders(real, generated, dino_model=dino_dirs["bare"], clip_model=tiny_clip,
                           clip_pretrained=None, lpips_net="alex", lpips_pretrained_backbone=False, lpips_size=32,
                           device="cpu")
    # gen x real cosines: red (1, 0), blue (0, 0), yellow (1/sqrt2, 1/sqrt2)
    expected_mean = (1 + 2 / math.sqrt(2)) / 6
    for key in ("dino", "clip_i"):
        assert report["aggregate"][key] == pytest.approx(expected_mean)
        assert [row[key] for row in report["per_image"]] == pytest.approx([0.5, 0.0, 1 / math.sqrt(2)])
    assert "clip_t" not in report["aggregate"] and "clip_t" not in report["per_image"][0]
    assert report["aggregate"]["lpips"] > 0


def test_cli_writes_report(tmp_path, dino_dirs, tiny_clip, capsys):
    real = write_folder(tmp_path / "real", {"r0.jpg": noise_image(0), "r1.png": noise_image(1, (80, 64))})
    generated = write_folder(tmp_path / "gen", {f"{i:02d}.png": noise_image(10 + i) for i in range(3)})
    (generated / "notes.txt").write_text("not an image")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"00.png": "a qwe dog", "01.png": "a qwe dog in the snow",
                                   "02.png": "a red qwe dog", "99.png": "unused"}))
    out = tmp_path / "reports" / "report.json"
    rc = main(["--real", str(real), "--generated", str(generated), "--prompts", str(prompts), "--out", str(out),
               "--dino_model", dino_dirs["processor"], "--clip_model", tiny_clip, "--clip_pretrained", "none",
               "--lpips_net", "alex", "--lpips_random_backbone", "--lpips_size", "32", "--device", "cpu",
               "--batch_size", "2"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert set(report["aggregate"]) == {"dino", "clip_i", "clip_t", "lpips"}
    assert [row["file"] for row in report["per_image"]] == ["00.png", "01.png", "02.png"]
    assert all(set(row) == {"file", "dino", "clip_i", "clip_t", "lpips"} for row in report["per_image"])
    assert report["num_real"] == 2 and report["num_generated"] == 3
    assert report["aggregate"]["dino"] == pytest.approx(np.mean([row["dino"] for row in report["per_image"]]))
    assert list(out.parent.iterdir()) == [out]  # the temp file was renamed, not left behind
    assert "| DINO | CLIP-I | CLIP-T | LPIPS |" in capsys.readouterr().out


def test_cli_reports_missing_and_empty_folders(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    args = ["--out", str(tmp_path / "r.json"), "--clip_pretrained", "none", "--lpips_random_backbone"]
    assert main(["--real", str(tmp_path / "missing"), "--generated", str(tmp_path / "empty"), *args]) == 2
    assert "image folder not found" in capsys.readouterr().err
    write_folder(tmp_path / "real", {"a.png": noise_image(0)})
    assert main(["--real", str(tmp_path / "real"), "--generated", str(tmp_path / "empty"), *args]) == 2
    assert "no images" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_prompt_files_lines_and_json(tmp_path):
    files = list_images(write_folder(tmp_path / "gen", {"b.png": noise_image(0), "a.png": noise_image(1)}))
    lines = tmp_path / "prompts.txt"
    lines.write_text("prompt for a\n\nprompt for b\n")
    assert load_prompts(lines, files) == ["prompt for a", "prompt for b"]
    mapping = tmp_path / "prompts.json"
    mapping.write_text(json.dumps({"b.png": "for b", "a.png": "for a"}))
    assert load_prompts(mapping, files) == ["for a", "for b"]
    lines.write_text("only one\n")
    with pytest.raises(ValueError, match="1 prompts for 2 generated images"):
        load_prompts(lines, files)
    mapping.write_text(json.dumps({"a.png": "for a"}))
    with pytest.raises(ValueError, match="b.png"):
        load_prompts(mapping, files)


def test_markdown_table_keeps_paper_order():
    table = markdown_table({"lpips": 0.7, "dino": 0.61234, "clip_i": 0.8})
    assert table.splitlines()[0] == "| DINO | CLIP-I | LPIPS |"
    assert table.splitlines()[2] == "| 0.6123 | 0.8000 | 0.7000 |"
