"""Typed configuration sections: dataclasses whose fields declare their type, default, help and bounds,
checked whenever a section is made, with every error naming its key path.

    @dataclass
    class LoraConfig(MethodConfig):
        r: int = option(8, "Rank of the update B @ A.", gt=0)

A field's annotation is enforced: ``int``, ``float`` (an int or YAML 1.1's ``1e-3`` string becomes a
float; NaN and infinity are refused), ``str``, ``bool``, ``Literal[...]`` (one of its values),
``list[T]``, ``dict[str, T]``, ``T | None`` and ``Any``. A field whose annotation is a Section is a nested mapping. A section class
with a ``registry`` is abstract: the mapping's selecting key (``data.format``, ``method.name``) picks
the registered class to build, so a new reader or method is one file that registers its own section.
Cross-field rules go in a section's ``validate``, which runs after every field has been checked.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import math
import types
import typing
from typing import Any, ClassVar, Literal

from medpeft.errors import ConfigError

_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory=None, required: bool = False,
           length: int | None = None, **bounds: float) -> Any:
    """A section field: its default (lists and dicts are copied per instance; `factory` makes one, e.g. a
    nested section), a one-sentence `help` (the documentation tables are made from it), `required` (an
    empty value is refused), the exact `length` of a list, and numeric bounds ``gt``/``ge``/``lt``/``le``
    (on a list: on every item)."""
    unknown = set(bounds) - set(_BOUNDS)
    if unknown:
        raise TypeError(f"option() got unknown bounds {sorted(unknown)}")
    metadata = {"help": help, "required": required, "length": length, "bounds": bounds}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


class Registry:
    """Names -> section classes for one selecting key (e.g. ``data.format``): ``@REGISTRY.register("nih")``.

    The classes register themselves when their modules are imported: `package` is the one that imports
    them all, imported the first time the registry is read (so reading a config needs no import order, and
    importing the config layer alone imports no reader or method)."""

    def __init__(self, key: str, noun: str, package: str):
        self.key, self.noun, self.package = key, noun, package
        self.attribute = key.rpartition(".")[2]
        self._classes: dict[str, type] = {}

    @property
    def classes(self) -> dict[str, type]:
        """Every registered name -> class."""
        importlib.import_module(self.package)
        return self._classes

    def register(self, name: str):
        def decorate(cls: type) -> type:
            if name in self._classes:
                raise ValueError(f"{self.key} {name!r} is registered twice")
            setattr(cls, self.attribute, name)
            self._classes[name] = cls
            return cls
        return decorate

    def get(self, name) -> type:
        classes = self.classes
        if name not in classes:
            raise ConfigError(f"{self.key} {name!r} is not a known {self.noun} (expected one of: "
                              f"{', '.join(classes)})")
        return classes[name]


class Section:
    """Base of every config section: ``path`` is where it sits in a run config ('train', 'data.split')."""

    path: ClassVar[str] = ""
    registry: ClassVar[Registry | None] = None
    """Set on an abstract section: the mapping's selecting key picks the registered class."""
    default_selection: ClassVar[str | None] = None
    """The name selected when the mapping does not give the selecting key (None: the key is required)."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if f.init:
                setattr(self, f.name, check_value(field_types(type(self))[f.name], getattr(self, f.name),
                                                  self.key(f.name), f.metadata))
        self.validate()

    def validate(self) -> None:
        """Cross-field rules of the section; raise ConfigError naming the key path."""

    @classmethod
    def key(cls, name: str) -> str:
        return f"{cls.path}.{name}" if cls.path else name

    @classmethod
    def fields(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if f.init]


def field_types(cls: type) -> dict:
    """The resolved annotations of `cls`, computed once per class."""
    if "_type_hints" not in cls.__dict__:
        cls._type_hints = typing.get_type_hints(cls)
    return cls._type_hints


def build(cls: type, data: Any) -> Any:
    """Make section `cls` (or the class its registry selects) from a mapping: unknown keys are refused,
    nested sections are built first, every value is checked."""
    path = cls.path
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'} must be a mapping, got {type(data).__name__}")
    data = dict(data)
    if cls.registry is not None:
        attribute = cls.registry.attribute
        if attribute not in data and cls.default_selection is None:
            raise ConfigError(f"{cls.registry.key} is required")
        cls = cls.registry.get(data.pop(attribute, cls.default_selection))
    names = [f.name for f in cls.fields()]
    unknown = [key for key in data if key not in names]
    if unknown:
        where = f" for {cls.registry.key} {getattr(cls, cls.registry.attribute)!r}" if cls.registry else ""
        raise ConfigError(f"config key '{_join(path, unknown[0])}' does not exist{where} "
                          f"(expected one of: {', '.join(names)})")
    hints = field_types(cls)
    for f in cls.fields():
        if f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"config {'section' if _is_section(hints[f.name]) else 'key'} "
                              f"'{_join(path, f.name)}' is required")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        kwargs[name] = build(hint, value) if _is_section(hint) else value
    return cls(**kwargs)


def explicit(section: Section) -> dict:
    """The values of `section` that differ from their defaults, as plain data: what a user (or a catalogue
    entry) set. A nested section gives its own such values and is left out when it has none; a registered
    section keeps its selecting key (``method.name``). An option added to medpeft later, at its default,
    leaves it unchanged."""
    registry = type(section).registry
    out = {registry.attribute: getattr(section, registry.attribute)} if registry else {}
    for f in type(section).fields():
        value = getattr(section, f.name)
        if isinstance(value, Section):
            if nested := explicit(value):
                out[f.name] = nested
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if value != default:
            out[f.name] = copy.deepcopy(value)
    return out


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _is_section(hint) -> bool:
    return isinstance(hint, type) and issubclass(hint, Section)


def _options(hint) -> tuple:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return (hint,)


def type_name(hint) -> str:
    """How a field's type reads in messages and documentation: 'int', 'list of str', 'str or None'."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin is list:
        return f"list of {type_name(args[0])}"
    if origin is dict:
        return f"mapping of {type_name(args[0])} to {type_name(args[1])}"
    if len(_options(hint)) > 1:
        return " or ".join(type_name(o) for o in _options(hint))
    if hint is type(None):
        return "None"
    return "any" if hint is Any else getattr(hint, "__name__", str(hint))


def check_value(hint, value, key: str, metadata: typing.Mapping = types.MappingProxyType({})):
    """`value` as a `hint`, or ConfigError naming `key`; then the field's required, length and bounds."""
    value = _coerce(hint, value, key)
    if metadata.get("required") and value in ("", None, [], {}):
        raise ConfigError(f"{key} is required: {metadata['help']}")
    length = metadata.get("length")
    if length is not None and value is not None and len(value) != length:
        raise ConfigError(f"{key} must have {length} values, got {value!r}")
    bounds = metadata.get("bounds")
    if bounds and value is not None:
        for item in value if isinstance(value, list) else [value]:
            _check_bounds(item, bounds, key)
    return value


def _check_bounds(value, bounds: dict, key: str) -> None:
    low = ("(" if "gt" in bounds else "[", bounds.get("gt", bounds.get("ge")))
    high = (bounds.get("lt", bounds.get("le")), ")" if "lt" in bounds else "]")
    ok = all({"gt": value > b, "ge": value >= b, "lt": value < b, "le": value <= b}[name]
             for name, b in bounds.items())
    if ok:
        return
    if low[1] is not None and high[0] is not None:
        raise ConfigError(f"{key} must be in {low[0]}{_number(low[1])}, {_number(high[0])}{high[1]}, got {value!r}")
    name, bound = next(iter(bounds.items()))
    raise ConfigError(f"{key} must be {_BOUNDS[name]} {_number(bound)}, got {value!r}")


def _number(bound: float) -> str:
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


def _coerce(hint, value, key: str):
    if hint is Any:
        return value
    options = _options(hint)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{key} must not be empty (expected {type_name(hint)})")
    for option_hint in options:
        try:
            return _coerce_one(option_hint, value, key)
        except _Mismatch:
            continue
    raise ConfigError(f"{key} must be {type_name(hint)}, got {value!r}")


class _Mismatch(Exception):
    """The value is not of this type (another option of a union may fit)."""


def _coerce_one(hint, value, key: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value in args and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be one of {list(args)}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        return [_coerce(args[0], item, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        return {_coerce(args[0], k, f"{key} key"): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:  # YAML 1.1 reads 1e-3 (no dot) as a string
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{key} must be a finite number, got {value!r}")
            return number
    elif isinstance(hint, type) and isinstance(value, hint):
        return value
    raise _Mismatch
