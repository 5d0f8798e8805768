#!/usr/bin/env bash
# CI: validates the Kubernetes manifests of deploy/k8s/ (docs/deploy.md, "Kubernetes").
#
# 1. Every manifest (every *.yaml / *.yml there but kustomization.yaml) against the pinned
#    Kubernetes version's schemas with kubernetes-validate (PyPI) --strict, which also rejects
#    fields the schema does not know. kubernetes-validate only warns, and exits 0, for a kind it
#    has no schema for (a CRD, a typo in apiVersion): here a warning fails, and so does a file
#    with no object in it, so nothing is skipped silently.
# 2. What schemas cannot see, across files: every file starts with a comment;
#    kustomization.yaml lists every manifest but secrets.example.yaml; selectors match the pod
#    labels; every Secret and key, ConfigMap, named port and the headless Service referenced
#    exists; the grace period outlasts the drain; the connector has one --gateway per DMZ
#    instance, by that instance's name.
#
# Installs kubernetes-validate into a venv in a cache folder when it is missing (and
# python3-venv with apt-get when `python3 -m venv` cannot work). A few seconds once installed,
# under a minute on a fresh machine.
#
# Knobs (environment): K8S_VERSION (the Kubernetes version to validate against, default
# 1.30.0, the oldest this repository supports), SALLYPORT_CACHE (where the venv goes, default
# ${XDG_CACHE_HOME:-~/.cache}/sallyport).
set -euo pipefail
cd "$(dirname "$0")/.."

kv_version=1.37.0
k8s_version=${K8S_VERSION:-1.30.0}
dir=deploy/k8s
cache=${SALLYPORT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sallyport}
venv=$cache/kubernetes-validate-$kv_version
kv=$venv/bin/kubernetes-validate
t0=$SECONDS

# --- install ------------------------------------------------------------------------------
if [ "$("$kv" --version 2>/dev/null)" != "$kv_version" ]; then
  if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "validate-k8s: installing python3-venv"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3 python3-venv >/dev/null
  fi
  echo "validate-k8s: installing kubernetes-validate $kv_version (PyPI) into $venv"
  rm -rf "$venv"
  mkdir -p "$cache"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "kubernetes-validate==$kv_version"
  if [ "$("$kv" --version)" != "$kv_version" ]; then
    echo "validate-k8s: FAILED: $kv is not version $kv_version" >&2
    exit 1
  fi
fi
py=$venv/bin/python

# --- 1. schemas -----------------------------------------------------------------------------
shopt -s nullglob
files=("$dir"/*.yaml "$dir"/*.yml)
manifests=()
for f in "${files[@]}"; do
  [ "$(basename "$f")" = kustomization.yaml ] || manifests+=("$f")
done
if [ "${#manifests[@]}" -eq 0 ]; then
  echo "validate-k8s: FAILED: no manifest in $dir" >&2
  exit 1
fi

failed=0
objects=0
for f in "${manifests[@]}"; do
  # The number of objects in the file (empty documents do not count, as for kubectl).
  n=$("$py" -c 'import sys, yaml; print(sum(1 for d in yaml.safe_load_all(open(sys.argv[1])) if d))' "$f") || {
    echo "validate-k8s: FAILED: $f is not YAML" >&2
    failed=1
    continue
  }
  rc=0
  out=$("$kv" --strict -k "$k8s_version" "$f" 2>&1) || rc=$?
  echo "$out"
  passed=$(grep -c '^INFO .* passed for resource ' <<<"$out" || true)
  if [ "$rc" -ne 0 ] || grep -qE '^(WARN|ERROR|FATAL)' <<<"$out" || [ "$n" -eq 0 ] || [ "$passed" -ne "$n" ]; then
    echo "validate-k8s: FAILED: $f ($n objects, $passed passed, exit code $rc)" >&2
    failed=1
  fi
  objects=$((objects + n))
done
[ "$failed" -eq 0 ] || exit 1

# --- 2. across files ------------------------------------------------------------------------
"$py" - "$dir" <<'PY'
import glob, os, re, sys
import yaml

d = sys.argv[1]
errors = []
def err(msg):
    errors.append(msg)

files = sorted(glob.glob(os.path.join(d, "*.yaml")) + glob.glob(os.path.join(d, "*.yml")))
objs = []  # (file, object)
for f in files:
    with open(f) as fh:
        text = fh.read()
    if not text.startswith("#"):
        err(f"{f}: does not start with a comment saying what it is")
    if os.path.basename(f) == "kustomization.yaml":
        k = yaml.safe_load(text)
        listed = set(k.get("resources", []))
        want = {os.path.basename(x) for x in files} - {"kustomization.yaml", "secrets.example.yaml"}
        if listed != want:
            err(f"{f}: resources {sorted(listed)} != the manifests {sorted(want)}")
        continue
    objs += [(f, o) for o in yaml.safe_load_all(text) if o]

def of_kind(kind):
    return [(f, o) for f, o in objs if o["kind"] == kind]

def name(o):
    return f'{o["kind"]}/{o["metadata"]["name"]}'

secrets = {o["metadata"]["name"]: set(o.get("stringData", {})) | set(o.get("data", {}))
           for _, o in of_kind("Secret")}
configmaps = {o["metadata"]["name"]: set(o.get("data", {})) for _, o in of_kind("ConfigMap")}
namespaces = {o["metadata"]["name"] for _, o in of_kind("Namespace")}

for f, o in objs:
    ns = o["metadata"].get("namespace")
    if o["kind"] != "Namespace" and ns not in namespaces:
        err(f"{f}: {name(o)} is in namespace {ns!r}, which no manifest creates")

def need_secret(f, who, sname, keys):
    if sname not in secrets:
        err(f"{f}: {who} uses Secret {sname}, missing from secrets.example.yaml")
        return
    for k in keys:
        if k not in secrets[sname]:
            err(f"{f}: {who} uses key {k} of Secret {sname}, missing from secrets.example.yaml")

workloads = of_kind("StatefulSet") + of_kind("Deployment")
pod_labels = []  # (workload, labels)
for f, w in workloads:
    spec = w["spec"]
    labels = spec["template"]["metadata"].get("labels", {})
    pod_labels.append((w, labels))
    sel = spec["selector"]["matchLabels"]
    if any(labels.get(k) != v for k, v in sel.items()):
        err(f"{f}: {name(w)} selector {sel} does not match its pod labels {labels}")
    pod = spec["template"]["spec"]
    for v in pod.get("volumes", []):
        if "secret" in v:
            need_secret(f, name(w), v["secret"]["secretName"],
                        [i["key"] for i in v["secret"].get("items", [])])
        for src in v.get("projected", {}).get("sources", []):
            if "secret" in src:
                need_secret(f, name(w), src["secret"]["name"],
                            [i["key"] for i in src["secret"].get("items", [])])
        if "configMap" in v and v["configMap"]["name"] not in configmaps:
            err(f"{f}: {name(w)} uses ConfigMap {v['configMap']['name']}, which no manifest has")
    for c in pod["containers"]:
        ports = {p["name"] for p in c.get("ports", []) if "name" in p}
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                need_secret(f, name(w), ref["name"], [ref["key"]])
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            port = c.get(probe, {}).get("httpGet", {}).get("port")
            if isinstance(port, str) and port not in ports:
                err(f"{f}: {name(w)} {probe} uses port {port}, not a port of container {c['name']}")
        args = c.get("args", [])
        drain = [a.split("=", 1)[1] for a in args if a.startswith("--drain-delay=")]
        if args[:1] == ["dmz"]:
            m = re.fullmatch(r"(\d+)s", drain[0]) if drain else None
            if not m:
                err(f"{f}: {name(w)}: give the DMZ --drain-delay=<N>s explicitly")
            else:
                grace = pod.get("terminationGracePeriodSeconds", 30)
                # drain, then up to 5 s for connections to end (gateway/src/dmz/mod.rs).
                if grace <= int(m.group(1)) + 5:
                    err(f"{f}: {name(w)}: terminationGracePeriodSeconds {grace} must be above "
                        f"--drain-delay {drain[0]} + 5 s")
            probe = c.get("readinessProbe", {}).get("httpGet", {})
            if probe.get("path") != "/readyz":
                err(f"{f}: {name(w)}: the readiness probe must be /readyz")

# Services and budgets select pods of some workload, by name ports that exist.
for f, o in of_kind("Service") + of_kind("PodDisruptionBudget"):
    sel = o["spec"].get("selector", {})
    sel = sel.get("matchLabels", sel) if o["kind"] == "PodDisruptionBudget" else sel
    hits = [w for w, labels in pod_labels if all(labels.get(k) == v for k, v in sel.items())]
    if not sel or not hits:
        err(f"{f}: {name(o)} selects no pods of any workload here ({sel})")
    for p in o["spec"].get("ports", []) if o["kind"] == "Service" else []:
        t = p.get("targetPort")
        for w in hits:
            names = {q.get("name") for c in w["spec"]["template"]["spec"]["containers"]
                     for q in c.get("ports", [])}
            if isinstance(t, str) and t not in names:
                err(f"{f}: {name(o)} targets port {t}, which {name(w)} does not have")

# The DMZ StatefulSet's headless Service, and a connector --gateway per instance.
services = {o["metadata"]["name"]: o for _, o in of_kind("Service")}
dmz_urls = set()
for f, s in of_kind("StatefulSet"):
    svc = services.get(s["spec"]["serviceName"])
    if not svc or svc["spec"].get("clusterIP") != "None":
        err(f"{f}: {name(s)}: serviceName {s['spec']['serviceName']} is not a headless Service here")
        continue
    port = svc["spec"]["ports"][0]["port"]
    ns = s["metadata"]["namespace"]
    for i in range(s["spec"]["replicas"]):
        dmz_urls.add(f"wss://{s['metadata']['name']}-{i}.{svc['metadata']['name']}.{ns}.svc:{port}/")
for f, w in of_kind("Deployment"):
    for c in w["spec"]["template"]["spec"]["containers"]:
        args = c.get("args", [])
        if args[:1] == ["connector"]:
            urls = {a.split("=", 1)[1] for a in args if a.startswith("--gateway=")}
            if urls != dmz_urls:
                err(f"{f}: {name(w)}: --gateway {sorted(urls)} should be one per DMZ instance: "
                    f"{sorted(dmz_urls)}")

for e in errors:
    print(f"validate-k8s: FAILED: {e}", file=sys.stderr)
sys.exit(1 if errors else 0)
PY

echo "validate-k8s: ${#manifests[@]} manifests, $objects objects valid against Kubernetes $k8s_version (kubernetes-validate $kv_version --strict) and consistent with each other ($((SECONDS - t0)) s)"
