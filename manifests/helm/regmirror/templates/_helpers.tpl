{{/*
Labels on every object: the kustomize base's, plus Helm's own. Selectors and
pod template labels stay exactly the base's, so they never change on upgrade.
*/}}
{{- define "regmirror.labels" -}}
app.kubernetes.io/name: regmirror
app.kubernetes.io/part-of: regmirror
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{/* Labels of one component (operator, agent, mirror). */}}
{{- define "regmirror.componentLabels" -}}
app.kubernetes.io/component: {{ .component }}
{{ include "regmirror.labels" .root }}
{{- end -}}

{{/*
The operator's image. `--set image.tag=2` arrives as an integer and
`--set image.tag=null` as nil: both are handled, nil meaning the appVersion.
*/}}
{{- define "regmirror.image" -}}
{{- $tag := "" -}}
{{- if not (kindIs "invalid" .Values.image.tag) -}}{{- $tag = toString .Values.image.tag -}}{{- end -}}
{{ .Values.image.repository }}:{{ $tag | default .Chart.AppVersion }}
{{- end -}}
