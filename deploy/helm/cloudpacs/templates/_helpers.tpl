{{/*
Names, labels and the pieces every component shares. Components: the gateway plus the services of the
routing table (files/routes.json, generated from pacslib/routing.py).
*/}}

{{- define "cloudpacs.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "cloudpacs.fullname" -}}
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

{{/* The routing document generated from pacslib/routing.py. */}}
{{- define "cloudpacs.routes" -}}
{{- .Files.Get "files/routes.json" }}
{{- end }}

{{/* Every component, gateway first (a JSON list; use with fromJsonArray). */}}
{{- define "cloudpacs.components" -}}
{{- $routes := include "cloudpacs.routes" . | fromJson }}
{{- prepend $routes.services "gateway" | toJson }}
{{- end }}

{{/* Container port of a component: the same ports as the embedded mode. */}}
{{- define "cloudpacs.port" -}}
{{- $ports := dict "gateway" 8042 "auth" 8043 "ingest" 8044 "storage" 8045 "render" 8046 "audit" 8047 }}
{{- required (printf "no port is defined for component %s" .) (get $ports .) }}
{{- end }}

{{/* Object name of a component: <fullname>-<component> (args: dict root component). */}}
{{- define "cloudpacs.componentName" -}}
{{- printf "%s-%s" (include "cloudpacs.fullname" .root) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* In-cluster base URL of a service (args: dict root component). */}}
{{- define "cloudpacs.serviceUrl" -}}
{{- printf "http://%s:%s" (include "cloudpacs.componentName" .) (include "cloudpacs.port" .component) }}
{{- end }}

{{- define "cloudpacs.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "cloudpacs.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: cloudpacs
{{- end }}

{{- define "cloudpacs.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cloudpacs.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Labels shared by every pod of this release (used by the release-wide network policies). */}}
{{- define "cloudpacs.releaseSelector" -}}
app.kubernetes.io/name: {{ include "cloudpacs.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Image reference of a component: <repository>/<component>:<tag>[@digest]. */}}
{{- define "cloudpacs.image" -}}
{{- $values := index .root.Values .component }}
{{- $ref := printf "%s/%s:%s" (trimSuffix "/" .root.Values.image.repository) .component (default .root.Chart.AppVersion .root.Values.image.tag) }}
{{- if $values.image.digest }}{{ printf "%s@%s" $ref $values.image.digest }}{{ else }}{{ $ref }}{{ end }}
{{- end }}

{{/* An environment value as text; whole numbers stay whole (values arrive as floats). */}}
{{- define "cloudpacs.envValue" -}}
{{- if or (kindIs "map" .) (kindIs "slice" .) }}{{ toJson . }}
{{- else if and (kindIs "float64" .) (eq . (float64 (int64 .))) }}{{ int64 . }}
{{- else }}{{ toString . }}
{{- end }}
{{- end }}

{{/* Name of the Secret holding the service token, and its key. */}}
{{- define "cloudpacs.serviceIdentitiesSecret" -}}
{{- default (printf "%s-service-identities" (include "cloudpacs.fullname" .)) .Values.serviceIdentities.existingSecret }}
{{- end }}

{{/* The services that have an identity at auth (client id = component name). */}}
{{- define "cloudpacs.identityServices" -}}
{{- toJson (list "ingest" "storage" "render" "audit") }}
{{- end }}

{{/* The services with a KEK keyring (<service>.keyring, mounted read-only from a Secret). */}}
{{- define "cloudpacs.keyringServices" -}}
{{- toJson (list "storage" "auth" "audit") }}
{{- end }}

{{/* The services that use the MongoDB replica set (the URI from the MongoDB Secret, each its own database). */}}
{{- define "cloudpacs.mongodbServices" -}}
{{- toJson (list "storage" "auth" "audit") }}
{{- end }}

{{/*
The services that get trustedCa: storage (its S3 client) and every MongoDB user (a tlsCAFile in the
shared MongoDB URI must exist in each of their pods).
*/}}
{{- define "cloudpacs.trustedCaServices" -}}
{{- toJson (list "storage" "auth" "audit") }}
{{- end }}

{{/*
Components that must run exactly one pod: the audit trail is one hash chain with a single writer, so
its Deployment has one replica, no autoscaler and the Recreate strategy (no two pods during a rollout).
*/}}
{{- define "cloudpacs.singleReplica" -}}
{{- toJson (list "audit") }}
{{- end }}

{{/* "true" when a component's Deployment is scaled by a HorizontalPodAutoscaler (args: dict root component). */}}
{{- define "cloudpacs.autoscaled" -}}
{{- $cv := index .root.Values .component }}
{{- if and (not (has .component (include "cloudpacs.singleReplica" .root | fromJsonArray))) $cv.autoscaling $cv.autoscaling.enabled }}true{{ end }}
{{- end }}

{{- define "cloudpacs.keyringSecret" -}}
{{- $values := index .root.Values .component }}
{{- default (printf "%s-%s-keyring" (include "cloudpacs.fullname" .root) .component) $values.keyring.existingSecret }}
{{- end }}

{{- define "cloudpacs.mongodbSecret" -}}
{{- default (printf "%s-mongodb" (include "cloudpacs.fullname" .)) .Values.mongodb.existingSecret }}
{{- end }}

{{/* Secret of a zone's S3 credentials (args: dict root zone). */}}
{{- define "cloudpacs.zoneSecret" -}}
{{- default (printf "%s-s3-%s" (include "cloudpacs.fullname" .root) .zone.name) .zone.existingSecret }}
{{- end }}

{{- define "cloudpacs.kafkaSecret" -}}
{{- default (printf "%s-kafka" (include "cloudpacs.fullname" .)) .Values.kafka.sasl.existingSecret }}
{{- end }}

{{/* "true" unless the zone sets secure: false. */}}
{{- define "cloudpacs.zoneSecure" -}}
{{- if and (hasKey . "secure") (not .secure) }}false{{ else }}true{{ end }}
{{- end }}

{{/* Host of publicUrl (the Ingress host). */}}
{{- define "cloudpacs.publicHost" -}}
{{- (urlParse .Values.publicUrl).hostname }}
{{- end }}

{{/* TCP ports of the S3 endpoints of every zone (a JSON list). */}}
{{- define "cloudpacs.s3Ports" -}}
{{- $ports := list }}
{{- range .Values.objectStore.zones }}
{{- $parts := splitList ":" .endpoint }}
{{- $port := ternary (last $parts) (ternary "443" "80" (eq (include "cloudpacs.zoneSecure" .) "true")) (gt (len $parts) 1) }}
{{- $ports = append $ports (int $port) }}
{{- end }}
{{- $ports | uniq | toJson }}
{{- end }}

{{/*
Checks the schema cannot express with a clear message; every template includes it, so a wrong value
fails the install before anything is created.
*/}}
{{- define "cloudpacs.validate" -}}
{{- $zoneNames := list }}
{{- range .Values.objectStore.zones }}
{{- if has .name $zoneNames }}
{{- fail (printf "objectStore.zones: the zone name %q is used twice; zone names must be unique" .name) }}
{{- end }}
{{- $zoneNames = append $zoneNames .name }}
{{- if and (not .existingSecret) (not (and .accessKey .secretKey)) }}
{{- fail (printf "objectStore.zones[%s]: set existingSecret (a Secret with the S3 access and secret keys) or both accessKey and secretKey" .name) }}
{{- end }}
{{- end }}
{{- if and (not .Values.mongodb.existingSecret) (not .Values.mongodb.uri) }}
{{- fail "mongodb: set existingSecret (a Secret holding the MongoDB URI under mongodb.uriKey) or mongodb.uri" }}
{{- end }}
{{- range $component := include "cloudpacs.keyringServices" . | fromJsonArray }}
{{- $keyring := (index $.Values $component).keyring }}
{{- if or (not $keyring) (and (not $keyring.existingSecret) (not $keyring.keyringJson)) }}
{{- fail (printf "%s.keyring: set existingSecret (a Secret holding the KEK keyring file under %s.keyring.key) or keyringJson; see the chart README to create a keyring" $component $component) }}
{{- end }}
{{- end }}
{{- range $component := include "cloudpacs.singleReplica" . | fromJsonArray }}
{{- $cv := index $.Values $component }}
{{- if ne (int $cv.replicas) 1 }}
{{- fail (printf "%s.replicas must be 1: the audit trail is one hash chain with a single writer" $component) }}
{{- end }}
{{- if and $cv.autoscaling $cv.autoscaling.enabled }}
{{- fail (printf "%s.autoscaling cannot be enabled: the audit trail is one hash chain with a single writer" $component) }}
{{- end }}
{{- end }}
{{- if not .Values.kafka.enabled }}
{{- fail "kafka.enabled must be true: the Kafka event bus carries every access event to the audit service, and without it accesses would go unrecorded" }}
{{- end }}
{{- if and .Values.kafka.enabled (eq .Values.kafka.bootstrapServers "") }}
{{- fail "kafka.bootstrapServers is required when kafka.enabled is true (host:port[,host:port...])" }}
{{- end }}
{{- if and .Values.kafka.enabled (hasPrefix "SASL" .Values.kafka.securityProtocol) (not .Values.kafka.sasl.existingSecret) (not .Values.kafka.sasl.password) }}
{{- fail "kafka.sasl: set existingSecret (a Secret holding the password under kafka.sasl.passwordKey) or password when kafka.securityProtocol uses SASL" }}
{{- end }}
{{- if and .Values.trustedCa.configMap .Values.trustedCa.secret }}
{{- fail "trustedCa: set configMap or secret, not both" }}
{{- end }}
{{- if .Values.audit.settings.syslog_enabled }}
{{- if not .Values.audit.settings.syslog_host }}
{{- fail "audit.settings.syslog_host is required when audit.settings.syslog_enabled is true (the SIEM's TLS syslog collector)" }}
{{- end }}
{{- if eq (not .Values.audit.siem.caConfigMap) (not .Values.audit.siem.caSecret) }}
{{- fail "audit.siem: set caConfigMap or caSecret (the CA bundle of the syslog collector), exactly one, when audit.settings.syslog_enabled is true" }}
{{- end }}
{{- end }}
{{- end }}
