{{/* Names: <release>-kftune unless the release name already says kftune; 63 characters at most. */}}
{{- define "kftune.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kftune.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kftune.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "kftune.serviceAccountName" -}}
{{- default (include "kftune.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "kftune.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "kftune.mlflowName" -}}{{ include "kftune.fullname" . }}-mlflow{{- end -}}
{{- define "kftune.postgresName" -}}{{ include "kftune.fullname" . }}-postgres{{- end -}}
{{- define "kftune.mlflowUrl" -}}http://{{ include "kftune.mlflowName" . }}.{{ .Release.Namespace }}.svc:{{ .Values.mlflow.port }}{{- end -}}

{{/* The Secret and key holding the bundled PostgreSQL password. */}}
{{- define "kftune.postgresPasswordSecret" -}}
{{- default (include "kftune.postgresName" .) .Values.mlflow.postgres.passwordSecret.name -}}
{{- end -}}

{{- define "kftune.podSecurity" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 1000
  seccompProfile:
    type: RuntimeDefault
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Every container: the "restricted" Pod Security Standard, and a read-only root filesystem (each writes only to its emptyDirs and volumes). */}}
{{- define "kftune.containerSecurity" -}}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: ["ALL"]
{{- end -}}
