#!/usr/bin/env python3
"""Checks of the Helm chart helm/chipsite, run by tests/helm/run.sh in its venv.

Steps (each prints its wall time):
  1. lint (strict, against Kubernetes 1.34) with the default values and with
     ci/production-values.yaml;
  2. render both with Helm 4's engine (helm-python-sdk, no helm binary);
  3. the schema refuses ci/bad-values.yaml (render and lint fail, naming
     each bad field) and a few more bad values;
  4. every built-in object passes kubernetes-validate --strict (its Python
     API) for Kubernetes 1.34 and the package's newest; the custom resources
     (CloudNativePG Cluster, cert-manager Certificate and Issuer), which
     kubernetes-validate does not know, pass crd_schemas.py;
  5. what a reviewer cares about (`review`): pod and container security,
     single and replicated services, Services, NetworkPolicies against the
     caller table, PKI and database mounts, the pass phrase;
  6. the review trips on broken manifests (each mutation must be caught);
  7. checkov (framework kubernetes) on both renders: no failed check, skips
     only by annotation in the chart, each with its reason printed.

The product facts below (ports, callers, singles) are written from the
service's documentation, not read from the chart, so that the chart is
checked against them rather than against itself.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml

import crd_schemas

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "chipsite"
NAMESPACE = "chipsite"
KUBE_VERSIONS = sorted({"1.34.0", kubernetes_validate.latest_version()})
LINT_KUBE_VERSION = "v1.34.0"

APP_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
OPS = 9090
POOL = 8  # connections per service process (crates/store), admin one more (LISTEN)

# name: values key, single, stores something, main port, internal ports and
# their callers, external ports (reachable from anywhere).
COMPONENTS: dict[str, dict[str, Any]] = {
    "admin": dict(key="admin", single=True, db=True, listen=44310,
                  internal={44310: {"console", "user-gateway", "peer-gateway"}}, external=set()),
    "key-vault": dict(key="keyVault", single=True, db=True, listen=44311,
                      internal={44311: {"admin", "ticket", "user-gateway", "peer-gateway", "tally", "console"}},
                      external=set()),
    "ticket": dict(key="ticket", single=False, db=True, listen=44312,
                   internal={44312: {"admin", "user-gateway", "peer-gateway", "console"}}, external=set()),
    "user-gateway": dict(key="userGateway", single=False, db=False, listen=44301,
                         internal={}, external={44301}),
    "peer-gateway": dict(key="peerGateway", single=False, db=True, listen=44313,
                         internal={44313: {"admin", "user-gateway", "console"}}, external={44302}),
    "tally": dict(key="tally", single=True, db=True, listen=44314,
                  internal={44314: {"admin", "user-gateway", "peer-gateway", "console"}}, external=set()),
    # 44303: plain HTTP behind the TLS ingress; 44304: the admin-certificate port.
    "console": dict(key="console", single=True, db=False, listen=44303,
                    internal={}, external={44303, 44304}),
}
# Ports that only a ClusterIP Service may carry.
CLUSTER_ONLY_PORTS = {44310, 44311, 44312, 44313, 44314, OPS, 44303}
IDENTITIES = ["admin", "key-vault", "ticket", "user-gateway", "peer-gateway", "tally", "console", "admin-client"]

VALUE_SETS: dict[str, tuple[Path | dict[str, Any] | None, str]] = {
    # label: (values file, or values, or None for the defaults; release name)
    "default": (None, "chipsite"),
    "production": (CHART / "ci" / "production-values.yaml", "site-a"),
    # The other branches of the templates.
    "variant": ({
        "fullnameOverride": "chips",
        "pki": {"mode": "cert-manager", "adminClientCertificate": False,
                "issuerRef": {"name": "site-ca", "kind": "ClusterIssuer"}},
        "database": {"existingSecret": "site-db", "secretKey": "dsn"},
        "keyVault": {"passphraseSecret": "site-key-pass", "passphraseKey": "pp"},
        "admin": {"operatorAllowFrom": [{"ipBlock": {"cidr": "192.0.2.0/24"}}]},
        "ticket": {"replicas": 3},
        "userGateway": {"service": {"type": "NodePort", "port": 44301, "nodePort": 30443}},
        "console": {"https": {"enabled": False}, "hosts": ["ops.example.org"]},
    }, "v1"),
}


class Failed(Exception):
    pass


@contextmanager
def step(title: str) -> Iterator[None]:
    print(f"\n==> {title}", flush=True)
    start = time.monotonic()
    try:
        yield
    finally:
        print(f"    ({title}: {time.monotonic() - start:.1f} s)", flush=True)


def load_values(path: Path | dict[str, Any] | None) -> dict[str, Any]:
    if isinstance(path, dict):
        return copy.deepcopy(path)
    return {} if path is None else (yaml.safe_load(path.read_text()) or {})


def fullname(release: str, values: dict[str, Any]) -> str:
    if values.get("fullnameOverride"):
        return values["fullnameOverride"][:35].rstrip("-")
    name = values.get("nameOverride") or "chipsite"
    return (release if name in release else f"{release}-{name}")[:35].rstrip("-")


# ---------------------------------------------------------------- lint, render


def lint(values: dict[str, Any]) -> list[str]:
    """Findings of `helm lint --strict` at warning level or above."""
    report = helm.lint(str(CHART), values, strict=True, namespace=NAMESPACE, kube_version=LINT_KUBE_VERSION)
    for m in report.get("messages", []):
        text = m["error"].strip().replace("\n", "\n        ")
        print(f"    lint [{m['severity']}] {m['path']}: {text}")
    bad = [f"{m['path']}: {m['error'].strip()}" for m in report.get("messages", []) if m["severity"] >= 2]
    return bad + [e.strip() for e in report.get("errors", []) if e.strip() not in " ".join(bad)]


def render(chart: helm.Chart, values: dict[str, Any], release: str, out: Path) -> list[dict[str, Any]]:
    """Render, write one file per template under `out`, return the objects."""
    manifests = chart.render(values, name=release, namespace=NAMESPACE, is_install=True)
    docs: list[dict[str, Any]] = []
    for source, text in sorted(manifests.items()):
        if not source.endswith((".yaml", ".yml")) or not text.strip():
            continue
        objs = [d for d in yaml.safe_load_all(text) if d]
        if not objs:
            continue
        path = out / source
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        docs.extend(objs)
    if not docs:
        raise Failed("the render produced no object")
    return docs


# ---------------------------------------------------------------- validation


def validate(docs: list[dict[str, Any]]) -> list[str]:
    problems = []
    counts = {"builtin": 0, "custom": 0}
    for d in docs:
        what = f"{d.get('kind')}/{d.get('metadata', {}).get('name')}"
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(d, version, strict=True)
                counts["builtin"] += 1
            except kubernetes_validate.SchemaNotFoundError:
                try:
                    crd_schemas.validate(d)
                    counts["custom"] += 1
                except jsonschema.ValidationError as e:
                    path = ".".join(str(p) for p in e.absolute_path)
                    problems.append(f"{what}: {path}: {e.message}")
                break  # custom resources do not depend on the Kubernetes version
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                problems.append(f"{what} (Kubernetes {version}): {path}: {e.message}")
    print(f"    {counts['builtin']} object validations against Kubernetes {', '.join(KUBE_VERSIONS)} "
          f"(strict), {counts['custom']} custom resources against crd_schemas.py")
    return problems


# ---------------------------------------------------------------- review


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if selector.get("matchExpressions"):
        raise Failed("matchExpressions in a selector: the review does not evaluate them")
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for e in container.get("env", []):
        out[e["name"]] = e.get("value", e.get("valueFrom"))
    return out


def review(docs: list[dict[str, Any]], values: dict[str, Any], release: str) -> list[str]:
    """What a reviewer checks, as a list of problems (empty: all good)."""
    p: list[str] = []
    fn = fullname(release, values)
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
        name = d["metadata"]["name"]
        if len(name) > 63:
            p.append(f"{d['kind']}/{name}: name longer than 63")
        if d["metadata"].get("namespace") != NAMESPACE:
            p.append(f"{d['kind']}/{name}: namespace is not the release's")
    deployments = {d["metadata"]["name"]: d for d in by_kind.get("Deployment", [])}
    hpas = {d["spec"]["scaleTargetRef"]["name"]: d for d in by_kind.get("HorizontalPodAutoscaler", [])}
    pdbs = by_kind.get("PodDisruptionBudget", [])
    services = by_kind.get("Service", [])
    policies = by_kind.get("NetworkPolicy", [])
    cm_mode = values["pki"]["mode"] == "cert-manager"
    cnpg = values["cloudnativepg"]["enabled"]
    image_tag = values["image"]["tag"] or APP_VERSION
    want_image = f"{values['image']['repository']}:{image_tag}"
    if values["image"]["digest"]:
        want_image += "@" + values["image"]["digest"]

    if set(deployments) != {f"{fn}-{c}" for c in COMPONENTS}:
        p.append(f"Deployments {sorted(deployments)} are not one per service")
    pods: dict[str, dict[str, str]] = {}  # component -> pod labels
    ports_of: dict[str, dict[int, str]] = {}  # component -> containerPort -> name
    for comp, fact in COMPONENTS.items():
        d = deployments.get(f"{fn}-{comp}")
        if d is None:
            continue
        where = f"Deployment/{fn}-{comp}"
        v = values[fact["key"]]
        spec = d["spec"]
        pod = spec["template"]["spec"]
        labels = spec["template"]["metadata"]["labels"]
        pods[comp] = labels
        if labels.get("app.kubernetes.io/component") != comp:
            p.append(f"{where}: pods not labelled app.kubernetes.io/component={comp}")
        if not selects(spec["selector"], labels):
            p.append(f"{where}: selector does not select its pods")
        # Single or replicated.
        hpa = hpas.get(f"{fn}-{comp}")
        pdb = [x for x in pdbs if selects(x["spec"]["selector"], labels)]
        if fact["single"]:
            if spec.get("replicas") != 1:
                p.append(f"{where}: a single service with replicas {spec.get('replicas')}")
            if spec.get("strategy", {}).get("type") != "Recreate":
                p.append(f"{where}: a single service without strategy Recreate")
            if hpa or pdb:
                p.append(f"{where}: a single service with an HPA or a PDB")
        else:
            if len(pdb) != 1:
                p.append(f"{where}: replicated, but {len(pdb)} PodDisruptionBudgets")
            if spec.get("strategy", {}).get("type") == "Recreate":
                p.append(f"{where}: replicated with strategy Recreate")
            if v["autoscaling"]["enabled"]:
                if hpa is None:
                    p.append(f"{where}: autoscaling on, but no HPA")
                elif (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) != (
                        v["autoscaling"]["minReplicas"], v["autoscaling"]["maxReplicas"]):
                    p.append(f"{where}: HPA bounds differ from the values")
                if "replicas" in spec:
                    p.append(f"{where}: sets replicas although an HPA owns them")
            else:
                if hpa is not None:
                    p.append(f"{where}: an HPA although autoscaling is off")
                if spec.get("replicas") != v["replicas"]:
                    p.append(f"{where}: replicas {spec.get('replicas')}, values say {v['replicas']}")
        # Pod security.
        if pod.get("automountServiceAccountToken") is not False:
            p.append(f"{where}: mounts a service account token")
        sc = pod.get("securityContext", {})
        for k, want in [("runAsNonRoot", True), ("runAsUser", 10001), ("runAsGroup", 10001), ("fsGroup", 10001)]:
            if sc.get(k) != want:
                p.append(f"{where}: pod securityContext.{k} is {sc.get(k)!r}, not {want!r}")
        if sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            p.append(f"{where}: pod seccompProfile is not RuntimeDefault")
        if any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")):
            p.append(f"{where}: shares a host namespace")
        volumes = {vol["name"]: vol for vol in pod.get("volumes", [])}
        containers = pod.get("containers", []) + pod.get("initContainers", [])
        if len(pod.get("containers", [])) != 1:
            p.append(f"{where}: not exactly one container")
        for c in containers:
            cw = f"{where} container {c['name']}"
            csc = c.get("securityContext", {})
            for k, want in [("readOnlyRootFilesystem", True), ("allowPrivilegeEscalation", False),
                            ("privileged", False)]:
                if csc.get(k) is not want:
                    p.append(f"{cw}: securityContext.{k} is {csc.get(k)!r}, not {want!r}")
            caps = csc.get("capabilities", {})
            if caps.get("drop") != ["ALL"] or caps.get("add"):
                p.append(f"{cw}: capabilities are not drop [ALL] with nothing added")
            if "runAsUser" in csc and csc["runAsUser"] != 10001 or csc.get("runAsNonRoot") is False:
                p.append(f"{cw}: overrides the pod's user")
            if c.get("image") != want_image:
                p.append(f"{cw}: image {c.get('image')!r}, want {want_image!r}")
            if c.get("command") != ["/usr/local/bin/chipsite"] or c.get("args") != ["serve", comp]:
                p.append(f"{cw}: does not run `chipsite serve {comp}`")
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if not res.get(kind, {}).get(r):
                        p.append(f"{cw}: no {kind}.{r}")
            # Probes on the ops port.
            for probe, path in [("startupProbe", "/livez"), ("livenessProbe", "/livez"), ("readinessProbe", "/readyz")]:
                get = c.get(probe, {}).get("httpGet", {})
                if get.get("path") != path or get.get("port") not in ("ops", OPS):
                    p.append(f"{cw}: {probe} is not GET {path} on the ops port")
            cports = {cp["containerPort"]: cp.get("name", "") for cp in c.get("ports", [])}
            ports_of[comp] = cports
            want_ports = set(fact["internal"]) | fact["external"] | {OPS}
            if comp == "console" and not values["console"]["https"]["enabled"]:
                want_ports.discard(44304)
            if set(cports) != want_ports:
                p.append(f"{cw}: container ports {sorted(cports)}, want {sorted(want_ports)}")
            # Environment.
            env = env_of(c)
            want_env = {
                "HOME": "/tmp",
                "CHIPSITE_ADDRESSES__OPS": f"0.0.0.0:{OPS}",
                "CHIPSITE_LISTEN": f"0.0.0.0:{fact['listen']}",
                "CHIPSITE_ADDRESSES__ADMIN": f"{fn}-admin:44310",
                "CHIPSITE_ADDRESSES__KEY_VAULT": f"{fn}-key-vault:44311",
                "CHIPSITE_ADDRESSES__TICKET": f"{fn}-ticket:44312",
                "CHIPSITE_ADDRESSES__PEER_GATEWAY": f"{fn}-peer-gateway:44313",
                "CHIPSITE_ADDRESSES__TALLY": f"{fn}-tally:44314",
                "CHIPSITE_TLS__CERT": "/etc/chipsite/pki/tls.crt",
                "CHIPSITE_TLS__KEY": "/etc/chipsite/pki/tls.key",
                "CHIPSITE_TLS__CA": "/etc/chipsite/pki/ca.crt",
            }
            if comp == "peer-gateway":
                want_env["CHIPSITE_ADDRESSES__PEER"] = "0.0.0.0:44302"
            if comp == "user-gateway":
                want_env["CHIPSITE_ADDRESSES__USER_GATEWAY"] = "0.0.0.0:44301"
            if comp == "console":
                hosts = list(values["console"]["hosts"])
                ing = values["console"]["ingress"]
                if ing["enabled"] and ing["host"] and ing["host"] not in hosts:
                    hosts.append(ing["host"])
                want_env.update({
                    "CHIPSITE_ADDRESSES__CONSOLE": "0.0.0.0:44303",
                    "CHIPSITE_ADDRESSES__CONSOLE_HTTPS": "0.0.0.0:44304" if values["console"]["https"]["enabled"] else "",
                    "CHIPSITE_CONSOLE__PLAIN_REMOTE": "true",
                    "CHIPSITE_CONSOLE__HOSTS": ",".join(hosts),
                    # Its health page checks that the user gateway accepts connections.
                    "CHIPSITE_ADDRESSES__USER_GATEWAY":
                        f"{fn}-user-gateway-public:{values['userGateway']['service']['port']}",
                })
            if fact["db"]:
                want_env["CHIPSITE_DATABASE_URL_FILE"] = "/etc/chipsite/database/url"
            elif "CHIPSITE_DATABASE_URL_FILE" in env:
                p.append(f"{cw}: stores nothing but gets the database URL")
            if values["otlp"]["endpoint"]:
                want_env["CHIPSITE_OTLP_ENDPOINT"] = values["otlp"]["endpoint"]
            for k, want in want_env.items():
                if env.get(k) != want:
                    p.append(f"{cw}: env {k}={env.get(k)!r}, want {want!r}")
            for k, val in env.items():
                if k in ("CHIPSITE_SITE_KEY_PASSPHRASE", "CHIPSITE_DATABASE_URL") or not isinstance(val, str):
                    p.append(f"{cw}: env {k} carries a secret or a reference to one (secrets go in files)")
            # Mounts: /tmp, the PKI (only this identity), the database, the pass phrase.
            mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
            if any("subPath" in m or "subPathExpr" in m for m in mounts.values()):
                p.append(f"{cw}: a subPath mount (Secret updates would not reach it)")
            tmp = volumes.get(mounts.get("/tmp", {}).get("name", ""), {})
            if "emptyDir" not in tmp:
                p.append(f"{cw}: no emptyDir at /tmp")
            pki = volumes.get(mounts.get("/etc/chipsite/pki", {}).get("name", ""), {}).get("secret")
            if not pki:
                p.append(f"{cw}: no PKI Secret at /etc/chipsite/pki")
            else:
                items = {i["key"]: i["path"] for i in pki.get("items", [])}
                if cm_mode:
                    want_items = {"ca.crt": "ca.crt", "tls.crt": "tls.crt", "tls.key": "tls.key"}
                    want_secret = f"{fn}-{comp}-tls"
                else:
                    want_items = {"ca.pem": "ca.crt", f"{comp}.pem": "tls.crt", f"{comp}.key": "tls.key"}
                    want_secret = values["pki"]["existingSecret"] or f"{fn}-pki"
                if items != want_items or pki.get("secretName") != want_secret:
                    p.append(f"{cw}: PKI mount {pki.get('secretName')} {items}, want {want_secret} {want_items}")
                if pki.get("defaultMode", 0o644) & 0o022:
                    p.append(f"{cw}: PKI files writable by others")
            db = volumes.get(mounts.get("/etc/chipsite/database", {}).get("name", ""), {}).get("secret")
            if fact["db"]:
                want_db = ((f"{values['cloudnativepg']['clusterName'] or fn + '-db'}-app", "uri") if cnpg else
                           (values["database"]["existingSecret"] or f"{fn}-database", values["database"]["secretKey"]))
                got_db = (db or {}).get("secretName"), [i["key"] for i in (db or {}).get("items", [])]
                if not db or got_db != (want_db[0], [want_db[1]]) or db["items"][0]["path"] != "url":
                    p.append(f"{cw}: database mount {got_db}, want {want_db} as url")
            elif db:
                p.append(f"{cw}: stores nothing but mounts the database Secret")
            phrase = mounts.get("/etc/chipsite/passphrase")
            kv = values["keyVault"]
            if comp == "key-vault" and kv["passphraseSecret"]:
                sec = volumes.get(phrase["name"] if phrase else "", {}).get("secret", {})
                if (env.get("CHIPSITE_SITE_KEY_PASSPHRASE_FILE") != "/etc/chipsite/passphrase/passphrase"
                        or sec.get("secretName") != kv["passphraseSecret"]):
                    p.append(f"{cw}: the pass phrase Secret is not mounted as the pass phrase file")
            elif phrase or "CHIPSITE_SITE_KEY_PASSPHRASE_FILE" in env:
                p.append(f"{cw}: a pass phrase where none belongs")
        # Every Secret volume is mounted, and no volume is a host path.
        for vol in volumes.values():
            if "hostPath" in vol:
                p.append(f"{where}: hostPath volume {vol['name']}")

    # Services: the internal one per service is ClusterIP with its internal
    # ports and ops; external ports only on the -public ones.
    by_name = {s["metadata"]["name"]: s for s in services}
    for comp, fact in COMPONENTS.items():
        if comp not in pods:
            continue
        internal = by_name.get(f"{fn}-{comp}")
        want = set(fact["internal"]) | {OPS} | ({44303} if comp == "console" else set())
        if internal is None or internal["spec"].get("type", "ClusterIP") != "ClusterIP":
            p.append(f"Service/{fn}-{comp}: missing or not ClusterIP")
        elif {pt["port"] for pt in internal["spec"]["ports"]} != want:
            p.append(f"Service/{fn}-{comp}: ports {sorted(pt['port'] for pt in internal['spec']['ports'])}, want {sorted(want)}")
        public_ports = fact["external"] - {44303}
        if comp == "console" and not values["console"]["https"]["enabled"]:
            public_ports = set()
        public = by_name.get(f"{fn}-{comp}-public")
        if public_ports:
            if public is None:
                p.append(f"Service/{fn}-{comp}-public: missing")
            else:
                sv = values[fact["key"]]["service"]
                if public["spec"].get("type", "ClusterIP") != sv["type"]:
                    p.append(f"Service/{fn}-{comp}-public: type is not {sv['type']}")
                targets = {ports_of.get(comp, {}).get(pp) for pp in public_ports}
                if {pt["targetPort"] for pt in public["spec"]["ports"]} != targets:
                    p.append(f"Service/{fn}-{comp}-public: targets are not {sorted(map(str, targets))}")
        elif public is not None:
            p.append(f"Service/{fn}-{comp}-public: exists without a public port")
    for s in services:
        name = s["metadata"]["name"]
        sel = s["spec"].get("selector") or {}
        matched = [c for c, labels in pods.items() if all(labels.get(k) == v for k, v in sel.items())]
        if len(matched) != 1:
            p.append(f"Service/{name}: selects {matched}, not exactly one service's pods")
            continue
        names = set(ports_of.get(matched[0], {}).values()) | set(ports_of.get(matched[0], {}))
        for pt in s["spec"]["ports"]:
            if pt.get("targetPort", pt["port"]) not in names:
                p.append(f"Service/{name}: targetPort {pt.get('targetPort')} is no port of {matched[0]}")
        if s["spec"].get("type", "ClusterIP") != "ClusterIP":
            exposed = {ports_of[matched[0]].get(pt["targetPort"]) if isinstance(pt["targetPort"], int) else
                       next((n for n, nm in ports_of[matched[0]].items() if nm == pt["targetPort"]), None)
                       for pt in s["spec"]["ports"]}
            if exposed & CLUSTER_ONLY_PORTS or {pt["port"] for pt in s["spec"]["ports"]} & CLUSTER_ONLY_PORTS:
                p.append(f"Service/{name}: type {s['spec']['type']} exposes an internal port")
            if s["spec"].get("externalTrafficPolicy") != "Local":
                p.append(f"Service/{name}: externalTrafficPolicy is not Local (the per-source limits need source addresses)")

    # NetworkPolicies.
    if values["networkPolicy"]["enabled"]:
        p += review_policies(policies, pods, ports_of, values, fn)

    # cert-manager.
    certs = {d["metadata"]["name"]: d for d in by_kind.get("Certificate", [])}
    if cm_mode:
        want_ids = IDENTITIES if values["pki"]["adminClientCertificate"] else IDENTITIES[:-1]
        if set(certs) != {f"{fn}-{i}" for i in want_ids}:
            p.append(f"Certificates {sorted(certs)}, want one per identity {want_ids}")
        for ident in want_ids:
            spec = certs.get(f"{fn}-{ident}", {}).get("spec", {})
            want_spec = {
                "secretName": f"{fn}-{ident}-tls",
                "commonName": ident,
                "dnsNames": [f"{ident}.chipsite.internal", "localhost"],
                "uris": [f"spiffe://chipsite.internal/{ident}"],
                "ipAddresses": ["127.0.0.1"],
                "usages": ["digital signature", "server auth", "client auth"],
                "subject": {"organizations": ["chipsite.internal"]},
            }
            for k, want in want_spec.items():
                if spec.get(k) != want:
                    p.append(f"Certificate/{fn}-{ident}: {k} {spec.get(k)!r}, want {want!r}")
            pk = spec.get("privateKey", {})
            if (pk.get("algorithm"), pk.get("size")) != ("ECDSA", 256):
                p.append(f"Certificate/{fn}-{ident}: key is not ECDSA P-256")
            if not spec.get("duration") or not spec.get("renewBefore"):
                p.append(f"Certificate/{fn}-{ident}: no duration or renewBefore")
            ref = spec.get("issuerRef", {})
            issuers = {d["metadata"]["name"] for d in by_kind.get("Issuer", [])}
            if not values["pki"]["issuerRef"]["name"] and ref.get("name") not in issuers:
                p.append(f"Certificate/{fn}-{ident}: issuer {ref.get('name')} is not made by the chart")
    elif certs:
        p.append("Certificates in pki.mode secret")

    # CloudNativePG: the Cluster, and enough connections for every pool.
    clusters = by_kind.get("Cluster", [])
    if cnpg:
        if len(clusters) != 1:
            p.append(f"{len(clusters)} CloudNativePG Clusters, want 1")
        else:
            params = clusters[0]["spec"].get("postgresql", {}).get("parameters", {})
            max_conn = int(params.get("max_connections", 100))
            need = 10  # superuser_reserved_connections and the operator's own
            for comp, fact in COMPONENTS.items():
                if not fact["db"]:
                    continue
                if fact["single"]:
                    n = 1
                else:
                    v = values[fact["key"]]
                    n = (v["autoscaling"]["maxReplicas"] if v["autoscaling"]["enabled"] else v["replicas"]) + 1
                need += n * POOL + (n if comp == "admin" else 0)
            if max_conn < need:
                p.append(f"Cluster max_connections {max_conn} < {need} that every pool at the HPAs' maximum may open")
    elif clusters:
        p.append("a CloudNativePG Cluster although cloudnativepg.enabled is off")

    # The console's ingress reaches its plain port through a ClusterIP Service.
    for ing in by_kind.get("Ingress", []):
        for rule in ing["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                b = path["backend"]["service"]
                svc = by_name.get(b["name"])
                if svc is None or svc["spec"].get("type", "ClusterIP") != "ClusterIP" or \
                        b["port"].get("name") not in {pt["name"] for pt in svc["spec"]["ports"]}:
                    p.append(f"Ingress/{ing['metadata']['name']}: backend {b} is not a ClusterIP Service port")
        if not ing["spec"].get("tls"):
            p.append(f"Ingress/{ing['metadata']['name']}: no TLS")
    return p


def review_policies(policies: list[dict[str, Any]], pods: dict[str, dict[str, str]],
                    ports_of: dict[str, dict[int, str]], values: dict[str, Any], fn: str) -> list[str]:
    p: list[str] = []
    release_pods = list(pods.values())
    deny = [np for np in policies
            if not np["spec"].get("ingress") and "Ingress" in np["spec"].get("policyTypes", [])
            and all(selects(np["spec"]["podSelector"], labels) for labels in release_pods)]
    if not deny:
        p.append("no default-deny-ingress NetworkPolicy selects every pod of the release")

    def sources(labels: dict[str, str], port: int, name: str) -> list[Any]:
        out: list[Any] = []
        for np in policies:
            if not selects(np["spec"]["podSelector"], labels):
                continue
            for rule in np["spec"].get("ingress") or []:
                rports = rule.get("ports")
                if rports and not any(rp.get("port") in (port, name) and rp.get("protocol", "TCP") == "TCP"
                                      for rp in rports):
                    continue
                frm = rule.get("from")
                out.extend(frm if frm else ["ANYWHERE"])
        return out

    def callers_of(peer: Any) -> str | None:
        """The one service of the release whose pods exactly this peer selects."""
        if not isinstance(peer, dict) or set(peer) != {"podSelector"}:
            return None
        hits = [c for c, labels in pods.items() if selects(peer["podSelector"], labels)]
        return hits[0] if len(hits) == 1 else None

    allow_ops = values["ops"]["allowFrom"]
    for comp, fact in COMPONENTS.items():
        labels = pods.get(comp)
        if labels is None:
            continue
        # Every rule of a policy selecting these pods names its ports.
        for np in policies:
            if selects(np["spec"]["podSelector"], labels):
                for rule in np["spec"].get("ingress") or []:
                    if not rule.get("ports"):
                        p.append(f"NetworkPolicy/{np['metadata']['name']}: a rule without ports opens every port of {comp}")
        for port, name in ports_of.get(comp, {}).items():
            got = sources(labels, port, name)
            what = f"{comp} port {port}"
            if port in fact["internal"]:
                extra = values["admin"]["operatorAllowFrom"] if comp == "admin" else []
                rest = [s for s in got if s not in extra]
                if "ANYWHERE" in rest:
                    p.append(f"{what}: open to anyone, want only {sorted(fact['internal'][port])}")
                    continue
                named = [callers_of(s) for s in rest]
                if None in named:
                    p.append(f"{what}: a source that is not exactly one caller's pods: {rest[named.index(None)]}")
                if set(named) - {None} != fact["internal"][port]:
                    p.append(f"{what}: callers {sorted(set(named) - {None})}, want {sorted(fact['internal'][port])}")
                if any(e not in got for e in extra):
                    p.append(f"{what}: admin.operatorAllowFrom is not allowed")
            elif port in fact["external"]:
                if "ANYWHERE" not in got:
                    p.append(f"{what}: external, but not open")
            elif port == OPS:
                if sorted(map(json.dumps, got)) != sorted(map(json.dumps, allow_ops)):
                    p.append(f"{what} (ops): sources {got}, want ops.allowFrom {allow_ops}")
    return p


# ---------------------------------------------------------------- self-check


def mutations(fn: str) -> list[tuple[str, Callable[[list[dict[str, Any]]], None]]]:
    """Ways to break a render, each of which `review` must catch."""

    def obj(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
        for d in docs:
            if d["kind"] == kind and d["metadata"]["name"] == name:
                return d
        raise Failed(f"self-check: no {kind}/{name} to break")

    def container(docs: list[dict[str, Any]], comp: str) -> dict[str, Any]:
        return obj(docs, "Deployment", f"{fn}-{comp}")["spec"]["template"]["spec"]["containers"][0]

    def policy(docs: list[dict[str, Any]], comp: str) -> dict[str, Any]:
        return obj(docs, "NetworkPolicy", f"{fn}-{comp}")["spec"]

    def drop(kind: str, name: str) -> Callable[[list[dict[str, Any]]], None]:
        return lambda docs: docs.remove(obj(docs, kind, name))

    def rule_for(docs: list[dict[str, Any]], comp: str, port: int) -> dict[str, Any]:
        return next(r for r in policy(docs, comp)["ingress"] if any(x["port"] == port for x in r["ports"]))

    return [
        ("writable root filesystem", lambda d: container(d, "ticket")["securityContext"].update(readOnlyRootFilesystem=False)),
        ("capabilities kept", lambda d: container(d, "tally")["securityContext"].pop("capabilities")),
        ("NET_RAW added", lambda d: container(d, "admin")["securityContext"]["capabilities"].update(add=["NET_RAW"])),
        ("no seccomp", lambda d: obj(d, "Deployment", f"{fn}-console")["spec"]["template"]["spec"]["securityContext"].pop("seccompProfile")),
        ("runs as root", lambda d: obj(d, "Deployment", f"{fn}-key-vault")["spec"]["template"]["spec"]["securityContext"].update(runAsUser=0)),
        ("token mounted", lambda d: obj(d, "Deployment", f"{fn}-admin")["spec"]["template"]["spec"].update(automountServiceAccountToken=True)),
        ("two admins", lambda d: obj(d, "Deployment", f"{fn}-admin")["spec"].update(replicas=2)),
        ("key-vault rolling", lambda d: obj(d, "Deployment", f"{fn}-key-vault")["spec"].update(strategy={"type": "RollingUpdate"})),
        ("no PDB for ticket", drop("PodDisruptionBudget", f"{fn}-ticket")),
        ("no default deny", drop("NetworkPolicy", f"{fn}-default-deny-ingress")),
        ("key-vault open to all", lambda d: rule_for(d, "key-vault", 44311).pop("from")),
        ("tally may call admin", lambda d: rule_for(d, "admin", 44310)["from"].append(
            {"podSelector": {"matchLabels": {"app.kubernetes.io/component": "tally"}}})),
        ("a caller missing", lambda d: rule_for(d, "ticket", 44312)["from"].pop()),
        ("a rule without ports", lambda d: policy(d, "peer-gateway")["ingress"].append(
            {"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/component": "admin"}}}]})),
        ("ops open to all", lambda d: policy(d, "tally")["ingress"].append({"ports": [{"port": OPS}]})),
        ("admin on the LoadBalancer", lambda d: obj(d, "Service", f"{fn}-user-gateway-public")["spec"].update(
            type="LoadBalancer", externalTrafficPolicy="Local")
            or obj(d, "Service", f"{fn}-user-gateway-public")["spec"]["ports"].append({"name": "x", "port": 44310, "targetPort": "ops"})),
        ("another identity's key", lambda d: obj(d, "Deployment", f"{fn}-ticket")["spec"]["template"]["spec"]["volumes"][1]["secret"].update(
            secretName=f"{fn}-admin-tls", items=[{"key": "ca.pem", "path": "ca.crt"}, {"key": "admin.pem", "path": "tls.crt"},
                                                  {"key": "admin.key", "path": "tls.key"}])),
        ("pass phrase in env", lambda d: container(d, "key-vault")["env"].append({"name": "CHIPSITE_SITE_KEY_PASSPHRASE", "value": "x"})),
        ("wrong admin address", lambda d: next(e for e in container(d, "peer-gateway")["env"]
                                             if e["name"] == "CHIPSITE_ADDRESSES__ADMIN").update(value="admin:44310")),
        ("user-gateway gets the database", lambda d: container(d, "user-gateway")["env"].append(
            {"name": "CHIPSITE_DATABASE_URL_FILE", "value": "/etc/chipsite/database/url"})),
        ("no readiness probe", lambda d: container(d, "peer-gateway").pop("readinessProbe")),
        ("no memory limit", lambda d: container(d, "console")["resources"]["limits"].pop("memory")),
    ]


def self_check(docs: list[dict[str, Any]], values: dict[str, Any], release: str) -> list[str]:
    fn = fullname(release, values)
    missed = []
    for title, mutate in mutations(fn):
        broken = copy.deepcopy(docs)
        mutate(broken)
        if not review(broken, values, release):
            missed.append(title)
    return missed


# ---------------------------------------------------------------- checkov


def checkov(directory: Path) -> list[str]:
    exe = Path(sys.executable).parent / "checkov"
    env = dict(os.environ, CKV_SKIP_PACKAGE_UPDATE_CHECK="true", PYTHONWARNINGS="ignore")
    run = subprocess.run(
        [str(exe), "-d", str(directory), "--framework", "kubernetes", "-o", "json", "--skip-download"],
        capture_output=True, text=True, env=env, check=False)
    try:
        report = json.loads(run.stdout)
    except json.JSONDecodeError:
        return [f"checkov printed no JSON report (exit {run.returncode}): {run.stderr[-2000:]}"]
    if not isinstance(report, dict) or "summary" not in report:
        return [f"checkov found nothing to scan in {directory}"]
    s, r = report["summary"], report["results"]
    print(f"    checkov {s.get('checkov_version')}: {s['resource_count']} resources, {s['passed']} passed, "
          f"{s['failed']} failed, {s['skipped']} skipped, {s['parsing_errors']} parsing errors")
    by_reason: dict[tuple[str, str], list[str]] = {}
    for c in r.get("skipped_checks", []):
        reason = c["check_result"].get("suppress_comment", "")
        by_reason.setdefault((c["check_id"], reason), []).append(c["resource"])
    for (cid, reason), res in sorted(by_reason.items()):
        print(f"    skipped {cid} on {len(res)} resources: {reason}")
    problems = [f"{c['check_id']} ({c['check_name']}) failed on {c['resource']}" for c in r.get("failed_checks", [])]
    if s["parsing_errors"]:
        problems.append(f"checkov could not parse {r.get('parsing_errors')}")
    if s["resource_count"] == 0 or s["passed"] == 0:
        problems.append("checkov checked nothing")
    for (cid, reason), res in by_reason.items():
        if reason in ("", "No comment provided"):
            problems.append(f"{cid} skipped without a reason on {res}")
    if run.returncode != 0 and not problems:
        problems.append(f"checkov exited {run.returncode}: {run.stderr[-2000:]}")
    return problems


# ---------------------------------------------------------------- bad values


# (values, the field the refusal must name)
MORE_BAD_VALUES: list[tuple[dict[str, Any], str]] = [
    ({"keyVault": {"replicas": 2}}, "/keyVault/replicas"),
    ({"tally": {"replicas": 2}}, "/tally/replicas"),
    ({"console": {"replicas": 0}}, "/console/replicas"),
    ({"pki": {"mode": "vault"}}, "/pki/mode"),
    ({"ticket": {"extraEnv": [{"name": "CHIPSITE_SITE_KEY_PASSPHRASE", "value": "x"}]}}, "/ticket/extraEnv/0/name"),
    ({"peerGateway": {"service": {"type": "ExternalName"}}}, "/peerGateway/service/type"),
    ({"admn": {}}, "admn"),
    ({"image": {"digest": "latest"}}, "/image/digest"),
]


def refused(chart: helm.Chart, values: dict[str, Any], fields: list[str]) -> list[str]:
    try:
        chart.render(values, name="chipsite", namespace=NAMESPACE)
    except helm.HelmError as e:
        missing = [f for f in fields if f not in str(e)]
        return [f"refused, but the message does not name {missing}: {e}"] if missing else []
    return [f"{values} rendered; the schema should refuse it"]


# ---------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="where to write the rendered manifests (default: a temporary directory)")
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="chipsite-helm-"))
    print(f"Helm {helm.helm_sdk_version()} (helm-python-sdk {helm.__version__}), kubernetes-validate "
          f"{kubernetes_validate.__version__}; manifests in {out}")
    failures: list[str] = []
    counts = {"passed": 0, "failed": 0}

    def check(title: str, problems: list[str]) -> None:
        for x in problems:
            print(f"    FAIL {x}")
        print(f"    {'ok' if not problems else f'FAILED ({len(problems)} problems)'}: {title}")
        counts["failed" if problems else "passed"] += 1
        failures.extend(f"{title}: {x}" for x in problems)

    chart = helm.Chart.load(str(CHART))
    sets = {label: (load_values(path), release) for label, (path, release) in VALUE_SETS.items()}

    with step("lint (strict)"):
        for label, (values, _) in sets.items():
            check(f"lint {label}", lint(values))

    rendered: dict[str, list[dict[str, Any]]] = {}
    with step("render"):
        for label, (values, release) in sets.items():
            rendered[label] = render(chart, values, release, out / label)
            kinds: dict[str, int] = {}
            for d in rendered[label]:
                kinds[d["kind"]] = kinds.get(d["kind"], 0) + 1
            print(f"    {label}: {len(rendered[label])} objects "
                  + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))

    with step("the schema refuses bad values"):
        bad = load_values(CHART / "ci" / "bad-values.yaml")
        check("ci/bad-values.yaml", refused(chart, bad, ["/admin/replicas", "/userGateway/service/port"]))
        lint_bad = " ".join(lint(bad))
        check("lint refuses ci/bad-values.yaml",
              [f"lint does not name {f}" for f in ["/admin/replicas", "/userGateway/service/port"] if f not in lint_bad])
        for values, field in MORE_BAD_VALUES:
            check(f"bad value {field}", refused(chart, values, [field]))

    with step("kubernetes-validate --strict and the custom resources"):
        for label, docs in rendered.items():
            check(f"validate {label}", validate(docs))

    with step("review"):
        for label, (values, release) in sets.items():
            merged = chart.merge_values(values)
            check(f"review {label}", review(rendered[label], merged, release))

    with step("the review trips on broken manifests"):
        for label, (values, release) in sets.items():
            merged = chart.merge_values(values)
            missed = self_check(rendered[label], merged, release)
            check(f"self-check {label} ({len(mutations(''))} mutations)",
                  [f"the review missed: {m}" for m in missed])

    for label in rendered:
        with step(f"checkov {label}"):
            check(f"checkov {label}", checkov(out / label))

    print()
    for f in failures:
        print(f"FAILED {f}")
    print(f"helm-chart: {counts['passed']} passed, {counts['failed']} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
