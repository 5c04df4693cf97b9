"""Small helpers shared by the kernel files.

Nothing here launches a kernel or reads the environment at import time; every helper is
evaluated when an op is called. Kept deliberately small: kernel files import from it.
"""
import contextlib
import functools
import os
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl


def is_interpreter() -> bool:
    """True when Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``).

    Checked per call, never cached. Note that ``@triton.jit`` reads the variable when it
    decorates a kernel: it must be set before the kernel modules are imported.
    """
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on")


AUTOTUNE_ENV = "FASTFOLD_PLUGIN_AUTOTUNE"


def autotune(configs, key, prune=None, **kwargs):
    """``triton.autotune`` with one switch and a lighter launch path.

    ``FASTFOLD_PLUGIN_AUTOTUNE=0`` keeps only the first configuration that `prune` (an
    ``early_config_prune`` function, optional) leaves, so nothing is benchmarked. The GPU tests
    use it (``make test-gpu``): correctness does not depend on the tile sizes, and tuning every
    kernel for every shape a test suite touches takes minutes. Read when a kernel is first
    launched for a tuning key, never at import.

    The result is a :class:`Tuned`: indexed by a grid and called like the autotuner, it lets the
    autotuner choose a configuration once per key and afterwards launches the kernel with it
    directly (see there).
    """
    def early_prune(cfgs, named_args, **kw):
        kept = list(prune(cfgs, named_args, **kw)) if prune is not None else list(cfgs)
        if os.environ.get(AUTOTUNE_ENV, "1").strip() == "0":
            return kept[:1]
        return kept

    def wrap(fn):
        return Tuned(triton.autotune(configs, key=key,
                                     prune_configs_by={"early_config_prune": early_prune},
                                     **kwargs)(fn), key)
    return wrap


class Tuned:
    """An autotuned kernel whose tuned launches skip the autotuner's per-call bookkeeping.

    ``triton.runtime.Autotuner.run`` rebuilds dicts of every argument and scans its argument
    list per launch: 0.1 ms per launch under cProfile for kernels with ~70 arguments, a tenth of
    a small attention call's wall time. Here the key (the tuning-key arguments and every tensor
    argument's dtype, as the autotuner's own key) is read by position; the first launch for a
    key goes through the autotuner (which benchmarks the configurations), later ones launch the
    JIT kernel with the configuration it chose, exactly what the autotuner would launch.
    A caller that launches arguments of the same kinds again can keep the key (``key``) and
    launch with it (``launch``), which saves the scan of the arguments too.
    Other attributes (``configs_timings``, ``cache``, ...) are the autotuner's.
    """

    def __init__(self, tuner, key):
        self.tuner = tuner
        self._key_pos = tuple((name, tuner.arg_names.index(name)) for name in key)
        self._chosen = {}       # key -> the chosen triton.Config
        self._launch_kw = {}    # key -> its launch keywords (``Config.all_kwargs()``)

    def __getattr__(self, name):
        if name == "tuner":  # not set yet (e.g. a copy under construction)
            raise AttributeError(name)
        return getattr(self.tuner, name)

    def __getitem__(self, grid):
        return functools.partial(self._run, grid)

    def _run(self, grid, *args, **kwargs):
        return self.launch(self.key(args, kwargs), grid, args, kwargs)

    def key(self, args: tuple, kwargs: dict) -> tuple:
        """The tuning key of a launch with these arguments: the tuning-key arguments' values and
        every tensor argument's dtype. Valid for any launch whose arguments have those values
        and dtypes."""
        n = len(args)
        key = tuple(kwargs.get(name) if i >= n else args[i] for name, i in self._key_pos)
        return key + tuple(str(a.dtype) for a in (*args, *kwargs.values()) if hasattr(a, "dtype"))

    def launch(self, key: tuple, grid, args: tuple, kwargs: dict):
        """``self[grid](*args, **kwargs)`` with its tuning key `key` (from ``key``) given."""
        launch_kw = self._launch_kw.get(key)
        if launch_kw is None:
            out = self.tuner[grid](*args, **kwargs)
            config = self._chosen[key] = self.tuner.best_config
            self._launch_kw[key] = config.all_kwargs()
            return out
        config = self._chosen[key]
        if config.pre_hook is not None:  # as Autotuner.run does on every launch
            config.pre_hook({**dict(zip(self.tuner.arg_names, args)), **kwargs, **launch_kw})
        return self.tuner.fn[grid](*args, **kwargs, **launch_kw)

    def reset(self) -> None:
        """Forget every chosen configuration (the next launch per key tunes again)."""
        self._chosen.clear()
        self._launch_kw.clear()
        self.tuner.cache.clear()


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def max_programs(device: torch.device, per_sm: int = 4) -> int:
    """How many programs a grid-stride reduction kernel launches at most: `per_sm` per SM on a
    GPU, 4 under the interpreter (where every program costs Python time)."""
    if device.type != "cuda":
        return 4
    return per_sm * _sm_count(device.index if device.index is not None
                              else torch.cuda.current_device())


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive Python ints: ``triton.cdiv``'s value without its per-call host
    cost (it is a constexpr function: ~1.5-4 us a call)."""
    return -(-a // b)


def autocast_off(device_type: str):
    """``torch.autocast(device_type, enabled=False)`` where autocast is on, a null context where
    it is off already: the same dispatch either way, without autocast's enter / exit (~10 us of
    host time)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def allow_tf32() -> bool:
    """Whether fp32 matmuls may use TF32 (``torch.backends.cuda.matmul.allow_tf32``)."""
    return bool(torch.backends.cuda.matmul.allow_tf32)


def dot_precision(dtype: torch.dtype) -> str:
    """The ``input_precision`` string for ``tl.dot`` on operands of `dtype`.

    fp32 operands: "ieee" (true fp32) unless TF32 is allowed, then "tf32". fp16/bf16 operands
    ignore it (tensor cores, fp32 accumulation); "ieee" is returned so the argument is valid.
    ``input_precision`` exists in every Triton 3.x (``allow_tf32`` is deprecated).
    """
    if dtype == torch.float32 and allow_tf32():
        return "tf32"
    return "ieee"


def autocast_dtype(device_type: str = "cuda") -> Optional[torch.dtype]:
    """The autocast dtype active for `device_type`, or None when autocast is off there."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def fp16_autocast_enabled(device_type: str = "cuda") -> bool:
    """True under ``torch.autocast(device_type, dtype=torch.float16)``."""
    return autocast_dtype(device_type) == torch.float16


def bf16_autocast_enabled(device_type: str = "cuda") -> bool:
    """True under ``torch.autocast(device_type, dtype=torch.bfloat16)``."""
    return autocast_dtype(device_type) == torch.bfloat16


def check_launchable(*tensors: Optional[torch.Tensor]) -> None:
    """Raise a clear error unless the tensors can feed a Triton kernel here.

    CUDA tensors always can; CPU tensors only under Triton's interpreter.
    """
    check_devices(*(t.device for t in tensors if t is not None))


def check_devices(*devices: torch.device) -> None:
    """``check_launchable`` for tensors on these devices."""
    for d in devices:
        if d.type == "cuda":
            continue
        if d.type == "cpu" and is_interpreter():
            continue
        raise RuntimeError(
            f"Triton kernels need CUDA tensors (got a tensor on {d}); on a machine "
            "without a GPU use the reference backend, or run the kernels in Triton's (slow) "
            "CPU interpreter by setting TRITON_INTERPRET=1 before the kernel modules are "
            "imported (Triton reads it when it decorates a kernel)"
        )


def broadcast_strides(t: torch.Tensor, shape) -> tuple:
    """Strides of `t` viewed as broadcast to `shape` (0 on broadcast dims), in elements.

    ``t.expand(shape).stride()`` without building the view's storage requirements; leading
    dims missing from `t` get stride 0.
    """
    return tuple(t.expand(shape).stride())


def broadcast_shapes(*shapes: Sequence[int]) -> Tuple[int, ...]:
    """``torch.broadcast_shapes`` for plain int shapes, in a few microseconds (torch's goes
    through its symbolic-shape reference implementation: 80 us per call under cProfile, three per
    attention call). Raises ValueError naming the shapes when they do not broadcast."""
    shapes = [tuple(s) for s in shapes]
    if not shapes:
        return ()
    if all(s == shapes[0] for s in shapes):
        return shapes[0]
    out = [1] * max(len(s) for s in shapes)
    for s in shapes:
        for i, n in enumerate(s, start=len(out) - len(s)):
            if n != 1 and out[i] != n:
                if out[i] != 1:
                    raise ValueError(f"shapes {[tuple(t) for t in shapes]} do not broadcast")
                out[i] = n
    return tuple(out)


def contiguous_strides(shape: Sequence[int]) -> Tuple[int, ...]:
    """The strides torch gives a contiguous tensor of `shape` (size-0 dims count as 1)."""
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(strides))


def collapse_dims(shape: Sequence[int], strides: Sequence[Sequence[int]]):
    """Merge the dims of `shape` that every stride list lets merge; drop size-1 dims.

    `strides` holds one stride list per tensor (all broadcast to `shape`, 0 on broadcast
    dims). Dims i and i+1 merge when ``stride[i] == stride[i + 1] * shape[i + 1]`` for every
    tensor, so one stride per merged dim still addresses each tensor. Returns
    ``(sizes, [strides per tensor])``, both possibly empty. Kernels use this to take any number
    of leading batch dims as a few (size, stride) pairs, without copies.
    """
    dims = [i for i, n in enumerate(shape) if n != 1]
    sizes = [int(shape[i]) for i in dims]
    out = [[int(s[i]) for i in dims] for s in strides]
    j = len(sizes) - 1
    while j > 0:
        if all(s[j - 1] == s[j] * sizes[j] for s in out):
            sizes[j - 1] *= sizes[j]
            for s in out:
                s[j - 1] = s[j]
                del s[j]
            del sizes[j]
        j -= 1
    return sizes, out


@triton.jit
def cast_rne(x, dtype: tl.constexpr, INTERP: tl.constexpr):
    """``x.to(dtype)``, rounding to nearest even as the GPU does.

    Triton's CPU interpreter (pass ``INTERP=is_interpreter()``) truncates fp32 -> bf16; there
    the value is rounded in fp32 by bit arithmetic first, after which the cast is exact. On the
    GPU (INTERP False) this is a plain cast.
    """
    if INTERP:
        if dtype == tl.bfloat16:
            if x.dtype == tl.float32:
                b = x.to(tl.uint32, bitcast=True)
                b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
                x = b.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def dot_acc32(a, b, DOT_PREC: tl.constexpr, INTERP: tl.constexpr):
    """``tl.dot`` with fp32 accumulation. Triton's CPU interpreter (``INTERP``) multiplies bf16
    tiles as raw uint16 bits, so there bf16 tiles are widened to fp32 first (exact)."""
    if INTERP and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PREC)


def weight_grad_fp32(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dy^T @ x in fp32 for long row counts: dy [M, O], x [M, I] -> [O, I].

    The reduction over M (up to N_res^2 rows) is split into equal slices run as one batched GEMM
    (a single [O, M] x [M, I] GEMM has only O*I/128^2 output tiles to spread over the GPU), and
    the slices' partial sums, each rounded to the operands' dtype, are added in fp32. The slice
    count fills about two waves of 128 x 128 output tiles on the card (slices of at least 2048
    rows): with a fixed 32 slices, linear_z's [128, 128] gradient in the triangle multiplication
    kept 32 SMs busy.
    """
    M, n_out = dy.shape
    tiles = cdiv(n_out, 128) * cdiv(x.shape[1], 128)
    if dy.device.type == "cuda":
        target = 2 * _sm_count(dy.device.index if dy.device.index is not None
                               else torch.cuda.current_device())
    else:
        target = 32
    slices = max(1, min(M // 2048, cdiv(target, tiles)))
    rows = M // slices
    main = slices * rows
    out = torch.bmm(dy[:main].view(slices, rows, -1).transpose(1, 2),
                    x[:main].view(slices, rows, -1)).sum(0, dtype=torch.float32)
    if main < M:
        out += torch.mm(dy[main:].t(), x[main:]).float()
    return out
