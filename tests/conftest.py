"""Process-wide settings every test (and every process a test starts) needs."""

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "1")
# Ray waits 30 s for a new GCS to write its port; the first start on a cold, busy machine can take longer.
os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")
