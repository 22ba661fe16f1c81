"""Analytic crossbar cost model: hand counts, agreement with the event meter, ADC laws, tables."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from edgecloud.cim.backend import create_backend
from edgecloud.cim.cost import CostModel, CostTable, LayerLayout, compare, layout_from, layouts_from_backend
from edgecloud.cim.energy import EnergyMeter, EnergyTable
from edgecloud.cim.events import EventLog, recording
from edgecloud.nn.quant import QuantConv2d

FOM, CELL, DAC, SH, SA = 6.1e-15, 1.8e-15, 0.39e-12, 1.0e-15, 0.05e-12  # packaged energy_table.yaml


def hand_layout(**kw) -> LayerLayout:
    # K=20 rows, O=3 outputs, 8-bit weights (7 magnitude bits -> S=4 two-bit slices), 8x8 arrays,
    # 8-bit activations bit-serial (t=8), 4 output positions per sample
    args = dict(name="hand", k_rows=20, outputs=3, slices=4, rows=8, cols=8, n_cycles=8, dac_bits=1,
                cell_bits=2, positions=4)
    return LayerLayout(**{**args, **kw})


def test_hand_counted_layer() -> None:
    lay = hand_layout()
    # row tiles of 8, 8, 4 rows; J = 4*3 = 12 pairs, 4 pairs per 8-column array -> 3 column tiles
    assert (lay.row_tile_rows, lay.pair_columns, lay.n_col_tiles, lay.arrays) == ([8, 8, 4], 12, 3, 9)
    # ideal ADC: lossless bits per row tile: 8 rows * 3 * 1 = 24 -> 5 b; 4 rows * 3 = 12 -> 4 b
    assert lay.adc_bits == ((5, 5, 5), (5, 5, 5), (4, 4, 4))
    assert lay.conversions == 4 * 8 * 3 * 12 == 1152
    assert lay.conversions_by_bits() == {4: 4 * 8 * 12, 5: 4 * 8 * 2 * 12}
    assert lay.dac_row_cycles == 4 * 8 * 20 * 3 == 1920
    assert lay.cell_reads == 4 * 8 * 20 * 24 == 15360

    cost = CostModel().layer_cost(lay)
    energy = {
        "array": 15360 * CELL,
        "adc": 768 * FOM * 2**5 + 384 * FOM * 2**4,
        "dac": 1920 * DAC,
        "sample_hold": 1152 * SH,
        "shift_add": 1152 * SA,
        "buffer": 0.0,
    }
    assert cost.energy_breakdown_j == pytest.approx(energy, rel=1e-12)
    assert cost.energy_j == pytest.approx(1.022592e-9, rel=1e-12)
    # ADC: one per array (ceil(8/128)); 4 pairs x 0.78125 ns x 5/8 = 1.95 ns < 100 ns read -> 100 ns cycles
    assert cost.resources["cycle_time_s"] == pytest.approx(100e-9)
    assert cost.latency_s == pytest.approx(4 * 8 * 100e-9)
    area = {
        "array": 9 * 8 * 8 * 2.5e-5 / 16384,
        "adc": 6 * 0.0012 / 2**3 + 3 * 0.0012 / 2**4,  # walden: x2 per bit below 8 b
        "dac": 9 * 8 * 1.67e-7,
        "sample_hold": 9 * 4 * 0.00004 / 1024,
        "shift_add": 9 * 0.5 * 6e-5,
        "buffer": 0.0,
    }
    assert cost.area_breakdown_mm2 == pytest.approx(area, rel=1e-12)
    assert cost.area_mm2 == pytest.approx(1.40930915625e-3, rel=1e-12)
    assert cost.edap == pytest.approx(1.022592e-9 * 3.2e-6 * 1.40930915625e-3, rel=1e-12)
    # the planner gives the same layout from shapes alone
    assert LayerLayout.plan("hand", 20, 3, weight_bits=8, act_bits=8, rows=8, cols=8, positions=4) == lay


PER_ARRAY = [[6, 5, 6], [6, 6, 4], [3, 6, 6]]  # (row tiles, column tiles) of an 18 x 12-pair layer on 8x8 arrays


@pytest.mark.parametrize("options", [
    {"rows": 8, "cols": 8},
    {"rows": 8, "cols": 8, "adc_bits": 6},
    {"rows": 8, "cols": 8, "adc_bits": 6, "layers": {"0": {"adc_bits": PER_ARRAY}}},
])
def test_energy_equals_the_event_meter_on_a_real_conv(options: dict) -> None:
    from edgecloud.cim.crossbar import CrossbarOptions
    if "layers" in options and "layers" not in CrossbarOptions.model_fields:
        pytest.skip("this crossbar backend has no per-layer ADC bits")
    layer = QuantConv2d(2, 3, 3, padding=1, bias=False, weight_bits=8, act_bits=8).eval()
    be = create_backend("crossbar", options, seed=0)
    be.prepare(torch.nn.Sequential(layer))
    x = torch.randint(0, 256, (1, 2, 4, 4)).float()
    with torch.no_grad():
        w_int, _ = layer.quantize_weight()
        log = EventLog(1)
        with recording(log):
            be.mvm(layer, x, w_int)
    (lay,) = layouts_from_backend(be, {"0": 16})  # 4x4 output positions, K = 18
    assert (lay.k_rows, lay.slices, lay.arrays) == (18, 4, 9)
    if "layers" in options:
        assert [list(r) for r in lay.adc_bits] == PER_ARRAY
    elif "adc_bits" not in options:
        assert [r[0] for r in lay.adc_bits] == [5, 5, 3]  # lossless: 8 * 3 = 24, 2 * 3 = 6 levels
    mapped = be.mapped(layer, w_int)
    events = {e: n * 16 for c, e, n in be.events(mapped, layer) if e != "mac_fp32"}
    assert {e: n for _, e, n in lay.events()} == events
    per = {k: float(v[0]) for k, v in EnergyMeter().per_component(log).items()}
    e = CostModel().layer_cost(lay).energy_breakdown_j
    assert e["adc"] + e["sample_hold"] == pytest.approx(per["adc"], rel=1e-12)
    assert e["dac"] == pytest.approx(per["dac"], rel=1e-12)
    assert e["array"] == pytest.approx(per["crossbar"], rel=1e-12)
    assert e["shift_add"] == pytest.approx(per["digital"] - 16 * 3 * 4.6e-12, rel=1e-12)  # less output scaling
    # a MappedLayer alone gives the same layout (per-array bits read from its per-column site_bits)
    assert layout_from(mapped, rows=8, cols=8, cell_bits=2, positions=16) == lay


@pytest.mark.parametrize("law, factor", [("walden", 2.0), ("schreier", 4.0), ("linear", 8 / 7)])
def test_one_adc_bit_less_scales_adc_energy_and_area_by_the_law(law: str, factor: float) -> None:
    model = CostModel(adc_law=law)
    at8, at7 = model.layer_cost(hand_layout(adc_bits=8)), model.layer_cost(hand_layout(adc_bits=7))
    assert at8.energy_breakdown_j["adc"] / at7.energy_breakdown_j["adc"] == pytest.approx(factor)
    assert at8.area_breakdown_mm2["adc"] / at7.area_breakdown_mm2["adc"] == pytest.approx(factor)
    assert at8.energy_breakdown_j["adc"] == pytest.approx(1152 * FOM * 2**8)  # every law anchored at ISAAC 8 b
    assert at8.to_dict()["adc_law"] == law and compare(at7, at8)["adc_law"] == {"a": law, "b": law}


def test_per_array_bits_lower_only_that_array() -> None:
    model = CostModel()
    bits = [[8, 8, 8], [8, 6, 8], [8, 8, 8]]
    lowered = model.layer_cost(hand_layout(adc_bits=torch.tensor(bits)))
    full = model.layer_cost(hand_layout(adc_bits=8))
    per_array = 4 * 8 * 4  # positions x cycles x 4 pairs of array (1, 1)
    assert full.energy_breakdown_j["adc"] - lowered.energy_breakdown_j["adc"] == pytest.approx(
        per_array * FOM * (2**8 - 2**6))
    assert full.area_mm2 - lowered.area_mm2 == pytest.approx(0.0012 * (1 - 1 / 4))
    with pytest.raises(ValueError, match=r"shape \(n_row_tiles, n_col_tiles\) = \(3, 3\)"):
        hand_layout(adc_bits=[[8, 8], [8, 8]])


def test_larger_arrays_need_fewer_arrays_and_adcs_can_set_the_cycle() -> None:
    model = CostModel()
    small = model.layer_cost(LayerLayout.plan("s", 300, 64, weight_bits=8, act_bits=8, rows=32, cols=32))
    big = model.layer_cost(LayerLayout.plan("b", 300, 64, weight_bits=8, act_bits=8, rows=128, cols=128))
    assert big.resources["arrays"] == 3 * 4 < small.resources["arrays"] == 10 * 16
    assert big.area_breakdown_mm2["adc"] < small.area_breakdown_mm2["adc"]
    # ADC-bound: 1024 columns share one 8-bit ADC -> 512 pairs x 0.78125 ns = 400 ns > 100 ns read
    slow = CostModel(CostTable.load().with_values(adc_columns_per_adc=1024))
    cost = slow.layer_cost(LayerLayout.plan("w", 64, 256, weight_bits=8, act_bits=8, rows=64, cols=1024,
                                            adc_bits=8))
    assert cost.resources["cycle_time_s"] == pytest.approx(512 * 0.78125e-9)
    assert cost.latency_s == pytest.approx(8 * 512 * 0.78125e-9)


def test_model_total_compare_and_json() -> None:
    model = CostModel()
    a, b = hand_layout(name="a"), hand_layout(name="b", positions=1, adc_bits=6)
    tot = model.cost([a, b], name="net")
    la, lb = model.layer_cost(a), model.layer_cost(b)
    assert tot.energy_j == pytest.approx(la.energy_j + lb.energy_j)
    assert tot.latency_s == pytest.approx(la.latency_s + lb.latency_s)  # layers in sequence
    assert tot.edap == pytest.approx(tot.energy_j * tot.latency_s * tot.area_mm2)
    d = json.loads(json.dumps(tot.to_dict()))
    assert {"energy_j", "energy_breakdown_j", "latency_s", "area_mm2", "area_breakdown_mm2", "edap",
            "adc_law"} <= set(d) and d["adc_law"] == "walden" and len(d["layers"]) == 2
    r = compare(la, lb)
    assert r["latency_s"] == pytest.approx(4.0) and r["edap"] == pytest.approx(la.edap / lb.edap)
    assert r["energy_breakdown_j"]["buffer"] == 1.0  # 0 / 0
    buffered = CostModel(replace(CostTable.load(), include_buffer=True)).layer_cost(a)
    assert buffered.energy_breakdown_j["buffer"] == pytest.approx(4 * (20 * 8 + 3 * 8) / 64 * 10e-12)
    assert buffered.area_breakdown_mm2["buffer"] == pytest.approx(4 * 3 * 8 / 8 / 1024 * 1.2969e-3)


def test_user_table_errors_name_the_file_and_the_key(tmp_path: Path) -> None:
    packaged = (Path(__file__).parents[1] / "edgecloud/cim/cost_table.yaml").read_text()
    assert CostTable.load().values == CostTable.load(_write(tmp_path, packaged)).values
    assert all(CostTable.load().sources.values())
    missing = "\n".join(ln for ln in packaged.splitlines() if not ln.strip().startswith("adc_area_mm2:"))
    path = _write(tmp_path, missing)
    with pytest.raises(ValueError, match=rf"{path}.*'adc_area_mm2'"):
        CostTable.load(path)
    path = _write(tmp_path, packaged.replace("adc_law: walden", "adc_law: cubic"))
    with pytest.raises(ValueError, match=rf"{path}.*'adc_law'.*cubic"):
        CostTable.load(path)
    with pytest.raises(FileNotFoundError, match="cost table"):
        CostTable.load(tmp_path / "nope.yaml")
    assert EnergyTable.load().per_event("adc_conversion_8b") == pytest.approx(FOM * 256)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / f"t{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(text)
    return path
