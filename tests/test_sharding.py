"""The sweep sharded over 4 fake CPU devices gives the single-device table."""

import textwrap

from local_cluster import run_script

SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    assert jax.local_device_count() == 4, jax.devices()
    from local_cluster import assert_same_sweep
    from safer_jax import data, models, sweep, train
    ds = data.load_dataset("digits")
    model = models.get_model("lenet")
    # Committed to one device, as restored checkpoints are: the engine must replicate them.
    variables = jax.device_put(train.init_variables(model, ds.input_shape, 0), jax.devices()[0])
    split = ds.eval.take(96)
    config = sweep.SweepConfig(families={"quantize": (4, 2), "noise": (0.5,), "bitflip": (0.01,)},
                               seeds=(0, 1, 2), max_parallel=6)
    engine = sweep._Engine(model, variables, split, config)
    assert engine.num_devices == 4 and engine.sharding is not None
    sharded = sweep.run_sweep(model, variables, split, config, progress=False)
    single = sweep.run_sweep(model, variables, split,
                             sweep.SweepConfig(**{**config.__dict__, "shard": False}),
                             progress=False)
    assert_same_sweep(sharded, single, cells=4 * (2 + 3 + 3))
    print("max loss diff", np.abs(sharded["loss"] - single["loss"]).max())
""")


def test_sharded_sweep_equals_single_device():
  assert "max loss diff" in run_script(SCRIPT, devices=4)
