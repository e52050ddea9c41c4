"""The forbidden-call guard (kvlab.course.guard): shortcuts fail however they are spelled."""
import importlib
import sys

import pytest
import torch
import torch.nn.functional as F

from kvlab.course.guard import ForbiddenCall, forbid


def _x():
    torch.manual_seed(0)
    return torch.randn(4, 8)


@pytest.mark.parametrize("call", [
    lambda x: torch.softmax(x, -1),
    lambda x: x.softmax(-1),
    lambda x: F.softmax(x, dim=-1),
    lambda x: torch.nn.functional.log_softmax(x, -1).exp(),
    lambda x: torch.special.softmax(x, -1),
    lambda x: torch.nn.Softmax(dim=-1)(x),
    lambda x: torch.ops.aten._softmax(x, -1, False),
    lambda x: torch.ops.aten._softmax.default(x, -1, False),
    lambda x: torch.exp(x - torch.logsumexp(x, -1, keepdim=True)),
], ids=["torch", "method", "F", "log_softmax", "special", "module", "aten", "aten_overload", "logsumexp"])
def test_every_spelling_of_softmax_is_caught(call):
    x = _x()
    with pytest.raises(ForbiddenCall, match="torch.softmax"):
        with forbid("torch.softmax"):
            call(x)


def test_aliases_made_before_the_block_are_caught():
    from torch import softmax as s  # noqa: F401  (the alias a student would write)
    sm = torch.Tensor.softmax
    x = _x()
    with pytest.raises(ForbiddenCall):
        with forbid(torch.softmax):
            s(x, -1)
    with pytest.raises(ForbiddenCall):
        with forbid("torch.softmax"):
            sm(x, -1)


def test_allowed_torch_calls_run_and_give_the_same_result():
    x = _x()
    with forbid("torch.softmax", "torch.nn.functional.scaled_dot_product_attention"):
        e = torch.exp(x - x.amax(-1, keepdim=True))
        out = e / e.sum(-1, keepdim=True)
        scores = x @ x.T
    assert torch.allclose(out, torch.softmax(x, -1))
    assert scores.shape == (4, 4)


def test_sdpa_and_its_fused_kernels_are_caught():
    q = torch.randn(1, 2, 5, 8)
    for call in (lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True),
                 lambda: torch._C._nn.scaled_dot_product_attention(q, q, q),
                 lambda: F.scaled_dot_product_attention(q.double(), q.double(), q.double())):
        with pytest.raises(ForbiddenCall, match="scaled_dot_product_attention"):
            with forbid("torch.nn.functional.scaled_dot_product_attention"):
                call()


def test_python_functions_are_caught_by_code_object_not_name():
    from kvlab.lab import attention_math
    from kvlab.lab.attention_math import repeat_kv as rk
    k = torch.randn(1, 2, 3, 4)
    for call in (lambda: rk(k, 2), lambda: attention_math.repeat_kv(k, 2),
                 lambda: getattr(attention_math, "repeat" + "_kv")(k, 2)):
        with pytest.raises(ForbiddenCall, match="repeat_kv"):
            with forbid("kvlab.lab.attention_math.repeat_kv"):
                call()


def test_a_class_its_methods_and_its_subclasses_are_caught():
    from kvlab.engine.block_manager import BlockManager

    class Mine(BlockManager):  # a subclass still runs the forbidden methods
        pass

    for cls in (BlockManager, Mine):
        with pytest.raises(ForbiddenCall, match="BlockManager"):
            with forbid("kvlab.engine.block_manager.BlockManager"):
                cls(num_blocks=4, block_size=2)


def test_importing_a_forbidden_module_inside_the_block_is_caught():
    with pytest.raises(ForbiddenCall, match="importing kvlab.lab.attention_math"):
        with forbid("kvlab.lab.attention_math"):
            from kvlab.lab.attention_math import repeat_kv  # noqa: F401
    with pytest.raises(ForbiddenCall):
        with forbid("kvlab.lab.attention_math"):
            importlib.import_module("kvlab.lab.attention_math")
    with pytest.raises(ForbiddenCall):
        with forbid("kvlab.lab.attention_math"):
            from kvlab.lab import attention_math  # noqa: F401


def test_a_forbidden_module_catches_every_function_in_it():
    from kvlab.lab import attention_math
    with pytest.raises(ForbiddenCall):
        with forbid(attention_math):
            attention_math.repeat_kv(torch.randn(1, 1, 2, 2), 2)


def test_builtins_are_caught_by_identity():
    s = sorted
    with pytest.raises(ForbiddenCall, match="builtins.sorted"):
        with forbid("builtins.sorted"):
            s([3, 1, 2])


def test_a_swallowed_violation_still_fails_when_the_block_ends():
    with pytest.raises(ForbiddenCall, match="torch.softmax"):
        with forbid("torch.softmax"):
            try:
                torch.softmax(_x(), -1)
            except Exception:
                pass


@pytest.mark.parametrize("tamper", [
    lambda: sys.setprofile(None),
    lambda: torch._C._pop_torch_function_stack(),
], ids=["setprofile", "pop_mode"])
def test_switching_the_guard_off_is_a_violation(tamper):
    with pytest.raises(ForbiddenCall, match="guard"):
        with forbid("torch.softmax"):
            try:
                tamper()
            except ForbiddenCall:
                pass
    # the guard is gone afterwards and nothing is left installed
    assert sys.getprofile() is None
    torch.softmax(_x(), -1)


def test_the_message_names_the_target_and_the_reason():
    with pytest.raises(ForbiddenCall) as e:
        with forbid("torch.softmax", reason="write the exponentials yourself"):
            torch.softmax(_x(), -1)
    assert "torch.softmax" in str(e.value) and "write the exponentials yourself" in str(e.value)
    assert "not allowed" in str(e.value)


def test_the_guard_cleans_up_and_nests():
    before = (sys.getprofile(), __import__, importlib.import_module)
    with pytest.raises(ForbiddenCall, match="torch.softmax"):  # the outer block raises on leaving
        with forbid("torch.softmax"):
            with forbid("kvlab.lab.attention_math.repeat_kv"):
                with pytest.raises(ForbiddenCall):
                    torch.softmax(_x(), -1)
    with forbid("kvlab.lab.attention_math.repeat_kv"):
        with forbid("torch.softmax"):
            torch.exp(_x())
    assert (sys.getprofile(), __import__, importlib.import_module) == before
    assert not torch.overrides._get_current_function_mode_stack()
    torch.softmax(_x(), -1)  # allowed again


def test_unknown_targets_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="kvlab.lab.attention_math.nope"):
        forbid("kvlab.lab.attention_math.nope")
    with pytest.raises(ValueError, match="no importable module"):
        forbid("nosuchmodule_xyz.f")


def test_within_counts_only_calls_made_from_the_code_under_test():
    ns = {"torch": torch}
    exec(compile("def student(x):\n    return helper(x)\n", "<submission:q>", "exec"), ns)
    ns["helper"] = lambda x: torch.softmax(x, -1)  # reached through the student's frame: counts
    x = _x()
    with forbid("torch.softmax", within="<submission"):
        ref = torch.softmax(x, -1)  # the test's own call to the reference is allowed
        list(torch.softmax(r, -1) for r in x)
    assert ref.shape == x.shape
    with pytest.raises(ForbiddenCall, match="torch.softmax"):
        with forbid("torch.softmax", within="<submission"):
            ns["student"](x)


def test_python_level_torch_methods_are_caught_by_code_object():
    lin = torch.nn.Linear(2, 2)
    with pytest.raises(ForbiddenCall, match="parameters"):
        with forbid("torch.nn.Module.parameters"):
            sum(p.numel() for p in lin.parameters())


def test_an_interrupt_inside_the_block_goes_through():
    class Stop(BaseException):
        pass

    with pytest.raises(Stop):
        with forbid("torch.softmax"):
            raise Stop()
    assert sys.getprofile() is None


@torch.inference_mode()
def _decorated_a(x):
    return x + 1


@torch.inference_mode()
def _decorated_b(x):
    return x * 2


def test_a_decorated_function_is_identified_by_itself_not_by_the_shared_wrapper():
    """Functions decorated with torch.inference_mode() (or functools.wraps) share the wrapper's code
    object; forbidding one must forbid that function alone, called directly or through an alias."""
    x = torch.ones(2)
    with forbid(_decorated_a):
        assert torch.equal(_decorated_b(x), 2 * x), "another decorated function is still allowed"
    alias = _decorated_a
    with pytest.raises(ForbiddenCall, match="_decorated_a"):
        with forbid(_decorated_a):
            alias(x)
    with forbid("kvlab.generate.iter_generate"):
        assert torch.equal(_decorated_b(x), 2 * x)
