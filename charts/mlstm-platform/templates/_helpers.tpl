{{/* Chart name, cut to the 63-character DNS label limit. */}}
{{- define "mlstm-platform.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: the release name when it already contains the chart name, else
"<release>-<chart>". mlstm_platform/platform_refs.py mirrors this so jobs find the Secret and Service.
*/}}
{{- define "mlstm-platform.fullname" -}}
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

{{/* Chart name and version, as used by the helm.sh/chart label. */}}
{{- define "mlstm-platform.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every object carries. */}}
{{- define "mlstm-platform.labels" -}}
helm.sh/chart: {{ include "mlstm-platform.chart" . }}
{{ include "mlstm-platform.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mlstm-platform
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels that select this release's pods (never change them after install: selectors are immutable). */}}
{{- define "mlstm-platform.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mlstm-platform.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* MinIO's StatefulSet, Service and generated Secret share this name. */}}
{{- define "mlstm-platform.minio.fullname" -}}
{{- printf "%s-minio" (include "mlstm-platform.fullname" . | trunc 57 | trimSuffix "-") }}
{{- end }}

{{/* The Secret holding MinIO's root and training credentials (generated, or the user's own). */}}
{{- define "mlstm-platform.minio.secretName" -}}
{{- default (include "mlstm-platform.minio.fullname" .) .Values.minio.auth.existingSecret }}
{{- end }}

{{/* In-cluster S3 endpoint of MinIO. */}}
{{- define "mlstm-platform.minio.endpoint" -}}
{{- printf "http://%s.%s.svc:%d" (include "mlstm-platform.minio.fullname" .) .Release.Namespace (int .Values.minio.service.apiPort) }}
{{- end }}

{{/* ServiceAccount of the training pods. */}}
{{- define "mlstm-platform.trainer.serviceAccountName" -}}
{{- if .Values.trainer.serviceAccount.create }}
{{- default (printf "%s-trainer" (include "mlstm-platform.fullname" . | trunc 55 | trimSuffix "-")) .Values.trainer.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.trainer.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Restricted-profile container securityContext (no privilege escalation, no capabilities). */}}
{{- define "mlstm-platform.containerSecurityContext" -}}
allowPrivilegeEscalation: false
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
{{- end }}

{{/* Restricted-profile pod securityContext. */}}
{{- define "mlstm-platform.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
fsGroup: 1000
seccompProfile:
  type: RuntimeDefault
{{- end }}
