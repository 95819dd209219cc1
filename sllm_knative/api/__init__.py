"""Types shared by the processes (activator, autoscaler) and the library, with no process code.

    MigrationOutcome     what became of one generation a migration moved (the activator's answer)
"""

from sllm_knative.api.migration import MigrationOutcome

__all__ = ["MigrationOutcome"]
