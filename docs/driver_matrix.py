"""Generate the supported-features matrix from the drivers' own declarations
(their ``description`` and ``capabilities`` class attributes), so the docs
cannot drift from the code."""

from __future__ import annotations

from pathlib import Path

from cloudlets.drivers.providers import get_driver, list_drivers
from cloudlets.drivers.types import DriverKind, FormatCapability, StorageCapability
from cloudlets.errors import CloudletsError

_FLAGS = {
    DriverKind.FORMAT: [f for f in FormatCapability if f.value],
    DriverKind.STORAGE: [f for f in StorageCapability if f.value],
}


def _table(kind: DriverKind) -> list[str]:
    flags = _FLAGS[kind]
    header = ["Driver", "Description", *[str(f.name).lower() for f in flags]]
    rows = []
    for name in list_drivers(kind):
        try:
            cls = get_driver(kind, name)
        except CloudletsError as exc:
            rows.append([f"``{name}``", f"unavailable: {exc}", *["" for _ in flags]])
            continue
        caps = cls.capabilities
        rows.append([f"``{name}``", cls.description or "",
                     *["yes" if flag in caps else "" for flag in flags]])
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
             ":class:`~cloudlets.drivers.types.StorageCapability`).", "",
             "Formats", "-------", ""]
    lines += _table(DriverKind.FORMAT)
    lines += ["", "Storage targets", "---------------", ""]
    lines += _table(DriverKind.STORAGE)
    return "\n".join(lines) + "\n"


def generate(target: Path) -> Path:
    """Write ``matrix.rst`` into ``target``. :returns: its path."""
    target.mkdir(parents=True, exist_ok=True)
    page = target / "matrix.rst"
    text = render()
    if not page.exists() or page.read_text() != text:
        page.write_text(text)
    return page


if __name__ == "__main__":
    print(generate(Path(__file__).parent / "generated"))
