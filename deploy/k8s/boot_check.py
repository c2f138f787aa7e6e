#!/usr/bin/env python3
"""Starts every Deployment of the rendered base as its pod would run.

Usage: boot_check.py RENDERED.yaml BIN_DIR TIDEMARK_CLI

For each Deployment in RENDERED.yaml (`kubectl kustomize deploy/k8s/base`),
the binary its container names (from BIN_DIR, seen at /usr/local/bin as in
the image) runs with exactly the environment the pod gets: the image's ENV
(deploy/Dockerfile), then the ConfigMaps and Secrets of `envFrom`, then
`env` (Secrets get a generated value; an optional Secret that does not exist
is left out, as the kubelet does; `fieldRef: metadata.name` is the pod's
name), and the filesystem it gets: the root read-only when
`readOnlyRootFilesystem` says so, an empty tmpfs at each emptyDir mount,
the user and group of its securityContext, no capabilities.

Each pod has a network namespace of its own on a bridge, and /etc/hosts
names the others by their Service names, so `http://job-tracker:50051` and
`redis://redis:6379` resolve as in the cluster. What the cluster provides
from outside the manifests is added and named here: AWS (an endpoint URL
and credentials, as IRSA would give them) pointing at the local DynamoDB
stand-in, and Redis, both reached through a forwarder on the bridge. The
DynamoDB tables come from deploy/cloudformation/tables.yaml, created as a
stack on the stand-in, so a table a manifest names and the template lacks
fails here.

Every pod must answer its readiness probe (grpc.health.v1, its service by
name, on the probe's port) SERVING with `tidemark health` within a minute,
and still run a few seconds later. Needs root (namespaces, mounts, veth)
and boto3 + PyYAML (the local components' venv). Exit 0 when every pod
started; otherwise 1 with each failing pod's log.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import boto3
import yaml

ROOT = Path(__file__).resolve().parents[2]
SUBNET = "10.213.77"
BRIDGE = "tmboot0"
HOST_IP = f"{SUBNET}.1"
STARTUP_WITHIN = 60.0
STAYS_UP = 5.0
IMAGE_WORKDIR = "/var/lib/tidemark"
IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def say(msg: str) -> None:
    print(f"boot-check: {msg}", flush=True)


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True)


# ---------------------------------------------------------------- manifests --
class CfnLoader(yaml.SafeLoader):
    """Reads CloudFormation's short-form tags (!Ref, !If, ...) as plain data."""


def _cfn_tag(loader, suffix, node):
    if isinstance(node, yaml.ScalarNode):
        return {suffix: loader.construct_scalar(node)}
    if isinstance(node, yaml.SequenceNode):
        return {suffix: loader.construct_sequence(node, deep=True)}
    return {suffix: loader.construct_mapping(node, deep=True)}


CfnLoader.add_multi_constructor("!", _cfn_tag)


def image_env() -> tuple[dict[str, str], str]:
    """The runtime stage's ENV and USER of deploy/Dockerfile."""
    text = (ROOT / "deploy/Dockerfile").read_text()
    stage = text[text.rindex("\nFROM ") :]
    stage = re.sub(r"\\\n\s*", " ", stage)
    env: dict[str, str] = {}
    user = "0:0"
    for line in stage.splitlines():
        line = line.strip()
        if line.startswith("ENV "):
            for pair in shlex.split(line[4:]):
                key, _, value = pair.partition("=")
                env[key] = value
        elif line.startswith("USER "):
            user = line[5:].strip()
    return env, user


class Pod:
    def __init__(self, deployment: dict, configmaps: dict, index: int, token: str):
        spec = deployment["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        self.name = deployment["metadata"]["name"]
        self.pod_name = f"{self.name}-boot-0"
        self.ip = f"{SUBNET}.{10 + index}"
        self.netns = f"tmboot-{self.name}"[:15]
        self.veth = f"tmb{index}"
        self.command = container.get("command", []) + container.get("args", [])
        self.readiness = container["readinessProbe"]["grpc"]
        pod_sc = spec.get("securityContext", {})
        sc = container.get("securityContext", {})
        self.read_only = bool(sc.get("readOnlyRootFilesystem"))
        img_env, img_user = image_env()
        uid, _, gid = img_user.partition(":")
        self.uid = str(sc.get("runAsUser", pod_sc.get("runAsUser", uid)))
        self.gid = str(sc.get("runAsGroup", pod_sc.get("runAsGroup", gid or uid)))
        self.fs_group = pod_sc.get("fsGroup")
        empty = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
        self.tmpfs = [
            m["mountPath"] for m in container.get("volumeMounts", []) if m["name"] in empty
        ]
        others = [
            v["name"] for v in spec.get("volumes", []) if "emptyDir" not in v
        ]
        if others:
            raise SystemExit(f"{self.name}: volumes other than emptyDir ({others}) are not modelled")
        env = dict(img_env)
        env["PATH"] = IMAGE_PATH
        env["HOSTNAME"] = self.pod_name
        env["HOME"] = "/"
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                ref = source["configMapRef"]
                data = configmaps.get(ref["name"])
                if data is None:
                    if ref.get("optional"):
                        continue
                    raise SystemExit(f"{self.name}: ConfigMap {ref['name']} is not rendered")
                env.update(data)
            elif "secretRef" in source:
                ref = source["secretRef"]
                if not ref.get("optional"):
                    raise SystemExit(
                        f"{self.name}: envFrom Secret {ref['name']} is required: "
                        "the boot check does not know its keys"
                    )
            else:
                raise SystemExit(f"{self.name}: envFrom {source} is not modelled")
        for var in container.get("env", []):
            if "value" in var:
                env[var["name"]] = var["value"]
                continue
            source = var["valueFrom"]
            if "fieldRef" in source and source["fieldRef"]["fieldPath"] == "metadata.name":
                env[var["name"]] = self.pod_name
            elif "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                if (ref["name"], ref["key"]) == ("tidemark-auth", "auth-token"):
                    env[var["name"]] = token
                elif not ref.get("optional"):
                    raise SystemExit(f"{self.name}: Secret {ref['name']}/{ref['key']} is not modelled")
            else:
                raise SystemExit(f"{self.name}: env {var['name']} from {source} is not modelled")
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.log: Path | None = None


def load_manifests(path: Path, token: str) -> list[Pod]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    configmaps = {
        d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"
    }
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    if not deployments:
        raise SystemExit(f"no Deployment in {path}")
    return [Pod(d, configmaps, i, token) for i, d in enumerate(deployments)]


# ---------------------------------------------------------------- network --
class Forwarder:
    """TCP from HOST_IP:port on the bridge to a service on loopback."""

    def __init__(self, port: int, target: tuple[str, int]):
        self.sock = socket.create_server((HOST_IP, port), reuse_port=True)
        self.target = target
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


def net_up(pods: list[Pod]) -> None:
    net_down(pods)
    run("ip", "link", "add", BRIDGE, "type", "bridge")
    run("ip", "addr", "add", f"{HOST_IP}/24", "dev", BRIDGE)
    run("ip", "link", "set", BRIDGE, "up")
    for pod in pods:
        run("ip", "netns", "add", pod.netns)
        run("ip", "link", "add", pod.veth, "type", "veth", "peer", "name", "eth0", "netns", pod.netns)
        run("ip", "link", "set", pod.veth, "master", BRIDGE, "up")
        ns = ("ip", "netns", "exec", pod.netns)
        run(*ns, "ip", "addr", "add", f"{pod.ip}/24", "dev", "eth0")
        run(*ns, "ip", "link", "set", "eth0", "up")
        run(*ns, "ip", "link", "set", "lo", "up")
        run(*ns, "ip", "route", "add", "default", "via", HOST_IP)


def net_down(pods: list[Pod]) -> None:
    for pod in pods:
        run("ip", "netns", "del", pod.netns, check=False)
        run("ip", "link", "del", pod.veth, check=False)
    run("ip", "link", "del", BRIDGE, check=False)


# ------------------------------------------------------------------ tables --
def template_tables() -> list[str]:
    """The default names of the tables deploy/cloudformation/tables.yaml creates."""
    template = yaml.load((ROOT / "deploy/cloudformation/tables.yaml").read_text(), Loader=CfnLoader)
    names = []
    for resource in template["Resources"].values():
        if resource["Type"] != "AWS::DynamoDB::Table":
            continue
        param = resource["Properties"]["TableName"]["Ref"]
        names.append(template["Parameters"][param]["Default"])
    return sorted(names)


def create_tables(endpoint: str, tables: list[str]) -> object:
    """The template's tables as a stack on the local stand-in; every table
    in `tables` (those the manifests name) must be among them."""
    kw = dict(
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="boot-check",
        aws_secret_access_key="boot-check",
    )
    ddb = boto3.client("dynamodb", **kw)
    declared = template_tables()
    missing = [t for t in tables if t not in declared]
    if missing:
        raise SystemExit(
            f"the manifests name tables deploy/cloudformation/tables.yaml does not create: {missing}"
        )
    drop_tables(ddb, declared)
    cf = boto3.client("cloudformation", **kw)
    body = (ROOT / "deploy/cloudformation/tables.yaml").read_text()
    # The local stand-in fails CreateStack on this template's Outputs
    # (moto 5: TypeError in validate_outputs); the resources are what the
    # pods need, so the stack is created without them.
    body = body[: body.index("\nOutputs:")] + "\n"
    stack = f"tidemark-boot-check-{int(time.time())}"
    cf.create_stack(StackName=stack, TemplateBody=body)
    deadline = time.monotonic() + 60
    while True:
        status = cf.describe_stacks(StackName=stack)["Stacks"][0]["StackStatus"]
        if not status.endswith("IN_PROGRESS"):
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"stack {stack} still {status} after 60 s")
        time.sleep(0.5)
    if status != "CREATE_COMPLETE":
        raise SystemExit(f"stack {stack}: {status}")
    names = set(ddb.list_tables()["TableNames"])
    absent = [t for t in declared if t not in names]
    if absent:
        raise SystemExit(f"stack {stack} did not create {absent}")
    say(f"stack {stack} created the tables {declared}")
    return ddb


def drop_tables(ddb, tables: list[str]) -> None:
    """Removes `tables` from the local stand-in (deletion protection first)."""
    names = set(ddb.list_tables()["TableNames"])
    for t in tables:
        if t in names:
            ddb.update_table(TableName=t, DeletionProtectionEnabled=False)
            ddb.delete_table(TableName=t)


# -------------------------------------------------------------------- pods --
def start(pod: Pod, bin_dir: Path, hosts: Path, logs: Path) -> None:
    # The image's binaries at /usr/local/bin (read-only, as an image layer
    # is), the cluster's /etc/hosts.
    mounts = [
        f"mount --bind {shlex.quote(str(hosts))} /etc/hosts",
        f"mount --bind {shlex.quote(str(bin_dir))} /usr/local/bin",
        "mount -o remount,bind,ro /usr/local/bin",
    ]
    group = pod.fs_group if pod.fs_group is not None else pod.gid
    for path in pod.tmpfs:
        mounts.append(f"mount -t tmpfs -o mode=2775,gid={group} tmpfs {shlex.quote(path)}")
    if pod.read_only:
        mounts.append("mount -o remount,bind,ro /")
    env = [f"{k}={v}" for k, v in sorted(pod.env.items())]
    groups = f"--groups={pod.fs_group}" if pod.fs_group is not None else "--clear-groups"
    exec_line = " ".join(
        shlex.quote(a)
        for a in [
            "setpriv",
            f"--reuid={pod.uid}",
            f"--regid={pod.gid}",
            groups,
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--no-new-privs",
            "env",
            "-i",
            *env,
            *pod.command,
        ]
    )
    # The image's WORKDIR where this machine has it, else /.
    script = "set -e\n" + "\n".join(mounts) + f"\ncd {IMAGE_WORKDIR} 2>/dev/null || cd /\nexec {exec_line}\n"
    pod.log = logs / f"{pod.name}.log"
    out = pod.log.open("w")
    pod.proc = subprocess.Popen(
        ["ip", "netns", "exec", pod.netns, "unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        stdout=out,
        stderr=subprocess.STDOUT,
    )


def health(cli: Path, pod: Pod, token: str) -> tuple[bool, str]:
    if pod.readiness.get("service") != grpc_name(pod.name):
        return False, f"the readiness probe asks for {pod.readiness.get('service')!r}"
    args = [
        str(cli),
        "--endpoint",
        f"http://{pod.ip}:{pod.readiness['port']}",
        "--token",
        token,
        "--call-timeout",
        "2s",
        "health",
        "--service",
        pod.name,
    ]
    r = subprocess.run(args, capture_output=True, text=True, timeout=20)
    return r.returncode == 0, (r.stdout + r.stderr).strip()


def grpc_name(service: str) -> str:
    """The gRPC service a Deployment serves, by its name."""
    snake = service.replace("-", "_")
    camel = "".join(p.title() for p in service.split("-"))
    return f"tidemark.{snake}.v1.{camel}Service"


def main() -> int:
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    rendered, bin_dir, cli = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    if os.geteuid() != 0:
        say("needs root (network namespaces, mounts): run it as root, as CI does")
        return 1
    local = dict(
        line.split("=", 1)
        for line in (ROOT / "deploy/local/.run/env").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    dynamo = local["TIDEMARK_TEST_DYNAMODB_ENDPOINT"]
    redis = local["TIDEMARK_TEST_REDIS_URL"]
    token = secrets.token_hex(16)
    pods = load_manifests(rendered, token)
    tables = sorted(
        {
            v
            for p in pods
            for k, v in p.env.items()
            if k in ("TIDEMARK_DYNAMODB_TABLE", "TIDEMARK_STATS_TABLE", "TIDEMARK_DEAD_LETTER_TABLE")
        }
    )
    work = Path(tempfile.mkdtemp(prefix="tidemark-boot-check.", dir="/var/tmp"))
    work.chmod(0o755)
    bins = work / "bin"
    bins.mkdir()
    for pod in pods:
        name = pod.command[0]
        shutil.copy2(bin_dir / name, bins / name)
        (bins / name).chmod(0o755)
    logs = work / "logs"
    logs.mkdir()
    hosts = work / "hosts"
    lines = ["127.0.0.1 localhost", f"{HOST_IP} redis"]
    lines += [f"{p.ip} {p.name} {p.name}.tidemark {p.name}.tidemark.svc.cluster.local" for p in pods]
    hosts.write_text("\n".join(lines) + "\n")
    hosts.chmod(0o644)
    dyn_host, dyn_port = re.match(r"https?://([^:/]+):(\d+)", dynamo).groups()
    redis_host, redis_port = re.match(r"redis://([^:/]+):(\d+)", redis).groups()
    cluster_env = {
        "AWS_ENDPOINT_URL": f"http://{HOST_IP}:{dyn_port}",
        "AWS_ACCESS_KEY_ID": "boot-check",
        "AWS_SECRET_ACCESS_KEY": "boot-check",
    }
    for pod in pods:
        pod.env.update(cluster_env)
        if pod.env.get("TIDEMARK_REDIS_URL") not in (None, "redis://redis:6379"):
            say(f"{pod.name}: TIDEMARK_REDIS_URL {pod.env['TIDEMARK_REDIS_URL']} is not the redis Service")
    failed: list[str] = []
    forwarders: list[Forwarder] = []
    ddb = None
    try:
        ddb = create_tables(dynamo, tables)
        net_up(pods)
        forwarders = [
            Forwarder(int(dyn_port), (dyn_host, int(dyn_port))),
            Forwarder(6379, (redis_host, int(redis_port))),
        ]
        for pod in pods:
            say(
                f"{pod.name}: {' '.join(pod.command)} as {pod.uid}:{pod.gid} at {pod.ip}, root "
                f"{'read-only' if pod.read_only else 'writable'}, tmpfs {pod.tmpfs}, "
                f"{len(pod.env)} variables"
            )
            start(pod, bins, hosts, logs)
        deadline = time.monotonic() + STARTUP_WITHIN
        pending = {p.name: p for p in pods}
        last: dict[str, str] = {}
        while pending and time.monotonic() < deadline:
            for name, pod in list(pending.items()):
                if pod.proc.poll() is not None:
                    last[name] = f"exited with {pod.proc.returncode}"
                    del pending[name]
                    failed.append(name)
                    continue
                # The readiness probe: its service by name (SERVING only once
                # the server is up and the backends it needs answer).
                ok, out = health(cli, pod, token)
                last[name] = out
                if ok:
                    say(f"{name}: readiness probe SERVING")
                    del pending[name]
            time.sleep(1)
        for name in pending:
            say(f"{name}: not SERVING within {STARTUP_WITHIN:.0f} s: {last.get(name, '')}")
            failed.append(name)
        time.sleep(STAYS_UP)
        for pod in pods:
            if pod.name not in failed and pod.proc.poll() is not None:
                say(f"{pod.name}: exited with {pod.proc.returncode} after it was SERVING")
                failed.append(pod.name)
    finally:
        for pod in pods:
            if pod.proc and pod.proc.poll() is None:
                pod.proc.terminate()
        for pod in pods:
            if pod.proc:
                try:
                    pod.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pod.proc.kill()
        for f in forwarders:
            f.close()
        net_down(pods)
        if ddb is not None:
            drop_tables(ddb, template_tables())
    for name in failed:
        pod = next(p for p in pods if p.name == name)
        say(f"--- {name}'s log ({pod.log}) ---")
        print(pod.log.read_text()[-6000:] if pod.log and pod.log.exists() else "(none)")
    if failed:
        say(f"FAILED: {', '.join(sorted(set(failed)))}")
        return 1
    shutil.rmtree(work, ignore_errors=True)
    say(f"all {len(pods)} Deployments started as their pods would")
    return 0


if __name__ == "__main__":
    sys.exit(main())
