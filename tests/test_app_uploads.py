"""Upload limits: gradio has one server-wide limit, the adapters'; photos (training photos and the control image) are
held to their own, far smaller limits on the uploaded file, before anything decodes it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

gr = pytest.importorskip("gradio")
from gradio.data_classes import ImageData  # noqa: E402

from app.host import MAX_ADAPTER_BYTES  # noqa: E402
from app.photos import MAX_PHOTO_BYTES  # noqa: E402
from app.studio import Studio  # noqa: E402
from app.ui import Handlers, build  # noqa: E402
from hra_diffusion.images import ImageError  # noqa: E402


@pytest.fixture(scope="module")
def studio(tmp_path_factory, tiny_sd):
    studio = Studio(tmp_path_factory.mktemp("data"), base_model=str(tiny_sd), warm=False)
    yield studio
    studio.close()


@pytest.fixture
def small_limit(monkeypatch):
    monkeypatch.setattr("app.photos.MAX_PHOTO_BYTES", 2**20)


def noise_file(path: Path, size: int) -> Path:
    """Bytes that are no image: a decoder would say so, so a size message proves the size was checked first."""
    path.write_bytes(os.urandom(size))
    return path


def test_photos_have_a_far_smaller_limit_than_adapters():
    assert MAX_PHOTO_BYTES <= MAX_ADAPTER_BYTES // 64


def test_training_photos_over_the_limit_are_refused_before_decoding(studio, tmp_path, small_limit):
    big = noise_file(tmp_path / "big.jpg", 2 * 2**20)
    good, rejected = studio.check_photos([big])
    assert good == []
    assert rejected == [
        {"file": "big.jpg", "reason": "file is 2.0 MB, over the 1 MB limit for photos; downscale it or save it as JPEG"}
    ]


def test_the_control_image_arrives_as_an_undecoded_path(studio, tmp_path):
    """gradio's own Image(type="pil") decodes every upload before any handler runs; a path leaves that to us."""
    component = next(
        block for block in build(studio).blocks.values() if getattr(block, "elem_id", None) == "control-image"
    )
    bomb = tmp_path / "bomb.png"
    Image.new("1", (9000, 9000)).save(bomb)  # 81 MP, a few kB on disk
    assert component.preprocess(ImageData(path=str(bomb), orig_name="bomb.png")) == str(bomb)


def test_the_control_image_is_held_to_the_photo_limits(studio, tmp_path, small_limit):
    h = Handlers(studio)
    thin = tmp_path / "thin.png"
    Image.new("RGB", (1, 4000)).save(thin)
    bomb = tmp_path / "bomb.png"
    Image.new("1", (9000, 9000)).save(bomb)
    cases = {
        noise_file(tmp_path / "big.png", 2 * 2**20): "over the 1 MB limit for photos",
        thin: "too thin",
        bomb: "pixels, over the limit",
    }
    for path, message in cases.items():
        with pytest.raises(ImageError, match=message):
            h.preview_condition(str(path), "none")
        with pytest.raises(ImageError, match=message):  # checked before anything is generated
            h.generate("a box", None, "", 0, 2, 7.5, 1, 1.0, "edges", str(path), "none", 1.0)
    fine = tmp_path / "fine.png"
    Image.new("RGB", (40, 30), "red").save(fine)
    assert h.preview_condition(str(fine), "none").size == (40, 30)
    assert h.preview_condition(None, "none") is None
