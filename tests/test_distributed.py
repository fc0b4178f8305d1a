"""Two processes (jax.distributed, 2 CPU devices each, gloo): eval and criteria = 1 process."""

import sys
import textwrap

import pytest

from local_cluster import cpu_env, free_port, run_processes


WORKER = textwrap.dedent("""
    import sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from safer_jax import distributed
    distributed.initialize(f"localhost:{sys.argv[1]}", num_processes=2, process_id=int(sys.argv[2]))
    import numpy as np
    from jax.sharding import PartitionSpec as P
    from safer_jax import benchmark, criteria, data, models, train
    assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
    assert distributed.data_mesh().size == 4
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
    loss_fn = benchmark.classifier_loss_fn(model, variables)
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
    print(f"process {sys.argv[2]} ok primary={distributed.is_primary()}", flush=True)
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
