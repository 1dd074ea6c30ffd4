"""mimpipe: a pre-training data system for masked image modeling.

The repository keeps one folder per stage (pipeline/, maskserver/, train/, tools/); the install
maps them under this one name (pyproject.toml `package-dir`), so `import mimpipe.pipeline.plan`
works and mimpipe adds no other top-level module to a user's path.
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mimpipe")
except PackageNotFoundError:   # a source tree that was never installed
    __version__ = "0+unknown"
