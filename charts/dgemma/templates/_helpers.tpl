{{/* The chart name, overridable. */}}
{{- define "dgemma.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of every object name: <release>-<chart>, or the release name when it already holds the chart name. */}}
{{- define "dgemma.fullname" -}}
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

{{/* Name of one component's objects: <fullname>-<component> (at most 63 characters). */}}
{{- define "dgemma.componentName" -}}
{{- printf "%s-%s" (include "dgemma.fullname" .root) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* chart label value */}}
{{- define "dgemma.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The one source of labels. Call with (dict "root" $ "component" "gateway"); component may be empty.
Standard app.kubernetes.io/* labels, then global.commonLabels.
*/}}
{{- define "dgemma.labels" -}}
helm.sh/chart: {{ include "dgemma.chart" .root }}
{{ include "dgemma.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: dgemma
{{- with .root.Values.global.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels that select one component's pods (immutable in Deployments: keep them few and stable). */}}
{{- define "dgemma.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dgemma.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end }}

{{/*
Labels of the worker pods, which the operator sets (operator/dgemma_operator/children.py: selector_labels);
NetworkPolicies and ServiceMonitors select on them.
*/}}
{{- define "dgemma.workerSelectorLabels" -}}
app.kubernetes.io/name: dgemma-worker
app.kubernetes.io/component: worker
{{- end }}

{{/* An image reference from a values block {repository, tag, digest}; the tag defaults to appVersion. */}}
{{- define "dgemma.image" -}}
{{- $tag := default .root.Chart.AppVersion .image.tag }}
{{- if .image.digest }}
{{- printf "%s:%s@%s" .image.repository $tag .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository $tag }}
{{- end }}
{{- end }}

{{/* ServiceAccount name of a component: (dict "root" $ "component" "operator"). */}}
{{- define "dgemma.serviceAccountName" -}}
{{- $values := index .root.Values .component }}
{{- if $values.serviceAccount.create }}
{{- default (include "dgemma.componentName" .) $values.serviceAccount.name }}
{{- else }}
{{- default "default" $values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Namespaces the worker NetworkPolicy goes to. */}}
{{- define "dgemma.workerNamespaces" -}}
{{- $namespaces := .Values.networkPolicy.workerNamespaces | default .Values.watchNamespaces | default (list .Release.Namespace) }}
{{- toJson (uniq $namespaces) }}
{{- end }}

{{/* The workers' API key Secret name (in every worker namespace); empty when worker keys are off. */}}
{{- define "dgemma.workerApiKeySecret" -}}
{{- if .Values.worker.apiKey.enabled }}
{{- default (include "dgemma.componentName" (dict "root" . "component" "worker-api-key")) .Values.worker.apiKey.existingSecret }}
{{- end }}
{{- end }}

{{/* The gateway API keys Secret name. */}}
{{- define "dgemma.apiKeysSecret" -}}
{{- default (include "dgemma.componentName" (dict "root" . "component" "api-keys")) .Values.gateway.apiKeys.existingSecret }}
{{- end }}

{{/* Pod-level settings shared by the operator and gateway pods. */}}
{{- define "dgemma.podCommon" -}}
{{- with .Values.global.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.global.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end }}

{{/* Non-empty when the example variants render now: enabled, and their CRD already served (see examples.yaml). */}}
{{- define "dgemma.examplesNow" -}}
{{- $crdPending := and .Values.crds.install .Release.IsInstall (not (.Capabilities.APIVersions.Has "dgemma.io/v1alpha1/DiffusionGemma")) }}
{{- if and .Values.examples.enabled (not $crdPending) }}true{{ end }}
{{- end }}

{{/*
The label on the one Service per component that a ServiceMonitor scrapes (other Services may front the
same pods, e.g. the gateway's headless one).
*/}}
{{- define "dgemma.scrapeLabel" -}}
dgemma.io/scrape: "true"
{{- end }}

{{/* The Secret with the gateway's serving certificate (tls.gateway). */}}
{{- define "dgemma.gatewayTlsSecret" -}}
{{- default (include "dgemma.componentName" (dict "root" . "component" "gateway-tls")) .Values.tls.gateway.existingSecret }}
{{- end }}

{{/* The Secret with the gateway's client certificate for the workers (tls.internal). */}}
{{- define "dgemma.gatewayClientTlsSecret" -}}
{{- include "dgemma.componentName" (dict "root" . "component" "gateway-client-tls") }}
{{- end }}

{{/* The cert-manager issuer of the internal certificates: the one given, or the chart's own CA Issuer. */}}
{{- define "dgemma.internalIssuer" -}}
{{- if .Values.tls.internal.issuerRef.name }}
{{- toJson (merge (dict "group" "cert-manager.io") .Values.tls.internal.issuerRef) }}
{{- else }}
{{- toJson (dict "name" (include "dgemma.componentName" (dict "root" . "component" "internal-ca")) "kind" "Issuer" "group" "cert-manager.io") }}
{{- end }}
{{- end }}
