"""Optimizers and learning-rate schedules for the trainer.

Each parameter group carries its own learning rate and weight decay (new-token embeddings vs. LoRA / UNet).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
from diffusers.optimization import SchedulerType, get_scheduler

OPTIMIZERS = ("adamw", "prodigy", "adamw8bit")
SCHEDULERS = tuple(s.value for s in SchedulerType if s.value != "piecewise_constant")


class OptimizerError(ValueError):
    """An optimizer/scheduler setting that cannot work here, one line."""


@dataclass
class ParamGroup:
    name: str  # "embeddings", "lora" or "unet"
    params: list[torch.nn.Parameter]
    lr: float
    weight_decay: float


@dataclass(frozen=True)
class ProdigySettings:
    """Community settings for Prodigy on LoRA (lr 1.0: Prodigy estimates the step size itself)."""

    d_coef: float = 1.0
    betas: tuple[float, float] = (0.9, 0.99)
    safeguard_warmup: bool = True
    use_bias_correction: bool = True
    decouple: bool = True


def check_optimizer_available(kind: str, device: torch.device) -> None:
    """Fail fast (before any model loads) when ``kind`` cannot run on ``device``."""
    if kind not in OPTIMIZERS:
        raise OptimizerError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {kind!r}")
    if kind == "adamw8bit":
        if device.type != "cuda":
            raise OptimizerError("optimizer adamw8bit needs a CUDA GPU; use adamw or prodigy on this machine")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise OptimizerError("optimizer adamw8bit needs the bitsandbytes package; use adamw or prodigy")


def build_optimizer(groups: list[ParamGroup], kind: str, device: torch.device,
                    prodigy: ProdigySettings = ProdigySettings()) -> torch.optim.Optimizer:
    check_optimizer_available(kind, device)
    param_groups = [
        {"params": g.params, "lr": g.lr, "weight_decay": g.weight_decay, "name": g.name} for g in groups if g.params
    ]
    if kind == "adamw":
        return torch.optim.AdamW(param_groups, fused=True)  # one kernel per step, on CUDA and on CPU
    if kind == "prodigy":
        from prodigyopt import Prodigy

        for group in param_groups:
            group["lr"] = 1.0
        return Prodigy(param_groups, lr=1.0, betas=prodigy.betas, d_coef=prodigy.d_coef,
                       safeguard_warmup=prodigy.safeguard_warmup, use_bias_correction=prodigy.use_bias_correction,
                       decouple=prodigy.decouple)
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(param_groups)


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int,
                    num_cycles: int = 1, power: float = 1.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Any diffusers LR schedule, with linear warmup over ``warmup_steps`` optimizer steps."""
    if name not in SCHEDULERS:
        raise OptimizerError(f"lr_scheduler must be one of {', '.join(SCHEDULERS)}; got {name!r}")
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps,
                         num_cycles=num_cycles, power=power)


# ------------------------------------------------------------------ state as safetensors + JSON (no pickle)


def split_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer ``state_dict`` → (tensors for safetensors, JSON-able rest). Inverse: :func:`join_optimizer_state`."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for index, state in state_dict["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().clone()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"scalars": scalars, "param_groups": state_dict["param_groups"]}


def join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for index, values in rest["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in rest["param_groups"]]
    return {"state": state, "param_groups": groups}
