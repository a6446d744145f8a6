"""bfloat16 compute through the whole runner: same bpd as float32 within its standard error."""


import pytest
from runner_helpers import eval_record, tiny_config, train_run


@pytest.mark.slow
def test_bfloat16_run_matches_float32_bpd_within_its_standard_error(tmp_path):
    """Two tiny runs from the same seed, float32 and bfloat16 compute, 8 steps each, then the
    whole-split evaluation (same images, same keys): the bpd differ by less than the
    evaluation's standard error."""
    results = {}
    for dtype in ("float32", "bfloat16"):
        config = tiny_config(
            **{
                "model.dtype": dtype,
                "training.num_steps": 8,
                "training.eval_every": 8,
                "training.log_every": 8,
                "training.checkpoint_every": 8,
                "training.sample_every": 10**6,
            }
        )
        workdir = str(tmp_path / dtype)
        assert int(train_run(config, workdir).step) == 8
        results[dtype] = eval_record(workdir, 8)
    f32, bf16 = results["float32"], results["bfloat16"]
    assert f32["num_examples"] == bf16["num_examples"] == 297
    difference = abs(f32["bpd"] - bf16["bpd"])
    assert difference < f32["bpd_stderr"], (f32["bpd"], bf16["bpd"], f32["bpd_stderr"])
    print(f"float32 {f32['bpd']:.4f} +- {f32['bpd_stderr']:.4f}, bfloat16 {bf16['bpd']:.4f}")
    assert f32["bpd"] != bf16["bpd"]  # the bfloat16 run did compute in bfloat16
