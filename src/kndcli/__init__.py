"""knd: speech emotion recognition from raw audio to a monitored cloud service."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kndcli")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
