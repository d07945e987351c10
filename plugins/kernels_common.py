"""Shared pieces of attnc's Triton kernels: dtype maps, launch grids, ahead-of-time compilation.

Every fused op's ``plugins/<op>/kernels.py`` holds its ``@triton.jit`` kernels and a thin
torch-facing launcher (``<op>_forward``). The launch grids are *pure* functions of the problem
shape (tested on CPU) so that the TensorRT plugin computes exactly the grid the
Python launcher uses. :func:`compile_for` builds a kernel for one GPU architecture without a
GPU (PTX, and a cubin when triton's bundled ``ptxas`` runs), which is what the TensorRT plugins
load, and what CI uses to prove every kernel still compiles for sm_80 ... sm_90.

Each ``kernels.py`` also exposes ``aot_specs(dtype) -> list[KernelSpec]``: the kernels it
launches with a representative signature, so the AOT test and the plugin builder cover the same
set.

CPU: the kernels run under Triton's interpreter when ``TRITON_INTERPRET=1`` is set *before*
triton is first imported (triton decides then whether ``@triton.jit`` builds JIT or interpreted
functions, its own ``tl.*`` helpers included). A process cannot do both: interpreted kernels
do not compile, JIT kernels do not run on CPU tensors. The tests therefore run each mode in its
own subprocess. The interpreter gets bf16 ``tl.dot`` wrong; see :func:`dot_precision`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import triton
import triton.language as tl

#: Architectures every kernel is compiled for in CI (compute capability * 10 + minor).
AOT_ARCHS = (80, 86, 89, 90)

#: torch dtype -> triton signature type of a pointer to it.
POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
#: Short dtype names used by ``aot_specs`` and the plugin code.
DTYPE_NAMES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: numpy dtype names (how ``kernel_for`` / ``trt_launch`` get TensorRT's dtypes) -> torch dtype.
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SUPPORTED_DTYPES = tuple(POINTER_TYPES)


def dot_precision(dtype: torch.dtype) -> str:
    """The ``PRECISION`` constexpr of every kernel (how :func:`dot` multiplies) for ``dtype`` inputs.

    fp32 models get IEEE fp32 products (TF32 would cost them ~1e-3 relative error, outside
    the 1e-4 the op promises); half-precision models keep their fp32 running states in fp32
    (range) and multiply them as TF32 (a 10-bit mantissa, the same as fp16's). Under the CPU
    interpreter, bf16 operands are upcast to fp32 first ("upcast"): triton 3.9's interpreter
    multiplies bf16 ``tl.dot`` operands as raw integers (garbage results); the product of two
    bf16 numbers is exact in fp32, so this changes only the accumulation order.
    """
    if dtype == torch.bfloat16 and interpret_mode():
        return "upcast"
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def dot(a, b, PRECISION: tl.constexpr):
    """``tl.dot(a, b)`` with fp32 accumulation, following :func:`dot_precision`."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


def arch_supports(arch: int, dtype: str) -> bool:
    """Whether ``dtype`` kernels are built for ``arch`` (bf16 tensor cores need sm_80+)."""
    return dtype != "bf16" or arch >= 80


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def block_dim(d: int, minimum: int = 16) -> int:
    """Register width for a head dim: the next power of two, at least ``minimum`` (``tl.dot``'s
    smallest K/N). Lanes past ``d`` are masked."""
    return max(minimum, next_power_of_2(d))


def cdiv(a, b):
    """Ceiling division with ``+ - //`` only, so TensorRT's symbolic dims work as well as ints."""
    return (a + b - 1) // b


# ----------------------------------------------------------------------------- launch grids

def neighborhood_grid(batch: int, heads: int, grid: Sequence[int], dilation: Sequence[int],
                      block: Sequence[int]) -> tuple[int, int, int]:
    """Programs of the neighborhood kernel for a 3-D token grid ``X x Y x Z`` (1-D grids are
    ``1 x 1 x L``, 2-D grids ``1 x X x Y``).

    Per grid axis, every dilation group ``g < d`` times the query tiles of its sub-grid
    (``ceil(ceil(L / d) / block)`` tiles, the count for the longest group; programs past a shorter
    group's end return at once). Axis 0 walks ``batch * heads``, axis 1 the x and y tiles (x
    major), axis 2 the z tiles.
    """
    tiles = [dil * cdiv(cdiv(length, dil), b) for length, dil, b in zip(grid, dilation, block)]
    return (batch * heads, tiles[0] * tiles[1], tiles[2])


def rows_grid(batch: int, heads: int, rows: int, block_rows: int, cols: int = 1,
              block_cols: int = 1) -> tuple[int, int, int]:
    """``(batch * heads, row tiles, column tiles)``: the grid of the per-token output kernels
    (attention forward, linear/flow output products)."""
    return (batch * heads, cdiv(rows, block_rows), cdiv(cols, block_cols))


def per_head_grid(batch: int, heads: int, cols: int = 1, block_cols: int = 1) -> tuple[int, int]:
    """``(batch * heads, column tiles)``: the grid of the per-head reduction kernels (one program
    walks all tokens of a head; columns split the value dim)."""
    return (batch * heads, cdiv(cols, block_cols))


def agent_grid(batch: int, heads: int, queries: int, block_queries: int,
               min_programs: int = 264) -> tuple[int, int]:
    """``(batch * heads, splits)`` for the fused agent kernel.

    One program per head runs both stages without recomputation, but only ``batch * heads``
    programs is too few to fill a GPU at small batch. Each extra split recomputes the (small,
    ``n x M``) agent stage to take a share of the query tiles, so the launcher asks for enough
    programs to cover ``min_programs`` (two waves of an H100's 132 SMs), never more splits than
    query tiles.
    """
    tiles = cdiv(queries, block_queries)
    wanted = cdiv(min_programs, max(1, batch * heads))
    return (batch * heads, max(1, min(tiles, wanted)))


def range_splits(rows: int, length: int, block: int, min_programs: int = 264) -> int:
    """How many ranges to split each row's ``length``-long loop into, so that ``rows`` times that
    covers ``min_programs`` (two waves of an H100's 132 SMs), never a range shorter than one
    ``block``: the two-phase agent path's key ranges, flow attention's token ranges."""
    return max(1, min(cdiv(min_programs, max(1, rows)), cdiv(length, block)))


def range_length(length: int, splits: int, block: int) -> int:
    """Each of ``splits`` ranges' length over a ``length``-long loop, a whole number of ``block``s
    (trailing ranges may be short or empty)."""
    return cdiv(cdiv(length, splits), block) * block


def trt_entry_jit(*scalars: str):
    """``@triton.jit`` for a TensorRT entry kernel: its int32 ``scalars`` stay runtime values in a
    JIT launch too (``launch_trt_entry``), as in the AOT build TensorRT runs; triton's JIT would
    otherwise make a scalar equal to 1 a constant (five entry cases failed so on an H200)."""
    return triton.jit(do_not_specialize=list(scalars))


# ----------------------------------------------------------------------------- AOT compilation

@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One kernel build: the ``@triton.jit`` function, its runtime-argument types and constexprs."""

    kernel: Any
    signature: Mapping[str, str]
    constexprs: Mapping[str, Any]
    num_warps: int = 4
    num_stages: int = 2

    @property
    def name(self) -> str:
        return self.kernel.__name__


def default_arch() -> int:
    """The architecture AOT kernels are built for: ``$ATTNC_CUDA_ARCH`` (e.g. ``86``), else the
    visible GPU's, else sm_90."""
    if os.environ.get("ATTNC_CUDA_ARCH"):
        return int(os.environ["ATTNC_CUDA_ARCH"].removeprefix("sm_"))
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return major * 10 + minor
    return 90


#: Dynamic shared memory a launch gets without ``cudaFuncSetAttribute(MaxDynamicSharedMemorySize)``,
#: which TensorRT's AOT plugin launch (``KernelLaunchParams.shared_mem``) is not known to call.
SHARED_MEMORY_NO_OPT_IN = 48 * 1024
#: Shared memory one block may opt in to, per architecture (CUDA C++ Programming Guide, "Technical
#: Specifications per Compute Capability"): the limit of the PyTorch path, whose launcher opts in.
SHARED_MEMORY_OPT_IN = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def resource_usage(compiled) -> dict[str, int]:
    """Per-launch resources of a compiled kernel, read without a GPU.

    Returns:
        ``shared`` (bytes of dynamic shared memory, from triton's metadata), ``num_warps``,
        ``registers`` (per thread) and ``stack`` (bytes of local stack frame per thread: register
        spills, since triton's kernels have no local arrays), the last two from
        ``cuobjdump --dump-resource-usage`` (bundled with triton) of the cubin.
    """
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        dump = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", cubin.name],
                              capture_output=True, text=True, check=True).stdout
    line = next(line for line in dump.splitlines() if "REG:" in line)   # " REG:40 STACK:0 SHARED:0 LOCAL:0 ..."
    fields = dict(item.split(":", 1) for item in line.split() if ":" in item)
    return {"shared": int(compiled.metadata.shared), "num_warps": int(compiled.metadata.num_warps),
            "registers": int(fields["REG"]), "stack": int(fields["STACK"])}


def launch_trt_entry(trt_launch, attrs: dict, inputs: Sequence, *outputs: torch.Tensor):
    """Launch an op's TensorRT entry point (its ``trt_launch``) from PyTorch, as TensorRT launches
    the compiled kernel: ``inputs`` are positional (``None`` for an absent optional input) and
    contiguous; the kernel's parameters that are no constexpr (the ones its PTX keeps) take the
    present inputs, the int32 scalars from their shapes (positional, as ``register_qdp`` gives
    them), then ``outputs``.

    Returns:
        The first output, or all of them.
    """
    shapes = [None if t is None else list(t.shape) for t in inputs]
    dtypes = [None if t is None else str(t.dtype).removeprefix("torch.") for t in inputs]
    options = {"n_outputs": len(outputs)} if len(outputs) > 1 else {}
    spec, grid, scalars = trt_launch(attrs, dtypes, shapes, **options)
    present = [t for t in inputs if t is not None]
    values = [*present, *scalars(shapes), *outputs]
    params = [name for name in spec.kernel.arg_names if name not in spec.constexprs]
    if len(params) != len(values):
        raise ValueError(f"{spec.name}{tuple(params)} launched with {len(values)} arguments")
    spec.kernel[grid([list(t.shape) for t in outputs])](**dict(zip(params, values)), **spec.constexprs,
                                                         num_warps=spec.num_warps, num_stages=spec.num_stages)
    return outputs[0] if len(outputs) == 1 else outputs


def aot_kernel(spec: KernelSpec, grid, scalars, arch: int | None = None):
    """Compile ``spec`` into the ``AotKernel`` TensorRT's AOT plugins launch.

    The kernel must take ``(*input pointers, *int32 scalars, *output pointers)``, TensorRT's
    calling convention; ``grid(output_shapes)`` and ``scalars(input_shapes)`` may see symbolic
    dims. Triton appends two scratch pointers that TensorRT never passes, so their sizes must be 0.
    """
    from attnc.compiler.backends.tensorrt_plugins import AotKernel
    from attnc.compiler.errors import AttncError

    compiled = compile_spec(spec, default_arch() if arch is None else arch)
    meta = compiled.metadata
    if getattr(meta, "global_scratch_size", 0) or getattr(meta, "profile_scratch_size", 0):
        raise AttncError(f"{spec.name} needs Triton scratch memory, which TensorRT AOT plugins cannot pass")
    return AotKernel(name=meta.name, ptx=compiled.asm["ptx"], grid=grid, block=(32 * meta.num_warps, 1, 1),
                     shared_mem=int(meta.shared), scalars=scalars)


def interpret_mode() -> bool:
    """Whether this process's triton runs kernels in the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def compile_for(kernel, signature: Mapping[str, str], constexprs: Mapping[str, Any], arch: int | str,
                num_warps: int = 4, num_stages: int = 2):
    """Compile ``kernel`` for one NVIDIA architecture ahead of time, no GPU needed.

    Args:
        kernel: a ``@triton.jit`` function.
        signature: triton type of every runtime argument (``"*fp16"``, ``"i32"``, ``"fp32"``...).
        constexprs: value of every ``tl.constexpr`` argument.
        arch: compute capability as ``90``, ``"90"`` or ``"sm_90"``.
    Returns:
        triton's ``CompiledKernel``: ``.asm["ptx"]`` (str), ``.asm["cubin"]`` (bytes, present when
        ptxas ran), ``.metadata`` (``name``, ``num_warps``, ``shared`` bytes, ...).
    """
    if interpret_mode():
        raise RuntimeError("compile_for needs a process started without TRITON_INTERPRET "
                           "(triton's interpreted kernels cannot be compiled)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    arch = int(str(arch).removeprefix("sm_"))
    full_signature = dict(signature)
    missing = [a for a in kernel.arg_names if a not in full_signature and a not in constexprs]
    if missing:
        raise ValueError(f"{kernel.__name__}: no type or constexpr value for {missing}")
    for name in constexprs:
        full_signature[name] = "constexpr"
    ordered = {name: full_signature[name] for name in kernel.arg_names}
    source = ASTSource(fn=kernel, signature=ordered, constexprs=dict(constexprs))
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def compile_spec(spec: KernelSpec, arch: int | str):
    """:func:`compile_for` of one :class:`KernelSpec`."""
    return compile_for(spec.kernel, spec.signature, spec.constexprs, arch,
                       num_warps=spec.num_warps, num_stages=spec.num_stages)


def check_inputs(*tensors: torch.Tensor | None) -> None:
    """Same device, a supported dtype; CPU tensors only under the interpreter."""
    present = [t for t in tensors if t is not None]
    dtype = present[0].dtype
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"attnc kernels take {[str(d) for d in SUPPORTED_DTYPES]}, got {dtype}")
    devices = {t.device for t in present}
    if len(devices) != 1:
        raise ValueError(f"inputs on several devices: {devices}")
    if present[0].device.type == "cpu" and not interpret_mode():
        raise RuntimeError("CPU tensors run only under Triton's interpreter: set TRITON_INTERPRET=1 "
                           "before triton is imported")


LOG2E = math.log2(math.e)

__all__ = ["AOT_ARCHS", "DTYPE_NAMES", "KernelSpec", "LOG2E", "POINTER_TYPES", "SHARED_MEMORY_NO_OPT_IN",
           "SHARED_MEMORY_OPT_IN", "agent_grid", "aot_kernel", "arch_supports", "block_dim",
           "cdiv", "check_inputs", "compile_for", "compile_spec", "default_arch", "dot", "dot_precision",
           "interpret_mode", "neighborhood_grid", "next_power_of_2", "per_head_grid", "range_length",
           "range_splits", "resource_usage", "rows_grid", "trt_entry_jit"]
