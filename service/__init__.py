"""Ladle's orchestration and persistence layer."""

import os

# Ray reads these when it is imported. Embedded and test clusters stay on loopback, and Ray 2.60's
# token auth is used by our Jobs API clients; a deployment overrides either through the environment.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "token")
# Tune's console reporter (experiment tables) would fill the driver's log: `verbose=0` silences the
# classic reporter only
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
