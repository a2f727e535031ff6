"""The DICOM listener: a pynetdicom SCP for C-ECHO and C-STORE, nothing else.

Handlers stay as small as pynetdicom intends them to be: the association-level one
enforces the calling-AE and host allowlists and the association limit, the C-STORE one
hands the encoded data set to :class:`~dicom_node.receive.StoreService` and returns its
status. pynetdicom owns threads (one per association), timeouts and PDU handling.

One AE serves up to two ports: the plain ``[node] port`` and, with ``[node.tls]``
enabled, the DICOM TLS port (PS3.15 Annex B). Both share the AE's contexts, handlers and
association limit. Every accepted connection gets a socket timeout (the network timeout),
so a peer that stops half-way through a PDU or a TLS handshake loses its connection
instead of holding a thread forever.
"""

from __future__ import annotations

import ipaddress
import ssl
import time
from collections.abc import Sequence
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node import tls
from dicom_node.config import NodeSettings, NodeTlsSettings
from dicom_node.contexts import (
    STORAGE_SOP_CLASSES,
    STORAGE_TRANSFER_SYNTAXES,
    VERIFICATION_SOP_CLASS,
    VERIFICATION_SYNTAXES,
)
from dicom_node.logs import get_logger
from dicom_node.receive import (
    IncomingInstance,
    ReceiveLimits,
    StoreOutcome,
    StoreService,
    StoreStatus,
)
from storage.audit import record_event
from storage.db import session_scope

log = get_logger(__name__)

# A-ASSOCIATE-RJ (result, source, reason) per PS3.8 Table 9-21: rejected-permanent by the
# service user, "calling AE title not recognized" resp. "no reason given" (for hosts).
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_HOST = (0x01, 0x01, 0x01)
# Rejected-transient by the service provider (presentation): "local-limit-exceeded".
REJECT_LIMIT = (0x02, 0x03, 0x02)
ERROR_COMMENT_LENGTH = 64  # (0000,0902) Error Comment is LO


class Allowlist:
    """Who may associate: calling AE titles and peer networks (empty = anyone)."""

    def __init__(self, calling_aets: Sequence[str], hosts: Sequence[str]) -> None:
        self.calling_aets = frozenset(title.strip() for title in calling_aets)
        self.networks = tuple(ipaddress.ip_network(host, strict=False) for host in hosts)

    def refusal(self, calling_ae: str, address: str) -> str | None:
        """Why this peer must be rejected, or None if it is welcome."""
        if self.calling_aets and calling_ae.strip() not in self.calling_aets:
            return "calling AE title not allowed"
        if self.networks and not self._host_allowed(address):
            return "peer host not allowed"
        return None

    def _host_allowed(self, address: str) -> bool:
        try:
            peer = ipaddress.ip_address(address.split("%")[0])
        except ValueError:
            return False
        if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped:
            peer = peer.ipv4_mapped
        return any(peer in network for network in self.networks)


def build_ae(settings: NodeSettings) -> AE:
    """An AE with our presentation contexts, limits and timeouts."""
    ae = AE(ae_title=settings.ae_title)
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, list(STORAGE_TRANSFER_SYNTAXES))
    ae.add_supported_context(VERIFICATION_SOP_CLASS, list(VERIFICATION_SYNTAXES))
    ae.require_called_aet = settings.require_called_ae
    ae.maximum_associations = settings.max_associations
    ae.maximum_pdu_size = settings.max_pdu_size
    ae.acse_timeout = settings.acse_timeout
    ae.dimse_timeout = settings.dimse_timeout
    ae.network_timeout = settings.network_timeout
    return ae


def receive_limits(settings: NodeSettings) -> ReceiveLimits:
    """The C-STORE limits of ``[node]`` for the store pipeline."""
    return ReceiveLimits(
        max_dataset_bytes=settings.max_dataset_bytes,
        max_rows=settings.max_image_rows,
        max_columns=settings.max_image_columns,
        max_pixel_bytes=settings.max_image_bytes,
    )


def _tls_context(settings: NodeTlsSettings) -> ssl.SSLContext:
    assert settings.cert_file is not None and settings.key_file is not None  # validated
    return tls.server_context(
        settings.cert_file, settings.key_file, settings.ca_file, settings.verify_client
    )


class Listener:
    """Owns the AE and its server thread; started and stopped by the node runtime."""

    name = "listener"

    def __init__(self, settings: NodeSettings, store: StoreService) -> None:
        self.settings = settings
        self.store = store
        self.allowlist = Allowlist(settings.allowed_calling_aets, settings.allowed_hosts)
        self.ae = build_ae(settings)
        self._server: ThreadedAssociationServer | None = None
        self._tls_server: ThreadedAssociationServer | None = None

    @property
    def port(self) -> int:
        """The bound plain port (differs from the configured one only when that was 0)."""
        if self._server is None:
            return self.settings.port
        return int(self._server.server_address[1])

    @property
    def tls_port(self) -> int | None:
        """The bound TLS port, None without TLS."""
        if not self.settings.tls.enabled:
            return None
        if self._tls_server is None:
            return self.settings.tls.port
        return int(self._tls_server.server_address[1])

    def start(self) -> None:
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._on_connection),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        host, tls_settings = self.settings.host, self.settings.tls
        if tls_settings.enabled:
            self._tls_server = self.ae.start_server(
                (host, tls_settings.port),
                block=False,
                evt_handlers=handlers,
                ssl_context=_tls_context(tls_settings),
            )
        if not (tls_settings.enabled and tls_settings.tls_only):
            try:
                self._server = self.ae.start_server(
                    (host, self.settings.port), block=False, evt_handlers=handlers
                )
            except OSError:
                self._shutdown_servers()
                raise
        log.info(
            "listener started",
            ae_title=self.settings.ae_title,
            host=host,
            port=self.port if self._server is not None else None,
            tls_port=self.tls_port,
            tls_client_certificates="required" if tls_settings.verify_client else "not required",
            max_associations=self.settings.max_associations,
            allowed_calling_aets=sorted(self.allowlist.calling_aets),
            allowed_hosts=[str(n) for n in self.allowlist.networks],
        )

    def stop(self, grace_seconds: float = 30.0) -> None:
        """Stop accepting, let running transfers finish, then abort stragglers.

        Connections that never completed association negotiation (port probes, half-open
        peers) are aborted and not waited for: pynetdicom would keep their threads until
        the ACSE timeout.
        """
        if self._server is None and self._tls_server is None:
            return
        self._shutdown_servers()
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline:
            transferring = [a for a in self.ae.active_associations if a.is_established]
            if not transferring:
                break
            time.sleep(0.1)
        for assoc in self.ae.active_associations:
            assoc.abort()
        log.info("listener stopped", ae_title=self.settings.ae_title)

    def _shutdown_servers(self) -> None:
        for server in (self._server, self._tls_server):
            if server is not None:
                server.shutdown()
        self._server = self._tls_server = None

    # -- handlers ---------------------------------------------------------------------

    def _on_connection(self, event: Event) -> None:
        """Bound every read and finish the TLS handshake, on the connection's thread."""
        sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
        if sock is None:
            return
        failure = tls.handshake(sock, self.settings.acse_timeout)
        if failure is not None:
            requestor = event.assoc.requestor
            log.warning(
                "TLS handshake failed",
                reason=failure,
                peer=f"{requestor.address}:{requestor.port}",
            )
            return
        sock.settimeout(self.settings.network_timeout)

    def _on_requested(self, event: Event) -> None:
        """Reject peers outside the allowlists, and any beyond the association limit,
        before any negotiation happens."""
        requestor = event.assoc.requestor
        primitive = requestor.primitive  # requestor.ae_title is only set after negotiation
        calling_ae = _text_ae(primitive.calling_ae_title if primitive else None)
        reason = self.allowlist.refusal(calling_ae, requestor.address)
        if reason is None:
            reason = self._over_limit()
        if reason is None:
            return
        reject = {"calling": REJECT_CALLING_AE, "peer": REJECT_HOST}.get(
            reason.split()[0], REJECT_LIMIT
        )
        event.assoc.acse.send_reject(*reject)
        log.warning(
            "association rejected",
            reason=reason,
            calling_ae=calling_ae,
            peer=f"{requestor.address}:{requestor.port}",
        )
        self._audit_rejection(reason, calling_ae, requestor.address)

    def _over_limit(self) -> str | None:
        """pynetdicom would refuse too, but silently; this says so in the log."""
        acceptors = [a for a in self.ae.active_associations if a.is_acceptor]
        if len(acceptors) <= self.settings.max_associations:  # this one is counted
            return None
        return f"local limit exceeded: {self.settings.max_associations} associations"

    def _audit_rejection(self, reason: str, calling_ae: str, address: str) -> None:
        try:
            with session_scope(self.store.sessions) as session:
                record_event(
                    session,
                    "association.rejected",
                    actor="listener",
                    calling_ae=calling_ae,
                    peer_address=address,
                    details={"reason": reason},
                )
        except Exception as exc:  # auditing must never take the listener down
            log.warning("could not audit association rejection", error=str(exc)[:200])

    def _on_accepted(self, event: Event) -> None:
        assoc = event.assoc
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        refused = {str(cx.abstract_syntax) for cx in assoc.rejected_contexts} - accepted
        log.info(
            "association accepted",
            calling_ae=_text_ae(assoc.requestor.ae_title),
            peer=f"{assoc.requestor.address}:{assoc.requestor.port}",
            accepted_sop_classes=len(accepted),
            refused_sop_classes=len(refused),
        )
        if refused and not accepted - {str(VERIFICATION_SOP_CLASS)}:
            log.warning(
                "association has no acceptable storage context",
                calling_ae=_text_ae(assoc.requestor.ae_title),
                refused_sop_classes=sorted(refused)[:20],
            )

    def _on_aborted(self, event: Event) -> None:
        assoc = event.assoc
        log.warning(
            "association aborted",
            calling_ae=_text_ae(assoc.requestor.ae_title),
            peer=f"{assoc.requestor.address}:{assoc.requestor.port}",
        )

    def _on_echo(self, event: Event) -> int:
        return 0x0000

    def _on_store(self, event: Event) -> Dataset:
        """C-STORE: store and enqueue, answer with the resulting status."""
        try:
            incoming = incoming_from_event(event)
        except Exception:
            log.exception("C-STORE request could not be read")
            return _status(StoreOutcome(StoreStatus.CANNOT_UNDERSTAND, "cannot read request"))
        return _status(self.store.store(incoming))


def incoming_from_event(event: Event) -> IncomingInstance:
    """The request's encoded data set and metadata, without decoding the data set.

    This is ``event.encoded_dataset()`` without the File Meta Information, which the
    store pipeline writes itself (see ``receive.part10_header``) so that the possibly
    large data set is never copied just to have a header prepended.
    """
    request = event.request
    if not isinstance(request, C_STORE):
        raise TypeError("not a C-STORE request")
    assoc = event.assoc
    return IncomingInstance(
        dataset=event.encoded_dataset(include_meta=False),
        transfer_syntax_uid=str(event.context.transfer_syntax),
        sop_class_uid=str(request.AffectedSOPClassUID),
        sop_instance_uid=str(request.AffectedSOPInstanceUID),
        calling_ae=_text_ae(assoc.requestor.ae_title),
        called_ae=_text_ae(assoc.acceptor.ae_title),
        peer_address=str(assoc.requestor.address),
        peer_port=int(assoc.requestor.port) if assoc.requestor.port else None,
    )


def _status(result: StoreOutcome) -> Dataset:
    status = Dataset()
    status.Status = int(result.status)
    if result.comment:
        status.ErrorComment = result.comment[:ERROR_COMMENT_LENGTH]
    return status


def _text_ae(value: str | bytes | None) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    return value.strip()[:16]
