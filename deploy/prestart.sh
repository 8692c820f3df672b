#!/usr/bin/env bash
# Runs before the API server in a deployment (docker compose, Kubernetes), then execs its arguments:
#
#   deploy/prestart.sh ladle serve --host 0.0.0.0
#
# It waits up to a minute for the database (LADLE_DATABASE_URL) to accept connections, then migrates
# it to the newest schema: `alembic upgrade head` (service.db.migrate, under a PostgreSQL advisory
# lock, so replicas starting together take turns). Ray drivers never migrate; after this they find
# the tables. LADLE_ADMIN_TOKEN, when set, is stored by `ladle serve` itself as the admin token.
set -euo pipefail

python - <<'PY'
import sys, time

import sqlalchemy as sa

from service.db import make_engine, migrate
from service.settings import get_settings

engine = make_engine(get_settings().database_url)
deadline = time.monotonic() + 60
while True:
    try:
        with engine.connect():
            break
    except sa.exc.OperationalError as e:
        if time.monotonic() > deadline:
            sys.exit(f"prestart: the database does not answer: {e.orig}")
        time.sleep(1)
migrate(engine)
engine.dispose()
print("prestart: database migrated", file=sys.stderr)
PY

exec "$@"
