"""mapprune: find and remove backdoors in image classifiers (Feature Map Testing and baselines)."""

__version__ = "0.1.0"
