"""The strategy wrappers one by one: each checks its own arguments; the round loop; the house rules they keep."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.app import Message as FlowerMessage

import fedtl
from fedtl.server.rounds import run_rounds
from fedtl.strategies.evaluation import FinalEvaluation
from fedtl.strategies.merge import StatisticsByMean
from fedtl.strategies.registry import build_strategy
from fedtl.strategies.reply_gate import ReplyGate
from fedtl.strategies.roster import Roster
from fedtl.strategies.sampling import NodeSampling
from fedtl.strategies.transfer import Records, Sampling, transfer_strategy
from fedtl.strategies.travelling import TravellingKeys
from fedtl.strategies.wrapper import StrategyWrapper
from tests.helpers import INITIAL, TRAVEL, StaticGrid, keys_of, make_config, plan

PACKAGE = Path(fedtl.__file__).parent


@pytest.fixture
def fedavg():  # noqa: ANN201
    return build_strategy(make_config("clients=3"))


@pytest.mark.parametrize(("build", "problem"), [
    (lambda s: StrategyWrapper("fedavg"), "wraps a Flower Strategy, got str"),
    (lambda s: NodeSampling(s, roster=Roster(), min_nodes=0), "min_nodes must be at least 1"),
    (lambda s: ReplyGate(s, roster=Roster(), exchanges={}, max_examples=0), "max_examples must be positive"),
    (lambda s: ReplyGate(s, roster=Roster(), exchanges={}, max_update_ratio=-1.0), "max_update_ratio must be 0"),
    (lambda s: TravellingKeys(s, plan=plan, keys_of=keys_of, initial_state=INITIAL, fingerprint=""),
     "fingerprint must name the backbone"),
    (lambda s: FinalEvaluation(s, final_round=0), "final_round must be a round"),
    (lambda s: StatisticsByMean(s, weight_key=""), "weight_key must name the reply metric"),
])
def test_each_wrapper_refuses_arguments_it_cannot_honour(fedavg, build, problem: str) -> None:  # noqa: ANN001
    with pytest.raises((TypeError, ValueError), match=problem):
        build(fedavg)


class ReplyingGrid(StaticGrid):
    """Nodes that train by adding 1 to every tensor they are sent, and evaluate to accuracy 0.5."""

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
        out = []
        for m in messages:
            if m.metadata.message_type == "train":
                arrays = ArrayRecord({k: torch.from_numpy(a.numpy() + 1) for k, a in m.content["arrays"].items()})
                content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 5})})
            else:
                content = RecordDict({"metrics": MetricRecord({"accuracy": 0.5})})
            out.append(FlowerMessage(content=content, reply_to=m))
        return out


@pytest.mark.parametrize(("rounds", "evaluated"), [(range(1, 3), [0, 1, 2]), (range(3, 5), [3, 4])])
def test_the_round_loop_runs_from_any_first_round(task_identity: None, fedavg, rounds: range,  # noqa: ANN001
                                                  evaluated: list[int]) -> None:
    # A resumed run starts after its checkpoint's round: its round 0 was evaluated long ago.
    reports, evaluations, ended = [], [], []
    clients: list[tuple[int, int]] = []
    s = transfer_strategy(fedavg, TRAVEL, records=Records(
        observer=reports.append, final_round=rounds.stop - 1,
        on_evaluate=lambda rnd, cs, sample: clients.append((rnd, len(cs)))))
    start = ArrayRecord({k: INITIAL[k] for k in keys_of(plan(rounds.start).lrs)})
    final = run_rounds(s, ReplyingGrid([1, 2, 3]), start, rounds=rounds, timeout=5,
                       evaluate=lambda rnd, arrays: evaluations.append(rnd),
                       after_round=lambda rnd, arrays: ended.append(rnd))
    assert evaluations == evaluated and ended == list(rounds)
    assert [r.round for r in reports] == list(rounds) and all(r.totals["clients_ok"] == 3 for r in reports)
    assert [c for c in clients if c[1]] == [(rounds.stop - 1, 3)]  # every node evaluates once, after the last round
    np.testing.assert_array_equal(final["head.b"].numpy(), np.full(2, float(len(rounds))))  # +1 a round, merged


# -- the house rules the issue of the server's rooms set (a test, so that they stay) ---------------

def _lines(node: ast.AST) -> int:
    return node.end_lineno - node.lineno + 1  # type: ignore[attr-defined]


def test_no_module_is_longer_than_one_sitting() -> None:
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 350}
    assert not long, f"split these modules (at most 350 lines each): {long}"


def test_strategy_wrappers_are_small_with_few_arguments() -> None:
    wrappers = {}
    for path in (PACKAGE / "strategies").glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and any(getattr(b, "id", "") == "StrategyWrapper" for b in node.bases):
                init = next(f for f in node.body if isinstance(f, ast.FunctionDef) and f.name == "__init__")
                wrappers[node.name] = (_lines(node), len(init.args.args) - 1 + len(init.args.kwonlyargs))
    assert len(wrappers) >= 8, wrappers  # every wrapper the composition uses is seen
    too_big = {name: size for name, size in wrappers.items() if size[0] > 200 or size[1] > 6}
    assert not too_big, f"(lines, constructor arguments) over 200 / 6: {too_big}"


def test_the_server_app_reads_top_to_bottom() -> None:
    tree = ast.parse((PACKAGE / "server" / "app.py").read_text())
    run_server = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run_server")
    assert _lines(run_server) < 50


class CountingGrid(StaticGrid):
    """A population whose nodes answer the query (ids >= ``held_from`` are held out); records who was asked."""

    def __init__(self, nodes: list[int], held_from: int) -> None:
        super().__init__(nodes)
        self.held_from, self.asked = held_from, []

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
        self.asked += [m.metadata.dst_node_id for m in messages]
        return [FlowerMessage(RecordDict({"metrics": MetricRecord(
            {"held-out": int(m.metadata.dst_node_id >= self.held_from), "num-examples": 5})}), reply_to=m)
            for m in messages]


def _sampled_rounds(seed: int, rounds: int = 5) -> tuple[list[list[int]], CountingGrid]:
    import random

    random.seed(seed)
    grid = CountingGrid(list(range(1, 1001)), held_from=501)  # half the population never trains
    cfg = make_config("clients=1000", "data.held-out-clients=500", "strategy.fraction-train=0.01")
    s = transfer_strategy(build_strategy(cfg), TRAVEL, roster=Roster(timeout=5),
                          sampling=Sampling(most=cfg.sampled_clients))
    head = ArrayRecord({k: INITIAL[k] for k in keys_of(["head"])})
    out = []
    for _ in range(rounds):
        sent = list(s.configure_train(1, head, ConfigRecord(), grid))
        out.append(sorted(m.metadata.dst_node_id for m in sent))
        s.aggregate_train(1, [FlowerMessage(RecordDict({
            "arrays": ArrayRecord({k: torch.from_numpy(a.numpy()) for k, a in m.content["arrays"].items()}),
            "metrics": MetricRecord({"num-examples": 5})}), reply_to=m) for m in sent])
    return out, grid


def test_a_round_asks_only_the_nodes_it_samples_each_once(task_identity: None) -> None:
    rounds, grid = _sampled_rounds(seed=0)
    # Each round trains 5 nodes (1 % of the 500 that train), none held out, though its strategy samples 1 % of
    # every node (10) ...
    assert all(len(r) == 5 and max(r) <= 500 for r in rounds)
    # ... and only sampled nodes (and the replacements of held-out ones) were asked, each once.
    assert len(grid.asked) == len(set(grid.asked)) < 100
    assert {n for r in rounds for n in r} <= set(grid.asked)
    assert _sampled_rounds(seed=0)[0] == rounds  # the server's seed decides who trains, replacements included
    assert _sampled_rounds(seed=1)[0] != rounds


def _final_evaluation(nodes: int, sample: int, seed: int) -> tuple[list[int], tuple[int, int]]:
    s = FinalEvaluation(build_strategy(make_config("clients=3")), final_round=1, sample=sample, seed=seed)
    asked = [m.metadata.dst_node_id for m in s.configure_evaluate(1, ArrayRecord(), ConfigRecord(),
                                                                  StaticGrid(list(range(100, 100 + nodes))))]
    return asked, s.asked


def test_the_final_evaluation_asks_every_node_of_a_small_population_and_a_seeded_sample_of_a_large_one(
        task_identity: None) -> None:
    assert _final_evaluation(50, sample=100, seed=0) == (list(range(100, 150)), (50, 50))
    asked, sample = _final_evaluation(5000, sample=100, seed=0)
    assert sample == (100, 5000) and len(set(asked)) == 100
    assert _final_evaluation(5000, sample=100, seed=0)[0] == asked  # the seed decides, as it decides training
    assert _final_evaluation(5000, sample=100, seed=1)[0] != asked
    assert _final_evaluation(5000, sample=0, seed=0)[1] == (5000, 5000)  # 0: every node
