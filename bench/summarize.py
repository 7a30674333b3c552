"""Print a short table from a pytest-benchmark JSON written by bench/test_bench_kernels.py,
and optionally copy the JSON (which carries device, versions and ceilings) elsewhere.

    python3 bench/summarize.py bench.json [--copy-to bench/results/<date>-<gpu>.json ...]
"""

import argparse
import json
import shutil
from pathlib import Path


def rows(data: dict):
    by_case = {}
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if not {"op", "shape", "mode", "impl", "median_ms"} <= info.keys():
            continue
        key = (info["op"], "x".join(map(str, info["shape"])), info["mode"])
        by_case.setdefault(key, {})[info["impl"]] = info
    for (op, shape, mode), impls in sorted(by_case.items()):
        eager = impls.get("eager", {}).get("median_ms")
        for impl, info in sorted(impls.items()):
            if "fraction_of_copy_bandwidth" in info:
                frac = f"{info['fraction_of_copy_bandwidth']:.2f} bw"
            elif "fraction_of_matmul_peak" in info:
                frac = f"{info['fraction_of_matmul_peak']:.2f} mm"
            else:
                frac = "-"
            speedup = f"{eager / info['median_ms']:.2f}x" if eager else "-"
            peak = f"{info['peak_extra_MiB']:.0f}" if "peak_extra_MiB" in info else "-"
            yield op, shape, mode, impl, f"{info['median_ms']:.3f}", speedup, frac, peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("bench_json")
    parser.add_argument("--copy-to", action="append", default=[])
    args = parser.parse_args()
    data = json.loads(Path(args.bench_json).read_text())
    lima = data.get("lima", {})
    ceil = lima.get("ceilings", {})
    print(f"device: {lima.get('device')}  versions: {lima.get('versions')}")
    if ceil:
        print(f"ceilings: copy {ceil.get('copy_bandwidth_GBps', 0):.0f} GB/s, "
              f"matmul {ceil.get('matmul_TFLOPs', 0):.1f} TFLOP/s ({ceil.get('matmul')})")
    header = ("op", "shape", "mode", "impl", "median ms", "vs eager", "fraction", "peak MiB")
    table = [header, *rows(data)]
    widths = [max(len(str(r[i])) for r in table) for i in range(len(header))]
    for r in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    print("fraction: 'bw' = bytes moved / time / copy bandwidth; 'mm' = model FLOPs / time / matmul peak")
    for dest in args.copy_to:
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.bench_json, dest)
        print(f"results: {dest}")


if __name__ == "__main__":
    main()
