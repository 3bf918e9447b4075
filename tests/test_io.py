"""save_hra / load_hra: round trip, metadata, and every way a file or a model can be wrong."""

import json

import pytest
import torch
from safetensors.torch import save_file

from hra_diffusion import (
    AdapterFileError,
    AdapterMismatchError,
    HRAConfig,
    add_hra,
    hra_adapters,
    hra_parameters,
    hra_state_dict,
    load_hra,
    read_hra_metadata,
    save_hra,
)


def trained(unet, config, seed=0):
    add_hra(unet, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hra_parameters(unet):
            p.add_(0.3 * torch.randn(p.shape, generator=gen) * p.norm(dim=0, keepdim=True))
    return unet


def outputs(unet):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return unet(torch.randn(1, 4, 32, 32, generator=gen), 10, torch.randn(1, 7, 32, generator=gen)).sample


@pytest.mark.parametrize("config", [HRAConfig(r=4, lambda_orth=1e-3), HRAConfig(r=3, apply_GS=True)])
def test_round_trip(tiny_unet, tmp_path, config):
    source = trained(tiny_unet(), config)
    path = save_hra(source, tmp_path / "subject.safetensors", metadata={"base_model": "tiny", "steps": 12})
    assert not [p for p in tmp_path.iterdir() if p.name != "subject.safetensors"], "no temp file left behind"
    meta = read_hra_metadata(path)
    assert meta["base_model"] == "tiny" and json.loads(meta["steps"]) == 12
    assert meta["adapters"]["unet"]["config"]["r"] == config.r
    target = load_hra(tiny_unet(), path)
    assert hra_adapters(target)["default"] == config
    for key, value in hra_state_dict(source).items():
        assert torch.equal(hra_state_dict(target)[key], value)
    torch.testing.assert_close(outputs(target), outputs(source))
    assert (outputs(target) - outputs(tiny_unet())).abs().max() > 1e-4
    assert all(p.requires_grad for p in hra_parameters(target))


def test_components_and_second_adapter(tiny_unet, tiny_sd, tmp_path):
    from transformers import CLIPTextModel

    unet = trained(tiny_unet(), HRAConfig(r=2))
    text_encoder = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder")
    add_hra(text_encoder, HRAConfig(r=2, target_modules=("q_proj", "v_proj")))
    path = save_hra({"unet": unet, "text_encoder": text_encoder}, tmp_path / "both.safetensors")
    assert set(read_hra_metadata(path)["adapters"]) == {"unet", "text_encoder"}
    plain_unet = load_hra(tiny_unet(), path)  # a bare UNet takes its own part
    torch.testing.assert_close(outputs(plain_unet), outputs(unet))
    load_hra(plain_unet, path, adapter_name="again")
    assert set(hra_adapters(plain_unet)) == {"default", "again"}
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        load_hra(plain_unet, path)


def test_mismatched_model_names_layers(tiny_unet, tmp_path):
    from diffusers import UNet2DConditionModel

    path = save_hra(trained(tiny_unet(), HRAConfig(r=2)), tmp_path / "a.safetensors")
    other = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=48, sample_size=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
    )
    with pytest.raises(AdapterMismatchError, match=r"attn2\.to_k: stored \(out, in\) \(32, 32\), model has \(32, 48\)"):
        load_hra(other, path)
    assert not hra_adapters(other), "a refused load adds nothing"


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing", "foreign", "nan"])
def test_bad_files_are_refused_clearly(tiny_unet, tmp_path, damage):
    path = save_hra(trained(tiny_unet(), HRAConfig(r=2)), tmp_path / "a.safetensors")
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        match = "truncated or corrupt"
    elif damage == "garbage":
        path.write_bytes(b"\x80\x04K\x01." + b"x" * 100)  # a pickle, for instance
        match = "not a readable safetensors file"
    elif damage == "missing":
        path = tmp_path / "nope.safetensors"
        match = "no such adapter file"
    elif damage == "foreign":
        save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, path)
        match = "not an HRA Studio adapter"
    else:
        header = read_hra_metadata(path)
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata()
        first = header["tensor_keys"][0]
        tensors[first][0, 0] = float("nan")
        save_file(tensors, path, metadata=meta)
        match = "NaN"
    unet = tiny_unet()
    with pytest.raises(AdapterFileError, match=match):
        load_hra(unet, path)
    assert not hra_adapters(unet)


def test_save_refuses_nan_and_keeps_old_file(tiny_unet, tmp_path):
    unet = trained(tiny_unet(), HRAConfig(r=2))
    path = save_hra(unet, tmp_path / "a.safetensors")
    good = path.read_bytes()
    with torch.no_grad():
        next(hra_parameters(unet))[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        save_hra(unet, path)
    assert path.read_bytes() == good


def test_text_encoder_paths_load_across_transformers_layouts(tiny_sd, tmp_path):
    """transformers 5 dropped CLIPTextModel's `text_model.` level; files from either layout must load."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    def encoder():
        return CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder")

    source = encoder()
    add_hra(source, HRAConfig(r=2, target_modules=("q_proj",)))
    with torch.no_grad():
        for p in hra_parameters(source):
            p.add_(torch.randn_like(p))
    path = save_hra({"text_encoder": source}, tmp_path / "te.safetensors")
    meta = read_hra_metadata(path)
    flip = "text_model."
    layers = meta["adapters"]["text_encoder"]["layers"]
    prefixed = not next(iter(layers)).startswith(flip)

    def other(p):
        return f"{flip}{p}" if prefixed else p[len(flip):]

    meta["adapters"]["text_encoder"]["layers"] = {other(p): s for p, s in layers.items()}
    with safe_open(str(path), "pt") as f:
        tensors = {"text_encoder." + other(k[len("text_encoder."):].rpartition(".")[0]) + ".hra_u": f.get_tensor(k)
                   for k in f.keys()}
        raw = f.metadata()
    raw["adapters"] = json.dumps(meta["adapters"])
    save_file(tensors, path, metadata=raw)
    target = load_hra(encoder(), path)
    ids = torch.tensor([[49406, 320, 1125, 49407]])
    with torch.no_grad():
        torch.testing.assert_close(target(ids).last_hidden_state, source(ids).last_hidden_state)
