"""TLS, mTLS and bearer tokens on a real GrpcServer (127.0.0.1, port 0)."""

from __future__ import annotations

import io
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from certs import PKI, make_pki
from edgecloud.config import ServerConfig, TLSConfig
from edgecloud.serving.grpc_server import GrpcServer
from edgecloud.serving.metrics import Metrics
from edgecloud.protocol import SERVICE_NAME, pb, pb_grpc
from edgecloud.serving.security import (
    TokenInterceptor,
    channel_credentials,
    create_channel,
    server_credentials,
)

TOKEN = "s3cret-token"
TIMEOUT = 5.0


class LiveOnly(pb_grpc.GRPCInferenceServiceServicer):
    """The smallest real OIP servicer: enough to exercise the transport and auth layers."""

    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


def start(config: ServerConfig) -> tuple[GrpcServer, str]:
    out = io.StringIO()
    server = GrpcServer("edge", config, LiveOnly(), metrics=Metrics("edge"), out=out).start()
    return server, out.getvalue()


def live(channel: grpc.Channel, **kw) -> bool:
    return pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(
        pb.ServerLiveRequest(), timeout=TIMEOUT, **kw
    ).live


def code_of(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code()


@pytest.fixture(scope="module")
def tls_token_server(pki: PKI):
    tls = TLSConfig(enabled=True, cert=pki.server_cert, key=pki.server_key)
    server, line = start(ServerConfig(token=TOKEN, tls=tls))
    yield server, line
    server.stop(0.5)


def test_credentials_off_when_tls_disabled():
    assert server_credentials(TLSConfig()) is None
    with pytest.raises(ValueError):
        TokenInterceptor("")
    with pytest.raises(ValueError, match="together"):
        channel_credentials(client_cert=Path("x.pem"))


def test_announcement_names_tls_and_auth(tls_token_server):
    server, line = tls_token_server
    assert line.strip() == (
        f"edgecloud edge listening grpc=127.0.0.1:{server.port} "
        f"metrics=http://127.0.0.1:{server.metrics_port}/metrics tls=tls auth=token"
    )


def test_tls_token_required(tls_token_server, pki: PKI):
    server, _ = tls_token_server
    with create_channel(server.address, ca=pki.ca) as ch:
        assert code_of(lambda: live(ch)) == grpc.StatusCode.UNAUTHENTICATED
    with create_channel(server.address, ca=pki.ca, token="wrong") as ch:
        assert code_of(lambda: live(ch)) == grpc.StatusCode.UNAUTHENTICATED
    with create_channel(server.address, ca=pki.ca, token=TOKEN) as ch:
        assert live(ch) is True
    # Per-call metadata works as well (what tritonclient's headers= does).
    with create_channel(server.address, ca=pki.ca) as ch:
        assert live(ch, metadata=[("authorization", f"Bearer {TOKEN}")]) is True


def test_health_and_reflection_need_no_token(tls_token_server, pki: PKI):
    server, _ = tls_token_server
    with create_channel(server.address, ca=pki.ca) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for name in ("", SERVICE_NAME):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=TIMEOUT)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        services = ProtoReflectionDescriptorDatabase(ch).get_services()
        assert SERVICE_NAME in services and "grpc.health.v1.Health" in services


def test_plaintext_client_cannot_talk_to_tls_server(tls_token_server):
    server, _ = tls_token_server
    with create_channel(server.address, token=TOKEN) as ch:
        assert code_of(lambda: live(ch)) == grpc.StatusCode.UNAVAILABLE


def test_plaintext_token_goes_as_metadata():
    server, line = start(ServerConfig(token=TOKEN))
    try:
        assert line.strip().endswith("tls=off auth=token")
        with create_channel(server.address, token=TOKEN) as ch:
            assert live(ch) is True
        with create_channel(server.address) as ch:
            assert code_of(lambda: live(ch)) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop(0.5)


def test_mtls_rejects_clients_without_a_trusted_cert(pki: PKI):
    tls = TLSConfig(enabled=True, cert=pki.server_cert, key=pki.server_key,
                    client_ca=pki.ca, require_client_auth=True)
    server, line = start(ServerConfig(tls=tls))
    try:
        assert "tls=mtls auth=off" in line
        with create_channel(server.address, ca=pki.ca, client_cert=pki.client_cert,
                            client_key=pki.client_key) as ch:
            assert live(ch) is True
        # No client cert: the handshake fails, which gRPC reports as UNAVAILABLE.
        with create_channel(server.address, ca=pki.ca) as ch:
            assert code_of(lambda: live(ch)) == grpc.StatusCode.UNAVAILABLE
        # A cert from a CA the server does not trust is rejected the same way.
        with create_channel(server.address, ca=pki.ca, client_cert=pki.other_client_cert,
                            client_key=pki.other_client_key) as ch:
            assert code_of(lambda: live(ch)) == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(0.5)


def test_server_name_override_is_checked_against_the_cert(pki: PKI, tls_token_server):
    server, _ = tls_token_server
    with create_channel(server.address, ca=pki.ca, token=TOKEN,
                        server_name_override="localhost") as ch:
        assert live(ch) is True
    with create_channel(server.address, ca=pki.ca, token=TOKEN,
                        server_name_override="not-in-the-cert.example") as ch:
        assert code_of(lambda: live(ch)) == grpc.StatusCode.UNAVAILABLE


def test_second_server_cannot_share_a_port():
    first, _ = start(ServerConfig())
    try:
        with pytest.raises(OSError, match="cannot bind gRPC"):
            start(ServerConfig(port=first.port))
    finally:
        first.stop(0.5)
