"""Launch Triton kernels with less host time than ``kernel[grid](...)`` costs.

Every ``kernel[grid](*args, **kwargs)`` binds and specialises all of the kernel's parameters in Python,
then builds a cache key from them, before it finds the compiled kernel. For the decode kernel's ~60
parameters that was half of the fused attention's host time (11 of 22 ms a 32-layer step under cProfile,
on the H100 machine), and eager transformers decode is host-bound. :class:`CachedLauncher` keys the
compiled kernel by exactly what Triton specialises a kernel on and launches it through its compiled
handle:

- each tensor: its dtype, and whether its address is a multiple of 16 bytes;
- each integer: whether it equals 1 and whether it is a multiple of 16 (not for parameters declared
  ``do_not_specialize``), and whether it needs 64 bits;
- the constexprs and launch options (fixed per call site), and the device.

The first call of each key goes through Triton's own launch (which compiles if needed) and keeps the
compiled kernel it returns. ``HEADQ_FAST_LAUNCH=0`` turns this off. The rules are those of Triton 3.x's
NVIDIA backend (``BaseBackend.get_int_specialization`` / ``get_tensor_specialization``); the GPU tests
check the two launches agree for aligned and misaligned operands.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Sequence
from typing import Any

import torch

_INT32 = (-(2**31), 2**31)


class LaunchSite:
    """A kernel's constexprs and options at one call site, with the positions of its runtime arguments.

    A site's runtime arguments keep their kinds from call to call (tensors stay tensors, integers stay
    integers): which positions Triton specialises, and how, is worked out once, on the first call.
    """

    def __init__(self, kernel: Any, constexprs: dict[str, Any], options: dict[str, Any]) -> None:
        self.constexprs, self.options = constexprs, options
        names = list(kernel.arg_names)
        self.template: list[Any] = [constexprs.get(name) for name in names]
        self.runtime = [i for i, name in enumerate(names) if name not in constexprs]
        fixed = {names[i] if isinstance(i, int) else i for i in getattr(kernel, "do_not_specialize", ())}
        self._specialised = [names[i] not in fixed for i in self.runtime]
        self._tensors: list[int] | None = None  # positions in the runtime arguments, set on the first call
        self._ints: list[int] = []
        self._fixed_ints: list[int] = []

    def specialisation(self, args: Sequence[Any]) -> tuple[Any, ...]:
        """What Triton's NVIDIA backend specialises these runtime arguments on (see the module)."""
        if self._tensors is None:
            kinds = [_kind(a, s) for a, s in zip(args, self._specialised, strict=True)]
            self._ints = [i for i, k in enumerate(kinds) if k == "int"]
            self._fixed_ints = [i for i, k in enumerate(kinds) if k == "fixed int"]
            self._tensors = [i for i, k in enumerate(kinds) if k == "tensor"]
        return (
            tuple([(args[i].dtype, args[i].data_ptr() & 15 == 0) for i in self._tensors]),
            tuple([(args[i] == 1, args[i] & 15 == 0, not _INT32[0] <= args[i] < _INT32[1]) for i in self._ints]),
            tuple([not _INT32[0] <= args[i] < _INT32[1] for i in self._fixed_ints]),
        )


def _kind(value: Any, specialised: bool) -> str:
    if isinstance(value, torch.Tensor):
        return "tensor"
    if isinstance(value, int) and not isinstance(value, bool):
        return "int" if specialised else "fixed int"
    return "other"  # floats (and flags) are not specialised


class CachedLauncher:
    """``kernel[grid](...)`` through the compiled kernel of the arguments' specialisation (see the module)."""

    def __init__(self, kernel: Any) -> None:
        from triton.runtime.jit import JITFunction

        self.kernel = kernel
        self.compiles = isinstance(kernel, JITFunction)  # not under TRITON_INTERPRET=1
        self._compiled: dict[tuple[Any, ...], Any] = {}

    def __call__(self, grid: tuple[int, int, int], site: LaunchSite, args: Sequence[Any]) -> Any:
        """Launch on ``grid`` with the runtime arguments ``args`` (in order); return the compiled kernel."""
        if not self.compiles:
            return self._launch(grid, site, args)
        key = (site, torch.cuda.current_device(), site.specialisation(args))  # a site: one set of constexprs
        compiled = self._compiled.get(key) if os.environ.get("HEADQ_FAST_LAUNCH", "1") != "0" else None
        if compiled is None:
            compiled = self._compiled[key] = self._launch(grid, site, args)
            return compiled
        full = list(site.template)
        for index, value in zip(site.runtime, args, strict=True):
            full[index] = value
        compiled[grid](*full)
        return compiled

    def _launch(self, grid: tuple[int, int, int], site: LaunchSite, args: Sequence[Any]) -> Any:
        """Triton's own launch (it compiles on a new specialisation)."""
        keywords = dict(zip((self.kernel.arg_names[i] for i in site.runtime), args, strict=True))
        return self.kernel[grid](**keywords, **site.constexprs, **site.options)


def launch_device(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Make ``device`` current while kernels for its tensors launch.

    Triton launches on the *current* CUDA device; a model split over GPUs (``device_map``) runs a
    layer on ``cuda:1`` while ``cuda:0`` is current, so every launch site enters this first."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@functools.cache
def sm_count(device: torch.device) -> int:
    """The SMs of ``device``, which size both decode kernels' splits (4 off a GPU: the interpreter's tests)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
