"""Is the Hugging Face Hub reachable? Asked once up front so that offline machines fall back
at once instead of sitting through transformers' and datasets' retry loops."""
from __future__ import annotations

import os
import socket

HUB_HOST = "huggingface.co"


def hub_reachable(*, timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False
