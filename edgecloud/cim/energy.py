"""Event counts -> joules per component.

The table (``energy_table.yaml``) holds one constant per event, each with its source. ADC
events are named ``adc_conversion_<B>b`` and priced from the figure of merit, anchored at
:data:`ADC_REF_BITS` = 8 bits and scaled by the table's ADC law (:data:`ADC_LAWS`):
``E(B) = FoM * 2^8 * law(B, 8)``, so any resolution works without a row per bit width.
Laws: ``walden`` (x2 per bit, the default: ``E(B) = FoM * 2^B`` exactly, the Walden figure of
merit), ``schreier`` (x4 per bit, thermal-noise limited), ``linear`` (proportional to B). The law
is the table's top-level ``adc_law`` key (default walden), or :meth:`EnergyTable.with_adc_law`
(``edgecloud eval --adc-law``). An explicit ``adc_conversion_<B>b`` row in a table is used as it
is, whatever the law. The analytic cost model (:mod:`edgecloud.cim.cost`) uses the same laws
(this module defines them; ``edgecloud.cim.cost.ADC_LAWS`` is the same mapping).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

if TYPE_CHECKING:  # the cloud server prices events without importing torch (events.py needs it)
    from edgecloud.cim.events import EventLog

AdcLaw = Callable[[float, float], float]  # (bits, reference bits) -> factor relative to the reference

ADC_LAWS: dict[str, AdcLaw] = {
    "walden": lambda bits, ref: 2.0 ** (bits - ref),   # constant Walden FoM: x2 per bit
    "schreier": lambda bits, ref: 4.0 ** (bits - ref),  # thermal-noise limited: x4 per bit
    "linear": lambda bits, ref: bits / ref,             # proportional to bits
}
DEFAULT_ADC_LAW = "walden"
ADC_REF_BITS = 8  # the event meter's anchor: E(8 bits) = FoM * 2^8 under every law


def register_adc_law(name: str, law: AdcLaw) -> None:
    """Add a named ADC law: ``law(bits, ref_bits)`` is the energy and area factor versus the reference."""
    if not callable(law):
        raise TypeError(f"ADC law {name!r} must be callable (bits, ref_bits) -> factor")
    ADC_LAWS[name] = law


def adc_law(name: str) -> AdcLaw:
    """The law called ``name``; a ValueError naming the known laws otherwise."""
    try:
        return ADC_LAWS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown ADC law {name!r}; choose one of {sorted(ADC_LAWS)}") from None


_ADC = re.compile(r"^adc_conversion_(\d+)b$")
_DAC = re.compile(r"^dac_row_cycle_(\d+)b$")
_WL_DAC = re.compile(r"^sram_wl_dac_(\d+)b$")


def read_table(kind: str, packaged: str, path: str | Path | None) -> tuple[dict[str, Any], str]:
    """(top-level mapping, where it came from) of a packaged table of constants or a user's file;
    errors name the file (``kind``: "energy table", "cost table")."""
    if path is None:
        text = resources.files("edgecloud.cim").joinpath(packaged).read_text()
        where = f"packaged {packaged}"
    else:
        where = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise FileNotFoundError(f"{kind} {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{kind} {where}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{kind} {where}: the top level must be a mapping")
    return data, where


@dataclass(frozen=True)
class EnergyTable:
    joules: dict[str, float]
    sources: dict[str, str]
    technology: str = ""
    adc_law: str = DEFAULT_ADC_LAW  # how ADC conversion energy scales with bits (ADC_LAWS)

    def __post_init__(self) -> None:
        adc_law(self.adc_law)  # a ValueError naming the known laws

    def with_adc_law(self, name: str | None) -> "EnergyTable":
        """This table with ADC conversions priced under law ``name`` (None: unchanged)."""
        return self if name is None or name == self.adc_law else replace(self, adc_law=name)

    @classmethod
    def load(cls, path: str | Path | None = None) -> "EnergyTable":
        """The packaged table, or a user table with the same schema."""
        data, where = read_table("energy table", "energy_table.yaml", path)
        events = data.get("events")
        if not isinstance(events, dict) or not events:
            raise ValueError(f"energy table {where}: needs a non-empty 'events' mapping")
        law = data.get("adc_law", DEFAULT_ADC_LAW)
        if law not in ADC_LAWS:
            raise ValueError(f"energy table {where}: 'adc_law' is {law!r}; choose one of {sorted(ADC_LAWS)}")
        joules, sources = {}, {}
        for name, row in events.items():
            if not isinstance(row, dict) or "joules" not in row or "source" not in row:
                raise ValueError(f"energy table {where}: event {name!r} needs 'joules' and 'source'")
            value = float(row["joules"])
            if value < 0:
                raise ValueError(f"energy table {where}: event {name!r} has negative energy")
            joules[name], sources[name] = value, str(row["source"])
        return cls(joules, sources, str(data.get("technology", "")), law)

    def per_event(self, event: str) -> float:
        if event in self.joules:
            return self.joules[event]
        m = _ADC.match(event)
        if m and "adc_fom_per_step" in self.joules:
            return self.adc_conversion(int(m.group(1)))
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


    def adc_conversion(self, bits: int) -> float:
        """Joules of one ``bits``-bit conversion from the FoM: ``FoM * 2^8 * law(bits, 8)``."""
        anchor = self.joules["adc_fom_per_step"] * 2.0 ** ADC_REF_BITS
        return anchor * float(adc_law(self.adc_law)(float(bits), float(ADC_REF_BITS)))


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
