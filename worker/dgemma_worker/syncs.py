"""Counting the operations that make a CPU wait for an accelerator (host-device synchronizations).

On a GPU each of these stalls the host until the device has caught up: reading a tensor's value
(`.item()`, `bool(t)`, `int(t)`, `.tolist()`, the `_local_scalar_dense` they dispatch), data-dependent
shapes (`nonzero`, boolean-mask indexing, `masked_select`, `unique`), `torch.equal`, and building a
device tensor from a Python list. The counter sees them on CPU tensors too, so the step's sync budget
is tested without a GPU (`tests/engine/test_step_syncs.py`, `bench/bench_gpu.py --smoke`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_SYNCING_OPS = {
    "aten::_local_scalar_dense",
    "aten::nonzero",
    "aten::equal",
    "aten::is_nonzero",
    "aten::masked_select",
    "aten::_unique2",
    "aten::unique_consecutive",
    "aten::unique_dim",
}
_INDEX_OPS = {"aten::index", "aten::index_put_", "aten::index_put", "aten::_index_put_impl_"}


def _bool_index(args: tuple[Any, ...]) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


class _Dispatch(TorchDispatchMode):
    def __init__(self, seen: Counter[str]) -> None:
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        name = func._schema.name
        if name in _SYNCING_OPS or (name in _INDEX_OPS and _bool_index(args)):
            self.seen[name + (" (boolean mask)" if name in _INDEX_OPS else "")] += 1
        return func(*args, **(kwargs or {}))


class _Function(TorchFunctionMode):
    def __init__(self, seen: Counter[str]) -> None:
        super().__init__()
        self.seen = seen

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.tolist:
            self.seen["Tensor.tolist"] += 1
        elif func in (torch.tensor, torch.as_tensor) and args and not isinstance(args[0], torch.Tensor):
            self.seen["torch.tensor(host data)"] += 1
        return func(*args, **kwargs)


class SyncCounter:
    """A context manager that counts host-syncing operations by name (see the module docstring)."""

    def __init__(self) -> None:
        self.seen: Counter[str] = Counter()
        self._modes = (_Function(self.seen), _Dispatch(self.seen))

    @property
    def total(self) -> int:
        return sum(self.seen.values())

    def __enter__(self) -> SyncCounter:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Stop counting inside (the counter must be the innermost mode): around a compiled graph, which
        dynamo will not run under a dispatch mode. A graph compiled with `fullgraph=True` holds no host
        sync anyway: a value read or a data-dependent shape would have broken it."""
        self.__exit__(None, None, None)
        try:
            yield
        finally:
            self.__enter__()
