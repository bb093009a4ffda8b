#!/usr/bin/env bash
# Validates the kustomize base against the Kubernetes 1.37 API schemas with the pinned
# `kubernetes-validate` (installed into .venv by hack/setup.sh), in strict mode (unknown
# fields are errors). Every file is checked on its own, then the base is rendered with
# `kubectl kustomize` and the rendered stream is checked again, which also proves kustomize
# reads what the generator writes. Exits non-zero on any failure and on any object whose
# schema is unknown (only kustomization.yaml itself, a kustomize config, is exempt).
#
# Usage: hack/validate-manifests.sh [DIR]   (default: manifests/)
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-manifests}"
k8s_version="1.37.0"
validate=".venv/bin/kubernetes-validate"
kubectl=".venv/bin/kubectl"
for tool in "$validate" "$kubectl"; do
  if [ ! -x "$tool" ]; then
    echo "validate-manifests: $tool is missing; run hack/setup.sh first" >&2
    exit 2
  fi
done
if [ ! -d "$dir" ]; then
  echo "validate-manifests: $dir is not a directory" >&2
  exit 2
fi

mapfile -t files < <(find "$dir" -type f \( -name '*.yaml' -o -name '*.yml' \) ! -name kustomization.yaml | sort)
if ((${#files[@]} == 0)); then
  echo "validate-manifests: no manifests found in $dir" >&2
  exit 1
fi

failed=0
check() {
  local out
  # kubernetes-validate exits non-zero on a schema violation; a kind it has no schema for
  # is only a warning, which we treat as a failure too.
  if ! out=$("$validate" --strict -k "$k8s_version" "$@" 2>&1); then
    failed=1
  fi
  if grep -q '^WARN' <<<"$out"; then
    failed=1
  fi
  printf '%s\n' "$out"
}

check "${files[@]}"

if [ -f "$dir/kustomization.yaml" ]; then
  rendered=$(mktemp --suffix=.yaml)
  trap 'rm -f "$rendered"' EXIT
  if "$kubectl" kustomize "$dir" >"$rendered"; then
    echo "validate-manifests: kubectl kustomize $dir rendered $(grep -c '^kind:' "$rendered") objects"
    check "$rendered"
  else
    echo "validate-manifests: kubectl kustomize $dir failed" >&2
    failed=1
  fi
fi

if ((failed)); then
  echo "validate-manifests: FAILED" >&2
  exit 1
fi
echo "validate-manifests: ${#files[@]} files valid against Kubernetes $k8s_version"
