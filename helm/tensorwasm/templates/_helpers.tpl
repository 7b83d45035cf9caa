{{/*
Names, labels and image references shared by every template. Nothing here renders an object.
*/}}

{{/* Chart name, overridable. */}}
{{- define "tensorwasm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* "<release>-<chart>", or just the release when it already contains the chart name. */}}
{{- define "tensorwasm.fullname" -}}
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

{{/* Name of a component's object: "<fullname>-<component>" (fits 63 characters). */}}
{{- define "tensorwasm.componentName" -}}
{{- $full := include "tensorwasm.fullname" .root | trunc (int (sub 62 (len .component))) | trimSuffix "-" }}
{{- printf "%s-%s" $full .component }}
{{- end }}

{{/*
Cluster-scoped objects carry the namespace too, so releases in two namespaces do not collide.
*/}}
{{- define "tensorwasm.clusterName" -}}
{{- printf "%s-%s" (include "tensorwasm.componentName" .) .root.Release.Namespace }}
{{- end }}

{{- define "tensorwasm.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of a component: stable across upgrades (a Deployment selector is immutable). */}}
{{- define "tensorwasm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tensorwasm.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Every label of a component's objects. Call with (dict "root" $ "component" "operator"). */}}
{{- define "tensorwasm.labels" -}}
helm.sh/chart: {{ include "tensorwasm.chart" .root }}
{{ include "tensorwasm.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: tensorwasm
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels the operator puts on the shard StatefulSet, its pods and its headless Service. */}}
{{- define "tensorwasm.shardLabels" -}}
app.kubernetes.io/name: {{ .Values.shard.name }}
app.kubernetes.io/component: runtime-shard
{{- end }}

{{/* "repo:tag" or "repo@digest"; call with (dict "repository" r "tag" t "digest" d). */}}
{{- define "tensorwasm.imageRef" -}}
{{- if .digest }}
{{- printf "%s@%s" .repository .digest }}
{{- else }}
{{- printf "%s:%s" .repository .tag }}
{{- end }}
{{- end }}

{{- define "tensorwasm.operatorImage" -}}
{{- include "tensorwasm.imageRef" (dict "repository" .Values.image.repository "tag" (default .Chart.AppVersion .Values.image.tag) "digest" .Values.image.digest) }}
{{- end }}

{{/* The shards use the operator's image unless shard.image overrides part of it. */}}
{{- define "tensorwasm.shardImage" -}}
{{- $repo := default .Values.image.repository .Values.shard.image.repository }}
{{- if .Values.shard.image.tag }}
{{- include "tensorwasm.imageRef" (dict "repository" $repo "tag" .Values.shard.image.tag "digest" "") }}
{{- else }}
{{- include "tensorwasm.imageRef" (dict "repository" $repo "tag" (default .Chart.AppVersion .Values.image.tag) "digest" .Values.image.digest) }}
{{- end }}
{{- end }}

{{- define "tensorwasm.operatorServiceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "tensorwasm.componentName" (dict "root" . "component" "operator")) .Values.operator.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Empty when neither created nor named: the shards then run as the namespace's default account. */}}
{{- define "tensorwasm.shardServiceAccountName" -}}
{{- if .Values.shard.serviceAccount.create }}
{{- default (include "tensorwasm.componentName" (dict "root" . "component" "shard")) .Values.shard.serviceAccount.name }}
{{- else }}
{{- .Values.shard.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Whether the prometheus-operator objects render: the API is served, or the user forces them. */}}
{{- define "tensorwasm.prometheusOperator" -}}
{{- if and .Values.monitoring.enabled (or .Values.monitoring.force (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1")) }}true{{- end }}
{{- end }}
