"""Load-time model and placement (pure functions; see docs/placement.md).

    place(request, nodes, calibration) -> Placement      where to start a new instance
    place_within(request, nodes, calibration, waited, bound)   the same, fair share taken in time
    place_by(placer, ...)                                the placer's choice: random or place_within
    place_random(request, nodes, pick)                   the no-locality ablation: any free node
    startup(request, node) -> Estimate                   the load-time model for one node
    choose_victims(instances, count)                     whom to remove on scale-down
    observe_load / observe_start / observe_stop / observe_migration   online calibration updates
"""

from sllm_knative.placement.calibration import (
    Calibration,
    LoadObservation,
    MigrationCost,
    MigrationObservation,
    ewma,
    fit_migration_cost,
    observe_load,
    observe_migration,
    observe_start,
    observe_stop,
)
from sllm_knative.placement.decide import (
    PLACERS,
    Action,
    Option,
    Placement,
    choose_victims,
    displaceable,
    place,
    place_by,
    place_random,
    place_within,
)
from sllm_knative.placement.model import (
    TIERS,
    Estimate,
    Instance,
    ModelRequest,
    NodeInventory,
    QueuedLoad,
    Tier,
    pool_store_rates,
    pool_tier_rates,
    startup,
    store_of,
)

__all__ = [
    "PLACERS",
    "TIERS",
    "Action",
    "Calibration",
    "Estimate",
    "Instance",
    "LoadObservation",
    "MigrationCost",
    "MigrationObservation",
    "ModelRequest",
    "NodeInventory",
    "Option",
    "Placement",
    "QueuedLoad",
    "Tier",
    "choose_victims",
    "displaceable",
    "ewma",
    "fit_migration_cost",
    "observe_load",
    "observe_migration",
    "observe_start",
    "observe_stop",
    "place",
    "place_by",
    "place_random",
    "place_within",
    "pool_store_rates",
    "pool_tier_rates",
    "startup",
    "store_of",
]
