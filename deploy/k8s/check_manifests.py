"""Checks of rendered Tidemark manifests that no schema can make.

Usage: check_manifests.py REPO_ROOT RENDERED.yaml [RENDERED.yaml ...]

The Kubernetes schemas say a manifest is well formed; these say it fits
Tidemark: every TIDEMARK_* key is a real configuration key (the services
silently ignore unknown ones), probes ask for the gRPC service the binary
serves, the termination grace covers preStop + drain + shutdown grace,
references resolve, and the mesh routes list exactly the streaming RPCs of
the protos (so a timeout never cuts a stream). kubernetes-validate has no
schema for the mesh kinds (Istio's fields are checked by check_istio.py;
Linkerd's and the Gateway API's nowhere): every kind is checked against a
list, so a misspelt kind or apiVersion fails here instead of passing
unseen, and the mesh resources' references are resolved.
Prints one line per problem and exits 1 if there is any.
"""

import pathlib
import re
import sys

import yaml

# Kinds the Kubernetes schemas check (deploy/check runs kubernetes-validate
# without its warnings, so a kind outside these lists must fail here).
CORE_KINDS = {
    ("v1", "Namespace"),
    ("v1", "ServiceAccount"),
    ("v1", "ConfigMap"),
    ("v1", "Service"),
    ("apps/v1", "Deployment"),
    ("policy/v1", "PodDisruptionBudget"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
}
# Mesh kinds the overlays use: no Kubernetes schema; references checked here.
MESH_KINDS = {
    ("networking.istio.io/v1", "DestinationRule"),
    ("networking.istio.io/v1", "VirtualService"),
    ("security.istio.io/v1", "PeerAuthentication"),
    ("policy.linkerd.io/v1beta3", "Server"),
    ("policy.linkerd.io/v1beta3", "HTTPRoute"),
    ("policy.linkerd.io/v1alpha1", "AuthorizationPolicy"),
    ("policy.linkerd.io/v1alpha1", "MeshTLSAuthentication"),
    ("policy.linkerd.io/v1alpha1", "NetworkAuthentication"),
    ("gateway.networking.k8s.io/v1", "GRPCRoute"),
}
# Environment the services read besides TIDEMARK_* (AWS SDK, OTLP export).
OTHER_ENV = re.compile(r"^(AWS_[A-Z_]+|OTEL_[A-Z_]+)$")
SERVICES = ("job-tracker", "replicator", "stats-aggregator", "verifier")

problems = []


def problem(where, what):
    problems.append(f"{where}: {what}")


def struct_fields(path, struct):
    """`pub name:` fields of `pub struct <struct> {` in a Rust file."""
    text = path.read_text()
    m = re.search(r"pub struct " + struct + r" \{(.*?)\n\}", text, re.S)
    if not m:
        sys.exit(f"check_manifests: no `pub struct {struct}` in {path}")
    return {f for f in re.findall(r"^\s*pub (\w+):", m.group(1), re.M) if f != "server"}


# Unary RPCs that wait by design, each bounded by the service itself past
# its request_timeout_ms (the kit's `allow_longer`): they share the
# streams' un-timed mesh route, which a 35 s route timeout would cut.
WAITS = {"job-tracker": {"ClaimUnit"}, "replicator": {"Drain"}}


def proto_rpcs(root, svc):
    """(full service name, names of its streaming RPCs) from a service's proto."""
    snake = svc.replace("-", "_")
    path = root / "proto" / "tidemark" / snake / "v1" / f"{snake}.proto"
    text = path.read_text()
    name = re.search(r"^service (\w+) \{", text, re.M).group(1)
    streams = set()
    for rpc, req, resp in re.findall(
        r"^\s*rpc (\w+)\(([^)]*)\) returns \(([^)]*)\)", text, re.M
    ):
        if req.startswith("stream ") or resp.startswith("stream "):
            streams.add(rpc)
    return f"tidemark.{snake}.v1.{name}", streams


def env_of(container, configmaps, where):
    """The container's environment: envFrom ConfigMaps, then env entries."""
    env = {}
    for src in container.get("envFrom", []):
        ref = src.get("configMapRef")
        if ref:
            cm = configmaps.get(ref["name"])
            if cm is None:
                problem(where, f"envFrom ConfigMap {ref['name']} is not in the manifests")
                continue
            env.update(cm.get("data", {}))
    for e in container.get("env", []):
        env[e["name"]] = e.get("value", e.get("valueFrom"))
    return env


def millis(env, key, default):
    value = env.get(key, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def check(root, rendered):
    docs = [d for d in yaml.safe_load_all(rendered.read_text()) if d]
    label = rendered.name
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
        if (d["apiVersion"], d["kind"]) not in CORE_KINDS | MESH_KINDS:
            problem(label, f"{d['apiVersion']} {d['kind']} is not a kind this check knows (typo? else add it to its list)")
        if d["kind"] != "Namespace" and d["metadata"].get("namespace") != "tidemark":
            problem(label, f"{d['kind']}/{d['metadata']['name']} is not in namespace tidemark")

    configmaps = by_kind.get("ConfigMap", {})
    deployments = by_kind.get("Deployment", {})
    services = by_kind.get("Service", {})
    server_keys = struct_fields(root / "services/kit/src/config.rs", "ServerConfig")
    dockerfile = (root / "deploy/Dockerfile").read_text()

    for svc in SERVICES:
        where = f"{label}: Deployment/{svc}"
        dep = deployments.get(svc)
        if dep is None:
            problem(label, f"no Deployment {svc}")
            continue
        pod = dep["spec"]["template"]["spec"]
        (c,) = [c for c in pod["containers"] if c["name"] == svc]
        grpc_name, streams = proto_rpcs(root, svc)
        streams = streams | WAITS.get(svc, set())
        # A service keeps its Config in config.rs when it has one, else in lib.rs.
        config_rs = root / f"services/{svc}/src/config.rs"
        src = config_rs if config_rs.exists() else root / f"services/{svc}/src/lib.rs"
        keys = server_keys | struct_fields(src, "Config")

        if c.get("command") != [svc]:
            problem(where, f"command {c.get('command')} is not [{svc!r}]")
        if f"-p {svc}" not in dockerfile or f"target/dist/{svc}" not in dockerfile:
            problem(where, f"deploy/Dockerfile does not build and copy the {svc} binary")

        env = env_of(c, configmaps, where)
        for key in env:
            if key.startswith("TIDEMARK_"):
                if key[len("TIDEMARK_"):].lower() not in keys:
                    problem(where, f"{key} is not a configuration key of {svc} (the service would ignore it)")
            elif not OTHER_ENV.match(key):
                problem(where, f"environment variable {key} is read by nothing")
        for e in c.get("env", []):
            ref = (e.get("valueFrom") or {}).get("configMapKeyRef")
            if ref and ref["name"] not in configmaps:
                problem(where, f"{e['name']} refers to a missing ConfigMap {ref['name']}")

        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        for name, key in (("grpc", "TIDEMARK_LISTEN"), ("metrics", "TIDEMARK_METRICS_LISTEN")):
            listen = str(env.get(key, ""))
            if not listen.startswith("0.0.0.0:") or ports.get(name) != int(listen.rsplit(":", 1)[1]):
                problem(where, f"port {name} ({ports.get(name)}) does not match {key}={listen or 'unset'}")

        for probe_name in ("readinessProbe", "livenessProbe", "startupProbe"):
            probe = (c.get(probe_name) or {}).get("grpc")
            if probe is None:
                problem(where, f"{probe_name} is not a gRPC probe")
                continue
            if probe.get("port") != ports.get("grpc"):
                problem(where, f"{probe_name} probes port {probe.get('port')}, not the grpc port")
            wanted = grpc_name if probe_name == "readinessProbe" else ""
            if probe.get("service", "") != wanted:
                problem(where, f"{probe_name} asks for service {probe.get('service')!r}, expected {wanted!r}")

        # SIGTERM comes after preStop; then the service drains and waits its grace.
        pre = c.get("lifecycle", {}).get("preStop", {})
        sleep = pre.get("sleep", {}).get("seconds")
        if sleep is None:
            cmd = pre.get("exec", {}).get("command", [])
            sleep = int(cmd[1]) if len(cmd) == 2 and cmd[0] == "sleep" else None
        drain = millis(env, "TIDEMARK_DRAIN_DELAY_MS", 0)
        grace = millis(env, "TIDEMARK_SHUTDOWN_GRACE_MS", 20000)
        tgps = pod.get("terminationGracePeriodSeconds", 30)
        if sleep is None or drain is None or grace is None:
            problem(where, "preStop sleep, drain_delay_ms or shutdown_grace_ms is not a number")
        elif tgps < sleep + (drain + grace) / 1000:
            problem(where, f"terminationGracePeriodSeconds {tgps} < preStop {sleep} s + drain {drain} ms + grace {grace} ms")

        if svc == "replicator":
            wid = (c.get("env") and {e["name"]: e for e in c["env"]}.get("TIDEMARK_WORKER_ID")) or {}
            if (wid.get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath") != "metadata.name":
                problem(where, "TIDEMARK_WORKER_ID must come from the pod name (leases need one id per replica)")

        # Auth on by default: the token from the one Secret every service
        # shares (the workers send it to the job-tracker), never optional,
        # and no variant turning it off. An overlay meant for a mesh that
        # authorises callers would set TIDEMARK_INSECURE on purpose: change
        # this rule with it.
        tok = {e["name"]: e for e in c.get("env", [])}.get("TIDEMARK_AUTH_TOKEN") or {}
        ref = (tok.get("valueFrom") or {}).get("secretKeyRef") or {}
        if (ref.get("name"), ref.get("key")) != ("tidemark-auth", "auth-token") or ref.get("optional"):
            problem(where, "TIDEMARK_AUTH_TOKEN must come from Secret tidemark-auth, key auth-token, not optional")
        if str(env.get("TIDEMARK_INSECURE", "false")).lower() not in ("false", "0", ""):
            problem(where, "TIDEMARK_INSECURE turns authentication off")

        s = services.get(svc)
        if s is None:
            problem(label, f"no Service {svc}")
        else:
            sp = {p["name"]: p for p in s["spec"]["ports"]}
            if sp.get("grpc", {}).get("appProtocol") != "grpc" or sp["grpc"].get("targetPort") != "grpc":
                problem(f"{label}: Service/{svc}", "port grpc must target grpc with appProtocol grpc")
            if s["spec"]["selector"] != dep["spec"]["selector"]["matchLabels"]:
                problem(f"{label}: Service/{svc}", "selector differs from the Deployment's")

        # Mesh routes: the streaming RPCs (and the waiting ones) must be
        # exactly the un-timed route.
        vs = by_kind.get("VirtualService", {}).get(svc)
        if vs:
            routes = {r.get("name"): r for r in vs["spec"]["http"]}
            listed = {m["uri"]["exact"] for m in routes.get("streams", {}).get("match", [])}
            want = {f"/{grpc_name}/{m}" for m in streams}
            if listed != want:
                problem(f"{label}: VirtualService/{svc}", f"streams route lists {sorted(listed)}, the proto streams {sorted(want)}")
            if routes.get("streams", {}).get("timeout") != "0s":
                problem(f"{label}: VirtualService/{svc}", "streams route must have timeout 0s")
        gr = by_kind.get("GRPCRoute", {}).get(f"{svc}-streams")
        if "GRPCRoute" in by_kind:
            if gr is None:
                problem(label, f"no GRPCRoute {svc}-streams")
            else:
                listed = {
                    m["method"].get("method")
                    for r in gr["spec"]["rules"]
                    for m in r["matches"]
                    if m["method"].get("service") == grpc_name
                }
                if listed != streams:
                    problem(f"{label}: GRPCRoute/{svc}-streams", f"lists {sorted(listed)}, the proto streams {sorted(streams)}")
                if "timeout.linkerd.io/request" in gr["metadata"].get("annotations", {}):
                    problem(f"{label}: GRPCRoute/{svc}-streams", "a request timeout would cut the streams")

    for cm_name, cm in configmaps.items():
        users = [
            d for d in deployments.values()
            if any(
                (src.get("configMapRef") or {}).get("name") == cm_name
                for c in d["spec"]["template"]["spec"]["containers"]
                for src in c.get("envFrom", [])
            )
        ]
        if not users:
            problem(label, f"ConfigMap {cm_name} is used by no Deployment")

    for kind in ("PodDisruptionBudget",):
        for name, pdb in by_kind.get(kind, {}).items():
            sel = pdb["spec"]["selector"]["matchLabels"]
            if not any(sel.items() <= d["spec"]["template"]["metadata"]["labels"].items() for d in deployments.values()):
                problem(label, f"{kind}/{name} selects no Deployment's pods")
    for name, policy in by_kind.get("NetworkPolicy", {}).items():
        sel = policy["spec"]["podSelector"].get("matchLabels", {})
        selected = [
            d for d in deployments.values()
            if sel.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        if not selected:
            problem(label, f"NetworkPolicy/{name} selects no Deployment's pods")
        for rule in policy["spec"].get("ingress", []):
            for port in rule.get("ports", []):
                for d in selected:
                    names = {
                        p.get("name")
                        for c in d["spec"]["template"]["spec"]["containers"]
                        for p in c.get("ports", [])
                    }
                    if isinstance(port["port"], str) and port["port"] not in names:
                        problem(label, f"NetworkPolicy/{name} allows port {port['port']}, which Deployment/{d['metadata']['name']} does not name")
    if deployments and not by_kind.get("NetworkPolicy"):
        problem(label, "no NetworkPolicy: the base's default deny of ingress is missing")
    version = re.search(
        r'^\[workspace\.package\][^\[]*?^version\s*=\s*"([^"]+)"',
        (root / "Cargo.toml").read_text(),
        re.M | re.S,
    )
    for d in deployments.values():
        for c in d["spec"]["template"]["spec"]["containers"]:
            image = c["image"]
            tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
            if version and tag != version.group(1):
                problem(
                    label,
                    f"Deployment/{d['metadata']['name']} runs image {image}: pin the tag to the release, {version.group(1)} (the workspace version)",
                )
    for name, hpa in by_kind.get("HorizontalPodAutoscaler", {}).items():
        target = deployments.get(hpa["spec"]["scaleTargetRef"]["name"])
        if target is None:
            problem(label, f"HorizontalPodAutoscaler/{name} scales a missing Deployment")
        elif "replicas" in target["spec"]:
            problem(label, f"Deployment/{target['metadata']['name']} sets replicas although an HPA scales it (each apply would reset it)")
    for name, d in by_kind.get("DestinationRule", {}).items():
        if d["spec"]["host"].split(".")[0] not in services:
            problem(label, f"DestinationRule/{name} host {d['spec']['host']} is no Service")
    for name, d in by_kind.get("VirtualService", {}).items():
        for h in d["spec"]["hosts"]:
            if h.split(".")[0] not in services:
                problem(label, f"VirtualService/{name} host {h} is no Service")
    for name, d in by_kind.get("GRPCRoute", {}).items():
        for p in d["spec"]["parentRefs"]:
            if p["name"] not in services:
                problem(label, f"GRPCRoute/{name} parent {p['name']} is no Service")
    for name, d in by_kind.get("AuthorizationPolicy", {}).items():
        t = d["spec"]["targetRef"]
        if t["name"] not in by_kind.get(t["kind"], {}):
            problem(label, f"AuthorizationPolicy/{name} targets a missing {t['kind']} {t['name']}")
        for ref in d["spec"]["requiredAuthenticationRefs"]:
            if ref["name"] not in by_kind.get(ref["kind"], {}):
                problem(label, f"AuthorizationPolicy/{name} needs a missing {ref['kind']} {ref['name']}")
    for name, d in by_kind.get("HTTPRoute", {}).items():
        for p in d["spec"]["parentRefs"]:
            if p["name"] not in by_kind.get(p["kind"], {}):
                problem(label, f"HTTPRoute/{name} parent {p['kind']} {p['name']} is missing")
    for name, d in by_kind.get("MeshTLSAuthentication", {}).items():
        for ref in d["spec"].get("identityRefs", []):
            if ref["kind"] == "ServiceAccount" and ref["name"] not in by_kind.get("ServiceAccount", {}):
                problem(label, f"MeshTLSAuthentication/{name} names a missing ServiceAccount {ref['name']}")
    return len(docs)


def main():
    root = pathlib.Path(sys.argv[1])
    for path in sys.argv[2:]:
        n = check(root, pathlib.Path(path))
        print(f"check_manifests: {pathlib.Path(path).name}: {n} resources checked")
    for p in problems:
        print(f"check_manifests: ERROR: {p}", file=sys.stderr)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
