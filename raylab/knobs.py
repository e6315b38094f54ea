"""Config knobs: a field with its allowed range or choices, the parsing of CLI strings ('8/255', 'true', '2,2,2')
into a field's type, and the base class that checks every field of a stage when it is built (`raylab.config`).

Errors are one line: the key, the value, what is allowed.
"""
from __future__ import annotations

import math
import pickle
import typing
from dataclasses import field, fields
from fractions import Fraction
from typing import Any, Mapping


class ConfigError(ValueError):
    """A one-line message naming the offending key and what is allowed."""


def knob(default: Any, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
         choices: tuple | None = None, doc: str = "", inf: bool = False):
    """A config field with its allowed range or choices (checked in `__post_init__`); `inf`: +inf is allowed."""
    return field(default=default, metadata=dict(lo=lo, hi=hi, lo_open=lo_open, choices=choices, doc=doc, inf=inf))


# ---------------------------------------------------------------------------------------------------------------
# Value parsing and checking (shared by every stage).

def _parse_float(text: str) -> float:
    text = text.strip()
    if text.lower() in ("inf", "+inf", "infinity"):
        return math.inf
    return float(Fraction(text)) if "/" in text else float(text)


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


_PARSERS = {int: int, float: _parse_float, bool: _parse_bool, str: str}


def base_type(tp: Any) -> tuple[Any, bool]:
    """(underlying type, optional?) for `T`, `Optional[T]` and `tuple[int, ...]`."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return tp, False


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Turn a Python or string value into `tp`, or raise a one-line ConfigError."""
    base, optional = base_type(tp)
    if optional and isinstance(value, str) and value.strip().lower() in ("none", "null"):
        return None
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: None is not allowed (expected {base.__name__})")
    if typing.get_origin(base) is tuple:
        items = value.split(",") if isinstance(value, str) else list(value)
        return tuple(_coerce(key, int, v) for v in items if str(v).strip() != "")
    if isinstance(value, str) and base is not str:
        try:
            return _PARSERS[base](value)
        except (ValueError, ZeroDivisionError):
            raise ConfigError(f"{key}: cannot parse {value!r} as {base.__name__}") from None
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    ok = isinstance(value, bool) if base is bool else isinstance(value, base) and not isinstance(value, bool)
    if not ok:
        raise ConfigError(f"{key}: expected {base.__name__}, got {type(value).__name__} {value!r}")
    return value


def _check_range(key: str, value: Any, meta: Mapping[str, Any]) -> None:
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
    lo, hi = meta.get("lo"), meta.get("hi")
    if value is None or not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value) and not (value == math.inf and meta.get("inf")):
        raise ConfigError(f"{key}: {'NaN' if math.isnan(value) else value} is not allowed (must be finite)")
    if lo is not None and (value < lo or (meta.get("lo_open") and value == lo)):
        raise ConfigError(f"{key}: {value} is out of range (must be {'>' if meta.get('lo_open') else '>='} {lo})")
    if hi is not None and value > hi:
        raise ConfigError(f"{key}: {value} is out of range (must be <= {hi})")


class Stage:
    """Base of every stage config: coerces and checks each field when constructed."""

    SECTION = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            key = f"{self.SECTION}.{f.name}"
            value = _coerce(key, hints[f.name], getattr(self, f.name))
            _check_range(key, value, f.metadata)
            object.__setattr__(self, f.name, value)
        self.check()

    def check(self) -> None:
        """Cross-field rules inside one stage (overridden where needed)."""


# Errors that are bad input (a key, a file, a refused checkpoint: torch's weights_only and raylab's allowlist
# unpickler raise UnpicklingError): one line, no traceback, also when Ray wraps them (RayTaskError.cause).
BAD_INPUT = (ConfigError, ValueError, FileNotFoundError, pickle.UnpicklingError)


def bad_input(err: BaseException | None) -> BaseException | None:
    """The bad-input error behind `err` (itself, or what Ray or a re-raise wrapped), else None: a bug keeps its
    traceback."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, BAD_INPUT):
            return err
        err, seen = getattr(err, "cause", None) or err.__cause__, seen + 1
    return None
