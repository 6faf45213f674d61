"""The data flow is the layout: load -> attribute -> circuit -> evaluate -> render -> pipeline -> cli.
Each module imports only from its own layer or lower ones (imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "feature_circuits"

#: layer of each module (longest matching prefix wins)
LAYERS = {
    "feature_circuits.types": 0,
    "feature_circuits.errors": 0,
    "feature_circuits.metrics": 0,
    "feature_circuits.outputs": 0,  # output directories, atomic writes
    "feature_circuits.runtime": 0,  # threads and seeds
    "feature_circuits.toy": 0,  # the shipped files' paths (toy/__init__.py)
    "feature_circuits.progress": 0,  # progress bars
    "feature_circuits.dictionary_info": 0,  # what was spliced at a site (loaders and circuit.json)
    "feature_circuits.distributed": 0,  # torch.distributed: ranks, sharding, gathering
    "feature_circuits.model": 1,
    "feature_circuits.dictionaries": 1,
    "feature_circuits.data": 1,
    "feature_circuits.tasks": 1,  # the shipped tasks built for any tokenizer (beside data)
    "feature_circuits.attribution": 2,
    "feature_circuits.toy.datasets": 2,  # how the toy was made uses the loaders
    "feature_circuits.toy.grammar": 0,
    "feature_circuits.toy.train_model": 2,
    "feature_circuits.toy.train_saes": 2,
    "feature_circuits.memory": 2,  # memory estimate and --batch-size auto (of a loaded model and its SAEs)
    "feature_circuits.circuit": 3,
    "feature_circuits.evaluation": 4,
    "feature_circuits.render": 5,
    "feature_circuits.pipeline": 6,
    "feature_circuits.cli": 7,
    "feature_circuits.__main__": 7,
    "feature_circuits": 8,  # the lazy top-level API
}


def layer_of(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, module: str) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names] if target == "feature_circuits" else [target]
            found += [(node.lineno, n) for n in names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return [(line, n) for line, n in found if n == "feature_circuits" or n.startswith("feature_circuits.")]


def test_no_module_imports_a_higher_layer():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        module = module_name(path)
        own = layer_of(module)
        for line, target in imports(path, module):
            if layer_of(target) > own:
                bad.append(f"{path.relative_to(PKG.parent)}:{line}: {module} (layer {own}) imports {target}")
    assert not bad, "\n".join(bad)


def test_the_check_sees_imports():
    found = imports(PKG / "pipeline.py", "feature_circuits.pipeline")
    assert any(t.startswith("feature_circuits.circuit") for _, t in found)
    assert layer_of("feature_circuits.cli") > layer_of("feature_circuits.circuit.schema")
