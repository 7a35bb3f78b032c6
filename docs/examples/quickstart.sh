#!/usr/bin/env bash
# The README's walk-through, end to end on a local control plane. Run it from anywhere:
#   docs/examples/quickstart.sh
# It starts everything it needs and stops and removes all of it when it ends.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
broker=$PWD/bin/broker
kubectl=$PWD/.cache/cluster-bin/kubectl
work=$(mktemp -d)
serve_pid=
cleanup() {
  [ -n "$serve_pid" ] && kill "$serve_pid" 2>/dev/null && wait "$serve_pid" 2>/dev/null
  [ -n "${TASK_BROKER_CLUSTER_DIR:-}" ] && "$broker" dev-cluster down --dir "$TASK_BROKER_CLUSTER_DIR" >/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

echo '== an administrator: a local cluster, the policy applied'
eval "$("$broker" dev-cluster up)"          # exports KUBECONFIG (admin) and TASK_BROKER_CLUSTER_DIR
"$kubectl" create namespace demo
"$kubectl" create namespace admins
"$kubectl" create serviceaccount admin -n admins   # the administrator's identity at the broker
"$broker" policy apply docs/examples/quickstart-policy.yaml --kubeconfig "$KUBECONFIG"

echo '== the broker: its own ServiceAccount (in broker.namespace, task-broker-system), nothing more'
server=$("$kubectl" config view --minify -o jsonpath='{.clusters[0].cluster.server}')
ca=$("$kubectl" config view --minify -o jsonpath='{.clusters[0].cluster.certificate-authority}')
bk=$work/broker.kubeconfig
"$kubectl" config --kubeconfig "$bk" set-cluster local --server "$server" --certificate-authority "$ca" --embed-certs >/dev/null
"$kubectl" config --kubeconfig "$bk" set-credentials broker --token "$("$kubectl" create token task-broker -n task-broker-system --duration 1h)" >/dev/null
"$kubectl" config --kubeconfig "$bk" set-context broker --cluster local --user broker >/dev/null
"$kubectl" config --kubeconfig "$bk" use-context broker >/dev/null
"$broker" serve --config docs/examples/quickstart-policy.yaml --audit-log "$work/audit.jsonl" --kubeconfig "$bk" \
  --listen 127.0.0.1:0 --insecure-http >"$work/serve.out" 2>"$work/serve.err" &
serve_pid=$!
for _ in $(seq 100); do grep -q 'listening on' "$work/serve.out" 2>/dev/null && break; sleep 0.1; done
export BROKER_URL=$(sed -n 's/^listening on //p' "$work/serve.out")
echo "broker at $BROKER_URL"

echo '== the agent: an agent key, enrolled once with a one-time code; no token file, no standing access'
code=$(BROKER_IDENTITY_TOKEN=$("$kubectl" create token admin -n admins --audience task-broker --duration 10m) \
  "$broker" agent register demo-agent)
# No OS keychain here (CI, a container): the key is printed once and kept in this shell only. On a
# desktop, `broker agent enroll "$code"` keeps it in the OS keychain instead.
BROKER_AGENT_KEY=$("$broker" agent enroll "$code" --print-key | sed -n 's/^BROKER_AGENT_KEY=//p')
export BROKER_AGENT_KEY
"$broker" whoami
unset KUBECONFIG
"$broker" kubeconfig --task read-pods --output "$work/agent.kubeconfig"
export KUBECONFIG=$work/agent.kubeconfig
"$kubectl" get pods -n demo || echo '-> refused: no task yet'

"$broker" task start read-pods --namespace demo --ttl 10m --reason "quickstart"
"$kubectl" get pods -n demo
"$kubectl" get secrets -n demo || echo '-> refused: secrets are not in the template'
"$broker" task end read-pods
"$kubectl" get pods -n demo || echo '-> refused: the task has ended'

echo '== the record'
"$broker" audit verify "$work/audit.jsonl"
