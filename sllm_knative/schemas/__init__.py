"""Schemas shipped with the package.

`knative/` holds Knative Serving files listed in `knative/PROVENANCE.txt`, copied unmodified
(Apache-2.0, see `knative/LICENSE` and `knative/LICENSE.knative-networking`): all eight CRDs of
Serving and its networking layer (`crds/service.yaml` validates Knative Services; the test
control plane installs all of them), and the ConfigMaps `autoscaler`, `defaults`, `deployment`
and `features` (their `_example` blocks pin the code defaults in tests).
"""
