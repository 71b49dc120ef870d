"""Searches on the real cluster with kwok trials: the exact trial sets, failure policy, preemption,
restart safety after SIGKILL, metrics and clean-up. Each trial's end is scripted from its values."""

from __future__ import annotations

import itertools
import json
import math
import re
from typing import Any

import pytest

from llmop.conditions import parse_time
from llmop.search import sampler
from llmop.termination import final_figures
from llmop_contract.api.v1alpha1.search import LLMHyperparameterSearchSpec
from tests.cluster.conftest import OperatorProcess
from tests.cluster.search.conftest import (
    EXIT_AFTER,
    EXIT_CODE,
    MESSAGE,
    Outcomes,
    Searches,
    finishes,
    kwok_template,
)
from tests.kube import Cluster, wait_for

pytestmark = pytest.mark.cluster
LR = {"name": "lr", "path": "training.optimizer.learningRate", "type": "Float", "scale": "Log"}


def bowl(values: dict[str, Any], after: str = "1s") -> dict[str, str]:
    """A trial's loss as a function of its learning rate (minimum at 10^-2.3), like a real sweep."""
    loss = 5.5 + 0.2 * (math.log10(values["lr"]) + 2.3) ** 2 + (0.1 if values.get("opt") == "SGD" else 0.0)
    return finishes(round(loss, 6), after=after)


def metric_lines(op: OperatorProcess, search: str) -> list[str]:
    return [line for line in op.metrics().splitlines() if f'search="{search}"' in line]


def test_grid_runs_every_point_once_and_reports_the_best(
    searches: Searches, search_operator: OperatorProcess, cluster: Cluster
) -> None:
    spec = {
        "algorithm": "Grid",
        "maxTrials": 10,
        "parallelTrials": 2,
        "trialTemplate": kwok_template(),
        "parameters": [
            {**LR, "min": 0.001, "max": 0.1, "step": 10},
            {
                "name": "opt",
                "path": "training.optimizer.type",
                "type": "Categorical",
                "choices": ["AdamW", "SGD"],
            },
        ],
    }
    searches.create("grid", spec)
    outcomes, peak = Outcomes(searches, "grid", bowl), 0

    def succeeded() -> dict[str, Any] | None:
        nonlocal peak
        outcomes.tick()
        jobs = searches.jobs("grid")
        peak = max(
            peak, sum((j.get("status") or {}).get("state") not in ("Succeeded", "Failed") for j in jobs)
        )
        c = searches.condition("grid", "Succeeded")
        return c if c and c["status"] == "True" else None

    done = wait_for(succeeded, timeout=180, interval=0.5, what="grid Succeeded")
    assert peak <= 2, f"{peak} trials ran at once with parallelTrials=2"
    status = searches.status("grid")
    # Exact, where polling may miss a moment: the most trials the planner ever had open at once,
    # from its own start and completion times (a trial started in the pass that finished another
    # starts at that one's completion time, hence half-open intervals).
    edges = sorted(
        (parse_time(t[key]), +1 if key == "startTime" else -1)
        for t in status["trials"]
        for key in ("startTime", "completionTime")
    )
    open_at_once = max(itertools.accumulate(step for _, step in edges))
    assert open_at_once == 2, f"{open_at_once} trials open at once with parallelTrials=2"
    points = {(t["parameters"]["lr"], t["parameters"]["opt"]) for t in status["trials"]}
    assert len(status["trials"]) == 6, "the grid has 6 points; maxTrials=10 does not add any"
    assert points == set(itertools.product((0.001, 0.01, 0.1), ("AdamW", "SGD")))
    best = min(status["trials"], key=lambda t: t["value"])
    assert status["bestTrial"]["name"] == best["name"] == "grid-002"
    assert status["bestTrial"]["parameters"] == {"lr": 0.01, "opt": "AdamW"}
    assert best["name"] in done["message"]
    assert status["counts"] == {
        "total": 6,
        "pending": 0,
        "running": 0,
        "succeeded": 6,
        "failed": 0,
        "stoppedEarly": 0,
        "cancelled": 0,
        "finished": 6,
    }

    # Every trial is an LLMTrainingJob owned by the search, named by index, labelled and annotated.
    jobs = searches.jobs("grid")
    assert [j["metadata"]["name"] for j in jobs] == [f"grid-{i:03d}" for i in range(6)]
    by_name = {t["name"]: t for t in status["trials"]}
    for job in jobs:
        meta = job["metadata"]
        owner = meta["ownerReferences"][0]
        assert owner["kind"] == "LLMHyperparameterSearch" and owner["name"] == "grid" and owner["controller"]
        assert meta["labels"]["llmop.io/trial-index"] == str(by_name[meta["name"]]["index"])
        values = json.loads(meta["annotations"]["llmop.io/trial-parameters"])
        assert values == by_name[meta["name"]]["parameters"]
        assert job["spec"]["training"]["optimizer"] == {
            **job["spec"]["training"]["optimizer"],
            "learningRate": values["lr"],
            "type": values["opt"],
        }

    out = cluster.kubectl(
        "wait", "--for=condition=Succeeded", "llmsearch/grid", "-n", searches.ns, "--timeout=5s"
    )
    assert "condition met" in out.stdout
    table = cluster.kubectl("get", "llmsearch", "grid", "-n", searches.ns).stdout
    print(table)
    assert "Succeeded" in table and best["name"] in table
    reasons = {e["reason"] for e in searches.events("grid")}
    assert {"SearchCreated", "TrialCreated", "TrialSucceeded", "BestTrialFound"} <= reasons

    series = metric_lines(search_operator, "grid")
    assert any('state="Succeeded"' in line and line.endswith(" 6.0") for line in series), series
    assert any(line.startswith("llmop_search_best_objective") for line in series), series
    cluster.kubectl("delete", "llmsearch", "grid", "-n", searches.ns, "--wait=true", "--timeout=60s")
    wait_for(lambda: not searches.jobs("grid"), timeout=60, what="trial jobs deleted with their search")
    assert metric_lines(search_operator, "grid") == [], "no stale series after the search is gone"


def test_random_search_runs_exactly_the_trials_its_seed_gives(
    searches: Searches, search_operator: OperatorProcess
) -> None:
    spec = {
        "algorithm": "Random",
        "seed": 42,
        "maxTrials": 6,
        "parallelTrials": 3,
        "trialTemplate": kwok_template(**finishes(after="1s")),
        "parameters": [
            {**LR, "min": 1e-5, "max": 1.0},
            {"name": "layers", "path": "model.numLayers", "type": "Int", "min": 2, "max": 8},
        ],
    }
    searches.create("rand", spec)
    searches.wait_condition("rand", "Succeeded", timeout=180)
    trials = searches.status("rand")["trials"]
    model = LLMHyperparameterSearchSpec.model_validate(spec)
    assert [t["parameters"] for t in trials] == [sampler.suggest(model, [], i) for i in range(6)]
    assert len({t["parameters"]["lr"] for t in trials}) == 6
    assert all(1e-5 <= t["parameters"]["lr"] <= 1 and 2 <= t["parameters"]["layers"] <= 8 for t in trials)
    assert all(isinstance(t["parameters"]["layers"], int) for t in trials)


def test_failed_trials_beyond_the_limit_fail_the_search(
    searches: Searches, search_operator: OperatorProcess
) -> None:
    template = kwok_template(**{EXIT_AFTER: "1s", EXIT_CODE: "1"})
    template["runPolicy"] = {"restartPolicy": "Never"}
    spec = {"algorithm": "Random", "maxTrials": 10, "maxFailedTrials": 2, "trialTemplate": template}
    searches.create("broken", {**spec, "parameters": [{**LR, "min": 1e-4, "max": 1e-2}]})
    failed = searches.wait_condition("broken", "Failed", timeout=120)
    assert failed["reason"] == "MaxFailedTrialsExceeded" and "3 trials failed" in failed["message"]
    # The pass that failed the search started no trial (that none is started later is
    # tests/unit/search/test_planner.py's).
    status = searches.status("broken")
    assert status["state"] == "Failed" and status["counts"]["failed"] == 3 and status["counts"]["total"] == 3
    assert all("PermanentFailure" in t["message"] for t in status["trials"])
    assert len(searches.jobs("broken")) == 3
    assert any(e["type"] == "Warning" and e["reason"] == "TrialFailed" for e in searches.events("broken"))


def test_a_preempted_trial_restarts_and_is_not_a_failure(
    searches: Searches, search_operator: OperatorProcess, cluster: Cluster
) -> None:
    spec = {
        "algorithm": "Random",
        "maxTrials": 2,
        "parallelTrials": 2,
        "maxFailedTrials": 0,
        "trialTemplate": kwok_template(),
        "parameters": [{**LR, "min": 1e-4, "max": 1e-2}],
    }
    searches.create("pre", spec)
    evicted: set[str] = set()

    def outcome(values: dict[str, Any]) -> dict[str, str]:
        # The first pod of trial 0 is evicted (a preemption); every other pod trains to the end.
        if not evicted and values == searches.status("pre")["trials"][0]["parameters"]:
            evicted.add("pre-000")
            return {"llmop.io/kwok-evict-after": "1s"}
        return finishes(after="2s")

    Outcomes(searches, "pre", outcome).until("Succeeded")
    status = searches.status("pre")
    assert evicted and status["trials"][0]["preemptions"] == 1 and status["trials"][0]["state"] == "Succeeded"
    assert status["counts"]["failed"] == 0


def _worker_pods(searches: Searches) -> dict[str, dict[str, Any]]:
    """Each trial's worker pod (one node, one attempt here), by its job's name."""
    items = searches.cluster.kubectl_json("get", "pods", "-n", searches.ns, "-l", "llmop.io/role=worker")
    return {p["metadata"]["labels"]["llmop.io/job-name"]: p for p in items["items"]}


def _phase(pods: dict[str, dict[str, Any]], job: str) -> str | None:
    return pods[job]["status"].get("phase") if job in pods else None


def _finish(searches: Searches, trials: list[dict[str, Any]]) -> None:
    """Let these trials' workers end after 1s, reporting bowl(their parameters)."""
    for trial in trials:
        pairs = [f"{k}={v}" for k, v in bowl(trial["parameters"], after="1s").items()]
        pod = f"{trial['name']}-worker-0"
        searches.cluster.kubectl("annotate", "pod", pod, "-n", searches.ns, "--overwrite", *pairs)


def _kill_in_both_gaps(
    searches: Searches, op: OperatorProcess, jobs: int
) -> tuple[list[dict[str, Any]], list[str]]:
    """With ``jobs`` trial jobs allowed (the quota "hold", set by the caller) and 3 trials running:
    end one, SIGKILL once its successor is recorded and refused, end the other two while the
    operator is down, restart, and lift the quota once their results are in. Returns the trials recorded without a job at the kill and
    the trials that ended while it was down."""
    cluster, ns = searches.cluster, searches.ns

    def three_running() -> list[dict[str, Any]] | None:
        trials, pods = searches.status("crash").get("trials", []), _worker_pods(searches)
        running = [t for t in trials if _phase(pods, t["name"]) == "Running"]
        return running if len(trials) == jobs and len(running) == 3 else None

    running = wait_for(three_running, timeout=90, what=f"{jobs} trials recorded, 3 of them running")
    logged = len(op.full_log())
    _finish(searches, running[:1])

    def recorded_but_refused() -> list[dict[str, Any]] | None:
        existing = {j["metadata"]["name"] for j in searches.jobs("crash")}
        unborn = [t for t in searches.status("crash").get("trials", []) if t["name"] not in existing]
        log = op.full_log()[logged:]
        # (The operator logs the apiserver's answer as JSON: the quotes around the name are escaped.)
        refused = all(re.search(rf'{t["name"]}\\?" is forbidden: exceeded quota', log) for t in unborn)
        return unborn if unborn and refused else None

    unborn = wait_for(recorded_but_refused, timeout=60, what="a trial recorded whose job was refused")
    op.kill()
    _finish(searches, running[1:])
    ended = [t["name"] for t in running[1:]]
    wait_for(
        lambda: all(_phase(_worker_pods(searches), n) == "Succeeded" for n in ended),
        timeout=60,
        what=f"{ended} to end while the operator is down",
    )
    trials = {t["name"]: t for t in searches.status("crash")["trials"]}
    assert all(trials[n]["state"] in ("Pending", "Running") for n in ended), (
        "no operator recorded their end yet"
    )
    op.start()

    def ends_recorded() -> bool:
        trials = {t["name"]: t for t in searches.status("crash")["trials"]}
        return all(trials[n]["state"] == "Succeeded" for n in ended)

    wait_for(ends_recorded, timeout=60, what=f"the restarted operator to record {ended}")
    # Only now may the recorded trial's job be created: the results have changed since it was
    # recorded, so values drawn again would differ from the recorded ones.
    assert not {t["name"] for t in unborn} & {j["metadata"]["name"] for j in searches.jobs("crash")}
    cluster.kubectl("delete", "resourcequota", "hold", "-n", ns)
    for trial in unborn:
        job = wait_for(
            lambda t=trial: next(
                (j for j in searches.jobs("crash") if j["metadata"]["name"] == t["name"]), None
            ),
            timeout=60,
            what=f"{trial['name']} created after the restart",
        )
        values = json.loads(job["metadata"]["annotations"]["llmop.io/trial-parameters"])
        assert values == trial["parameters"], "created with the values recorded before the kill"
    return unborn, ended


def test_sigkilled_operator_neither_duplicates_nor_loses_trials(
    searches: Searches, search_operator: OperatorProcess
) -> None:
    """Each SIGKILL lands in both of a search's gaps, held there by the test: a trial recorded in
    status whose job does not exist yet (a quota on LLMTrainingJobs refuses it), and trials whose
    workers end while no operator runs (their results reach status only after the restart).
    TPE's suggestions after its 3 random start-up trials depend on the results so far, so a
    restarted operator that drew a recorded trial again would give it other values."""
    spec = {
        "algorithm": "TPE",
        "seed": 3,
        "randomStartupTrials": 3,
        "maxTrials": 6,
        "parallelTrials": 3,
        "trialTemplate": kwok_template(),  # workers run until _finish scripts their end
        "parameters": [{**LR, "min": 1e-5, "max": 1.0}],
    }
    # The quota is counted before the first trial exists. Set while trials are being created, it
    # raced their creates: refused ones ("status unknown for quota", retried since), and a count
    # taken between creates that let the 4th trial's job through, so no refusal to kill in.
    searches.cluster.set_quota(searches.ns, "hold", {"count/llmtrainingjobs.llmop.io": "3"})
    searches.create("crash", spec)
    # One kill: after it the quota is held until the results are in, and the operator then waits
    # 15 s before it retries a refused create; more kills would only repeat the same two gaps.
    kills = [_kill_in_both_gaps(searches, search_operator, jobs=3)]
    print(
        "SIGKILLs (recorded without a job; ended while down):",
        [([t["name"] for t in u], e) for u, e in kills],
    )
    assert [(len(unborn), len(ended)) for unborn, ended in kills] == [(1, 2)]

    def finish_the_rest() -> dict[str, Any] | None:
        trials, pods = searches.status("crash").get("trials", []), _worker_pods(searches)
        todo = [
            t
            for t in trials
            if _phase(pods, t["name"]) == "Running"
            and EXIT_AFTER not in (pods[t["name"]]["metadata"].get("annotations") or {})
        ]
        _finish(searches, todo)
        c = searches.condition("crash", "Succeeded")
        return c if c and c["status"] == "True" else None

    wait_for(finish_the_rest, timeout=120, interval=0.5, what="crash Succeeded")
    status = searches.status("crash")
    trials, jobs = status["trials"], searches.jobs("crash")
    assert [t["index"] for t in trials] == list(range(6))
    assert [j["metadata"]["name"] for j in jobs] == [f"crash-{i:03d}" for i in range(6)], "one job per trial"
    for trial, job in zip(trials, jobs, strict=True):
        assert json.loads(job["metadata"]["annotations"]["llmop.io/trial-parameters"]) == trial["parameters"]
        message = bowl(trial["parameters"])[MESSAGE]
        # The value as the operator reads it from the worker's termination message ...
        reported = final_figures(message).progress["validationLoss"]
        assert abs(reported - json.loads(message)["validationLoss"]) < 1e-4
        # ... reached the trial: no result went missing across the kills.
        assert trial["state"] == "Succeeded" and trial["value"] == reported, trial
    assert status["bestTrial"]["value"] == min(t["value"] for t in trials)


def test_a_search_whose_trials_could_not_be_valid_fails_without_trials(
    searches: Searches, search_operator: OperatorProcess
) -> None:
    # Admitted (the apiserver cannot apply 512 to the template) but sequenceLength 512 exceeds the
    # template's contextLength 256: no trial could run at that end of the range.
    seq = {"name": "seq", "path": "training.sequenceLength", "type": "Int", "min": 64, "max": 512}
    searches.create("never", {"trialTemplate": kwok_template(), "parameters": [seq]})
    failed = searches.wait_condition("never", "Failed", timeout=60)
    assert failed["reason"] == "InvalidSpec" and "training.sequenceLength=512" in failed["message"]
    assert searches.jobs("never") == [] and searches.status("never")["state"] == "Failed"


def test_a_trial_recorded_but_not_yet_created_is_created_with_its_recorded_values(
    searches: Searches, search_operator: OperatorProcess, cluster: Cluster
) -> None:
    # The state an operator killed between writing status and creating the job leaves behind
    # (hard to hit by timing a SIGKILL, so it is written here directly).
    search_operator.kill()
    spec = {
        "algorithm": "TPE",
        "maxTrials": 3,
        "trialTemplate": kwok_template(**finishes(after="1s")),
        "parameters": [{**LR, "min": 1e-5, "max": 1.0}],
    }
    searches.create("gap", spec)
    recorded = {
        "index": 0,
        "name": "gap-000",
        "parameters": {"lr": 0.0123},
        "state": "Pending",
        "startTime": "2026-11-24T08:00:00Z",
    }
    patch = json.dumps({"status": {"trials": [recorded]}})
    cluster.kubectl(
        "patch", "llmsearch", "gap", "-n", searches.ns, "--subresource=status", "--type=merge", "-p", patch
    )
    search_operator.start()
    searches.wait_condition("gap", "Succeeded", timeout=120)
    jobs = searches.jobs("gap")
    assert [j["metadata"]["name"] for j in jobs] == ["gap-000", "gap-001", "gap-002"]
    assert jobs[0]["spec"]["training"]["optimizer"]["learningRate"] == 0.0123, (
        "the recorded values, not new ones"
    )
    assert searches.status("gap")["trials"][0]["parameters"] == {"lr": 0.0123}


def test_compress_best_trains_the_best_values_again_with_compression(
    searches: Searches, search_operator: OperatorProcess
) -> None:
    template = kwok_template(**finishes(after="1s"))
    template["compression"] = {"quantization": [{"method": "Int8WeightOnly"}]}
    spec = {
        "algorithm": "Grid",
        "compressBest": True,
        "trialTemplate": template,
        "parameters": [
            {"name": "layers", "path": "model.numLayers", "type": "Categorical", "choices": ["2", "4"]}
        ],
    }
    searches.create("cb", spec)
    searches.wait_condition("cb", "Succeeded", timeout=180)
    status = searches.status("cb")
    jobs = {j["metadata"]["name"]: j for j in searches.jobs("cb")}
    assert set(jobs) == {"cb-000", "cb-001", "cb-best"}
    assert all("compression" not in jobs[f"cb-00{i}"]["spec"] for i in range(2)), "trials only train"
    best = jobs["cb-best"]
    assert best["metadata"]["labels"]["llmop.io/search-role"] == "best"
    assert best["spec"]["compression"]["quantization"] == [{"method": "Int8WeightOnly"}]
    assert best["spec"]["model"]["numLayers"] == status["bestTrial"]["parameters"]["layers"]
    assert status["bestJob"] == {"name": "cb-best", "state": "Succeeded"}
