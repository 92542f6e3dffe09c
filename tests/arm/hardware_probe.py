"""Decode every machine fixture with arm_int4.hardware, plus the live machine; print JSON.

Run: "$(scripts/arm_emulation.sh --print)" tests/arm/hardware_probe.py   (and with the host python)
Imports only arm_int4.hardware (stdlib), so the emulated aarch64 Python needs no extra packages.
"""

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from arm_int4 import hardware

MACHINES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "machines"


def main():
    out = {"live": hardware.detect("/", probe_runtime=False).to_dict(), "fixtures": {}}
    for folder in sorted(p for p in MACHINES.iterdir() if p.is_dir()):
        if (folder / "root").is_dir():
            out["fixtures"][folder.name + "/root"] = hardware.detect(
                str(folder / "root"), probe_runtime=False
            ).to_dict()
        if any((folder / f).exists() for f in ("cpuinfo", "lscpu.json", "lscpu.txt")):
            out["fixtures"][folder.name] = hardware.from_dump(str(folder)).to_dict()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
