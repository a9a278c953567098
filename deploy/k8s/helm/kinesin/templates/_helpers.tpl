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

{{/* gRPC address of pod `ordinal` on the headless Service. */}}
{{- define "kinesin.peer" -}}
{{- $ := index . 0 -}}
{{- printf "%s-%d.%s.%s.svc.%s:%d" (include "kinesin.fullname" $) (int (index . 1)) (include "kinesin.headless" $) $.Release.Namespace $.Values.clusterDomain (int $.Values.ports.grpc) -}}
{{- end -}}

{{/* Every pod's gRPC address, comma-separated: a joining pod asks any of
them (the join is forwarded to the metadata leader). */}}
{{- define "kinesin.seeds" -}}
{{- $peers := list -}}
{{- range $i := until (int .Values.replicaCount) -}}
{{- $peers = append $peers (include "kinesin.peer" (list $ $i)) -}}
{{- end -}}
{{- join "," $peers -}}
{{- end -}}

{{/* Labels of `helm test` pods: not the selector labels, so that the PDB,
anti-affinity and Services ignore them. */}}
{{- define "kinesin.testLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}-test
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The Secret with the internal port's ca.crt, tls.crt and tls.key; empty
when the port is plaintext (internalTls.insecure). */}}
{{- define "kinesin.internalTlsSecret" -}}
{{- if not .Values.internalTls.insecure -}}
{{- .Values.internalTls.existingSecret | default (printf "%s-internal-tls" (include "kinesin.fullname" .)) -}}
{{- end -}}
{{- end -}}

{{/* Environment that points the server and the CLI at those files. */}}
{{- define "kinesin.internalTlsEnv" -}}
{{- if include "kinesin.internalTlsSecret" . }}
- {name: KINESIN_INTERNAL_TLS_CA, value: /etc/kinesin/internal-tls/ca.crt}
- {name: KINESIN_INTERNAL_TLS_CERT, value: /etc/kinesin/internal-tls/tls.crt}
- {name: KINESIN_INTERNAL_TLS_KEY, value: /etc/kinesin/internal-tls/tls.key}
{{- end }}
{{- end -}}

{{- define "kinesin.credentialsSecret" -}}
{{- if .Values.auth.existingSecret -}}
{{- .Values.auth.existingSecret -}}
{{- else if .Values.auth.credentials -}}
{{- printf "%s-credentials" (include "kinesin.fullname" .) -}}
{{- end -}}
{{- end -}}
