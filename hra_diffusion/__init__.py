"""HRA Studio's library: Householder Reflection Adaptation for diffusers models.

Quick use::

    from hra_diffusion import HRAConfig, add_hra, hra_parameters, save_hra, load_hra
    add_hra(unet, HRAConfig(r=8))                      # W -> W H_1 ... H_8, identity at start
    optimizer = torch.optim.AdamW(hra_parameters(unet), lr=1e-4)
    save_hra(unet, "subject.safetensors")
"""

from .config import HRAConfig
from .io import AdapterFileError, AdapterMismatchError, load_hra, read_hra_metadata, save_hra
from .layers import HRALayer
from .model import (
    active_adapters,
    add_hra,
    disable_hra,
    hra_adapters,
    hra_layers,
    hra_parameters,
    hra_state_dict,
    merge_hra,
    orthogonality_loss,
    remove_hra,
    set_active_adapters,
    set_hra_form,
    set_hra_state_dict,
    unmerge_hra,
)

__all__ = [
    "AdapterFileError",
    "AdapterMismatchError",
    "HRAConfig",
    "HRALayer",
    "active_adapters",
    "add_hra",
    "disable_hra",
    "hra_adapters",
    "hra_layers",
    "hra_parameters",
    "hra_state_dict",
    "load_hra",
    "merge_hra",
    "orthogonality_loss",
    "read_hra_metadata",
    "remove_hra",
    "save_hra",
    "set_active_adapters",
    "set_hra_form",
    "set_hra_state_dict",
    "unmerge_hra",
]
