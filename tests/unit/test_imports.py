"""Every module of the package imports on its own, in a fresh interpreter (no hidden import order, no circle)."""

from __future__ import annotations

import multiprocessing
import pkgutil
import subprocess
import sys

import pytest

import fedtl
from tests.import_check import import_alone

MODULES = sorted(m.name for m in pkgutil.walk_packages(fedtl.__path__, "fedtl."))
# Third-party libraries the fork server imports once, so that each module's own interpreter (forked from
# it, with no fedtl module loaded) pays only for fedtl's code. They are not fedtl: an import order
# between fedtl's modules cannot hide in them.
PRELOAD = ["torch", "torchvision", "numpy", "sklearn.model_selection", "flwr.app", "flwr.serverapp",
           "flwr.clientapp", "flwr.simulation", "matplotlib.figure", "rich.console", "typer", "safetensors.torch"]


def test_the_package_has_the_modules_the_architecture_names() -> None:
    for name in ("fedtl.protocol", "fedtl.run_folder", "fedtl.errors", "fedtl.privacy", "fedtl.personalisation",
                 "fedtl.reports.plots", "fedtl.models.metrics", "fedtl.clients.privacy", "fedtl.strategies.privacy"):
        assert name in MODULES


def test_every_module_imports_on_its_own() -> None:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    # maxtasksperchild=1: every module gets a new process forked from the clean server.
    with ctx.Pool(2, maxtasksperchild=1) as pool:
        results = dict(zip(MODULES, pool.map(import_alone, MODULES, chunksize=1)))
    failed = {m: why for m, why in results.items() if why is not None}
    assert not failed, failed


@pytest.mark.parametrize("module", ["fedtl.protocol", "fedtl.run_folder", "fedtl.errors", "fedtl.config"])
def test_light_modules_import_neither_torch_nor_flower(module: str) -> None:
    code = f"import sys, {module}; print(sorted({{'torch', 'flwr', 'ray'}} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_data_package_imports_alone_in_a_new_interpreter() -> None:
    # The circle the issue measured: `import fedtl.data.sources` alone, with nothing preloaded.
    done = subprocess.run([sys.executable, "-c", "import fedtl.data.sources"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-500:]
