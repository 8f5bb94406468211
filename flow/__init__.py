"""The SANF-AD flow stage: everything after the feature cache.

Sub-packages, from the bottom layer up (the import rules are the import-linter contracts in setup.cfg):

- :mod:`flow.model`: the normalizing flow (coupling layers, class attention, :class:`SANFFlow`) and its training
  loop; tensors only, no files, images or HDF5.
- :mod:`flow.detectors`: the detectors (the flow, its ablation, k-NN, Gaussian), the feature transforms that come
  before them and the conformal calibration that comes after; no run folders, no command line.
- :mod:`flow.store`: run folders on disk (atomic writes, ``run.json``, loading a fitted detector back).
- :mod:`flow.experiments`: fitting on a cache, scoring its test split, sweeps, metrics and reports.
- :mod:`flow.deploy`: a fitted run on new images: predict and ONNX export.
- :mod:`flow.api`: the public Python API, the calls ``pipeline.py`` makes, one per command.
- :mod:`flow.cli`: the command line's machinery (click types, the error boundary); ``pipeline.py`` declares the
  commands.
"""
