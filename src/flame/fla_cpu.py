"""fla's Triton kernels on a machine without a GPU, through Triton's own interpreter.

flash-linear-attention writes its layers as Triton kernels. With no GPU, Triton has no driver
and every kernel fails ("0 active drivers"). Triton ships an interpreter (`TRITON_INTERPRET=1`)
that runs a kernel's Python body on NumPy arrays, which is what makes fla usable on CPU for
checks and tests: slowly (seconds a step for a 0.2M-parameter model), but with fla's own code.

Two things in Triton's interpreter stop fla's kernels, and `enable` mends both:
- the autotuner times each candidate config on the active driver, and there is none. On CPU
  timing means nothing, so every candidate scores the same and the first is taken.
- a `for i in range(n)` loop gives `i` as a Python int, where compiled Triton gives a tensor
  (fla writes `i.to(tl.int64)`). The interpreter already rewrites each kernel's syntax tree
  (it wraps assignments in `to_tensor`); the loop variable is wrapped the same way.

This must run before fla is imported: `triton.jit` picks the interpreter at decoration time.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import sys

_ENABLED = False


def wanted(module_names: list[str]) -> bool:
    """Whether importing `module_names` needs the interpreter: fla is asked for, Triton is
    installed, no CUDA device is visible and fla is not imported yet."""
    if not any(n == "fla" or n.startswith("fla.") for n in module_names):
        return False
    if "fla" in sys.modules or importlib.util.find_spec("triton") is None:
        return False
    import torch

    return not torch.cuda.is_available()


def enable() -> str:
    """Switch Triton to its interpreter and mend it for fla's kernels; returns a one-line note."""
    global _ENABLED
    if _ENABLED:
        return _NOTE
    early = "triton" in sys.modules
    os.environ["TRITON_INTERPRET"] = "1"
    from triton.language import standard
    from triton.runtime import autotuner, interpreter

    # Triton's own library (tl.sum, ...) is decorated when Triton is imported, so an import made
    # before the switch leaves compiled functions that the interpreter cannot call
    if early and not isinstance(standard.sum, interpreter.InterpretedFunction):
        raise RuntimeError(
            "Triton was imported before flame could switch it to its interpreter for fla on CPU; "
            "start the process with TRITON_INTERPRET=1 in the environment"
        )

    if not hasattr(interpreter, "ASTTransformer") or not hasattr(autotuner, "Autotuner"):
        import triton

        raise RuntimeError(
            f"Triton {triton.__version__} has no interpreter that flame knows how to run fla's "
            "kernels in on CPU; use a GPU, or install triton 3.4 to 3.9"
        )
    autotuner.Autotuner.do_bench = property(lambda self: _same_time_for_all)
    interpreter.ASTTransformer.visit_For = _loop_variable_as_tensor
    _ENABLED = True
    return _NOTE


_NOTE = "fla on CPU: its Triton kernels run in Triton's interpreter (slow; for checks and tests)"


def bf16_problem(model, bf16: bool) -> str | None:
    """What stops `model` training under bf16 autocast in the interpreter, if anything: fla's
    fused SwiGLU runs its backward outside autocast on CPU and multiplies bf16 by fp32."""
    if not (_ENABLED and bf16 and getattr(getattr(model, "config", None), "fuse_swiglu", False)):
        return None
    return (
        "train.dtype bf16: fla's fused SwiGLU (its config's fuse_swiglu) fails in bf16 on CPU; set "
        """--model.overrides '{"fuse_swiglu": false}' (the same arithmetic, unfused), or train in fp32"""
    )


def _same_time_for_all(kernel_call, quantiles=None, **_kwargs):
    """The autotuner's benchmark: nothing is run, every config scores 0 and the first wins."""
    return [0.0, 0.0, 0.0] if quantiles else 0.0


def _is_range_call(node: ast.AST) -> bool:
    # `range(...)` and `tl.range(...)` give tensors under compiled Triton; `tl.static_range`
    # gives compile-time constants, which stay Python ints here too.
    if not isinstance(node, ast.Call):
        return False
    f = node.func
    return (isinstance(f, ast.Name) and f.id == "range") or (
        isinstance(f, ast.Attribute) and f.attr == "range"
    )


def _loop_variable_as_tensor(self, node: ast.For) -> ast.For:
    node = self.generic_visit(node)
    if isinstance(node.target, ast.Name) and _is_range_call(node.iter):
        name = node.target.id
        to_tensor = ast.Attribute(
            value=ast.Name(id="interpreter_semantic", ctx=ast.Load()), attr="to_tensor", ctx=ast.Load()
        )
        wrap = ast.Assign(
            targets=[ast.Name(id=name, ctx=ast.Store())],
            value=ast.Call(
                func=to_tensor, args=[ast.Name(id=name, ctx=ast.Load()), ast.Constant(value=False)], keywords=[]
            ),
        )
        node.body.insert(0, ast.copy_location(wrap, node))
    return node
