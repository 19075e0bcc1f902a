"""Training checkpoints: model + optimizer tensors in safetensors, the rest as JSON metadata. No pickle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from imgclf.core.files import atomic_write_bytes


def save_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    """Model + optimizer tensors in safetensors, everything else as JSON metadata; atomic."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {
        f"model/{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()
    }
    osd = opt.state_dict()
    scalars: dict[str, Any] = {}
    for pid, st in osd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim/{pid}/{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{pid}/{k}"] = v
    groups = [
        {k: v for k, v in g.items() if k != "params"} | {"params": g["params"]} for g in osd["param_groups"]
    ]
    tensors["rng/torch"] = torch.get_rng_state()
    meta = {"state": json.dumps(state), "param_groups": json.dumps(groups), "scalars": json.dumps(scalars)}
    atomic_write_bytes(path, save(tensors, metadata=meta))


def load_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model/")})
    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optim/"):
            _, pid, name = k.split("/", 2)
            state.setdefault(int(pid), {})[name] = v
    for k, v in json.loads(meta["scalars"]).items():
        pid, name = k.split("/", 1)
        state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    # Fused optimizers walk raw memory, so state loaded as contiguous NCHW next to a
    # channels_last parameter would pair the wrong elements: give it the parameter's layout.
    for g in opt.param_groups:
        for p in g["params"]:
            st = opt.state.get(p, {})
            for k, v in st.items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    st[k] = torch.empty_like(p).copy_(v)
    torch.set_rng_state(tensors["rng/torch"])
    return json.loads(meta["state"])
