"""The forbidden-call guard: `with forbid(*targets): ...` makes calling a shortcut fail.

Hidden tests run a student's answer inside `forbid(...)` so that the reference the exercise mirrors
(and the library call that does the whole job) cannot stand in for the student's own code:

    with forbid("torch.softmax", "kvlab.lab.attention_math.repeat_kv", reason="write it yourself"):
        out = stable_softmax(x)

A target is an object or a dotted name. Interception is by identity, not by the name the student
used, so aliasing does not evade it:

- **torch functions** (`"torch.softmax"`, `"torch.nn.functional.scaled_dot_product_attention"`) are
  seen by a `torch.overrides.TorchFunctionMode` (it sees `torch.softmax`, `Tensor.softmax`,
  `F.softmax`, `torch.special.softmax` and `torch.ops.aten._softmax` alike) and, one level lower,
  by a `TorchDispatchMode` that sees the ATen operator every one of them ends in. A family table
  (`FAMILIES`) adds the obvious siblings (`log_softmax` for `softmax`, the fused SDPA kernels).
- **Python functions, classes and modules** (`"kvlab.engine.block_manager.BlockManager"`) are
  matched by code object in a `sys.setprofile` hook: a function's `__code__`, every method of a
  class (so a subclass or an alias still hits them), every function of a module (by file). Builtins
  (`"builtins.sorted"`) are matched by identity on the profiler's `c_call` event. Importing a
  forbidden module inside the block also fails.

A forbidden call raises `ForbiddenCall` naming the target, and is recorded: a student who catches
the exception still fails, because leaving the block raises it again. Leaving the block also checks
that the guard is still installed (profile hook, both torch modes, the import hook); one that was
removed (`sys.setprofile(None)`, popping the mode stack) is a violation, and so is calling the
functions that remove it. What it does not stop: reading kvlab's source and copying it, and code
that never calls the target. See docs/instructors.md.
"""
from __future__ import annotations

import builtins
import importlib
import sys
import threading
import types
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode


class ForbiddenCall(Exception):
    """A forbidden target was called (or the guard was tampered with) inside `forbid(...)`."""


# torch names that do the same job as a forbidden one (matched on `__name__`, ATen names included).
FAMILIES: dict[str, set[str]] = {
    "softmax": {"softmax", "_softmax", "log_softmax", "_log_softmax", "special_softmax",
                "special_log_softmax", "softmin", "_safe_softmax", "_masked_softmax", "logsumexp",
                "special_logsumexp"},
    "cat": {"cat", "_cat", "concat", "concatenate", "stack", "hstack", "vstack", "dstack",
            "column_stack", "row_stack"},
    "scaled_dot_product_attention": {"scaled_dot_product_attention", "multi_head_attention_forward",
                                     "_native_multi_head_attention", "_fused_sdp_choice"},
}
FAMILY_PREFIXES: dict[str, tuple[str, ...]] = {
    "scaled_dot_product_attention": ("_scaled_dot_product_",),
}


@dataclass
class _Target:
    label: str                                    # what the message names
    torch_names: set[str] = field(default_factory=set)
    torch_prefixes: tuple[str, ...] = ()
    codes: set = field(default_factory=set)       # code objects of Python functions/methods
    files: set[str] = field(default_factory=set)  # source files of forbidden modules
    builtins_: set[int] = field(default_factory=set)  # id() of forbidden builtin callables
    modules: set[str] = field(default_factory=set)  # dotted names of forbidden modules


def _is_torch_callable(obj) -> bool:
    if isinstance(obj, (torch._ops.OpOverloadPacket, torch._ops.OpOverload)):
        return True
    mod = getattr(obj, "__module__", None) or getattr(getattr(obj, "__objclass__", None), "__module__", "")
    return isinstance(mod, str) and (mod == "torch" or mod.startswith("torch."))


def _resolve(name: str):
    """Import the longest module prefix of a dotted name, then walk the attributes."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            try:
                obj = getattr(obj, attr)
            except AttributeError as e:
                raise ValueError(f"forbid: target {name!r} does not exist ({e})") from None
        return obj
    raise ValueError(f"forbid: target {name!r}: no importable module in it")


def _torch_name(obj) -> str:
    if isinstance(obj, torch._ops.OpOverload):
        obj = obj.overloadpacket
    return obj.__name__.removeprefix("special_")


def _codes_of(obj, seen: set) -> set:
    """Code objects of a function, or of every function defined in a class (nested classes too)."""
    if id(obj) in seen:
        return set()
    seen.add(id(obj))
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    if isinstance(obj, property):
        return set().union(*(_codes_of(f, seen) for f in (obj.fget, obj.fset, obj.fdel) if f))
    if isinstance(obj, types.MethodType):
        obj = obj.__func__
    # A decorated function (torch.inference_mode(), functools.wraps, lru_cache) is a wrapper whose code
    # object every function with the same decorator shares: match the function it wraps instead (the
    # wrapper calls it, so the profile hook still sees every call).
    while not isinstance(obj, type) and isinstance(getattr(obj, "__wrapped__", None), types.FunctionType):
        obj = obj.__wrapped__
    inner = getattr(obj, "_implementation", None)  # numpy's array-function dispatchers
    if not isinstance(obj, (types.FunctionType, type)) and isinstance(inner, types.FunctionType):
        obj = inner
    if isinstance(obj, types.FunctionType):
        return {obj.__code__}
    if isinstance(obj, type):
        out = set()
        for v in vars(obj).values():
            out |= _codes_of(v, seen)
        return out
    return set()


def _target(t) -> _Target:
    label = t if isinstance(t, str) else getattr(t, "__qualname__", None) or repr(t)
    obj = _resolve(t) if isinstance(t, str) else t
    obj_is_torch = not isinstance(obj, (type, types.ModuleType)) and (
        (isinstance(t, str) and t.startswith("torch.")) or _is_torch_callable(obj))
    tg = _Target(label=label)
    if obj_is_torch:
        name = _torch_name(obj)
        tg.torch_names = {name, "_" + name, "special_" + name} | FAMILIES.get(name, set())
        tg.torch_prefixes = FAMILY_PREFIXES.get(name, ())
        # a Python-level torch function or method (nn.Module.parameters) never reaches the
        # TorchFunctionMode: match its code object too
        tg.codes = _codes_of(obj, set()) if isinstance(obj, (types.FunctionType, types.MethodType)) else set()
        return tg
    if isinstance(obj, types.ModuleType):
        tg.modules.add(obj.__name__)
        f = getattr(obj, "__file__", None)
        if f:
            tg.files.add(f)
            if f.endswith("__init__.py"):  # a package: every module already imported under it
                for mname, m in list(sys.modules.items()):
                    if mname.startswith(obj.__name__ + ".") and getattr(m, "__file__", None):
                        tg.files.add(m.__file__)
                        tg.modules.add(mname)
        return tg
    if isinstance(obj, (types.BuiltinFunctionType, types.BuiltinMethodType)):
        tg.builtins_.add(id(obj))
        return tg
    codes = _codes_of(obj, set())
    if not codes:
        raise ValueError(f"forbid: target {label!r} is not a torch function, a Python function, "
                         f"a class with methods, a module or a builtin")
    tg.codes = codes
    return tg


_GUARDS: list = []  # the active guards, innermost last (shared by all threads)
# Calls that would switch the guard off; always forbidden while a guard is active.
_TORCH_DIR = torch.__file__.rsplit("/", 1)[0] + "/"
_INTERNAL = [0]  # > 0 while the guard itself installs or removes its hooks
_TAMPER = [sys.setprofile, sys.settrace] + [
    getattr(torch._C, n, None) for n in (
        "_pop_torch_function_stack", "_push_on_torch_function_stack", "_set_torch_function_mode",
        "_pop_torch_dispatch_stack", "_push_on_torch_dispatch_stack", "_set_dispatch_mode",
        "_unset_dispatch_mode", "_pop_mode_temporarily")]
_TAMPER_IDS = {id(f) for f in _TAMPER if f is not None}


class _FunctionMode(TorchFunctionMode):
    def __init__(self, guard: _Guard):
        super().__init__()
        self.guard = guard

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        self.guard.check_torch(name, func)
        return func(*args, **(kwargs or {}))


class _DispatchMode(TorchDispatchMode):
    def __init__(self, guard: _Guard):
        super().__init__()
        self.guard = guard

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        self.guard.check_torch(func.overloadpacket.__name__, func)
        return func(*args, **(kwargs or {}))


def _from_within(prefix: str) -> bool:
    """Is a frame of code compiled from a file named `prefix...` on the current stack?"""
    f = sys._getframe(2)
    while f is not None:
        if f.f_code.co_filename.startswith(prefix):
            return True
        f = f.f_back
    return False


class _Guard:
    def __init__(self, targets, reason, within=None):
        self.targets = [_target(t) for t in targets]
        self.reason = reason
        self.within = within
        self.violations: list[str] = []
        self.codes = set().union(*(t.codes for t in self.targets)) if self.targets else set()
        self.files = set().union(*(t.files for t in self.targets)) if self.targets else set()
        self.builtin_ids = set().union(*(t.builtins_ for t in self.targets)) if self.targets else set()
        self.torch_names = set().union(*(t.torch_names for t in self.targets)) if self.targets else set()
        self.torch_prefixes = tuple(p for t in self.targets for p in t.torch_prefixes)
        self.modules = set().union(*(t.modules for t in self.targets)) if self.targets else set()
        self.active = False

    # -- the checks ---------------------------------------------------------------------------
    def fail(self, what: str):
        if self.within is not None and not _from_within(self.within):
            return  # the call was not made (directly or indirectly) by the code under test
        msg = f"{what} is not allowed in this exercise" + (f": {self.reason}" if self.reason else "")
        self.violations.append(msg)
        raise ForbiddenCall(msg)

    def _label(self, pred) -> str:
        for t in self.targets:
            if pred(t):
                return t.label
        return "this call"

    def check_torch(self, name: str, func):
        if not self.active:
            return
        bare = name.removeprefix("special_")
        if name in self.torch_names or bare in self.torch_names or (
                self.torch_prefixes and name.startswith(self.torch_prefixes)):
            label = self._label(lambda t: name in t.torch_names or bare in t.torch_names
                                or (t.torch_prefixes and name.startswith(t.torch_prefixes)))
            self.fail(f"{label} (called as {getattr(func, '__qualname__', None) or func})")

    def profile(self, frame, event, arg):
        if not self.active:
            return
        if event == "call":
            code = frame.f_code
            if code in self.codes or code.co_filename in self.files:
                label = self._label(lambda t: code in t.codes or code.co_filename in t.files)
                self.fail(f"{label} (called as {code.co_qualname})")
        elif event == "c_call":
            i = id(arg)
            if i in self.builtin_ids:
                self.fail(f"{self._label(lambda t: i in t.builtins_)}")
            if i in _TAMPER_IDS and not _INTERNAL[0] and not frame.f_code.co_filename.startswith(_TORCH_DIR):
                # torch pops its own mode stack around each call it dispatches; nothing else may
                self.fail(f"switching the guard off ({getattr(arg, '__qualname__', arg)})")

    def check_import(self, name: str, fromlist):
        if not self.active:
            return
        names = [name] + [f"{name}.{f}" for f in (fromlist or ()) if isinstance(f, str)]
        for n in names:
            for m in self.modules:
                if n == m or n.startswith(m + "."):
                    self.fail(f"importing {m}")


_ORIG_IMPORT = builtins.__import__
_ORIG_IMPORT_MODULE = importlib.import_module


def _guards() -> list:
    return _GUARDS


def _profile(frame, event, arg):
    for g in _guards():
        g.profile(frame, event, arg)


def _guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 0:
        for g in _guards():
            g.check_import(name, fromlist)
    return _ORIG_IMPORT(name, globals, locals, fromlist, level)


def _guarded_import_module(name, package=None):
    if not name.startswith("."):
        for g in _guards():
            g.check_import(name, ())
    return _ORIG_IMPORT_MODULE(name, package)


class forbid:
    """Context manager: inside it, calling any of `targets` raises `ForbiddenCall` (see module doc).

    `targets`: objects or dotted names (torch functions, Python functions, classes, modules,
    builtins). `reason`: appended to the message. `within`: when given, only calls made (directly
    or indirectly) from code whose `co_filename` starts with it count, so a test can call the
    reference itself while the code under test cannot (the grader compiles a submission with the
    file name `<submission:...>`). On exit, a violation that was caught inside the block, or a
    guard that was switched off, raises `ForbiddenCall` again.
    """

    def __init__(self, *targets, reason: str | None = None, within: str | None = None):
        self._guard = _Guard(targets, reason, within)
        self._modes = None
        self._saved = None

    @property
    def violations(self) -> list[str]:
        return list(self._guard.violations)

    def __enter__(self):
        g = self._guard
        self._saved = (sys.getprofile(), threading.getprofile(), builtins.__import__,
                       importlib.import_module)
        _INTERNAL[0] += 1
        try:
            _guards().append(g)
            self._modes = (_FunctionMode(g), _DispatchMode(g))
            for m in self._modes:
                m.__enter__()
            builtins.__import__ = _guarded_import
            importlib.import_module = _guarded_import_module
            threading.setprofile(_profile)
            sys.setprofile(_profile)
        finally:
            _INTERNAL[0] -= 1
        g.active = True
        return self

    def __exit__(self, exc_type, exc, tb):
        g = self._guard
        g.active = False
        broken = []
        if sys.getprofile() is not _profile:
            broken.append("the profile hook")
        if builtins.__import__ is not _guarded_import:
            broken.append("the import hook")
        from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
        if not any(m is self._modes[0] for m in torch.overrides._get_current_function_mode_stack()):
            broken.append("the torch function mode")
        if not any(m is self._modes[1] for m in _get_current_dispatch_mode_stack()):
            broken.append("the torch dispatch mode")
        prof, tprof, imp, impm = self._saved
        _INTERNAL[0] += 1
        sys.setprofile(prof)
        threading.setprofile(tprof)
        builtins.__import__ = imp
        importlib.import_module = impm
        for m in reversed(self._modes):
            try:
                m.__exit__(None, None, None)
            except Exception:  # a tampered stack: the mode is gone already
                pass
        _INTERNAL[0] -= 1
        stack = _guards()
        if g in stack:
            stack.remove(g)
        if broken:
            g.violations.append(f"switching the forbidden-call guard off ({', '.join(broken)} removed) "
                                "is not allowed")
        if exc is not None and not isinstance(exc, Exception):
            return False  # a timeout or an interrupt (it may have unset the hook): let it through
        if g.violations and not isinstance(exc, ForbiddenCall):
            raise ForbiddenCall(g.violations[0])
        return False


def forbidden_names(*targets) -> list[str]:
    """The labels of `targets` as `forbid` names them (for prompts and messages)."""
    return [_target(t).label for t in targets]


__all__ = ["ForbiddenCall", "forbid", "forbidden_names", "FAMILIES"]
