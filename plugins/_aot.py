"""Ahead-of-time (AOT) TensorRT plugins from the plugins' Triton kernels (TensorRT >= 10.9).

An AOT plugin's ``aot_impl`` runs once, at engine build time: it returns a kernel's name,
its PTX, its launch geometry and its scalar arguments, which TensorRT embeds in the engine
and launches itself, with no Python at run time (trtexec and C++ runtimes can run it).
TensorRT launches the kernel with the arguments

    (input pointers..., int32 scalars..., output pointers...)

so every AOT kernel here takes them in that order and computes its output completely in
one launch (nothing zero-fills a plugin's output buffer).

Each op's ``triton_kernel.aot_plan(...)`` decides, from the node's static shapes, dtypes and
attributes, which kernel, which constexprs (block sizes, dtype-specialised branches), which
grid and which scalars; ``result`` compiles the plan and wraps it in TensorRT's types. The
plan is plain Python, so the tests launch exactly what TensorRT would (same kernel, grid and
argument list) in Triton's interpreter.

Why the PTX is edited: since Triton 3.3 every compiled kernel has hidden trailing pointer
parameters (global scratch, and profile scratch since 3.5) that Triton's own launcher fills
and TensorRT's does not know about. A launch with fewer arguments than the kernel declares
reads past TensorRT's argument array. ``compile_ptx`` drops the parameters past TensorRT's
count from the ``.entry`` signature, and refuses a kernel whose PTX reads any of them (one
that needs scratch memory cannot be an AOT plugin).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# TensorRT DataType names (trt.DataType.<name>, and the test stand-in's) -> Triton pointer element types
TRITON_TYPES = {"FLOAT": "fp32", "HALF": "fp16", "INT8": "i8", "INT32": "i32", "INT64": "i64", "BOOL": "i1"}


@dataclass
class Plan:
    """One kernel launch as TensorRT will make it.

    ``pointers`` names the kernel's pointer parameters with their Triton types, inputs then
    outputs; ``scalars`` the int32 parameters between them, with their values. ``grid`` is
    (x[, y[, z]]) programs. The kernel's parameter order must be inputs, scalars, outputs,
    then constexprs: ``check_order`` says so when it is not."""

    kernel: object  # a @triton.jit function
    inputs: dict[str, str]
    scalars: dict[str, int]
    outputs: dict[str, str]
    constexprs: dict[str, object]
    grid: tuple[int, ...]
    num_warps: int = 4
    num_stages: int = 3  # Triton's default

    @property
    def arguments(self) -> list[str]:
        return [*self.inputs, *self.scalars, *self.outputs]

    def signature(self) -> dict[str, str]:
        sig = {**self.inputs, **{name: "i32" for name in self.scalars}, **self.outputs}
        return {name: sig.get(name, "constexpr") for name in self.kernel.arg_names}

    def check_order(self) -> None:
        runtime = [n for n in self.kernel.arg_names if n not in self.constexprs]
        if runtime != self.arguments:
            raise ValueError(f"{self.kernel.__name__}: runtime parameters {runtime} are not TensorRT's AOT order "
                             f"(inputs, scalars, outputs) {self.arguments}")
        for name, value in self.scalars.items():
            if not -(2**31) <= int(value) < 2**31:
                raise ValueError(f"{self.kernel.__name__}: scalar {name}={value} does not fit TensorRT's int32 argument")
        if len(self.grid) not in (1, 2, 3) or any(int(g) < 1 for g in self.grid):
            raise ValueError(f"{self.kernel.__name__}: grid {self.grid} must be 1 to 3 positive sizes")


def triton_type(dtype) -> str:
    """The Triton pointer type of a TensorRT DataType."""
    name = getattr(dtype, "name", str(dtype)).upper()
    if name not in TRITON_TYPES:
        raise TypeError(f"no Triton type for TensorRT dtype {dtype}")
    return "*" + TRITON_TYPES[name]


def static_dims(desc, what: str) -> tuple[int, ...]:
    """The build-time constant dimensions of a ``tensorrt.plugin.TensorDesc``: the AOT kernels
    are specialised to static shapes (deploykit exports static graphs)."""
    dims = []
    for i, expr in enumerate(desc.shape_expr):
        if expr.is_fake or not expr.is_constant:
            raise ValueError(f"{what}: dimension {i} is not a build-time constant; deploykit's AOT plugins need "
                             "static shapes (export without dynamic axes, or build with the JIT plugins)")
        dims.append(int(expr.constant_value()))
    return tuple(dims)


def current_target():
    """Triton's target for the GPU this process builds on (TensorRT engines are built on the
    GPU they run on, or one of its architecture)."""
    from triton.runtime import driver

    return driver.active.get_current_target()


@dataclass
class Compiled:
    name: str
    ptx: str
    threads: int
    shared: int


STATIC_SHARED_LIMIT = 48 * 1024
_ENTRY = re.compile(r"\.entry\s+(\w+)\s*\((.*?)\)", re.DOTALL)


def trim_parameters(ptx: str, keep: int) -> str:
    """``ptx`` with its kernel's parameters past the first ``keep`` removed from the ``.entry``
    signature; raises when the body reads one of them."""
    match = _ENTRY.search(ptx)
    if match is None:
        raise ValueError("no .entry in the PTX")
    name, params = match.group(1), match.group(2)
    decls = [p.strip() for p in params.split(",") if p.strip()]
    if len(decls) < keep:
        raise ValueError(f"{name} has {len(decls)} parameters, TensorRT passes {keep}")
    body = ptx[match.end():]
    for decl in decls[keep:]:
        pname = decl.split()[-1]
        if re.search(rf"\b{re.escape(pname)}\b", body):
            raise ValueError(f"{name} reads its hidden parameter {pname} (Triton scratch memory): it cannot run as "
                             "a TensorRT AOT plugin")
    signature = ",\n\t".join(decls[:keep])
    return ptx[:match.start(2)] + "\n\t" + signature + "\n" + ptx[match.end(2):]


def compile_ptx(plan: Plan, target=None) -> Compiled:
    """Compile ``plan``'s kernel to PTX for ``target`` (default: this machine's GPU), its
    signature cut to TensorRT's argument list."""
    import triton
    from triton.compiler import ASTSource

    plan.check_order()
    source = ASTSource(fn=plan.kernel, signature=plan.signature(), constexprs=dict(plan.constexprs))
    options = {"num_warps": plan.num_warps, "num_stages": plan.num_stages}
    kernel = triton.compile(source, target=target or current_target(), options=options)
    if kernel.metadata.shared > STATIC_SHARED_LIMIT:
        # More needs cudaFuncSetAttribute before the launch, which TensorRT's AOT launcher
        # is not documented to do.
        raise ValueError(f"{plan.kernel.__name__} needs {kernel.metadata.shared} bytes of shared memory, over the "
                         f"{STATIC_SHARED_LIMIT} a launch gets without opting in: lower its num_stages or blocks")
    ptx = trim_parameters(kernel.asm["ptx"], len(plan.arguments))
    return Compiled(kernel.metadata.name, ptx, kernel.metadata.num_warps * 32, kernel.metadata.shared)


def result(trtp, plan: Plan):
    """What ``aot_impl`` returns to TensorRT for ``plan``: (kernel name, PTX, launch
    parameters, the scalar arguments)."""
    compiled = compile_ptx(plan)
    launch = trtp.KernelLaunchParams()
    for axis, size in zip("xyz", plan.grid):
        setattr(launch, f"grid_{axis}", int(size))
    launch.block_x = compiled.threads
    launch.shared_mem = compiled.shared
    extra = trtp.SymIntExprs(len(plan.scalars))
    for i, value in enumerate(plan.scalars.values()):
        extra[i] = trtp.SymInt32(int(value))
    return compiled.name, compiled.ptx, launch, extra


def emulate(plan: Plan, inputs, outputs) -> None:
    """Launch ``plan`` as TensorRT would (its grid; inputs, scalars, outputs in that order),
    on torch tensors: in Triton's interpreter here, on a GPU elsewhere."""
    from ._triton import current

    plan.check_order()
    current(plan.kernel)[tuple(plan.grid)](*inputs, *plan.scalars.values(), *outputs, **plan.constexprs,
                                           num_warps=plan.num_warps, num_stages=plan.num_stages)
