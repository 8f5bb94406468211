"""Detectors on cached tokens, with the feature transforms before them and the conformal calibration after.

Each detector is one :class:`torch.nn.Module` (:class:`~flow.detectors.base.Detector`): ``fit`` on the normal
class's rows, ``forward`` to named scores. :class:`~flow.detectors.scorer.Scorer` chains a fitted feature transform,
a detector and its calibration; ``score``, ``predict`` and the ONNX export all run it. Nothing here knows run
folders or the command line (docs/architecture.md).
"""
