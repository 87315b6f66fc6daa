"""Peak memory of live tensors on any device, CPU included (torch only, so any process can import it).

``common`` re-exports :class:`TensorMemoryTracker`; ``reference_step.py``'s workers import it directly,
because they may run with another ``ldm`` package on the path.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary


class TensorMemoryTracker(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the context and still alive (any device, incl. CPU).

    An op output counts as new memory when its storage is not one of the op's inputs' (views and in-place
    results are not allocations) and was not seen before; it stops counting when the storage is freed. Memory
    allocated inside a kernel without a tensor (library workspaces) is not seen.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def _release(self, nbytes: int) -> None:
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ARG002 - torch's signature
        kwargs = kwargs or {}
        inputs = {id(t.untyped_storage()) for t in _tensors((args, kwargs))}
        out = func(*args, **kwargs)
        for t in _tensors(out):
            storage = t.untyped_storage()
            if id(storage) in inputs or storage in self._seen:
                continue
            nbytes = storage.nbytes()
            self._seen[storage] = nbytes
            weakref.finalize(storage, self._release, nbytes)
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        return out


def _tensors(obj: object) -> list[torch.Tensor]:
    """The tensors in an op's arguments or outputs (nested tuples, lists, dicts); a few times faster than
    ``torch.utils._pytree.tree_flatten``, which dominated the tracker's cost per operator."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, tuple | list):
        return [t for item in obj for t in _tensors(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _tensors(item)]
    return []
