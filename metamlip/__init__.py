"""metamlip: interatomic potentials pre-trained across levels of theory, refitted with little data."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("metamlip")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
