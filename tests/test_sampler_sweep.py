"""The sampler sweep's outputs: the Markdown table and the PNG plot of its rows."""

import numpy as np
from PIL import Image

from experiments import sampler_sweep


def _rows():
    rows = []
    for sampler, evals, distances in (
        ("ddim", [8, 32, 128], [40.0, 12.0, 6.0]),
        ("dpm_solver_2m", [8, 32, 128], [20.0, 7.0, 5.5]),
    ):
        for n, d in zip(evals, distances, strict=True):
            rows.append(
                {
                    "sampler": sampler,
                    "steps": n,
                    "tolerance": None,
                    "network_evals": n,
                    "seconds": n / 10,
                    "frechet_distance": d,
                    "frechet_distance_real": 2.5,
                }
            )
    rows.append(
        {
            "sampler": "ode",
            "steps": None,
            "tolerance": 1e-3,
            "network_evals": 74,
            "seconds": 9.0,
            "frechet_distance": 5.2,
            "frechet_distance_real": 2.5,
        }
    )
    return rows


def test_markdown_table_has_a_row_per_setting():
    table = sampler_sweep.markdown(_rows()).splitlines()
    assert len(table) == 2 + 7
    assert table[2] == "| ddim | 8 | 8 | 0.8 | 40.00 |"
    assert table[-1] == "| ode | (0.001) | 74 | 9.0 | 5.20 |"


def test_plot_writes_a_png(tmp_path):
    path = str(tmp_path / "sweep.png")
    sampler_sweep.plot(_rows(), path)
    image = np.asarray(Image.open(path))
    assert image.shape[0] > 200 and image.shape[1] > 300
    assert image.std() > 10  # not blank
