"""The activator as Knative's activator (`python -m activator --kube`): it takes the place of
Knative's own behind the Service `activator-service` in `knative-serving`.

    contract.py   Knative's activator contract as constants and pure functions (ports, probes,
                  revision headers, the rewritten request), each with its knative/serving source
    endpoints.py  a revision's class, protocol and ready pods, from its objects (pure)
    source.py     the informers (Revisions, PodAutoscalers, EndpointSlices) that fill the registry
    handlers.py   the request layers of Kubernetes mode (probes, revision lookup, Knative stats)
    kpa.py        demand of Knative's classes to Knative's autoscaler (websocket, stat.proto)
"""
