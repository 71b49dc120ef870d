"""Exit codes of ``llmtrain``, part of the pod contract the operator's restart policy relies on."""

OK = 0
BAD_CONFIG = 2  # the configuration is invalid; nothing was started (retrying cannot help)
PREEMPTED = 75  # EX_TEMPFAIL: SIGTERM received, checkpoint written; restart to resume
