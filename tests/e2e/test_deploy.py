"""A real deployment on this machine: a SuperLink and SuperNodes as separate OS processes, with TLS
and node authentication, every command the README's "Deploy on real machines" gives.

Where the machine allows network namespaces (root, ``ip netns``), each SuperNode runs in its own
namespace behind a veth pair, with a private address: separate hosts on a network, reaching the
SuperLink at the server's address on their link. Elsewhere they share loopback.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from fedtl.reports.runs import read_metrics
from fedtl.simulations.simulate import simulate
from tests.helpers import CACHE, ROOT, lora_shares, make_config

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
NODES = 3
# Common run config: the shared pre-training cache, so that every process loads the same backbone.
BASE = ["rounds=2", f"pretrain.cache-dir='{CACHE}'", "pretrain.epochs=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(host: str, port: int, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}: {log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s: {log.read_text()[-2000:]}")


def _namespaces_allowed() -> str | None:
    """``None`` if this process may make network namespaces, else why not."""
    if os.environ.get("FEDTL_TEST_NO_NETNS"):  # to try the loopback layout on a machine that allows both
        return "FEDTL_TEST_NO_NETNS is set"
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2) on this machine"
    name = f"fedtl-probe-{os.getpid()}"
    done = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, check=False)
    if done.returncode:
        return f"`ip netns add` is refused here: {done.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], check=False)
    return None


@dataclass
class Federation:
    """The processes and files of a running test federation."""

    root: Path
    env: dict[str, str]
    port: int
    links: list[str]  # the SuperLink's address as each node reaches it
    prefixes: list[list[str]]  # how to run a command on each node's "host"
    node_ports: list[int]
    namespaces: list[str]
    why_not_namespaces: str | None
    control_port: int  # the SuperLink's own port, on loopback (the nodes' port is its Fleet gateway)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def fedtl(self, *args: str, timeout: float = 300, prefix: list[str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([*(prefix or []), str(BIN / "fedtl"), *args], capture_output=True, text=True,
                              env=self.env, cwd=ROOT, timeout=timeout, check=False)

    def start(self, name: str, *args: str, prefix: list[str] | None = None) -> subprocess.Popen:
        log = (self.root / f"{name}.log").open("w")
        proc = subprocess.Popen([*(prefix or []), str(BIN / "fedtl"), *args], stdout=log, stderr=subprocess.STDOUT,
                                env=self.env, cwd=ROOT, start_new_session=True)  # its own group: killed whole
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def start_node(self, i: int, data: str, name: str | None = None, *node_config: str) -> subprocess.Popen:
        name = name or f"node{i}"
        extra = [a for item in node_config for a in ("--node-config", item)]
        return self.start(name, "deploy", "supernode", name, "--superlink", self.links[i % len(self.links)],
                          "--data-path", data, "--port", str(self.node_ports[i]), "--certs", str(self.root / "certs"),
                          *extra, prefix=self.prefixes[i % len(self.prefixes)])

    def attempt(self, name: str, cmd: list[str], node: int = 0, timeout: float = 120) -> tuple[int, str]:
        """Run a SuperNode command on node ``node``'s host until it exits: its exit code and output.

        Its output goes to a file, not a pipe: the SuperExec a SuperNode starts outlives it briefly
        and would hold a pipe open."""
        log = self.root / f"{name}.log"
        with log.open("w") as out:
            proc = subprocess.Popen([*self.prefixes[node], *cmd], stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                    cwd=ROOT, start_new_session=True)
            try:
                code = proc.wait(timeout=timeout)
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return code, log.read_text(errors="replace")

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(name)
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _make_hosts(n: int) -> tuple[list[str], list[list[str]], list[str], str | None]:
    """Namespaces ``fedtl<pid>-<i>``, each with a veth pair 10.<k>.<i>.1 (host) <-> .2 (node); or loopback."""
    why_not = _namespaces_allowed()
    if why_not is not None:
        return ["127.0.0.1"] * n, [[] for _ in range(n)], [], why_not
    tag, k = os.getpid() % 10000, 100 + os.getpid() % 100
    links, prefixes, names = [], [], []
    try:
        for i in range(n):
            ns, host_if, node_if = f"fedtl{tag}-{i}", f"ftl{tag}h{i}", f"ftl{tag}n{i}"
            names.append(ns)
            for cmd in (["ip", "netns", "add", ns],
                        ["ip", "link", "add", host_if, "type", "veth", "peer", "name", node_if],
                        ["ip", "link", "set", node_if, "netns", ns],
                        ["ip", "addr", "add", f"10.{k}.{i}.1/24", "dev", host_if],
                        ["ip", "link", "set", host_if, "up"],
                        ["ip", "netns", "exec", ns, "ip", "addr", "add", f"10.{k}.{i}.2/24", "dev", node_if],
                        ["ip", "netns", "exec", ns, "ip", "link", "set", node_if, "up"],
                        ["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"]):
                subprocess.run(cmd, check=True, capture_output=True)
            links.append(f"10.{k}.{i}.1")
            prefixes.append(["ip", "netns", "exec", ns])
    except subprocess.CalledProcessError as err:
        for i, ns in enumerate(names):  # nothing left behind: a veth pair goes with either of its ends
            subprocess.run(["ip", "link", "del", f"ftl{tag}h{i}"], check=False, capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        why = f"`{' '.join(err.cmd)}` failed here: {(err.stderr or b'').decode().strip()}"
        return ["127.0.0.1"] * n, [[] for _ in range(n)], [], why
    return links, prefixes, names, None


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    """A SuperLink (TLS, node auth) and three registered SuperNodes, each with its own data folder;
    a fourth key is registered for a node the kill test starts."""
    root = tmp_path_factory.mktemp("federation")
    env = {**os.environ, "FLWR_HOME": str(root / "flwr-home"), "PYTHONUNBUFFERED": "1",
           "PATH": f"{BIN}:{os.environ['PATH']}"}
    links, prefixes, namespaces, why_not = _make_hosts(NODES + 1)
    port, control_port = _free_port(), _free_port()
    # In its own namespace every node has its own loopback, so all can use Flower's default port.
    fed = Federation(root, env, port, [f"{a}:{port}" for a in links], prefixes,
                     [9094 if namespaces else _free_port() for _ in range(NODES + 1)], namespaces, why_not,
                     control_port)
    try:
        hosts = [a for link in dict.fromkeys(links) if link != "127.0.0.1" for a in ("--host", link)]
        names = [a for i in range(NODES + 1) for a in ("--node", f"node{i}")]
        done = fed.fedtl("deploy", "certs", "--out", str(root / "certs"), *names, *hosts)
        assert done.returncode == 0, done.stdout + done.stderr
        done = fed.fedtl("deploy", "export-data", "--out", str(root / "nodes"), "--set", f"clients={NODES}")
        assert done.returncode == 0, done.stdout + done.stderr
        link = fed.start("superlink", "deploy", "superlink", "--certs", str(root / "certs"),
                         "--host", "0.0.0.0" if namespaces else "127.0.0.1", "--port", str(port),
                         "--control-port", str(control_port))
        _wait_port("127.0.0.1", port, link, root / "superlink.log")
        # flwr run and register reach the SuperLink itself, on this machine's loopback; nodes, the gateway.
        done = fed.fedtl("deploy", "connection", "deploy", "--address", f"127.0.0.1:{control_port}", "--certs",
                         str(root / "certs"))
        assert done.returncode == 0, done.stdout + done.stderr
        done = fed.fedtl("deploy", "register", *(f"node{i}" for i in range(NODES + 1)), "--certs", str(root / "certs"))
        assert done.returncode == 0 and done.stdout.count("registered successfully") == NODES + 1, done.stdout + done.stderr
        for i in range(NODES):
            fed.start_node(i, str(root / "nodes" / f"node-{i}"))
        yield fed
    finally:
        for name in list(fed.procs):
            fed.stop(name)
        for ns in namespaces:
            subprocess.run(["ip", "netns", "del", ns], check=False)  # takes its veth pair with it


def _sets(*sets: str) -> list[str]:
    return [a for s in [*BASE, *sets] for a in ("--set", s)]


def test_a_deployment_with_tls_and_node_auth_matches_the_simulation(federation: Federation, tmp_path: Path) -> None:
    """Three SuperNodes on their own data folders train as the simulation of the same partitions does."""
    done = federation.fedtl("deploy", "run", "--connection", "deploy", "--out", str(tmp_path / "deployed"),
                            *_sets(f"clients={NODES}", f"strategy.min-available-nodes={NODES}"), timeout=400)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    rows = read_metrics(tmp_path / "deployed")
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all((r["clients_ok"], r["clients_failed"]) == (NODES, 0) for r in rows[1:])
    simulated = simulate(make_config("rounds=2", f"clients={NODES}", f"strategy.min-available-nodes={NODES}",
                                     f"out={str(tmp_path / 'simulated')!r}"))
    sim = read_metrics(tmp_path / "simulated")
    # Same partitions, same seeds; the nodes read them back from 8-bit PNGs and in another order.
    assert abs(rows[-1]["accuracy"] - simulated["final_accuracy"]) <= 0.03, (rows, sim)
    assert rows[0]["accuracy"] == pytest.approx(sim[0]["accuracy"])  # the same pre-trained model and head
    summary = json.loads((tmp_path / "deployed" / "summary.json").read_text())
    assert len(summary["per_client"]["accuracy"]) == NODES  # every good node's own test images
    assert summary["backbone_fingerprint"] == simulated["backbone_fingerprint"]
    # A ServerApp that raises (weights missing on the SuperLink's machine, which only it reads): flwr run
    # --stream exits 0 after it; fedtl deploy run reads the run's status and fails, saying so.
    done = federation.fedtl("deploy", "run", "--connection", "deploy", "--out", str(tmp_path / "failed"),
                            *_sets(f"clients={NODES}", "model.weights-path='/nowhere/backbone.safetensors'"), timeout=200)
    assert done.returncode == 1, (done.stdout + done.stderr)[-4000:]
    assert "ended finished:failed" in done.stdout and "/nowhere/backbone.safetensors" in done.stdout, done.stdout[-3000:]


def test_unregistered_key_and_wrong_certificate_are_rejected(federation: Federation) -> None:
    root = federation.root
    assert federation.fedtl("deploy", "certs", "--out", str(root / "other"), "--node", "stranger").returncode == 0
    link = federation.links[0]
    base = ["--superlink", link, "--port", str(_free_port()), "--node-config", "partition-id=0",
            "--node-config", f"num-partitions={NODES}"]
    stranger = federation.fedtl("deploy", "supernode", "stranger", *base, "--certs", str(root / "other"),
                                "--dry-run")
    # The stranger trusts the right CA but holds a key the SuperLink never registered.
    cmd = shlex.split(stranger.stdout.strip().splitlines()[-1])
    cmd[cmd.index("--root-certificates") + 1] = str(root / "certs" / "ca.crt")
    code, output = federation.attempt("stranger", [str(BIN / cmd[0]), *cmd[1:]])
    assert code != 0 and "Failed to activate SuperNode" in output, output[-2000:]
    # A registered key, but a CA that did not sign the SuperLink's certificate.
    wrong = federation.fedtl("deploy", "supernode", "node0", *base, "--certs", str(root / "certs"), "--dry-run")
    cmd = shlex.split(wrong.stdout.strip().splitlines()[-1])
    cmd[cmd.index("--root-certificates") + 1] = str(root / "other" / "ca.crt")
    code, output = federation.attempt("wrong-ca", [str(BIN / cmd[0]), *cmd[1:]])
    assert code != 0 and "CERTIFICATE_VERIFY_FAILED" in output, output[-2000:]


def _node_ids(listing: str) -> set[str]:
    return set(re.findall(r"\b\d{6,}\b", listing))


def test_an_outsider_holding_the_ca_is_refused_the_control_api(federation: Federation, tmp_path: Path) -> None:
    """The audit's outsider, replayed: from a node's network, holding only the public ``ca.crt``, it
    tried to register a key of its own, list the nodes and unregister node0 through the port the
    nodes use (Flower 1.42 serves its Control API there, with no account authentication; each
    call succeeded). Through fedtl's gateway each is refused, and the federation is unchanged."""
    inside = subprocess.run([str(BIN / "flwr"), "supernode", "list", "deploy"], capture_output=True, text=True,
                            env=federation.env, timeout=60, check=False)
    before = _node_ids(inside.stdout)
    assert inside.returncode == 0 and len(before) == NODES + 1, inside.stdout + inside.stderr
    mine = tmp_path / "outsider"
    assert federation.fedtl("deploy", "certs", "--out", str(mine / "keys"), "--node", "outsider").returncode == 0
    (mine / "public").mkdir()
    shutil.copy(federation.root / "certs" / "ca.crt", mine / "public" / "ca.crt")  # all it holds of the federation
    env = {**federation.env, "FLWR_HOME": str(mine / "flwr-home")}
    saved = subprocess.run([str(BIN / "fedtl"), "deploy", "connection", "there", "--address", federation.links[0],
                            "--certs", str(mine / "public")], capture_output=True, text=True, env=env, timeout=60,
                           check=False)
    assert saved.returncode == 0, saved.stdout + saved.stderr
    for call in (["register", str(mine / "keys" / "nodes" / "outsider.pub"), "there"], ["list", "there"],
                 ["unregister", sorted(before)[0], "there"]):
        done = subprocess.run([*federation.prefixes[0], str(BIN / "flwr"), "supernode", *call], capture_output=True,
                              text=True, env=env, timeout=60, check=False)
        assert done.returncode != 0 and "404 Not Found" in done.stdout + done.stderr, (call, done.stdout[-2000:])
    after = subprocess.run([str(BIN / "flwr"), "supernode", "list", "deploy"], capture_output=True, text=True,
                           env=federation.env, timeout=60, check=False)
    assert _node_ids(after.stdout) == before  # nothing registered, nothing unregistered
    # What else the SuperLink serves on its port is not there either, and a body is bounded.
    base = f"https://{federation.links[0]}"
    with httpx.Client(verify=ssl.create_default_context(cafile=mine / "public" / "ca.crt"), timeout=30) as web:
        assert web.post(f"{base}/v1/control/list-nodes", content=b"").status_code == 404
        assert web.post(f"{base}/v1/runtime/pull-messages", content=b"").status_code == 404
        assert web.get(f"{base}/docs").status_code == 404
        unsigned = web.post(f"{base}/v1/fleet/get-run", content=b"", headers={"content-type": "application/protobuf"})
        assert unsigned.status_code == 401  # the Fleet API itself: the SuperLink's node authentication
        assert web.post(f"{base}/v1/fleet/push-object", content=b"\0" * (17 * 2**20)).status_code == 413
    if federation.namespaces:  # the SuperLink's own port is on the server's loopback: no node's host reaches it
        host = federation.links[0].rsplit(":", 1)[0]
        probe = f"import socket; print(socket.socket().connect_ex(({host!r}, {federation.control_port})))"
        there = subprocess.run([*federation.prefixes[0], sys.executable, "-c", probe], capture_output=True, text=True,
                               check=True).stdout
        assert there.strip() != "0"


def test_nodes_are_separate_hosts(federation: Federation) -> None:
    """Each SuperNode has a host of its own: its own address and loopback, and the gateway saw it
    connect from that address."""
    if not federation.namespaces:
        pytest.skip(f"SuperNodes share loopback here: {federation.why_not_namespaces}")
    subnets = [link.rsplit(".", 1)[0] for link in federation.links[:NODES]]
    own = subprocess.run([*federation.prefixes[0], "ip", "-4", "-o", "addr"], capture_output=True, text=True,
                         check=True).stdout
    assert f"{subnets[0]}.2/" in own and all(s + "." not in own for s in subnets[1:])
    probe = ("import socket; s = socket.socket(); s.settimeout(2); "
             f"print(s.connect_ex(('127.0.0.1', {federation.port})))")
    here = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    there = subprocess.run([*federation.prefixes[0], sys.executable, "-c", probe], capture_output=True, text=True,
                           check=True).stdout
    assert here.strip() == "0" and there.strip() != "0"  # the SuperLink is on this host's loopback, not node 0's
    seen = federation.log("superlink")
    # The gateway's access log, in fedtl deploy superlink's output: each node's requests from its own address.
    for s in subnets:
        assert f"{s}.2:" in seen, s


def test_hetlora_nodes_train_at_the_ranks_their_owners_set(federation: Federation, tmp_path: Path) -> None:
    """node0's owner sets lora-rank 2 and node1's 4 in their node configs; node2 keeps the server's 8. Each is
    sent, and replies, only its share of the adapters (the round's bytes are the three shares). Before the kill
    test, which leaves node2 down."""
    sets = ["finetune.mode=lora", "finetune.adapter-blocks=2", "strategy.lora-merge=hetlora", "finetune.lora-rank=8",
            "finetune.lora-alpha=16"]
    nodes = {i: str(federation.root / "nodes" / f"node-{i}") for i in (0, 1)}
    for i, rank in ((0, 2), (1, 4)):
        federation.stop(f"node{i}")
        federation.start_node(i, nodes[i], f"node{i}", f"lora-rank={rank}")
    try:
        done = federation.fedtl("deploy", "run", "--connection", "deploy", "--out", str(tmp_path / "run"),
                                *_sets("rounds=1", f"clients={NODES}", f"strategy.min-available-nodes={NODES}", *sets),
                                timeout=300)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        (row,) = read_metrics(tmp_path / "run")[1:]
        shares = lora_shares(make_config(*sets), (2, 4, 8))
        assert row["clients_ok"] == NODES and row["bytes_up"] == row["bytes_down"] == shares, row
        assert row["lora_merge_error"] > 0.05  # the ranks' zero-padding, as in simulation
    finally:
        for i in (0, 1):
            federation.stop(f"node{i}")
            federation.start_node(i, nodes[i])


def test_a_capped_supernode_declines_what_its_accountant_cannot_count(federation: Federation,
                                                                     tmp_path: Path) -> None:
    """A real SuperNode whose owner caps its DP-SGD spend (state-dir, max-epsilon) in a run without DP that
    starts with FedNCM's head start: its privacy gate declines the head-start query (exact class sums) and the
    training (un-noised), spends nothing, and still evaluates the final model on its test split. The run goes
    on with the other nodes, and records both declines."""
    state = tmp_path / "node0-state"
    node0 = str(federation.root / "nodes" / "node-0")
    federation.stop("node0")
    federation.start_node(0, node0, "node0", f"state-dir='{state}'", "max-epsilon=8")
    try:
        done = federation.fedtl("deploy", "run", "--connection", "deploy", "--out", str(tmp_path / "run"),
                                *_sets("rounds=1", f"clients={NODES}", f"strategy.min-available-nodes={NODES}",
                                       "finetune.head-init=ncm"), timeout=300)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        head, trained = read_metrics(tmp_path / "run")
        assert (head["clients_ok"], head["clients_declined"]) == (NODES - 1, 1), head
        assert (trained["clients_ok"], trained["clients_declined"], trained["clients_failed"]) == (NODES - 1, 1, 0)
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())
        assert len(summary["per_client"]["ids"]) == NODES  # plain evaluation is within 'accounted'
        assert not state.exists() or list(state.iterdir()) == []  # nothing spent
    finally:
        federation.stop("node0")
        federation.start_node(0, node0)


def test_a_node_killed_mid_round_without_its_data_or_past_its_own_budget_fails_alone(
        federation: Federation, tmp_path: Path) -> None:
    """One DP-SGD round on real SuperNodes, three of them failing each their own way: node2 is SIGKILLed while
    it trains, node3's data-path does not exist, and node0 is restarted with its own lifetime budget (between
    one round's epsilon on its data and two rounds') and a state folder holding an earlier run's round, in a
    run whose config sets no budget. The round ends at its timeout with node1 merged; its line records both
    failures, the second with its node and path named; node0 declines and spends nothing; the ledger charges
    node2 the round it may have trained and marks node3's spend unknown. (A node's budget over its whole
    cycle, run after run: tests/unit/test_dp_sgd.py.)"""
    from fedtl.accounting import poisson_schedule, sample_epsilon
    from fedtl.clients.spend import LOCK_FILE, node_epsilon

    def schedule(node: int) -> tuple[float, int]:
        data = federation.root / "nodes" / f"node-{node}" / "train"
        return poisson_schedule(sum(1 for f in data.rglob("*") if f.is_file()), 16)

    q, per_epoch = schedule(0)
    one, two = (node_epsilon([(1.0, q, r * per_epoch)], 1e-5) for r in (1, 2))  # the node's own figure
    state = tmp_path / "node0-state"
    state.mkdir()
    # What a run the node joined before left there (its own file format): one round's steps.
    (state / "run-1-privacy.json").write_text(json.dumps({"noise_multiplier": 1.0, "sample_rate": q,
                                                          "history": [[1.0, q, per_epoch]]}))
    node0 = str(federation.root / "nodes" / "node-0")
    federation.stop("node0")
    federation.start_node(0, node0, "node0", f"state-dir='{state}'", f"max-epsilon={(one + two) / 2}")
    federation.start_node(NODES, str(federation.root / "nodes" / "missing"))  # a registered node, its data elsewhere
    try:
        before = federation.log("node2").count("Receiving: train message")
        run = federation.start("kill-run", "deploy", "run", "--connection", "deploy", "--out", str(tmp_path / "run"),
                               *_sets("rounds=1", f"clients={NODES + 1}", f"strategy.min-available-nodes={NODES + 1}",
                                      "strategy.round-timeout=35", "privacy.mode=dp-sgd", "noise-multiplier=1.0",
                                      "finetune.batch-size=16", "local-epochs=1"))
        end = time.monotonic() + 240
        while federation.log("node2").count("Receiving: train message") == before:
            assert time.monotonic() < end and run.poll() is None, federation.log("kill-run")[-3000:]
            time.sleep(0.2)
        # Mid-round: the ClientApp it starts for the message needs seconds to import torch and fedtl, so
        # this comes long before any reply could.
        federation.stop("node2", signal.SIGKILL)  # the SuperNode and the ClientApp it started
        assert run.wait(timeout=300) == 0, federation.log("kill-run")[-4000:]
        federation.procs.pop("kill-run")
        rows = read_metrics(tmp_path / "run")
        assert (rows[1]["clients_ok"], rows[1]["clients_failed"], rows[1]["clients_declined"]) == (1, 2, 1), rows[1]
        # Silent until the round timeout, or, if its missed heartbeats run out first, Flower's own error reply.
        def killed(e: str) -> bool:
            return "no reply within the round timeout" in e or "Node Unavailable" in e

        silent, broken = sorted(rows[1]["client_errors"], key=killed)[::-1]
        assert killed(silent), rows[1]["client_errors"]
        assert str(federation.root / "nodes" / "missing") in broken and "does not exist on this node" in broken
        assert broken.startswith("node ") and "--node-config" in broken  # which node, and the fix
        assert (tmp_path / "run" / "summary.json").is_file()

        ledger = {r["node_id"]: r for r in map(json.loads, (tmp_path / "run" / "privacy.jsonl").read_text().splitlines())}
        node2, node3 = (int(e.split(":")[0].removeprefix("node ")) for e in (silent, broken))
        assert [r["declined"] for r in ledger.values()].count(True) == 1  # node0: past its own budget
        q2, steps2 = schedule(2)
        assert ledger[node2]["unanswered"] and ledger[node2]["steps"] == steps2  # it may have trained: charged
        assert ledger[node2]["epsilon"] == pytest.approx(sample_epsilon([(1.0, q2, steps2)], accountant="rdp",
                                                                        delta=1e-5))
        assert ledger[node3]["epsilon"] is None  # no count, no report: unknown, and the summary says so
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())
        assert summary["privacy"]["clients_spend_unknown"] == [f"node-{node3}"]
        # node0 spent nothing in this run (beside the earlier run's file: the lock its check took)
        assert sorted(f.name for f in state.iterdir()) == [LOCK_FILE, "run-1-privacy.json"]
    finally:
        federation.stop("node0")
        federation.start_node(0, node0)
