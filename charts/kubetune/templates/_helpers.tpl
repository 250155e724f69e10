{{/* Names, labels and the pieces several templates share. */}}

{{- define "kubetune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kubetune.fullname" -}}
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

{{/* Cluster-scoped objects (ClusterRole, ClusterRoleBinding) carry the release namespace:
two releases of the same name in different namespaces must not share them. */}}
{{- define "kubetune.clusterName" -}}
{{- printf "%s-%s" .Release.Namespace (include "kubetune.fullname" .) }}
{{- end }}

{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "kubetune.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "kubetune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubetune
{{- end }}

{{- define "kubetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubetune.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* An image reference from {repository, tag, digest}; the tag defaults to the chart's
appVersion, a digest wins over the tag. Call with (list $image $). */}}
{{- define "kubetune.image" -}}
{{- $image := index . 0 }}
{{- $root := index . 1 }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{/* More than one replica: they elect a leader through a Lease (named as the release)
in the release namespace; the leader acts, the others stand by. */}}
{{- define "kubetune.leaderElection" -}}
{{- if gt (int .Values.replicaCount) 1 }}true{{ end }}
{{- end }}

{{/* What the operator does in each namespace it watches (a Role there, or the
ClusterRole when it watches every namespace). */}}
{{- define "kubetune.namespacedRules" -}}
# The FineTuneJobs: kopf lists and watches them; the operator reads them, patches them
# (kopf's annotations) and deletes finished ones (ttlSecondsAfterFinished).
- apiGroups: [kubetune.io]
  resources: [finetunejobs]
  verbs: [get, list, watch, patch, delete]
- apiGroups: [kubetune.io]
  resources: [finetunejobs/status]
  verbs: [get, patch, update]
# The adapter library: an Adapter per succeeded job (created, read to find it again after
# a restart, and a warm start's source read).
- apiGroups: [kubetune.io]
  resources: [adapters]
  verbs: [get, create]
# Children carry ownerReferences with blockOwnerDeletion, which clusters that enforce
# owner-reference permissions (OwnerReferencesPermissionEnforcement) allow only to whoever
# may update the owner's finalizers.
- apiGroups: [kubetune.io]
  resources: [finetunejobs/finalizers]
  verbs: [update]
# The trainer pods: created, watched, deleted, and patched to lift their scheduling gates.
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, create, delete, patch]
# The headless Service of a multi-worker job (rendezvous of the workers).
- apiGroups: [""]
  resources: [services]
  verbs: [get, create, delete]
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch]
{{- if .Values.networkPolicy.enabled }}
# Each job's NetworkPolicy (who may reach its trainer pods); get: whether one already
# holding its name is the job's own (a later attempt) or someone else's.
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [create, get]
{{- end }}
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
# Kueue's Workload of a queued job's pod group: its priority-boost annotation (the age of
# the job's last checkpoint, so Kueue preempts the job that loses least). Granted for
# clusters without Kueue too: no such objects, nothing patched.
- apiGroups: [kueue.x-k8s.io]
  resources: [workloads]
  verbs: [patch]
{{- end }}

{{/* Kubernetes >= 1.30, checked when helm talks to a cluster (install, upgrade,
template --validate); offline rendering has no cluster to check and renders. */}}
{{- define "kubetune.kubeVersionCheck" -}}
{{- if and (lookup "v1" "Namespace" "" "kube-system") (semverCompare "<1.30.0-0" .Capabilities.KubeVersion.Version) }}
{{- fail (printf "kubetune needs Kubernetes 1.30 or newer; this cluster runs %s" .Capabilities.KubeVersion.Version) }}
{{- end }}
{{- end }}
