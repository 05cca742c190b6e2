{{/*
Environment of each component: exactly the variables the services read (their settings.py; the gateway's
embedded/gateway_main.py). Plain values go to the component's ConfigMap, secrets come from Secret refs.
tests/deploy checks every name against the settings classes.
*/}}

{{- define "cloudpacs.mountPaths" -}}
{{- toJson (dict "state" "/var/lib/cloudpacs" "tmp" "/tmp" "keyring" "/etc/cloudpacs/keyring" "trustedCa" "/etc/cloudpacs/trusted-ca" "kafkaCa" "/etc/cloudpacs/kafka-ca" "syslogCa" "/etc/cloudpacs/syslog-ca" "syslogClient" "/etc/cloudpacs/syslog-client") }}
{{- end }}

{{/* Plain environment of a component as a YAML map (args: dict root component). */}}
{{- define "cloudpacs.configEnv" -}}
{{- $root := .root }}
{{- $c := .component }}
{{- $v := $root.Values }}
{{- $paths := include "cloudpacs.mountPaths" . | fromJson }}
{{- if eq $c "gateway" }}
{{- $upstreams := list }}
{{- range $service := (include "cloudpacs.routes" $root | fromJson).services }}
{{- $upstreams = append $upstreams (printf "%s=%s" $service (include "cloudpacs.serviceUrl" (dict "root" $root "component" $service))) }}
{{- end }}
PACS_GATEWAY_UPSTREAMS: {{ join "," $upstreams | quote }}
PACS_GATEWAY_HOST: "0.0.0.0"
PACS_GATEWAY_PORT: {{ include "cloudpacs.port" $c | quote }}
PACS_GATEWAY_BODY_IDLE_TIMEOUT: {{ include "cloudpacs.envValue" $v.gateway.bodyIdleTimeoutSeconds | quote }}
{{- else }}
{{- $p := printf "PACS_%s_" (upper $c) }}
{{- $cv := index $v $c }}
{{ $p }}HOST: "0.0.0.0"
{{ $p }}PORT: {{ include "cloudpacs.port" $c | quote }}
{{ $p }}LOG_LEVEL: {{ default $v.logLevel $cv.logLevel | quote }}
{{ $p }}STATE_DIR: {{ $paths.state | quote }}
{{ $p }}FORWARDED_ALLOW_IPS: {{ $v.forwardedAllowIps | quote }}
{{- if ne $c "auth" }}
{{ $p }}AUTH_URL: {{ include "cloudpacs.serviceUrl" (dict "root" $root "component" "auth") | quote }}
{{ $p }}AUTH_ISSUER: {{ trimSuffix "/" $v.publicUrl | quote }}
{{ $p }}AUTH_CLIENT_ID: {{ $c | quote }}
{{- end }}
{{- if $v.kafka.enabled }}
{{ $p }}EVENT_BUS: "kafka"
{{ $p }}KAFKA_BOOTSTRAP_SERVERS: {{ $v.kafka.bootstrapServers | quote }}
{{ $p }}KAFKA_SECURITY_PROTOCOL: {{ $v.kafka.securityProtocol | quote }}
{{- if hasPrefix "SASL" $v.kafka.securityProtocol }}
{{ $p }}KAFKA_SASL_MECHANISM: {{ $v.kafka.sasl.mechanism | quote }}
{{ $p }}KAFKA_SASL_USERNAME: {{ $v.kafka.sasl.username | quote }}
{{- end }}
{{- if $v.kafka.caSecret }}
{{ $p }}KAFKA_SSL_CAFILE: {{ printf "%s/%s" $paths.kafkaCa $v.kafka.caKey | quote }}
{{- end }}
{{- /* Every service must use the same topic names (the prefix), so these are release-wide values. */}}
{{ $p }}KAFKA_TOPIC_PREFIX: {{ $v.kafka.topicPrefix | quote }}
{{ $p }}KAFKA_TOPIC_PARTITIONS: {{ include "cloudpacs.envValue" $v.kafka.topicPartitions | quote }}
{{ $p }}KAFKA_TOPIC_REPLICATION_FACTOR: {{ include "cloudpacs.envValue" $v.kafka.topicReplicationFactor | quote }}
{{ $p }}KAFKA_TOPIC_RETENTION_MS: {{ include "cloudpacs.envValue" $v.kafka.topicRetentionMs | quote }}
{{- else }}
{{ $p }}EVENT_BUS: "embedded"
{{- end }}
{{- if eq $c "storage" }}
{{- $zone := first $v.objectStore.zones }}
PACS_STORAGE_OBJECT_STORE: "s3"
PACS_STORAGE_S3_ENDPOINT: {{ $zone.endpoint | quote }}
PACS_STORAGE_S3_BUCKET: {{ $zone.bucket | quote }}
PACS_STORAGE_S3_SECURE: {{ include "cloudpacs.zoneSecure" $zone | quote }}
{{- if $zone.region }}
PACS_STORAGE_S3_REGION: {{ $zone.region | quote }}
{{- end }}
PACS_STORAGE_METADATA_DB: "mongodb"
PACS_STORAGE_KEYRING_PATH: {{ printf "%s/%s" $paths.keyring $v.storage.keyring.key | quote }}
PACS_STORAGE_CREATE_KEYRING: "false"
{{- else if eq $c "ingest" }}
PACS_INGEST_STORAGE_URL: {{ include "cloudpacs.serviceUrl" (dict "root" $root "component" "storage") | quote }}
{{- else if eq $c "auth" }}
PACS_AUTH_ISSUER: {{ trimSuffix "/" $v.publicUrl | quote }}
PACS_AUTH_STORE: "mongodb"
PACS_AUTH_KEYRING_PATH: {{ printf "%s/%s" $paths.keyring $v.auth.keyring.key | quote }}
PACS_AUTH_CREATE_KEYRING: "false"
{{- else if eq $c "render" }}
PACS_RENDER_STORAGE_URL: {{ include "cloudpacs.serviceUrl" (dict "root" $root "component" "storage") | quote }}
{{- else if eq $c "audit" }}
PACS_AUDIT_STORE: "mongodb"
PACS_AUDIT_KEYRING_PATH: {{ printf "%s/%s" $paths.keyring $v.audit.keyring.key | quote }}
PACS_AUDIT_CREATE_KEYRING: "false"
PACS_AUDIT_STORAGE_URL: {{ include "cloudpacs.serviceUrl" (dict "root" $root "component" "storage") | quote }}
{{- if $v.audit.settings.syslog_enabled }}
PACS_AUDIT_SYSLOG_CA_FILE: {{ printf "%s/%s" $paths.syslogCa $v.audit.siem.caKey | quote }}
{{- if $v.audit.siem.clientCertSecret }}
PACS_AUDIT_SYSLOG_CLIENT_CERT_FILE: {{ printf "%s/tls.crt" $paths.syslogClient | quote }}
PACS_AUDIT_SYSLOG_CLIENT_KEY_FILE: {{ printf "%s/tls.key" $paths.syslogClient | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- if and (has $c (include "cloudpacs.trustedCaServices" $root | fromJsonArray)) (or $v.trustedCa.configMap $v.trustedCa.secret) }}
SSL_CERT_FILE: {{ printf "%s/%s" $paths.trustedCa $v.trustedCa.key | quote }}
{{- end }}
{{- range $field, $value := $cv.settings }}
{{ $p }}{{ upper $field }}: {{ include "cloudpacs.envValue" $value | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* Secret environment of a component as a list of env entries (args: dict root component). */}}
{{- define "cloudpacs.secretEnv" -}}
{{- $root := .root }}
{{- $c := .component }}
{{- $v := $root.Values }}
{{- if ne $c "gateway" }}
{{- $p := printf "PACS_%s_" (upper $c) }}
{{- if eq $c "auth" }}
- name: PACS_AUTH_SERVICE_CLIENTS
  valueFrom:
    secretKeyRef:
      name: {{ include "cloudpacs.serviceIdentitiesSecret" $root }}
      key: clients.json
{{- else }}
- name: {{ $p }}AUTH_CLIENT_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "cloudpacs.serviceIdentitiesSecret" $root }}
      key: {{ $c }}
{{- end }}
{{- if and $v.kafka.enabled (hasPrefix "SASL" $v.kafka.securityProtocol) }}
- name: {{ $p }}KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "cloudpacs.kafkaSecret" $root }}
      key: {{ $v.kafka.sasl.passwordKey }}
{{- end }}
{{- if has $c (include "cloudpacs.mongodbServices" $root | fromJsonArray) }}
- name: {{ $p }}MONGODB_URI
  valueFrom:
    secretKeyRef:
      name: {{ include "cloudpacs.mongodbSecret" $root }}
      key: {{ $v.mongodb.uriKey }}
{{- end }}
{{- if eq $c "storage" }}
{{- $zone := first $v.objectStore.zones }}
- name: PACS_STORAGE_S3_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "cloudpacs.zoneSecret" (dict "root" $root "zone" $zone) }}
      key: {{ $zone.accessKeyKey | default "accessKey" }}
- name: PACS_STORAGE_S3_SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "cloudpacs.zoneSecret" (dict "root" $root "zone" $zone) }}
      key: {{ $zone.secretKeyKey | default "secretKey" }}
{{- end }}
{{- range $field, $ref := (index $v $c).secretSettings }}
- name: {{ $p }}{{ upper $field }}
  valueFrom:
    secretKeyRef:
      name: {{ $ref.name }}
      key: {{ $ref.key }}
{{- end }}
{{- end }}
{{- end }}
