"""Drain the mixserve app before it stops, so that no request in flight is cut.

Run by `mixserve serve` on SIGTERM/SIGINT (cluster/serve_command.py) and by `mixserve drain`, the
preStop hook of the KubeRay pods (manifests/).

Rule:
1. Every ingress replica is told to drain (Serve's `handle.broadcast`, which reaches every running
   replica of a deployment and bypasses their queues): from then on it answers new requests, and
   /health, with 503 + Retry-After, while the requests it has in flight go on (router/ingress.py
   `drain`). The ingress is the OpenAIIngress deployment, or the LLM server itself in the direct shape.
2. Every POLL_S the ingress replicas' requests in flight (`drain` again: it is idempotent) and the
   LLM-server replicas' load (ReplicaLoad: sequences running and waiting) are read. The app is
   drained when both are zero on QUIET_POLLS reads in a row: a request that passed the check just
   before the flag flipped shows on the next read, and the pause lets the proxy send the last
   bytes of the last stream.
3. It stops waiting at `timeout_s` (graceful_shutdown_timeout_s) or as soon as `cut_short()` is true
   (a second signal); the report says how much was left. Stopping Serve is the caller's.
Replicas that start after step 1 (autoscaling) are not drained.

`drain_node` is the per-node variant for a Ray node that leaves a cluster that goes on (a worker
pod deleted): Ray's own node drain, which Serve honours by starting replacements of the node's
replicas elsewhere and stopping these gracefully; it waits until none of the app's is left there.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass

import ray
from ray import serve
from ray.serve.exceptions import RayServeException

from .serve_config import APP_NAME, INGRESS_DEPLOYMENT, LLM_DEPLOYMENT

POLL_S = 0.5
QUIET_POLLS = 2
PROGRESS_EVERY_S = 5.0
CALL_TIMEOUT_S = 10.0  # one broadcast read; a replica busy beyond that counts as busy


@dataclass(slots=True)
class DrainReport:
    requests: int  # requests in flight at the ingress when the drain began
    sequences: int  # sequences running or waiting in the engines then
    left: int  # requests + sequences still in flight when it stopped waiting (0: drained)
    seconds: float

    @property
    def complete(self) -> bool:
        return self.left == 0


def drain_app(timeout_s: float, app: str = APP_NAME, cut_short: Callable[[], bool] = lambda: False,
              log: Callable[[str], None] = print) -> DrainReport:
    """Steps 1-3 of the rule above for the running app `app`."""
    started = time.monotonic()
    deployments = _deployments(app)
    if not deployments:
        log(f"drain: no app {app!r} is running; nothing to drain")
        return DrainReport(0, 0, 0, 0.0)
    ingress = serve.get_deployment_handle(
        INGRESS_DEPLOYMENT if INGRESS_DEPLOYMENT in deployments else LLM_DEPLOYMENT, app)
    llm = serve.get_deployment_handle(LLM_DEPLOYMENT, app)
    requests, sequences = _in_flight(ingress, llm)
    log(f"drain: {requests} request(s) in flight ({sequences} sequence(s) in the engines); new requests get 503; "
        f"waiting up to {timeout_s:g} s for them to finish")
    now = requests, sequences
    quiet, reported = 0, started
    while True:
        quiet = quiet + 1 if now == (0, 0) else 0
        elapsed = time.monotonic() - started
        if quiet >= QUIET_POLLS or elapsed >= timeout_s or cut_short():
            return DrainReport(requests, sequences, sum(now), elapsed)
        if time.monotonic() - reported >= PROGRESS_EVERY_S:
            log(f"drain: {now[0]} request(s) still in flight ({now[1]} sequence(s)) after {elapsed:.0f} s")
            reported = time.monotonic()
        time.sleep(min(POLL_S, max(0.0, timeout_s - elapsed)))
        now = _in_flight(ingress, llm)


def _deployments(app: str) -> set[str]:
    try:
        status = serve.status().applications.get(app)
    except RayServeException:  # no Serve on this cluster
        return set()
    return set(status.deployments) if status is not None else set()


def _in_flight(ingress, llm) -> tuple[int, int]:
    """(requests in flight at the ingress replicas, sequences running or waiting in the engines); the
    first call turns every ingress replica to draining. A replica that does not answer in time counts
    as one in flight (it is busy); one that fails otherwise (it died) holds nothing any more."""
    requests = _broadcast(ingress, "drain", lambda n: n)
    sequences = _broadcast(llm, "stats", lambda stats: stats["load"].num_running + stats["load"].num_waiting)
    return requests, sequences


def _broadcast(handle, method: str, count: Callable) -> int:
    try:
        results = handle.broadcast(method).results(timeout_s=CALL_TIMEOUT_S, return_exceptions=True)
    except TimeoutError:
        return 1
    return sum(1 if isinstance(r, TimeoutError) else 0 if isinstance(r, BaseException) else count(r)
               for r in results)


def drain_node(node_id: str, timeout_s: float, app: str = APP_NAME, cut_short: Callable[[], bool] = lambda: False,
               log: Callable[[str], None] = print) -> bool:
    """Ask Ray to drain node `node_id` (as its autoscaler does before removing a node; reason:
    preemption, deadline `timeout_s` from now) and wait until no replica of `app` is left on it, at
    most `timeout_s`. True when none is left."""
    from ray.core.generated import autoscaler_pb2

    started = time.monotonic()
    gcs = ray._raylet.GcsClient(address=ray.get_runtime_context().gcs_address)
    deadline_ms = time.time_ns() // 1_000_000 + int(timeout_s * 1000)
    accepted, why = gcs.drain_node(node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                                   "mixserve drain: the node is leaving", deadline_ms)
    if not accepted:
        log(f"drain: Ray refused to drain node {node_id}: {why}")
        return False
    left = replicas_on_node(node_id, app)
    log(f"drain: node {node_id} is draining; {len(left)} replica(s) of {app!r} on it move elsewhere "
        f"(waiting up to {timeout_s:g} s)")
    while left and time.monotonic() - started < timeout_s and not cut_short():
        time.sleep(POLL_S)
        left = replicas_on_node(node_id, app)
    log(f"drain: {'no replica left' if not left else f'{len(left)} replica(s) still'} on node {node_id} after "
        f"{time.monotonic() - started:.1f} s")
    return not left


def replicas_on_node(node_id: str, app: str = APP_NAME) -> list[str]:
    """Ids of the app's replicas (any state but stopped) on `node_id`, from the Serve controller's
    instance details (what `serve status` and the dashboard show)."""
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:  # no Serve on this cluster
        return []
    details = ray.get(controller.get_serve_instance_details.remote(), timeout=CALL_TIMEOUT_S)
    deployments = (details.get("applications", {}).get(app) or {}).get("deployments", {})
    return [r["replica_id"] for d in deployments.values() for r in d.get("replicas", [])
            if r.get("node_id") == node_id]
