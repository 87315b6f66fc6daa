"""What a config ``target`` accepts, read from its constructor's typed signature, and the checks built on it.

A config node ``{target: pkg.mod.Class, params: {...}}`` is checked against ``Class``'s signature, generically:

* **keys**: every ``params`` key must be a parameter. A ``**kwargs`` that a class forwards to
  ``super().__init__(..., **kwargs)`` (read from the source, e.g. ``LatentInpaintDiffusion`` ->
  ``LatentDiffusion``) is followed up the class hierarchy; a ``**kwargs`` used any other way (a function, a
  logger that hands its kwargs to a client library) accepts any key. An unknown key is an error with a
  "did you mean" suggestion.
* **nested keys**: a parameter annotated with a dataclass (alone, in a union such as ``SplitConfig | None``, or
  as the element type of a mapping or list: ``dict[str, CaptionDropout]``) whose value is a mapping has that
  mapping checked as the dataclass's keyword arguments, recursively, so a typo in ``data.params.train`` or in
  ``model.params.ucg_training.txt`` is named and suggested like one in ``data.params``.
* **types**: each value must fit the parameter's annotation: ``int``, ``float`` (ints are accepted), ``bool``,
  ``str``, ``None``, ``Literal[...]`` choices, unions, ``list``/``tuple``/``Sequence`` and ``dict``/``Mapping``
  (element types included), ``Path`` (a string) and enums (a member's value or name). Annotations that a yaml
  value cannot be judged against (other classes, callables) accept anything.
* **ranges**: ``Annotated[float, Range(0, 1)]`` (or an alias: :data:`Probability`, :data:`PositiveFloat`,
  :data:`NonNegativeFloat`, :data:`PositiveInt`, :data:`NonNegativeInt`) also bounds the value, also inside
  lists and nested dataclasses, so a probability of 2 or a negative learning rate is named at start-up, and
  ``configs/README.md`` shows the bound next to the parameter. NaN is outside every range.

:func:`check_tree` applies this to every target node of a config tree, so mistakes stop at start-up with one
line that names the full key (``data.params.batch_size: expected int, got 'abc'``).
"""

from __future__ import annotations

import ast
import collections.abc as cabc
import dataclasses
import difflib
import enum
import importlib
import inspect
import logging
import pathlib
import textwrap
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any

log = logging.getLogger(__name__)

__all__ = ["ConfigError", "NonNegativeFloat", "NonNegativeInt", "PositiveFloat", "PositiveInt", "Probability",
           "Range", "accepted_params", "annotations_of", "check_params", "check_tree", "check_value", "describe_range",
           "get_obj_from_str", "nested_schema", "suggest"]


class ConfigError(ValueError):
    """A user-facing configuration mistake. Entry points print its message without a traceback.

    Args:
        message: what is wrong and what to do.
        key: the parameter the message is about, when raised inside a constructor; the instantiation adds the
            config path in front (``model.params.cond_stage_config.params.<key>``).
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key, self.detail = key, message
        self.located = False  # True once the message names its place in the config


@dataclass(frozen=True)
class Range:
    """A numeric bound for ``typing.Annotated``: ``Annotated[float, Range(0, 1)]`` is a float in [0, 1].

    Args:
        lo: lower bound (None: unbounded).
        hi: upper bound (None: unbounded).
        lo_open: exclude ``lo`` itself (``Range(0, lo_open=True)``: > 0).
        hi_open: exclude ``hi`` itself.
    """

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def contains(self, value: float) -> bool:
        """Whether ``value`` lies in the range (NaN never does)."""
        if value != value:  # NaN
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}" if self.lo is not None else "any number"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"


#: a probability or fraction: a float in [0, 1]
Probability = Annotated[float, Range(0, 1)]
#: a float > 0 (learning rates, epsilons, scales)
PositiveFloat = Annotated[float, Range(0, lo_open=True)]
#: a float >= 0 (weights of loss terms, weight decay)
NonNegativeFloat = Annotated[float, Range(0)]
#: an int >= 1 (sizes, counts, frequencies)
PositiveInt = Annotated[int, Range(1)]
#: an int >= 0 (worker counts, buffer sizes that may be off)
NonNegativeInt = Annotated[int, Range(0)]


def suggest(name: str, choices: typing.Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``choices``, or ``""``."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


#: keys that live beside ``target``/``params`` (``model.base_learning_rate``), often written inside ``params``
PARENT_KEYS = ("base_learning_rate",)

#: ldm configs name the training callbacks ``main.<Name>`` (they lived in ldm's ``main.py``); here they live in
#: this package, and ``main.py`` only re-exports them
LDM_MAIN_MODULE = "main"
CALLBACKS_MODULE = "ldm.callbacks"


def _ldm_main_target(module: str, name: str) -> Any | None:
    """``ldm.callbacks.<name>`` for an ldm ``main.<name>`` target, else None.

    COMPAT (docs/DECISIONS.md D10): official configs say ``main.ImageLogger``. ``import main`` works only from the
    repository root (or with it on PYTHONPATH) and, elsewhere, may import an unrelated ``main.py`` of the working
    directory; the names ``main.py`` re-exports resolve to the same objects in ``ldm.callbacks`` from anywhere.
    A ``main.X`` that ``ldm.callbacks`` lacks is imported from ``main`` as written.
    """
    if module != LDM_MAIN_MODULE:
        return None
    callbacks = importlib.import_module(CALLBACKS_MODULE)
    obj = getattr(callbacks, name, None)
    if obj is not None:
        log.debug("target '%s.%s' resolved to '%s.%s' (ldm config compatibility)", module, name,
                  CALLBACKS_MODULE, name)
    return obj


def get_obj_from_str(string: str) -> Any:
    """Import ``"pkg.module.Name"`` and return ``Name`` (ldm's ``main.<callback>`` targets: see below)."""
    if not isinstance(string, str):
        raise ConfigError(f"target must be a dotted path string like 'pkg.module.Class', got {string!r}")
    module, _, name = string.rpartition(".")
    if not module:
        raise ConfigError(f"target '{string}' is not a dotted path like 'pkg.module.Class'")
    compat = _ldm_main_target(module, name)
    if compat is not None:
        return compat
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise ConfigError(f"target '{string}': cannot import module '{module}' ({e})") from e
    try:
        return getattr(mod, name)
    except AttributeError as e:
        raise ConfigError(f"target '{string}': module '{module}' has no attribute '{name}'"
                          f"{suggest(name, dir(mod))}") from e


# ------------------------------------------------------------------------------------------ signatures
class Param(typing.NamedTuple):
    annotation: Any  # resolved annotation, or Any when unknown
    required: bool


def _hints(fn: Any) -> dict[str, Any]:
    """Resolved annotations of ``fn``; names that cannot be resolved (TYPE_CHECKING imports) become Any."""
    fn = inspect.unwrap(fn)  # decorated constructors (pl.Trainer): the real function's module resolves names
    try:
        return typing.get_type_hints(fn, include_extras=True)  # keep Annotated[..., Range(...)]
    except Exception:  # one unresolvable name spoils get_type_hints: resolve one by one
        out = {}
        globalns = getattr(fn, "__globals__", {})
        for name, ann in getattr(fn, "__annotations__", {}).items():
            try:
                out[name] = eval(ann, globalns) if isinstance(ann, str) else ann  # noqa: S307 - annotations only
            except Exception:
                out[name] = Any
        return out


def annotations_of(obj: Any) -> dict[str, Any]:
    """The resolved annotations (``Annotated`` kept) of a function's or a class constructor's parameters."""
    return _hints(_constructor(obj) if inspect.isclass(obj) else obj)


def _forwards_kwargs_to_super(init: Any, varkw: str) -> bool:
    """Whether ``init``'s source calls ``super().__init__(..., **<varkw>)``."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(init)))
    except (OSError, TypeError, SyntaxError):
        return False
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "__init__"
                and isinstance(node.func.value, ast.Call) and isinstance(node.func.value.func, ast.Name)
                and node.func.value.func.id == "super"):
            if any(kw.arg is None and isinstance(kw.value, ast.Name) and kw.value.id == varkw for kw in node.keywords):
                return True
    return False


def _constructor(cls: type) -> Any:
    """The function whose annotations describe ``cls(...)``: its ``__init__``, else its ``__new__``."""
    init = getattr(cls, "__init__", None)
    return cls.__new__ if init is object.__init__ else init


def _own_params(fn: Any, skip_first: bool) -> tuple[dict[str, Param], str | None] | None:
    """(named parameters, name of ``**kwargs`` or None) of ``fn``; None when it has no readable signature."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    hints = _hints(_constructor(fn) if inspect.isclass(fn) else fn)
    params, varkw = {}, None
    items = list(sig.parameters.values())[1 if skip_first else 0:]
    for p in items:
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            varkw = p.name
        elif p.kind is not inspect.Parameter.VAR_POSITIONAL:
            params[p.name] = Param(hints.get(p.name, Any), p.default is inspect.Parameter.empty)
    return params, varkw


@cache
def accepted_params(obj: Any) -> dict[str, Param] | None:
    """The keyword parameters ``obj(**params)`` accepts, by name; None when it accepts any keyword."""
    if not inspect.isclass(obj):
        own = _own_params(obj, skip_first=False)
        return None if own is None or own[1] is not None else own[0]
    own = _own_params(obj, skip_first=False)  # the class's call signature (__init__ or __new__)
    if own is None:
        return None
    params, varkw = own
    if varkw is None:
        return params
    # **kwargs: follow it up the hierarchy while each __init__ hands it to super().__init__
    for cls in obj.__mro__:
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        if cls is object:
            return params
        level = _own_params(init, skip_first=True)
        if level is None:
            return None
        level_params, level_varkw = level
        params = {**level_params, **params}
        if level_varkw is None:
            return params
        if not _forwards_kwargs_to_super(init, level_varkw):
            return None
    return params


# ------------------------------------------------------------------------------------------------ types
_SEQUENCES = (list, tuple, set, frozenset, cabc.Sequence, cabc.MutableSequence, cabc.Iterable, cabc.Collection,
              cabc.Set)
_MAPPINGS = (dict, cabc.Mapping, cabc.MutableMapping)


def _fmt(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _ranges(annotation: Any) -> list[Range]:
    return [m for m in typing.get_args(annotation)[1:] if isinstance(m, Range)]


def describe_range(annotation: Any) -> str:
    """The bounds that ``annotation`` (or the arms of its union) puts on a number, e.g. ``in [0, 1]``; "" if none."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        arms = typing.get_args(annotation)
        bounds = [d for a in arms if (d := describe_range(a))]
        if not bounds:
            return ""
        fixed = [repr(v) for a in arms if typing.get_origin(a) is typing.Literal for v in typing.get_args(a)]
        return " or ".join(dict.fromkeys(fixed + bounds))  # -1 or >= 1
    if typing.get_origin(annotation) is typing.Annotated:
        return " and ".join(str(r) for r in _ranges(annotation))
    if typing.get_origin(annotation) in (*_SEQUENCES, *_MAPPINGS) and typing.get_args(annotation):
        inner = describe_range(typing.get_args(annotation)[-1])
        return f"each {inner}" if inner else ""
    return ""


class _Nothing:
    """A value that fits no annotation but Any: ``check_value(_NOTHING, t)`` describes ``t``."""


_NOTHING = _Nothing()


def check_value(value: Any, annotation: Any) -> str | None:
    """None if ``value`` fits ``annotation``, else a description of what was expected."""
    if annotation is Any or annotation is inspect.Parameter.empty or annotation is object:
        return None
    if annotation is None or annotation is type(None):
        return None if value is None else "null"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        ranges = _ranges(annotation)
        problem = check_value(value, args[0])
        if problem is None and all(r.contains(value) for r in ranges):
            return None
        return " ".join([problem or check_value(_NOTHING, args[0]) or "a value", *map(str, ranges)])
    if origin is typing.Union or origin is types.UnionType:
        literals = tuple(a for arm in args if typing.get_origin(arm) is typing.Literal for a in typing.get_args(arm))
        arms = [arm for arm in args if typing.get_origin(arm) is not typing.Literal]
        problems = [check_value(value, arm) for arm in ([typing.Literal[literals]] if literals else []) + arms]
        return None if any(p is None for p in problems) else " or ".join(dict.fromkeys(problems))
    if origin is typing.Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return None
        return "one of " + ", ".join(_fmt(a) for a in args)
    if annotation is bool:
        return None if isinstance(value, bool) else "bool (true/false)"
    if annotation is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "int"
    if annotation is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "float"
    if annotation is str:
        return None if isinstance(value, str) else "str"
    if isinstance(annotation, type) and issubclass(annotation, pathlib.PurePath):
        return None if isinstance(value, (str, pathlib.PurePath)) else "a path (str)"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        names = [m.name for m in annotation]
        if isinstance(value, annotation) or value in [m.value for m in annotation] or value in names:
            return None
        return f"one of {', '.join(names)}"
    container = origin or annotation
    if container in _SEQUENCES:
        if not isinstance(value, cabc.Sequence) or isinstance(value, (str, bytes)):
            return "a list"
        if container is tuple and len(args) >= 1 and args[-1] is not Ellipsis:
            if len(value) != len(args):
                return f"a list of {len(args)} items"
            problems = [check_value(v, a) for v, a in zip(value, args)]
        else:
            problems = [check_value(v, args[0]) for v in value] if args else []
        bad = next((p for p in problems if p is not None), None)
        return None if bad is None else f"a list of {bad}"
    if container in _MAPPINGS:
        if not isinstance(value, Mapping):
            return "a mapping"
        if len(args) == 2:
            bad = next((p for k, v in value.items() for p in (check_value(k, args[0]), check_value(v, args[1]))
                        if p is not None), None)
            return None if bad is None else f"a mapping of {bad}"
        return None
    return None  # classes, callables, type variables: a yaml value cannot be judged against them


# ------------------------------------------------------------------------------------------------ checks
def _at(message: str) -> ConfigError:
    """A ConfigError whose message already names its place in the config."""
    err = ConfigError(message)
    err.located = True
    return err


def _arms(annotation: Any) -> tuple[Any, ...]:
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return typing.get_args(annotation) if union else (annotation,)


def nested_schema(annotation: Any) -> type | None:
    """The dataclass among ``annotation``'s arms (``SplitConfig | Mapping | None`` -> ``SplitConfig``), or None."""
    return next((a for a in _arms(annotation) if isinstance(a, type) and dataclasses.is_dataclass(a)), None)


def _check_nested(value: Any, annotation: Any, where: str, complete: bool) -> None:
    """Check the keys of ``value`` wherever ``annotation`` puts a dataclass (module docstring, "nested keys")."""
    schema = nested_schema(annotation)
    if schema is not None and isinstance(value, Mapping):
        check_params(schema, value, where, complete=complete)
        return
    for arm in _arms(annotation):
        origin, args = typing.get_origin(arm), typing.get_args(arm)
        if origin in _MAPPINGS and len(args) == 2 and isinstance(value, Mapping):
            for k, v in value.items():
                _check_nested(v, args[1], f"{where}.{k}", complete)
        elif origin in _SEQUENCES and len(args) == 1 and isinstance(value, cabc.Sequence) and not isinstance(
                value, (str, bytes)):
            for i, v in enumerate(value):
                _check_nested(v, args[0], f"{where}[{i}]", complete)


def check_params(obj: Any, params: Mapping[str, Any], where: str, complete: bool = False) -> None:
    """Raise :class:`ConfigError` for a key ``obj`` does not accept or a value of the wrong type.

    ``where`` names the ``params`` mapping in messages (``model.params``). With ``complete`` (the real call is
    next) a missing required parameter is an error too. A mapping given for a dataclass-annotated parameter is
    checked as that dataclass's parameters (module docstring, "nested keys").
    """
    accepted = accepted_params(obj)
    if accepted is None:
        return
    name = getattr(obj, "__qualname__", str(obj))
    for key, value in params.items():
        if key not in accepted:
            if where.endswith(".params") and key in PARENT_KEYS:  # a key of the node itself, written one level down
                raise _at(f"{where}.{key}: unknown key for '{name}'; {key} belongs beside target/params: write "
                          f"{where[: -len('.params')]}.{key}")
            raise _at(f"{where}.{key}: unknown key for '{name}'{suggest(key, accepted)}. "
                      f"Valid keys: {', '.join(accepted)}")
        expected = check_value(value, accepted[key].annotation)
        if expected is not None:
            raise _at(f"{where}.{key}: expected {expected}, got {_fmt(value)}")
        _check_nested(value, accepted[key].annotation, f"{where}.{key}", complete)
    if complete:
        missing = [k for k, p in accepted.items() if p.required and k not in params]
        if missing:
            raise _at(f"{where}: '{name}' needs the key(s) {', '.join(missing)}")


def check_tree(node: Any, where: str, extra_keys: Mapping[str, Any] | None = None) -> None:
    """Check every ``{target, params}`` node inside ``node`` (plain dicts and lists), naming the full key.

    A target node may hold only ``target`` and ``params`` (plus ``extra_keys``: name -> annotation, for the
    top-level ``model`` section's ``base_learning_rate``).
    """
    if isinstance(node, list):
        for i, item in enumerate(node):
            check_tree(item, f"{where}[{i}]")
        return
    if not isinstance(node, Mapping):
        return
    if "target" not in node:
        for key, value in node.items():
            check_tree(value, f"{where}.{key}")
        return
    allowed = {"target": str, "params": Any, **(extra_keys or {})}
    for key, value in node.items():
        if key not in allowed:
            raise ConfigError(f"{where}.{key}: unknown key{suggest(key, allowed)}; a target node holds "
                              f"{', '.join(allowed)}")
        expected = check_value(value, allowed[key])
        if expected is not None:
            raise ConfigError(f"{where}.{key}: expected {expected}, got {_fmt(value)}")
    try:
        obj = get_obj_from_str(node["target"])
    except ConfigError as e:
        raise ConfigError(f"{where}.target: {e}") from e
    params = node.get("params") or {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"{where}.params: expected a mapping, got {_fmt(params)}")
    check_params(obj, params, f"{where}.params")
    for key, value in params.items():
        check_tree(value, f"{where}.params.{key}")
