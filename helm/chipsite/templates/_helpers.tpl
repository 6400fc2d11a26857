{{/*
The services a site is made of: product facts, not settings (each service's
tunables are under its values key). Each entry:
  key       its block in values.yaml
  single    true: must run as one replica (replicas fixed at 1, Recreate)
  database  true: it stores something (mounts the database URL)
  listen    its main port (CHIPSITE_LISTEN)
  ports     its ports:
              callers  the identities allowed to reach it (NetworkPolicy);
                       none listed: reachable from anywhere (external)
              public   true: on the configurable external Service, never on
                       the internal ClusterIP one
The console calls every service's gRPC health check for its health page, so
it is a caller of every internal port.
*/}}
{{- define "chipsite.components" -}}
admin:
  key: admin
  single: true
  database: true
  listen: 44310
  ports:
    - name: grpc
      port: 44310
      callers: [console, user-gateway, peer-gateway]
key-vault:
  key: keyVault
  single: true
  database: true
  listen: 44311
  ports:
    - name: grpc
      port: 44311
      callers: [admin, ticket, user-gateway, peer-gateway, tally, console]
ticket:
  key: ticket
  single: false
  database: true
  listen: 44312
  ports:
    - name: grpc
      port: 44312
      callers: [admin, user-gateway, peer-gateway, console]
user-gateway:
  key: userGateway
  single: false
  database: false
  listen: 44301
  ports:
    - name: user
      port: 44301
      public: true
peer-gateway:
  key: peerGateway
  single: false
  database: true
  listen: 44313
  ports:
    - name: grpc
      port: 44313
      callers: [admin, user-gateway, console]
    - name: peer
      port: 44302
      public: true
tally:
  key: tally
  single: true
  database: true
  listen: 44314
  ports:
    - name: grpc
      port: 44314
      callers: [admin, user-gateway, peer-gateway, console]
console:
  key: console
  single: true
  database: false
  listen: 44303
  ports:
    # Plain HTTP for the TLS ingress: on the ClusterIP Service only.
    - name: http
      port: 44303
    # The admin-certificate port (when console.https.enabled).
    - name: https
      port: 44304
      public: true
{{- end }}

{{/* The ops port of every process. */}}
{{- define "chipsite.opsPort" -}}9090{{- end }}

{{/* The components table as a dict. */}}
{{- define "chipsite.componentTable" -}}
{{- include "chipsite.components" . | fromYaml | toJson -}}
{{- end }}

{{/* A component's ports, without the console's HTTPS port when it is off. */}}
{{- define "chipsite.ports" -}}
{{- $root := .root -}}
{{- $out := list -}}
{{- range .c.ports -}}
{{- if not (and (eq .name "https") (not $root.Values.console.https.enabled)) -}}
{{- $out = append $out . -}}
{{- end -}}
{{- end -}}
{{- toJson $out -}}
{{- end }}

{{- define "chipsite.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 35 | trimSuffix "-" }}
{{- end }}

{{/*
The release's full name, at most 35 characters so that every name made from
it (<fullname>-peer-gateway-public, <fullname>-admin-client-tls, ...) stays
within the 63 characters of a DNS label.
*/}}
{{- define "chipsite.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 35 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 35 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 35 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "chipsite.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "chipsite.selectorLabels" -}}
app.kubernetes.io/name: {{ include "chipsite.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "chipsite.labels" -}}
helm.sh/chart: {{ include "chipsite.chart" . }}
{{ include "chipsite.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: chipsite
{{- end }}

{{/* Selector labels of one component: dict root, name. */}}
{{- define "chipsite.componentSelectorLabels" -}}
{{ include "chipsite.selectorLabels" .root }}
app.kubernetes.io/component: {{ .name }}
{{- end }}

{{- define "chipsite.componentLabels" -}}
{{ include "chipsite.labels" .root }}
app.kubernetes.io/component: {{ .name }}
{{- end }}

{{- define "chipsite.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "chipsite.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "chipsite.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end }}

{{- define "chipsite.cnpgClusterName" -}}
{{- default (printf "%s-db" (include "chipsite.fullname" .)) .Values.cloudnativepg.clusterName }}
{{- end }}

{{/* The Secret holding the database URL, and its key. */}}
{{- define "chipsite.databaseSecretName" -}}
{{- if .Values.cloudnativepg.enabled }}
{{- printf "%s-app" (include "chipsite.cnpgClusterName" .) }}
{{- else }}
{{- default (printf "%s-database" (include "chipsite.fullname" .)) .Values.database.existingSecret }}
{{- end }}
{{- end }}

{{- define "chipsite.databaseSecretKey" -}}
{{- if .Values.cloudnativepg.enabled }}uri{{ else }}{{ .Values.database.secretKey }}{{ end }}
{{- end }}

{{- define "chipsite.pkiSecretName" -}}
{{- default (printf "%s-pki" (include "chipsite.fullname" .)) .Values.pki.existingSecret }}
{{- end }}

{{/* cert-manager mode: the Secret of one identity's Certificate. */}}
{{- define "chipsite.certSecretName" -}}
{{- printf "%s-%s-tls" (include "chipsite.fullname" .root) .identity }}
{{- end }}

{{- define "chipsite.issuerRef" -}}
{{- if .Values.pki.issuerRef.name -}}
name: {{ .Values.pki.issuerRef.name }}
kind: {{ .Values.pki.issuerRef.kind }}
group: {{ .Values.pki.issuerRef.group }}
{{- else if .Values.pki.caIssuer.create -}}
name: {{ include "chipsite.fullname" . }}-internal-ca
kind: Issuer
group: cert-manager.io
{{- else -}}
{{- fail "pki.mode cert-manager needs pki.issuerRef.name, or pki.caIssuer.create with pki.caIssuer.secretName" -}}
{{- end -}}
{{- end }}

{{/* Host names the console answers to: console.hosts and the ingress host. */}}
{{- define "chipsite.consoleHosts" -}}
{{- $hosts := .Values.console.hosts -}}
{{- if and .Values.console.ingress.enabled .Values.console.ingress.host -}}
{{- $hosts = append $hosts .Values.console.ingress.host -}}
{{- end -}}
{{- $hosts | uniq | join "," -}}
{{- end }}

{{/*
A NetworkPolicy peer matching the pods of one identity of this release:
dict root, name.
*/}}
{{- define "chipsite.peerOf" -}}
- podSelector:
    matchLabels:
      {{- include "chipsite.componentSelectorLabels" . | nindent 6 }}
{{- end }}
