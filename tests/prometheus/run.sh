#!/usr/bin/env bash
# The Grafana dashboard and the Prometheus alert rules of deploy/ against a real Prometheus
# (Debian's `prometheus`, with promtool) scraping two live nodes:
#
#   storescu --DICOM--> site A --mTLS link--> site B --DICOM--> DCMTK storescp
#
# Site A runs with a certificate that expires in 5 days (re-issued by the test CA with
# openssl), so "certificate expiring" must fire for it and not for site B. The checks
# themselves are in check.py (its docstring lists them). Run from the repository root:
#
#   bash tests/prometheus/run.sh
#
# Environment:
#   DICOM_GATEWAY_BIN   gateway binary (default ${CARGO_TARGET_DIR:-target}/release/dicom-gateway)
#   PROM_KEEP=1         keep the work directory (it is always kept when something failed)
#   PROM_RENDER=FILE    also draw the dashboard from this run's data into FILE (PNG; needs
#                       python3-matplotlib); this is how docs/dashboard.png is made
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=../interop/lib.sh
source "$HERE/../interop/lib.sh"
LOG_TAG=prometheus
BIN=${DICOM_GATEWAY_BIN:-${CARGO_TARGET_DIR:-target}/release/dicom-gateway}
[[ $BIN == /* ]] || BIN="$PWD/$BIN"
FAILED=0
WORK=$(mktemp -d "${TMPDIR:-/tmp}/dicom-gateway-prometheus.XXXXXX")

cleanup() {
	local rc=$?
	set +e
	stop_all_bg
	if ((rc != 0 || FAILED != 0)) || [[ ${PROM_KEEP:-0} == 1 ]]; then
		log "work directory kept: $WORK"
	else
		rm -rf "$WORK"
	fi
	exit "$rc"
}
trap cleanup EXIT

for tool in prometheus promtool openssl; do
	command -v "$tool" >/dev/null || {
		log "FAIL: $tool not found (apt-get install prometheus openssl)"
		exit 1
	}
done
need_dcmtk || exit 1
[[ -x $BIN ]] || {
	log "FAIL: gateway binary $BIN not found (cargo build --release)"
	exit 1
}

mkdir -p "$WORK/logs" "$WORK/pacs"
"$PY" "$HERE/../interop/gen_study.py" "$WORK/inputs" --count 30 --series 2 | indent
BIN=$BIN init_keys "$WORK" "$WORK/logs"

# Site A's certificate: same key, same CA, same name, but valid for 5 days only.
openssl req -new -key "$WORK/pki/site-a.key" -subj /CN=site-a -out "$WORK/site-a.csr" 2>"$WORK/logs/openssl.log"
printf 'subjectAltName=DNS:site-a\nextendedKeyUsage=serverAuth,clientAuth\nkeyUsage=critical,digitalSignature\nbasicConstraints=critical,CA:FALSE\n' >"$WORK/site-a.ext"
openssl x509 -req -in "$WORK/site-a.csr" -CA "$WORK/pki/ca.crt" -CAkey "$WORK/pki/ca.key" \
	-set_serial 0x5a17e -days 5 -extfile "$WORK/site-a.ext" -out "$WORK/site-a-5d.crt" 2>>"$WORK/logs/openssl.log"
mv "$WORK/site-a-5d.crt" "$WORK/pki/site-a.crt"
log "site A certificate: $(openssl x509 -in "$WORK/pki/site-a.crt" -noout -enddate)"

read -r P_SCP P_A_DICOM P_A_HTTP P_B_HTTP P_B_LINK < <(free_ports 5)
start_storescp "$P_SCP" "$WORK/pacs" "$WORK/logs/storescp.log"
write_configs "$WORK"
# Site B checks site A's certificate against a CRL of the test CA (nothing revoked, valid
# for 2 days), so that crl_next_update_timestamp_seconds is exported and the "stale CRL"
# alert's expression has data.
(
	cd "$WORK/pki"
	printf '[ca]\ndefault_ca = d\n[d]\ndatabase = index.txt\ncrlnumber = crlnumber\ndefault_md = sha256\ndefault_crl_days = 2\ncertificate = ca.crt\nprivate_key = ca.key\n' >ca.cnf
	: >index.txt
	echo 01 >crlnumber
	openssl ca -config ca.cnf -gencrl -out ca.crl 2>>"$WORK/logs/openssl.log"
)
sed -i 's|^ca = "pki/ca.crt"$|&\ncrls = ["pki/ca.crl"]|' "$WORK/site-b.toml"
grep -q '^crls = ' "$WORK/site-b.toml" || {
	log "FAIL: could not add the CRL to site B's config"
	exit 1
}
log "site B's CRL: $(openssl crl -in "$WORK/pki/ca.crl" -noout -nextupdate)"
start_sites "$WORK" "$WORK/logs/"
if ! wait_sites_ready 60 0.2; then
	show_tail "$WORK/logs/site-a.log"
	show_tail "$WORK/logs/site-b.log"
	log "FAIL: the sites did not become ready (A: $READY_A, B: $READY_B)"
	exit 1
fi

args=(--work "$WORK" --a-http "$P_A_HTTP" --b-http "$P_B_HTTP" --a-dicom "$P_A_DICOM"
	--b-link "$P_B_LINK" --b-pid "${GW_PID[b]}" --pacs "$WORK/pacs" --inputs "$WORK/inputs")
[[ -n ${PROM_RENDER:-} ]] && args+=(--render "$(realpath -m "$PROM_RENDER")")
if ! "$PY" "$HERE/check.py" "${args[@]}"; then
	FAILED=1
	show_tail "$WORK/prometheus.log"
	show_tail "$WORK/logs/site-a.log"
	exit 1
fi
