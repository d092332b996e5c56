{{- define "bbr.name" -}}
{{- printf "%s-bbr" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "bbr.selectorLabels" -}}
app.kubernetes.io/name: switchyard-bbr
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "bbr.labels" -}}
{{ include "bbr.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Cluster-scoped objects are shared by every release: the namespace keeps names apart. */}}
{{- define "bbr.clusterName" -}}
{{- printf "%s-%s" .Release.Namespace (include "bbr.name" .) -}}
{{- end -}}

{{/* A model entry checked: a DNS-label name and a base model. Args: the entry. */}}
{{- define "bbr.checkModel" -}}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]{0,40}[a-z0-9])?$" (toString .name)) -}}
{{- fail (printf "models[].name %q must be a DNS label of at most 42 characters" (toString .name)) -}}
{{- end -}}
{{- if not .baseModel -}}
{{- fail (printf "models[%s].baseModel is required" .name) -}}
{{- end -}}
{{- range .adapters -}}
{{- if or (not .id) (not .source) -}}
{{- fail "every adapter needs an id and a source" -}}
{{- end -}}
{{- end -}}
{{- end -}}
