"""Shared test set-up: hubs are unreachable here, so everything runs offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
