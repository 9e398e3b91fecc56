"""Driver families: :mod:`~cloudlets.drivers.base` holds the two contracts,
:mod:`~cloudlets.drivers.types` the names and capability flags,
:mod:`~cloudlets.drivers.providers` the registry."""
