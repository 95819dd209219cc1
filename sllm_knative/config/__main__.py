"""`python -m sllm_knative.config crds DIRECTORY`: render the CRDs into DIRECTORY (manifests/crds)."""

from __future__ import annotations

import sys
from pathlib import Path

from sllm_knative.config.crds import write


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "crds":
        print("usage: python -m sllm_knative.config crds DIRECTORY", file=sys.stderr)
        return 2
    for path in write(Path(args[1])):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
