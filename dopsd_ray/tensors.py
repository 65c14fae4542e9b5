"""Moving whatever crosses a process boundary: experiences, contexts, snapshots.

A tensor that leaves a process travels on the CPU (a CUDA tensor pickled into Ray's
object store, or into the experience queue's actor, unpickles onto the wrong GPU or
fails on a node without one); the receiver moves it onto its own device. These two
helpers walk any nesting of dataclasses, lists, tuples and dicts, so a field added to
an Experience or a context can never be left behind on the GPU.
"""

import dataclasses
import json
import struct
from collections.abc import Callable, Iterator
from typing import Any

import torch


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """A copy of `obj` with fn applied to every tensor inside it (other values are kept)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: map_tensors(getattr(obj, f.name), fn)
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(x, fn) for x in obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def tensors_in(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside `obj`, however nested (for checks: which devices does it touch?)."""
    found = []
    map_tensors(obj, lambda t: found.append(t) or t)
    return iter(found)


def to_device(obj: Any, device: str | torch.device, non_blocking: bool = False) -> Any:
    """`obj` with every tensor on `device`. From the CPU to a GPU the tensors are pinned
    first, so the copies run asynchronously (Ray unpickles into pageable memory)."""
    device = torch.device(device)
    pin = non_blocking and device.type == "cuda"
    return map_tensors(obj, lambda t: (t.pin_memory() if pin and t.device.type == "cpu" else t)
                       .to(device, non_blocking=non_blocking))


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file held in memory (read from a Storage); {} if none."""
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]).get("__metadata__") or {}
