"""Train (or restore from the zoo cache) models and record their accuracy.

``python launch.py --experiment=train --model=all`` trains every zoo model on
the embedded digits dataset (not the ImageNet architectures, which load checkpoints) and
writes ``workdir/train/<model>/metrics.{json,md}`` (``<model>``: ``all`` for every model).
"""

from __future__ import annotations

import os
import time

from experiments import common
from safer_jax.core import io
from safer_jax.zoo import models


EXTRA_MODELS = ("all",)  # besides the zoo's names (see common.validate_config)


def get_config(tiny: bool = False):
  config = common.base_config()
  config.model = "mlp" if tiny else "resnet8"  # 'all' trains every zoo model.
  return config


def run(config, workdir: str) -> dict:
  names = ([m for m in models.list_models() if m not in models.IMAGENET_MODELS + models.TEXT_MODELS]
           if config.model == "all" else [config.model])
  rows = []
  for name in names:
    t0 = time.perf_counter()
    entry = common.pretrained(config, model=name)
    seconds = time.perf_counter() - t0
    rows.append({"model": entry.name, "dataset": entry.dataset.name, "seed": config.seed,
                 "accuracy": entry.metrics["accuracy"], "loss": entry.metrics["loss"],
                 "num_params": int(sum(x.size for x in _leaves(entry.variables["params"]))),
                 "seconds": round(seconds, 2), "restored": entry.restored,
                 "checkpoint": entry.path})
    print(f"{entry.name}: eval accuracy {entry.metrics['accuracy']:.4f}, loss "
          f"{entry.metrics['loss']:.4f} ({'restored' if entry.restored else 'trained'} in "
          f"{seconds:.1f}s)", flush=True)
  table = ["| model | dataset | params | eval accuracy | eval loss | seconds (train or restore) |",
           "|---|---|---|---|---|---|"]
  table += [f"| {r['model']} | {r['dataset']} | {r['num_params']:,} | {100 * r['accuracy']:.2f}% "
            f"| {r['loss']:.4f} | {r['seconds']:.1f} ({'restore' if r['restored'] else 'train'}) |"
            for r in rows]
  paths = {"metrics_json": io.write_json(os.path.join(workdir, "metrics.json"),
                                         {"rows": rows, "versions": io.versions()}),
           "metrics_md": io.write_text(os.path.join(workdir, "metrics.md"), "\n".join(table) + "\n")}
  return {"paths": paths, "rows": rows}


def _leaves(tree):
  import jax  # pylint: disable=import-outside-toplevel
  return jax.tree.leaves(tree)
