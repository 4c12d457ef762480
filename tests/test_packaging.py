"""The repository's folders never stand in for an installed package: the suite runs with the
repository root on ``sys.path`` (``python -m pytest`` puts it there), and the Triton kernels sit
in a top-level ``kernels/`` folder while HuggingFace ships a package called ``kernels`` that
transformers imports. ``kernels/`` is therefore a namespace folder (no ``__init__.py``), which an
installed regular package of that name always wins over, and it installs as ``fastcal.kernels``."""
import importlib.metadata
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _top_level_packages_of_the_repository():
    return sorted(
        name for name in os.listdir(ROOT)
        if os.path.isfile(os.path.join(ROOT, name, "__init__.py")) and not name.startswith(".")
    )


def test_the_root_is_on_the_path_as_the_suite_runs():
    """The premise of the tests below: without it they would pass vacuously."""
    assert any(os.path.abspath(entry or os.curdir) == ROOT for entry in sys.path)


def test_no_folder_of_the_repository_is_a_regular_package_named_like_an_installed_one():
    installed = importlib.metadata.packages_distributions()
    for name in _top_level_packages_of_the_repository():
        others = [dist for dist in installed.get(name, []) if dist != "fastcal"]
        assert not others, f"{name}/ at the repository root shadows the installed {others}"


def test_the_kernels_folder_never_shadows_an_installed_kernels_package():
    assert not os.path.exists(os.path.join(ROOT, "kernels", "__init__.py"))
    spec = importlib.util.find_spec("kernels")
    if spec is not None and spec.origin is not None:  # an installed regular package of that name
        assert os.path.dirname(os.path.abspath(spec.origin)) != os.path.join(ROOT, "kernels")


def test_transformers_hub_kernels_integration_imports_in_the_suite():
    import transformers.integrations.hub_kernels  # noqa: F401  (the test extra installs transformers)


def test_the_triton_kernels_import_as_part_of_fastcal():
    from fastcal.kernels import configs, predict, stats

    for module in (configs, predict, stats):
        assert module.__name__.startswith("fastcal.kernels.")
        assert os.path.realpath(module.__file__).startswith(os.path.join(ROOT, "kernels") + os.sep)


def _internal_imports():
    """``{module: {fastcal modules it imports}}`` from every import statement of the package,
    those inside functions too (a deferred import still closes a circle)."""
    import ast

    package = os.path.join(ROOT, "fastcal")
    graph = {}
    for folder, _, files in os.walk(package, followlinks=True):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
            module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            is_package = parts[-1] == "__init__"
            edges = set()
            for node in ast.walk(ast.parse(open(path).read())):
                if isinstance(node, ast.ImportFrom) and node.level:
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    base = base[:len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                    for alias in node.names:
                        edges.add(f"{target}.{alias.name}" if not node.module else target)
                elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fastcal"):
                    edges.add(node.module)
                elif isinstance(node, ast.Import):
                    edges.update(a.name for a in node.names if a.name.startswith("fastcal"))
            graph[module] = edges
    return {m: {e for e in edges if e in graph and e != m} for m, edges in graph.items()}


def test_the_package_has_no_import_circle():
    graph = _internal_imports()
    assert "fastcal._backends" in graph and "fastcal.kernels.stats" in graph
    state = {}

    def visit(module, path):
        state[module] = "open"
        for target in graph[module]:
            if target == "fastcal":  # the package itself: only its __init__ may import it
                continue
            assert state.get(target) != "open", " -> ".join(path + [target])
            if target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in graph:
        if module not in state and module != "fastcal":
            visit(module, [module])
