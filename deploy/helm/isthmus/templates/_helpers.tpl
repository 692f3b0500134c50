{{/* The release's resource names: the release name, or `RELEASE-isthmus` where the release
name does not already say isthmus; at most 52 characters, so that every name made from it
stays a DNS label of 63: `-headless` and `-admin` Services, and the StatefulSet's
`controller-revision-hash` label (the name and an 11-character suffix). */}}
{{- define "isthmus.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "isthmus.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that select the gateway's pods; they never change across upgrades. */}}
{{- define "isthmus.selectorLabels" -}}
app.kubernetes.io/name: {{ include "isthmus.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "isthmus.labels" -}}
{{ include "isthmus.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: isthmus
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "isthmus.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "isthmus.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "isthmus.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* `HOST:PORT` for a socket address; an IPv6 host goes in brackets. */}}
{{- define "isthmus.address" -}}
{{- $host := index . 0 -}}
{{- if contains ":" $host -}}
{{- printf "[%s]:%d" $host (int (index . 1)) -}}
{{- else -}}
{{- printf "%s:%d" $host (int (index . 1)) -}}
{{- end -}}
{{- end -}}

{{/* The admin listener: the pod's loopback (no token, nothing exposed), or with
admin.expose the data plane's bind address (TLS and a token). */}}
{{- define "isthmus.adminAddress" -}}
{{- if .Values.admin.expose -}}
{{- include "isthmus.address" (list .Values.server.bindAddress .Values.server.adminPort) -}}
{{- else -}}
{{- include "isthmus.address" (list "127.0.0.1" .Values.server.adminPort) -}}
{{- end -}}
{{- end -}}

{{/* The certificate the admin listener presents when exposed: the mounted Secret's, or the
one the gateway made in its state volume. */}}
{{- define "isthmus.servedCertificate" -}}
{{- if include "isthmus.tlsSecretName" . -}}
{{- printf "%s/tls.crt" (include "isthmus.tlsDir" .) -}}
{{- else -}}
{{- printf "%s/tls/server.pem" (include "isthmus.stateDir" .) -}}
{{- end -}}
{{- end -}}

{{/* An exec probe's command for a path: `isthmus probe` over the pod's loopback, with the
token and the pinned certificate when the admin listener is exposed. */}}
{{- define "isthmus.probeCommand" -}}
{{- $command := list "/usr/bin/isthmus" "probe" "--admin" (include "isthmus.address" (list "127.0.0.1" .root.Values.server.adminPort)) -}}
{{- if .root.Values.admin.expose -}}
{{- $command = concat $command (list "--token-env" "ISTHMUS_ADMIN_TOKEN" "--tls-cert" (include "isthmus.servedCertificate" .root)) -}}
{{- end -}}
{{- toJson (append $command .path) -}}
{{- end -}}

{{/* Where the pod mounts things; the configuration the chart writes points here. */}}
{{- define "isthmus.configDir" -}}/etc/isthmus{{- end -}}
{{- define "isthmus.tlsDir" -}}/etc/isthmus-tls{{- end -}}
{{- define "isthmus.stateDir" -}}/var/lib/isthmus{{- end -}}
{{- define "isthmus.modelsDir" -}}/models{{- end -}}

{{/* The gateway's configuration: the operator's `config`, then the `[server]` tables the
chart owns (addresses, state directory, certificate files, drain). Last, so that nothing of
`config` can land inside them. */}}
{{- define "isthmus.configuration" -}}
{{- $parsed := fromToml .Values.config -}}
{{- if hasKey $parsed "Error" -}}
{{- fail (printf "config: not valid TOML: %s" (get $parsed "Error")) -}}
{{- end -}}
{{- /* However it is spelled (a table header, dotted or quoted keys, an inline table). */ -}}
{{- if hasKey $parsed "server" -}}
{{- fail "config: must not hold a [server] table or server.* keys: the chart writes them from the `server` values (ports, tls, limits, drainTimeoutSeconds, workerThreads)" -}}
{{- end -}}
{{ trimSuffix "\n" .Values.config }}

# Written by the chart from its `server` values; the rest is its `config` value.
{{ include "isthmus.serverTable" . }}
{{- end -}}

{{/* The [server] table, from the `server` values. */}}
{{- define "isthmus.serverTable" -}}
{{- $server := .Values.server -}}
{{- /* What the gateway checks across keys, checked here so that a release never renders a
file its pods would refuse. */ -}}
{{- $limits := $server.limits | default dict -}}
{{- $headerMs := int64 (get $limits "header_read_timeout_ms" | default 10000) -}}
{{- $keepaliveMs := int64 (get $limits "keepalive_timeout_ms" | default 60000) -}}
{{- if lt $keepaliveMs $headerMs -}}
{{- fail (printf "server.limits.keepalive_timeout_ms: must be at least header_read_timeout_ms (%d); the default is 60000" $headerMs) -}}
{{- end -}}
{{- if eq (int $server.httpsPort) (int $server.adminPort) -}}
{{- fail "server.adminPort: must differ from server.httpsPort" -}}
{{- end -}}
{{- if and $server.plainHttp.enabled (has (int $server.plainHttp.port) (list (int $server.httpsPort) (int $server.adminPort))) -}}
{{- fail "server.plainHttp.port: must differ from server.httpsPort and server.adminPort" -}}
{{- end -}}
[server]
listen = {{ include "isthmus.address" (list $server.bindAddress $server.httpsPort) | quote }}
{{- if $server.plainHttp.enabled }}
plain_listen = {{ include "isthmus.address" (list $server.bindAddress $server.plainHttp.port) | quote }}
{{- end }}
admin_listen = {{ include "isthmus.adminAddress" . | quote }}
{{- if .Values.admin.expose }}
{{- if not .Values.admin.tokenSecret.name }}
{{- fail "admin.tokenSecret.name: required when admin.expose is true (a Secret with the token Prometheus and the probes present)" }}
{{- end }}
admin_tokens = [{ id = "admin", key_env = "ISTHMUS_ADMIN_TOKEN" }]
{{- end }}
state_dir = {{ include "isthmus.stateDir" . | quote }}
drain_timeout_ms = {{ mul (int $server.drainTimeoutSeconds) 1000 }}
{{- if $server.workerThreads }}
worker_threads = {{ int $server.workerThreads }}
{{- end }}
{{- with $server.trustedProxies }}
trusted_proxies = [{{ range $index, $proxy := . }}{{ if $index }}, {{ end }}{{ $proxy | quote }}{{ end }}]
{{- end }}
{{- with $server.forwardedHeader }}
forwarded_header = {{ . | quote }}
{{- end }}
{{- /* Watched in either mode: a rotated API key Secret (a `key_file`) is read only by the
watch; with `rollout` a changed ConfigMap also rolls the gateways. */}}
config_watch_interval_ms = {{ mul (int .Values.configReload.watchIntervalSeconds) 1000 }}
{{- if include "isthmus.tlsSecretName" . }}

[server.tls]
cert = {{ printf "%s/tls.crt" (include "isthmus.tlsDir" .) | quote }}
key = {{ printf "%s/tls.key" (include "isthmus.tlsDir" .) | quote }}
{{- end }}
{{- with $server.limits }}

[server.limits]
{{- range $key, $value := . }}
{{ $key }} = {{ int64 $value }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The pods' configuration checksum: what rolls them. With `configReload.mode: inPlace`
only what the gateway reads at start-up counts (the [server] table and the [models],
[engine], [audit], [responses], [logging] and [telemetry] sections, as parsed, so comments and layout do
not count); the rest reloads in place. With `rollout`, the whole file. */}}
{{- define "isthmus.configChecksum" -}}
{{- $configuration := include "isthmus.configuration" . -}}
{{- if eq .Values.configReload.mode "inPlace" -}}
{{- $startUp := pick (fromToml .Values.config) "models" "engine" "audit" "responses" "logging" "telemetry" -}}
{{- printf "%s\n%s" (include "isthmus.serverTable" .) (toJson $startUp) | sha256sum -}}
{{- else -}}
{{- $configuration | sha256sum -}}
{{- end -}}
{{- end -}}

{{/* The Secret with the data plane's certificate: the operator's, or the one cert-manager
issues for the chart's Certificate; empty when the gateway provisions its own. */}}
{{- define "isthmus.tlsSecretName" -}}
{{- if .Values.server.tls.secretName -}}
{{- .Values.server.tls.secretName -}}
{{- else if .Values.server.tls.certManager.issuerRef.name -}}
{{- printf "%s-tls" (include "isthmus.fullname" .) -}}
{{- end -}}
{{- end -}}
