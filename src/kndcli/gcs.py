"""One way to reach gs:// from the torch-free paths (prediction log, archive scoring)."""

from __future__ import annotations

import logging
import os
from typing import Any

from kndcli.errors import KndError


def gcs_filesystem(what: str) -> Any:
    """gcsfs, anonymous against an emulator (STORAGE_EMULATOR_HOST) so no credential probing.

    `what` names the feature that needs it, for the error when gcsfs is not installed.
    """
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    try:
        import gcsfs
    except ImportError:
        raise KndError(f"{what} needs gcsfs: install kndcli[cloud]") from None
    # gcsfs logs a traceback for each read it gives up on; knd reports those errors
    # itself, in one line per file or one line that stops the run.
    logging.getLogger("gcsfs").setLevel(logging.CRITICAL)
    emulator = os.environ.get("STORAGE_EMULATOR_HOST", "")
    kwargs: dict[str, Any] = {"skip_instance_cache": True}
    if emulator and emulator != "default":
        kwargs["token"] = "anon"  # the emulator takes no credentials
    return gcsfs.GCSFileSystem(**kwargs)
