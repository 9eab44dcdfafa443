"""torch.compile for the engine's hot path and the policies' device plans, never fatal.

`compiled(fn)` compiles `fn` (one graph, no graph breaks) the first time it runs; sizes that change
between calls (units, rows) become dynamic on the recompile that follows, while model sizes stay
static so that the generated kernels keep their vectorised loads. A compilation that fails falls
back to `fn` itself and says so once on stderr. Callers compile only on CUDA; on the CPU `fn` runs
as written: plain PyTorch, the reference. `dynamic=False` keeps every size static (one compilation
per shape): for code whose kernel choice needs static sizes (attention.py's flex backend).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

_CACHE: dict[tuple[Callable, bool | None], Callable] = {}


def compiled(fn: Callable, dynamic: bool | None = None) -> Callable:
    if (fn, dynamic) not in _CACHE:
        _CACHE[fn, dynamic] = _Compiled(fn, dynamic)
    return _CACHE[fn, dynamic]


class _Compiled:
    def __init__(self, fn: Callable, dynamic: bool | None = None):
        self.fn = fn
        self.dynamic = dynamic
        self.compiled: Callable | None = None
        self.failed = False

    def __call__(self, *args, **kwargs):
        if self.failed:
            return self.fn(*args, **kwargs)
        if self.compiled is None:
            import torch._dynamo

            config = torch._dynamo.config
            config.cache_size_limit = max(config.cache_size_limit, 64)
            self.compiled = torch.compile(self.fn, fullgraph=True, dynamic=self.dynamic)
        try:
            return self.compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - never fatal: run it as written
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise
            self.failed = True
            first = str(e).splitlines()[0] if str(e) else ""
            print(
                f"[v2] torch.compile of {self.fn.__qualname__} failed ({type(e).__name__}: "
                f"{first}); running it uncompiled",
                file=sys.stderr,
            )
            return self.fn(*args, **kwargs)
