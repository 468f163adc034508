"""Dagster config classes derived from the domain models, so every field and default has one home.

`dagster_config(Model, "Name")` builds a `dg.Config` with the domain model's fields, types, defaults and
descriptions (pydantic models or dataclasses). Range checks stay in the domain model: `to_domain()` builds
it from the run config, and its errors name the field. Fields only the Dagster layer knows (how a step
runs, not what it computes) are passed as `extra_fields`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import dagster as dg
from pydantic import BaseModel, Field, ValidationError, create_model
from pydantic.fields import FieldInfo


class DomainConfig(dg.Config):
    """Base of the derived classes: `to_domain()` is the domain model of this run config."""

    def to_domain(self, *, asset: str) -> Any:
        domain = type(self).__domain_model__  # type: ignore[attr-defined]
        values = {name: getattr(self, name) for name in domain_field_names(domain)}
        try:
            return domain(**values)
        except (ValidationError, ValueError) as exc:
            if isinstance(exc, ValidationError):
                problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            else:
                problems = str(exc)
            raise dg.Failure(
                description=f"{asset} config is invalid: {problems}", allow_retries=False
            ) from exc


def domain_fields(model: type) -> dict[str, tuple[Any, Any, str | None]]:
    """name -> (annotation, default or default factory marker, description) of a pydantic model or dataclass."""
    if isinstance(model, type) and issubclass(model, BaseModel):
        hints = typing.get_type_hints(model)
        return {
            name: (hints.get(name, info.annotation), _pydantic_default(info), info.description)
            for name, info in model.model_fields.items()
        }
    if dataclasses.is_dataclass(model):
        hints = typing.get_type_hints(model)
        out = {}
        for item in dataclasses.fields(model):
            default = item.default
            if default is dataclasses.MISSING and item.default_factory is not dataclasses.MISSING:
                default = item.default_factory()
            out[item.name] = (hints[item.name], default, item.metadata.get("description"))
        return out
    raise TypeError(f"{model!r} is neither a pydantic model nor a dataclass")


def domain_field_names(model: type) -> list[str]:
    return list(domain_fields(model))


def _pydantic_default(info: FieldInfo) -> Any:
    if info.default_factory is not None:
        return info.default_factory()  # type: ignore[call-arg]
    return info.default


def _check_dagster_type(name: str, annotation: Any) -> None:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(members) > 1:
            raise TypeError(
                f"{name}: {annotation} is a union Dagster config cannot express; use one type (or X | None)"
            )


def dagster_config(
    model: type,
    name: str,
    *,
    doc: str | None = None,
    extra_fields: dict[str, tuple[Any, FieldInfo]] | None = None,
) -> type[DomainConfig]:
    """A `dg.Config` class with `model`'s fields and defaults, plus `extra_fields` (Dagster-only)."""
    fields: dict[str, Any] = {}
    for field_name, (annotation, default, description) in domain_fields(model).items():
        _check_dagster_type(f"{model.__name__}.{field_name}", annotation)
        if isinstance(default, list | dict):
            factory_value = default
            fields[field_name] = (
                annotation,
                Field(default_factory=lambda v=factory_value: type(v)(v), description=description),
            )
        else:
            fields[field_name] = (annotation, Field(default=default, description=description))
    for field_name, spec in (extra_fields or {}).items():
        if field_name not in fields:  # once the domain model has it, the domain's definition wins
            fields[field_name] = spec
    config_class = create_model(name, __base__=DomainConfig, __doc__=doc or model.__doc__, **fields)
    config_class.__domain_model__ = model  # type: ignore[attr-defined]
    return config_class
