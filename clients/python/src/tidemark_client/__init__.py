"""Python client of Tidemark: the four services' gRPC stubs on one channel.

    import tidemark_client as tm

    with tm.connect("https://tidemark.example:50051", token="...") as t:
        jobs = t.jobs.ListJobs(tm.job_tracker_pb2.ListJobsRequest(page_size=10))

The protobuf and gRPC modules are generated from Tidemark's `proto/` when the
package is built; they are importable as `tidemark.<service>.v1` and
re-exported here (`job_tracker_pb2`, `job_tracker_pb2_grpc`, ...).
"""

from __future__ import annotations

import collections
import enum
import os
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, Union

import grpc
from google.protobuf import wrappers_pb2
from tidemark.common.v1 import common_pb2
from tidemark.job_tracker.v1 import job_tracker_pb2, job_tracker_pb2_grpc
from tidemark.replicator.v1 import replicator_pb2, replicator_pb2_grpc
from tidemark.stats_aggregator.v1 import stats_aggregator_pb2, stats_aggregator_pb2_grpc
from tidemark.verifier.v1 import verifier_pb2, verifier_pb2_grpc

__all__ = [
    "DEFAULT_ENDPOINT",
    "SERVICES",
    "HealthStatus",
    "Tidemark",
    "common_pb2",
    "connect",
    "job_tracker_pb2",
    "job_tracker_pb2_grpc",
    "replicator_pb2",
    "replicator_pb2_grpc",
    "stats_aggregator_pb2",
    "stats_aggregator_pb2_grpc",
    "verifier_pb2",
    "verifier_pb2_grpc",
]

__version__ = "0.1.0"

DEFAULT_ENDPOINT = "http://127.0.0.1:50051"
"""Where `tidemark dev` serves all four services."""

SERVICES = {
    "job-tracker": "tidemark.job_tracker.v1.JobTrackerService",
    "replicator": "tidemark.replicator.v1.ReplicatorService",
    "stats-aggregator": "tidemark.stats_aggregator.v1.StatsAggregatorService",
    "verifier": "tidemark.verifier.v1.VerifierService",
}
"""The gRPC service names, by the short names the `tidemark` CLI uses."""

StrPath = Union[str, "os.PathLike[str]"]


class HealthStatus(enum.IntEnum):
    """`grpc.health.v1.HealthCheckResponse.ServingStatus`."""

    UNKNOWN = 0
    SERVING = 1
    NOT_SERVING = 2
    SERVICE_UNKNOWN = 3


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    """A call's details with the client's metadata and default deadline applied."""


class _Defaults(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <token>` to every call, and `timeout` to calls that set no deadline."""

    def __init__(self, token: str | None, timeout: float | None) -> None:
        self._metadata: list[tuple[str, str]] = [("authorization", f"Bearer {token}")] if token else []
        self._timeout = timeout

    def _apply(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [*(details.metadata or ()), *self._metadata]
        timeout = details.timeout if details.timeout is not None else self._timeout
        return _CallDetails(
            details.method,
            timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        return continuation(self._apply(details), request)

    def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        return continuation(self._apply(details), request)

    def intercept_stream_unary(
        self,
        continuation: Callable[..., Any],
        details: grpc.ClientCallDetails,
        request_iterator: Iterator[Any],
    ) -> Any:
        return continuation(self._apply(details), request_iterator)

    def intercept_stream_stream(
        self,
        continuation: Callable[..., Any],
        details: grpc.ClientCallDetails,
        request_iterator: Iterator[Any],
    ) -> Any:
        return continuation(self._apply(details), request_iterator)


class Tidemark:
    """A deployment's four services on one channel; close it (or use `with`) when done."""

    jobs: job_tracker_pb2_grpc.JobTrackerServiceStub
    replicator: replicator_pb2_grpc.ReplicatorServiceStub
    stats: stats_aggregator_pb2_grpc.StatsAggregatorServiceStub
    verifier: verifier_pb2_grpc.VerifierServiceStub

    def __init__(self, channel: grpc.Channel, endpoint: str) -> None:
        self.channel = channel
        self.endpoint = endpoint
        self.jobs = job_tracker_pb2_grpc.JobTrackerServiceStub(channel)
        self.replicator = replicator_pb2_grpc.ReplicatorServiceStub(channel)
        self.stats = stats_aggregator_pb2_grpc.StatsAggregatorServiceStub(channel)
        self.verifier = verifier_pb2_grpc.VerifierServiceStub(channel)
        # grpc.health.v1 without grpcio-health-checking: HealthCheckRequest is
        # one string field 1 and HealthCheckResponse one enum field 1, the
        # wire format of StringValue and Int32Value.
        self._check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=wrappers_pb2.StringValue.SerializeToString,
            response_deserializer=wrappers_pb2.Int32Value.FromString,
        )

    def health(self, service: str = "", *, timeout: float | None = None) -> HealthStatus:
        """The gRPC health of `service` (a full name, see `SERVICES`; "" for the server).

        Raises `grpc.RpcError` when the server does not answer or does not
        know the service (`NOT_FOUND`).
        """
        reply = self._check(wrappers_pb2.StringValue(value=service), timeout=timeout)
        try:
            return HealthStatus(reply.value)
        except ValueError:
            return HealthStatus.UNKNOWN

    def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        self.channel.close()

    def __enter__(self) -> Tidemark:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Tidemark({self.endpoint!r})"


def _env(key: str) -> str | None:
    value = os.environ.get(key)
    return value if value else None


def connect(
    endpoint: str | None = None,
    *,
    token: str | None = None,
    tls: bool | None = None,
    ca_pem: bytes | None = None,
    ca_file: StrPath | None = None,
    domain: str | None = None,
    timeout: float | None = 30.0,
    options: Sequence[tuple[str, Any]] = (),
) -> Tidemark:
    """A client of the deployment at `endpoint`; the channel connects on the first call.

    `endpoint` is `http://host:port` or `host:port` (plaintext) or
    `https://host:port` (TLS); `tls` forces either. TLS trusts the system
    roots, or the CA in `ca_pem` / `ca_file`; `domain` is the name the
    server's certificate is checked against when it is not the endpoint's
    host. `token` is sent as `authorization: Bearer <token>` with every call.
    `timeout` (seconds) is the deadline of each call that sets none.

    Unset arguments are read from the environment as the `tidemark` CLI
    reads them: `TIDEMARK_ENDPOINT` (else `DEFAULT_ENDPOINT`),
    `TIDEMARK_TOKEN`, `TIDEMARK_TLS_CA` (a file), `TIDEMARK_TLS_DOMAIN`.

    Raises `ValueError` for a malformed endpoint or TLS settings given for a
    plaintext endpoint, `OSError` when the CA file cannot be read.
    """
    url = endpoint or _env("TIDEMARK_ENDPOINT") or DEFAULT_ENDPOINT
    token = token if token is not None else _env("TIDEMARK_TOKEN")
    domain = domain if domain is not None else _env("TIDEMARK_TLS_DOMAIN")
    if ca_pem is not None and ca_file is not None:
        raise ValueError("give the TLS certificate authority as ca_pem or ca_file, not both")
    if ca_pem is None and ca_file is None:
        ca_file = _env("TIDEMARK_TLS_CA")

    scheme, sep, target = url.partition("://")
    if not sep:
        scheme, target = "", url
    if scheme not in ("", "http", "https"):
        raise ValueError(f"endpoint {url!r}: the scheme must be http:// or https://")
    target = target.rstrip("/")
    if not target or "/" in target:
        raise ValueError(f"endpoint {url!r}: expected [http[s]://]host:port")
    secure = tls if tls is not None else scheme == "https"
    if tls is False and scheme == "https":
        raise ValueError(f"endpoint {url!r} is https:// but tls=False")

    channel_options: list[tuple[str, Any]] = list(options)
    if secure:
        if ca_file is not None:
            with open(ca_file, "rb") as f:
                ca_pem = f.read()
        credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
        if domain:
            channel_options.append(("grpc.ssl_target_name_override", domain))
        channel = grpc.secure_channel(target, credentials, options=channel_options)
    else:
        if ca_pem is not None or ca_file is not None:
            raise ValueError(
                f"a TLS certificate authority was given for the plaintext endpoint {url!r}: use https://"
            )
        channel = grpc.insecure_channel(target, options=channel_options)
    intercepted = grpc.intercept_channel(channel, _Defaults(token, timeout))
    return Tidemark(intercepted, url)
