"""The sweep sharded over 4 fake CPU devices gives the single-device table."""

import textwrap

import pytest

from local_cluster import run_script

SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    assert jax.local_device_count() == 4, jax.devices()
    from local_cluster import assert_same_sweep
    from safer_jax.core import data
    from safer_jax.measure import sweep
    from safer_jax.training import train
    from safer_jax.zoo import models
    ds = data.load_dataset("digits")
    model = models.get_model("lenet")
    # Committed to one device, as restored checkpoints are: the engine must replicate them.
    variables = jax.device_put(train.init_variables(model, ds.input_shape, 0), jax.devices()[0])
    split = ds.eval.take(96)
    config = sweep.SweepConfig(families={"quantize": (4, 2), "noise": (0.5,), "bitflip": (0.01,)},
                               seeds=(0, 1, 2), max_parallel=6)
    engine = sweep.Engine(model, variables, split, config)
    assert engine.num_devices == 4 and engine.sharding is not None
    sharded = sweep.run_sweep(model, variables, split, config, progress=False)
    single = sweep.run_sweep(model, variables, split,
                             sweep.SweepConfig(**{**config.__dict__, "shard": False}),
                             progress=False)
    assert_same_sweep(sharded, single, cells=4 * (2 + 3 + 3))
    print("max loss diff", np.abs(sharded["loss"] - single["loss"]).max())
""")


@pytest.mark.integration
def test_sharded_sweep_equals_single_device():
  assert "max loss diff" in run_script(SCRIPT, devices=4)


SEARCH_SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    assert jax.local_device_count() == 4, jax.devices()
    from safer_jax.budgeting import search
    from safer_jax.core import data, layers
    from safer_jax.measure import sweep
    from safer_jax.training import train
    from safer_jax.zoo import models
    ds = data.load_dataset("digits")
    model = models.get_model("lenet")
    variables = train.init_variables(model, ds.input_shape, 0)
    names = layers.find_layers(variables)
    opts = search.quantized_options(variables, names, (2, 4, 8))
    choices = np.random.default_rng(0).integers(0, 3, (9, len(names)))
    split = ds.eval.take(80)
    sharded = search.AllocationEvaluator(model, variables, split, opts, chunk=5)
    assert sharded.num_devices == 4 and sharded.chunk == 8
    single = search.AllocationEvaluator(model, variables, split, opts,
                                        sweep.SweepConfig(shard=False), chunk=5)
    a, b = sharded(choices), single(choices)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1], rtol=1e-5)
    print("same whole-model scores on 4 devices")
""")


@pytest.mark.integration
def test_sharded_allocation_evaluation_equals_single_device():
  """Whole-model candidates spread over 4 devices score as on one."""
  assert "same whole-model scores" in run_script(SEARCH_SCRIPT, devices=4)
