"""Plain-text tables of evaluation and sweep results (for terminals and model cards)."""

from __future__ import annotations

from typing import Any


def _pm(stat: dict[str, float] | None, fmt: str, chips: int, scale: float = 1.0) -> str:
    if stat is None:
        return "-"
    text = format(stat["mean"] * scale, fmt)
    return f"{text} ± {format(stat['std'] * scale, fmt)}" if chips > 1 else text


def eval_table(report: dict[str, Any]) -> str:
    """The human-readable view of :meth:`EvalReport.to_json`."""
    s, chips = report["summary"], int(report["chips"])
    seeds = report["seeds"]
    where = f"{report.get('dataset', '?')}/{report.get('split', '?')}"
    thresholds = ", ".join(f"{k}={v}" for k, v in report["thresholds"].items())
    lines = [
        f"bundle {report['bundle']}  data {where} ({report['samples']} samples)  backend {report['backend']}"
        + (f" {report['backend_options']}" if report["backend_options"] else "")
        + (f" (bundle hardware defaults {report['bundle_hardware']})" if report.get("bundle_hardware") else "")
        + f"  chips {chips} (seed{'s' if chips > 1 else ''} {seeds[0]}"
        + (f"..{seeds[-1]}" if chips > 1 else "") + f")  cloud {report['cloud_runtime']}",
        f"policy {report['policy']}: {thresholds}",
        "",
        f"{'exit':<12}{'share %':>18}{'accuracy %':>18}",
    ]
    for name in report["exits"]:
        lines.append(f"{name:<12}{_pm(s['exit_share'].get(name), '.2f', chips, 100):>18}"
                     f"{_pm(s['exit_accuracy'].get(name), '.2f', chips, 100):>18}")
    lines.append(f"{'overall':<12}{'100.00':>18}{_pm(s['accuracy'], '.2f', chips, 100):>18}")
    law = report.get("adc_law")
    analog = report.get("backend", "digital") != "digital" and law
    lines += ["", f"{'energy per sample':<28}{'joules':>24}" + (f"  (ADC law {law})" if analog else "")]
    for comp, stat in s["energy_j"].items():
        lines.append(f"  {comp:<26}{_pm(stat, '.4g', chips):>24}")
    lines.append(f"  {'total':<26}{_pm(s['energy_total_j'], '.4g', chips):>24}")
    lines.append(f"  {'compute (no radio)':<26}{_pm(s['compute_energy_j'], '.4g', chips):>24}")
    base = s.get("baseline_fp_j")
    if base and base["mean"] > 0:
        lines += [
            f"  {'full-precision network':<26}{format(base['mean'], '.4g'):>24}"
            + (f"  ({report['baseline_network']})" if report.get("baseline_network", "this network") != "this network"
               else ""),
            f"energy ratio vs full precision: total {_pm(s['energy_ratio'], '.4g', chips)}, "
            f"compute only {_pm(s['compute_energy_ratio'], '.4g', chips)} "
            f"({_pm(s['compute_energy_reduction'], '.3g', chips)}x less compute energy)",
        ]
    else:
        lines.append("full-precision baseline unknown (manifest reference_macs = 0)")
    lines += energy_split_lines(report)
    if report.get("latency_s") is not None:
        lines += [
            "",
            f"crossbar cost model, one inference through every crossbar layer (ADC law {law}):",
            f"  latency {report['latency_s']:.4g} s, area {report['area_mm2']:.4g} mm^2, "
            f"energy {report['edap_energy_j']:.4g} J (analog arrays, ADC, DAC, S&H, shift-add), "
            f"EDAP {report['edap']:.4g} J*s*mm^2",
        ]
    return "\n".join(lines)


def energy_split_lines(report: dict[str, Any]) -> list[str]:
    """Energy per inference split into edge compute, radio and cloud, next to the all-cloud and
    all-device baselines (``report['baselines']``), with this deployment's total over each."""
    s, chips = report["summary"], int(report["chips"])
    split = s.get("energy_split_j")
    if not split:
        return []
    head = f"{'energy per inference (J)':<34}{'edge compute':>14}{'radio':>12}{'cloud':>12}{'total':>12}{'this / it':>11}"
    lines = ["", head]
    cells = "".join(f"{_pm(split.get(k), '.4g', 1):>{w}}" for k, w in
                    (("edge_compute", 14), ("radio", 12), ("cloud", 12), ("total", 12)))
    lines.append(f"  {'this bundle (edge + cloud)':<32}{cells}{'':>11}")
    ends = report.get("baselines")
    if not ends:
        lines.append("  baselines unknown (manifest reference_macs = 0)")
        return lines
    labels = {"all_cloud": f"all-cloud (raw {ends['all_cloud']['bytes_per_inference']:,} B + FP)",
              "all_device": "all-device (FP network)"}
    ratio_keys = {"all_cloud": "energy_vs_all_cloud", "all_device": "energy_vs_all_device"}
    for key in ("all_cloud", "all_device"):
        b = ends[key]
        cells = "".join(f"{format(b[k], '.4g'):>{w}}" for k, w in
                        (("edge_compute_j", 14), ("radio_j", 12), ("cloud_j", 12), ("total_j", 12)))
        lines.append(f"  {labels[key]:<32}{cells}{_pm(s.get(ratio_keys[key]), '.3g', chips):>11}")
    lines.append(f"  all-cloud: {ends['all_cloud']['what']}; all-device: {ends['all_device']['what']}")
    return lines


def sweep_table(rows: list[dict[str, Any]], exit_names: list[str], operating: dict[str, Any]) -> str:
    head = f"{'threshold':>10}" + "".join(f"{'%' + n:>10}" for n in [*exit_names, "cloud"])
    head += f"{'acc %':>9}{'energy J':>12}{'compute J':>12}{'E/E_fp':>10}"
    lines = [head]

    def line(r: dict[str, Any], mark: str = "") -> str:
        t = "-" if r["threshold"] is None else f"{r['threshold']:.4g}"
        text = f"{t:>10}" + "".join(f"{100 * r['share_' + n]:>10.1f}" for n in [*exit_names, "cloud"])
        ratio = "-" if r["energy_ratio"] is None else f"{r['energy_ratio']:.3g}"
        text += f"{100 * r['accuracy']:>9.2f}{r['energy_j']:>12.4g}{r['compute_energy_j']:>12.4g}{ratio:>10}"
        return text + mark

    lines += [line(r) for r in rows]
    lines.append(line(operating, "   <- operating point (manifest)"))
    return "\n".join(lines)


def baseline_table(b: dict[str, Any]) -> str:
    """The human-readable view of :func:`edgecloud.cim.baseline.compare`."""
    hw = b["hardware"]
    vn = b["von_neumann"]
    lines = [
        f"von Neumann baseline ({b['energy_table']} table; {hw['banks']} banks x {hw['cols']} columns, "
        f"{hw['io_bits']}-bit SRAM port per bank, {hw['multipliers']} multipliers, accumulate {hw['accumulate']}, "
        f"replicate {hw['replicate']}; weights from {vn['memory']}: {vn['memory_choice']})",
        f"{'layer':<16}{'on':>8}{'MACs':>11}{'CiM nJ':>10}{'VN nJ':>10}{'CiM us':>10}{'VN us':>10}",
    ]
    for r in b["layers"]:
        lines.append(f"{r['name']:<16}{r['mapped']:>8}{r['macs']:>11,}{sum(r['cim']['energy_j'].values()) * 1e9:>10.3f}"
                     f"{sum(r['vn']['energy_j'].values()) * 1e9:>10.3f}{r['cim']['delay_s'] * 1e6:>10.3f}"
                     f"{r['vn']['delay_s'] * 1e6:>10.3f}")
    cim_e, vn_e = b["cim"]["energy_total_j"], vn["energy_total_j"]
    lines += [
        f"{'total':<16}{'':>8}{'':>11}{cim_e * 1e9:>10.3f}{vn_e * 1e9:>10.3f}"
        f"{b['cim']['delay_s'] * 1e6:>10.3f}{vn['delay_s'] * 1e6:>10.3f}",
        "CiM energy by component (nJ): " + ", ".join(f"{k} {v * 1e9:.3f}" for k, v in b["cim"]["energy_j"].items()),
        "von Neumann energy by part (nJ): " + ", ".join(f"{k} {v * 1e9:.3f}" for k, v in vn["energy_j"].items()),
        f"von Neumann / SRAM-CiM: energy {b['energy_ratio']:.3g}x, delay {b['delay_ratio']:.3g}x "
        f"(SRAM-mapped layers only: {b['mapped_layers_only']['energy_ratio']:.3g}x, "
        f"{b['mapped_layers_only']['delay_ratio']:.3g}x); published IMAC: {b['published']['energy_ratio']}x, "
        f"{b['published']['delay_ratio']}x",
    ]
    if b.get("model_vs_measured") is not None:
        lines.append(f"model CiM energy vs the evaluation's measured energy: {100 * b['model_vs_measured']:+.3g} %")
    return "\n".join(lines)
