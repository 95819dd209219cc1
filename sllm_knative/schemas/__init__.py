"""Schemas shipped with the package.

`knative/` holds a subset of the Knative Serving files listed in `knative/PROVENANCE.txt`,
copied unmodified (Apache-2.0, see `knative/LICENSE`): `crds/service.yaml` (validates Knative
Services), `configmaps/autoscaler.yaml` and `configmaps/defaults.yaml` (their `_example`
blocks pin the code defaults in tests).
"""
