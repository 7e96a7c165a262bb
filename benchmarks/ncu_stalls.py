"""Where a kernel's warps stall, from Nsight Compute's source page (``ncu -i R.ncu-rep --page source --csv
--print-source sass > R.csv``; gzip is fine): the stall reasons' shares, the samples before, in and after the
kernel's hottest loop (the backward branch executed most), and the hottest instructions.

    python ncu_stalls.py records/cuda-decode-session9/ncu-32768x8-sass.csv.gz
"""

from __future__ import annotations

import argparse
import collections
import csv
import gzip
import re
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", type=Path)
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    opener = gzip.open if args.csv.suffix == ".gz" else open
    with opener(args.csv, "rt") as f:
        rows = list(csv.reader(f))
    header, data = rows[1], rows[2:]  # the first row names the kernel
    col = {name: i for i, name in enumerate(header)}

    def num(row: list[str], name: str) -> float:
        return float(row[col[name]] or 0)

    samples = [num(r, "Warp Stall Sampling (All Samples)") for r in data]
    total = sum(samples)
    reasons: collections.Counter[str] = collections.Counter()
    for r in data:
        for name in header:
            if name.startswith("stall_") and "Not Issued" not in name:
                reasons[name] += num(r, name)
    print(f"{rows[0][1]}: {total:.0f} samples")
    for name, n in reasons.most_common(args.top):
        print(f"  {name:24s} {100 * n / total:5.1f}%")
    address = [int(r[0], 16) for r in data]
    loops = []
    for r, a in zip(data, address, strict=True):
        if (m := re.search(r"BRA\s+(0x[0-9a-f]+)", r[1])) and int(m.group(1), 16) < a:
            loops.append((num(r, "Instructions Executed"), int(m.group(1), 16), a))
    _, first, last = max(loops)
    before = sum(s for s, a in zip(samples, address, strict=True) if a < first)
    inside = sum(s for s, a in zip(samples, address, strict=True) if first <= a <= last)
    print(f"  before the hottest loop {100 * before / total:.1f}%, in it {100 * inside / total:.1f}%, "
          f"after it {100 * (total - before - inside) / total:.1f}%")  # fmt: skip
    for s, r in sorted(zip(samples, data, strict=True), key=lambda x: -x[0])[: args.top]:
        print(f"  {100 * s / total:5.1f}%  +{int(r[0], 16) - address[0]:#07x}  {r[1]}")


if __name__ == "__main__":
    main()
