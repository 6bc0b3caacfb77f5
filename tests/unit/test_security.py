"""Nothing fedtl ships unpickles what it reads: a scan of the source for the calls that would."""

from __future__ import annotations

import ast

import pytest

from tests.helpers import ROOT

UNPICKLERS = {"pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}
SCANNED = ("fedtl", "benchmarks")


def unsafe_loads(source: str, name: str = "<source>") -> list[str]:
    """Every call in ``source`` that could unpickle data: ``<unpickler>.load(s)``, ``Unpickler``,
    ``allow_pickle=True``, ``weights_only=False`` and ``torch.load`` without ``weights_only=True``."""
    found = []
    for node in ast.walk(ast.parse(source, name)):
        if not isinstance(node, ast.Call):
            continue
        where = f"{name}:{node.lineno}"
        func = node.func
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else None
        attr = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if owner in UNPICKLERS and attr in ("load", "loads", "Unpickler", "open"):
            found.append(f"{where}: {owner}.{attr}")
        keywords = {k.arg: k.value for k in node.keywords}
        for key, unsafe in (("allow_pickle", True), ("weights_only", False)):
            value = keywords.get(key)
            if isinstance(value, ast.Constant) and value.value is unsafe:
                found.append(f"{where}: {key}={unsafe}")
        if owner == "torch" and attr == "load":
            value = keywords.get("weights_only")
            if not (isinstance(value, ast.Constant) and value.value is True):
                found.append(f"{where}: torch.load without weights_only=True")
    return found


@pytest.mark.parametrize("line", [
    "pickle.load(f)", "pickle.loads(data)", "cloudpickle.loads(b)", "np.load(p, allow_pickle=True)",
    "torch.load(p)", "torch.load(p, weights_only=False)", "joblib.load(p)",
])
def test_the_scan_finds_each_unsafe_call(line: str) -> None:
    assert unsafe_loads(line)


def test_nothing_shipped_unpickles_what_it_reads() -> None:
    files = [p for folder in SCANNED for p in sorted((ROOT / folder).rglob("*.py"))]
    assert len(files) > 50
    found = [hit for p in files for hit in unsafe_loads(p.read_text(), str(p.relative_to(ROOT)))]
    assert found == [], "\n".join(found)
    assert unsafe_loads("torch.load(p, map_location='cpu', weights_only=True)\nnp.load(p, allow_pickle=False)") == []
