"""Plans: traced functions and modules that run by replaying their IR (``fp.func2plan``...)."""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import logging
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from producer.plans.capture import trace
from producer.plans.listing import render
from producer.plans.optim_state import optimizer_state
from producer.plans.seams import PlanHost, RemoteTensor, SentPlan
from producer.plans.selfcheck import clone_tensor, clone_tree, self_check, swapped
from producer.plans.shapes import SymbolicUnsupported
from producer.plans.tracer import is_tracing
from schemas.errors import PlanBuildError, PlanInputError, PlanNotBuiltError
from schemas.ir import PlanIR
from schemas.tree import tree_any, tree_leaves, tree_map

log = logging.getLogger(__name__)

NOT_BUILT_MESSAGE = "A plan needs to be built before being sent to a worker."
Traced = tuple[PlanIR, list[str]]
"""A trace's IR and the names of the state tensors it left with a ``.grad``."""

_PLAN_FIELDS = frozenset({"id", "name", "owner", "location", "self_check"})


class State:
    """The state tensors of a function plan, named ``state.0``, ``state.1``...

    Examples
    --------
    >>> s = State([torch.tensor([1])])
    >>> bias, = s.read()
    >>> list(s.named())
    ['state.0']
    """

    def __init__(self, tensors: Sequence[torch.Tensor] = ()) -> None:
        self.tensors = list(tensors)

    def read(self) -> tuple[torch.Tensor, ...]:
        """The state tensors, in order (use them inside the plan's function)."""
        return tuple(self.tensors)

    def named(self) -> dict[str, torch.Tensor]:
        return {f"state.{i}": t for i, t in enumerate(self.tensors)}

    def __repr__(self) -> str:
        return f"State({self.tensors!r})"


def _zeros_like_pointer(value: Any) -> Any:
    """A local stand-in for a pointer (zeros of its shape and dtype) to trace with."""
    if isinstance(value, RemoteTensor):
        return torch.zeros(tuple(value.shape), dtype=value.dtype or torch.float32)
    return value


def _is_remote(value: Any) -> bool:
    return isinstance(value, RemoteTensor)


def _python_state(module: nn.Module) -> dict[tuple[str, str], Any]:
    """Scalar attributes of a module tree: tracing cannot see changes to these."""
    scalars = (bool, int, float, str, type(None))
    return {
        (prefix, key): value
        for prefix, m in module.named_modules()
        for key, value in vars(m).items()
        if isinstance(value, scalars) and not (isinstance(m, Plan) and key in _PLAN_FIELDS)
    }


def _takes_state(function: Callable[..., Any]) -> bool:
    try:
        return "state" in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _without_state(
    params: list[inspect.Parameter], *, named: bool, positional: bool
) -> list[inspect.Parameter] | None:
    """The parameters a caller passes when the plan supplies ``state`` itself.

    ``named``: the function has a ``state`` parameter (passed by keyword, so the
    parameters after it can only be passed by keyword too); ``positional``: the state is
    passed after the caller's positional arguments (the last positional parameter).
    ``None`` when no signature describes the call.
    """
    if named:
        index = next(i for i, p in enumerate(params) if p.name == "state")
        state, after = params[index], params[index + 1 :]
        if state.kind is state.KEYWORD_ONLY:
            return params[:index] + after
        if state.kind is not state.POSITIONAL_OR_KEYWORD:
            return None
        if any(p.kind is p.VAR_POSITIONAL for p in after):
            return None
        keyword = [p.replace(kind=p.KEYWORD_ONLY) if p.kind in _POSITIONAL else p for p in after]
        return params[:index] + keyword
    if positional:
        if any(p.kind is p.VAR_POSITIONAL for p in params):
            return None
        last = [i for i, p in enumerate(params) if p.kind in _POSITIONAL]
        return None if not last else params[: last[-1]] + params[last[-1] + 1 :]
    return params


def _plain_arity(signature: inspect.Signature | None) -> int | None:
    """The positional parameter count when a call passing that many arguments is bound as is.

    ``None`` when keyword-only parameters or ``*args`` need binding in any case.
    """
    if signature is None:
        return None
    kinds = [p.kind for p in signature.parameters.values()]
    if any(k not in (*_POSITIONAL, inspect.Parameter.VAR_KEYWORD) for k in kinds):
        return None
    return sum(k in _POSITIONAL for k in kinds)


def _restore_state_objects(module: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Put back parameters/buffers the traced run replaced; the names that were replaced."""
    now: dict[str, torch.Tensor] = dict(module.named_parameters())
    now.update(module.named_buffers())
    optimizer_buffers = optimizer_state(module)[0]
    replaced = [k for k, t in state.items() if k not in optimizer_buffers and now.get(k) is not t]
    for key in replaced:
        owner_path, _, leaf = key.rpartition(".")
        owner = module.get_submodule(owner_path)
        table = owner._parameters if isinstance(state[key], nn.Parameter) else owner._buffers
        table[leaf] = state[key]  # type: ignore[assignment]
    return replaced


class Plan(nn.Module):
    """A traced function or module that runs by replaying its plan, locally or on a device.

    Subclass it like ``nn.Module`` (layers in ``__init__``, a ``forward``) and call
    ``build(example)``; or get one from :func:`func2plan` / :func:`method2plan`. A built plan
    called with tensors replays its IR through the device interpreter (not the Python
    function) with its live state; called with pointers it runs on their device.

    Examples
    --------
    >>> import torch.nn.functional as F
    >>> class Net(Plan):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc1 = nn.Linear(2, 3)
    ...     def forward(self, x):
    ...         return F.log_softmax(self.fc1(x), dim=0)
    >>> net = Net().build(torch.tensor([1.0, 2.0]))
    >>> net.is_built, sorted(net.named_state())
    (True, ['fc1.bias', 'fc1.weight'])
    """

    _bound_module: nn.Module | None
    self_check: bool = True
    """Run the build-time self-check (eager vs replay); turn off for costly functions."""

    def __init__(
        self,
        name: str | None = None,
        *,
        function: Callable[..., Any] | None = None,
        state: State | Sequence[torch.Tensor] | None = None,
        bound_module: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.id: str = uuid.uuid4().hex
        self.name: str = name or (function.__name__ if function else type(self).__name__)
        self.owner = "me"
        self._function = function
        self._state = state if isinstance(state, State) else State(state or ())
        object.__setattr__(self, "_bound_module", bound_module)
        self._ir: PlanIR | None = None
        self._loaded: Any = None
        self._pointers: dict[str, SentPlan] = {}  # device id -> the plan stored there
        self._dynamic: dict[str, tuple[int, ...]] | None = None
        self._attributes: dict[tuple[str, str], Any] = {}
        self.location: PlanHost | None = None  # where the plan was sent last

    # -- what is traced -------------------------------------------------------------------

    def _target(self) -> tuple[Callable[..., Any], list[str]]:
        """The Python callable to trace and its positional parameter names."""
        if self._function is None:
            fn: Callable[..., Any] = self.forward
        elif self._bound_module is not None:
            fn = functools.partial(self._function, self._bound_module)
        elif self._state.tensors or _takes_state(self._function):
            fn = self._with_state(self._function)
        else:
            fn = self._function
        source = self.forward if self._function is None else self._function
        try:
            params = [
                p.name
                for p in inspect.signature(source).parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "state"
            ]
        except (TypeError, ValueError):
            params = []
        if self._bound_module is not None:
            params = params[1:]  # self
        return fn, params

    def call_signature(self) -> inspect.Signature | None:
        """How the plan is called: the traced function's signature without ``self``/``state``.

        ``None`` when Python cannot tell (a builtin): arguments then pass through as given.

        Examples
        --------
        >>> p = Plan("f", function=lambda x, y=2, *, scale=1.0: (x + y) * scale)
        >>> str(p.call_signature())
        '(x, y=2, *, scale=1.0)'
        """
        if "_signature" in self.__dict__:
            return self.__dict__["_signature"]
        source = self.forward if self._function is None else self._function
        try:
            signature: inspect.Signature | None = inspect.signature(source)
        except (TypeError, ValueError):
            signature = None
        if signature is not None:
            params = list(signature.parameters.values())
            if self._bound_module is not None:
                params = params[1:]  # self
            if self._function is not None and self._bound_module is None:
                named = _takes_state(self._function)
                positional = bool(self._state.tensors) and not named
                kept = _without_state(params, named=named, positional=positional)
                signature = None if kept is None else signature.replace(parameters=kept)
            else:
                signature = signature.replace(parameters=params)
        self.__dict__["_signature"] = signature
        self.__dict__["_arity"] = _plain_arity(signature)
        return signature

    def bind_arguments(
        self, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Bind a call like Python binds the function's: by position or by parameter name.

        Defaults apply; the result passes every positional-or-keyword parameter by position
        and keyword-only ones by name, so ``plan(x, y=y)`` and ``plan(x, y)`` run the same
        plan. A call the function would refuse raises ``PlanInputError`` (a ``TypeError``)
        naming the parameter.

        Examples
        --------
        >>> p = Plan("f", function=lambda x, y=2, *, scale=1.0: (x + y) * scale)
        >>> p.bind_arguments((1,), {"scale": 3.0})
        ((1, 2), {'scale': 3.0})
        >>> p.bind_arguments((1,), {"z": 0})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        schemas.errors.PlanInputError: plan 'f' is called as f(x, ...): got an unexpected ...
        """
        signature = self.call_signature()
        if signature is None:
            return tuple(args), dict(kwargs)
        if not kwargs and len(args) == self.__dict__["_arity"]:
            return tuple(args), {}  # every parameter given by position: already bound
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as exc:
            plain = signature.replace(
                parameters=[p.replace(annotation=p.empty) for p in signature.parameters.values()],
                return_annotation=signature.empty,
            )
            reason = str(exc)
            if "too many positional" in reason:
                names = [p.name for p in plain.parameters.values() if p.kind in _POSITIONAL]
                reason += f" (positional parameters: {', '.join(names) or 'none'})"
            raise PlanInputError(
                f"plan {self.name!r} is called as {self.name}{plain}: {reason}",
                plan_id=self.id,
                plan_name=self.name,
            ) from None
        bound.apply_defaults()
        return bound.args, bound.kwargs

    def _with_state(self, function: Callable[..., Any]) -> Callable[..., Any]:
        wants_keyword = _takes_state(function)

        def with_state(*args: Any, **kwargs: Any) -> Any:
            if wants_keyword:
                return function(*args, state=self._state, **kwargs)
            return function(*args, self._state, **kwargs)

        return with_state

    def _state_module(self) -> nn.Module | None:
        if self._bound_module is not None:
            return self._bound_module
        return self if self._function is None else None

    def named_state(self) -> dict[str, torch.Tensor]:
        """The live state tensors by name (``fc1.weight``, ``bn.running_mean``, ``state.0``)."""
        module = self._state_module()
        if module is None:
            return self._state.named()
        named: dict[str, torch.Tensor] = dict(module.named_parameters())
        named.update(module.named_buffers())
        named.update(optimizer_state(module)[0])
        return named

    def load_state(self, values: Mapping[str, torch.Tensor]) -> None:
        """Copy new values into the live state tensors, in place (optimizers keep working).

        Examples
        --------
        >>> p = Plan("shift", function=lambda x, state: x + state.read()[0], state=[torch.zeros(1)])
        >>> p.load_state({"state.0": torch.ones(1)})
        >>> p.named_state()["state.0"]
        tensor([1.])
        """
        live = self.named_state()
        unknown = sorted(set(values) - set(live))
        if unknown:
            raise PlanInputError(
                f"plan {self.name!r} has no state named {unknown}; its state is {sorted(live)}",
                plan_id=self.id,
                plan_name=self.name,
            )
        with torch.no_grad():
            for key, value in values.items():
                live[key].copy_(value.to(live[key].dtype))

    # -- building -------------------------------------------------------------------------

    def build(self, *args: Any, **kwargs: Any) -> Plan:
        """Trace the function on example arguments into this plan's IR; returns the plan.

        The example run does not change the plan's state or the arguments (they are
        traced on copies). Unless ``self_check`` is off, the plan is then replayed against
        the eager function and any difference is a ``PlanBuildError``. Pointers among the
        arguments stand for zeros of their shape and dtype.
        """
        args, kwargs = self.bind_arguments(args, kwargs)
        if tree_any(_is_remote, (args, kwargs)):
            args, kwargs = tree_map(_zeros_like_pointer, (args, kwargs))
        fn, arg_names = self._target()
        state = self.named_state()
        module = self._state_module()
        before = _python_state(module) if module is not None else {}
        attempt = functools.partial(self._trace_once, fn, arg_names, state, module, args, kwargs)
        ir, grads_left = self._trace(attempt)
        self._refuse_side_effects(module, state, before)
        if grads_left:
            self._warn_grads_left(grads_left)
        self._install(ir, module)
        if self.self_check:
            self._check_against_eager(fn, state, args, kwargs)
        return self

    def _trace(self, attempt: Callable[[bool], Traced]) -> Traced:
        """The IR and the state left with a grad: symbolic sizes, else every size guarded."""
        try:
            return attempt(True)
        except SymbolicUnsupported as exc:
            log.info(
                "plan %r: symbolic sizes cannot express this trace (%s); tracing again with "
                "every size guarded",
                self.name,
                exc,
            )
        return attempt(False)

    def _trace_once(
        self,
        fn: Callable[..., Any],
        arg_names: list[str],
        state: dict[str, torch.Tensor],
        module: nn.Module | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        symbolic: bool,
    ) -> Traced:
        """One trace on copies of the arguments and state."""
        live = list(state.values())
        dynamic = self._dynamic
        with swapped(live, [clone_tensor(t) for t in live]):
            result = trace(
                fn,
                *clone_tree((args, kwargs)),
                name=self.name,
                state=state,
                arg_names=arg_names,
                dynamic=None if dynamic is None else (lambda p, t: dynamic.get(p, ())),
                symbolic=symbolic,
                optimizers=optimizer_state(module)[1] if module is not None else (),
            )
            grads_left = [k for k, t in state.items() if t.grad is not None]
            result.outputs = None  # release the autograd graph before swapping back
        return result.ir, grads_left

    def _refuse_side_effects(
        self,
        module: nn.Module | None,
        state: dict[str, torch.Tensor],
        before: dict[tuple[str, str], Any],
    ) -> None:
        """``PlanBuildError`` if the traced run replaced state tensors or changed attributes."""
        if module is None:
            return
        replaced = _restore_state_objects(module, state)
        if replaced:
            raise PlanBuildError(
                f"plan {self.name!r} replaces its state tensors {replaced[:3]} with new "
                "objects while running (restored now); update them in place instead "
                "(p.copy_(...) or p.sub_(...) under torch.no_grad())",
                plan_name=self.name,
            )
        changed = sorted(
            f"{m + '.' if m else ''}{k}"
            for (m, k), v in _python_state(module).items()
            if (m, k) not in before or before[(m, k)] != v
        )
        if changed:
            raise PlanBuildError(
                f"plan {self.name!r} changes Python attributes {changed} while running; "
                "plans replay only torch ops, so keep such counters in tensors "
                "(a registered buffer updated in place)",
                plan_name=self.name,
            )

    def _warn_grads_left(self, names: list[str]) -> None:
        warnings.warn(
            f"plan {self.name!r} leaves .grad set on {names[:3]}...; devices clear "
            "state gradients at the start and end of every call, so gradient "
            "accumulation across calls does not carry over",
            stacklevel=3,
        )

    def _install(self, ir: PlanIR, module: nn.Module | None) -> None:
        """Make ``ir`` this plan's IR (a rebuilt plan gets a new id: devices hold the old one)."""
        if self._ir is not None:
            self.id, self._pointers, self.location = uuid.uuid4().hex, {}, None
        self._ir, self._loaded = ir, None
        self._attributes = _python_state(module) if module is not None else {}

    def _check_against_eager(
        self,
        fn: Callable[..., Any],
        state: dict[str, torch.Tensor],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        """Replay against the eager function; on any difference the plan is unbuilt again."""
        try:
            self_check(fn, self._replay, state, args, kwargs, name=self.name)
        except BaseException:
            self._ir, self._loaded = None, None
            raise

    @property
    def is_built(self) -> bool:
        return self._ir is not None

    @property
    def ir(self) -> PlanIR:
        """The plan's IR, with ``state_values`` holding the live state to install."""
        if self._ir is None:
            raise PlanNotBuiltError(NOT_BUILT_MESSAGE, plan_id=self.id, plan_name=self.name)
        return dataclasses.replace(self._ir, state_values=self.named_state())

    @property
    def structure(self) -> PlanIR:
        """The traced IR without reading the live state (ops, inputs, outputs): cheap, for
        callers that never send the state (``ir`` collects every state tensor each time).

        >>> p = Plan("double", function=lambda x: x * 2); _ = p(torch.ones(1))
        >>> p.structure.ops is p.ir.ops, p.structure.state_values
        (True, {})
        """
        if self._ir is None:
            raise PlanNotBuiltError(NOT_BUILT_MESSAGE, plan_id=self.id, plan_name=self.name)
        return self._ir

    @property
    def code(self) -> str:
        """A readable listing of the plan's ops (``def name(x): ...``)."""
        if self._ir is None:
            return f"def {self.name}():\n    return"
        return render(self._ir)

    # -- running --------------------------------------------------------------------------

    def _replay(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], state: Mapping[str, torch.Tensor]
    ) -> Any:
        if self._loaded is None:
            from consumer.runtime.interpreter import LoadedPlan

            assert self._ir is not None
            self._loaded = LoadedPlan(self._ir, plan_id=self.id)
        return self._loaded.run(tuple(args), dict(kwargs), state)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if is_tracing():  # inside another plan's trace: be traced as plain torch code
            return self._target()[0](*args, **kwargs)
        args, kwargs = self.bind_arguments(args, kwargs)
        pointers: list[RemoteTensor] = tree_leaves((args, kwargs), keep=_is_remote)
        if pointers:
            if not self.is_built:
                self.build(*args, **kwargs)  # from zeros shaped like the pointers
            location = pointers[0].location
            pointer_plan = self._pointers.get(location.id)
            if pointer_plan is None:
                pointer_plan = self.send(location)
            return pointer_plan(*args, **kwargs)
        if not self.is_built:
            self.build(*args, **kwargs)
        self._check_attributes()
        return self._replay(args, kwargs, self.named_state())

    def _check_attributes(self) -> None:
        """Module attributes (``training``...) must be as they were when the plan was built."""
        module = self._state_module()
        if module is None:
            return
        now = _python_state(module)
        changed = sorted(
            f"{m + '.' if m else ''}{k}: {v!r} -> {now.get((m, k))!r}"
            for (m, k), v in self._attributes.items()
            if now.get((m, k), v) != v
        )
        if changed:
            raise PlanBuildError(
                f"plan {self.name!r} was built with other module attributes ({changed[:3]}); "
                "the plan replays what it traced (e.g. train vs eval mode): call build() "
                "again after changing them",
                plan_id=self.id,
                plan_name=self.name,
            )

    def send(self, device: PlanHost) -> SentPlan:
        """Store the plan (and its current state) on ``device``; returns a ``PointerPlan``."""
        if not self.is_built:
            raise PlanNotBuiltError(NOT_BUILT_MESSAGE, plan_id=self.id, plan_name=self.name)
        pointer = device.send_plan(self)
        self.location = device
        self._pointers[device.id] = pointer
        return pointer

    def copy(self) -> Plan:
        """An independent plan: new id, same IR and behaviour, its own copy of the state.

        A method plan's copy is bound to a copy of its module.
        """
        return copy.deepcopy(self)

    def __repr__(self) -> str:
        kind = "Plan" if type(self) is Plan else type(self).__name__
        text = f"<{kind} {self.name} id:{self.id} owner:{self.owner}"
        if self.location is not None:
            text += f" location:{self.location.id}"
        return text + (" built>" if self.is_built else ">")

    def __deepcopy__(self, memo: dict[int, Any]) -> Plan:
        cls = type(self)
        twin = cls.__new__(cls)
        memo[id(self)] = twin
        fresh: dict[str, Any] = {"_loaded": None, "_pointers": {}, "location": None}
        for cached in ("_signature", "_arity"):  # a method plan's copy has another module
            if cached in self.__dict__:
                fresh[cached] = self.__dict__[cached]
        for key, value in self.__dict__.items():
            if key in fresh:
                object.__setattr__(twin, key, fresh[key])
            elif key == "_ir":  # deepcopy would break the identity of ir.NO_EXPECT
                object.__setattr__(twin, key, value.copy() if value is not None else None)
            else:
                object.__setattr__(twin, key, copy.deepcopy(value, memo))
        object.__setattr__(twin, "id", uuid.uuid4().hex)  # a copy is another plan
        return twin
