"""Generate the configuration reference in docs/operations.md from the settings model.

    python tools/gen_config_reference.py           # rewrite the section in docs/operations.md
    python tools/gen_config_reference.py --check   # exit 1 when the committed section differs

The section lies between the two marker lines below; everything else in the file is kept.
A test (tests/test_deploy_docs.py) runs the check, so the reference cannot drift from
detector/config.py.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from detector import config

DOC = Path(__file__).resolve().parents[1] / "docs" / "operations.md"
BEGIN = "<!-- BEGIN generated config reference: python tools/gen_config_reference.py -->"
END = "<!-- END generated config reference -->"


def _type(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f'`"{a}"`' for a in args)
    if origin is typing.Annotated:
        return _type(args[0])
    if origin in (typing.Union, types.UnionType):
        parts = [_type(a) for a in args if a is not type(None)]
        text = " \\| ".join(parts)
        return f"{text} (optional)" if type(None) in args else text
    if origin in (list, tuple):
        return f"list of {_type(args[0])}" if args else "list"
    if origin is dict:
        return "table of strings"
    names = {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path"}
    if isinstance(annotation, type):
        return names.get(annotation, annotation.__name__)
    return str(annotation)


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
        if isinstance(value, list) and value and isinstance(value[0], BaseModel):
            return "one spool source (below)"
        return f"`{value!r}`" if value else "empty"
    if field.default is PydanticUndefined:
        return "**required**"
    value = field.default
    if value is None:
        return "none"
    if isinstance(value, BaseModel):
        return "(table)"
    if isinstance(value, Path):
        return f'`"{value}"`'
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, tuple):
        return ", ".join(f"`{v}`" for v in value)
    if isinstance(value, float) and value.is_integer() and value >= 1000:
        return f"`{value:,.0f}`".replace(",", "_")
    if isinstance(value, int) and not isinstance(value, bool) and value >= 10_000:
        return f"`{value:_}`"
    return f"`{value}`"


def _limits(field: FieldInfo) -> str:
    out = []
    for meta in field.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            bound = getattr(meta, attr, None)
            if bound is not None:
                out.append(f"{sign} {bound}")
        pattern = getattr(meta, "pattern", None)
        if pattern:
            out.append(f"matches `{pattern}`")
    return f" ({', '.join(out)})" if out else ""


def _text(description: str | None) -> str:
    """A description as one table cell."""
    text = " ".join((description or "").split())
    return text.replace("|", "\\|").replace("<", "\\<")


def _rows(model: type[BaseModel], prefix: str, env_prefix: str | None) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        env = f"`{env_prefix}{name.upper()}`" if env_prefix else "(in the list's JSON)"
        desc = _text(field.description)
        rows.append(
            f"| `{key}` | {_type(field.annotation)}{_limits(field)} | {_default(field)} | "
            f"{env} | {desc} |"
        )
    return rows


def _table(model: type[BaseModel], prefix: str, env_prefix: str | None) -> list[str]:
    return [
        "| key | type | default | environment | meaning |",
        "|---|---|---|---|---|",
        *_rows(model, prefix, env_prefix),
    ]


def render() -> str:
    env = config.ENV_PREFIX
    top = {n: f for n, f in config.Settings.model_fields.items()
           if not (isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel))
           and n not in ("sources", "sinks")}
    lines = [
        BEGIN,
        "",
        "Generated from `detector/config.py`; do not edit by hand. Every key is optional. "
        "Later layers win: defaults < TOML file (`--config`) < environment. Nested keys use `__` "
        f"in environment names (`{env}API__TOKEN`); a list (`sources`, `sinks`) is replaced "
        f"whole by a JSON array in one variable (`{env}SINKS='[{{...}}]'`). Unknown keys are "
        "errors; `exfilwatch config check FILE` names every problem.",
        "",
        "### Top level",
        "",
        "| key | type | default | environment | meaning |",
        "|---|---|---|---|---|",
    ]
    for name, field in top.items():
        desc = _text(field.description)
        lines.append(
            f"| `{name}` | {_type(field.annotation)}{_limits(field)} | {_default(field)} | "
            f"`{env}{name.upper()}` | {desc} |"
        )
    for name, field in config.Settings.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines += ["", f"### `[{name}]`", "", *(_table(annotation, f"{name}.",
                                                          f"{env}{name.upper()}__"))]
    lines += ["", "### `[[sources]]`", "",
              "A list of sources, chosen by `kind`. Default: one directory source named "
              '`spool` at `"spool"`.', ""]
    source_types = typing.get_args(config.SourceSettings)[0]
    for model in typing.get_args(source_types) or (source_types,):
        lines += [f'#### kind = "{model.model_fields["kind"].default}"', ""]
        if model.__doc__:
            lines += [" ".join(model.__doc__.split()), ""]
        lines += _table(model, "", None)
        lines.append("")
    lines += ["### `[[sinks]]`", "",
              "A list of alert sinks, chosen by `kind`; none by default. Environment: the whole "
              f"list as JSON in `{env}SINKS`.", ""]
    for model in typing.get_args(typing.get_args(config.SinkSettings)[0]):
        lines += [f'#### kind = "{model.model_fields["kind"].default}"', "",
                  *_table(model, "", None), ""]
    lines.append(END)
    return "\n".join(lines)


def splice(doc: str, section: str) -> str:
    head, found, rest = doc.partition(BEGIN)
    if not found:
        raise SystemExit(f"{DOC}: marker line {BEGIN!r} not found")
    _, found, tail = rest.partition(END)
    if not found:
        raise SystemExit(f"{DOC}: marker line {END!r} not found")
    return head + section + tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the doc is stale")
    args = parser.parse_args(argv)
    current = DOC.read_text(encoding="utf-8")
    wanted = splice(current, render())
    if args.check:
        if current != wanted:
            print(f"{DOC} is stale: run python tools/gen_config_reference.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(wanted, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
