{{/* The EPP's name: <release>-epp, as the upstream chart. */}}
{{- define "switchyard.eppName" -}}
{{- printf "%s-epp" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "switchyard.selectorLabels" -}}
app.kubernetes.io/name: switchyard-epp
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "switchyard.labels" -}}
{{ include "switchyard.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Engine mapping name for inferencePool.modelServerType. */}}
{{- define "switchyard.engine" -}}
{{- $t := .Values.inferencePool.modelServerType | lower -}}
{{- $engines := dict "vllm" "vllm" "sglang" "sglang" "triton" "triton" "trtllm" "trtllm-serve" -}}
{{- if not (hasKey $engines $t) -}}
{{- fail (printf "inferencePool.modelServerType must be one of vllm, sglang, triton, trtllm; got %q" $t) -}}
{{- end -}}
{{- get $engines $t -}}
{{- end -}}

{{/* Leader election: asked for, or implied by more than one replica. */}}
{{- define "switchyard.ha" -}}
{{- if or .Values.inferenceExtension.leaderElection.enabled (gt (int .Values.inferenceExtension.replicas) 1) -}}
true
{{- end -}}
{{- end -}}

{{- define "switchyard.image" -}}
{{- $i := .Values.inferenceExtension.image -}}
{{- printf "%s/%s:%s" $i.registry $i.repository (default .Chart.AppVersion $i.tag) -}}
{{- end -}}
