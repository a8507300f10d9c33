#!/usr/bin/env bash
# Offline validation of the deployment files, run by .ci/run:
#   1. the generated monitoring manifests match their sources (gen-monitoring.py --check);
#   2. `kubectl kustomize` renders each overlay;
#   3. kubernetes-validate --strict checks the built-in kinds against the Kubernetes
#      schemas, validate-crds.py the cert-manager and prometheus-operator kinds;
#   4. checkov scans the rendered manifests and the Dockerfile; accepted findings are
#      listed, each with its reason, in .checkov.yaml beside this script;
#   5. hadolint lints the Dockerfile.
# Needs kubectl and, on PATH, kubernetes-validate, checkov and hadolint (.ci/run installs
# them into a virtualenv). Usage: deploy/k8s/check.sh [OUT_DIR]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${1:-$(mktemp -d)}
mkdir -p "$out"
K8S_VERSION=${K8S_VERSION:-1.32.0}

python3 "$here/gen-monitoring.py" --check
for site in site-a site-b; do
	kubectl kustomize "$here/overlays/$site" >"$out/$site.yaml"
	echo "rendered $site: $(grep -c '^kind:' "$out/$site.yaml") resources"
done
# kubernetes-validate exits 0 on warnings: fail on any line it prints other than the
# "no schema" warnings for the custom kinds, which validate-crds.py checks next.
crd_warning="Couldn't find schema for kind \(Certificate\|Issuer\) with api version cert-manager.io/v1\|Couldn't find schema for kind \(ServiceMonitor\|PrometheusRule\) with api version monitoring.coreos.com/v1"
kv_out=$(kubernetes-validate --strict --quiet -k "$K8S_VERSION" "$out/site-a.yaml" "$out/site-b.yaml" 2>&1) || {
	echo "$kv_out"
	exit 1
}
if grep -v "$crd_warning" <<<"$kv_out" | grep -q .; then
	echo "$kv_out"
	echo "kubernetes-validate: failures above"
	exit 1
fi
echo "kubernetes-validate: built-in kinds pass (Kubernetes $K8S_VERSION, strict)"
python3 "$here/validate-crds.py" "$out/site-a.yaml" "$out/site-b.yaml"

for site in site-a site-b; do
	checkov --config-file "$here/.checkov.yaml" -f "$out/$site.yaml" --framework kubernetes
done
checkov --config-file "$here/.checkov.yaml" -f "$root/deploy/docker/Dockerfile" --framework dockerfile
hadolint "$root/deploy/docker/Dockerfile"
echo "hadolint: deploy/docker/Dockerfile clean"
