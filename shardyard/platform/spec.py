"""Load a job spec: YAML file -> `--set` overrides -> validated `JobSpec`.

Precedence: schema defaults < file < overrides. Every error names the file, the line and the field
path (or the `--set` that caused it) and raises `SpecError`, which the CLI prints without a traceback.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from shardyard.platform.errors import SpecError
from shardyard.platform.schema import JobSpec

Path_ = tuple[str | int, ...]
_FIELD_PREFIX = re.compile(r"^([a-z_]+(?:\.[a-z_]+)+): ")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of silently keeping the last one."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _line_index(node: yaml.Node | None, path: Path_ = (), out: dict[Path_, int] | None = None) -> dict[Path_, int]:
    """Map each field path in the YAML document to its 1-based line number."""
    out = {} if out is None else out
    if node is None:
        return out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = path + (str(key_node.value),)
            out[child] = key_node.start_mark.line + 1
            _line_index(value_node, child, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _line_index(item, path + (i,), out)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b.c=value' -> (['a', 'b', 'c'], value parsed as YAML: numbers, bools, null, lists)."""
    if "=" not in text:
        raise SpecError(f"--set {text!r}: expected KEY=VALUE, e.g. --set training.steps=50")
    key, raw = text.split("=", 1)
    keys = [k for k in key.strip().split(".")]
    if not all(keys):
        raise SpecError(f"--set {text!r}: empty field name in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise SpecError(f"--set {text!r}: value is not valid YAML: {err}") from None
    return keys, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[tuple[str, ...], str]:
    """Apply `--set` overrides in place; returns field path -> the override text that set it."""
    sources: dict[tuple[str, ...], str] = {}
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for depth, k in enumerate(keys[:-1]):
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            elif not isinstance(child, dict):
                raise SpecError(f"--set {text!r}: {'.'.join(keys[: depth + 1])} is a value, not a section")
            node = child
        node[keys[-1]] = value
        sources[tuple(keys)] = text
    return sources


def _format_errors(
    err: ValidationError, source: str, lines: dict[Path_, int], override_sources: dict[tuple[str, ...], str]
) -> str:
    messages = []
    for e in err.errors():
        loc: Path_ = tuple(x for x in e["loc"] if not (isinstance(x, str) and x.startswith(("function-", "literal["))))
        msg = e["msg"].removeprefix("Value error, ")
        named = _FIELD_PREFIX.match(msg)  # cross-section rules name the field they are about
        if named and not loc:
            loc = tuple(named.group(1).split("."))
            msg = msg[named.end() :]
        field = ".".join(str(x) for x in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; `shardyard schema` lists the fields)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        where = _where(loc, source, lines, override_sources)
        messages.append(f"{where}: {field}: {msg}")
    return "invalid job spec\n  " + "\n  ".join(messages)


def _where(loc: Path_, source: str, lines: dict[Path_, int], override_sources: dict[tuple[str, ...], str]) -> str:
    str_loc = tuple(str(x) for x in loc)
    for n in range(len(str_loc), 0, -1):
        if str_loc[:n] in override_sources:
            return f"{source} (--set {override_sources[str_loc[:n]]})"
    inside = [text for key, text in override_sources.items() if key[: len(str_loc)] == str_loc]
    suffix = f" (after --set {', --set '.join(inside)})" if inside else ""
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return f"{source}:{lines[loc[:n]]}{suffix}"
    return source + suffix


def load_spec_text(text: str, source: str = "<spec>", overrides: list[str] | None = None) -> JobSpec:
    try:
        loader = _UniqueKeyLoader(text)  # one parse gives both the node tree (lines) and the data
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise SpecError(f"{source}{line}: not valid YAML: {err.problem or err}") from None
    except yaml.reader.ReaderError as err:  # a control character: the reader has no line mark
        line = text[: err.position].count("\n") + 1
        raise SpecError(
            f"{source}:{line}: not valid YAML: character #x{err.character:04x} is not allowed "
            "(the file holds non-text bytes)"
        ) from None
    except yaml.YAMLError as err:
        raise SpecError(f"{source}: not valid YAML: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(
            f"{source}:1: a job spec is a mapping of sections (name:, model:, ...), got {type(data).__name__}"
        )
    override_sources = apply_overrides(data, overrides or [])
    try:
        return JobSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(_format_errors(err, source, _line_index(node), override_sources)) from None


def load_spec(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SpecError(f"{path}: no such job spec file") from None
    except OSError as err:  # a directory, no permission, a device, ...
        raise SpecError(f"{path}: cannot read job spec: {err.strerror or err}") from None
    return load_spec_text(decode_spec_bytes(data, str(path)), str(path), overrides)


def decode_spec_bytes(data: bytes, source: str) -> str:
    """The text of a spec file; SpecError naming the file when it is binary or not UTF-8."""
    nul = data.find(b"\0")
    if nul >= 0:
        raise SpecError(f"{source}: not a YAML text file (binary content: a NUL byte at offset {nul})")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise SpecError(
            f"{source}: not a YAML text file (not UTF-8: byte 0x{data[err.start]:02x} at offset "
            f"{err.start}); save it as UTF-8 text"
        ) from None


def spec_to_yaml(spec: JobSpec) -> str:
    return yaml.safe_dump(json.loads(spec.model_dump_json()), sort_keys=False)


def spec_from_json(text: str) -> JobSpec:
    """The resolved spec as it travels to the cluster (already validated once)."""
    return JobSpec.model_validate_json(text)


def json_schema() -> dict[str, Any]:
    return JobSpec.model_json_schema()
