"""Generate the job-spec reference (docs/spec.md) from the pydantic schema, so it never drifts."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from shardyard.platform.schema import PRESETS, JobSpec

HEADER = """# Job spec reference

Generated from the schema by `shardyard schema --markdown > docs/spec.md`; do not edit by hand.
A test fails when this file and the schema disagree. The JSON schema for editors:
`shardyard schema > shardyard.schema.json`.

Precedence: schema defaults < the YAML file < `--set field.path=value` overrides. Unknown fields
are errors. `model.preset` fills width, depth, heads and ffn.hidden before the fields you give.
"""


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if not hasattr(annotation, "__args__") else None
    text = text or str(annotation)
    for noise in ("typing.", "shardyard.platform.schema.", "Annotated[", "NoneType"):
        text = text.replace(noise, "" if noise != "NoneType" else "null")
    return text.replace("|", " \\| ")


def _default(field: FieldInfo) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{json.dumps(value)}`"


def _section(model: type[BaseModel], prefix: str, out: list[str], nested: list[tuple[str, type[BaseModel]]]) -> None:
    out.append(f"\n## `{prefix or 'top level'}`\n")
    if model.__doc__ and model is not JobSpec:
        out.append(model.__doc__.strip().splitlines()[0] + "\n")
    out.append("| field | type | default | meaning |\n|---|---|---|---|")
    for attribute, field in model.model_fields.items():
        name = field.alias or attribute  # the YAML name (`checkpoint.async` is `async_` in code)
        path = f"{prefix}.{name}" if prefix else name
        annotation = field.annotation
        sub = _model_in(annotation)
        if sub is not None:
            nested.append((path, sub))
        out.append(
            f"| `{path}` | {_type_name(annotation) if sub is None else 'section'} | {_default(field)} | "
            f"{(field.description or '').replace('|', '/')} |"
        )


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def schema_markdown() -> str:
    out = [HEADER]
    queue: list[tuple[str, type[BaseModel]]] = [("", JobSpec)]
    while queue:
        prefix, model = queue.pop(0)
        nested: list[tuple[str, type[BaseModel]]] = []
        _section(model, prefix, out, nested)
        queue[:0] = nested
    out.append("\n## Model presets\n")
    out.append("| preset | values |\n|---|---|")
    for name, values in PRESETS.items():
        out.append(f"| `{name}` | `{json.dumps(values)}` |")
    return "\n".join(out) + "\n"
