"""The sweep sharded over 4 fake CPU devices gives the single-device table."""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    assert jax.local_device_count() == 4, jax.devices()
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
    assert len(sharded) == len(single) == 4 * (2 + 3 + 3)
    np.testing.assert_array_equal(sharded["accuracy"].to_numpy(), single["accuracy"].to_numpy())
    np.testing.assert_allclose(sharded["loss"].to_numpy(), single["loss"].to_numpy(),
                               rtol=1e-6, atol=0)
    print("max loss diff", np.abs(sharded["loss"] - single["loss"]).max())
""")


def test_sharded_sweep_equals_single_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-4000:]
  assert "max loss diff" in out.stdout
