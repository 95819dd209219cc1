"""`python -m autoscaler --kube`: the autoscaler as a Knative PodAutoscaler-class controller.

One process, run as two replicas (active/passive through one Lease):

- `ServiceSource` turns the Revisions of our class and the ScalingPolicies into the service table;
- the decider, placement and preemption are the local cluster's (`autoscaler.controller`,
  `autoscaler.scaling`), fed by the activator's `/v1/demand` and `/v1/stats`;
- `KubeBackend` turns their decisions into pods (intents, the binder, pod-deletion-cost);
- `PodAutoscalerController` writes each PA's SKS, replicas and status, its replicas from
  `advice_for` (the instances the controller counts plus open intents);
- `PlacementWebhook` gates new pods of our class and connects them to their node's loader
  (every replica serves it; its certificate has a leader of its own).

Every replica watches (warm caches); only the leader decides, pins pods and writes. `/healthz` is
200 on the leader only, so the Service routes the activator's reports to it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import uvicorn

from autoscaler.backends.kube import KubeBackend
from autoscaler.controller import Autoscaler
from autoscaler.kube.activators import ADMIN_PORT as ACTIVATOR_ADMIN_PORT
from autoscaler.kube.activators import NAMESPACE as ACTIVATOR_NAMESPACE
from autoscaler.kube.activators import KubeActivators
from autoscaler.kube.advice import advice_for
from autoscaler.kube.internal_token import SECRET as TOKEN_SECRET
from autoscaler.kube.internal_token import copy_token, ensure_token
from autoscaler.kube.pa_controller import PROBE_URL, PodAutoscalerController, http_prober
from autoscaler.kube.podautoscaler import Settings
from autoscaler.kube.services import ServiceSource
from autoscaler.kube.webhook import PORT as WEBHOOK_PORT
from autoscaler.kube.webhook import PlacementWebhook
from autoscaler.server import build_app
from sllm_knative.api import auth
from sllm_knative.config import TICK_S, AutoscalerConfig, Manifest
from sllm_knative.kube.client import Kube, connect
from sllm_knative.kube.leader import leader_identity
from sllm_knative.kube.times import rfc3339
from sllm_knative.log import get_logger
from sllm_knative.serving import Server, serve_until_signalled, stop_all

_log = get_logger("autoscaler")


def _log_failure(fut: Any) -> None:
    """A change the service table could not take is logged, never dropped in silence."""
    if not fut.cancelled() and fut.exception() is not None:
        exc = fut.exception()
        _log.error("services not applied", error=f"{type(exc).__name__}: {exc}"[:500], exc_info=exc)


def decide_when_leading(scaler: Autoscaler, backend: KubeBackend, is_leader: Callable[[], bool]) -> None:
    """Only the leader pins pods and decides, and only once its backend has adopted the pods that
    run already (`KubeBackend.settled`); it decides as soon as it has, without waiting for the next
    tick. Its ticks before then decided nothing, so a standby that took over would otherwise go on
    reporting its service table's initial scale (`desired` 1 in /v1/services) and leave the PA's
    replicas undecided until one more tick, or more on a loaded machine."""
    backend.leading = is_leader
    scaler.may_decide = lambda: is_leader() and backend.settled
    backend.on_settled = scaler.tick


async def serve_kube(*, port: int, host: str, kubeconfig: str | None, lease_namespace: str,
                     activator_admin: tuple[str, ...] = (), activator_namespace: str = ACTIVATOR_NAMESPACE,
                     activator_admin_port: int = ACTIVATOR_ADMIN_PORT, identity: str | None = None,
                     resync_s: float = 30.0,
                     lease_duration_s: float = 15.0, renew_deadline_s: float = 10.0,
                     retry_period_s: float = 2.0, grace_s: float | None = None,
                     probe_url: str = PROBE_URL, webhook_port: int = WEBHOOK_PORT, webhook_host: str | None = None,
                     webhook_hosts: tuple[str, ...] = ()) -> None:
    kube = Kube(connect(kubeconfig))
    loop = asyncio.get_running_loop()
    # The internal token the activators' admin API and the function pods' internal API want:
    # $SLLM_INTERNAL_TOKEN, else the install's Secret (made at the first start, and copied where the
    # activator Deployment reads it). The backend copies it into each namespace where it pins a pod
    # of our class (the webhook points the pod's SLLM_INTERNAL_TOKEN at that copy) and sends it.
    token = auth.token_from_env()
    if not token:
        token = await asyncio.to_thread(ensure_token, kube, lease_namespace, [activator_namespace])
    install_token: str = token
    backend = KubeBackend(kube, resync_s=resync_s, internal_token=install_token,
                          copy_token=lambda namespace: copy_token(kube, namespace, install_token))
    # The activator replicas (their EndpointSlices, or the fixed --activator-admin URLs): withholds
    # and migrations on scale-down and preemption.
    activators = KubeActivators(kube, static=activator_admin, namespace=activator_namespace,
                                admin_port=activator_admin_port, resync_s=resync_s, token=token).start()
    scaler = Autoscaler(backend, activators)

    async def apply(manifest: Manifest, removed: list[str]) -> None:
        if manifest.services or manifest.policies:
            await scaler.apply(manifest)
        for key in removed:
            await scaler.delete(key)

    def on_change(manifest: Manifest, removed: list[str]) -> None:
        fut = asyncio.run_coroutine_threadsafe(apply(manifest, removed), loop)
        fut.add_done_callback(_log_failure)

    source = ServiceSource(kube, on_change, resync_s=resync_s)
    await asyncio.to_thread(source.start)
    await apply(source.manifest()[0], [])  # the table first: adopted pods find their service

    def advisor(key: str) -> Any:
        return advice_for(scaler.table.get(key), backend.open_intents(key), backend.placed(key))

    cfg = AutoscalerConfig()
    settings = Settings(scale_to_zero_grace_s=cfg.scale_to_zero_grace_period if grace_s is None else grace_s,
                        pod_retention_s=cfg.scale_to_zero_pod_retention_period, initial_scale=cfg.initial_scale,
                        allow_zero_initial_scale=cfg.allow_zero_initial_scale)
    pa = PodAutoscalerController(kube, advisor, settings=settings, prober=http_prober(probe_url),
                                 identity=identity or leader_identity(),
                                 lease_namespace=lease_namespace, resync_s=resync_s,
                                 lease_duration_s=lease_duration_s, renew_deadline_s=renew_deadline_s,
                                 retry_period_s=retry_period_s, problem=source.problem,
                                 stopping=backend.stopping)
    def stop_reason(rec: Any) -> tuple[str, str]:
        """The Event on a pod being stopped: a preemption (its service gives the instance up for
        a claim on its node: `leaving`) names who takes the slot and why it may."""
        rt = scaler.table.get(rec.service)
        if rt is None or rec.id not in rt.leaving:
            return "Stopping", "scaled down"
        claims = [r for r in scaler.scaler.slots.reservations() if r.load.node == rec.node and r.service != rec.service]
        takers = sorted({r.service for r in claims})
        if not takers:
            return "Preempted", f"preempted on {rec.node}"
        other = scaler.table.get(takers[0])
        if other is not None and other.priority > rt.priority:
            why = f"priority {other.priority} over {rt.priority}"
        elif other is not None and any(r.fair_share for r in claims if r.service == other.key):
            why = (f"fair share: its request has waited {other.waited_s(scaler.clock()):.1f}s, its first instance "
                   f"due within fairShareAfter ({other.fair_share_after_s:g}s)")
        else:
            why = f"the same priority ({rt.priority}), and nothing protects this instance"
        return "Preempted", f"preempted: its slot on {rec.node} goes to {', '.join(takers)} ({why})"

    backend.stop_reason = stop_reason
    decide_when_leading(scaler, backend, lambda: pa.elector.is_leader)
    pa.on_lead = backend.wake  # the first pass as the leader (its adoptions) now, not at the next tick
    backend.nudge = pa.queue.add
    await backend.start_watching()
    await asyncio.to_thread(pa.start)
    webhook = None
    if webhook_port:  # every replica serves admission; the certificate's leader is one of them
        webhook = PlacementWebhook(kube, namespace=lease_namespace, identity=pa.identity, host=webhook_host or host,
                                   port=webhook_port, extra_hosts=webhook_hosts, token_secret=TOKEN_SECRET)
        await asyncio.to_thread(webhook.start)
    app = build_app(scaler, ready=lambda: pa.elector.is_leader, kube=True)
    server = Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                           lifespan="off"))

    async def tick() -> None:
        while True:
            await asyncio.sleep(TICK_S)
            if pa.elector.is_leader:
                scaler.tick()
                backend.poke()  # follow pods even without a watch event (timeouts)
                await activators.resend()  # withholds a replica has not taken (it failed, restarted, is new)
                try:  # the ScalingPolicies' status: what each applies to, and whether it can
                    await asyncio.to_thread(source.write_policy_statuses, rfc3339())
                except Exception:
                    _log.error("ScalingPolicy statuses not written", exc_info=True)

    ticker = asyncio.ensure_future(tick())
    _log.info("listening", port=port, mode="kubernetes", identity=pa.identity)
    # On SIGTERM the Lease goes first, at once, while the server shuts down: a standby leads as
    # soon as it is released, and the grace period may end (SIGKILL) before the rest has stopped.
    releasing: list[asyncio.Future[None]] = []

    def on_sigterm() -> None:
        ticker.cancel()  # decide no more
        if not releasing:
            releasing.append(loop.run_in_executor(None, pa.stop))
        stop_all([server])

    try:
        await serve_until_signalled([(server, None)], on_sigterm=on_sigterm)
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
        await (releasing[0] if releasing else asyncio.to_thread(pa.stop))  # the webhook needs no leadership
        if webhook is not None:
            await asyncio.to_thread(webhook.stop)
        await asyncio.to_thread(source.stop)
        await activators.close()
        await backend.close()
