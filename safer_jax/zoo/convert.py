"""Loading trained weights from local files: torchvision state dicts (.npz) and orbax checkpoints.

Nothing is downloaded. To use torchvision's published ImageNet weights, export
them once where PyTorch is installed::

  import numpy as np, torchvision
  np.savez('resnet50.npz', **{k: v.numpy() for k, v in torchvision.models.resnet50(
      weights='IMAGENET1K_V2').state_dict().items()})

then ``variables = load_torchvision_npz('resnet50.npz', 'resnet50')`` (or
``zoo.from_checkpoint('resnet50', 'resnet50.npz', 'imagenet2012')``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
from etils import epath  # orbax's path type

from safer_jax.core import checkpoints
from safer_jax.core import layers as layers_lib
from safer_jax.zoo import models as models_lib
from safer_jax.zoo.models import imagenet as imagenet_models

# Converter-supported models: zoo name -> torchvision architecture family.
TORCHVISION_MODELS = {
    "resnet18": "resnet",
    "resnet34": "resnet",
    "resnet50": "resnet",
    "mobilenet_v2_imagenet": "mobilenet_v2",
}
# The torchvision key of the classifier weight ``(num_classes, features)``, per family.
_CLASSIFIER_KEY = {"resnet": "fc.weight", "mobilenet_v2": "classifier.1.weight"}
# Our leaf name -> torchvision parameter / buffer name.
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
         "var": "running_var"}
_RESNET_LAYER = {"conv1": "conv1", "bn1": "bn1", "conv2": "conv2", "bn2": "bn2",
                 "conv3": "conv3", "bn3": "bn3", "downsample": "downsample.0",
                 "downsample_bn": "downsample.1"}
# MobileNetV2 block layer -> index inside torchvision's ``features.<i>.conv``, keyed by whether
# the block has an expand layer.
_MOBILENET_LAYER = {
    True: {"expand": "0.0", "expand_bn": "0.1", "depthwise": "1.0", "depthwise_bn": "1.1",
           "project": "2", "project_bn": "3"},
    False: {"depthwise": "0.0", "depthwise_bn": "0.1", "project": "1", "project_bn": "2"},
}
_IGNORED_SUFFIX = "num_batches_tracked"
_SHAPE_PROBE = (32, 32, 3)  # any input works: parameter shapes do not depend on the image size.
_MAX_LISTED = 12


def _check_model_name(model_name: str) -> str:
  if model_name not in TORCHVISION_MODELS:
    raise ValueError(f"No torchvision converter for model {model_name!r}; supported: "
                     f"{sorted(TORCHVISION_MODELS)} (torchvision's mobilenet_v2 is "
                     f"'mobilenet_v2_imagenet').")
  return TORCHVISION_MODELS[model_name]


def _listed(items) -> str:
  items = list(items)
  more = f" ... (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
  return ", ".join(items[:_MAX_LISTED]) + more


def read_state_dict(path_or_dict: str | os.PathLike | Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Reads a torchvision ``state_dict`` saved with ``np.savez`` (or takes a dict of arrays).

  Args:
    path_or_dict: path of the ``.npz`` file, or a mapping ``{torch key: array}``.

  Returns:
    ``{torch key: np.ndarray}`` without the ``num_batches_tracked`` counters.

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: the file is not a readable ``.npz`` archive.
  """
  if isinstance(path_or_dict, Mapping):
    items = dict(path_or_dict)
  else:
    path = os.fspath(path_or_dict)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"No torchvision state-dict file at {path!r}.")
    try:
      npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
      raise ValueError(f"{path!r} is not a readable .npz archive of a state_dict "
                       f"(np.savez(path, **state_dict)): {e}") from e
    if not hasattr(npz, "files"):
      raise ValueError(f"{path!r} holds a single array, not a .npz archive of a state_dict "
                       f"(np.savez(path, **state_dict)).")
    with npz:
      items = {k: npz[k] for k in npz.files}
  return {k: np.asarray(v) for k, v in items.items() if not k.endswith(_IGNORED_SUFFIX)}


def torchvision_key(model_name: str, path: tuple[str, ...], has_expand: bool = True) -> str:
  """The torchvision ``state_dict`` key of one of our variables.

  Args:
    model_name: a :data:`TORCHVISION_MODELS` name.
    path: ``(collection, stage, [layer,] leaf)``, e.g.
      ``('params', 'layer1_block1', 'downsample_bn', 'scale')``.
    has_expand: MobileNetV2 only: whether this block has an ``expand`` layer
      (torchvision's indices inside the block shift by one when it has not).

  Returns:
    E.g. ``'layer1.0.downsample.1.weight'``.

  Raises:
    ValueError: unknown model or a path the converter does not know.
  """
  family = _check_model_name(model_name)
  leaf = _LEAF.get(path[-1])
  stage, layers = path[1], path[2:-1]
  layer = layers[0] if len(layers) == 1 else None
  module = None
  if family == "resnet":
    match = re.fullmatch(r"layer(\d+)_block(\d+)", stage)
    if stage == "stem":
      module = {"conv": "conv1", "bn": "bn1"}.get(layer)
    elif match and layer in _RESNET_LAYER:
      module = f"layer{match[1]}.{int(match[2]) - 1}.{_RESNET_LAYER[layer]}"
    elif stage == "head" and layer == "fc":
      module = "fc"
  else:
    match = re.fullmatch(r"block(\d+)", stage)
    n_blocks = sum(n for _, _, n, _ in imagenet_models.MOBILENET_V2_CONFIG)
    if stage in ("stem", "last"):
      index = 0 if stage == "stem" else n_blocks + 1
      module = {"conv": f"features.{index}.0", "bn": f"features.{index}.1"}.get(layer)
    elif match and layer in _MOBILENET_LAYER[has_expand]:
      module = f"features.{match[1]}.conv.{_MOBILENET_LAYER[has_expand][layer]}"
    elif stage == "head" and layer == "fc":
      module = "classifier.1"
  if module is None or leaf is None:
    raise ValueError(f"No torchvision key for variable {'/'.join(path)!r} of {model_name!r}.")
  return f"{module}.{leaf}"


def to_flax(array: np.ndarray, leaf: str) -> np.ndarray:
  """Converts one torchvision array to our layout (float32).

  Conv ``OIHW -> HWIO`` (depthwise ``(C, 1, kh, kw) -> (kh, kw, 1, C)``), linear
  ``(out, in) -> (in, out)``; BN vectors are unchanged.
  """
  array = np.asarray(array, np.float32)
  if leaf == "kernel" and array.ndim == 4:
    return np.ascontiguousarray(array.transpose(2, 3, 1, 0))
  if leaf == "kernel" and array.ndim == 2:
    return np.ascontiguousarray(array.T)
  return array


def _torch_shape(shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
  """Inverse of :func:`to_flax` on shapes (for error messages in torchvision's layout)."""
  if leaf == "kernel" and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if leaf == "kernel" and len(shape) == 2:
    return (shape[1], shape[0])
  return tuple(shape)


def abstract_variables(model, input_shape: tuple[int, ...] = _SHAPE_PROBE) -> dict:
  """``jax.ShapeDtypeStruct`` tree of ``model.init`` on one ``input_shape`` image; no allocation.

  :func:`safer_jax.core.layers.abstract_variables` with an input shape that fits every zoo model.
  """
  return layers_lib.abstract_variables(model, input_shape)


def _nest(flat: Mapping[tuple[str, ...], Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return out


def torchvision_num_classes(state: Mapping[str, np.ndarray], model_name: str) -> int | None:
  """Rows of the classifier weight in ``state`` (``None`` when that key is absent)."""
  key = _CLASSIFIER_KEY[_check_model_name(model_name)]
  return int(np.shape(state[key])[0]) if key in state else None


def load_torchvision_npz(path_or_dict: str | os.PathLike | Mapping[str, Any], model_name: str,
                         num_classes: int | None = None) -> dict:
  """Converts a torchvision ``state_dict`` (saved as ``.npz``) to our Flax variables.

  Export the state dict where PyTorch is installed, e.g.::

    np.savez('resnet50.npz', **{k: v.numpy() for k, v in torchvision.models.resnet50(
        weights='IMAGENET1K_V2').state_dict().items()})

  Keys map as ``conv1.weight -> params/stem/conv/kernel``,
  ``layer1.0.downsample.1.running_mean -> batch_stats/layer1_block1/downsample_bn/mean``,
  ``features.1.conv.0.0.weight -> params/block1/depthwise/kernel``,
  ``classifier.1.weight -> params/head/fc/kernel`` (see :func:`torchvision_key`).
  Conv weights ``OIHW`` become ``HWIO`` (depthwise ``(C, 1, 3, 3) -> (3, 3, 1, C)``),
  linear weights ``(out, in)`` become ``(in, out)``, BN ``weight``/``bias`` become
  ``scale``/``bias`` and ``running_mean``/``running_var`` the ``batch_stats``
  ``mean``/``var``; ``num_batches_tracked`` is ignored. Values are cast to float32.

  Args:
    path_or_dict: ``.npz`` path or a mapping ``{torch key: array}``.
    model_name: one of :data:`TORCHVISION_MODELS` (``'resnet18'``, ``'resnet34'``,
      ``'resnet50'``, ``'mobilenet_v2_imagenet'``).
    num_classes: classifier outputs; ``None`` takes them from the state dict's
      classifier weight (``fc.weight`` / ``classifier.1.weight``; 1000 when absent).

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` of float32 NumPy arrays, the structure of
    ``get_model(model_name, num_classes).init(...)``; images are NHWC.

  Raises:
    FileNotFoundError: no file at ``path_or_dict``.
    ValueError: unknown model, unreadable file, or keys missing from / unexpected in
      the state dict, or arrays of the wrong shape (the message names every such key).
  """
  family = _check_model_name(model_name)
  state = read_state_dict(path_or_dict)
  if num_classes is None:
    num_classes = torchvision_num_classes(state, model_name) or 1000
  if num_classes < 1:
    raise ValueError(f"num_classes={num_classes} must be >= 1.")
  model = models_lib.get_model(model_name, num_classes=num_classes)
  abstract = layers_lib.leaves_by_path(abstract_variables(model))
  with_expand = {p[1] for p in abstract if len(p) > 2 and p[2] == "expand"}
  keys = {p: torchvision_key(model_name, p, has_expand=p[1] in with_expand) for p in abstract}
  missing = sorted(set(keys.values()) - set(state))
  unexpected = sorted(set(state) - set(keys.values()))
  problems = []
  if missing:
    problems.append(f"missing keys: {_listed(missing)}")
  if unexpected:
    problems.append(f"unexpected keys: {_listed(unexpected)}")
  flat, wrong = {}, []
  for path, key in keys.items():
    if key not in state:
      continue
    want = _torch_shape(abstract[path].shape, path[-1])
    if tuple(state[key].shape) != want:
      wrong.append(f"{key} has shape {tuple(state[key].shape)}, expected {want}")
      continue
    flat[path] = to_flax(state[key], path[-1])
  if wrong:
    problems.append(f"shape mismatches: {_listed(wrong)}")
  if problems:
    source = "state dict" if isinstance(path_or_dict, Mapping) else repr(os.fspath(path_or_dict))
    raise ValueError(f"torchvision {family} {source} does not fit {model_name!r} "
                     f"(num_classes={num_classes}): " + "; ".join(problems))
  return _nest(flat)


def _orbax_item_dir(path: str) -> tuple[str, str | None]:
  """``(directory of the saved variables tree, zoo checkpoint root or None)``.

  Accepts a plain ``StandardCheckpointer`` directory, a ``CheckpointManager`` root
  (latest step; item ``variables`` as written by :func:`safer_jax.core.checkpoints.save_checkpoint`,
  or ``default``) or one step directory of it.
  """
  def item_in(step_dir):
    for item in ("variables", "default"):
      if os.path.isfile(os.path.join(step_dir, item, "_METADATA")):
        return os.path.join(step_dir, item)
    return None

  if os.path.isfile(os.path.join(path, "_METADATA")):
    return path, None
  if item_in(path):
    return item_in(path), None
  with ocp.CheckpointManager(path) as mngr:
    step = mngr.latest_step()
  item = None if step is None else item_in(os.path.join(path, str(step)))
  if item is None:
    raise FileNotFoundError(
        f"No finished orbax checkpoint in {path!r}: expected a StandardCheckpointer directory "
        f"(with _METADATA) or a CheckpointManager directory with a step holding 'variables'.")
  zoo_root = path if (os.path.basename(item) == "variables"
                      and os.path.isdir(os.path.join(path, str(step), "meta"))) else None
  return item, zoo_root


def _saved_shapes(item_dir: str) -> dict[tuple[str, ...], tuple[int, ...]]:
  metadata = ocp.StandardCheckpointHandler().metadata(epath.Path(item_dir))
  tree = getattr(metadata, "tree", metadata)
  if not isinstance(tree, Mapping):
    raise ValueError(f"Orbax checkpoint {item_dir!r} does not hold a dict of variables.")
  return {p: tuple(m.shape) for p, m in layers_lib.leaves_by_path(tree).items()}


def check_structure(saved: Mapping[tuple[str, ...], tuple[int, ...]],
                    expected: Mapping[tuple[str, ...], tuple[int, ...]], source: str) -> None:
  """Raises a ValueError naming every missing, unexpected or wrongly shaped leaf.

  Args:
    saved: ``{variable path: shape}`` found in the checkpoint.
    expected: ``{variable path: shape}`` of the model.
    source: what ``saved`` came from (for the message).
  """
  name = "/".join
  order = lambda p: (p[0] != "params", p)  # noqa: E731  (params first: the informative ones)
  missing = [name(p) for p in sorted(expected, key=order) if p not in saved]
  unexpected = [name(p) for p in sorted(saved, key=order) if p not in expected]
  wrong = [f"{name(p)} has shape {saved[p]}, expected {tuple(expected[p])}"
           for p in sorted(expected, key=order) if p in saved and saved[p] != tuple(expected[p])]
  problems = [f"{what}: {_listed(items)}" for what, items in
              (("missing", missing), ("unexpected", unexpected), ("shape mismatches", wrong))
              if items]
  if problems:
    raise ValueError(f"{source} does not match the model's variables: " + "; ".join(problems))


def load_orbax(path: str | os.PathLike, model, input_shape: tuple[int, ...]) -> dict:
  """Restores a variables tree saved with orbax, checked against ``model``.

  Reads either format: a zoo checkpoint (:func:`safer_jax.core.checkpoints.save_checkpoint`; its
  SHA-256 checksum is verified) or a plain ``ocp.StandardCheckpointer().save(path,
  variables)`` directory (also a ``CheckpointManager`` root or step directory).

  Args:
    path: checkpoint directory.
    model: the Flax module the variables belong to.
    input_shape: one image ``(H, W, C)`` (only used to trace ``model.init``).

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` (whatever collections ``model.init`` makes).

  Raises:
    FileNotFoundError: ``path`` is not a directory or holds no finished checkpoint.
    ValueError: leaves missing, unexpected or of the wrong shape (all named).
    safer_jax.core.checkpoints.CorruptCheckpointError: a zoo checkpoint that fails to restore or
      whose checksum differs.
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"No orbax checkpoint directory at {path!r}.")
  abstract = abstract_variables(model, tuple(input_shape))
  item_dir, zoo_root = _orbax_item_dir(path)
  expected = {p: tuple(s.shape) for p, s in layers_lib.leaves_by_path(abstract).items()}
  check_structure(_saved_shapes(item_dir), expected, f"Orbax checkpoint {path!r}")
  if zoo_root is not None:
    variables, _ = checkpoints.restore_checkpoint(zoo_root, abstract)
  else:
    variables = ocp.StandardCheckpointer().restore(item_dir, abstract)
  return dict(variables)
