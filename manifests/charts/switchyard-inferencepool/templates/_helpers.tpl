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

{{/* Cluster-scoped objects are shared by every release: the namespace keeps names apart. */}}
{{- define "switchyard.clusterName" -}}
{{- printf "%s-%s" .Release.Namespace (include "switchyard.eppName" .) -}}
{{- end -}}

{{/*
A scalar value as the EPP would read it on its command line. Values files carry numbers as
floats, and "%v" would print 16777216 as 1.6777216e+07.
*/}}
{{- define "switchyard.str" -}}
{{- if kindIs "float64" . -}}
{{- if eq . (floor .) }}{{ int64 . }}{{ else }}{{ . }}{{ end -}}
{{- else if not (kindIs "invalid" .) -}}
{{- . -}}
{{- end -}}
{{- end -}}

{{/* "true" or "" for a boolean value (bool or string; unset is false); anything else fails. Args: (list what value). */}}
{{- define "switchyard.bool" -}}
{{- $what := index . 0 -}}
{{- $v := lower (include "switchyard.str" (index . 1)) -}}
{{- if eq $v "true" -}}true
{{- else if not (has $v (list "false" "")) -}}
{{- fail (printf "%s must be true or false, got %q" $what $v) -}}
{{- end -}}
{{- end -}}

{{/* Engine mapping name for inferencePool.modelServerType (upstream's names and ours). */}}
{{- define "switchyard.engine" -}}
{{- $t := .Values.inferencePool.modelServerType | default "vllm" | lower -}}
{{- $engines := dict "vllm" "vllm" "sglang" "sglang" "triton" "triton" "triton-tensorrt-llm" "triton" "trtllm" "trtllm-serve" "trtllm-serve" "trtllm-serve" -}}
{{- if not (hasKey $engines $t) -}}
{{- fail (printf "inferencePool.modelServerType must be one of vllm, sglang, triton (triton-tensorrt-llm), trtllm-serve (trtllm); got %q" $t) -}}
{{- end -}}
{{- get $engines $t -}}
{{- end -}}

{{- define "switchyard.provider" -}}
{{- .Values.provider.name | default "none" | lower -}}
{{- end -}}

{{- define "switchyard.image" -}}
{{- $i := .Values.inferenceExtension.image -}}
{{- $tag := include "switchyard.str" $i.tag | default .Chart.AppVersion -}}
{{- if or $i.hub $i.name -}}
{{- /* Upstream's v1.4 form; our defaults never set it, so it is the user's choice. */ -}}
{{- printf "%s/%s:%s" ($i.hub | default "registry.k8s.io/gateway-api-inference-extension") ($i.name | default "epp") $tag -}}
{{- else -}}
{{- printf "%s/%s:%s" $i.registry $i.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* The pool's target ports as a JSON list of numbers: targetPorts, else targetPortNumber, else 8000. */}}
{{- define "switchyard.targetPorts" -}}
{{- $p := .Values.inferencePool -}}
{{- $ports := list -}}
{{- range $p.targetPorts -}}
{{- $ports = append $ports (int .number) -}}
{{- end -}}
{{- $single := $p.targetPortNumber -}}
{{- if and (not (kindIs "invalid" $single)) (ne (toString $single) "") -}}
{{- if not $ports -}}
{{- $ports = list (int $single) -}}
{{- else if not (has (int $single) $ports) -}}
{{- fail (printf "inferencePool.targetPortNumber (%d) is not one of inferencePool.targetPorts %v: targetPortNumber is upstream's single-port form, used only when targetPorts is empty; set targetPorts (or null it)" (int $single) $ports) -}}
{{- end -}}
{{- end -}}
{{- if not $ports -}}
{{- $ports = list 8000 -}}
{{- end -}}
{{- toJson $ports -}}
{{- end -}}

{{- define "switchyard.failureMode" -}}
{{- $new := .Values.inferenceExtension.failureMode | default "" -}}
{{- $old := .Values.inferencePool.failureMode | default "" -}}
{{- range $what, $v := dict "inferenceExtension.failureMode" $new "inferencePool.failureMode" $old -}}
{{- if not (has $v (list "" "FailOpen" "FailClose")) -}}
{{- fail (printf "%s must be FailOpen or FailClose, got %q" $what $v) -}}
{{- end -}}
{{- end -}}
{{- if and $new $old (ne $new $old) -}}
{{- fail (printf "inferenceExtension.failureMode (%s) and inferencePool.failureMode (%s) disagree: set inferenceExtension.failureMode only (upstream's key; the other is this chart's older spelling)" $new $old) -}}
{{- end -}}
{{- $new | default $old | default "FailOpen" -}}
{{- end -}}

{{/* Flag values the chart derives from other values, as JSON. */}}
{{- define "switchyard.derivedFlags" -}}
{{- $e := .Values.inferenceExtension -}}
{{- $m := $e.metricsDataSource -}}
{{- $scheme := $m.scheme | default "http" | lower -}}
{{- /* metricsDataSource as flags too: the default config carries it as its
       metrics-data-source plugin, a custom config (pluginsConfigFile) does not, and the
       flags are how it still reaches the EPP there. */ -}}
{{- $flags := dict
  "pool-name" .Release.Name
  "pool-namespace" .Release.Namespace
  "grpc-port" (include "switchyard.str" $e.extProcPort)
  "grpc-health-port" (include "switchyard.str" $e.healthPort)
  "metrics-port" (include "switchyard.str" $e.metricsPort)
  "config-file" (printf "/config/%s" $e.pluginsConfigFile)
  "model-server-metrics-path" ($m.path | default "/metrics")
  "model-server-metrics-scheme" $scheme -}}
{{- if eq $scheme "https" -}}
{{- $_ := set $flags "model-server-metrics-https-insecure-skip-verify" (toString (ne (toString $m.insecureSkipVerify) "false")) -}}
{{- end -}}
{{- toJson $flags -}}
{{- end -}}

{{/*
inferenceExtension.flags as JSON name -> string, checked against files/epp-flags.yaml.
Upstream's map, or v1.0's list of {name, value} (a repeated name: the last one wins, as pflag).
*/}}
{{- define "switchyard.userFlags" -}}
{{- $raw := .Values.inferenceExtension.flags -}}
{{- $known := .Files.Get "files/epp-flags.yaml" | fromYaml -}}
{{- $derived := include "switchyard.derivedFlags" . | fromJson -}}
{{- $flags := dict -}}
{{- if kindIs "slice" $raw -}}
{{- range $i, $f := $raw -}}
{{- if not (and (kindIs "map" $f) (hasKey $f "name")) -}}
{{- fail (printf "inferenceExtension.flags[%d]: a list of flags (upstream v1.0's shape) holds {name, value} items" $i) -}}
{{- end -}}
{{- $_ := set $flags (toString $f.name) (get $f "value") -}}
{{- end -}}
{{- else if kindIs "map" $raw -}}
{{- $flags = $raw -}}
{{- else if not (kindIs "invalid" $raw) -}}
{{- fail "inferenceExtension.flags must be a map of name: value" -}}
{{- end -}}
{{- $out := dict -}}
{{- range $name, $v := $flags -}}
{{- $what := printf "inferenceExtension.flags.%s" $name -}}
{{- if hasPrefix "-" $name -}}
{{- fail (printf "%s: write flag names without dashes (v, not --v)" $what) -}}
{{- end -}}
{{- if or (kindIs "invalid" $v) (kindIs "map" $v) (kindIs "slice" $v) -}}
{{- fail (printf "%s needs a single value (a flag set to true takes true)" $what) -}}
{{- end -}}
{{- $s := include "switchyard.str" $v -}}
{{- if hasKey $known.refused $name -}}
{{- fail (printf "%s is refused: %s" $what (get $known.refused $name)) -}}
{{- else if hasKey $known.derived $name -}}
{{- if ne $s (get $derived $name) -}}
{{- fail (printf "%s (%s) disagrees with the chart, which sets it from %s (%s): change that value instead" $what $s (get $known.derived $name) (get $derived $name)) -}}
{{- end -}}
{{- else if not (has $name $known.accepted) -}}
{{- fail (printf "%s: the Switchyard EPP has no flag --%s (files/epp-flags.yaml lists its flags; metric-name flags are engine mappings of the core-metrics-extractor plugin here)" $what $name) -}}
{{- end -}}
{{- $_ := set $out $name $s -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/*
The pod's terminationGracePeriodSeconds: the reference's 130, or --shutdown-delay plus
--drain-grace-period (30 s unless set) plus 10 s when that is longer, so that the kubelet never cuts short the
delay and the drain the flags ask for.
*/}}
{{- define "switchyard.terminationGracePeriod" -}}
{{- $user := include "switchyard.userFlags" . | fromJson -}}
{{- $drain := include "switchyard.flagSeconds" (list $user "drain-grace-period") | atoi -}}
{{- if not (hasKey $user "drain-grace-period") -}}
{{- $drain = 30 -}}
{{- end -}}
{{- $delay := include "switchyard.flagSeconds" (list $user "shutdown-delay") | atoi -}}
{{- if not (hasKey $user "shutdown-delay") -}}
{{- $delay = include "switchyard.defaultShutdownDelay" . | trimSuffix "s" | default "0" | atoi -}}
{{- end -}}
{{- max 130 (add $drain $delay 10) -}}
{{- end -}}

{{/*
The chart's --shutdown-delay when inferenceExtension.flags sets none: 5s for active-active
replicas, which a RollingUpdate replaces one at a time, so that a pod going away keeps
serving while the gateways' endpoints move to the others (at SIGTERM it reports NOT_SERVING
at once and stops accepting after the delay); none otherwise (Recreate: nothing to hand to).
*/}}
{{- define "switchyard.defaultShutdownDelay" -}}
{{- if include "switchyard.activeActive" . -}}5s{{- end -}}
{{- end -}}

{{/*
A duration flag in whole seconds (0 when unset). The flag is read in one unit (90s, 2m, 1h,
plain seconds; below a second adds nothing); a value in several units is refused here rather
than guessed.
*/}}
{{- define "switchyard.flagSeconds" -}}
{{- $user := index . 0 -}}
{{- $name := index . 1 -}}
{{- $secs := 0 -}}
{{- with get $user $name -}}
{{- $d := trim . -}}
{{- if regexMatch "^[0-9]+$" $d -}}
{{- $secs = atoi $d -}}
{{- else if regexMatch "^[0-9]+s$" $d -}}
{{- $secs = atoi (trimSuffix "s" $d) -}}
{{- else if regexMatch "^[0-9]+m$" $d -}}
{{- $secs = mul 60 (atoi (trimSuffix "m" $d)) -}}
{{- else if regexMatch "^[0-9]+h$" $d -}}
{{- $secs = mul 3600 (atoi (trimSuffix "h" $d)) -}}
{{- else if not (regexMatch "^[0-9]+(ns|us|µs|ms)$" $d) -}}
{{- fail (printf "inferenceExtension.flags.%s %q: write it in one unit (90s, 2m) so that the chart can give the pod the time to drain" $name $d) -}}
{{- end -}}
{{- end -}}
{{- $secs -}}
{{- end -}}

{{/* Effective booleans: the flag if set, else the structured value. "true" or "". */}}
{{- define "switchyard.flagOr" -}}
{{- $ctx := index . 0 -}}
{{- $name := index . 1 -}}
{{- $user := include "switchyard.userFlags" $ctx | fromJson -}}
{{- if hasKey $user $name -}}
{{- include "switchyard.bool" (list (printf "inferenceExtension.flags.%s" $name) (get $user $name)) -}}
{{- else -}}
{{- include "switchyard.bool" (list (index . 2) (index . 3)) -}}
{{- end -}}
{{- end -}}

{{- define "switchyard.secureServing" -}}
{{- include "switchyard.flagOr" (list . "secure-serving" "inferenceExtension.secureServing" .Values.inferenceExtension.secureServing) -}}
{{- end -}}

{{- define "switchyard.metricsAuth" -}}
{{- $auth := .Values.inferenceExtension.monitoring.prometheus.auth -}}
{{- include "switchyard.flagOr" (list . "metrics-endpoint-auth" "inferenceExtension.monitoring.prometheus.auth.enabled" $auth.enabled) -}}
{{- end -}}

{{- define "switchyard.tracing" -}}
{{- include "switchyard.flagOr" (list . "tracing" "inferenceExtension.tracing.enabled" .Values.inferenceExtension.tracing.enabled) -}}
{{- end -}}

{{/* Active-active: "true" when every replica routes (no leader election), else "". */}}
{{- define "switchyard.sidecar" -}}
{{- include "switchyard.bool" (list "inferenceExtension.sidecar.enabled" (.Values.inferenceExtension.sidecar | default dict).enabled) -}}
{{- end -}}

{{- define "switchyard.activeActive" -}}
{{- include "switchyard.bool" (list "inferenceExtension.activeActive.enabled" (.Values.inferenceExtension.activeActive | default dict).enabled) -}}
{{- end -}}

{{/* The headless Service through which active-active replicas find each other. */}}
{{- define "switchyard.peersName" -}}
{{- printf "%s-peers" (include "switchyard.eppName" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Leader election: the flag if set, else asked for or implied by more than one replica
(unless active-active, which excludes it). */}}
{{- define "switchyard.ha" -}}
{{- $e := .Values.inferenceExtension -}}
{{- $aa := include "switchyard.activeActive" . -}}
{{- $implied := and (gt (int $e.replicas) 1) (not $aa) -}}
{{- $le := include "switchyard.bool" (list "inferenceExtension.leaderElection.enabled" ($e.leaderElection | default dict).enabled) -}}
{{- $legacy := include "switchyard.bool" (list "inferenceExtension.enableLeaderElection" $e.enableLeaderElection) -}}
{{- $asked := or $le $legacy $implied | toString -}}
{{- $on := include "switchyard.flagOr" (list . "ha-enable-leader-election" "inferenceExtension.leaderElection.enabled" $asked) -}}
{{- if and $on $aa -}}
{{- fail "inferenceExtension.activeActive.enabled and leader election exclude each other: active-active replicas all route, with leader election only the leader does" -}}
{{- end -}}
{{- if and (not $on) (not $aa) (gt (int $e.replicas) 1) -}}
{{- fail "inferenceExtension.flags.ha-enable-leader-election is false with more than one replica: every replica would route, each with its own view of the pool (set inferenceExtension.activeActive.enabled if that is meant)" -}}
{{- end -}}
{{- $on -}}
{{- end -}}

{{/*
The EPP's arguments, one YAML list item each. The chart's defaults come first, in a fixed order,
a flag from inferenceExtension.flags taking the place of the default of the same name; then
the other flags, by name. Every flag appears once.
*/}}
{{- define "switchyard.eppArgs" -}}
{{- $e := .Values.inferenceExtension -}}
{{- $user := include "switchyard.userFlags" . | fromJson -}}
{{- $d := include "switchyard.derivedFlags" . | fromJson -}}
{{- $defaults := list
  (list "pool-name" (get $d "pool-name"))
  (list "pool-namespace" (get $d "pool-namespace"))
  (list "grpc-port" (get $d "grpc-port"))
  (list "grpc-health-port" (get $d "grpc-health-port"))
  (list "metrics-port" (get $d "metrics-port"))
  (list "secure-serving" (include "switchyard.secureServing" . | eq "true" | toString))
  (list "config-file" (get $d "config-file"))
  (list "model-server-metrics-path" (get $d "model-server-metrics-path"))
  (list "model-server-metrics-scheme" (get $d "model-server-metrics-scheme"))
  (list "zap-encoder" "json")
  (list "v" (include "switchyard.str" $e.logVerbosity))
  (list "ha-enable-leader-election" (include "switchyard.ha" . | eq "true" | toString))
  (list "tracing" (include "switchyard.tracing" . | eq "true" | toString))
  (list "metrics-endpoint-auth" (include "switchyard.metricsAuth" . | eq "true" | toString)) -}}
{{- $insecure := "model-server-metrics-https-insecure-skip-verify" -}}
{{- if hasKey $d $insecure -}}
{{- $defaults = append $defaults (list $insecure (get $d $insecure)) -}}
{{- end -}}
{{- with include "switchyard.defaultShutdownDelay" . -}}
{{- $defaults = append $defaults (list "shutdown-delay" .) -}}
{{- end -}}
{{- $seen := list -}}
{{- range $defaults -}}
{{- $name := index . 0 -}}
{{- $seen = append $seen $name }}
- {{ printf "--%s=%s" $name (ternary (get $user $name) (index . 1) (hasKey $user $name)) | toJson }}
{{- end -}}
{{- range $name := keys $user | sortAlpha -}}
{{- if not (has $name $seen) }}
- {{ printf "--%s=%s" $name (get $user $name) | toJson }}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Rendering fails here, with the key and the reason, for values this chart cannot honour.
Included once, from inferencepool.yaml.
*/}}
{{- define "switchyard.validate" -}}
{{- $p := .Values.inferencePool -}}
{{- $e := .Values.inferenceExtension -}}
{{- if not $p.modelServers.matchLabels -}}
{{- fail "inferencePool.modelServers.matchLabels must select the model-server pods" -}}
{{- end -}}
{{- /* The engine reaches the EPP through the default config's core-metrics-extractor; a
       custom config without one would read another engine's pods with vLLM's metric names,
       every load score 0, without a word. */ -}}
{{- $engine := include "switchyard.engine" . -}}
{{- $custom := get ($e.pluginsCustomConfig | default dict) $e.pluginsConfigFile -}}
{{- if and $custom (ne $engine "vllm") -}}
{{- $types := list -}}
{{- range (fromYaml $custom).plugins | default list -}}
{{- $types = append $types (toString .type) -}}
{{- end -}}
{{- if not (has "core-metrics-extractor" $types) -}}
{{- fail (printf "inferencePool.modelServerType %s reaches the EPP through a core-metrics-extractor plugin, which inferenceExtension.pluginsCustomConfig[%q] lacks: add `- type: core-metrics-extractor` with `parameters: {defaultEngine: %s}` to its plugins (without it the pool's metrics are read with vLLM's names)" $engine $e.pluginsConfigFile $engine) -}}
{{- end -}}
{{- end -}}
{{- if include "switchyard.activeActive" . -}}
{{- $peers := int $e.activeActive.peersPort -}}
{{- if has $peers (list (int $e.extProcPort) (int $e.healthPort) (int $e.metricsPort)) -}}
{{- fail (printf "inferenceExtension.activeActive.peersPort (%d) is one of the EPP's other ports" $peers) -}}
{{- end -}}
{{- end -}}
{{- $n := len (include "switchyard.targetPorts" . | fromJsonArray) -}}
{{- if gt $n 8 -}}
{{- fail "inferencePool.targetPorts needs 1 to 8 ports" -}}
{{- end -}}
{{- $_ := include "switchyard.engine" . -}}
{{- $_ = include "switchyard.failureMode" . -}}
{{- $proto := $p.modelServerProtocol | default "http" | lower -}}
{{- if eq $proto "grpc" -}}
{{- fail "inferencePool.modelServerProtocol grpc: the Switchyard EPP parses the OpenAI HTTP API only (no vLLM gRPC parser); use http" -}}
{{- else if ne $proto "http" -}}
{{- fail (printf "inferencePool.modelServerProtocol must be http (or upstream's grpc, which Switchyard lacks); got %q" $proto) -}}
{{- end -}}
{{- if not (has ($p.parser | default "") (list "" "openai-parser")) -}}
{{- fail (printf "inferencePool.parser %q: the Switchyard EPP has the OpenAI parser only (empty or openai-parser)" $p.parser) -}}
{{- end -}}
{{- if not (has ($p.apiVersion | default "") (list "" "inference.networking.k8s.io/v1")) -}}
{{- fail (printf "inferencePool.apiVersion %q: the Switchyard EPP serves inference.networking.k8s.io/v1 InferencePools only" $p.apiVersion) -}}
{{- end -}}
{{- if not (has ($p.appProtocol | default "") (list "" "http" "kubernetes.io/h2c")) -}}
{{- fail (printf "inferencePool.appProtocol must be http or kubernetes.io/h2c; got %q" $p.appProtocol) -}}
{{- end -}}
{{- if not (has (include "switchyard.provider" .) (list "none" "istio" "gke")) -}}
{{- fail (printf "provider.name must be none, istio or gke; got %q" .Values.provider.name) -}}
{{- end -}}
{{- if include "switchyard.bool" (list "inferenceExtension.latencyPredictor.enabled" ($e.latencyPredictor | default dict).enabled) -}}
{{- fail "inferenceExtension.latencyPredictor.enabled: Switchyard has no latency predictor (upstream's SLO-aware routing); set it false" -}}
{{- end -}}
{{- $scheme := $e.metricsDataSource.scheme | default "http" | lower -}}
{{- if not (has $scheme (list "http" "https")) -}}
{{- fail (printf "inferenceExtension.metricsDataSource.scheme %q must be http or https" $scheme) -}}
{{- end -}}
{{- with $e.endpointsServer -}}
{{- if not .createInferencePool -}}
{{- fail "inferenceExtension.endpointsServer: standalone mode (no InferencePool) is upstream's standalone chart; this chart deploys an InferencePool" -}}
{{- end -}}
{{- end -}}
{{- if include "switchyard.sidecar" . -}}
{{- if not (and $e.sidecar.name $e.sidecar.image) -}}
{{- fail "inferenceExtension.sidecar.enabled needs sidecar.name and sidecar.image" -}}
{{- end -}}
{{- end -}}
{{- if hasKey $e.sidecar "configMapData" -}}
{{- fail "inferenceExtension.sidecar.configMapData: upstream's templates read sidecar.configMap.name and sidecar.configMap.data; use those" -}}
{{- end -}}
{{- if hasKey .Values.gke "monitoringSecret" -}}
{{- fail "gke.monitoringSecret (upstream v1.0) is replaced by inferenceExtension.monitoring.prometheus (with provider.name gke, a PodMonitoring and its token Secret are created)" -}}
{{- end -}}
{{- range $i, $o := .Values.inferenceObjectives -}}
{{- if not (and (kindIs "map" $o) $o.name) -}}
{{- fail (printf "inferenceObjectives[%d] needs a name (and a priority)" $i) -}}
{{- end -}}
{{- end -}}
{{- if not (or (kindIs "slice" $e.env) (kindIs "map" $e.env) (kindIs "invalid" $e.env)) -}}
{{- fail "inferenceExtension.env must be a list of EnvVar or a name: value map" -}}
{{- end -}}
{{- $_ = include "switchyard.eppArgs" . -}}
{{- end -}}
