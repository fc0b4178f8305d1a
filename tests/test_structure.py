"""The code's shape: no import cycles between our modules, no private names used across them,
and safer_jax's subpackages import each other only as their roles allow (:data:`ALLOWED`).

All read the source (``ast``), nothing is imported. An import inside a function
counts like one at the top: it is how a cycle hides.
"""

import ast
import os
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("safer_jax", "experiments")


def _modules() -> dict[str, str]:
  """``{dotted module name: path}`` of every module of safer_jax/, experiments/, tests/ and launch."""
  out = {"launch": os.path.join(ROOT, "launch.py")}
  for top in (*PACKAGES, "tests"):
    for folder, _, files in os.walk(os.path.join(ROOT, top)):
      for f in files:
        if f.endswith(".py"):
          rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, ".")
          out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = \
              os.path.join(folder, f)
  return out


MODULES = _modules()


def _imports(name: str, tree: ast.AST) -> list[tuple[str, str | None, ast.AST]]:
  """``(module, imported name or None, node)`` for every import of one of our modules."""
  package = name if MODULES[name].endswith("__init__.py") else name.rpartition(".")[0]
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out += [(a.name, None, node) for a in node.names if a.name.split(".")[0] in PACKAGES]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
      if base.split(".")[0] in PACKAGES:
        out += [(base, a.name, node) for a in node.names]
  return out


def _dependencies(name: str) -> set[str]:
  """The modules of our packages that ``name`` needs imported (``from pkg import mod``: mod)."""
  tree = ast.parse(open(MODULES[name]).read())
  deps = set()
  for module, item, _ in _imports(name, tree):
    target = f"{module}.{item}" if item and f"{module}.{item}" in MODULES else module
    if target in MODULES and target != name:
      deps.add(target)
  return deps


def test_no_import_cycles():
  graph = {m: _dependencies(m) for m in MODULES if m.split(".")[0] in PACKAGES}
  state, stack, cycles = {}, [], []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for d in sorted(graph.get(m, ())):
      if state.get(d) == "open":
        cycles.append(stack[stack.index(d):] + [d])
      elif d not in state:
        visit(d)
    stack.pop()
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m)
  # A package importing its own submodules (its __init__ re-exporting them) is not a cycle
  # unless a submodule imports the package back.
  assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _private(name: str) -> bool:
  return name.startswith("_") and not name.startswith("__")


def _owner_package(module: str) -> str:
  """The package whose members may share ``module``'s private names (its parent)."""
  return module.rpartition(".")[0]


def test_no_private_names_across_modules():
  """No ``mod._name`` / ``from mod import _name`` / private module from outside its package."""
  bad = []
  for name, path in MODULES.items():
    tree = ast.parse(open(path).read())
    aliases = {}  # local name -> our module it stands for
    for module, item, node in _imports(name, tree):
      for a in node.names:
        if item is None and a.name == module:  # import pkg.mod [as m]
          aliases[a.asname or module.split(".")[0]] = module if a.asname else module.split(".")[0]
        elif item == a.name:  # from pkg import mod_or_name [as m]
          target = f"{module}.{item}"
          if target in MODULES:
            aliases[a.asname or item] = target
          elif _private(item):
            bad.append(f"{name}: from {module} import {item}")
      target = f"{module}.{item}" if item and f"{module}.{item}" in MODULES else module
      parts = target.split(".")
      for i, part in enumerate(parts):
        # A private module (criteria._common) is for the modules of its own package.
        owner = ".".join(parts[:i])
        if _private(part) and name != owner and not name.startswith(owner + "."):
          bad.append(f"{name}: imports private module {target}")
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and _private(node.attr)
          and isinstance(node.value, ast.Name) and node.value.id in aliases):
        target = aliases[node.value.id]
        if f"{target}.{node.attr}" in MODULES and not name.startswith(target + "."):
          bad.append(f"{name}:{node.lineno}: private module {target}.{node.attr}")
        elif f"{target}.{node.attr}" not in MODULES:
          bad.append(f"{name}:{node.lineno}: {node.value.id}.{node.attr}")
  assert not bad, "private names used across modules:\n" + "\n".join(sorted(set(bad)))


# safer_jax's subpackages by role, and the roles each may import besides its own. The rules are
# as strict as the code allows: every allowed edge is used (training: evaluate; zoo: pretrained
# trains; measure: the sweep evaluates with training.evaluate; budgeting: cost tables from the
# sweep and the criteria). Nothing in safer_jax imports the top-level package or experiments/;
# experiments/, launch.py and tests/ may import anything.
ROLES = {
    "safer_jax.core": "core",
    "safer_jax.training": "training",
    "safer_jax.zoo": "zoo",
    "safer_jax.measure": "measure",
    "safer_jax.criteria": "measure",
    "safer_jax.budgeting": "budgeting",
    "safer_jax.report": "report",
}
ALLOWED = {
    "core": set(),
    "training": {"core"},
    "zoo": {"core", "training"},
    "measure": {"core", "training"},
    "budgeting": {"core", "training", "measure"},
    "report": {"core"},
}


def _role(module: str) -> str | None:
  for package, role in ROLES.items():
    if module == package or module.startswith(package + "."):
      return role
  return None


def test_every_library_module_has_a_role():
  """safer_jax/ holds its __init__ and the role subpackages only: no flat modules."""
  stray = [m for m in MODULES if m.startswith("safer_jax.") and _role(m) is None]
  assert not stray, f"modules of safer_jax outside the role subpackages {sorted(ROLES)}: {stray}"


def test_roles_are_layered():
  """The allowed imports between roles have no cycle (each role sits above those it imports)."""
  order = []
  pending = dict(ALLOWED)
  while pending:
    ready = sorted(r for r, deps in pending.items() if set(deps) <= set(order))
    assert ready, f"cycle among the allowed role imports: {pending}"
    order += ready
    for r in ready:
      del pending[r]


def test_imports_follow_the_roles():
  bad = []
  for name, path in MODULES.items():
    if not name.startswith("safer_jax."):
      continue
    role = _role(name)
    tree = ast.parse(open(path).read())
    for module, item, node in _imports(name, tree):
      target = f"{module}.{item}" if item and f"{module}.{item}" in MODULES else module
      where = f"{os.path.relpath(path, ROOT)}:{node.lineno} imports {target}"
      if target.split(".")[0] != "safer_jax":
        bad.append(f"{where}: the library must not import {target.split('.')[0]}/")
      elif target == "safer_jax":
        bad.append(f"{where}: import the module that defines the name, not the top-level package")
      elif _role(target) not in {role} | ALLOWED[role]:
        allowed = ", ".join(sorted(ALLOWED[role])) or "nothing else"
        bad.append(f"{where} (role {_role(target)}): {role} may import {allowed}")
  assert not bad, "imports against the roles (tests/test_structure.py ALLOWED):\n" + \
      "\n".join(sorted(set(bad)))


def _defined_names(path: str) -> set[str]:
  """The names a module defines or imports at its top level, and those of its ``__all__``."""
  names = set()
  for node in ast.parse(open(path).read()).body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      names.add(node.name)
    elif isinstance(node, (ast.Assign, ast.AnnAssign)):
      for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
        names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
        if getattr(target, "id", None) == "__all__" and node.value is not None:
          names |= {e.value for e in ast.walk(node.value) if isinstance(e, ast.Constant)}
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
      names |= {(a.asname or a.name).split(".")[0] for a in node.names}
  return names


def test_every_import_of_ours_exists():
  """Each ``import safer_jax...`` / ``from safer_jax... import x`` names a module or a name that
  exists in this checkout (an old flat path would otherwise still import from another installed
  copy)."""
  bad = []
  for name, path in MODULES.items():
    tree = ast.parse(open(path).read())
    found = [(module, item, node.lineno) for module, item, node in _imports(name, tree)]
    for node in ast.walk(tree):  # the scripts tests run in other processes
      if isinstance(node, ast.Constant) and isinstance(node.value, str) and \
          "import" in node.value and "safer_jax" in node.value:
        try:
          script = ast.parse(textwrap.dedent(node.value))
        except SyntaxError:
          continue
        found += [(module, item, node.lineno) for module, item, _ in _imports(name, script)]
    for module, item, lineno in found:
      where = f"{os.path.relpath(path, ROOT)}:{lineno}"
      if module not in MODULES:
        bad.append(f"{where}: no module {module}")
      elif (item is not None and item != "*" and f"{module}.{item}" not in MODULES
            and item not in _defined_names(MODULES[module])):
        bad.append(f"{where}: {module} has no {item}")
  assert not bad, "imports of names that do not exist:\n" + "\n".join(sorted(set(bad)))
