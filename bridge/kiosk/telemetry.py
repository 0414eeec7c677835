"""Plausible kiosk telemetry that drifts over time, for the fleet simulator.

Kiosks are mostly plugged in: batteries charge to ~95 % and then drain slowly until the
charger kicks in again; Wi-Fi signal wanders around a per-site level; the SoC warms up
with the screen on. Values stay inside the ``Status`` model's bounds.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

_URLS = (
    "https://signage.example/lobby",
    "https://signage.example/menu",
    "https://signage.example/wayfinding",
)


def _clamp(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))


@dataclass
class DriftingTelemetry:
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        rng = self.rng
        self.battery = rng.uniform(35.0, 100.0)
        self.charging = rng.random() < 0.6
        self.wifi_base = rng.uniform(-75.0, -45.0)
        self.wifi = self.wifi_base
        self.temp = rng.uniform(36.0, 46.0)
        self.screen_on = rng.random() < 0.95
        self.network_type = "ethernet" if rng.random() < 0.1 else "wifi"
        self.storage_total_mb = rng.choice((16_384, 32_768, 65_536))
        self.storage_available_mb = int(self.storage_total_mb * rng.uniform(0.2, 0.8))
        self.ram_total_mb = rng.choice((2_048, 3_072, 4_096))
        self.ram_used = self.ram_total_mb * rng.uniform(0.3, 0.6)
        self.current_url = rng.choice(_URLS)

    def step(self, dt_s: float) -> dict[str, Any]:
        """Advance ``dt_s`` seconds and return the current readings."""
        rng = self.rng
        minutes = dt_s / 60.0
        if self.charging:
            self.battery += 1.5 * minutes
            if self.battery >= 95.0:
                self.charging = False
        else:
            self.battery -= (0.6 if self.screen_on else 0.1) * minutes
            if self.battery <= 20.0:
                self.charging = True
        self.battery = _clamp(self.battery, 0.0, 100.0)
        # Mean-reverting walk: jitter around the site's level, no slow drift to -127.
        self.wifi += 0.3 * (self.wifi_base - self.wifi) + rng.gauss(0.0, 2.0)
        self.wifi = _clamp(self.wifi, -95.0, -30.0)
        target = 44.0 if self.screen_on else 33.0
        self.temp += 0.1 * (target - self.temp) + rng.gauss(0.0, 0.3)
        self.temp = _clamp(self.temp, 20.0, 90.0)
        # Screens go dark at night and for maintenance: a few times a day.
        if rng.random() < dt_s / 21_600:
            self.screen_on = not self.screen_on
        if self.network_type == "wifi" and rng.random() < dt_s / 86_400:
            self.network_type = "lte"
        elif self.network_type == "lte" and rng.random() < dt_s / 600:
            self.network_type = "wifi"
        self.ram_used = _clamp(
            self.ram_used + rng.gauss(0.0, 8.0), 0.2 * self.ram_total_mb, 0.95 * self.ram_total_mb
        )
        return {
            "battery_level": round(self.battery),
            "wifi_strength": round(self.wifi),
            "cpu_temp": round(self.temp, 1),
            "screen_on": self.screen_on,
            "network_type": self.network_type,
            "storage_available_mb": self.storage_available_mb,
            "storage_total_mb": self.storage_total_mb,
            "ram_usage_mb": round(self.ram_used),
            "ram_total_mb": self.ram_total_mb,
            "current_url": self.current_url,
        }
