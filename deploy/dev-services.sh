#!/usr/bin/env bash
# The local services the test suite talks to, on a Debian machine: PostgreSQL on 127.0.0.1:5432
# (user postgres, trust auth on loopback). Installs it with apt-get when missing (as root) and
# starts it when it is not running. Does nothing on a machine where it already answers.
set -euo pipefail

if pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
  exit 0
fi
if ! command -v pg_ctlcluster >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ]; then
    echo "PostgreSQL is not installed and this is not root: install it (apt-get install postgresql) or set LADLE_SKIP_POSTGRES=1" >&2
    exit 1
  fi
  echo "installing PostgreSQL (apt-get) ..."
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  hba=/etc/postgresql/$version/main/pg_hba.conf
  # tests connect as postgres over TCP on loopback without a password
  sed -i '/^host\s\+all\s\+all\s\+127.0.0.1\/32/d' "$hba"
  sed -i '1i host all all 127.0.0.1/32 trust' "$hba"
fi
version=$(ls /etc/postgresql | sort -V | tail -n 1)
pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
for _ in $(seq 1 30); do
  pg_isready -h 127.0.0.1 -p 5432 -q && exit 0
  sleep 1
done
echo "PostgreSQL did not come up on 127.0.0.1:5432" >&2
exit 1
