import os

# Every Ray process stays on loopback on this machine (see README, "Running here").
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
