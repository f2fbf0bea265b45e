"""Options given by name (``--attack-opt KEY=VALUE``, a grid file, a library call) checked against the
annotations of the class or function that takes them, before any work is done.

Checked annotations: ``int``, ``float``, ``bool``, ``str`` and unions of them with ``None`` (``int | None``). A
value fits when it has one of the annotated types: a bool is not an int, a float is not an int (3.0 included), an
int is a float, NaN and infinities are not floats, a list or a mapping is not a single value. A string, as the
command line leaves a value that is not JSON, is converted to the annotated type where it spells one ("3" to an
int, "0.5" to a float, "true" to a bool, "none" to None); a whole number where only a string fits becomes its
digits (a name of digits that the command line read as a number). Parameters with any other annotation, or none,
are passed through unchecked.
"""

import inspect
import math
import re
import types
import typing

from .errors import MapPruneError

_SCALARS = (int, float, bool, str, type(None))
_MISSING = object()
_EXAMPLES = {int: "3", float: "0.5", bool: "true", str: "NAME"}
_WORDS = {int: "a whole number", float: "a number", bool: "true or false", str: "a string", type(None): "none"}


def _signatures(target) -> tuple[list, bool]:
    """The functions whose keyword parameters ``target`` takes, and whether it also takes names beyond them.

    For a class: its ``__init__`` and, while each passes ``**kwargs`` on, those of its base classes."""
    if not isinstance(target, type):
        return [target], _takes_any(target)
    funcs = []
    for c in target.__mro__:
        init = vars(c).get("__init__")
        if c is object or init is None:
            continue
        funcs.append(init)
        if not _takes_any(init):
            return funcs, False
    return funcs, True


def _takes_any(func) -> bool:
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _parameters(target) -> tuple[dict, dict, bool]:
    """(parameter by name, allowed types by name where checkable, whether other names are taken too)."""
    funcs, open_ended = _signatures(target)
    params, allowed = {}, {}
    for func in funcs:
        try:
            sig = inspect.signature(func)
        except (TypeError, ValueError):
            return {}, {}, True
        try:
            hints = typing.get_type_hints(func)
        except Exception:  # an annotation that does not evaluate: the parameter goes unchecked
            hints = {}
        for name, p in sig.parameters.items():
            if name in params or name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            params[name] = p
            types_ = _scalar_types(hints.get(name))
            if types_:
                allowed[name] = types_
    return params, allowed, open_ended


def _scalar_types(annotation) -> tuple | None:
    """The annotation as a tuple of scalar types, or None where it is not one of those checked."""
    if annotation in _SCALARS:
        return (annotation,)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if all(a in _SCALARS for a in args):
            return args
    return None


def _kind(value) -> str:
    if value is None:
        return "empty (null)"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "a whole number"
    if isinstance(value, float):
        return "a decimal number" if math.isfinite(value) else "a number that is not finite"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def _from_string(value: str, allowed: tuple):
    """The value a string spells in one of the ``allowed`` types, or ``_MISSING`` where it spells none of them."""
    text = value.strip().lower()
    if int in allowed and re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    if float in allowed:
        try:
            number = float(text)
        except ValueError:
            number = None
        if number is not None and math.isfinite(number):
            return number
    if bool in allowed and text in ("true", "false"):
        return text == "true"
    if type(None) in allowed and text in ("none", "null"):
        return None
    return _MISSING


def _fits(value, allowed: tuple) -> bool:
    if value is None:
        return type(None) in allowed
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int):
        return int in allowed or float in allowed
    if isinstance(value, float):
        return float in allowed and math.isfinite(value)
    if isinstance(value, str):
        return str in allowed
    return False


def _checked(name: str, value, allowed: tuple, default, what: str):
    if _fits(value, allowed):
        return value
    if isinstance(value, str):
        converted = _from_string(value, allowed)
        if converted is not _MISSING:
            return converted
    if str in allowed and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    expected = " or ".join(_WORDS[t] for t in allowed)
    raise MapPruneError(f"{what} option {name}={value!r} is {_kind(value)}, but {name} takes {expected}; give e.g. "
                        f"{name}={_example(default, allowed)}")


def _example(default, allowed: tuple) -> str:
    """A value to show in an error: the parameter's default where it is one, else a made-up one of its type."""
    if default is not None and default is not inspect.Parameter.empty and _fits(default, allowed):
        return str(default).lower() if isinstance(default, bool) else str(default)
    return next((_EXAMPLES[t] for t in allowed if t in _EXAMPLES), "none")


def check_options(target, options: dict, what: str) -> dict:
    """``options`` checked against the parameters of ``target`` (a class: its ``__init__`` chain; or a function)
    and returned with strings converted to their annotated types. ``what`` names the taker in errors (``blended``,
    ``the fmt defense``). A name ``target`` does not take, or a value of another type, is a :class:`MapPruneError`
    naming the option, the value and what it takes."""
    params, allowed, open_ended = _parameters(target)
    out = {}
    for name, value in options.items():
        if name not in params:
            if open_ended:
                out[name] = value
                continue
            valid = sorted(k for k, p in params.items() if p.default is not inspect.Parameter.empty)
            raise MapPruneError(f"{what} has no option {name!r}; valid options: {', '.join(valid)}")
        if name in allowed:
            value = _checked(name, value, allowed[name], params[name].default, what)
        out[name] = value
    return out


def keyword_options(cls: type, base: type, skip=()) -> list[str]:
    """The keyword-only parameters of ``cls``'s ``__init__`` chain down to ``base`` (the subclass's first, each
    once), less the names in ``skip``: the options an attack or defense class takes, read from its signature."""
    names = []
    for c in cls.__mro__:
        if "__init__" not in vars(c) or not issubclass(c, base):
            continue
        for k, p in inspect.signature(c.__init__).parameters.items():
            if p.kind is inspect.Parameter.KEYWORD_ONLY and k not in names and k not in skip:
                names.append(k)
    return names
