"""Calls each service of a running Tidemark deployment (`tidemark-check`).

Asks the health of every service, then calls each of the four services,
printing one `ok <service> ...` line per call. Exit status 0 when every call
answered as expected, 1 when one did not, 2 on bad usage.

    tidemark-check --endpoint http://127.0.0.1:50051
    python -m tidemark_client.check --endpoint https://host:50051 --tls-ca ca.pem
"""

from __future__ import annotations

import argparse
import sys
import uuid
from collections.abc import Callable, Sequence

import grpc

from tidemark_client import (
    SERVICES,
    HealthStatus,
    Tidemark,
    connect,
    job_tracker_pb2 as jt,
    replicator_pb2 as rp,
    stats_aggregator_pb2 as sa,
    verifier_pb2 as vf,
)


class CheckFailed(Exception):
    """A service answered other than expected."""


def expect(condition: bool, what: str) -> None:
    """Raises `CheckFailed(what)` unless `condition` holds."""
    if not condition:
        raise CheckFailed(what)


def expect_error(codes: Sequence[grpc.StatusCode], what: str, call: Callable[[], object]) -> grpc.StatusCode:
    """Calls `call()`, which must fail with one of `codes`; returns the code."""
    try:
        call()
    except grpc.RpcError as e:
        code: grpc.StatusCode = e.code()
        expect(code in codes, f"{what}: {code.name}, expected {' or '.join(c.name for c in codes)}: {e}")
        return code
    raise CheckFailed(f"{what}: answered, expected {' or '.join(c.name for c in codes)}")


def check_health(t: Tidemark, names: Sequence[str]) -> None:
    for name in names:
        service = SERVICES[name]
        status = t.health(service)
        expect(status == HealthStatus.SERVING, f"health of {service}: {status.name}")
        print(f"ok health {service} SERVING")


def check_job_tracker(t: Tidemark) -> None:
    name = f"python-{uuid.uuid4().hex[:8]}"
    job = t.jobs.CreateJob(
        jt.CreateJobRequest(job=jt.Job(name=name, kind=jt.JOB_KIND_UNIT_MIGRATION, description="from Python"))
    ).job
    expect(job.revision == 1, f"CreateJob: revision {job.revision}, expected 1")
    run = t.jobs.StartRun(
        jt.StartRunRequest(
            job_name=name, units=[jt.UnitSpec(unit_key="u1")], actor="python", trigger=jt.RUN_TRIGGER_MANUAL
        )
    ).run
    listed = t.jobs.ListJobs(jt.ListJobsRequest(page_size=1000))
    expect(any(j.name == name for j in listed.jobs), f"ListJobs: {name} not listed")
    print(
        f"ok job-tracker CreateJob/StartRun/ListJobs {name} run {run.run_id} {jt.RunStatus.Name(run.status)}"
    )
    expect_error(
        [grpc.StatusCode.NOT_FOUND],
        "GetJob of a missing job",
        lambda: t.jobs.GetJob(jt.GetJobRequest(name="no-such-job")),
    )
    print("ok job-tracker GetJob NOT_FOUND for a missing job")


def check_replicator(t: Tidemark) -> None:
    pipelines = t.replicator.ListPipelines(rp.ListPipelinesRequest(page_size=10))
    print(f"ok replicator ListPipelines {len(pipelines.pipelines)} pipelines")
    expect_error(
        [grpc.StatusCode.INVALID_ARGUMENT],
        "CreatePipeline without a spec",
        lambda: t.replicator.CreatePipeline(rp.CreatePipelineRequest(name="py", actor="python")),
    )
    print("ok replicator CreatePipeline INVALID_ARGUMENT without a spec")


def check_stats(t: Tidemark) -> None:
    entity = f"py-{uuid.uuid4().hex[:8]}"
    events = [
        sa.Event(
            event_id=f"{entity}-{i}", entity_key=entity, metric="views", increment=sa.Increment(delta=i + 1)
        )
        for i in range(5)
    ]
    ingested = t.stats.IngestBatch(sa.IngestBatchRequest(events=events + events[:2]))
    counts = (ingested.accepted_count, ingested.duplicate_count)
    expect(counts == (5, 2), f"IngestBatch: accepted, duplicates {counts}, expected (5, 2)")
    got = t.stats.GetStats(sa.GetStatsRequest(entity_key=entity))
    views = got.metrics["views"].effective_value
    expect(views == "15", f"GetStats {entity}: views={views}, expected 15")
    print(f"ok stats-aggregator IngestBatch/GetStats {entity} views={views}")
    state = t.stats.GetBufferState(sa.GetBufferStateRequest()).state
    print(f"ok stats-aggregator GetBufferState paused={state.paused}")


def check_verifier(t: Tidemark) -> None:
    code = expect_error(
        [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT],
        "GetReport of a missing verification",
        lambda: t.verifier.GetReport(vf.GetReportRequest(verification_id="no-such-verification")),
    )
    print(f"ok verifier GetReport {code.name} for a missing verification")
    expect_error(
        [grpc.StatusCode.INVALID_ARGUMENT],
        "StartVerification without a spec",
        lambda: t.verifier.StartVerification(vf.StartVerificationRequest(actor="python")),
    )
    print("ok verifier StartVerification INVALID_ARGUMENT without a spec")


def main(argv: Sequence[str] | None = None) -> int:
    """The `tidemark-check` command; returns its exit status."""
    parser = argparse.ArgumentParser(
        prog="tidemark-check", description="Calls each service of a running Tidemark deployment."
    )
    parser.add_argument(
        "--endpoint",
        help="http://host:port or host:port (plaintext), https://host:port (TLS) "
        "[env: TIDEMARK_ENDPOINT; default http://127.0.0.1:50051]",
    )
    parser.add_argument("--token", help="bearer token, when the services need one [env: TIDEMARK_TOKEN]")
    parser.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="PEM of the CA that signed the server's certificate [env: TIDEMARK_TLS_CA]",
    )
    parser.add_argument(
        "--tls-domain",
        metavar="NAME",
        help="the name the server's certificate is checked against [env: TIDEMARK_TLS_DOMAIN]",
    )
    parser.add_argument(
        "--only",
        choices=["job-tracker"],
        help="call only this service (and its health), e.g. a lone job-tracker",
    )
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="deadline of each call, seconds (default 10)"
    )
    args = parser.parse_args(argv)

    try:
        client = connect(
            args.endpoint, token=args.token, ca_file=args.tls_ca, domain=args.tls_domain, timeout=args.timeout
        )
    except (ValueError, OSError) as e:
        parser.error(str(e))
    with client as t:
        try:
            if args.only == "job-tracker":
                check_health(t, ["job-tracker"])
                check_job_tracker(t)
            else:
                check_health(t, list(SERVICES))
                check_job_tracker(t)
                check_replicator(t)
                check_stats(t)
                check_verifier(t)
        except grpc.RpcError as e:
            code = e.code()
            details = e.details()
            print(f"tidemark_check: {t.endpoint}: {code.name}: {details}", file=sys.stderr)
            return 1
        except CheckFailed as e:
            print(f"tidemark_check: {t.endpoint}: {e}", file=sys.stderr)
            return 1
    if args.only:
        print(f"tidemark_check: {args.only} answered")
    else:
        print("tidemark_check: every service answered")
    return 0


if __name__ == "__main__":
    sys.exit(main())
