"""Where an export's memory goes: built in the API process (as before the thin driver) vs as a Ray job of its
own on the cluster (service.exports.ClusterBuilder, what `ladle serve` does now).

A 90 %-pruned model (default torchvision:resnet50, ~100 MB of fp32 weights; random weights, the memory
does not depend on their values) is saved as Ladle stores it. Then, for each way and each format (sparse,
onnx), a fresh process that stands for an API process (it imports the API app, as `ladle serve` does, so
its baseline has what start-up loads) asks service.exports.ensure for the export and reports its own RSS
before, after and at its peak, and the peak RSS of the process that built the export (the API process
itself, or the export's Ray job). The Ray head (2 CPUs, loopback) is started and stopped here.

    .venv/bin/python bench/export_memory.py [--arch torchvision:resnet50] [--formats sparse onnx]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent


def save_checkpoint(arch: str, folder: Path) -> dict:
    """The pruned model saved as the pipeline saves it; its store record as a dict."""
    import torch

    from workers.checkpoint import save_model
    from workers.models import build_model
    from workers.pruning import full_masks, prune
    torch.manual_seed(0)
    shape = (3, 32, 32)
    model = build_model(arch, num_classes=10, in_shape=shape)
    r = prune(model, full_masks(model), 0.9, scope="global", criterion="magnitude", seed=0)
    meta = {"arch": arch, "num_classes": 10, "in_shape": list(shape), "model_kwargs": {}, "model_id": "bench"}
    saved = save_model(str(folder / f"{arch}.safetensors"), r.model, r.masks, meta)
    return {"uri": saved.uri, "size_bytes": saved.size_bytes, "sha256": saved.sha256,
            "parameters": sum(p.numel() for p in model.parameters())}


class Models:
    """The two calls of a store that service.exports.ensure makes, over one model record."""

    def __init__(self, model):
        self.model = model

    def get_model(self, model_id):
        return self.model

    def add_model_metrics(self, model_id, **values):
        self.model.metrics = {**self.model.metrics, **values}


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:")) / 1024


def child(args: argparse.Namespace) -> None:
    """One API process: its RSS around one export built `args.way`."""
    import service  # noqa: F401  Ray's environment first
    import api.app  # noqa: F401  what an API process has loaded at start-up (torch, for checking specs)
    from service import exports
    from service.dispatcher import artifacts_env
    from workers.process import peak_rss_bytes
    rec = json.loads(args.record)
    model = SimpleNamespace(id=f"bench-{args.way}-{args.format}", name="bench", metrics={}, **rec)
    builder = (exports.ClusterBuilder(lambda: args.jobs_api, artifacts_env()) if args.way == "cluster"
               else exports.InProcessBuilder())
    built = []
    build = builder.build
    builder.build = lambda *a: built.append(build(*a)) or built[-1]     # the builder's own figures
    before, peak_before = rss_mb(), peak_rss_bytes() / 2**20
    start = time.perf_counter()
    out = exports.ensure(Models(model), model, args.format, {"model": {"arch": rec["arch"]}}, builder, wait=600)
    seconds = time.perf_counter() - start
    print(json.dumps({"before_mb": before, "peak_before_mb": peak_before, "after_mb": rss_mb(),
                      "peak_mb": peak_rss_bytes() / 2**20, "seconds": seconds,
                      "bytes": out.size_bytes, "built_peak_mb": built[0].peak_rss_bytes / 2**20}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="torchvision:resnet50")
    ap.add_argument("--formats", nargs="+", default=["sparse", "onnx"])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--way", choices=["api", "cluster"], help=argparse.SUPPRESS)
    ap.add_argument("--format", help=argparse.SUPPRESS)
    ap.add_argument("--record", help=argparse.SUPPRESS)
    ap.add_argument("--jobs-api", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    import service  # noqa: F401
    from rich.console import Console
    from rich.table import Table

    from service.cluster import LocalRay
    console = Console()
    rows = []
    with tempfile.TemporaryDirectory(prefix="ladle-bench-export-") as tmp:
        rec = dict(save_checkpoint(args.arch, Path(tmp)), arch=args.arch)
        console.print(f"{args.arch}: {rec['parameters'] / 1e6:.1f} M parameters, checkpoint "
                      f"{rec['size_bytes'] / 2**20:.0f} MB (90 % pruned)")
        with LocalRay(num_cpus=2) as head:
            for fmt in args.formats:
                for way in ("api", "cluster"):
                    for p in Path(tmp).glob("*.safetensors.*"):     # each way builds its export anew
                        p.unlink()
                    out = subprocess.run([sys.executable, __file__, "--child", "--way", way, "--format", fmt,
                                          "--record", json.dumps(rec), "--jobs-api", head.dashboard_url],
                                         cwd=ROOT, capture_output=True, text=True)
                    if out.returncode != 0:
                        console.print(out.stderr[-3000:])
                        raise SystemExit(f"the {way} run of the {fmt} export failed")
                    got = json.loads(out.stdout.strip().splitlines()[-1])
                    rows.append((fmt, way, got))
                    console.print(f"  {fmt:6} {way:8} done in {got['seconds']:.1f} s", highlight=False)
    table = Table(title=f"The API process's memory for one export of {args.arch} (MB; this machine, 2 CPUs)")
    for c in ("format", "built in", "API RSS before", "after", "API peak before", "after ", "builder's peak",
              "seconds"):
        table.add_column(c, justify="left" if c in ("format", "built in") else "right")
    for fmt, way, g in rows:
        table.add_row(fmt, "the API process" if way == "api" else "its own Ray job", f"{g['before_mb']:.0f}",
                      f"{g['after_mb']:.0f}", f"{g['peak_before_mb']:.0f}", f"{g['peak_mb']:.0f}",
                      f"{g['built_peak_mb']:.0f}", f"{g['seconds']:.1f}")
    console.print(table)


if __name__ == "__main__":
    main()
