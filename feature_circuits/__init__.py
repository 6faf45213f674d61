"""feature-circuits: sparse feature circuits in language models."""

__version__ = "0.1.0"
