"""LLMHyperparameterSearch: trials as child LLMTrainingJobs, sampled and judged with Optuna.

The data flow mirrors the job controller's: ``handlers`` (Kopf) -> ``controller`` (one pass) ->
``planner`` (pure decision) -> ``builders`` (manifests); ``sampler`` and ``stopping`` rebuild an
in-memory Optuna study from the search's status on every decision.
"""
