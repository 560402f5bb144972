"""nsqd's TLS: the server context built from the ``--tls-*`` flags (Go's
``buildTLSConfig``), the IDENTIFY ``tls_v1`` upgrade of a TCP connection,
what ``/stats`` reports about a TLS client, and the plain-HTTP router that
answers ``TLS_REQUIRED`` under ``--tls-required=true``.

Client certificate policies, as nsqd maps them to Go's ``tls.ClientAuth``:
none asks for no certificate; ``require`` wants one (Go: any certificate,
unverified); ``require-verify`` wants one that verifies against
``--tls-root-ca-file`` (or the system roots).  Python's ``ssl`` cannot ask
for a certificate without verifying it, so ``require`` verifies too: the
one deviation from Go here.
"""

from __future__ import annotations

import ssl

import trio

from .http_server import NSQ_CONTENT_TYPE, Response, Route, Router
from .options import Options

# Go's handshake deadline in clientV2.UpgradeTLS
HANDSHAKE_TIMEOUT = 5.0

_MIN_VERSIONS = {
    # OpenSSL has no SSLv3 left; "ssl3.0" means "the oldest there is"
    "ssl3.0": ssl.TLSVersion.MINIMUM_SUPPORTED,
    "tls1.0": ssl.TLSVersion.TLSv1,
    "tls1.1": ssl.TLSVersion.TLSv1_1,
    "tls1.2": ssl.TLSVersion.TLSv1_2,
    "tls1.3": ssl.TLSVersion.TLSv1_3,
}

# /stats tls_version, as nsqd's prettyConnectionState names them
_VERSION_NAMES = {"SSLv3": "SSL30", "TLSv1": "TLS1.0", "TLSv1.1": "TLS1.1", "TLSv1.2": "TLS1.2", "TLSv1.3": "TLS1.3"}

# OpenSSL names of the TLS 1.2 suites a modern OpenSSL negotiates, as Go's
# tls.CipherSuiteName spells them (TLS 1.3 suites share their names)
_CIPHER_NAMES = {
    "ECDHE-RSA-AES128-GCM-SHA256": "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    "ECDHE-RSA-AES256-GCM-SHA384": "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    "ECDHE-ECDSA-AES128-GCM-SHA256": "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384": "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    "ECDHE-RSA-CHACHA20-POLY1305": "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
    "ECDHE-ECDSA-CHACHA20-POLY1305": "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    "ECDHE-RSA-AES128-SHA": "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA",
    "ECDHE-RSA-AES256-SHA": "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA",
    "ECDHE-ECDSA-AES128-SHA": "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA",
    "ECDHE-ECDSA-AES256-SHA": "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA",
    "AES128-GCM-SHA256": "TLS_RSA_WITH_AES_128_GCM_SHA256",
    "AES256-GCM-SHA384": "TLS_RSA_WITH_AES_256_GCM_SHA384",
    "AES128-SHA": "TLS_RSA_WITH_AES_128_CBC_SHA",
    "AES256-SHA": "TLS_RSA_WITH_AES_256_CBC_SHA",
}


class TLSConfigError(ValueError):
    """The --tls-* flags do not make a usable server context (nsqd: FATAL)."""


def build_server_context(options: Options) -> ssl.SSLContext | None:
    """The server context for the TCP upgrade and the HTTPS listener, or None
    when no certificate is configured."""
    if not options.tls_cert and not options.tls_key:
        return None
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(options.tls_cert, options.tls_key)
        ctx.minimum_version = _MIN_VERSIONS[options.tls_min_version]
        if ctx.minimum_version < ssl.TLSVersion.TLSv1_2:
            # OpenSSL 3 allows TLS < 1.2 only at security level 0; asking
            # for an old minimum means wanting those clients served
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        policy = options.tls_client_auth_policy
        if policy:
            ctx.verify_mode = ssl.CERT_REQUIRED
            if options.tls_root_ca_file:
                ctx.load_verify_locations(cafile=options.tls_root_ca_file)
            else:
                ctx.load_default_certs(ssl.Purpose.CLIENT_AUTH)
        elif options.tls_root_ca_file:
            # read (and so checked) as nsqd does, though with no client
            # certificate policy nothing asks for a client certificate
            ctx.load_verify_locations(cafile=options.tls_root_ca_file)
    except (OSError, ValueError) as exc:
        raise TLSConfigError(f"failed to build TLS config - {exc}") from None
    return ctx


def peer_common_name(stream: trio.SSLStream) -> str:
    """The subject CN of the client's (verified) certificate, or ""."""
    try:
        cert = stream.getpeercert()
    except (ValueError, ssl.SSLError):
        return ""
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""


def connection_info(stream: trio.SSLStream) -> dict[str, object]:
    """The tls_* fields of a client's /stats entry, and its certificate's CN."""
    cipher = stream.cipher()
    cipher_name = cipher[0] if cipher else ""
    version = stream.version() or ""
    alpn = stream.selected_alpn_protocol() or ""
    return {
        "version": _VERSION_NAMES.get(version, f"Unknown {version}"),
        "cipher_suite": _CIPHER_NAMES.get(cipher_name, cipher_name),
        "negotiated_protocol": alpn,
        # Go reports true for any ALPN agreement (NPN is gone)
        "negotiated_protocol_is_mutual": True,
        "common_name": peer_common_name(stream),
    }


async def upgrade_server_stream(transport: trio.abc.Stream, context: ssl.SSLContext) -> trio.SSLStream:
    """Run the server side of the handshake on ``transport`` (after the
    IDENTIFY reply went out in clear).  Raises trio.BrokenResourceError on a
    failed handshake, trio.TooSlowError after nsqd's 5 s deadline."""
    stream = trio.SSLStream(transport, context, server_side=True)
    with trio.fail_after(HANDSHAKE_TIMEOUT):
        await stream.do_handshake()
    return stream


class TLSRequiredRouter(Router):
    """Plain HTTP under ``--tls-required=true``: every request, whatever its
    path, gets nsqd's 403 pointing at the HTTPS port."""

    def __init__(self, https_port: int, default_max_body: int = 1 << 20) -> None:
        super().__init__(default_max_body)
        # nsqd writes this body with fmt.Sprintf: keep its spacing
        body = f'{{"message": "TLS_REQUIRED", "https_port": {https_port}}}'.encode()
        self._response = Response(403, body, b"application/json; charset=utf-8", [NSQ_CONTENT_TYPE])

    def find(self, method: str, path: str) -> Route | Response:
        return self._response
