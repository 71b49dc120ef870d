"""`llmop dev runtime`: a development kubelet that runs pods as local processes.

It plays the kubelet for the nodes labelled ``llmop.io/local-runtime: "true"`` (kwok leaves them
alone): every container of a pod bound to one of them runs as a local process in this project's
environment (the image is recorded, never pulled), inside its own mount and UTS namespaces so its
volumes sit at their mountPaths and its hostname is the pod's. Each pod gets its own IP in
127.2.0.0/16; listeners bind it, so pods never collide on ports. This is a development runtime: it
ignores securityContext and resource limits. Production runs on a real cluster.

Modules, one job each: ``api`` (apiserver calls), ``nodes`` (registration, heartbeats), ``ipam``
(pod IPs), ``envvars`` (container environment), ``volumes`` (volume directories), ``hosts``
(/etc/hosts), ``sandbox`` (the namespaced process), ``podstatus`` (status documents), ``kubelet``
(the sync loop), ``logs`` (`llmop logs`), ``main`` (the command).
"""
