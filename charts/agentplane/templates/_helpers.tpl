{{/* Chart name (app.kubernetes.io/name). */}}
{{- define "agentplane.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Base name of every object. Deliberately independent of the release name: the Crossplane
compositions target `agentplane-worker` by name. One release per namespace.
*/}}
{{- define "agentplane.fullname" -}}
{{- default "agentplane" .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "agentplane.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Namespace the runtime acts on. */}}
{{- define "agentplane.watchNamespace" -}}
{{- default .Release.Namespace .Values.watchNamespace -}}
{{- end -}}

{{- define "agentplane.labels" -}}
helm.sh/chart: {{ include "agentplane.chart" . }}
app.kubernetes.io/name: {{ include "agentplane.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: agentplane
{{- end -}}

{{/* Labels of one component; call with (dict "ctx" $ "component" "worker"). */}}
{{- define "agentplane.componentLabels" -}}
{{ include "agentplane.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "agentplane.selectorLabels" -}}
app.kubernetes.io/name: {{ include "agentplane.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* ServiceAccount name of a component; call with (dict "ctx" $ "component" "worker"). */}}
{{- define "agentplane.serviceAccountName" -}}
{{- $sa := (index .ctx.Values .component).serviceAccount -}}
{{- if $sa.create -}}
{{- default (printf "%s-%s" (include "agentplane.fullname" .ctx) .component) $sa.name -}}
{{- else -}}
{{- required (printf "%s.serviceAccount.name is required when %s.serviceAccount.create is false" .component .component) $sa.name -}}
{{- end -}}
{{- end -}}

{{- define "agentplane.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "agentplane.leaseName" -}}
{{- default (printf "%s-operator" (include "agentplane.fullname" .)) .Values.operator.leaderElection.leaseName -}}
{{- end -}}

{{/* Environment every component receives; call with (dict "ctx" $ "component" "worker"). */}}
{{- define "agentplane.commonEnv" -}}
{{- $v := .ctx.Values -}}
- name: AGENTPLANE_NAMESPACE
  value: {{ include "agentplane.watchNamespace" .ctx | quote }}
- name: AGENTPLANE_POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: AGENTPLANE_POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: AGENTPLANE_LOG_FORMAT
  value: {{ $v.logFormat | quote }}
- name: RUST_LOG
  value: {{ $v.logLevel | quote }}
- name: AGENTPLANE_METRICS_LISTEN
  value: {{ printf "0.0.0.0:%d" (int $v.metrics.port) | quote }}
{{- if $v.aws.region }}
- name: AWS_REGION
  value: {{ $v.aws.region | quote }}
{{- end }}
{{- if $v.aws.endpointUrl }}
- name: AWS_ENDPOINT_URL
  value: {{ $v.aws.endpointUrl | quote }}
{{- end }}
- name: OTEL_SERVICE_NAME
  value: {{ printf "agentplane-%s" .component | quote }}
{{- if $v.otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $v.otel.endpoint | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ $v.otel.protocol | quote }}
{{- end }}
{{- end -}}

{{/* Queue settings (operator and worker). */}}
{{- define "agentplane.queueEnv" -}}
{{- $q := .Values.queue -}}
- name: AGENTPLANE_QUEUE_URL
  value: {{ $q.url | quote }}
- name: AGENTPLANE_DLQ_URL
  value: {{ $q.deadLetterUrl | quote }}
- name: AGENTPLANE_QUEUE_FIFO
  value: {{ $q.fifo | quote }}
- name: AGENTPLANE_VISIBILITY_TIMEOUT_SECS
  value: {{ int $q.visibilityTimeoutSeconds | quote }}
- name: AGENTPLANE_MAX_RECEIVE_COUNT
  value: {{ int $q.maxReceiveCount | quote }}
- name: AGENTPLANE_MODEL_TIERS_FILE
  value: /etc/agentplane/models/tiers.yaml
{{- end -}}

{{/* Probes against the metrics/health port. */}}
{{- define "agentplane.probes" -}}
livenessProbe:
  httpGet:
    path: /healthz
    port: metrics
  periodSeconds: 10
  timeoutSeconds: 2
  failureThreshold: 3
readinessProbe:
  httpGet:
    path: /healthz
    port: metrics
  periodSeconds: 5
  timeoutSeconds: 2
  failureThreshold: 3
startupProbe:
  httpGet:
    path: /healthz
    port: metrics
  periodSeconds: 2
  failureThreshold: 30
{{- end -}}

{{/*
Container security context: the user's values, with ALL capabilities always dropped and the
non-negotiable settings forced.
*/}}
{{- define "agentplane.securityContext" -}}
{{- $sc := deepCopy .Values.securityContext -}}
{{- $_ := set $sc "capabilities" (dict "drop" (list "ALL")) -}}
{{- $_ := set $sc "allowPrivilegeEscalation" false -}}
{{- $_ := set $sc "privileged" false -}}
{{- toYaml $sc -}}
{{- end -}}

{{/* Pod spec parts shared by the three workloads; call with (dict "ctx" $ "component" "worker"). */}}
{{- define "agentplane.podScheduling" -}}
{{- $c := index .ctx.Values .component -}}
{{- with .ctx.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $c.priorityClassName }}
priorityClassName: {{ . | quote }}
{{- end }}
{{- with $c.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $c.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $c.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Where the operator's audit volume is mounted. */}}
{{- define "agentplane.auditDir" -}}
/var/lib/agentplane/audit
{{- end -}}

{{/*
The operator's audit log settings (operator.audit.enabled). The origin ends in the pod's name
(AGENTPLANE_POD_NAME, set earlier by commonEnv, which Kubernetes expands in $(...)): each replica
keeps its own log, and a checkpoint must name the log it belongs to.
*/}}
{{- define "agentplane.auditEnv" -}}
{{- $audit := .Values.operator.audit -}}
{{- $dir := include "agentplane.auditDir" . -}}
- name: AGENTPLANE_AUDIT_LOG
  value: {{ printf "%s/audit.sqlite" $dir | quote }}
- name: AGENTPLANE_AUDIT_ORIGIN
  value: {{ printf "agentplane.dev/audit/%s/$(AGENTPLANE_POD_NAME)" (include "agentplane.watchNamespace" .) | quote }}
{{- if $audit.kmsKeyArn }}
- name: AGENTPLANE_AUDIT_KMS_KEY_ID
  value: {{ $audit.kmsKeyArn | quote }}
{{- else }}
- name: AGENTPLANE_AUDIT_KEY_FILE
  value: {{ printf "%s/audit.key" $dir | quote }}
{{- end }}
{{- end -}}
