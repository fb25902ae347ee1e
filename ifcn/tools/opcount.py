"""Counts what a code path would launch on a GPU, on any machine: kernel ops, host syncs and bytes written.

Eager CUDA costs the host ~5-10 us per launched op, and every op whose output shape or value the
host must know (`nonzero`, boolean indexing, `item`, ...) stalls the stream until the GPU catches
up. On CPU the same Python dispatches the same aten ops, so both are counted here with a
`TorchDispatchMode`; counts are deterministic where times are not, so tests can hold budgets.

    with OpCounter() as c:
        predictor.proposals(images)
    c.counts  # OpCounts(kernel_ops=..., sync_ops=..., host_reads=...)

Definitions (issue 14):
- kernel op: an aten op that reaches a kernel; views, aliases and allocations without a fill
  (`empty*`) are left out, and `.to()` to the tensor's own dtype/device never dispatches at all;
- sync op: an aten op whose output shape or value the host must wait for (SYNC_OPS, boolean
  indices, `repeat_interleave` without `output_size`); also counted as a kernel op except the
  scalar reads `_local_scalar_dense`, `item` and `is_nonzero` (`item`, `int(t)`, `bool(t)`: under
  `torch.inference_mode`, as Predictor runs, they dispatch `item` or `is_nonzero` themselves), a
  copy, not a kernel;
- host read: a read of tensor data by the host outside aten (`.tolist()`, `.numpy()`, `.cpu()`,
  `.to("cpu")`), seen by wrapping those methods while counting.
syncs = sync_ops + host_reads.
- bytes written: the size of every kernel op's outputs (numel x element size), a lower bound on
  the device memory traffic (reads come on top); in-place scatters (`index_put_`, `index_add_`,
  `scatter_`, ...) count what they write (their source or index), not the whole target. Summed
  by aten name (`bytes_by_op`) and by the innermost `stage(name)` the code runs in
  (`bytes_by_stage`, "other" outside any): GPUs are bound by bytes as well as by launches.

    with stage("nms"):   # no cost when nothing counts: a name pushed on a list
        ...
"""
from __future__ import annotations

import collections
import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten

# Ops whose output size or value depends on tensor data: the host must wait for the device.
SYNC_OPS = frozenset({
    aten._local_scalar_dense.default, aten.item.default, aten.nonzero.default, aten.masked_select.default, aten.equal.default,
    aten.bincount.default, aten._unique.default, aten._unique2.default, aten.unique_dim.default,
    aten.unique_consecutive.default, aten.unique_dim_consecutive.default, aten.is_nonzero.default,
    aten.allclose.default,
})
# Not kernels: memory allocations without a fill, and metadata.
NOT_KERNELS = frozenset({
    aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default, aten.new_empty.default,
    aten.new_empty_strided.default, aten.detach.default, aten.lift_fresh.default, aten.alias.default,
    aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default, aten.sym_storage_offset.default,
    aten.is_same_size.default, aten.resize_.default,
})
SCALAR_READS = frozenset({aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default})
# Tensor methods that read data on the host (on a GPU: a device-to-host copy that waits).
HOST_READ_METHODS = ("tolist", "numpy", "cpu")
# In-place writes into part of a target: they write their source (or as many elements as their index).
PARTIAL_WRITES = {
    aten.index_put_.default: 2, aten._index_put_impl_.default: 2, aten.index_add_.default: 3,
    aten.index_copy_.default: 3, aten.scatter_.src: 3, aten.scatter_.value: 2, aten.scatter_add_.default: 3,
    aten.scatter_reduce_.two: 3, aten.index_fill_.int_Scalar: 2,
}
_STAGES: list[str] = ["other"]


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Names the bytes written inside (OpCounter.bytes_by_stage); the innermost name wins."""
    _STAGES.append(name)
    try:
        yield
    finally:
        _STAGES.pop()


@dataclass(frozen=True)
class OpCounts:
    kernel_ops: int
    sync_ops: int
    host_reads: int
    bytes_written: int = 0

    @property
    def syncs(self) -> int:
        return self.sync_ops + self.host_reads

    def per(self, n: int) -> dict[str, float]:
        """Counts divided by n (e.g. images of the batch)."""
        return {"kernel_ops": self.kernel_ops / n, "syncs": self.syncs / n, "bytes_written": self.bytes_written / n}


@dataclass
class OpCounter(TorchDispatchMode):
    """Counts kernel ops, sync ops and host reads of everything run inside `with` (see module doc).

    by_op: kernel ops by aten name, and syncs by name (prefixed "sync:"), to find what to cut;
    bytes_by_op, bytes_by_stage: bytes written by aten name and by `stage`.
    """

    kernel_ops: int = 0
    sync_ops: int = 0
    host_reads: int = 0
    bytes_written: int = 0
    by_op: collections.Counter = field(default_factory=collections.Counter)
    bytes_by_op: collections.Counter = field(default_factory=collections.Counter)
    bytes_by_stage: collections.Counter = field(default_factory=collections.Counter)

    def __post_init__(self) -> None:
        super().__init__()
        self._saved: dict[str, Callable[..., Any]] = {}
        self._reading = False  # inside a host read: its own aten ops are the read, not more work

    @property
    def counts(self) -> OpCounts:
        return OpCounts(self.kernel_ops, self.sync_ops, self.host_reads, self.bytes_written)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kernel = not self._reading and self._count(func, args, kwargs)
        out = func(*args, **kwargs)
        if kernel:
            written = _bytes_written(func, args, kwargs, out)
            self.bytes_written += written
            self.bytes_by_op[func.name()] += written
            self.bytes_by_stage[_STAGES[-1]] += written
        return out

    def _count(self, func, args, kwargs) -> bool:
        """Counts one dispatched op; True if it is a kernel (it writes)."""
        name = func.name() if hasattr(func, "name") else str(func)
        sync = func in SYNC_OPS or _data_dependent(func, args, kwargs)
        if sync:
            self.sync_ops += 1
            self.by_op[f"sync:{name}"] += 1
        if func in SCALAR_READS or func in NOT_KERNELS or func.is_view:
            return False
        self.kernel_ops += 1
        self.by_op[name] += 1
        return True

    def __enter__(self) -> "OpCounter":
        for method in HOST_READ_METHODS:
            self._wrap(method, lambda t, *a, **k: True)
        self._wrap("to", _to_host)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        for method, original in self._saved.items():
            setattr(torch.Tensor, method, original)
        self._saved.clear()

    def _wrap(self, method: str, is_read: Callable[..., bool]) -> None:
        original = getattr(torch.Tensor, method)
        self._saved[method] = original

        @functools.wraps(original)
        def wrapper(t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if self._reading or not is_read(t, *args, **kwargs):
                return original(t, *args, **kwargs)
            self.host_reads += 1
            self.by_op[f"read:{method}"] += 1
            self._reading = True
            try:
                return original(t, *args, **kwargs)
            finally:
                self._reading = False

        setattr(torch.Tensor, method, wrapper)


def _to_host(t: torch.Tensor, *args: Any, **kwargs: Any) -> bool:
    """`.to(...)` that moves data to the host (on CPU a no-op, on a GPU a waiting copy)."""
    target = kwargs.get("device")
    for a in args:
        if isinstance(a, (str, torch.device)):
            target = a
        elif isinstance(a, torch.Tensor):
            target = a.device
    return target is not None and torch.device(target).type == "cpu"


def _nbytes(tree: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor))


def _bytes_written(func, args, kwargs, out) -> int:
    """Bytes a kernel op writes: its outputs, or for a partial in-place write its source/index."""
    at = PARTIAL_WRITES.get(func)
    if at is None:
        return _nbytes(out)
    target = args[0]
    if func in (aten.index_put_.default, aten._index_put_impl_.default):
        return _indexed_numel(target, args[1]) * target.element_size()
    src = args[at] if len(args) > at else kwargs.get("src", kwargs.get("source"))
    if isinstance(src, torch.Tensor):
        return src.numel() * target.element_size()
    index = args[at - 1]  # scatter_.value / index_fill_: as many elements as the index
    dims = 1 if func is aten.index_fill_.int_Scalar else 0
    rest = target.numel() // max(1, target.shape[args[1]]) if dims and target.dim() else 1
    return index.numel() * rest * target.element_size()


def _indexed_numel(target: torch.Tensor, indices: Any) -> int:
    """Elements `target[indices]` selects (what index_put_ writes)."""
    shapes, dim, rest = [], 0, 1
    for i in indices:
        if i is None:
            rest *= target.shape[dim]
            dim += 1
        elif i.dtype in (torch.bool, torch.uint8):
            shapes.append((int(i.sum()),))
            dim += i.dim()
        else:
            shapes.append(tuple(i.shape))
            dim += 1
    for d in range(dim, target.dim()):
        rest *= target.shape[d]
    picked = torch.Size(torch.broadcast_shapes(*shapes)).numel() if shapes else 1
    return picked * rest


def _data_dependent(func, args, kwargs) -> bool:
    """Boolean-mask indexing and repeat_interleave without output_size: output shapes from data."""
    if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices)
    if func in (aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor):
        return kwargs.get("output_size") is None  # keyword-only in both overloads
    return False
