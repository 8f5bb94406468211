"""FitConfig: one validated object for what a fit is, the same whether it comes from the command line or Python."""

from __future__ import annotations

import pytest

from flow.experiments.config import FitConfig, sweep_base


def test_the_defaults_are_the_paper_flow_with_the_measured_transform():
    config = FitConfig()
    assert (config.method, config.transform, config.normal, config.val_fraction) == ("sanf", "auto", "all", 0.0)
    flow, train = config.flow_config(768), config.train_config()
    assert (flow.dim, flow.num_blocks, flow.hidden, flow.num_heads, flow.clamp, flow.use_caff) == (768, 4, 1024, 4,
                                                                                                   3.0, True)
    assert (train.epochs, train.batch_size, train.lr, train.betas, train.eps) == (16, 32, 5e-5, (0.8, 0.8), 1e-4)
    assert not FitConfig(method="sanf-nocaff").flow_config(8).use_caff
    assert FitConfig(method="knn", k=5).detector_params() == {"k": 5} and FitConfig().detector_params() == {}


@pytest.mark.parametrize("fields, message", [
    ({"method": "svm"}, "--method must be one of sanf, sanf-nocaff, knn, gaussian; got 'svm'"),
    ({"transform": "sqrt"}, "--transform must be one of auto, raw, l2, ssqrt-l2, standardize, pca-whiten; got 'sqrt'"),
    ({"val_fraction": 1.0}, "--val-fraction must be a finite number in [0.0, 1.0); got 1.0"),
    ({"val_fraction": float("nan")}, "--val-fraction must be a finite number"),
    ({"blocks": 0}, "--blocks must be an integer in 1..256; got 0"),
    ({"hidden": True}, "--hidden must be an integer in 1..65536; got True"),
    ({"lr": 0.0}, "--lr must be a finite number in (0.0, inf); got 0.0"),
    ({"epochs": 3, "steps": 40}, "--epochs and --steps exclude each other (a fit has one length); got --epochs 3 and "
                                 "--steps 40"),
    ({"early_stop": True}, "--early-stop needs held-out normal rows"),
    ({"method": "knn", "epochs": 5}, "--epochs sets the flows (sanf, sanf-nocaff); --method knn trains no flow"),
    ({"method": "gaussian", "k": 3}, "--k is the knn baseline's; --method gaussian has no neighbours (got --k 3)"),
    ({"method": "sanf", "k": 3}, "--k is the knn baseline's; --method sanf has no neighbours (got --k 3)"),
])
def test_a_bad_fit_is_refused_naming_the_option_and_the_value(fields, message):
    with pytest.raises(ValueError, match=r"^" + message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")
                       .replace("[", r"\[")):
        FitConfig(**fields)


def test_numpy_numbers_are_taken_as_python_numbers():
    """Values from numpy (a loop over np.arange, a grid of np.float32) are checked as numbers and stored as Python
    ints and floats (run.json is JSON)."""
    import json

    import numpy as np

    config = FitConfig(seed=np.int64(3), val_fraction=np.float32(0.25), hidden=np.int32(8), lr=np.float64(1e-3))
    assert (config.seed, config.hidden) == (3, 8) and type(config.seed) is int and type(config.hidden) is int
    assert config.val_fraction == 0.25 and type(config.val_fraction) is float and type(config.lr) is float
    json.dumps(config.to_dict())
    with pytest.raises(ValueError, match="--epochs must be an integer in 1..2147483647; got 16.0"):
        FitConfig(epochs=16.0)


def test_a_sweep_resets_the_flow_options_for_its_baselines_and_keeps_k_for_knn():
    base = sweep_base(["sanf", "knn", "gaussian"], k=3, epochs=2, val_fraction=0.2)
    assert base.method == "sanf" and base.epochs == 2 and base.k == 2
    knn = base.for_method("knn", k=3)
    assert (knn.method, knn.epochs, knn.k, knn.val_fraction) == ("knn", None, 3, 0.2)
    assert base.for_method("gaussian", k=3).k == 2 and base.for_method("sanf-nocaff").epochs == 2
    with pytest.raises(ValueError, match="--k is the knn baseline's; --methods sanf,gaussian has no knn"):
        sweep_base(["sanf", "gaussian"], k=3)
    with pytest.raises(ValueError, match="--early-stop sets the flows"):
        sweep_base(["knn"], early_stop=True, val_fraction=0.2)
