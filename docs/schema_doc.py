"""Generate reStructuredText reference pages from the shipped JSON Schemas.

Run by ``docs/conf.py`` at build time; the output goes to
``docs/generated/`` (not committed).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SCHEMAS = Path(__file__).resolve().parents[1] / "cloudlets" / "schemas"


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        target = dict(root["$defs"][ref.rsplit("/", 1)[1]])
        merged = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        return merged
    return schema


def _type(schema: dict[str, Any]) -> str:
    if "const" in schema:
        return f"``{json.dumps(schema['const'])}``"
    if "enum" in schema:
        return "one of " + ", ".join(f"``{json.dumps(v)}``" for v in schema["enum"])
    if "oneOf" in schema:
        return " or ".join(_type(s) for s in schema["oneOf"])
    kind = schema.get("type")
    if kind == "array":
        items = schema.get("items", {})
        return f"array of {_type(items) if items else 'values'}"
    if isinstance(kind, str):
        return kind
    return "any"


def walk(schema: dict[str, Any], root: dict[str, Any],
         path: str = "") -> Iterator[tuple[str, dict[str, Any], bool]]:
    """Yield ``(json pointer, resolved schema, required)`` for every documented key."""
    required = set(schema.get("required", []))
    for name, child in schema.get("properties", {}).items():
        resolved = _resolve(child, root)
        pointer = f"{path}/{name}"
        yield pointer, resolved, name in required
        if resolved.get("type") == "object":
            yield from walk(resolved, root, pointer)
        items = resolved.get("items")
        if resolved.get("type") == "array" and isinstance(items, dict):
            item = _resolve(items, root)
            if item.get("type") == "object":
                yield from walk(item, root, pointer + "/N")


def render(name: str) -> str:
    """:returns: the reStructuredText reference of one schema file."""
    root = json.loads((SCHEMAS / name).read_text())
    title = f"``{name}`` reference"
    lines = [title, "=" * len(title), "", root.get("description", ""), "",
             f"Draft: ``{root['$schema']}``. Top-level required keys: "
             + (", ".join(f"``{k}``" for k in root.get("required", [])) or "none") + ".", ""]
    for pointer, schema, required in walk(root, root):
        lines += [f"``{pointer}``", "-" * (len(pointer) + 4), ""]
        facts = [f"**Type:** {_type(schema)}"]
        if required:
            facts.append("**Required.**")
        if "default" in schema:
            facts.append(f"**Default:** ``{json.dumps(schema['default'])}``")
        if "pattern" in schema:
            facts.append(f"**Pattern:** ``{schema['pattern']}``")
        lines += [" ".join(facts), ""]
        if schema.get("description"):
            lines += [schema["description"], ""]
        if schema.get("x-error"):
            lines += [f"*When invalid:* the value {schema['x-error']}.", ""]
    return "\n".join(lines) + "\n"


def generate(target: Path) -> list[Path]:
    """Write one page per schema into ``target``.

    :returns: the written paths.
    """
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for schema in sorted(SCHEMAS.glob("*.json")):
        page = target / f"{schema.stem}.rst"
        text = render(schema.name)
        if not page.exists() or page.read_text() != text:
            page.write_text(text)
        written.append(page)
    return written


if __name__ == "__main__":
    for path in generate(Path(__file__).parent / "generated"):
        print(path)
