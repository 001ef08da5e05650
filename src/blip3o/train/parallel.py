"""How a stage's trained parts spread over the training processes, applied from outside the model code (which
stays single-device), as torchtitan does: activation checkpointing first, then FSDP2.

    ddp   every process holds the whole model; DDP averages the trained parameters' gradients (the trainer's
          `StageLoss`). For parts that fit one device with their AdamW state.
    fsdp  each repeated block of every trained part, then the part itself, is sharded over the processes
          (`torch.distributed.fsdp.fully_shard`): parameters, gradients, AdamW state and EMA are DTensors of
          which each process holds 1/N. Trained parameters outside those parts (the queries, training heads)
          stay replicated; their gradients are averaged by one all_reduce a step. Frozen parts stay whole.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from blip3o.distributed import World
from blip3o.model import Blip3o
from blip3o.train.stages import Stage

PARALLELS = ("ddp", "fsdp")  # TrainConfig.parallel
# The modules of a part FSDP shards after its blocks, where they are not the part alone: the understanding stage
# calls the backbone's Qwen2.5-VL body and its vocabulary projection apart, so each is a unit; the last one listed
# is the part's root (the Qwen2.5-VL model, which holds every parameter of the backbone)
UNITS = {"backbone": ("model.model", "model.lm_head", "model")}
# Methods the model calls instead of `forward` (`DiT.loss`, the encoders' `encode`, a DiT block's
# `cross_key_value` and its norm's `modulation`): FSDP gathers a unit's parameters around them as around `forward`.
# A module inside a block that has one is a unit of its own, so that its parameters are gathered where it runs.
ENTRY_METHODS = ("loss", "encode", "embed", "cross_key_value", "modulation")


def trained_parts(model: Blip3o, stage: Stage) -> dict[str, list[nn.Module]]:
    """The modules `stage` trains, by name, each as the units FSDP shards after its blocks (its root last; a
    trained bare parameter, the queries, is no module and is left out)."""
    parts = {}
    for name in stage.trains:
        part = getattr(model, name)
        if isinstance(part, nn.Module):
            parts[name] = [part.get_submodule(path) for path in UNITS[name]] if name in UNITS else [part]
    return parts


def repeated_blocks(module: nn.Module) -> list[nn.Module]:
    """The entries of the outermost ModuleLists inside `module` that hold two or more modules of one class with
    parameters: a transformer's layers, an encoder's blocks."""
    blocks = []
    for child in module.children():
        if (isinstance(child, nn.ModuleList) and len(child) > 1 and len({type(m) for m in child}) == 1
                and any(True for _ in child[0].parameters())):
            blocks.extend(child)
        else:
            blocks.extend(repeated_blocks(child))
    return blocks


def checkpoint_activations(model: Blip3o, stage: Stage) -> None:
    """Recompute each repeated block's activations during backward instead of keeping them (the same loss and
    gradients, less memory, about one more forward pass). The parameter names do not change."""
    for *_, root in trained_parts(model, stage).values():
        for block in repeated_blocks(root):
            checkpoint(block)


def shard(model: Blip3o, stage: Stage, world: World) -> list[FSDPModule]:
    """FSDP2 over the trained parts: each repeated block, then the part (`UNITS`); returns the parts
    (each an FSDPModule).
    A stage that trains LoRA adapters is refused: it merges them into whole weights at export."""
    if getattr(stage, "lora", None) is not None:
        raise ValueError(f"parallel fsdp: the {stage.name} stage with lora_rank > 0 merges its adapters into the "
                         "weights at export; train it with parallel ddp")
    mesh = dist.device_mesh.init_device_mesh(model.device.type, (world.size,))
    roots = []
    for *units, root in trained_parts(model, stage).values():
        shared = {id(p) for unit in units for p in unit.parameters()}
        if len(shared) < sum(1 for unit in units for _ in unit.parameters()):
            raise ValueError("parallel fsdp: the backbone's vocabulary projection shares its weight with the token "
                             "embedding (tie_word_embeddings); train it with parallel ddp")
        for block in repeated_blocks(root):
            for inner in block.modules():
                if inner is not block and entry_methods(inner):
                    shard_unit(inner, mesh)
            shard_unit(block, mesh)
        for unit in units:
            shard_unit(unit, mesh)
        roots.append(shard_unit(root, mesh))
    return roots


def entry_methods(module: nn.Module) -> list[str]:
    """The `ENTRY_METHODS` `module`'s class defines."""
    return [m for m in ENTRY_METHODS if callable(getattr(type(module), m, None))]


def shard_unit(module: nn.Module, mesh) -> FSDPModule:
    """`fully_shard(module)`, its entry methods gathering its parameters as its forward does."""
    fully_shard(module, mesh=mesh)
    for method in entry_methods(module):
        register_fsdp_forward_method(module, method)
    return module


def parallelize(model: Blip3o, stage: Stage, world: World, parallel: str, activation_checkpointing: bool
                ) -> list[FSDPModule]:
    """Apply activation checkpointing (when asked), then FSDP2 (parallel "fsdp" over more than one process);
    returns the sharded parts (none otherwise). The trained parameters are the model's new ones afterwards."""
    if activation_checkpointing:
        checkpoint_activations(model, stage)
    if parallel == "fsdp" and world.size > 1:
        return shard(model, stage, world)
    return []


def optimizer_groups(named: list[tuple[str, nn.Parameter]], model: Blip3o, stage: Stage, parallel: str
                     ) -> list[dict]:
    """The optimizer's parameter groups: one under ddp; under fsdp the parameters of the trained parts (sharded
    on more than one process) and the others (replicated), apart, whatever the number of processes: a foreach
    update takes sharded and plain tensors in separate calls, and a checkpoint's groups are the same at any."""
    if parallel == "ddp":
        return [{"params": [p for _, p in named]}]
    parts = tuple(f"{name}." for name in stage.trains if isinstance(getattr(model, name), nn.Module))
    groups = [[p for n, p in named if n.startswith(parts) == inside] for inside in (True, False)]
    return [{"params": group} for group in groups if group]


def average_replicated_grads(params: list[nn.Parameter], world: World) -> None:
    """Average the gradients of the replicated (not sharded) trained parameters over the processes in one
    all_reduce. A parameter no process used keeps no gradient, as on one process; one that some used gets
    zeros where it was unused."""
    params = [p for p in params if not isinstance(p, DTensor)]
    if world.size == 1 or not params:
        return
    used = torch.tensor([float(p.grad is not None) for p in params])
    flat = torch.cat([used] + [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                               for p in params]).to(params[0].device)
    dist.all_reduce(flat)
    used, grads = flat[:len(params)], flat[len(params):].div_(world.size)
    for p, any_used, grad in zip(params, used.tolist(), grads.split([p.numel() for p in params]), strict=True):
        p.grad = grad.view_as(p).to(p.dtype) if any_used else None


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over sharded (DTensor) and replicated gradients together: the norm is
    the global one, of every gradient whole; returns it."""
    groups = [[p for p in params if p.grad is not None and isinstance(p, DTensor) == sharded]
              for sharded in (True, False)]
    norms = []
    for group in groups:
        if group:
            norm = torch.nn.utils.get_total_norm([p.grad for p in group])
            norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if not norms:
        return torch.tensor(0.0)
    total = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack([n.cpu() for n in norms]))
    for group in groups:
        if group:
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total.to(group[0].device))
    return total


def foreach_lerp_(targets: list[torch.Tensor], sources: list[torch.Tensor], weight: float) -> None:
    """targets += weight * (sources - targets), sharded and plain tensors each in one foreach call."""
    for sharded in (True, False):
        pairs = [(t, s) for t, s in zip(targets, sources, strict=True) if isinstance(t, DTensor) == sharded]
        if pairs:
            torch._foreach_lerp_([t for t, _ in pairs], [s for _, s in pairs], weight)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a sharded one gathered from every process (all must call), a plain one as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


class TrainedParams(nn.Module):
    """The trained parameters under their names ('.' written as '/'), as one module: what the optimizer's and
    the parameters' state dicts (`torch.distributed.checkpoint.state_dict`) are keyed by."""

    def __init__(self, named: list[tuple[str, nn.Parameter]]) -> None:
        super().__init__()
        self.trained = nn.ParameterDict({n.replace(".", "/"): p for n, p in named})
