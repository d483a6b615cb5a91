"""The package import graph: no cycles, the forbidden edges absent, and equal to README's map.

Every import of ``qpf/``, ``kernels/`` and ``experiments/`` is parsed with ``ast`` (module
level and inside functions, so lazy imports count too) and reduced to packages: ``qpf.X``
for anything under ``qpf/X`` (``qpf`` itself for ``qpf/__init__.py``), ``kernels`` and
``experiments`` for those trees. The README's architecture section prints the same graph in
a fenced block (``kernels        -> qpf.ops`` first), parsed here so the two cannot drift.
The checker itself is tested on a tiny synthetic tree with planted violations.
"""

from __future__ import annotations

import ast
import itertools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TREES = ("qpf", "kernels", "experiments")

Graph = dict[str, set[str]]


# ----------------------------------------------------------------------------- the checker


def package_of(module: str) -> str:
    """``qpf.models.family`` -> ``qpf.models``; ``kernels.reference`` -> ``kernels``."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "qpf" else parts[0]


def _module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(root: Path, dotted: str) -> bool:
    """Whether ``dotted`` names a module or package file in the tree (not an attribute)."""
    base = root.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imported_modules(root: Path, path: Path) -> list[tuple[str, int]]:
    """(first-party module, line) for every import statement in ``path``, at any depth."""
    module = _module_name(root, path)
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                anchor = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            submodules = [f"{base}.{a.name}" for a in node.names]
            submodules = [m for m in submodules if _is_module(root, m)]
            # ``from qpf import config`` loads the submodule; ``from qpf import ConfigError``
            # (a name that is no module) the package's __init__ itself
            found += [(m, node.lineno) for m in submodules]
            if len(submodules) < len(node.names):
                found.append((base, node.lineno))
    return [(m, line) for m, line in found if m.split(".")[0] in TREES]


def import_graph(root: Path) -> tuple[Graph, dict[tuple[str, str], list[str]]]:
    """Package -> packages it imports (self-edges dropped), and where each edge comes from."""
    graph: Graph = {}
    where: dict[tuple[str, str], list[str]] = {}
    for tree in TREES:
        for path in sorted((root / tree).rglob("*.py")):
            source = package_of(_module_name(root, path))
            graph.setdefault(source, set())
            for target_module, line in imported_modules(root, path):
                target = package_of(target_module)
                if target != source:
                    graph[source].add(target)
                    rel = path.relative_to(root)
                    where.setdefault((source, target), []).append(f"{rel}:{line}")
    return graph, where


def find_cycle(graph: Graph) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or None when the graph is acyclic."""
    state: dict[str, int] = {}  # 1: on the DFS stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def reachable(graph: Graph, start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def forbidden_edges(graph: Graph) -> list[str]:
    """The layering rules: qpf.training never (even transitively) loads qpf.generation; no
    part of qpf loads ``kernels`` or ``experiments``."""
    problems = []
    if "qpf.generation" in reachable(graph, "qpf.training"):
        problems.append("qpf.training reaches qpf.generation")
    for source in sorted(graph):
        if source == "qpf" or source.startswith("qpf."):
            for bad in sorted(reachable(graph, source) & {"kernels", "experiments"}):
                problems.append(f"{source} reaches {bad}")
    return problems


def readme_graph(text: str) -> Graph:
    """The fenced block of README whose first line starts ``kernels`` and maps ``->``.

    Each line: ``package -> dep, dep, ...`` (``nothing`` for none), optionally followed by
    a parenthesised note after two or more spaces.
    """
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, re.M | re.S):
        lines = block.strip("\n").splitlines()
        if lines and re.match(r"kernels\s+->", lines[0]):
            break
    else:
        raise AssertionError("README has no fenced import map starting `kernels        -> ...`")
    graph: Graph = {}
    for line in lines:
        m = re.fullmatch(r"(\S+)\s+->\s*(.*?)(?:\s{2,}\(.*\))?\s*", line)
        if m is None:
            raise AssertionError(f"README import map: cannot parse {line!r}")
        deps = m.group(2).strip()
        graph[m.group(1)] = set() if deps == "nothing" else {d.strip() for d in deps.split(",")}
    return graph


def graph_difference(code: Graph, readme: Graph) -> list[str]:
    """Edges and packages where README and the code differ, one readable line each."""
    lines = []
    for node in sorted(set(code) | set(readme)):
        if node not in readme:
            lines.append(f"{node}: missing from README (code imports {sorted(code[node])})")
        elif node not in code:
            lines.append(f"{node}: in README but no such package in the code")
        else:
            extra, missing = code[node] - readme[node], readme[node] - code[node]
            if extra:
                lines.append(f"{node}: code imports {sorted(extra)} not in README")
            if missing:
                lines.append(f"{node}: README lists {sorted(missing)} that the code doesn't import")
    return lines


# ------------------------------------------------------------------------ the real tree


@pytest.fixture(scope="module")
def real_graph():
    return import_graph(ROOT)


def test_package_graph_has_no_cycles(real_graph):
    graph, where = real_graph
    cycle = find_cycle(graph)
    assert cycle is None, (
        "import cycle "
        + " -> ".join(cycle)
        + "; edges from "
        + "; ".join(f"{a}->{b}: {where[a, b][:3]}" for a, b in itertools.pairwise(cycle))
    )


def test_forbidden_imports_are_absent(real_graph):
    graph, where = real_graph
    suspects = {
        edge: lines
        for edge, lines in where.items()
        if edge[1] in ("kernels", "experiments", "qpf.generation") and edge[0].startswith("qpf")
    }
    assert forbidden_edges(graph) == [], f"imports to check: {suspects}"


def test_graph_equals_readme_architecture_map(real_graph):
    graph, _where = real_graph
    diff = graph_difference(graph, readme_graph((ROOT / "README.md").read_text()))
    assert diff == [], "\n".join(diff) + "\nfix the code or README's import map"


def test_graph_sees_lazy_and_from_package_imports(real_graph):
    graph, _where = real_graph
    # kernels registers itself in qpf.ops.scan; qpf/__init__ re-exports from qpf.config
    assert "qpf.ops" in graph["kernels"]
    assert "qpf.config" in graph["qpf"]
    assert "experiments" in graph
    assert "kernels" in graph["experiments"]


# ------------------------------------------------------------- the checker on planted trees


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


CLEAN = {
    "qpf/__init__.py": "from qpf.config import ConfigError\n",
    "qpf/config.py": "from qpf.ops import scan\nclass ConfigError(ValueError): ...\n",
    "qpf/ops/__init__.py": "",
    "qpf/ops/scan.py": "import math\n",
    "qpf/training/__init__.py": "",
    "qpf/training/loop.py": "from qpf import config\n",
    "qpf/generation/__init__.py": "from qpf.training import loop\n",
    "kernels/__init__.py": "from qpf.ops.scan import math\n",
    "experiments/__init__.py": "import kernels\nfrom qpf import ConfigError\n",
}
CLEAN_README = """intro
```
kernels        -> qpf.ops        (fills a registry)
qpf            -> qpf.config
qpf.config     -> qpf.ops
qpf.ops        -> nothing
qpf.training   -> qpf.config
qpf.generation -> qpf.training
experiments    -> kernels, qpf
```
"""


def test_checker_accepts_a_clean_tree(tmp_path):
    graph, _ = import_graph(_tree(tmp_path, CLEAN))
    assert find_cycle(graph) is None
    assert forbidden_edges(graph) == []
    assert graph_difference(graph, readme_graph(CLEAN_README)) == []


def test_checker_finds_a_cycle_through_a_lazy_import(tmp_path):
    lazy = "def f():\n    from qpf.config import ConfigError\n"
    graph, _ = import_graph(_tree(tmp_path, {**CLEAN, "qpf/ops/scan.py": lazy}))
    cycle = find_cycle(graph)
    assert cycle is not None
    assert cycle[0] == cycle[-1]
    assert set(cycle) == {"qpf.config", "qpf.ops"}


def test_checker_finds_training_reaching_generation(tmp_path):
    # directly, and through a relative import inside a function
    direct = {**CLEAN, "qpf/training/loop.py": "def f():\n    import qpf.generation\n"}
    assert "qpf.training reaches qpf.generation" in forbidden_edges(
        import_graph(_tree(tmp_path / "a", direct))[0]
    )
    relative = {**CLEAN, "qpf/training/loop.py": "def f():\n    from ..generation import x\n"}
    assert "qpf.training reaches qpf.generation" in forbidden_edges(
        import_graph(_tree(tmp_path / "b", relative))[0]
    )


def test_checker_finds_qpf_importing_kernels_or_experiments(tmp_path):
    planted = {**CLEAN, "qpf/ops/scan.py": "def f():\n    import kernels\n"}
    problems = forbidden_edges(import_graph(_tree(tmp_path / "a", planted))[0])
    assert "qpf.ops reaches kernels" in problems
    assert "qpf.config reaches kernels" in problems
    planted = {**CLEAN, "qpf/training/loop.py": "from experiments import cli\n"}
    problems = forbidden_edges(import_graph(_tree(tmp_path / "b", planted))[0])
    assert "qpf.training reaches experiments" in problems


def test_checker_finds_readme_drift(tmp_path):
    graph, _ = import_graph(_tree(tmp_path, CLEAN))
    extra_edge = CLEAN_README.replace("qpf.ops        -> nothing", "qpf.ops        -> qpf.config")
    assert graph_difference(graph, readme_graph(extra_edge)) == [
        "qpf.ops: README lists ['qpf.config'] that the code doesn't import"
    ]
    missing_row = CLEAN_README.replace("qpf.training   -> qpf.config\n", "")
    assert graph_difference(graph, readme_graph(missing_row)) == [
        "qpf.training: missing from README (code imports ['qpf.config'])"
    ]
    with pytest.raises(AssertionError, match="no fenced import map"):
        readme_graph("```\nqpf -> qpf.config\n```\n")


# ------------------------------------------------------------------ explicit registration


NUMERIC_FIELDS = ("dtype", "param_dtype", "matmul_precision")
CHECKS = ("one_of", "require", "_one_of", "_require")


def _declared_numerics(cls: ast.ClassDef, where: str) -> list[str]:
    """The numeric fields a model config class (one with a ``family_name``) annotates."""
    annotated = [n.target for n in cls.body if isinstance(n, ast.AnnAssign)]
    own = {t.id for t in annotated if isinstance(t, ast.Name)}
    if "family_name" not in own:
        return []
    return [f"{where}:{cls.lineno}: {cls.name} declares {f}" for f in NUMERIC_FIELDS if f in own]


def _checked_numerics(call: ast.Call, where: str) -> list[str]:
    """The numeric fields a ``one_of``/``require`` call names."""
    if getattr(call.func, "id", None) not in CHECKS:
        return []
    consts = {a.value for a in call.args if isinstance(a, ast.Constant)}
    return [f"{where}:{call.lineno}: checks {f}" for f in NUMERIC_FIELDS if f in consts]


def numeric_redeclarations(root: Path) -> list[str]:
    """Places outside ``qpf.config.NumericsConfig`` that declare a model config's numeric
    field (dtype, param_dtype, matmul_precision) or validate one: config validation has one
    home, and every family config inherits it."""
    found = []
    for tree in TREES:
        for path in sorted((root / tree).rglob("*.py")):
            where = path.relative_to(root).as_posix()
            module = ast.parse(path.read_text(), where)
            if where == "qpf/config.py":  # the home itself
                module.body = [n for n in module.body if getattr(n, "name", "") != "NumericsConfig"]
            for node in ast.walk(module):
                if isinstance(node, ast.ClassDef):
                    found += _declared_numerics(node, where)
                elif isinstance(node, ast.Call):
                    found += _checked_numerics(node, where)
    return found


def test_numerics_are_declared_and_checked_only_by_numerics_config(tmp_path):
    assert numeric_redeclarations(ROOT) == []
    planted = _tree(tmp_path, {
        "qpf/config.py": "class NumericsConfig:\n    dtype: str = 'float32'\n"
                         "    def v(self):\n        one_of(self, 'dtype', DTYPES)\n",
        "qpf/models/foo.py": "class FooConfig(NumericsConfig):\n    family_name: ClassVar[str]"
                             " = 'foo'\n    dtype: str = 'float32'\n    def __post_init__(self):"
                             "\n        one_of(self, 'matmul_precision', P)\n"
                             "def validate(c):\n    require(ok, c, 'param_dtype', 'a dtype')\n",
        "kernels/__init__.py": "",
        "experiments/__init__.py": "",
    })  # fmt: skip
    assert set(numeric_redeclarations(planted)) == {
        "qpf/models/foo.py:1: FooConfig declares dtype",
        "qpf/models/foo.py:5: checks matmul_precision",
        "qpf/models/foo.py:7: checks param_dtype",
    }


def test_every_config_type_has_its_registered_component():
    import typing

    from qpf import config as cfgs
    from qpf.layers.backbones import BACKBONES
    from qpf.layers.banks import BANKS
    from qpf.layers.coupler import COUPLERS
    from qpf.layers.memory import MEMORIES
    from qpf.layers.ssm import OscillatorySSM

    def types(cls: type) -> set[str]:
        return set(typing.get_args(typing.get_type_hints(cls, vars(cfgs))["type"]))

    assert set(BANKS.names()) == set(cfgs.BANK_CONFIGS)
    assert set(COUPLERS.names()) == types(cfgs.CouplerConfig)
    assert set(MEMORIES.names()) == types(cfgs.MemoryConfig)
    assert set(BACKBONES.names()) == set(cfgs.BACKBONE_CONFIGS)
    assert BACKBONES.get("oscillatory_ssm") is OscillatorySSM


def test_families_are_found_by_the_name_their_config_declares():
    from qpf.config import ConfigError
    from qpf.models.family import ModelFamily
    from qpf.zoo import FAMILIES, family_names, family_of, get_family

    assert sorted(f.name for f in FAMILIES) == list(family_names())
    for family in FAMILIES:
        config = next(iter(family.presets.values())).model
        assert family_of(config) is family is get_family(config.family_name)
    with pytest.raises(ConfigError, match="names no model family"):
        family_of(object())
    with pytest.raises(ConfigError, match="unknown model family 'nope'"):
        get_family("nope")
    qpf = get_family("qpf")
    with pytest.raises(ConfigError, match="family_name is 'qpf'"):  # a config of another family
        ModelFamily("other", qpf.config_cls, qpf.build, qpf.init_state, qpf.presets)
