"""The builder: import, optimize, assemble an engine."""
from .builder import BuilderConfig, BuildReport, build

__all__ = ["BuildReport", "BuilderConfig", "build"]
