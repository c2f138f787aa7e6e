#!/usr/bin/env python3
"""A Python client of Tidemark, generated from proto/ at run time.

Generates the protobuf and gRPC stubs with grpcio-tools into a temporary
directory (never committed), then calls each of the four services and the
health service of a running deployment, printing one `ok <service> ...`
line per call. Exit status 0 when every call answered as expected.

    python clients/python/tidemark_check.py --endpoint 127.0.0.1:50051

Needs `grpcio` and `grpcio-tools` (deploy/local/up installs them in the
venv it records as TIDEMARK_PYTHON in deploy/local/.run/env).
"""

import argparse
import importlib
import importlib.resources
import pathlib
import sys
import tempfile
import uuid

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROTO = ROOT / "proto"
SERVICES = ["common", "job_tracker", "replicator", "stats_aggregator", "verifier"]


def generate(out: pathlib.Path) -> None:
    """protoc (grpcio-tools) over every tidemark proto, into `out`."""
    from grpc_tools import protoc

    include = importlib.resources.files("grpc_tools") / "_proto"
    files = [str(p.relative_to(PROTO)) for p in sorted(PROTO.glob("tidemark/*/v1/*.proto"))]
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        *files,
    ]
    if protoc.main(args) != 0:
        sys.exit(f"tidemark_check: protoc failed on {files}")
    # Packages for the generated modules (tidemark/<svc>/v1/).
    for d in [out / "tidemark", *(out / "tidemark").glob("*"), *(out / "tidemark").glob("*/v1")]:
        if d.is_dir():
            (d / "__init__.py").touch()


def stubs(name: str):
    pb = importlib.import_module(f"tidemark.{name}.v1.{name}_pb2")
    grpc_mod = importlib.import_module(f"tidemark.{name}.v1.{name}_pb2_grpc")
    return pb, grpc_mod


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", default="127.0.0.1:50051", help="host:port, plaintext")
    parser.add_argument("--token", default=None, help="bearer token, if the services need one")
    args = parser.parse_args()

    import grpc

    with tempfile.TemporaryDirectory(prefix="tidemark-py-") as tmp:
        out = pathlib.Path(tmp)
        generate(out)
        sys.path.insert(0, str(out))
        metadata = [("authorization", f"Bearer {args.token}")] if args.token else []
        channel = grpc.insecure_channel(args.endpoint)
        grpc.channel_ready_future(channel).result(timeout=30)
        return run(channel, metadata)


def run(channel, metadata) -> int:
    import grpc

    # grpc.health.v1 without the grpcio-health-checking package: the
    # request is one string field, the reply one enum field (SERVING = 1).
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=lambda service: b"\n" + bytes([len(service)]) + service.encode(),
        response_deserializer=lambda raw: raw,
    )
    for service in [
        "tidemark.job_tracker.v1.JobTrackerService",
        "tidemark.replicator.v1.ReplicatorService",
        "tidemark.stats_aggregator.v1.StatsAggregatorService",
        "tidemark.verifier.v1.VerifierService",
    ]:
        reply = check(service, timeout=10)
        assert reply == b"\x08\x01", (service, reply)
        print(f"ok health {service} SERVING")

    jt, jt_grpc = stubs("job_tracker")
    jobs = jt_grpc.JobTrackerServiceStub(channel)
    name = f"python-{uuid.uuid4().hex[:8]}"
    job = jobs.CreateJob(
        jt.CreateJobRequest(
            job=jt.Job(name=name, kind=jt.JOB_KIND_UNIT_MIGRATION, description="from Python")
        ),
        metadata=metadata,
        timeout=10,
    ).job
    assert job.revision == 1, job
    run_ = jobs.StartRun(
        jt.StartRunRequest(
            job_name=name, units=[jt.UnitSpec(unit_key="u1")], actor="python", trigger=jt.RUN_TRIGGER_MANUAL
        ),
        metadata=metadata,
        timeout=10,
    ).run
    listed = jobs.ListJobs(jt.ListJobsRequest(page_size=1000), metadata=metadata, timeout=10)
    assert any(j.name == name for j in listed.jobs), listed
    print(f"ok job-tracker CreateJob/StartRun/ListJobs {name} run {run_.run_id} {jt.RunStatus.Name(run_.status)}")
    try:
        jobs.GetJob(jt.GetJobRequest(name="no-such-job"), metadata=metadata, timeout=10)
        raise AssertionError("GetJob of a missing job answered")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.NOT_FOUND, e
        print("ok job-tracker GetJob NOT_FOUND for a missing job")

    rp, rp_grpc = stubs("replicator")
    replicator = rp_grpc.ReplicatorServiceStub(channel)
    pipelines = replicator.ListPipelines(rp.ListPipelinesRequest(page_size=10), metadata=metadata, timeout=10)
    print(f"ok replicator ListPipelines {len(pipelines.pipelines)} pipelines")
    try:
        replicator.CreatePipeline(rp.CreatePipelineRequest(name="py", actor="python"), metadata=metadata, timeout=10)
        raise AssertionError("a pipeline without a spec was accepted")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
        print("ok replicator CreatePipeline INVALID_ARGUMENT without a spec")

    sa, sa_grpc = stubs("stats_aggregator")
    stats = sa_grpc.StatsAggregatorServiceStub(channel)
    entity = f"py-{uuid.uuid4().hex[:8]}"
    events = [
        sa.Event(event_id=f"{entity}-{i}", entity_key=entity, metric="views", increment=sa.Increment(delta=i + 1))
        for i in range(5)
    ]
    ingested = stats.IngestBatch(sa.IngestBatchRequest(events=events + events[:2]), metadata=metadata, timeout=10)
    assert (ingested.accepted_count, ingested.duplicate_count) == (5, 2), ingested
    got = stats.GetStats(sa.GetStatsRequest(entity_key=entity), metadata=metadata, timeout=10)
    assert got.metrics["views"].effective_value == "15", got
    print(f"ok stats-aggregator IngestBatch/GetStats {entity} views={got.metrics['views'].effective_value}")
    state = stats.GetBufferState(sa.GetBufferStateRequest(), metadata=metadata, timeout=10).state
    print(f"ok stats-aggregator GetBufferState paused={state.paused}")

    vf, vf_grpc = stubs("verifier")
    verifier = vf_grpc.VerifierServiceStub(channel)
    try:
        verifier.GetReport(vf.GetReportRequest(verification_id="no-such-verification"), metadata=metadata, timeout=10)
        raise AssertionError("GetReport of a missing verification answered")
    except grpc.RpcError as e:
        assert e.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT), e
        print(f"ok verifier GetReport {e.code().name} for a missing verification")
    try:
        verifier.StartVerification(vf.StartVerificationRequest(actor="python"), metadata=metadata, timeout=10)
        raise AssertionError("a verification without a spec was accepted")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
        print("ok verifier StartVerification INVALID_ARGUMENT without a spec")
    print("tidemark_check: every service answered")
    return 0


if __name__ == "__main__":
    sys.exit(main())
