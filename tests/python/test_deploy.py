"""deploy/kubernetes: every manifest validates against the Kubernetes API schemas
(kubernetes-validate, offline) or, for the Inference Extension's InferencePool, against its
v1 schema in deploy/kubernetes/schemas; and the manifests agree with Wick itself: probe
paths, drain timeout against the grace period, metric names that Wick exports, labels and
ports that match."""
import json
import pathlib
import re

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
K8S_VERSION = "1.33.0"


def documents():
    out = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((path.name, doc))
    return out


def wick_metrics():
    text = (ROOT / "docs" / "metrics.md").read_text()
    return set(re.findall(r"^\| `(wick_[a-z_]+)` \|", text, re.M))


def find(kind, name):
    for _, doc in documents():
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind} {name}")


DOCS = documents()


def test_the_manifests_exist():
    kinds = {d["kind"] for _, d in DOCS}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "InferencePool"} <= kinds


@pytest.mark.parametrize("name,doc", DOCS, ids=[f"{n}:{d['kind']}/{d['metadata']['name']}" for n, d in DOCS])
def test_each_document_is_valid(name, doc):
    if doc["apiVersion"].startswith("inference.networking.k8s.io/"):
        schema = json.loads((DEPLOY / "schemas" / "inferencepool-v1.schema.json").read_text())
        jsonschema.validate(doc, schema)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_a_broken_manifest_is_caught():
    bad = json.loads(json.dumps(find("Deployment", "wick")))
    bad["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eighty"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    pool = json.loads(json.dumps(find("InferencePool", "wick")))
    pool["spec"]["endpointPickerRef"]["failureMode"] = "Sometimes"
    schema = json.loads((DEPLOY / "schemas" / "inferencepool-v1.schema.json").read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(pool, schema)


def env_of(container):
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_the_deployment_matches_wick():
    dep = find("Deployment", "wick")
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    env = env_of(c)
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health/live"
    # The grace period covers preStop plus Wick's whole drain.
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    drain = float(env["WICK_DRAIN_TIMEOUT"])
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain + 5
    assert int(env["WICK_PORT"]) == c["ports"][0]["containerPort"]
    assert env["WICK_HOST"] == "0.0.0.0"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_autoscaling_and_routing_use_metrics_wick_exports():
    exported = wick_metrics()
    hpa = find("HorizontalPodAutoscaler", "wick")
    for m in hpa["spec"]["metrics"]:
        assert m["pods"]["metric"]["name"] in exported
    epp = find("Deployment", "wick-epp")
    args = epp["spec"]["template"]["spec"]["containers"][0]["args"]
    named = {}
    for a in args:
        key, _, value = a.partition("=")
        named[key] = value
    for flag in ["--total-queued-requests-metric", "--total-running-requests-metric",
                 "--kv-cache-usage-percentage-metric"]:
        assert named[flag] in exported, flag
    assert named["--pool-name"] == "wick"


def test_the_pool_selects_the_wick_pods_on_their_port():
    pool = find("InferencePool", "wick")
    dep = find("Deployment", "wick")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    for k, v in pool["spec"]["selector"]["matchLabels"].items():
        assert labels.get(k) == v
    port = dep["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
    assert pool["spec"]["targetPorts"][0]["number"] == port
    epp_svc = find("Service", pool["spec"]["endpointPickerRef"]["name"])
    assert epp_svc["spec"]["ports"][0]["port"] == pool["spec"]["endpointPickerRef"]["port"]["number"]


def dockerfile_stages():
    """(name, base, lines) of each FROM stage of the Dockerfile."""
    stages = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        m = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line)
        if m:
            stages.append((m.group(2), m.group(1), []))
        elif stages:
            stages[-1][2].append(line)
    return stages


def test_the_dockerfile_has_a_cuda_default_and_a_cpu_target():
    stages = dockerfile_stages()
    names = [s[0] for s in stages]
    # `docker build` without --target builds the last stage.
    assert names[-1] == "cuda" and "cpu" in names
    for name in ("cuda", "cpu"):
        _, base, lines = next(s for s in stages if s[0] == name)
        body = "\n".join(lines)
        assert "USER wick" in body and "--uid 10001" in body, name
        assert "HEALTHCHECK" in body and "/health" in body, name
        assert 'ENTRYPOINT ["wick", "serve"]' in body, name
        assert "WICK_HOST=0.0.0.0" in body, name
    assert "nvidia/cuda" in dict((s[0], s[1]) for s in stages)["cuda"]
    build_cuda = "\n".join(next(s for s in stages if s[0] == "build-cuda")[2])
    assert "--features cuda" in build_cuda and "CUDA_COMPUTE_CAP" in build_cuda
    # What the images copy exists in the repository.
    assert (ROOT / "config" / "default.toml").exists()
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "target" in ignored and ".git" in ignored
