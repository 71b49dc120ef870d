"""The chart renders what it promises: lint-clean, schema-valid (offline), typo-proof, documented."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helm.chart import ALL_ON_VALUES, CHART, REPO, Tools, by_kind, k8s_version, kubeconform

VALUE_SETS = {"default": [], "all-on": ["-f", str(ALL_ON_VALUES)]}


@pytest.mark.parametrize("values", VALUE_SETS, ids=list(VALUE_SETS))
def test_helm_lint_strict_passes(tools: Tools, values: str) -> None:
    out = tools.helm("lint", "--strict", str(CHART), "--kube-version", k8s_version(), *VALUE_SETS[values])
    assert "0 chart(s) failed" in out.stdout
    assert "[WARNING]" not in out.stdout and "[ERROR]" not in out.stdout, out.stdout


@pytest.mark.cluster
@pytest.mark.parametrize("values", VALUE_SETS, ids=list(VALUE_SETS))
def test_rendered_chart_passes_kubeconform_strict_offline(
    tools: Tools, schema_dir: Path, values: str
) -> None:
    manifests = tools.template("--include-crds", *VALUE_SETS[values]).stdout
    count = sum(1 for d in yaml.safe_load_all(manifests) if d)
    report = kubeconform(tools, schema_dir, manifests)
    summary = report["summary"]
    assert summary == {"valid": count, "invalid": 0, "errors": 0, "skipped": 0}, report["resources"]


@pytest.mark.cluster
def test_kubeconform_schemas_reject_a_misspelt_field(tools: Tools, schema_dir: Path) -> None:
    # The same schemas must catch a typo, or the test above proves nothing.
    docs = tools.render()
    deployment = by_kind(docs, "Deployment")[0]
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {"periodSeconds": 1}
    report = kubeconform(tools, schema_dir, yaml.safe_dump(deployment))
    assert report["summary"]["invalid"] == 1
    assert "livenesProbe" in json.dumps(report["resources"])


@pytest.mark.parametrize(
    ("setting", "complaint"),
    [
        ("operatr.logFormat=json", "additional properties 'operatr' not allowed"),
        ("operator.logFormat=yaml", "value must be one of 'plain', 'full', 'json'"),
        ("operator.watchNamespaces[0]=Team_A", "does not match pattern"),
        ("serviceMonitor.interval=30", "got number, want string"),
        ("prometheusRule.stalledAfter=half-an-hour", "does not match pattern"),
        ("image.pullPolicy=Sometimes", "value must be one of"),
        ("replicaCount=2", "additional properties 'replicaCount' not allowed"),
    ],
)
def test_a_misspelt_or_invalid_value_is_an_install_error(tools: Tools, setting: str, complaint: str) -> None:
    out = tools.template("--set", setting, check=False)
    assert out.returncode != 0, f"--set {setting} rendered without complaint"
    assert complaint in out.stderr, out.stderr


def test_chart_crds_are_the_repository_crds() -> None:
    chart = {p.name: p.read_bytes() for p in (CHART / "crds").glob("*.yaml")}
    repo = {p.name: p.read_bytes() for p in (REPO / "crds").glob("*.yaml")}
    assert set(chart) == set(repo), "helm/llmop/crds/ and crds/ differ: run `make crds`"
    for name, content in repo.items():
        assert chart[name] == content, f"helm/llmop/crds/{name} is stale: run `make crds`"


def _undocumented_keys(lines: list[str]) -> list[str]:
    """Keys of values.yaml without a helm-docs `# --` comment right above them.

    A key opening a section whose children are documented one by one (`image:`) needs none itself;
    the keys inside a documented value (`requests:` in `resources:`) are covered by its comment.
    """

    def comment_above(i: int) -> list[str]:
        block = []
        while i > 0 and lines[i - 1].strip().startswith("#"):
            i -= 1
            block.append(lines[i].strip())
        return block

    missing: list[str] = []
    stack: list[tuple[int, bool]] = []  # (indent, children covered by this key's comment)
    for i, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z_][A-Za-z0-9_]*):(.*)$", line)
        if not match:
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if stack and stack[-1][1]:
            stack.append((indent, True))
            continue
        following = next((x for x in lines[i + 1 :] if x.strip()), "")
        opens_section = not match.group(3).strip() and following.strip().startswith("# --")
        if not opens_section and not any(c.startswith("# --") for c in comment_above(i)):
            missing.append(line.strip())
        stack.append((indent, not opens_section))
    return missing


def test_every_value_is_documented_and_typed_in_the_schema() -> None:
    text = (CHART / "values.yaml").read_text()
    values = yaml.safe_load(text)
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert _undocumented_keys(text.splitlines()) == []

    def compare(value: dict[str, Any], node: dict[str, Any], path: str) -> None:
        # Same keys on both sides wherever the schema closes an object: a value the schema lacks
        # could not be set, a schema key values.yaml lacks would be undocumented.
        assert node.get("additionalProperties") is False, f"{path or 'values'} accepts unknown keys"
        assert set(value) == set(node["properties"]), path
        for key, sub in node["properties"].items():
            assert sub.get("description"), f"{path}{key} has no description in the schema"
            if isinstance(value[key], dict) and "properties" in sub:
                compare(value[key], sub, f"{path}{key}.")

    compare(values, schema, "")


def test_operator_pod_is_hardened_single_replica_and_probed_on_its_health_port(tools: Tools) -> None:
    deployment = by_kind(tools.render(), "Deployment")[0]
    spec = deployment["spec"]
    # Kopf runs standalone (no peering): never two pods reconciling at once, not even during a rollout.
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = pod["containers"][0]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert ports == {"metrics": int(env["LLMOP_METRICS_PORT"]), "health": int(env["LLMOP_HEALTH_PORT"])}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert env["LLMOP_NAMESPACES"] == "", "default: the whole cluster"
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]


def _rules(doc: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in doc["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_rbac_modes_cluster_wide_and_per_namespace(tools: Tools) -> None:
    wide = tools.render()
    scoped = tools.render("--set", "operator.watchNamespaces={team-a,team-b}")
    wide_role = by_kind(wide, "ClusterRole")[0]
    assert not by_kind(wide, "Role")
    # Per-namespace mode: the same namespaced rights, but only in the two namespaces; cluster-wide
    # nothing but reading Nodes.
    roles = by_kind(scoped, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert {b["metadata"]["namespace"] for b in by_kind(scoped, "RoleBinding")} == {"team-a", "team-b"}
    scoped_cluster = _rules(by_kind(scoped, "ClusterRole")[0])
    assert scoped_cluster == {("", "nodes", "list"), ("", "nodes", "watch")}
    assert _rules(wide_role) == scoped_cluster | _rules(roles[0])
    env = {
        e["name"]: e["value"]
        for e in by_kind(scoped, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["LLMOP_NAMESPACES"] == "team-a,team-b"
    for group, resource, verb in _rules(wide_role):
        assert "*" not in (group, resource, verb)
        assert resource not in ("secrets", "pods/exec", "customresourcedefinitions", "clusterroles")
