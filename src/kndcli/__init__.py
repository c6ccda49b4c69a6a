"""knd: speech emotion recognition from raw audio to a monitored cloud service."""

import os
from importlib.metadata import PackageNotFoundError, version

# gcsfs probes for hierarchical-namespace buckets on every call unless told not to; against
# the GCS emulator each probe stalls for a minute. knd uses no HNS feature, so opt out
# before anything can import gcsfs (it reads the variable at import time).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

try:
    __version__ = version("kndcli")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
