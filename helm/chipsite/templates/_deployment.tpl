{{/*
One component's Deployment: dict root, name, c (its entry in
chipsite.components), v (its values block).
*/}}
{{- define "chipsite.deployment" -}}
{{- $root := .root -}}
{{- $name := .name -}}
{{- $c := .c -}}
{{- $v := .v -}}
{{- $fullname := include "chipsite.fullname" $root -}}
{{- $ports := include "chipsite.ports" . | fromJsonArray -}}
{{- $hpa := and (not $c.single) $v.autoscaling.enabled -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ $fullname }}-{{ $name }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "chipsite.componentLabels" . | nindent 4 }}
  {{- if not $root.Values.image.digest }}
  annotations:
    # Only while image.digest is unset (ci/production-values.yaml pins it, and
    # then both checks pass). The default tag is the chart's appVersion, a
    # release that is never re-pushed, so IfNotPresent is what we want.
    checkov.io/skip1: CKV_K8S_43=image.digest is unset in these values; production values pin it
    checkov.io/skip2: CKV_K8S_15=IfNotPresent with an immutable release tag; pinned by digest in production
  {{- end }}
spec:
  {{- if $c.single }}
  # {{ $name }} must run alone (see values.schema.json): one replica, and
  # the old pod is gone before the new one starts.
  replicas: 1
  strategy:
    type: Recreate
  {{- else }}
  {{- if not $hpa }}
  replicas: {{ $v.replicas }}
  {{- end }}
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxSurge: 1
      maxUnavailable: 0
  {{- end }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "chipsite.componentSelectorLabels" . | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "chipsite.componentSelectorLabels" . | nindent 8 }}
        {{- with $root.Values.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with (merge (dict) $v.podAnnotations $root.Values.podAnnotations) }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      serviceAccountName: {{ include "chipsite.serviceAccountName" $root }}
      # chipsite never calls the Kubernetes API.
      automountServiceAccountToken: false
      # Addresses come from CHIPSITE_ADDRESSES__*, not from service links.
      enableServiceLinks: false
      # The services drain for at most 10 s, then stop within 15 s.
      terminationGracePeriodSeconds: 30
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $root.Values.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      securityContext:
        runAsNonRoot: true
        runAsUser: 10001
        runAsGroup: 10001
        # Mounted secrets are group-owned by 10001 and not writable by others
        # (the services refuse key files that others may write).
        fsGroup: 10001
        seccompProfile:
          type: RuntimeDefault
      containers:
        - name: {{ $name }}
          image: {{ include "chipsite.image" $root | quote }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: ["/usr/local/bin/chipsite"]
          args: ["serve", {{ $name | quote }}]
          securityContext:
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            privileged: false
            capabilities:
              drop: ["ALL"]
          ports:
            {{- range $ports }}
            - name: {{ .name }}
              containerPort: {{ .port }}
              protocol: TCP
            {{- end }}
            - name: ops
              containerPort: {{ include "chipsite.opsPort" $root }}
              protocol: TCP
          env:
            - name: HOME
              value: /tmp
            - name: CHIPSITE_ADDRESSES__OPS
              value: "0.0.0.0:{{ include "chipsite.opsPort" $root }}"
            - name: CHIPSITE_LISTEN
              value: "0.0.0.0:{{ $c.listen }}"
            # Where each service is reached (clients check the server's
            # certificate for <identity>.chipsite.internal, whatever the address).
            - name: CHIPSITE_ADDRESSES__ADMIN
              value: "{{ $fullname }}-admin:44310"
            - name: CHIPSITE_ADDRESSES__KEY_VAULT
              value: "{{ $fullname }}-key-vault:44311"
            - name: CHIPSITE_ADDRESSES__TICKET
              value: "{{ $fullname }}-ticket:44312"
            - name: CHIPSITE_ADDRESSES__PEER_GATEWAY
              value: "{{ $fullname }}-peer-gateway:44313"
            - name: CHIPSITE_ADDRESSES__TALLY
              value: "{{ $fullname }}-tally:44314"
            - name: CHIPSITE_TLS__CERT
              value: /etc/chipsite/pki/tls.crt
            - name: CHIPSITE_TLS__KEY
              value: /etc/chipsite/pki/tls.key
            - name: CHIPSITE_TLS__CA
              value: /etc/chipsite/pki/ca.crt
            {{- if $c.database }}
            - name: CHIPSITE_DATABASE_URL_FILE
              value: /etc/chipsite/database/url
            {{- end }}
            {{- with $root.Values.otlp.endpoint }}
            - name: CHIPSITE_OTLP_ENDPOINT
              value: {{ . | quote }}
            {{- end }}
            {{- if eq $name "peer-gateway" }}
            - name: CHIPSITE_ADDRESSES__PEER
              value: "0.0.0.0:44302"
            {{- end }}
            {{- if eq $name "user-gateway" }}
            - name: CHIPSITE_ADDRESSES__USER_GATEWAY
              value: "0.0.0.0:44301"
            {{- end }}
            {{- if eq $name "key-vault" }}
            {{- if $v.passphraseSecret }}
            # The pass phrase only as a file, never as an env value.
            - name: CHIPSITE_SITE_KEY_PASSPHRASE_FILE
              value: /etc/chipsite/passphrase/passphrase
            {{- end }}
            {{- end }}
            {{- if eq $name "console" }}
            - name: CHIPSITE_ADDRESSES__CONSOLE
              value: "0.0.0.0:44303"
            - name: CHIPSITE_ADDRESSES__CONSOLE_HTTPS
              value: {{ ternary "0.0.0.0:44304" "" $root.Values.console.https.enabled | quote }}
            # The plain port is reached only through the TLS ingress.
            - name: CHIPSITE_CONSOLE__PLAIN_REMOTE
              value: "true"
            - name: CHIPSITE_CONSOLE__HOSTS
              value: {{ include "chipsite.consoleHosts" $root | quote }}
            # The health page checks that the user gateway accepts connections.
            - name: CHIPSITE_ADDRESSES__USER_GATEWAY
              value: "{{ $fullname }}-user-gateway-public:{{ $root.Values.userGateway.service.port }}"
            {{- end }}
            {{- with $v.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          startupProbe:
            httpGet:
              path: /livez
              port: ops
            periodSeconds: 2
            timeoutSeconds: 2
            failureThreshold: 30
          livenessProbe:
            httpGet:
              path: /livez
              port: ops
            periodSeconds: 10
            timeoutSeconds: 3
            failureThreshold: 3
          # 503 while its store or the services it needs do not answer.
          readinessProbe:
            httpGet:
              path: /readyz
              port: ops
            periodSeconds: 5
            timeoutSeconds: 3
            failureThreshold: 2
          resources:
            {{- toYaml $v.resources | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            - name: pki
              mountPath: /etc/chipsite/pki
              readOnly: true
            {{- if $c.database }}
            - name: database
              mountPath: /etc/chipsite/database
              readOnly: true
            {{- end }}
            {{- if and (eq $name "key-vault") $v.passphraseSecret }}
            - name: passphrase
              mountPath: /etc/chipsite/passphrase
              readOnly: true
            {{- end }}
      volumes:
        - name: tmp
          emptyDir:
            sizeLimit: 64Mi
        # Only this identity's certificate and key. No subPath, so that a
        # renewed Secret reaches the files (the service reloads them).
        - name: pki
          secret:
            {{- if eq $root.Values.pki.mode "cert-manager" }}
            secretName: {{ include "chipsite.certSecretName" (dict "root" $root "identity" $name) }}
            defaultMode: 256  # 0400
            items:
              - key: ca.crt
                path: ca.crt
              - key: tls.crt
                path: tls.crt
              - key: tls.key
                path: tls.key
            {{- else }}
            secretName: {{ include "chipsite.pkiSecretName" $root }}
            defaultMode: 256  # 0400
            items:
              - key: ca.pem
                path: ca.crt
              - key: {{ $name }}.pem
                path: tls.crt
              - key: {{ $name }}.key
                path: tls.key
            {{- end }}
        {{- if $c.database }}
        - name: database
          secret:
            secretName: {{ include "chipsite.databaseSecretName" $root }}
            defaultMode: 256  # 0400
            items:
              - key: {{ include "chipsite.databaseSecretKey" $root }}
                path: url
        {{- end }}
        {{- if and (eq $name "key-vault") $v.passphraseSecret }}
        - name: passphrase
          secret:
            secretName: {{ $v.passphraseSecret }}
            defaultMode: 256  # 0400
            items:
              - key: {{ $v.passphraseKey }}
                path: passphrase
        {{- end }}
      {{- with $root.Values.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $root.Values.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $root.Values.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- if not $c.single }}
      topologySpreadConstraints:
        {{- if $v.topologySpreadConstraints }}
        {{- toYaml $v.topologySpreadConstraints | nindent 8 }}
        {{- else }}
        - maxSkew: 1
          topologyKey: kubernetes.io/hostname
          whenUnsatisfiable: ScheduleAnyway
          labelSelector:
            matchLabels:
              {{- include "chipsite.componentSelectorLabels" . | nindent 14 }}
        {{- end }}
      {{- end }}
{{- end }}
