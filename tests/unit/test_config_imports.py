"""Building and checking a config imports no torch, torchvision, Flower, Ray or numpy, and refuses as before.

Each config is loaded from its file (``load_config``) in a fresh interpreter; the same files loaded here,
where every registry is imported, give the same configs, and the refusals the same words.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from fedtl.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "torchvision", "flwr", "ray", "numpy")

# Loads each file of argv; prints each config (or its refusal) and the heavy modules imported meanwhile.
_CHILD = f"""
import json, sys
from fedtl.config import ConfigError, load_config
results = []
for path in sys.argv[1:]:
    try:
        results.append(load_config(path, resolve_paths=False).to_dict())
    except ConfigError as err:
        results.append(str(err))
print(json.dumps({{"results": results, "heavy": sorted(set({HEAVY!r}) & set(sys.modules))}}))
"""


def _in_a_fresh_interpreter(*paths: Path) -> tuple[list[Any], list[str]]:
    done = subprocess.run([sys.executable, "-c", _CHILD, *map(str, paths)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    return out["results"], out["heavy"]


def _here(path: Path) -> Any:
    """What loading ``path`` gives in this process, as the child prints it."""
    try:
        return json.loads(json.dumps(load_config(path, resolve_paths=False).to_dict()))
    except ConfigError as err:
        return str(err)


def _toml(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def test_configs_build_without_torch_flower_ray_or_numpy(tmp_path: Path) -> None:
    dp_krum = _toml(tmp_path, "dp-krum", 'name = "dp-krum"\nclients = 10\n[strategy]\nname = "krum"\n'
                    'num-malicious-nodes = 1\npersonalisation = "fedper"\n[finetune]\nmode = "bn-only"\n'
                    '[privacy]\nmode = "dp-sgd"\ntarget-epsilon = 3.0\n')
    paths = (ROOT / "experiments" / "digits.toml", dp_krum)
    results, heavy = _in_a_fresh_interpreter(*paths)
    assert heavy == []
    assert results == [_here(p) for p in paths]
    assert results[0]["name"] == "digits" and results[0]["finetune"]["batchnorm"] == "frozen"
    strategy, privacy = results[1]["strategy"], results[1]["privacy"]
    assert (strategy["name"], strategy["num-malicious-nodes"], privacy["mode"]) == ("krum", 1, "dp-sgd")
    assert results[1]["finetune"]["batchnorm"] == "batch"  # "auto" resolved by the mode's own policy (bn-only)


def test_refusals_are_the_same_without_the_registries(tmp_path: Path) -> None:
    from fedtl.models.backbones import BACKBONES
    from fedtl.strategies.registry import STRATEGIES

    paths = (_toml(tmp_path, "vgg", '[model]\nbackbone = "vgg"\n'),
             _toml(tmp_path, "typo", '[strategy]\nname = "fedavgg"\n'),
             _toml(tmp_path, "dp-fedprox", '[strategy]\nname = "fedprox"\n[privacy]\nmode = "dp-sgd"\n'))
    results, heavy = _in_a_fresh_interpreter(*paths)
    assert heavy == []
    assert results == [
        f"config key 'model.backbone' = 'vgg' is not allowed. Allowed: {', '.join(BACKBONES.names())}",
        "config key 'strategy.name' = 'fedavgg' is not allowed. Did you mean 'fedavg', 'qfedavg'? Allowed: "
        f"{', '.join(STRATEGIES.names())}",
        "strategy.name = \"fedprox\" with privacy.mode = \"dp-sgd\": Opacus builds each update from per-sample "
        "gradients of the data loss, so FedProx's proximal term would be silently dropped. Use another strategy "
        "with DP-SGD, or FedProx without it",
    ]
    assert results == [_here(p) for p in paths]
