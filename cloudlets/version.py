"""The package version, in a module of its own: code inside the package
(the CLI, the EC2 bundle's manifest) reads it from here rather than through
the package face :mod:`cloudlets`, which imports the whole pipeline, and
``setup.py`` reads it without importing anything."""

__all__ = ["__version__"]

__version__ = "0.1.0"
