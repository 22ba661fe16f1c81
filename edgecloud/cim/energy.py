"""Event counts -> joules per component.

The table (``energy_table.yaml``) holds one constant per event, each with its source. ADC
events are named ``adc_conversion_<B>b`` and priced from the figure of merit as FoM * 2^B, so
any resolution works without a row per bit width.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import yaml

from edgecloud.cim.events import EventLog

_ADC = re.compile(r"^adc_conversion_(\d+)b$")
_DAC = re.compile(r"^dac_row_cycle_(\d+)b$")
_WL_DAC = re.compile(r"^sram_wl_dac_(\d+)b$")


@dataclass(frozen=True)
class EnergyTable:
    joules: dict[str, float]
    sources: dict[str, str]
    technology: str = ""

    @classmethod
    def load(cls, path: str | Path | None = None) -> "EnergyTable":
        """The packaged table, or a user table with the same schema."""
        if path is None:
            text = resources.files("edgecloud.cim").joinpath("energy_table.yaml").read_text()
            where = "packaged energy_table.yaml"
        else:
            where = str(path)
            try:
                text = Path(path).read_text()
            except OSError as exc:
                raise FileNotFoundError(f"energy table {path}: {exc.strerror}") from exc
        data = yaml.safe_load(text) or {}
        events = data.get("events")
        if not isinstance(events, dict) or not events:
            raise ValueError(f"energy table {where}: needs a non-empty 'events' mapping")
        joules, sources = {}, {}
        for name, row in events.items():
            if not isinstance(row, dict) or "joules" not in row or "source" not in row:
                raise ValueError(f"energy table {where}: event {name!r} needs 'joules' and 'source'")
            value = float(row["joules"])
            if value < 0:
                raise ValueError(f"energy table {where}: event {name!r} has negative energy")
            joules[name], sources[name] = value, str(row["source"])
        return cls(joules, sources, str(data.get("technology", "")))

    def per_event(self, event: str) -> float:
        if event in self.joules:
            return self.joules[event]
        m = _ADC.match(event)
        if m and "adc_fom_per_step" in self.joules:
            return self.joules["adc_fom_per_step"] * 2 ** int(m.group(1))
        m = _DAC.match(event)
        if m and "dac_row_cycle_1b" in self.joules:
            return self.joules["dac_row_cycle_1b"] * 2 ** (int(m.group(1)) - 1)
        m = _WL_DAC.match(event)
        if m and "sram_wl_dac_1b" in self.joules:  # SRAM word-line DAC, x2 per bit like the MNSIM table
            return self.joules["sram_wl_dac_1b"] * 2 ** (int(m.group(1)) - 1)
        m = re.match(r"^mac_int(\d+)$", event)
        if m:  # an integer width with no row: price it as the next wider row that exists
            bits = int(m.group(1))
            widths = sorted(int(k[7:]) for k in self.joules if re.match(r"^mac_int\d+$", k))
            wider = [w for w in widths if w >= bits]
            if wider:
                return self.joules[f"mac_int{wider[0]}"]
        raise KeyError(f"energy table has no constant for event {event!r}")


class EnergyMeter:
    """Turns an :class:`EventLog` into joules per sample, per component."""

    def __init__(self, table: EnergyTable | None = None) -> None:
        self.table = table or EnergyTable.load()

    def per_component(self, log: EventLog) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for (component, event), counts in log.counts.items():
            joules = counts * self.table.per_event(event)
            out[component] = out.get(component, 0) + joules
        return out

    def per_sample(self, log: EventLog) -> np.ndarray:
        total = np.zeros(log.batch_size, dtype=np.float64)
        for joules in self.per_component(log).values():
            total += joules
        return total
