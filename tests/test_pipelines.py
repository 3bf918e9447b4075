"""The generation helper: loading, adapters in a pipeline, reproducible seeds, clear errors."""

import numpy as np
import pytest
import torch

from hra_diffusion import HRAConfig, add_hra, hra_parameters, save_hra
from hra_diffusion.pipelines import ModelNotFoundError, attach_adapters, generate, load_pipeline


def test_generate_is_reproducible_per_image(tiny_sd):
    pipe = load_pipeline(tiny_sd, device="cpu")
    a = generate(pipe, "a photo of a dog", num_images=2, seed=5, steps=2, height=64, width=64)
    b = generate(pipe, "a photo of a dog", num_images=1, seed=6, steps=2, height=64, width=64)
    assert [im.size for im in a] == [(64, 64), (64, 64)]
    assert np.array_equal(np.asarray(a[1]), np.asarray(b[0])), "image i uses seed + i"
    assert not np.array_equal(np.asarray(a[0]), np.asarray(a[1]))
    c = generate(pipe, "a photo of a dog", num_images=1, seed=5, steps=2, height=64, width=64, scheduler="dpm")
    assert c[0].size == (64, 64)


def test_adapter_changes_images_and_strength_zero_does_not(tiny_sd, tiny_unet, tmp_path):
    unet = tiny_unet()
    add_hra(unet, HRAConfig(r=4))
    with torch.no_grad():
        for p in hra_parameters(unet):
            p.add_(torch.randn_like(p) * p.norm(dim=0, keepdim=True))
    path = save_hra(unet, tmp_path / "subject.safetensors")
    pipe = load_pipeline(tiny_sd, device="cpu")
    kwargs = dict(seed=0, steps=2, height=64, width=64, output_type="np")
    base = generate(pipe, "a qwe dog", **kwargs)[0]
    assert attach_adapters(pipe, [path]) == ["subject"]
    adapted = generate(pipe, "a qwe dog", **kwargs)[0]
    assert np.abs(adapted - base).max() > 1e-3
    attach_adapters(pipe, [path], strengths=[0.0])
    np.testing.assert_allclose(generate(pipe, "a qwe dog", **kwargs)[0], base, atol=1e-5)


def test_missing_model_is_explained(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not a diffusers pipeline folder"):
        load_pipeline(tmp_path)
    with pytest.raises(ModelNotFoundError, match="could not be downloaded"):
        load_pipeline("no-such-user/no-such-model-hra-test")


def test_hub_reachable_tells_an_open_port_from_a_closed_one():
    import socket

    from hra_diffusion.pipelines import hub_reachable

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert hub_reachable(f"http://127.0.0.1:{port}")
    assert not hub_reachable(f"http://127.0.0.1:{port}", timeout=1)


def test_without_a_network_a_hub_id_fails_at_once_or_loads_from_the_cache(tmp_path, monkeypatch):
    """Offline, an uncached hub id used to cost 30 s of retries; now it fails at once, and a cached one is loaded
    with local_files_only instead of being retried."""
    import time

    from huggingface_hub import constants

    import hra_diffusion.pipelines as pipelines

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.setattr(pipelines, "hub_reachable", lambda endpoint: False)
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError, match="cannot be reached.*not in the local Hugging Face cache"):
        load_pipeline("some-user/some-model")
    assert time.monotonic() - start < 2
    snapshot = tmp_path / "models--some-user--some-model" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    (tmp_path / "models--some-user--some-model" / "refs").mkdir()
    (tmp_path / "models--some-user--some-model" / "refs" / "main").write_text("abc123")
    assert pipelines._hub_options("some-user/some-model", None) == {"local_files_only": True}
    monkeypatch.setattr(pipelines, "hub_reachable", lambda endpoint: True)
    assert pipelines._hub_options("some-user/other-model", None) == {}
