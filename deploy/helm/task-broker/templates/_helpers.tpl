{{/* Names and labels. */}}
{{- define "task-broker.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "task-broker.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "task-broker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "task-broker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "task-broker.labels" -}}
{{ include "task-broker.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: broker
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/*
The objects of `broker policy apply --dry-run -o yaml` (.Values.rbac), as a JSON list, Namespaces left
out (the release's namespace exists; create the task namespace before installing, as for the
namespaces templates allow). Fails, saying what to do, when rbac or policy is missing, when rbac was
generated from another policy file than .Values.policy, or when the release is not in the
namespace of the broker's ServiceAccount.
*/}}
{{- define "task-broker.rbacObjects" -}}
{{- $policy := required "policy: give the policy file with --set-file policy=policy.yaml" .Values.policy -}}
{{- $rbac := required "rbac: give the output of `broker policy apply policy.yaml --dry-run -o yaml` with --set-file rbac=rbac.yaml" .Values.rbac -}}
{{- $mark := regexFind "task-broker.dev/policy-sha256: [0-9a-f]{64}" $rbac -}}
{{- if not $mark -}}
{{- fail "rbac: no `# task-broker.dev/policy-sha256: ...` line: it must be the output of `broker policy apply POLICY --dry-run -o yaml`, unedited" -}}
{{- end -}}
{{- $generatedFrom := trimPrefix "task-broker.dev/policy-sha256: " $mark -}}
{{- if ne $generatedFrom (sha256sum $policy) -}}
{{- fail (printf "rbac was generated from another policy (sha256 %s) than the one given in policy (sha256 %s): run `broker policy apply policy.yaml --dry-run -o yaml > rbac.yaml` again and pass both files with --set-file" $generatedFrom (sha256sum $policy)) -}}
{{- end -}}
{{- $objects := list -}}
{{- $accounts := list -}}
{{- range $doc := regexSplit "(?m)^---[ \\t]*$" $rbac -1 -}}
{{- $o := fromYaml $doc -}}
{{- if hasKey $o "Error" -}}
{{- fail (printf "rbac: a document is not YAML: %s" (get $o "Error")) -}}
{{- end -}}
{{- if and $o (ne $o.kind "Namespace") -}}
{{- if not (has $o.kind (list "ServiceAccount" "ClusterRole" "Role" "ClusterRoleBinding" "RoleBinding")) -}}
{{- fail (printf "rbac: unexpected kind %q: it must be the output of `broker policy apply --dry-run -o yaml`" $o.kind) -}}
{{- end -}}
{{- if eq $o.kind "ServiceAccount" -}}
{{- $accounts = append $accounts $o -}}
{{- end -}}
{{- $objects = append $objects $o -}}
{{- end -}}
{{- end -}}
{{- if ne (len $accounts) 1 -}}
{{- fail (printf "rbac: expected exactly one ServiceAccount (the broker's), found %d" (len $accounts)) -}}
{{- end -}}
{{- $sa := first $accounts -}}
{{- if ne $sa.metadata.namespace $.Release.Namespace -}}
{{- fail (printf "the policy's broker.namespace is %q: install the release there (helm install -n %s), not in %q" $sa.metadata.namespace $sa.metadata.namespace $.Release.Namespace) -}}
{{- end -}}
{{- toJson $objects -}}
{{- end -}}

{{/* The broker's ServiceAccount: the one `policy apply` makes (policy broker.serviceAccount). */}}
{{- define "task-broker.serviceAccountName" -}}
{{- range $o := fromJsonArray (include "task-broker.rbacObjects" .) -}}
{{- if eq $o.kind "ServiceAccount" -}}{{ $o.metadata.name }}{{- end -}}
{{- end -}}
{{- end -}}
