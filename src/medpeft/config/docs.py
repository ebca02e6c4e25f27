"""The documentation of every config key, made from the schema itself (types, defaults, bounds, help), so
that it cannot drift from the code: the README's key tables are these tables."""

from __future__ import annotations

import dataclasses

from medpeft.config.run import MAEConfig
from medpeft.config.schema import Section, _number, field_types, type_name
from medpeft.config.sections import (DATA_FORMATS, METHODS, AugmentConfig, DataConfig, ModelConfig, SplitConfig,
                                     TrainConfig)

_SYMBOLS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _default(field: dataclasses.Field) -> str:
    if field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
        return "see below" if isinstance(value, Section) else f"`{value}`"
    if field.default in (dataclasses.MISSING, ""):
        return "required"
    return f"`{field.default}`"


def _rule(field: dataclasses.Field) -> str:
    rules = [f"{_SYMBOLS[name]} {_number(bound)}" for name, bound in field.metadata.get("bounds", {}).items()]
    if field.metadata.get("length") is not None:
        rules.append(f"{field.metadata['length']} values")
    return f" ({', '.join(rules)})" if rules else ""


def _rows(cls: type, prefix: str, base: type | None = None) -> list[list[str]]:
    """A row per key of `cls` (leaving out those of `base`)."""
    hints, skip = field_types(cls), {f.name for f in base.fields()} if base else set()
    rows = []
    for field in cls.fields():
        if field.name in skip:
            continue
        if isinstance(hints[field.name], type) and issubclass(hints[field.name], Section):
            continue  # a nested section has its own table
        kind = type_name(hints[field.name]).replace("|", "\\|")
        rows.append([f"`{prefix}{field.name}`", kind + _rule(field), _default(field),
                     field.metadata.get("help", "").replace("|", "\\|")])
    return rows


def _table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
                      *("| " + " | ".join(row) + " |" for row in rows)])


def section_table(cls: type, prefix: str) -> str:
    """One section's keys: key, type (and bounds), default, description."""
    return _table(["key", "type", "default", "description"], _rows(cls, prefix))


def formats_table() -> str:
    """The keys each dataset format adds to the common data keys."""
    rows = [[f"`{name}`", *row] for name, cls in DATA_FORMATS.classes.items()
            for row in _rows(cls, "data.", DataConfig)]
    return _table(["format", "key", "type", "default", "description"], rows)


def methods_table(registry=METHODS, base: type | None = None) -> str:
    """Each method of `registry`'s own keys, leaving out those of `base` (a method without keys has a row of
    its own)."""
    rows = []
    for name, cls in registry.classes.items():
        own = _rows(cls, "method.", base)
        rows += [[f"`{name}`", *row] for row in own] or [[f"`{name}`", "–", "", "", "no keys"]]
    return _table(["method", "key", "type", "default", "description"], rows)


def models_table() -> str:
    """The foundation-model catalogue (medpeft.config.catalogue), as `medpeft models` prints it."""
    from medpeft.config.catalogue import catalogue_rows

    rows = [[f"`{r['name']}`", f"`{r['architecture']}`", str(r["resolution"]), r["normalisation"],
             ", ".join(r["layouts"]), f"`{r['hub']}`" if r["hub"] else "–", r["licence"], r["paper"]]
            for r in catalogue_rows()]
    return _table(["name", "timm architecture", "px", "normalisation", "layouts", "hub id", "licence", "paper"],
                  rows)


def key_tables() -> dict[str, str]:
    """Every table of the README's configuration reference, by its marker name."""
    return {
        "model": section_table(ModelConfig, "model."),
        "data": section_table(DataConfig, "data."),
        "data.split": section_table(SplitConfig, "data.split."),
        "data.format": formats_table(),
        "method": methods_table(),
        "train": section_table(TrainConfig, "train."),
        "augment": section_table(AugmentConfig, "augment."),
        "mae": section_table(MAEConfig, "mae."),
        "models": models_table(),
    }
