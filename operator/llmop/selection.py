"""compression.selection: which compressed model becomes the job's output."""

from __future__ import annotations

from llmop_contract.api.v1alpha1.lifecycle import Selection, SelectionObjective
from llmop_contract.api.v1alpha1.status import StageState, StageStatus


def select(rule: Selection, stages: list[StageStatus]) -> tuple[StageStatus | None, str]:
    """The best eligible stage entry (or None) and a sentence saying why.

    Eligible: succeeded, reported its figures, and perplexity rose by at most the rule's budget.
    Smallest ranks by size on disk, Fastest by generation tokens/s; ties go to the earlier stage.
    """
    budget = rule.max_perplexity_increase_percent
    eligible = []
    for s in stages:
        r = s.results
        if s.state != StageState.SUCCEEDED or "perplexityIncreasePercent" not in r:
            continue
        if r["perplexityIncreasePercent"] <= budget:
            eligible.append(s)
    if not eligible:
        return (
            None,
            f"no compressed model kept perplexity within +{budget}%; the trained model stays the output",
        )
    if rule.objective == SelectionObjective.SMALLEST:
        ranked = [s for s in eligible if "sizeBytes" in s.results]
        pick = min(ranked, key=lambda s: s.results["sizeBytes"], default=None)
        what = "smallest"
    else:
        ranked = [s for s in eligible if "tokensPerSecond" in s.results]
        pick = max(ranked, key=lambda s: s.results["tokensPerSecond"], default=None)
        what = "fastest"
    if pick is None:
        return None, "the eligible stages did not report the figure the rule ranks by"
    r = pick.results
    return pick, (
        f"{pick.name} is the {what} of {len(eligible)} eligible results "
        f"(perplexity {r['perplexityIncreasePercent']:+.2f}%, budget +{budget}%)"
    )
