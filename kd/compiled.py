"""The compiled path of the fused loss: ``torch.compile`` of one block's elementwise work,
with the eager code as the fallback.

:mod:`kd.chunked` computes a block of ``C`` positions as four head products (matrix
multiplications, already one kernel each) around a dozen elementwise passes over the
block's ``(C, V)`` logits: the scale and softcap, the two log-softmaxes, the divergence's
terms, the row sums and the chain rule. Eagerly each pass is one kernel that reads and
writes the whole block; compiled (inductor), they fuse into a few kernels that read the
two blocks of logits once and write the logits gradient once. The head products stay
outside the compiled function.

Settings (``compile`` of a divergence, conf/token_loss/default.yaml):

* ``auto`` (default): compiled on CUDA devices, eager elsewhere (compiling on CPU costs
  seconds per graph and gains little there: the head products dominate);
* ``true``: compiled on any device; ``false``: never.

Shapes: the block's row count is marked dynamic (:func:`torch._dynamo.maybe_mark_dynamic`)
and the temperature, scales, softcaps and the divergence's shape parameter are passed as
0-d tensors, so a run compiles one graph per divergence and dtype, whatever the number of
positions in each step, the size of the last block or the temperature schedule (a block of
one row gets a graph of its own, once: dynamo specializes sizes 0 and 1). The vocabulary is
static (a property of the model).

Fallback: if compiling fails (no C++ compiler for inductor's CPU code, an inductor error,
a torch without dynamo), one warning line names the cause and the eager path computes
this call and every later one; a run never stops for it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from kd import ConfigError

__all__ = ["MODES", "check_mode", "wanted", "Compiled", "BACKEND"]

log = logging.getLogger(__name__)

#: the values of the ``compile`` setting
MODES = ("auto", "true", "false")

#: the torch.compile backend (tests swap in cheaper ones: ``aot_eager``, a compile counter)
BACKEND: Any = "inductor"


def check_mode(mode: Any) -> str:
    """``mode`` as one of :data:`MODES` (YAML booleans accepted), or a ConfigError naming them."""
    if isinstance(mode, bool):
        return "true" if mode else "false"
    text = str(mode).strip().lower()
    if text not in MODES:
        raise ConfigError(f"divergence.compile must be one of auto, true, false (got {mode!r})")
    return text


def wanted(mode: Any, device: torch.device | str) -> bool:
    """Whether the compiled path runs for ``mode`` on ``device`` (auto: CUDA only)."""
    mode = check_mode(mode)
    if mode == "auto":
        return torch.device(device).type == "cuda"
    return mode == "true"


class Compiled:
    """``fn`` compiled on first use, with ``fn`` itself as the fallback: a compile failure
    logs one warning and every later call runs eagerly."""

    def __init__(self, fn: Callable[..., Any], dynamic_args: tuple[int, ...] = ()) -> None:
        self.fn = fn
        self.dynamic_args = dynamic_args  # positional arguments whose dim 0 is the block's rows
        self.failed: str | None = None
        self._compiled: Callable[..., Any] | None = None
        self._backend: Any = None

    def __call__(self, *args: Any) -> Any:
        if self.failed is None:
            try:
                if self._compiled is None or self._backend is not BACKEND:
                    self._compiled = torch.compile(self.fn, backend=BACKEND, dynamic=False)
                    self._backend = BACKEND
                for i in self.dynamic_args:
                    if torch.is_tensor(args[i]) and args[i].dim():
                        torch._dynamo.maybe_mark_dynamic(args[i], 0)
                return self._compiled(*args)
            except Exception as e:  # noqa: BLE001 - any compile failure falls back to eager
                root: BaseException = e  # the cause dynamo wraps (BackendCompilerFailed, InductorError)
                while (getattr(root, "inner_exception", None) or root.__cause__) is not None:
                    root = getattr(root, "inner_exception", None) or root.__cause__
                lines = str(root).strip().splitlines() or [type(root).__name__]
                self.failed = f"{type(root).__name__}: {lines[0][:200]}"
                log.warning("kd: compiling the fused loss failed (%s); using the eager path", self.failed)
        return self.fn(*args)

    def reset(self) -> None:
        """Forget the compiled function and any failure (tests)."""
        self.failed = None
        self._compiled = None
        self._backend = None
