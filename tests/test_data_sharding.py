"""Evaluation and criteria sharded along the data axis over 8 fake CPU devices = single device."""

import textwrap

import pytest

from local_cluster import run_script

SCRIPT = textwrap.dedent("""
    import time
    import jax, numpy as np
    from jax.sharding import PartitionSpec as P
    assert jax.device_count() == 8, jax.devices()
    from safer_jax import criteria
    from safer_jax.core import data, distributed
    from safer_jax.training import train
    from safer_jax.zoo import models
    from safer_jax.criteria import _common

    ds = data.load_dataset("digits")
    model = models.get_model("lenet")
    variables = train.init_variables(model, ds.input_shape, 0)
    split = ds.eval  # 359 examples: batches of 100 -> padded to 104 on 8 devices.

    # The batches really are split over the 8 devices (and replicated when not divisible).
    mesh = distributed.data_mesh()
    assert mesh.axis_names == ("data",) and mesh.size == 8
    sharded = distributed.shard_batch({"image": split.images[:64], "label": split.labels[:64]})
    assert sharded["image"].sharding.spec == P("data"), sharded["image"].sharding
    assert len(sharded["image"].addressable_shards) == 8
    assert sharded["image"].addressable_shards[0].data.shape == (8, 8, 8, 1)
    odd = distributed.shard_batch({"image": split.images[:60]})
    assert odd["image"].sharding.spec == P(), odd["image"].sharding
    listed = _common.as_batch_list([{"image": split.images[:64], "label": split.labels[:64]}])
    assert listed[0]["label"].sharding.spec == P("data")
    with distributed.use_data_sharding(False):
      plain = _common.as_batch_list([{"image": split.images[:64], "label": split.labels[:64]}])
      assert isinstance(plain[0]["label"], np.ndarray)
    reps = distributed.replicate(variables)
    assert jax.tree.leaves(reps)[0].sharding.spec == P()

    # evaluate: accuracy exactly, loss to float tolerance.
    a = train.evaluate(model.apply, variables, split, batch_size=100)
    b = train.evaluate(model.apply, variables, split, batch_size=100, shard=False)
    assert a["accuracy"] == b["accuracy"] and a["num_examples"] == b["num_examples"], (a, b)
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    print("eval", a, b)

    loss_fn = train.task_loss_fn(model, variables)
    params = variables["params"]
    batches = [{"image": split.images[lo:lo + 64], "label": split.labels[lo:lo + 64]}
               for lo in (0, 64)]
    batches.append({"image": split.images[128:188], "label": split.labels[128:188]})  # replicated
    key = jax.random.key(3)
    runs = {
        "grad_norm": lambda: criteria.grad_norm(loss_fn, params, batches),
        "fisher": lambda: criteria.fisher(loss_fn, params, batches),  # shard_map + psum
        "hessian_trace": lambda: criteria.hessian_trace(loss_fn, params, batches, key=key,
                                                        layers="conv1.*", max_probes=8,
                                                        chunk_size=8),
        "integrated_gradients": lambda: criteria.integrated_gradients(
            loss_fn, params, batches, layers="conv2.*", steps=4),
        "corruption_pga": lambda: criteria.corruption_pga(loss_fn, params, batches, steps=2,
                                                          layers="head.*"),
        # Linearised through the data-parallel call: every product on the mesh.
        "top_eigenvalue": lambda: criteria.top_eigenvalue(loss_fn, params, batches, key=key,
                                                          layers="conv2.*", max_iter=8),
    }
    for name, run in runs.items():
      t0 = time.time()
      got = run()
      with distributed.use_data_sharding(False):
        want = run()
      assert got.keys() == want.keys(), name
      g = np.array([got[k] for k in want])
      w = np.array([want[k] for k in want])
      # corruption_pga is a difference of two losses ~2.3: float32 rounding of those is ~2e-7.
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=name)
      print(name, "max rel diff", np.max(np.abs(g - w) / np.maximum(np.abs(w), 1e-30)),
            f"{time.time() - t0:.1f}s")
    print("all equal")
""")


@pytest.mark.integration
def test_data_sharded_eval_and_criteria_equal_single_device():
  stdout = run_script(SCRIPT, devices=8)
  assert "all equal" in stdout, stdout[-2000:]
