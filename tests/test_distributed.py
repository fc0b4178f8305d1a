"""Two processes (jax.distributed, 2 CPU devices each, gloo): eval, criteria and the sweep.

One pair of processes checks all three against one process (one start-up and one
lenet for all): evaluation and criteria split their batches over the 4 devices of
both processes, the sweep engine spreads perturbed copies over them, and each
gives the single-process numbers.
"""

import sys
import textwrap

import pytest

from local_cluster import cpu_env, free_port, run_processes


WORKER = textwrap.dedent("""
    import sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from safer_jax.core import distributed
    distributed.initialize(f"localhost:{sys.argv[1]}", num_processes=2, process_id=int(sys.argv[2]))
    import numpy as np
    from jax.sharding import PartitionSpec as P
    from local_cluster import assert_same_sweep
    from safer_jax import criteria
    from safer_jax.core import data
    from safer_jax.measure import sweep
    from safer_jax.training import train
    from safer_jax.zoo import models
    assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
    assert distributed.data_mesh().size == 4
    # Bit-exact broadcast (-0.0 stays -0.0) after a barrier.
    distributed.wait_for_all("test")
    mine = np.array([-0.0, 1.5], np.float32) * (1 if distributed.is_primary() else 7)
    got = distributed.broadcast_from_primary({"x": mine})["x"]
    assert got.tobytes() == np.array([-0.0, 1.5], np.float32).tobytes(), got
    ds = data.load_dataset("digits")
    model = models.get_model("lenet")
    variables = train.init_variables(model, ds.input_shape, 0)
    split = ds.eval
    # Every process holds the full batch; each keeps only its own devices' rows.
    b = distributed.shard_batch({"image": split.images[:64]})
    assert b["image"].sharding.spec == P("data") and not b["image"].is_fully_addressable
    assert [s.data.shape[0] for s in b["image"].addressable_shards] == [16, 16]
    sharded = train.evaluate(model.apply, variables, split, batch_size=100)
    single = train.evaluate(model.apply, variables, split, batch_size=100, shard=False)
    assert sharded["accuracy"] == single["accuracy"], (sharded, single)
    np.testing.assert_allclose(sharded["loss"], single["loss"], rtol=1e-5)
    loss_fn = train.task_loss_fn(model, variables)
    params = variables["params"]
    batches = [{"image": split.images[lo:lo + 64], "label": split.labels[lo:lo + 64]}
               for lo in (0, 64)]
    runs = {
        "grad_norm": lambda: criteria.grad_norm(loss_fn, params, batches),
        "fisher": lambda: criteria.fisher(loss_fn, params, batches),
        "hessian_trace": lambda: criteria.hessian_trace(loss_fn, params, batches, layers="head.*",
                                                        max_probes=4, chunk_size=4),
    }
    for name, run in runs.items():
      got = run()
      with distributed.use_data_sharding(False):  # This process alone, one device.
        want = run()
      np.testing.assert_allclose([got[k] for k in want], [want[k] for k in want], rtol=1e-5,
                                 atol=1e-7, err_msg=name)

    # The sweep: perturbed copies spread over the 4 devices of both processes.
    # Committed to one local device, as restored checkpoints are.
    variables = jax.device_put(variables, jax.local_devices()[0])
    split = ds.eval.take(96)
    config = sweep.SweepConfig(families={"quantize": (4, 2), "noise": (0.5,), "bitflip": (0.01,)},
                               seeds=(0, 1, 2), max_parallel=6)
    engine = sweep.Engine(model, variables, split, config)
    assert engine.num_devices == 4 and engine.step is None, engine.num_devices
    assert {d.process_index for d in engine.sharding.device_set} == {0, 1}
    seen = []  # Every array the engine shards over 'copies'.
    shard_batch = distributed.shard_batch
    def spy(*args, **kwargs):
      out = shard_batch(*args, **kwargs)
      seen.append(out)
      return out
    distributed.shard_batch = spy
    sharded = sweep.run_sweep(model, variables, split, config, progress=False)
    distributed.shard_batch = shard_batch
    split_over = [k for k in seen if k.sharding.spec == P("copies")]
    assert split_over and all(not k.is_fully_addressable for k in split_over)
    for k in split_over:  # Each process holds only its 2 devices' rows of the chunk.
      assert {d.process_index for d in k.sharding.device_set} == {0, 1}
      assert len(k.addressable_shards) == 2
      assert sum(s.data.shape[0] for s in k.addressable_shards) == k.shape[0] // 2
    single = sweep.run_sweep(model, variables, split,
                             sweep.SweepConfig(**{**config.__dict__, "shard": False}),
                             progress=False)
    assert_same_sweep(sharded, single, cells=4 * (2 + 3 + 3))
    print(f"process {sys.argv[2]} ok primary={distributed.is_primary()} chunks={len(split_over)}",
          flush=True)
""")


@pytest.mark.integration
def test_two_processes_equal_single_process(tmp_path):
  script = tmp_path / "worker.py"
  script.write_text(WORKER)
  env = cpu_env(devices=2)
  port = str(free_port())
  outs = run_processes([[sys.executable, str(script), port, str(i)] for i in range(2)], env)
  for i, out in enumerate(outs):
    assert f"process {i} ok primary={i == 0}" in out, out[-2000:]
