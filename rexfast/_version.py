"""The one version string of rexfast: ``pyproject.toml`` reads it (setuptools' dynamic
version), ``rexfast.__version__`` re-exports it, and the models layer stamps it into the
folders it writes without importing the package face."""

__version__ = "0.1.0"
