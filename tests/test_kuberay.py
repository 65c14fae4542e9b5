"""cluster/kuberay.yaml: a valid KubeRay RayJob, token auth on, nothing open to the world,
shared storage at the recipes' output_dir, the recipes' custom resources provided.

The schema is the RayJob CRD's openAPIV3Schema (cluster/crd/, KubeRay's own file). The API
server prunes unknown fields of a CRD object silently unless the client asks for strict
field validation (`kubectl apply --validate=strict`), so `strict()` closes every object
that declares its properties, as strict validation does: a misspelled field then fails
here instead of vanishing on the cluster. Each policy checker below returns a list of
problems and is run on the shipped manifest (none) and on a broken copy (some).
"""

import copy
import functools
import gzip
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "cluster" / "kuberay.yaml"
CRD = ROOT / "cluster" / "crd" / "ray.io_rayjobs.yaml.gz"
RAY_PORTS = {6379, 8265, 10001}
SECRET_KEY = "auth_token"  # the key KubeRay reads from authOptions.secretName


def documents() -> list[dict]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def rayjob(docs: list[dict]) -> dict:
    (job,) = [d for d in docs if d.get("kind") == "RayJob"]
    return job


@functools.cache
def crd_schema(version: str = "v1") -> dict:
    """The openAPIV3Schema of one version of the CRD (1.4 MB of YAML: read with libyaml, once)."""
    crd = yaml.load(gzip.decompress(CRD.read_bytes()), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["names"]["kind"] == "RayJob"
    (v,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return v["schema"]["openAPIV3Schema"]


def strict(schema):
    """Unknown fields rejected wherever the schema lists an object's properties (and does not
    preserve unknown fields), as Kubernetes' strict field validation does."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def validator():
    schema = strict(crd_schema())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def schema_problems(validator, job: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(job)]


# ------------------------------------------------------------------------ the pods
def groups(job: dict) -> dict[str, dict]:
    """{group name: group spec}; the head is "head"."""
    spec = job["spec"]["rayClusterSpec"]
    return {"head": spec["headGroupSpec"], **{g["groupName"]: g for g in spec.get("workerGroupSpecs", [])}}


def containers(job: dict) -> list[tuple[str, dict, dict]]:
    """(group, pod spec, container) for every container of every Ray pod, and of the submitter pod."""
    found = [(name, g["template"]["spec"], c) for name, g in groups(job).items()
             for c in g["template"]["spec"]["containers"]]
    submitter = job["spec"].get("submitterPodTemplate")
    if submitter:
        found += [("submitter", submitter["spec"], c) for c in submitter["spec"]["containers"]]
    return found


def env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def auth_problems(job: dict) -> list[str]:
    auth = job["spec"]["rayClusterSpec"].get("authOptions") or {}
    problems = [] if auth.get("mode") == "token" else [f"authOptions.mode is {auth.get('mode')!r}, not 'token'"]
    secret = auth.get("secretName")
    if not secret:
        problems.append("authOptions.secretName is not set: KubeRay would make a token of its own")
    for group, _, c in containers(job):
        e = env(c)
        mode = e.get("RAY_AUTH_MODE", {}).get("value")
        if mode != "token":
            problems.append(f"{group}/{c['name']}: RAY_AUTH_MODE is {mode!r}, not 'token'")
        ref = e.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
        if (ref.get("name"), ref.get("key")) != (secret, SECRET_KEY):
            problems.append(f"{group}/{c['name']}: RAY_AUTH_TOKEN does not come from secret {secret!r}, key {SECRET_KEY!r}")
    return problems


def exposure_problems(docs: list[dict]) -> list[str]:
    """Anything that could make a Ray port reachable from outside the cluster network."""
    job = rayjob(docs)
    problems = []
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]
    if head.get("serviceType", "ClusterIP") != "ClusterIP":
        problems.append(f"headGroupSpec.serviceType is {head['serviceType']!r}")
    if head.get("enableIngress"):
        problems.append("headGroupSpec.enableIngress is on")
    svc_type = head.get("headService", {}).get("spec", {}).get("type", "ClusterIP")
    if svc_type != "ClusterIP":
        problems.append(f"headGroupSpec.headService.spec.type is {svc_type!r}")
    for d in docs:
        if d.get("kind") == "Ingress" or (d.get("kind") == "Service" and d.get("spec", {}).get("type", "ClusterIP") != "ClusterIP"):
            problems.append(f"{d['kind']} {d.get('metadata', {}).get('name')!r} exposes the cluster")
    for group, pod, c in containers(job):
        if pod.get("hostNetwork"):
            problems.append(f"{group}: hostNetwork puts Ray's ports on the node's address")
        problems += [f"{group}/{c['name']}: hostPort {p['hostPort']}" for p in c.get("ports", []) if p.get("hostPort")]
    return problems


def mounts(pod: dict, container: dict, claim: str) -> list[str]:
    """Where `container` mounts the PersistentVolumeClaim `claim`."""
    names = {v["name"] for v in pod.get("volumes", []) if v.get("persistentVolumeClaim", {}).get("claimName") == claim}
    return [m["mountPath"] for m in container.get("volumeMounts", []) if m["name"] in names]


def storage_problems(docs: list[dict], output_dirs: set[str]) -> list[str]:
    """One ReadWriteMany claim in the file, mounted by every Ray pod at or above every output_dir that
    is a path (an object-store URI needs no volume)."""
    claims = [d for d in docs if d.get("kind") == "PersistentVolumeClaim"]
    if len(claims) != 1:
        return [f"{len(claims)} PersistentVolumeClaims in the file, expected 1"]
    claim = claims[0]
    problems = [] if claim["spec"].get("accessModes") == ["ReadWriteMany"] else [
        f"claim accessModes {claim['spec'].get('accessModes')}: every node must write, so ReadWriteMany"]
    for group, pod, c in containers(rayjob(docs)):
        if group == "submitter":
            continue
        paths = mounts(pod, c, claim["metadata"]["name"])
        for out in sorted(d for d in output_dirs if "://" not in d):
            if not any(out == p.rstrip("/") or out.startswith(p.rstrip("/") + "/") for p in paths):
                problems.append(f"{group}/{c['name']}: train.output_dir {out} is not on the shared volume (mounts {paths})")
    return problems


def ray_resources(group: dict) -> dict[str, float]:
    """The Ray resources a pod of the group offers: CPU/GPU from rayStartParams or the container
    limits (as KubeRay derives them), custom ones from rayStartParams `resources` and `resources`."""
    params = group.get("rayStartParams", {})
    limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
    out = {"CPU": float(params.get("num-cpus", limits.get("cpu", 0))),
           "GPU": float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))}
    custom = params.get("resources")
    if custom:
        out.update({k: float(v) for k, v in yaml.safe_load(yaml.safe_load(custom)).items()})
    out.update({k: float(v) for k, v in group.get("resources", {}).items()})
    return out


def resource_problems(job: dict, recipes: dict[str, dict]) -> list[str]:
    """The head has nothing to run work on; each recipe's learners and rollout workers fit in the
    worker groups that offer their custom resources, one unit per GPU."""
    offered = {name: (ray_resources(g), g.get("maxReplicas", g.get("replicas", 1)))
               for name, g in groups(job).items()}
    head = offered.pop("head")[0]
    problems = [f"head offers {k}={v} to Ray: it must run no work" for k, v in head.items() if v]
    for name, (res, _) in offered.items():
        custom = {k: v for k, v in res.items() if k not in ("CPU", "GPU")}
        if any(v != res["GPU"] for v in custom.values()):
            problems.append(f"group {name}: custom resources {custom} are not one unit per GPU ({res['GPU']})")
    for recipe, rt in recipes.items():
        wanted = [("learner", rt["learner_resources"], rt["num_learners"])]
        if rt.get("mode") == "disaggregated":
            wanted.append(("rollout", rt["rollout_resources"], rt["num_rollout_workers"]))
        for role, per, count in wanted:
            custom = {k for k in per if k not in ("CPU", "GPU")}
            if not custom:
                problems.append(f"{recipe}: runtime.{role}_resources names no custom resource to place it by")
                continue
            capacity = 0
            for name, (res, replicas) in offered.items():
                if custom <= set(res):  # how many fit in one pod, times the pods
                    capacity += replicas * min(int(res.get(k, 0) // v) for k, v in per.items() if v)
            if capacity < count:
                problems.append(f"{recipe}: room for {capacity} of its {count} {role}s {per} in the worker groups")
    return problems


# ---------------------------------------------------------------------- the recipes
def cluster_recipes() -> dict[str, dict]:
    """configs/*.yaml whose learners are placed by a custom resource: those meant for a cluster."""
    out = {}
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        if set(cfg.get("runtime", {}).get("learner_resources", {})) - {"CPU", "GPU"}:
            out[path.name] = cfg
    return out


def entrypoint_recipe(job: dict) -> str:
    words = job["spec"]["entrypoint"].split()
    assert words[1].endswith("jobs/train.py"), words
    return Path(words[words.index("--config") + 1]).name


# ------------------------------------------------------------------------- tests
def test_the_manifest_is_a_valid_rayjob(validator):
    docs = documents()
    assert [d["kind"] for d in docs] == ["PersistentVolumeClaim", "RayJob"]
    assert schema_problems(validator, rayjob(docs)) == []


def test_token_auth_is_on_in_every_container():
    assert auth_problems(rayjob(documents())) == []


def test_no_ray_port_is_exposed_outside_the_cluster():
    docs = documents()
    assert exposure_problems(docs) == []
    ports = {p["containerPort"] for _, _, c in containers(rayjob(docs)) for p in c.get("ports", [])}
    assert ports <= RAY_PORTS  # the head's ports are declared, and reached only via the ClusterIP Service


def entrypoint_output_dir(job: dict, recipes: dict) -> str:
    """train.output_dir of the job: the entrypoint's override, else its recipe's."""
    words = job["spec"]["entrypoint"].split()
    given = [w.split("=", 1)[1] for w in words if w.startswith("train.output_dir=")]
    return given[-1] if given else recipes[entrypoint_recipe(job)]["train"]["output_dir"]


def test_shared_storage_is_at_the_jobs_output_dir_and_resources_match_the_recipes():
    """The recipes keep their files in a bucket (s3://); the RayJob puts them on its shared volume."""
    recipes = cluster_recipes()
    assert {"zimage_turbo_full.yaml", "zimage_turbo_lora.yaml"} <= set(recipes)
    assert {r["train"]["output_dir"] for r in recipes.values()} == {"s3://YOUR-BUCKET/dopsd"}
    docs = documents()
    dirs = {entrypoint_output_dir(rayjob(docs), recipes)}
    assert dirs == {"/mnt/cluster_storage/dopsd"}
    assert storage_problems(docs, dirs) == []
    assert resource_problems(rayjob(docs), {n: r["runtime"] for n, r in recipes.items()}) == []
    assert entrypoint_recipe(rayjob(docs)) in recipes
    assert (ROOT / "jobs" / "train.py").is_file()


def broken(path: str, value=None, delete: bool = False) -> dict:
    job = copy.deepcopy(rayjob(documents()))
    *parents, last = path.split(".")
    node = job
    for p in parents:
        node = node[int(p)] if p.isdigit() else node[p]
    if delete:
        del node[last]
    else:
        node[last] = value
    return job


@pytest.mark.parametrize("path, value, expected", [
    ("spec.rayClusterSpec.workerGroupSpecs.0.replica", 1, "'replica' was unexpected"),  # misspelled
    ("spec.rayClusterSpec.headGroupSpec.template.spec.containers.0.volumeMount", [], "'volumeMount' was unexpected"),
    ("spec.rayClusterSpec.authOptions.mode", "tokens", "is not one of"),
    ("spec.rayClusterSpec.workerGroupSpecs.0.rayStartParams", {"num-gpus": 8}, "is not of type 'string'"),
    ("spec.entrypointNumCpus", "0", "is not of type 'number'"),
], ids=["worker-field", "container-field", "auth-mode", "start-param-type", "number-type"])
def test_the_schema_check_fails_on_a_broken_manifest(validator, path, value, expected):
    problems = schema_problems(validator, broken(path, value))
    assert any(expected in p for p in problems), problems


def test_the_crd_alone_accepts_misspelled_fields_which_strict_validation_rejects():
    """Why strict(): the CRD declares no additionalProperties: false (the API server prunes)."""
    job = broken("spec.rayClusterSpec.workerGroupSpecs.0.replica", 1)
    assert list(jsonschema.Draft7Validator(crd_schema()).iter_errors(job)) == []


def test_the_policy_checks_fail_on_a_broken_manifest():
    docs = documents()
    recipes = {n: r["runtime"] for n, r in cluster_recipes().items()}
    dirs = {entrypoint_output_dir(rayjob(docs), cluster_recipes())}

    assert auth_problems(broken("spec.rayClusterSpec.authOptions.mode", "disabled"))
    assert auth_problems(broken("spec.rayClusterSpec.workerGroupSpecs.1.template.spec.containers.0.env", []))
    assert auth_problems(broken("spec.rayClusterSpec.authOptions.secretName", delete=True))

    for path, value in [("serviceType", "LoadBalancer"), ("serviceType", "NodePort"), ("enableIngress", True),
                        ("headService", {"spec": {"type": "LoadBalancer"}}),
                        ("template.spec.hostNetwork", True)]:
        job = broken(f"spec.rayClusterSpec.headGroupSpec.{path}", value)
        assert exposure_problems([d if d.get("kind") != "RayJob" else job for d in docs]), path
    assert exposure_problems([*docs, {"kind": "Service", "metadata": {"name": "dash"}, "spec": {"type": "NodePort"}}])

    job = broken("spec.rayClusterSpec.workerGroupSpecs.0.template.spec.containers.0.volumeMounts", [])
    assert storage_problems([docs[0], job], dirs)
    assert storage_problems([docs[0], rayjob(docs)], {"/mnt/elsewhere/dopsd"})
    assert not storage_problems(docs, {"s3://YOUR-BUCKET/dopsd"})  # a bucket needs no volume
    rwo = copy.deepcopy(docs[0])
    rwo["spec"]["accessModes"] = ["ReadWriteOnce"]
    assert storage_problems([rwo, rayjob(docs)], dirs)

    assert resource_problems(broken("spec.rayClusterSpec.headGroupSpec.rayStartParams.num-cpus", "8"), recipes)
    assert resource_problems(broken("spec.rayClusterSpec.workerGroupSpecs.1.rayStartParams.resources",
                                    '"{\\"rolout\\": 4}"'), recipes)  # a typo: no group offers `rollout`
    assert resource_problems(broken("spec.rayClusterSpec.workerGroupSpecs.0.maxReplicas", 0), recipes)
