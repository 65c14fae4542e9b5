"""cluster/aws.yaml: valid for Ray 2.60's autoscaler, closed to the internet, token auth on.

The checkers below are plain functions returning a list of problems; each is run on the
shipped config (no problems) and on mutated copies (problems found), so a checker that
silently passes everything fails here.
"""

import copy
import ipaddress
import json
import os
import re
from pathlib import Path

import pytest
import yaml

import ray.autoscaler

ROOT = Path(__file__).resolve().parents[1]
CONFIG_PATH = ROOT / "cluster" / "aws.yaml"
RAY_SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"

RAY_PORTS = {6379: "GCS", 8265: "dashboard / job server", 10001: "Ray client"}
ADMIN_CIDR_PLACEHOLDER = "YOUR.IP.ADDR.ESS/32"
SG_PLACEHOLDER = "sg-REPLACE_WITH_CLUSTER_SG_ID"
SG_ID = re.compile(r"^sg-[0-9a-f]{8,17}$")


def load() -> dict:
    return yaml.safe_load(CONFIG_PATH.read_text())


# ---------------------------------------------------------------- the rules AWS would get

def ray_default_rules_for_created_group(extra: list) -> list:
    """What Ray 2.60 authorizes on a security group it creates itself: intra-group, SSH
    from 0.0.0.0/0, then provider.security_group.IpPermissions."""
    try:
        from ray.autoscaler._private.aws.config import _create_default_inbound_rules
    except ImportError:  # boto3 missing: the same rules, as written in Ray 2.60
        return ([{"IpProtocol": "-1", "FromPort": -1, "ToPort": -1,
                  "UserIdGroupPairs": [{"GroupId": "sg-created-by-ray"}]},
                 {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
                  "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}] + list(extra))
    return _create_default_inbound_rules({"sg-created-by-ray"}, list(extra))


def effective_ingress(cfg: dict) -> list:
    """Every inbound rule the cluster's nodes would sit behind: the declared group's rules
    (metadata.security_group), any provider.security_group rules, and -- if some node type
    names no SecurityGroupIds -- the group Ray would create for it."""
    declared = cfg.get("metadata", {}).get("security_group", {}).get("IpPermissions", [])
    provider_extra = cfg["provider"].get("security_group", {}).get("IpPermissions", [])
    rules = list(declared) + list(provider_extra)
    if any("SecurityGroupIds" not in t["node_config"] for t in cfg["available_node_types"].values()):
        rules += ray_default_rules_for_created_group(provider_extra)
    return rules


def port_range(rule: dict) -> tuple[int, int] | None:
    proto = str(rule.get("IpProtocol", "")).lower()
    if proto in ("-1", "all"):
        return (0, 65535)
    if proto in ("tcp", "udp", "6", "17"):
        lo, hi = int(rule.get("FromPort", -1)), int(rule.get("ToPort", -1))
        return (0, 65535) if lo == -1 else (lo, hi)
    return None  # icmp and friends: no ports


def sources(rule: dict) -> list[str]:
    return ([r.get("CidrIp", "") for r in rule.get("IpRanges", [])]
            + [r.get("CidrIpv6", "") for r in rule.get("Ipv6Ranges", [])])


def is_world(cidr: str) -> bool:
    """0.0.0.0/0, ::/0 and any other /0. A string that is not a CIDR counts as world,
    except the admin placeholder, which README says to replace."""
    cidr = cidr.strip()
    if cidr == ADMIN_CIDR_PLACEHOLDER:
        return False
    try:
        return ipaddress.ip_network(cidr, strict=False).prefixlen == 0
    except ValueError:
        return True


def world_open_problems(rules: list) -> list[str]:
    """Any rule at all open to the world."""
    return [f"rule {i} ({rule.get('IpProtocol')} {port_range(rule)}) open to {cidr!r}"
            for i, rule in enumerate(rules) for cidr in sources(rule) if is_world(cidr)]


def ray_port_problems(rules: list) -> list[str]:
    """Ray's ports (or a range or protocol covering them) open to the world."""
    problems = []
    for i, rule in enumerate(rules):
        ports = port_range(rule)
        for cidr in sources(rule):
            if ports and is_world(cidr):
                problems += [f"port {p} ({name}) open to {cidr!r} by rule {i}"
                             for p, name in RAY_PORTS.items() if ports[0] <= p <= ports[1]]
    return problems


def ssh_problems(rules: list) -> list[str]:
    """Address-based rules: only SSH (tcp 22) and only from a non-world admin CIDR."""
    problems = []
    for i, rule in enumerate(rules):
        if not (sources(rule) or rule.get("PrefixListIds")):
            continue
        if port_range(rule) != (22, 22) or str(rule.get("IpProtocol")).lower() not in ("tcp", "6"):
            problems.append(f"rule {i} opens {rule.get('IpProtocol')} {port_range(rule)} to addresses; only SSH 22 may")
        problems += [f"rule {i}: SSH from {c!r}" for c in sources(rule) if is_world(c)]
        if rule.get("PrefixListIds"):
            problems.append(f"rule {i}: prefix lists are not reviewed here")
    return problems


def cluster_group(cfg: dict) -> set[str]:
    return {g for t in cfg["available_node_types"].values() for g in t["node_config"].get("SecurityGroupIds", [])}


def group_problems(cfg: dict) -> list[str]:
    """Every node type in one named group (so Ray creates none), and the only group-based
    ingress is from that group itself."""
    problems = [f"node type {name!r} names no SecurityGroupIds: Ray 2.60 would create a group with SSH from 0.0.0.0/0"
                for name, t in cfg["available_node_types"].items() if "SecurityGroupIds" not in t["node_config"]]
    groups = cluster_group(cfg)
    if len(groups) != 1:
        problems.append(f"node types use groups {sorted(groups)}; expected exactly one cluster group")
    for g in groups:
        if g != SG_PLACEHOLDER and not SG_ID.match(g):
            problems.append(f"{g!r} is neither the placeholder nor a security group id")
    for i, rule in enumerate(effective_ingress(cfg)):
        for pair in rule.get("UserIdGroupPairs", []):
            if pair.get("GroupId") not in groups:
                problems.append(f"rule {i} admits group {pair.get('GroupId')!r}, not the cluster's own")
    return problems


# ------------------------------------------------------------------- token and dashboard

DISABLED = re.compile(r"RAY_AUTH_MODE\s*=\s*['\"]?disabled", re.I)
DASHBOARD_HOST = re.compile(r"--dashboard-host(?:=|\s+)['\"]?([^\s'\";]+)")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def auth_problems(cfg: dict) -> list[str]:
    problems = []
    if DISABLED.search(yaml.safe_dump(cfg)):
        problems.append("something sets RAY_AUTH_MODE=disabled")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg.get(key, []) if "ray start" in c]
        if not starts:
            problems.append(f"{key} has no `ray start`")
        for cmd in starts:
            before = cmd[: cmd.index("ray start")]
            if not re.search(r"(^|[;&\s])(export\s+)?RAY_AUTH_MODE=token\b", before):
                problems.append(f"{key}: RAY_AUTH_MODE=token is not set for {cmd!r}")
    mounts = {os.path.expanduser(k): os.path.expanduser(v) for k, v in cfg.get("file_mounts", {}).items()}
    token = os.path.expanduser("~/.ray/auth_token")
    if mounts.get(token) != token:
        problems.append("file_mounts does not copy ~/.ray/auth_token to ~/.ray/auth_token on every node")
    return problems


def dashboard_problems(cfg: dict) -> list[str]:
    problems = []
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for cmd in cfg.get(key, []):
            for host in DASHBOARD_HOST.findall(cmd):
                if host not in LOOPBACK:
                    problems.append(f"{key}: dashboard bound to {host!r}")
    heads = [c for c in cfg["head_start_ray_commands"] if "ray start" in c]
    if not any(set(DASHBOARD_HOST.findall(c)) & LOOPBACK for c in heads):
        problems.append("head `ray start` does not bind the dashboard to loopback explicitly")
    return problems


# ------------------------------------------------------------------------------- tests

def test_validates_against_ray_autoscaler_schema():
    import jsonschema  # ships with ray[default]
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    cfg = load()
    jsonschema.validate(cfg, json.loads(RAY_SCHEMA.read_text()))
    validate_config(fillout_defaults(cfg))  # what `ray up` runs before talking to AWS


def test_no_ingress_rule_is_open_to_the_world():
    rules = effective_ingress(load())
    assert rules, "no ingress rules declared at all"
    assert world_open_problems(rules) == []
    assert ray_port_problems(rules) == []


def test_addresses_reach_ssh_only_and_groups_only_the_cluster_itself():
    cfg = load()
    assert ssh_problems(effective_ingress(cfg)) == []
    assert group_problems(cfg) == []
    rules = effective_ingress(cfg)
    assert any(port_range(r) == (22, 22) and sources(r) for r in rules), "no admin SSH rule"
    assert any(r.get("UserIdGroupPairs") for r in rules), "no intra-cluster rule"


@pytest.mark.parametrize("rule", [
    {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
    {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "Ipv6Ranges": [{"CidrIpv6": "::/0"}]},
    {"IpProtocol": "tcp", "FromPort": 1024, "ToPort": 65535, "IpRanges": [{"CidrIp": " 0.0.0.0/0"}]},
    {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
], ids=["dashboard-v4", "dashboard-v6", "wide-range", "all-traffic"])
def test_checkers_catch_a_dashboard_opened_to_the_world(rule):
    cfg = copy.deepcopy(load())
    cfg["metadata"]["security_group"]["IpPermissions"].append(rule)
    rules = effective_ingress(cfg)
    assert any("8265" in p for p in ray_port_problems(rules)), ray_port_problems(rules)
    assert world_open_problems(rules)
    assert ssh_problems(rules)


@pytest.mark.parametrize("port", sorted(RAY_PORTS))
@pytest.mark.parametrize("source", [{"IpRanges": [{"CidrIp": "0.0.0.0/0"}]}, {"Ipv6Ranges": [{"CidrIpv6": "::/0"}]}],
                         ids=["0.0.0.0/0", "::/0"])
def test_checkers_catch_each_ray_port_opened_to_the_world(port, source):
    """GCS 6379, dashboard 8265 and Ray client 10001, each alone, over IPv4 and IPv6."""
    assert set(RAY_PORTS) == {6379, 8265, 10001}
    cfg = copy.deepcopy(load())
    cfg["metadata"]["security_group"]["IpPermissions"].append(
        {"IpProtocol": "tcp", "FromPort": port, "ToPort": port, **source})
    problems = ray_port_problems(effective_ingress(cfg))
    assert [p.split(" (")[0] for p in problems] == [f"port {port}"], problems
    assert world_open_problems(effective_ingress(cfg))


def test_checkers_catch_ssh_open_to_the_world_and_foreign_groups():
    cfg = copy.deepcopy(load())
    ssh = next(r for r in cfg["metadata"]["security_group"]["IpPermissions"] if port_range(r) == (22, 22))
    ssh["IpRanges"][0]["CidrIp"] = "0.0.0.0/0"
    assert world_open_problems(effective_ingress(cfg)) and ssh_problems(effective_ingress(cfg))
    assert ray_port_problems(effective_ingress(cfg)) == []  # 22 is not a Ray port

    cfg = copy.deepcopy(load())
    foreign = next(g for g in ("sg-0123456789abcdef0", "sg-0fedcba9876543210") if g not in cluster_group(cfg))
    cfg["metadata"]["security_group"]["IpPermissions"].append(
        {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": foreign}]})
    assert group_problems(cfg)


def test_checkers_catch_a_node_type_left_to_rays_default_group():
    cfg = copy.deepcopy(load())
    del cfg["available_node_types"]["rollout_gpu"]["node_config"]["SecurityGroupIds"]
    assert group_problems(cfg)
    assert world_open_problems(effective_ingress(cfg)), "Ray's created group opens SSH to 0.0.0.0/0"


def test_token_auth_on_and_dashboard_on_loopback():
    cfg = load()
    assert auth_problems(cfg) == []
    assert dashboard_problems(cfg) == []
    assert not DISABLED.search(CONFIG_PATH.read_text())  # not even in a comment


@pytest.mark.parametrize("mutate, checker", [
    (lambda c: c["head_start_ray_commands"].__setitem__(
        1, c["head_start_ray_commands"][1].replace("RAY_AUTH_MODE=token", "RAY_AUTH_MODE=disabled")), auth_problems),
    (lambda c: c["worker_start_ray_commands"].__setitem__(
        1, c["worker_start_ray_commands"][1].replace("export RAY_AUTH_MODE=token; ", "")), auth_problems),
    (lambda c: c["setup_commands"].append("echo 'export RAY_AUTH_MODE=disabled' >> ~/.bashrc"), auth_problems),
    (lambda c: c["file_mounts"].pop("~/.ray/auth_token"), auth_problems),
    (lambda c: c["head_start_ray_commands"].__setitem__(
        1, c["head_start_ray_commands"][1].replace("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0")),
     dashboard_problems),
    (lambda c: c["head_start_ray_commands"].__setitem__(
        1, c["head_start_ray_commands"][1].replace("--dashboard-host=127.0.0.1", "--dashboard-host ::")),
     dashboard_problems),
], ids=["auth-disabled", "auth-missing", "disabled-in-bashrc", "token-not-mounted", "dashboard-0.0.0.0",
        "dashboard-::"])
def test_auth_and_dashboard_checkers_catch_mutations(mutate, checker):
    cfg = copy.deepcopy(load())
    assert checker(cfg) == []
    mutate(cfg)
    assert checker(cfg)


def test_node_types_carry_the_resources_placement_targets():
    types = load()["available_node_types"]
    head = types[load()["head_node_type"]]["resources"]
    assert head.get("CPU") == 0 and not {"GPU", "learner", "rollout"} & set(head), head
    learner = [t["resources"] for t in types.values() if "learner" in t["resources"]]
    rollout = [t["resources"] for t in types.values() if "rollout" in t["resources"]]
    assert learner and rollout
    for res in learner + rollout:  # one unit per GPU, as the recipes ask {GPU: 1, learner|rollout: 1}
        assert res.get("GPU", 0) >= 1
        assert res.get("learner", res.get("rollout")) == res["GPU"], res


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_recipes_fit_on_the_nodes_up_at_start(recipe):
    """Each learner / rollout worker fits one node type, and the min_workers nodes hold them
    all: dopsd_ray.preflight compares the recipe with ray.cluster_resources() at submit."""
    cfg = load()
    rt = yaml.safe_load(recipe.read_text()).get("runtime", {})
    groups = [(rt.get("learner_resources", {}), rt.get("num_learners", 1))]
    if rt.get("mode") == "disaggregated":
        groups.append((rt.get("rollout_resources", {}), rt.get("num_rollout_workers", 1)))
    for want, n in groups:
        want = {k: v for k, v in want.items() if k != "CPU"}  # CPU: detected from the instance type
        if not want:
            continue
        fits = [t for t in cfg["available_node_types"].values()
                if all(t["resources"].get(k, 0) >= v for k, v in want.items())]
        assert fits, f"{recipe.name}: no node type can hold {want}"
        up = sum(min(t["resources"].get(k, 0) // v for k, v in want.items()) * t.get("min_workers", 0) for t in fits)
        assert up >= n, f"{recipe.name}: {n} x {want} but min_workers nodes hold {up}"


# ------------------------------------------------------------ storage: nodes share no disk
def storage_problems(cfg: dict, output_dirs: set[str]) -> list[str]:
    """Every output_dir is an object-store URI (aws.yaml mounts no shared disk) and every GPU
    node type carries an instance profile, so its processes can use the bucket."""
    problems = [f"train.output_dir {d} is a path on one node's disk: the cluster's nodes share none; use s3://"
                for d in sorted(output_dirs) if "://" not in d]
    for name, node_type in cfg["available_node_types"].items():
        if name != cfg["head_node_type"] and "IamInstanceProfile" not in node_type["node_config"]:
            problems.append(f"{name}: no IamInstanceProfile: its learners or rollout workers cannot reach the bucket")
    return problems


def test_cluster_recipes_keep_their_files_where_every_node_reaches():
    from test_kuberay import cluster_recipes

    dirs = {r["train"]["output_dir"] for r in cluster_recipes().values()}
    assert dirs == {"s3://YOUR-BUCKET/dopsd"}
    assert storage_problems(load(), dirs) == []
    assert storage_problems(load(), {"/mnt/cluster_storage/dopsd"})  # a path no node shares
    cfg = load()
    del cfg["available_node_types"]["learner_gpu"]["node_config"]["IamInstanceProfile"]
    assert storage_problems(cfg, dirs) == ["learner_gpu: no IamInstanceProfile: its learners or rollout workers "
                                           "cannot reach the bucket"]
