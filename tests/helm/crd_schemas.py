"""Schemas for the custom resources the chart makes.

kubernetes-validate knows only built-in kinds. These JSON schemas cover the
CloudNativePG Cluster and the cert-manager Certificate and Issuer as far as
the chart uses them: apiVersion and kind, the fields each CRD requires, the
names of every spec field the CRD knows (a misspelt field is refused, as the
API server's structural schema would prune or refuse it), and the types and
enums of the fields the chart sets. Written from the CRDs of CloudNativePG
(postgresql.cnpg.io_clusters.yaml, v1) and cert-manager
(cert-manager.io_certificates.yaml and _issuers.yaml, v1) as of 2026-08; a
field those projects add later is unknown here until added below.
"""

from __future__ import annotations

from typing import Any

import jsonschema

_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}

_METADATA = {
    "type": "object",
    "required": ["name", "namespace"],
    "properties": {
        "name": _NAME,
        "namespace": {"type": "string", "minLength": 1},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}

# Every field of the Cluster spec the CRD knows.
_CLUSTER_SPEC_FIELDS = [
    "affinity", "backup", "bootstrap", "certificates", "description", "enablePDB",
    "enableSuperuserAccess", "env", "envFrom", "ephemeralVolumeSource",
    "ephemeralVolumesSizeLimit", "externalClusters", "failoverDelay", "imageCatalogRef",
    "imageName", "imagePullPolicy", "imagePullSecrets", "inheritedMetadata", "instances",
    "livenessProbeTimeout", "logLevel", "managed", "maxSyncReplicas", "minSyncReplicas",
    "monitoring", "nodeMaintenanceWindow", "plugins", "podSecurityContext",
    "podSelectorRefs", "postgresGID", "postgresUID", "postgresql", "primaryLease",
    "primaryUpdateMethod", "primaryUpdateStrategy", "priorityClassName", "probes",
    "projectedVolumeTemplate", "replica", "replicationSlots", "resources",
    "schedulerName", "seccompProfile", "securityContext", "serviceAccountName",
    "serviceAccountTemplate", "smartShutdownTimeout", "startDelay", "stopDelay",
    "storage", "superuserSecret", "switchoverDelay", "tablespaces",
    "topologySpreadConstraints", "walStorage",
]

_INITDB_FIELDS = [
    "builtinLocale", "dataChecksums", "database", "encoding", "icuLocale", "icuRules",
    "import", "locale", "localeCType", "localeCollate", "localeProvider", "options",
    "owner", "postInitApplicationSQL", "postInitApplicationSQLRefs", "postInitSQL",
    "postInitSQLRefs", "postInitTemplateSQL", "postInitTemplateSQLRefs", "secret",
    "walSegmentSize",
]

_POSTGRESQL_FIELDS = [
    "enableAlterSystem", "extensions", "ldap", "parameters", "pg_hba", "pg_ident",
    "promotionTimeout", "shared_preload_libraries", "syncReplicaElectionConstraint",
    "synchronous",
]


def _open(fields: list[str], **typed: Any) -> dict[str, Any]:
    """An object whose keys must be among `fields`; `typed` gives some schemas."""
    props: dict[str, Any] = {f: {} for f in fields}
    props.update(typed)
    return {"type": "object", "properties": props, "additionalProperties": False}


CLUSTER = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "postgresql.cnpg.io/v1"},
        "kind": {"const": "Cluster"},
        "metadata": _METADATA,
        "spec": {
            **_open(
                _CLUSTER_SPEC_FIELDS,
                instances={"type": "integer", "minimum": 1},
                imageName={"type": "string", "minLength": 1},
                primaryUpdateStrategy={"enum": ["unsupervised", "supervised"]},
                enableSuperuserAccess={"type": "boolean"},
                bootstrap=_open(
                    ["initdb", "pg_basebackup", "recovery"],
                    initdb=_open(
                        _INITDB_FIELDS,
                        database={"type": "string", "minLength": 1},
                        owner={"type": "string", "minLength": 1},
                    ),
                ),
                postgresql=_open(
                    _POSTGRESQL_FIELDS,
                    parameters={"type": "object", "additionalProperties": {"type": "string"}},
                ),
                storage={
                    **_open(
                        ["pvcTemplate", "resizeInUseVolumes", "size", "storageClass"],
                        size={"type": "string", "pattern": r"^[0-9]+(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"},
                        storageClass={"type": "string", "minLength": 1},
                    ),
                    "required": ["size"],
                },
                resources=_open(["claims", "limits", "requests"]),
            ),
            "required": ["instances"],
        },
    },
}

_USAGES = [
    "signing", "digital signature", "content commitment", "key encipherment",
    "key agreement", "data encipherment", "cert sign", "crl sign", "encipher only",
    "decipher only", "any", "server auth", "client auth", "code signing",
    "email protection", "s/mime", "ipsec end system", "ipsec tunnel", "ipsec user",
    "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc",
]

_DURATION = {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(h|m|s|ms|us|ns))+$"}

_ISSUER_REF = {
    **_open(["group", "kind", "name"], name={"type": "string", "minLength": 1},
            kind={"type": "string"}, group={"type": "string"}),
    "required": ["name"],
}

CERTIFICATE = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "cert-manager.io/v1"},
        "kind": {"const": "Certificate"},
        "metadata": _METADATA,
        "spec": {
            **_open(
                [
                    "additionalOutputFormats", "commonName", "dnsNames", "duration",
                    "emailAddresses", "encodeUsagesInRequest", "ipAddresses", "isCA",
                    "issuerRef", "keystores", "literalSubject", "nameConstraints",
                    "otherNames", "privateKey", "renewBefore", "renewBeforePercentage",
                    "renewal", "revisionHistoryLimit", "secretName", "secretTemplate",
                    "signatureAlgorithm", "subject", "uris", "usages",
                ],
                secretName=_NAME,
                issuerRef=_ISSUER_REF,
                commonName={"type": "string", "minLength": 1, "maxLength": 64},
                dnsNames={"type": "array", "items": {"type": "string"}},
                uris={"type": "array", "items": {"type": "string"}},
                ipAddresses={"type": "array", "items": {"type": "string"}},
                duration=_DURATION,
                renewBefore=_DURATION,
                usages={"type": "array", "items": {"enum": _USAGES}},
                subject=_open(
                    ["countries", "localities", "organizationalUnits", "organizations",
                     "postalCodes", "provinces", "serialNumber", "streetAddresses"],
                    organizations={"type": "array", "items": {"type": "string"}},
                ),
                privateKey=_open(
                    ["algorithm", "encoding", "rotationPolicy", "size"],
                    algorithm={"enum": ["RSA", "ECDSA", "Ed25519"]},
                    encoding={"enum": ["PKCS1", "PKCS8"]},
                    rotationPolicy={"enum": ["Never", "Always"]},
                    size={"type": "integer"},
                ),
                secretTemplate=_open(
                    ["annotations", "labels"],
                    labels={"type": "object", "additionalProperties": {"type": "string"}},
                ),
            ),
            "required": ["secretName", "issuerRef"],
        },
    },
}

ISSUER = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "cert-manager.io/v1"},
        "kind": {"const": "Issuer"},
        "metadata": _METADATA,
        "spec": {
            **_open(
                ["acme", "ca", "selfSigned", "vault", "venafi"],
                ca={
                    **_open(
                        ["crlDistributionPoints", "issuingCertificateURLs", "ocspServers", "secretName"],
                        secretName=_NAME,
                    ),
                    "required": ["secretName"],
                },
            ),
            "minProperties": 1,
            "maxProperties": 1,
        },
    },
}

SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("postgresql.cnpg.io/v1", "Cluster"): CLUSTER,
    ("cert-manager.io/v1", "Certificate"): CERTIFICATE,
    ("cert-manager.io/v1", "Issuer"): ISSUER,
}


def validate(doc: dict[str, Any]) -> None:
    """Raise if `doc` is not a custom resource known here, or not valid."""
    key = (doc.get("apiVersion", ""), doc.get("kind", ""))
    schema = SCHEMAS.get(key)
    if schema is None:
        raise jsonschema.ValidationError(f"no schema for {key[1]} {key[0]}")
    jsonschema.Draft7Validator(schema).validate(doc)
