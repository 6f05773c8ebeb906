{{/*
Names and labels. Every helper takes the chart's own context. From a parent chart, pass the
subchart's context: (index .Subcharts "outbox-relay"), which carries this chart's .Chart and its
merged .Values, so names computed there match the ConfigMap and Service this chart renders.
*/}}

{{- define "outbox-relay.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "outbox-relay.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "outbox-relay.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "outbox-relay.selectorLabels" -}}
app.kubernetes.io/name: {{ include "outbox-relay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "outbox-relay.labels" -}}
helm.sh/chart: {{ include "outbox-relay.chart" . }}
{{ include "outbox-relay.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/component: relay
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "outbox-relay.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "outbox-relay.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "outbox-relay.image" -}}
{{- $ref := .Values.image.repository }}
{{- $tag := .Values.image.tag | default .Chart.AppVersion | toString }}
{{- if $tag }}{{ $ref = printf "%s:%s" $ref $tag }}{{ end }}
{{- if .Values.image.digest }}{{ $ref = printf "%s@%s" $ref .Values.image.digest }}{{ end }}
{{- $ref }}
{{- end }}

{{/* The directory the ConfigMap is mounted at, and the file the relay reads (the image's CMD). */}}
{{- define "outbox-relay.configDir" -}}/etc/outbox-relay{{- end }}
{{- define "outbox-relay.configFile" -}}/etc/outbox-relay/relay.yaml{{- end }}

{{/* The relay's HTTP port: config.http.port, 9400 when unset (the relay's own default). */}}
{{- define "outbox-relay.httpPort" -}}
{{- $http := .Values.config.http | default dict }}
{{- $http.port | default 9400 | int }}
{{- end }}

{{/* A duration of the relay config in seconds: 200ms, 30s, 1m, 1h or a plain number, as the relay reads it. */}}
{{- define "outbox-relay.seconds" -}}
{{- $raw := . | toString | trim }}
{{- $seconds := 0.0 }}
{{- if hasSuffix "ms" $raw }}
{{- $seconds = divf (trimSuffix "ms" $raw | trim | float64) 1000 }}
{{- else if hasSuffix "s" $raw }}
{{- $seconds = trimSuffix "s" $raw | trim | float64 }}
{{- else if hasSuffix "m" $raw }}
{{- $seconds = mulf (trimSuffix "m" $raw | trim | float64) 60 }}
{{- else if hasSuffix "h" $raw }}
{{- $seconds = mulf (trimSuffix "h" $raw | trim | float64) 3600 }}
{{- else }}
{{- $seconds = float64 $raw }}
{{- end }}
{{- $seconds }}
{{- end }}

{{/* config.shutdown_grace in seconds (30 when unset, the relay's default). */}}
{{- define "outbox-relay.shutdownGraceSeconds" -}}
{{- include "outbox-relay.seconds" (.Values.config.shutdown_grace | default 30) }}
{{- end }}

{{/*
Refuses a readiness probe slower than the lease time of an outbox (lease.time, 5s when unset; an
outbox with `lease.enabled: false` has none): a standby takes over within one lease time, and
/readyz must be asked at least that often for the takeover to show. A lease time under 1s takes
periodSeconds 1, the kubelet's shortest.
*/}}
{{- define "outbox-relay.validateReadinessPeriod" -}}
{{- if .Values.readinessProbe.enabled }}
{{- $period := .Values.readinessProbe.periodSeconds | default 10 | float64 }}
{{- range .Values.config.outboxes }}
{{- $lease := .lease | default dict }}
{{- if not (and (hasKey $lease "enabled") (eq (toString $lease.enabled) "false")) }}
{{- $raw := 5 }}
{{- if hasKey $lease "time" }}{{ $raw = $lease.time }}{{ end }}
{{- $time := include "outbox-relay.seconds" $raw | float64 }}
{{- /* (1s is the kubelet's shortest period: a shorter lease time takes periodSeconds 1) */}}
{{- if and (gt $period $time) (gt $period 1.0) }}
{{- fail (printf "readinessProbe.periodSeconds (%v) must not exceed the lease time of outbox %s (lease.time: %vs): a standby takes over within one lease time, and the probe would not see it; set periodSeconds to at most %v" $period .name $time (floor (maxf 1 $time))) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Refuses, at render time, what would put a secret into a manifest: a URL with a password in the
relay config or in a plain env value, or a password-like config key whose value is not a ${VAR}
reference. Secrets come from Secrets (database.existingSecret, secretEnv, env valueFrom, envFrom).
*/}}
{{- define "outbox-relay.validate" -}}
{{- $config := toYaml .Values.config }}
{{- if regexMatch "[A-Za-z][A-Za-z0-9+.-]*://[^/@\\s:]*:[^@\\s/]+@" $config }}
{{- fail "config: a URL with a password in it; put the DSN in a Secret (database.existingSecret) and write ${DATABASE_URL} instead" }}
{{- end }}
{{- if or (regexMatch "(?mi)^\\s*(- )?[A-Za-z0-9_.-]*(password|secret|token)[A-Za-z0-9_.-]*:\\s+[\"']?[^$\"'\\s{]" $config) (regexMatch "(?i)\\bpassword\\s*=\\s*'?[^$'\\s]" $config) }}
{{- fail "config: a password, secret or token written inline; reference an environment variable (${KAFKA_PASSWORD}) filled from a Secret through secretEnv" }}
{{- end }}
{{- range .Values.env }}
{{- if and (kindIs "map" .) (hasKey . "value") (regexMatch "://[^/@\\s:]*:[^@\\s/]+@" (toString .value)) }}
{{- fail (printf "env %s: a URL with a password in it; use valueFrom.secretKeyRef or secretEnv" .name) }}
{{- end }}
{{- end }}
{{- $grace := include "outbox-relay.shutdownGraceSeconds" . | float64 }}
{{- if le (float64 .Values.terminationGracePeriodSeconds) $grace }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must be greater than config.shutdown_grace (%vs): Kubernetes would kill the relay before it finished its in-flight events" .Values.terminationGracePeriodSeconds $grace) }}
{{- end }}
{{- include "outbox-relay.validateReadinessPeriod" . }}
{{- if and (eq .Values.mode "sidecar") .Values.service.enabled (empty .Values.sidecar.podSelector) }}
{{- fail "sidecar.podSelector: required in sidecar mode while service.enabled is true (the labels of your application's pods), or set service.enabled: false" }}
{{- end }}
{{- if and .Values.serviceMonitor.enabled (not .Values.service.enabled) }}
{{- fail "serviceMonitor.enabled needs service.enabled: the ServiceMonitor scrapes through the Service" }}
{{- end }}
{{- end }}

{{/* Environment: the database DSN and secretEnv by secretKeyRef, then the plain env list. */}}
{{- define "outbox-relay.env" -}}
- name: {{ .Values.database.envVar }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.database.existingSecret }}
      key: {{ .Values.database.secretKey }}
{{- range $name, $ref := .Values.secretEnv }}
- name: {{ $name }}
  valueFrom:
    secretKeyRef:
      name: {{ $ref.secretName }}
      key: {{ $ref.key }}
      {{- if hasKey $ref "optional" }}
      optional: {{ $ref.optional }}
      {{- end }}
{{- end }}
{{- with .Values.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The relay container, as one list item. Used by the Deployment and, from a parent chart, as a
sidecar:

  containers:
    - name: my-app
      ...
    {{- include "outbox-relay.sidecarContainer" (index .Subcharts "outbox-relay") | nindent 4 }}
*/}}
{{- define "outbox-relay.container" -}}
- name: outbox-relay
  image: {{ include "outbox-relay.image" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  {{- if and (eq .Values.mode "sidecar") .Values.sidecar.native }}
  restartPolicy: Always
  {{- end }}
  args:
    - run
    - -c
    - {{ include "outbox-relay.configFile" . }}
    {{- range .Values.extraArgs }}
    - {{ . | quote }}
    {{- end }}
  ports:
    - name: relay-http
      containerPort: {{ include "outbox-relay.httpPort" . }}
      protocol: TCP
  env:
    {{- include "outbox-relay.env" . | nindent 4 }}
  {{- with .Values.envFrom }}
  envFrom:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  livenessProbe:
    httpGet:
      path: /healthz
      port: relay-http
    {{- toYaml (omit .Values.livenessProbe "enabled" "httpGet") | nindent 4 }}
  {{- if .Values.readinessProbe.enabled }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: relay-http
    {{- toYaml (omit .Values.readinessProbe "enabled" "httpGet") | nindent 4 }}
  {{- end }}
  {{- with .Values.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: outbox-relay-config
      mountPath: {{ include "outbox-relay.configDir" . }}
      readOnly: true
    - name: outbox-relay-tmp
      mountPath: /tmp
    {{- with .Values.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}

{{/* The volumes the relay container mounts, as list items (config and /tmp). */}}
{{- define "outbox-relay.volumes" -}}
- name: outbox-relay-config
  configMap:
    name: {{ include "outbox-relay.fullname" . }}
- name: outbox-relay-tmp
  {{- if .Values.tmpVolume.sizeLimit }}
  emptyDir:
    sizeLimit: {{ .Values.tmpVolume.sizeLimit }}
  {{- else }}
  emptyDir: {}
  {{- end }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Sidecar mode, for a parent chart: the container and its volumes (see examples/). */}}
{{- define "outbox-relay.sidecarContainer" -}}
{{- include "outbox-relay.validate" . }}
{{- include "outbox-relay.container" . }}
{{- end }}

{{- define "outbox-relay.sidecarVolumes" -}}
{{- include "outbox-relay.volumes" . }}
{{- end }}

{{/* Pod annotation that rolls the pods when the relay config changes. */}}
{{- define "outbox-relay.configChecksum" -}}
{{- toYaml .Values.config | sha256sum }}
{{- end }}

{{/* PromQL label matchers of this release's series (prometheusRule.metricSelector overrides). */}}
{{- define "outbox-relay.metricSelector" -}}
{{- if .Values.prometheusRule.metricSelector }}
{{- .Values.prometheusRule.metricSelector }}
{{- else }}
{{- printf "job=%q, namespace=%q" (include "outbox-relay.fullname" .) .Release.Namespace }}
{{- end }}
{{- end }}
