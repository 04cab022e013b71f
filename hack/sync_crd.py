"""Copy the operator's CRD (deploy/crds/, generated from the models) into the chart, byte for byte.

The chart's templates/crds.yaml reads charts/dgemma/files/crds/; never edit that copy by hand.
Usage: python hack/sync_crd.py [--check]
"""

from __future__ import annotations

import pathlib
import sys

from _files import ROOT, write_or_check

SOURCE = ROOT / "deploy" / "crds" / "dgemma.io_diffusiongemmas.yaml"
COPY = ROOT / "charts" / "dgemma" / "files" / "crds" / "dgemma.io_diffusiongemmas.yaml"


def outputs() -> dict[pathlib.Path, str]:
    """The chart's copy must hold exactly the operator's CRD text."""
    return {COPY: SOURCE.read_text()}


if __name__ == "__main__":
    sys.exit(write_or_check(outputs()))
