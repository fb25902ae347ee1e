"""The op counter against hand-counted cases: what a GPU would launch (kernel ops) and wait for
(sync ops, host reads), counted on CPU.

Run: pytest tests/test_opcount.py -q
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ifcn.tools.opcount import OpCounter

X = torch.arange(10, dtype=torch.float32) / 10


def count(fn) -> tuple[int, int, int]:
    with OpCounter() as c:
        fn()
    return c.kernel_ops, c.sync_ops, c.host_reads


@pytest.mark.parametrize("name, fn, expected", [
    ("one kernel", lambda: X + 1, (1, 0, 0)),
    ("views are free", lambda: X.view(2, 5).t()[0].unsqueeze(0), (0, 0, 0)),
    ("cast to own dtype is free", lambda: X.to(torch.float32), (0, 0, 0)),
    ("a real cast is a kernel", lambda: X.to(torch.float64), (1, 0, 0)),
    ("fixed-shape chain", lambda: torch.topk(X * 2 - 1, 3).values.clamp(0, 1), (4, 0, 0)),
    ("integer index: no sync", lambda: X[torch.tensor([1, 2])], (1, 0, 0)),
    ("nonzero", lambda: torch.nonzero(X > 0.5), (2, 1, 0)),
    ("boolean index", lambda: X[X > 0.5], (2, 1, 0)),
    ("int() reads a scalar", lambda: int(X.sum()), (1, 1, 0)),
    ("bool() reads a scalar", lambda: bool(X.sum() > 1), (2, 1, 0)),
    ("item", lambda: X.max().item(), (1, 1, 0)),
    ("repeat_interleave without output_size", lambda: torch.repeat_interleave(torch.tensor([1, 2, 3])), (1, 1, 0)),
    ("repeat_interleave with output_size", lambda: torch.repeat_interleave(torch.tensor([1, 2, 3]), output_size=6),
     (1, 0, 0)),
    ("tolist", lambda: X.tolist(), (0, 0, 1)),
    ("numpy", lambda: X.numpy(), (0, 0, 1)),
    ("np.asarray reads through numpy()", lambda: np.asarray(X), (0, 0, 1)),
    ("cpu", lambda: X.cpu(), (0, 0, 1)),
    ("to cpu", lambda: X.to("cpu"), (0, 0, 1)),
    ("allocation without fill is free, a fill is not", lambda: (torch.empty(4), torch.zeros(4)), (1, 0, 0)),
])
def test_hand_counted_cases(name: str, fn, expected: tuple[int, int, int]) -> None:
    assert count(fn) == expected, name


def test_scalar_reads_under_inference_mode() -> None:
    """Predictor runs under inference_mode, where int(t) and t.item() dispatch `item`, not
    `_local_scalar_dense`, and bool(t) `is_nonzero`: still one sync each and no kernel."""
    with torch.inference_mode():
        assert count(lambda: int(X.sum())) == (1, 1, 0)
        assert count(lambda: X.max().item()) == (1, 1, 0)
        assert count(lambda: bool(X.sum() > 1)) == (2, 1, 0)


def test_counts_add_up_and_methods_are_restored() -> None:
    tolist = torch.Tensor.tolist
    with OpCounter() as c:
        for _ in range(3):
            (X * 2).tolist()
        int((X > 0.5).sum())
    assert (c.kernel_ops, c.sync_ops, c.host_reads, c.counts.syncs) == (5, 1, 3, 4)
    assert c.by_op["aten::mul.Tensor"] == 3 and c.by_op["read:tolist"] == 3
    assert torch.Tensor.tolist is tolist
    with OpCounter() as again:  # a second counter starts from zero
        X + 1
    assert again.counts.kernel_ops == 1


Y = torch.zeros(1000, dtype=torch.float64)


@pytest.mark.parametrize("name, fn, expected", [
    ("an output's bytes", lambda: X + 1, 40),
    ("views and casts to own dtype write nothing", lambda: X.view(2, 5).t().to(torch.float32), 0),
    ("a cast writes its new dtype", lambda: X.to(torch.float64), 80),
    ("a comparison writes bools", lambda: X > 0.5, 10),
    ("topk writes values and indices", lambda: torch.topk(X, 3), 3 * 4 + 3 * 8),
    ("index_add_ writes its source, not the target", lambda: Y.index_add_(0, torch.tensor([1, 2]),
                                                                          torch.ones(2, dtype=torch.float64)),
     16 + 16),  # ones (2 doubles), then the 2 added (tensor literals are not kernels)
    ("index_put_ with integers writes what it selects", lambda: Y.index_put_((torch.tensor([3, 4, 5]),),
                                                                             torch.tensor(1.0, dtype=torch.float64)),
     24),  # 3 doubles
    ("a boolean index_put_ writes its True elements",
     lambda: Y.__setitem__(Y.new_ones(1000).bool() & (torch.arange(1000) < 7), 2.0),
     8000 + 1000 + 8000 + 1000 + 1000 + 7 * 8),  # ones, bool, arange, <, &, then 7 doubles
])
def test_bytes_written(name: str, fn, expected: int) -> None:
    with OpCounter() as c:
        fn()
    assert c.bytes_written == expected, (name, c.bytes_by_op)


def test_bytes_by_stage_takes_the_innermost_name() -> None:
    from ifcn.tools.opcount import stage
    with OpCounter() as c:
        X + 1
        with stage("outer"):
            X * 2
            with stage("inner"):
                X.double()
            X - 1
    assert c.bytes_by_stage == {"other": 40, "outer": 80, "inner": 80}
    assert c.counts.bytes_written == 200 and c.counts.per(2)["bytes_written"] == 100
