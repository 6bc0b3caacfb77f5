"""fedtl's Ray backend for Flower's simulation runtime: a dead or hung client process is replaced, and
the actor pool can outlive a run.

**Failures.** Flower 1.42's ``RayBackend`` puts an actor back into its pool even when its process
died (``os._exit``, an OOM kill, a segfault): every later message sent to it fails at once, so
honest nodes get the blame in the rounds after. And a client that never returns holds its worker
thread in ``ray.get`` for ever: the round times out on the server, but the simulation cannot end
(its thread pool waits for that thread), and the process, with Ray's, stays up. Here a message has
``limit_s`` (the round timeout) to come back: an actor that died or overran is killed and replaced by
a fresh one, and the node's reply is an error that names what happened. The node is sampled again in
later rounds (a retry); the round's record says which node failed and why.

**Node state.** Each node's ``context.state`` lives here, in the driver: after every message the
backend hands the node's new state to ``node_state.NodeStates``, which writes it to the run folder,
and a resumed run's nodes get theirs back before their first message (see that module).

**Kept warm.** Inside ``runtime.kept_warm()`` the pool survives between runs (see that module).

**The ClientApp once per actor.** Flower sends the ClientApp with every message, cloudpickled by Ray
(2.5 ms of the driver's time per trained client on a small CNN, under the GIL the rounds' other work
needs); here it is put in Ray's object store once a run, each message carries only its reference
(``SharedApp``), and each actor process builds it once.

Flower has no option for any of these, hence the subclass; it is swapped in for ``RayBackend`` only while
``fedtl_backend()`` is entered (Flower looks the class up when a simulation starts), with the engine's feeder
(``fedtl.simulations.feeder``: one scan of the pending instructions a tick, not one per node).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedtl.simulations.node_state import NodeStates

# The Ray a simulation starts on this machine (a cluster's own are its own): a message and its reply of up to 4 MiB
# travel inside the task's call, as Ray passes arguments under 100 KiB, rather than through the object store.
# A small CNN's messages are just over 100 KiB: each went through the raylet twice (put, then get), and the raylet
# used about half a core (of 2) at 50 clients a round; a round's wall time fell by a third without it.
LOCAL_RAY_SETTINGS = {"max_direct_call_object_size": 4 * 2**20}

# The pool kept between runs (runtime.kept_warm): {"on": True} while kept, "pool" and "resources" once built,
# "address": the simulation.ray-address the kept Ray was joined at (None: this machine's own).
WARM: dict[str, Any] = {}


# In an actor process: the ClientApps of the runs it served, by object-store reference (a kept pool serves many).
_APPS: dict[str, Any] = {}


class SharedApp:
    """A run's ClientApp factory as its messages carry it: a reference to it in Ray's object store (small to
    pickle), loaded once per actor process and called once there (the ClientApp is reused for its messages)."""

    def __init__(self, ref: Any) -> None:
        self.ref = ref

    def __call__(self) -> Any:
        key = self.ref.hex()
        if key not in _APPS:
            import ray

            while len(_APPS) >= 4:  # a pool kept warm for many runs: only the latest runs' apps
                _APPS.pop(next(iter(_APPS)))
            _APPS[key] = ray.get(self.ref)()
        return _APPS[key]


class ClientProcessError(RuntimeError):
    """A virtual client's process died or overran its time: it was replaced; the node's reply is this error."""


def _backend_class(limit_s: float, states: NodeStates | None) -> type:
    import ray
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    from fedtl.protocol import PARTITION_ID

    class FedtlRayBackend(RayBackend):  # type: ignore[misc]
        """Flower's Ray backend with dead and hung actors replaced, and the pool optionally kept warm."""

        def init_ray(self, backend_config: Any) -> None:
            # Flower starts Ray only where none is up: a Ray kept warm for an earlier run (this machine's, or
            # another cluster's) would silently take a run that names another simulation.ray-address.
            address = (backend_config.get(self.init_args_key) or {}).get("address")
            if WARM.get("on") and ray.is_initialized() and WARM.get("address") != address:
                release()
            super().init_ray(backend_config)
            if WARM.get("on"):
                WARM["address"] = address

        def build(self, app_fn: Any) -> None:
            self._lock = threading.Lock()
            pool = WARM.get("pool")
            shared = SharedApp(ray.put(app_fn))
            if WARM.get("on") and pool is not None and WARM.get("resources") == self.client_resources:
                self.pool, self.app_fn = pool, shared
                return
            drop_pool()
            super().build(shared)
            if WARM.get("on"):
                WARM.update(pool=self.pool, resources=dict(self.client_resources))

        def process_message(self, message: Any, context: Any) -> tuple[Any, Any]:
            if self.pool is None or self.app_fn is None:
                return super().process_message(message, context)  # Flower's own errors
            ran_on: list[Any] = []

            def run_on(actor: Any, app_fn: Any, msg: Any, cid: str, state: Any) -> Any:
                ran_on.append(actor)
                return actor.run.remote(app_fn, msg, cid, state)

            partition = str(context.node_config[PARTITION_ID])
            if states is not None:
                states.restore(context)
            future = self.pool.submit(run_on, (self.app_fn, message, partition, context))
            ready, _ = ray.wait([future], timeout=limit_s)
            if not ready:
                self._replace(future, ran_on[0])
                raise ClientProcessError(f"the client of partition {partition} ran past the round timeout "
                                         f"({limit_s:g} s): its process was ended and replaced")
            try:
                reply, updated = self.pool.fetch_result_and_return_actor_to_pool(future)
            except ray.exceptions.RayActorError as err:
                self._replace(future, ran_on[0])
                raise ClientProcessError(f"the client process of partition {partition} died "
                                         f"({type(err).__name__}); it was replaced") from None
            except Exception:
                self.pool.add_actor_back_to_pool(future)
                raise
            if states is not None:
                states.keep(message, updated)
            return reply, updated

        def _replace(self, future: Any, actor: Any) -> None:
            with self._lock:
                self.pool.add_actor_back_to_pool(future)  # the pool's own bookkeeping; then it is taken out
                self.pool.pool.remove(actor)
                ray.kill(actor, no_restart=True)
                self.pool.pool.append(self.pool.create_actor_fn())

        def terminate(self) -> None:
            pool = self.pool
            # Kept only if every actor is back, idle: a run that failed mid-round leaves its actors behind.
            if WARM.get("on") and pool is not None and WARM.get("pool") is pool and len(pool.pool) == pool.num_actors:
                return
            if WARM.get("pool") is pool:
                drop_pool()
            elif pool is not None:
                pool.terminate_all_actors()
            if not WARM.get("on"):
                ray.shutdown()

    return FedtlRayBackend


def drop_pool() -> None:
    """End the kept pool's actors, if there is one."""
    pool = WARM.pop("pool", None)
    WARM.pop("resources", None)
    if pool is not None:
        pool.terminate_all_actors()


def release() -> None:
    """End the kept actors and Ray now; inside ``runtime.kept_warm()`` the next run starts them again."""
    import ray

    WARM.pop("address", None)
    drop_pool()
    if ray.is_initialized():
        ray.shutdown()


@contextmanager
def fedtl_backend(limit_s: float, states: NodeStates | None = None) -> Iterator[None]:
    """Flower's simulations started inside run on ``FedtlRayBackend`` (see the module); a message has
    ``limit_s`` seconds to come back; ``states``, if given, keeps each node's state."""
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.fleet.vce.backend import raybackend

    from fedtl.simulations.feeder import make_feeder

    original, feeder = raybackend.RayBackend, vce_api.add_messages_to_queue
    raybackend.RayBackend = _backend_class(limit_s, states)
    vce_api.add_messages_to_queue = make_feeder(feeder)  # one scan a tick, not one per node (see feeder.py)
    try:
        yield
    finally:
        raybackend.RayBackend, vce_api.add_messages_to_queue = original, feeder
