"""Detectors on cached tokens, with the feature transforms before them and the conformal calibration after.

Nothing here knows run folders or the command line (docs/architecture.md)."""
