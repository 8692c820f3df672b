"""The entrypoint of an export's Ray job (service.exports.ClusterBuilder submits it with the model's
resources): ``python -m service.export_job '<workers.units.Export as JSON>'``. It builds the export in
this process, on the node Ray chose, and prints its outcome as the last line of its log
(service.exports.outcome_line), which the API reads; it exits 1 when the build failed."""

from __future__ import annotations

import json
import sys

from service.exports import ExportRefused, ExportUnavailable, SourceDamaged, outcome_line, run_here
from workers.units import Export


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    step = Export(**json.loads(args[0]))
    try:
        out = run_here(step)
    except (ExportRefused, ExportUnavailable, SourceDamaged) as e:
        print(outcome_line(e), flush=True)
        return 1
    print(outcome_line(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
