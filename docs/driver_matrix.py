"""Generate the supported-features matrix from the drivers' own declarations
(their ``description`` and ``capabilities`` class attributes), so the docs
cannot drift from the code.

Also provides the ``driver-capabilities`` directive the per-driver pages use
to state their driver's declared capabilities from the class itself::

    .. driver-capabilities:: format qcow2
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any

from cloudlets.drivers.providers import get_driver, list_drivers
from cloudlets.drivers.types import DriverKind, FormatCapability, StorageCapability
from cloudlets.errors import CloudletsError

HERE = Path(__file__).resolve().parent

_FLAGS: dict[DriverKind, list[enum.Flag]] = {
    DriverKind.FORMAT: [f for f in FormatCapability if f.value],
    DriverKind.STORAGE: [f for f in StorageCapability if f.value],
}
#: Where each family's per-driver pages live (``drivers/formats/qcow2.rst``...).
PAGE_DIRS = {DriverKind.FORMAT: "drivers/formats", DriverKind.STORAGE: "drivers/storage"}


def page(kind: DriverKind, name: str) -> str | None:
    """:returns: the docname of a driver's page, or ``None`` when it has none
    (a third-party driver found through an entry point)."""
    docname = f"{PAGE_DIRS[kind]}/{name}"
    return docname if (HERE / f"{docname}.rst").is_file() else None


def flags(kind: DriverKind, cls: Any) -> list[str]:
    """:returns: the lower-case names of the capabilities ``cls`` declares."""
    return [str(flag.name).lower() for flag in _FLAGS[kind] if flag in cls.capabilities]


def _table(kind: DriverKind) -> list[str]:
    columns = _FLAGS[kind]
    header = ["Driver", "Description", *[str(f.name).lower() for f in columns]]
    rows = []
    for name in list_drivers(kind):
        docname = page(kind, name)
        cell = f":doc:`{name} </{docname}>`" if docname else f"``{name}``"
        try:
            cls: Any = get_driver(kind, name)
        except CloudletsError as exc:
            rows.append([cell, f"unavailable: {exc}", *["" for _ in columns]])
            continue
        caps = cls.capabilities
        rows.append([cell, cls.description or "",
                     *["yes" if flag in caps else "" for flag in columns]])
    lines = [".. list-table::", "   :header-rows: 1", ""]
    for row in [header, *rows]:
        lines.append(f"   * - {row[0]}")
        lines.extend(f"     - {cell}" for cell in row[1:])
    return lines


def render() -> str:
    """:returns: the matrix page as reStructuredText."""
    lines = ["Supported features", "==================", "",
             "Generated from each driver's ``capabilities`` declaration "
             "(:class:`~cloudlets.drivers.types.FormatCapability`, "
             ":class:`~cloudlets.drivers.types.StorageCapability`); a driver's name "
             "links to its page.", "",
             "Formats", "-------", ""]
    lines += _table(DriverKind.FORMAT)
    lines += ["", "Storage targets", "---------------", ""]
    lines += _table(DriverKind.STORAGE)
    return "\n".join(lines) + "\n"


def generate(target: Path) -> Path:
    """Write ``matrix.rst`` into ``target``. :returns: its path."""
    target.mkdir(parents=True, exist_ok=True)
    matrix = target / "matrix.rst"
    text = render()
    if not matrix.exists() or matrix.read_text() != text:
        matrix.write_text(text)
    return matrix


def setup(app: Any) -> dict[str, Any]:
    """Register the ``driver-capabilities`` directive (called from ``conf.py``)."""
    from docutils import nodes  # type: ignore[import-untyped]
    from docutils.statemachine import StringList  # type: ignore[import-untyped]
    from sphinx.util.docutils import SphinxDirective

    class DriverCapabilities(SphinxDirective):
        """``.. driver-capabilities:: KIND NAME``: one paragraph naming the
        driver class, its description and the capabilities it declares."""

        required_arguments = 2

        def run(self) -> list[Any]:
            kind = DriverKind(self.arguments[0])
            cls: Any = get_driver(kind, self.arguments[1])
            declared = ", ".join(f"``{flag}``" for flag in flags(kind, cls)) or "none"
            text = (f"*{cls.description}*: :class:`{cls.__module__}.{cls.__name__}`, "
                    f"declaring {declared}. Every driver side by side: "
                    ":doc:`/generated/matrix`.")
            container = nodes.container()
            self.state.nested_parse(StringList([text], self.get_source_info()[0]),
                                    self.content_offset, container)
            return list(container.children)

    app.add_directive("driver-capabilities", DriverCapabilities)
    return {"parallel_read_safe": True, "parallel_write_safe": True}


if __name__ == "__main__":
    print(generate(HERE / "generated"))
