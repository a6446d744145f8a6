"""The README's library example runs as written."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_builds_trains_and_samples():
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert blocks, "README.md has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert np.isfinite(float(namespace["bpd"]))
    # An untrained model is far from the data: its bound is above log2(17) = 4.09 bits.
    assert float(namespace["bpd"]) > 4.0
    samples = np.asarray(namespace["samples"])
    assert samples.shape == (4, 8, 8, 1) and samples.min() >= 0 and samples.max() < 17
