"""Validate rendered memex manifests (deploy/validate.sh renders them and runs this).

Usage: validate.py RENDERED.yaml...   (a file per rendered kustomization; `gpu` in the name means
the GPU variant)

1. Core kinds: the Kubernetes OpenAPI schemas bundled in kubernetes-validate, strict (unknown
   fields fail), for the oldest and newest Kubernetes versions we claim. A kind without a schema
   fails rather than being skipped.
2. CRD kinds (ServiceMonitor, ScaledObject) are not in those schemas: a structural check of the
   fields we use, written here.
3. Cross-checks the schemas cannot see: probes on our health routes, the grace period above
   preStop + drain, selectors that match, the in-flight divisor = MEMEX_MAX_CONCURRENT, the GPU,
   and with components/redis: MEMEX_LIMITS_REDIS naming its Service, with a shared key-hash secret.
"""

import copy
import re
import sys

import yaml
from kubernetes_validate import utils as kv

K8S_VERSIONS = ["1.29.0", "1.37.0"]
DURATION = re.compile(r"^([0-9]+(ms|s|m|h))+$")


class Check:
    def __init__(self, name):
        self.name, self.errors = name, []

    def that(self, ok, msg):
        if not ok:
            self.errors.append(msg)


def core_schema_errors(doc):
    errs = []
    for v in K8S_VERSIONS:
        try:
            kv.validate(doc, v, strict=True)
        except kv.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            errs.append(f"k8s {v}: {path}: {e.message}")
        except kv.SchemaNotFoundError as e:
            errs.append(e.message)
    return errs


def check_service_monitor(c, sm):
    spec = sm.get("spec", {})
    c.that(sm["apiVersion"] == "monitoring.coreos.com/v1", "ServiceMonitor: apiVersion")
    c.that(set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"},
           f"ServiceMonitor: unexpected spec fields {sorted(spec)}")
    c.that(isinstance(spec.get("selector", {}).get("matchLabels"), dict),
           "ServiceMonitor: selector.matchLabels")
    eps = spec.get("endpoints")
    c.that(isinstance(eps, list) and eps, "ServiceMonitor: endpoints")
    for ep in eps or []:
        c.that(set(ep) <= {"port", "path", "interval", "scrapeTimeout", "scheme"},
               f"ServiceMonitor: unexpected endpoint fields {sorted(ep)}")
        c.that(isinstance(ep.get("port"), str), "ServiceMonitor: endpoint port is a name")
        for k in ("interval", "scrapeTimeout"):
            c.that(k not in ep or DURATION.match(str(ep[k])), f"ServiceMonitor: {k} duration")


def check_scaled_object(c, so):
    spec = so.get("spec", {})
    c.that(so["apiVersion"] == "keda.sh/v1alpha1", "ScaledObject: apiVersion")
    c.that(set(spec) <= {"scaleTargetRef", "minReplicaCount", "maxReplicaCount",
                         "pollingInterval", "cooldownPeriod", "advanced", "triggers"},
           f"ScaledObject: unexpected spec fields {sorted(spec)}")
    c.that(isinstance(spec.get("scaleTargetRef", {}).get("name"), str), "ScaledObject: target")
    for k in ("minReplicaCount", "maxReplicaCount", "pollingInterval", "cooldownPeriod"):
        c.that(isinstance(spec.get(k, 0), int), f"ScaledObject: {k} is an integer")
    c.that(spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 100), "ScaledObject: min <= max")
    # The HPA behavior block is the core HPA type: validate it against the core schema.
    behavior = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
    if behavior is not None:
        hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
               "metadata": {"name": "x"}, "spec": {"scaleTargetRef": {"kind": "D", "name": "x"},
                                                   "maxReplicas": 1, "behavior": behavior}}
        for e in core_schema_errors(hpa):
            c.errors.append(f"ScaledObject behavior: {e}")
    triggers = spec.get("triggers")
    c.that(isinstance(triggers, list) and triggers, "ScaledObject: triggers")
    for t in triggers or []:
        md = t.get("metadata", {})
        c.that(t.get("type") == "prometheus", "ScaledObject: prometheus triggers")
        c.that(t.get("metricType") in ("AverageValue", "Value", "Utilization"), "ScaledObject: metricType")
        # KEDA's metadata is map[string]string: an unquoted number fails at admission.
        c.that(all(isinstance(v, str) for v in md.values()), f"ScaledObject: {t.get('name')} metadata values are strings")
        for k in ("serverAddress", "query", "threshold"):
            c.that(k in md, f"ScaledObject: {t.get('name')} metadata.{k}")


def env_of(container):
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


# components/redis adds its own Deployment and Service, checked apart from memex's.
REDIS = "memex-redis"


def check_redis(c, redis, env):
    url = env.get("MEMEX_LIMITS_REDIS")
    if not redis and url is None:
        return
    c.that(url is not None, "a Redis is deployed but MEMEX_LIMITS_REDIS is not set")
    c.that(url is None or url.startswith(f"redis://{REDIS}:6379"), f"MEMEX_LIMITS_REDIS={url} names the {REDIS} Service")
    c.that(isinstance(env.get("MEMEX_KEY_HASH_SECRET"), dict),
           "MEMEX_KEY_HASH_SECRET comes from a Secret (the same on every replica)")
    c.that(env.get("MEMEX_LIMITS_REDIS_FAIL", "open") in ("open", "closed"), "MEMEX_LIMITS_REDIS_FAIL")
    kinds = {d["kind"]: d for d in redis}
    c.that(set(kinds) == {"Deployment", "Service"}, f"{REDIS}: a Deployment and a Service")
    if set(kinds) == {"Deployment", "Service"}:
        pod_labels = kinds["Deployment"]["spec"]["template"]["metadata"]["labels"]
        c.that(selects(kinds["Service"]["spec"]["selector"], pod_labels), f"{REDIS} Service selects its pod")


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_rendering(c, docs, gpu):
    redis = [d for d in docs if d["metadata"]["name"] == REDIS]
    by_kind = {}
    for d in docs:
        if d["metadata"]["name"] != REDIS:
            by_kind.setdefault(d["kind"], []).append(d)
    before = len(c.errors)
    for kind in ("Deployment", "Service", "PodDisruptionBudget", "ServiceMonitor"):
        c.that(len(by_kind.get(kind, [])) == 1, f"exactly one {kind}")
    scalers = by_kind.get("ScaledObject", []) + by_kind.get("HorizontalPodAutoscaler", [])
    c.that(len(scalers) == 1, "exactly one autoscaler (a ScaledObject or an HPA, never both)")
    if len(c.errors) > before:
        return
    dep, svc = by_kind["Deployment"][0], by_kind["Service"][0]
    pod = dep["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    main = next(x for x in pod["spec"]["containers"] if x["name"] == "memex")
    env = env_of(main)

    paths = {p: main.get(p, {}).get("httpGet", {}).get("path")
             for p in ("startupProbe", "readinessProbe", "livenessProbe")}
    c.that(paths["readinessProbe"] == "/health/ready", "readiness probe on /health/ready")
    c.that(paths["livenessProbe"] == "/health/live", "liveness probe on /health/live")
    c.that(paths["startupProbe"] in ("/health/ready", "/health/live"), "startup probe on a health route")
    sp = main["startupProbe"]
    c.that(sp.get("periodSeconds", 10) * sp.get("failureThreshold", 3) >= 300,
           "startup probe allows at least 5 minutes for the model load")

    cmd = main.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    c.that(len(cmd) == 2 and cmd[0] == "sleep", "preStop is a sleep")
    sleep = int(cmd[1]) if len(cmd) == 2 else 0
    drain = float(env.get("MEMEX_DRAIN_TIMEOUT") or 30)
    grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
    c.that(grace > sleep + drain, f"grace {grace}s > preStop {sleep}s + drain {drain}s")

    mounts = {m["mountPath"]: m["name"] for m in main.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
    keys = env.get("MEMEX_API_KEYS", "")
    key_vol = volumes.get(mounts.get(keys.rsplit("/", 1)[0]), {})
    c.that("secret" in key_vol, "MEMEX_API_KEYS is a file on a Secret volume")
    c.that(env.get("MEMEX_MODEL", "/models") in mounts, "the model directory is mounted")

    c.that(selects(svc["spec"]["selector"], pod_labels), "Service selects the pods")
    pdb = by_kind["PodDisruptionBudget"][0]
    c.that(selects(pdb["spec"]["selector"]["matchLabels"], pod_labels), "PDB selects the pods")
    sm = by_kind["ServiceMonitor"][0]
    c.that(selects(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"]),
           "ServiceMonitor selects the Service")
    port_names = {p.get("name") for p in svc["spec"]["ports"]}
    c.that(all(ep["port"] in port_names for ep in sm["spec"]["endpoints"]),
           "ServiceMonitor endpoints name Service ports")

    scaler = scalers[0]
    c.that(scaler["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"], "autoscaler targets the Deployment")
    c.that("replicas" not in dep["spec"], "the autoscaler owns the replica count (no spec.replicas)")
    if scaler["kind"] == "ScaledObject":
        queries = " ".join(t["metadata"]["query"] for t in scaler["spec"]["triggers"])
        c.that("memex_queued_requests" in queries, "scales on memex_queued_requests")
        m = re.search(r"memex_in_flight_requests[^)]*\)\s*/\s*([0-9]+)", queries)
        c.that(m is not None and m.group(1) == env.get("MEMEX_MAX_CONCURRENT"),
               "in-flight ratio divides by MEMEX_MAX_CONCURRENT")

    gpus = main.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
    c.that(gpus == 1 if gpu else gpus is None, f"nvidia.com/gpu limit is {gpus}")
    check_redis(c, redis, env)


def validate_file(path):
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    c = Check(path)
    for d in docs:
        kind = d.get("kind")
        if kind == "ServiceMonitor":
            check_service_monitor(c, d)
        elif kind == "ScaledObject":
            check_scaled_object(c, d)
        else:
            c.errors += [f"{kind}/{d['metadata']['name']}: {e}" for e in core_schema_errors(d)]
    check_rendering(c, docs, gpu="gpu" in path.rsplit("/", 1)[-1])
    return docs, c


def main(paths):
    failed = 0
    for path in paths:
        docs, c = validate_file(path)
        if c.errors:
            failed += 1
            print(f"FAIL {path}:")
            for e in c.errors:
                print(f"  - {e}")
        else:
            print(f"ok   {path}: {', '.join(sorted(d['kind'] for d in docs))}")
    # The validator must reject what it should: a misspelt field in a Deployment.
    broken = copy.deepcopy(next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "memex"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    if not core_schema_errors(broken):
        print("FAIL the strict schema check accepted an unknown field")
        return 1
    print(f"(Kubernetes {', '.join(K8S_VERSIONS)} schemas, strict; CRDs checked structurally)")
    print(f"deploy: {len(paths) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
