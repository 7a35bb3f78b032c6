#!/usr/bin/env bash
# Sets up task-broker on this machine: Node 24 when the system's is too old, the npm dependencies,
# the TypeScript build, and (when Go is present) the local Kubernetes control plane of test/cluster.
# Idempotent: a second run skips what is already up to date. One line of output per step.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$root"

NODE_VERSION=24.21.0   # the npm registry's `node` package, used only when the system Node is < 22
GO_MIN=1.26            # test/cluster/go.mod's `go` line
KUBE_VERSION=v1.36.3   # k8s.io/kubernetes in test/cluster/go.mod

step() { printf '==> %s\n' "$*"; }
fail() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }

version_ge() { # version_ge A B: A >= B (dotted numbers)
  [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]
}

# --- Node -------------------------------------------------------------------------------------
command -v npm >/dev/null 2>&1 || fail "npm is missing: install Node.js and npm (any version) first, e.g. apt-get install nodejs npm"
local_node="$root/.node/node_modules/node/bin/node"
# The system's node: whatever PATH finds outside this project's .node/.
system_path=$(printf '%s' "$PATH" | tr ':' '\n' | grep -vF "$root/.node" | grep -vF "$root/node_modules" | paste -sd: -)
system_node=$(PATH="$system_path" command -v node 2>/dev/null || true)
system_major=0
[ -n "$system_node" ] && system_major=$("$system_node" -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)
use_local=0
if [ "$system_major" -ge 22 ]; then
  step "Node: using the system's $("$system_node" --version)"
else
  use_local=1
  described=${system_node:+Node $system_major}
  if [ ! -x "$local_node" ] || [ "$("$local_node" --version)" != "v$NODE_VERSION" ]; then
    step "Node: system has ${described:-no Node} (< 22): installing Node $NODE_VERSION from the npm registry into .node/"
    rm -rf "$root/.node"
    npm install --prefix "$root/.node" --no-save --no-package-lock --no-audit --no-fund --loglevel=error \
      "node@$NODE_VERSION" >/dev/null || fail "could not install node@$NODE_VERSION from the npm registry"
    [ -x "$local_node" ] || fail "node@$NODE_VERSION installed, but $local_node is missing"
  else
    step "Node: using $("$local_node" --version) from .node/ (system has ${described:-no Node}, < 22)"
  fi
  export PATH="$root/.node/node_modules/node/bin:$PATH"
fi

# --- npm dependencies and build ---------------------------------------------------------------
lock_hash=$(sha256sum package-lock.json | cut -d' ' -f1)
if [ -f node_modules/.install-stamp ] && [ "$(cat node_modules/.install-stamp)" = "$lock_hash" ]; then
  step "npm: dependencies up to date"
else
  step "npm: npm ci"
  npm ci --no-audit --no-fund --loglevel=error >/dev/null || fail "npm ci failed"
  echo "$lock_hash" > node_modules/.install-stamp
fi
if [ "$use_local" = 1 ]; then
  # npm scripts put node_modules/.bin first on PATH: this makes `npm test` run on Node 24 too.
  ln -sf "$local_node" node_modules/.bin/node
fi
step "build: tsc"
npm run --silent build || fail "the TypeScript build failed"

# --- Go builds: the native exec plugin, test/cluster ------------------------------------------
bin_dir="$root/.cache/cluster-bin"
if ! command -v go >/dev/null 2>&1; then
  step "Go not found: skipping the native exec plugin (kubeconfigs use the Node one) and test/cluster (integration tests, 'npm test' and 'broker dev-cluster' need it; install Go >= $GO_MIN)"
  exit 0
fi
go_version=$(go env GOVERSION | sed 's/^go//')
version_ge "$go_version" "$GO_MIN" || fail "Go $go_version is older than $GO_MIN, which test/cluster needs"

# The exec plugin, native: kubectl runs it on every call, and it starts in ~2 ms where Node needs ~25.
# Static (CGO_ENABLED=0, the pure-Go resolver): built with cgo it is linked against libc, and loading
# libc and starting cgo took 1.2 ms of its start (docs/benchmarks.md, "Exec plugin").
plugin_stamp=$( { echo "$go_version CGO_ENABLED=0"; cd native/credential && find . -name '*.go' -o -name go.mod | sort | xargs sha256sum; } | sha256sum | cut -d' ' -f1)
plugin="$root/.cache/bin/broker-credential"
if [ -x "$plugin" ] && [ -f "$plugin.stamp" ] && [ "$(cat "$plugin.stamp")" = "$plugin_stamp" ]; then
  step "native exec plugin: up to date"
else
  mkdir -p "$root/.cache/bin"
  (cd native/credential && CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-mod=readonly go build -trimpath -ldflags "-s -w" -o "$plugin.new" .) \
    || fail "building the native exec plugin (native/credential) failed"
  mv "$plugin.new" "$plugin"
  echo "$plugin_stamp" > "$plugin.stamp"
  step "native exec plugin: built .cache/bin/broker-credential"
fi

# helm, from its own module test/cluster/helm (helm v4 needs k8s.io v0.37): it renders and lints the
# chart in deploy/helm/task-broker (test/integration/helm-chart.test.ts).
HELM_VERSION=v4.3.1   # helm.sh/helm/v4 in test/cluster/helm/go.mod
helm_stamp=$( { echo "$HELM_VERSION $go_version"; cd test/cluster/helm && sha256sum go.mod go.sum; } | sha256sum | cut -d' ' -f1)
if [ -x "$bin_dir/helm" ] && [ -f "$bin_dir/.helm.stamp" ] && [ "$(cat "$bin_dir/.helm.stamp")" = "$helm_stamp" ]; then
  step "test/cluster/helm: helm $HELM_VERSION up to date"
else
  step "test/cluster/helm: building helm $HELM_VERSION (minutes when cold; log in .cache/go-build-helm.log)"
  mkdir -p "$bin_dir"
  hv=helm.sh/helm/v4/internal/version
  if ! (cd test/cluster/helm && CGO_ENABLED=0 GOSUMDB=off GOTOOLCHAIN=local GOFLAGS=-mod=readonly \
        go build -trimpath -ldflags "-s -w -X $hv.version=$HELM_VERSION -X $hv.gitTreeState=clean" -o "$bin_dir/helm.new" helm.sh/helm/v4/cmd/helm) \
        >"$root/.cache/go-build-helm.log" 2>&1; then
    tail -n 20 "$root/.cache/go-build-helm.log" >&2
    fail "building helm (test/cluster/helm) failed (full log: .cache/go-build-helm.log)"
  fi
  mv "$bin_dir/helm.new" "$bin_dir/helm"
  echo "$helm_stamp" > "$bin_dir/.helm.stamp"
  step "test/cluster/helm: built helm $HELM_VERSION"
fi

# test/cluster (helm/ apart: built above): kube-apiserver (with etcd), kubectl, kube-components (kube-scheduler and
# kube-controller-manager in one program, and the cluster's certificates), and, from its own module
# test/cluster/node (virtual-kubelet needs k8s.io v0.37), local-node: the node whose containers are
# local processes.
binaries=(kube-apiserver kubectl kube-components local-node)
stamp=$( { echo "$KUBE_VERSION $go_version"; cd test/cluster && find . -path ./helm -prune -o \( -name '*.go' -o -name go.mod -o -name go.sum \) -print | sort | xargs sha256sum; } | sha256sum | cut -d' ' -f1)
all_built=1
for b in "${binaries[@]}"; do [ -x "$bin_dir/$b" ] || all_built=0; done
if [ "$all_built" = 1 ] && [ -f "$bin_dir/.stamp" ] && [ "$(cat "$bin_dir/.stamp")" = "$stamp" ]; then
  step "test/cluster: ${binaries[*]} $KUBE_VERSION up to date"
  exit 0
fi
step "test/cluster: building ${binaries[*]} $KUBE_VERSION with Go $go_version (minutes when cold; log in .cache/go-build.log)"
mkdir -p "$bin_dir"
v=k8s.io/component-base/version
ldflags="-s -w -X $v.gitVersion=$KUBE_VERSION -X $v.gitMajor=1 -X $v.gitMinor=36 -X $v.gitTreeState=clean -X $v.buildDate=2026-01-01T00:00:00Z"
started=$(date +%s)
# go.sum is committed and complete, so the checksum database is not needed (it is not reachable here);
# GOTOOLCHAIN=local: never fetch another Go toolchain.
if ! (cd test/cluster && export GOSUMDB=off GOTOOLCHAIN=local GOFLAGS=-mod=readonly &&
      go build -trimpath -ldflags "$ldflags" -o "$bin_dir/kube-apiserver.new" ./cmd/kube-apiserver &&
      go build -trimpath -ldflags "$ldflags" -o "$bin_dir/kubectl.new" ./cmd/kubectl &&
      go build -trimpath -ldflags "$ldflags" -o "$bin_dir/kube-components.new" ./cmd/kube-components &&
      cd node && go build -trimpath -ldflags "-s -w -X main.KubeletVersion=$KUBE_VERSION" -o "$bin_dir/local-node.new" .) >"$root/.cache/go-build.log" 2>&1; then
  tail -n 20 "$root/.cache/go-build.log" >&2
  fail "building test/cluster failed (full log: .cache/go-build.log)"
fi
# mv, not cp: a running cluster keeps its (old) binaries.
for b in "${binaries[@]}"; do mv "$bin_dir/$b.new" "$bin_dir/$b"; done
echo "$stamp" > "$bin_dir/.stamp"
step "test/cluster: built in $(( $(date +%s) - started )) s"
