"""Compile-time loop unrolling for Numba device code: `for i in static_range(n)` inside a function
decorated with `@unrolled` becomes n copies of the body, each with `i` bound to a constant.

Why: a tuple indexed by a loop variable (accumulator registers) stays in registers only if every
index is a compile-time constant.  LLVM unrolls small loops by itself but not reliably (it does not
unroll loops that contain barriers or many inline-asm statements), and a loop that survives turns
`acc[i]` into a 128-way switch.  This is CuTe-DSL's `range_constexpr`, done on the AST before
Numba sees the function.  The bounds must be Python ints known when the function is defined
(closure variables or globals); `break` and `continue` are not allowed in unrolled loops.

`constexpr(expr)` inside such a function is evaluated when it is unrolled, with the enclosing
loops' variables bound, and replaced by its value: for arguments that must be compile-time
literals (register bounds of `fragment.scale_regs`) computed from a loop variable, which Numba
would otherwise type as a run-time int64.

`if constexpr(flag):` keeps only the branch the flag selects (CuTe-DSL's `const_expr` in an
`if`).  A plain `if FLAG:` on a closure constant also compiles to the right code, but Numba builds
its SSA form before pruning the dead branch, and the variables that branch assigns leave copies
behind that can change ptxas's register allocation of the live code; removed from the AST, the
branch never existed.
"""
import ast
import copy
import inspect
import textwrap


def static_range(*args):
    """Marker for loops that `@unrolled` expands; outside one it is plain `range`."""
    return range(*args)


def constexpr(value):
    """Marker for expressions that `@unrolled` evaluates at unroll time; outside one, the value."""
    return value


class _Bind(ast.NodeTransformer):
    """Inside constexpr(...) calls, `name` replaced by the constant `value` (one unrolled copy of
    a loop body; the copy's other uses read the variable its `name = value` assignment sets)."""

    def __init__(self, name, value):
        self.name, self.value = name, value
        self.depth = 0

    def visit_Call(self, node):
        inside = isinstance(node.func, ast.Name) and node.func.id == "constexpr"
        self.depth += inside
        self.generic_visit(node)
        self.depth -= inside
        return node

    def visit_Name(self, node):
        if self.depth and node.id == self.name and isinstance(node.ctx, ast.Load):
            return ast.copy_location(ast.Constant(self.value), node)
        return node


class _Fold(ast.NodeTransformer):
    """constexpr(expr) replaced by the value of expr (names from the function's environment)."""

    def __init__(self, env):
        self.env = env

    def visit_Call(self, node):
        self.generic_visit(node)
        if not (isinstance(node.func, ast.Name) and node.func.id == "constexpr"):
            return node
        if len(node.args) != 1 or node.keywords:
            raise SyntaxError("constexpr takes one expression")
        expr = ast.fix_missing_locations(ast.Expression(node.args[0]))
        try:
            value = eval(compile(expr, "<constexpr>", "eval"), self.env)
        except NameError as e:
            raise SyntaxError(f"constexpr: {e} (only static_range variables and the function's "
                              "globals and closure are known at unroll time)") from None
        return ast.copy_location(ast.Constant(value), node)


class _PruneIf(ast.NodeTransformer):
    """`if C:` whose test folded to a constant (`if constexpr(...)`) replaced by the branch it takes."""

    def visit_If(self, node):
        self.generic_visit(node)
        if not isinstance(node.test, ast.Constant):
            return node
        taken = node.body if node.test.value else node.orelse
        return taken or [ast.copy_location(ast.Pass(), node)]


class _Unroller(ast.NodeTransformer):
    def __init__(self, env):
        self.env = env

    def visit_For(self, node):
        self.generic_visit(node)
        it = node.iter
        if not (isinstance(it, ast.Call) and isinstance(it.func, ast.Name) and it.func.id == "static_range"):
            return node
        if node.orelse:
            raise SyntaxError("static_range loops cannot have an else clause")
        for sub in ast.walk(ast.Module(body=node.body, type_ignores=[])):
            if isinstance(sub, (ast.Break, ast.Continue)):
                raise SyntaxError("break/continue are not allowed in a static_range loop")
        bounds = [eval(compile(ast.Expression(a), "<static_range>", "eval"), self.env) for a in it.args]
        out = []
        if not isinstance(node.target, ast.Name):
            raise SyntaxError("a static_range loop binds one name")
        for value in range(*bounds):
            out.append(ast.copy_location(ast.Assign(targets=[copy.deepcopy(node.target)],
                                                    value=ast.Constant(value)), node))
            out.extend(_Bind(node.target.id, value).visit(copy.deepcopy(b)) for b in node.body)
        return out or [ast.copy_location(ast.Pass(), node)]


def unrolled(fn):
    """Return `fn` with its static_range loops expanded and its `if constexpr(...)` branches
    chosen (apply beneath @cuda.jit)."""
    src = textwrap.dedent(inspect.getsource(fn))
    tree = ast.parse(src)
    fdef = tree.body[0]
    fdef.decorator_list = []
    env = dict(fn.__globals__)
    if fn.__closure__:
        env.update({n: c.cell_contents for n, c in zip(fn.__code__.co_freevars, fn.__closure__)})
    tree = ast.fix_missing_locations(_PruneIf().visit(_Fold(env).visit(_Unroller(env).visit(tree))))
    ast.increment_lineno(tree, fn.__code__.co_firstlineno - 1)
    ns = {}
    exec(compile(tree, inspect.getsourcefile(fn) or "<unrolled>", "exec"), env, ns)
    new = ns[fdef.name]
    new.__doc__ = fn.__doc__
    return new
