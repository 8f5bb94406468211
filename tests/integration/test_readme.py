"""The README's Python block runs as it stands, on the embedded digits default (the backbone swapped for a small
random ViT here: EfficientNet-Lite0's extraction of the digits takes minutes on a CPU)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def python_block() -> str:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1, "the README should hold exactly one Python block"
    return blocks[0]


def test_the_readme_python_block_runs_as_it_stands(tmp_path, monkeypatch, capsys):
    import extract.run

    real = extract.run.extract_features

    def small(*args, **kwargs):
        return real(*args, **{**kwargs, "backbone": "test_vit", "random_init": True, "img_size": 32, "patch_grid": 2,
                              "device": "cpu", "num_workers": 0, "progress": False})

    monkeypatch.setattr(extract.run, "extract_features", small)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(python_block(), "README.md", "exec"), namespace)  # noqa: S102 (the README's own code)
    printed = capsys.readouterr().out.strip().splitlines()
    aurocs = eval(printed[-2])  # noqa: S307 (a dict literal printed by the block)
    assert set(aurocs) == {"l2", "cosine"} and all(0.0 <= v <= 1.0 for v in aurocs.values())
    result = namespace["result"]
    assert len(result) == 6 and result.p_value is not None and not any(result.errors)
    assert result.anomalous.dtype == bool and np.all((result.p_value > 0) & (result.p_value <= 1))
    assert (tmp_path / "runs" / "api" / "auroc.csv").is_file() and list((tmp_path / "caches").glob("*.h5"))
