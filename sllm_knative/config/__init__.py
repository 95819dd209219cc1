"""The one configuration model: the YAML a Knative user writes, parsed into typed values.

    parse_service(doc) -> ServiceConfig              serving.knative.dev/v1 Service (+ annotations)
    parse_scaling_policy(doc) -> ScalingPolicy       serving.sllm-knative.io/v1alpha1 ScalingPolicy
    parse_node_cache(doc) -> NodeCache               serving.sllm-knative.io/v1alpha1 NodeCache
    parse_autoscaler_config(data) -> AutoscalerConfig   Knative's config-autoscaler ConfigMap
    parse_manifest(text) / load_manifest(*paths) -> Manifest   multi-document YAML files

Every parser validates at the boundary and raises `ConfigError` (a ValueError) listing each
problem with its path. See docs/configuration.md.
"""

from sllm_knative.config.autoscaler import (
    HPA_CLASS,
    KPA_CLASS,
    RECHECK_LATE_S,
    SLLM_CLASS,
    TICK_S,
    AutoscalerConfig,
    panic_window,
    parse_autoscaler_config,
)
from sllm_knative.config.documents import Manifest, load_manifest, load_yaml, parse_manifest
from sllm_knative.config.errors import ConfigError, FieldError, format_path
from sllm_knative.config.model_uri import ModelURI, parse_model_uri
from sllm_knative.config.nodecache import (
    CachedCheckpoint,
    NodeCache,
    TierStatus,
    node_cache_document,
    parse_node_cache,
)
from sllm_knative.config.policy import (
    LabelRequirement,
    LabelSelector,
    ScalingPolicy,
    matching_policies,
    parse_scaling_policy,
    policy_for,
)
from sllm_knative.config.service import (
    MODEL_ANNOTATION,
    Autoscaling,
    Container,
    EnvVar,
    Resources,
    ServiceConfig,
    parse_service,
)

__all__ = [
    "HPA_CLASS",
    "KPA_CLASS",
    "MODEL_ANNOTATION",
    "SLLM_CLASS",
    "RECHECK_LATE_S",
    "TICK_S",
    "AutoscalerConfig",
    "Autoscaling",
    "CachedCheckpoint",
    "ConfigError",
    "Container",
    "EnvVar",
    "FieldError",
    "LabelRequirement",
    "LabelSelector",
    "Manifest",
    "ModelURI",
    "NodeCache",
    "Resources",
    "ScalingPolicy",
    "ServiceConfig",
    "TierStatus",
    "format_path",
    "load_manifest",
    "load_yaml",
    "matching_policies",
    "node_cache_document",
    "panic_window",
    "parse_autoscaler_config",
    "parse_manifest",
    "parse_model_uri",
    "parse_node_cache",
    "parse_scaling_policy",
    "parse_service",
    "policy_for",
]
