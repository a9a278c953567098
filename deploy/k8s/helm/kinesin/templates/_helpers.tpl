{{/* Names and labels shared by every object of the release. */}}
{{- define "kinesin.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kinesin.headless" -}}
{{- printf "%s-headless" (include "kinesin.fullname" .) -}}
{{- end -}}

{{- define "kinesin.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kinesin.labels" -}}
{{ include "kinesin.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kinesin.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* DNS name of pod 0, the seed every other pod joins through. */}}
{{- define "kinesin.seed" -}}
{{- printf "%s-0.%s.%s.svc.%s:%d" (include "kinesin.fullname" .) (include "kinesin.headless" .) .Release.Namespace .Values.clusterDomain (int .Values.ports.grpc) -}}
{{- end -}}

{{- define "kinesin.credentialsSecret" -}}
{{- if .Values.auth.existingSecret -}}
{{- .Values.auth.existingSecret -}}
{{- else if .Values.auth.credentials -}}
{{- printf "%s-credentials" (include "kinesin.fullname" .) -}}
{{- end -}}
{{- end -}}
