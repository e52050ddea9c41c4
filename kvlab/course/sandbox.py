"""Grade a chapter's answers in a fresh interpreter, apart from the rest of the notebook.

The grader does not run the student's notebook. From each answer cell it keeps only the imports and
the function and class definitions (`definitions`), refuses the constructs that could reach outside
them (introspection, `eval`, patching builtins, decorators and default values that run code, ...),
and runs that question's public and hidden tests (read from the master, never from the submission)
in this process, with:

- the question's forbidden targets under `kvlab.course.guard.forbid(..., within="<submission")`:
  a call to them made, directly or indirectly, from the student's code fails; the tests may still
  call the reference themselves;
- a snapshot of the modules the tests rely on (torch, torch.nn.functional, torch.testing, math,
  builtins, numpy, kvlab...): a question during which any of their attributes changed scores 0,
  and the snapshot is restored before the next question;
- a time limit per test cell.

A question scores its points only if every one of its tests passes (all or nothing): a public test
alone is no evidence. Run as `python -m kvlab.course.sandbox JOB.json RESULT.json`, where the job
is `{"spec": chapter_spec, "variants": [{question: answer source}], "timeout": seconds}` (a
variant may also be `{"sources": {...}, "only": [question]}`: only those questions' tests run);
the result holds one `{question: {score, possible, messages}}` per variant.
"""
from __future__ import annotations
import __future__

import ast
import builtins
import json
import linecache
import signal
import sys
import traceback
from pathlib import Path

ALLOWED_MODULES = {"torch", "math", "numpy", "collections", "dataclasses", "typing", "itertools",
                   "heapq", "bisect", "functools", "kvlab", "triton", "operator", "enum",
                   "__future__", "statistics", "random", "hashlib", "struct", "copy"}
DENIED_SUBMODULES = {"overrides", "course", "_C"}
DENIED_NAMES = {"eval", "exec", "compile", "__import__", "globals", "locals", "vars", "getattr",
                "setattr", "delattr", "open", "breakpoint", "input", "exit", "quit", "help",
                "memoryview", "__builtins__", "__loader__", "__spec__", "sys", "os", "builtins",
                "importlib", "inspect", "gc", "ctypes", "threading", "signal", "subprocess"}
DENIED_ATTRS = {"_C", "overrides", "_python_dispatch", "setprofile", "settrace", "tb_frame",
                "f_back", "f_locals", "f_globals", "f_builtins", "gi_frame", "cr_frame", "ag_frame",
                "_getframe", "sys", "os", "builtins", "monitoring", "_pop_mode_temporarily",
                "DisableTorchFunction", "DisableTorchFunctionSubclass", "_disable_current_modes",
                "guard", "forbid", "sandbox", "modules", "wraps", "update_wrapper"}
DENIED_DUNDERS = {"__globals__", "__code__", "__closure__", "__builtins__", "__dict__", "__class__",
                  "__bases__", "__mro__", "__subclasses__", "__traceback__", "__import__",
                  "__loader__", "__spec__", "__self__", "__func__", "__wrapped__",
                  "__getattribute__", "__setattr__", "__delattr__", "__reduce__", "__reduce_ex__",
                  "__defaults__", "__kwdefaults__", "__module__", "__qualname__", "__objclass__"}
# Methods a student class may not define: they would let a result fake a comparison or a tensor.
DENIED_METHODS = {"__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__bool__", "__int__",
                  "__float__", "__index__", "__complex__", "__torch_function__",
                  "__torch_dispatch__", "__array__", "__array_ufunc__", "__array_function__",
                  "__instancecheck__", "__subclasscheck__", "__getattr__", "__getattribute__",
                  "__del__", "__init_subclass__", "__set_name__", "__class_getitem__", "__new__",
                  "__abs__", "__hash__"}
DECORATORS = {"dataclass", "dataclasses.dataclass", "staticmethod", "classmethod", "property",
              "torch.no_grad", "torch.inference_mode", "triton.jit", "functools.cache", "cache",
              "functools.lru_cache", "lru_cache", "abstractmethod"}
SUBMISSION = "<submission"


class Rejected(ValueError):
    """An answer cell uses a construct the grader does not run."""


def _dotted(node) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _simple(node) -> bool:
    """A value evaluated at definition time that cannot run code."""
    if isinstance(node, (ast.Constant, ast.Name)):
        return True
    if isinstance(node, ast.Attribute):
        return _dotted(node) is not None
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return all(_simple(e) for e in node.elts)
    if isinstance(node, ast.UnaryOp):
        return _simple(node.operand)
    if isinstance(node, ast.BinOp):
        return _simple(node.left) and _simple(node.right)
    return False


def _check_import(node) -> None:
    mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
    if isinstance(node, ast.ImportFrom) and node.level:
        raise Rejected("relative imports are not allowed")
    for m in mods:
        parts = m.split(".")
        if parts[0] not in ALLOWED_MODULES:
            raise Rejected(f"import of {m!r} is not allowed (allowed: {', '.join(sorted(ALLOWED_MODULES))})")
        if any(p in DENIED_SUBMODULES or p.startswith("_") for p in parts[1:]):
            raise Rejected(f"import of {m!r} is not allowed")
    if isinstance(node, ast.ImportFrom):
        for a in node.names:
            if a.name in DENIED_SUBMODULES or a.name in DENIED_NAMES or a.name.startswith("_"):
                raise Rejected(f"importing {a.name!r} from {node.module!r} is not allowed")


def _check_decorators(node) -> None:
    for d in node.decorator_list:
        target = d.func if isinstance(d, ast.Call) else d
        name = _dotted(target)
        if name not in DECORATORS:
            raise Rejected(f"decorator @{ast.unparse(d)} on {node.name} is not allowed "
                           f"(allowed: {', '.join(sorted(DECORATORS))})")
        if isinstance(d, ast.Call) and not all(_simple(a) for a in [*d.args, *(k.value for k in d.keywords)]):
            raise Rejected(f"decorator @{ast.unparse(d)}: arguments must be constants")


def _check_def(node, in_class: bool = False) -> None:
    _check_decorators(node)
    if isinstance(node, ast.ClassDef):
        if node.keywords:
            raise Rejected(f"class {node.name}: keywords (metaclass=...) are not allowed")
        if not all(_dotted(b) for b in node.bases):
            raise Rejected(f"class {node.name}: bases must be plain names")
        for st in node.body:
            if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                _check_def(st, in_class=True)
            elif isinstance(st, (ast.Assign, ast.AnnAssign)):
                v = st.value
                if v is not None and not _simple(v) and not (
                        isinstance(v, ast.Call) and _dotted(v.func) in ("field", "dataclasses.field")
                        and all(_simple(a) for a in [*v.args, *(k.value for k in v.keywords)])):
                    raise Rejected(f"class {node.name}: class attributes must be constants or field(...)")
            elif not (isinstance(st, ast.Pass) or (isinstance(st, ast.Expr) and isinstance(st.value, ast.Constant))):
                raise Rejected(f"class {node.name}: only methods and constant attributes in a class body")
        return
    if in_class and node.name in DENIED_METHODS:
        raise Rejected(f"defining {node.name} is not allowed in an answer")
    args = node.args
    if not all(_simple(d) for d in [*args.defaults, *(d for d in args.kw_defaults if d is not None)]):
        raise Rejected(f"{node.name}: default values must be constants")


def _check_body(tree) -> None:
    for n in ast.walk(tree):
        if isinstance(n, ast.Name) and n.id in DENIED_NAMES:
            raise Rejected(f"line {n.lineno}: {n.id!r} is not allowed in an answer")
        if isinstance(n, ast.Attribute):
            a = n.attr
            if a in DENIED_ATTRS or a in DENIED_DUNDERS:
                raise Rejected(f"line {n.lineno}: attribute {a!r} is not allowed in an answer")
        if isinstance(n, (ast.Import, ast.ImportFrom)):
            _check_import(n)
        if isinstance(n, (ast.Global, ast.Nonlocal)) and any(x in DENIED_NAMES for x in n.names):
            raise Rejected(f"line {n.lineno}: not allowed")
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and any(
                d in n.value for d in DENIED_DUNDERS):
            raise Rejected(f"line {n.lineno}: a string naming an interpreter internal")


def definitions(src: str) -> ast.Module:
    """The imports and function/class definitions of an answer cell, checked (raises Rejected)."""
    try:
        tree = ast.parse(src)
    except SyntaxError as e:
        raise Rejected(f"syntax error: {e.msg} (line {e.lineno})") from None
    kept = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            _check_import(node)
            kept.append(node)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            _check_def(node)
            kept.append(node)
        # every other top-level statement is left out: it is not part of the answer
    module = ast.Module(body=kept, type_ignores=[])
    _check_body(module)
    return module


# -- running ---------------------------------------------------------------------------------------
_MISSING = object()


class _Timeout(BaseException):
    pass


def _on_alarm(signum, frame):
    raise _Timeout()


def _watched_modules():
    import math

    import torch
    import torch.nn.functional
    import torch.testing
    mods = [builtins, math, torch, torch.nn.functional, torch.testing, torch.Tensor,
            torch._C.TensorBase, torch.nn.Module]
    try:
        import numpy
        import numpy.testing
        mods += [numpy, numpy.testing]
    except ImportError:
        pass
    mods += [m for n, m in sorted(sys.modules.items()) if n.startswith("kvlab") and m is not None]
    return mods


def _snapshot(mods) -> list[tuple[object, dict]]:
    return [(m, dict(vars(m))) for m in mods]


def _changes_and_restore(snap) -> list[str]:
    """Functions, classes or modules of the watched modules that were replaced or deleted (data
    that a module caches, and new attributes, do not count); they are put back."""
    changed = []
    for m, saved in snap:
        now = vars(m)
        name = getattr(m, "__name__", repr(m))
        for k, old in saved.items():
            new = now.get(k, _MISSING)
            if new is old or not (callable(old) or callable(new) or new is _MISSING):
                continue
            if getattr(new, "__wrapped__", None) is old:  # torch wraps some functions lazily
                continue  # (an answer cannot: functools.wraps and __wrapped__ are refused)
            changed.append(f"{name}.{k}")
            try:
                setattr(m, k, old)
            except (AttributeError, TypeError):
                pass
    return sorted(changed)


def _safe_builtins() -> dict:
    b = dict(vars(builtins))
    for n in DENIED_NAMES:
        b.pop(n, None)
    b["__import__"] = builtins.__import__  # `import` statements need it; the imports are checked
    return b


def _first_line(e: BaseException, sources: dict[str, str] | None = None) -> str:
    """One line for the report: the assertion's message and the test line that failed."""
    if isinstance(e, AssertionError):
        where = None
        for f in reversed(traceback.extract_tb(e.__traceback__)):
            if sources and f.filename in sources:
                lines = sources[f.filename].splitlines()
                where = lines[f.lineno - 1].strip() if 0 < f.lineno <= len(lines) else None
                break
        return (str(e) or "assertion failed") + (f": {where}" if where else "")
    return f"{type(e).__name__}: {str(e)[:300]}"


def _run_prelude(prelude, namespace) -> None:
    for code in prelude:
        try:
            exec(code, namespace)
        except Exception:  # noqa: BLE001 - a helper whose defaults need the notebook's parameters
            pass


def run_variant(spec: dict, sources: dict[str, str], timeout: float = 300,
                only: list[str] | None = None) -> dict:
    """Grade one set of answers ({question: answer cell}) against `spec` in this process.
    `only`: run the tests of these questions alone (every answer is still defined)."""
    from kvlab.course.guard import forbid

    # the chapter's imports and helpers, as in the notebook; compiled once, so that a helper in the
    # answers' namespace and in the tests' shares its code object (a forbid target by bare name)
    prelude = [compile(src, "<prelude>", "exec") for src in spec.get("imports", [])]
    ns = {"__name__": "submission", "__builtins__": _safe_builtins()}
    _run_prelude(prelude, ns)
    results, setup = {}, {}
    for q in spec["questions"]:  # definitions first, in notebook order (later answers may use earlier ones)
        src = sources.get(q["name"], "")
        fname = f"{SUBMISSION}:{q['name']}>"
        # the answer's source under its code's file name: what inspect.getsource (Triton's @jit) reads
        linecache.cache[fname] = (len(src), None, src.splitlines(True), fname)
        try:
            code = compile(definitions(src), fname, "exec",
                           flags=__future__.annotations.compiler_flag, dont_inherit=True)
            exec(code, ns)
            setup[q["name"]] = None
        except Rejected as e:
            setup[q["name"]] = f"answer not graded: {e}"
        except BaseException as e:  # noqa: BLE001 - any error while defining scores 0
            setup[q["name"]] = f"defining the answer raised {_first_line(e)}"
    old = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        for q in spec["questions"]:
            if only is not None and q["name"] not in only:
                continue
            name, possible = q["name"], float(q["points"])
            messages = [setup[name]] if setup[name] else []
            snap = _snapshot(_watched_modules())
            if not messages:
                missing = [n for n in q["names"] if n not in ns]
                if missing:
                    messages.append(f"the answer does not define {', '.join(missing)}")
            if not messages:
                env = {"__name__": "tests"}
                _run_prelude(prelude, env)
                env.update({n: ns[n] for n in q["names"]})
                for i, test in enumerate(q["public"] + q["hidden"]):
                    kind = "public" if i < len(q["public"]) else "hidden"
                    signal.setitimer(signal.ITIMER_REAL, timeout)
                    fname = f"<test:{name}:{kind}{i}>"
                    try:
                        targets = [env[t] if t in env and "." not in t else t for t in q.get("forbid", [])]
                        with forbid(*targets, within=SUBMISSION,
                                    reason="write this part yourself"):
                            exec(compile(test, fname, "exec"), env)
                    except _Timeout:
                        messages.append(f"{kind} test {i}: ran past {timeout:g} s")
                    except BaseException as e:  # noqa: BLE001
                        messages.append(f"{kind} test {i}: {_first_line(e, {fname: test})}")
                    finally:
                        signal.setitimer(signal.ITIMER_REAL, 0)
                    if messages:
                        break
            changed = _changes_and_restore(snap)
            if changed:
                messages.append("the answer changed what the tests rely on: " + ", ".join(changed[:5]))
            results[name] = {"score": 0.0 if messages else possible, "possible": possible,
                             "messages": messages}
    finally:
        signal.signal(signal.SIGALRM, old)
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    import os

    import torch
    if not torch.cuda.is_available():  # Triton kernels (chapter 10) run in its CPU interpreter, as in
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the notebook; set before any kernel is defined
    job = json.loads(Path(argv[0]).read_text())
    out = []
    for v in job["variants"]:  # {question: source}, or {"sources": {...}, "only": [question, ...]}
        sources, only = (v["sources"], v["only"]) if "only" in v and "sources" in v else (v, None)
        out.append(run_variant(job["spec"], sources, job.get("timeout", 300), only))
    Path(argv[1]).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
