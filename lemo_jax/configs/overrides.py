"""Typed overrides, JSON round trips and comparison for trees of frozen config dataclasses.

`apply_overrides(config, ["train.learning_rate=1e-4", "lora.targets=q_proj,v_proj"])` parses each
value against the field's declared type and rebuilds the tree bottom-up with `dataclasses.replace`,
so every touched dataclass runs its `__post_init__` validation. `config_to_dict` and
`config_from_dict` save and reload a config as JSON, type-checked by the same field types, and
`config_differences` lists the dotted paths where two configs disagree.

Nothing here knows any field name: the dataclass annotations are the whole schema. Supported field
types are `int`, `float`, `bool`, `str`, `tuple[X, ...]` of those, `X | None` of any of these, and
nested dataclasses (sections, reached by dotted paths and never assigned whole).

Text values (`path=value`; everything after the first `=` is the value, verbatim):
- int: Python's `int()` syntax: an optional sign, decimal digits, `_` between digits ("1_000").
  "1.5" and "1e3" are rejected rather than silently truncated.
- float: Python's `float()` syntax: "2e-5", "0.1", "3", "inf".
- bool: true/false, yes/no, 1/0, in any case; anything else is an error.
- str: the value as written; the word "none" stays a string unless the field is optional.
- `X | None`: "none" or "null" (any case) gives None, so an optional string field cannot hold the
  literal word "none".
- `tuple[X, ...]`: comma-separated items, each stripped of spaces and parsed as X; the empty
  string gives (); an empty item ("a,,b", "a,") is an error.
Setting the same path twice in one call is an error: with `--set` flags it is almost always a
mistake, and silently letting the last one win would hide it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, TypeVar

from lemo_jax.errors import UserError

T = TypeVar("T")

# Each supported scalar type and how messages name one value and a list of values.
_SCALAR_NAMES = {
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    bool: ("a boolean (true/false, yes/no, 1/0)", "booleans"),
    str: ("a string", "strings"),
}
_TRUE_WORDS = ("true", "yes", "1")
_FALSE_WORDS = ("false", "no", "0")
_NONE_WORDS = ("none", "null")


@dataclasses.dataclass(frozen=True)
class _FieldType:
    """A declared field type reduced to what parsing needs: `base`, `tuple[base, ...]`, or a
    section (a nested dataclass), each possibly `| None`."""

    base: type
    is_tuple: bool = False
    is_optional: bool = False

    @property
    def is_section(self) -> bool:
        return dataclasses.is_dataclass(self.base)

    def describe(self) -> str:
        singular, plural = _SCALAR_NAMES[self.base]
        text = f"a comma-separated list of {plural}" if self.is_tuple else singular
        return f"{text} or none" if self.is_optional else text


def _reduce_annotation(annotation: Any, where: str) -> _FieldType:
    """Maps a resolved annotation onto `_FieldType`; anything else is a bug in the config tree."""
    origin = typing.get_origin(annotation)
    arguments = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType) and type(None) in arguments:
        others = [argument for argument in arguments if argument is not type(None)]
        if len(others) == 1:
            inner = _reduce_annotation(others[0], where)
            if not inner.is_section:
                return dataclasses.replace(inner, is_optional=True)
    elif origin is tuple and len(arguments) == 2 and arguments[1] is Ellipsis:
        if arguments[0] in _SCALAR_NAMES:
            return _FieldType(arguments[0], is_tuple=True)
    elif annotation in _SCALAR_NAMES or dataclasses.is_dataclass(annotation):
        return _FieldType(annotation)
    raise TypeError(f"{where} has unsupported type {annotation!r} for overrides and JSON")


@functools.cache
def _field_types(cls: type) -> dict[str, _FieldType]:
    """The constructor fields of dataclass `cls`, in declaration order, with reduced types."""
    # get_type_hints resolves the string annotations left by `from __future__ import annotations`.
    hints = typing.get_type_hints(cls)
    return {
        field.name: _reduce_annotation(hints[field.name], f"{cls.__name__}.{field.name}")
        for field in dataclasses.fields(cls)
        if field.init
    }


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _mismatch(path: str, field_type: _FieldType, shown: Any) -> UserError:
    return UserError(f"{path} expects {field_type.describe()}, got {shown!r}")


def _parse_scalar_text(text: str, base: type) -> Any:
    """Parses one scalar; raises ValueError when `text` is not of type `base`."""
    if base is bool:
        word = text.strip().lower()
        if word in _TRUE_WORDS or word in _FALSE_WORDS:
            return word in _TRUE_WORDS
        raise ValueError(text)
    return base(text)  # int() and float() raise ValueError on malformed text; str() never does


def _parse_text(text: str, field_type: _FieldType, path: str) -> Any:
    """The value of a `path=text` assignment, checked against the field's declared type."""
    if field_type.is_optional and text.strip().lower() in _NONE_WORDS:
        return None
    try:
        if not field_type.is_tuple:
            return _parse_scalar_text(text, field_type.base)
        if not text.strip():
            return ()
        items = [item.strip() for item in text.split(",")]
        if not all(items):
            raise ValueError(text)
        return tuple(_parse_scalar_text(item, field_type.base) for item in items)
    except ValueError:
        raise _mismatch(path, field_type, text) from None


def _is_json_scalar(value: Any, base: type) -> bool:
    # bool is a subclass of int in Python, but `true` is not a valid integer or number in a config.
    if isinstance(value, bool):
        return base is bool
    if base is float:
        return isinstance(value, int | float)
    return isinstance(value, base)


def _parse_json(value: Any, field_type: _FieldType, path: str) -> Any:
    """A JSON-decoded leaf value checked against the field's type (tuples arrive as lists)."""
    if value is None and field_type.is_optional:
        return None
    base = field_type.base
    if field_type.is_tuple:
        if isinstance(value, list | tuple) and all(_is_json_scalar(v, base) for v in value):
            return tuple(base(item) for item in value)
    elif _is_json_scalar(value, base):
        return base(value)  # float(3) == 3.0 so an integral JSON number fits a float field
    raise _mismatch(path, field_type, value)


def _unknown_field(cls: type, name: str, section: str, context: str) -> UserError:
    valid = list(_field_types(cls))
    where = f"{section} has no field" if section else "there is no top-level field"
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return UserError(f"{context}: {where} {name!r}{hint}; valid fields: {', '.join(valid)}")


def _parse_assignment(cls: type, assignment: str) -> tuple[str, Any]:
    """Splits `path.to.field=value`, resolves the path from dataclass `cls`, parses the value."""
    key, separator, text = assignment.partition("=")
    context = f"override {assignment!r}"
    if not separator:
        raise UserError(f"{context} has no '='; expected path.to.field=value")
    path = key.strip()
    names = path.split(".")
    if not all(names):
        raise UserError(f"{context}: empty field name in path {path!r}")
    section = ""
    for index, name in enumerate(names):
        if name not in _field_types(cls):
            raise _unknown_field(cls, name, section, context)
        field_type = _field_types(cls)[name]
        current = _join(section, name)
        is_last = index == len(names) - 1
        if is_last and field_type.is_section:
            fields = ", ".join(_join(current, child) for child in _field_types(field_type.base))
            raise UserError(
                f"{context}: {current} is a section and cannot be set whole; "
                f"set one of its fields: {fields}"
            )
        if not is_last and not field_type.is_section:
            raise UserError(
                f"{context}: {current} is a field ({field_type.describe()}), not a section, "
                f"so it has no field {names[index + 1]!r}"
            )
        cls, section = field_type.base, current
    return path, _parse_text(text, field_type, path)


def _default_of(cls: type, name: str) -> Any:
    """The declared default of field `name` of `cls`, or MISSING."""
    field = cls.__dataclass_fields__[name]
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _build(
    cls: type,
    base: Any,
    values: Mapping[str, Any],
    path: str,
    describe_source: Callable[[str], str],
) -> Any:
    """Rebuilds a dataclass bottom-up from parsed `values` (sections as nested mappings).

    With `base` an instance, untouched fields keep its values (`dataclasses.replace`); with `base`
    MISSING the class is constructed and untouched fields take the declared defaults (for a
    section, the enclosing field's default instance). Each level's `__post_init__` runs after its
    sections are built; a ValueError from it becomes a UserError that adds
    `describe_source(path)`, the input that led there.
    """
    kwargs = {}
    for name, value in values.items():
        if _field_types(cls)[name].is_section:
            if base is dataclasses.MISSING:
                nested_base = _default_of(cls, name)
            else:
                nested_base = getattr(base, name)
            section_type = _field_types(cls)[name].base
            value = _build(section_type, nested_base, value, _join(path, name), describe_source)
        kwargs[name] = value
    if base is dataclasses.MISSING:
        missing = [
            _join(path, name)
            for name in _field_types(cls)
            if name not in kwargs and _default_of(cls, name) is dataclasses.MISSING
        ]
        if missing:
            raise UserError(f"missing required {', '.join(missing)} ({describe_source(path)})")
    try:
        if base is dataclasses.MISSING:
            return cls(**kwargs)
        return dataclasses.replace(base, **kwargs)
    except ValueError as error:
        raise UserError(f"{error} ({describe_source(path)})") from None


def _check_config(config: Any) -> None:
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"expected a dataclass instance, got {config!r}")


def apply_overrides(config: T, assignments: Sequence[str]) -> T:
    """`config` with each `path.to.field=value` assignment applied (see the module docstring).

    All assignments are applied together, so fields that must change jointly to stay valid can be
    set in one call. Raises UserError on a missing '=', an unknown path, a section assigned whole,
    an ill-typed value, a path given twice, or a value the dataclass validation rejects.
    """
    _check_config(config)
    if isinstance(assignments, str):
        raise TypeError("assignments must be a sequence of strings, not one string")
    changes: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for assignment in assignments:
        path, value = _parse_assignment(type(config), assignment)
        if path in sources:
            raise UserError(f"{path} is set twice: {sources[path]!r} and {assignment!r}")
        sources[path] = assignment
        *sections, name = path.split(".")
        level = changes
        for section in sections:
            level = level.setdefault(section, {})
        level[name] = value
    if not changes:
        return config

    def describe_source(section: str) -> str:
        chosen = [
            text for path, text in sources.items() if not section or path.startswith(section + ".")
        ]
        return f"set by {', '.join(repr(text) for text in chosen)}"

    return _build(type(config), config, changes, "", describe_source)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-serialisable dict of `config`: sections as dicts, tuples as lists."""
    _check_config(config)
    result = {}
    for name in _field_types(type(config)):
        value = getattr(config, name)
        if dataclasses.is_dataclass(value):
            value = config_to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        result[name] = value
    return result


def _values_from_dict(cls: type, data: Any, path: str) -> dict[str, Any]:
    """`data` checked against dataclass `cls`: unknown keys and ill-typed values are errors."""
    where = path or cls.__name__
    if not isinstance(data, Mapping):
        raise UserError(f"{where} expects a section (a JSON object), got {data!r}")
    field_types = _field_types(cls)
    unknown = [str(key) for key in data if key not in field_types]
    if unknown:
        raise UserError(
            f"unknown key(s) {', '.join(map(repr, unknown))} in {where}; "
            f"valid keys: {', '.join(field_types)}"
        )
    values = {}
    for name, value in data.items():
        field_type, field_path = field_types[name], _join(path, name)
        if field_type.is_section:
            values[name] = _values_from_dict(field_type.base, value, field_path)
        else:
            values[name] = _parse_json(value, field_type, field_path)
    return values


def config_from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Rebuilds a `cls` from `config_to_dict` output (or its JSON round trip).

    Values must have their JSON types (a string "5" is not an integer; an integer fits a float
    field). Missing keys take the declared defaults; unknown keys are a UserError naming them.
    """
    if not dataclasses.is_dataclass(cls) or not isinstance(cls, type):
        raise TypeError(f"expected a dataclass type, got {cls!r}")
    values = _values_from_dict(cls, data, "")

    def describe_source(section: str) -> str:
        return f"loading {cls.__name__}" + (f" section {section}" if section else "")

    return _build(cls, dataclasses.MISSING, values, "", describe_source)


def config_differences(first: Any, second: Any, /, *, ignore: Collection[str] = ()) -> list[str]:
    """Dotted paths of the leaf fields whose values differ, in declaration order.

    A path equal to an `ignore` entry or under it (`train` covers `train.steps`) is skipped.
    Both configs must be of the same type.
    """
    _check_config(first)
    if type(first) is not type(second):
        raise TypeError(f"cannot compare {type(first).__name__} with {type(second).__name__}")
    if isinstance(ignore, str):
        raise TypeError("ignore must be a collection of paths, not one string")
    return _differences(first, second, "", tuple(ignore))


def _differences(first: Any, second: Any, prefix: str, ignore: tuple[str, ...]) -> list[str]:
    found = []
    for name, field_type in _field_types(type(first)).items():
        path = _join(prefix, name)
        if any(path == skipped or path.startswith(skipped + ".") for skipped in ignore):
            continue
        first_value, second_value = getattr(first, name), getattr(second, name)
        if field_type.is_section:
            found += _differences(first_value, second_value, path, ignore)
        elif first_value != second_value:
            found.append(path)
    return found
