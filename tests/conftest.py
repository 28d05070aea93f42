"""Session-wide test settings: no hub access (a hub name must fail at once), quiet telemetry, loopback Ray."""
import os

for name, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1",
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "DO_NOT_TRACK": "1"}.items():
    os.environ.setdefault(name, value)
