"""Energy table and meter: joules = counts x constants, per component, per sample."""

import numpy as np
import pytest

from edgecloud.cim.energy import EnergyMeter, EnergyTable
from edgecloud.cim.events import EventLog, record, recording


def test_every_row_has_a_source_and_adc_scales_with_resolution():
    table = EnergyTable.load()
    assert all(table.sources[k] for k in table.joules)
    assert table.per_event("adc_conversion_8b") == pytest.approx(2 * table.per_event("adc_conversion_7b"))
    assert table.per_event("adc_conversion_8b") == pytest.approx(1.56e-12, rel=0.01)  # ISAAC 8-bit
    assert table.per_event("mac_int3") == table.per_event("mac_int4")
    with pytest.raises(KeyError, match="no constant"):
        table.per_event("teleport")


def test_meter_attributes_events_to_the_right_samples():
    log = EventLog(4)
    with recording(log):
        record("digital", "mac_fp32", 10)
        with log.subset(np.array([1, 3])):
            record("radio", "radio_bit", np.array([100.0, 200.0]))
            with log.subset(np.array([1])):
                record("digital", "mac_binary", 7)
    record("digital", "mac_fp32", 1e9)  # outside recording: ignored
    table = EnergyTable.load()
    per = EnergyMeter(table).per_component(log)
    np.testing.assert_allclose(per["radio"], [0, 100 * 0.3e-6, 0, 200 * 0.3e-6])
    np.testing.assert_allclose(per["digital"], [10 * 4.6e-12] * 3 + [10 * 4.6e-12 + 7 * 0.005e-12])


def test_user_table_is_validated(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("events:\n  mac_fp32: {joules: 1.0}\n")
    with pytest.raises(ValueError, match="'source'"):
        EnergyTable.load(path)
    path.write_text("events:\n  mac_fp32: {joules: 2.0, source: me}\n")
    assert EnergyTable.load(path).per_event("mac_fp32") == 2.0
