"""Create the bucket of LADLE_ARTIFACTS (s3://bucket/prefix) when it is missing; idempotent.

Run once when a deployment starts (docker compose's `bucket` service, the KubeRay dev Job), with the
same environment as the API: LADLE_ARTIFACTS and the standard AWS_* variables (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) that s3fs reads, so wrong credentials or a wrong endpoint
fail here, at start, and not in the middle of the first job.

    python deploy/create_bucket.py            # or: python deploy/create_bucket.py s3://bucket/prefix
"""

from __future__ import annotations

import sys
import time

import fsspec

from service.settings import Settings


def ensure_bucket(url: str, *, wait: float = 60.0) -> str:
    """Make the bucket of an s3:// URL (waiting up to `wait` s for the server); return its name."""
    if not url.startswith("s3://"):
        raise SystemExit(f"create_bucket: {url} is not an s3:// URL; nothing to create")
    fs, path = fsspec.core.url_to_fs(url)
    bucket = path.split("/", 1)[0]
    deadline = time.monotonic() + wait
    while True:
        try:
            if not fs.exists(bucket):
                fs.mkdir(bucket)
            return bucket
        except PermissionError as e:  # wrong keys: waiting does not help
            raise SystemExit(f"create_bucket: access to bucket {bucket!r} denied: {e}") from None
        except OSError as e:          # the object store is still starting (connection refused, ...)
            if time.monotonic() > deadline:
                raise SystemExit(f"create_bucket: cannot create bucket {bucket!r}: {e}") from None
            time.sleep(1)
            fs.invalidate_cache()


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else Settings().artifacts
    print(f"bucket {ensure_bucket(target)} is ready for {target}")
