"""TLS / mTLS credentials and bearer-token auth, for both ends of every gRPC hop.

Server side: :func:`server_credentials` (``None`` = plaintext) and :class:`TokenInterceptor`,
which answers UNAUTHENTICATED unless the call carries ``authorization: Bearer <token>``.
Health checks and server reflection stay open so probes and tools work without the secret.

Client side: :func:`create_channel`. Over TLS the token travels as call credentials
(composite channel credentials). gRPC refuses call credentials on insecure channels, so on a
plaintext channel the token is added to every call's metadata by a client interceptor instead;
the server sees the same header either way.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import grpc

from edgecloud.config import TLSConfig

AUTH_HEADER = "authorization"
# Methods reachable without a token: probes (k8s, grpc_health_probe) and reflection (grpcurl).
EXEMPT_PREFIXES: tuple[str, ...] = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


def _read(path: str | Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise FileNotFoundError(f"{what} {path}: {exc.strerror}") from exc


def tls_mode(tls: TLSConfig) -> str:
    """``off``, ``tls`` or ``mtls`` — the word the start-up line prints."""
    if not tls.enabled:
        return "off"
    return "mtls" if tls.require_client_auth else "tls"


def server_credentials(tls: TLSConfig) -> grpc.ServerCredentials | None:
    """Server credentials for ``tls`` (mutual TLS when ``require_client_auth``); None if off.

    With ``client_ca`` set but ``require_client_auth`` false, client certificates are verified
    when presented but not demanded.
    """
    if not tls.enabled:
        return None
    key = _read(tls.key, "tls.key")
    cert = _read(tls.cert, "tls.cert")
    ca = _read(tls.client_ca, "tls.client_ca")
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=bool(tls.require_client_auth)
    )


def _bearer(token: str) -> str:
    return f"Bearer {token}"


def _abort_handler(kind: grpc.RpcMethodHandler | None, code: grpc.StatusCode, details: str):
    """A handler of the same arity as ``kind`` that fails the call with ``code``."""

    def unary(_request: Any, context: grpc.ServicerContext) -> None:
        context.abort(code, details)

    def streaming(_request_iter: Any, context: grpc.ServicerContext) -> None:
        context.abort(code, details)

    if kind is None or not (kind.request_streaming or kind.response_streaming):
        return grpc.unary_unary_rpc_method_handler(unary)
    if kind.request_streaming and kind.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming)
    if kind.request_streaming:
        return grpc.stream_unary_rpc_method_handler(streaming)
    return grpc.unary_stream_rpc_method_handler(unary)


class TokenInterceptor(grpc.ServerInterceptor):
    """Rejects calls without ``authorization: Bearer <token>`` with UNAUTHENTICATED.

    The comparison is constant-time (``hmac.compare_digest``). Methods under
    :data:`EXEMPT_PREFIXES` (health, reflection) are let through.
    """

    def __init__(self, token: str, exempt: Sequence[str] = EXEMPT_PREFIXES) -> None:
        if not token:
            raise ValueError("TokenInterceptor needs a non-empty token")
        self._expected = _bearer(token).encode()
        self._exempt = tuple(exempt)

    def authorized(self, metadata: Sequence[tuple[str, Any]] | None) -> bool:
        for key, value in metadata or ():
            if key.lower() == AUTH_HEADER:
                given = value if isinstance(value, bytes) else str(value).encode()
                if hmac.compare_digest(given, self._expected):
                    return True
        return False

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method or ""
        if method.startswith(self._exempt):
            return continuation(handler_call_details)
        if self.authorized(handler_call_details.invocation_metadata):
            return continuation(handler_call_details)
        has_header = any(
            k.lower() == AUTH_HEADER for k, _ in handler_call_details.invocation_metadata or ()
        )
        details = (
            "invalid bearer token" if has_header
            else "missing 'authorization: Bearer <token>' metadata"
        )
        return _abort_handler(continuation(handler_call_details),
                              grpc.StatusCode.UNAUTHENTICATED, details)


class _MetadataInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds fixed metadata (the bearer token) to every call on a plaintext channel."""

    def __init__(self, extra: Sequence[tuple[str, str]]) -> None:
        self._extra = tuple(extra)

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = list(details.metadata or ()) + list(self._extra)
        return _CallDetails(
            details.method, details.timeout, metadata, details.credentials,
            getattr(details, "wait_for_ready", None), getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression


def channel_credentials(
    *,
    ca: str | Path | None = None,
    client_cert: str | Path | None = None,
    client_key: str | Path | None = None,
    token: str | None = None,
) -> grpc.ChannelCredentials:
    """TLS channel credentials (mTLS when a client cert+key is given), plus the token if set.

    ``ca`` None = the system roots. Only for TLS channels; see :func:`create_channel`.
    """
    if (client_cert is None) != (client_key is None):
        raise ValueError("client_cert and client_key must be given together")
    creds = grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "CA certificate"),
        private_key=_read(client_key, "client key"),
        certificate_chain=_read(client_cert, "client certificate"),
    )
    if token:
        creds = grpc.composite_channel_credentials(
            creds, grpc.access_token_call_credentials(token)
        )
    return creds


def create_channel(
    address: str,
    *,
    tls: bool = False,
    ca: str | Path | None = None,
    client_cert: str | Path | None = None,
    client_key: str | Path | None = None,
    token: str | None = None,
    server_name_override: str | None = None,
    options: Sequence[tuple[str, Any]] | None = None,
) -> grpc.Channel:
    """A client channel to ``address`` (``host:port``) with TLS/mTLS and token as asked.

    ``tls`` is implied by ``ca``/``client_cert``. ``server_name_override`` sets
    ``grpc.ssl_target_name_override`` (e.g. when dialing an IP whose cert names a host).
    On plaintext the token is sent as ``authorization`` call metadata by an interceptor.
    """
    opts = list(options or ())
    if tls or ca is not None or client_cert is not None:
        if server_name_override:
            opts.append(("grpc.ssl_target_name_override", server_name_override))
        creds = channel_credentials(
            ca=ca, client_cert=client_cert, client_key=client_key, token=token
        )
        return grpc.secure_channel(address, creds, options=opts)
    channel = grpc.insecure_channel(address, options=opts)
    if token:
        channel = grpc.intercept_channel(channel, _MetadataInterceptor([(AUTH_HEADER, _bearer(token))]))
    return channel


def auth_metadata(token: str | None) -> list[tuple[str, str]]:
    """Per-call metadata carrying ``token`` (for callers that build their own channels)."""
    return [(AUTH_HEADER, _bearer(token))] if token else []
