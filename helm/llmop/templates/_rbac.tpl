{{/*
The operator's API rights, in two parts so the namespace-scoped mode can grant the first per
namespace. tests/helm/test_rbac.py derives what the operator really calls from the apiserver's audit
log during a job's lifecycle and fails if a rule here grants more (beyond a short, commented list of
rules for features that run did not exercise). No wildcards, no secrets, no pods/exec, no RBAC.
*/}}

{{- define "llmop.rbac.namespacedRules" -}}
# LLMTrainingJobs: Kopf watches them and patches only metadata (its finalizer and handler-progress
# annotations, never spec); the daemon writes status through /status; a finished job with
# ttlSecondsAfterFinished is deleted. create: an LLMHyperparameterSearch creates its trial jobs.
# get: a trial's create met a job of its name (409), whose owner is read before anything else.
- apiGroups: [llmop.io]
  resources: [llmtrainingjobs]
  verbs: [list, watch, get, patch, delete, create]
- apiGroups: [llmop.io]
  resources: [llmtrainingjobs/status]
  verbs: [patch]
# LLMHyperparameterSearch (issue 7): watched like a job, its own status, Kopf's finalizer.
- apiGroups: [llmop.io]
  resources: [llmhyperparametersearches]
  verbs: [list, watch, patch]
- apiGroups: [llmop.io]
  resources: [llmhyperparametersearches/status]
  verbs: [patch]
# Worker pods: indexed (list/watch; the placement check also counts every pod's requests), created
# per attempt, deleted on gang restarts, patched to lift the llmop.io/gang scheduling gate; get
# re-reads a pod whose gate list changed under the patch.
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch, get, create, patch, delete]
# Per-job children: the trainer's ServiceAccount (bound to nothing), its config, the storage claim.
# get and delete: a create that meets an object of the same name (409) reads its owner, and removes
# it when it is a leftover of an earlier job of this name (kube.py; never adopted).
- apiGroups: [""]
  resources: [serviceaccounts, configmaps, persistentvolumeclaims]
  verbs: [get, create, delete]
# Services: the gang's headless Service (create); the serving Service, read before it is
# server-side applied (an apply would take over a namesake) and deleted when serving is switched off.
- apiGroups: [""]
  resources: [services]
  verbs: [get, create, patch, delete]
# Serving: the model server Deployment, indexed for its readiness, read and then server-side applied
# (an apply that creates the object is authorised as create), deleted when serving is switched off.
- apiGroups: [apps]
  resources: [deployments]
  verbs: [list, watch, get, create, patch, delete]
# Serving through KServe (spec.serving.kserve): the InferenceService, read for its URL and readiness.
- apiGroups: [serving.kserve.io]
  resources: [inferenceservices]
  verbs: [get, create, patch, delete]
# Kubernetes Events on the jobs and searches (condition transitions, restarts), posted by the operator.
- apiGroups: [""]
  resources: [events]
  verbs: [create]
# batch Jobs: data preparation and one per compression method; deleted when a stage is redone.
- apiGroups: [batch]
  resources: [jobs]
  verbs: [list, watch, get, create, delete]
# Gang scheduling PodGroups (spec.scheduling.gangScheduler: Coscheduling / Volcano).
- apiGroups: [scheduling.x-k8s.io, scheduling.volcano.sh]
  resources: [podgroups]
  verbs: [get, create, delete]
# Kueue (spec.scheduling.queueName): the Workload of a gang attempt that is over (restart, failure,
# deletion of the job), which Kueue would otherwise keep admitted with its pods Terminating.
- apiGroups: [kueue.x-k8s.io]
  resources: [workloads]
  verbs: [delete]
{{- end }}

{{- define "llmop.rbac.clusterRules" -}}
# Nodes: the all-or-nothing placement check reads every node's allocatable resources and taints.
- apiGroups: [""]
  resources: [nodes]
  verbs: [list, watch]
{{- end }}
